"""FSDP2: Axolotl's final adapter save leaves out R-LoRA's frozen offset path; put it back.

With `fsdp_config`, Axolotl writes the final adapter with `save_fsdp2_lora_adapter`
(axolotl/integrations/expert_parallel/shard.py, called from `save_trained_model` in axolotl/train.py, 0.19.0
and 0.21.0), which gathers only the *parameters* whose name contains "lora_". The persistent buffers
`rlora_offset_A`/`rlora_offset_B` are dropped, on GPU hosts as on CPU. A reload still reproduces the model
(the offsets are re-drawn from `init_seed` and the layer name), but PEFT warns "Found missing adapter keys"
and the file is no longer self-contained. The checkpoints (`checkpoint-N/`) go through the trainer's
gathered state dict and are complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_WRAPPER = "._checkpoint_wrapped_module"  # activation checkpointing's module-name infix


def add_missing_buffers(model: Any, output_dir: str) -> list[str]:
    """Add the adapter's buffers missing from `output_dir/adapter_model.safetensors` (rank 0 only; the
    offsets are not sharded by FSDP2, so no process group is needed). Idempotent; returns the added keys."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = Path(output_dir) / SAFETENSORS_WEIGHTS_NAME
    if not path.exists():
        return []
    buffers = {name.replace(_WRAPPER, ""): b for name, b in model.named_buffers() if ".rlora_offset_" in name}
    wanted = get_peft_model_state_dict(model, state_dict=buffers)
    saved = load_file(path)
    missing = {k: v.detach().cpu().contiguous() for k, v in wanted.items() if k not in saved}
    if missing:
        save_file(saved | missing, str(path), metadata={"format": "pt"})
    return sorted(missing)
