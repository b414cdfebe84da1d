"""Multi-process training on a host without an accelerator (CPU only): DDP, DeepSpeed ZeRO and FSDP2 through Axolotl.

Launched with `torchrun --nproc_per_node N` (or `accelerate launch --multi_gpu --num_processes N`, or the
`deepspeed` launcher), Axolotl on a CPU-only host otherwise fails or, worse, silently trains N independent
copies:

1. Axolotl's `normalize_config` sets `device_map = {"": LOCAL_RANK}` whenever WORLD_SIZE > 1; transformers
   reads an integer device as an accelerator and the model load fails ("Cannot access accelerator device
   when none is available"). Fixed by `cpu_device_map(cfg)`, called from the plugin's `load_datasets` hook
   (the first hook that runs after `normalize_config`, before the model is loaded, on every rank).
2. accelerate's `PartialState` picks a process-group backend only for accelerators (or for `cpu=True`, which
   turns DeepSpeed off); with none it reports `num_processes == 1`. Axolotl has no `use_cpu`/`ddp_backend`
   key, and it (and `TrainingArguments`, and the trainer's `Accelerator`) rebuild that state several times.
   Without DeepSpeed every rank then trains alone on the whole dataset; with DeepSpeed,
   `deepspeed.initialize` fails: "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step
   * world_size". Fixed by `patch_cpu_backend()`, installed from the plugin's `register` hook (which runs
   on every rank before Axolotl creates the first `PartialState`): when accelerate found no backend in a
   launched multi-process run, it gets `gloo`, exactly what `cpu=True` would give, but DeepSpeed stays on.
3. FSDP2 (`fsdp_version: 2`, `fsdp_config`), fixed by `patch_cpu_fsdp()` (also from `register`), two gaps:
   a. Axolotl's `build_parallelism_config` (axolotl/utils/distributed.py, 0.19.0 line 314 / 0.21.0 line
      361) builds the device mesh with a hard-coded `build_device_mesh("cuda")`; on a CPU-only host torch
      fails there: "AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'". The mesh is
      built on "cpu" instead.
   b. accelerate's `AcceleratorState.__init__` (accelerate/state.py, 1.13 and 1.15: the `elif
      self.distributed_type in [MULTI_GPU, ..., MULTI_NEURON]` branch) switches to FSDP only for
      accelerators, never for MULTI_CPU: with (a) fixed, the run silently trains as plain DDP with the
      FSDP config ignored. The state is switched to FSDP (with the FSDP plugin accelerate built) as that
      branch would do; `fully_shard` itself runs on CPU under gloo.

All act only when no CUDA device is visible and WORLD_SIZE > 1; on GPU hosts nothing changes.
"""

from __future__ import annotations

import os
from typing import Any

from .patching import wrap_once

CHECKED = "accelerate 1.13.0 and 1.15.0 (Axolotl 0.19.0 and 0.21.0)"


def cpu_multiprocess() -> bool:
    """A launched multi-process run (WORLD_SIZE > 1) on a host where torch sees no CUDA device."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def patch_cpu_backend() -> None:
    """Make accelerate's `PartialState` use `gloo` where it would otherwise find no backend in a multi-process
    launch (no accelerator). Idempotent."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def prepare_backend(original):
        def _prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
            found, distributed_type = original(self, cpu, sagemaker_dp, backend)
            if (
                found is None
                and distributed_type == DistributedType.NO
                and int(os.environ.get("LOCAL_RANK", "-1")) != -1
                and int(os.environ.get("WORLD_SIZE", "1")) > 1
            ):
                if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
                    # PartialState initializes deepspeed.comm with this backend, then switches to DEEPSPEED
                    return "gloo", DistributedType.NO
                return "gloo", DistributedType.MULTI_CPU
            return found, distributed_type

        return _prepare_backend

    wrap_once(PartialState, "_prepare_backend", prepare_backend, CHECKED)


def patch_cpu_fsdp() -> None:
    """Let FSDP2 run on CPU processes (see 3. above): the device mesh on "cpu", and the FSDP distributed type
    where accelerate would leave MULTI_CPU although an FSDP plugin is given. Idempotent."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    def build_device_mesh(original):
        def _build_device_mesh(self, device_type: str):
            return original(self, "cpu" if device_type == "cuda" else device_type)

        return _build_device_mesh

    def init_state(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            fsdp_plugin = kwargs.get("fsdp_plugin", args[4] if len(args) > 4 else None)
            if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
                # what accelerate does for accelerators, including recording the type in the shared PartialState
                # (every later AcceleratorState() copies that state back over its own)
                if self._mixed_precision != "no":
                    fsdp_plugin.set_mixed_precision(self._mixed_precision)
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
                PartialState._shared_state["distributed_type"] = self.distributed_type

        return __init__

    wrap_once(ParallelismConfig, "build_device_mesh", build_device_mesh, CHECKED)
    wrap_once(AcceleratorState, "__init__", init_state, CHECKED)


def cpu_device_map(cfg: Any) -> None:
    """Replace Axolotl's per-rank `device_map = {"": LOCAL_RANK}` (an accelerator index) by the CPU."""
    device_map = cfg.device_map
    if isinstance(device_map, dict) and any(isinstance(v, int) for v in device_map.values()):
        cfg.device_map = {k: ("cpu" if isinstance(v, int) else v) for k, v in device_map.items()}
