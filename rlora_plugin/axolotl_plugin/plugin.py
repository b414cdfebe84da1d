"""The R-LoRA Axolotl plugin: `adapter: rlora` builds or loads an R-LoRA adapter through PEFT.

    plugins:
      - rlora_plugin.RLoraPlugin
    adapter: rlora
    lora_r: 8
    lora_alpha: 16
    lora_dropout: 0.1
    lora_target_linear: true
    rlora:
      num_heads: 5

Axolotl's plugin manager is a process-wide singleton that calls every hook of every plugin, so each
hook acts only when `cfg.adapter == "rlora"` and returns None otherwise.
"""

from __future__ import annotations

import os
from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from peft import PeftModel, get_peft_model

# Importing any rlora_plugin module runs the package __init__, which registers the RLORA PEFT type.
from rlora_plugin.callbacks import RLoraMetricsCallback
from rlora_plugin.config import RLoraConfig, own_field_types
from rlora_plugin.host import absolute_base, adopt_saved_config

from . import LOG, fsdp, quantization
from .args import ADAPTER_NAME, build_rlora_config, rlora_options, target_modules
from .training import add_unadded_aux_loss


def _task_type(model: Any) -> str:
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    return "CAUSAL_LM"


class RLoraPlugin(BasePlugin):
    """Axolotl plugin for `adapter: rlora` (R-LoRA: randomized multi-head LoRA)."""

    def get_input_args(self) -> str:
        return "rlora_plugin.axolotl_plugin.args.RLoraArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        # Not lora_like: Axolotl's LoRA builder must not handle it; no ReLoRA (restarts merge).
        return [AdapterCapabilities(name=ADAPTER_NAME, lora_like=False, relora=False)]

    def register(self, cfg):
        if quantization.wants_kbit(cfg):
            # Axolotl builds the bitsandbytes config (and the kbit preparation) only for lora/qlora.
            quantization.patch_model_loader()

    def pre_model_load(self, cfg):
        if cfg.adapter != ADAPTER_NAME:
            return None
        LOG.info("R-LoRA plugin: adapter: rlora with %s", dict(cfg.rlora or {}))
        return None

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if cfg.adapter != ADAPTER_NAME:
            return None
        peft_config = build_rlora_config(cfg, target_modules(cfg, model), task_type=_task_type(model))
        if base := absolute_base(cfg.base_model):
            # get_peft_model (PEFT's or TRL's) records the model's own name_or_path, the relative `base_model`
            # Axolotl loaded, over the config's absolute one, and warns that it "was renamed": give it the same
            model.name_or_path = base
        if config_only:
            # Preference (TRL) paths want only the config; TRL wraps the model itself.
            return None, peft_config

        model_kwargs = {}
        if cfg.peft_autocast_adapter_dtype is not None:
            model_kwargs["autocast_adapter_dtype"] = cfg.peft_autocast_adapter_dtype
        if cfg.lora_model_dir:
            LOG.info("R-LoRA: loading the adapter in %s (trainable: %s)", cfg.lora_model_dir, not inference)
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference, **model_kwargs)
            saved = model.peft_config[model.active_adapter]
            # the saved adapter's forward settings govern it; this run's training settings apply to it
            run = {name: getattr(peft_config, name) for name in own_field_types()}
            if differ := adopt_saved_config(saved, run):
                LOG.warning(
                    "R-LoRA: the adapter in lora_model_dir governs these settings, not the config: %s",
                    "; ".join(differ),
                )
            peft_config = saved
        else:
            model = get_peft_model(model, peft_config, **model_kwargs)

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            model.print_trainable_parameters()
        return model, peft_config

    def post_train(self, cfg, model):
        # Called before and after Axolotl's final save; rank 0 writes. The second call completes an FSDP2 final
        # adapter, and each puts the R-LoRA section back into the model card Axolotl has just written.
        if cfg.adapter != ADAPTER_NAME or int(os.environ.get("RANK", "0")) != 0:
            return
        if cfg.fsdp_config and (added := fsdp.add_missing_buffers(model, cfg.output_dir)):
            # main_process_only=False: the process group is gone, and Axolotl 0.19's main-process check needs it
            LOG.info(
                "R-LoRA: added the %d frozen offset tensors that the FSDP2 adapter save left out",
                len(added),
                main_process_only=False,
            )
        # a PeftModel, or (after DPO, where TRL wrapped it) the base model PEFT injected the adapter into
        configs = getattr(model, "peft_config", None) or {}
        active = getattr(model, "active_adapter", None)  # a PeftModel's is a name; a transformers model's a method
        config = configs.get(active if isinstance(active, str) else "default")
        if isinstance(config, RLoraConfig):
            config.write_model_card(cfg.output_dir)

    def add_callbacks_post_trainer(self, cfg, trainer):
        """The metrics callback (it also logs `rlora/aux_loss`). The load-balancing loss is added to the loss by the
        model (`RLoraModel.forward`), except in the preference trainers, which compute their loss from the logits."""
        if cfg.adapter != ADAPTER_NAME:
            return []
        options = rlora_options(cfg)
        coef = trainer.model.peft_config[trainer.model.active_adapter].router_aux_loss_coef
        if coef > 0:
            LOG.info("R-LoRA: router load-balancing loss with coefficient %s", coef)
            if cfg.rl:
                add_unadded_aux_loss(trainer)
        if not options.metrics and coef == 0:
            return []
        return [RLoraMetricsCallback(trainer, metrics=options.metrics)]
