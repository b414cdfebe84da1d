"""The LLaMA-Factory launcher in two CPU processes (torchrun, through the launcher) with DDP, DeepSpeed ZeRO-2 and
ZeRO-3 (the examples' configs): the one-process losses and adapter, saved whole and reloadable. Its own module
so that a pytest worker of its own makes the one-process reference run once (scripts/run-tests.sh:
`--dist loadfile`); the helpers: tests/test_llamafactory.py.

Runs only in a venv with LLaMA-Factory: `python -m pytest -m llamafactory tests/test_llamafactory_distributed.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_llamafactory import EXAMPLES, _adapter_tensors, _json, _losses, _reload_logits, _run, _train_cfg, _write

import rlora_plugin  # noqa: F401  (registers RLORA: the reloads below need it)

pytestmark = pytest.mark.llamafactory

_ZERO3 = json.loads((EXAMPLES / "zero3.json").read_text())
# The two-process runs' DeepSpeed configs: the examples' (the ones users are pointed at), except that ZeRO-3
# partitions every parameter: by default it keeps those under 1e5 elements whole on every rank, which is the
# whole tiny model, adapter included.
DEEPSPEED = {
    "ddp": None,
    "zero2": json.loads((EXAMPLES / "zero2.json").read_text()),
    "zero3": {**_ZERO3, "zero_optimization": {**_ZERO3["zero_optimization"], "stage3_param_persistence_threshold": 0}},
}
# Two ranks with micro batch 2 see the one process's batch of 4 per step. Measured here (gloo, deepspeed 0.18.4):
# DDP, ZeRO-2 and ZeRO-3 give the one-process losses to float precision and its adapter to < 1e-7.
LOSS_REL, ADAPTER_ATOL = 1e-5, 1e-5
ZERO_STATES = "global_step*/zero_pp_rank_*_optim_states.pt"  # one file a rank in a DeepSpeed Trainer checkpoint


def _zero_stages(checkpoint: Path) -> list[int]:
    """The ZeRO stage of each rank's DeepSpeed optimizer state saved in a Trainer checkpoint (none: no DeepSpeed)."""
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(checkpoint.glob(ZERO_STATES))]
    return [int(state["optimizer_state_dict"]["zero_stage"]) for state in states]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory) -> Path:
    """The multi-process runs' reference: one process, batch 4, dropout off (each rank draws its own masks).
    llamafactory is imported first, so a venv without it fails here."""
    import llamafactory  # noqa: F401

    work = tmp_path_factory.mktemp("lf_one")
    proc = _run(work, "train", str(_write(work / "one.yaml", _train_cfg(tiny, work / "one", lora_dropout=0.0))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "one"


@pytest.mark.parametrize("mode", list(DEEPSPEED))
def test_two_processes_match_one(one_process, tiny, tmp_path, mode):
    """Two CPU processes (the launcher runs itself under torchrun) with DDP, DeepSpeed ZeRO-2 or ZeRO-3 give the
    one-process losses and adapter. The adapter (final and checkpoints) is saved whole, not as the ranks' ZeRO-3
    partitions, and a plain `PeftModel.from_pretrained` reloads it."""
    deepspeed = DEEPSPEED[mode]
    over = {"deepspeed": str(_json(tmp_path / "deepspeed.json", deepspeed))} if deepspeed else {}
    cfg = _train_cfg(tiny, tmp_path / "two", lora_dropout=0.0, per_device_train_batch_size=2, **over)
    two = _run(tmp_path, "train", str(_write(tmp_path / "two.yaml", cfg)), FORCE_TORCHRUN="1", NPROC_PER_NODE="2")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "world size: 2" in two.stdout + two.stderr
    out = tmp_path / "two"
    # DeepSpeed really trained, at the config's stage, on both ranks (the losses alone would not tell)
    stage = deepspeed["zero_optimization"]["stage"] if deepspeed else None
    assert _zero_stages(out / "checkpoint-2") == ([stage, stage] if deepspeed else [])
    assert _losses(out) == pytest.approx(_losses(one_process), rel=LOSS_REL)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "RLORA"

    reference = _adapter_tensors(one_process)
    for saved in (out / "checkpoint-2", out / "checkpoint-4", out):
        tensors = _adapter_tensors(saved)
        assert {k: t.shape for k, t in tensors.items()} == {k: t.shape for k, t in reference.items()}, saved
    for key, tensor in _adapter_tensors(out).items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=ADAPTER_ATOL)
    reloaded, plain = _reload_logits(tiny, out)
    torch.testing.assert_close(reloaded, _reload_logits(tiny, one_process)[0], rtol=0, atol=ADAPTER_ATOL)
    assert (reloaded - plain).abs().max() > 1e-3  # the adapter trained, so matching it means something
