"""Bad input gets a clear error that names the key, the value and the fix."""

import json
import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import MLP, SIZES, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from rlora_plugin import RLoraConfig
from rlora_plugin.config import RLoraConfigError
from rlora_plugin.errors import ConfigError, InputError


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("r", 0, r"RLoraConfig: `r: 0` is invalid. Fix: the rank must be an integer >= 1"),
        ("num_heads", 0, r"RLoraConfig: `num_heads: 0` is invalid. Fix: use an integer >= 1"),
        (
            "lora_dropout",
            1.0,
            r"RLoraConfig: `lora_dropout: 1.0` is invalid. Fix: the dropout rate must be in \[0, 1\)",
        ),
        ("lora_dropout", -0.1, r"RLoraConfig: `lora_dropout: -0.1` is invalid"),
        ("init_gamma", 0, r"RLoraConfig: `init_gamma: 0` is invalid. Fix: gamma must be a finite number > 0"),
        ("init_gamma", math.inf, r"RLoraConfig: `init_gamma: inf` is invalid. Fix: gamma must be a finite number > 0"),
        (
            "router_temperature",
            0.0,
            r"RLoraConfig: `router_temperature: 0.0` is invalid. Fix: .* must be a finite number > 0",
        ),
        ("router_temperature", math.inf, r"RLoraConfig: `router_temperature: inf` is invalid"),
        (
            "lora_alpha",
            0,
            r"RLoraConfig: `lora_alpha: 0` is invalid. Fix: .* finite number > 0 \(0 would train nothing\)",
        ),
        ("lora_alpha", -16, r"RLoraConfig: `lora_alpha: -16` is invalid"),
        ("lora_alpha", math.nan, r"RLoraConfig: `lora_alpha: nan` is invalid"),
        ("init_seed", -1, r"RLoraConfig: `init_seed: -1` is invalid. Fix: the seed must be an integer >= 0"),
        ("init_seed", 1.5, r"RLoraConfig: `init_seed: 1.5` is invalid. Fix: use an integer"),
        # strict types: no bool for a number, no string for a number (each used to end in a raw TypeError)
        (
            "lora_dropout",
            "0.1",
            r"RLoraConfig: `lora_dropout: '0.1'` is invalid. Fix: use a number \(not a string or a boolean\)",
        ),
        ("lora_alpha", "16", r"RLoraConfig: `lora_alpha: '16'` is invalid. Fix: use a number"),
        ("r", True, r"RLoraConfig: `r: True` is invalid. Fix: use an integer \(not a string, a float or a boolean\)"),
        ("num_heads", True, r"RLoraConfig: `num_heads: True` is invalid. Fix: use an integer"),
        ("num_heads", 2.0, r"RLoraConfig: `num_heads: 2.0` is invalid. Fix: use an integer"),
        ("use_rslora", "yes", r"RLoraConfig: `use_rslora: 'yes'` is invalid. Fix: use true or false"),
        ("init", "gaussian", r"RLoraConfig: `init: 'gaussian'` is invalid. Fix: choose one of 'random', 'zero'"),
        (
            "head_dropout",
            "each",
            r"RLoraConfig: `head_dropout: 'each'` is invalid. Fix: choose one of 'per_head', 'shared'",
        ),
        (
            "router_init",
            "normal",
            r"RLoraConfig: `router_init: 'normal'` is invalid. Fix: choose one of 'zero', 'kaiming'",
        ),
    ],
)
def test_bad_config_values(key, value, message):
    with pytest.raises(RLoraConfigError, match=message) as info:
        RLoraConfig(target_modules=MLP, **{key: value})
    assert info.value.key == key  # the field travels with the error: a host framework names its own key
    assert info.value.value is value and str(info.value).endswith(f"Fix: {info.value.fix.rstrip('.')}.")


def test_target_modules_that_match_nothing():
    with pytest.raises(ValueError, match=r"Target modules \{'qkv_nonexistent'\} not found in the base model"):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["qkv_nonexistent"]))


def test_non_linear_targets_are_refused_by_name():
    with pytest.raises(TypeError, match=r"only adapt torch.nn.Linear.*'model.embed_tokens' is a .*Embedding"):
        get_peft_model(tiny_llama(), RLoraConfig(target_modules=["embed_tokens"]))


@pytest.mark.parametrize("targets", [["c_attn", "c_proj", "c_fc"], "all-linear"])
def test_gpt2_conv1d_layers_are_adapted(targets, tmp_path):
    """GPT-2's Conv1D stores its weight (in, out); the update never reads it, only its sizes."""
    ids = torch.randint(0, 50, (2, 7))
    base_logits = tiny_gpt2()(ids).logits
    model = get_peft_model(tiny_gpt2(), RLoraConfig(target_modules=targets, lora_dropout=0.0)).eval()
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=1e-5)  # exact at init
    model.train()
    model(ids, labels=ids).loss.backward()
    assert c_attn.rlora_B["default"].grad.abs().sum() > 0
    with torch.no_grad():
        c_attn.rlora_B["default"].add_(0.1)
    trained = model.eval()(ids).logits
    assert (trained - base_logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, trained)


def test_add_weighted_adapter_is_refused_with_the_reason():
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP))
    model.add_adapter("other", RLoraConfig(target_modules=MLP))
    with pytest.raises(
        ConfigError,
        match=r"RLoraModel: `adapters: \['default', 'other'\]` cannot be combined with add_weighted_adapter: ",
    ):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")


@pytest.fixture
def saved_adapter(tmp_path):
    get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP)).save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(path, edit) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.1.mlp.up_proj"


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t[f"{KEY}.rlora_B"].__setitem__((0, 0), math.nan), f"`{KEY}.rlora_B: a tensor of shape (48, 40), "
         "torch.float32` holds NaN or infinite values"),
        (lambda t: t[f"{KEY}.rlora_A"].__setitem__((0, 0), math.inf), f"`{KEY}.rlora_A: a tensor of shape (8, 32), "
         "torch.float32` holds NaN or infinite values"),
        (lambda t: t.pop(f"{KEY}.rlora_router"), f"`{KEY}.rlora_router: None` is missing"),
        (lambda t: t.pop(f"{KEY}.rlora_offset_B"), f"`{KEY}.rlora_offset_B: None` is missing"),
    ],
)  # fmt: skip
def test_damaged_adapter_weights_are_refused_at_load(saved_adapter, edit, problem):
    _edit_weights(saved_adapter, edit)
    with pytest.raises(InputError, match=re.escape(f"from {saved_adapter}/adapter_model.safetensors: {problem}: the "
                                                   "file is damaged")) as info:  # fmt: skip
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    assert info.value.key == problem[1:].split(":")[0]


def test_config_edited_to_drop_the_offset_is_refused(saved_adapter):
    """`init: random` -> `zero` in adapter_config.json would load without the saved offset path."""
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    (saved_adapter / "adapter_config.json").write_text(json.dumps({**config, "init": "zero"}))
    with pytest.raises(
        InputError, match=r"down_proj.rlora_offset_A: a tensor .*` is not part of this adapter .*init='zero'"
    ):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)


def test_a_sound_adapter_loads_as_a_second_adapter(saved_adapter):
    """The checks look only at the adapter being loaded, not at the ones already in the model."""
    model = PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    model.load_adapter(saved_adapter, adapter_name="second")
    assert set(model.peft_config) == {"default", "second"}


def test_loading_onto_a_base_of_other_shapes(tmp_path):
    get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP)).save_pretrained(tmp_path)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **(SIZES | {"intermediate_size": 64})))
    with pytest.raises(
        InputError,
        match=r"Cannot load R-LoRA adapter 'default' into .*gate_proj': `rlora_B: a tensor of shape \(48, 40\), "
        r"torch.float32` does not fit: .*out_features=64.*needs \(64, 40\). Fix: load the adapter onto the base model",
    ):
        PeftModel.from_pretrained(wider, tmp_path)


def test_config_validation_of_routing_options():
    with pytest.raises(ValueError, match=r"RLoraConfig: `router_top_k: 4` is invalid"):
        RLoraConfig(num_heads=3, router_top_k=4)
    with pytest.raises(ValueError, match=r"RLoraConfig: `router_aux_loss_coef: -1` is invalid"):
        RLoraConfig(router_aux_loss_coef=-1)
    assert RLoraConfig(router_top_k=0).router_top_k is None  # 0 means dense: one spelling, None
