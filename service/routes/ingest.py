"""Where a job's training driver pushes its per-step metrics and checkpoints (the job's own token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException
from starlette.concurrency import run_in_threadpool

from service.deps import JobId, ServiceDep, bearer
from service.schemas import IngestAnswer, IngestBody
from service.tokens import Unauthorized

router = APIRouter(tags=["ingest"])


@router.post("/v1/jobs/{job_id}/ingest", status_code=202)
async def ingest(
    job_id: JobId,
    body: IngestBody,
    svc: ServiceDep,
    authorization: Annotated[str | None, Header(description="Bearer <the job's ingest token>")] = None,
) -> IngestAnswer:
    """Where a job's training driver pushes its per-step metrics and checkpoints. The answer tells the
    driver whether to stop after its current step (`stop`: the job is preempted for a higher-priority
    one; the driver saves a checkpoint at that step's end and ends, and the job goes back to the queue)."""
    checkpoints = [(c.step, c.path) for c in body.checkpoints]
    try:
        added, stop = await run_in_threadpool(svc.ingest, job_id, bearer(authorization), body.metrics, checkpoints)
    except Unauthorized as e:
        raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None
    return IngestAnswer(metrics_stored=added, stop=stop)
