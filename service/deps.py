"""Typed FastAPI dependencies shared by the routers: the Service, the caller's token, a job id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from fastapi import Path as PathParam

from service.core import Service
from service.db import Token
from service.tokens import Unauthorized

JOB_ID_PATTERN = r"^forkrl-[0-9a-f]{16}$"
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="a job id: forkrl-<16 hex digits>")]


def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


ServiceDep = Annotated[Service, Depends(get_service)]


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or ''."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return ""
    return authorization[7:].strip()


def principal(svc: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> Token:
    """The caller's token: 401 without a valid one."""
    token = bearer(authorization)
    if not token:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    try:
        return svc.authenticate(token)
    except Unauthorized as e:
        raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None


Principal = Annotated[Token, Depends(principal)]
