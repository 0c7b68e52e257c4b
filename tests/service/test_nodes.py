"""A Ray worker node lost mid-job, through the control plane: `ray.cluster_utils.Cluster` runs a head
(no CPUs: the job's driver only) and two worker nodes, each a raylet of its own with its own
resources, as the chart's worker groups are; `python -m service` is pointed at the head as at any
external cluster. The learners' node is SIGKILLed (its raylet and every process under it); the attempt
fails naming the node, the job goes back to QUEUED naming what the cluster now lacks, and once a node
with those resources joins it resumes from its newest checkpoint and finishes with each step once.
Minutes: marked slow."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from service.rayjobs import RayJobs

from .conftest import Server, free_port, state_events, wait_for, wait_for_checkpoint
from .test_jobs import tiny

pytestmark = pytest.mark.slow

LEARNER_NODE = {"num_cpus": 2, "resources": {"forkrl_learner": 2}}


@pytest.fixture
def cluster(monkeypatch):
    """A head with its dashboard (the Jobs API and the state API) and no CPUs, a rollout node (1 CPU, the
    reward workers too) and a learner node (2 CPUs)."""
    from ray.cluster_utils import Cluster

    # the job's driver runs `python -m actors.train` on the head: this interpreter's
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "dashboard_agent_listen_port": free_port()}  # fmt: skip
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        rollout = {"forkrl_rollout": 1, "forkrl_reward": 2}
        c.add_node(num_cpus=1, resources=rollout, dashboard_agent_listen_port=free_port())
        learners = c.add_node(**LEARNER_NODE, dashboard_agent_listen_port=free_port())
        address = f"http://127.0.0.1:{port}"
        _alive_nodes(address, 3)
        yield c, learners, address
    finally:
        c.shutdown()


def _alive_nodes(address: str, n: int, timeout: float = 120) -> None:
    ray = RayJobs(address, "")
    deadline = time.time() + timeout
    while True:
        with contextlib.suppress(Exception):
            if sum(node.state == "ALIVE" for node in ray.nodes()) == n:
                return
        assert time.time() < deadline, f"not {n} alive Ray nodes after {timeout} s"
        time.sleep(1)


def _sigkill_node(node) -> list[int]:
    """SIGKILL a node's raylet and every process under it (its workers, hence the actors on it, and its
    agents) at once, as a lost machine would: nothing shuts down cleanly."""
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    procs = [raylet, *raylet.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [p.pid for p in procs]


def test_a_lost_worker_node_fails_the_attempt_naming_it_and_the_job_resumes_when_capacity_returns(cluster, tmp_path):
    c, learners, address = cluster
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", address).start()
    cfg = tiny(8)
    cfg["trainer"] = {**cfg["trainer"], "save_every": 1, "max_restarts": 2}
    cfg["rollout"] = {**cfg["rollout"], "ray_resources": {"forkrl_rollout": 1}}
    cfg["learner"] = {**cfg["learner"], "ray_resources": {"forkrl_learner": 1}}
    cfg["reward"] = {**cfg["reward"], "ray_resources": {"forkrl_reward": 1}}
    try:
        with server.client() as api:
            job = api.post("/v1/jobs", json=cfg).json()
            wait_for_checkpoint(api, job, 2)
            node_id = learners.node_id
            killed_at = time.time()
            assert len(_sigkill_node(learners)) >= 3  # the raylet, the two learners, agents
            # the attempt fails naming the node, within Ray's health check and the driver's bound
            while not (j := api.get(f"/v1/jobs/{job['id']}").json())["failures"]:
                assert j["state"] not in ("FAILED", "SUCCEEDED", "CANCELLED"), j
                assert time.time() < killed_at + 150, f"the lost node did not fail the attempt: {j}"
                time.sleep(1)
            failure = j["failures"][0]
            assert "NodeLostError" in failure["reason"] and node_id in failure["reason"], failure
            assert "forkrl_learner" in failure["reason"] and "Learner" in failure["reason"], failure
            assert failure["resumed_from"] >= 2, failure
            # back in the queue: the cluster lacks the learners' resources, and the message says so
            deadline = time.time() + 60
            while not ((j := api.get(f"/v1/jobs/{job['id']}").json())["state"] == "QUEUED"
                       and "cannot fit the cluster as it is now" in (j["message"] or "")):  # fmt: skip
                assert time.time() < deadline, j
                time.sleep(1)
            assert "forkrl_learner" in j["message"] and "2 node(s)" in j["message"], j["message"]
            time.sleep(5)  # it stays there while nothing changes
            assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "QUEUED"
            c.add_node(**LEARNER_NODE, dashboard_agent_listen_port=free_port())  # capacity returns
            done = wait_for(api, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
            assert done["state"] == "SUCCEEDED", done
            assert done["restarts"] == 1
            metrics = api.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
            assert [m["step"] for m in metrics] == list(range(1, 9))  # each step once
            events = state_events(api, job["id"])
            assert [e["state"] for e in events][-4:] == ["QUEUED", "PENDING", "RUNNING", "SUCCEEDED"], events
            assert events[-4]["message"].startswith("restart 1 of 2 from its step-"), events[-4]
    finally:
        server.stop()
