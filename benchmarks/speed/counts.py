"""Parameter and FLOP counts from the layer shapes, and the SmolLM2-135M shape several benchmarks use."""

from __future__ import annotations

import transformers

# The adapters every variant of the speed benchmark uses.
DROPOUT = 0.1
ALPHA = 16
MLP = ["gate_proj", "up_proj", "down_proj"]


def rlora_params(d_in: int, d_out: int, r: int, heads: int) -> int:
    """R-LoRA / HydraLoRA on one linear layer: A (r, d_in), N heads B_i (d_out, r), router W_g (N, d_in) (no
    router for one head)."""
    return r * d_in + heads * r * d_out + (heads * d_in if heads > 1 else 0)


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
