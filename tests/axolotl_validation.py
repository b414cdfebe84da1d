"""Validating an Axolotl config as `axolotl.cli.config.load_cfg` does (register the plugins, then validate),
on this machine or against a simulated one; and the small R-LoRA config the validation tests start from."""

from __future__ import annotations

import os

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")

from axolotl.cli.config import gpu_capabilities  # noqa: E402
from axolotl.utils.config import prepare_plugins, validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_80"}
CPU = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": None}
PLUGIN = "rlora_plugin.RLoraPlugin"


def validated(cfg: dict, capabilities: dict | None = None) -> DictDefault:
    """`cfg` validated with the R-LoRA plugin; with `capabilities` (`CPU`, `GPU`), as on such a machine."""
    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    if capabilities is None:
        capabilities, env_capabilities = gpu_capabilities()
    else:
        env_capabilities = {"torch_version": "2.13.0"}
    return validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)


def make_cfg(tiny, **overrides) -> dict:
    """An `adapter: rlora` config on the tiny model (`tiny`: the conftest fixture), `overrides` applied; a
    key set to None is left out."""
    cfg = {
        "base_model": str(tiny["model"]),
        "plugins": [PLUGIN],
        "adapter": "rlora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "lora_target_linear": True,
        "datasets": [{"path": str(tiny["alpaca"]), "ds_type": "json", "type": "alpaca"}],
        "sequence_len": 64,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "output_dir": "/tmp/rlora-unused-output",
        "bf16": False,
        "fp16": False,
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}
