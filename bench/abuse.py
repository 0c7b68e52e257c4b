"""Replay the abuse findings of issue 36 against a running control plane and measure what they cost.

    python bench/abuse.py                                   # this checkout
    python bench/abuse.py --checkout /tmp/base --label before   # an older checkout, same attacks

Each attack runs against a fresh `python -m service` (production mode, SQLite, no reachable Ray:
jobs stay PENDING) as an ordinary tenant token. While it runs, a prober asks GET /healthz and GET
/v1/jobs/{id} every 50 ms. Printed per attack: what the server answered, its CPU seconds (from the
start of the attack until the process is idle again, so work that goes on after a client left is
counted), its peak and final resident memory, and the p99 latency of both probes. Results are
appended to bench/results/abuse.json under the label.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`python -m service` from a checkout, production mode, its own SQLite store."""

    def __init__(self, checkout: Path, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="forkrl-abuse-"))
        self.port, self.admin = free_port(), secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = self.dir / "jobs.db"
        self.env = dict(
            os.environ, FORKRL_ENV="production", FORKRL_PORT=str(self.port), FORKRL_DATA_DIR=str(self.dir / "data"),
            FORKRL_DATABASE_URL=f"sqlite:///{self.db}", FORKRL_RAY_ADDRESS="http://127.0.0.1:9",
            FORKRL_ADMIN_TOKEN=self.admin, FORKRL_RUNS_DIR=str(self.dir / "runs"), **(env or {}),
        )  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        log = (self.dir / "service.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=checkout, env=self.env, stdout=log, stderr=log
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"service did not start: {(self.dir / 'service.log').read_text()[-3000:]}")
        self.ps = psutil.Process(self.proc.pid)
        self.tenant = self.token("tenant")

    def client(self, token: str | None = None, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token or self.admin}"}, timeout=timeout
        )

    def token(self, owner: str) -> str:
        with self.client() as c:
            r = c.post("/v1/tokens", json={"owner": owner})
            r.raise_for_status()
            return str(r.json()["token"])

    def job(self, name: str = "probe", token: str | None = None) -> str:
        with self.client(token or self.tenant) as c:
            r = c.post("/v1/jobs", json={"name": name, "trainer": {"steps": 3}})
            r.raise_for_status()
            return str(r.json()["id"])

    def arm_ingest(self, job_id: str) -> str:
        """The job's ingest token, set in the store as a submission to Ray would (the API never returns it)."""
        import sqlite3

        token = secrets.token_urlsafe(32)
        with sqlite3.connect(self.db) as db:
            db.execute(
                "UPDATE jobs SET ingest_token_hash = ? WHERE id = ?",
                (hashlib.sha256(token.encode()).hexdigest(), job_id),
            )
        return token

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Probe:
    """GET /healthz and GET job every 50 ms, and the server's memory, while an attack runs."""

    def __init__(self, svc: Service, job_id: str) -> None:
        self.svc, self.job_id = svc, job_id
        self.times: dict[str, list[float]] = {"healthz": [], "job": []}
        self.rss: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.svc.client(self.svc.tenant, timeout=60) as c:
            while not self.stop.is_set():
                for name, path in (("healthz", "/healthz"), ("job", f"/v1/jobs/{self.job_id}")):
                    t0 = time.perf_counter()
                    with contextlib.suppress(httpx.HTTPError):
                        c.get(path)
                    self.times[name].append(time.perf_counter() - t0)
                with contextlib.suppress(psutil.Error):
                    self.rss.append(self.svc.rss_mb())
                time.sleep(0.05)

    def p99_ms(self, name: str) -> float | None:
        xs = sorted(self.times[name])
        return round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1) if xs else None


def settle(svc: Service, limit_s: float = 90) -> None:
    """Wait until the server's CPU stops moving (work on behalf of a client that left is still work)."""
    deadline, last = time.time() + limit_s, svc.cpu()
    while time.time() < deadline:
        time.sleep(1.0)
        now = svc.cpu()
        if now - last < 0.05:
            return
        last = now


def measure(svc: Service, attack: Callable[[Service], dict[str, Any]]) -> dict[str, Any]:
    job_id = svc.job()
    rss0, cpu0 = svc.rss_mb(), svc.cpu()
    probe = Probe(svc, job_id)
    probe.thread.start()
    t0 = time.perf_counter()
    outcome = attack(svc)
    probe.stop.set()
    probe.thread.join()
    settle(svc)
    return {
        "outcome": outcome,
        "seconds": round(time.perf_counter() - t0, 1),
        "server_cpu_s": round(svc.cpu() - cpu0, 2),
        "rss_mb": {"before": round(rss0), "peak": round(max(probe.rss or [rss0])), "after": round(svc.rss_mb())},
        "p99_ms": {"healthz": probe.p99_ms("healthz"), "get_job": probe.p99_ms("job")},
    }


def _statuses(calls: Iterator[Callable[[], int | str]], workers: int) -> dict[str, int]:
    with ThreadPoolExecutor(workers) as pool:
        return dict(Counter(str(s) for s in pool.map(lambda f: f(), calls)))


def _post_yaml(svc: Service, body: str, client_timeout: float) -> Callable[[], int | str]:
    def call() -> int | str:
        try:
            with svc.client(svc.tenant, timeout=client_timeout) as c:
                return c.post("/v1/configs/validate", json={"yaml": body}).status_code
        except httpx.TimeoutException:
            return "client gave up"

    return call


def yaml_deep(svc: Service) -> dict[str, Any]:
    """Four at once: 10,000 levels of `[` (20 KB); the clients give up after 2 s."""
    return _statuses(iter([_post_yaml(svc, "[" * 10_000 + "]" * 10_000, 2.0)] * 4), 4)


def yaml_wide(svc: Service) -> dict[str, Any]:
    """Four at once: 9,000 unknown keys (about 89 KB)."""
    body = "".join(f"k{i}: {i}\n" for i in range(9000))  # 83 KB: under the 96 KiB the check accepts
    return _statuses(iter([_post_yaml(svc, body, 60.0)] * 4), 4)


def _open_stream(url: str, path: str, token: str) -> socket.socket | None:
    """Send a stream request and never read the answer (a slow or idle reader)."""
    host, port = url.removeprefix("http://").split(":")
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        return s
    except OSError:
        return None


def streams(svc: Service, n: int = 1200, hold_s: float = 20) -> dict[str, Any]:
    """n never-read streams from one tenant, half events, half log follows, held open for hold_s."""
    job_id = svc.job("streams")
    paths = [f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/logs?follow=true"]
    socks = [_open_stream(svc.url, paths[i % 2], svc.tenant) for i in range(n)]
    time.sleep(hold_s)
    answers: Counter[str] = Counter()
    for s in socks:
        if s is None:
            answers["refused connection"] += 1
            continue
        s.settimeout(0.2)
        try:
            head = s.recv(64).decode(errors="replace").split("\r\n")[0]
            answers[head.split(" ")[1] if head.startswith("HTTP/") else "no answer"] += 1
        except OSError:
            answers["no answer"] += 1
        s.close()
    return {"opened": n, "status": dict(answers)}


def revoked_stream(svc: Service, limit_s: float = 30) -> dict[str, Any]:
    """A stream whose token is revoked while its job keeps logging: how long it goes on delivering."""
    with svc.client() as admin:
        r = admin.post("/v1/tokens", json={"owner": "tenant"})
        token, token_id = r.json()["token"], r.json()["id"]
    job_id = svc.job("revoked", token)
    ingest = svc.arm_ingest(job_id)
    delivered_after: Counter[str] = Counter()  # events by name after the revocation
    revoked_at: list[float] = []
    done = threading.Event()

    def read() -> None:
        with contextlib.suppress(httpx.HTTPError):  # a stream cut by the server has ended too
            follow()
        done.set()

    def follow() -> None:
        auth = {"Authorization": f"Bearer {token}"}
        with (
            httpx.Client(base_url=svc.url, headers=auth, timeout=None) as c,
            c.stream("GET", f"/v1/jobs/{job_id}/events") as r,
        ):
            for line in r.iter_lines():
                if revoked_at and line.startswith("event:"):
                    delivered_after[line.removeprefix("event:").strip()] += 1
                if done.is_set():
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1)
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {ingest}"}) as c, svc.client() as admin:
        admin.delete(f"/v1/tokens/{token_id}")
        revoked_at.append(time.time())
        step = 1
        while not done.is_set() and time.time() - revoked_at[0] < limit_s:
            c.post(f"/v1/jobs/{job_id}/ingest", json={"metrics": [{"step": step, "reward/mean": 0.5}]})
            step, _ = step + 1, time.sleep(1)
    ended = done.is_set()
    done.set()
    return {
        "events_after_revocation": dict(delivered_after),
        "stream_ended_within_s": round(time.time() - revoked_at[0], 1) if ended else f"open after {limit_s} s",
    }


def job_flood(svc: Service, seconds: float = 20) -> dict[str, Any]:
    """Submissions one after another for `seconds`."""
    out: Counter[str] = Counter()
    with svc.client(svc.tenant) as c:
        end = time.time() + seconds
        while time.time() < end:
            out[str(c.post("/v1/jobs", json={"name": "flood", "trainer": {"steps": 1}}).status_code)] += 1
    return dict(out)


def big_asks(svc: Service) -> dict[str, Any]:
    """Configs that ask for far more than a tenant should, or pin to nodes and others' resources."""
    asks = {
        "4096 reward workers": {"reward": {"num_workers": 4096}},
        "1024 engines x 64 GPUs": {"rollout": {"num_engines": 1024, "num_gpus_per_engine": 64}},
        "4096 learners": {"learner": {"num_learners": 4096}},
        "node:<ip> pin": {"learner": {"ray_resources": {"node:127.0.0.1": 0.01}}},
        "another group's resource": {"reward": {"ray_resources": {"team_b_gpu": 1}}},
        "NUL in model.path": {"model": {"path": "/models/x\u0000y"}},
        "~user path": {"model": {"path": "~root/model"}},
    }
    out: dict[str, Any] = {}
    with svc.client(svc.tenant) as c:
        for name, body in asks.items():
            try:
                out[name] = c.post("/v1/jobs", json={"name": "ask", **body}).status_code
            except httpx.HTTPError as e:
                out[name] = f"{type(e).__name__}: {e}"
    return out


def metric_history(svc: Service, steps: int = 2000, readers: int = 4) -> dict[str, Any]:
    """A job with `steps` records of about 20 KB; then a metrics read of 10,000 and `readers` event replays."""
    job_id = svc.job("history")
    ingest = svc.arm_ingest(job_id)
    pad = "x" * 20_000
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {ingest}"}, timeout=60) as c:
        for first in range(1, steps + 1, 40):  # 40 x 20 KB: under the 1 MiB body limit
            batch = [{"step": s, "reward/mean": 0.5, "note": pad} for s in range(first, min(first + 40, steps + 1))]
            c.post(f"/v1/jobs/{job_id}/ingest", json={"metrics": batch}).raise_for_status()
    rss_loaded = svc.rss_mb()
    with svc.client(svc.tenant, timeout=120) as c:
        read = c.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10000})
    socks = [_open_stream(svc.url, f"/v1/jobs/{job_id}/events?after_step=0", svc.tenant) for _ in range(readers)]
    time.sleep(10)
    for s in socks:
        if s is not None:
            s.close()
    return {
        "metrics_read_status": read.status_code,
        "metrics_read_bytes": len(read.content),
        "rss_mb_after_ingest": round(rss_loaded),
    }


ATTACKS: dict[str, Callable[[Service], dict[str, Any]]] = {
    "yaml_deep_x4": yaml_deep,
    "yaml_wide_x4": yaml_wide,
    "streams_1200": streams,
    "revoked_stream": revoked_stream,
    "job_flood_20s": job_flood,
    "big_asks": big_asks,
    "metric_history": metric_history,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose service is attacked")
    parser.add_argument("--label", default="after", help="the name of this run in the results file")
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="run these attacks only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abuse.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.checkout, capture_output=True, text=True)
    results: dict[str, Any] = {"checkout": commit.stdout.strip(), "attacks": {}}
    for name in args.only or list(ATTACKS):
        svc = Service(args.checkout)
        try:
            results["attacks"][name] = row = measure(svc, ATTACKS[name])
        finally:
            svc.stop()
        print(f"{args.label:>7} {name:<15} cpu {row['server_cpu_s']:>7.2f} s  rss {row['rss_mb']}  "
              f"p99 {row['p99_ms']}  {json.dumps(row['outcome'])}", flush=True)  # fmt: skip
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    earlier = saved.get(args.label, {}).get("attacks", {}) if args.only else {}
    saved[args.label] = {**results, "attacks": {**earlier, **results["attacks"]}}  # --only adds to a run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"written: {args.out} ({args.label})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
