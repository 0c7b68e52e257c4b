"""The admission queue over the job store and Ray: each pass asks Ray for its alive nodes, plans
(service/admission.py) and moves the admitted jobs from QUEUED to PENDING, where the reconciler
submits them; every waiting job's message says why it waits. Quotas and priorities are the admin's
(`/v1/quotas`)."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session

from actors.common.config import JobConfig
from actors.common.contract import JobState
from actors.common.demand import Demand, job_demand, stored_demand
from service.admission import Capacity, Preemption, Queued, Quota, Running, never_fits, plan, plan_preempting
from service.db import Job, Token, now
from service.rayjobs import JobBackend, RayUnavailable
from service.settings import Settings
from service.store import JobStore

log = logging.getLogger("forkrl.service")

__all__ = ["AdmissionQueue", "DoesNotFit"]

CAPACITY_TTL_S = 10.0  # a submission's fit check reuses the last pass's node list this long
ADMITTED = (JobState.PENDING.value, JobState.RUNNING.value)


class DoesNotFit(ValueError):
    """A job this cluster could never run, or a priority the owner may not give (422)."""


def _actor_shapes(d: Demand) -> tuple[dict[str, float], ...]:
    return tuple(
        {k: v for k, v in {"CPU": p.cpus, "GPU": p.gpus, **p.resources}.items() if v > 0} for p in d.pools if p.count
    )


class AdmissionQueue:
    def __init__(self, store: JobStore, ray: JobBackend, settings: Settings) -> None:
        self.store, self.ray, self.settings = store, ray, settings
        self._lock = threading.Lock()  # one pass at a time in this process (the loop and a submission)
        self._capacity: tuple[float, Capacity] | None = None
        # job id -> (its demand, its actors' shapes): a stored config never changes, and a pass every few
        # seconds need not validate every queued and running job's config again
        self._demands: dict[str, tuple[dict[str, float], tuple[dict[str, float], ...]]] = {}

    def demand(self, job: Job) -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
        """The job's whole demand and its actors' shapes (nothing for a config this version cannot read)."""
        if job.id not in self._demands:
            d = stored_demand(job.config)
            self._demands[job.id] = (d.resources, _actor_shapes(d)) if d is not None else ({}, ())
        return self._demands[job.id]

    def capacity(self, max_age_s: float = 0.0) -> Capacity:
        """The alive nodes' resources, from Ray (RayUnavailable when it cannot say)."""
        if self._capacity is not None and time.monotonic() - self._capacity[0] <= max_age_s:
            return self._capacity[1]
        cap = Capacity.from_state_api(self.ray.nodes())
        self._capacity = (time.monotonic(), cap)
        return cap

    def check(self, cfg: JobConfig, who: Token, priority: int) -> None:
        """At submission: refuse a priority above the owner's bound and a job that can never fit the
        cluster (when Ray can say what it has; otherwise the job queues and the pass says why it waits)."""
        self.check_priority(who, priority)
        d = job_demand(cfg)
        if why := self.ray.never_runs(d):
            raise DoesNotFit(f"this job can never run here: {why} (its demand: {d.describe()})")
        if self.settings.admission != "queue":
            return
        try:
            cap = self.capacity(CAPACITY_TTL_S)
        except RayUnavailable:
            return
        if why := never_fits(d.resources, _actor_shapes(d), cap) if cap.nodes else "":
            raise DoesNotFit(f"this job can never run on this cluster: it {why} (its demand: {d.describe()})")

    def check_priority(self, who: Token, priority: int) -> None:
        if who.is_admin:
            return
        with self.store.session() as db:
            quota = self.store.quota(db, who.owner)
        bound = quota.max_priority if quota is not None and quota.max_priority is not None else None
        bound = self.settings.max_owner_priority if bound is None else bound
        if priority > bound:
            where = "its quota's max_priority" if quota is not None and quota.max_priority is not None else (
                "FORKRL_MAX_OWNER_PRIORITY")  # fmt: skip
            raise DoesNotFit(f"priority = {priority}: owner {who.owner!r} may give at most {bound} ({where}); "
                             "an admin sets priorities above that")  # fmt: skip

    def admit(self) -> list[str]:
        """One pass; the ids it admitted. RayUnavailable when Ray cannot list its nodes (nothing changes)."""
        with self._lock:
            with self.store.session() as db:
                # a QUEUED job already submitted is Kueue's to admit (it holds the RayJob suspended)
                queued = [j for j in self.store.in_states(db, (JobState.QUEUED.value,)) if not j.submitted]
                if not queued:
                    return []
                admitted = self.store.in_states(db, ADMITTED)
                quotas = {q.owner: Quota(q.max_running_jobs, q.max_cpus, q.max_gpus) for q in self.store.quotas(db)}
            stops: list[Preemption] = []
            if self.settings.admission != "queue":
                why = "handed to Kueue" if self.settings.admission == "kueue" else "admitted (admission: off)"
                decisions = [(j.id, True, why) for j in queued if not j.cancel_requested]
            else:
                cap = self.capacity()
                running = [Running(j.id, j.owner, self.demand(j)[0], j.priority or 0, j.started_at,
                                   j.preempt_at is not None) for j in admitted]  # fmt: skip
                waiting = [Queued(j.id, j.owner, j.priority or 0, j.created_at, *self.demand(j))
                           for j in queued if not j.cancel_requested]  # fmt: skip
                live = {j.id for j in (*queued, *admitted)}
                self._demands = {k: v for k, v in self._demands.items() if k in live}
                if self.settings.preemption == "lower_priority":
                    planned, stops = plan_preempting(waiting, running, cap, quotas)
                else:
                    planned = plan(waiting, running, cap, quotas)
                decisions = [(d.job_id, d.admit, d.reason) for d in planned]
                if stops:  # the job they make room for says so
                    note = f"; stopping {', '.join(p.victim for p in stops)} (lower priority) to make room"
                    decisions = [(i, a, r + note if i == stops[0].for_job else r) for i, a, r in decisions]
            started = []
            with self.store.session(write=True) as db:
                self._ask_to_stop(db, stops)
                for job_id, admit, reason in decisions:
                    j = self.store.get(db, job_id)
                    if j is None or j.state != JobState.QUEUED.value or j.cancel_requested:
                        continue
                    if admit:
                        self.store.set_state(db, j, JobState.PENDING.value, reason)
                        started.append(job_id)
                    elif j.message != reason:
                        j.message = reason  # the same state: no event, the reason alone changes
            for job_id in started:
                log.info("job %s admitted", job_id)
            return started

    def _ask_to_stop(self, db: Session, stops: list[Preemption]) -> None:
        """Mark each victim: its driver learns it from its next metrics push (it saves a checkpoint at the
        end of that step and ends); the reconciler puts it back in the queue once Ray says it ended, or
        stops it through Ray after FORKRL_PREEMPT_GRACE_S."""
        for p in stops:
            victim, waiting = self.store.get(db, p.victim), self.store.get(db, p.for_job)
            if victim is None or victim.preempt_at is not None or victim.state not in ADMITTED:
                continue
            victim.preempt_at = now()
            prio = waiting.priority if waiting is not None else "?"
            victim.message = (f"being preempted for {p.for_job} (priority {prio} > {victim.priority or 0}): it saves a "
                              "checkpoint at the end of its current step and goes back to the queue")  # fmt: skip
            log.info("job %s asked to stop for %s", p.victim, p.for_job)
