"""Scoring one trained adapter: exact match on the held-out items (the example's greedy decoder and answer
parser), for multi-head adapters how similar the heads came out and, for the methods that ask for it, what
freezing the gates costs (the export to a plain LoRA, rlora_plugin.export)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlora_plugin  # noqa: F401  (registers the RLORA PEFT type)
from examples.evaluate import replies, score_replies
from rlora_plugin.export import loaded_mean_gates
from rlora_plugin.registration import PEFT_TYPE_NAME
from rlora_plugin.report import analyse
from rlora_plugin.routing import fixed_gates
from rlora_plugin.saved import read_adapter, saved_peft_type

# The frozen-gate variants of a multi-head adapter, as `rlora_plugin.export --gates mean --data FILE` builds them.
FROZEN = {
    "per_task": "per-task mean gates",  # each task's test items under the mean gates of that task's train prompts
    "global": "one global mean gate",  # every test item under the mean gates of all train prompts
}


@dataclass
class Scores:
    val: dict[str, float]  # per task and "average"
    test: dict[str, float]
    head_cos_b: float | None = None  # mean pairwise cosine of the heads B_i, over layers
    head_cos_ba: float | None = None  # the same for the effective updates B_i A
    frozen: dict[str, dict[str, float]] | None = None  # test accuracy per FROZEN variant, per task and "average"
    # Every item's parsed reply, in item order: "val", "test" and each FROZEN variant (on the test items). The
    # accuracies above derive from them (`derived`); None only in records made before replies were kept.
    replies: dict[str, list[str]] | None = None

    @classmethod
    def derived(cls, replies: dict[str, list[str]], val: list[dict], test: list[dict], **heads: float) -> Scores:
        """The accuracies of `replies` to the `val` and `test` items."""
        frozen = {variant: score_replies(test, replies[variant]) for variant in FROZEN if variant in replies}
        return cls(score_replies(val, replies["val"]), score_replies(test, replies["test"]), frozen=frozen or None,
                   replies=replies, **heads)  # fmt: skip


def is_multi_head(adapter_dir: Path) -> bool:
    return saved_peft_type(adapter_dir) == PEFT_TYPE_NAME


def head_similarity(adapter_dir: Path) -> tuple[float, float]:
    layers = analyse(*read_adapter(adapter_dir)[:2])
    return mean(layer.cos_b for layer in layers), mean(layer.cos_ba for layer in layers)


class Scorer:
    """Scores on the base model `model_dir`; multi-head adapters also with their gates frozen to the mean gates
    of the train prompts in `train_file` (all tasks) and in `train_files` (one file per task)."""

    def __init__(self, model_dir: Path, train_file: Path, train_files: dict[str, Path]):
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.train_file, self.train_files = train_file, train_files

    @torch.no_grad()
    def score(
        self, adapter_dir: Path | None, val: list[dict], test: list[dict], cache: Path, frozen: bool = False
    ) -> Scores:
        """Scores of the base model (`adapter_dir=None`) or of the base with the adapter, with the FROZEN
        variants if `frozen` (a multi-head adapter), kept in `cache`; a cached run without the replies asked
        for (scored before they were kept) is decoded again, not retrained."""
        if cache.exists():
            scores = Scores(**json.loads(cache.read_text()))
            if scores.replies is not None and (not frozen or set(FROZEN) <= set(scores.replies)):
                return scores
        model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        if adapter_dir:
            model = PeftModel.from_pretrained(model, adapter_dir).eval()
        decoded = {"val": replies(model, self.tokenizer, val), "test": replies(model, self.tokenizer, test)}
        heads = {}
        if adapter_dir is not None and is_multi_head(adapter_dir):
            heads = dict(zip(("head_cos_b", "head_cos_ba"), head_similarity(adapter_dir), strict=True))
        if frozen:
            decoded |= self.frozen(model, test)
        scores = Scores.derived(decoded, val, test, **heads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(asdict(scores)))
        return scores

    def frozen(self, model: PeftModel, test: list[dict]) -> dict[str, list[str]]:
        """The test replies of the FROZEN variants: the model under `fixed_gates` is exactly the exported plain
        LoRA (tests/test_routing.py), so this is what the export serves."""
        per_task = [""] * len(test)
        for task, train_file in self.train_files.items():
            own = [i for i, item in enumerate(test) if item["task"] == task]
            with fixed_gates(model, loaded_mean_gates(model, self.tokenizer, train_file)):
                for i, reply in zip(own, replies(model, self.tokenizer, [test[i] for i in own]), strict=True):
                    per_task[i] = reply
        with fixed_gates(model, loaded_mean_gates(model, self.tokenizer, self.train_file)):
            everything = replies(model, self.tokenizer, test)
        return {"per_task": per_task, "global": everything}
