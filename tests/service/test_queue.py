"""The admission queue's API through a real server: priorities and who may set them, per-owner quotas
(admin-set, owner-readable), queue positions, the queue view and cancelling a queued job. Ray is not
reachable here (jobs stay QUEUED: admission needs Ray's node list); admission itself on a real Ray
is in tests/service/test_dashboard.py (two jobs that do not fit together run one after the other) and
tests/service/test_jobs.py (a job that never fits is refused); the planner's arithmetic is in
tests/unit/test_admission.py."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from .conftest import ROOT
from .test_api import TINY, make_token

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def post(c, priority: int | None = None):
    return c.post("/v1/jobs", json=TINY, params={} if priority is None else {"priority": priority})


def test_priorities_quotas_positions_and_the_queue_view(api_server):
    alice, bob = make_token(api_server, "alice"), make_token(api_server, "bob")
    with api_server.client(alice) as a, api_server.client(bob) as b, api_server.client() as admin:
        # an owner may not jump the queue: above FORKRL_MAX_OWNER_PRIORITY (0) is refused, naming both
        r = post(a, 5)
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == (
            "priority = 5: owner 'alice' may give at most 0 (FORKRL_MAX_OWNER_PRIORITY); an admin sets priorities "
            "above that"
        )
        assert post(a, 1001).status_code == 422  # outside -1000..1000 whoever asks
        # the admin raises alice's bound through her quota; bob still may not
        assert a.put("/v1/quotas/alice", json={"max_priority": 5}).status_code == 403
        bad = admin.put("/v1/quotas/alice", json={"max_priority": 5, "max_cpus": -1})
        assert bad.status_code == 422 and "max_cpus" in bad.text
        assert admin.put("/v1/quotas/alice", json={"max_gpus": "2"}).status_code == 422  # strict: no strings
        assert admin.put("/v1/quotas/alice", json={"max_priority": 5, "colour": "red"}).status_code == 422
        q = admin.put("/v1/quotas/alice", json={"max_priority": 5, "max_running_jobs": 1}).json()
        assert (q["owner"], q["max_priority"], q["max_running_jobs"], q["max_cpus"]) == ("alice", 5, 1, None)
        assert a.get("/v1/quotas/alice").json()["max_priority"] == 5  # an owner reads its own
        assert a.get("/v1/quotas/bob").status_code == 403
        assert b.get("/v1/quotas/bob").json()["max_running_jobs"] is None  # none set: no bound
        assert a.get("/v1/quotas").status_code == 403
        assert [x["owner"] for x in admin.get("/v1/quotas").json()["quotas"]] == ["alice"]

        low = post(b, -3).json()
        first = post(b).json()
        urgent = post(a, 5).json()
        assert post(b, 1).status_code == 422
        later = post(admin, 0).json()
        assert urgent["state"] == "QUEUED" and urgent["priority"] == 5
        positions = {j["id"]: admin.get(f"/v1/jobs/{j['id']}").json()["queue_position"] for j in (low, first, later)}
        assert a.get(f"/v1/jobs/{urgent['id']}").json()["queue_position"] == 1
        assert positions == {first["id"]: 2, later["id"]: 3, low["id"]: 4}  # priority, then submission
        listed = {j["id"]: j["queue_position"] for j in b.get("/v1/jobs").json()["jobs"]}
        assert listed == {first["id"]: 2, low["id"]: 4}  # bob's own jobs, with their places in the whole queue

        view = b.get("/v1/queue").json()
        assert view["nodes"] is None and view["capacity"] == {}  # Ray not reachable: capacity unknown
        assert [(r["id"], r["position"]) for r in view["queued"]] == [(first["id"], 2), (low["id"], 4)]
        assert view["queued"][0]["demand"].startswith("3 CPUs, 0 GPUs")
        assert [r["position"] for r in admin.get("/v1/queue").json()["queued"]] == [1, 2, 3, 4]

        # a queued job is cancelled at once (it never reached Ray), and the queue closes up
        assert b.post(f"/v1/jobs/{first['id']}/cancel").json()["cancel_requested"]
        job = b.get(f"/v1/jobs/{first['id']}").json()
        for _ in range(60):
            if job["state"] == "CANCELLED":
                break
            job = b.get(f"/v1/jobs/{first['id']}").json()
            time.sleep(0.5)
        assert (job["state"], job["message"], job["queue_position"]) == ("CANCELLED", "cancelled while queued", None)
        assert b.get(f"/v1/jobs/{low['id']}").json()["queue_position"] == 3
        assert admin.delete("/v1/quotas/alice").status_code == 204
        assert admin.delete("/v1/quotas/alice").status_code == 404


def test_the_cli_shows_the_queue_and_sets_quotas(api_server):
    env = {"FORKRL_URL": api_server.url, "FORKRL_TOKEN": api_server.admin_token, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    out = cli("quota", "set", "carol", "--max-running-jobs", "2", "--max-cpus", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["carol", "max_running_jobs=2", "max_cpus=6.0", "max_gpus=-", "max_priority=-"]
    assert cli("quota", "list").stdout.split()[0] == "carol"
    refused = cli("quota", "set", "carol", "--max-cpus", "-2")
    assert refused.returncode == 1 and "max_cpus" in refused.stderr
    job = cli("submit", "examples/tiny.yaml", "--priority", "7")
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.split()[1]
    shown = cli("queue").stdout.splitlines()
    assert shown[0] == "cluster: Ray did not answer; admitted jobs hold nothing"
    assert shown[1] == f"   1. {job_id}  priority 7  admin: queued: waiting for the admission pass", shown
    assert "queue position: 1 (priority 7)" in cli("status", job_id).stdout
