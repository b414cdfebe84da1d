"""`--tuner_type rlora` in ms-swift 4.6 (rlora_plugin.ms_swift), real `swift` CLI runs on a tiny local Llama, on CPU.

Runs only in a venv with ms-swift (`scripts/run-tests.sh ms-swift-4.6.0`), selected by its marker:
`python -m pytest -m ms_swift tests/test_ms_swift.py` (conftest.py leaves these tests out of any other selection).
- `swift sft` trains and saves the PEFT adapter every host writes: RLORA, ms-swift's LoRA arguments and
  `--model_kwargs` options in its config, its `all-linear` targets, the router metrics and the load-balancing loss
  in the log; a plain `PeftModel.from_pretrained` reload reproduces the trained model's logits;
- `--resume_from_checkpoint` reproduces the uninterrupted run's last loss;
- `swift infer --adapters CKPT` (no plugin flag: ms-swift reloads it from the checkpoint's args.json) answers as
  PEFT's routed greedy `generate` does, and not as the base does;
- `swift export --merge_lora true` is refused before the model loads (and the fix it names merges), a misspelled
  option too, with no traceback.
DPO and the refusals of each argument: tests/test_ms_swift_args.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ms_swift

REPO = Path(__file__).resolve().parent.parent
N_HEADS, RANK, ALPHA, SEED, STEPS = 3, 4, 8, 7, 4
PROBE_IDS = [[5, 17, 42, 9, 23, 11, 30, 7]]
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TIMEOUT = 600

# A second plugin file, as a user's own: `--callbacks probe` saves the trained model's logits on PROBE_IDS at train
# end (the model in memory, before any reload).
PROBE_PLUGIN = f"""
import torch
from swift.callbacks import callbacks_map
from transformers import TrainerCallback


class Probe(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({PROBE_IDS})).logits, args.output_dir + "/probe_logits.pt")


callbacks_map["probe"] = lambda args, trainer: Probe()
"""


def swift(work: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`swift ARGS` in `work`, offline, its output kept in a log file next to the outputs."""
    environ = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "MODELSCOPE_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **env,
    }
    proc = subprocess.run(
        ["swift", *args], cwd=work, env=environ, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    (work / f"{args[0]}-{len(list(work.glob('*.log')))}.log").write_text(proc.stdout + proc.stderr)
    return proc


def plugin() -> str:
    return subprocess.run(
        [sys.executable, "-m", "rlora_plugin.ms_swift"], capture_output=True, text=True, check=True
    ).stdout.strip()


def sft_args(tiny: dict, output_dir: Path, *extra: str, plugins: tuple[str, ...] = ()) -> list[str]:
    """An ordinary ms-swift LoRA command line with `--tuner_type rlora` and R-LoRA's options in --model_kwargs."""
    return [
        "sft",
        "--tuner_type", "rlora",
        "--external_plugins", plugin(), *plugins,
        "--model", str(tiny["model"]),
        "--model_type", "llama",
        "--template", "chatml",
        "--dataset", str(tiny["chat"]),
        "--torch_dtype", "float32",
        "--lora_rank", str(RANK),
        "--lora_alpha", str(ALPHA),
        "--model_kwargs", json.dumps({"rlora_num_heads": N_HEADS, "rlora_router_aux_loss_coef": 0.01}),
        "--gradient_checkpointing", "false",
        "--callbacks", "rlora_metrics", *(["probe"] if plugins else []),
        "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "4",
        "--max_steps", str(STEPS),
        "--save_steps", "2",
        "--logging_steps", "1",
        "--seed", str(SEED),
        "--split_dataset_ratio", "0",
        "--dataloader_num_workers", "0",
        "--dataset_num_proc", "1",
        "--report_to", "none",
        "--output_dir", str(output_dir),
        "--add_version", "false",
        *extra,
    ]  # fmt: skip


def train_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return {r["step"]: r["loss"] for r in history if "loss" in r}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> dict:
    """One `swift sft` run, with a checkpoint every 2 steps and the probe plugin."""
    work = tmp_path_factory.mktemp("swift_sft")
    (work / "probe.py").write_text(PROBE_PLUGIN)
    out = work / "out"
    proc = swift(work, *sft_args(tiny, out, plugins=(str(work / "probe.py"),)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"work": work, "out": out, "ckpt": out / f"checkpoint-{STEPS}"}


def test_sft_saves_the_peft_adapter_every_host_writes(trained, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import rlora_plugin  # noqa: F401  registers RLORA with PEFT

    config = json.loads((trained["ckpt"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "RLORA"
    assert (config["r"], config["lora_alpha"], config["num_heads"]) == (RANK, ALPHA, N_HEADS)
    assert (config["init_seed"], config["router_aux_loss_coef"]) == (SEED, 0.01)
    assert set(config["target_modules"]) == ALL_LINEAR  # ms-swift's own `all-linear` expansion
    assert config["base_model_name_or_path"] == str(Path(tiny["model"]).resolve())
    assert "R-LoRA" in (trained["ckpt"] / "README.md").read_text()

    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained["ckpt"]).eval()
    with torch.no_grad():
        reloaded = model(input_ids=torch.tensor(PROBE_IDS)).logits
        with model.disable_adapter():
            plain = model(input_ids=torch.tensor(PROBE_IDS)).logits
    probe = torch.load(trained["out"] / "probe_logits.pt")
    torch.testing.assert_close(reloaded, probe, rtol=0, atol=1e-5)
    assert (reloaded - plain).abs().max() > 1e-2  # the trained adapter changes the model


def test_sft_logs_router_metrics_and_load_balancing_loss(trained):
    records = [json.loads(line) for line in (trained["out"] / "logging.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "global_step/max_steps" in r]
    assert len(train) == STEPS
    for record in train:
        assert 0 < float(record["rlora/router_entropy"]) <= 1
        assert float(record["rlora/aux_loss"]) >= 1 - 1e-3  # N * sum_i f_i P_i >= 1, 1 when balanced


def test_resume_reproduces_the_uninterrupted_run(trained, tiny):
    out = trained["work"] / "resumed"
    resume = ("--resume_from_checkpoint", str(trained["out"] / "checkpoint-2"))
    proc = swift(trained["work"], *sft_args(tiny, out, *resume))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed, uninterrupted = train_losses(out), train_losses(trained["out"])
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-2 from the checkpoint's log, 3-4 trained again
    assert resumed[STEPS] == pytest.approx(uninterrupted[STEPS], abs=1e-6)


def test_infer_routes_without_a_plugin_flag(trained, tiny):
    """`swift infer --adapters CKPT` answers each prompt as PEFT's routed greedy generate of the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlora_plugin  # noqa: F401

    result = trained["work"] / "infer.jsonl"
    args = ["--val_dataset", f"{tiny['chat']}#4", "--max_new_tokens", "8", "--result_path", str(result)]
    proc = swift(trained["work"], "infer", "--adapters", str(trained["ckpt"]), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    replies = [json.loads(line) for line in result.read_text().splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained["ckpt"]).eval()
    routed, plain = [], []
    for reply in replies:
        query = reply["messages"][0]["content"]
        chatml = f"{tokenizer.bos_token}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"  # ms-swift's
        ids = tokenizer(chatml, add_special_tokens=False, return_tensors="pt").input_ids
        for answers, adapter in ((routed, True), (plain, False)):
            with torch.no_grad(), nullcontext() if adapter else model.disable_adapter():
                new = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
            answers.append(tokenizer.decode(new, skip_special_tokens=True))
    assert [r["response"] for r in replies] == routed
    assert routed != plain


def test_export_merge_is_refused_and_its_fix_merges(trained, tiny):
    """`swift export --merge_lora true` is refused before the model loads; the fix it names (the frozen-gate export,
    then ms-swift's own merge of that plain LoRA) works."""
    work = trained["work"]
    proc = swift(work, "export", "--adapters", str(trained["ckpt"]), "--merge_lora", "true")
    assert proc.returncode != 0
    assert "--tuner_type rlora: `merge_lora: True` is not supported" in proc.stderr
    assert "(`python -m rlora_plugin.export CKPT OUT --gates uniform`) and merge that with `swift export" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(work.rglob("*-merged"))

    plain = work / "plain-lora"
    export = [sys.executable, "-m", "rlora_plugin.export", str(trained["ckpt"]), str(plain), "--gates", "uniform"]
    subprocess.run(export, check=True, capture_output=True, timeout=TIMEOUT)
    base = ("--model", str(tiny["model"]), "--model_type", "llama", "--template", "chatml")  # not auto-matched
    proc = swift(work, "export", *base, "--adapters", str(plain), "--merge_lora", "true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = next(work.glob("*-merged"))  # ms-swift names it after the base model, in the working directory
    assert (merged / "model.safetensors").exists()


def test_misspelled_option_is_refused_before_the_model_loads(tiny, tmp_path):
    args = sft_args(tiny, tmp_path / "out")
    args[args.index("--model_kwargs") + 1] = json.dumps({"rlora_num_head": 3})
    proc = swift(tmp_path, *args)
    assert proc.returncode != 0
    assert "error: --tuner_type rlora: `rlora_num_head: 3` is not an R-LoRA key. Fix: did you mean " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "model_info" not in proc.stdout + proc.stderr  # nothing of the model was read
