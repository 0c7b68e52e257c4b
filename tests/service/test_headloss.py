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

import secrets
import shutil
import subprocess
import time

import pytest

from .conftest import Server, free_port, wait_for, wait_for_checkpoint
from .raynodes import RayNodeProcesses, alive_nodes, head_args, ray_env, worker_args
from .test_jobs import tiny

pytestmark = pytest.mark.slow


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
    env = ray_env(token)
    head = RayNodeProcesses(dict(env, RAY_REDIS_ADDRESS=f"127.0.0.1:{redis_port}"), *head_args(gcs, dash))
    worker = RayNodeProcesses(env, *worker_args(gcs, 4))
    try:
        head.start()
        worker.start()
        yield head, worker, f"http://127.0.0.1:{dash}", token
    finally:
        worker.remove()
        head.remove()
        redis.kill()
        redis.wait(30)


def test_a_lost_head_with_gcs_fault_tolerance_keeps_its_worker_node_and_the_job_restarts(ft_cluster, tmp_path):
    head, worker, address, token = ft_cluster
    before = {n.node_id for n in alive_nodes(address, token, 2)}
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
        after = {n.node_id for n in alive_nodes(address, token, 2)}
        assert len(before & after) == 1, (before, after)  # the same worker, a new head
    finally:
        server.stop()
