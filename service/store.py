"""The job store's queries: every read and write of jobs, events, metrics, checkpoints and tokens.

Routes and the reconciler call these methods with a session from `JobStore.session()`; nothing
else builds a query. Access rules live here too: `owned` raises `NotFound` / `Forbidden`, which the
app maps to 404 / 403.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import Connection, Text, case, cast, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from actors.common.config import JobConfig
from actors.common.contract import TERMINAL_STATES, JobState, MetricRecord, finite
from service.db import Checkpoint, Event, Job, Metric, Quota, Store, Token, now
from service.limits import MAX_STEP

QUEUED_MESSAGE = "queued: waiting for the admission pass"

__all__ = ["JobStore", "StepJSON", "NotFound", "Forbidden", "Conflict", "MAX_STEP"]

RECONCILER_LOCK = 0x666F726B726C01  # PostgreSQL advisory lock keys of forkrl ("forkrl" + 1)
PAGE_ROWS = 500  # most step records one page of a metric read holds, whatever their size


class StepJSON(NamedTuple):
    """A stored step record as its JSON text (one line: the store writes it with json.dumps)."""

    step: int
    json: str


class NotFound(LookupError):
    """No such job (404)."""


class Forbidden(PermissionError):
    """The job belongs to another owner (403)."""


class Conflict(RuntimeError):
    """The request contradicts what is stored (409)."""


def _parameter_counts(record: dict[str, Any]) -> tuple[int, int] | None:
    """(trainable, all) parameters a metric record reports (model/trainable_params, model/params), if sane."""
    pair = record.get("model/trainable_params"), record.get("model/params")
    if all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 10**15 for v in pair):
        return int(pair[0]), int(pair[1])  # type: ignore[arg-type]
    return None


class JobStore:
    def __init__(self, url: str) -> None:
        self._store = Store(url)
        self.engine = self._store.engine
        self._lead: Connection | None = None  # the connection holding the reconciler lock

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction; `write=True` when it writes."""
        with self._store.session(write) as db:
            yield db

    def close(self) -> None:
        if self._lead is not None:
            with contextlib.suppress(Exception):
                self._lead.invalidate()  # ends the session, and with it the advisory lock
        self._store.close()

    def try_lead(self) -> bool:
        """Whether this process runs the reconciler: on PostgreSQL, while it holds a session-level
        advisory lock on a connection of its own (released when the process or its connection dies);
        on SQLite always (one control plane per file)."""
        if self.engine.dialect.name != "postgresql":
            return True
        if self._lead is not None:
            try:
                self._lead.exec_driver_sql("SELECT 1")
                self._lead.commit()
                return True
            except Exception:  # the connection, and the lock with it, is gone: try again below
                with contextlib.suppress(Exception):
                    self._lead.invalidate()
                self._lead = None
        conn = self.engine.connect()
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": RECONCILER_LOCK}).scalar())
        conn.commit()
        if got:
            self._lead = conn
        else:
            conn.close()
        return got

    # -- tokens
    def token_by_hash(self, db: Session, digest: str) -> Token | None:
        return db.scalar(select(Token).where(Token.token_hash == digest))

    def add_token(
        self,
        db: Session,
        owner: str,
        digest: str,
        is_admin: bool,
        expires_at: dt.datetime | None = None,
        bootstrap: bool = False,
    ) -> Token:
        tok = Token(owner=owner, token_hash=digest, is_admin=is_admin, expires_at=expires_at, bootstrap=bootstrap)
        db.add(tok)
        db.flush()
        return tok

    def tokens(self, db: Session) -> list[Token]:
        return list(db.scalars(select(Token).order_by(Token.id)))

    def token(self, db: Session, token_id: int) -> Token:
        tok = db.get(Token, token_id)
        if tok is None:
            raise NotFound(f"no token {token_id}")
        return tok

    def revoke_bootstrap_except(self, db: Session, digest: str) -> int:
        """Revoke every bootstrap admin token but the current one (FORKRL_ADMIN_TOKEN was rotated)."""
        old = list(db.scalars(select(Token).where(Token.bootstrap.is_(True), Token.token_hash != digest,
                                                  Token.revoked_at.is_(None))))  # fmt: skip
        for tok in old:
            tok.revoked_at = now()
        return len(old)

    def owner_kinds(self, db: Session, owner: str) -> tuple[bool, bool]:
        """Whether the owner ever held an admin token, and whether it holds a non-admin one not revoked."""
        rows = db.execute(select(Token.is_admin, Token.revoked_at.is_(None)).where(Token.owner == owner)).all()
        return any(admin for admin, _ in rows), any(not admin and live for admin, live in rows)

    def owner_of(self, db: Session, job_id: str) -> str | None:
        return db.scalar(select(Job.owner).where(Job.id == job_id))

    def job_counts(self, db: Session, owner: str) -> tuple[int, int]:
        """The owner's jobs: (stored, queued or running)."""
        active = func.count(case((Job.state.not_in(TERMINAL_STATES), 1)))
        stored, running = db.execute(select(func.count(), active).where(Job.owner == owner)).one()
        return int(stored), int(running)

    # -- jobs
    def get(self, db: Session, job_id: str) -> Job | None:
        return db.scalar(select(Job).where(Job.id == job_id))

    def owned(self, db: Session, job_id: str, who: Token) -> Job:
        job = self.get(db, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if job.owner != who.owner and not who.is_admin:
            raise Forbidden(f"job {job_id} belongs to another owner")
        return job

    def by_idempotency_key(self, db: Session, owner: str, key: str, config_hash: str) -> Job | None:
        """The owner's earlier job with this key; Conflict if that one had another body."""
        old = db.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
        if old is not None and old.config_hash != config_hash:
            raise Conflict(f"Idempotency-Key {key!r} was used for a different job ({old.id})")
        return old

    def create(
        self,
        db: Session,
        *,
        job_id: str,
        owner: str,
        config: JobConfig,
        config_hash: str,
        idempotency_key: str | None,
        ingest_token_hash: str,
        priority: int = 0,
    ) -> Job:
        """A new QUEUED job with its effective config (stored as JSON) and its first event."""
        job = Job(
            id=job_id, owner=owner, name=config.name, state=JobState.QUEUED.value, message=QUEUED_MESSAGE,
            priority=priority,
            config=config.model_dump(mode="json"), config_hash=config_hash, idempotency_key=idempotency_key,
            ingest_token_hash=ingest_token_hash, total_steps=config.trainer.steps, run_dir=config.trainer.output_dir,
        )  # fmt: skip
        db.add(job)
        db.flush()  # the job row first: events reference it
        db.add(Event(job_id=job_id, state=JobState.QUEUED.value, message=QUEUED_MESSAGE))
        return job

    # -- the admission queue (service/admission.py decides; this reads and writes)
    def in_states(self, db: Session, states: tuple[str, ...]) -> list[Job]:
        return list(db.scalars(select(Job).where(Job.state.in_(states)).order_by(Job.seq)))

    def queue_positions(self, db: Session) -> dict[str, int]:
        """Each QUEUED job's place in the admission order (1 first): priority, then submission. (A job Kueue
        holds suspended is QUEUED and submitted: its place is Kueue's, not counted here.)"""
        q = select(Job.id).where(Job.state == JobState.QUEUED.value, Job.submitted.is_(False))
        ids = db.scalars(q.order_by(Job.priority.desc(), Job.created_at, Job.id))
        return {job_id: i + 1 for i, job_id in enumerate(ids)}

    def quotas(self, db: Session) -> list[Quota]:
        return list(db.scalars(select(Quota).order_by(Quota.owner)))

    def quota(self, db: Session, owner: str) -> Quota | None:
        return db.get(Quota, owner)

    def set_quota(self, db: Session, owner: str, values: dict[str, Any]) -> Quota:
        row = db.get(Quota, owner)
        if row is None:
            row = Quota(owner=owner)
            db.add(row)
        for k, v in values.items():
            setattr(row, k, v)
        row.updated_at = now()
        db.flush()
        return row

    def delete_quota(self, db: Session, owner: str) -> bool:
        row = db.get(Quota, owner)
        if row is not None:
            db.delete(row)
        return row is not None

    def page(
        self, db: Session, owner: str | None, state: str | None, limit: int, cursor: int | None
    ) -> tuple[list[Job], int | None]:
        """Newest first; owner None = every owner. Returns (jobs, next cursor or None)."""
        q = select(Job).order_by(Job.seq.desc()).limit(limit + 1)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if state:
            q = q.where(Job.state == state)
        if cursor is not None:
            q = q.where(Job.seq < cursor)
        rows = list(db.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].seq if more else None)

    def active_ids(self, db: Session) -> list[str]:
        return list(db.scalars(select(Job.id).where(Job.state.not_in(TERMINAL_STATES))))

    def count_by_state(self, db: Session) -> dict[str, int]:
        return {str(s): int(n) for s, n in db.execute(select(Job.state, func.count()).group_by(Job.state)).all()}

    def set_state(self, db: Session, job: Job, state: str, message: str = "") -> None:
        """Record a state (and an event when it changed); stamps started/ended times."""
        if job.state == state and (not message or job.message == message):
            return
        changed = job.state != state
        job.state, job.message = state, message or job.message
        if state == JobState.RUNNING.value and job.started_at is None:
            job.started_at = now()
        if state in TERMINAL_STATES and job.ended_at is None:
            job.ended_at = now()
        if changed:
            db.add(Event(job_id=job.id, state=state, message=job.message))

    def delete(self, db: Session, job: Job) -> None:
        if job.state not in TERMINAL_STATES:
            raise Conflict(f"job {job.id} is {job.state}; cancel it first (only finished jobs are deleted)")
        for model in (Metric, Checkpoint, Event):
            db.execute(delete(model).where(model.job_id == job.id))  # type: ignore[attr-defined]
        db.delete(job)

    # -- metrics, checkpoints, events
    def add_metrics(self, db: Session, job: Job, records: list[MetricRecord]) -> int:
        """Store each step once (a step already stored is kept, also against concurrent requests; within
        one batch the last record of a step counts: a resumed run appends the steps after its checkpoint
        to metrics.jsonl again); returns how many were new. Records without a valid step are skipped."""
        rows: dict[int, dict[str, Any]] = {}
        for rec in records:
            step = rec.get("step")
            if isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= MAX_STEP:
                rows[step] = {"job_id": job.id, "step": step, "data": finite(rec), "created_at": now()}
        if not rows:
            return 0
        added = self._insert_new(db, Metric, list(rows.values()))
        top = max(rows)
        db.execute(update(Job).where(Job.id == job.id, Job.last_step < top).values(last_step=top))
        # every record carries them; stored once, from the first batch that has them
        found = None if job.trainable_params is not None else _parameter_counts(rows[min(rows)]["data"])
        if found is not None:
            db.execute(
                update(Job)
                .where(Job.id == job.id, Job.trainable_params.is_(None))
                .values(trainable_params=found[0], params=found[1])
            )
        return added

    def metrics(self, db: Session, job_id: str, after_step: int, limit: int, max_bytes: int) -> list[StepJSON]:
        """One page of the step records after `after_step`, in step order, each as its stored JSON text (no
        dicts are built: readers that pass records on send the text as it is): at most `limit` records and
        `max_bytes` of text, but at least one. Rows come from the database a few at a time and the read
        stops at the page's end, so the page is all that is loaded."""
        q = select(Metric.step, cast(Metric.data, Text)).where(Metric.job_id == job_id, Metric.step > after_step)
        q = q.order_by(Metric.step).limit(min(limit, PAGE_ROWS)).execution_options(yield_per=8)
        page: list[StepJSON] = []
        total = 0
        for step, data in db.execute(q):
            total += len(data)
            if page and total > max_bytes:
                break
            page.append(StepJSON(step, data))
        return page

    def rewind(self, db: Session, job: Job, step: int) -> int:
        """Forget the stored steps after `step` (an attempt that resumes from its checkpoint at `step` logs
        them again); returns how many were dropped."""
        gone = getattr(db.execute(delete(Metric).where(Metric.job_id == job.id, Metric.step > step)), "rowcount", 0)
        db.execute(delete(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step > step))
        job.last_step = min(job.last_step, step)
        return int(gone)

    def metric_with_samples(self, db: Session, job_id: str, step: int | None) -> Metric | None:
        """The record of `step`, or (None) the newest record that holds sampled completions."""
        if step is not None:
            return db.scalar(select(Metric).where(Metric.job_id == job_id, Metric.step == step))
        q = select(Metric).where(Metric.job_id == job_id).order_by(Metric.step.desc()).limit(64)
        return next((m for m in db.scalars(q) if m.data.get("samples")), None)

    def add_checkpoints(self, db: Session, job_id: str, found: list[tuple[int, str]]) -> None:
        rows = {step: {"job_id": job_id, "step": step, "path": path, "created_at": now()} for step, path in found}
        if rows:
            self._insert_new(db, Checkpoint, list(rows.values()))

    @staticmethod
    def _insert_new(db: Session, model: type[Metric] | type[Checkpoint], rows: list[dict[str, Any]]) -> int:
        """INSERT ... ON CONFLICT (job_id, step) DO NOTHING; how many rows were new."""
        insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
        stmt = insert(model).values(rows).on_conflict_do_nothing(index_elements=["job_id", "step"])
        return len(db.execute(stmt.returning(model.step)).all())

    def checkpoints(self, db: Session, job_id: str) -> list[Checkpoint]:
        return list(db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))

    def events(self, db: Session, job_id: str, after_id: int, limit: int) -> list[Event]:
        q = select(Event).where(Event.job_id == job_id, Event.id > after_id).order_by(Event.id).limit(limit)
        return list(db.scalars(q))

    def ping(self) -> None:
        with self.session() as db:
            db.execute(select(1))

    def run(self, fn: Callable[[Session], Any]) -> Any:
        """fn(session) in one writing transaction (for the thread pool)."""
        with self.session(write=True) as db:
            return fn(db)
