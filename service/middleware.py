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


# Every answer: never sniffed into a script or page, never framed, no referrer to elsewhere, no copy in a
# shared cache (answers carry one owner's jobs). A page that runs something (the dashboard, the development
# /docs) sets its own Content-Security-Policy; everything else is data, and may load and run nothing.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}
DEFAULT_HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "cache-control": "no-store",
}


class SecurityHeaders:
    """The headers above on every HTTP response; a route's own CSP or Cache-Control is kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower().decode() not in SECURITY_HEADERS]
                have = {k.lower().decode() for k, _ in headers}
                extra = {**SECURITY_HEADERS, **{k: v for k, v in DEFAULT_HEADERS.items() if k not in have}}
                msg = {**msg, "headers": [*headers, *((k.encode(), v.encode()) for k, v in extra.items())]}
            await send(msg)

        await self.app(scope, receive, with_headers)
