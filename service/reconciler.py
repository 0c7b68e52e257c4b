"""The reconciler: keeps the job store in step with Ray, and its restart policy.

Each pass submits what Ray never accepted, follows Ray's view of the rest, picks up the steps and
checkpoints a driver wrote to its run directory, and restarts a failed job within its
`trainer.max_restarts`. Ray is asked outside any transaction: a slow head must not hold the job
store's write lock. One reconciler runs at a time over a shared job store (`JobStore.try_lead`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from actors.common.config import JobConfig
from actors.common.config_load import format_validation_error
from actors.common.contract import (
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
from service.db import Job, now
from service.failures import failure_reason, infrastructure_failure
from service.queue import AdmissionQueue
from service.rayjobs import JobBackend, JobNotFound, RayUnavailable
from service.settings import Settings
from service.store import JobStore
from service.telemetry import Telemetry
from service.tokens import sha256

log = logging.getLogger("forkrl.service")

__all__ = ["Reconciler", "config_env", "restart_budget", "LOG_READ_BYTES"]

LOG_READ_BYTES = 4 << 20  # most bytes of log one non-follow read holds


def config_env(config: dict[str, Any]) -> str:
    """The config as the driver's environment variable holds it (UTF-8 JSON)."""
    return json.dumps(config, ensure_ascii=False, separators=(",", ":"))


def restart_budget(config: dict[str, Any]) -> int:
    """`trainer.max_restarts` of a stored config, read through JobConfig: a config stored before the field
    existed gets the schema's default, as every other field it lacks does. Raises ValidationError."""
    return JobConfig.model_validate(config).trainer.max_restarts


def newest_checkpoint(run_dir: str) -> int:
    """The step of the run's newest complete checkpoint (0: none), where its next attempt resumes."""
    steps = [s for p in RunDir(run_dir).complete_checkpoints() if (s := RunDir.checkpoint_step(p)) is not None]
    return max(steps, default=0)


def _failed_note(retry: bool, restarts: int, budget: int) -> str:
    """What the FAILED message says before Ray's, when the restart policy lets the job end."""
    if not retry and budget > restarts:
        return "not restarted (it failed before its first step, with an error of its own): "
    if budget:
        return f"failed after {restarts} restart(s) (trainer.max_restarts = {budget}): "
    return ""


class Reconciler:
    def __init__(self, store: JobStore, ray: JobBackend, telemetry: Telemetry, settings: Settings) -> None:
        self.store = store
        self.ray = ray
        self.telemetry = telemetry
        self.settings = settings
        self.ray_ready = False  # whether the Jobs API answered the last pass
        self.leading = False  # whether this replica runs the reconciler
        self._read_upto: dict[str, int] = {}  # job id -> bytes of metrics.jsonl already read
        self.queue = AdmissionQueue(store, ray, settings)

    async def run_forever(self) -> None:
        # a pass that finds Ray unreachable (not up yet, restarting) changes nothing; the next retries
        t = self.telemetry
        while True:
            t0 = time.perf_counter()
            try:
                # one reconciler at a time over a shared job store (several control-plane replicas on
                # PostgreSQL): the others stand by and take over when the leader's session ends
                self.leading = leading = await run_in_threadpool(self.store.try_lead)
                t.leader_gauge.set(float(leading))
                if leading:
                    await run_in_threadpool(self.reconcile)
                self.ray_ready = await run_in_threadpool(self.ray.ping)
            except RayUnavailable as e:
                self.ray_ready = False
                log.debug("reconcile: %s", e)
            except Exception:  # keep reconciling; a bad row must not stop the loop
                log.exception("reconcile pass failed")
            t.ray_gauge.set(float(self.ray_ready))
            t.reconcile_seconds.set(time.perf_counter() - t0)
            await asyncio.sleep(self.settings.reconcile_interval_s)

    def submit(self, job: Job) -> None:
        """Submit with a fresh ingest token: the token reaches the driver in its environment
        (REPORT_TOKEN_ENV) and nowhere else; only its hash is stored, and only when this submission
        started the job (when Ray already had it - a concurrent pass, a crash before the job was marked -
        the running driver keeps the token it got, and so does the store)."""
        token = secrets.token_urlsafe(32)
        env = {JOB_CONFIG_ENV: config_env(job.config), REPORT_TOKEN_ENV: token, **JOB_ENV_VARS}
        if self.ray.submit(job.ray_id, ENTRYPOINT, {"env_vars": env}, job.priority or 0):
            with self.store.session(write=True) as db:
                if (j := self.store.get(db, job.id)) is not None:
                    j.ingest_token_hash = sha256(token)

    def reconcile(self) -> None:
        """One pass: admit what fits, submit what was never accepted, follow Ray's view of the rest, pick
        up files."""
        try:
            self.queue.admit()
        except RayUnavailable as e:  # the queued jobs wait; the admitted ones are still followed
            log.debug("admission: %s", e)
        with self.store.session() as db:
            ids = self.store.active_ids(db)
        for job_id in ids:
            self.reconcile_job(job_id)
        with self.store.session() as db:
            counts = self.store.count_by_state(db)
        for state in JobState:
            self.telemetry.jobs_gauge.labels(state.value).set(counts.get(state.value, 0))

    def reconcile_job(self, job_id: str) -> None:
        # Ray is asked outside any transaction: a slow head must not hold the job store's write lock
        with self.store.session() as db:
            job = self.store.get(db, job_id)
        if job is None or job.state in TERMINAL_STATES:
            return
        if job.state == JobState.QUEUED.value and not job.submitted:  # not admitted yet: only a cancel changes it
            if job.cancel_requested:
                self._set_state(job_id, JobState.CANCELLED.value, "cancelled while queued")
            return
        if not job.submitted:
            if job.cancel_requested:
                self._set_state(job_id, JobState.CANCELLED.value, "cancelled before it started")
                return
            if job.preempt_at is not None:  # admitted, then preempted before Ray had it: back in line
                with self.store.session(write=True) as db:
                    if (j := self.store.get(db, job_id)) is not None:
                        j.preempt_at = None
                        self.store.set_state(db, j, JobState.QUEUED.value, "preempted before it started")
                return
            try:
                self.submit(job)  # RayUnavailable propagates: nothing changes
            except ValueError as e:  # the backend cannot run it as configured (a template changed since)
                self._set_state(job_id, JobState.FAILED.value, f"not started: {e}")
                return
            with self.store.session(write=True) as db:
                if (j := self.store.get(db, job_id)) is not None:
                    j.submitted = True
                    j.message = "RayJob created for Kueue" if self.settings.admission == "kueue" else "submitted to Ray"
                ended = j is None or j.state in TERMINAL_STATES  # cancelled or deleted while it was submitted
            if ended:
                with contextlib.suppress(JobNotFound, RayUnavailable):
                    self.ray.stop(job.ray_id)
            return
        try:
            state, message = self.ray.status(job.ray_id)
        except JobNotFound:
            if job.cancel_requested:  # stopped by deleting it (a Kueue RayJob), or Ray lost it meanwhile
                self._set_state(job_id, JobState.CANCELLED.value, "cancelled")
                return
            # Ray lost it (a new head, e.g. the embedded one after a restart): start it again; with
            # trainer.resume=auto it continues from its newest checkpoint
            self.submit(job)
            self._set_state(job_id, JobState.PENDING.value, "resubmitted: the Ray cluster had no record of it")
            return
        if job.cancel_requested and state in (JobState.QUEUED.value, JobState.PENDING.value, JobState.RUNNING.value):
            with contextlib.suppress(JobNotFound):
                self.ray.stop(job.ray_id)
        if job.preempt_at is not None and not job.cancel_requested:
            if state in (JobState.PENDING.value, JobState.RUNNING.value):
                self._stop_after_grace(job)
                message = ""  # keep "being preempted ..." while it finishes its step
            elif self._requeue_preempted(job, state):
                return
        if state == JobState.FAILED.value and not job.cancel_requested:
            self.fail_or_restart(job, message)
            return
        if state == JobState.QUEUED.value and job.state == JobState.RUNNING.value and not job.cancel_requested:
            self._suspended(job)  # Kueue took its pods back (preempted): it resumes when admitted again
            return
        with self.store.session(write=True) as db:
            j = self.store.get(db, job_id)
            if j is not None and j.state not in TERMINAL_STATES:
                self.ingest_files(db, j)
                if j.preempt_at is not None and state == JobState.SUCCEEDED.value:
                    j.preempt_at = None  # it had finished its last step before it could stop
                self.store.set_state(db, j, state, message)

    def driver_log(self, job: Job, lines: int = 400) -> str:
        """The end of the current attempt's driver log, or '' when Ray cannot give it."""
        try:
            return self.ray.log_tail(job.ray_id, lines, LOG_READ_BYTES)
        except (RayUnavailable, JobNotFound):
            return ""

    def fail_or_restart(self, job: Job, message: str) -> None:
        """A failed attempt (the driver, a learner or an engine died; a timeout; the head or the job's
        supervisor died; the node it ran on): within the job's trainer.max_restarts the job goes back to
        QUEUED (PENDING with admission off or kueue), to be submitted again, once its demand fits, as a new Ray
        submission (`Job.ray_id`), resuming from its newest checkpoint.
        The steps the failed attempt stored after that checkpoint are dropped (the next attempt logs them
        again), so the finished job holds each step once. An attempt that made no progress is restarted
        only for a death or a timeout. Otherwise, and once the budget is spent, the job is FAILED."""
        try:
            budget = restart_budget(job.config)
        except ValidationError as e:  # stored under an older schema: a resubmitted driver would refuse it too
            budget = 0
            message += f"\n(not restarted: its stored config is no longer valid: {format_validation_error(e)})"
        reason = failure_reason(message, self.driver_log(job))  # Ray is asked outside any transaction
        failures = self._fail_unless_retried(job, message, reason, budget)
        if failures is not None:
            self._restart(job, failures, reason, budget)

    def _fail_unless_retried(self, job: Job, message: str, reason: str, budget: int) -> list[dict[str, Any]] | None:
        """Record the failed attempt; FAILED (and None) unless the policy restarts it: then the failures
        with this one last, its `resumed_from` still to be set."""
        with self.store.session(write=True) as db:  # what the attempt wrote before it died
            j = self.store.get(db, job.id)
            if j is None or j.state in TERMINAL_STATES:
                return None
            self.ingest_files(db, j)
            failure = {"at": now().isoformat(), "step": j.last_step, "reason": reason, "resumed_from": None}
            failures = [*(j.failures or []), failure]
            attempt_start = (j.failures or [{}])[-1].get("resumed_from") or 0
            retry = j.last_step > attempt_start or infrastructure_failure(f"{message}\n{reason}")
            if j.restarts >= budget or not retry:
                j.failures = failures
                self.store.set_state(db, j, JobState.FAILED.value, _failed_note(retry, j.restarts, budget) + message)
                return None
        return failures

    def _restart(self, job: Job, failures: list[dict[str, Any]], reason: str, budget: int) -> None:
        """Back to QUEUED (PENDING with admission off or kueue) as the next attempt, from the newest complete
        checkpoint (its later steps dropped)."""
        if self.settings.admission == "kueue":  # the failed RayJob goes first: no second driver on the run
            with contextlib.suppress(JobNotFound):
                self.ray.stop(job.ray_id)  # RayUnavailable propagates: the next pass tries again
        resume_at = newest_checkpoint(job.run_dir)
        with self.store.session(write=True) as db:
            j = self.store.get(db, job.id)
            if j is None or j.state in TERMINAL_STATES:
                return
            failures[-1]["resumed_from"] = resume_at
            j.failures, j.restarts, j.submitted = failures, j.restarts + 1, False
            j.ingest_token_hash = ""  # the failed attempt's driver may not push any more
            self.store.rewind(db, j, resume_at)
            self.telemetry.restarts_total.inc()
            where = f"from its step-{resume_at} checkpoint" if resume_at else "from the start (no checkpoint yet)"
            # through the queue: the next attempt starts when its whole demand fits again (a lost node
            # shrank the cluster; another job may have taken the room meanwhile)
            state = JobState.QUEUED if self.settings.admission == "queue" else JobState.PENDING
            self.store.set_state(db, j, state.value, f"restart {j.restarts} of {budget} {where} after: {reason}")

    def _stop_after_grace(self, job: Job) -> None:
        """A preempted job still running after FORKRL_PREEMPT_GRACE_S (its driver did not hear, or its step
        is long): stopped through Ray; it resumes from its newest checkpoint."""
        asked = job.preempt_at
        if asked is not None and asked.tzinfo is None:
            asked = asked.replace(tzinfo=now().tzinfo)  # SQLite keeps no zone; every time stored is UTC
        if asked is not None and (now() - asked).total_seconds() > self.settings.preempt_grace_s:
            log.warning("job %s: not stopped %.0f s after it was preempted: stopping it", job.id,
                        self.settings.preempt_grace_s)  # fmt: skip
            with contextlib.suppress(JobNotFound):
                self.ray.stop(job.ray_id)

    def _requeue_preempted(self, job: Job, ray_state: str) -> bool:
        """A preempted job's attempt ended: back to QUEUED as its next attempt, from its newest checkpoint
        (the one its driver saved when it stopped), with its later steps dropped; not a restart. False when
        the attempt had finished every step (it succeeded before it could stop)."""
        with self.store.session(write=True) as db:
            j = self.store.get(db, job.id)
            if j is None or j.state in TERMINAL_STATES:
                return True
            self.ingest_files(db, j)
            if ray_state == JobState.SUCCEEDED.value and j.total_steps and j.last_step >= j.total_steps:
                return False
            says = "preempted at step {step} for a higher-priority job; resumes {where}"
            self._next_attempt(db, j, JobState.QUEUED, says)
        return True

    def _next_attempt(self, db: Session, j: Job, state: JobState, says: str) -> None:
        """A preempted job goes on as its next attempt (not a restart): its steps after the newest checkpoint
        dropped, the ended attempt's ingest token void; `says` with {step} (where it stopped) and {where}."""
        resume_at, stopped_at = newest_checkpoint(j.run_dir), j.last_step
        self.store.rewind(db, j, resume_at)
        j.preemptions, j.preempt_at, j.submitted = (j.preemptions or 0) + 1, None, False
        j.ingest_token_hash = ""  # a dying driver of the ended attempt may not push after the rewind
        self.telemetry.preemptions_total.inc()
        where = f"from its step-{resume_at} checkpoint" if resume_at else "from the start (no checkpoint)"
        self.store.set_state(db, j, state.value, says.format(step=stopped_at, where=where))

    def _suspended(self, job: Job) -> None:
        """A running job whose RayJob Kueue suspended (preempted for a higher-priority workload, or its quota
        reclaimed): its Ray cluster is gone. Its RayJob is deleted (Kueue would start it again as it was) and
        the job goes on as its next attempt, a new RayJob that Kueue admits in turn, resuming from the newest
        checkpoint; the steps after it are dropped. A preemption, not a restart."""
        with contextlib.suppress(JobNotFound):
            self.ray.stop(job.ray_id)  # RayUnavailable propagates: the next pass tries again
        with self.store.session(write=True) as db:
            j = self.store.get(db, job.id)
            if j is None or j.state in TERMINAL_STATES:
                return
            self.ingest_files(db, j)
            says = "suspended by Kueue at step {step} (preempted); resumes {where} once Kueue admits it again"
            self._next_attempt(db, j, JobState.PENDING, says)

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
        """Every step enters here, pushed by the driver or read from its file; the first one stored marks a
        submitted job RUNNING."""
        added = self.store.add_metrics(db, job, records)
        if added:
            self.telemetry.metrics_ingested.labels(source).inc(added)
            if job.state == JobState.PENDING.value and job.submitted:
                self.store.set_state(db, job, JobState.RUNNING.value, "training")
        return added
