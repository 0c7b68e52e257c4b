"""The job store: SQLAlchemy 2 models, engine and Alembic migrations (SQLite or PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from actors.common.contract import JobState


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of a 256-bit random token
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    bootstrap: Mapped[bool] = mapped_column(Boolean, default=False)  # from FORKRL_ADMIN_TOKEN: revoked on rotation

    def usable(self, at: dt.datetime) -> bool:
        expires = self.expires_at
        if expires is not None and expires.tzinfo is None:  # SQLite hands back naive UTC
            expires = expires.replace(tzinfo=dt.timezone.utc)
        return self.revoked_at is None and (expires is None or expires > at)


def ray_submission_id(job_id: str, attempt: int) -> str:
    return job_id if attempt == 0 else f"{job_id}-r{attempt}"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    state: Mapped[str] = mapped_column(String(16), index=True, default=JobState.PENDING.value)
    message: Mapped[str] = mapped_column(Text, default="")
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ingest_token_hash: Mapped[str] = mapped_column(String(64))
    submitted: Mapped[bool] = mapped_column(Boolean, default=False)  # accepted by Ray at least once
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[int] = mapped_column(Integer, default=0)
    run_dir: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # resubmissions after a failure (trainer.max_restarts)
    # each failed attempt: at, step, reason, resumed_from
    failures: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # the model's parameters, trainable (LoRA: the adapters) and all, from the run's first metric record
    trainable_params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # the admission queue's order: higher first
    # preemption: when the queue asked it to stop for a higher-priority job (None: not asked), and how
    # often it went back to the queue so (each time a new attempt, as a restart is)
    preempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    preemptions: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def attempt(self) -> int:
        """The current attempt: 0 for the first submission, one more for each restart and preemption."""
        return (self.restarts or 0) + (self.preemptions or 0)

    @property
    def ray_id(self) -> str:
        """The Ray submission id of the current attempt: the job id, then <job id>-r<N> for attempt N (Ray
        does not support submitting a deleted submission id again)."""
        return ray_submission_id(self.id, self.attempt)


class Quota(Base):
    """An owner's admission quota, set by an admin: bounds on what its admitted jobs hold at once."""

    __tablename__ = "quotas"
    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_cpus: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_gpus: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_metrics_job_step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_job_step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)


class Event(Base):
    """State changes, in order: what /events replays and streams."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=now)


WRITE = "forkrl_write"  # execution option of a session that writes
MIGRATION_LOCK = 0x666F726B726C02  # PostgreSQL advisory lock key held while migrating


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # the job store holds every owner's configs and token hashes: the service user's alone (SQLite
            # creates the -wal and -shm files with the database file's mode)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(path, 0o600)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn: Any, _record: Any) -> None:
            conn.isolation_level = None  # transactions begin in _sqlite_begin, not inside the driver
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # a writing transaction takes the write lock up front (waiting up to busy_timeout); a deferred
            # one that reads and then writes fails at once with "database is locked" when another writer
            # committed in between, which concurrent requests do
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (service/migrations)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # replicas starting together migrate one after the other: the next finds the schema current
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction; `write=True` for one that writes (on SQLite it takes the write lock first)."""
        with self._sessions() as s, s.begin():
            if write:
                s.connection(execution_options={WRITE: True})
            yield s

    def close(self) -> None:
        self.engine.dispose()
