"""The control plane's `Service`: Ray submission, the reconciler that keeps the job store in step
with Ray, and the operations the routes call. The routes never touch Ray or build queries
themselves; the store (service/store.py) owns the queries."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
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
    REPORT_TOKEN_ENV,
    TERMINAL_STATES,
    JobState,
    MetricRecord,
    RunDir,
    parse_metric_line,
)
from service.db import Job, Token, migrate, now, ray_submission_id
from service.failures import failure_reason, infrastructure_failure
from service.policy import check_job
from service.rayjobs import JobNotFound, LocalRayHead, RayJobs, RayUnavailable
from service.settings import Settings
from service.store import Conflict, JobStore

log = logging.getLogger("forkrl.service")

__all__ = ["Service", "sha256", "canonical", "config_env", "Unauthorized", "ConfigTooLarge", "MAX_CONFIG_BYTES"]

# The config reaches the driver in one environment variable; Linux caps one at 128 KiB (MAX_ARG_STRLEN).
MAX_CONFIG_BYTES = 96 * 1024
LOG_READ_BYTES = 4 << 20  # most bytes of log one non-follow read holds


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def config_env(config: dict[str, Any]) -> str:
    """The config as the driver's environment variable holds it (UTF-8 JSON)."""
    return json.dumps(config, ensure_ascii=False, separators=(",", ":"))


def _not_bootstrap(tok: Token) -> None:
    if tok.bootstrap:
        raise Conflict(
            f"token {tok.id} is the bootstrap admin token (FORKRL_ADMIN_TOKEN): rotate it by restarting the service "
            "with a new one, which revokes this one"
        )


class Unauthorized(PermissionError):
    """No valid token (401)."""


class ConfigTooLarge(ValueError):
    """A config that could not reach the driver (422)."""


class OutOfRange(ValueError):
    """A request parameter outside what the job has (422)."""


class Service:
    """What the routes share: settings, the job store, Ray, the metrics registry and the reconciler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: JobStore | None = None
        self.head: LocalRayHead | None = None
        self._ray: RayJobs | None = None
        self.ray_ready = False
        self.leading = False  # whether this replica runs the reconciler
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
        self.restarts_total = Counter(
            "forkrl_job_restarts", "failed jobs resubmitted (trainer.max_restarts)", registry=self.registry
        )
        self.reconcile_seconds = Gauge(
            "forkrl_reconcile_last_seconds", "duration of the last reconcile pass", registry=self.registry
        )
        self.ray_gauge = Gauge("forkrl_ray_reachable", "1 when the Ray Jobs API answers", registry=self.registry)
        self.leader_gauge = Gauge(
            "forkrl_reconciler_leader", "1 on the replica that runs the reconciler", registry=self.registry
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
        # the data dir holds the job store and the admin token: the service user's alone
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        s.data_dir.chmod(0o700)
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
            self._store.close()  # a reconciler lock it held is released with its connection
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
        with self.store.session(write=True) as db:
            tok = self.store.token_by_hash(db, digest)
            if tok is None:
                self.store.add_token(db, "admin", digest, True, bootstrap=True)
            elif not tok.bootstrap or tok.revoked_at is not None:
                raise RuntimeError("FORKRL_ADMIN_TOKEN is a revoked or API-created token: set a fresh one")
            revoked = self.store.revoke_bootstrap_except(db, digest)
        if revoked:
            log.warning("admin token rotated: %d earlier bootstrap admin token(s) revoked", revoked)

    async def _reconcile_forever(self) -> None:
        # a pass that finds Ray unreachable (not up yet, restarting) changes nothing; the next retries
        while True:
            t0 = time.perf_counter()
            try:
                # one reconciler at a time over a shared job store (several control-plane replicas on
                # PostgreSQL): the others stand by and take over when the leader's session ends
                self.leading = leading = await run_in_threadpool(self.store.try_lead)
                self.leader_gauge.set(float(leading))
                if leading:
                    await run_in_threadpool(self.reconcile)
                self.ray_ready = await run_in_threadpool(self.ray.ping)
            except RayUnavailable as e:
                self.ray_ready = False
                log.debug("reconcile: %s", e)
            except Exception:  # keep reconciling; a bad row must not stop the loop
                log.exception("reconcile pass failed")
            self.ray_gauge.set(float(self.ray_ready))
            self.reconcile_seconds.set(time.perf_counter() - t0)
            await asyncio.sleep(self.settings.reconcile_interval_s)

    def readiness(self) -> dict[str, str]:
        """Ready when the job store answers. Ray's state is reported, not required: a control plane whose
        Ray head restarts keeps serving the API (jobs wait in the store) instead of leaving its Service."""
        checks = {}
        try:
            self.store.ping()
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"error: {type(e).__name__}"
        checks["ray"] = "ok" if self.ray_ready else "not reachable"
        checks["reconciler"] = "leader" if self.leading else "standby"
        return checks

    # -- tokens
    def authenticate(self, token: str) -> Token:
        with self.store.session() as db:
            tok = self.store.token_by_hash(db, sha256(token)) if token else None
        if tok is None or not tok.usable(now()):
            raise Unauthorized("invalid, revoked or expired token")
        return tok

    def create_token(self, owner: str, admin: bool, expires_at: dt.datetime | None) -> tuple[Token, str]:
        """A new token (row, secret); only its hash is stored."""
        token = secrets.token_urlsafe(32)
        with self.store.session(write=True) as db:
            return self.store.add_token(db, owner, sha256(token), admin, expires_at), token

    def list_tokens(self) -> list[Token]:
        with self.store.session() as db:
            return self.store.tokens(db)

    def revoke_token(self, token_id: int) -> Token:
        with self.store.session(write=True) as db:
            tok = self.store.token(db, token_id)
            _not_bootstrap(tok)
            if tok.revoked_at is None:
                tok.revoked_at = now()
            return tok

    def set_token_expiry(self, token_id: int, expires_at: dt.datetime | None) -> Token:
        with self.store.session(write=True) as db:
            tok = self.store.token(db, token_id)
            _not_bootstrap(tok)
            tok.expires_at = expires_at
            return tok

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

    def admit(self, cfg: JobConfig, who: Token) -> None:
        """Refuse (PolicyRefused, ConfigTooLarge) what this owner may not run or what could not start."""

        def owner_of(job_id: str) -> str | None:
            with self.store.session() as db:
                return self.store.owner_of(db, job_id)

        check_job(cfg, who.owner, who.is_admin, self.settings, owner_of)
        size = len(config_env(self.effective_config("forkrl-" + "0" * 16, cfg).model_dump(mode="json")).encode())
        if size > MAX_CONFIG_BYTES:
            raise ConfigTooLarge(
                f"the job config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} are accepted (it reaches the "
                "driver in one environment variable): shorten data.system_prompt or other long strings"
            )

    def create_job(self, cfg: JobConfig, owner: str, idempotency_key: str | None) -> tuple[Job, bool]:
        """Store a new job (or find the replay of an earlier Idempotency-Key). Returns (job, created)."""
        body_hash = sha256(canonical(cfg.model_dump(mode="json")))

        def insert(db: Session) -> tuple[Job, bool]:
            if idempotency_key:
                old = self.store.by_idempotency_key(db, owner, idempotency_key, body_hash)
                if old is not None:
                    return old, False
            job_id = f"forkrl-{secrets.token_hex(8)}"
            config = self.effective_config(job_id, cfg)
            job = self.store.create(
                db, job_id=job_id, owner=owner, config=config, config_hash=body_hash,
                idempotency_key=idempotency_key, ingest_token_hash="",  # no token until it is submitted
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
        """Admit and store the job, then submit it now; if Ray is not reachable the reconciler retries."""
        await run_in_threadpool(self.admit, cfg, who)
        job, created = await run_in_threadpool(self.create_job, cfg, who.owner, idempotency_key)
        if not created:
            return job, False
        self.jobs_submitted.inc()
        try:
            await run_in_threadpool(self.reconcile_job, job.id)
        except RayUnavailable as e:
            log.warning("job %s stays queued: %s", job.id, e)
        return await run_in_threadpool(self.get_job, job.id, who), True

    def _job(self, job_id: str) -> Job | None:
        with self.store.session() as db:
            return self.store.get(db, job_id)

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
                    await run_in_threadpool(self.ray.stop, job.ray_id)
                await run_in_threadpool(self.reconcile_job, job_id)
        return await run_in_threadpool(self.get_job, job_id, who)

    async def delete_job(self, job_id: str, who: Token) -> None:
        def drop(db: Session) -> int:
            job = self.store.owned(db, job_id, who)
            self.store.delete(db, job)
            return job.restarts or 0

        restarts = await run_in_threadpool(self.store.run, drop)
        if self._ray is not None:  # every attempt's record on Ray
            for n in range(restarts + 1):
                await run_in_threadpool(self.ray.delete, ray_submission_id(job_id, n))

    def ingest(self, job_id: str, token: str, metrics: list[MetricRecord], checkpoints: list[tuple[int, str]]) -> int:
        """A driver's push of step metrics and checkpoints, with its job's ingest token."""
        with self.store.session(write=True) as db:
            job = self.store.get(db, job_id)
            if job is None or not token or not secrets.compare_digest(job.ingest_token_hash, sha256(token)):
                raise Unauthorized("invalid ingest token")
            if job.state in TERMINAL_STATES:
                raise Conflict(f"job {job_id} is {job.state}: it takes no more metrics")
            added = self.store_metrics(db, job, metrics, "push")
            self.store.add_checkpoints(db, job_id, checkpoints)
        return added

    # -- logs
    async def logs(self, job_id: str, who: Token, lines: int, attempt: int | None = None) -> str:
        """The last `lines` lines of the job's driver log (at most LOG_READ_BYTES of them): the current
        attempt's, or attempt N's (0 = the first submission, N = restart N) while Ray keeps it."""
        job = await run_in_threadpool(self.get_job, job_id, who)
        restarts = job.restarts or 0
        if attempt is not None and attempt > restarts:
            raise OutOfRange(
                f"attempt = {attempt}: job {job_id} has attempts 0..{restarts} (0 = the first submission, "
                f"N = restart N)"
            )
        if not job.submitted and (attempt is None or attempt == restarts):
            return ""
        ray_id = job.ray_id if attempt is None else ray_submission_id(job.id, attempt)
        try:
            return await run_in_threadpool(self.ray.log_tail, ray_id, lines, LOG_READ_BYTES)
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
            await asyncio.sleep(1)
            waited += 1
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

    # -- reconciler
    def submit(self, job: Job) -> None:
        """Submit with a fresh ingest token: the token reaches the driver in its environment
        (REPORT_TOKEN_ENV) and nowhere else; only its hash is stored, and only when this submission
        started the job (when Ray already had it - a concurrent pass, a crash before the job was marked -
        the running driver keeps the token it got, and so does the store)."""
        token = secrets.token_urlsafe(32)
        env = {JOB_CONFIG_ENV: config_env(job.config), REPORT_TOKEN_ENV: token, **JOB_ENV_VARS}
        if self.ray.submit(job.ray_id, ENTRYPOINT, {"env_vars": env}):
            with self.store.session(write=True) as db:
                if (j := self.store.get(db, job.id)) is not None:
                    j.ingest_token_hash = sha256(token)

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
        # Ray is asked outside any transaction: a slow head must not hold the job store's write lock
        with self.store.session() as db:
            job = self.store.get(db, job_id)
        if job is None or job.state in TERMINAL_STATES:
            return
        if not job.submitted:
            if job.cancel_requested:
                self._set_state(job_id, JobState.CANCELLED.value, "cancelled before it started")
                return
            self.submit(job)  # RayUnavailable propagates: nothing changes
            with self.store.session(write=True) as db:
                if (j := self.store.get(db, job_id)) is not None:
                    j.submitted, j.message = True, "submitted to Ray"
            return
        try:
            state, message = self.ray.status(job.ray_id)
        except JobNotFound:
            # Ray lost it (a new head, e.g. the embedded one after a restart): start it again; with
            # trainer.resume=auto it continues from its newest checkpoint
            self.submit(job)
            self._set_state(job_id, JobState.PENDING.value, "resubmitted: the Ray cluster had no record of it")
            return
        if job.cancel_requested and state in (JobState.PENDING.value, JobState.RUNNING.value):
            with contextlib.suppress(JobNotFound):
                self.ray.stop(job.ray_id)
        if state == JobState.FAILED.value and not job.cancel_requested:
            self.fail_or_restart(job, message)
            return
        with self.store.session(write=True) as db:
            j = self.store.get(db, job_id)
            if j is not None and j.state not in TERMINAL_STATES:
                self.ingest_files(db, j)
                self.store.set_state(db, j, state, message)

    def driver_log(self, job: Job, lines: int = 400) -> str:
        """The end of the current attempt's driver log, or '' when Ray cannot give it."""
        try:
            return self.ray.log_tail(job.ray_id, lines, LOG_READ_BYTES)
        except (RayUnavailable, JobNotFound):
            return ""

    def fail_or_restart(self, job: Job, message: str) -> None:
        """A failed attempt (the driver, a learner or an engine died; a timeout; the head or the job's
        supervisor died): within the job's trainer.max_restarts the job goes back to PENDING, to be
        submitted again as a new Ray submission (`Job.ray_id`), resuming from its newest checkpoint.
        The steps the failed attempt stored after that checkpoint are dropped (the next attempt logs them
        again), so the finished job holds each step once. An attempt that made no progress is restarted
        only for a death or a timeout. Otherwise, and once the budget is spent, the job is FAILED."""
        budget = int((job.config.get("trainer") or {}).get("max_restarts", 0))
        reason = failure_reason(message, self.driver_log(job))  # Ray is asked outside any transaction
        with self.store.session(write=True) as db:  # what the attempt wrote before it died
            j = self.store.get(db, job.id)
            if j is None or j.state in TERMINAL_STATES:
                return
            self.ingest_files(db, j)
            failure = {"at": now().isoformat(), "step": j.last_step, "reason": reason, "resumed_from": None}
            failures = [*(j.failures or []), failure]
            attempt_start = (j.failures or [{}])[-1].get("resumed_from") or 0
            retry = j.last_step > attempt_start or infrastructure_failure(f"{message}\n{reason}")
            if j.restarts >= budget or not retry:
                j.failures = failures
                if not retry and budget > j.restarts:
                    note = "not restarted (it failed before its first step, with an error of its own): "
                elif budget:
                    note = f"failed after {j.restarts} restart(s) (trainer.max_restarts = {budget}): "
                else:
                    note = ""
                self.store.set_state(db, j, JobState.FAILED.value, note + message)
                return
        run = RunDir(job.run_dir)
        steps = [s for p in run.complete_checkpoints() if (s := RunDir.checkpoint_step(p)) is not None]
        resume_at = max(steps, default=0)
        with self.store.session(write=True) as db:
            j = self.store.get(db, job.id)
            if j is None or j.state in TERMINAL_STATES:
                return
            failure["resumed_from"] = resume_at
            j.failures, j.restarts, j.submitted = failures, j.restarts + 1, False
            self.store.rewind(db, j, resume_at)
            self.restarts_total.inc()
            where = f"from its step-{resume_at} checkpoint" if resume_at else "from the start (no checkpoint yet)"
            self.store.set_state(
                db, j, JobState.PENDING.value, f"restart {j.restarts} of {budget} {where} after: {reason}"
            )

    def _set_state(self, job_id: str, state: str, message: str) -> None:
        with self.store.session(write=True) as db:
            if (job := self.store.get(db, job_id)) is not None:
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
