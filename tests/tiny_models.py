"""Tiny random models for the fast tests: a 2-layer Llama and GPT-2, token batches, adapter weights moved as if
trained, and greedy decoding."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from benchmarks.tiny_assets import perturb  # noqa: F401  (the tests' name for it)
from rlora_plugin import RLoraLinear

MLP = ["gate_proj", "up_proj", "down_proj"]
PAD = 0  # the pad token id of `greedy`
SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **SIZES)).eval()


def tiny_gpt2(vocab_size: int = 50, n_positions: int = 32) -> GPT2LMHeadModel:
    """A 2-layer GPT-2: Conv1D layers, and learned absolute position embeddings."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab_size, n_positions=n_positions)
    return GPT2LMHeadModel(config).eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int = 8, **kwargs) -> torch.Tensor:
    """The token ids `model` generates after `ids` by greedy decoding (no end-of-sequence stop, pad id 0)."""
    out = model.generate(
        input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=None, **kwargs
    )
    return out[:, ids.shape[1] :]


def model_with(**kwargs) -> nn.Module:
    """An R-LoRA model (MLP targets, r=4, 3 heads, no dropout, unless `kwargs` say otherwise) on `tiny_llama`."""
    from peft import get_peft_model

    from rlora_plugin import RLoraConfig

    config = dict(target_modules=MLP, r=4, num_heads=3, lora_dropout=0.0) | kwargs
    return get_peft_model(tiny_llama(), RLoraConfig(**config))


def adapted_layers(model: nn.Module) -> list[RLoraLinear]:
    return [m for m in model.modules() if isinstance(m, RLoraLinear)]
