"""Tenancy limits: the operator's hard bounds on what one non-admin owner may ask of the cluster.

service/policy.py decides whether an owner may *use* a field (code, files, tracking); this decides
how *much*: in `tenancy: shared` a non-admin owner's submission is refused when
- a pool is larger than the operator allows (engines, reward workers, learners), an actor asks for
  more GPUs than `max_gpus_per_actor`, the job's engines and learners reserve more GPUs or CPUs than
  `max_job_gpus` / `max_job_cpus`, or a CPU engine's KV cache exceeds `max_cpu_kv_cache_gib` (403);
- a pool's `ray_resources` names a resource outside `allowed_ray_resources` for that pool (by
  default each pool its own worker group of the chart), or any `node:*` resource, which would pin
  actors to one host (403);
- the owner already has `max_jobs_per_owner` jobs stored or `max_active_jobs_per_owner` queued or
  running (403; counted in the store, so every replica agrees);
- the owner submits faster than `submit_rate_per_minute` after a burst of `submit_burst` (429 with
  Retry-After): a token bucket per owner in this service process, so N replicas behind one address
  admit up to N times the rate. A deleted job does not give its submission back.
Admin tokens are the operator's and are not limited: the operator sets these bounds and could lift
them, and can mint tokens for new owners anyway. `tenancy: single_user` turns every limit off, as it
does the policy. The admission queue (who runs *now*) is another matter; these bounds never change
with the cluster's load. A refusal names the field or the limit, its value and the setting.
"""

from __future__ import annotations

import fnmatch
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.common.config import JobConfig
from service.db import Token
from service.settings import Pool, Settings
from service.store import JobStore

__all__ = ["LimitExceeded", "OwnerJobs", "RateLimited", "SubmitRate", "TenancyLimits"]

POOLS: tuple[Pool, ...] = ("rollout", "reward", "learner")


class LimitExceeded(PermissionError):
    """A submission past one of the operator's tenancy limits (403)."""


def _over(what: str, limit: str, bound: float, hint: str) -> LimitExceeded:
    return LimitExceeded(f"{what}: more than {limit} = {_num(bound)} allows; {hint} (tenancy limit "
                         f"FORKRL_{limit.upper()})")  # fmt: skip


class RateLimited(RuntimeError):
    """Submissions faster than the owner's rate (429, with Retry-After)."""

    def __init__(self, owner: str, retry_after_s: int, s: Settings) -> None:
        super().__init__(
            f"owner {owner!r} submits faster than submit_rate_per_minute = {_num(s.submit_rate_per_minute)} "
            f"after submit_burst = {s.submit_burst}; retry in {retry_after_s} s (tenancy limit)"
        )
        self.retry_after_s = retry_after_s


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class OwnerJobs:
    stored: int  # every state
    active: int  # queued or running


class SubmitRate:
    """A token bucket per owner: `burst` submissions at once, then `per_minute`. In memory, per process;
    a full bucket is forgotten, so the table holds only owners who submitted within the refill time."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = per_minute / 60, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, at)
        self._lock = threading.Lock()  # admission runs in the thread pool

    def take(self, owner: str) -> float:
        """Take one submission; 0 when taken, else the seconds until one is free (nothing taken)."""
        with self._lock:
            now = self.clock()
            self._forget_full(now)
            tokens, at = self._buckets.get(owner, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[owner] = (tokens, now)
                return (1 - tokens) / self.rate
            self._buckets[owner] = (tokens - 1, now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        full = [o for o, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for owner in full:
            del self._buckets[owner]


class TenancyLimits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rate = SubmitRate(settings.submit_rate_per_minute, settings.submit_burst)

    def admit(self, cfg: JobConfig, who: Token, store: JobStore, spend: bool = True) -> None:
        """Raise LimitExceeded or RateLimited for the first limit this submission passes. The rate is taken
        last, so a refused config costs none of it; spend=False (a config check, not a submission) checks
        the config's own bounds only."""
        if who.is_admin or self.settings.tenancy == "single_user":
            return
        self.check_config(cfg)
        if not spend:
            return
        with store.session() as db:
            jobs = OwnerJobs(*store.job_counts(db, who.owner))
        self.check_owner(who.owner, jobs)
        wait = self.rate.take(who.owner)
        if wait > 0:
            raise RateLimited(who.owner, max(1, math.ceil(wait)), self.settings)

    def check_config(self, cfg: JobConfig) -> None:
        s, r, lr = self.settings, cfg.rollout, cfg.learner
        for field, value, limit, bound in (
            ("rollout.num_engines", r.num_engines, "max_rollout_engines", s.max_rollout_engines),
            ("reward.num_workers", cfg.reward.num_workers, "max_reward_workers", s.max_reward_workers),
            ("learner.num_learners", lr.num_learners, "max_learners", s.max_learners),
            ("rollout.num_gpus_per_engine", r.num_gpus_per_engine, "max_gpus_per_actor", s.max_gpus_per_actor),
            ("learner.num_gpus_per_learner", lr.num_gpus_per_learner, "max_gpus_per_actor", s.max_gpus_per_actor),
            ("rollout.cpu_kv_cache_gib", r.cpu_kv_cache_gib, "max_cpu_kv_cache_gib", s.max_cpu_kv_cache_gib),
        ):
            if value > bound:
                raise _over(f"{field} = {_num(value)}", limit, bound, "ask the operator for a larger one")
        # reward workers reserve no CPU in Ray (actors/reward/pool.py): their count is bounded above
        gpus = r.num_engines * r.num_gpus_per_engine + lr.num_learners * lr.num_gpus_per_learner
        cpus = r.num_engines * r.num_cpus_per_engine + lr.num_learners * lr.num_cpus_per_learner
        for what, total, limit, bound in (("GPUs", gpus, "max_job_gpus", s.max_job_gpus),
                                          ("CPUs", cpus, "max_job_cpus", s.max_job_cpus)):  # fmt: skip
            if total > bound:
                raise _over(
                    f"the job reserves {_num(total)} {what} (rollout.num_engines x per engine + learner.num_learners "
                    "x per learner)", limit, bound, "use fewer or smaller actors",
                )  # fmt: skip
        self.check_resources(cfg)

    def check_resources(self, cfg: JobConfig) -> None:
        allowed = self.settings.allowed_ray_resources
        for pool in POOLS:
            patterns = allowed.get(pool, [])
            for name in getattr(cfg, pool).ray_resources:
                field = f"{pool}.ray_resources.{name}"
                if name.startswith("node:"):
                    raise LimitExceeded(f"{field}: node:* resources pin actors to one host (tenancy limit)")
                if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                    raise LimitExceeded(
                        f"{field}: not in allowed_ray_resources.{pool}; the {pool} pool may name "
                        f"{', '.join(patterns) or 'no custom resource'} (tenancy limit FORKRL_ALLOWED_RAY_RESOURCES)"
                    )

    def check_owner(self, owner: str, jobs: OwnerJobs) -> None:
        s = self.settings
        for held, what, limit, bound, hint in (
            (jobs.active, "queued or running", "max_active_jobs_per_owner", s.max_active_jobs_per_owner,
             "wait for one to end or cancel one"),
            (jobs.stored, "stored", "max_jobs_per_owner", s.max_jobs_per_owner, "delete finished jobs to make room"),
        ):  # fmt: skip
            if held >= bound:
                raise LimitExceeded(
                    f"owner {owner!r} has {held} jobs {what}: {limit} = {bound} allows no more; {hint} "
                    f"(tenancy limit FORKRL_{limit.upper()})"
                )
