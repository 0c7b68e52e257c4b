"""Ray nodes of `ray start` for the service tests that lose one (tests/service/test_nodes.py,
test_headloss.py): each node a raylet of its own with its own ports and temp dir, started and SIGKILLed
as a whole, as a machine of a real cluster is."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from service.admission import RayNode
from service.rayjobs import RayJobs

from .conftest import free_port

__all__ = ["RayNodeProcesses", "alive_nodes", "head_args", "ray_env", "worker_args"]


def ray_env(token: str) -> dict[str, str]:
    """The environment of every node: this interpreter first on PATH (the job's driver runs `python -m
    actors.train` on the head), token authentication with `token`."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    return env


_PORT_FLAGS = ("node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export",
               "runtime-env-agent")  # fmt: skip


def _ports(avoid: range = range(0)) -> list[str]:
    """A free port for each of a node's components, none of them in `avoid` (the node's worker ports: Ray
    refuses to start a node whose components share a port with its worker range)."""
    flags = []
    for flag in _PORT_FLAGS:
        while (port := free_port()) in avoid:
            pass
        flags.append(f"--{flag}-port={port}")
    return flags


def head_args(gcs: int, dashboard: int) -> list[str]:
    """A head with no CPUs (only the job's driver runs there) and its dashboard on `dashboard`."""
    return ["--head", "--num-cpus=0", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", *_ports()]  # fmt: skip


def worker_args(gcs: int, cpus: int, resources: dict[str, float] | None = None) -> list[str]:
    low = free_port() // 100 * 100  # a worker port range of its own (workers bind in it)
    workers = range(low, low + 100)
    extra = [f"--resources={json.dumps(resources)}"] if resources else []
    return [f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus}", *extra, *_ports(avoid=workers),
            f"--min-worker-port={low}", f"--max-worker-port={low + 99}"]  # fmt: skip


def alive_nodes(address: str, token: str, n: int, timeout: float = 120) -> list[RayNode]:
    """Until exactly n of the cluster's nodes are ALIVE (Ray's state API through the dashboard); those."""
    ray = RayJobs(address, token)
    deadline = time.time() + timeout
    seen: object = None
    while True:
        try:
            alive = [node for node in ray.nodes() if node.state == "ALIVE"]
            if len(alive) == n:
                return alive
            seen = alive
        except Exception as e:  # not up yet
            seen = e
        assert time.time() < deadline, f"not {n} alive Ray nodes after {timeout} s: {seen!r}"
        time.sleep(1)


class RayNodeProcesses:
    """One node's `ray start` processes, told apart from every other Ray on the machine by the node's own
    temp dir (every process of the node carries it in its command line, or descends from one that does)."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env, self.args = env, args
        self.temp_dir = Path(f"/tmp/forkrl-node-{secrets.token_hex(4)}")  # short: socket paths < 108 bytes

    def start(self) -> None:
        ray = shutil.which("ray", path=self.env["PATH"]) or "ray"
        out = subprocess.run([ray, "start", *self.args, f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                             env=self.env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]

    def processes(self) -> list[psutil.Process]:
        mine: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.temp_dir) in a for a in (p.info["cmdline"] or [])):
                    for q in (p, *p.children(recursive=True)):
                        mine[q.pid] = q
        return list(mine.values())

    def kill(self) -> int:
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
        return len(procs)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
