"""The REST API's request and response models."""

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from actors.contract import JobState
from service.db import Job


class JobOut(BaseModel):
    id: str
    name: str
    owner: str
    state: JobState
    message: str
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    total_steps: int
    last_step: int
    run_dir: str
    cancel_requested: bool
    config: dict[str, Any] | None = None


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last")


class MetricsOut(BaseModel):
    job_id: str
    state: str
    last_step: int
    metrics: list[dict[str, Any]]


class CheckpointOut(BaseModel):
    step: int
    path: str
    created_at: dt.datetime


class CheckpointList(BaseModel):
    job_id: str
    checkpoints: list[CheckpointOut]


class IngestCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)
    path: str = Field(max_length=4096)


class IngestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metrics: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    checkpoints: list[IngestCheckpoint] = Field(default_factory=list, max_length=1000)


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@-]+$")
    admin: bool = False


class TokenOut(BaseModel):
    owner: str
    admin: bool
    token: str = Field(description="shown once; only its hash is stored")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


def job_out(job: Job, with_config: bool = False) -> JobOut:
    return JobOut(
        id=job.id, name=job.name, owner=job.owner, state=JobState(job.state), message=job.message,
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, ended_at=job.ended_at,
        total_steps=job.total_steps, last_step=job.last_step, run_dir=job.run_dir,
        cancel_requested=job.cancel_requested, config=job.config if with_config else None,
    )  # fmt: skip
