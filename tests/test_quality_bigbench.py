"""The quality benchmark's BIG-bench mixture (benchmarks/quality/bigbench.py) on a tiny fake sdist of a few
task files, so nothing is downloaded: the loader formats prompts as BIG-bench does, the rule keeps and drops
what it says, the splits are fixed and disjoint, and `--mixture bigbench --quick` writes its data from the
tarball it is given."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from benchmarks.quality import bigbench
from benchmarks.quality.__main__ import BIGBENCH, BIGBENCH_QUICK, FULL, write_data
from benchmarks.quality.bigbench import Rule, choose, download, read_task, split, task_names, tasks_from, usable_items

ROOT = Path(__file__).resolve().parent.parent


def arithmetic(name: str, offset: int, count: int) -> dict:
    """A modified_arithmetic-like task: the same prompts for every offset, the answer a*b + offset."""
    examples = [{"input": f"{a} * {b} ->", "target": str(a * b + offset)} for a in range(10, 99) for b in (3, 7)]
    return {"name": name, "metrics": ["exact_str_match"], "keywords": ["arithmetic"], "examples": examples[:count],
            "example_input_prefix": "", "example_output_prefix": " "}  # fmt: skip


def fake_sdist(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**tasks, "modified_arithmetic": {"name": "a family's own task.json"}}.items():
            raw = json.dumps(data).encode()
            member = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            member.size = len(raw)
            tar.addfile(member, io.BytesIO(raw))
        readme = tarfile.TarInfo("bigbench-1.0.0/README.md")
        tar.addfile(readme, io.BytesIO(b""))
    return path


PAIR = {name: arithmetic(name, offset, 178) for name, offset in zip(BIGBENCH_QUICK.tasks, (0, 1), strict=True)}


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny["model"])


def test_tasks_are_read_from_the_tarball_as_bigbench_formats_them(tmp_path):
    other = {
        "name": "qa", "metrics": ["exact_str_match"], "keywords": ["memorization"], "task_prefix": "Answer.\n",
        "examples": [
            {"input": "2 + 2?", "target": ["four", "4"]},  # a list: the first target is the answer
            {"input": "pick one", "target": "a", "target_scores": {"a": 1, "b": 0}},  # multiple choice: left out
            {"input": "a sentence", "target": "Ends with a period."},  # never an exact match of a parsed reply
            {"input": "two lines", "target": "one\ntwo"},
        ],
    }  # fmt: skip
    tasks_dir = tasks_from(fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {**PAIR, "qa": other}))
    assert tasks_dir == tmp_path / "tasks" and (tasks_dir / ".extracted").exists()
    assert task_names(tasks_dir) == sorted(["modified_arithmetic", *PAIR, "qa"])
    qa = read_task(tasks_dir, "qa")
    assert qa.items == (("Answer.\n\nQ: 2 + 2?\nA:", "four"),) and qa.examples == 4  # BIG-bench's default prefixes
    assert qa.keywords == ("memorization",) and not bigbench.candidate(qa)
    control = read_task(tasks_dir, next(iter(PAIR)))
    assert control.items[0] == ("10 * 3 ->", "30") and bigbench.candidate(control)
    assert read_task(tasks_dir, "modified_arithmetic").items == ()  # a family's task.json has no examples
    assert tasks_from(tmp_path / "bigbench-1.0.0.tar.gz") == tasks_dir  # extracted once


def test_usable_items_fit_the_recipe_and_drop_a_prompt_with_two_answers(tokenizer):
    task = bigbench.Task("t", (), ("exact_str_match",), (("1 ->", "1"), ("2 ->", "2"), ("1 ->", "one"),
                         ("3 ->", "3 " * 40), ("word " * 200, "4"), ("2 ->", "2")), 6)  # fmt: skip
    assert usable_items(task, tokenizer) == [("2 ->", "2")]
    assert usable_items(task, tokenizer, Rule(max_answer_tokens=200)) == [("2 ->", "2"), ("3 ->", "3 " * 40)]


def test_splits_are_fixed_disjoint_and_of_the_rules_sizes():
    items = [(f"prompt {i}", str(i)) for i in range(300)]
    parts = split("family/task", items)
    assert {part: len(rows) for part, rows in parts.items()} == {"train": 120, "val": 20, "test": 80}
    prompts = [row["prompt"] for rows in parts.values() for row in rows]
    assert len(set(prompts)) == len(prompts) == 220
    assert {row["task"] for rows in parts.values() for row in rows} == {"family/task"}
    assert all(row["answer"] == row["prompt"].split()[1] for rows in parts.values() for row in rows)
    assert split("family/task", items) == parts  # seeded by the task's name: the same on every call
    assert split("family/other", items)["test"] != parts["test"]
    # The rule's sizes give a test set whose average has a binomial standard error of at most 0.02.
    assert (0.25 / (BIGBENCH.test_per_task * len(BIGBENCH.tasks))) ** 0.5 <= 0.02


def test_choice_takes_the_conflicting_pair_then_one_task_per_family_in_the_lottery_order():
    names = ["modified_arithmetic/a_control", "modified_arithmetic/a_plus_one", "modified_arithmetic/b_control",
             "modified_arithmetic/b_plus_one", "modified_arithmetic/c_control", *(f"f{i}/t{j}" for i in range(5)
             for j in range(2))]  # fmt: skip
    eligible = {name: [(f"{name} {i}", "x") for i in range(220)] for name in names}
    asked: list[str] = []
    solved = {"modified_arithmetic/a_plus_one", "f1/t0", "f1/t1"}  # the base model scores 1.0 on these

    def base_val(items: list[dict]) -> float:
        asked.append(items[0]["task"])
        return 1.0 if items[0]["task"] in solved else 0.0

    rule = Rule(others=3)
    chosen = choose(eligible, base_val, rule)
    # Pair a fails (its plus_one is solved by the base model), pair b is taken; c has no plus_one.
    assert [task.name for task in chosen[:2]] == ["modified_arithmetic/b_control", "modified_arithmetic/b_plus_one"]
    families = rule.order([f"f{i}" for i in range(5)])
    expected = [rule.order([f"{family}/t0", f"{family}/t1"])[0] for family in families if family != "f1"][:3]
    assert [task.name for task in chosen[2:]] == expected  # f1 has no task the base model fails: skipped
    assert all(task.base_val == 0.0 and task.items == 220 for task in chosen)
    # The base model is asked only about the tasks the rule reaches, in its order.
    reached: list[str] = []
    for family in families[: families.index(expected[-1].split("/")[0]) + 1]:
        for name in rule.order([f"{family}/t0", f"{family}/t1"]):
            reached.append(name)
            if name not in solved:
                break
    assert asked == [*names[:4], *reached]
    assert rule.order(names) == rule.order(list(reversed(names))) != sorted(names)  # a fixed order, not by name


def test_quick_bigbench_data_comes_from_the_given_tarball(tmp_path, tiny):
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", PAIR)
    train_file, train_files, val, test = write_data(BIGBENCH_QUICK, tmp_path / "data", tiny["model"], sdist)
    again = write_data(BIGBENCH_QUICK, tmp_path / "again", tiny["model"], sdist)
    assert train_file.read_text() == again[0].read_text() and (val, test) == again[2:]
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    assert len(rows) == 2 * BIGBENCH_QUICK.train_per_task
    assert list(train_files) == list(BIGBENCH_QUICK.tasks)
    assert all(path.parent == tmp_path / "data/train-by-task" for path in train_files.values())
    held_out = {item["prompt"] for item in val + test}
    for task, path in train_files.items():
        own = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(own) == BIGBENCH_QUICK.train_per_task and all(row in rows for row in own)
        prompts = {row["messages"][0]["content"] for row in own}
        assert not prompts & {item["prompt"] for item in val + test if item["task"] == task}
        assert sum(item["task"] == task for item in test) == BIGBENCH_QUICK.test_per_task
    # The two tasks share their prompts and differ in the rule of the answer: the same prompt can be train in one
    # and test in the other, never both within a task.
    assert held_out & {row["messages"][0]["content"] for row in rows}

    def product(prompt: str) -> int:
        a, b = prompt.removesuffix(" ->").split(" * ")
        return int(a) * int(b)

    offsets = {item["task"]: int(item["answer"]) - product(item["prompt"]) for item in test}
    assert offsets == dict(zip(BIGBENCH_QUICK.tasks, (0, 1), strict=True))
    small = {**PAIR, next(iter(PAIR)): arithmetic("x", 0, 20)}
    (tmp_path / "small").mkdir()
    missing = fake_sdist(tmp_path / "small" / "bigbench-1.0.0.tar.gz", small)
    with pytest.raises(SystemExit, match=r"has 20 usable items, the splits take 34"):
        write_data(BIGBENCH_QUICK, tmp_path / "d2", tiny["model"], missing)


def test_the_chosen_tasks_are_the_rules_with_a_conflicting_pair_first():
    assert len(bigbench.CHOSEN) == 2 + bigbench.RULE.others and len(set(bigbench.CHOSEN)) == len(bigbench.CHOSEN)
    control, plus_one = bigbench.CHOSEN[:2]
    assert control.startswith("modified_arithmetic/") and plus_one == control.replace("_control", "_plus_one")
    assert len({name.split("/")[0] for name in bigbench.CHOSEN[2:]}) == bigbench.RULE.others
    assert list(BIGBENCH_QUICK.tasks) == [control, plus_one] and list(BIGBENCH.tasks) == list(bigbench.CHOSEN)
    assert BIGBENCH.methods == [*FULL.methods[:3], "lora_r64", *FULL.methods[3:]]


def test_a_cached_sdist_with_another_hash_is_refused(tmp_path):
    (tmp_path / bigbench.SDIST).write_bytes(b"not the sdist")
    with pytest.raises(SystemExit, match=r"sha256 [0-9a-f]{64}, expected 1bb398a5.*delete it and run again"):
        download(tmp_path)


def test_an_unfinished_grid_is_marked_partial(tmp_path, tiny):
    from benchmarks.quality.methods import METHODS, Recipe
    from benchmarks.quality.results import Run, write_results
    from benchmarks.quality.scoring import Scores

    items = [{"task": "t", "prompt": "p", "answer": "a"}]
    run = Run("lora", 1e-3, 0, 1, 60.0, Scores.derived({"val": ["a"], "test": ["b"]}, items, items), "k")
    recipe = Recipe(tiny["model"], tiny["chat"], tmp_path / "prepared")
    written = {}
    for partial in ("1 of the 35 training runs planned", None):
        md = write_results(tmp_path / str(partial), list(METHODS.values()), [run], [], recipe, 29, "data", "argv",
                           items, items, name="quality-bigbench", partial=partial)  # fmt: skip
        assert md.name == "quality-bigbench.md" and (md.parent / "quality-bigbench.json").exists()
        written[partial] = md.read_text().splitlines()
    assert written["1 of the 35 training runs planned"][2] == (
        "**Partial**: 1 of the 35 training runs planned; the tables below hold what exists so far."
    )
    partial = written["1 of the 35 training runs planned"]
    assert partial[:2] + partial[4:] == written[None]  # the marker is the only difference


@pytest.mark.cli
def test_quick_bigbench_runs_end_to_end_from_a_given_tarball(tmp_path):
    """`--mixture bigbench --quick` through the CLI on SmolLM2-135M-Instruct (the recipe's special tokens are
    its own): its data from the fake sdist, one real Axolotl run of 2 steps, outputs named by the mixture, and
    `--reuse` from an empty work directory trains nothing."""
    import os
    import subprocess
    import sys

    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", PAIR)
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks.quality", "--mixture", "bigbench", "--quick", "--bigbench-sdist",
               str(sdist), "--methods", "base", "lora", "--steps", "2",
               "--out", str(out), "--work-dir", str(work)]  # fmt: skip
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    recorded = json.loads((out / "quality-bigbench.json").read_text())
    assert [run["method"] for run in recorded["runs"]] == ["base", "lora"]
    assert {item["task"] for item in recorded["test_items"]} == set(PAIR) and len(recorded["test_items"]) == 12
    assert set(recorded["runs"][1]["scores"]["test"]) == {*PAIR, "average"}
    table = (out / "quality-bigbench.md").read_text()
    assert "(BIG-bench tasks)" in table and "Partial" not in table and (out / "quality-bigbench.png").exists()
    assert (work / "bigbench-quick" / "runs" / "lora-lr0.001-seed0" / "train.log").exists()
    reuse = [*command, "--reuse", str(out / "quality-bigbench.json")]
    reuse[reuse.index(str(out))], reuse[reuse.index(str(work))] = str(tmp_path / "again"), str(tmp_path / "empty")
    again = subprocess.run(reuse, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("recorded in --reuse") == 1 and not list((tmp_path / "empty").glob("*/runs/*"))
    assert json.loads((tmp_path / "again" / "quality-bigbench.json").read_text())["runs"] == recorded["runs"]
    # --recorded-only with a method never trained: the table from the records, that method's run not trained.
    only = [*reuse, "--recorded-only"]
    only.insert(only.index("lora") + 1, "rlora")
    only[only.index(str(tmp_path / "again"))] = str(tmp_path / "only")
    partial = subprocess.run(only, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "rlora-lr0.001-seed0: not recorded, not trained (--recorded-only)" in partial.stdout
    assert not list((tmp_path / "empty").glob("*/runs/*"))
    assert "**Partial**: 1 of the 2 training runs planned" in (tmp_path / "only" / "quality-bigbench.md").read_text()
    assert json.loads((tmp_path / "only" / "quality-bigbench.json").read_text())["runs"] == recorded["runs"]
