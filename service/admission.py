"""The admission queue: which QUEUED jobs start now. Pure Python; the reconciler feeds it.

A job waits in QUEUED until its whole demand (actors.common.demand: every pool's Ray resources at once)
fits what the Ray cluster has free - gang admission: all its pools or nothing. Free is the cluster's
total (its alive nodes, from Ray's state API) less the demand of every admitted job (PENDING or
RUNNING): a job's actors take a moment to be placed, so Ray's own "available" would admit a second job
into room the first is about to take. Jobs are considered by priority (higher first), FIFO within a
priority. The order is strict: a job that waits for capacity holds back every job after it, so a large
job is never starved by a stream of small ones; a job held back by its owner's quota holds back nobody
(like Kueue's per-queue quotas). A job that can never fit this cluster (more than the cluster has in
all, or one actor larger than every node) is refused at submission; if the cluster shrank after it was
queued, it waits with that reason and holds back nobody.

Free capacity is compared as sums, not packed node by node: an actor that fits no node's free room
although the sums fit waits inside the job (the pools' own start-up bounds name what could not be
placed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, Field

__all__ = [
    "Capacity", "Decision", "Preemption", "Queued", "Quota", "RayNode", "Running", "never_fits", "plan",
    "plan_preempting", "resources_text",
]  # fmt: skip

EPS = 1e-9
SCHEDULED = ("CPU", "GPU")  # besides custom resources: memory and object store are not requested by actors


def resources_text(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def _minus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in set(a) | set(b)}


def _plus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def _short(need: Mapping[str, float], have: Mapping[str, float]) -> dict[str, float]:
    """What `have` lacks of `need`, per resource (empty: it fits)."""
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + EPS}


class RayNode(BaseModel):
    """One row of Ray's node list (state API `/api/v0/nodes`), the fields admission reads."""

    state: str
    node_id: str = ""
    resources_total: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class Capacity:
    """The alive nodes' Ray resources (CPU, GPU and custom ones; no node:* or memory entries)."""

    nodes: tuple[Mapping[str, float], ...]

    @classmethod
    def from_state_api(cls, nodes: Iterable[RayNode]) -> Capacity:
        """From Ray's node list: the alive nodes' schedulable resources."""
        alive = (n for n in nodes if n.state == "ALIVE")
        return cls(nodes=tuple({k: v for k, v in n.resources_total.items() if not _unscheduled(k)} for n in alive))

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.nodes:
            for k, v in n.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> str:
        return f"{len(self.nodes)} node(s), {resources_text(self.total)} in all"


def _unscheduled(name: str) -> bool:
    return name.startswith("node:") or name in ("memory", "object_store_memory") or name.startswith("accelerator_type")


@dataclass(frozen=True)
class Queued:
    job_id: str
    owner: str
    priority: int
    created_at: dt.datetime
    demand: Mapping[str, float]  # the whole job: Demand.resources
    actors: tuple[Mapping[str, float], ...] = ()  # one entry per distinct actor shape


@dataclass(frozen=True)
class Running:
    job_id: str
    owner: str
    demand: Mapping[str, float]
    priority: int = 0
    started_at: dt.datetime | None = None  # when it was admitted last (preemption stops the latest first)
    stopping: bool = False  # asked to stop for a higher-priority job: its room comes back soon


@dataclass(frozen=True)
class Quota:
    """An owner's bounds on what it holds admitted at once; None: no bound."""

    max_running_jobs: int | None = None
    max_cpus: float | None = None
    max_gpus: float | None = None


@dataclass
class Decision:
    job_id: str
    admit: bool
    position: int  # 1-based place among the jobs still waiting after this pass (0: admitted)
    reason: str


@dataclass
class _Use:
    jobs: int = 0
    res: dict[str, float] = field(default_factory=dict)

    def hold(self, demand: Mapping[str, float]) -> None:
        """One more admitted job of this owner, holding `demand`."""
        self.jobs += 1
        self.res = {k: self.res.get(k, 0.0) + demand.get(k, 0.0) for k in set(self.res) | set(demand)}


def never_fits(demand: Mapping[str, float], actors: Iterable[Mapping[str, float]], cap: Capacity) -> str:
    """Why a job can never run on this cluster ('' if it could): more than the cluster has in all, or an
    actor larger than every node."""
    short = _short(demand, cap.total)
    if short:
        return (f"needs {resources_text(demand)} at once; the Ray cluster has {resources_text(cap.total)} in all "
                f"({len(cap.nodes)} node(s)): missing {resources_text(short)}")  # fmt: skip
    for actor in actors:
        if not any(not _short(actor, node) for node in cap.nodes):
            largest = max(cap.nodes, key=lambda n: sum(n.get(k, 0.0) for k in actor), default={})
            return (f"one of its actors needs {resources_text(actor)}; no node of the Ray cluster has that much "
                    f"(the largest: {resources_text({k: largest.get(k, 0.0) for k in actor})})")  # fmt: skip
    return ""


def _over_quota(job: Queued, use: _Use, quota: Quota | None) -> str:
    if quota is None:
        return ""
    if quota.max_running_jobs is not None and use.jobs + 1 > quota.max_running_jobs:
        return f"owner {job.owner!r} has {use.jobs} job(s) admitted; quota max_running_jobs = {quota.max_running_jobs}"
    for key, bound in (("CPU", quota.max_cpus), ("GPU", quota.max_gpus)):
        want = use.res.get(key, 0.0) + job.demand.get(key, 0.0)
        if bound is not None and want > bound + EPS:
            held = use.res.get(key, 0.0)
            return (f"owner {job.owner!r} would hold {want:g} {key} with this job ({held:g} {key} admitted); "
                    f"quota max_{key.lower()}s = {bound:g}")  # fmt: skip
    return ""


def order(queued: Iterable[Queued]) -> list[Queued]:
    """Priority first (higher earlier), then submission time, then id (a stable tie-break)."""
    return sorted(queued, key=lambda q: (-q.priority, q.created_at, q.job_id))


@dataclass(frozen=True)
class Preemption:
    victim: str  # a running job to stop at its next step
    for_job: str  # the queued job it makes room for


def plan(
    queued: Iterable[Queued], running: Iterable[Running], cap: Capacity, quotas: Mapping[str, Quota]
) -> list[Decision]:
    """One admission pass: a decision for every queued job, in queue order."""
    return _plan(queued, running, cap, quotas)[0]


def plan_preempting(
    queued: Iterable[Queued], running: Iterable[Running], cap: Capacity, quotas: Mapping[str, Quota]
) -> tuple[list[Decision], list[Preemption]]:
    """One admission pass, and the running jobs to stop so that the first job waiting for capacity fits
    (the others wait behind it anyway): only jobs of a lower priority, the lowest priority first, then the
    most recently started (the least work to redo: each stops at its next step, after a checkpoint there).
    Jobs already stopping count as room to come. None when room is on its way, or when stopping every
    candidate would still not make it fit (nothing is stopped in vain)."""
    running = list(running)
    decisions, blocker, free = _plan(queued, running, cap, quotas)
    if blocker is None:
        return decisions, []
    room = free
    for r in running:
        if r.stopping:
            room = _plus(room, r.demand)
    if not _short(blocker.demand, room):
        return decisions, []
    candidates = sorted(
        (r for r in running if not r.stopping and r.priority < blocker.priority),
        key=lambda r: (r.priority, -(r.started_at.timestamp() if r.started_at else 0.0)),
    )
    chosen: list[Running] = []
    for r in candidates:
        chosen.append(r)
        room = _plus(room, r.demand)
        if not _short(blocker.demand, room):
            return decisions, [Preemption(r.job_id, blocker.job_id) for r in chosen]
    return decisions, []


def _plan(
    queued: Iterable[Queued], running: Iterable[Running], cap: Capacity, quotas: Mapping[str, Quota]
) -> tuple[list[Decision], Queued | None, dict[str, float]]:
    """The pass's decisions, the first job that waits for capacity (None: none does) and what was free
    when it was considered."""
    running = list(running)
    free = _minus(cap.total, {})
    use: dict[str, _Use] = {}
    for r in running:
        free = _minus(free, r.demand)
        u = use.setdefault(r.owner, _Use())
        u.hold(r.demand)
    out: list[Decision] = []
    blocker = ""  # the first job that waits for capacity: everything after it waits behind it
    blocked: tuple[Queued, dict[str, float]] | None = None
    waiting = 0
    for job in order(queued):
        u = use.setdefault(job.owner, _Use())
        reason = never_fits(job.demand, job.actors, cap) if cap.nodes else "no Ray node is alive"
        if reason:
            reason = f"cannot fit the cluster as it is now ({cap.describe()}): {reason}"
        elif quota := _over_quota(job, u, quotas.get(job.owner)):
            reason = f"over quota: {quota}"
        elif blocker:
            reason = f"behind {blocker} in the queue"
        elif short := _short(job.demand, free):
            have = {k: max(0.0, free.get(k, 0.0)) for k in job.demand}
            reason = f"waiting for capacity: needs {resources_text(job.demand)} at once, {resources_text(have)} free"
            reason += f" (short of {resources_text(short)})"
            blocker, blocked = job.job_id, (job, dict(free))
        else:
            free = _minus(free, job.demand)
            u.hold(job.demand)
            admitted = f"admitted: {resources_text(job.demand)} of {resources_text(cap.total)}"
            out.append(Decision(job.job_id, True, 0, admitted))
            continue
        waiting += 1
        out.append(Decision(job.job_id, False, waiting, reason))
    first, free_then = blocked if blocked is not None else (None, {})
    return out, first, free_then
