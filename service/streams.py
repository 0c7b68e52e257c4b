"""Open streams (job events, followed logs): the places they hold, per token and in all, and the watch
that ends one when its token is revoked or expires or its client went away.

A stream past `stream_max_per_token` or `stream_max_total` is refused with 429 and Retry-After. An open
stream re-checks its token every `stream_token_check_s` whether or not anything comes, waits on the
event loop (never holding a worker thread while idle) and gives its place back once, however it ends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from service.db import Token
from service.settings import Settings

if TYPE_CHECKING:
    from service.core import Service

__all__ = ["StreamSlots", "TooManyStreams", "held_stream"]


class TooManyStreams(RuntimeError):
    """A stream past the per-token or the server's limit of open streams (429)."""


class StreamSlots:
    """The streams (events, followed logs) this process holds open, per token and in all, within
    settings.stream_max_per_token and stream_max_total. Used on the event loop only."""

    def __init__(self, settings: Settings) -> None:
        self.settings, self.per_token = settings, Counter[int]()

    def take(self, token_id: int) -> Callable[[], None]:
        """A place for one more stream of this token (TooManyStreams when none is left), and the function
        that gives it back (once, however often it is called: a stream ends in more than one way)."""
        s, mine, total = self.settings, self.per_token[token_id], self.per_token.total()
        if mine >= s.stream_max_per_token:
            limit = f"FORKRL_STREAM_MAX_PER_TOKEN = {s.stream_max_per_token}"
            raise TooManyStreams(f"this token has {mine} streams open, its most ({limit}): close one or retry later")
        if total >= s.stream_max_total:
            limit = f"FORKRL_STREAM_MAX_TOTAL = {s.stream_max_total}"
            raise TooManyStreams(f"the server holds {total} streams open, its most ({limit}): retry later")
        self.per_token[token_id] += 1
        held = [token_id]

        def give_back() -> None:
            self.per_token.subtract(held)  # `held` is empty after the first call
            held.clear()
            if self.per_token[token_id] <= 0:
                self.per_token.pop(token_id, None)

        return give_back


def held_stream(
    svc: Service,
    who: Token,
    request: Request,
    chunks: AsyncIterator[str],
    last_words: Callable[[str], str],
    **kw: Any,
) -> StreamingResponse:
    """`chunks` as a streamed answer that holds one of the caller's stream places (429 with Retry-After when
    none is left) and ends with `last_words(why)` once the caller's token is revoked or expires."""
    try:
        give_back = svc.streams.take(who.id)
    except TooManyStreams as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(svc.settings.stream_retry_after_s)}) from None
    # given back when the stream ends, or (the background task) when its client went away first
    body = watched(svc, who.id, chunks, last_words, give_back, request.is_disconnected)
    return StreamingResponse(body, background=BackgroundTask(give_back), **kw)


async def watched(
    svc: Service, token_id: int, chunks: AsyncIterator[str], last_words: Callable[[str], str], done: Callable[[], None],
    gone: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:  # fmt: skip
    """`chunks`, with the token checked every stream_token_check_s whether or not a chunk comes (each
    chunk is awaited as a task with that timeout, so a stream that waits on Ray is checked too); a client
    that went away ends it there too, whatever the server's disconnect handling."""
    loop, every = asyncio.get_running_loop(), svc.settings.stream_token_check_s
    nxt: asyncio.Future[str] | None = None
    try:
        while True:
            check_at = loop.time() + every
            while (left := check_at - loop.time()) > 0:
                nxt = nxt or asyncio.ensure_future(anext(chunks))
                if not (await asyncio.wait({nxt}, timeout=left))[0]:
                    break
                got, nxt = nxt, None
                try:
                    chunk = got.result()
                except StopAsyncIteration:
                    return
                yield chunk
            if await gone():
                return
            if why := await run_in_threadpool(svc.tokens.lapsed, token_id):
                yield last_words(why)
                return
    finally:
        done()
        if nxt is not None:
            nxt.cancel()  # the inner stream ends there; one between chunks is closed when collected
