"""API tokens (admin only): create (with an optional expiry), list (never the secret), revoke, expire."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from service.db import Token, now
from service.deps import Principal, ServiceDep
from service.schemas import TokenIn, TokenInfo, TokenList, TokenOut, TokenPatch, token_info

router = APIRouter(prefix="/v1/tokens", tags=["auth"])
TokenId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="a token id from GET /v1/tokens")]


def _admin(who: Token) -> None:
    if not who.is_admin:
        raise HTTPException(403, "only an admin token can manage tokens")


def _expiry(seconds: int | None) -> dt.datetime | None:
    return None if seconds is None else now() + dt.timedelta(seconds=seconds)


@router.post("", response_model=TokenOut, status_code=201)
async def create_token(body: TokenIn, who: Principal, svc: ServiceDep) -> TokenOut:
    _admin(who)
    tok, secret = await run_in_threadpool(svc.create_token, body.owner, body.admin, _expiry(body.expires_in_s))
    return TokenOut(**token_info(tok).model_dump(), token=secret)


@router.get("", response_model=TokenList)
def list_tokens(who: Principal, svc: ServiceDep) -> TokenList:
    _admin(who)
    return TokenList(tokens=[token_info(t) for t in svc.list_tokens()])


@router.delete("/{token_id}", response_model=TokenInfo)
def revoke_token(token_id: TokenId, who: Principal, svc: ServiceDep) -> TokenInfo:
    """Revoke a token: it stops working at once (idempotent)."""
    _admin(who)
    return token_info(svc.revoke_token(token_id))


@router.patch("/{token_id}", response_model=TokenInfo)
def set_token_expiry(token_id: TokenId, body: TokenPatch, who: Principal, svc: ServiceDep) -> TokenInfo:
    _admin(who)
    return token_info(svc.set_token_expiry(token_id, _expiry(body.expires_in_s)))
