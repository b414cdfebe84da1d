"""The R-LoRA tuner: finds the target `nn.Linear` layers and wraps them in `RLoraLinear`."""

from __future__ import annotations

import re
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import RLoraConfig
from .layer import MERGE_REFUSAL, RLoraLayer, RLoraLinear

# A saved R-LoRA tensor's key: `<module>.<tensor name>[.<adapter>]` (peft >= 0.21 leaves the adapter name off a key
# it finds no place for).
_ADAPTER_TENSOR = re.compile(rf"\.({'|'.join(RLoraLayer.adapter_tensor_names)})(?:\.([^.]+))?$")


class RLoraModel(BaseTuner):
    """Creates an R-LoRA model (Liu et al., 2025) from a transformers model; use it through
    `peft.get_peft_model(model, RLoraConfig(...))` after `import rlora_plugin`.

    Targets default to PEFT's LoRA targets for the architecture.
    """

    prefix: str = "rlora_"
    tuner_layer_cls = RLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
        raise ValueError(MERGE_REFUSAL)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "R-LoRA adapters cannot be combined with add_weighted_adapter: each adapter routes every token "
            "through its own router, so a weighted sum of two adapters' heads has no router that matches it. "
            "Load the adapters side by side (load_adapter) and switch with set_adapter instead."
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        """Refuse a damaged adapter before any of it is loaded: for every adapter the state dict brings, each
        adapted layer must get each of its tensors (a missing one would leave a random router or head in
        place), no tensor it does not have (an `adapter_config.json` edited from `init: random` to `zero`
        would silently drop the saved offset path), and only finite values."""
        loaded = {}  # key without the adapter name -> (adapter, tensor); adapter None: PEFT found no place for it
        for key, value in state_dict.items():
            match = _ADAPTER_TENSOR.search(key)
            if key.startswith(prefix) and match:
                loaded[key[len(prefix) : match.start(2) - 1 if match.group(2) else None]] = (match.group(2), value)
        adapters = {adapter for adapter, _ in loaded.values() if adapter}
        if loaded:
            self._check_adapter_tensors(loaded, adapters or {"default"}, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_adapter_tensors(
        self, loaded: dict[str, tuple[str | None, torch.Tensor]], adapters: set[str], prefix: str
    ) -> None:
        def refuse(adapter: str, key: str, problem: str) -> None:
            source = getattr(self.peft_config.get(adapter), "source", None)
            where = f"{source}/adapter_model.safetensors" if source else "the saved adapter weights"
            raise ValueError(
                f"Cannot load R-LoRA adapter '{adapter}' from {where}: tensor `{prefix}{key}` {problem} The file is "
                "damaged or does not belong to this adapter_config.json: save the adapter again from the "
                "trained model, or restore both files together."
            )

        expected = {}  # key without the adapter name -> adapter
        for name, layer in self.model.named_modules():
            if not isinstance(layer, RLoraLayer):
                continue
            for tensor in RLoraLayer.adapter_tensor_names:
                for adapter in adapters & set(getattr(layer, tensor)):
                    expected[f"model.{name}.{tensor}"] = adapter
        (first,) = sorted(adapters)[:1]
        for key, (adapter, value) in sorted(loaded.items()):
            adapter = adapter or first  # peft >= 0.21 leaves a key it cannot place without the adapter name
            if key not in expected:
                config = self.peft_config.get(adapter)
                refuse(
                    adapter, key, f"is not part of this adapter (its config: init={getattr(config, 'init', None)!r})."
                )
            if value.numel() and not torch.isfinite(value).all():
                refuse(adapter, key, "holds NaN or infinite values.")
        for key in sorted(set(expected) - set(loaded)):
            refuse(expected[key], key, "is missing.")
