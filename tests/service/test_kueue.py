"""Admission by Kueue (FORKRL_ADMISSION=kueue), through a real control plane and a real Ray head.

Kubernetes, KubeRay and Kueue cannot run on this box, so the Kubernetes API and those two controllers are
a stand-in (tests/service/kube_standin.py, a mock: it says what it reduces). Real here: the control plane's
Kubernetes client (lightkube, kubeconfig with a bearer token), the RayJob it creates from the chart's own
rendered template (validated by the stand-in against KubeRay's RayJob CRD), the quota arithmetic over the
RayJob's pods, and the training: each admitted RayJob's entrypoint and environment run as the real driver
on the Ray head. Minutes: slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actors.common.config_load import validate_config
from actors.common.contract import ENTRYPOINT, JOB_CONFIG_ENV
from actors.common.demand import job_demand
from service.kueue import rayjob_manifest
from service.rayjob_model import RayJob

from .conftest import ROOT, Server, free_port, state_events, wait_for, wait_for_checkpoint
from .kube_standin import KubeStandIn, pods_cpu
from .test_jobs import tiny

pytestmark = pytest.mark.slow
CLASSES = {"forkrl-normal": 0, "forkrl-high": 10}
DONE = {"SUCCEEDED", "FAILED", "CANCELLED"}


def _chart_template(tmp_path: Path) -> Path:
    """The RayJob template the chart renders with controlPlane.admission=kueue (its ConfigMap's file)."""
    import helm_python as helm

    from tests.helm.test_chart import CHART

    chart = helm.Chart.load(str(CHART))
    try:
        out = chart.render({"controlPlane": {"admission": "kueue"}}, name="demo", namespace="ml")
    finally:
        chart.close()
    (cm,) = [d for d in yaml.safe_load_all(out["forkrl/templates/kueue.yaml"]) if d and d["kind"] == "ConfigMap"]
    path = tmp_path / "rayjob.yaml"
    path.write_text(cm["data"]["rayjob.yaml"])
    return path


def _wait(c, job_id: str, ok, what: str, timeout: float = 300) -> dict:
    import time

    deadline = time.time() + timeout
    while not ok(j := c.get(f"/v1/jobs/{job_id}").json()):
        assert time.time() < deadline and j["state"] not in DONE, f"{what}: {j}"
        time.sleep(0.3)
    return j


def test_kueue_admits_rayjobs_within_quota_by_priority_and_a_suspended_job_resumes_with_nothing_lost(
    ray_head, tmp_path
):
    from tests.helm.test_chart import CRD_SCHEMAS

    template = _chart_template(tmp_path)
    # the quota holds one tiny job's pods and not two (every tiny job has the same pods)
    cfg = validate_config(tiny(6))
    env = {JOB_CONFIG_ENV: cfg.model_dump_json()}
    typed = RayJob.model_validate(yaml.safe_load(template.read_text()))
    one = pods_cpu(rayjob_manifest(typed, "x", ENTRYPOINT, env, job_demand(cfg), "q").dump())
    standin = KubeStandIn(CRD_SCHEMAS["RayJob"], ray_head.address, ray_head.token, 1.5 * one, free_port(), CLASSES)
    standin.start()
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", "", ray_head.token)
    server.env.update(
        FORKRL_ADMISSION="kueue", FORKRL_KUEUE_RAYJOB_TEMPLATE=str(template), FORKRL_KUEUE_LOCAL_QUEUE="team-a",
        FORKRL_KUEUE_PRIORITY_CLASSES=json.dumps(CLASSES), KUBECONFIG=str(standin.kubeconfig(tmp_path / "kubeconfig")),
    )  # fmt: skip
    server.start()
    try:
        with server.client() as c:
            a = c.post("/v1/jobs", json={**tiny(6), "name": "a"}).json()
            _wait(c, a["id"], lambda j: j["state"] == "RUNNING", "a runs")
            b = c.post("/v1/jobs", json={**tiny(2), "name": "b"}, params={"priority": 10}).json()
            gone = c.post("/v1/jobs", json={**tiny(2), "name": "cancelled"}).json()
            # both wait in Kueue, saying why (the Workload's reason)
            for job in (b, gone):
                waiting = _wait(c, job["id"], lambda j: "insufficient unused quota for cpu" in j["message"], "waits")
                assert waiting["state"] == "QUEUED" and "LocalQueue team-a" in waiting["message"], waiting
            cancelled = c.post(f"/v1/jobs/{gone['id']}/cancel").json()
            cancelled = wait_for(c, gone["id"], DONE, 60)
            assert cancelled["state"] == "CANCELLED" and gone["id"] in standin.deleted, cancelled
            # what the control plane created: the chart's template, its queue and the priority classes
            created = {o["metadata"]["name"]: o for o in standin.created}
            assert set(created) == {a["id"], b["id"], gone["id"]}
            labels = {n: o["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] for n, o in created.items()}
            assert labels == {a["id"]: "forkrl-normal", b["id"]: "forkrl-high", gone["id"]: "forkrl-normal"}
            assert {o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] for o in created.values()} == {"team-a"}
            # Kueue preempts a for b (the test plays Kueue's part: it suspends a's RayJob)
            wait_for_checkpoint(c, a, 2)
            standin.preempt(a["id"])
            _wait(c, a["id"], lambda j: j["preemptions"] == 1, "a suspended", 60)
            # its next attempt is a new RayJob, waiting in Kueue behind b (the suspended one is deleted)
            again = _wait(c, a["id"], lambda j: j["state"] == "QUEUED", "a waits again", 60)
            assert "LocalQueue team-a" in again["message"], again
            assert a["id"] in standin.deleted and f"{a['id']}-r1" in {o["metadata"]["name"] for o in standin.created}
            done_b = wait_for(c, b["id"], DONE, 400)
            assert done_b["state"] == "SUCCEEDED", done_b
            done_a = wait_for(c, a["id"], DONE, 400)
            assert done_a["state"] == "SUCCEEDED", done_a
            assert (done_a["preemptions"], done_a["restarts"]) == (1, 0), done_a
            steps = [m["step"] for m in c.get(f"/v1/jobs/{a['id']}/metrics").json()["metrics"]]
            assert steps == list(range(1, 7))  # each step once: the steps after the checkpoint were dropped
            events = state_events(c, a["id"])
            (suspended,) = [e for e in events if "suspended by Kueue" in e["message"]]
            stopped = int(suspended["message"].split("at step ")[1].split(" ")[0])
            assert stopped >= 2 and "resumes from its step-" in suspended["message"], suspended
            after = [e["state"] for e in events[events.index(suspended) :]]
            assert after[-2:] == ["RUNNING", "SUCCEEDED"] and "QUEUED" in after, events
            # the log, read through its cluster's Ray dashboard (the RayJob's dashboardURL); an earlier
            # attempt's log went with its RayJob and cluster (its steps and checkpoints are in the store)
            first, second = (c.get(f"/v1/jobs/{a['id']}/logs", params={"attempt": n}).text for n in (0, 1))
            assert first == "" and "resumed from" in second, second[-2000:]
    finally:
        server.stop()
        standin.stop()


def test_kueue_mode_refuses_a_job_no_pod_of_the_template_can_hold_naming_the_group(tmp_path):
    """Through the same stand-in (nothing is admitted: no quota, no Ray): a learner larger than the chart's
    learner pod is a 422 at submission; a job that fits gets its RayJob and waits with Kueue's reason."""
    from tests.helm.test_chart import CRD_SCHEMAS

    standin = KubeStandIn(CRD_SCHEMAS["RayJob"], "http://127.0.0.1:9", "", 0.0, free_port(), CLASSES).start()
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", "")
    server.env.update(
        FORKRL_ADMISSION="kueue", FORKRL_KUEUE_RAYJOB_TEMPLATE=str(_chart_template(tmp_path)),
        KUBECONFIG=str(standin.kubeconfig(tmp_path / "kubeconfig")),
    )  # fmt: skip
    server.start()
    try:
        with server.client() as c:
            big = tiny(2)
            big["learner"] = {**big["learner"], "num_cpus_per_learner": 4}
            r = c.post("/v1/jobs", json=big)
            assert r.status_code == 422, r.text
            assert "learners needs 4 CPU and 0 GPU; a pod of the RayJob template's worker group 'learner' gives " \
                   "2 CPU" in r.json()["detail"], r.text  # fmt: skip
            assert standin.created == []
            job = c.post("/v1/jobs", json=tiny(2)).json()
            waiting = _wait(c, job["id"], lambda j: "insufficient unused quota" in j["message"], "waits", 60)
            assert waiting["state"] == "QUEUED" and waiting["queue_position"] is None, waiting
            assert [o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] for o in standin.created] == ["forkrl"]
            assert c.get("/v1/queue").json()["admission"] == "kueue"
        env = dict(os.environ, FORKRL_URL=server.url, FORKRL_TOKEN=server.admin_token)
        out = subprocess.run([sys.executable, "-m", "service.cli", "queue"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.stdout.startswith("admission: Kueue"), out
    finally:
        server.stop()
        standin.stop()


def test_a_rayjob_the_api_server_refuses_fails_its_job_for_good_naming_why(tmp_path, monkeypatch):
    """A 4xx other than a conflict is no outage: KueueJobs.submit raises ValueError (the reconciler fails
    the job with it) instead of RayUnavailable (retried every pass). The stand-in refuses, as the API server
    would, a RayJob its CRD does not allow."""
    from service.kueue import KueueJobs
    from service.rayjobs import RayUnavailable
    from tests.helm.test_chart import CRD_SCHEMAS

    standin = KubeStandIn(CRD_SCHEMAS["RayJob"], "http://127.0.0.1:9", "", 0.0, free_port(), CLASSES).start()
    try:
        monkeypatch.setenv("KUBECONFIG", str(standin.kubeconfig(tmp_path / "kubeconfig")))
        template = yaml.safe_load(_chart_template(tmp_path).read_text())
        template["spec"]["rayClusterSpec"]["headGroupSpec"]["replicas"] = 2  # not a field of the CRD
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(template))
        env = {JOB_CONFIG_ENV: validate_config(tiny(2)).model_dump_json()}
        with pytest.raises(ValueError, match="the Kubernetes API refused RayJob forkrl-x: 422 RayJob is invalid"):
            KueueJobs(bad, "team-a", "ml").submit("forkrl-x", ENTRYPOINT, {"env_vars": env})
        assert standin.created == []
        good = KueueJobs(_chart_template(tmp_path), "team-a", "ml")
        assert good.submit("forkrl-y", ENTRYPOINT, {"env_vars": env}) is True
        assert good.submit("forkrl-y", ENTRYPOINT, {"env_vars": env}) is False  # a second submission: no second job
    finally:
        standin.stop()
    with pytest.raises(RayUnavailable):  # the API gone: retried, not failed
        KueueJobs(_chart_template(tmp_path), "team-a", "ml").submit("forkrl-z", ENTRYPOINT, {"env_vars": env})
