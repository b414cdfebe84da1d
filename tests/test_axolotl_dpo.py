"""Preference training (`rl: dpo`) with `adapter: rlora` through `axolotl train` (slow: `-m cli`).

One 6-step DPO run on the tiny Llama with `chatml.prompt_pairs` data, with the load-balancing loss on
and gradient checkpointing. Axolotl hands TRL only the adapter config, TRL's DPOTrainer builds the PEFT
model and, without a `ref_model`, computes the reference log-probs with the adapter disabled (the base
model). The test checks that the run logs the DPO loss and the `rlora/` metrics, that the reference is
the base model, and that the saved adapter reproduces the trained in-process model (tests/axolotl_probe.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from axolotl_runs import BIN, reload_logits, run, write_cfg

pytestmark = pytest.mark.cli

AUX_COEF = 0.01
STEPS = 6


@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("axolotl_dpo")
    cfg = write_cfg(
        work,
        "dpo",
        tiny,
        rl="dpo",
        datasets=[{"path": str(tiny["preference"]), "ds_type": "json", "type": "chatml.prompt_pairs"}],
        rlora={"num_heads": 3, "router_aux_loss_coef": AUX_COEF},
        lora_dropout=0.0,  # with dropout the adapted model differs from the base in training mode at step 1
        sample_packing=False,  # Axolotl refuses it with rl
        val_set_size=0,
        eval_steps=None,
        max_steps=STEPS,
        save_steps=STEPS,
    )
    run("dpo", [str(BIN / "axolotl"), "train", str(cfg)], work).check()
    return work / "dpo"


def test_dpo_logs_metrics_and_uses_the_base_as_reference(dpo_run, tiny):
    import torch
    from axolotl_probe import probe_logits
    from transformers import AutoModelForCausalLM

    assert json.loads((dpo_run / "adapter_config.json").read_text())["peft_type"] == "RLORA"
    history = json.loads((dpo_run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    records = {rec["step"]: rec for rec in history if "loss" in rec}
    assert sorted(records) == list(range(1, STEPS + 1))
    for step, rec in records.items():
        assert math.isfinite(rec["loss"]), (step, rec)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rlora/router_entropy"):
            assert key in rec, (step, key, sorted(rec))
        for key in ("rlora/head_load_ratio", "rlora/head_cos_BA", "rlora/head_cos_BA/q_proj", "rlora/aux_loss"):
            assert key in rec, (step, key, sorted(rec))
        assert rec["rlora/aux_loss"] >= 1 - 1e-4  # N * sum f_i P_i >= 1
    first = records[1]
    assert first["rlora/router_entropy"] == pytest.approx(1.0, abs=1e-4)  # zero router at step 1
    assert records[STEPS]["rlora/router_entropy"] < 1.0

    # The reference is the base model with the adapter disabled: TRL has no ref_model and no "ref" adapter
    # copy, and enters `disable_adapter()` once per step for the reference forward.
    assert json.loads((dpo_run / "probe_ref.json").read_text()) == {
        "ref_model": None,
        "adapters": ["default"],
        "disable_adapter_calls": STEPS,
    }
    # At step 1 the adapted model equals the base (zero router, offset path), so the policy's log-probs equal
    # the reference's: zero rewards, and the DPO loss is log 2 plus the weighted load-balancing loss.
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4, first
    assert first["loss"] == pytest.approx(math.log(2) + AUX_COEF * first["rlora/aux_loss"], abs=1e-4)
    # Later the policy moves away from the frozen reference.
    assert any(abs(rec["rewards/chosen"]) > 1e-3 for rec in records.values())

    # The saved adapter reproduces the trained in-process model, which differs from the base.
    trained = torch.load(dpo_run / "probe_trained.pt")["trained"]
    base = probe_logits(AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32))
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(reload_logits(tiny, dpo_run), trained, atol=1e-5, rtol=1e-5)
    # and the model card has the R-LoRA section (post_train gets the base model TRL wrapped, not a PeftModel)
    assert "## R-LoRA adapter" in (dpo_run / "README.md").read_text()
