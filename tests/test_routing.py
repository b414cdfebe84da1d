"""Inference-time routing controls (record, override, fix the gates) and the export with per-layer mean gates."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import MLP, adapted_layers, perturb, tiny_gpt2, tiny_llama, tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import tiny_assets
from rlora_plugin import RLoraConfig
from rlora_plugin.errors import ConfigError
from rlora_plugin.export import loaded_mean_gates, main, mean_gates, prompts_of
from rlora_plugin.routing import fixed_gates, record_gates, routing


def routed_model(**config) -> PeftModel:
    """An R-LoRA model with a kaiming router and trained-looking weights: its gates differ per token."""
    config = dict(target_modules=MLP, num_heads=3, r=4, router_init="kaiming") | config
    model = get_peft_model(tiny_llama(), RLoraConfig(**config))
    perturb(model)
    return model.eval()


def test_recorded_gates_leave_padding_out():
    model = routed_model()
    ids = tokens(batch=2, length=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generate pads
    with torch.no_grad(), record_gates(model) as padded:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), record_gates(model) as alone:
        model(input_ids=ids[:1])
        model(input_ids=ids[1:, 3:])
    assert set(padded.gates) == set(alone.gates) == {f"model.layers.{i}.mlp.{m}" for i in (0, 1) for m in MLP}
    for name, gates in padded.gates.items():
        assert gates.shape == (7 + 4, 3)  # real tokens only
        torch.testing.assert_close(gates, alone.gates[name], atol=1e-6, rtol=1e-5)
        assert gates.std(dim=0).max() > 1e-4  # a kaiming router: gates differ per token
    torch.testing.assert_close(sum(padded.mean().values()) / len(padded.gates), torch.ones(3) / 3, atol=0.2, rtol=0)
    assert all(layer.gate_observers == [] for layer in adapted_layers(model))  # detached after the block


def test_recording_covers_generation_steps():
    model = routed_model()
    prompt = tokens(batch=1, length=4)
    with torch.no_grad(), record_gates(model) as record:
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    # prefill sees the 4 prompt tokens, each of the 2 later steps one new token (the 3rd token needs no forward)
    assert {g.shape[0] for g in record.gates.values()} == {4 + 2}


def test_routing_overrides_top_k_and_temperature_only_inside_the_block():
    model = routed_model()
    ids = tokens()
    with torch.no_grad():
        dense = model(ids).logits
        with routing(model, top_k=1), record_gates(model) as record:
            sparse = model(ids).logits
        assert not torch.allclose(dense, sparse)
        assert all(((g == 0) | (g == 1)).all() for g in record.gates.values())  # one-hot gates
        with routing(model, temperature=1e-3), record_gates(model) as cold:
            model(ids)
        assert all(g.max(dim=-1).values.median() > 0.99 for g in cold.gates.values())  # nearly one-hot
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)  # restored
    assert model.peft_config["default"].router_top_k is None and model.peft_config["default"].router_temperature == 1
    with pytest.raises(ConfigError, match=r"routing: `top_k: 4` is invalid. Fix: use an integer in \[1, 3\], or 0"):
        with routing(model, top_k=4):
            pass
    with pytest.raises(ConfigError, match=r"routing: `temperature: 0` is invalid. Fix: use a finite number > 0"):
        with routing(model, temperature=0):
            pass


def test_fixed_uniform_gates_equal_a_zero_router():
    model = routed_model()
    ids = tokens()
    with torch.no_grad(), fixed_gates(model, "uniform"), record_gates(model) as record:
        fixed = model(ids).logits
    assert all(torch.allclose(g, torch.full_like(g, 1 / 3)) for g in record.gates.values())
    with torch.no_grad():
        for layer in adapted_layers(model):
            layer.rlora_router["default"].zero_()
        torch.testing.assert_close(model(ids).logits, fixed)
    with pytest.raises(ConfigError, match=r"routing: `gates: \[0.5, 0.5\]` are invalid for an adapter with 3 heads"):
        with fixed_gates(model, [0.5, 0.5]):
            pass
    with pytest.raises(ConfigError, match=r"`gates\['model.layers.0.mlp.down_proj'\]: None` is missing: no gates for "):
        with fixed_gates(model, {}):
            pass
    with pytest.raises(ConfigError, match=r"routing: `model: 'LlamaForCausalLM'` has no R-LoRA layers. Fix: load"):
        with fixed_gates(tiny_llama(), "uniform"):
            pass


def test_export_with_constant_gates_equals_the_fixed_gate_model(tmp_path):
    model = routed_model(router_top_k=2)
    ids = tokens()
    model.save_pretrained(tmp_path / "rlora")
    with torch.no_grad(), fixed_gates(model, [0.2, 0.3, 0.5]):
        expected = model(ids).logits
    assert main([str(tmp_path / "rlora"), str(tmp_path / "lora"), "--gates", "0.2,0.3,0.5"]) == 0
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, expected, atol=1e-5, rtol=1e-5)
        routed = model(ids).logits
    assert (routed - expected).abs().max() > 1e-4  # freezing changes a routed model: measure it


@pytest.fixture
def adapter_on_disk(tiny, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    config = RLoraConfig(target_modules=MLP, num_heads=3, r=4, router_init="kaiming")
    model = get_peft_model(base, config)
    perturb(model)
    model.save_pretrained(tmp_path / "rlora")
    return tmp_path


@pytest.fixture
def varied_prompts(tiny, tmp_path):
    """The tiny chat rows with user turns of three lengths, so a batch of them needs padding."""
    rows = [json.loads(line) for line in tiny["chat"].read_text().splitlines()]
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = " ".join([row["messages"][0]["content"]] * (1 + i % 3))
    return tiny_assets.write_jsonl(tmp_path / "varied.jsonl", rows)


def one_at_a_time_mean_gates(model, tokenizer, data) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The mean gates of the prompts in `data` run one by one: no padding at all."""
    with torch.no_grad(), record_gates(model.eval()) as record:
        for prompt in prompts_of(data, tokenizer):
            model(**tokenizer(prompt, return_tensors="pt"))
    return record.mean()


def test_mean_gates_are_over_the_real_tokens_of_the_prompts(tiny, adapter_on_disk, varied_prompts):
    """Batched prompts of different lengths give the mean of the prompts run one at a time: padding is left out,
    also with a tokenizer set up to pad on the left."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    prompts = prompts_of(varied_prompts, tokenizer)
    assert len(prompts) == 64 and prompts[0].endswith("<|assistant|>\n")
    assert len({len(tokenizer(prompt)["input_ids"]) for prompt in prompts[:8]}) == 3  # batches need padding
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), adapter_on_disk / "rlora")
    expected = one_at_a_time_mean_gates(model, tokenizer, varied_prompts)
    gates = mean_gates(adapter_on_disk / "rlora", varied_prompts, batch_size=8)
    tokenizer.padding_side = "left"  # a loaded model's tokenizer set up for generation
    loaded = loaded_mean_gates(model, tokenizer, varied_prompts, batch_size=8)
    for name, mean in expected.items():
        torch.testing.assert_close(gates[name], mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loaded[name], mean, atol=1e-6, rtol=1e-5)


def test_mean_gates_keep_absolute_positions_with_a_left_padding_tokenizer(tiny, varied_prompts):
    """GPT-2 adds a learned embedding per absolute position, so left padding would move every shorter prompt's
    tokens (Llama's rotary positions are relative: it cannot tell). Batches are padded on the right."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    tokenizer.padding_side = "left"
    base = tiny_gpt2(vocab_size=len(tokenizer), n_positions=128)
    model = get_peft_model(base, RLoraConfig(target_modules=["c_fc"], num_heads=3, r=4, router_init="kaiming"))
    perturb(model)
    expected = one_at_a_time_mean_gates(model, tokenizer, varied_prompts)
    loaded = loaded_mean_gates(model, tokenizer, varied_prompts, batch_size=8)
    for name, mean in expected.items():
        torch.testing.assert_close(loaded[name], mean, atol=1e-6, rtol=1e-5)


def test_mean_gate_export_equals_the_model_with_those_gates(tiny, adapter_on_disk):
    work = adapter_on_disk
    assert main([str(work / "rlora"), str(work / "lora"), "--gates", "mean", "--data", str(tiny["chat"])]) == 0
    gates = mean_gates(work / "rlora", tiny["chat"])
    ids = tokens()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), work / "rlora").eval()
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), work / "lora").eval()
    with torch.no_grad(), fixed_gates(model, gates):
        torch.testing.assert_close(lora(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_mean_needs_data_and_data_needs_mean(tiny, adapter_on_disk, capsys):
    assert main([str(adapter_on_disk / "rlora"), str(adapter_on_disk / "lora"), "--gates", "mean"]) == 2
    assert "rlora_plugin.export: `--data: None` is needed by --gates mean" in capsys.readouterr().err
    args = [str(adapter_on_disk / "rlora"), str(adapter_on_disk / "lora"), "--data", str(tiny["chat"])]
    assert main(args) == 2
    assert "` is used only with --gates mean, not with --gates 'uniform'. Fix: leave" in capsys.readouterr().err
    assert not (adapter_on_disk / "lora").exists()
