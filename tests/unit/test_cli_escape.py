"""`forkrl` prints what the service sends: a tenant's job name, a failure message, a job's log. None of
it reaches the terminal as control characters (issue 36): an escape sequence would set the window title,
clear the screen, move the cursor or write the clipboard, and a bidi control would turn the text after it
around. They are shown escaped (`\\x1b`, `\\u202e`); accents and CJK stay as they are.

The commands run against a stub of the API on loopback that answers with hostile strings (the real
service stores such names as given: tests/service/test_abuse_display.py)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from typer.testing import CliRunner

from service import cli

# a window title, clear screen + cursor home, a C1 CSI (one code point), an override and an isolate
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[H evil\u202e\u2066 café 訓練 \x9b31m"
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H evil\\u202e\\u2066 café 訓練 \\x9b31m"
# a job's log: Ray's colour codes, progress-bar carriage returns, and a clipboard write (OSC 52)
LOG = "\x1b[36m(Learner pid=7)\x1b[0m ready\r\nGRPO 1/2\rGRPO 2/2\n\x1b]52;c;ZXZpbA==\x07done\tok\n"
LOG_SHOWN = "(Learner pid=7) ready\nGRPO 1/2\nGRPO 2/2\n\\x1b]52;c;ZXZpbA==\\x07done\tok\n"
# what a terminal acts on: C0 but newline, C1, DEL, bidi controls, line and paragraph separators
ACTED_ON = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

JOB = {
    "id": "forkrl-0123456789abcdef",
    "name": HOSTILE,
    "owner": "mallory",
    "state": "FAILED",
    "message": f"the job failed\nValueError: {HOSTILE}",
    "created_at": "2025-01-01T00:00:00Z",
    "updated_at": "2025-01-01T00:00:00Z",
    "started_at": None,
    "ended_at": None,
    "total_steps": 3,
    "last_step": 2,
    "run_dir": f"/runs/{HOSTILE}",
    "cancel_requested": False,
    "restarts": 1,
    "failures": [{"at": "2025-01-01T00:00:00Z", "step": 1, "reason": f"boom\n{HOSTILE}"}],
    "config": {"trainer": {"max_restarts": 2}},
}
METRICS = {"job_id": JOB["id"], "state": "FAILED", "last_step": 2, "metrics": [{"step": 2, "reward/mean": HOSTILE}]}


class Stub(BaseHTTPRequestHandler):
    """The few GETs `list`, `status` and `logs` make, answered with hostile strings."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        answers: dict[str, Any] = {
            "/v1/jobs": {"jobs": [JOB], "next_cursor": None},
            f"/v1/jobs/{JOB['id']}": JOB,
            f"/v1/jobs/{JOB['id']}/metrics": METRICS,
        }
        if path == f"/v1/jobs/{JOB['id']}/logs":
            self.answer(200, LOG.encode(), "text/plain; charset=utf-8")
        elif path in answers:
            self.answer(200, json.dumps(answers[path]).encode(), "application/json")
        else:
            self.answer(404, json.dumps({"detail": f"no job {HOSTILE}"}).encode(), "application/json")

    def answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def forkrl(url: str, *args: str) -> str:
    # color=True: the output as a terminal gets it (click strips some escape sequences from a pipe)
    out = CliRunner().invoke(cli.app, [*args, "--url", url, "--token", "t"], color=True).output
    return re.sub(r"^\x1b\[31m(forkrl: .*)\x1b\[0m$", r"\1", out, flags=re.M)  # the CLI's own red error line


@pytest.mark.parametrize("command", [["list"], ["status", JOB["id"]], ["status", "forkrl-nosuchjob"]])
def test_list_and_status_show_server_strings_escaped(url, command):
    out = forkrl(url, *command)
    assert not ACTED_ON.search(out), repr(out)
    assert SHOWN in out  # every character of it accounted for, the accents and CJK as they are


def test_status_keeps_a_message_on_its_lines():
    assert cli.escape_text(JOB["message"]) == f"the job failed\nValueError: {SHOWN}"


def test_logs_are_escaped_unless_raw(url):
    assert forkrl(url, "logs", JOB["id"]) == LOG_SHOWN
    assert forkrl(url, "logs", JOB["id"], "--raw") == LOG.replace("\r\n", "\n")  # click's runner reads CRLF as LF
    assert forkrl(url, "logs", JOB["id"], "--follow") == LOG_SHOWN


def test_a_sequence_split_between_streamed_chunks_is_still_dropped_or_escaped():
    chunks = ["\x1b[3", "6m(pid=1)\x1b", "[0m a\r", "\nb\x1b", "]0;t\x07\r"]
    assert "".join(cli.escape_stream(chunks)) == "(pid=1) a\nb\\x1b]0;t\\x07\n"
    # a lone ESC that never completes is escaped, not held forever
    assert "".join(cli.escape_stream(["\x1b[" + ";" * 100, "x"])) == "\\x1b[" + ";" * 100 + "x"


def test_every_control_is_escaped_and_text_stays():
    controls = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)])) + "\u061c\u200e\u200f\u2028\u2029"
    controls += "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    shown = cli.escape_line(controls)
    assert not ACTED_ON.search(shown) and "\n" not in shown
    assert shown.startswith("\\x00\\x01") and shown.endswith("\\u2068\\u2069") and "\\x1b\\x1c" in shown
    text = "café naïve 訓練 مرحبا שלום 🙂 x\\x1b"  # right-to-left letters are text; a backslash is text
    assert cli.escape_line(text) == cli.escape_text(text) == cli.escape_log(text) == text
