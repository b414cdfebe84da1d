"""The benchmark's cases: one adapted layer, and a whole small causal LM (SmolLM2-135M's architecture)."""

from __future__ import annotations

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

from rlora_plugin import RLoraConfig

from .counts import (
    ALPHA,
    DROPOUT,
    MLP,
    adapter_flops,
    base_linear_flops,
    equal_param_rank,
    model_flops_per_token,
    rlora_params,
    smollm2_config,
)
from .reference import attach_loop
from .timing import CaseResult, Variant, run_case, summarize, trainable


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
