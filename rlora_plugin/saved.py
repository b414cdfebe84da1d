"""A saved R-LoRA adapter read from disk, without a base model: for the report and the export."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RLoraConfig

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


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
        raise ValueError(f"{adapter_dir} holds a {config.peft_type!r} adapter, not an R-LoRA (RLORA) one.")
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
