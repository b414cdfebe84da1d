"""Paired differences in test accuracy against a reference method, with bootstrap confidence intervals.

Every method answers the same test items, so a difference is measured item by item: an item both get right
(or both wrong) adds no noise. The bootstrap resamples what would change in a rerun: the test items (within
each task, so every task keeps its weight in the average) and the seeds: each method's independently (seed k
of one method has nothing to do with seed k of another), but together for two scorings of the same runs
(R-LoRA with its gates frozen is the same adapter as R-LoRA routed, seed by seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDS = 10_000


@dataclass(frozen=True)
class Difference:
    mean: float  # accuracy of the method minus the reference's, averaged over seeds
    low: float  # the 95% interval
    high: float

    @property
    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0


def correct(replies: list[list[str]], items: list[dict]) -> np.ndarray:
    """(seeds, items) matrix of exact-match hits."""
    answers = [item["answer"] for item in items]
    return np.array([[reply == answer for reply, answer in zip(run, answers, strict=True)] for run in replies])


@dataclass(frozen=True)
class Contrast:
    """What a difference is measured on: the mean over the items of `tasks`, less (if given) the mean over
    the items of `minus` (whether those tasks gain more than the others)."""

    tasks: tuple[str, ...]
    minus: tuple[str, ...] = ()


def paired_differences(
    method: list[list[str]],
    reference: list[list[str]],
    items: list[dict],
    contrasts: dict[str, Contrast],
    same_runs: bool = False,
    rounds: int = ROUNDS,
    seed: int = 0,
) -> dict[str, Difference]:
    """`method` and `reference`: the test replies of each of their seeds, in item order; `same_runs`: the k-th
    of each comes from the same training run, so their seeds are resampled together. Every contrast is
    measured on the same bootstrap draws."""
    hits, reference_hits = correct(method, items), correct(reference, items)
    if same_runs and len(hits) != len(reference_hits):
        raise ValueError(f"same_runs needs as many runs on each side, not {len(hits)} and {len(reference_hits)}")
    task_of = np.array([item["task"] for item in items])
    names = list(dict.fromkeys(task_of))
    tasks = [np.flatnonzero(task_of == task) for task in names]
    sizes = np.array([len(own) for own in tasks])
    starts = np.cumsum([0, *sizes[:-1]])  # where each task's items begin in a draw (they are drawn task by task)
    plus, minus = (np.array([[task in getattr(c, side) for task in names] for c in contrasts.values()], dtype=float)
                   for side in ("tasks", "minus"))  # fmt: skip

    def contrasted(by_task: np.ndarray) -> np.ndarray:  # the contrasts of the per-task sums of differences
        return plus @ by_task / (plus @ sizes) - minus @ by_task / np.maximum(minus @ sizes, 1)

    rng = np.random.default_rng(seed)
    samples = np.empty((len(contrasts), rounds))
    for k in range(rounds):
        drawn = np.concatenate([rng.choice(own, len(own)) for own in tasks])
        seeds = rng.integers(0, len(hits), len(hits))
        reference_seeds = seeds if same_runs else rng.integers(0, len(reference_hits), len(reference_hits))
        gained = hits[np.ix_(seeds, drawn)].mean(0) - reference_hits[np.ix_(reference_seeds, drawn)].mean(0)
        samples[:, k] = contrasted(np.add.reduceat(gained, starts))
    observed = contrasted(np.array([(hits[:, own].mean(0) - reference_hits[:, own].mean(0)).sum() for own in tasks]))
    low, high = np.percentile(samples, [2.5, 97.5], axis=1)
    return {name: Difference(float(observed[c]), float(low[c]), float(high[c])) for c, name in enumerate(contrasts)}


def paired_difference(
    method: list[list[str]],
    reference: list[list[str]],
    items: list[dict],
    same_runs: bool = False,
    rounds: int = ROUNDS,
    seed: int = 0,
) -> Difference:
    """The difference in test average (`paired_differences`)."""
    average = {"average": Contrast(tuple(dict.fromkeys(item["task"] for item in items)))}
    return paired_differences(method, reference, items, average, same_runs, rounds, seed)["average"]
