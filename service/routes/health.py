"""Liveness and readiness (no token: they say only whether this replica serves, never what tenants run) and
Prometheus metrics (job counts across every owner: an admin token or the operator's scrape token)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ServiceDep, bearer
from service.schemas import Health
from service.tokens import Unauthorized

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


@router.get("/metrics", response_class=PlainTextResponse, responses={401: {}, 403: {}})
def prometheus(svc: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> Response:
    """The Prometheus registry, for the operator's scrape token (FORKRL_METRICS_TOKEN) or an admin token."""
    token, scrape = bearer(authorization), svc.settings.metrics_token
    if not (scrape and token and secrets.compare_digest(token.encode(), scrape.encode())):
        if not token:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        try:
            who = svc.authenticate(token)
        except Unauthorized as e:
            raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None
        if not who.is_admin:
            raise HTTPException(403, "metrics count every owner's jobs: an admin token or the scrape token")
    return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)
