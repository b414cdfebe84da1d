"""`torch.compile` with R-LoRA: a compiled PEFT model trains like the eager one; Axolotl's `torch_compile: true`.

The PEFT-side test compiles with `fullgraph=True`, so any graph break in `RLoraLayer.routed_update`/`route`
(dict lookups, `self.training` branches, the metrics and load-balancing hooks, which are on) fails it; it uses
the `aot_eager` backend (TorchDynamo capture + AOTAutograd, where the tracing problems live) to stay fast,
and the Axolotl run (`-m cli`) compiles with the default backend, Inductor. Speed: benchmarks/compile.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama, tokens

from rlora_plugin import RLoraConfig
from rlora_plugin.metrics import MetricsCollector, RouterAuxLoss

STEPS = 4
AUX_COEF = 0.01


def train(compile_kwargs: dict | None, top_k: int | None) -> tuple[list[float], list[dict], dict]:
    """AdamW steps on the tiny Llama with metrics and the load-balancing loss on; the losses, the metrics
    after every step and the trained adapter."""
    torch.manual_seed(0)
    config = RLoraConfig(
        r=4, num_heads=3, lora_dropout=0.0, target_modules="all-linear", router_init="kaiming", router_top_k=top_k
    )
    model = get_peft_model(tiny_llama(), config).train()
    forward = torch.compile(model, **compile_kwargs) if compile_kwargs is not None else model
    collector, aux = MetricsCollector(model).enable(), RouterAuxLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(2, 16)
    losses, metrics = [], []
    for _ in range(STEPS):
        aux.start()
        loss = forward(input_ids=ids, labels=ids).loss
        loss = loss + AUX_COEF * aux.stop()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        metrics.append(collector.compute())
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, metrics, adapter


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_compiled_peft_model_trains_like_eager(top_k):
    torch._dynamo.reset()
    eager = train(None, top_k)
    compiled = train({"backend": "aot_eager", "fullgraph": True}, top_k)
    assert eager[0][-1] < eager[0][0]
    assert compiled[0] == pytest.approx(eager[0], abs=1e-5)
    for ours, theirs in zip(compiled[1], eager[1], strict=True):  # gate statistics recorded inside the graph
        assert ours.keys() == theirs.keys() and "rlora/router_entropy" in ours
        assert ours == pytest.approx(theirs, abs=1e-5)
    for name, tensor in eager[2].items():
        torch.testing.assert_close(compiled[2][name], tensor, atol=1e-5, rtol=1e-4)


@pytest.mark.cli
def test_axolotl_torch_compile(tiny, tmp_path):
    from axolotl_runs import BIN, PLUGINS, reload_logits, run, train_losses, write_cfg

    common = dict(
        plugins=[*PLUGINS, "compile_probe.CompileProbePlugin"],
        lora_dropout=0.0,  # the same losses need the same dropout masks: none
        datasets=[{"path": str(tiny["alpaca"]), "ds_type": "json", "type": "alpaca"}],
        val_set_size=0,
        eval_steps=None,
        sample_packing=False,
        gradient_checkpointing=None,
        max_steps=STEPS,
        save_steps=STEPS,
    )
    outs = {}
    for name, extra in (("eager", {}), ("compiled", {"torch_compile": True})):
        cfg = write_cfg(tmp_path, name, tiny, **common, **extra)
        run(name, [str(BIN / "python"), "-m", "axolotl.cli.train", str(cfg)], tmp_path).check()
        outs[name] = tmp_path / name
    probe = json.loads((outs["compiled"] / "compile_probe.json").read_text())
    assert probe["unique_graphs"] > 0, probe  # Inductor really compiled the model
    # The only break is transformers' `enable_input_require_grads` hook on the embeddings (Axolotl installs
    # it for every adapter); the R-LoRA layers add none.
    assert all("requires_grad_()" in reason for reason in probe["graph_breaks"]), probe
    assert not json.loads((outs["eager"] / "compile_probe.json").read_text())["unique_graphs"]
    eager, compiled = train_losses(outs["eager"]), train_losses(outs["compiled"])
    assert sorted(compiled) == list(range(1, STEPS + 1))
    assert compiled == pytest.approx(eager, abs=1e-4)
    # the adapter saved from the compiled model has plain PEFT keys and reproduces the trained model
    trained = torch.load(outs["compiled"] / "probe_trained.pt")["trained"]
    torch.testing.assert_close(reload_logits(tiny, outs["compiled"]), trained, atol=1e-5, rtol=1e-5)
