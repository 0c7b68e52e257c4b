"""The study command through a real control plane: arms x seeds submitted as jobs, an interrupted
study picks its running job up again (no second submission), a finished one skips its runs, and the
results file, table and plot come from the jobs' own metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from .conftest import ROOT, Server

pytestmark = pytest.mark.slow


def test_a_study_runs_its_arms_through_the_control_plane_and_resumes(ray_head, tmp_path):
    spec = {
        "name": "sel",
        "base": str(ROOT / "examples" / "tiny.yaml"),
        "set": ["trainer.steps=2", "trainer.eval_every=1", "trainer.eval_prompts=4", "learner.num_learners=1"],
        "arms": [
            {"name": "top", "label": "rho 0.2 highest", "set": ["algorithm.token_selection=highest"]},
            {"name": "rand", "label": "rho 0.2 random", "set": ["algorithm.token_selection=random"]},
        ],
        "seeds": [3],
        "reference": {"label": "paper, Qwen3-8B", "frac_below_0.01": "> 0.5", "p80": 0.672},
    }
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", ray_head.address, ray_head.token)
    server.start()
    try:
        env = dict(os.environ, FORKRL_URL=server.url, FORKRL_TOKEN=server.admin_token)
        cmd = [sys.executable, "-m", "service.study", "--spec", str(spec_path), "--out", str(out)]
        # interrupted while its first job runs: the job goes on, and the study, run again, follows it
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not (out / "state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        job = json.loads((out / "state.json").read_text())["top-s3"]["job"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "2 of 2 runs done" in done.stdout
        state = json.loads((out / "state.json").read_text())
        assert state["top-s3"]["job"] == job and all(r["done"] for r in state.values())
        with server.client() as c:
            jobs = c.get("/v1/jobs").json()["jobs"]
            assert sorted(j["name"] for j in jobs) == ["sel-rand-s3", "sel-top-s3"]  # one job per run
            for key, how in (("top-s3", "highest"), ("rand-s3", "random")):
                run = c.get(f"/v1/jobs/{state[key]['job']}").json()
                assert run["state"] == "SUCCEEDED"
                cfg = json.loads((ROOT / run["run_dir"] / "config.json").read_text())
                assert cfg["algorithm"]["token_selection"] == how and cfg["trainer"]["seed"] == 3

        results = json.loads((out / "results.json").read_text())
        for name in ("top", "rand"):
            arm = results["arms"][name]
            rows = [json.loads(x) for x in (out / "runs" / f"{name}-s3.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows] == [0, 1, 2]  # 0: the evaluation before training
            assert arm["eval_first"][0] == rows[0]["eval/reward_mean"] and "reward/mean" not in rows[0]
            assert arm["eval_final"][0] == rows[-1]["eval/reward_mean"] and arm["eval_final"][1] == 0.0  # one seed
            assert arm["eval_best"][0] == max(r["eval/reward_mean"] for r in rows)
            assert arm["entropy"]["first"]["p80"] == rows[1]["entropy/p80"]  # the first training step's
        table = (out / "table.md").read_text()
        assert "rho 0.2 random" in table and "paper, Qwen3-8B" in table and "0.672" in table
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "submitted" not in again.stderr  # all done: nothing submitted
        with server.client() as c:
            assert len(c.get("/v1/jobs").json()["jobs"]) == 2
    finally:
        server.stop()


def test_a_bad_spec_is_refused_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "base": "tiny.yaml", "arms": [{"name": "A B"}], "seeds": [1]}))
    r = subprocess.run(
        [sys.executable, "-m", "service.study", "--spec", str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and "arms.0.name" in r.stderr and "pattern" in r.stderr, r.stderr
