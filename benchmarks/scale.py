"""Scale-out benchmark: 1 process vs 2 processes (DDP, DeepSpeed ZeRO-2, ZeRO-3) through the Axolotl CLI, on CPU.

Every configuration trains the same `adapter: rlora` run with the same global batch (1 process x micro
batch B, or 2 processes x B/2), on a small random Llama built locally (no download), sequences padded to a
fixed length so every step does the same work. A plugin in this module (`ScaleProbePlugin`) records, in
every rank, the wall time of each optimizer step and the process's peak resident memory (`ru_maxrss`,
which includes the model, the optimizer state, DeepSpeed's buffers and Python itself). The step time
reported is the median over the steps after the first `--warmup`; memory is the peak of each rank and their
sum (what the machine had to hold).

    python -m benchmarks.scale                    # ~4 configurations x ~1 min on 2 cores
    python -m benchmarks.scale --configs single ddp --steps 6

Writes `benchmarks/results/scale.md` (and `scale.json`). DeepSpeed configurations are skipped when
deepspeed (>= 0.19 on CPU) is not installed. On a 2-core machine the 2-process runs get one core each
(torchrun sets OMP_NUM_THREADS=1) while the 1-process run uses both: the comparison is of the same
hardware split two ways, not of added hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from benchmarks import tiny_assets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("single", "ddp", "zero2", "zero3")
DEEPSPEED = {name: ROOT / "examples" / f"{name}.json" for name in ("zero2", "zero3")}  # what users are pointed at


# ---------------------------------------------------------------- the in-run probe (imported by Axolotl)
class _StepTimer(TrainerCallback):
    def __init__(self, out: Path):
        self.out, self.times, self._t = out, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t is not None:
            self.times.append(time.perf_counter() - self._t)

    def on_train_end(self, args, state, control, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        record = {
            "rank": rank,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "step_seconds": self.times,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": __import__("torch").get_num_threads(),
        }
        (self.out / f"scale_rank{rank}.json").write_text(json.dumps(record))


class ScaleProbePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_StepTimer(Path(cfg.output_dir))]


# ---------------------------------------------------------------- the driver
def build_assets(root: Path, hidden: int, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    assets = tiny_assets.build_assets(root)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(assets["model"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(assets["model"], safe_serialization=True)  # replaces the tiny model, same tokenizer
    assets["params"] = sum(p.numel() for p in model.parameters())
    return assets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(name: str, work: Path, assets: dict, args) -> dict:
    import yaml

    procs = 1 if name == "single" else 2
    cfg = {
        "base_model": str(assets["model"]),
        # tests/cpu_distributed.py: the test-only plugin that lets Axolotl train several processes on CPU
        "plugins": [
            "rlora_plugin.RLoraPlugin",
            "cpu_distributed.CpuDistributedPlugin",
            "benchmarks.scale.ScaleProbePlugin",
        ],
        "adapter": "rlora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "lora_target_linear": True,
        "rlora": {"num_heads": 5, "metrics": False},
        "datasets": [{"path": str(assets["alpaca"]), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0,
        "output_dir": str(work / name),
        "sequence_len": args.seq_len,
        "pad_to_sequence_len": True,
        "sample_packing": False,
        "micro_batch_size": args.global_batch // procs,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 7,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "dataloader_num_workers": 0,
        "dataset_num_proc": 1,
    }
    if name in DEEPSPEED:
        cfg["deepspeed"] = str(DEEPSPEED[name])
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    bindir = Path(sys.executable).parent
    if procs == 1:
        cmd = [sys.executable, "-m", "axolotl.cli.train", str(path)]
    else:
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), "-m", "axolotl.cli.train", str(path)]
    paths = (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH"))  # tests/: cpu_distributed.py
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", HF_HOME=str(work / "hf_home"),
               PYTHONPATH=os.pathsep.join(p for p in paths if p))  # fmt: skip
    start = time.monotonic()
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    if rc != 0:
        raise SystemExit(f"{name} failed (rc {rc}); see {work / f'{name}.log'}")
    ranks = [json.loads(p.read_text()) for p in sorted((work / name).glob("scale_rank*.json"))]
    steps = [max(r["step_seconds"][i] for r in ranks) for i in range(len(ranks[0]["step_seconds"]))]
    timed = steps[args.warmup :]
    return {
        "config": name,
        "processes": procs,
        "micro_batch": args.global_batch // procs,
        "step_median_s": statistics.median(timed),
        "step_min_s": min(timed),
        "step_max_s": max(timed),
        "rss_per_rank_mib": [round(r["max_rss_mib"]) for r in ranks],
        "rss_total_mib": round(sum(r["max_rss_mib"] for r in ranks)),
        "threads_per_rank": ranks[0]["threads"],
        "wall_s": wall,
    }


def deepspeed_ok() -> str | None:
    try:
        import deepspeed
    except ImportError:
        return "deepspeed not installed"
    from packaging.version import Version

    if Version(deepspeed.__version__) < Version("0.19"):
        return f"deepspeed {deepspeed.__version__} < 0.19 (ZeRO-2 fails on CPU/gloo)"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlora-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import axolotl
    import peft
    import torch
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    assets = build_assets(args.work / "assets", args.hidden, args.layers)
    skip = deepspeed_ok()
    rows, skipped = [], []
    for name in args.configs:
        if name in DEEPSPEED and skip:
            skipped.append(f"{name}: {skip}")
            continue
        row = run_config(name, args.work, assets, args)
        print(json.dumps(row), flush=True)
        rows.append(row)

    base = next((r for r in rows if r["config"] == "single"), None)
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = "-"
    lines = [
        "# Scale-out: 1 process vs 2 processes (DDP, ZeRO-2, ZeRO-3), same global batch",
        "",
        f"`python -m benchmarks.scale {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"- model: random Llama, hidden {args.hidden}, {args.layers} layers, {assets['params'] / 1e6:.1f}M params; "
        f"`adapter: rlora`, r=8, 5 heads, all linear layers; fp32, AdamW",
        f"- global batch {args.global_batch} sequences x {args.seq_len} tokens (padded); {args.steps} steps, "
        f"median over steps {args.warmup + 1}..{args.steps} (a step's time = the slowest rank's)",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average before: {os.getloadavg()[0]:.2f}; python {platform.python_version()}, "
        f"torch {torch.__version__}, "
        f"axolotl {axolotl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"deepspeed {ds_version}",
        "- memory: peak RSS (`ru_maxrss`) of each process, and their sum",
        "",
        "| config | processes x micro batch | step median (s) | min-max (s) | vs 1 process | peak RSS per rank (MiB) "
        "| total RSS (MiB) | wall incl. startup (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['step_median_s'] / base['step_median_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['config']} | {r['processes']} x {r['micro_batch']} | {r['step_median_s']:.3f} | "
            f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f} | {ratio} | "
            f"{', '.join(map(str, r['rss_per_rank_mib']))} | {r['rss_total_mib']} | {r['wall_s']:.0f} |"
        )
    lines += [f"- skipped: {s}" for s in skipped]
    lines += [
        "",
        "The 2-process runs split the same cores as the 1-process run (torchrun gives each rank one thread), "
        "so a 2-process speed-up here comes from two single-threaded processes using the cores better than "
        "one two-threaded process does on small matmuls, not from added hardware; the ZeRO rows add "
        "DeepSpeed's partitioning and gloo communication on top. ZeRO's memory savings concern the "
        "partitioned parameters, gradients and optimizer state, a small part of each process's RSS for an "
        "adapter on a small base (most is Python, torch and Axolotl themselves).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")
    (args.out / "scale.json").write_text(
        json.dumps(
            {"args": vars(args) | {"work": str(args.work), "out": str(args.out)}, "rows": rows, "skipped": skipped},
            indent=1,
        )
    )  # noqa: E501
    print("\n".join(lines))


if __name__ == "__main__":
    main()
