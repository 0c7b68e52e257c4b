"""A Ray worker node lost mid-job, through the control plane: a head (no CPUs: the job's driver only) and
two worker nodes, each `ray start` processes of its own (tests/service/raynodes.py) with its own
resources, as the chart's worker groups are; `python -m service` is pointed at the head as at any
external cluster. The learners' node is SIGKILLed (its raylet and every process under it); the attempt
fails naming the node, the job goes back to QUEUED naming what the cluster now lacks, and once a node
with those resources joins it resumes from its newest checkpoint and finishes with each step once.
Minutes: marked slow."""

from __future__ import annotations

import secrets
import time

import pytest

from .conftest import Server, free_port, state_events, wait_for, wait_for_checkpoint
from .raynodes import RayNodeProcesses, alive_nodes, head_args, ray_env, worker_args
from .test_jobs import tiny

pytestmark = pytest.mark.slow

LEARNER_NODE = {"forkrl_learner": 2.0}


@pytest.fixture
def cluster():
    """A head (no CPUs: the job's driver only), a rollout node (1 CPU, the reward workers too) and a learner
    node (2 CPUs), each `ray start` processes of its own."""
    token, gcs, dash = secrets.token_hex(32), free_port(), free_port()
    env = ray_env(token)
    nodes = [RayNodeProcesses(env, *head_args(gcs, dash)),
             RayNodeProcesses(env, *worker_args(gcs, 1, {"forkrl_rollout": 1, "forkrl_reward": 2})),
             RayNodeProcesses(env, *worker_args(gcs, 2, LEARNER_NODE))]  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        for n in nodes:
            n.start()
        alive_nodes(address, token, 3)

        def add_learner_node() -> None:
            nodes.append(RayNodeProcesses(env, *worker_args(gcs, 2, LEARNER_NODE)))
            nodes[-1].start()

        yield nodes[2], add_learner_node, address, token
    finally:
        for n in reversed(nodes):
            n.remove()


def test_a_lost_worker_node_fails_the_attempt_naming_it_and_the_job_resumes_when_capacity_returns(cluster, tmp_path):
    learners, add_learner_node, address, token = cluster
    (node_id,) = [n.node_id for n in alive_nodes(address, token, 3) if "forkrl_learner" in n.resources_total]
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", address, token).start()
    cfg = tiny(8)
    cfg["trainer"] = {**cfg["trainer"], "save_every": 1, "max_restarts": 2}
    cfg["rollout"] = {**cfg["rollout"], "ray_resources": {"forkrl_rollout": 1}}
    cfg["learner"] = {**cfg["learner"], "ray_resources": {"forkrl_learner": 1}}
    cfg["reward"] = {**cfg["reward"], "ray_resources": {"forkrl_reward": 1}}
    try:
        with server.client() as api:
            job = api.post("/v1/jobs", json=cfg).json()
            wait_for_checkpoint(api, job, 2)
            killed_at = time.time()
            assert learners.kill() >= 3  # the raylet, the two learners, agents: a lost machine
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
            add_learner_node()  # capacity returns
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
