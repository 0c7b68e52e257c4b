"""The admission queue under load: N real training jobs (examples/tiny.yaml, one step each) from K owners,
submitted at once to one `python -m service` whose Ray head fits F of them at a time, with per-owner
quotas and one owner's jobs at a higher priority; pollers read the job list and the queue throughout, and
the control plane is killed (SIGKILL) and started again in the middle of the drain.

    .venv/bin/python bench/queue_load.py                      # 50 jobs, 5 owners, fits 2 (about 20 min here)
    .venv/bin/python bench/queue_load.py --jobs 10 --owners 2 # a quick look

Checked from the jobs' event logs (GET /v1/jobs/{id}/events) once every job ended: every job succeeded;
at every moment at most F jobs were admitted (PENDING or RUNNING) and no owner held more than its
quota; each job was admitted once and submitted to Ray once (no restart, one Ray submission); no job
started while one ahead of it in the queue (priority, then submission time) waited with room in its
owner's quota; no job was lost across the kill. Prints the numbers and the latency of the control
plane's answers; writes bench/results/queue/. Exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import pct, start_server  # noqa: E402

from service.client import ForkrlClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "queue"
ADMITTED = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    priority: int
    created_at: dt.datetime


@dataclass(frozen=True)
class Event:
    job: str
    state: str
    at: dt.datetime


def check(jobs: list[Job], events: list[Event], fit: int, quota: int) -> list[str]:
    """What the event log shows went wrong: more than `fit` jobs admitted at once, an owner above its
    quota, a job admitted twice, a job admitted while one ahead of it waited with room in its owner's
    quota. Pure: the bench's own check, unit-tested (tests/unit/test_queue_check.py)."""
    by_id = {j.id: j for j in jobs}
    key = {j.id: (-j.priority, j.created_at, j.id) for j in jobs}
    state = {j.id: "" for j in jobs}
    admissions: Counter[str] = Counter()
    problems: list[str] = []
    for e in sorted(events, key=lambda e: e.at):
        job = by_id[e.job]
        if e.state in ADMITTED and state[e.job] == "QUEUED":  # an admission
            admissions[e.job] += 1
            held = Counter(by_id[k].owner for k, s in state.items() if s in ADMITTED)
            ahead = [
                k for k, s in state.items()
                if s == "QUEUED" and key[k] < key[e.job] and held[by_id[k].owner] < quota
            ]  # fmt: skip
            if ahead:
                problems.append(f"{e.at.isoformat()}: {e.job} ({job.owner}) started while {ahead[0]} "
                                f"({by_id[ahead[0]].owner}), ahead of it, waited with room in its quota")  # fmt: skip
        state[e.job] = e.state
        admitted = [k for k, s in state.items() if s in ADMITTED]
        if len(admitted) > fit:
            problems.append(f"{e.at.isoformat()}: {len(admitted)} jobs admitted at once (fits {fit})")
        over = {o: n for o, n in Counter(by_id[k].owner for k in admitted).items() if n > quota}
        if over:
            problems.append(f"{e.at.isoformat()}: above the quota of {quota}: {over}")
    problems += [f"{k}: admitted {n} times" for k, n in admissions.items() if n > 1]
    problems += [f"{j.id}: never admitted" for j in jobs if admissions[j.id] == 0]
    return problems


def job_config(name: str) -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    cfg["name"] = name
    cfg["trainer"] = {**cfg["trainer"], "steps": 1, "save_every": 0, "max_restarts": 0}
    return cfg


def _utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=None)  # all UTC (SQLite keeps no zone)


def state_events(api: ForkrlClient, job_id: str) -> list[Event]:
    """A finished job's state changes, replayed by its event stream."""
    return [Event(job_id, d["state"], _utc(d["at"])) for kind, d in api.events(job_id) if kind == "state"]


class Bench:
    def __init__(self, args: argparse.Namespace, data: Path, ray_address: str, ray_token: str) -> None:
        self.args, self.data, self.ray_address, self.ray_token = args, data, ray_address, ray_token
        self.proc, self.url, self.admin = start_server(data, ray_address, ray_token)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.down = False  # while the control plane is killed: failed requests are expected, not errors
        self.kill: dict[str, Any] = {}

    def restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        t0 = time.perf_counter()
        self.proc, _, _ = start_server(self.data, self.ray_address, self.ray_token, self.admin, self.port)
        self.kill["down_s"] = round(time.perf_counter() - t0, 1)

    async def call(self, c: httpx.AsyncClient, kind: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = await c.request(method, path, **kw)
        except httpx.HTTPError as e:
            if not self.down:
                self.errors[f"{kind} {type(e).__name__}"] += 1
            return None
        if not self.down:
            self.lat[kind].append(time.perf_counter() - t0)
            if r.status_code >= 400:
                self.errors[f"{kind} {r.status_code}"] += 1
        return r

    async def run(self) -> dict[str, Any]:
        a = self.args
        owners = [f"team-{i}" for i in range(a.owners)]
        urgent = owners[-1]  # this owner's jobs go at priority 5
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin}"}, timeout=60) as admin:
            tokens = {o: admin.post("/v1/tokens", json={"owner": o}).json()["token"] for o in owners}
            for o in owners:
                q = {"max_running_jobs": a.quota, **({"max_priority": 5} if o == urgent else {})}
                assert admin.put(f"/v1/quotas/{o}", json=q).status_code == 200
        clients = {o: httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {t}"}, timeout=60)
                   for o, t in {**tokens, "admin": self.admin}.items()}  # fmt: skip
        ids: list[str] = []
        done = asyncio.Event()

        async def submit(i: int) -> None:
            o = owners[i % a.owners]
            params = {"priority": 5} if o == urgent else {}
            r = await self.call(clients[o], "submit", "POST", "/v1/jobs", json=job_config(f"q{i}"), params=params)
            assert r is not None and r.status_code == 201, r.text if r is not None else "no answer"
            ids.append(r.json()["id"])

        async def poller(o: str) -> None:
            while not done.is_set():
                await self.call(clients[o], "list", "GET", "/v1/jobs", params={"limit": 50})
                await self.call(clients[o], "queue", "GET", "/v1/queue")
                await asyncio.sleep(0.5)

        async def drain() -> None:
            killed = False
            while True:
                await asyncio.sleep(2)
                r = await self.call(clients["admin"], "admin-list", "GET", "/v1/jobs", params={"limit": 500})
                if r is None or r.status_code != 200:
                    continue
                jobs = r.json()["jobs"]
                states = Counter(j["state"] for j in jobs)
                print(f"  {time.strftime('%H:%M:%S')} {dict(sorted(states.items()))}", flush=True)
                if not killed and states["SUCCEEDED"] >= a.kill_after:
                    before = {j["id"]: j["state"] for j in jobs}
                    self.down, killed = True, True
                    await asyncio.to_thread(self.restart)
                    self.down = False
                    listed = (await clients["admin"].get("/v1/jobs", params={"limit": 500})).json()["jobs"]
                    after = {j["id"]: j["state"] for j in listed}
                    self.kill.update(at_succeeded=states["SUCCEEDED"], queued_before=states["QUEUED"],
                                     lost=sorted(set(before) - set(after)))  # fmt: skip
                    print(f"  control plane SIGKILLed with {states['QUEUED']} jobs queued; up again after "
                          f"{self.kill['down_s']} s; jobs lost: {len(self.kill['lost'])}", flush=True)  # fmt: skip
                if len(jobs) == a.jobs and all(j["state"] in TERMINAL for j in jobs):
                    done.set()
                    return

        t0 = time.perf_counter()
        pollers = [asyncio.create_task(poller(o)) for o in owners]
        await asyncio.gather(*[submit(i) for i in range(a.jobs)])
        print(f"  {a.jobs} jobs submitted in {time.perf_counter() - t0:.1f} s", flush=True)
        await drain()
        wall = time.perf_counter() - t0
        await asyncio.gather(*pollers)
        for c in clients.values():
            await c.aclose()
        return self.verify(ids, wall)

    def verify(self, ids: list[str], wall: float) -> dict[str, Any]:
        a = self.args
        with ForkrlClient(self.url, self.admin, timeout=60) as api:
            rows = [api.job(i) for i in ids]
            jobs = [Job(r.id, r.owner, r.priority, r.created_at.replace(tzinfo=None)) for r in rows]
            events = [e for i in ids for e in state_events(api, i)]
        problems = check(jobs, events, a.fit, a.quota)
        problems += [f"{r.id}: {r.state.value} ({r.message})" for r in rows if r.state.value != "SUCCEEDED"]
        problems += [f"{r.id}: restarted {r.restarts} time(s)" for r in rows if r.restarts]
        problems += [f"lost across the kill: {k}" for k in self.kill.get("lost", [])]
        from service.rayjobs import RayJobs

        submissions = Counter(j.submission_id for j in RayJobs(self.ray_address, self.ray_token).client().list_jobs())
        problems += [f"{k}: {n} Ray submissions" for k in ids if (n := submissions[k]) != 1]
        latency = {
            kind: {"n": len(v), "p50_ms": round(1e3 * statistics.median(v), 1), "p99_ms": round(1e3 * pct(v, 0.99), 1),
                   "max_ms": round(1e3 * max(v), 1)}
            for kind, v in sorted(self.lat.items()) if v
        }  # fmt: skip
        return {"jobs": a.jobs, "owners": a.owners, "fits": a.fit, "quota_max_running_jobs": a.quota,
                "wall_s": round(wall, 1), "kill": self.kill, "latency": latency, "errors": dict(self.errors),
                "problems": problems}  # fmt: skip


def report(r: dict[str, Any]) -> str:
    verdict = f"{len(r['problems'])} failed" if r["problems"] else "all held"
    lines = [
        f"{r['jobs']} jobs (examples/tiny.yaml, 1 step) from {r['owners']} owners, a Ray head that fits {r['fits']} "
        f"at once, quota max_running_jobs = {r['quota_max_running_jobs']} per owner, one owner at priority 5: "
        f"drained in {r['wall_s']:.0f} s.",
        f"Control plane SIGKILLed after {r['kill'].get('at_succeeded')} jobs had succeeded, with "
        f"{r['kill'].get('queued_before')} queued; up again after {r['kill'].get('down_s')} s; jobs lost: "
        f"{len(r['kill'].get('lost', []))}.",
        f"Checks (from the event logs): {verdict}.",
        f"Request errors outside the kill: {r['errors'] or 0}.",
        "",
        "| request | n | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['n']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |" for k, v in r["latency"].items()]
    lines += [f"- {p}" for p in r["problems"][:50]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--owners", type=int, default=5)
    ap.add_argument("--fit", type=int, default=2, help="jobs the Ray head fits at once (its CPUs: this x a job's)")
    ap.add_argument("--quota", type=int, default=1, help="each owner's max_running_jobs")
    ap.add_argument("--kill-after", type=int, default=10, help="SIGKILL the control plane once this many succeeded")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from actors.common.config_load import validate_config
    from actors.common.demand import job_demand
    from service.rayjobs import LocalRayHead

    cpus = job_demand(validate_config(job_config("x"))).resources["CPU"]
    head = LocalRayHead(num_cpus=int(args.fit * cpus))
    head.start()
    try:
        with tempfile.TemporaryDirectory(prefix="forkrl-queue-") as tmp:
            bench = Bench(args, Path(tmp), head.address, head.token)
            try:
                result = asyncio.run(bench.run())
            finally:
                bench.proc.terminate()
                bench.proc.wait(60)
    finally:
        head.stop()
    text = report(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "table.md").write_text(text)
    return 1 if result["problems"] or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
