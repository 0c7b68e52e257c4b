"""Streams and metric reads under abuse (issue 36), through a real server on SQLite with Ray out of
reach (jobs stay QUEUED; metrics arrive through the ingest route or the store, as a driver's would):
streams are limited per token and in all (429 with Retry-After), end when their token is revoked or
expires even when nothing happens on the job, and metric reads and event replays load the history
from the store a page at a time, so the server's memory does not grow with history x readers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from .conftest import UNREACHABLE_RAY, Server, arm_ingest

CHECK_S = 0.5  # how often an open stream asks whether its token still holds
PER_TOKEN, TOTAL = 2, 3
READ_MAX = 600
PAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("streams")
    srv = Server(base / "data", f"sqlite:///{base / 'jobs.db'}", UNREACHABLE_RAY)
    srv.env.update(
        FORKRL_STREAM_MAX_PER_TOKEN=str(PER_TOKEN),
        FORKRL_STREAM_MAX_TOTAL=str(TOTAL),
        FORKRL_STREAM_TOKEN_CHECK_S=str(CHECK_S),
        FORKRL_STREAM_RETRY_AFTER_S="7",
        FORKRL_STREAM_IDLE_S="120",  # far beyond every wait below: an idle timeout never ends a stream here
        FORKRL_METRICS_READ_MAX=str(READ_MAX),
        FORKRL_STORE_PAGE_BYTES=str(PAGE_BYTES),
    )
    yield srv.start()
    srv.stop()


def tenant(server: Server, owner: str) -> tuple[str, int]:
    """A fresh non-admin token of `owner`: (secret, id)."""
    with server.client() as admin:
        r = admin.post("/v1/tokens", json={"owner": owner})
        assert r.status_code == 201, r.text
        return r.json()["token"], r.json()["id"]


def new_job(server: Server, token: str) -> str:
    with server.client(token) as c:
        r = c.post("/v1/jobs", json={"name": "streams", "trainer": {"steps": 3}})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def open_raw(server: Server, path: str, token: str) -> tuple[socket.socket, int, dict[str, str]]:
    """A stream request whose body is never read (an idle or hostile reader): the socket, the status and
    the headers."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        got = s.recv(4096)
        assert got, f"connection closed before the answer's head: {head!r}"
        head += got
    lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return s, int(lines[0].split()[1]), headers


class Reader(threading.Thread):
    """Reads one stream in the background: SSE events as (seconds, event, data), or log chunks."""

    def __init__(self, server: Server, token: str, path: str) -> None:
        super().__init__(daemon=True)
        self.server, self.token, self.path = server, token, path
        self.events: list[tuple[float, str, Any]] = []
        self.text = ""
        self.ended_at: float | None = None
        self.start()

    def run(self) -> None:
        auth = {"Authorization": f"Bearer {self.token}"}
        with (
            httpx.Client(base_url=self.server.url, headers=auth) as c,
            c.stream("GET", self.path, timeout=httpx.Timeout(10, read=None)) as r,
        ):
            assert r.status_code == 200, r.read()
            kind = ""
            for line in r.iter_lines():
                self.text += line + "\n"
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    self.events.append((time.time(), kind, json.loads(line[5:])))
        self.ended_at = time.time()


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_streams_are_limited_per_token_and_in_all(server: Server) -> None:
    a, _ = tenant(server, "ann")
    b, _ = tenant(server, "bob")
    ja, jb = new_job(server, a), new_job(server, b)
    held = [open_raw(server, f"/v1/jobs/{ja}/events", a), open_raw(server, f"/v1/jobs/{ja}/logs?follow=true", a)]
    assert [status for _, status, _ in held] == [200, 200]
    for path in (f"/v1/jobs/{ja}/events", f"/v1/jobs/{ja}/logs?follow=true"):  # both kinds count
        s, status, headers = open_raw(server, path, a)
        s.close()
        assert status == 429 and headers["retry-after"] == "7"
    with server.client(a) as c:
        r = c.get(f"/v1/jobs/{ja}/events")
        assert r.status_code == 429 and "FORKRL_STREAM_MAX_PER_TOKEN" in r.json()["detail"], r.text
        assert c.get(f"/v1/jobs/{ja}").status_code == 200  # other requests go on
    third = open_raw(server, f"/v1/jobs/{jb}/events", b)
    assert third[1] == 200  # another token: its own allowance, and the last of the server's
    with server.client(b) as c:
        r = c.get(f"/v1/jobs/{jb}/events")
        assert r.status_code == 429 and "FORKRL_STREAM_MAX_TOTAL" in r.json()["detail"], r.text
        assert r.headers["retry-after"] == "7"
    # a stream that goes away gives its place back (noticed when its client disconnects), also one that goes
    # at once, before its first byte is read
    held[0][0].close()
    third[0].close()
    for _ in range(20):
        s, _, _ = open_raw(server, f"/v1/jobs/{jb}/events", b)
        s.close()

    def reopened() -> bool:
        s, status, _ = open_raw(server, f"/v1/jobs/{ja}/events", a)
        if status == 200:
            held.append((s, status, {}))
        else:
            s.close()
        return status == 200

    wait_until(reopened, 10, "a closed stream's place given back")
    for s, _, _ in held:
        s.close()


def test_an_open_stream_ends_when_its_token_is_revoked(server: Server) -> None:
    token, token_id = tenant(server, "rita")
    job_id = new_job(server, token)
    ingest = arm_ingest(server.env["FORKRL_DATABASE_URL"], job_id)
    events = Reader(server, token, f"/v1/jobs/{job_id}/events")
    logs = Reader(server, token, f"/v1/jobs/{job_id}/logs?follow=true")
    stop = threading.Event()

    def live_job() -> None:  # a step every 0.1 s: the stream is never idle
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ingest}"}) as c:
            step = 1
            while not stop.is_set():
                assert c.post(f"/v1/jobs/{job_id}/ingest", json={"metrics": [{"step": step}]}).status_code == 202
                step += 1
                time.sleep(0.1)

    pusher = threading.Thread(target=live_job, daemon=True)
    pusher.start()
    try:
        wait_until(lambda: sum(e[1] == "metrics" for e in events.events) >= 3, 10, "metrics delivered")
        with server.client() as admin:
            assert admin.delete(f"/v1/tokens/{token_id}").status_code == 200
        revoked = time.time()
        wait_until(lambda: events.ended_at is not None and logs.ended_at is not None, 4 * CHECK_S + 3, "streams end")
    finally:
        stop.set()
        pusher.join(10)
    assert events.events[-1][1:] == ("end", {"reason": "revoked"}), events.events[-3:]
    late = [e for e in events.events if e[1] == "metrics" and e[0] > revoked + 2 * CHECK_S + 1]
    assert not late, f"{len(late)} metric events long after the revocation"
    assert logs.text.rstrip().endswith("[forkrl] token revoked: stream ended"), logs.text[-300:]


def test_an_idle_stream_ends_when_its_token_expires(server: Server) -> None:
    token, token_id = tenant(server, "ed")
    job_id = new_job(server, token)
    events = Reader(server, token, f"/v1/jobs/{job_id}/events")
    logs = Reader(server, token, f"/v1/jobs/{job_id}/logs?follow=true")
    wait_until(lambda: any(e[1] == "state" for e in events.events), 10, "the current state sent")
    with server.client() as admin:  # nothing happens on the job from here: only a timer can notice
        assert admin.patch(f"/v1/tokens/{token_id}", json={"expires_in_s": 0}).status_code == 200
    wait_until(lambda: events.ended_at is not None and logs.ended_at is not None, 4 * CHECK_S + 3, "streams end")
    assert events.events[-1][1:] == ("end", {"reason": "expired"})
    assert logs.text.rstrip().endswith("[forkrl] token expired: stream ended"), logs.text[-300:]


def history(server: Server, steps: int) -> str:
    """A job with `steps` records of about 10 KB each, many small objects (a sampled completion's
    tokens), pushed through the ingest route as a driver would."""
    token, _ = tenant(server, "hist")
    job_id = new_job(server, token)
    ingest = arm_ingest(server.env["FORKRL_DATABASE_URL"], job_id)
    tokens = [{"t": f"tok{i}", "h": i / 300, "k": i % 5 == 0} for i in range(300)]  # ~10 KB as JSON
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ingest}"}, timeout=60) as c:
        for first in range(1, steps + 1, 80):
            batch = [{"step": s, "reward/mean": 0.5, "samples": [{"tokens": tokens}]}
                     for s in range(first, min(first + 80, steps + 1))]  # fmt: skip
            assert c.post(f"/v1/jobs/{job_id}/ingest", json={"metrics": batch}).status_code == 202
    return job_id


def test_metric_reads_and_replays_are_paged(server: Server) -> None:
    steps = 1200
    job_id = history(server, steps)
    admin = server.client()
    r = admin.get(f"/v1/jobs/{job_id}/metrics", params={"limit": READ_MAX + 1})
    assert r.status_code == 422 and "limit" in r.text and str(READ_MAX) in r.text, r.text[:300]
    # page by page: each read returns its page, in step order, and the pages join up
    seen, after = [], 0
    while True:
        page = admin.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": after, "limit": 500}).json()
        got = [m["step"] for m in page["metrics"]]
        assert len(got) == min(500, steps - after) and page["last_step"] == steps
        if not got:
            break
        assert all(len(m["samples"][0]["tokens"]) == 300 for m in page["metrics"])
        seen += got
        after = got[-1]
    assert seen == list(range(1, steps + 1))
    scalars = admin.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 3, "view": "scalars"}).json()["metrics"]
    assert scalars == [{"step": s, "reward/mean": 0.5, "samples/n": 1} for s in (1, 2, 3)]
    store_pages(server, job_id)

    # memory: 4 readers at once of the whole history (2 x a full read of 600, 2 x an event replay from
    # step 0) - each holds a page of it, not all of it
    proc = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
    base, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    reads: list[int] = []
    replays: list[list[int]] = []

    def full_read() -> None:
        with server.client() as c:
            reads.append(len(c.get(f"/v1/jobs/{job_id}/metrics", params={"limit": READ_MAX}).json()["metrics"]))

    def replay() -> None:
        with server.client() as c:  # the admin token: 2 streams at once are within its allowance
            replays.append(replayed(c, f"/v1/jobs/{job_id}/events", steps))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    readers = [threading.Thread(target=f) for f in (full_read, full_read, replay, replay)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    done.set()
    sampler.join()
    admin.close()
    assert reads == [READ_MAX] * 2 and replays == [list(range(1, steps + 1))] * 2
    grew = (peak[0] - base) / 2**20
    assert grew < 60, f"the server grew by {grew:.0f} MiB reading a {steps}-step history with 4 readers"


def store_pages(server: Server, job_id: str) -> None:
    """The store's query itself returns a page - LIMIT in SQL, and as many records as FORKRL_STORE_PAGE_BYTES
    hold, no more (the records here are all of one size) - and the pages join up."""
    from sqlalchemy import event

    from service.store import JobStore

    store, sql = JobStore(server.env["FORKRL_DATABASE_URL"]), []
    event.listen(store.engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    try:
        after, sizes = 0, []
        while True:
            with store.session() as db:
                page = store.metrics(db, job_id, after, 1000, PAGE_BYTES)
            if not page:
                break
            assert [m.step for m in page] == list(range(after + 1, after + len(page) + 1))
            size, one = sum(len(m.json) for m in page), len(page[0].json)
            assert one > 8_000 and (size <= PAGE_BYTES < size + one or page[-1].step == 1200), (len(page), size)
            sizes.append(len(page))
            after = page[-1].step
    finally:
        store.close()
    assert after == 1200 and len(sizes) > 10, sizes
    assert all(" LIMIT " in q for q in sql if "FROM metrics" in q), sql[:3]


def replayed(c: httpx.Client, path: str, steps: int) -> list[int]:
    """The steps an event stream from step 0 replays, until it reaches `steps` (retried while the server
    has no stream to spare: the streams of the tests before may take a moment to be noticed closed)."""
    deadline = time.time() + 10
    while True:
        with c.stream("GET", path, params={"after_step": 0}) as r:
            if r.status_code == 429 and time.time() < deadline:
                time.sleep(0.2)
                continue
            assert r.status_code == 200, r.read()
            got: list[int] = []
            for line in r.iter_lines():
                if line.startswith("id: s"):
                    got.append(int(line[5:]))
                    if got[-1] == steps:
                        return got
            return got


def test_the_cli_waits_out_a_429_then_follows(server: Server) -> None:
    # the token already holds its PER_TOKEN streams: `forkrl logs --follow` is refused with 429 and
    # Retry-After 7, says so, waits, and follows once a place is free (before: exit 1 on the 429)
    import subprocess
    import sys

    from .conftest import ROOT

    token, token_id = tenant(server, "cleo")
    job_id = new_job(server, token)
    held = [open_raw(server, f"/v1/jobs/{job_id}/events", token) for _ in range(PER_TOKEN)]
    assert [status for _, status, _ in held] == [200] * PER_TOKEN
    env = {"FORKRL_URL": server.url, "FORKRL_TOKEN": token, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "service.cli", "logs", job_id, "--follow"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()  # still there: waiting, not failed
        for s, _, _ in held:
            s.close()
        time.sleep(7 + 2)  # the retry finds a free place and follows the log
        with server.client() as admin:
            assert admin.delete(f"/v1/tokens/{token_id}").status_code == 200
        out, err = proc.communicate(timeout=4 * CHECK_S + 10)
    finally:
        proc.kill()
    assert "429" in err and "retrying in 7 s" in err, err
    assert proc.returncode == 0 and out.rstrip().endswith("[forkrl] token revoked: stream ended"), (out, err)
