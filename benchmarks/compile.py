"""torch.compile benchmark: step time of the compiled vs the eager model, rlora and LoRA at equal parameters.

One training step (forward + backward, fp32, CPU, no optimizer) of a small Llama-shaped model (SmolLM2-135M's
architecture, default 2 decoder layers, random weights, MLP adapted) is timed for each adapter eagerly and
after `torch.compile` (Inductor, the default backend). The variants run interleaved round by round in
rotating order, so load from other processes hits all of them alike; the compiled / eager ratio is the median
of the ratios within a round (paired). The compile time is the wall time of the first compiled step (the
warm-up round, excluded from the medians), with Inductor's on-disk caches off so that it is a cold compile.
Correctness (compiled losses = eager losses, no graph break in the R-LoRA layers) is checked by
tests/test_compile.py, not here.

    python -m benchmarks.compile                  # ~5 min on 2 cores, most of it compiling
    python -m benchmarks.compile --layers 4 --tokens 1024 --repeats 11
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config
import transformers

from benchmarks.speed.cases import adapt
from benchmarks.speed.counts import MLP, equal_param_rank, smollm2_config
from benchmarks.speed.report import machine

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = {"lora_eq": "LoRA, equal params", "rlora": "rlora"}


@dataclass
class Variant:
    adapter: str
    compiled: bool
    step: object
    compile_s: float = 0.0
    times: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.adapter}/{'compiled' if self.compiled else 'eager'}"


def build(adapter: str, compiled: bool, layers: int, tokens: int, heads: int, r: int) -> Variant:
    cfg = smollm2_config(layers)
    d, i = cfg.hidden_size, cfg.intermediate_size
    eq = equal_param_rank([(d, i), (d, i), (i, d)], r, heads)
    torch.manual_seed(0)
    model = adapt(transformers.LlamaForCausalLM(cfg).requires_grad_(False), adapter, r, heads, eq, MLP).train()
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        forward(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None

    return Variant(adapter, compiled, step)


def run(variants: list[Variant], warmup: int, repeats: int) -> None:
    for rnd in range(warmup + repeats):
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
        for v in order:
            gc.collect()
            t = time.perf_counter()
            v.step()
            dt = time.perf_counter() - t
            if rnd == 0:
                v.compile_s = dt  # for a compiled variant: tracing + Inductor codegen + the first step
            if rnd >= warmup:
                v.times.append(dt)
        print(f"round {rnd + 1}/{warmup + repeats} done", flush=True)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else xs * 3
    return q[0], statistics.median(xs), q[2]


def summarize(variants: list[Variant]) -> dict:
    by_key = {v.key: v for v in variants}
    out = {"variants": {}, "ratios": {}}
    for v in variants:
        q1, med, q3 = quartiles([t * 1e3 for t in v.times])
        out["variants"][v.key] = dict(
            median_ms=med, q1_ms=q1, q3_ms=q3, first_step_s=v.compile_s, times_ms=[t * 1e3 for t in v.times]
        )
    for adapter in ADAPTERS:
        eager, compiled = by_key[f"{adapter}/eager"], by_key[f"{adapter}/compiled"]
        pairs = [c / e for c, e in zip(compiled.times, eager.times, strict=True)]
        q1, med, q3 = quartiles(pairs)
        out["ratios"][adapter] = dict(median=med, q1=q1, q3=q3)
    rl, lo = by_key["rlora/eager"], by_key["lora_eq/eager"]
    q1, med, q3 = quartiles([a / b for a, b in zip(rl.times, lo.times, strict=True)])
    out["ratios"]["rlora_vs_lora_eager"] = dict(median=med, q1=q1, q3=q3)
    rl, lo = by_key["rlora/compiled"], by_key["lora_eq/compiled"]
    q1, med, q3 = quartiles([a / b for a, b in zip(rl.times, lo.times, strict=True)])
    out["ratios"]["rlora_vs_lora_compiled"] = dict(median=med, q1=q1, q3=q3)
    return out


def table(result: dict) -> list[str]:
    lines = [
        "| adapter | eager step ms, median (IQR) | compiled step ms, median (IQR) | compiled / eager, paired (IQR) "
        "| first compiled step (compile), s |",
        "|---|---|---|---|---|",
    ]
    for adapter, label in ADAPTERS.items():
        e, c = result["variants"][f"{adapter}/eager"], result["variants"][f"{adapter}/compiled"]
        r = result["ratios"][adapter]
        lines.append(
            f"| {label} | {e['median_ms']:.0f} ({e['q1_ms']:.0f}-{e['q3_ms']:.0f}) | {c['median_ms']:.0f} "
            f"({c['q1_ms']:.0f}-{c['q3_ms']:.0f}) | {r['median']:.3f} ({r['q1']:.2f}-{r['q3']:.2f}) | "
            f"{c['first_step_s']:.0f} |"
        )
    return lines


def write_markdown(result: dict, args: argparse.Namespace, loads: list[tuple], wall: float) -> Path:
    re_, rc = result["ratios"]["rlora_vs_lora_eager"], result["ratios"]["rlora_vs_lora_compiled"]
    lines = [
        "# torch.compile: compiled vs eager step time, rlora and LoRA",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.compile', *args.argv])}` in {wall / 60:.1f} min.",
        "",
        *machine(),
        f"- SmolLM2-135M architecture, {args.layers} decoder layers, random weights, T={args.tokens} tokens, "
        f"MLP adapted (gate/up/down); rlora N={args.heads}, r={args.r}; LoRA at equal trainable parameters",
        "- fp32, one training step = forward + backward (no optimizer); `torch.compile(model)` with the default "
        "backend (Inductor) and mode; Inductor's on-disk caches off (the first compiled step is a cold compile)",
        f"- warm-up {args.warmup} round(s) excluded (the first compiled step compiles), {args.repeats} timed "
        "rounds, variants interleaved in rotating order",
        f"- load average (1, 5, 15 min) at start {loads[0]}, at end {loads[1]} (the 2 cores are shared with "
        "other jobs: read the IQR)",
        "",
        *table(result),
        "",
        f"rlora / LoRA-eq step time, paired: eager {re_['median']:.3f} ({re_['q1']:.2f}-{re_['q3']:.2f}), "
        f"compiled {rc['median']:.3f} ({rc['q1']:.2f}-{rc['q3']:.2f}).",
        "",
        "Correctness is tested, not benchmarked: tests/test_compile.py (compiled losses and metrics equal the "
        "eager ones with `fullgraph=True`; Axolotl's `torch_compile: true` gives the eager losses).",
    ]
    out = args.out / "compile.md"
    out.write_text("\n".join(lines) + "\n")
    (args.out / "compile.json").write_text(json.dumps(result, indent=1))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.38
    for j, (mode, color) in enumerate((("eager", "#3182bd"), ("compiled", "#e6550d"))):
        xs, ys, err = [], [], [[], []]
        for i, adapter in enumerate(ADAPTERS):
            s = result["variants"][f"{adapter}/{mode}"]
            xs.append(i + (j - 0.5) * width)
            ys.append(s["median_ms"])
            err[0].append(s["median_ms"] - s["q1_ms"])
            err[1].append(s["q3_ms"] - s["median_ms"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, color=color, label=mode)
    for i, adapter in enumerate(ADAPTERS):
        r = result["ratios"][adapter]["median"]
        top = max(result["variants"][f"{adapter}/{m}"]["q3_ms"] for m in ("eager", "compiled"))
        ax.annotate(f"compiled / eager {r:.2f}", (i, top), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(ADAPTERS)))
    ax.set_xticklabels(list(ADAPTERS.values()))
    ax.set_ylabel("step time, ms (median; bars: IQR)")
    ax.set_title("forward + backward, fp32 CPU: eager vs torch.compile (Inductor)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.threads:
        torch.set_num_threads(args.threads)
    # no on-disk compile caches: the first compiled step then shows the full compile, on every run
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    args.out.mkdir(parents=True, exist_ok=True)
    loads = [tuple(round(x, 2) for x in os.getloadavg())]
    start = time.perf_counter()
    variants = [
        build(adapter, compiled, args.layers, args.tokens, args.heads, args.r)
        for adapter in ADAPTERS
        for compiled in (False, True)
    ]
    run(variants, args.warmup, args.repeats)
    loads.append(tuple(round(x, 2) for x in os.getloadavg()))
    wall = time.perf_counter() - start
    result = summarize(variants)
    print("\n".join(table(result)))
    out = write_markdown(result, args, loads, wall)
    plot(result, args.out / "compile.png")
    print(f"\nwrote {out} and {args.out / 'compile.png'} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
