"""The frozen-gate export to a plain LoRA (docs/method.md#frozen-gates-the-export-to-a-plain-lora): exact, mergeable,
loadable without rlora_plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import MLP, SIZES, adapted_layers, tiny_llama, tokens

from rlora_plugin import RLoraConfig
from rlora_plugin.export import export_lora, main
from rlora_plugin.layer import frozen_gate_lora
from rlora_plugin.routing import parse_gates


def test_frozen_gate_lora_is_the_layer_update_with_constant_gates():
    """B' A' x = s * sum_i c_i B_i A x - s * Bbar0 A0 x, head by head."""
    gen = torch.Generator().manual_seed(0)
    heads, r, d_in, d_out, s = 3, 4, 10, 7, 0.7
    a, a0 = torch.randn(r, d_in, generator=gen), torch.randn(r, d_in, generator=gen)
    b, b0 = torch.randn(d_out, heads * r, generator=gen), torch.randn(d_out, r, generator=gen)
    c, x = torch.tensor([0.2, 0.5, 0.3]), torch.randn(5, d_in, generator=gen)
    expected = s * sum(c[i] * x @ a.T @ b[:, i * r : (i + 1) * r].T for i in range(heads)) - s * x @ a0.T @ b0.T
    lora_a, lora_b = frozen_gate_lora(a, b, c, s, a0, b0)
    assert lora_a.shape == (2 * r, d_in) and lora_b.shape == (d_out, 2 * r)
    torch.testing.assert_close(x @ lora_a.T @ lora_b.T, expected)
    lora_a, lora_b = frozen_gate_lora(a, b, c, s)  # no offset path (init: zero): rank r
    torch.testing.assert_close(x @ lora_a.T @ lora_b.T, expected + s * x @ a0.T @ b0.T)


@pytest.fixture
def trained_zero_router(tmp_path):
    """An R-LoRA adapter whose A and heads moved as in training but whose router stayed zero, so its gates are
    exactly uniform: the uniform export must reproduce it."""
    model = get_peft_model(tiny_llama(), RLoraConfig(target_modules=MLP, num_heads=3, r=4, lora_alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapted_layers(model):
            for weight in (layer.rlora_A["default"], layer.rlora_B["default"]):
                weight.add_(0.1 * torch.randn(weight.shape, generator=gen))
    model.eval().save_pretrained(tmp_path / "rlora")
    return model, tmp_path


def test_uniform_export_reproduces_the_model_and_merges(trained_zero_router):
    model, tmp_path = trained_zero_router
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    assert (expected - tiny_llama()(ids).logits).abs().max() > 1e-2  # the adapter does change the model
    export_lora(tmp_path / "rlora", tmp_path / "lora", "uniform")
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 8  # rank 2r, scaling 1
    lora = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, expected, atol=1e-5, rtol=1e-5)
        merged = lora.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_export_loads_without_rlora_plugin(trained_zero_router):
    """A fresh process that never imports rlora_plugin loads the export with plain PEFT, merges it, and gets
    the R-LoRA model's logits."""
    model, work = trained_zero_router
    assert main([str(work / "rlora"), str(work / "lora"), "--gates", "uniform"]) == 0
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **{SIZES!r})).eval()
merged = PeftModel.from_pretrained(base, {str(work / "lora")!r}).merge_and_unload()
assert "rlora_plugin" not in sys.modules
torch.save(merged(torch.tensor({tokens().tolist()!r})).logits, {str(work / "logits.pt")!r})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        expected = model(tokens()).logits
    torch.testing.assert_close(torch.load(work / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5,0.5", r"gates '0.5,0.5' are invalid for an adapter with 3 heads"),
        ("0.5,0.4,0.4", r"they must be >= 0 and sum to 1"),
        ("-0.1,0.6,0.5", r"they must be >= 0 and sum to 1"),
        ("mean-ish", r"give 'uniform' or 3 comma-separated numbers"),
    ],
)
def test_bad_gates_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_gates(text, 3)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err
