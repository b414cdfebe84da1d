"""Running the Axolotl CLI in the CLI tests: a subprocess per run with an offline environment, and the tiny
model's YAML with the settings every CLI test shares."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent
PLUGINS = ["rlora_plugin.RLoraPlugin", "axolotl_probe.ProbePlugin"]
N_HEADS, RANK = 3, 4
TIMEOUT = 900


def _env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p),
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(work / "hf_home"),  # no user accelerate config, isolated datasets cache
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


class Run:
    def __init__(self, name: str, cmd: list[str], work: Path, stdin: str | None = None):
        self.name, self.log = name, work / f"{name}.log"
        self.start = time.monotonic()
        self.stdin = stdin
        self._log_file = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=_env(work),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait(self) -> Run:
        try:
            self.proc.communicate(self.stdin, timeout=TIMEOUT)
        finally:
            self._log_file.close()
        self.seconds = time.monotonic() - self.start
        self.returncode = self.proc.returncode
        self.output = self.log.read_text(errors="replace")
        print(f"{self.name}: rc={self.returncode} in {self.seconds:.0f}s")
        return self

    def check(self) -> Run:
        assert self.returncode == 0, f"{self.name} failed (rc {self.returncode}):\n{self.output[-6000:]}"
        return self


def run(name: str, cmd: list[str], work: Path, stdin: str | None = None) -> Run:
    return Run(name, cmd, work, stdin).wait()


def accelerate_train(cfg_path: Path) -> list[str]:
    return [
        str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "axolotl.cli.train", str(cfg_path),
    ]  # fmt: skip


def write_cfg(work: Path, name: str, tiny: dict, **overrides) -> Path:
    cfg = {
        "base_model": str(tiny["model"]),
        "plugins": PLUGINS,
        "adapter": "rlora",
        "lora_r": RANK,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "lora_target_linear": True,
        "rlora": {"num_heads": N_HEADS, "router_aux_loss_coef": 0.01},
        "datasets": [
            {"path": str(tiny["alpaca"]), "ds_type": "json", "type": "alpaca"},
            {
                "path": str(tiny["chat"]),
                "ds_type": "json",
                "type": "chat_template",
                "chat_template": "tokenizer_default",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
            },
        ],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0.1,
        "output_dir": str(work / name),
        "sequence_len": 128,
        "sample_packing": True,
        "gradient_checkpointing": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "eval_steps": 6,
        "save_steps": 3,
        "seed": 7,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "dataloader_num_workers": 0,  # a worker process re-imports axolotl: ~10 s per dataloader
        "dataset_num_proc": 1,
    }
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if isinstance(cfg.get("deepspeed"), dict):  # a DeepSpeed config given inline: written to its own JSON file
        ds_path = work / f"{name}-deepspeed.json"
        ds_path.write_text(json.dumps(cfg["deepspeed"]), encoding="utf-8")
        cfg["deepspeed"] = str(ds_path)
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_losses(out: Path) -> dict[int, float]:
    states = sorted(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(states[-1].read_text())["log_history"]
    return {rec["step"]: rec["loss"] for rec in history if "loss" in rec}


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def reload_logits(tiny: dict, adapter_dir: Path):
    """Logits of a plain PEFT reload (base model + adapter) on the probe input."""
    import torch
    from axolotl_probe import probe_logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import rlora_plugin  # noqa: F401

    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    return probe_logits(PeftModel.from_pretrained(base, adapter_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
