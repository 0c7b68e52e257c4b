"""API tokens (admin only)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from starlette.concurrency import run_in_threadpool

from service.deps import Principal, ServiceDep
from service.models import TokenIn, TokenOut

router = APIRouter(prefix="/v1/tokens", tags=["auth"])


@router.post("", response_model=TokenOut, status_code=201)
async def create_token(body: TokenIn, who: Principal, svc: ServiceDep) -> TokenOut:
    if not who.is_admin:
        raise HTTPException(403, "only an admin token can create tokens")
    token = await run_in_threadpool(svc.create_token, body.owner, body.admin)
    return TokenOut(owner=body.owner, admin=body.admin, token=token)
