"""Multi-task quality benchmark: every method trained through the real Axolotl CLI on the same task mixture,
then greedy-decoded on held-out items and scored by exact match. Two mixtures: five generated tasks (the
default) and eight BIG-bench tasks chosen by a rule written down before any method ran (bigbench.py).

    python -m benchmarks.quality                      # base + 6 methods (all but the zero-router hydralora and
                                                      # lora_r64), lr 1e-3, ~45 min
    python -m benchmarks.quality --learning-rates 1e-3 2e-3 4e-3 --seeds 0 1 2 --reuse benchmarks/results/quality.json
                                                      # the committed table: every method's lr chosen on the
                                                      # validation split (without --reuse: 30 runs, ~4.5 h)
    python -m benchmarks.quality --mixture bigbench --learning-rates 1e-3 2e-3 4e-3 --seeds 0 1 2 \
        --reuse benchmarks/results/quality-bigbench.json   # the BIG-bench table (base + 7 methods)
    python -m benchmarks.quality --methods base lora hydralora   # a subset (or the zero-router HydraLoRA)
    python -m benchmarks.quality --quick --out /tmp/q # two methods, three tasks, a few minutes
    python -m benchmarks.quality --mixture bigbench --quick --out /tmp/q   # the same on two BIG-bench tasks

Runs are cached in `--work-dir` by their YAML: a rerun (or an interrupted run restarted) trains only what
is missing. `--reuse quality.json` takes the runs recorded there instead of training a run of the same YAML
again, which is how a sweep longer than one sitting is assembled. The learning-rate sweep (first seed) of
every method comes first, then the other seeds at each method's chosen rate, and the results are rewritten
after every run trained. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.speed.counts import equal_param_rank, lora_params, rlora_params
from examples.multitask_data import Task, generate
from examples.prepare_smollm2 import main as prepare_smollm2

from . import bigbench
from .methods import METHODS, Method, Recipe, target_shapes, training_config
from .results import Run, best_rate, environment, recorded_runs, write_results
from .scoring import Scorer
from .tasks import MIXTURE, QUICK_MIXTURE

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "examples/.cache/smollm2-135m-instruct"


@dataclass(frozen=True)
class Plan:
    tasks: dict  # generated: name -> Task; BIG-bench: name -> None (the items come from its task files)
    methods: list[str]
    train_per_task: int
    val_per_task: int
    test_per_task: int
    steps: int
    micro_batch_size: int
    work: str  # its folder in --work-dir
    mixture: str = "generated"
    name: str = "quality"  # of its outputs: NAME.md, NAME.json, NAME.png
    conflicting: tuple[str, ...] = ()  # tasks whose inputs look alike and whose answers follow different rules

    @property
    def bigbench_rule(self) -> bigbench.Rule:
        return bigbench.Rule(self.train_per_task, self.val_per_task, self.test_per_task)


# The committed table's methods: the base model, LoRA twice and the paper's ladder from HydraLoRA (its authors'
# kaiming router) to R-LoRA. HydraLoRA with a zero router is one LoRA of rank 8 (its heads stay copies): it is
# added with `--methods`; so is LoRA at r=64, which came after that table.
DEFAULT_METHODS = [key for key in METHODS if key not in ("hydralora", "lora_r64")]
FULL = Plan(MIXTURE, DEFAULT_METHODS, train_per_task=160, val_per_task=24, test_per_task=48, steps=100,
            micro_batch_size=8, work="full")  # fmt: skip
QUICK = Plan(QUICK_MIXTURE, ["lora", "rlora"], train_per_task=24, val_per_task=4, test_per_task=6, steps=6,
             micro_batch_size=4, work="quick")  # fmt: skip
# BIG-bench: the tasks the rule chose (bigbench.py; `python -m benchmarks.quality.bigbench` re-derives them), the
# default methods plus LoRA at r=64, the splits the rule fixed, the generated mixture's recipe.
BIGBENCH = Plan(dict.fromkeys(bigbench.CHOSEN), [key for key in METHODS if key != "hydralora"],
                bigbench.RULE.train, bigbench.RULE.val, bigbench.RULE.test, steps=100, micro_batch_size=8,
                work="bigbench", mixture="bigbench", name="quality-bigbench",
                conflicting=bigbench.CONFLICTING)  # fmt: skip
BIGBENCH_QUICK = Plan(dict.fromkeys(bigbench.CHOSEN[:2]), ["lora", "rlora"], train_per_task=24, val_per_task=4,
                      test_per_task=6, steps=6, micro_batch_size=4, work="bigbench-quick", mixture="bigbench",
                      name="quality-bigbench", conflicting=bigbench.CONFLICTING)  # fmt: skip
PLANS = {("generated", False): FULL, ("generated", True): QUICK, ("bigbench", False): BIGBENCH,
         ("bigbench", True): BIGBENCH_QUICK}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", choices=["generated", "bigbench"], default="generated",
                        help="the five generated tasks, or the BIG-bench tasks of bigbench.py's rule")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="two methods on three (BIG-bench: two) tasks, few steps")
    methods_help = "default: all but hydralora (zero router) and, generated, lora_r64; quick: lora rlora"
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help=methods_help)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-3],
                        help="more than one: train each method at each (first seed), keep the best on val")  # fmt: skip
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 100, quick 6)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks/.cache/quality")
    parser.add_argument("--fresh", action="store_true", help="retrain and rescore, ignoring cached runs")
    parser.add_argument("--reuse", nargs="+", type=Path, default=[], metavar="QUALITY_JSON",
                        help="take the runs recorded there instead of training the same YAML again")  # fmt: skip
    parser.add_argument("--recorded-only", action="store_true",
                        help="train nothing: write the tables from --reuse's records (and the work dir's finished "
                             "runs), marked partial if runs are missing")  # fmt: skip
    sdist_help = "read the BIG-bench tasks from this tarball (default: the pinned sdist, fetched once)"
    parser.add_argument("--bigbench-sdist", type=Path, help=sdist_help)
    out_help = "where quality[-bigbench].{md,json,png} go (default: benchmarks/results)"
    parser.add_argument("--out", type=Path, help=out_help)
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick writes a smoke-test table: give it --out DIR (benchmarks/results holds the real one)")
    if min(args.learning_rates) <= 0 or (args.steps is not None and args.steps < 1):
        parser.error(f"--learning-rates {args.learning_rates} and --steps {args.steps} must be positive")
    if missing := [str(path) for path in args.reuse if not path.is_file()]:
        parser.error(f"--reuse {' '.join(missing)}: no such file (give the quality.json of an earlier run)")
    if args.recorded_only and not args.reuse:
        parser.error("--recorded-only writes the tables from records: give them with --reuse QUALITY_JSON ...")
    return args


def write_data(
    plan: Plan, data_dir: Path, model_dir: Path = MODEL_DIR, bigbench_sdist: Path | None = None
) -> tuple[Path, dict[str, Path], list[dict], list[dict]]:
    """train.jsonl for Axolotl, its rows split by task (the prompts a per-task frozen gate is the mean over), and
    the held-out items split per task into validation and test. BIG-bench's come from `bigbench_sdist` (default:
    the pinned sdist, downloaded once), measured in the tokens of the model in `model_dir`."""
    if plan.mixture == "bigbench":
        train, by_task, val, test = bigbench_data(plan, model_dir, bigbench_sdist)
    else:
        train, by_task, val, test = generated_data(plan)
    (data_dir / "train-by-task").mkdir(parents=True, exist_ok=True)
    train_file = data_dir / "train.jsonl"
    train_file.write_text(jsonl(train))
    train_files = {task: data_dir / "train-by-task" / f"{task.replace('/', '--')}.jsonl" for task in plan.tasks}
    for task, path in train_files.items():
        path.write_text(jsonl(by_task[task]))
    return train_file, train_files, val, test


Data = tuple[list[dict], dict[str, list[dict]], list[dict], list[dict]]  # train rows, them by task, val, test


def generated_data(plan: Plan) -> Data:
    drawn: dict[str, set[str]] = {task: set() for task in plan.tasks}

    def recording(task: str, draw: Task) -> Task:  # generate() shuffles the train rows without their task
        def draw_and_record(rng: random.Random) -> tuple[str, str]:
            prompt, answer = draw(rng)
            drawn[task].add(prompt)
            return prompt, answer

        return draw_and_record

    heldout_per_task = plan.val_per_task + plan.test_per_task
    tasks = {task: recording(task, draw) for task, draw in plan.tasks.items()}
    train, heldout = generate(plan.train_per_task, heldout_per_task, seed=0, tasks=tasks)
    val, test = [], []
    for start in range(0, len(heldout), heldout_per_task):
        block = heldout[start : start + heldout_per_task]
        val += block[: plan.val_per_task]
        test += block[plan.val_per_task :]
    by_task = {task: [row for row in train if row["messages"][0]["content"] in drawn[task]] for task in plan.tasks}
    return train, by_task, val, test


def bigbench_data(plan: Plan, model_dir: Path, sdist: Path | None) -> Data:
    """The rule's splits of the plan's BIG-bench tasks; the train rows of all tasks shuffled together (seed 0)."""
    from transformers import AutoTokenizer

    tasks_dir = bigbench.tasks_from(sdist or bigbench.download(bigbench.CACHE))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rule = plan.bigbench_rule
    by_task, val, test = {}, [], []
    for task in plan.tasks:
        items = bigbench.usable_items(bigbench.read_task(tasks_dir, task), tokenizer, rule)
        if len(items) < rule.per_task:
            raise SystemExit(f"BIG-bench task {task!r} has {len(items)} usable items, the splits take {rule.per_task}")
        parts = bigbench.split(task, items, rule)
        by_task[task] = [chat_row(item) for item in parts["train"]]
        val += parts["val"]
        test += parts["test"]
    train = [row for rows in by_task.values() for row in rows]
    random.Random(0).shuffle(train)
    return train, by_task, val, test


def chat_row(item: dict) -> dict:
    return {"messages": [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["answer"]}]}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def content_key(data: bytes) -> str:
    """A short name for cached work that depends on `data`."""
    return hashlib.sha256(data).hexdigest()[:12]


def run_key(described: str, work_dir: Path) -> str:
    """The key under which a run is recorded: its description (the YAML) with the paths of the work
    directory and of this checkout taken out, so that a record made in one clone is reused in another."""
    for path, placeholder in ((work_dir, "<work-dir>"), (ROOT, ".")):
        described = described.replace(str(path), placeholder)
    return content_key(described.encode())


def finished(text: str, run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished training run of the YAML `text`."""
    config_file = run_dir / "config.yml"
    return (run_dir / "wall_seconds.json").exists() and config_file.exists() and config_file.read_text() == text


def train(cfg: dict, run_dir: Path) -> float:
    """`accelerate launch -m axolotl.cli.train` on the YAML; returns the wall time. Reuses a finished run
    of the same YAML."""
    config_file, done = run_dir / "config.yml", run_dir / "wall_seconds.json"
    text = yaml.safe_dump(cfg, sort_keys=False)
    if finished(text, run_dir):
        print(f"{run_dir.name}: cached", flush=True)
        return json.loads(done.read_text())
    print(f"{time.strftime('%H:%M:%S')} {run_dir.name}: training", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (done, run_dir / "scores.json"):
        stale.unlink(missing_ok=True)
    config_file.write_text(text)
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "axolotl.cli.train", str(config_file),
    ]  # fmt: skip
    start = time.monotonic()
    with open(run_dir / "train.log", "w") as log:
        returncode = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if returncode != 0:
        tail = (run_dir / "train.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"training failed (exit {returncode}), log {run_dir / 'train.log'}:\n{tail}")
    done.write_text(json.dumps(seconds))
    return seconds


def rank_and_params(method: Method, shapes: list[tuple[int, int]], r: int, heads: int) -> tuple[int, int]:
    """The rank of a trained method's adapter and its trainable parameters on the layers of `shapes`."""
    if method.multi_head:
        return r, sum(rlora_params(d_in, d_out, r, heads) for d_in, d_out in shapes)
    rank = method.rank or (equal_param_rank(shapes, r, heads) if method.equal_params else r)
    return rank, sum(lora_params(d_in, d_out, rank) for d_in, d_out in shapes)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    plan = PLANS[args.mixture, args.quick]
    methods = [METHODS[key] for key in (args.methods or plan.methods)]
    work_dir = args.work_dir / plan.work
    if args.fresh:
        shutil.rmtree(work_dir / "runs", ignore_errors=True)
    prepare_smollm2(args.model_dir)
    train_file, train_files, val, test = write_data(plan, work_dir / "data", args.model_dir, args.bigbench_sdist)
    # Axolotl finds prepared data by the dataset's path, not its content: key it by the content.
    prepared_dir = work_dir / "prepared" / content_key(train_file.read_bytes())
    recipe = Recipe(args.model_dir, train_file, prepared_dir, r=args.r, heads=args.heads,
                    steps=args.steps or plan.steps, micro_batch_size=plan.micro_batch_size)  # fmt: skip
    shapes = target_shapes(args.model_dir)
    lora_eq_rank = equal_param_rank(shapes, args.r, args.heads)
    scorer = Scorer(args.model_dir, train_file, train_files)
    recorded = recorded_runs(args.reuse)

    trained = [m for m in methods if m.adapter]
    sweeping = len(args.learning_rates) > 1
    planned = len(trained) * (len(args.seeds) + (len(args.learning_rates) - 1 if sweeping else 0))
    runs: list[Run] = []
    sweep: list[Run] = []

    def report() -> Path:
        """The runs in method order, each method's by seed, whatever the order they were trained in."""
        order = {(m.key, seed): i for i, (m, seed) in enumerate((m, s) for m in methods for s in [None, *args.seeds])}
        done = len({r.key for r in runs + sweep if r.seed is not None})
        return write_results(
            args.out or ROOT / "benchmarks/results", [m for m in METHODS.values() if m in methods],
            sorted(runs, key=lambda r: order[r.method, r.seed]), sweep, recipe, lora_eq_rank, plan_summary(plan),
            argv_text=" ".join(sys.argv[1:] if argv is None else argv), val=val, test=test, name=plan.name,
            partial=f"{done} of the {planned} training runs planned" if done < planned else None,
            conflicting=plan.conflicting,
        )  # fmt: skip

    def run(method: Method, lr: float, seed: int, replies: bool = True) -> Run | None:
        """One training run, scored; taken from --reuse if recorded there (with its replies, if `replies`: a
        run in the test table needs them, a sweep run only its validation accuracy); None if it is neither
        recorded nor finished in the work dir and --recorded-only says not to train it."""
        rank, params = rank_and_params(method, shapes, args.r, args.heads)
        run_dir = work_dir / "runs" / f"{method.key}-lr{lr:g}-seed{seed}"
        cfg = training_config(method, recipe, rank, lr, seed, run_dir / "adapter")
        text = yaml.safe_dump(cfg, sort_keys=False)
        key = run_key(text, work_dir)
        if key in recorded and (recorded[key].scores.replies is not None or not replies):
            print(f"{run_dir.name}: recorded in --reuse", flush=True)
            return recorded[key]
        if args.recorded_only and not finished(text, run_dir):
            print(f"{run_dir.name}: not recorded, not trained (--recorded-only)", flush=True)
            return None
        seconds = train(cfg, run_dir)
        scores = scorer.score(run_dir / "adapter", val, test, cache=run_dir / "scores.json", frozen=method.exported)
        return Run(method.key, lr, seed, params, seconds, scores, key, environment())

    def add(to: list[Run], new: Run | None) -> None:
        """Rewrites the results after every run trained (or scored) here, so an interrupted sweep leaves its
        finished runs on record; a run taken from --reuse is already on record."""
        if new is None:
            return
        to.append(new)
        if recorded.get(new.key) is not new:
            report()

    if METHODS["base"] in methods:
        key = run_key(json.dumps([str(args.model_dir), val, test]), work_dir)
        if key not in recorded or recorded[key].scores.replies is None:
            scores = scorer.score(None, val, test, cache=work_dir / "runs" / f"base-{key}.json")
            recorded[key] = Run("base", None, None, 0, 0.0, scores, key)
        runs.append(recorded[key])
    # The most useful evidence first: every method at every rate (first seed), then the other seeds.
    best_lr = {}
    for method in trained:
        if sweeping:
            tried = []
            for lr in args.learning_rates:
                if new := run(method, lr, args.seeds[0], replies=False):
                    tried.append(new)
                    add(sweep, new)
            if len(tried) < len(args.learning_rates):  # --recorded-only: no rate is chosen on part of a sweep
                continue
        best_lr[method.key] = best_rate(tried) if sweeping else args.learning_rates[0]
        add(runs, run(method, best_lr[method.key], args.seeds[0]))  # the sweep's run at that rate, when it swept
    for seed in args.seeds[1:]:
        for method in (method for method in trained if method.key in best_lr):
            add(runs, run(method, best_lr[method.key], seed))
    out = report()
    print(f"wrote {out}")
    return out


def plan_summary(plan: Plan) -> str:
    return (
        f"{len(plan.tasks)} tasks ({', '.join(plan.tasks)}); per task {plan.train_per_task} train, "
        f"{plan.val_per_task} validation and {plan.test_per_task} test items, disjoint"
    )


if __name__ == "__main__":
    main()
