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

import base64
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from actors.common.config_load import cap_errors
from service.core import ConfigTooLarge, OutOfRange, Service
from service.middleware import BodyLimit, SecurityHeaders
from service.policy import PolicyRefused
from service.queue import DoesNotFit
from service.quotas import LimitExceeded, RateLimited
from service.routes import ROUTERS
from service.schemas import field_errors
from service.settings import Settings
from service.store import Conflict, Forbidden, NotFound

log = logging.getLogger("forkrl.service")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start_background()
        try:
            yield
        finally:
            await svc.stop_background()

    app = FastAPI(
        title="forkrl control plane",
        version="0.1.0",
        description="Submit, watch and manage entropy-filtered GRPO training jobs on Ray.",
        lifespan=lifespan,
        # Swagger UI and ReDoc come from a CDN: none in production (the schema stays at /openapi.json); in
        # development /docs alone, under a policy of its own (_docs)
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = svc
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        def count(status: int) -> None:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            svc.telemetry.http_requests.labels(request.method, route, str(status)).inc()

        try:
            response: Response = await call_next(request)
        except Exception:  # the server error middleware answers 500; it is counted here first
            count(500)
            log.exception("unhandled error in %s %s", request.method, request.url.path)
            raise
        count(response.status_code)
        return response

    _error_answers(app)
    for router in ROUTERS:
        app.include_router(router)
    if settings.env == "development":
        _docs(app)
    app.add_middleware(SecurityHeaders)  # added last: the outermost, so every answer carries them
    return app


def _error_answers(app: FastAPI) -> None:
    """How refusals answer: 422 with every error named (at most 50), 429 with Retry-After, the rest by type."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # each error as loc/msg/type and a short printable form of the input: the input itself may be
        # NaN, a lone surrogate or nested hundreds deep, none of which a JSON answer can carry
        errors = field_errors(cap_errors(exc.errors()))  # at most 50, and one that counts the rest
        detail = [d.model_dump(exclude={"field", "line"}) for d in errors]
        message = "; ".join(f"{d.field} = {d.input}: {d.msg}" for d in errors)
        return JSONResponse({"detail": detail, "message": message}, 422)

    @app.exception_handler(RateLimited)
    async def too_fast(_: Request, exc: RateLimited) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(exc.retry_after_s)})

    refusals = ((NotFound, 404), (Forbidden, 403), (Conflict, 409), (PolicyRefused, 403), (LimitExceeded, 403),
                (ConfigTooLarge, 422), (OutOfRange, 422), (DoesNotFit, 422))  # fmt: skip
    for error, status in refusals:

        async def refused(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status)

        app.add_exception_handler(error, refused)


SWAGGER_CDN = "https://cdn.jsdelivr.net"


def _docs(app: FastAPI) -> None:
    """/docs: Swagger UI from its CDN, allowed to run that script and its own inline one (by hash), to
    call this origin alone and never to be framed."""
    page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs")
    html = bytes(page.body).decode()
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.S)
    )
    csp = (
        f"default-src 'none'; script-src {SWAGGER_CDN} {hashes}; style-src {SWAGGER_CDN} 'unsafe-inline'; "
        "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    )

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})
