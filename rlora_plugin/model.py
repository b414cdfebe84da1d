"""The R-LoRA tuner: finds the target `nn.Linear` layers and wraps them in `RLoraLinear`."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import RLoraConfig, RLoraConfigError
from .errors import ConfigError, InputError
from .layer import RLoraLayer, RLoraLinear, merge_refusal
from .metrics import RouterAuxLoss

# A saved R-LoRA tensor's key: `<module>.<tensor name>[.<adapter>]` (peft >= 0.21 leaves the adapter name off a key
# it finds no place for).
_ADAPTER_TENSOR = re.compile(rf"\.({'|'.join(RLoraLayer.adapter_tensor_names)})(?:\.([^.]+))?$")


class RLoraModel(BaseTuner):
    """Creates an R-LoRA model (Liu et al., 2025) from a transformers model; use it through
    `peft.get_peft_model(model, RLoraConfig(...))` after `import rlora_plugin`.

    Targets default to PEFT's LoRA targets for the architecture. With `router_aux_loss_coef > 0`, training forwards
    add the routers' load-balancing loss to the model's loss (see `forward`).
    """

    prefix: str = "rlora_"
    tuner_layer_cls = RLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    # The load-balancing loss recorder, made at the first training forward with `router_aux_loss_coef > 0`.
    router_aux_loss: RouterAuxLoss | None = None
    # `coef *` the load-balancing loss of training forwards that returned no loss of their own, for a trainer that
    # computes its loss from the logits (TRL's DPO): see `pop_unadded_aux_loss`.
    _unadded_aux_loss: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; in a training forward with gradients and `router_aux_loss_coef > 0`, the model's loss
        plus `coef *` the routers' load-balancing loss over the batch's real tokens (mean over the adapted layers),
        as PEFT's AdaLoRA adds its regularizer here: so it trains in every host that lets the model compute its
        loss (HF Trainer, TRL's SFT, Axolotl, LLaMA-Factory). Weighted like the loss under gradient accumulation
        (see `_loss_share`)."""
        active = [a for a in self.active_adapters if a in self.peft_config]  # none after the last delete_adapter
        config = self.peft_config[active[0]] if active else None
        coef = config.router_aux_loss_coef if config is not None else 0.0
        if not (coef > 0 and self.training and torch.is_grad_enabled()):
            return self.model(*args, **kwargs)
        if self.router_aux_loss is None:
            self.router_aux_loss = RouterAuxLoss(self.model)
        if self._unadded_aux_loss is not None:
            warnings.warn(
                "R-LoRA: a training forward returned no loss (no `labels`), and nothing added its load-balancing loss "
                "(router_aux_loss_coef) to the loss the trainer computed from the logits, so the router is not "
                "balanced. Pass `labels` to the model, or add `model.base_model.pop_unadded_aux_loss()` to your loss.",
                stacklevel=2,
            )
            self._unadded_aux_loss = None
        self.router_aux_loss.start(kwargs.get("attention_mask"))
        try:
            outputs = self.model(*args, **kwargs)
        finally:
            aux = self.router_aux_loss.stop()
        if aux is None:
            warnings.warn(
                "R-LoRA: router_aux_loss_coef is set, but no load-balancing loss was recorded in a training forward "
                "with gradients (a reentrant gradient checkpoint runs the layers without them, and adapters switched "
                "off route nothing), so the router is not balanced. Use non-reentrant checkpointing: "
                "gradient_checkpointing_kwargs={'use_reentrant': False}.",
                stacklevel=2,
            )
            return outputs
        weighted = coef * aux * self._loss_share(kwargs, config.task_type == "CAUSAL_LM", aux.device)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            outputs.loss = loss + weighted.to(loss.device, loss.dtype)
        else:
            self._unadded_aux_loss = weighted
        return outputs

    def _loss_share(self, kwargs: dict[str, Any], causal_lm: bool, device: torch.device) -> torch.Tensor:
        """This micro-batch's weight in the loss of the accumulated batch, which the load-balancing loss takes on.

        The HF Trainer divides a micro-batch's loss (its own mean) by the accumulation steps: weight 1, divided as
        the loss is. When it passes `num_items_in_batch` (model_accepts_loss_kwargs), the loss is the sum over the
        micro-batch's label tokens divided by the accumulated batch's count, and the trainer does not divide: the
        weight is this micro-batch's label tokens over `num_items_in_batch`, counted as the loss counts them (a
        causal LM predicts `labels[..., 1:]`), so the weights of the k micro-batches add up to 1 as the loss's
        own tokens do."""
        total = kwargs.get("num_items_in_batch")
        labels = kwargs.get("shift_labels")
        if labels is None and (labels := kwargs.get("labels")) is not None:
            if causal_lm:
                labels = labels[..., 1:]
        if total is None or not isinstance(labels, torch.Tensor):
            return torch.ones((), device=device)
        return labels.ne(-100).sum().to(device) / torch.as_tensor(total).to(device)

    def pop_unadded_aux_loss(self) -> torch.Tensor | None:
        """`coef *` the load-balancing loss of the training forwards since the last call that returned no loss of
        their own (None if none), and reset: for a trainer that computes its loss from the logits (TRL's DPO), to
        add to that loss. A training forward warns when the previous one's was never taken."""
        unadded, self._unadded_aux_loss = self._unadded_aux_loss, None
        return unadded

    def _check_new_adapter_config(self, config: RLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if config.router_aux_loss_coef > 0 and config.task_type is None and not config.inference_mode:
            raise RLoraConfigError(
                "router_aux_loss_coef",
                config.router_aux_loss_coef,
                "set task_type (e.g. 'CAUSAL_LM'), or router_aux_loss_coef=0",
                problem="needs a `task_type`: the load-balancing loss is added to the loss in the tuner's forward, "
                "which a PeftModel without a task type does not call",
            )

    def _create_and_replace(
        self,
        config: RLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, RLoraLinear):
            target.update_layer(adapter_name, config, current_key)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"R-LoRA can only adapt torch.nn.Linear layers (and GPT-2's Conv1D), but target module "
                f"'{current_key}' is a {type(base).__module__}.{type(base).__name__}. Remove it from "
                "`target_modules` (or use 'all-linear')."
            )
        new_module = RLoraLinear(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise merge_refusal()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            "RLoraModel",
            "adapters",
            kwargs.get("adapters", args[0] if args else None),
            "cannot be combined with add_weighted_adapter: each R-LoRA adapter routes every token through its own "
            "router, so a weighted sum of two adapters' heads has no router that matches it",
            "load the adapters side by side (load_adapter) and switch with set_adapter instead",
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Refuse a damaged adapter before any of it is loaded: for every adapter the state dict brings, each
        adapted layer must get each of its tensors (a missing one would leave a random router or head in
        place), no tensor it does not have (an `adapter_config.json` edited from `init: random` to `zero`
        would silently drop the saved offset path), and only finite values."""
        loaded = {}  # key without the prefix and the adapter name -> (adapter, tensor)
        for key, value in state_dict.items():
            match = _ADAPTER_TENSOR.search(key)
            if not (key.startswith(prefix) and match):
                continue
            name, adapter = key.removeprefix(prefix), match.group(2)  # adapter None: PEFT found no place for it
            if adapter is not None:
                name = name.removesuffix(f".{adapter}")
            loaded[name] = (adapter, value)
        adapters = {adapter for adapter, _ in loaded.values() if adapter}
        if loaded:
            self._check_adapter_tensors(loaded, adapters or {"default"}, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_adapter_tensors(
        self, loaded: dict[str, tuple[str | None, torch.Tensor]], adapters: set[str], prefix: str
    ) -> None:
        def refuse(adapter: str, key: str, value: Any, problem: str) -> None:
            source = getattr(self.peft_config.get(adapter), "source", None)
            where = f"{source}/adapter_model.safetensors" if source else "the saved adapter weights"
            raise InputError(
                f"Cannot load R-LoRA adapter '{adapter}' from {where}",
                f"{prefix}{key}",
                value,
                f"{problem}: the file is damaged or does not belong to this adapter_config.json",
                "save the adapter again from the trained model, or restore both files together",
            )

        expected = {}  # key without the adapter name -> adapter
        for name, layer in self.model.named_modules():
            if not isinstance(layer, RLoraLayer):
                continue
            for tensor in RLoraLayer.adapter_tensor_names:
                for adapter in adapters & set(getattr(layer, tensor)):
                    expected[f"model.{name}.{tensor}"] = adapter
        unnamed = min(adapters)  # the adapter a key without an adapter name is reported under
        for key, (adapter, value) in sorted(loaded.items()):
            adapter = adapter or unnamed  # peft >= 0.21 leaves a key it cannot place without the adapter name
            if key not in expected:
                config = self.peft_config.get(adapter)
                init = getattr(config, "init", None)
                refuse(adapter, key, value, f"is not part of this adapter (its config: init={init!r})")
            if value.numel() and not torch.isfinite(value).all():
                refuse(adapter, key, value, "holds NaN or infinite values")
        for key in sorted(set(expected) - set(loaded)):
            refuse(expected[key], key, None, "is missing")


def find_tuner(model: nn.Module) -> RLoraModel | None:
    """The `RLoraModel` inside `model` (a PeftModel, or a module that holds one), or None."""
    return next((module for module in model.modules() if isinstance(module, RLoraModel)), None)


def with_unadded_aux_loss(out: Any, model: nn.Module) -> Any:
    """A trainer's `compute_loss` result (`loss` or `(loss, outputs)`) plus the load-balancing loss that the R-LoRA
    model inside `model` kept from the forwards it ran (`pop_unadded_aux_loss`): for the hosts' wrappers of
    trainers that compute their loss from the logits. Unchanged when there is none (evaluation, no adapter)."""
    tuner = find_tuner(model)
    unadded = tuner.pop_unadded_aux_loss() if tuner is not None else None
    if unadded is None:
        return out
    loss = out[0] if isinstance(out, tuple) else out
    loss = loss + unadded.to(loss.device, loss.dtype)
    return (loss, *out[1:]) if isinstance(out, tuple) else loss
