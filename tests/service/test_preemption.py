"""Preemption through the admission queue, on a real Ray head (4 CPUs: one tiny job of 3 at a time) with
`FORKRL_PREEMPTION=lower_priority`: a job of priority 5 arrives while one of priority 0 trains; the
low one hears it in the answer to its next metrics push, saves a checkpoint at the end of that step
and ends; it goes back to the queue (not a restart), the high one runs, and the low one resumes from
its checkpoint and finishes with every step once, in the data order of an uninterrupted run. The
planner's choice of whom to stop is worked through in tests/unit/test_admission.py. Minutes: slow."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, Server, state_events, wait_for
from .test_jobs import tiny

pytestmark = pytest.mark.slow


def test_a_higher_priority_job_preempts_a_lower_one_at_its_next_step_and_it_resumes_with_nothing_lost(
    ray_head, tmp_path
):
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", ray_head.address, ray_head.token)
    server.env["FORKRL_PREEMPTION"] = "lower_priority"
    server.start()
    low_cfg = tiny(24)
    low_cfg["trainer"] = {**low_cfg["trainer"], "save_every": 0}  # no checkpoint but the one preemption asks for
    # a dense toy reward: one draw of prompts per step, so the data order is the sampler's
    toy = [{"type": "plugin", "function": "tests.toy_rewards:lowercase_fraction"}]
    low_cfg["reward"] = {**low_cfg["reward"], "verifiers": toy}
    try:
        with server.client() as c:
            low = c.post("/v1/jobs", json={**low_cfg, "name": "low"}).json()
            deadline = time.time() + 400
            while (j := c.get(f"/v1/jobs/{low['id']}").json())["last_step"] < 2:
                assert j["state"] not in ("FAILED", "SUCCEEDED", "CANCELLED") and time.time() < deadline, j
                time.sleep(0.5)
            high = c.post("/v1/jobs", json={**tiny(2), "name": "high"}, params={"priority": 5}).json()
            assert high["state"] == "QUEUED", high
            deadline = time.time() + 60
            while "stopping" not in (h := c.get(f"/v1/jobs/{high['id']}").json())["message"]:
                assert h["state"] == "QUEUED" and time.time() < deadline, h
                time.sleep(0.3)
            assert h["message"].endswith(f"; stopping {low['id']} (lower priority) to make room"), h["message"]
            done_high = wait_for(c, high["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 400)
            assert done_high["state"] == "SUCCEEDED", done_high
            done = wait_for(c, low["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
            assert done["state"] == "SUCCEEDED", done
            assert (done["preemptions"], done["restarts"], done["failures"]) == (1, 0, []), done
            events = state_events(c, low["id"])
            states = [e["state"] for e in events]
            assert states == ["QUEUED", "PENDING", "RUNNING", "QUEUED", "PENDING", "RUNNING", "SUCCEEDED"], events
            requeued = events[3]["message"]
            stopped = int(requeued.split("preempted at step ")[1].split(" ")[0])
            assert requeued == (f"preempted at step {stopped} for a higher-priority job; resumes from its "
                                f"step-{stopped} checkpoint"), requeued  # fmt: skip
            assert 2 <= stopped < 24
            # the high job was admitted once the low one had left, and the low one came back after it ended
            at = lambda s: dt.datetime.fromisoformat(s).replace(tzinfo=None)  # noqa: E731 (UTC; SQLite keeps no zone)
            high_events = state_events(c, high["id"])
            assert at(high_events[1]["at"]) >= at(events[3]["at"]), (high_events, events)
            assert at(events[4]["at"]) >= at(done_high["ended_at"]), (events, done_high)
            metrics = c.get(f"/v1/jobs/{low['id']}/metrics").json()["metrics"]
            assert [m["step"] for m in metrics] == list(range(1, 25))  # each step once
            from actors.common.config_load import validate_config
            from actors.driver.data import PromptSampler, load_examples
            from actors.driver.sampling import batch_fingerprint

            data = validate_config(low_cfg).data
            sampler = PromptSampler(load_examples(data), data.prompts_per_step, 0)
            assert [m["data/batch_crc"] for m in metrics] == [batch_fingerprint(sampler.next()) for _ in range(24)]
            # each attempt's log: the first stopped after the step it was told at, the second resumed there
            logs = f"/v1/jobs/{low['id']}/logs"
            first, second = (c.get(logs, params={"attempt": n}).text for n in (0, 1))
            assert f"stopped after step {stopped} for a higher-priority job" in first, first[-2000:]
            assert "resumed from" in second and f"at step {stopped}" in second, second[-2000:]
        env = dict(os.environ, FORKRL_URL=server.url, FORKRL_TOKEN=server.admin_token)
        out = subprocess.run([sys.executable, "-m", "service.cli", "status", low["id"]], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "preempted: 1 time(s)" in out.stdout and "restarts" not in out.stdout, out.stdout
    finally:
        server.stop()
