"""The control plane's core: the job store, Ray submission and the reconciler that keeps them in
step (the routes in service/app.py call into it)."""

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from actors.config import JobConfig
from service.db import STATES, TERMINAL, Checkpoint, Event, Job, Metric, Store, Token, migrate, now
from service.rayjobs import JobNotFound, LocalRayHead, RayJobs, RayUnavailable
from service.settings import Settings

log = logging.getLogger("forkrl.service")

ENTRYPOINT = "python -m actors.train --config-env FORKRL_JOB_CONFIG"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


class Service:
    """What the routes share: settings, store, Ray, metrics registry, reconciler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.head: LocalRayHead | None = None
        self.ray: RayJobs | None = None
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

    # -- lifecycle
    def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        s.runs_path.mkdir(parents=True, exist_ok=True)
        self.store = Store(s.db_url)
        migrate(self.store.engine)
        self._bootstrap_admin()
        if s.ray_address:
            self.ray = RayJobs(s.ray_address, s.ray_auth_token)
        else:
            self.head = LocalRayHead(s.ray_num_cpus)
            self.head.start()
            self.ray = RayJobs(self.head.address, self.head.token)

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
        with self.db() as db:
            if db.scalar(select(Token).where(Token.token_hash == digest)) is None:
                db.add(Token(owner="admin", token_hash=digest, is_admin=True))

    def db(self) -> Any:
        assert self.store is not None
        return self.store.session()

    async def run_background(self) -> None:
        assert self.ray is not None
        ray = self.ray
        try:
            await run_in_threadpool(ray.wait_ready, 180)
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

    def stop(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.head is not None:
            self.head.stop()

    # -- jobs
    def effective_config(self, job_id: str, cfg: JobConfig, ingest_token: str) -> dict[str, Any]:
        data = cfg.model_dump(mode="json")
        data["trainer"]["output_dir"] = str(self.settings.runs_path / job_id)
        data["tracking"]["report_url"] = f"{self.settings.report_base_url}/v1/jobs/{job_id}/ingest"
        data["tracking"]["report_token"] = ingest_token
        return data

    def submit(self, job_id: str, config: dict[str, Any]) -> None:
        assert self.ray is not None
        runtime_env = {
            "env_vars": {
                "FORKRL_JOB_CONFIG": json.dumps(config),
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore::FutureWarning",
            }
        }
        self.ray.submit(job_id, ENTRYPOINT, runtime_env)

    def set_state(self, db: Any, job: Job, state: str, message: str = "") -> None:
        if job.state == state and (not message or job.message == message):
            return
        changed = job.state != state
        job.state, job.message = state, message or job.message
        if state == "RUNNING" and job.started_at is None:
            job.started_at = now()
        if state in TERMINAL and job.ended_at is None:
            job.ended_at = now()
        if changed:
            db.add(Event(job_id=job.id, state=state, message=job.message))

    def reconcile(self) -> None:
        """One pass: submit what was never accepted, follow Ray's view of the rest, pick up files."""
        assert self.ray is not None
        with self.db() as db:
            ids = list(db.scalars(select(Job.id).where(Job.state.not_in(TERMINAL))))
        for job_id in ids:
            self.reconcile_job(job_id)
        with self.db() as db:
            counts = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in STATES:
            self.jobs_gauge.labels(state).set(counts.get(state, 0))

    def reconcile_job(self, job_id: str) -> None:
        assert self.ray is not None
        with self.db() as db:
            job = db.scalar(select(Job).where(Job.id == job_id))
            if job is None or job.state in TERMINAL:
                return
            if not job.submitted:
                if job.cancel_requested:
                    self.set_state(db, job, "CANCELLED", "cancelled before it started")
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
                self.set_state(db, job, "PENDING", "resubmitted: the Ray cluster had no record of it")
                return
            if job.cancel_requested and state in ("PENDING", "RUNNING"):
                with contextlib.suppress(JobNotFound):
                    self.ray.stop(job.id)
            self.ingest_files(db, job)
            self.set_state(db, job, state, message)

    def ingest_files(self, db: Any, job: Job) -> None:
        """Steps and checkpoints written to the run directory that the driver could not push."""
        run = Path(job.run_dir)
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            # only what was appended since the last pass, complete lines only (the driver may be mid-write)
            with metrics.open("rb") as f:
                f.seek(self._read_upto.get(job.id, 0))
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._read_upto[job.id] = self._read_upto.get(job.id, 0) + len(complete)
            rows = []
            for line in complete.decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):  # store_metrics keeps each step once
                    rows.append(rec)
            self.store_metrics(db, job, rows, "file")
        ckpts = run / "checkpoints"
        if ckpts.is_dir():
            known = set(db.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job.id)))
            for marker in ckpts.glob("step_*/driver.json"):
                try:
                    step = int(json.loads(marker.read_text())["step"])
                except (ValueError, KeyError, json.JSONDecodeError):
                    continue
                if step not in known:
                    db.add(Checkpoint(job_id=job.id, step=step, path=str(marker.parent)))

    def store_metrics(self, db: Any, job: Job, records: list[dict[str, Any]], source: str) -> int:
        have = set(db.scalars(select(Metric.step).where(Metric.job_id == job.id)))
        added = 0
        for rec in records:
            step = rec.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or step < 0 or step in have:
                continue
            db.add(Metric(job_id=job.id, step=step, data=finite(rec)))
            have.add(step)
            job.last_step = max(job.last_step, step)
            added += 1
        if added:
            self.metrics_ingested.labels(source).inc(added)
            if job.state == "PENDING" and job.submitted:
                self.set_state(db, job, "RUNNING", "training")
        return added
