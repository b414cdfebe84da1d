"""One routed update per PEFT target (the vLLM plugin's hooks) against one stacked down-projection for the
targets that share a fused layer's input, on SmolLM2-135M's `qkv_proj` (d=576 -> q 576, k 192, v 192; r=8, 5
heads), fp32, eager. Paired: every round times the base product, the three updates and the stacked variant in
turn; the ratio is the median of per-round ratios (with the 3rd lowest and 3rd highest of 9 rounds).

    python -m benchmarks.fused_layer     # about 2 minutes; the table is in benchmarks/README.md
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from rlora_plugin.layer import routed_update

D, R, HEADS, OUTS, SCALING = 576, 8, 5, (576, 192, 192), 2.0


def variants() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    parts = [(torch.randn(R, D) * 0.02, torch.randn(o, HEADS * R) * 0.02, torch.randn(HEADS, D) * 0.02) for o in OUTS]
    stacked_down = torch.cat([torch.cat([a, router]) for a, _, router in parts])
    weight = torch.randn(sum(OUTS), D) * 0.02

    def base(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def per_target(x: torch.Tensor) -> torch.Tensor:  # what the plugin runs: one update per target
        out, start = F.linear(x, weight), 0
        for (a, b, router), size in zip(parts, OUTS, strict=True):
            out[..., start : start + size] += routed_update(x, a, b, router, scaling=SCALING)
            start += size
        return out

    def stacked(x: torch.Tensor) -> torch.Tensor:  # [A_q; W_q; A_k; W_k; A_v; W_v] x in one product
        out, start = F.linear(x, weight), 0
        downs = F.linear(x, stacked_down).split([R + HEADS] * len(OUTS), dim=-1)
        for (_, b, _), size, down in zip(parts, OUTS, downs, strict=True):
            h, logits = down.split([R, HEADS], dim=-1)
            gates = torch.softmax(logits.float(), -1).to(h.dtype)
            out[..., start : start + size] += F.linear((gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2), b) * SCALING
            start += size
        return out

    return {"base": base, "per_target": per_target, "stacked": stacked}


def timed(fn: Callable, x: torch.Tensor, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    run = variants()
    x = torch.randn(64, D)
    torch.testing.assert_close(run["per_target"](x), run["stacked"](x))  # the same update
    print("| threads | tokens | base product (us) | + per target (us) | + stacked (us) | stacked / per target |")
    print("|---|---|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for tokens in (1, 8, 32, 512):
            x, repeats = torch.randn(tokens, D), 300 if tokens < 512 else 30
            rounds = [[timed(fn, x, repeats) for fn in run.values()] for _ in range(9)]
            base, per_target, stacked = (statistics.median(column) * 1e6 for column in zip(*rounds, strict=True))
            ratios = sorted(s / p for _, p, s in rounds)
            print(f"| {threads} | {tokens} | {base:.0f} | {per_target - base:.0f} | {stacked - base:.0f} | "
                  f"{statistics.median(ratios):.2f} ({ratios[2]:.2f}-{ratios[-3]:.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
