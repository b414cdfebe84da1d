"""Bad input gets a clear error that names the key, the value and the fix."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_peft_layer import MLP, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlora_plugin import RLoraConfig


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("r", 0, r"`r` = 0 is invalid: the rank must be an integer >= 1"),
        ("num_heads", 0, r"`num_heads` = 0 is invalid: use an integer >= 1"),
        ("lora_dropout", 1.0, r"`lora_dropout` = 1.0 is invalid: the dropout rate must be in \[0, 1\)"),
        ("lora_dropout", -0.1, r"`lora_dropout` = -0.1 is invalid"),
        ("init_gamma", 0, r"`init_gamma` = 0 is invalid: gamma must be > 0"),
        ("router_temperature", 0.0, r"`router_temperature` = 0.0 is invalid: .* must be > 0"),
        ("init", "gaussian", r"`init` = 'gaussian' is invalid: choose one of 'random', 'zero'"),
        ("head_dropout", "each", r"`head_dropout` = 'each' is invalid: choose one of 'per_head', 'shared'"),
        ("router_init", "normal", r"`router_init` = 'normal' is invalid: choose one of 'zero', 'kaiming'"),
    ],
)
def test_bad_config_values(key, value, message):
    with pytest.raises(ValueError, match=message):
        RLoraConfig(target_modules=MLP, **{key: value})


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match=r"Target modules \{'qkv_nonexistent'\} not found in the base model"):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["qkv_nonexistent"]))


def test_non_linear_targets_are_refused_by_name():
    with pytest.raises(TypeError, match=r"only adapt torch.nn.Linear.*'model.embed_tokens' is a .*Embedding"):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["embed_tokens"]))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match=r"'transformer.h.0.attn.c_attn' is a .*Conv1D"):
        get_peft_model(gpt2, RLoraConfig(target_modules=["c_attn"]))


def test_loading_onto_a_base_of_other_shapes(tmp_path):
    get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP)).save_pretrained(tmp_path)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        ValueError,
        match=r"Cannot load R-LoRA adapter 'default' into .*gate_proj.*`rlora_B` has "
        r"shape \(48, 40\).*out_features=64.*needs \(64, 40\).*base model it was trained on",
    ):
        PeftModel.from_pretrained(wider, tmp_path)
