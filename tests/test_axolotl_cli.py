"""End-to-end runs of the Axolotl CLI with `adapter: rlora` on a tiny local Llama, on CPU (slow: `-m cli`).

Few runs, each combining several features:
- run 1, `axolotl train`: alpaca + chat_template datasets, sample packing, gradient checkpointing,
  eval split, `lora_target_linear`, checkpoints every 3 steps;
- run 2, `accelerate launch -m axolotl.cli.train`: resume run 1 from its step-3 checkpoint;
- run 3, `accelerate launch -m axolotl.cli.train`: continue from run 1's adapter via `lora_model_dir`,
  no sample packing;
- `axolotl inference` with `lora_model_dir`, a prompt on stdin;
- `axolotl rlora-report` on run 1's adapter;
- bad configs (`axolotl merge-lora`, a misspelled `rlora:` key, no plugin) fail before training;
- two short `adapter: lora` runs, with and without the plugin listed: the same adapter.
A test-only plugin (tests/axolotl_probe.py) saves the in-process logits on a fixed input so the tests can
check that a plain `PeftModel.from_pretrained` reload reproduces the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import axolotl  # noqa: F401  (these tests need it: fail, never skip, without it)
import pytest
from axolotl_runs import (
    BIN,
    N_HEADS,
    RANK,
    Run,
    accelerate_train,
    adapter_tensors,
    reload_logits,
    run,
    train_losses,
    write_cfg,
)

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl_cli")


@pytest.fixture(scope="module")
def run1(tiny, work) -> Path:
    cfg = write_cfg(work, "run1", tiny)
    run("run1", [str(BIN / "axolotl"), "train", str(cfg)], work).check()
    return work / "run1"


def test_saved_config_holds_the_run_settings(run1):
    config = json.loads((run1 / "adapter_config.json").read_text())
    assert config["peft_type"] == "RLORA"
    expected = {"r": RANK, "lora_alpha": 8, "lora_dropout": 0.1, "num_heads": N_HEADS, "init": "random"}
    expected |= {"init_gamma": 64.0, "head_dropout": "per_head", "router_init": "zero", "init_seed": 7}
    assert {k: config[k] for k in expected} == expected


D_IN = {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 64, "up_proj": 64, "down_proj": 128}
D_OUT = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 128, "up_proj": 128, "down_proj": 64}


def test_every_linear_layer_is_adapted_with_full_tensors(run1):
    tensors = adapter_tensors(run1)
    modules = {k.rsplit(".rlora_", 1)[0] for k in tensors}
    assert len(modules) == 14, sorted(modules)  # lora_target_linear: q,k,v,o,gate,up,down x 2 layers
    assert not any("lm_head" in m for m in modules)
    for module in modules:
        i, o = D_IN[module.rsplit(".", 1)[1]], D_OUT[module.rsplit(".", 1)[1]]
        shapes = {k.rsplit(".rlora_", 1)[1]: tuple(v.shape) for k, v in tensors.items() if k.startswith(module + ".")}
        assert shapes == {
            "A": (RANK, i),
            "B": (o, N_HEADS * RANK),
            "router": (N_HEADS, i),
            "offset_A": (RANK, i),
            "offset_B": (o, RANK),
        }, module
    router = next(v for k, v in tensors.items() if k.endswith("rlora_router"))
    assert router.abs().sum() > 0  # trained away from its zero init


def test_checkpoints_and_a_falling_loss_with_eval(run1):
    for step in (3, 6):
        assert (run1 / f"checkpoint-{step}" / "adapter_model.safetensors").exists()
    losses = train_losses(run1)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1], losses
    history = json.loads((run1 / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in rec for rec in history)


def test_router_metrics_and_aux_loss_in_every_train_record(run1):
    history = json.loads((run1 / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    records = {rec["step"]: rec for rec in history if "loss" in rec}  # logging_steps: 1
    for step, rec in records.items():
        for key in ("router_entropy", "head_load_max", "head_load_ratio", "head_cos_B", "head_cos_BA", "aux_loss"):
            assert f"rlora/{key}" in rec, (step, key, sorted(rec))
        assert 0 <= rec["rlora/router_entropy"] <= 1 and rec["rlora/head_load_ratio"] >= 1
        assert rec["rlora/aux_loss"] >= 1 - 1e-4  # N * sum f_i P_i >= 1
        assert "rlora/router_entropy/down_proj" in rec and "rlora/head_cos_BA/q_proj" in rec
    assert records[1]["rlora/router_entropy"] == pytest.approx(1.0, abs=1e-4)  # zero router at step 1
    assert records[1]["rlora/head_load_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert records[6]["rlora/router_entropy"] < 1.0  # the router has learned something
    assert not any(k.startswith("rlora/") for rec in history if "eval_loss" in rec for k in rec)


def test_equal_to_the_base_at_init_and_reload_reproduces_the_trained_model(run1, tiny):
    import torch

    init = torch.load(run1 / "probe_init.pt")
    torch.testing.assert_close(init["adapted"], init["base"], atol=1e-5, rtol=1e-5)
    trained = torch.load(run1 / "probe_trained.pt")["trained"]
    assert (trained - init["base"]).abs().max() > 1e-3
    torch.testing.assert_close(reload_logits(tiny, run1), trained, atol=1e-5, rtol=1e-5)


def test_resume_from_checkpoint(run1, tiny, work):
    cfg = write_cfg(work, "run2", tiny, resume_from_checkpoint=str(run1 / "checkpoint-3"))
    run("run2", accelerate_train(cfg), work).check()
    out = work / "run2"
    resumed, original = train_losses(out), train_losses(run1)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (1, 2, 3)] == [original[s] for s in (1, 2, 3)]  # restored trainer state
    # steps 4-6 continue from the checkpoint's adapter: close to run 1's (dropout masks and packing
    # order are not bit-identical after a resume), far below a fresh adapter's first loss
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(original[step], abs=0.05), (resumed, original)
    assert resumed[4] < original[1] - 0.15, (resumed, original)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "RLORA"


def test_continue_from_lora_model_dir(run1, tiny, work):
    import torch

    cfg = write_cfg(
        work,
        "run3",
        tiny,
        lora_model_dir=str(run1),
        rlora={"num_heads": 5},  # disagrees with the saved adapter: the saved one governs, with a warning
        datasets=[{"path": str(tiny["alpaca"]), "ds_type": "json", "type": "alpaca"}],
        sample_packing=False,
        gradient_checkpointing=False,
        val_set_size=0,
        eval_steps=None,
        max_steps=2,
        save_steps=2,
    )
    result = run("run3", accelerate_train(cfg), work).check()
    assert "governs these settings" in result.output
    out = work / "run3"
    # the adapter Axolotl loaded from lora_model_dir is run 1's trained adapter
    init = torch.load(out / "probe_init.pt")["adapted"]
    torch.testing.assert_close(init, torch.load(run1 / "probe_trained.pt")["trained"], atol=1e-5, rtol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["num_heads"] == N_HEADS
    before, after = adapter_tensors(run1), adapter_tensors(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("rlora_B"))  # it trained on
    assert sorted(train_losses(out)) == [1, 2]


def test_inference_with_lora_model_dir(run1, tiny, work):
    cfg = write_cfg(work, "infer", tiny, lora_model_dir=str(run1))
    result = run("infer", [str(BIN / "axolotl"), "inference", str(cfg)], work, stdin="What color is the cat?\n")
    result.check()
    assert f"R-LoRA: loading the adapter in {run1}" in result.output
    assert "color is the cat" in result.output  # the decoded prompt + generation


def test_report_command(run1, work):
    png = work / "report.png"
    result = run("report", [str(BIN / "axolotl"), "rlora-report", str(run1), "--out", str(png)], work).check()
    assert "base_model.model.model.layers.0.mlp.down_proj" in result.output
    assert "cos(B_i A)" in result.output
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_configs_fail_before_training(run1, tiny, work):
    merge_cfg = write_cfg(work, "merge", tiny, lora_model_dir=str(run1))
    typo_cfg = write_cfg(work, "typo", tiny, rlora={"num_head": 3})
    noplugin_cfg = write_cfg(work, "noplugin", tiny, plugins=None)
    runs = [  # started together, then awaited: each only pays Axolotl's import time
        Run("merge", [str(BIN / "axolotl"), "merge-lora", str(merge_cfg)], work),
        Run("typo", [str(BIN / "axolotl"), "train", str(typo_cfg)], work),
        Run("noplugin", [str(BIN / "axolotl"), "preprocess", str(noplugin_cfg)], work),
    ]
    merge, typo, noplugin = (r.wait() for r in runs)
    for result in (merge, typo, noplugin):
        assert result.returncode != 0, result.output[-3000:]
        assert result.seconds < 180, (result.name, result.seconds)
        assert "Starting trainer" not in result.output
    assert (
        "adapter: rlora: `merge_lora: True` is not supported" in merge.output
        and "Fix: remove `merge_lora`" in merge.output
    )
    assert not (run1 / "merged").exists()
    assert "`rlora.num_head: 3` is not an R-LoRA key. Fix: did you mean `rlora.num_heads`?" in typo.output
    assert not (work / "typo").exists()
    assert "Adapter 'rlora' is not built in and was not registered by a plugin" in noplugin.output
    assert not (work / "noplugin").exists()  # not even the debug log: it failed at validation


def test_model_card_after_an_axolotl_run(run1):
    """Axolotl writes its own README.md after the adapter: the plugin puts the R-LoRA section back."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(run1 / "README.md")
    assert {"rlora", "peft", "axolotl"} <= set(card.data.tags), card.data.tags
    assert "## R-LoRA adapter" in card.text and "import rlora_plugin" in card.text
    assert f"| `num_heads` | `{N_HEADS}` |" in card.text


def test_export_merges_with_axolotl_merge_lora(run1, tiny, work):
    """`axolotl rlora-export` writes a plain LoRA that `axolotl merge-lora` (adapter: lora) merges into a full
    model equal to the R-LoRA model with its gates fixed to the same constants."""
    import torch
    from axolotl_probe import probe_logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlora_plugin.routing import fixed_gates

    export = work / "export"
    run("export", [str(BIN / "axolotl"), "rlora-export", str(run1), str(export), "--gates", "uniform"], work).check()
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "LORA"
    cfg = write_cfg(work, "merge_export", tiny, adapter="lora", lora_model_dir=str(export), rlora=None)
    run("merge_export", [str(BIN / "axolotl"), "merge-lora", str(cfg)], work).check()
    merged = probe_logits(AutoModelForCausalLM.from_pretrained(work / "merge_export" / "merged", dtype=torch.float32))
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    routed = PeftModel.from_pretrained(base, run1)
    with fixed_gates(routed, "uniform"):
        expected = probe_logits(routed)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_listing_the_plugin_leaves_a_plain_lora_run_unchanged(tiny, work):
    """A user adds the plugin to a YAML that trains `adapter: lora` (or keeps it in a shared base config):
    the LoRA run must come out exactly as without it. Both runs seed the model's initialization the same way
    (`SeedInitPlugin`: Axolotl 0.19 leaves it unseeded)."""
    import torch

    # Axolotl's Triton LoRA kernels, on by default for `adapter: lora`, need CUDA
    kernels_off = dict(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    plain = dict(adapter="lora", rlora=None, max_steps=2, save_steps=2, eval_steps=None, val_set_size=0, **kernels_off)
    adapters = {}
    for name, plugins in (("lora_with_plugin", ["rlora_plugin.RLoraPlugin"]), ("lora_without_plugin", [])):
        cfg = write_cfg(work, name, tiny, plugins=[*plugins, "axolotl_probe.SeedInitPlugin"], **plain)
        run(name, accelerate_train(cfg), work).check()
        assert json.loads((work / name / "adapter_config.json").read_text())["peft_type"] == "LORA"
        adapters[name] = adapter_tensors(work / name)
    with_plugin, without = adapters.values()
    assert with_plugin.keys() == without.keys()
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in with_plugin.items()), "no step trained"
    for key in with_plugin:
        torch.testing.assert_close(with_plugin[key], without[key], rtol=0, atol=0)
