"""Timing one training step of interleaved variants, and the paired ratios against LoRA at equal parameters."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

REFERENCE = "lora_eq"  # every ratio is against LoRA at equal trainable parameters


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
