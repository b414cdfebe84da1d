"""Exact-match accuracy per task on the held-out items, for the base model and with a trained adapter.

python examples/evaluate.py BASE_MODEL_DIR ADAPTER_DIR TEST_JSONL
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import rlora_plugin  # noqa: F401  (first: it registers the RLORA PEFT type and quiets import noise)

# isort: split
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def parse_reply(reply: str) -> str:
    """The answer in a reply: its first line, without surrounding spaces or a final period."""
    lines = reply.strip().splitlines()
    return lines[0].strip().removesuffix(".").strip() if lines else ""


@torch.no_grad()
def replies(model, tokenizer, items: list[dict], batch_size: int = 16) -> list[str]:
    """Greedy-decode every prompt (left-padded batches); the parsed reply of each item, in order."""
    tokenizer.padding_side = "left"
    parsed: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": item["prompt"]}], add_generation_prompt=True, tokenize=False
            )
            for item in batch
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        decoded = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        parsed += [parse_reply(reply) for reply in decoded]
    return parsed


def score_replies(items: list[dict], parsed: list[str]) -> dict[str, float]:
    """Exact-match accuracy per task and their "average" (the mean over tasks)."""
    correct: dict[str, list[bool]] = defaultdict(list)
    for item, reply in zip(items, parsed, strict=True):
        correct[item["task"]].append(reply == item["answer"])
    scores = {task: sum(hits) / len(hits) for task, hits in correct.items()}
    scores["average"] = sum(scores.values()) / len(scores)
    return scores


def accuracy(model, tokenizer, items: list[dict]) -> dict[str, float]:
    return score_replies(items, replies(model, tokenizer, items))


def main(base_dir: str, adapter_dir: str, test_file: str) -> None:
    items = [json.loads(line) for line in open(test_file)]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base = accuracy(model, tokenizer, items)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    adapted = accuracy(model, tokenizer, items)
    print(f"\nexact match on {len(items)} held-out items")
    print(f"{'task':<16} {'base':>6} {'R-LoRA':>7}")
    for task in base:
        print(f"{task:<16} {base[task]:>6.2f} {adapted[task]:>7.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
