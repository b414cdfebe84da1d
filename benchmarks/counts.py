"""Trainable-parameter counts from layer shapes, shared by the speed and quality benchmarks."""

from __future__ import annotations


def rlora_params(d_in: int, d_out: int, r: int, heads: int) -> int:
    """R-LoRA / HydraLoRA on one linear layer: A (r, d_in), N heads B_i (d_out, r), router W_g (N, d_in)."""
    return r * d_in + heads * r * d_out + heads * d_in


def lora_params(d_in: int, d_out: int, rank: int) -> int:
    return rank * (d_in + d_out)


def equal_param_rank(shapes: list[tuple[int, int]], r: int, heads: int) -> int:
    """The LoRA rank whose parameter count over the layers `shapes` (d_in, d_out) is closest to R-LoRA's."""
    total = sum(rlora_params(d_in, d_out, r, heads) for d_in, d_out in shapes)
    return max(1, round(total / sum(lora_params(d_in, d_out, 1) for d_in, d_out in shapes)))
