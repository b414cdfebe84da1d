"""Every patch of LLaMA-Factory's internals, checked against llamafactory 0.9.5 (`CHECKED_VERSION`; any other
version is refused with `HostChanged` before a patch is made). Each goes through
`rlora_plugin.patching.wrap_once`, which refuses a host that lacks the attribute or a parameter the wrapper
reads. Patches 1 to 3 wrap a module attribute that LLaMA-Factory looks up at call time, for every command
(`install_patches`):

1. `llamafactory.hparams.parser.read_args`: every command's config passes through it (`_parse_args` looks
   it up at call time), so an `rlora` config is checked and rewritten there (translate.py), and the R-LoRA
   settings of the config read last are kept for patch 2 (None after any other config).
2. `llamafactory.model.adapter.LoraConfig`: looked up at call time by `_setup_lora_tuning`, the one place a
   new adapter's config is built; returns an `RLoraConfig` from LLaMA-Factory's LoRA arguments plus the
   run's R-LoRA settings while the config read last is an `rlora` one, PEFT's `LoraConfig` otherwise.
3. `llamafactory.model.adapter._setup_lora_tuning` (called by `init_adapter` at call time): for inference
   (`chat`, `api`, `webchat`) LLaMA-Factory merges a single unquantized adapter with `merge_and_unload()`,
   which R-LoRA's per-token router forbids; an R-LoRA adapter is loaded unmerged instead.
4. `compute_loss` of `CustomDPOTrainer` and `CustomKTOTrainer` (`PREFERENCE_TRAINERS`), wrapped in the class
   with `rlora_plugin.patching.wrap_once` for a `train` run with `rlora_router_aux_loss_coef` > 0
   (`install_aux_loss`): these trainers compute their loss from the logits, so the model returns no loss to add
   the load-balancing loss to and keeps it (`RLoraModel.pop_unadded_aux_loss`); the wrapper adds it. The `rm`
   and `ppo` stages drop the model's loss: refused when the config is read (translate.py).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable

import rlora_plugin  # noqa: F401  (registers the RLORA PEFT type: building and loading need it)
from rlora_plugin.host import adopt_saved_config
from rlora_plugin.layer import MERGE_WHY
from rlora_plugin.model import with_unadded_aux_loss
from rlora_plugin.patching import Checked, HostChanged, wrap_once

from .translate import FINETUNING_TYPE, HOST, RLoraRun, hub_options, rlora_adapters, translate

CHECKED_VERSION = "0.9.5"
CHECKED = Checked("llamafactory", CHECKED_VERSION)
# What `_setup_lora_tuning` passes to LoraConfig in 0.9.5; anything else means its code changed.
_LORA_CONFIG_ARGUMENTS = {"task_type", "inference_mode", "use_dora", *HOST.lora_keys}


class Patches:
    """The three wrappers, sharing one piece of state: the R-LoRA settings of the config read last."""

    def __init__(self) -> None:
        self.run: RLoraRun | None = None

    def read_args(self, original: Callable) -> Callable:
        def read_args(args=None):
            config = original(args)
            if isinstance(config, dict):
                config, self.run = translate(config)
                return config
            self.run = None
            flags = [str(arg) for arg in config]  # `--key value` flags instead of a config file
            for i, flag in enumerate(flags):
                key, _, value = flag.partition("=")
                value = value or (flags[i + 1] if i + 1 < len(flags) else "")
                if (key == "--finetuning_type" and value == FINETUNING_TYPE) or key.startswith("--rlora_"):
                    raise HOST.error(
                        key,
                        value,
                        "is a command-line flag, and R-LoRA's settings are read from a YAML or JSON config only",
                        "write the settings into CONFIG.yaml and pass its path",
                    )
            return config

        return read_args

    def lora_config(self, original: Callable) -> Callable:
        def lora_config(**kwargs):
            if self.run is None:
                return original(**kwargs)
            unknown = set(kwargs) - _LORA_CONFIG_ARGUMENTS
            if unknown or kwargs.get("use_dora"):
                raise HostChanged(
                    CHECKED,
                    "`llamafactory.model.adapter._setup_lora_tuning` to pass LoraConfig only the arguments "
                    f"{sorted(_LORA_CONFIG_ARGUMENTS)} and no `use_dora=True` (it passed "
                    f"{sorted(unknown) or 'use_dora=True'})",
                )
            fixed = {key: kwargs.pop(key) for key in ("task_type", "inference_mode") if key in kwargs}
            kwargs.pop("use_dora", None)
            return HOST.build_config({**kwargs, **self.run.options}, **fixed)

        return lora_config

    def setup_lora_tuning(self, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def setup(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments  # by name: fails loudly if the signature changed
            model_args = bound["model_args"]
            hub = hub_options(model_args)
            rlora = rlora_adapters(model_args.adapter_name_or_path, model_args.adapter_folder, **hub)
            if not rlora or bound["is_trainable"]:  # training continues the adapter as LLaMA-Factory does
                model = original(*args, **kwargs)
                if rlora and self.run is not None:  # its saved forward settings, this run's training ones
                    ignored = adopt_saved_config(model.peft_config[model.active_adapter], self.run.options)
                    if ignored:
                        logging.getLogger("llamafactory.rlora_plugin").warning(
                            f"R-LoRA: the adapter in {rlora[0]} governs these settings: {'; '.join(ignored)}"
                        )
                return model
            from peft import PeftModel

            model = PeftModel.from_pretrained(
                bound["model"],
                rlora[0],
                subfolder=model_args.adapter_folder,
                offload_folder=model_args.offload_folder,
                **hub,
            )
            logging.getLogger("llamafactory.rlora_plugin").info(
                f"Loaded the R-LoRA adapter {rlora[0]} unmerged ({MERGE_WHY})."
            )
            return model

        return setup


# module, attribute, the `Patches` method that wraps it, the parameters the wrapper reads by name: every patch in
# one place (see the docstring).
PATCHES = (
    ("llamafactory.hparams.parser", "read_args", Patches.read_args, ("args",)),
    ("llamafactory.model.adapter", "LoraConfig", Patches.lora_config, ()),
    (
        "llamafactory.model.adapter",
        "_setup_lora_tuning",
        Patches.setup_lora_tuning,
        ("model", "model_args", "is_trainable"),
    ),
)
_installed: list[Patches] = []


def install_patches() -> Patches:
    """Patch LLaMA-Factory in this process (once; later calls return the same `Patches`); refuse a version the
    patches were not checked with."""
    if _installed:
        return _installed[0]
    if CHECKED.installed() != CHECKED_VERSION:
        raise HostChanged(
            CHECKED,
            f"the LLaMA-Factory internals that its launcher patches, as llamafactory {CHECKED_VERSION} has them",
            f"pip install llamafactory=={CHECKED_VERSION}",
        )
    patches = Patches()
    for module_name, attribute, wrap, parameters in PATCHES:
        wrap_once(importlib.import_module(module_name), attribute, wrap.__get__(patches), CHECKED, parameters)
    _installed.append(patches)
    return patches


# Patch 4: the trainers (module, class) whose `compute_loss` computes the loss from the logits.
PREFERENCE_TRAINERS = (
    ("llamafactory.train.dpo.trainer", "CustomDPOTrainer"),
    ("llamafactory.train.kto.trainer", "CustomKTOTrainer"),
)


def add_unadded_aux_loss(original: Callable) -> Callable:
    """`compute_loss` plus the load-balancing loss that the model kept from the forwards it ran (the reference
    and KL forwards run without gradients and keep none). The term is a micro-batch mean like the preference
    loss, and both trainers set `model_accepts_loss_kwargs = False`, so the HF Trainer divides the sum by the
    accumulation steps: weighted as the model weights it in `sft`."""

    def compute_loss(self, *args, **kwargs):  # noqa: ANN001, ANN202
        return with_unadded_aux_loss(original(self, *args, **kwargs), self.model)

    return compute_loss


def install_aux_loss() -> None:
    """Patch 4, in this process (once: `wrap_once`)."""
    for module_name, name in PREFERENCE_TRAINERS:
        wrap_once(getattr(importlib.import_module(module_name), name), "compute_loss", add_unadded_aux_loss, CHECKED)
