"""The dashboard: static pages served at / by the control plane itself (no build step). The page signs
in with a bearer token kept in the browser's session storage and calls the same REST API; charts
are plotly.js as the `plotly` package ships it."""

from __future__ import annotations

import functools
from importlib import resources
from importlib.metadata import version
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

router = APIRouter(include_in_schema=False)

UI = Path(__file__).resolve().parent.parent / "ui"
FILES = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
PLOTLY = f"plotly-{version('plotly')}.min.js"
# model output is shown on the page: scripts only from here (no inline script, no eval); plotly.js
# sets inline styles on its SVG
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@functools.cache
def _index_html() -> str:
    """The page, read once per process (it changes only with the installed package)."""
    return (UI / "index.html").read_text().replace("{{PLOTLY}}", PLOTLY)


@router.get("/")
def index() -> Response:
    return Response(_index_html(), media_type="text/html", headers={**HEADERS, "Cache-Control": "no-cache"})


@router.get("/ui/{name}")
def asset(name: str) -> Response:
    if name == PLOTLY:
        path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
        return FileResponse(path, media_type="text/javascript", headers={**HEADERS, "Cache-Control": "max-age=86400"})
    if name not in FILES or name == "index.html":
        raise HTTPException(404, f"no such dashboard file: {name}")
    return FileResponse(UI / name, media_type=FILES[name], headers={**HEADERS, "Cache-Control": "no-cache"})
