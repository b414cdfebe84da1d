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


def paired_difference(
    method: list[list[str]],
    reference: list[list[str]],
    items: list[dict],
    same_runs: bool = False,
    rounds: int = ROUNDS,
    seed: int = 0,
) -> Difference:
    """`method` and `reference`: the test replies of each of their seeds, in item order; `same_runs`: the k-th
    of each comes from the same training run, so their seeds are resampled together."""
    hits, reference_hits = correct(method, items), correct(reference, items)
    if same_runs and len(hits) != len(reference_hits):
        raise ValueError(f"same_runs needs as many runs on each side, not {len(hits)} and {len(reference_hits)}")
    rng = np.random.default_rng(seed)
    task_of = np.array([item["task"] for item in items])
    tasks = [np.flatnonzero(task_of == task) for task in dict.fromkeys(task_of)]
    samples = np.empty(rounds)
    for k in range(rounds):
        drawn = np.concatenate([rng.choice(own, len(own)) for own in tasks])
        seeds = rng.integers(0, len(hits), len(hits))
        reference_seeds = seeds if same_runs else rng.integers(0, len(reference_hits), len(reference_hits))
        samples[k] = hits[np.ix_(seeds, drawn)].mean() - reference_hits[np.ix_(reference_seeds, drawn)].mean()
    low, high = np.percentile(samples, [2.5, 97.5])
    return Difference(float(hits.mean() - reference_hits.mean()), float(low), float(high))
