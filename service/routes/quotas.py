"""The admission queue: per-owner quotas (admins set them; an owner reads its own) and the queue with
the cluster's capacity."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from actors.common.contract import JobState
from actors.common.demand import stored_demand
from service.db import Quota, Token
from service.deps import Principal, ServiceDep
from service.rayjobs import RayUnavailable

router = APIRouter(tags=["queue"])
Owner = Annotated[str, PathParam(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@-]+$")]


class QuotaIn(BaseModel):
    """What an owner's admitted jobs may hold at once; null: no bound. Over-quota jobs wait QUEUED."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_running_jobs: int | None = Field(None, ge=0, le=100_000, description="jobs admitted (PENDING or RUNNING)")
    max_cpus: float | None = Field(None, ge=0, le=1e6, description="Ray CPUs the admitted jobs request")
    max_gpus: float | None = Field(None, ge=0, le=1e6, description="Ray GPUs the admitted jobs request")
    max_priority: int | None = Field(
        None, ge=-1000, le=1000, description="highest ?priority= the owner may submit with; null: the service's bound"
    )


class QuotaOut(QuotaIn):
    model_config = ConfigDict(extra="forbid")
    owner: str
    updated_at: dt.datetime | None = None


class QuotaList(BaseModel):
    quotas: list[QuotaOut]


class QueuedOut(BaseModel):
    id: str
    owner: str
    priority: int
    position: int
    message: str = Field(description="why it waits")
    demand: str


class QueueOut(BaseModel):
    admission: str = Field(
        "queue",
        description="queue: this queue decides; off: none; kueue: Kueue decides (its queued jobs are "
        "QUEUED with Kueue's reason, not listed here, and there are no standing Ray nodes)",
    )
    nodes: int | None = Field(description="alive Ray nodes; null: Ray did not answer")
    capacity: dict[str, float] = Field(description="the alive nodes' CPU, GPU and custom resources in all")
    admitted: dict[str, float] = Field(description="what the admitted (PENDING, RUNNING) jobs request")
    queued: list[QueuedOut] = Field(description="in admission order (an owner sees its own jobs, with their places)")


def _admin(who: Token) -> None:
    if not who.is_admin:
        raise HTTPException(403, "only an admin token can set quotas")


def _out(q: Quota) -> QuotaOut:
    return QuotaOut(owner=q.owner, updated_at=q.updated_at, max_running_jobs=q.max_running_jobs,
                    max_cpus=q.max_cpus, max_gpus=q.max_gpus, max_priority=q.max_priority)  # fmt: skip


@router.get("/v1/quotas", response_model=QuotaList)
def list_quotas(who: Principal, svc: ServiceDep) -> QuotaList:
    _admin(who)
    with svc.store.session() as db:
        return QuotaList(quotas=[_out(q) for q in svc.store.quotas(db)])


@router.get("/v1/quotas/{owner}", response_model=QuotaOut)
def get_quota(owner: Owner, who: Principal, svc: ServiceDep) -> QuotaOut:
    """An owner's quota (an owner may read its own); an owner without one: every bound null."""
    if not who.is_admin and who.owner != owner:
        raise HTTPException(403, "a quota is its owner's and the admins' to read")
    with svc.store.session() as db:
        q = svc.store.quota(db, owner)
    return _out(q) if q is not None else QuotaOut(owner=owner)


@router.put("/v1/quotas/{owner}", response_model=QuotaOut)
def set_quota(owner: Owner, body: QuotaIn, who: Principal, svc: ServiceDep) -> QuotaOut:
    """Set every bound of the owner's quota (a null lifts that bound); the next admission pass applies it.
    Jobs already admitted keep running: a quota decides what starts."""
    _admin(who)
    with svc.store.session(write=True) as db:
        return _out(svc.store.set_quota(db, owner, body.model_dump()))


@router.delete("/v1/quotas/{owner}", status_code=204)
def delete_quota(owner: Owner, who: Principal, svc: ServiceDep) -> None:
    _admin(who)
    with svc.store.session(write=True) as db:
        if not svc.store.delete_quota(db, owner):
            raise HTTPException(404, f"owner {owner!r} has no quota")


@router.get("/v1/queue", response_model=QueueOut)
async def queue(who: Principal, svc: ServiceDep) -> QueueOut:
    """The cluster's capacity, what the admitted jobs hold, and the queue in admission order."""
    try:
        cap = await run_in_threadpool(svc.reconciler.queue.capacity, 5.0)
        nodes, total = len(cap.nodes), cap.total
    except RayUnavailable:
        nodes, total = None, {}

    def read() -> tuple[dict[str, float], list[QueuedOut]]:
        store = svc.store
        with store.session() as db:
            positions = store.queue_positions(db)
            admitted = store.in_states(db, (JobState.PENDING.value, JobState.RUNNING.value))
            queued = store.in_states(db, (JobState.QUEUED.value,))
        held: dict[str, float] = {}
        for j in admitted:
            for k, v in svc.reconciler.queue.demand(j)[0].items():
                held[k] = held.get(k, 0.0) + v
        rows = [
            QueuedOut(
                id=j.id,
                owner=j.owner,
                priority=j.priority or 0,
                position=positions[j.id],
                message=j.message,
                demand=d.describe() if (d := stored_demand(j.config)) else "unknown (an older config)",
            )  # fmt: skip
            for j in queued
            if j.id in positions and (who.is_admin or j.owner == who.owner)
        ]
        return held, sorted(rows, key=lambda r: r.position)

    held, rows = await run_in_threadpool(read)
    return QueueOut(admission=svc.settings.admission, nodes=nodes, capacity=total, admitted=held, queued=rows)
