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

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from service.core import ConfigTooLarge, OutOfRange, Service
from service.middleware import BodyLimit
from service.policy import PolicyRefused
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

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # each error as loc/msg/type and a short printable form of the input: the input itself may be
        # NaN, a lone surrogate or nested hundreds deep, none of which a JSON answer can carry
        detail = [d.model_dump(exclude={"field", "line"}) for d in field_errors(exc.errors())]
        message = "; ".join(f"{d.field} = {d.input}: {d.msg}" for d in field_errors(exc.errors()))
        return JSONResponse({"detail": detail, "message": message}, 422)

    for error, status in ((NotFound, 404), (Forbidden, 403), (Conflict, 409), (PolicyRefused, 403),
                          (ConfigTooLarge, 422), (OutOfRange, 422)):  # fmt: skip

        async def refused(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status)

        app.add_exception_handler(error, refused)

    for router in ROUTERS:
        app.include_router(router)
    return app
