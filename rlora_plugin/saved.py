"""A saved R-LoRA adapter read from disk, without a base model: for the report and the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import RLoraConfig
from .errors import ConfigError

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def module_order(name: str) -> tuple:
    """Sort key of module names in depth order: `layers.2...` before `layers.10...`."""
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p) for p in name.split("."))


def saved_peft_type(adapter: str | Path, subfolder: str | None = None, **hub: Any) -> str | None:
    """The `peft_type` in the adapter_config.json of a local adapter directory or, for a model-hub id, of the
    hub's copy (offline: of the hub cache's, as PEFT's loading reads it); None when there is none to read.
    `hub`: hf_hub_download's revision, cache_dir, token."""
    config_file = Path(adapter, subfolder or "", CONFIG)
    if not config_file.is_file():
        if Path(adapter).exists():  # a local directory without an adapter config: not a hub id
            return None
        from huggingface_hub import hf_hub_download

        try:
            config_file = Path(hf_hub_download(str(adapter), CONFIG, subfolder=subfolder, **hub))
        except (OSError, ValueError):  # not on the hub (or not in its cache, offline), or not a valid repo id
            return None
    return json.loads(config_file.read_text()).get("peft_type")


def read_config(adapter_dir: str | Path) -> RLoraConfig:
    """The config of the saved R-LoRA adapter in `adapter_dir` (refused if the files are missing or the adapter is
    of another PEFT type)."""
    from peft import PeftConfig

    adapter_dir = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(
                f"{adapter_dir / name} not found: give the directory of a saved R-LoRA adapter (the training "
                f"run's output_dir or one of its checkpoint-* directories), which holds {CONFIG} and {WEIGHTS}."
            )
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if not isinstance(config, RLoraConfig):
        peft_type = getattr(config.peft_type, "value", config.peft_type)
        raise ConfigError(
            str(adapter_dir / CONFIG),
            "peft_type",
            peft_type,
            "is not an R-LoRA adapter's (RLORA)",
            "give the directory of a saved R-LoRA adapter; an adapter of another PEFT type needs no rlora-plugin",
        )
    return config


def read_adapter(adapter_dir: str | Path) -> tuple[RLoraConfig, dict[str, dict[str, torch.Tensor]], dict]:
    """The adapter's config, its tensors grouped by module (`{module: {"A": ..., "B": ..., "router": ...,
    "offset_A": ..., "offset_B": ...}}`, module names as saved, e.g. `base_model.model.model.layers.0.mlp.up_proj`)
    in fp32, and its other tensors (e.g. `modules_to_save`) as saved."""
    from safetensors.torch import load_file

    config = read_config(adapter_dir)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in load_file(Path(adapter_dir) / WEIGHTS).items():
        if ".rlora_" not in key:
            others[key] = tensor
            continue
        module, part = key.rsplit(".rlora_", 1)
        modules.setdefault(module, {})[part.split(".")[0]] = tensor.float()
    return config, modules, others
