"""Fixtures for the control plane: a real uvicorn server in its own process, a real PostgreSQL
server started here on loopback, and a real local Ray head for the job tests."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE_RAY = "http://127.0.0.1:9"  # the discard port: nothing answers, jobs stay queued


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb + pg_ctl; as user postgres when root)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.fail("PostgreSQL server binaries not found: `make setup` installs Debian's postgresql")
    # not under pytest's tmp dir: that is private to root, and the server runs as user postgres
    base = Path(tempfile.mkdtemp(prefix="forkrl-pg-"))
    data, sock, port = base / "data", base / "sock", free_port()
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")

    def run(*args: str) -> None:
        out = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")

    run(initdb, "-D", str(data), "-U", "forkrl", "--auth=trust", "-E", "UTF8")
    run(pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "start",
        "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off")  # fmt: skip
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=forkrl dbname=postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE forkrl")
        yield f"postgresql+psycopg://forkrl@127.0.0.1:{port}/forkrl"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


class Server:
    """`python -m service` on a free loopback port; restartable, killable."""

    def __init__(self, data_dir: Path, database_url: str, ray_address: str, ray_token: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(24)
        self.env = dict(
            os.environ,
            FORKRL_ENV="production",
            FORKRL_PORT=str(self.port),
            FORKRL_DATA_DIR=str(data_dir),
            FORKRL_DATABASE_URL=database_url,
            FORKRL_RAY_ADDRESS=ray_address,
            FORKRL_RAY_AUTH_TOKEN=ray_token,
            FORKRL_ADMIN_TOKEN=self.admin_token,
            FORKRL_RECONCILE_INTERVAL_S="1",
        )
        self.env.pop("RAY_ADDRESS", None)
        self.log = data_dir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=out, stderr=out)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"service not up after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token or self.admin_token}"}, timeout=60
        )


def wait_for(c: httpx.Client, job_id: str, states: set[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(1)
    raise AssertionError(f"{job_id} not in {states} after {timeout}s: {job}")


def wait_for_checkpoint(c: httpx.Client, job: dict, step: int, timeout: float = 400) -> None:
    """Until the job's run holds a complete checkpoint of `step` (its marker written)."""
    from actors.common.contract import RunDir

    marker = RunDir(Path(job["run_dir"])).checkpoint(step) / RunDir.MARKER
    deadline = time.time() + timeout
    while not marker.exists():
        assert time.time() < deadline, c.get(f"/v1/jobs/{job['id']}").json()
        time.sleep(0.3)


def state_events(c: httpx.Client, job_id: str) -> list[dict]:
    """A finished job's state events, replayed by its event stream (which ends for a finished job)."""
    out, kind = [], ""
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind == "state":
                out.append(json.loads(line[5:]))
    return out


def arm_ingest(database_url: str, job_id: str, token: str | None = None) -> str:
    """Give a stored job a known ingest token, as a submission to Ray would (the service keeps only its
    hash and hands the token to the driver alone; no API returns it)."""
    import hashlib

    from sqlalchemy import create_engine, text

    token = token or secrets.token_urlsafe(32)
    engine = create_engine(database_url)
    with engine.begin() as c:
        c.execute(text("UPDATE jobs SET ingest_token_hash = :h WHERE id = :id"),
                  {"h": hashlib.sha256(token.encode()).hexdigest(), "id": job_id})  # fmt: skip
    engine.dispose()
    return token


@pytest.fixture(scope="session")
def ray_head():
    """One local Ray head (with token auth) for the job and dashboard tests."""
    from service.rayjobs import LocalRayHead, RayJobs

    head = LocalRayHead(num_cpus=4)
    head.start()
    RayJobs(head.address, head.token).wait_ready()
    yield head
    head.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def api_server(tmp_path, database_url) -> Iterator[Server]:
    """The service with its job store and no reachable Ray: submitted jobs stay QUEUED."""
    server = Server(tmp_path / "data", database_url, UNREACHABLE_RAY).start()
    yield server
    server.stop()
    if "postgresql" in database_url:  # the next test starts from an empty schema
        from sqlalchemy import create_engine, text

        engine = create_engine(database_url)
        with engine.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()
