"""Asynchronous mode's bookkeeping, pure Python: which prompts of the data order are finished, and the
bounded buffer of verified groups with its staleness rule.

Policy versions count trained steps: version v is the policy after v steps (0: the initial model).
Step s trains at version s - 1; a group generated from version u has lag (s - 1) - u there.

Admission (AReaL's bound): with staleness bound k and P groups per step, the groups in flight plus
those waiting in the buffer stay at most (k + 1) * P while no step is learning, k * P while one is
(its P groups were taken). So new groups start only once the weights they will be trained with are
at most k versions ahead of the ones they are generated with; the buffer drops (and counts) what is
older anyway (a short step, a slow group).

Order: every drawn prompt gets a serial number (its place in the sampler's order). A serial is done
when its group was trained, or left out (no signal, too stale). The checkpoint stores the lowest
serial not done and the done ones above it; on resume the order continues there and skips the done
ones, so a group in flight or waiting at a kill is generated again, never trained twice, never lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.driver.data import Example, PromptSampler

__all__ = ["Waiting", "GroupBuffer", "StreamOrder"]


class StreamOrder:
    """The sampler's order with serial numbers and the set of finished serials (checkpointed)."""

    def __init__(self, sampler: PromptSampler) -> None:
        self.sampler = sampler
        self.low = sampler.serial  # every serial below is done
        self.done: set[int] = set()  # done serials >= low

    def draw(self) -> tuple[int, Example]:
        """The next prompt not done yet, with its serial."""
        while self.sampler.serial in self.done:  # after a resume: finished before the checkpoint
            self.sampler.draw()
        serial = self.sampler.serial
        return serial, self.sampler.draw()

    def finish(self, serial: int) -> None:
        if serial < self.low:
            raise ValueError(f"serial {serial} is already done (every serial below {self.low} is)")
        self.done.add(serial)
        while self.low in self.done:
            self.done.remove(self.low)
            self.low += 1

    def state(self) -> dict[str, Any]:
        """The sampler's position at the lowest serial not done, and the done serials above it."""
        n = len(self.sampler.examples)
        return {"epoch": self.low // n, "pos": self.low % n, "done": sorted(self.done)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state(state)
        self.low = self.sampler.serial
        self.done = {int(s) for s in state.get("done", []) if int(s) >= self.low}


@dataclass(frozen=True)
class Waiting:
    """A verified group in the buffer: its serial and the first policy version that generated it."""

    serial: int
    version: int
    group: Any  # actors.driver.sampling.Group


class GroupBuffer:
    """Verified groups with signal, waiting for a step; at most (k + 1) * P with those in flight."""

    def __init__(self, per_step: int, max_staleness: int) -> None:
        if max_staleness < 1:
            raise ValueError(f"max_staleness={max_staleness}: the buffer is for asynchronous mode (>= 1)")
        self.per_step, self.k = per_step, max_staleness
        self.waiting: list[Waiting] = []

    def room(self, in_flight: int, learning: bool) -> int:
        """How many more groups may start now."""
        return max(0, (self.k + 1 - int(learning)) * self.per_step - in_flight - len(self.waiting))

    def add(self, item: Waiting) -> None:
        self.waiting.append(item)
        self.waiting.sort(key=lambda w: w.serial)

    def fresh(self, version: int) -> int:
        """Waiting groups a step at `version` may train on."""
        return sum(w.version >= version - self.k for w in self.waiting)

    def drop_stale(self, version: int) -> list[Waiting]:
        """Remove the groups a step at `version` may not train on (they hold room new groups need)."""
        stale = [w for w in self.waiting if w.version < version - self.k]
        self.waiting = [w for w in self.waiting if w.version >= version - self.k]
        return stale

    def take(self, version: int) -> tuple[list[Waiting], list[Waiting]]:
        """For a step at policy version `version`: (the first P groups by serial within the bound,
        the groups dropped as too stale). The rest keep waiting."""
        stale = self.drop_stale(version)
        taken, self.waiting = self.waiting[: self.per_step], self.waiting[self.per_step :]
        return taken, stale
