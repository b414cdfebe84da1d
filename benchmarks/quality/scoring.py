"""Scoring one trained adapter: exact match on the held-out items (the example's greedy decoder and answer
parser) and, for multi-head adapters, how similar the heads came out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlora_plugin  # noqa: F401  (registers the RLORA PEFT type)
from examples.evaluate import accuracy
from rlora_plugin.report import analyse
from rlora_plugin.saved import read_adapter


@dataclass
class Scores:
    val: dict[str, float]  # per task and "average"
    test: dict[str, float]
    head_cos_b: float | None = None  # mean pairwise cosine of the heads B_i, over layers
    head_cos_ba: float | None = None  # the same for the effective updates B_i A


def head_similarity(adapter_dir: Path) -> tuple[float, float] | tuple[None, None]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "RLORA":
        return None, None
    layers = analyse(*read_adapter(adapter_dir)[:2])
    return mean(layer.cos_b for layer in layers), mean(layer.cos_ba for layer in layers)


class Scorer:
    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    @torch.no_grad()
    def score(self, adapter_dir: Path | None, val: list[dict], test: list[dict], cache: Path) -> Scores:
        """Scores of the base model (`adapter_dir=None`) or of the base with the adapter, kept in `cache`."""
        if cache.exists():
            return Scores(**json.loads(cache.read_text()))
        model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        if adapter_dir:
            model = PeftModel.from_pretrained(model, adapter_dir).eval()
        scores = Scores(accuracy(model, self.tokenizer, val), accuracy(model, self.tokenizer, test))
        if adapter_dir:
            scores.head_cos_b, scores.head_cos_ba = head_similarity(adapter_dir)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(asdict(scores)))
        return scores
