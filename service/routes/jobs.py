"""Jobs: submit, list, get, cancel, delete; their metrics, checkpoints, logs and live events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from actors.common.config import JobConfig
from actors.common.contract import TERMINAL_STATES, JobState
from service.core import Service
from service.deps import JobId, Principal, ServiceDep
from service.rayjobs import RayUnavailable
from service.routes.configs import strict_config
from service.schemas import CheckpointList, CheckpointOut, JobList, JobOut, MetricsOut, SamplesOut, job_out
from service.store import StepJSON
from service.streams import held_stream

AFTER_STEP = (
    "the records of the steps after this one; -1 (the default): all, the evaluation before training (step 0) first"
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


async def strict_job_config(request: Request) -> JobConfig:
    """The body again, in pydantic's strict mode (the API takes no "20" for 20 or "yes" for true; YAML
    files given to the CLI stay lenient)."""
    return await run_in_threadpool(strict_config, await request.body())  # bounded, then strict (422s)


@router.post(
    "",
    response_model=JobOut,
    status_code=201,
    responses={200: {"model": JobOut, "description": "an earlier submission with the same Idempotency-Key"}},
)
async def submit_job(
    who: Principal,  # first: a caller without a valid token is refused before the strict read of the body
    cfg: JobConfig,
    strict: Annotated[JobConfig, Depends(strict_job_config)],
    svc: ServiceDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    priority: Annotated[
        int, Query(ge=-1000, le=1000, description="admission order, higher first (non-admins: at most their bound)")
    ] = 0,
) -> Any:
    """Submit a job. The body is a JobConfig, read strictly: no strings for numbers or booleans, no
    NaN or infinities. The operator's tenancy policy may refuse fields (403 naming the field and rule); a
    job this cluster could never run is refused (422 naming what is missing). It waits QUEUED until its
    whole demand fits."""
    job, created = await svc.submit_job(strict, who, idempotency_key, priority)
    out = job_out(job, True, await run_in_threadpool(svc.queue_positions))
    return out if created else JSONResponse(jsonable_encoder(out), 200)


@router.get("", response_model=JobList)
def list_jobs(
    who: Principal,
    svc: ServiceDep,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$", description="next_cursor of the last page")] = None,
) -> JobList:
    rows, more = svc.list_jobs(who, state.value if state else None, limit, int(cursor) if cursor else None)
    at = svc.queue_positions() if any(j.state == JobState.QUEUED.value for j in rows) else {}
    return JobList(jobs=[job_out(j, positions=at) for j in rows], next_cursor=str(more) if more is not None else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, who: Principal, svc: ServiceDep) -> JobOut:
    return job_out(svc.get_job(job_id, who), True, svc.queue_positions())


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: JobId, who: Principal, svc: ServiceDep) -> JobOut:
    return job_out(await svc.cancel_job(job_id, who), True)


@router.delete("/{job_id}", status_code=204, responses={409: {"description": "not terminal"}})
async def delete_job(job_id: JobId, who: Principal, svc: ServiceDep) -> Response:
    await svc.delete_job(job_id, who)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", response_model=MetricsOut)
async def get_metrics(
    job_id: JobId,
    who: Principal,
    svc: ServiceDep,
    after_step: Annotated[int, Query(ge=-1, le=2**31, description=AFTER_STEP)] = -1,
    limit: Annotated[int, Query(ge=1, le=2**31, description="at most FORKRL_METRICS_READ_MAX (10,000)")] = 1000,
    view: Annotated[
        Literal["full", "scalars"],
        Query(description="scalars: numbers only (the curves), with samples/n for steps that hold samples"),
    ] = "full",
) -> Response:
    """The step records after `after_step`, at most `limit` (page on with the last record's step). The
    answer is streamed as the store is read, a page at a time: a long history is never held whole."""
    if limit > (most := svc.settings.metrics_read_max):
        raise HTTPException(422, f"limit = {limit}: at most {most} step records per read (FORKRL_METRICS_READ_MAX); "
                                 "page on with after_step")  # fmt: skip
    job, page = await run_in_threadpool(svc.metrics, job_id, who, after_step, limit)  # 404/403 before the answer
    head = {"job_id": job_id, "state": job.state, "last_step": job.last_step}

    def render(page: list[StepJSON]) -> str:  # in the thread pool: a page of scalars is parsed there
        return ",".join(m.json if view == "full" else dumps(scalars_of(json.loads(m.json))) for m in page)

    async def body(page: list[StepJSON]) -> AsyncIterator[str]:
        yield dumps(head)[:-1] + ',"metrics":['
        sent = 0
        while page:
            yield ("," if sent else "") + await run_in_threadpool(render, page)
            sent += len(page)
            if sent >= limit:
                break
            page = await run_in_threadpool(svc.metric_page, job_id, page[-1].step, limit - sent)
        yield "]}"

    return StreamingResponse(body(page), media_type="application/json")


def dumps(obj: Any) -> str:
    """JSON as FastAPI answers it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


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
    request: Request,
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
    or (follow=true) the current attempt's whole log as it grows, until the job ends, nothing new came for
    the service's stream idle limit, or the token is revoked or expires (a last line says which). A followed
    log counts against the caller's stream limits (429 with Retry-After beyond them)."""
    if follow and attempt is not None:
        raise HTTPException(422, f"attempt = {attempt}: follow streams the current attempt only; leave one out")
    if not follow:
        try:
            limit = min(lines, svc.settings.log_tail_max_lines)
            return PlainTextResponse(await svc.logs(job_id, who, limit, attempt))
        except RayUnavailable as e:
            raise HTTPException(503, f"Ray is not reachable: {e}") from None
    await run_in_threadpool(svc.get_job, job_id, who)  # 404/403 before the stream starts
    return held_stream(svc, who, request, svc.follow_logs(job_id),
                       lambda why: f"\n[forkrl] token {why}: stream ended\n", media_type="text/plain")  # fmt: skip


@router.get(
    "/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}}
)
async def events(
    request: Request,
    job_id: JobId,
    who: Principal,
    svc: ServiceDep,
    after_step: Annotated[int, Query(ge=-1, le=2**31, description=AFTER_STEP)] = -1,
) -> StreamingResponse:
    """Server-sent events: `state` (each state change, the current one first), `metrics` (each new
    step's record; from after_step on, a long history a page at a time) and `end`: once the job is finished
    and every step was sent, or with a `reason`: "idle" after the service's stream idle limit with nothing
    new (reconnect with after_step to go on), "revoked" or "expired" when the token stops holding,
    "deleted". Streams are limited per token and per server (FORKRL_STREAM_MAX_PER_TOKEN, _TOTAL; events
    and followed logs together): 429 with Retry-After beyond them."""
    await run_in_threadpool(svc.get_job, job_id, who)
    sse = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    stream = job_events(svc, job_id, after_step)
    return held_stream(svc, who, request, stream, sse_end, media_type="text/event-stream", headers=sse)


def sse_end(reason: str) -> str:
    return f"event: end\ndata: {json.dumps({'reason': reason})}\n\n"


async def job_events(svc: Service, job_id: str, after_step: int) -> AsyncIterator[str]:
    """The body of GET .../events: polls the store in short calls (no thread waits for the stream), every
    0.5 s while the job is busy and every 2 s after 10 s without news; while a poll brings something it goes
    on at once, so a replay from step 0 is sent page by page."""
    loop = asyncio.get_running_loop()
    last_event, last_step = 0, after_step
    news = ping = loop.time()  # when something was last sent; when the last keep-alive was
    while True:
        evs, ms, job = await run_in_threadpool(svc.changes, job_id, last_event, last_step)
        if job is None:
            yield sse_end("deleted")
            return
        for e in evs:
            last_event = e.id
            data = {"state": e.state, "message": e.message, "at": e.created_at.isoformat()}
            yield f"id: e{e.id}\nevent: state\ndata: {json.dumps(data)}\n\n"
        for m in ms:
            last_step = m.step
            yield f"id: s{m.step}\nevent: metrics\ndata: {m.json}\n\n"
        if evs or ms:
            news = ping = loop.time()
            continue
        if job.state in TERMINAL_STATES:
            yield f"event: end\ndata: {json.dumps({'state': job.state, 'last_step': job.last_step})}\n\n"
            return
        if (now := loop.time()) - news >= svc.settings.stream_idle_s:
            yield f"event: end\ndata: {json.dumps({'reason': 'idle', 'last_step': last_step})}\n\n"
            return
        if now - ping >= 15:
            yield ": keep-alive\n\n"
            ping = now
        await asyncio.sleep(0.5 if now - news < 10 else 2.0)
