"""Speed and activation-memory benchmark: R-LoRA against LoRA and against the per-head loop.

One training step (forward + backward, fp32, CPU) is timed for every variant, in one process, with the
variants interleaved round by round (rotating order) so that load from other processes on the machine
hits all of them alike. Medians and the spread (min-max, and the interquartile range) over the repeats
are reported, and each time ratio against LoRA-eq is the median of the ratios within a round (paired, so
load that changes between rounds cancels); warm-up rounds are excluded. Activation memory is measured
exactly, not sampled: the bytes of every distinct storage that autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``), excluding parameters and buffers. See benchmarks/README.md.

    python -m benchmarks.speed            # default subset, a few minutes on 2 cores
    python -m benchmarks.speed --full     # every shape x N x r x tokens, and the 30-layer model
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .cases import layer_case, model_case
from .report import RESULTS, VARIANT_LABELS, detail_table, plot, summary_table, write_markdown
from .timing import CaseResult


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
