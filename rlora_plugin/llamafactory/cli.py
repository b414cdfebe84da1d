"""The command line: `rlora-llamafactory COMMAND CONFIG.yaml` (`python -m rlora_plugin.llamafactory`)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

from rlora_plugin.host import HostConfigError
from rlora_plugin.layer import MERGE_WHY

from .patches import install_aux_loss, install_patches
from .translate import HOST, hub_options, rlora_adapters

USAGE = """usage: rlora-llamafactory COMMAND CONFIG.yaml [key=value ...]   (python -m rlora_plugin.llamafactory)
  train     train, as llamafactory-cli train, with `finetuning_type: rlora` (multi-process: FORCE_TORCHRUN=1
            NPROC_PER_NODE=N, as llamafactory-cli; DeepSpeed with `deepspeed: ds_config.json` in the YAML)
  chat, api, webchat   as llamafactory-cli; an R-LoRA adapter in `adapter_name_or_path` loads unmerged
  export    refused for an R-LoRA adapter (it cannot be merged); see python -m rlora_plugin.export
Other commands are passed to llamafactory-cli unchanged."""


def main(argv: list[str] | None = None, callbacks: list[Any] = ()) -> int:
    """The command line; `callbacks` are extra TrainerCallbacks for `train`, as for LLaMA-Factory's `run_exp`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "help"
    if command in ("help", "-h", "--help"):
        print(USAGE)
        return 0
    patches = install_patches()
    sys.argv = [sys.argv[0], *argv]  # LLaMA-Factory's entries read the config from sys.argv
    from llamafactory.hparams import parser

    try:
        if command in ("train", "chat", "api", "webchat", "export"):
            config = parser.read_args()  # checked and rewritten here (patch 1), before anything loads
            if isinstance(config, dict):
                hub = hub_options(config)
                rlora = rlora_adapters(config.get("adapter_name_or_path"), config.get("adapter_folder"), **hub)
                if command == "export" and rlora:
                    raise HOST.error(
                        HOST.adapter_key,
                        config[HOST.adapter_key],
                        f"holds an R-LoRA adapter ({rlora[0]}), and `export` merges it: {MERGE_WHY}",
                        HOST.merge_fix,
                    )
    except HostConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if command == "train":
        from llamafactory.extras.misc import get_device_count, is_env_enabled

        if not _in_torchrun_worker() and (is_env_enabled("FORCE_TORCHRUN") or get_device_count() > 1):
            return _torchrun(argv)
        from llamafactory.train.tuner import run_exp

        callbacks = list(callbacks)
        if patches.run is not None and patches.run.options.get("router_aux_loss_coef", 0) > 0:
            install_aux_loss()  # patch 4: the `dpo` and `kto` trainers add the load-balancing loss
        if patches.run is not None and patches.run.metrics:
            from rlora_plugin.callbacks import RLoraMetricsCallback

            callbacks.append(RLoraMetricsCallback(None, metrics=True))
        run_exp(callbacks=callbacks)
        return 0
    from llamafactory import launcher

    sys.argv = [sys.argv[0], command, *argv]
    launcher.launch()
    if command == "chat":
        _join_generation_threads()
    return 0


def _in_torchrun_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _torchrun(argv: list[str]) -> int:
    """Run this launcher under torchrun (LLaMA-Factory's own launcher would re-execute its own file there, where
    these patches would be missing), with the environment variables llamafactory-cli reads."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    command = [
        "torchrun",
        f"--nnodes={os.getenv('NNODES', '1')}",
        f"--node_rank={os.getenv('NODE_RANK', '0')}",
        f"--nproc_per_node={os.getenv('NPROC_PER_NODE', str(get_device_count()))}",
        f"--master_addr={os.getenv('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={os.getenv('MASTER_PORT', str(find_available_port()))}",
        "-m",
        __package__,
        "train",
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def _join_generation_threads(timeout: float = 60.0) -> None:
    """Let LLaMA-Factory's streaming generation threads end before the interpreter does: `chat` returns once
    the last token is printed, and a daemon thread still inside a torch op at interpreter shutdown aborts the
    process ("terminate called without an active exception", exit 134; about 1 run in 10 on a loaded machine
    with an unmerged adapter)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.endswith("(generate)"):
            thread.join(timeout)
