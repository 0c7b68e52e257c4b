"""One way to build and address a pool of Ray actors: the rollout, reward and learner pools.

    pool = ActorPool(RewardWorker, 4, lambda i: (cfg.reward,), num_cpus=0)
    scores = pool.sharded(items, lambda w, part: w.score.remote(part))   # one contiguous shard each
    pool.all(lambda w: w.ready.remote())                                 # every actor, results in order

Roles are plain classes with a `ready()` method; they are made remote here, at the edge. Methods
are called directly on the handles, never by name. `shard` is the one split rule: contiguous, in
order, sizes differing by at most one, earlier actors taking the extra items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["ActorPool", "shard"]

T = TypeVar("T")
R = TypeVar("R")


def shard(items: Sequence[T], k: int) -> list[list[T]]:
    """k contiguous shards of items, in order; sizes differ by at most one (earlier shards larger)."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    base, extra = divmod(len(items), k)
    out, start = [], 0
    for r in range(k):
        n = base + (1 if r < extra else 0)
        out.append(list(items[start : start + n]))
        start += n
    return out


class ActorPool(Generic[T]):
    """N Ray actors of one role class, created with per-actor arguments and waited on until ready."""

    def __init__(
        self,
        role: type[T],
        n: int,
        args: Callable[[int], tuple[Any, ...]],
        *,
        num_cpus: float,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
        wait_ready: bool = True,
    ) -> None:
        import ray

        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if resources:
            options["resources"] = resources
        cls = ray.remote(**options)(role)
        self.actors: list[Any] = [cls.remote(*args(i)) for i in range(n)]
        if wait_ready:
            self.all(lambda a: a.ready.remote())

    def __len__(self) -> int:
        return len(self.actors)

    def all(self, call: Callable[[Any], Any]) -> list[Any]:
        """call(actor) -> ObjectRef on every actor; all launched, then gathered in actor order."""
        import ray

        return list(ray.get([call(a) for a in self.actors]))

    def sharded(self, items: Sequence[R], call: Callable[[Any, list[R]], Any]) -> list[Any]:
        """call(actor, shard) -> ObjectRef for each non-empty shard (see `shard`); results in order."""
        import ray

        parts = shard(items, len(self.actors))
        return list(ray.get([call(a, part) for a, part in zip(self.actors, parts, strict=True) if part]))
