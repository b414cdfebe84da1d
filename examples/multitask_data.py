"""A small multi-task chat dataset, generated deterministically: five tasks that differ in format and
skill, with disjoint train and test items, each answer checkable by exact match.

    python examples/multitask_data.py OUT_DIR [--train-per-task 64] [--test-per-task 12]

writes OUT_DIR/train.jsonl (`messages` records for Axolotl's `chat_template` type) and OUT_DIR/test.jsonl
(`task`, `prompt`, `answer`).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger maple honey lemon pilot canal ember frost grape harbor island jelly "
    "kettle ladder marble noble orbit pepper quartz raven saddle timber umbra velvet walnut yonder zebra"
).split()


Task = Callable[[random.Random], tuple[str, str]]  # draws one (prompt, answer) item


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}. Reply with the number only.", str(a + b)


def sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return f"Sort alphabetically: {' '.join(words)}. Reply with the words only.", " ".join(sorted(words))


def reverse_word(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Spell '{word}' backwards. Reply with the reversed word only.", word[::-1]


def count_letter(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    letter = rng.choice("aeiou")
    text = " ".join(words)
    return f"How many times does the letter '{letter}' occur in: {text}? Reply with the number only.", str(
        text.count(letter)
    )


def compare_numbers(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100, 1000), 2)
    return f"Which is larger, {a} or {b}? Reply with the number only.", str(max(a, b))


TASKS: dict[str, Task] = {
    "addition": addition,
    "sort_words": sort_words,
    "reverse_word": reverse_word,
    "count_letter": count_letter,
    "compare_numbers": compare_numbers,
}


def generate(
    train_per_task: int, test_per_task: int, seed: int = 0, tasks: dict[str, Task] | None = None
) -> tuple[list[dict], list[dict]]:
    """Draw items per task until there are enough distinct prompts; test prompts never occur in train."""
    rng = random.Random(seed)
    train, test = [], []
    for task, draw in (TASKS if tasks is None else tasks).items():
        items: dict[str, str] = {}
        for _ in range(100 * (train_per_task + test_per_task)):
            if len(items) == train_per_task + test_per_task:
                break
            prompt, answer = draw(rng)
            items.setdefault(prompt, answer)
        if len(items) <= test_per_task:  # a small task (reverse_word: 32 words) may give fewer train items
            raise ValueError(
                f"task {task!r} yields only {len(items)} distinct prompts, not enough for {test_per_task} test "
                "items and any train item: ask for fewer test items per task."
            )
        pairs = list(items.items())
        test += [{"task": task, "prompt": p, "answer": a} for p, a in pairs[:test_per_task]]
        train += [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in pairs[test_per_task:]
        ]
    rng.shuffle(train)
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-per-task", type=int, default=64)
    parser.add_argument("--test-per-task", type=int, default=12)
    args = parser.parse_args()
    train, test = generate(args.train_per_task, args.test_per_task)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (args.out_dir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(train)} train and {len(test)} test items to {args.out_dir}")


if __name__ == "__main__":
    main()
