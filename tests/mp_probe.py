"""A test-only Axolotl plugin for multi-process runs (DDP, ZeRO-2/3, FSDP2): what each rank built and trained.

`post_model_load` writes `probe_init_rank{R}.json` (a SHA-256 of every R-LoRA tensor, frozen offset path
included, with names and shapes) on every rank; `post_train` writes `probe_trained_rank{R}.json` the same
way (plus whether the parameters are FSDP2 DTensors) and, on rank 0, `probe_trained.pt` with the trained
in-memory model's logits on a fixed input. Under ZeRO-3 the partitioned tensors are gathered first, under
FSDP2 each sharded DTensor is gathered with `full_tensor()`, and the forward runs on every rank (it is
collective in both).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from axolotl_probe import probe_logits


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _gathered(params):
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned: gather the full tensors on every rank
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _torn_down(model) -> bool:
    """Sharded (ZeRO-3 or FSDP2) parameters after the process group is gone (Axolotl's second `post_train`
    call): they can no longer be gathered."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed.comm as dist

        return not dist.is_initialized()
    return any(hasattr(p, "full_tensor") for p in params) and not torch.distributed.is_initialized()


def adapter_fingerprint(model) -> dict:
    params = [(n, p) for n, p in model.named_parameters() if ".rlora_" in n]
    buffers = [(n, b) for n, b in model.named_buffers() if ".rlora_" in n]  # the frozen offset path
    digest, shapes = hashlib.sha256(), {}
    with _gathered([p for _, p in params]):
        for name, param in sorted(params + buffers, key=lambda item: item[0]):
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):  # an FSDP2-sharded DTensor: all-gather (collective)
                tensor = tensor.full_tensor()
            tensor = tensor.float().cpu().contiguous()
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
            shapes[name] = list(tensor.shape)
    return {"sha256": digest.hexdigest(), "shapes": shapes}


class MultiProcessProbePlugin(BasePlugin):
    def post_model_load(self, cfg, model):
        if cfg.adapter != "rlora":
            return
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        record = adapter_fingerprint(model) | {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        (Path(cfg.output_dir) / f"probe_init_rank{_rank()}.json").write_text(json.dumps(record))

    def post_train(self, cfg, model):  # called twice by Axolotl, on every rank: idempotent, and symmetric
        if cfg.adapter != "rlora" or _torn_down(model):
            return
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
        record = adapter_fingerprint(model) | {"fsdp2_sharded": sharded}
        (Path(cfg.output_dir) / f"probe_trained_rank{_rank()}.json").write_text(json.dumps(record))
        logits = probe_logits(model)
        if _rank() == 0:
            torch.save({"trained": logits}, Path(cfg.output_dir) / "probe_trained.pt")
