"""The benchmark's task mixture: three of the example's tasks plus two that differ from them in format and
skill. The base model fails all five and LoRA learns each within the budget. Every task draws (prompt,
answer) pairs from a seeded RNG, so the data is the same on every machine, and every answer is one short
line scored by exact match."""

from __future__ import annotations

import random

from examples.multitask_data import WORDS, Task, addition, compare_numbers, count_letter

UNITS = (("kilometers", "meters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("feet", "inches", 12), ("weeks", "days", 7))  # fmt: skip


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    """Multiplication by a unit factor the model has to know."""
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(2, 99)
    return f"Convert {amount} {big} to {small}. Reply with the number only.", str(amount * factor)


def first_letters(rng: random.Random) -> tuple[str, str]:
    """String transformation: the first letter of each word, space-separated."""
    words = rng.sample(WORDS, 4)
    return f"Write the first letter of each word: {' '.join(words)}. Reply with the letters only.", " ".join(
        word[0] for word in words
    )


MIXTURE: dict[str, Task] = {
    "addition": addition,
    "count_letter": count_letter,
    "compare_numbers": compare_numbers,
    "unit_conversion": unit_conversion,
    "first_letters": first_letters,
}
QUICK_MIXTURE = {name: MIXTURE[name] for name in ("addition", "unit_conversion", "first_letters")}
