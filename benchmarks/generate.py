"""Generation speed: prefill time and per-token decode time of the base model, LoRA at equal trainable
parameters (unmerged and merged) and R-LoRA, on SmolLM2-135M and on a Qwen2.5-0.5B-shaped model, in fp32 and
bf16, at one torch thread and at all cores.

Greedy decoding with the KV cache, CPU, `torch.no_grad()` and `eval()`, as `generate` runs it: one forward
over the prompt (the prefill, logits of the last position only) and then one forward per new token (the decode).
The variants share the base weights (one copy in memory) and decode side by side, one forward each in turn
(rotating the order every round), so load from other jobs hits them alike; every ratio is the median over
rounds of the variant's time over LoRA-eq's in the same round, with the interquartile range: the paired method
of `speed.py`, whose pieces this reuses. See benchmarks/README.md.

    python -m benchmarks.generate                    # the whole grid (about 60 min on 2 cores)
    python -m benchmarks.generate --models smollm2 --dtypes fp32 --threads 1 --batches 1  # one row
    python -m benchmarks.generate --smollm2-dir DIR  # SmolLM2's real weights, from examples/prepare_smollm2.py

R-LoRA's bf16 rows also say how much folding the frozen offset path into the base weight (what a forward without
gradients does, `RLoraLinear.folded_base_weight`) moves the logits and the greedy tokens against keeping the
offset on the per-token path (`fold_offset = False`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from benchmarks.speed.cases import adapt
from benchmarks.speed.counts import MLP, equal_param_rank, rlora_params, smollm2_config
from benchmarks.speed.report import RESULTS, machine
from benchmarks.speed.timing import REFERENCE, CaseResult, Variant, paired_time_ratio, ratio, summarize, trainable
from rlora_plugin import RLoraLinear

VARIANT_LABELS = {
    "base": "base model",
    "lora_merged": "LoRA-eq, merged",
    "lora_eq": "LoRA-eq, unmerged",
    "rlora": "R-LoRA",
}
PHASES = ("prefill", "decode")


def qwen25_05b_config() -> transformers.Qwen2Config:
    """Qwen2.5-0.5B's shapes (random weights are enough for timing)."""
    return transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def load_base(name: str, smollm2_dir: Path | None) -> nn.Module:
    torch.manual_seed(0)
    if name == "qwen":
        return transformers.Qwen2ForCausalLM(qwen25_05b_config())
    if smollm2_dir is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return transformers.LlamaForCausalLM(smollm2_config(30))


def build_variants(
    base: nn.Module, keys: list[str], r: int, heads: int, eq: int
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """Every variant on a structural copy of `base` that shares its weights (the merged LoRA gets its own copies
    of the adapted weights: merging writes into them), and its trainable parameters before merging."""
    models, counts = {}, {}
    for key in keys:
        shared = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
        if key == "lora_merged":
            for name, module in shared.named_modules():
                if name.rsplit(".", 1)[-1] in MLP:
                    module.weight = nn.Parameter(module.weight.detach().clone())
        shared.requires_grad_(False)
        model = adapt(shared, "lora_eq" if key == "lora_merged" else key, r, heads, eq, MLP)
        counts[key] = trainable(model)
        if key == "lora_merged":
            model = model.merge_and_unload()
        model.eval()
        models[key] = model
    return models, counts


class Clock:
    """Wall and process CPU time of a variant, accumulated over the calls it is started and stopped around."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


@torch.no_grad()
def generate_interleaved(
    models: dict[str, nn.Module], order: list[str], ids: torch.Tensor, new_tokens: int
) -> tuple[dict[str, Clock], dict[str, Clock], dict[str, torch.Tensor]]:
    """Greedy decoding with the KV cache by every variant at once, one forward each in turn (`order`): first
    every prefill, then decode step by step, so load from other jobs on the machine hits all variants within
    a fraction of a second of each other. Returns each variant's prefill clock, decode clock (all steps after
    the first token) and new tokens."""
    prefill, decode, out, tokens = {}, {}, {}, {}
    for key in order:
        with Clock() as prefill[key]:
            out[key] = models[key](input_ids=ids, use_cache=True, logits_to_keep=1)
            tokens[key] = [out[key].logits[:, -1:].argmax(-1)]
        decode[key] = Clock()
    for _ in range(new_tokens - 1):
        for key in order:
            with decode[key]:
                out[key] = models[key](
                    input_ids=tokens[key][-1], past_key_values=out[key].past_key_values, use_cache=True
                )
                tokens[key].append(out[key].logits[:, -1:].argmax(-1))
    return prefill, decode, {key: torch.cat(t, dim=1) for key, t in tokens.items()}


def fold_effect(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """The largest logit change at the prompt's last position and the share of greedy tokens that change when
    R-LoRA keeps its offset path per token instead of folding it into the base weight."""
    with torch.no_grad():
        folded = model(input_ids=ids, logits_to_keep=1).logits.float()
        RLoraLinear.fold_offset = False
        try:
            unfolded = model(input_ids=ids, logits_to_keep=1).logits.float()
            _, _, out = generate_interleaved({"rlora": model}, ["rlora"], ids, new_tokens)
        finally:
            RLoraLinear.fold_offset = True
    return {
        "max_logit_change": (folded - unfolded).abs().max().item(),
        "logit_scale": unfolded.abs().max().item(),
        "same_tokens": (out["rlora"] == tokens).float().mean().item(),
    }


def run_model(
    name: str, base: nn.Module, batch: int, args: argparse.Namespace, keys: list[str]
) -> tuple[CaseResult, CaseResult, dict[str, float]]:
    cfg = base.config
    d, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [(d, i), (d, i), (i, d)]
    eq = equal_param_rank(shapes, args.r, args.heads)
    models, counts = build_variants(base, keys, args.r, args.heads, eq)
    assert counts["rlora"] == cfg.num_hidden_layers * sum(rlora_params(a, b, args.r, args.heads) for a, b in shapes)
    ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
    timers = {phase: [Variant(k, models[k], lambda: None, counts[k], 0) for k in keys] for phase in PHASES}
    for rnd in range(args.warmup + args.rounds):
        order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
        prefill, decode, outputs = generate_interleaved(models, order, ids, args.new_tokens)
        if rnd >= args.warmup:
            for phase, clocks, steps in (("prefill", prefill, 1), ("decode", decode, args.new_tokens - 1)):
                for v in timers[phase]:
                    v.times.append(clocks[v.key].wall / steps)
                    v.cpu_times.append(clocks[v.key].cpu / steps)
        print(f"  {name} batch {batch}: round {rnd + 1}/{args.warmup + args.rounds}", flush=True)
    # Same greedy tokens from the unmerged and the merged LoRA.
    same = (outputs["lora_eq"] == outputs["lora_merged"]).float().mean().item()
    print(f"  {name} batch {batch}: lora_eq vs lora_merged same greedy tokens: {100 * same:.0f}%", flush=True)
    label = f"{name}, batch {batch}"
    fold = fold_effect(models["rlora"], ids, outputs["rlora"], args.new_tokens)
    print(f"  {label}: offset fold: {fold}", flush=True)
    cases = []
    for phase in PHASES:
        tokens = batch * (args.prompt if phase == "prefill" else 1)
        variants = {v.key: summarize(v, tokens, math.nan) for v in timers[phase]}
        cases.append(CaseResult(label, phase, tokens, args.heads, args.r, eq, variants, math.nan))
    return cases[0], cases[1], fold


def summary_table(cases: list[CaseResult]) -> list[str]:
    keys = [k for k in VARIANT_LABELS if k in cases[0].variants]
    head = " | ".join(f"{VARIANT_LABELS[k]} / LoRA-eq" for k in keys if k != REFERENCE)
    lines = [
        f"| model, batch | phase | LoRA-eq ms (median) | {head} | R-LoRA / base | R-LoRA / LoRA-eq, CPU time "
        "| R-LoRA <= 1.00x LoRA-eq |",
        "|---" * (5 + len(keys)) + "|",
    ]
    for c in cases:
        cells = []
        for k in keys:
            if k != REFERENCE:
                med, q1, q3 = paired_time_ratio(c, k)
                cells.append(f"{med:.3f} ({q1:.3f}-{q3:.3f})")
        rl = [t / b for t, b in zip(c.variants["rlora"]["times_ms"], c.variants["base"]["times_ms"], strict=True)]
        met = "yes" if paired_time_ratio(c, "rlora")[0] <= 1.0 else "**no**"
        ms = c.variants[REFERENCE]["median_ms"]
        lines.append(
            f"| {c.name} | {c.kind} | {ms:.1f} | {' | '.join(cells)} | {statistics.median(rl):.3f} | "
            f"{ratio(c, 'rlora', 'cpu_ms'):.3f} | {met} |"
        )
    return lines


def detail_table(cases: list[CaseResult]) -> list[str]:
    lines = [
        "| model, batch | phase | variant | trainable | ms, median | IQR | min-max |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        for key, s in c.variants.items():
            lines.append(
                f"| {c.name} | {c.kind} | {VARIANT_LABELS[key]} | {s['trainable']:,} | {s['median_ms']:.2f} | "
                f"{s['q1_ms']:.2f}-{s['q3_ms']:.2f} | {s['min_ms']:.2f}-{s['max_ms']:.2f} |"
            )
    return lines


def fold_table(folds: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| model, dtype, threads, batch | largest logit change | largest logit | greedy tokens unchanged |",
        "|---|---|---|---|",
    ]
    for label, f in folds.items():
        lines.append(
            f"| {label} | {f['max_logit_change']:.2e} | {f['logit_scale']:.2f} | {100 * f['same_tokens']:.1f}% |"
        )
    return lines


def write_results(
    cases: list[CaseResult], folds: dict[str, dict[str, float]], args: argparse.Namespace, loads: list[tuple],
    wall: float,
) -> Path:  # fmt: skip
    eq_ranks = ", ".join(sorted({f"{c.name.split(',')[0]}: LoRA-eq rank {c.eq_rank}" for c in cases}))
    lines = [
        "# Generation speed: base, LoRA at equal parameters (unmerged, merged) and R-LoRA",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.generate', *args.argv])}` in {wall / 60:.1f} min.",
        "",
        *machine(),
        "- greedy, KV cache, `no_grad` + `eval()` (R-LoRA's offset path folded into the base weight); prompt "
        f"{args.prompt} tokens per row (random ids), "
        f"{args.new_tokens} new tokens; prefill = the forward over the prompt (last position's logits only), "
        f"decode = the mean time per new token after it; warm-up {args.warmup} round(s) excluded, {args.rounds} "
        "timed rounds; the variants decode side by side, one forward each in turn (order rotated every round), "
        "base weights shared by all variants",
        f"- adapters on {', '.join(MLP)} of every layer: R-LoRA r={args.r}, N={args.heads}, random init with its "
        f"offset path, per-head dropout 0.1 (off in eval); LoRA at equal trainable parameters ({eq_ranks}), "
        "dropout 0.1; in bf16 rows the base is bf16 and the adapters stay fp32 (PEFT's default)",
        f"- load average (1, 5, 15 min) at start {loads[0]}, at end {loads[-1]} (the 2 cores are shared with "
        "other jobs: read the IQR)",
        "",
        "## Summary (paired ratios against LoRA-eq unmerged: median over rounds, IQR in brackets)",
        "",
        *summary_table(cases),
        "",
        "Target: R-LoRA prefill and decode <= 1.00x LoRA-eq unmerged in every row. Where a row says **no**, the "
        "reason and its per-layer profile are in benchmarks/README.md, 'What a decoding step costs, and how the "
        "layer keeps it at LoRA's'.",
        "",
        "## The offset fold's rounding",
        "",
        "R-LoRA with its offset path folded into the base weight (as it generates) against the offset kept per "
        "token (`RLoraLinear.fold_offset = False`): the largest change of a logit at the prompt's last position, "
        "and the share of greedy tokens (all rows, all new tokens) that stay the same.",
        "",
        *fold_table(folds),
        "",
        "## Details",
        "",
        *detail_table(cases),
        "",
    ]
    out = args.out / "generate.md"
    out.write_text("\n".join(lines) + "\n")
    (args.out / "generate.json").write_text(json.dumps({"cases": [c.__dict__ for c in cases], "fold": folds}, indent=1))
    return out


def plot(cases: list[CaseResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in VARIANT_LABELS if k in cases[0].variants and k != REFERENCE]
    colors = {"base": "#bdbdbd", "lora_merged": "#9ecae1", "rlora": "#e6550d"}
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases) + 2), 5))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [ci + (j - (len(keys) - 1) / 2) * width for ci in range(len(cases))]
        stats = [paired_time_ratio(c, key) for c in cases]
        ys = [s[0] for s in stats]
        err = [[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=VARIANT_LABELS[key], color=colors[key])
    ax.axhline(1.0, color="black", lw=0.8, label="LoRA-eq unmerged (target: R-LoRA <= 1)")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c.name.replace(', ', chr(10))}\n{c.kind}" for c in cases], fontsize=8)
    ax.set_ylabel("time / LoRA-eq unmerged, same round")
    lows = [paired_time_ratio(c, k)[1] for c in cases for k in keys]
    ax.set_ylim(min(0.8, min(lows) - 0.02), None)
    ax.set_title("Generation: prefill and per-token decode time (median of paired ratios; bars: IQR)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,qwen", help="comma-separated: smollm2, qwen")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated torch thread counts")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--smollm2-dir", type=Path, default=None, help="HF directory of SmolLM2-135M(-Instruct)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(VARIANT_LABELS)
    names = {"smollm2": "SmolLM2-135M", "qwen": "Qwen2.5-0.5B shape"}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    loads = [tuple(round(x, 2) for x in os.getloadavg())]
    start = time.perf_counter()
    cases: list[CaseResult] = []
    folds: dict[str, dict[str, float]] = {}
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            base = load_base(model, args.smollm2_dir).to(dtypes[dtype])
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                for batch in (int(b) for b in args.batches.split(",")):
                    label = f"{names[model]}, {dtype}, {threads} thr"
                    prefill, decode, fold = run_model(label, base, batch, args, keys)
                    cases.extend((prefill, decode))
                    folds[prefill.name] = fold
                    loads.append(tuple(round(x, 2) for x in os.getloadavg()))
                    out = write_results(cases, folds, args, loads, time.perf_counter() - start)  # after each case
                    print("\n".join(summary_table(cases[-2:])), flush=True)
            del base
    plot(cases, args.out / "generate.png")
    print(f"\nwrote {out} and {args.out / 'generate.png'} ({(time.perf_counter() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
