"""A test-only Axolotl plugin: multi-process training (DDP, DeepSpeed ZeRO, FSDP2) through Axolotl on a host
without an accelerator, which is how this project's CPU-only CI runs them. Not part of the package: Axolotl
and accelerate do not support multi-process training on CPU, and this is no R-LoRA feature (it would make no
difference to a plain LoRA run). Listed after `rlora_plugin.RLoraPlugin` in `plugins:` by
tests/test_multiprocess.py and benchmarks/scale.py (with tests/ on PYTHONPATH).

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

All act only when no CUDA device is visible and WORLD_SIZE > 1. Each patch goes through
`rlora_plugin.patching`, so an accelerate that changed fails with `HostChanged` (tests/test_axolotl_couplings.py).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from rlora_plugin.patching import Checked, HostChanged, private_attribute, wrap_once

LOG = get_logger("axolotl.integrations.cpu_distributed")  # under "axolotl.": Axolotl's log filter shows its INFO
CHECKED = Checked("accelerate", "1.13.0 and 1.15.0, with Axolotl 0.19.0 and 0.21.0")


def cpu_multiprocess() -> bool:
    """A launched multi-process run (WORLD_SIZE > 1) on a host where torch sees no CUDA device."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def gloo_backend(original):
    """Wrap `PartialState._prepare_backend`: `gloo` where accelerate found no backend in a launched run."""
    from accelerate.utils import DistributedType

    def _prepare_backend(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise HostChanged(CHECKED, "`PartialState._prepare_backend` to return (backend, distributed_type)")
        found, distributed_type = result
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
        return result

    return _prepare_backend


def cpu_device_mesh(original):
    """Wrap `ParallelismConfig.build_device_mesh`: a "cuda" mesh is built on "cpu"."""
    signature = inspect.signature(original)

    def build_device_mesh(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        if call.arguments["device_type"] == "cuda":
            call.arguments["device_type"] = "cpu"
        return original(*call.args, **call.kwargs)

    return build_device_mesh


def fsdp_on_cpu(original):
    """Wrap `AcceleratorState.__init__`: with an FSDP plugin on CPU processes, the FSDP distributed type."""
    from accelerate.utils import DistributedType

    signature = inspect.signature(original)

    def __init__(*args, **kwargs):
        original(*args, **kwargs)
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()  # an argument left out has its default
        state, fsdp_plugin = call.arguments["self"], call.arguments["fsdp_plugin"]
        if state.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            switch_to_fsdp(state, fsdp_plugin)

    return __init__


def switch_to_fsdp(state: Any, fsdp_plugin: Any) -> None:
    """What `AcceleratorState.__init__` does for accelerators, including recording the type in the shared
    `PartialState` (every later `AcceleratorState()` copies that state back over its own)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    mixed_precision = private_attribute(state, "_mixed_precision", str, CHECKED)
    shared = private_attribute(PartialState, "_shared_state", dict, CHECKED)
    if "distributed_type" not in shared:
        raise HostChanged(CHECKED, "`PartialState._shared_state` to hold the initialized state's distributed_type")
    if mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = fsdp_plugin
    shared["distributed_type"] = state.distributed_type


def patch_cpu_backend() -> None:
    """Make accelerate's `PartialState` use `gloo` where it would otherwise find no backend in a multi-process
    launch (no accelerator). Idempotent."""
    from accelerate.state import PartialState

    wrap_once(PartialState, "_prepare_backend", gloo_backend, CHECKED)


def patch_cpu_fsdp() -> None:
    """Let FSDP2 run on CPU processes (see 3. above): the device mesh on "cpu", and the FSDP distributed type
    where accelerate would leave MULTI_CPU although an FSDP plugin is given. Idempotent."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import AcceleratorState

    wrap_once(ParallelismConfig, "build_device_mesh", cpu_device_mesh, CHECKED, parameters=("device_type",))
    wrap_once(AcceleratorState, "__init__", fsdp_on_cpu, CHECKED, parameters=("self", "fsdp_plugin"))


def cpu_device_map(cfg: Any) -> None:
    """Replace Axolotl's per-rank `device_map = {"": LOCAL_RANK}` (an accelerator index) by the CPU."""
    device_map = cfg.device_map
    if isinstance(device_map, dict) and any(isinstance(v, int) for v in device_map.values()):
        cfg.device_map = {k: ("cpu" if isinstance(v, int) else v) for k, v in device_map.items()}


class CpuDistributedPlugin(BasePlugin):
    """The test-only plugin: the patches above for a launched multi-process run on a host without CUDA."""

    def register(self, cfg):  # noqa: ANN001, ANN201
        # Every rank, before Axolotl creates accelerate's first PartialState.
        if cpu_multiprocess():
            patch_cpu_backend()
            patch_cpu_fsdp()
            LOG.info("CPU-only multi-process run: accelerate will use the gloo backend (tests/cpu_distributed.py)")

    def load_datasets(self, cfg, preprocess: bool = False):  # noqa: ANN001, ANN201
        # The first hook after normalize_config, before the model loads.
        if cpu_multiprocess():
            cpu_device_map(cfg)
        return None  # Axolotl loads the datasets itself
