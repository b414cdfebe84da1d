"""The report on a saved adapter (`python -m rlora_plugin.report`): its table, its plot, its messages."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import MLP, SIZES, adapted_layers, model_with, tokens

from rlora_plugin import RLoraConfig
from rlora_plugin.report import main, report, similarity_limits


def table_rows(text: str) -> dict[str, list[str]]:
    """The report's table: first column (module name, or `mean`) -> the other columns."""
    rows = [line.split() for line in text.splitlines() if line.startswith(("base_model.", "mean "))]
    return {row[0]: row[1:] for row in rows}


def test_report_on_a_saved_adapter(tmp_path):
    model = model_with(num_heads=4)
    layer = adapted_layers(model)[0]
    with torch.no_grad():  # make the first layer's heads identical: similarity 1 in the report
        b = layer.rlora_B["default"]
        b.copy_(b[:, :4].repeat(1, 4))
    model.save_pretrained(tmp_path / "adapter")
    text = report(tmp_path / "adapter", tmp_path / "heads.png")
    rows = table_rows(text)
    mean = rows.pop("mean")
    assert len(rows) == 2 * len(MLP)
    first = rows["base_model.model.model.layers.0.mlp.gate_proj"]
    assert float(first[0]) == pytest.approx(1.0) and float(first[1]) == pytest.approx(1.0)
    assert all(abs(float(v[1])) < 0.9 for k, v in rows.items() if "layers.0.mlp.gate_proj" not in k)
    assert all(float(v[2]) == 0 and float(v[3]) > 0 for v in rows.values())  # zero router, live offset
    for column in range(4):  # the mean row fills every column, |offset| included
        assert float(mean[column]) == pytest.approx(sum(float(v[column]) for v in rows.values()) / 6, abs=1e-4)
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"
    assert text.endswith(f"plot written to {tmp_path / 'heads.png'}")
    assert report(tmp_path / "adapter").endswith("no plot written: pass --out FILE.png for one")
    assert main([str(tmp_path / "missing")]) == 2


def test_printed_norms_and_similarities_are_those_of_the_trained_adapter(tmp_path):
    """After real training steps, every printed number equals a computation from the weights themselves:
    |offset| = ||s/N sum_i B_i^0 A^0||_F from the weights at initialization (dense, head by head), |W_g| the
    trained router's norm, cos(B_i A) the mean pairwise cosine of the dense trained updates B_i A."""
    heads, r, alpha = 3, 4, 16  # s = 4: a scaling left out would show
    model = model_with(num_heads=heads, r=r, lora_alpha=alpha)
    names = {id(m): name for name, m in model.named_modules()}
    initial = {names[id(m)]: (m.rlora_A["default"].detach().clone(), m.rlora_B["default"].detach().clone())
               for m in adapted_layers(model)}  # fmt: skip
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(5):
        ids = tokens(seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(tmp_path / "adapter")
    rows = table_rows(report(tmp_path / "adapter"))
    s = alpha / r
    for layer in adapted_layers(model):
        name = names[id(layer)]
        a0, b0 = initial[name]
        offset = s / heads * sum(b0[:, i * r : (i + 1) * r] @ a0 for i in range(heads))
        a, b, router = (layer.rlora_A["default"], layer.rlora_B["default"], layer.rlora_router["default"])
        updates = [(b[:, i * r : (i + 1) * r] @ a).detach().flatten() for i in range(heads)]
        cosines = [torch.nn.functional.cosine_similarity(updates[i], updates[j], dim=0)
                   for i in range(heads) for j in range(heads) if i != j]  # fmt: skip
        cos_b, cos_ba, router_norm, offset_norm = (float(v) for v in rows[name])
        assert offset_norm == pytest.approx(float(torch.linalg.matrix_norm(offset)), abs=1e-4), name
        assert router_norm == pytest.approx(float(torch.linalg.matrix_norm(router.detach())), abs=1e-4), name
        assert cos_ba == pytest.approx(float(sum(cosines) / len(cosines)), abs=1e-4), name
        trained = s / heads * sum(b[:, i * r : (i + 1) * r] @ a for i in range(heads))
        assert abs(float(torch.linalg.matrix_norm(trained.detach())) - offset_norm) > 1e-3  # the weights moved
        assert router_norm > 1e-3  # the router trained away from zero


def test_heatmaps_up_to_32_decoder_layers_counting_layers_not_modules(tmp_path, capsys):
    """11 decoder layers with 3 adapted modules each (33 modules) get their heatmaps; 33 layers get the
    per-depth line plot alone (its size does not grow with depth), and the text says the heatmaps were left
    out."""
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {}
    for layers in (11, 33):
        torch.manual_seed(0)
        deep = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **(SIZES | {"num_hidden_layers": layers})))
        adapter = tmp_path / f"deep{layers}"
        get_peft_model(deep, RLoraConfig(target_modules=MLP, r=4, num_heads=3)).save_pretrained(adapter)
        assert main([str(adapter), "--out", str(tmp_path / f"{layers}.png")]) == 0
        sizes[layers] = (Image.open(tmp_path / f"{layers}.png").size, capsys.readouterr().out)
    (width, height), out = sizes[33]
    assert "(no per-layer heatmaps above 32 layers)" in out
    assert width <= 1000 and height <= 500, (width, height)
    (width, height), out = sizes[11]
    assert "no per-layer heatmaps" not in out
    assert height > 11 * 100, (width, height)  # a row of heatmaps per decoder layer


def test_similarity_axis_follows_the_data():
    """Similarities of 0.03-0.09 fill the plot's y-axis instead of sitting as a band in -1..1."""
    low, high = similarity_limits([0.03, 0.05, 0.09, float("nan")])
    assert 0 <= low < 0.03 and 0.09 < high <= 0.15
    assert similarity_limits([-1.0, 1.0]) == (-1.05, 1.05)
    assert similarity_limits([float("nan")]) == (-1.05, 1.05)
