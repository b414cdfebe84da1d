"""The quality benchmark (benchmarks/quality): its tasks and answers, its data split, the parameter counts
behind "LoRA at equal parameters", the YAML of every method as Axolotl validates it, and (marked `cli`)
the `--quick` pipeline end to end on SmolLM2-135M-Instruct: training through the Axolotl CLI, decoding,
scoring, the table, the plot and the run cache. Accuracy is not asserted: that is the benchmark's result."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from axolotl_validation import CPU, validated
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from benchmarks.quality import __main__ as quality
from benchmarks.quality.__main__ import FULL, QUICK, run_key, write_data
from benchmarks.quality.methods import METHODS, Recipe, target_shapes, training_config
from benchmarks.quality.paired import Contrast, paired_difference, paired_differences
from benchmarks.quality.results import (
    Run,
    compare,
    contrasts,
    environments,
    one_per_line,
    paired_table,
    per_task_table,
    read_runs,
    recorded_runs,
    sweep_table,
)
from benchmarks.quality.scoring import FROZEN, Scores
from benchmarks.quality.tasks import MIXTURE, first_letters, unit_conversion
from benchmarks.speed.counts import equal_param_rank, lora_params, rlora_params
from examples.evaluate import parse_reply
from rlora_plugin import RLoraConfig
from rlora_plugin.axolotl_plugin.args import build_rlora_config

ROOT = Path(__file__).resolve().parent.parent


def test_new_tasks_answer_correctly():
    rng = random.Random(3)
    for _ in range(200):
        prompt, answer = unit_conversion(rng)
        amount, unit = prompt.split()[1:3]
        factor = {"kilometers": 1000, "hours": 60, "minutes": 60, "feet": 12, "weeks": 7}[unit]
        assert int(answer) == int(amount) * factor
        prompt, answer = first_letters(rng)
        words = prompt.split(": ")[1].split(".")[0].split()
        assert len(words) == 4 and answer == " ".join(word[0] for word in words)


@pytest.mark.parametrize("plan", [FULL, QUICK], ids=["full", "quick"])
def test_data_is_deterministic_and_held_out_items_are_unseen(plan, tmp_path):
    train_file, train_files, val, test = write_data(plan, tmp_path / "a")
    again = write_data(plan, tmp_path / "b")
    assert train_file.read_text() == again[0].read_text() and (val, test) == again[2:]
    train_prompts = [json.loads(line)["messages"][0]["content"] for line in train_file.read_text().splitlines()]
    assert len(train_prompts) == len(set(train_prompts)) == plan.train_per_task * len(plan.tasks)
    # The per-task train files (the per-task frozen gates' prompts) split train.jsonl by the task that drew each.
    assert list(train_files) == list(plan.tasks)
    by_task = {task: path.read_text().splitlines() for task, path in train_files.items()}
    assert sorted(sum(by_task.values(), [])) == sorted(train_file.read_text().splitlines())
    for task, rows in by_task.items():
        assert len(rows) == plan.train_per_task
        verbs = {json.loads(row)["messages"][0]["content"].split()[0] for row in rows}  # "Add", "Convert", ...
        assert len(verbs) == 1 and verbs == {item["prompt"].split()[0] for item in test if item["task"] == task}
    held_out = [item["prompt"] for item in val + test]
    assert len(set(held_out)) == len(held_out) and not set(held_out) & set(train_prompts)
    for task in plan.tasks:
        assert sum(item["task"] == task for item in val) == plan.val_per_task
        assert sum(item["task"] == task for item in test) == plan.test_per_task
    assert len(plan.tasks) >= (5 if plan is FULL else 3)


def test_default_methods_are_the_committed_tables():
    """The documented re-derivation (`--reuse benchmarks/results/quality.json`, no `--methods`) covers every
    method the committed records hold, and asks for none they lack."""
    committed = {run.method for run in read_runs(ROOT / "benchmarks/results/quality.json")}
    assert FULL.methods == [key for key in METHODS if key in committed]


def test_run_key_is_the_same_in_another_checkout_and_differs_for_another_config(monkeypatch, tmp_path):
    described = f"base_model: {ROOT}/examples/.cache/model\ndatasets: {tmp_path}/train.jsonl\nlearning_rate: 0.001\n"
    key = run_key(described, tmp_path)
    monkeypatch.setattr(quality, "ROOT", Path("/elsewhere/clone"))
    moved = described.replace(str(ROOT), "/elsewhere/clone").replace(str(tmp_path), "/elsewhere/work")
    assert run_key(moved, Path("/elsewhere/work")) == key
    assert run_key(moved.replace("0.001", "0.002"), Path("/elsewhere/work")) != key


def test_reuse_refuses_a_record_without_its_key(tmp_path):
    old = {"method": "lora", "lr": 0.001, "seed": 0, "trainable_params": 1, "train_seconds": 1.0,
           "scores": {"val": {"average": 0.5}, "test": {"average": 0.5}}}  # fmt: skip
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"runs": [old], "sweep": []}))
    with pytest.raises(SystemExit, match=r"quality.json: lora lr 0.001 recorded without the key of its YAML"):
        read_runs(path)


def test_recorded_only_needs_records(capsys):
    with pytest.raises(SystemExit):
        quality.parse_args(["--recorded-only"])
    assert (
        "--recorded-only writes the tables from records: give them with --reuse QUALITY_JSON" in capsys.readouterr().err
    )


def test_sweep_table_marks_the_rate_chosen_on_validation_and_shows_test_beside_it():
    def run(method: str, lr: float, val: float, test: float) -> Run:
        return Run(method, lr, 0, 1, 1.0, Scores({"average": val}, {"average": test}), f"{method}{lr}")

    sweep = [run("lora", 1e-3, 0.5, 0.9), run("lora", 2e-3, 0.6, 0.4), run("rlora", 2e-3, 0.7, 0.7)]
    assert sweep_table(list(METHODS.values()), sweep) == [
        "| method | lr 0.001 | lr 0.002 |",
        "|---|---|---|",
        "| LoRA, same r | 0.500 (0.900) | **0.600** (0.400) |",
        "| R-LoRA | - | **0.700** (0.700) |",
    ]


ITEMS = [{"task": task, "prompt": f"{task} {i}", "answer": str(i)} for task in ("a", "b") for i in range(20)]


def replies_with(hits: int, task_b_hits: int = 0) -> list[str]:
    """Replies to ITEMS with the first `hits` of task a and the first `task_b_hits` of task b right."""
    return [item["answer"] if int(item["answer"]) < (hits if item["task"] == "a" else task_b_hits) else "x"
            for item in ITEMS]  # fmt: skip


def test_paired_difference_is_zero_for_the_same_replies_and_resolved_for_a_large_gap():
    same = paired_difference([replies_with(10)] * 3, [replies_with(10)] * 2, ITEMS, rounds=500)
    assert (same.mean, same.low, same.high, same.resolved) == (0.0, 0.0, 0.0, False)
    better = paired_difference([replies_with(20, 20)], [replies_with(0, 0)], ITEMS, rounds=500)
    assert (better.mean, better.low, better.high, better.resolved) == (1.0, 1.0, 1.0, True)
    # 4 of 40 items apart, all four won, the other 36 shared: a paired interval above zero (an unpaired one,
    # 0.35 against 0.25 on 40 items, would not be), holding the observed difference; the same on every call.
    close = paired_difference([replies_with(12, 2)], [replies_with(10)], ITEMS, rounds=2000)
    assert close.mean == pytest.approx(0.1) and 0.0 < close.low <= 0.1 <= close.high and close.resolved
    assert close == paired_difference([replies_with(12, 2)], [replies_with(10)], ITEMS, rounds=2000)
    # Seeds are resampled: two seeds that disagree widen the interval beyond the one seed's.
    spread = paired_difference([replies_with(12, 2), replies_with(4)], [replies_with(10)], ITEMS, rounds=2000)
    assert spread.high - spread.low > close.high - close.low
    # Two scorings of the same runs (a frozen-gate export and its routed adapter): the seeds are resampled
    # together, so runs far apart do not widen the interval of a difference that is the same in every run.
    runs, shifted = [replies_with(4), replies_with(14)], [replies_with(10), replies_with(20)]
    independent = paired_difference(shifted, runs, ITEMS, rounds=2000)
    same = paired_difference(shifted, runs, ITEMS, same_runs=True, rounds=2000)
    assert same.mean == independent.mean == pytest.approx(0.15)
    assert same.resolved and not independent.resolved and same.high - same.low < independent.high - independent.low
    with pytest.raises(ValueError, match="same_runs needs as many runs on each side, not 1 and 2"):
        paired_difference(shifted[:1], runs, ITEMS, same_runs=True)


def run_with(method: str, seed: int, test_replies: list[str]) -> Run:
    replies = {"val": test_replies, "test": test_replies}
    return Run(method, 1e-3, seed, 1, 1.0, Scores.derived(replies, ITEMS, ITEMS), f"{method}{seed}")


def test_records_keep_every_reply_and_the_accuracies_derive_from_them(tmp_path):
    run = run_with("lora", 0, replies_with(10, 5))
    assert run.scores.test == {"a": 0.5, "b": 0.25, "average": 0.375}
    record = {"val_items": ITEMS, "test_items": ITEMS, "runs": [asdict(run)], "sweep": []}
    record["runs"][0]["scores"]["test"]["average"] = 0.99  # a stored aggregate is not what the table uses
    path = tmp_path / "quality.json"
    path.write_text(one_per_line(record))
    lines = path.read_text().splitlines()
    assert sum(line.startswith('{"task"') for line in lines) == 2 * len(ITEMS)  # one line per item and per run
    assert sum(line.startswith('{"method"') for line in lines) == 1 and '"sweep": []' in lines
    [read] = read_runs(path)
    assert read.scores.test["average"] == 0.375 and read.scores.replies == run.scores.replies
    # The same run recorded again without replies (a sweep record from before they were kept), in the same file
    # or another: the record with replies is the one reused, whatever the order.
    aggregates_only = {**asdict(run), "scores": {**asdict(run)["scores"], "replies": None}}
    older = tmp_path / "older.json"
    older.write_text(one_per_line({**record, "runs": [], "sweep": [aggregates_only]}))
    path.write_text(one_per_line({**record, "sweep": [aggregates_only]}))
    for order in ([path], [older, path], [path, older]):
        assert recorded_runs(order)["lora0"].scores.replies == run.scores.replies


def test_paired_table_compares_each_trained_method_with_rlora():
    runs = [run_with("base", 0, replies_with(0)), run_with("lora", 0, replies_with(20, 20)),
            *(run_with("rlora", seed, replies_with(10, 10)) for seed in (0, 1))]  # fmt: skip
    named = contrasts(["a", "b"])
    lines = paired_table(compare(list(METHODS.values()), runs, ITEMS, named))
    assert lines[:2] == ["| method | seeds | minus R-LoRA | 95% interval | resolved |", "|---|---|---|---|---|"]
    assert lines[2:] == ["| LoRA, same r | 1 | +0.500 | +0.350 to +0.650 | yes |"]  # base is not compared
    assert compare(list(METHODS.values()), runs[:2], ITEMS, named) == []  # no R-LoRA run: nothing to compare with


def test_contrasts_measure_each_task_and_whether_a_conflicting_pair_differs_from_the_rest():
    # A method that wins 8 items of task a over the reference and is level on task b: half of that on average,
    # all of it on a; with a as the "conflicting" group, the pair's gain less the others' is a's whole gain.
    named = contrasts(["a", "b"], conflicting=("a",))
    assert list(named) == ["average", "a", "b", "the conflicting pair", "the other tasks", "pair minus the others"]
    assert named["pair minus the others"] == Contrast(("a",), minus=("b",))
    diffs = paired_differences([replies_with(18, 5)], [replies_with(10, 5)], ITEMS, named, rounds=2000)
    assert diffs["average"].mean == pytest.approx(0.2) and diffs["a"].mean == pytest.approx(0.4)
    assert diffs["b"] == paired_differences([replies_with(18, 5)], [replies_with(10, 5)], ITEMS, named)["b"]
    assert (diffs["b"].mean, diffs["b"].low, diffs["b"].high) == (0.0, 0.0, 0.0)
    assert diffs["the conflicting pair"] == diffs["a"] and diffs["pair minus the others"].mean == pytest.approx(0.4)
    assert diffs["a"].resolved and diffs["pair minus the others"].resolved and not diffs["b"].resolved
    # The average is the one paired_difference measures, on the same draws.
    assert diffs["average"] == paired_difference([replies_with(18, 5)], [replies_with(10, 5)], ITEMS, rounds=2000)
    assert list(contrasts(["a", "b"], conflicting=("a", "b"))) == ["average", "a", "b"]  # no other tasks: no groups


def test_per_task_table_has_a_row_per_contrast_and_the_references_own_accuracy():
    runs = [run_with("lora", 0, replies_with(18, 5)), run_with("rlora", 0, replies_with(10, 5))]
    named = contrasts(["a", "b"], conflicting=("a",))
    lines = per_task_table(compare(list(METHODS.values()), runs, ITEMS, named), runs, named)
    assert lines[0] == "| task | R-LoRA | LoRA, same r |" and len(lines) == 2 + 5
    assert lines[2].startswith("| a | 0.50 | **+0.40** (") and lines[3] == "| b | 0.25 | +0.00 (+0.00, +0.00) |"
    assert lines[4].startswith("| the conflicting pair | 0.50 | **+0.40** (")
    assert lines[6].startswith("| pair minus the others | +0.25 | **+0.40** (")


def test_the_header_says_where_the_runs_were_made_not_where_the_table_is_written():
    here, there = ["- CPU: A", "- axolotl 1"], ["- CPU: B", "- axolotl 2"]
    runs = [run_with("lora", seed, replies_with(1)) for seed in range(3)]
    for run, made in zip(runs, (here, here, there), strict=True):
        run.environment = made
    assert environments(runs[:2]) == here
    assert environments(runs) == ["- 2 runs: CPU: A; axolotl 1", "- 1 run: CPU: B; axolotl 2"]
    runs[2].environment = None  # recorded before environments were kept
    assert environments(runs)[1] == "- 1 run: environment not recorded"


def test_reply_parsing():
    assert parse_reply(" 42.\nmore text") == "42"
    assert parse_reply("a r s c") == "a r s c"
    assert parse_reply("\n\n") == ""


def test_parameter_counts_match_peft(tiny):
    """The counts behind the table's 'trainable params' and the equal-parameter LoRA rank are the ones PEFT
    really trains, on the tiny Llama's MLP layers."""
    shapes = target_shapes(tiny["model"])
    assert len(shapes) == 3 * 2  # gate/up/down in both layers
    targets = ["gate_proj", "up_proj", "down_proj"]
    rlora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["model"]), RLoraConfig(r=4, num_heads=3, target_modules=targets)
    )
    assert rlora.get_nb_trainable_parameters()[0] == sum(rlora_params(i, o, 4, 3) for i, o in shapes)
    rank = equal_param_rank(shapes, 4, 3)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny["model"]), LoraConfig(r=rank, target_modules=targets)
    )
    assert lora.get_nb_trainable_parameters()[0] == sum(lora_params(i, o, rank) for i, o in shapes)
    # SmolLM2-135M's MLP shapes at the benchmark's r=8, N=5: LoRA rank 29 has the closest count.
    assert equal_param_rank([(576, 1536), (576, 1536), (1536, 576)], 8, 5) == 29
    # Each method's rank: the benchmark's r, the equal-parameter rank, or its own (LoRA at r=64, whatever r is).
    smollm2 = [(576, 1536), (576, 1536), (1536, 576)]
    ranks = {key: quality.rank_and_params(METHODS[key], smollm2, 8, 5)[0] for key in ("lora", "lora_eq", "lora_r64")}
    assert ranks == {"lora": 8, "lora_eq": 29, "lora_r64": 64}
    r64, rlora_size = (quality.rank_and_params(METHODS[key], shapes, 4, 3) for key in ("lora_r64", "rlora"))
    assert r64 == (64, sum(lora_params(i, o, 64) for i, o in shapes))
    assert rlora_size == (4, rlora.get_nb_trainable_parameters()[0])


def test_every_method_config_is_valid_axolotl_with_its_ablation_switches(tiny, tmp_path):
    recipe = Recipe(tiny["model"], tiny["chat"], tmp_path / "prepared")
    # the ablation ladder of docs/method.md#hydralora-and-plain-lora-from-the-same-options, HydraLoRA to R-LoRA
    expected = {
        "hydralora": ("zero", "shared", "zero"),
        "hydralora_kaiming": ("zero", "shared", "kaiming"),
        "hydralora_mhd": ("zero", "per_head", "zero"),
        "hydralora_init": ("random", "shared", "zero"),
        "rlora": ("random", "per_head", "zero"),
    }
    for key, method in METHODS.items():
        if method.adapter is None:
            continue
        cfg = validated(training_config(method, recipe, 8, 1e-3, 0, tmp_path / key), CPU)
        assert cfg.adapter == method.adapter and cfg.plugins == ["rlora_plugin.RLoraPlugin"]
        assert cfg.lora_alpha == 2 * cfg.lora_r
        if method.multi_head:
            peft = build_rlora_config(cfg)
            assert (peft.init, peft.head_dropout, peft.router_init, peft.num_heads) == (*expected[key], 5)
    assert set(MIXTURE) >= set(QUICK.tasks)


@pytest.mark.cli
def test_quick_benchmark_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(out), "--work-dir", str(work),
               "--methods", "base", "lora", "rlora"]  # fmt: skip
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    runs = json.loads((out / "quality.json").read_text())["runs"]
    assert [run["method"] for run in runs] == ["base", "lora", "rlora"]
    table = (out / "quality.md").read_text()
    # Each trained run records where it was made, and the header says so; a row per task against R-LoRA.
    assert runs[1]["environment"] == runs[2]["environment"] and runs[1]["environment"][0].startswith("- CPU: ")
    assert "\n".join(runs[1]["environment"]) in table
    assert all(f"\n| {task} | " in table.split("### Per task")[1] for task in QUICK.tasks)
    assert set(runs[0]["scores"]["test"]) == {*QUICK.tasks, "average"}
    for run in runs[1:]:
        assert set(run["scores"]["test"]) == {*QUICK.tasks, "average"}
        assert all(0.0 <= value <= 1.0 for value in run["scores"]["test"].values())
        run_dir = work / "quick" / "runs" / f"{run['method']}-lr0.001-seed0"
        config = (run_dir / "config.yml").read_text()
        assert "rlora_plugin.RLoraPlugin" in config and f"adapter: {run['method']}" in config
        adapter = run_dir / "adapter"
        peft_type = json.loads((adapter / "adapter_config.json").read_text())["peft_type"]
        assert peft_type == {"lora": "LORA", "rlora": "RLORA"}[run["method"]]
        saved = load_file(adapter / "adapter_model.safetensors")
        trained = sum(t.numel() for name, t in saved.items() if "offset" not in name)
        assert run["trainable_params"] == trained
        label = METHODS[run["method"]].label
        assert f"| {label} | 0.001 | {trained:,} |" in table
    assert runs[1]["scores"]["head_cos_b"] is None
    assert -1.0 <= runs[2]["scores"]["head_cos_ba"] <= 1.0
    # R-LoRA is also scored with its gates frozen as the export freezes them; LoRA has no gates.
    assert runs[1]["scores"]["frozen"] is None
    frozen = runs[2]["scores"]["frozen"]
    assert set(frozen) == set(FROZEN)
    for variant, label in FROZEN.items():
        assert set(frozen[variant]) == {*QUICK.tasks, "average"}
        assert all(0.0 <= value <= 1.0 for value in frozen[variant].values())
        assert f"| R-LoRA, exported ({label}) | 0.001 | - |" in table
    assert (out / "quality.png").stat().st_size > 10_000

    def written() -> dict:  # training logs and the base model's scores
        return {
            path: path.stat().st_mtime for pattern in ("*/train.log", "base-*.json") for path in runs_dir.glob(pattern)
        }

    runs_dir = work / "quick" / "runs"
    before = written()
    assert len(before) == 3
    # Every test item's reply is recorded, R-LoRA's also under each frozen-gate variant.
    recorded = json.loads((out / "quality.json").read_text())
    assert [item["prompt"] for item in recorded["test_items"]] == [
        item["prompt"] for item in write_data(QUICK, tmp_path / "d")[3]
    ]
    for run in runs:
        assert {split: len(r) for split, r in run["scores"]["replies"].items()} == {
            "val": len(recorded["val_items"]), "test": len(recorded["test_items"]),
            **({variant: len(recorded["test_items"]) for variant in FROZEN} if run["method"] == "rlora" else {}),
        }  # fmt: skip
    # A run cached before replies were kept is decoded again, without retraining.
    cached = runs_dir / "rlora-lr0.001-seed0" / "scores.json"
    cached.write_text(json.dumps({**json.loads(cached.read_text()), "replies": None}))
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert written() == before  # cached: not retrained, the base model not decoded again
    assert json.loads((out / "quality.json").read_text())["runs"] == runs
    assert json.loads(cached.read_text())["replies"] == runs[2]["scores"]["replies"]

    # Another checkout, with nothing cached: --reuse takes the recorded runs instead of training them.
    elsewhere = tmp_path / "elsewhere"
    reuse = [*command, "--reuse", str(out / "quality.json")]
    reuse[reuse.index(str(out))], reuse[reuse.index(str(work))] = str(elsewhere), str(tmp_path / "empty")
    third = subprocess.run(reuse, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("recorded in --reuse") == 2 and not list((tmp_path / "empty").glob("quick/runs/*"))
    assert json.loads((elsewhere / "quality.json").read_text())["runs"] == runs
