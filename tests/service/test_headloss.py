"""The Ray head lost mid-job on an external cluster with Ray's GCS fault tolerance: Redis (Debian's
redis-server) backs the head's control store, the head (no CPUs) and one worker node are `ray start`
processes of their own, and `python -m service` is pointed at the head as at any external cluster. The
head's every process is SIGKILLed (its GCS, raylet, dashboard, the job's supervisor and driver) and
the head is started again on the same ports and Redis: the worker node comes back as the same node,
Ray remembers the job and reports it failed, and the control plane restarts it from its newest
checkpoint. (Without fault tolerance a new head has no record of the job: the control plane resubmits
it, tests/service/test_jobs.py::test_queued_while_ray_is_down_then_resubmitted_on_a_new_head.)
Minutes: marked slow."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from service.rayjobs import RayJobs

from .conftest import Server, free_port, wait_for, wait_for_checkpoint
from .test_jobs import tiny

pytestmark = pytest.mark.slow


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


@pytest.fixture
def ft_cluster(tmp_path):
    """Redis, a head backed by it (no CPUs) and a worker node (4 CPUs)."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server not found: `make setup` installs Debian's redis-server")
    redis_port, gcs, dash = free_port(), free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    token = secrets.token_hex(32)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    head = RayNodeProcesses(
        dict(env, RAY_REDIS_ADDRESS=f"127.0.0.1:{redis_port}"),
        "--head", "--num-cpus=0", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    )  # fmt: skip
    low = free_port() // 100 * 100  # a worker port range of its own (workers bind in it)
    worker = RayNodeProcesses(
        env, f"--address=127.0.0.1:{gcs}", "--num-cpus=4", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--min-worker-port={low}", f"--max-worker-port={low + 99}",
    )  # fmt: skip
    try:
        head.start()
        worker.start()
        yield head, worker, f"http://127.0.0.1:{dash}", token
    finally:
        worker.remove()
        head.remove()
        redis.kill()
        redis.wait(30)


def _nodes(address: str, token: str) -> dict[str, str]:
    with contextlib.suppress(Exception):
        return {n.node_id: n.state for n in RayJobs(address, token).nodes()}
    return {}


def test_a_lost_head_with_gcs_fault_tolerance_keeps_its_worker_node_and_the_job_restarts(ft_cluster, tmp_path):
    head, worker, address, token = ft_cluster
    deadline = time.time() + 120
    while len([s for s in _nodes(address, token).values() if s == "ALIVE"]) < 2:
        assert time.time() < deadline, _nodes(address, token)
        time.sleep(1)
    before = {k for k, s in _nodes(address, token).items() if s == "ALIVE"}
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", address, token).start()
    cfg = tiny(8)
    cfg["trainer"] = {**cfg["trainer"], "save_every": 1, "max_restarts": 2}
    try:
        with server.client() as api:
            job = api.post("/v1/jobs", json=cfg).json()
            wait_for_checkpoint(api, job, 2)
            assert head.kill() >= 4  # GCS, raylet, dashboard, the job's supervisor and driver, ...
            time.sleep(3)
            # the same ports and Redis: the control store comes back with what it held. (`ray start` refuses
            # an address its temp dir records as running while a raylet on this machine - the worker's -
            # names it; a new head machine has no such record)
            (head.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
            head.start()
            done = wait_for(api, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
            assert done["state"] == "SUCCEEDED", done
            # Ray remembered the job (its record was in Redis) and said it failed: a restart, not a
            # resubmission of a job it had never heard of
            assert done["restarts"] == 1, done
            failure = done["failures"][0]
            assert failure["resumed_from"] >= 2, failure
            metrics = api.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
            assert [m["step"] for m in metrics] == list(range(1, 9))  # each step once
        # the worker node rejoined as itself (fault tolerance kept the cluster's state); a new head came up
        after = {k for k, s in _nodes(address, token).items() if s == "ALIVE"}
        assert len(after) == 2 and len(before & after) == 1, (before, after)  # the same worker, a new head
    finally:
        server.stop()
