"""The report on a saved adapter (`python -m rlora_plugin.report`): its table, its plot, its messages."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import MLP, SIZES, adapted_layers, model_with

from rlora_plugin import RLoraConfig


def test_report_on_a_saved_adapter(tmp_path):
    from rlora_plugin.report import main, report

    model = model_with(num_heads=4)
    layer = adapted_layers(model)[0]
    with torch.no_grad():  # make the first layer's heads identical: similarity 1 in the report
        b = layer.rlora_B["default"]
        b.copy_(b[:, :4].repeat(1, 4))
    model.save_pretrained(tmp_path / "adapter")
    text = report(tmp_path / "adapter", tmp_path / "heads.png")
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("base_model.")}
    assert len(rows) == 2 * len(MLP)
    first = rows["base_model.model.model.layers.0.mlp.gate_proj"]
    assert float(first[0]) == pytest.approx(1.0) and float(first[1]) == pytest.approx(1.0)
    assert all(abs(float(v[1])) < 0.9 for k, v in rows.items() if "layers.0.mlp.gate_proj" not in k)
    assert all(float(v[2]) == 0 and float(v[3]) > 0 for v in rows.values())  # zero router, live offset
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"
    assert text.endswith(f"plot written to {tmp_path / 'heads.png'}")
    assert report(tmp_path / "adapter").endswith("no plot written: pass --out FILE.png for one")
    assert main([str(tmp_path / "missing")]) == 2


def test_report_plot_of_a_deep_adapter_is_one_readable_chart(tmp_path, capsys):
    """Above 32 layers the image is the per-depth line plot alone (its size does not grow with depth), and
    the text says the heatmaps were left out; the offset norm equals ||s * Bbar0 A0||_F."""
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlora_plugin.metrics import low_rank_norm
    from rlora_plugin.report import main

    torch.manual_seed(0)
    deep = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **(SIZES | {"num_hidden_layers": 12})))
    get_peft_model(deep, RLoraConfig(target_modules=MLP, r=4, num_heads=3)).save_pretrained(tmp_path / "deep")
    assert main([str(tmp_path / "deep"), "--out", str(tmp_path / "deep.png")]) == 0
    assert "(no per-layer heatmaps above 32 layers)" in capsys.readouterr().out
    width, height = Image.open(tmp_path / "deep.png").size
    assert width <= 1000 and height <= 500, (width, height)
    b, a = torch.randn(7, 3), torch.randn(3, 5)
    assert low_rank_norm(b, a) == pytest.approx(float((b @ a).norm()), rel=1e-5)
