"""Speed and activation-memory benchmark: R-LoRA against LoRA and against the per-head loop.

One training step (forward + backward, fp32, CPU) is timed for every variant, in one process, with the
variants interleaved round by round (rotating order) so that load from other processes on the machine
hits all of them alike. Medians and the spread (min-max, and the interquartile range) over the repeats
are reported, and each time ratio against LoRA-eq is the median of the ratios within a round (paired, so
load that changes between rounds cancels); warm-up rounds are excluded. Activation memory is measured
exactly, not sampled: the bytes of every distinct storage that autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``), excluding parameters and buffers. See benchmarks/README.md.

    python benchmarks/speed.py            # default subset, a few minutes on 2 cores (or python -m benchmarks.speed)
    python -m benchmarks.speed --full     # every shape x N x r x tokens, and the 30-layer model
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

import rlora_plugin
from rlora_plugin import RLoraConfig

RESULTS = Path(__file__).resolve().parent / "results"
MLP = ["gate_proj", "up_proj", "down_proj"]
DROPOUT = 0.1
ALPHA = 16
REFERENCE = "lora_eq"  # every ratio is against LoRA at equal trainable parameters

VARIANT_LABELS = {
    "base": "frozen base",
    "lora_r": "LoRA, same r",
    "lora_eq": "LoRA, equal params",
    "rlora": "rlora",
    "loop": "per-head loop",
}


# --------------------------------------------------------------------------------------------------
# The per-head loop reference, written the way the authors' (HydraLoRA-derived) code computes it.
# --------------------------------------------------------------------------------------------------
class LoopLinear(nn.Module):
    """``y = W0 x + sum_i g_i(x) * s * B_i(A(dropout(x)))`` with ``A(dropout(x))`` recomputed per head.

    As in the authors' code: the dropout is on the layer input ``x`` with a fresh mask per head, ``A`` and
    every ``B_i`` are ``nn.Linear`` modules, the router sees the raw ``x`` and its softmax is taken in fp32.
    (Their init edits ``W0``; there is no offset path, so this does slightly less work than rlora.)
    """

    def __init__(self, base: nn.Linear, r: int, heads: int, dropout: float, alpha: float) -> None:
        super().__init__()
        self.base_layer = base
        d_in, d_out = base.in_features, base.out_features
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, d_out, bias=False) for _ in range(heads))
        for b in self.lora_B:
            nn.init.normal_(b.weight, std=1 / math.sqrt(d_out))
        self.lora_route = nn.Linear(d_in, heads, bias=False)
        self.lora_dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        route_weight = F.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i, lora_b in enumerate(self.lora_B):
            result = result + route_weight[..., i : i + 1] * lora_b(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result


def attach_loop(model: nn.Module, targets: list[str], r: int, heads: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoopLinear(child, r, heads, DROPOUT, ALPHA))
        del name
    return model


# --------------------------------------------------------------------------------------------------
# Parameter and FLOP counts from the shapes.
# --------------------------------------------------------------------------------------------------
def rlora_params(d_in: int, d_out: int, r: int, heads: int) -> int:
    """R-LoRA / HydraLoRA on one linear layer: A (r, d_in), N heads B_i (d_out, r), router W_g (N, d_in)."""
    return r * d_in + heads * r * d_out + heads * d_in


def lora_params(d_in: int, d_out: int, rank: int) -> int:
    return rank * (d_in + d_out)


def equal_param_rank(shapes: list[tuple[int, int]], r: int, heads: int) -> int:
    """The LoRA rank whose parameter count over the layers `shapes` (d_in, d_out) is closest to R-LoRA's."""
    total = sum(rlora_params(d_in, d_out, r, heads) for d_in, d_out in shapes)
    return max(1, round(total / sum(lora_params(d_in, d_out, 1) for d_in, d_out in shapes)))


def adapter_flops(variant: str, d_in: int, d_out: int, r: int, heads: int, rank: int) -> int:
    """Training-step FLOPs per token of the adapter alone (the input needs its gradient).

    A matmul of ``k`` rows against ``d`` features costs ``2kd`` forward, and ``4kd`` backward when both the
    weight and the input gradient are needed. Elementwise work is not counted.
    """
    if variant == "base":
        return 0
    if variant.startswith("lora"):
        return 6 * rank * (d_in + d_out)
    if variant == "rlora":  # [A ; W_g ; A0] x and [B_cat, Bbar0] z, offset rows included (they are computed)
        return 6 * (2 * r + heads) * d_in + 6 * (heads * r + r) * d_out
    if variant == "loop":  # A and B_i per head, plus the router
        return 6 * heads * r * (d_in + d_out) + 6 * heads * d_in
    raise ValueError(variant)


def base_linear_flops(d_in: int, d_out: int) -> int:
    return 4 * d_in * d_out  # frozen: forward + input gradient, no weight gradient


# --------------------------------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------------------------------
def saved_activation_bytes(step: Callable[[], None], model: nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one step, parameters excluded."""
    frozen = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in frozen and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def sgemm_peak(n: int = 1024, reps: int = 8) -> float:
    """GFLOP/s of a square fp32 matmul on this machine right now (the best of a few)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


@dataclass
class Variant:
    key: str
    model: nn.Module
    step: Callable[[], None]
    trainable: int
    flops_per_token: int
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    act_bytes: int = 0


@dataclass
class CaseResult:
    name: str
    kind: str
    tokens: int
    heads: int
    r: int
    eq_rank: int
    variants: dict[str, dict]
    peak_gflops: float


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_case(variants: list[Variant], warmup: int, repeats: int) -> float:
    """Times every variant, interleaved; returns the sgemm peak measured alongside."""
    for v in variants:
        v.act_bytes = saved_activation_bytes(v.step, v.model)
        for p in v.model.parameters():
            p.grad = None
    peaks = []
    for rnd in range(warmup + repeats):
        order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
        for v in order:
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            v.step()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            for p in v.model.parameters():
                p.grad = None
            if rnd >= warmup:
                v.times.append(dt)
                v.cpu_times.append(dc)
        if rnd >= warmup:
            peaks.append(sgemm_peak(reps=3))
    return statistics.median(peaks)


def summarize(v: Variant, tokens: int, peak: float) -> dict:
    ts = sorted(v.times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    med = statistics.median(ts)
    gflops = v.flops_per_token * tokens / med / 1e9
    return dict(
        trainable=v.trainable,
        median_ms=med * 1e3,
        cpu_ms=statistics.median(v.cpu_times) * 1e3,
        min_ms=ts[0] * 1e3,
        max_ms=ts[-1] * 1e3,
        q1_ms=q[0] * 1e3,
        q3_ms=q[2] * 1e3,
        n=len(ts),
        times_ms=[t * 1e3 for t in v.times],  # in round order, for the paired ratios
        act_mb=v.act_bytes / 2**20,
        mflop_per_token=v.flops_per_token / 1e6,
        gflops=gflops,
        frac_peak=gflops / peak,
    )


# --------------------------------------------------------------------------------------------------
# Case 1: one adapted layer.
# --------------------------------------------------------------------------------------------------
class OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapt(base: nn.Module, key: str, r: int, heads: int, eq: int, targets: list[str]) -> nn.Module:
    """The variant `key` of a frozen `base`: itself, PEFT LoRA (same rank or equal parameters), rlora or the loop."""
    if key == "base":
        return base
    if key in ("lora_r", "lora_eq"):
        rank = r if key == "lora_r" else eq
        return get_peft_model(base, LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets))
    if key == "rlora":
        config = RLoraConfig(
            r=r,
            num_heads=heads,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            head_dropout="per_head",
            init="random",
            target_modules=targets,
        )
        return get_peft_model(base, config)
    return attach_loop(base, targets, r, heads)


def measure(
    name: str, kind: str, variants: list[Variant], rlora_expected: int, tokens: int, heads: int, r: int, eq: int,
    warmup: int, repeats: int,
) -> CaseResult:  # fmt: skip
    """Check rlora's parameter count against the shapes, time the variants and summarize them."""
    rl = next((v for v in variants if v.key == "rlora"), None)
    if rl is not None:
        assert rl.trainable == rlora_expected, (name, rl.trainable, rlora_expected)
    peak = run_case(variants, warmup, repeats)
    return CaseResult(
        name=name,
        kind=kind,
        tokens=tokens,
        heads=heads,
        r=r,
        eq_rank=eq,
        variants={v.key: summarize(v, tokens, peak) for v in variants},
        peak_gflops=peak,
    )


def layer_case(
    d_in: int, d_out: int, tokens: int, heads: int, r: int, keys: list[str], warmup: int, repeats: int
) -> CaseResult:
    torch.manual_seed(0)
    eq = equal_param_rank([(d_in, d_out)], r, heads)
    x = torch.randn(1, tokens, d_in, requires_grad=True)  # mid-network: the input needs its gradient
    grad_out = torch.randn(1, tokens, d_out)
    variants = []
    for key in keys:
        model = adapt(OneLayer(d_in, d_out).requires_grad_(False), key, r, heads, eq, ["proj"])
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()  # call the adapted module itself, not PeftModel's wrapper
        model.train()

        def step(model: nn.Module = model) -> None:
            x.grad = None
            model(x).backward(grad_out)

        flops = base_linear_flops(d_in, d_out) + adapter_flops(key, d_in, d_out, r, heads, r if key == "lora_r" else eq)
        variants.append(Variant(key, model, step, trainable(model), flops))
    return measure(
        f"layer {d_in}->{d_out}", "layer", variants, rlora_params(d_in, d_out, r, heads), tokens, heads, r, eq,
        warmup, repeats,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Case 2: a whole small causal LM (SmolLM2-135M's architecture, random weights).
# --------------------------------------------------------------------------------------------------
def smollm2_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def model_flops_per_token(cfg: transformers.LlamaConfig, tokens: int) -> int:
    d, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    linears = d * d + 2 * d * kv + d * d + 3 * d * i
    attention = 3 * 2 * 2 * (tokens / 2) * d  # QK^T and PV at an average causal context of T/2, fwd + 2x bwd
    return int(layers * (4 * linears + attention) + 4 * d * cfg.vocab_size)


def model_case(layers: int, tokens: int, heads: int, r: int, keys: list[str], warmup: int, repeats: int) -> CaseResult:
    cfg = smollm2_config(layers)
    d, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [(d, i), (d, i), (i, d)]
    eq = equal_param_rank(shapes, r, heads)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    base_flops = model_flops_per_token(cfg, tokens)
    variants = []
    for key in keys:
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(cfg).requires_grad_(False)
        model = adapt(base, key, r, heads, eq, MLP)
        model.train()
        # The hidden states need their gradient from the embedding on, in every variant, so all of them do
        # the same input-gradient work in the base model (the frozen base alone would otherwise do none).
        base.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))

        def step(model: nn.Module = model) -> None:
            model(input_ids=ids, labels=ids).loss.backward()

        rank = r if key == "lora_r" else eq
        flops = base_flops + layers * sum(adapter_flops(key, a, b, r, heads, rank) for a, b in shapes)
        variants.append(Variant(key, model, step, trainable(model), flops))
    rlora_expected = layers * sum(rlora_params(a, b, r, heads) for a, b in shapes)
    return measure(
        f"SmolLM2-135M arch, {layers} layers", "model", variants, rlora_expected, tokens, heads, r, eq, warmup, repeats
    )


# --------------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------------
def ratio(case: CaseResult, key: str, metric: str) -> float:
    ref = case.variants[REFERENCE][metric]
    return case.variants[key][metric] / ref if ref else math.nan


def paired_time_ratio(case: CaseResult, key: str) -> tuple[float, float, float]:
    """Median, first and third quartile over the timed rounds of `key`'s step time over LoRA-eq's in the same
    round: load from other jobs that changes from round to round cancels out of each ratio."""
    times, ref = case.variants[key]["times_ms"], case.variants[REFERENCE]["times_ms"]
    pairs = [t / r for t, r in zip(times, ref, strict=True)]
    q = statistics.quantiles(pairs, n=4) if len(pairs) >= 2 else pairs * 3
    return statistics.median(pairs), q[0], q[2]


def case_title(c: CaseResult) -> str:
    return f"{c.name}, T={c.tokens}, N={c.heads}, r={c.r} (equal-param LoRA rank {c.eq_rank})"


def summary_table(cases: list[CaseResult]) -> list[str]:
    lines = [
        "| case | T | N | r | rlora / LoRA-eq time, paired (IQR) | (CPU time) | loop / rlora time | "
        "rlora / LoRA-eq act. mem | rlora / LoRA-eq adapter act. mem | time <= 1.05x | >= 1.5x vs loop | "
        "mem <= LoRA-eq |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        v = c.variants
        t, t_q1, t_q3 = paired_time_ratio(c, "rlora")
        lo = v["loop"]["median_ms"] / v["rlora"]["median_ms"] if "loop" in v else math.nan
        m = ratio(c, "rlora", "act_mb")
        cpu = ratio(c, "rlora", "cpu_ms")
        base_mb = v["base"]["act_mb"] if "base" in v else 0.0
        ref_extra = v[REFERENCE]["act_mb"] - base_mb
        extra = (v["rlora"]["act_mb"] - base_mb) / ref_extra if ref_extra else math.nan

        def ok(flag: bool) -> str:
            return "yes" if flag else "**no**"

        lines.append(
            f"| {c.name} | {c.tokens} | {c.heads} | {c.r} | {t:.3f} ({t_q1:.2f}-{t_q3:.2f}) | {cpu:.3f} | {lo:.2f} | "
            f"{m:.3f} | {extra:.3f} | "
            f"{ok(t <= 1.05)} | {ok(lo >= 1.5) if not math.isnan(lo) else '-'} | {ok(m <= 1.0)} |"
        )
    return lines


def detail_table(c: CaseResult) -> list[str]:
    lines = [
        f"#### {case_title(c)}",
        "",
        f"sgemm peak measured alongside: {c.peak_gflops:.0f} GFLOP/s",
        "",
        "| variant | trainable | step ms, median | IQR | min-max | time / LoRA-eq | CPU ms | CPU / LoRA-eq | "
        "act. MiB | act. / LoRA-eq | MFLOP/token | GFLOP/s | of sgemm peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in c.variants.items():
        lines.append(
            f"| {VARIANT_LABELS[key]} | {s['trainable']:,} | {s['median_ms']:.1f} | {s['q1_ms']:.1f}-{s['q3_ms']:.1f} "
            f"| {s['min_ms']:.1f}-{s['max_ms']:.1f} | {ratio(c, key, 'median_ms'):.3f} | {s['cpu_ms']:.0f} | "
            f"{ratio(c, key, 'cpu_ms'):.3f} | {s['act_mb']:.1f} | "
            f"{ratio(c, key, 'act_mb'):.3f} | {s['mflop_per_token']:.2f} | {s['gflops']:.1f} | "
            f"{100 * s['frac_peak']:.0f}% |"
        )
    return lines + [""]


def machine() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, peft {peft.__version__}, "
        f"transformers {transformers.__version__}, rlora_plugin {rlora_plugin.__version__}",
    ]


def write_markdown(cases: list[CaseResult], args: argparse.Namespace, loads: list[tuple], wall: float) -> Path:
    lines = [
        "# Speed and activation memory: rlora vs LoRA vs the per-head loop",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.speed', *args.argv])}` in {wall / 60:.1f} min.",
        "",
        *machine(),
        f"- fp32, one training step = forward + backward (no optimizer), warm-up {args.warmup} round(s) "
        f"excluded, {args.repeats} timed rounds, variants interleaved in rotating order",
        f"- load average (1, 5, 15 min) at start {loads[0]}, at end {loads[1]} (the 2 cores are shared with "
        "other jobs: read the IQR)",
        f"- adapters: LoRA and rlora alpha={ALPHA}, dropout {DROPOUT}; rlora per-head dropout, random init "
        "(with its frozen offset path), zero router; the loop reference draws a dropout mask on x per head",
        "",
        "## Summary (ratios against LoRA at equal trainable parameters)",
        "",
        *summary_table(cases),
        "",
        "Targets: rlora time <= 1.05x LoRA-eq; the loop >= 1.5x slower than rlora; rlora activation memory "
        "<= LoRA-eq. 'adapter act. mem' subtracts the frozen base's saved activations from both.",
        "",
        "## Details",
        "",
    ]
    for c in cases:
        lines += detail_table(c)
    out = args.out / "speed.md"
    out.write_text("\n".join(lines) + "\n")
    (args.out / "speed.json").write_text(json.dumps([c.__dict__ for c in cases], indent=1))
    return out


def plot(cases: list[CaseResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in VARIANT_LABELS if k != "base"]
    colors = {"lora_r": "#9ecae1", "lora_eq": "#3182bd", "rlora": "#e6550d", "loop": "#756bb1"}
    labels = [f"{c.name.replace('SmolLM2-135M arch', 'SmolLM2 arch')}\nT={c.tokens} N={c.heads} r={c.r}" for c in cases]
    fig, axes = plt.subplots(2, 1, figsize=(max(9, 1.25 * len(cases) + 3), 9), sharex=True)
    width = 0.8 / len(keys)
    for ax, metric, title in (
        (axes[0], "median_ms", "step time / LoRA-eq in the same round (median; bars: IQR)"),
        (axes[1], "act_mb", "activation memory saved for backward / LoRA-eq"),
    ):
        for j, key in enumerate(keys):
            xs, ys, lo, hi = [], [], [], []
            for ci, c in enumerate(cases):
                if key not in c.variants:
                    continue
                xs.append(ci + (j - (len(keys) - 1) / 2) * width)
                if metric == "median_ms":
                    y, q1, q3 = paired_time_ratio(c, key)
                    lo.append(y - q1)
                    hi.append(q3 - y)
                else:
                    y = ratio(c, key, metric)
                ys.append(y)
            err = [lo, hi] if metric == "median_ms" else None
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=VARIANT_LABELS[key], color=colors[key])
        ax.axhline(1.0, color="black", lw=0.8)
        if metric == "median_ms":
            ax.axhline(1.05, color="red", lw=0.8, ls="--", label="target 1.05x")
        ax.set_yscale("log")
        ax.set_ylabel("ratio (log scale)")
        ax.set_title(title)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(ncol=5, fontsize=8, loc="upper left")
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
def layer_grid(full: bool) -> list[tuple[int, int, int, int, int]]:
    """(d_in, d_out, tokens, N, r)."""
    shapes = [(576, 1536), (896, 4864), (2048, 8192)]
    if full:
        return [(i, o, t, n, r) for i, o in shapes for t in (1024, 2048) for n in (3, 5, 10) for r in (4, 8)]
    return [
        (576, 1536, 2048, 3, 8),
        (576, 1536, 2048, 5, 8),
        (576, 1536, 2048, 10, 8),
        (896, 4864, 1024, 5, 4),  # the authors' Qwen2.5-0.5B script: r=4, N=5
        (2048, 8192, 1024, 5, 8),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full layer grid and the 30-layer model")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, full 11)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--model-layers", type=int, default=None, help="decoder layers (default 4, full 30)")
    parser.add_argument("--model-tokens", type=int, default=None, help="tokens (default 512, full 1024)")
    parser.add_argument("--model-heads", type=int, default=5)
    parser.add_argument("--model-r", type=int, default=8)
    parser.add_argument("--no-layers", action="store_true")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.repeats = args.repeats or (11 if args.full else 9)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_tokens = args.model_tokens or (1024 if args.full else 512)
    layers = args.model_layers or (30 if args.full else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    keys = list(VARIANT_LABELS)
    loads = [tuple(round(x, 2) for x in os.getloadavg())]
    start = time.perf_counter()
    cases: list[CaseResult] = []
    todo: list[Callable[[], CaseResult]] = []
    if not args.no_layers:
        for d_in, d_out, t, n, r in layer_grid(args.full):
            todo.append(
                lambda d_in=d_in, d_out=d_out, t=t, n=n, r=r: layer_case(
                    d_in, d_out, t, n, r, keys, args.warmup, args.repeats
                )
            )
    if not args.no_model:
        todo.append(
            lambda: model_case(layers, model_tokens, args.model_heads, args.model_r, keys, args.warmup, args.repeats)
        )
    for job in todo:
        case = job()
        cases.append(case)
        print("\n".join(detail_table(case)), flush=True)
    loads.append(tuple(round(x, 2) for x in os.getloadavg()))
    wall = time.perf_counter() - start
    print("\n".join(summary_table(cases)))
    out = write_markdown(cases, args, loads, wall)
    plot(cases, args.out / "speed.png")
    print(f"\nwrote {out} and {args.out / 'speed.png'} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
