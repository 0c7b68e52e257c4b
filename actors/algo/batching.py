"""PPO mini-batches of a rollout batch: pure Python."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["mini_batches"]

T = TypeVar("T")


def mini_batches(groups: list[list[T]], prompts_per_step: int | None) -> list[list[T]]:
    """Split a rollout batch (a list of groups) into PPO mini-batches of whole groups, in order;
    each is one optimizer step. None = one mini-batch holding everything."""
    if not groups:
        return []
    size = len(groups) if prompts_per_step is None else prompts_per_step
    return [[x for g in groups[i : i + size] for x in g] for i in range(0, len(groups), size)]
