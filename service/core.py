"""The control plane's `Service`: Ray submission, the reconciler that keeps the job store in step
with Ray, and the operations the routes call. The routes never touch Ray or build queries
themselves; the store (service/store.py) owns the queries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from actors.config import JobConfig
from actors.contract import (
    ENTRYPOINT,
    JOB_CONFIG_ENV,
    JOB_ENV_VARS,
    TERMINAL_STATES,
    JobState,
    MetricRecord,
    RunDir,
    parse_metric_line,
)
from service.db import Job, Token, migrate
from service.rayjobs import JobNotFound, LocalRayHead, RayJobs, RayUnavailable
from service.settings import Settings
from service.store import JobStore

log = logging.getLogger("forkrl.service")

__all__ = ["Service", "sha256", "canonical", "Unauthorized"]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Unauthorized(PermissionError):
    """No valid token (401)."""


class Service:
    """What the routes share: settings, the job store, Ray, the metrics registry and the reconciler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: JobStore | None = None
        self.head: LocalRayHead | None = None
        self._ray: RayJobs | None = None
        self.ray_ready = False
        self.admin_token = settings.admin_token
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "forkrl_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.jobs_submitted = Counter("forkrl_jobs_submitted", "jobs accepted by the API", registry=self.registry)
        self.metrics_ingested = Counter(
            "forkrl_metrics_ingested", "step metrics stored", ["source"], registry=self.registry
        )
        self.jobs_gauge = Gauge("forkrl_jobs", "jobs by state", ["state"], registry=self.registry)
        self.reconcile_seconds = Gauge(
            "forkrl_reconcile_last_seconds", "duration of the last reconcile pass", registry=self.registry
        )
        self._task: asyncio.Task[None] | None = None
        self._read_upto: dict[str, int] = {}  # job id -> bytes of metrics.jsonl already read

    @property
    def store(self) -> JobStore:
        assert self._store is not None, "Service.start() first"
        return self._store

    @property
    def ray(self) -> RayJobs:
        assert self._ray is not None, "Service.start() first"
        return self._ray

    # -- lifecycle
    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        s.runs_path.mkdir(parents=True, exist_ok=True)
        self._store = JobStore(s.db_url)
        migrate(self._store.engine)
        self._bootstrap_admin()
        if s.ray_address:
            self._ray = RayJobs(s.ray_address, s.ray_auth_token)
        else:
            self.head = LocalRayHead(s.ray_num_cpus)
            self.head.start()
            self._ray = RayJobs(self.head.address, self.head.token)

    async def start_background(self) -> None:
        """start(), then the reconcile loop as a task of the running event loop."""
        await run_in_threadpool(self.start)
        self._task = asyncio.create_task(self._reconcile_forever())

    async def stop_background(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await run_in_threadpool(self.stop)

    def stop(self) -> None:
        if self._store is not None:
            self._store.close()
        if self.head is not None:
            self.head.stop()

    def _bootstrap_admin(self) -> None:
        s = self.settings
        if not self.admin_token:
            if s.env == "production":
                raise RuntimeError("FORKRL_ADMIN_TOKEN must be set when FORKRL_ENV=production")
            path = s.data_dir / "admin_token"
            if path.is_file():
                self.admin_token = path.read_text().strip()
            else:
                self.admin_token = secrets.token_urlsafe(32)
                path.write_text(self.admin_token + "\n")
                path.chmod(0o600)
            log.warning("development mode: admin token in %s", path)
        if len(self.admin_token) < 16:
            raise RuntimeError("FORKRL_ADMIN_TOKEN must be at least 16 characters")
        digest = sha256(self.admin_token)
        with self.store.session() as db:
            if self.store.token_by_hash(db, digest) is None:
                self.store.add_token(db, "admin", digest, True)

    async def _reconcile_forever(self) -> None:
        try:
            await run_in_threadpool(self.ray.wait_ready, 180)
            self.ray_ready = True
        except RayUnavailable as e:
            log.warning("%s; retrying in the reconcile loop", e)
        while True:
            t0 = time.perf_counter()
            try:
                await run_in_threadpool(self.reconcile)
                self.ray_ready = True
            except RayUnavailable as e:
                self.ray_ready = False
                log.debug("reconcile: %s", e)
            except Exception:  # keep reconciling; a bad row must not stop the loop
                log.exception("reconcile pass failed")
            self.reconcile_seconds.set(time.perf_counter() - t0)
            await asyncio.sleep(self.settings.reconcile_interval_s)

    def readiness(self) -> dict[str, str]:
        checks = {}
        try:
            self.store.ping()
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"error: {type(e).__name__}"
        checks["ray"] = "ok" if self.ray_ready else "not reachable yet"
        return checks

    # -- tokens
    def authenticate(self, token: str) -> Token:
        with self.store.session() as db:
            tok = self.store.token_by_hash(db, sha256(token)) if token else None
        if tok is None:
            raise Unauthorized("invalid token")
        return tok

    def create_token(self, owner: str, admin: bool) -> str:
        token = secrets.token_urlsafe(32)
        with self.store.session() as db:
            self.store.add_token(db, owner, sha256(token), admin)
        return token

    # -- jobs
    def effective_config(self, job_id: str, cfg: JobConfig, ingest_token: str) -> JobConfig:
        """The submitted config with what the service decides: the run directory and where to report."""
        trainer = cfg.trainer.model_copy(update={"output_dir": str(self.settings.runs_path / job_id)})
        tracking = cfg.tracking.model_copy(
            update={
                "report_url": f"{self.settings.report_base_url}/v1/jobs/{job_id}/ingest",
                "report_token": ingest_token,
            }
        )
        return cfg.model_copy(update={"trainer": trainer, "tracking": tracking})

    def create_job(self, cfg: JobConfig, owner: str, idempotency_key: str | None) -> tuple[Job, bool]:
        """Store a new job (or find the replay of an earlier Idempotency-Key). Returns (job, created)."""
        body_hash = sha256(canonical(cfg.model_dump(mode="json")))

        def insert(db: Session) -> tuple[Job, bool]:
            if idempotency_key:
                old = self.store.by_idempotency_key(db, owner, idempotency_key, body_hash)
                if old is not None:
                    return old, False
            job_id = f"forkrl-{secrets.token_hex(8)}"
            ingest = secrets.token_urlsafe(32)
            config = self.effective_config(job_id, cfg, ingest)
            job = self.store.create(
                db, job_id=job_id, owner=owner, config=config, config_hash=body_hash,
                idempotency_key=idempotency_key, ingest_token_hash=sha256(ingest),
            )  # fmt: skip
            return job, True

        try:
            return self.store.run(insert)
        except IntegrityError:  # the same key in a concurrent request won the race: answer as a replay
            with self.store.session() as db:
                old = self.store.by_idempotency_key(db, owner, idempotency_key or "", body_hash)
            if old is None:
                raise
            return old, False

    async def submit_job(self, cfg: JobConfig, who: Token, idempotency_key: str | None) -> tuple[Job, bool]:
        """Store the job, then submit it now; if Ray is not reachable the reconciler retries."""
        job, created = await run_in_threadpool(self.create_job, cfg, who.owner, idempotency_key)
        if not created:
            return job, False
        self.jobs_submitted.inc()
        try:
            await run_in_threadpool(self.reconcile_job, job.id)
        except RayUnavailable as e:
            log.warning("job %s stays queued: %s", job.id, e)
        return await run_in_threadpool(self.get_job, job.id, who), True

    def get_job(self, job_id: str, who: Token) -> Job:
        with self.store.session() as db:
            return self.store.owned(db, job_id, who)

    def list_jobs(self, who: Token, state: str | None, limit: int, cursor: int | None) -> tuple[list[Job], int | None]:
        with self.store.session() as db:
            return self.store.page(db, None if who.is_admin else who.owner, state, limit, cursor)

    async def cancel_job(self, job_id: str, who: Token) -> Job:
        def mark(db: Session) -> Job:
            job = self.store.owned(db, job_id, who)
            if job.state not in TERMINAL_STATES and not job.cancel_requested:
                job.cancel_requested = True
                job.message = "cancel requested"
            return job

        job = await run_in_threadpool(self.store.run, mark)
        if job.state not in TERMINAL_STATES:
            with contextlib.suppress(RayUnavailable, JobNotFound):
                if job.submitted:
                    await run_in_threadpool(self.ray.stop, job_id)
                await run_in_threadpool(self.reconcile_job, job_id)
        return await run_in_threadpool(self.get_job, job_id, who)

    async def delete_job(self, job_id: str, who: Token) -> None:
        await run_in_threadpool(self.store.run, lambda db: self.store.delete(db, self.store.owned(db, job_id, who)))
        if self._ray is not None:
            await run_in_threadpool(self.ray.delete, job_id)

    def ingest(self, job_id: str, token: str, metrics: list[MetricRecord], checkpoints: list[tuple[int, str]]) -> int:
        """A driver's push of step metrics and checkpoints, with its job's ingest token."""
        with self.store.session() as db:
            job = self.store.get(db, job_id)
            if job is None or not token or not secrets.compare_digest(job.ingest_token_hash, sha256(token)):
                raise Unauthorized("invalid ingest token")
            added = self.store_metrics(db, job, metrics, "push")
            self.store.add_checkpoints(db, job_id, checkpoints)
        return added

    # -- logs
    async def logs(self, job_id: str, who: Token) -> str:
        job = await run_in_threadpool(self.get_job, job_id, who)
        if not job.submitted:
            return ""
        try:
            return str(await run_in_threadpool(self.ray.logs, job_id))
        except JobNotFound:
            return ""

    async def follow_logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's log as it grows, from the start (waits until Ray has the job)."""
        while True:
            with self.store.session() as db:
                j = self.store.get(db, job_id)
                if j is None or (j.state in TERMINAL_STATES and not j.submitted):
                    return
                if j.submitted:
                    break
            await asyncio.sleep(1)
        try:
            async for chunk in self.ray.tail(job_id):
                yield chunk
        except Exception as e:  # the stream ends; the client can reconnect
            yield f"\n[forkrl] log stream ended: {e}\n"

    # -- reconciler
    def submit(self, job_id: str, config: dict[str, Any]) -> None:
        runtime_env = {"env_vars": {JOB_CONFIG_ENV: json.dumps(config), **JOB_ENV_VARS}}
        self.ray.submit(job_id, ENTRYPOINT, runtime_env)

    def reconcile(self) -> None:
        """One pass: submit what was never accepted, follow Ray's view of the rest, pick up files."""
        with self.store.session() as db:
            ids = self.store.active_ids(db)
        for job_id in ids:
            self.reconcile_job(job_id)
        with self.store.session() as db:
            counts = self.store.count_by_state(db)
        for state in JobState:
            self.jobs_gauge.labels(state.value).set(counts.get(state.value, 0))

    def reconcile_job(self, job_id: str) -> None:
        with self.store.session() as db:
            job = self.store.get(db, job_id)
            if job is None or job.state in TERMINAL_STATES:
                return
            if not job.submitted:
                if job.cancel_requested:
                    self.store.set_state(db, job, JobState.CANCELLED.value, "cancelled before it started")
                    return
                self.submit(job.id, job.config)  # RayUnavailable propagates: nothing changes
                job.submitted = True
                job.message = "submitted to Ray"
                return
            try:
                state, message = self.ray.status(job.id)
            except JobNotFound:
                # Ray lost it (a new head, e.g. the embedded one after a restart): start it again; with
                # trainer.resume=auto it continues from its newest checkpoint
                self.submit(job.id, job.config)
                self.store.set_state(
                    db, job, JobState.PENDING.value, "resubmitted: the Ray cluster had no record of it"
                )
                return
            if job.cancel_requested and state in (JobState.PENDING.value, JobState.RUNNING.value):
                with contextlib.suppress(JobNotFound):
                    self.ray.stop(job.id)
            self.ingest_files(db, job)
            self.store.set_state(db, job, state, message)

    def ingest_files(self, db: Session, job: Job) -> None:
        """Steps and checkpoints written to the run directory that the driver could not push."""
        run = RunDir(job.run_dir)
        if run.metrics.is_file():
            # only what was appended since the last pass, complete lines only (the driver may be mid-write)
            with run.metrics.open("rb") as f:
                f.seek(self._read_upto.get(job.id, 0))
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._read_upto[job.id] = self._read_upto.get(job.id, 0) + len(complete)
            rows = [r for line in complete.decode(errors="replace").splitlines() if (r := parse_metric_line(line))]
            self.store_metrics(db, job, rows, "file")  # each step is kept once
        found = [(step, str(p)) for p in run.complete_checkpoints() if (step := RunDir.checkpoint_step(p)) is not None]
        self.store.add_checkpoints(db, job.id, found)

    def store_metrics(self, db: Session, job: Job, records: list[MetricRecord], source: str) -> int:
        added = self.store.add_metrics(db, job, records)
        if added:
            self.metrics_ingested.labels(source).inc(added)
            if job.state == JobState.PENDING.value and job.submitted:
                self.store.set_state(db, job, JobState.RUNNING.value, "training")
        return added
