"""Liveness, readiness and Prometheus metrics (no auth)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ServiceDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(svc: ServiceDep) -> Any:
    """200 when the job store answers (503 otherwise); `checks` also reports whether Ray is reachable
    and whether this replica runs the reconciler, which readiness does not depend on."""
    checks = svc.readiness()
    ok = checks["database"] == "ok"
    return JSONResponse(Health(status="ready" if ok else "not ready", checks=checks).model_dump(), 200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(svc: ServiceDep) -> Response:
    return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)
