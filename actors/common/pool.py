"""One way to build and address a pool of Ray actors: the rollout, reward and learner pools.

    pool = ActorPool(RewardWorker, 4, lambda i: (cfg.reward,), num_cpus=0)
    scores = pool.sharded(items, lambda w, part: w.score.remote(part))   # one contiguous shard each
    pool.all(lambda w: w.ready.remote())                                 # every actor, results in order

`restarts` > 0 lets Ray replace an actor that died; with `retry_calls` (stateless roles: the reward
workers) Ray also runs the lost call again on the replacement. The rollout pool restarts its
engines without retrying: a replacement must get the current weights first.

Roles are plain classes with a `ready()` method; they are made remote here, at the edge. Methods
are called directly on the handles, never by name. `shard` is the one split rule: contiguous, in
order, sizes differing by at most one, earlier actors taking the extra items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["ActorPool", "OnDeath", "shard", "gather"]

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


OnDeath = Callable[[int, Exception], Any]


def gather(
    refs: list[Any],
    timeout_s: float | None = None,
    labels: list[str] | None = None,
    fetch: bool = True,
    on_death: OnDeath | None = None,
) -> list[Any]:
    """ray.get of several calls that fails as soon as one of them fails: a dead actor's error (which
    names its class and id) is raised at once, not after the others return - they may never return
    when they wait for the dead one in a collective. With timeout_s, a TimeoutError names the calls
    (`labels`, one per ref) still running then. Results in the order of refs (fetch=False: only wait).

    on_death(i, error): called when call i's actor died (RayActorError); it returns the ObjectRef
    to wait for in its place (the call again on a replacement) or raises. The deadline holds
    throughout. This is the one deadline-and-gather loop of every pool call."""
    import time

    import ray
    from ray.exceptions import RayActorError

    pending = dict(enumerate(refs))
    results: dict[int, Any] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending.values()), num_returns=1, timeout=left)
        if not done:
            busy = [labels[i] if labels else str(r) for i, r in pending.items()]
            raise TimeoutError(f"{', '.join(busy)} did not finish within {timeout_s:.0f} s")
        i = next(i for i, r in pending.items() if r == done[0])
        try:
            value = ray.get(done[0])  # raises the failure of the call that just finished, if it failed
        except RayActorError as e:
            if on_death is None:
                raise
            pending[i] = on_death(i, e)
            continue
        except Exception as e:
            del pending[i]
            cause = _death_behind(pending, e)
            if cause is e:
                raise
            raise cause from e
        finished = pending.pop(i)  # the call that finished (a replacement's, after a death)
        results[i] = value if fetch else finished
    return [results[i] for i in range(len(refs))]


DEATH_GRACE_S = 10.0


def _death_behind(pending: dict[int, Any], failure: Exception) -> Exception:
    """The root cause of a failed call: a call that fails because a peer died (a collective whose
    other side closed: gloo's "Connection closed by peer") often reports before Ray reports the death.
    Waits up to DEATH_GRACE_S for the other calls; the first one whose actor died is the cause.
    Otherwise the failure itself."""
    import time

    import ray
    from ray.exceptions import RayActorError

    refs, deadline = list(pending.values()), time.monotonic() + DEATH_GRACE_S
    while refs and (left := deadline - time.monotonic()) > 0:
        done, refs = ray.wait(refs, num_returns=1, timeout=left)
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError as death:
                return death
            except Exception:  # another call that failed, not a death: the first failure stands
                pass
    return failure


def _placed(n: int, bundle: dict[str, float], within_s: float, role: str, setting: str) -> Any:
    """A PACK placement group of n bundles, once Ray placed it; a TimeoutError naming the bundles, the
    cluster's free resources and `setting` when it cannot within `within_s` seconds."""
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group([dict(bundle)] * n, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=within_s)
    if ready:
        return group
    ray.util.remove_placement_group(group)
    raise TimeoutError(
        f"{n} x {role} ({_shown(bundle)} each, placed together) could not be placed within {within_s:g} s "
        f"({setting}): the Ray cluster has {_shown(ray.available_resources()) or 'nothing'} free of "  # type: ignore[no-untyped-call]
        f"{_shown(ray.cluster_resources())}"  # type: ignore[no-untyped-call]
    )


def _shown(resources: dict[str, float]) -> str:
    """Ray resources in words, without the per-node and memory entries."""
    skip = ("node:", "memory", "object_store")
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if not k.startswith(skip))


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
        restarts: int = 0,
        retry_calls: bool = True,
        call_timeout_s: float | None = None,
        timeout_setting: str = "",
        name: str = "",
        pack_within_s: float | None = None,
        pack_setting: str = "placement",
    ) -> None:
        """pack_within_s: place the actors as one placement group (PACK: on as few nodes as fit), all or
        none, within this many seconds; else fail naming what the group needs, what the cluster has free
        and the setting (pack_setting) that bounds it."""
        import ray

        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if restarts:  # Ray starts a dead actor again (and, with retry_calls, runs the lost call once more there)
            options.update(max_restarts=restarts, max_task_retries=restarts if retry_calls else 0)
        if resources:
            options["resources"] = resources
        cls = ray.remote(**options)(role)
        # how errors name an actor: "<name> <index>" (the role's class name unless given)
        self.role, self.call_timeout_s, self.timeout_setting = name or role.__name__, call_timeout_s, timeout_setting
        self.role_class = role.__name__
        self.group: Any = None  # the placement group (pack_within_s)
        if pack_within_s is None:
            self.actors: list[Any] = [cls.remote(*args(i)) for i in range(n)]
        else:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundle = {k: v for k, v in {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}.items() if v}
            self.group = _placed(n, bundle, pack_within_s, self.role, pack_setting)
            self.actors = [
                cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, i)).remote(*args(i))
                for i in range(n)
            ]
        if wait_ready:
            self.all(lambda a: a.ready.remote())

    def __len__(self) -> int:
        return len(self.actors)

    def release(self) -> None:
        """Give the placement group's resources back (after the actors were killed)."""
        import ray

        group, self.group = self.group, None
        if group is not None:
            ray.util.remove_placement_group(group)

    def all(self, call: Callable[[Any], Any]) -> list[Any]:
        """call(actor) -> ObjectRef on every actor; all launched, then gathered in actor order."""
        return self.gather([call(a) for a in self.actors], list(range(len(self.actors))))

    def sharded(self, items: Sequence[R], call: Callable[[Any, list[R]], Any]) -> list[Any]:
        """call(actor, shard) -> ObjectRef for each non-empty shard (see `shard`); results in order."""

        parts = shard(items, len(self.actors))
        ranks = [i for i, part in enumerate(parts) if part]
        return self.gather([call(self.actors[i], parts[i]) for i in ranks], ranks)

    def gather(
        self, refs: list[Any], ranks: list[int], fetch: bool = True, on_death: OnDeath | None = None,
        timeout_s: float | None = None, timeout_setting: str | None = None,
    ) -> list[Any]:  # fmt: skip
        """`gather` with this pool's call timeout (or timeout_s, named by timeout_setting); a timeout
        names the actors (role and index) still busy; on_death(i, error) gets the actor's index i."""
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        setting = timeout_setting or self.timeout_setting or "call timeout"
        hook = None if on_death is None else (lambda j, e: on_death(ranks[j], e))
        try:
            return gather(refs, timeout, [f"{self.role} {i}" for i in ranks], fetch, hook)
        except TimeoutError as e:
            raise TimeoutError(f"{e} ({setting})") from None
