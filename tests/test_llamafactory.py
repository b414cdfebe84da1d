"""The LLaMA-Factory launcher (`python -m rlora_plugin.llamafactory`) on a tiny local Llama, on CPU.

Runs only in a venv with LLaMA-Factory (`.ci/install-llamafactory.sh`), selected by its marker:
`python -m pytest -m llamafactory tests/test_llamafactory.py` (conftest.py leaves these tests out of any run
whose `-m` does not name the marker; the path keeps pytest from importing the Axolotl test modules). Without
llamafactory they fail, never skip.
- config refusals (a misspelled `rlora_*` key, bad values, plain-LoRA-only features), in-process and fast;
- `train` through the launcher: LLaMA-Factory's data (local `dataset_info.json`, alpaca, its `default`
  template), trainer and checkpoints; the saved adapter is RLORA, the router metrics reach the log history,
  and a plain `PeftModel.from_pretrained` reload reproduces the in-process logits of the trained model;
- `resume_from_checkpoint` reproduces the uninterrupted run's last loss;
- two CPU processes: tests/test_llamafactory_distributed.py;
- `stage: dpo` and `kto` use the model with the adapter switched off as their reference, and add the
  load-balancing loss to the loss they compute from the logits; `rm` and `ppo`, whose trainers drop the model's
  loss, refuse it when the config is read;
- `chat` (the adapter by its model-hub id), `api` and `webchat` load the adapter unmerged and generate;
  `export` is refused, and its fix (the frozen-gate export, then LLaMA-Factory's own export of that plain
  LoRA) works.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from axolotl_runs import free_port
from hub_cache import cache_as_downloaded

pytestmark = pytest.mark.llamafactory

REPO = Path(__file__).resolve().parent.parent
N_HEADS, RANK, STEPS = 3, 4, 4
PROBE_IDS = [[5, 17, 42, 9, 23, 11, 30, 7]]
TIMEOUT = 600
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def lf():
    """The launcher's config translation; llamafactory is imported first, so a venv without it fails here."""
    import llamafactory  # noqa: F401

    from rlora_plugin.llamafactory import translate

    return translate


@pytest.fixture(scope="module")
def lf_patches(lf):
    """The launcher's patches of LLaMA-Factory (the module, not installed)."""
    from rlora_plugin.llamafactory import patches

    return patches


def _env() -> dict:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # torchrun of this venv
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
    )
    return env


def _run(
    work: Path, *args: str, stdin: str | None = None, code: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "rlora_plugin.llamafactory", *args]
    proc = subprocess.run(
        cmd, cwd=work, env={**_env(), **env}, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    (work / f"{args[0]}-{len(list(work.glob('*.log')))}.log").write_text(proc.stdout + proc.stderr)
    return proc


def inference_cfg(trained: dict, tiny: dict, **extra) -> dict:
    """A LLaMA-Factory chat/api/export config for the tiny model with the trained R-LoRA adapter."""
    base = {"model_name_or_path": str(tiny["model"]), "adapter_name_or_path": str(trained["out"])}
    return base | {"template": "default"} | extra


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _json(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def _losses(path: Path) -> dict[int, float]:
    history = json.loads((path / "trainer_state.json").read_text())["log_history"]
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _reload_logits(tiny: dict, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on PROBE_IDS of a plain `PeftModel.from_pretrained` reload of `adapter`, and of its base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        reloaded = model(input_ids=torch.tensor(PROBE_IDS)).logits
        with model.disable_adapter():
            return reloaded, model(input_ids=torch.tensor(PROBE_IDS)).logits


def _train_cfg(tiny: dict, output_dir: Path, **over) -> dict:
    """An ordinary LLaMA-Factory SFT config with `finetuning_type: rlora`; its dataset_info.json is written next
    to the output directory (LLaMA-Factory joins `file_name` to `dataset_dir`; an absolute path stays one)."""
    info = {"tiny_alpaca": {"file_name": str(tiny["alpaca"])}}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    (output_dir.parent / "dataset_info.json").write_text(json.dumps(info))
    return {
        "model_name_or_path": str(tiny["model"]),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "rlora",
        "lora_rank": RANK,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "lora_target": "q_proj,v_proj,down_proj",
        "rlora_num_heads": N_HEADS,
        "rlora_init_gamma": 16.0,
        "dataset": "tiny_alpaca",
        "dataset_dir": str(output_dir.parent),
        "template": "default",
        "cutoff_len": 64,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 4,
        "max_steps": STEPS,
        "logging_steps": 2,
        "save_steps": 2,
        "learning_rate": 2.0e-3,
        "report_to": "none",
        "seed": 7,
        **over,
    }


# Saves the trained model's logits on PROBE_IDS at train end (the model in memory, before any reload).
_PROBE = f"""
import sys, torch
from transformers import TrainerCallback
from rlora_plugin.llamafactory.cli import main

class Probe(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({PROBE_IDS})).logits, args.output_dir + "/probe_logits.pt")

sys.exit(main(sys.argv[1:], callbacks=[Probe()]))
"""


@pytest.fixture(scope="module")
def trained(lf, tiny, tmp_path_factory):
    """One training run through the launcher (probe callback added), with a checkpoint every 2 steps."""
    work = tmp_path_factory.mktemp("lf_train")
    out = work / "out"
    proc = _run(work, "train", str(_write(work / "train.yaml", _train_cfg(tiny, out))), code=_PROBE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "out": out, "log": proc.stdout + proc.stderr}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"rlora_num_head": 3}, "`rlora_num_head: 3` is not an R-LoRA key. Fix: did you mean `rlora_num_heads`?"),
        ({"rlora_init": "gaussian"}, "`rlora_init: 'gaussian'` is invalid. Fix: choose one of 'random', 'zero'."),
        ({"rlora_num_heads": True}, "`rlora_num_heads: True` is invalid. Fix: use an integer"),
        ({"lora_rank": 0}, "`lora_rank: 0` is invalid. Fix: the rank must be an integer >= 1"),
        ({"rlora_metrics": "yes"}, "`rlora_metrics: 'yes'` is invalid. Fix: use true or false."),
        (
            {"use_dora": True},
            "`use_dora: True` is not supported: DoRA is a variant of plain LoRA; R-LoRA has no magnitude vector. "
            "Fix: remove `use_dora`, or use `finetuning_type: lora`.",
        ),
        (
            {"pissa_init": True},
            "`pissa_init: True` is not supported: PiSSA initializes plain LoRA from the base weights' SVD; R-LoRA "
            "has its own initialization. Fix: remove `pissa_init` and choose `rlora_init` ('random' or 'zero').",
        ),
        ({"loraplus_lr_ratio": 16.0}, "`loraplus_lr_ratio: 16.0` is not supported: LLaMA-Factory's LoRA+"),
        ({"create_new_adapter": True}, "`create_new_adapter: True` is not supported: it merges the loaded adapter"),
        (
            {"rlora_router_aux_loss_coef": 0.01, "use_reentrant_gc": True},
            "`use_reentrant_gc: True` is not supported: with `rlora_router_aux_loss_coef` > 0 it runs the router "
            "without gradients",
        ),
        (
            {"rlora_router_aux_loss_coef": 0.01, "use_unsloth_gc": True},
            "`use_unsloth_gc: True` is not supported: with `rlora_router_aux_loss_coef` > 0",
        ),
        (
            {"rlora_router_aux_loss_coef": 0.01, "stage": "rm"},
            "`rlora_router_aux_loss_coef: 0.01` is not supported with `stage: rm`: LLaMA-Factory's reward-model "
            "trainer (`PairwiseTrainer.compute_loss`) keeps only the value head's scores",
        ),
        (
            {"rlora_router_aux_loss_coef": 0.01, "stage": "ppo"},
            "`rlora_router_aux_loss_coef: 0.01` is not supported with `stage: ppo`: LLaMA-Factory's PPO trainer",
        ),
        (
            {"finetuning_type": "lora"},
            "`rlora_init_gamma: 16.0` is an R-LoRA setting, but `finetuning_type` is 'lora'. Fix: set "
            "`finetuning_type: rlora`, or remove the `rlora_*` keys.",
        ),
    ],
)
def test_config_refused(lf, tiny, tmp_path, over, message):
    from rlora_plugin.host import HostConfigError

    with pytest.raises(HostConfigError) as info:
        lf.translate(_train_cfg(tiny, tmp_path, **over))
    assert str(info.value).startswith("finetuning_type: rlora: `")  # one format for every host and error
    assert message in str(info.value)


def test_config_rewritten_to_lora_path(lf, tiny, tmp_path, monkeypatch):
    cfg = _train_cfg(tiny, tmp_path, rlora_router_top_k=2, rlora_metrics=False)
    out, run = lf.translate(cfg)
    assert out["finetuning_type"] == "lora" and not any(k.startswith("rlora_") for k in out)
    assert {k: v for k, v in out.items() if k != "finetuning_type"} == {  # tiny["model"] is absolute already
        k: v for k, v in cfg.items() if not k.startswith("rlora_") and k != "finetuning_type"
    }
    assert run.options == {"num_heads": N_HEADS, "init_gamma": 16.0, "router_top_k": 2, "init_seed": 7}
    assert run.metrics is False
    assert lf.translate(cfg) == (out, run) and cfg == _train_cfg(
        tiny, tmp_path, rlora_router_top_k=2, rlora_metrics=False
    )
    plain = {k: v for k, v in cfg.items() if not k.startswith("rlora_")} | {"finetuning_type": "lora"}
    assert lf.translate(plain) == (plain, None)  # any other config: unchanged, no R-LoRA settings
    # A local base model is recorded in the adapter as an absolute path, so it loads from any directory.
    monkeypatch.chdir(tiny["model"].parent)
    relative, _ = lf.translate({**cfg, "model_name_or_path": tiny["model"].name})
    assert relative["model_name_or_path"] == str(tiny["model"].resolve())
    assert lf.translate({**cfg, "model_name_or_path": "org/model"})[0]["model_name_or_path"] == "org/model"
    from rlora_plugin.config import Source, fields_from

    assert set(lf.HOST.rlora_keys()) | {lf.METRICS_KEY} == {
        *(f"rlora_{name}" for name in fields_from(Source.RLORA)),
        "rlora_init_seed",
        "rlora_metrics",
    }


def test_a_later_plain_lora_config_in_the_same_process_builds_plain_lora(lf_patches, tiny, tmp_path):
    """The R-LoRA settings of one config must not outlive it: a later config read in the same process without
    `finetuning_type: rlora` gets PEFT's own LoraConfig from the patched constructor, not an RLoraConfig (before
    the translation was made pure, the first config's settings stayed and this built an RLoraConfig)."""
    from peft import LoraConfig

    from rlora_plugin import RLoraConfig

    rlora_cfg = _train_cfg(tiny, tmp_path)
    plain_cfg = {k: v for k, v in rlora_cfg.items() if not k.startswith("rlora_")} | {"finetuning_type": "lora"}
    configs = [rlora_cfg, plain_cfg]
    patches = lf_patches.Patches()
    read_args = patches.read_args(lambda args=None: configs.pop(0))
    lora_config = patches.lora_config(LoraConfig)
    # what LLaMA-Factory 0.9.5's _setup_lora_tuning passes
    passed = dict(
        r=RANK,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj"],
        use_rslora=False,
        modules_to_save=None,
        use_dora=False,
        task_type="CAUSAL_LM",
        inference_mode=False,
    )
    read_args()
    assert isinstance(lora_config(**passed), RLoraConfig)
    read_args()
    built = lora_config(**passed)
    assert type(built) is LoraConfig and built.r == RANK


def test_training_on_from_a_saved_adapter_takes_the_runs_training_settings(lf_patches, tiny, tmp_path, caplog):
    """Continuing to train a saved R-LoRA adapter (`adapter_name_or_path`): its own forward settings govern (a
    different `rlora_num_heads` is named in a warning), this run's training-only ones apply (the load-balancing
    loss's coefficient)."""
    from types import SimpleNamespace

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlora_plugin import RLoraConfig

    saved = tmp_path / "saved"
    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    get_peft_model(base, RLoraConfig(target_modules=["q_proj"], num_heads=N_HEADS)).save_pretrained(saved)
    cfg = _train_cfg(tiny, tmp_path / "out", adapter_name_or_path=str(saved), rlora_num_heads=N_HEADS + 1,
                     rlora_router_aux_loss_coef=0.01)  # fmt: skip
    patches = lf_patches.Patches()
    patches.read_args(lambda args=None: cfg)()

    def continue_training(model, model_args, is_trainable):  # what LLaMA-Factory does with a saved adapter
        return PeftModel.from_pretrained(model, model_args.adapter_name_or_path[0], is_trainable=is_trainable)

    model_args = SimpleNamespace(adapter_name_or_path=[str(saved)], adapter_folder=None, cache_dir=None,
                                 model_revision="main", hf_hub_token=None)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with caplog.at_level("WARNING", logger="llamafactory.rlora_plugin"):
        model = patches.setup_lora_tuning(continue_training)(base, model_args, is_trainable=True)
    config = model.peft_config["default"]
    assert (config.num_heads, config.router_aux_loss_coef) == (N_HEADS, 0.01)
    assert f"num_heads: run {N_HEADS + 1}, saved {N_HEADS}" in caplog.text


def test_aux_loss_asks_for_non_reentrant_checkpointing(lf, tiny, tmp_path):
    """LLaMA-Factory checkpoints reentrantly by default, which would leave the router untrained by the loss."""
    cfg = _train_cfg(tiny, tmp_path, rlora_router_aux_loss_coef=0.01)
    rewritten, run = lf.translate(cfg)
    assert rewritten["use_reentrant_gc"] is False
    assert run.options["router_aux_loss_coef"] == 0.01
    assert lf.translate({**cfg, "use_reentrant_gc": False})[0]["use_reentrant_gc"] is False
    assert "use_reentrant_gc" not in lf.translate({**cfg, "disable_gradient_checkpointing": True})[0]
    assert "use_reentrant_gc" not in lf.translate(_train_cfg(tiny, tmp_path))[0]  # no loss: the user's default


def test_aux_loss_refused_only_in_the_stages_that_drop_it(lf, tiny, tmp_path):
    """`rm` and `ppo` refuse the load-balancing loss (test_config_refused) and train without it; the other stages
    take it."""
    for stage in ("sft", "pt", "dpo", "kto"):
        lf.translate(_train_cfg(tiny, tmp_path, stage=stage, rlora_router_aux_loss_coef=0.01))
    for stage in ("rm", "ppo"):
        lf.translate(_train_cfg(tiny, tmp_path, stage=stage))


def test_train_with_the_aux_loss_trains_a_top1_router(lf, tiny, tmp_path):
    """`rlora_router_aux_loss_coef` in LLaMA-Factory's SFT trainer, with its default gradient checkpointing: with
    top-1 routing the gate is constantly 1, so only the load-balancing loss (added by the model) moves the router,
    and it is logged as `rlora/aux_loss`."""
    out = tmp_path / "out"
    cfg = _train_cfg(tiny, out, rlora_router_top_k=1, rlora_router_aux_loss_coef=0.5, save_steps=STEPS)
    proc = _run(tmp_path, "train", str(_write(tmp_path / "train.yaml", cfg)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Gradient checkpointing enabled" in proc.stdout + proc.stderr
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [r for r in history if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4]
    assert all(r["rlora/aux_loss"] >= 1 - 1e-4 for r in train_logs)  # N * sum f_i P_i >= 1
    routers = {k: v for k, v in _adapter_tensors(out).items() if "rlora_router" in k}
    assert routers and all(v.abs().max() > 0 for v in routers.values())  # moved from its zero init


LLAMAFACTORY_YAMLS = sorted((EXAMPLES / "llamafactory").glob("*.yaml"))


@pytest.mark.parametrize("path", LLAMAFACTORY_YAMLS, ids=lambda path: path.name)
def test_example_config_passes_the_launcher_and_llamafactory(lf, path):
    """Every YAML under examples/llamafactory/: its `rlora_*` keys pass the launcher's checks, and the rewritten
    config passes LLaMA-Factory's own argument parser, which refuses an unknown key (a mistranslated one)."""
    from llamafactory.hparams.parser import _parse_train_args

    cfg = yaml.safe_load(path.read_text())
    out, run = lf.translate(cfg)
    assert cfg["finetuning_type"] == "rlora" and out["finetuning_type"] == "lora"
    rlora = {lf.HOST.rlora_keys()[key]: value for key, value in cfg.items() if key.startswith("rlora_")}
    assert run.options == {**rlora, "init_seed": cfg["seed"]} and rlora
    _, _, training_args, finetuning_args, _ = _parse_train_args({**out, "bf16": False})  # bf16 needs a GPU
    assert (finetuning_args.finetuning_type, finetuning_args.lora_rank) == ("lora", cfg["lora_rank"])
    assert training_args.learning_rate == cfg["learning_rate"]


def test_cpu_example_data_reaches_llamafactory_as_chat_turns(lf):
    """The CPU example's dataset_info.json entry points at the file examples/multitask_data.py writes, and
    LLaMA-Factory's sharegpt converter reads its `messages` rows as user/assistant turns."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    from examples.multitask_data import generate

    cfg = yaml.safe_load((EXAMPLES / "llamafactory" / "cpu-multitask.yaml").read_text())
    (attr,) = get_dataset_list([cfg["dataset"]], str(REPO / cfg["dataset_dir"]))
    assert (REPO / cfg["dataset_dir"] / attr.dataset_name).resolve() == REPO / "examples/.cache/multitask/train.jsonl"
    row = generate(1, 0)[0][0]
    converted = get_dataset_converter(attr.formatting, attr, DataArguments())(row)
    assert converted["_prompt"] == [{"role": "user", "content": row["messages"][0]["content"]}]
    assert converted["_response"] == [{"role": "assistant", "content": row["messages"][1]["content"]}]


@pytest.mark.parametrize(
    "flags", [["--finetuning_type", "rlora"], ["--finetuning_type=rlora"], ["--rlora_num_heads", "3"]]
)
def test_rlora_flags_refused(lf_patches, monkeypatch, flags):
    """`--key value` flags bypass the YAML rewrite: refused by name. Other flags pass (`rlora` in a path)."""
    from llamafactory.hparams import parser

    from rlora_plugin.host import HostConfigError

    read_args = lf_patches.Patches().read_args(parser.read_args)
    monkeypatch.setattr(sys, "argv", ["prog", *flags])
    key, value = flags[0].split("=") if "=" in flags[0] else flags
    message = f"finetuning_type: rlora: `{key}: {value!r}` is a command-line flag, and R-LoRA's settings are read "
    with pytest.raises(HostConfigError, match="Fix: write the settings into CONFIG.yaml") as info:
        read_args()
    assert str(info.value).startswith(message) and "from a YAML or JSON config only" in str(info.value)
    monkeypatch.setattr(sys, "argv", ["prog", "--output_dir", "/runs/rlora", "--finetuning_type", "lora"])
    assert read_args() == ["--output_dir", "/runs/rlora", "--finetuning_type", "lora"]


def test_unknown_version_refused(lf_patches, monkeypatch):
    from rlora_plugin.patching import Checked, HostChanged

    monkeypatch.setattr(Checked, "installed", lambda self: "0.9.6")
    monkeypatch.setattr(lf_patches, "_installed", [])
    with pytest.raises(HostChanged, match=r"as llamafactory 0\.9\.5 has them, which llamafactory 0\.9\.6 does not"):
        lf_patches.install_patches()


def test_every_patch_goes_through_wrap_once(lf_patches, monkeypatch):
    """Each patch fails loudly, naming what is missing, when LLaMA-Factory no longer has the attribute or a
    parameter the wrapper reads (`wrap_once`), before anything is replaced."""
    import importlib

    from rlora_plugin.patching import HostChanged

    monkeypatch.setattr(lf_patches, "_installed", [])
    for module_name, attribute, _, parameters in lf_patches.PATCHES:
        module = importlib.import_module(module_name)
        original = getattr(module, attribute)
        monkeypatch.delattr(module, attribute)
        with pytest.raises(HostChanged, match=rf"needs `{module_name}\.{attribute}`, which llamafactory 0\.9\.5"):
            lf_patches.install_patches()
        monkeypatch.setattr(module, attribute, original, raising=False)
        if parameters:
            monkeypatch.setattr(module, attribute, lambda: None)
            with pytest.raises(HostChanged, match=rf"`{module_name}\.{attribute}` to take the parameter\(s\) '"):
                lf_patches.install_patches()
            monkeypatch.setattr(module, attribute, original)
    assert not lf_patches._installed


def test_misspelled_key_refused_by_the_command(lf, tiny, tmp_path):
    cfg = _write(tmp_path / "bad.yaml", _train_cfg(tiny, tmp_path / "out", rlora_router_topk=2))
    proc = _run(tmp_path, "train", str(cfg))
    assert proc.returncode == 2
    assert "`rlora_router_topk: 2` is not an R-LoRA key. Fix: did you mean `rlora_router_top_k`?" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_saves_an_rlora_adapter_that_reloads_exactly(trained, tiny):
    out = trained["out"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "RLORA"
    assert (config["r"], config["num_heads"], config["lora_alpha"], config["lora_dropout"]) == (RANK, N_HEADS, 8, 0.1)
    assert (config["init_gamma"], config["init_seed"]) == (16.0, 7)
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [r for r in history if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4]
    for record in train_logs:
        assert 0.0 < record["rlora/router_entropy"] <= 1.0
        assert record["rlora/head_load_ratio"] >= 1.0

    reloaded, plain = _reload_logits(tiny, out)
    trained_logits = torch.load(out / "probe_logits.pt")
    torch.testing.assert_close(reloaded, trained_logits, rtol=0, atol=1e-5)
    assert (reloaded - plain).abs().max() > 1e-3  # the adapter trained, so matching it means something


def test_resume_from_checkpoint_matches_the_uninterrupted_run(trained, tiny):
    work, out = trained["work"], trained["out"]
    resumed = work / "resumed"
    cfg = _train_cfg(tiny, resumed, resume_from_checkpoint=str(out / "checkpoint-2"))
    proc = _run(work, "train", str(_write(work / "resume.yaml", cfg)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert _losses(resumed)[STEPS] == pytest.approx(_losses(out)[STEPS], rel=1e-5)
    assert json.loads((resumed / "adapter_config.json").read_text())["peft_type"] == "RLORA"


@pytest.mark.parametrize(("stage", "zero_reward_loss"), [("dpo", math.log(2)), ("kto", 0.5)], ids=["dpo", "kto"])
def test_preference_stage_reference_and_aux_loss(lf, tiny, tmp_path, stage, zero_reward_loss):
    """`stage: dpo` and `kto` ride LLaMA-Factory's LoRA path: no reference model is loaded, the reference is the
    model with the adapter switched off. R-LoRA is exact at init (zero router, offset path), so the first step's
    preference loss is exactly its value at zero reward (DPO: ln 2, KTO: 1/2) and its reward margin 0; then the
    policy moves away from the reference. Their trainers compute the loss from the logits, and the launcher adds
    the load-balancing loss to it (patch 4): the first loss is that value plus coef * `rlora/aux_loss`."""
    coef = 0.5
    rows = [json.loads(line) for line in tiny["alpaca"].read_text().splitlines()[:16]]
    if stage == "dpo":
        rows = [{**r, "chosen": r["output"], "rejected": "I do not know."} for r in rows]
        columns = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}
        dataset = {"ranking": True, "columns": columns}
    else:  # KTO: unpaired answers, each tagged desirable (the dataset's) or not
        for i, row in enumerate(rows):
            row["tag"] = i % 2 == 1
            row["output"] = row["output"] if row["tag"] else "I do not know."
        dataset = {"columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "tag"}}
    pref = tmp_path / "pref.jsonl"
    pref.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / stage
    cfg = _train_cfg(
        tiny, out, stage=stage, dataset="tiny_pref", logging_steps=1, max_steps=3, rlora_router_aux_loss_coef=coef
    )
    (tmp_path / "dataset_info.json").write_text(json.dumps({"tiny_pref": {"file_name": str(pref), **dataset}}))
    proc = _run(tmp_path, "train", str(_write(tmp_path / f"{stage}.yaml", cfg)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = [r for r in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert logs[0]["rlora/aux_loss"] == pytest.approx(1.0, abs=1e-5)  # uniform gates: N * sum f_i P_i = 1
    assert logs[0]["loss"] == pytest.approx(zero_reward_loss + coef * logs[0]["rlora/aux_loss"], abs=1e-5)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert logs[-1]["rewards/margins"] > 1e-4
    assert "rlora/router_entropy" in logs[-1]


def test_chat_loads_the_adapter_by_its_hub_id_unmerged_and_generates(trained, tiny):
    """The adapter as a hub user gets it: by its model-hub id (from the hub cache, offline, as after a
    download). finetuning_type: lora is LLaMA-Factory's default; the adapter's own config says it is R-LoRA."""
    work = trained["work"]
    cache_as_downloaded(trained["out"], "someone/rlora-tiny", work / "hub")
    cfg = inference_cfg(trained, tiny, finetuning_type="lora", max_new_tokens=4, do_sample=False)
    cfg["adapter_name_or_path"] = "someone/rlora-tiny"
    chat = str(_write(work / "chat.yaml", cfg))
    proc = _run(work, "chat", chat, stdin="What color is the cat?\nexit\n", HF_HUB_CACHE=str(work / "hub"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Loaded the R-LoRA adapter someone/rlora-tiny unmerged" in output
    assert "Merged" not in output
    reply = proc.stdout.split("Assistant:", 1)[1].split("User:", 1)[0]
    assert reply.strip(), proc.stdout[-2000:]


@contextmanager
def _serving(work: Path, command: str, cfg: dict, **env: str) -> Iterator[Callable[[urllib.request.Request], bytes]]:
    """`command` (api, webchat) running as a server on `cfg`; yields a function that sends a request once the
    server answers (the first answers only after the model has loaded) and returns the response body."""
    log_file = work / f"{command}.log"
    cmd = [sys.executable, "-m", "rlora_plugin.llamafactory", command, str(_write(work / f"{command}.yaml", cfg))]
    with open(log_file, "w") as log:
        server = subprocess.Popen(cmd, cwd=work, env={**_env(), **env}, stdout=log, stderr=log)

        def send(request: urllib.request.Request) -> bytes:
            deadline = time.monotonic() + TIMEOUT
            while True:
                assert server.poll() is None, log_file.read_text()[-3000:]
                try:
                    return urllib.request.urlopen(request, timeout=60).read()
                except OSError:
                    assert time.monotonic() < deadline, log_file.read_text()[-3000:]
                    time.sleep(1)

        try:
            yield send
        finally:
            server.terminate()
            server.wait(timeout=60)


def test_api_serves_the_adapter_unmerged(trained, tiny):
    work, port = trained["work"], free_port()
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "What color is the cat?"}], "max_tokens": 4}
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with _serving(work, "api", inference_cfg(trained, tiny), API_PORT=str(port)) as send:
        reply = json.loads(send(request))
    assert reply["usage"]["completion_tokens"] > 0
    assert f"Loaded the R-LoRA adapter {trained['out']} unmerged" in (work / "api.log").read_text()


def test_webchat_loads_the_adapter_unmerged(trained, tiny):
    """LLaMA-Factory's web demo loads the model from the config at start-up, through the same adapter path."""
    work, port = trained["work"], free_port()
    env = {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    with _serving(work, "webchat", inference_cfg(trained, tiny), **env) as send:
        page = send(urllib.request.Request(f"http://127.0.0.1:{port}/")).decode()
    assert "LLaMA Factory Web Demo" in page
    log = (work / "webchat.log").read_text()
    assert f"Loaded the R-LoRA adapter {trained['out']} unmerged" in log and "Merged" not in log


def test_export_refused_and_its_fix_works(trained, tiny):
    work = trained["work"]
    cfg = inference_cfg(trained, tiny, finetuning_type="lora", export_dir=str(work / "merged"))
    proc = _run(work, "export", str(_write(work / "export.yaml", cfg)))
    assert proc.returncode == 2
    assert f"finetuning_type: rlora: `adapter_name_or_path: {str(trained['out'])!r}` holds an R-LoRA adapter" in (
        proc.stderr
    )
    assert "cannot be merged" in proc.stderr and "Fix: export it with frozen gates" in proc.stderr
    assert "python -m rlora_plugin.export ADAPTER_DIR OUT_DIR --gates uniform" in proc.stderr
    assert not (work / "merged").exists()

    # The fix: a frozen-gate plain LoRA, which LLaMA-Factory's own export merges.
    plain = work / "plain-lora"
    export = subprocess.run(
        [sys.executable, "-m", "rlora_plugin.export", str(trained["out"]), str(plain), "--gates", "uniform"],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    proc = _run(work, "export", str(_write(work / "export.yaml", {**cfg, "adapter_name_or_path": str(plain)})))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "merged" / "config.json").is_file()
