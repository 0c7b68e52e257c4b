"""Jobs: submit, list, get, cancel, delete; their metrics, checkpoints, logs and live events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from actors.common.config import JobConfig
from actors.common.contract import TERMINAL_STATES, JobState
from service.deps import JobId, Principal, ServiceDep
from service.rayjobs import RayUnavailable
from service.schemas import CheckpointList, CheckpointOut, JobList, JobOut, MetricsOut, SamplesOut, job_out

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def strict_job_config(request: Request) -> JobConfig:
    """The body again, in pydantic's strict mode (the API takes no "20" for 20 or "yes" for true; YAML
    files given to the CLI stay lenient)."""
    try:
        return JobConfig.model_validate_json(await request.body(), strict=True)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@router.post(
    "",
    response_model=JobOut,
    status_code=201,
    responses={200: {"model": JobOut, "description": "an earlier submission with the same Idempotency-Key"}},
)
async def submit_job(
    cfg: JobConfig,
    strict: Annotated[JobConfig, Depends(strict_job_config)],
    who: Principal,
    svc: ServiceDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """Submit a job. The body is a JobConfig, read strictly: no strings for numbers or booleans, no
    NaN or infinities. The operator's tenancy policy may refuse fields (403 naming the field and rule)."""
    job, created = await svc.submit_job(strict, who, idempotency_key)
    if not created:
        return JSONResponse(jsonable_encoder(job_out(job, True)), 200)
    return job_out(job, True)


@router.get("", response_model=JobList)
def list_jobs(
    who: Principal,
    svc: ServiceDep,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$", description="next_cursor of the last page")] = None,
) -> JobList:
    rows, more = svc.list_jobs(who, state.value if state else None, limit, int(cursor) if cursor else None)
    return JobList(jobs=[job_out(j) for j in rows], next_cursor=str(more) if more is not None else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, who: Principal, svc: ServiceDep) -> JobOut:
    return job_out(svc.get_job(job_id, who), True)


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: JobId, who: Principal, svc: ServiceDep) -> JobOut:
    return job_out(await svc.cancel_job(job_id, who), True)


@router.delete("/{job_id}", status_code=204, responses={409: {"description": "not terminal"}})
async def delete_job(job_id: JobId, who: Principal, svc: ServiceDep) -> Response:
    await svc.delete_job(job_id, who)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def get_metrics(
    job_id: JobId,
    who: Principal,
    svc: ServiceDep,
    after_step: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    view: Annotated[
        Literal["full", "scalars"],
        Query(description="scalars: numbers only (the curves), with samples/n for steps that hold samples"),
    ] = "full",
) -> MetricsOut:
    job, rows = svc.metrics(job_id, who, after_step, limit)
    records = [m.data if view == "full" else scalars_of(m.data) for m in rows]
    return MetricsOut(job_id=job_id, state=job.state, last_step=job.last_step, metrics=records)


def scalars_of(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if v is None or isinstance(v, int | float)}
    if record.get("samples"):
        out["samples/n"] = len(record["samples"])
    return out


@router.get("/{job_id}/samples", response_model=SamplesOut, responses={404: {"description": "no samples"}})
def get_samples(
    job_id: JobId,
    who: Principal,
    svc: ServiceDep,
    step: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="default: the newest step with samples")] = None,
) -> SamplesOut:
    """One step's sampled completions (each token's text, entropy and whether the filter kept it) and its
    most frequent kept tokens, decoded."""
    row = svc.samples(job_id, who, step)
    if row is None or not row.data.get("samples"):
        where = f"step {step}" if step is not None else "any of its recent steps"
        raise HTTPException(404, f"{job_id} has no sampled completions at {where}")
    return SamplesOut(
        job_id=job_id, step=row.step, samples=row.data["samples"], forking_tokens=row.data.get("forking_tokens", [])
    )


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def get_checkpoints(job_id: JobId, who: Principal, svc: ServiceDep) -> CheckpointList:
    rows = svc.checkpoints(job_id, who)
    return CheckpointList(
        job_id=job_id, checkpoints=[CheckpointOut(step=c.step, path=c.path, created_at=c.created_at) for c in rows]
    )


@router.get("/{job_id}/logs", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
async def get_logs(
    job_id: JobId,
    who: Principal,
    svc: ServiceDep,
    follow: bool = False,
    lines: Annotated[int, Query(ge=1, le=100_000, description="without follow: the last N lines")] = 1000,
    attempt: Annotated[
        int | None,
        Query(ge=0, le=10_000, description="without follow: attempt N's log (0 = first submission, N = restart N)"),
    ] = None,
) -> Response:
    """The driver's log: its last `lines` lines (of the current attempt, or of `attempt` after restarts),
    or (follow=true) the current attempt's whole log as it grows, until the job ends or nothing new came
    for the service's stream idle limit."""
    if follow and attempt is not None:
        raise HTTPException(422, f"attempt = {attempt}: follow streams the current attempt only; leave one out")
    if not follow:
        try:
            limit = min(lines, svc.settings.log_tail_max_lines)
            return PlainTextResponse(await svc.logs(job_id, who, limit, attempt))
        except RayUnavailable as e:
            raise HTTPException(503, f"Ray is not reachable: {e}") from None
    await run_in_threadpool(svc.get_job, job_id, who)  # 404/403 before the stream starts
    return StreamingResponse(svc.follow_logs(job_id), media_type="text/plain")


@router.get(
    "/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}
)
async def events(
    job_id: JobId, who: Principal, svc: ServiceDep, after_step: Annotated[int, Query(ge=0, le=2**31)] = 0
) -> StreamingResponse:
    """Server-sent events: `state` (each state change, the current one first), `metrics` (each new
    step's record) and `end` once the job is finished and every step was sent, or (reason "idle")
    after the service's stream idle limit with nothing new (reconnect with after_step to go on)."""
    await run_in_threadpool(svc.get_job, job_id, who)

    async def stream() -> AsyncIterator[str]:
        last_event, last_step, idle, quiet = 0, after_step, 0.0, 0.0
        while True:
            evs, ms, job = await run_in_threadpool(svc.changes, job_id, last_event, last_step)
            if job is None:
                yield 'event: end\ndata: {"reason": "deleted"}\n\n'
                return
            for e in evs:
                last_event = e.id
                data = {"state": e.state, "message": e.message, "at": e.created_at.isoformat()}
                yield f"id: e{e.id}\nevent: state\ndata: {json.dumps(data)}\n\n"
            for m in ms:
                last_step = m.step
                yield f"id: s{m.step}\nevent: metrics\ndata: {json.dumps(m.data)}\n\n"
            if job.state in TERMINAL_STATES and not evs and not ms:
                yield f"event: end\ndata: {json.dumps({'state': job.state, 'last_step': job.last_step})}\n\n"
                return
            idle = 0.0 if (evs or ms) else idle + 0.5
            quiet = 0.0 if (evs or ms) else quiet + 0.5
            if quiet >= svc.settings.stream_idle_s:
                yield f"event: end\ndata: {json.dumps({'reason': 'idle', 'last_step': last_step})}\n\n"
                return
            if idle >= 15:
                yield ": keep-alive\n\n"
                idle = 0.0
            await asyncio.sleep(0.5)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
