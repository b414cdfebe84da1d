"""The BIG-bench mixture: tasks no one on this project wrote, read from the task files of the `bigbench` 1.0.0
sdist on the package index, and the written rule that chose them before any method was trained on them.

    python -m benchmarks.quality.bigbench      # download (once), apply the rule, print eligible tasks and choice

The sdist (358 MB, Apache-2.0) is fetched from the index's simple page, checked against its pinned sha256 and
cached under benchmarks/.cache/bigbench/ (never installed: its requirements pull in TensorFlow, and building
its metadata, which `pip download` does, fails on a direct-URL requirement). Only its
`bigbench/benchmark_tasks/**/task.json` files are read.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from examples.evaluate import parse_reply

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
INDEX_PAGE = "https://pypi.org/simple/bigbench/"
TASKS_IN_SDIST = "/bigbench/benchmark_tasks/"


def download(cache_dir: Path) -> Path:
    """The sdist in `cache_dir`, fetched from the index's simple page (PEP 503) if not there yet, and refused
    if its sha256 is not the pinned one."""
    path = cache_dir / SDIST
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        page = urllib.request.urlopen(INDEX_PAGE, timeout=60).read().decode()
        [url] = {link for link in re.findall(r'href="([^"]+)"', page) if link.split("#")[0].endswith("/" + SDIST)}
        partial = path.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=600) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        partial.rename(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SDIST_SHA256:
        raise SystemExit(f"{path}: sha256 {digest.hexdigest()}, expected {SDIST_SHA256}: delete it and run again")
    return path


def extract_tasks(sdist: Path, tasks_dir: Path) -> Path:
    """Every `task.json` under the sdist's benchmark_tasks/, written to `tasks_dir/TASK[/SUBTASK]/task.json`
    (once: a finished extraction leaves a marker)."""
    done = tasks_dir / ".extracted"
    if done.exists():
        return tasks_dir
    with tarfile.open(sdist) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("/task.json") and TASKS_IN_SDIST in member.name:
                target = tasks_dir / member.name.split(TASKS_IN_SDIST, 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    done.write_text(sdist.name)
    return tasks_dir


def tasks_from(sdist: Path) -> Path:
    """The task files of `sdist`, extracted beside it (once)."""
    return extract_tasks(sdist, sdist.parent / "tasks")


def task_names(tasks_dir: Path) -> list[str]:
    """Every task and subtask with examples ("modified_arithmetic/three_digit_addition_control"), sorted."""
    return sorted(str(path.parent.relative_to(tasks_dir)) for path in tasks_dir.glob("**/task.json"))


@dataclass(frozen=True)
class Task:
    name: str
    keywords: tuple[str, ...]
    metrics: tuple[str, ...]
    items: tuple[tuple[str, str], ...]  # (prompt, answer) of every example usable for exact match, file order
    examples: int  # examples in the file


def read_task(tasks_dir: Path, name: str) -> Task:
    """The task's examples as zero-shot prompts, formatted as BIG-bench's JsonTask formats them (its task prefix,
    input prefix and output prefix, with the same defaults), whitespace at the ends stripped (the prompt is a
    chat turn). An example is usable when it has a generative `target` (a string, or a list: the first is the
    answer) and no `target_scores` (not multiple choice), and its answer is one line and what the scorer's
    reply parser leaves of it (a final period would never match)."""
    data = json.loads((tasks_dir / name / "task.json").read_text())
    prefix = str(data.get("task_prefix", ""))
    input_prefix = data.get("example_input_prefix", "\nQ: ")
    output_prefix = data.get("example_output_prefix", "\nA: ")
    items = []
    for example in data.get("examples", []):
        if "target_scores" in example:  # a multiple-choice example
            continue
        target = example.get("target")
        answer = target[0] if isinstance(target, list) and target else target
        if isinstance(answer, str) and answer.strip() and parse_reply(answer) == answer:
            items.append(((prefix + input_prefix + example["input"] + output_prefix).strip(), answer))
    return Task(name, tuple(data.get("keywords", [])), tuple(data.get("metrics", [])), tuple(items),
                len(data.get("examples", [])))  # fmt: skip


# The rule that chose the mixture, fixed (and committed on its own) before any method was trained on it.
@dataclass(frozen=True)
class Rule:
    train: int = 120  # items per task in each split: disjoint, drawn by a shuffle seeded by the task's name
    val: int = 20
    test: int = 80  # 8 tasks x 80 = 640 test items: a binomial standard error of the average <= 0.0198
    max_answer_tokens: int = 8
    max_item_tokens: int = 128  # the whole chat-formatted train item: the recipe's sequence_len
    # Answers a 100-step adapter cannot derive from the prompt (facts to recall) are out of scope.
    knowledge_keywords: tuple[str, ...] = ("memorization", "context-free question answering", "common sense")
    base_below: float = 0.5  # the base model's exact match on the task's validation split
    conflict_family: str = "modified_arithmetic"  # its X_control / X_plus_one subtasks: alike inputs, other rules
    others: int = 6  # besides the conflicting pair: one task from each of this many other families
    lottery: str = "rlora-plugin quality benchmark, BIG-bench mixture"  # salt of the families' order

    @property
    def per_task(self) -> int:
        return self.train + self.val + self.test

    def order(self, names: list[str]) -> list[str]:
        """A fixed pseudo-random order (sha256 of the salted name): the choice among eligible tasks is a lottery."""
        return sorted(names, key=lambda name: hashlib.sha256(f"{self.lottery}:{name}".encode()).hexdigest())


RULE = Rule()


def usable_items(task: Task, tokenizer, rule: Rule = RULE) -> list[tuple[str, str]]:
    """The task's items that fit the recipe (answer and whole chat-formatted item within the rule's token
    limits), each prompt once (a prompt given two different answers is dropped), in file order."""
    answers: dict[str, set[str]] = {}
    for prompt, answer in task.items:
        answers.setdefault(prompt, set()).add(answer)
    kept = []
    for prompt, options in answers.items():
        if len(options) != 1:
            continue
        [answer] = options
        chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        item_tokens = len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if answer_tokens <= rule.max_answer_tokens and item_tokens <= rule.max_item_tokens:
            kept.append((prompt, answer))
    return kept


def candidate(task: Task, rule: Rule = RULE) -> bool:
    """Rule, before any model is run: a generative exact-match task, not one of recalled facts."""
    return "exact_str_match" in task.metrics and not set(task.keywords) & set(rule.knowledge_keywords)


def split(name: str, items: list[tuple[str, str]], rule: Rule = RULE) -> dict[str, list[dict]]:
    """The task's train, val and test items: disjoint (every prompt once), drawn by a shuffle seeded by the
    task's name, so they are the same on every machine and do not move when another task is added."""
    drawn = list(items)
    random.Random(name).shuffle(drawn)
    bounds = {"train": (0, rule.train), "val": (rule.train, rule.train + rule.val),
              "test": (rule.train + rule.val, rule.per_task)}  # fmt: skip
    return {part: [{"task": name, "prompt": p, "answer": a} for p, a in drawn[start:end]]
            for part, (start, end) in bounds.items()}  # fmt: skip


@dataclass(frozen=True)
class Chosen:
    name: str
    items: int  # usable items (the splits take rule.per_task of them)
    base_val: float  # the base model's exact match on its validation split


def eligible(tasks_dir: Path, tokenizer, rule: Rule = RULE) -> dict[str, list[tuple[str, str]]]:
    """Every candidate task with enough usable items for the splits: name -> its usable items."""
    found = {}
    for name in task_names(tasks_dir):
        task = read_task(tasks_dir, name)
        if candidate(task, rule) and len(task.items) >= rule.per_task:
            if len(items := usable_items(task, tokenizer, rule)) >= rule.per_task:
                found[name] = items
    return found


def choose(eligible: dict[str, list[tuple[str, str]]], base_val: Callable[[list[dict]], float],
           rule: Rule = RULE) -> list[Chosen]:  # fmt: skip
    """The mixture: the first conflicting pair (alphabetically: `F/X_control` and `F/X_plus_one` of the conflict
    family F, both eligible), then one task from each of `rule.others` other families, families and the tasks
    within each taken in the lottery's order; a task is taken only if the base model scores below
    `rule.base_below` on its validation split (`base_val`, called only on the tasks the rule reaches)."""

    def take(name: str) -> Chosen | None:
        score = base_val(split(name, eligible[name], rule)["val"])
        return Chosen(name, len(eligible[name]), score) if score < rule.base_below else None

    pair: list[Chosen] = []
    prefix = rule.conflict_family + "/"
    for control in sorted(n for n in eligible if n.startswith(prefix) and n.endswith("_control")):
        plus_one = control.removesuffix("_control") + "_plus_one"
        if plus_one in eligible and all(both := [take(control), take(plus_one)]):
            pair = both
            break
    families: dict[str, list[str]] = {}
    for name in eligible:
        families.setdefault(name.split("/")[0], []).append(name)
    families.pop(rule.conflict_family, None)
    others: list[Chosen] = []
    for family in rule.order(list(families)):
        if len(others) == rule.others:
            break
        for name in rule.order(families[family]):
            if taken := take(name):
                others.append(taken)
                break
    return pair + others


CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bigbench"


def base_scorer(model_dir: Path, cache: Path) -> Callable[[list[dict]], float]:
    """The base model's exact match on a list of items (greedy, the benchmark's decoder and parser), kept in
    `cache` by the items' content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.evaluate import replies, score_replies

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    scores = json.loads(cache.read_text()) if cache.exists() else {}

    @torch.no_grad()
    def score(items: list[dict]) -> float:
        key = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
        if key not in scores:
            scores[key] = score_replies(items, replies(model, tokenizer, items))["average"]
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(scores, indent=0))
        return scores[key]

    return score


def main(argv: list[str] | None = None) -> list[Chosen]:
    import argparse

    from transformers import AutoTokenizer

    from examples.prepare_smollm2 import main as prepare_smollm2

    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.bigbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help="where the sdist and its task files go")
    parser.add_argument("--model-dir", type=Path, default=root / "examples/.cache/smollm2-135m-instruct")
    args = parser.parse_args(argv)
    tasks_dir = tasks_from(download(args.cache_dir))
    prepare_smollm2(args.model_dir)
    found = eligible(tasks_dir, AutoTokenizer.from_pretrained(args.model_dir))
    print(f"{len(found)} eligible tasks: {', '.join(found)}")
    chosen = choose(found, base_scorer(args.model_dir, args.cache_dir / "base-val.json"))
    for task in chosen:
        print(f"{task.name}: {task.items} usable items, base model {task.base_val:.2f} on validation")
    return chosen


if __name__ == "__main__":
    main()


# What the rule chose (`python -m benchmarks.quality.bigbench` re-derives it), with the base model's exact match
# on each task's validation split.
CHOSEN = (
    "modified_arithmetic/three_digit_subtraction_control",  # 0.00, 814 usable items
    "modified_arithmetic/three_digit_subtraction_plus_one",  # 0.00, 813
    "matrixshapes",  # 0.00, 2640
    "word_unscrambling",  # 0.00, 8917
    "ascii_word_recognition",  # 0.00, 785
    "unnatural_in_context_learning/unnatural_addition_2_digit",  # 0.00, 8100
    "linguistic_mappings/plural_json",  # 0.00, 1702
    "chinese_remainder_theorem",  # 0.00, 314
)
CONFLICTING = CHOSEN[:2]  # the conflicting pair: `choose` puts it first
