"""Load on the control plane: N clients polling list and get, plus concurrent submissions, against a
real `python -m service` on SQLite (Ray unreachable on purpose: jobs stay queued, so only the API and
its job store are measured).

    .venv/bin/python bench/load.py                       # 50 pollers for 30 s + 20 submissions
    .venv/bin/python bench/load.py --pollers 10 --seconds 10

Prints the request count, errors (any status >= 400, or a transport error) and the latency
percentiles of each kind of request; exits 1 when a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    data: Path, ray_address: str = "http://127.0.0.1:9", ray_token: str = "", token: str = "", port: int = 0
) -> tuple[subprocess.Popen[bytes], str, str]:
    """`python -m service` on data (its SQLite store); again on the same data, port and token after a kill."""
    port, token = port or _free_port(), token or secrets.token_urlsafe(24)
    env = dict(os.environ, FORKRL_ENV="production", FORKRL_PORT=str(port), FORKRL_DATA_DIR=str(data),
               FORKRL_RAY_ADDRESS=ray_address, FORKRL_RAY_AUTH_TOKEN=ray_token, FORKRL_ADMIN_TOKEN=token)  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    log = (data / "service.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url, token
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the service did not come up")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(url: str, token: str, pollers: int, seconds: float, submissions: int) -> int:
    job = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    lat: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    limits = httpx.Limits(max_connections=pollers + submissions + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 limits=limits) as c:  # fmt: skip
        seed = [(await c.post("/v1/jobs", json=job)).json()["id"] for _ in range(10)]
        end = time.perf_counter() + seconds

        async def call(kind: str, method: str, path: str, **kw: object) -> None:
            t0 = time.perf_counter()
            try:
                r = await c.request(method, path, **kw)  # type: ignore[arg-type]
                if r.status_code >= 400:
                    errors[f"{kind} {r.status_code}"] += 1
            except httpx.HTTPError as e:
                errors[f"{kind} {type(e).__name__}"] += 1
            lat[kind].append(time.perf_counter() - t0)

        async def poller() -> None:
            while time.perf_counter() < end:
                await call("list", "GET", "/v1/jobs", params={"limit": 50})
                await call("get", "GET", f"/v1/jobs/{random.choice(seed)}")

        async def submitter(i: int) -> None:
            await asyncio.sleep(seconds / 3)  # in the middle of the polling
            await call("submit", "POST", "/v1/jobs", json=dict(job, name=f"load-{i}"))

        t0 = time.perf_counter()
        await asyncio.gather(*[poller() for _ in range(pollers)], *[submitter(i) for i in range(submissions)])
        wall = time.perf_counter() - t0
    total = sum(len(v) for v in lat.values())
    print(f"{pollers} pollers x {seconds:.0f} s + {submissions} concurrent submissions, SQLite: {total} requests "
          f"in {wall:.1f} s ({total / wall:.0f}/s), errors: {dict(errors) or 0}")  # fmt: skip
    print(f"{'request':8} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind in ("list", "get", "submit"):
        v = lat[kind]
        print(f"{kind:8} {len(v):6d} {1e3 * statistics.median(v):8.1f} {1e3 * pct(v, 0.95):8.1f} "
              f"{1e3 * pct(v, 0.99):8.1f} {1e3 * max(v):8.1f}")  # fmt: skip
    return 1 if errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--submissions", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="forkrl-load-") as tmp:
        proc, url, token = start_server(Path(tmp))
        try:
            return asyncio.run(run(url, token, args.pollers, args.seconds, args.submissions))
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
