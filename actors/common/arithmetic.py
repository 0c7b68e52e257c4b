"""The built-in arithmetic task's questions and its held-out split (pure: the config validates a split with
it, the driver draws the data with it)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Literal

__all__ = ["all_questions", "draw", "is_held_out"]

Task = Literal["arithmetic", "countdown_sum"]


def draw(rng: random.Random, task: Task, max_operand: int) -> tuple[str, str]:
    """One question and its answer: 'What is a + b?', or for arithmetic half the time 'What is a - b?' (a >= b)."""
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if task == "countdown_sum" or rng.random() < 0.5:
        return f"What is {a} + {b}?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


def all_questions(task: Task, max_operand: int) -> Iterator[str]:
    """Every distinct question of the task (max_operand^2 sums, and the differences with a >= b)."""
    for a in range(1, max_operand + 1):
        for b in range(1, max_operand + 1):
            yield f"What is {a} + {b}?"
            if task == "arithmetic" and a >= b:
                yield f"What is {a} - {b}?"


def is_held_out(question: str, share: float) -> bool:
    """The question's own hash decides, whatever the seed: the split is the same in every run."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64
