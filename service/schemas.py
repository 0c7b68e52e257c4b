"""The REST API's request and response models (the API client returns them too). Light on purpose: the
job store's rows appear in annotations only, so the client side imports no database."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field

from actors.common.config_load import UNION_TAGS, show_value
from actors.common.contract import JobState
from actors.common.demand import Demand, stored_demand
from service.limits import MAX_CONFIG_BYTES, MAX_STEP

if TYPE_CHECKING:
    from service.db import Job, Token


class FailureOut(BaseModel):
    at: str = Field(description="when the control plane saw the attempt fail (ISO 8601)")
    step: int = Field(description="the last step stored when it failed")
    reason: str = Field(description="Ray's account of the failure: the end of the driver's error")
    resumed_from: int | None = Field(None, description="the checkpoint step the next attempt resumed from; null: none")


class DemandOut(BaseModel):
    cpus: float
    gpus: float
    resources: dict[str, float] = Field(description="every Ray resource requested at once, custom ones included")
    summary: str = Field(
        description='in words, e.g. "3 CPUs, 0 GPUs: rollout engines 1 x 1 CPU, learners 2 x 1 CPU, ..."'
    )

    @classmethod
    def of(cls, d: Demand) -> DemandOut:
        return cls(cpus=d.cpus, gpus=d.gpus, resources=d.resources, summary=d.describe())


class LoraOut(BaseModel):
    rank: int
    alpha: int
    sync: str = Field(description="adapter: the engines get the adapter alone; merged: the merged weights")


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
    restarts: int = Field(0, description="how often the control plane resubmitted it after a failure")
    preemptions: int = Field(0, description="how often it stopped for a higher-priority job and went back to the queue")
    preempting: bool = Field(False, description="asked to stop for a higher-priority job; it stops after this step")
    failures: list[FailureOut] = Field(default_factory=list, description="each failed attempt, oldest first")
    config: dict[str, Any] | None = None
    lora: LoraOut | None = Field(None, description="the job trains LoRA adapters (model.lora); null: every parameter")
    trainable_params: int | None = Field(
        None, description="parameters the job trains (LoRA: the adapters), as its run reports; null until then"
    )
    params: int | None = Field(None, description="all parameters of the model, as the run reports")
    demand: DemandOut | None = Field(
        None, description="the Ray resources all the job's actors request at once (from its config)"
    )
    priority: int = Field(0, description="its place in the admission queue's order: higher first, FIFO within one")
    queue_position: int | None = Field(
        None, description="QUEUED: 1 for the next job to be considered; the message says why it waits. null otherwise"
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def training(self) -> str:
        """What the job trains, in words: "LoRA rank 8 (alpha 16, adapter sync): 0.92 M of 134.5 M
        parameters" or "full fine-tuning" (the counts once the run reported them)."""
        what = "full fine-tuning"
        if self.lora is not None:
            what = f"LoRA rank {self.lora.rank} (alpha {self.lora.alpha}, {self.lora.sync} sync)"
        if self.trainable_params and self.params:
            what += f": {self.trainable_params / 1e6:.2f} M of {self.params / 1e6:.1f} M parameters"
        return what


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last")


class MetricsOut(BaseModel):
    job_id: str
    state: str
    last_step: int
    metrics: list[dict[str, Any]]


class FieldError(BaseModel):
    """One refused field: where (pydantic's loc and the dotted field name), why, and what was given."""

    loc: list[str | int]
    field: str
    msg: str
    type: str
    input: str
    line: int | None = Field(None, description="the line of the field in the YAML that was checked (1-based)")


def field_errors(errors: Any, body: bool = True) -> list[FieldError]:
    """pydantic's errors as FieldErrors: the union tags left out of the field name, a short printable
    form of the input (it may be NaN, a lone surrogate or nested hundreds deep)."""
    out = []
    for e in errors:
        loc = [p if isinstance(p, int) else str(p) for p in e.get("loc", ())]
        where = ".".join(str(p) for p in loc if p != "body" and p not in UNION_TAGS) or ("body" if body else "config")
        msg = "unknown field (not part of JobConfig)" if e.get("type") == "extra_forbidden" else str(e.get("msg"))
        out.append(FieldError(loc=loc, field=where, msg=msg, type=str(e.get("type")), input=show_value(e.get("input"))))
    return out


class ConfigText(BaseModel):
    model_config = ConfigDict(extra="forbid")

    yaml: str = Field(max_length=MAX_CONFIG_BYTES, description="a JobConfig as YAML, as `forkrl submit` reads it")


class ConfigCheck(BaseModel):
    valid: bool
    errors: list[FieldError]
    config: dict[str, Any] | None = Field(None, description="the validated JobConfig as JSON, ready to POST /v1/jobs")


class SamplesOut(BaseModel):
    job_id: str
    step: int
    samples: list[dict[str, Any]] = Field(
        description="sampled completions: per token its text, entropy, kept flag; a multi-turn trajectory also "
        "observation flags (1: the environment's tokens, never trained)"
    )
    forking_tokens: list[dict[str, Any]] = Field(description="the most frequent kept tokens: text, kept, dropped")


class CheckpointOut(BaseModel):
    step: int
    path: str
    created_at: dt.datetime


class CheckpointList(BaseModel):
    job_id: str
    checkpoints: list[CheckpointOut]


# What one pushed metric record may hold: the driver's records are flat scalars plus a few small
# nested structures (sampled completions); these bounds keep every stored record readable back.
MAX_RECORD_DEPTH = 8
MAX_RECORD_BYTES = 256 * 1024


def _text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON allows the escape, no database stores it
        raise ValueError("a string that is not valid Unicode (a lone surrogate)") from None


def _valid_text(s: str) -> str:
    _text(s)
    return s


def _check_value(v: Any, depth: int) -> None:
    if depth > MAX_RECORD_DEPTH:
        raise ValueError(f"nested deeper than {MAX_RECORD_DEPTH} levels")
    if isinstance(v, dict):
        for key, item in v.items():
            if len(key) > 256:
                raise ValueError(f"key {key[:40]!r}... longer than 256 characters")
            _text(key)
            _check_value(item, depth + 1)
    elif isinstance(v, str):
        _text(v)
    elif isinstance(v, list):
        for item in v:
            _check_value(item, depth + 1)
    elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63:
        raise ValueError(f"integer {v} outside the 64-bit range")


def _metric_record(rec: dict[str, Any]) -> dict[str, Any]:
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step = {step!r}: a record needs an integer step in [0, {MAX_STEP}]")
    _check_value(rec, 1)
    size = len(json.dumps(rec, allow_nan=True))
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"record of step {step} is {size} bytes as JSON; at most {MAX_RECORD_BYTES}")
    return rec


MetricIn = Annotated[dict[str, Any], AfterValidator(_metric_record)]


class IngestCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    step: int = Field(ge=0, le=MAX_STEP)
    path: Annotated[str, AfterValidator(_valid_text)] = Field(max_length=4096)


class IngestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    metrics: list[MetricIn] = Field(
        default_factory=list,
        max_length=10_000,
        description=f"step records: an integer step in [0, 2^31), nested at most {MAX_RECORD_DEPTH} deep, at most "
        f"{MAX_RECORD_BYTES} bytes each as JSON",
    )
    checkpoints: list[IngestCheckpoint] = Field(default_factory=list, max_length=1000)


class IngestAnswer(BaseModel):
    metrics_stored: int = Field(description="step records stored (a step already stored is kept once)")
    stop: bool = Field(False, description="preempted: save a checkpoint at the end of the current step and end")


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    owner: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@-]+$")
    admin: bool = False
    expires_in_s: int | None = Field(
        None, ge=60, le=10 * 365 * 86400, description="seconds until the token expires; null: never"
    )


class TokenPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    expires_in_s: int | None = Field(
        ..., ge=0, le=10 * 365 * 86400, description="seconds from now until the token expires (0: now); null: never"
    )


class TokenInfo(BaseModel):
    """A token as admins list it: never the secret."""

    id: int
    owner: str
    admin: bool
    bootstrap: bool = Field(description="the FORKRL_ADMIN_TOKEN of a start; revoked when it is rotated")
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class TokenOut(TokenInfo):
    token: str = Field(description="shown once; only its hash is stored")


def token_info(t: Token) -> TokenInfo:
    return TokenInfo(
        id=t.id, owner=t.owner, admin=t.is_admin, bootstrap=t.bootstrap, created_at=t.created_at,
        expires_at=t.expires_at, revoked_at=t.revoked_at,
    )  # fmt: skip


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


def job_out(job: Job, with_config: bool = False, positions: Mapping[str, int] | None = None) -> JobOut:
    """positions: the queue's (JobStore.queue_positions), for a QUEUED job's queue_position."""
    return JobOut(
        id=job.id, name=job.name, owner=job.owner, state=JobState(job.state), message=job.message,
        created_at=job.created_at, updated_at=job.updated_at, started_at=job.started_at, ended_at=job.ended_at,
        total_steps=job.total_steps, last_step=job.last_step, run_dir=job.run_dir,
        cancel_requested=job.cancel_requested, restarts=job.restarts or 0, preemptions=job.preemptions or 0,
        preempting=job.preempt_at is not None,
        failures=[FailureOut(**f) for f in job.failures or []], config=job.config if with_config else None,
        lora=_lora(job.config), trainable_params=job.trainable_params, params=job.params, demand=_demand(job.config),
        priority=job.priority or 0, queue_position=(positions or {}).get(job.id),
    )  # fmt: skip


def _demand(config: dict[str, Any] | None) -> DemandOut | None:
    d = stored_demand(config)
    return DemandOut.of(d) if d is not None else None


def _lora(config: dict[str, Any] | None) -> LoraOut | None:
    """model.lora of a stored (validated) config."""
    lora = ((config or {}).get("model") or {}).get("lora")
    return LoraOut(rank=lora["rank"], alpha=lora["alpha"], sync=lora["sync"]) if isinstance(lora, dict) else None
