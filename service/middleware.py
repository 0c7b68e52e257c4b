"""ASGI middleware of the control plane."""

import contextlib

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """413 for a request body over `limit` bytes, whether or not it declares its length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = JSONResponse(
            {"detail": f"request body larger than {self.limit} bytes", "message": "body too large"}, 413
        )
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big(scope, receive, send)
            return
        seen, over = 0, False

        async def limited() -> Message:
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _BodyTooLarge
            return msg

        async def unless_over(msg: Message) -> None:
            # the app may turn the failed read into a response of its own (FastAPI answers 400 for a body
            # it could not read); past the limit the answer is 413 instead
            if not over:
                await send(msg)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, limited, unless_over)
        if over:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass
