"""`python -m rlora_plugin.lm_eval`: lm-evaluation-harness's own CLI scores a local task with the base model plus
the routed R-LoRA adapter (`--model_args pretrained=BASE,peft=ADAPTER`), exactly as PeftModel does in this
process; and Axolotl's LMEvalPlugin, whose `lm_eval` subprocess cannot load an R-LoRA adapter, is refused at
config validation with that command.

lm_eval is a dependency of Axolotl (0.19 and 0.21 pin 0.4.11), so these run in the Axolotl venvs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from axolotl_validation import PLUGIN, make_cfg, validated
from peft import PeftModel, get_peft_model
from pydantic import ValidationError
from tiny_models import perturb
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.tiny_assets import write_jsonl
from examples.evaluate import parse_reply
from examples.multitask_data import generate
from rlora_plugin import RLoraConfig
from rlora_plugin.axolotl_plugin.args import LM_EVAL_PLUGIN
from rlora_plugin.lm_eval import INSTALL_FIX, command, main

TASK = "rlora_tiny_colors"
CHOICES = ["red", "green", "blue"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse"]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def evaluation(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny base model, a perturbed (as if trained) R-LoRA adapter on it, and a local multiple-choice task."""
    root = tmp_path_factory.mktemp("lm_eval")
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    config = RLoraConfig(target_modules=targets, r=4, num_heads=3, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["model"]), config)
    perturb(model)
    model.save_pretrained(root / "adapter")
    rows = [
        {"question": f"What color is the {animal}?", "choices": CHOICES, "answer": i % len(CHOICES)}
        for i, animal in enumerate(ANIMALS)
    ]
    data = write_jsonl(root / "colors.jsonl", rows)
    (root / "tasks").mkdir()
    (root / "tasks" / "colors.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return {"base": tiny["model"], "adapter": root / "adapter", "tasks": root / "tasks"}


def run_lm_eval(shell_command: str, evaluation: dict[str, Path], out: Path) -> dict:
    """`shell_command` (`python -m rlora_plugin.lm_eval ...`) run in a fresh process on the local task, with
    lm_eval's per-sample log: the loglikelihood of each choice of each doc, and the task's accuracy."""
    argv = [sys.executable, *shlex.split(shell_command)[1:]]
    argv += ["--tasks", TASK, "--include_path", str(evaluation["tasks"]), "--device", "cpu", "--batch_size", "4"]
    argv += ["--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(argv, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (samples,) = out.glob(f"*/samples_{TASK}_*.jsonl")
    (results,) = out.glob("*/results_*.json")
    docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
    return {
        "docs": docs,
        "loglikelihoods": torch.tensor([[float(ll) for ll, _ in doc["filtered_resps"]] for doc in docs]),
        "acc": json.loads(results.read_text())["results"][TASK]["acc,none"],
    }


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, tokenizer, docs: list[dict]) -> torch.Tensor:
    """The log-probability of each continuation lm_eval scored after its context, computed here: the
    continuation's tokens are those that context + continuation has beyond the context (lm_eval's rule)."""
    table = []
    for doc in docs:
        row = []
        for request in doc["arguments"].values():
            context = tokenizer.encode(request["arg_0"])
            whole = tokenizer.encode(request["arg_0"] + request["arg_1"])
            assert whole[: len(context)] == context
            logprobs = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
            row.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        table.append(row)
    return torch.tensor(table)


@pytest.mark.cli
def test_lm_eval_cli_scores_the_base_model_with_the_routed_adapter(evaluation, tmp_path):
    base, adapter = str(evaluation["base"]), str(evaluation["adapter"])
    base_run = run_lm_eval(f"python -m rlora_plugin.lm_eval --model hf --model_args pretrained={base}",
                           evaluation, tmp_path / "base")  # fmt: skip
    adapter_run = run_lm_eval(command(base, adapter), evaluation, tmp_path / "adapter")
    assert [d["doc"] for d in adapter_run["docs"]] == [d["doc"] for d in base_run["docs"]]

    tokenizer = AutoTokenizer.from_pretrained(base)
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    expected_base = loglikelihoods(base_model, tokenizer, base_run["docs"])
    routed = PeftModel.from_pretrained(base_model, adapter).eval()
    expected = loglikelihoods(routed, tokenizer, adapter_run["docs"])

    # the reference reproduces lm_eval's scoring (base), and lm_eval's model is base + the routed adapter
    torch.testing.assert_close(base_run["loglikelihoods"], expected_base, atol=1e-5, rtol=0)
    torch.testing.assert_close(adapter_run["loglikelihoods"], expected, atol=1e-5, rtol=0)
    assert (expected - expected_base).abs().max() > 1e-2, "the adapter changes no score: was it applied?"
    answers = torch.tensor([d["doc"]["answer"] for d in adapter_run["docs"]])
    assert adapter_run["acc"] == pytest.approx(float((expected.argmax(-1) == answers).float().mean()))


@pytest.mark.cli
def test_axolotl_lm_eval_plugin_command_cannot_load_the_adapter(evaluation, tmp_path):
    """What the refusal below says: the command Axolotl's LMEvalPlugin builds for an output directory is lm_eval's
    own `lm_eval` with `pretrained=OUTPUT_DIR`, and on an R-LoRA adapter's directory it fails."""
    from axolotl.integrations.lm_eval.cli import build_lm_eval_command

    adapter = str(evaluation["adapter"])
    (argv,) = build_lm_eval_command([TASK], bfloat16=False, output_dir=adapter, batch_size=4)
    assert argv[:5] == ["lm_eval", "--model", "hf", "--model_args", f"pretrained={adapter},dtype=float16"]
    argv = [str(Path(sys.executable).with_name("lm_eval")), *argv[1:]]
    argv += ["--include_path", str(evaluation["tasks"]), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "Unrecognized model" in run.stderr, run.stdout[-3000:] + run.stderr[-5000:]


def test_the_example_task_loads_offline_and_scores_as_the_example_does(monkeypatch):
    """examples/lm_eval (docs/evaluation.md): lm_eval loads the task from the repository root with no network;
    its items are the CPU example's held-out items (examples/multitask_data.py's test.jsonl at its default sizes),
    and a reply's first line scores as examples/evaluate.py scores it. The full lm_eval run on the tiny model takes
    over 20 s, so it is not repeated here (the `cli` test above runs lm_eval with an adapter)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the task's `data_files` is relative to the repository root
    manager = TaskManager(include_path=str(root / "examples" / "lm_eval"))
    task = get_task_dict(["rlora_multitask"], manager)["rlora_multitask"]
    docs = list(task.test_docs())
    assert docs == generate(train_per_task=64, test_per_task=12)[1]
    assert [task.doc_to_text(d) for d in docs] == [d["prompt"] for d in docs]
    assert task.config.generation_kwargs["until"] == ["\n"]  # lm_eval stops at the first line, parse_reply keeps it
    doc = docs[0]
    for reply in (doc["answer"], f"{doc['answer']}.", f" {doc['answer']} ", f"{doc['answer']}0", "", "The answer"):
        expected = float(parse_reply(reply) == doc["answer"])
        assert task.process_results(doc, [reply.strip()]) == {"exact_match": expected}, reply  # .strip(): its filter


def test_missing_lm_eval_names_the_install_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lm_eval.__main__", raising=False)
    with pytest.raises(SystemExit) as info:
        main()
    assert f"Fix: `{INSTALL_FIX}`" in str(info.value)


def lm_eval_cfg(tiny, **overrides) -> dict:
    overrides = {"plugins": [PLUGIN, LM_EVAL_PLUGIN], "lm_eval_tasks": ["arc_easy", "hellaswag:10"], **overrides}
    return make_cfg(tiny, **overrides)


def test_axolotl_lm_eval_plugin_after_training_is_refused_with_the_command(tiny):
    """Axolotl's LMEvalPlugin would run `lm_eval --model hf --model_args pretrained=OUTPUT_DIR,...`, which cannot
    load an R-LoRA adapter: refused at validation, naming the key, and giving the command for each few-shot
    group of `lm_eval_tasks`."""
    from axolotl.integrations.lm_eval import LMEvalArgs, LMEvalPlugin

    assert f"{LMEvalPlugin.__module__}.{LMEvalPlugin.__name__}" == LM_EVAL_PLUGIN  # the names the refusal reads
    assert {"lm_eval_tasks", "lm_eval_post_train", "lm_eval_batch_size"} <= set(LMEvalArgs.model_fields)
    with pytest.raises((ValidationError, ValueError)) as info:
        validated(lm_eval_cfg(tiny, lm_eval_batch_size=2))
    message = str(info.value)
    assert "adapter: rlora: `lm_eval_tasks: ['arc_easy', 'hellaswag:10']` is not supported" in message
    assert "Fix: set `lm_eval_post_train: false`" in message
    output = "--output_path /tmp/rlora-unused-output/lm_eval_results"
    zero_shot = command(str(tiny["model"]), "/tmp/rlora-unused-output", ["--tasks", "arc_easy", "--batch_size", "2"])
    ten_shot = command(str(tiny["model"]), "/tmp/rlora-unused-output",
                       ["--tasks", "hellaswag", "--batch_size", "2", "--num_fewshot", "10"])  # fmt: skip
    assert f"`{zero_shot} {output} ; {ten_shot} {output}`" in message


@pytest.mark.parametrize(
    "overrides",
    [dict(lm_eval_post_train=False), dict(lm_eval_tasks=[]), dict(plugins=[PLUGIN])],
    ids=["not-after-training", "no-tasks", "no-lm-eval-plugin"],
)
def test_axolotl_lm_eval_plugin_that_runs_nothing_is_accepted(tiny, overrides):
    cfg = lm_eval_cfg(tiny, **overrides)
    if "plugins" in overrides:
        del cfg["lm_eval_tasks"]
    assert validated(cfg).adapter == "rlora"
