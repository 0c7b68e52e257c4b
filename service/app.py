"""forkrl's control plane: a FastAPI app that stores jobs, submits them to Ray through the Jobs API
and keeps their state in step with Ray.

    python -m service            # or: forkrl serve
    create_app(Settings(...))    # settings from the environment (FORKRL_*) when omitted

Design: the database is the source of truth for what was asked (jobs, cancellations, ownership);
Ray is the source of truth for what runs. A job is written first, then submitted with
submission_id = job id, so a crash in between is repaired by the reconciler without a double start.
Training drivers push each step's metrics to POST /v1/jobs/{id}/ingest with a per-job token; the
reconciler also reads the run's metrics.jsonl when it can see the run directory, so steps logged
while the service was down are not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from actors.config import JobConfig
from service.core import Service, canonical, sha256
from service.db import TERMINAL, Checkpoint, Event, Job, Metric, Token
from service.middleware import BodyLimit
from service.models import (
    CheckpointList,
    CheckpointOut,
    Health,
    IngestBody,
    JobList,
    JobOut,
    MetricsOut,
    TokenIn,
    TokenOut,
    job_out,
)
from service.rayjobs import JobNotFound, RayUnavailable
from service.settings import Settings

log = logging.getLogger("forkrl.service")

JOB_ID_PATTERN = r"^forkrl-[0-9a-f]{16}$"
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="a job id: forkrl-<16 hex digits>")]


# ---------------------------------------------------------------- auth


def principal(request: Request, authorization: Annotated[str | None, Header()] = None) -> Token:
    """The caller's token: 401 without a valid one."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    digest = sha256(authorization[7:].strip())
    with request.app.state.service.db() as db:
        tok = db.scalar(select(Token).where(Token.token_hash == digest))
    if tok is None:
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return tok


Principal = Annotated[Token, Depends(principal)]


# ---------------------------------------------------------------- app factory


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(svc.start)
        svc._task = asyncio.create_task(svc.run_background())
        try:
            yield
        finally:
            svc._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await svc._task
            await run_in_threadpool(svc.stop)

    app = FastAPI(
        title="forkrl control plane",
        version="0.1.0",
        description="Submit, watch and manage entropy-filtered GRPO training jobs on Ray.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        svc.http_requests.labels(request.method, getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
            shown = repr(e.get("input"))
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = "unknown field (not part of JobConfig)" if e.get("type") == "extra_forbidden" else e.get("msg")
            parts.append(f"{loc or 'body'} = {shown}: {msg}")
        return JSONResponse({"detail": jsonable_encoder(exc.errors()), "message": "; ".join(parts)}, 422)

    def owned(db: Any, job_id: str, who: Token) -> Job:
        job = db.scalar(select(Job).where(Job.id == job_id))
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if job.owner != who.owner and not who.is_admin:
            raise HTTPException(403, f"job {job_id} belongs to another owner")
        return job

    # -- health
    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    def readyz() -> Any:
        checks = {}
        try:
            with svc.db() as db:
                db.execute(select(1))
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"error: {type(e).__name__}"
        checks["ray"] = "ok" if svc.ray_ready else "not reachable yet"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            Health(status="ready" if ok else "not ready", checks=checks).model_dump(), 200 if ok else 503
        )

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    # -- tokens
    @app.post("/v1/tokens", response_model=TokenOut, status_code=201, tags=["auth"])
    def create_token(body: TokenIn, who: Principal) -> TokenOut:
        if not who.is_admin:
            raise HTTPException(403, "only an admin token can create tokens")
        token = secrets.token_urlsafe(32)
        with svc.db() as db:
            db.add(Token(owner=body.owner, token_hash=sha256(token), is_admin=body.admin))
        return TokenOut(owner=body.owner, admin=body.admin, token=token)

    # -- jobs
    @app.post(
        "/v1/jobs",
        response_model=JobOut,
        status_code=201,
        tags=["jobs"],
        responses={200: {"model": JobOut, "description": "an earlier submission with the same Idempotency-Key"}},
    )
    async def submit_job(
        cfg: JobConfig,
        who: Principal,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Any:
        body_hash = sha256(canonical(cfg.model_dump(mode="json")))

        def earlier(db: Any) -> Job | None:
            old = db.scalar(select(Job).where(Job.owner == who.owner, Job.idempotency_key == idempotency_key))
            if old is not None and old.config_hash != body_hash:
                raise HTTPException(409, f"Idempotency-Key {idempotency_key!r} was used for a different job ({old.id})")
            return old

        def create() -> tuple[Job, bool]:
            try:
                return insert()
            except IntegrityError:  # the same key in a concurrent request won the race: answer as a replay
                with svc.db() as db:
                    old = earlier(db)
                if old is None:
                    raise
                return old, False

        def insert() -> tuple[Job, bool]:
            with svc.db() as db:
                if idempotency_key:
                    old = earlier(db)
                    if old is not None:
                        return old, False
                job_id = f"forkrl-{secrets.token_hex(8)}"
                ingest = secrets.token_urlsafe(32)
                config = svc.effective_config(job_id, cfg, ingest)
                job = Job(
                    id=job_id, owner=who.owner, name=cfg.name, state="PENDING", message="queued",
                    config=config, config_hash=body_hash, idempotency_key=idempotency_key,
                    ingest_token_hash=sha256(ingest), total_steps=cfg.trainer.steps,
                    run_dir=config["trainer"]["output_dir"],
                )  # fmt: skip
                db.add(job)
                db.flush()  # the job row first: events reference it
                db.add(Event(job_id=job_id, state="PENDING", message="queued"))
                return job, True

        job, created = await run_in_threadpool(create)
        if not created:
            return JSONResponse(jsonable_encoder(job_out(job, True)), 200)
        svc.jobs_submitted.inc()
        try:  # submit now; if Ray is not reachable the reconciler retries
            await run_in_threadpool(svc.reconcile_job, job.id)
        except RayUnavailable as e:
            log.warning("job %s stays queued: %s", job.id, e)

        def reload() -> Job:
            with svc.db() as db:
                return db.scalar(select(Job).where(Job.id == job.id))  # type: ignore[return-value]

        return job_out(await run_in_threadpool(reload), True)

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"])
    def list_jobs(
        who: Principal,
        state: Annotated[Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[
            str | None, Query(pattern=r"^[0-9]{1,18}$", description="next_cursor of the last page")
        ] = None,
    ) -> JobList:
        q = select(Job).order_by(Job.seq.desc()).limit(limit + 1)
        if not who.is_admin:
            q = q.where(Job.owner == who.owner)
        if state:
            q = q.where(Job.state == state)
        if cursor:
            q = q.where(Job.seq < int(cursor))
        with svc.db() as db:
            rows = list(db.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return JobList(jobs=[job_out(j) for j in rows], next_cursor=str(rows[-1].seq) if more else None)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job(job_id: JobId, who: Principal) -> JobOut:
        with svc.db() as db:
            return job_out(owned(db, job_id, who), True)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
    async def cancel_job(job_id: JobId, who: Principal) -> JobOut:
        def mark() -> Job:
            with svc.db() as db:
                job = owned(db, job_id, who)
                if job.state not in TERMINAL and not job.cancel_requested:
                    job.cancel_requested = True
                    job.message = "cancel requested"
                return job

        job = await run_in_threadpool(mark)
        if job.state not in TERMINAL:
            with contextlib.suppress(RayUnavailable, JobNotFound):
                if job.submitted:
                    assert svc.ray is not None
                    await run_in_threadpool(svc.ray.stop, job_id)
                await run_in_threadpool(svc.reconcile_job, job_id)
        with svc.db() as db:
            return job_out(owned(db, job_id, who), True)

    @app.delete("/v1/jobs/{job_id}", status_code=204, tags=["jobs"], responses={409: {"description": "not terminal"}})
    async def delete_job(job_id: JobId, who: Principal) -> Response:
        with svc.db() as db:
            job = owned(db, job_id, who)
            if job.state not in TERMINAL:
                raise HTTPException(
                    409, f"job {job_id} is {job.state}; cancel it first (only finished jobs are deleted)"
                )
            for model in (Metric, Checkpoint, Event):
                db.execute(delete(model).where(model.job_id == job_id))  # type: ignore[attr-defined]
            db.delete(job)
        if svc.ray is not None:
            await run_in_threadpool(svc.ray.delete, job_id)
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}/metrics", response_model=MetricsOut, tags=["jobs"])
    def get_metrics(
        job_id: JobId,
        who: Principal,
        after_step: Annotated[int, Query(ge=0, le=2**31)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> MetricsOut:
        with svc.db() as db:
            job = owned(db, job_id, who)
            rows = db.scalars(
                select(Metric)
                .where(Metric.job_id == job_id, Metric.step > after_step)
                .order_by(Metric.step)
                .limit(limit)
            )
            return MetricsOut(job_id=job_id, state=job.state, last_step=job.last_step, metrics=[m.data for m in rows])

    @app.get("/v1/jobs/{job_id}/checkpoints", response_model=CheckpointList, tags=["jobs"])
    def get_checkpoints(job_id: JobId, who: Principal) -> CheckpointList:
        with svc.db() as db:
            owned(db, job_id, who)
            rows = db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
            return CheckpointList(
                job_id=job_id,
                checkpoints=[CheckpointOut(step=c.step, path=c.path, created_at=c.created_at) for c in rows],
            )

    @app.post("/v1/jobs/{job_id}/ingest", status_code=202, tags=["ingest"])
    def ingest(
        job_id: JobId,
        body: IngestBody,
        authorization: Annotated[str | None, Header(description="Bearer <the job's ingest token>")] = None,
    ) -> dict[str, int]:
        """Where a job's training driver pushes its per-step metrics and checkpoints."""
        token = (authorization or "")[7:].strip() if (authorization or "").lower().startswith("bearer ") else ""
        with svc.db() as db:
            job = db.scalar(select(Job).where(Job.id == job_id))
            if job is None or not token or not secrets.compare_digest(job.ingest_token_hash, sha256(token)):
                raise HTTPException(401, "invalid ingest token", headers={"WWW-Authenticate": "Bearer"})
            added = svc.store_metrics(db, job, body.metrics, "push")
            known = set(db.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))
            for c in body.checkpoints:
                if c.step not in known:
                    db.add(Checkpoint(job_id=job_id, step=c.step, path=c.path))
                    known.add(c.step)
        return {"metrics_stored": added}

    @app.get(
        "/v1/jobs/{job_id}/logs",
        tags=["jobs"],
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def get_logs(job_id: JobId, who: Principal, follow: bool = False) -> Response:
        with svc.db() as db:
            job = owned(db, job_id, who)
            submitted = job.submitted
        assert svc.ray is not None
        ray = svc.ray
        if not follow:
            if not submitted:
                return PlainTextResponse("")
            try:
                return PlainTextResponse(await run_in_threadpool(ray.logs, job_id))
            except JobNotFound:
                return PlainTextResponse("")
            except RayUnavailable as e:
                raise HTTPException(503, f"Ray is not reachable: {e}") from None

        async def stream() -> AsyncIterator[str]:
            while not submitted:  # wait until Ray has the job
                await asyncio.sleep(1)
                with svc.db() as db:
                    j = db.scalar(select(Job).where(Job.id == job_id))
                    if j is None or j.state in TERMINAL:
                        return
                    submitted_now = j.submitted
                if submitted_now:
                    break
            try:
                async for chunk in ray.tail(job_id):
                    yield chunk
            except Exception as e:  # the stream ends; the client can reconnect
                yield f"\n[forkrl] log stream ended: {e}\n"

        return StreamingResponse(stream(), media_type="text/plain")

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
    )
    async def events(
        job_id: JobId, who: Principal, after_step: Annotated[int, Query(ge=0, le=2**31)] = 0
    ) -> StreamingResponse:
        """Server-sent events: `state` (each state change, the current one first), `metrics` (each new
        step's record) and `end` once the job is finished and every step was sent."""
        with svc.db() as db:
            owned(db, job_id, who)

        def poll(last_event: int, last_step: int) -> tuple[list[Event], list[Metric], Job | None]:
            with svc.db() as db:
                evs = list(
                    db.scalars(select(Event).where(Event.job_id == job_id, Event.id > last_event).order_by(Event.id))
                )
                ms = list(
                    db.scalars(
                        select(Metric).where(Metric.job_id == job_id, Metric.step > last_step).order_by(Metric.step)
                    )
                )
                return evs, ms, db.scalar(select(Job).where(Job.id == job_id))

        async def stream() -> AsyncIterator[str]:
            last_event, last_step, idle = 0, after_step, 0.0
            while True:
                evs, ms, job = await run_in_threadpool(poll, last_event, last_step)
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
                if job.state in TERMINAL and not evs and not ms:
                    yield f"event: end\ndata: {json.dumps({'state': job.state, 'last_step': job.last_step})}\n\n"
                    return
                idle = 0.0 if (evs or ms) else idle + 0.5
                if idle >= 15:
                    yield ": keep-alive\n\n"
                    idle = 0.0
                await asyncio.sleep(0.5)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app
