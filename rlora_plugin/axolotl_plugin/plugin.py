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
from pathlib import Path
from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger
from peft import PeftModel, get_peft_model

import rlora_plugin  # noqa: F401  (registers the RLORA PEFT type, needed to build and to load)
from rlora_plugin.callbacks import RLoraMetricsCallback

from . import cpu_distributed, quantization
from .args import ADAPTER_NAME, build_rlora_config, rlora_options
from .training import install_aux_loss

# Under "axolotl." so that Axolotl's log filter shows INFO records (it keeps only WARNING+ of other loggers).
LOG = get_logger("axolotl.integrations.rlora_plugin")

# Settings that are fixed by an adapter saved in `lora_model_dir`; a config that disagrees is warned about.
_SAVED_FIELDS = (
    "r",
    "lora_alpha",
    "num_heads",
    "init",
    "head_dropout",
    "router_init",
    "use_rslora",
    "router_top_k",
)


def _task_type(model: Any) -> str:
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def _target_modules(model: Any, cfg: Any) -> Any:
    """`lora_target_linear` means PEFT's 'all-linear'; with `lora_target_modules` too, the union of both
    (as Axolotl's LoRA loader does, via its own `find_all_linear_names`)."""
    if not cfg.lora_target_linear:
        return cfg.lora_target_modules or None
    modules = cfg.lora_target_modules
    if not modules:
        return "all-linear"
    from axolotl.loaders.adapter import find_all_linear_names

    modules = modules if isinstance(modules, list) else [modules]
    return sorted(set(modules) | set(find_all_linear_names(model)))


def _record_base_model(peft_config: Any, cfg: Any) -> None:
    """A local `base_model` is recorded as an absolute path, so that the saved adapter (and
    `AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)`) finds its base from any working directory."""
    if cfg.base_model and Path(cfg.base_model).is_dir():
        peft_config.base_model_name_or_path = str(Path(cfg.base_model).resolve())


class RLoraPlugin(BasePlugin):
    """Axolotl plugin for `adapter: rlora` (R-LoRA: randomized multi-head LoRA)."""

    def get_input_args(self) -> str:
        return "rlora_plugin.axolotl_plugin.args.RLoraArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        # Not lora_like: Axolotl's LoRA builder must not handle it; no ReLoRA (restarts merge).
        return [AdapterCapabilities(name=ADAPTER_NAME, lora_like=False, relora=False)]

    def register(self, cfg):
        # Every rank, before Axolotl creates accelerate's first PartialState: on a CPU-only host a
        # multi-process launch (DDP or DeepSpeed) needs the gloo backend (see cpu_distributed.py).
        if (cfg or {}).get("adapter") == ADAPTER_NAME and cpu_distributed.cpu_multiprocess():
            cpu_distributed.patch_cpu_backend()
            LOG.info("R-LoRA: CPU-only multi-process run: accelerate will use the gloo backend")
        if quantization.wants_kbit(cfg):
            # Axolotl builds the bitsandbytes config (and the kbit preparation) only for lora/qlora.
            quantization.patch_model_loader()

    def load_datasets(self, cfg, preprocess: bool = False):
        # The first hook after normalize_config, before the model loads: Axolotl's per-rank device_map
        # {"": LOCAL_RANK} names an accelerator that a CPU-only host does not have.
        if cfg.adapter == ADAPTER_NAME and cpu_distributed.cpu_multiprocess():
            cpu_distributed.cpu_device_map(cfg)
        return None  # Axolotl loads the datasets itself

    def pre_model_load(self, cfg):
        if cfg.adapter != ADAPTER_NAME:
            return None
        LOG.info("R-LoRA plugin: adapter: rlora with %s", dict(cfg.rlora or {}))
        return None

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if cfg.adapter != ADAPTER_NAME:
            return None
        peft_config = build_rlora_config(cfg, _target_modules(model, cfg), task_type=_task_type(model))
        _record_base_model(peft_config, cfg)
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
            differ = [
                f"{f}: config {getattr(peft_config, f)!r}, saved {getattr(saved, f)!r}"
                for f in _SAVED_FIELDS
                if getattr(peft_config, f) != getattr(saved, f)
            ]
            if differ:
                LOG.warning(
                    "R-LoRA: the adapter in lora_model_dir governs these settings, not the config: %s",
                    "; ".join(differ),
                )
            peft_config = saved
        else:
            model = get_peft_model(model, peft_config, **model_kwargs)
            _record_base_model(peft_config, cfg)  # get_peft_model sets it from the model's own name_or_path

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            model.print_trainable_parameters()
        return model, peft_config

    def add_callbacks_post_trainer(self, cfg, trainer):
        """The metrics callback and, with `rlora.router_aux_loss_coef > 0`, the load-balancing loss."""
        if cfg.adapter != ADAPTER_NAME:
            return []
        options = rlora_options(cfg)
        aux = None
        if options.router_aux_loss_coef > 0:
            aux = install_aux_loss(trainer, options.router_aux_loss_coef)
            LOG.info("R-LoRA: router load-balancing loss with coefficient %s", options.router_aux_loss_coef)
        if not options.metrics and aux is None:
            return []
        return [RLoraMetricsCallback(trainer, metrics=options.metrics, aux=aux)]
