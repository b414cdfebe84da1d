"""Two-process training through the Axolotl CLI on CPU: plain DDP, DeepSpeed ZeRO-2/3 and FSDP2 (`-m cli`).

Runs (each `axolotl.cli.train` on the tiny local Llama, 4 optimizer steps, global batch 2, no dropout):
- `single`: one process, micro batch 2 (the reference loss curve);
- `ddp`: `torchrun --nproc_per_node 2`, micro batch 1;
- `zero2`: the same with `deepspeed:` ZeRO-2;
- `zero3`: the same with `deepspeed:` ZeRO-3 and the optimizer state offloaded to CPU, checkpoints at
  steps 2 and 4; `zero3_resume`: resumes it from the step-2 checkpoint;
- `fsdp2`: the same with `fsdp_version: 2` (`fully_shard` of every decoder layer, full state dict
  checkpoints at steps 2 and 4); `fsdp2_resume`: resumes it from the step-2 checkpoint; `fsdp2_sharded` and
  `fsdp2_sharded_resume`: the same with sharded (distributed) checkpoints.
Checks: every rank builds the identical adapter (same init, router and offset path) as the single process
does; the two-process loss curves follow the single-process one; the adapter saved under ZeRO-3 and FSDP2
has full, correctly shaped tensors and a plain `PeftModel.from_pretrained` reload reproduces the trained
model; ZeRO-3 and FSDP2 checkpoints resume.

The DeepSpeed runs need deepspeed >= 0.19: on 0.18.x ZeRO-1/2 keep the flat parameter buffer attached to
autograd, and torch 2.13's gloo all-gather then fails ("Output 0 of Split is a view and is being modified
inplace"); DeepSpeed 0.19 detaches it. The `test` extra installs deepspeed 0.19.x with both Axolotl
versions (Axolotl 0.19.0's own `deepspeed` extra would pin <0.19; 0.19.8 was checked with it here).
"""

from __future__ import annotations

import json
from pathlib import Path

import axolotl  # (these tests need it: fail, never skip, without it)
import axolotl_runs
import deepspeed  # noqa: F401  (likewise)
import pytest
from axolotl_runs import BIN, N_HEADS, Run, adapter_tensors, free_port, reload_logits, train_losses
from packaging.version import Version

pytestmark = pytest.mark.cli

# cpu_distributed: the test-only plugin that lets Axolotl and accelerate train several processes on CPU.
PLUGINS = ["rlora_plugin.RLoraPlugin", "cpu_distributed.CpuDistributedPlugin", "mp_probe.MultiProcessProbePlugin"]
STEPS = 4
# Two ranks with micro batch 1 see the same samples per step as one process with micro batch 2; measured
# here, DDP, ZeRO-2, ZeRO-3 (offload) and FSDP2 match the single-process losses to < 1e-6 (reduction order).
LOSS_TOL = 1e-4
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ZERO2 = str(EXAMPLES / "zero2.json")  # the DeepSpeed configs users are pointed at
_ZERO3 = json.loads((EXAMPLES / "zero3.json").read_text())
# The optimizer state offloaded to CPU, with the Trainer's torch AdamW (no DeepSpeedCPUAdam build), and every
# parameter partitioned: by default ZeRO-3 keeps parameters under 1e5 elements whole on every rank, which on
# the tiny model is all of them, adapter included.
ZERO3_OFFLOAD = {
    **_ZERO3,
    "zero_optimization": {
        **_ZERO3["zero_optimization"],
        "offload_optimizer": {"device": "cpu"},
        "stage3_param_persistence_threshold": 0,
    },
    "zero_force_ds_cpu_optimizer": False,
}
FSDP2 = {
    "fsdp_version": 2,
    "fsdp_config": {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    },
}


def torchrun(cfg: Path) -> list[str]:
    return [
        str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "axolotl.cli.train", str(cfg),
    ]  # fmt: skip


def write_cfg(work: Path, name: str, tiny: dict, **overrides) -> Path:
    """The CLI tests' YAML with this module's settings: micro batch 1 per rank, no eval, no packing, no dropout
    (no per-rank dropout streams: the loss curves must be comparable)."""
    settings = {
        "plugins": PLUGINS,
        "lora_dropout": 0.0,
        "rlora": {"num_heads": N_HEADS},
        "datasets": [{"path": str(tiny["alpaca"]), "ds_type": "json", "type": "alpaca"}],
        "val_set_size": 0,
        "eval_steps": None,
        "sample_packing": False,
        "gradient_checkpointing": None,
        "micro_batch_size": 1,
        "max_steps": STEPS,
        "save_steps": 2,
    }
    return axolotl_runs.write_cfg(work, name, tiny, **(settings | overrides))


def probe(out: Path, stage: str, rank: int) -> dict:
    return json.loads((out / f"probe_{stage}_rank{rank}.json").read_text())


def check_two_ranks(out: Path, single: Path) -> None:
    """Both ranks built the single process's adapter, and (replicated or gathered) trained the same one."""
    init0, init1 = probe(out, "init", 0), probe(out, "init", 1)
    assert init0["world_size"] == init1["world_size"] == 2
    assert init0["sha256"] == init1["sha256"] == probe(single, "init", 0)["sha256"]
    assert any(".rlora_offset_A." in name for name in init0["shapes"])  # the frozen offset path is hashed
    assert probe(out, "trained", 0)["sha256"] == probe(out, "trained", 1)["sha256"]


def check_losses(out: Path, reference: dict[int, float]) -> dict[int, float]:
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    for step, loss in reference.items():
        assert loss == pytest.approx(losses[step], abs=LOSS_TOL), (out.name, losses, reference)
    return losses


def check_full_adapter(out: Path, single: Path, tiny: dict, checkpoint_adapters: bool = True) -> None:
    """The saved adapter (final and, if they hold one, checkpoints) has every tensor of the single process's,
    full-shaped, and one plain process reloads it onto a clean base and reproduces the trained (sharded) model."""
    import torch

    saved, reference = adapter_tensors(out), adapter_tensors(single)
    assert saved.keys() == reference.keys()
    for key, tensor in saved.items():  # full tensors, not the ranks' shards
        assert tensor.shape == reference[key].shape and tensor.numel() > 0, key
    assert probe(out, "trained", 0)["shapes"] == probe(single, "trained", 0)["shapes"]
    for step in (2, 4) if checkpoint_adapters else ():
        assert adapter_tensors(out / f"checkpoint-{step}").keys() == reference.keys()
    trained = torch.load(out / "probe_trained.pt")["trained"]
    torch.testing.assert_close(reload_logits(tiny, out), trained, atol=1e-5, rtol=1e-5)


def check_resume(resumed_out: Path, original_out: Path) -> None:
    resumed, original = train_losses(resumed_out), train_losses(original_out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in (1, 2)] == [original[s] for s in (1, 2)]  # restored trainer state
    for step in (3, 4):  # continued from the checkpoint's adapter and optimizer state
        assert resumed[step] == pytest.approx(original[step], abs=1e-3), (resumed, original)


def logged(out: Path, key: str) -> dict[int, float]:
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return {rec["step"]: rec[key] for rec in history if key in rec}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def single(tiny, work) -> Path:
    cfg = write_cfg(work, "single", tiny, micro_batch_size=2)
    Run("single", [str(BIN / "python"), "-m", "axolotl.cli.train", str(cfg)], work).wait().check()
    return work / "single"


def test_ddp_two_processes(single, tiny, work):
    cfg = write_cfg(work, "ddp", tiny)
    result = Run("ddp", torchrun(cfg), work).wait().check()
    assert "CPU-only multi-process run" in result.output
    out = work / "ddp"
    check_two_ranks(out, single)
    reference = train_losses(single)
    assert reference[STEPS] < reference[1]
    check_losses(out, reference)
    # DDP keeps the replicas identical: the trained adapter is the same as the single process's, to float error
    import torch

    ours, theirs = adapter_tensors(out), adapter_tensors(single)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=2e-4, rtol=1e-3)


def test_deepspeed_zero2(single, tiny, work):
    cfg = write_cfg(work, "zero2", tiny, deepspeed=ZERO2)
    Run("zero2", torchrun(cfg), work).wait().check()
    out = work / "zero2"
    check_two_ranks(out, single)
    check_losses(out, train_losses(single))


@pytest.fixture(scope="module")
def zero3(single, tiny, work) -> Path:
    cfg = write_cfg(work, "zero3", tiny, deepspeed=ZERO3_OFFLOAD)
    Run("zero3", torchrun(cfg), work).wait().check()
    return work / "zero3"


def test_deepspeed_zero3_offload_saves_full_adapter(zero3, single, tiny):
    check_two_ranks(zero3, single)
    check_losses(zero3, train_losses(single))
    check_full_adapter(zero3, single, tiny)


def test_deepspeed_zero3_resume(zero3, tiny, work):
    cfg = write_cfg(
        work, "zero3_resume", tiny, deepspeed=ZERO3_OFFLOAD, resume_from_checkpoint=str(zero3 / "checkpoint-2")
    )
    Run("zero3_resume", torchrun(cfg), work).wait().check()
    check_resume(work / "zero3_resume", zero3)


@pytest.fixture(scope="module")
def fsdp2(single, tiny, work) -> Path:
    cfg = write_cfg(work, "fsdp2", tiny, **FSDP2)
    Run("fsdp2", torchrun(cfg), work).wait().check()
    return work / "fsdp2"


def test_fsdp2_shards_and_saves_full_adapter(fsdp2, single, tiny):
    # really sharded: the parameters are DTensors (not a DDP run with the FSDP config ignored)
    assert probe(fsdp2, "trained", 0)["fsdp2_sharded"] and probe(fsdp2, "trained", 1)["fsdp2_sharded"]
    assert not probe(single, "trained", 0)["fsdp2_sharded"]
    check_two_ranks(fsdp2, single)
    check_losses(fsdp2, train_losses(single))
    check_full_adapter(fsdp2, single, tiny)
    # the head similarities are computed from the gathered weights, not from each rank's shard
    for key in ("rlora/head_cos_B", "rlora/head_cos_BA"):
        ours, theirs = logged(fsdp2, key), logged(single, key)
        assert ours.keys() == theirs.keys() == set(range(1, STEPS + 1))
        assert ours == pytest.approx(theirs, abs=1e-4), key


# With Axolotl 0.19.0 (accelerate 1.13, peft 0.20) a FULL_STATE_DICT resume restores the trainer state but not
# the adapter weights, silently (measured steps 3-4: 5.820/5.684 instead of 5.669/5.632): the stock
# `load_fsdp_model(..., adapter_only=True)` reads the file on rank 0 only and hands it to PEFT, whose
# `load_adapter` into FSDP2 DTensors raises "aten.copy_.default got mixed torch.Tensor and DTensor" when called
# directly. Axolotl 0.21 replaces that path (monkeypatch/accelerate/fsdp2_checkpoint.py). SHARDED_STATE_DICT
# resumes on both (test_fsdp2_sharded_resume).
def test_fsdp2_resume(fsdp2, tiny, work):
    """Axolotl 0.21 resumes a FULL_STATE_DICT checkpoint with its adapter; 0.19 would silently not restore the
    adapter weights, so the plugin refuses that resume at config validation."""
    cfg = write_cfg(work, "fsdp2_resume", tiny, **FSDP2, resume_from_checkpoint=str(fsdp2 / "checkpoint-2"))
    result = Run("fsdp2_resume", torchrun(cfg), work).wait()
    if Version(axolotl.__version__) < Version("0.21"):
        assert result.returncode != 0 and "Starting trainer" not in result.output
        assert "restores the trainer state but not the adapter weights" in result.output
        assert "SHARDED_STATE_DICT" in result.output
        return
    result.check()
    check_resume(work / "fsdp2_resume", fsdp2)


def test_fsdp2_sharded_resume(single, tiny, work):
    fsdp_config = {**FSDP2["fsdp_config"], "state_dict_type": "SHARDED_STATE_DICT"}
    cfg = write_cfg(work, "fsdp2_sharded", tiny, fsdp_version=2, fsdp_config=fsdp_config)
    Run("fsdp2_sharded", torchrun(cfg), work).wait().check()
    out = work / "fsdp2_sharded"
    check_losses(out, train_losses(single))
    check_full_adapter(out, single, tiny, checkpoint_adapters=False)  # distributed checkpoints, no adapter file
    cfg = write_cfg(
        work,
        "fsdp2_sharded_resume",
        tiny,
        fsdp_version=2,
        fsdp_config=fsdp_config,
        resume_from_checkpoint=str(out / "checkpoint-2"),
    )
    Run("fsdp2_sharded_resume", torchrun(cfg), work).wait().check()
    check_resume(work / "fsdp2_sharded_resume", out)
