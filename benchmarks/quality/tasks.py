"""The benchmark's task mixture: three of the example's tasks plus three that differ from them in format and
skill. Every task draws (prompt, answer) pairs from a seeded RNG, so the data is the same on every machine,
and every answer is one short line scored by exact match."""

from __future__ import annotations

import random

from examples.multitask_data import WORDS, Task, addition, compare_numbers, count_letter

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
UNITS = (("kilometers", "meters", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
         ("feet", "inches", 12), ("weeks", "days", 7))  # fmt: skip


def boolean_expression(rng: random.Random) -> tuple[str, str]:
    """Logic: four literals, `and`/`or` and `not`, evaluated with Python's precedence."""
    terms = [("not " if rng.random() < 0.5 else "") + rng.choice(["True", "False"]) for _ in range(4)]
    expression = terms[0]
    for term in terms[1:]:
        expression += f" {rng.choice(['and', 'or'])} {term}"
    return f"Evaluate: {expression}. Reply True or False.", str(eval(expression))  # noqa: S307 (our own literals)


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


def weekday_shift(rng: random.Random) -> tuple[str, str]:
    """Date arithmetic modulo 7."""
    start, shift = rng.randrange(7), rng.randint(1, 30)
    direction = rng.choice(["after", "before"])
    answer = DAYS[(start + (shift if direction == "after" else -shift)) % 7]
    return f"Which day is {shift} days {direction} {DAYS[start]}? Reply with the day only.", answer


MIXTURE: dict[str, Task] = {
    "addition": addition,
    "count_letter": count_letter,
    "compare_numbers": compare_numbers,
    "boolean_expression": boolean_expression,
    "unit_conversion": unit_conversion,
    "first_letters": first_letters,
    "weekday_shift": weekday_shift,
}
QUICK_MIXTURE = {name: MIXTURE[name] for name in ("addition", "boolean_expression", "weekday_shift")}
