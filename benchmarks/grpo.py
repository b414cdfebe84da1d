"""GRPO step time: TRL's `GRPOTrainer` with R-LoRA against LoRA at equal trainable parameters, paired.

A GRPO step samples completions with the policy (PEFT's `generate`, without gradients: R-LoRA's offset path is
folded into the base weight there) and then trains on them. Both adapters sit on copies of one random
SmolLM2-135M-shaped model (its decoder cut to `--layers` layers, a local byte-level tokenizer), on the MLP
projections as in benchmarks/generate.py. Each round trains each variant for `--steps` steps in turn (the order
rotated every round); a variant's round time is its mean step time after the round's first step, and the ratio
is the median over rounds of R-LoRA's round time over LoRA-eq's in the same round.

    python -m benchmarks.grpo                  # about 15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchmarks.speed.cases import adapt
from benchmarks.speed.counts import MLP, equal_param_rank, smollm2_config
from benchmarks.speed.report import RESULTS, machine
from benchmarks.speed.timing import trainable
from benchmarks.tiny_assets import alpaca_rows, build_tokenizer

VARIANTS = {"lora_eq": "LoRA-eq", "rlora": "R-LoRA"}


class StepClock(transformers.TrainerCallback):
    """Wall time of every optimizer step (the rollout's generation included)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, *args: object, **kwargs: object) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: object, **kwargs: object) -> None:
        self.times.append(time.perf_counter() - self._start)


def round_time(model, tokenizer, prompts, args: argparse.Namespace, out_dir: str) -> float:
    """Mean step time of `args.steps` GRPO steps after a first one (which warms the caches up)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, max_steps=args.steps + 1, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=args.completion, generation_kwargs={"min_new_tokens": args.completion},
        logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    clock = StepClock()
    trainer = GRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: [len(c) / 100 for c in completions], args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    return statistics.mean(clock.times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the SmolLM2-shaped model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--completion", type=int, default=16, help="new tokens per completion")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    argv = argv if argv is not None else sys.argv[1:]
    start, load_start = time.perf_counter(), tuple(round(x, 2) for x in os.getloadavg())
    work = tempfile.mkdtemp(prefix="grpo-bench-")
    rows = alpaca_rows(64)
    tokenizer = build_tokenizer(Path(work) / "tokenizer", [r["instruction"] + "\n" + r["output"] for r in rows])
    prompts = [r["instruction"] for r in rows]
    config = smollm2_config(args.layers)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    d, i = config.hidden_size, config.intermediate_size
    eq = equal_param_rank([(d, i), (d, i), (i, d)], args.r, args.heads)
    models, counts = {}, {}
    for key in VARIANTS:
        torch.manual_seed(0)
        model = adapt(transformers.LlamaForCausalLM(config), key, args.r, args.heads, eq, MLP)
        models[key], counts[key] = model, trainable(model)
    times: dict[str, list[float]] = {key: [] for key in VARIANTS}
    keys = list(VARIANTS)
    for rnd in range(args.rounds):
        for key in keys[rnd % 2 :] + keys[: rnd % 2]:
            times[key].append(round_time(models[key], tokenizer, prompts, args, work))
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {t[-1]:.2f} s" for k, t in times.items()))
    ratios = [r / lo for r, lo in zip(times["rlora"], times["lora_eq"], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    lines = [
        "# GRPO step time: R-LoRA against LoRA at equal trainable parameters",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.grpo', *argv])}` in "
        f"{(time.perf_counter() - start) / 60:.1f} min.",
        "",
        *machine(),
        f"- TRL's GRPOTrainer, fp32, CPU: a random SmolLM2-135M-shaped model cut to {args.layers} layers (local "
        f"tokenizer, vocabulary {len(tokenizer)}), 8 completions per step (4 per prompt) of {args.completion} new "
        "tokens (sampled), reward = completion length; adapters on "
        f"{', '.join(MLP)}: R-LoRA r={args.r}, N={args.heads}, random init; LoRA-eq rank {eq}",
        f"- {args.rounds} rounds of {args.steps} timed steps per variant (after one untimed step), order rotated",
        f"- load average (1, 5, 15 min) at start {load_start}, at end {tuple(round(x, 2) for x in os.getloadavg())}",
        "",
        "| variant | trainable | step s, median of rounds | steps / s |",
        "|---|---|---|---|",
        *(
            f"| {VARIANTS[k]} | {counts[k]:,} | {statistics.median(t):.2f} | {1 / statistics.median(t):.3f} |"
            for k, t in times.items()
        ),
        "",
        f"R-LoRA / LoRA-eq step time, paired: **{statistics.median(ratios):.3f}** (IQR {q[0]:.3f}-{q[2]:.3f}).",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo.md").write_text("\n".join(lines))
    (args.out / "grpo.json").write_text(json.dumps({"times_s": times, "ratios": ratios, "trainable": counts}))
    plot(times, ratios, args.out / "grpo.png")
    print("\n".join(lines))


def plot(times: dict[str, list[float]], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, t in times.items():
        ax.plot(range(1, len(t) + 1), t, marker="o", label=VARIANTS[key])
    ax.set_xlabel("round")
    ax.set_ylabel("GRPO step time (s)")
    ax.set_title(f"GRPO steps, paired rounds: R-LoRA / LoRA-eq = {statistics.median(ratios):.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
