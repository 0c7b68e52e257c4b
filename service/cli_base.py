"""What every `forkrl` command shares: the address and token options, the API client of one command,
and the escaping of what the service sends before it reaches a terminal."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import httpx
import typer

from service.client import ApiError, ForkrlClient

UrlOpt = Annotated[str, typer.Option("--url", envvar="FORKRL_URL", help="control-plane URL")]
TokenOpt = Annotated[str, typer.Option("--token", envvar="FORKRL_TOKEN", help="bearer token", show_default=False)]
DEFAULT_URL = "http://127.0.0.1:8000"


def token_of(token: str) -> str:
    if token:
        return token
    from service.settings import Settings

    path = Settings().data_dir / "admin_token"
    if path.is_file():
        return path.read_text().strip()
    die("no token: pass --token or set FORKRL_TOKEN (a local development server writes <data dir>/admin_token)")
    return ""


def die(msg: str, code: int = 2) -> NoReturn:
    typer.secho(f"forkrl: {escape_text(msg)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def api(url: str, token: str) -> Iterator[ForkrlClient]:
    """The API client of one command; an error answer or an unreachable service ends the command (exit 1)."""
    try:
        with ForkrlClient(url, token_of(token)) as api:
            yield api
    except ApiError as e:
        die(str(e), 1)
    except httpx.TransportError as e:
        die(f"cannot reach the control plane at {url}: {e}", 1)


# what a terminal acts on instead of showing: C0 and C1 controls (ESC and CSI start the sequences that set
# the title, clear the screen, move the cursor, write the clipboard), DEL, the line and paragraph
# separators, and the bidi controls (an override turns the text after it around)
_BIDI = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_UNSAFE_TEXT = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")  # newline and tab kept
_SGR = re.compile(r"\x1b\[[0-9;]*m")  # a colour: Ray colours each actor's log prefix
_HELD = re.compile(r"(\x1b(\[[0-9;]*)?|\r)\Z")  # the start of a colour or a CRLF, cut by a chunk's end


def _escaped(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape_line(value: object) -> str:
    """A server-supplied value as one line of terminal text: every control character escaped."""
    return _UNSAFE.sub(_escaped, str(value))


def escape_text(value: object) -> str:
    """A server-supplied message, on its own lines: controls escaped but newline and tab."""
    return _UNSAFE_TEXT.sub(_escaped, str(value))


def escape_log(text: str) -> str:
    """A job's log: colours dropped, a carriage return made a line break (nothing overwrites a line
    already shown), every other control but newline and tab escaped."""
    return escape_text(_SGR.sub("", text).replace("\r\n", "\n").replace("\r", "\n"))


def escape_stream(chunks: Iterable[str]) -> Iterator[str]:
    """`escape_log` over a streamed log: a colour code or CRLF cut by a chunk's end waits for the rest."""
    held = ""
    for chunk in chunks:
        text = held + chunk
        tail = _HELD.search(text)
        cut = tail.start() if tail and len(text) - tail.start() <= 32 else len(text)
        held = text[cut:]
        if cut:
            yield escape_log(text[:cut])
    if held:
        yield escape_log(held)
