"""The control plane's `Service`: the façade the app and the routes use. It starts and stops the parts -
the job store, the tokens (service/tokens.py), the Ray cluster (service/raycluster.py) and the
reconciler with its restart policy (service/reconciler.py) - and owns the operations on jobs and their
logs. The routes never touch Ray or the job store themselves; the store (service/store.py) owns the
queries."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from actors.common.config import JobConfig
from actors.common.contract import TERMINAL_STATES, MetricRecord
from service.db import Checkpoint, Event, Job, Metric, Token, migrate, ray_submission_id
from service.limits import MAX_CONFIG_BYTES
from service.policy import check_job
from service.quotas import TenancyLimits
from service.raycluster import RayCluster
from service.rayjobs import JobBackend, JobNotFound, RayUnavailable
from service.reconciler import LOG_READ_BYTES, Reconciler, config_env
from service.settings import Settings
from service.store import PAGE_ROWS, Conflict, JobStore, StepJSON
from service.streams import StreamSlots
from service.telemetry import Telemetry
from service.tokens import Tokens, Unauthorized, sha256

log = logging.getLogger("forkrl.service")

__all__ = ["Service", "canonical", "ConfigTooLarge", "OutOfRange", "MAX_CONFIG_BYTES"]


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class ConfigTooLarge(ValueError):
    """A config that could not reach the driver (422)."""


class OutOfRange(ValueError):
    """A request parameter outside what the job has (422)."""


class Service:
    """What the routes share: settings, metrics, and (after start()) the job store, tokens, Ray and the
    reconciler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.telemetry = Telemetry()
        self.cluster = RayCluster(settings)
        self._store: JobStore | None = None
        self._tokens: Tokens | None = None
        self._reconciler: Reconciler | None = None
        self._task: asyncio.Task[None] | None = None
        self.limits = TenancyLimits(settings)
        self.streams = StreamSlots(settings)

    @property
    def registry(self) -> CollectorRegistry:
        return self.telemetry.registry

    @property
    def _jobstore(self) -> JobStore:
        assert self._store is not None, "Service.start() first"
        return self._store

    @property
    def store(self) -> JobStore:
        """The job store (the admission queue's routes read and write quotas through it)."""
        return self._jobstore

    @property
    def tokens(self) -> Tokens:
        assert self._tokens is not None, "Service.start() first"
        return self._tokens

    @property
    def reconciler(self) -> Reconciler:
        assert self._reconciler is not None, "Service.start() first"
        return self._reconciler

    @property
    def ray(self) -> JobBackend:
        return self.cluster.jobs

    # -- lifecycle
    def start(self) -> None:
        s = self.settings
        # the data dir holds the job store and the admin token: the service user's alone
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        s.data_dir.chmod(0o700)
        if not s.runs_path.exists():  # private too; an existing one (a shared volume) keeps the mode it was given
            s.runs_path.mkdir(mode=0o700, parents=True)
        self._store = store = JobStore(s.db_url)
        migrate(store.engine)
        self._tokens = Tokens(store, s)
        self._tokens.bootstrap_admin()
        self.cluster.start()
        self._reconciler = Reconciler(store, self.cluster.jobs, self.telemetry, s)

    async def start_background(self) -> None:
        """start(), then the reconcile loop as a task of the running event loop."""
        await run_in_threadpool(self.start)
        self._task = asyncio.create_task(self.reconciler.run_forever())

    async def stop_background(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await run_in_threadpool(self.stop)

    def stop(self) -> None:
        if self._store is not None:
            self._store.close()  # a reconciler lock it held is released with its connection
        self.cluster.stop()

    def readiness(self) -> dict[str, str]:
        """Ready when the job store answers. Ray's state is reported, not required: a control plane whose
        Ray head restarts keeps serving the API (jobs wait in the store) instead of leaving its Service."""
        checks = {}
        try:
            self._jobstore.ping()
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"error: {type(e).__name__}"
        checks["ray"] = "ok" if self.reconciler.ray_ready else "not reachable"
        checks["reconciler"] = "leader" if self.reconciler.leading else "standby"
        return checks

    # -- tokens (service/tokens.py)
    def authenticate(self, token: str) -> Token:
        return self.tokens.authenticate(token)

    def create_token(self, owner: str, admin: bool, expires_at: dt.datetime | None) -> tuple[Token, str]:
        return self.tokens.create(owner, admin, expires_at)

    def list_tokens(self) -> list[Token]:
        return self.tokens.all()

    def revoke_token(self, token_id: int) -> Token:
        return self.tokens.revoke(token_id)

    def set_token_expiry(self, token_id: int, expires_at: dt.datetime | None) -> Token:
        return self.tokens.set_expiry(token_id, expires_at)

    # -- jobs
    def effective_config(self, job_id: str, cfg: JobConfig) -> JobConfig:
        """The submitted config with what the service decides: the run directory and where to report (the
        report's bearer token is minted at each submission and travels beside the config, never in it)."""
        trainer = cfg.trainer.model_copy(update={"output_dir": str(self.settings.runs_path / job_id)})
        report = f"{self.settings.report_base_url}/v1/jobs/{job_id}/ingest"
        tracking = cfg.tracking.model_copy(update={"report_url": report})
        update: dict[str, Any] = {"trainer": trainer, "tracking": tracking}
        if self.settings.pool_resources:  # each pool on its own worker group, unless the job says otherwise
            for name in ("rollout", "reward", "learner"):
                section = getattr(cfg, name)
                if not section.ray_resources:
                    update[name] = section.model_copy(update={"ray_resources": {f"forkrl_{name}": 1.0}})
        return cfg.model_copy(update=update)

    def admit(self, cfg: JobConfig, who: Token, spend: bool = True, priority: int = 0) -> None:
        """Refuse (PolicyRefused, ConfigTooLarge, LimitExceeded, RateLimited) what this owner may not run, what
        could not start, or what passes the owner's tenancy limits (service/quotas.py); spend=False: a
        config check, which counts no job and takes none of the submission rate."""

        def owner_of(job_id: str) -> str | None:
            with self._jobstore.session() as db:
                return self._jobstore.owner_of(db, job_id)

        check_job(cfg, who.owner, who.is_admin, self.settings, owner_of)
        size = len(config_env(self.effective_config("forkrl-" + "0" * 16, cfg).model_dump(mode="json")).encode())
        if size > MAX_CONFIG_BYTES:
            raise ConfigTooLarge(
                f"the job config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} are accepted (it reaches the "
                "driver in one environment variable): shorten data.system_prompt or other long strings"
            )
        self.reconciler.queue.check(cfg, who, priority)  # a priority past the owner's, a job that never fits
        self.limits.admit(cfg, who, self._jobstore, spend)  # last: the rate is spent only on a job that can run

    def replay_of(self, owner: str, idempotency_key: str | None, body_hash: str) -> Job | None:
        """The job an earlier submission with this Idempotency-Key and body stored, if any."""
        if not idempotency_key:
            return None
        with self._jobstore.session() as db:
            return self._jobstore.by_idempotency_key(db, owner, idempotency_key, body_hash)

    def create_job(
        self, cfg: JobConfig, owner: str, idempotency_key: str | None, body_hash: str, priority: int = 0
    ) -> tuple[Job, bool]:
        """Store a new job (or find the replay of an earlier Idempotency-Key, stored meanwhile). Returns
        (job, created). body_hash: the submitted config's, which a replay must match."""
        store = self._jobstore

        def insert(db: Session) -> tuple[Job, bool]:
            if idempotency_key:
                old = store.by_idempotency_key(db, owner, idempotency_key, body_hash)
                if old is not None:
                    return old, False
            job_id = f"forkrl-{secrets.token_hex(8)}"
            config = self.effective_config(job_id, cfg)
            job = store.create(
                db, job_id=job_id, owner=owner, config=config, config_hash=body_hash,
                idempotency_key=idempotency_key, ingest_token_hash="",  # no token until it is submitted
                priority=priority,
            )  # fmt: skip
            return job, True

        try:
            created: tuple[Job, bool] = store.run(insert)
            return created
        except IntegrityError:  # the same key in a concurrent request won the race: answer as a replay
            with store.session() as db:
                old = store.by_idempotency_key(db, owner, idempotency_key or "", body_hash)
            if old is None:
                raise
            return old, False

    async def submit_job(
        self, cfg: JobConfig, who: Token, idempotency_key: str | None, priority: int = 0
    ) -> tuple[Job, bool]:
        """Admit and store the job (QUEUED), then run an admission pass so that it starts now if it fits;
        if Ray is not reachable the reconciler retries."""
        body_hash = sha256(canonical(cfg.model_dump(mode="json")))
        replay = await run_in_threadpool(self.replay_of, who.owner, idempotency_key, body_hash)
        if replay is not None:  # answered as the first time, before any limit: it takes no new room
            return await run_in_threadpool(self.get_job, replay.id, who), False
        await run_in_threadpool(self.admit, cfg, who, True, priority)
        job, created = await run_in_threadpool(self.create_job, cfg, who.owner, idempotency_key, body_hash, priority)
        if not created:
            return job, False
        self.telemetry.jobs_submitted.inc()
        try:
            if self.reconciler.leading:  # the replica that runs the queue; the others leave it to its next pass
                await run_in_threadpool(self.reconciler.queue.admit)
                await run_in_threadpool(self.reconciler.reconcile_job, job.id)
        except RayUnavailable as e:
            log.warning("job %s stays queued: %s", job.id, e)
        return await run_in_threadpool(self.get_job, job.id, who), True

    def queue_positions(self) -> dict[str, int]:
        with self._jobstore.session() as db:
            return self._jobstore.queue_positions(db)

    def _job(self, job_id: str) -> Job | None:
        with self._jobstore.session() as db:
            return self._jobstore.get(db, job_id)

    def get_job(self, job_id: str, who: Token) -> Job:
        with self._jobstore.session() as db:
            return self._jobstore.owned(db, job_id, who)

    def list_jobs(self, who: Token, state: str | None, limit: int, cursor: int | None) -> tuple[list[Job], int | None]:
        with self._jobstore.session() as db:
            return self._jobstore.page(db, None if who.is_admin else who.owner, state, limit, cursor)

    async def cancel_job(self, job_id: str, who: Token) -> Job:
        store = self._jobstore

        def mark(db: Session) -> Job:
            job = store.owned(db, job_id, who)
            if job.state not in TERMINAL_STATES and not job.cancel_requested:
                job.cancel_requested = True
                job.message = "cancel requested"
            return job

        job: Job = await run_in_threadpool(store.run, mark)
        if job.state not in TERMINAL_STATES:
            with contextlib.suppress(RayUnavailable, JobNotFound):
                if job.submitted:
                    await run_in_threadpool(self.ray.stop, job.ray_id)
                await run_in_threadpool(self.reconciler.reconcile_job, job_id)
        return await run_in_threadpool(self.get_job, job_id, who)

    async def delete_job(self, job_id: str, who: Token) -> None:
        store = self._jobstore

        def drop(db: Session) -> int:
            job = store.owned(db, job_id, who)
            store.delete(db, job)
            return job.attempt

        attempts: int = await run_in_threadpool(store.run, drop)
        if self.cluster.started:  # every attempt's record on Ray
            for n in range(attempts + 1):
                await run_in_threadpool(self.ray.delete, ray_submission_id(job_id, n))

    def ingest(
        self, job_id: str, token: str, metrics: list[MetricRecord], checkpoints: list[tuple[int, str]]
    ) -> tuple[int, bool]:
        """A driver's push of step metrics and checkpoints, with its job's ingest token: the steps stored,
        and whether the driver is to stop after its current step (preempted: it saves a checkpoint there)."""
        store = self._jobstore
        with store.session(write=True) as db:
            job = store.get(db, job_id)
            if job is None or not token or not secrets.compare_digest(job.ingest_token_hash, sha256(token)):
                raise Unauthorized("invalid ingest token")
            if job.state in TERMINAL_STATES:
                raise Conflict(f"job {job_id} is {job.state}: it takes no more metrics")
            added = self.reconciler.store_metrics(db, job, metrics, "push")
            store.add_checkpoints(db, job_id, checkpoints)
            return added, job.preempt_at is not None

    # -- what a job stored: metrics, sampled completions, checkpoints, events
    def metrics(self, job_id: str, who: Token, after_step: int, limit: int) -> tuple[Job, list[StepJSON]]:
        """The job and the first page of its step records after `after_step` (at most `limit`, and at most
        settings.store_page_bytes of them: a long read goes on with metric_page), in one transaction."""
        with self._jobstore.session() as db:
            job = self._jobstore.owned(db, job_id, who)
            return job, self._jobstore.metrics(db, job_id, after_step, limit, self.settings.store_page_bytes)

    def metric_page(self, job_id: str, after_step: int, limit: int) -> list[StepJSON]:
        """The next page of a read whose caller checked the job's owner when it began ([] once deleted)."""
        with self._jobstore.session() as db:
            return self._jobstore.metrics(db, job_id, after_step, limit, self.settings.store_page_bytes)

    def samples(self, job_id: str, who: Token, step: int | None) -> Metric | None:
        """The record of `step`, or (None) the newest one that holds sampled completions."""
        with self._jobstore.session() as db:
            self._jobstore.owned(db, job_id, who)
            return self._jobstore.metric_with_samples(db, job_id, step)

    def checkpoints(self, job_id: str, who: Token) -> list[Checkpoint]:
        with self._jobstore.session() as db:
            self._jobstore.owned(db, job_id, who)
            return self._jobstore.checkpoints(db, job_id)

    def changes(self, job_id: str, after_event: int, after_step: int) -> tuple[list[Event], list[StepJSON], Job | None]:
        """What a live stream sends next: a page of the events and of the step records after these, and the
        job (None once deleted). The caller checked the job's owner when the stream began."""
        store, size = self._jobstore, self.settings.store_page_bytes
        with store.session() as db:
            ms = store.metrics(db, job_id, after_step, PAGE_ROWS, size)
            return store.events(db, job_id, after_event, PAGE_ROWS), ms, store.get(db, job_id)

    # -- logs
    async def logs(self, job_id: str, who: Token, lines: int, attempt: int | None = None) -> str:
        """The last `lines` lines of the job's driver log (at most LOG_READ_BYTES of them): the current
        attempt's, or attempt N's (0 = the first submission, then one per restart or preemption) while Ray
        keeps it."""
        job = await run_in_threadpool(self.get_job, job_id, who)
        last = job.attempt
        if attempt is not None and attempt > last:
            raise OutOfRange(
                f"attempt = {attempt}: job {job_id} has attempts 0..{last} (0 = the first submission, then one "
                f"per restart or preemption)"
            )
        if not job.submitted and (attempt is None or attempt == last):
            return ""
        ray_id = job.ray_id if attempt is None else ray_submission_id(job.id, attempt)
        try:
            tail: str = await run_in_threadpool(self.ray.log_tail, ray_id, lines, LOG_READ_BYTES)
            return tail
        except JobNotFound:
            return ""

    async def follow_logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's log as it grows, from the start (waits until Ray has the job). Ends with the job, when
        the job is deleted, or after settings.stream_idle_s without a new line (the client reconnects)."""
        idle_s = self.settings.stream_idle_s
        waited = 0.0
        while True:
            j = await run_in_threadpool(self._job, job_id)  # the database is never read on the event loop
            if j is None or (j.state in TERMINAL_STATES and not j.submitted):
                return
            if j.submitted:
                break
            if waited >= idle_s:
                yield f"[forkrl] no log after {idle_s:.0f} s; reconnect to keep following\n"
                return
            await asyncio.sleep(2)  # each of the server's streams asks the store: not too often
            waited += 2
        chunks = self.ray.tail(j.ray_id).__aiter__()
        try:
            while True:
                try:
                    yield await asyncio.wait_for(chunks.__anext__(), timeout=idle_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    yield f"\n[forkrl] nothing new for {idle_s:.0f} s; reconnect to keep following\n"
                    return
        except Exception as e:  # the stream ends; the client can reconnect
            yield f"\n[forkrl] log stream ended: {e}\n"
        finally:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
