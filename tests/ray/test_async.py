"""Asynchronous mode (trainer.max_staleness >= 1) on a real local Ray, with real vLLM AsyncLLM engines (CPU),
DeepSpeed (gloo) and the tiny random Llama. Minutes, not seconds: marked slow."""

import contextlib
import json
import math
import os
import signal
import time

import pytest

from actors.common.contract import RunDir
from actors.driver.loop import train

from .conftest import tiny_config
from .test_runtime import _actors_after_step, _every_metric_has_a_rule, _rows, _run_and_stall, _start_tiny

pytestmark = pytest.mark.slow


def test_async_steps_keep_the_filter_exact_and_bound_the_staleness(ray_local, tmp_path):
    """With tree rollouts (rollout.tree): every tree request is a request of its own on the streaming engine,
    a group is verified once its tree is complete, and the filter still counts each unique token once.
    (Flat groups in asynchronous mode: the other tests of this module.)"""
    # two learners and two micro-batches each: the threshold is global over 4 micro-batches of 2 ranks
    cfg = tiny_config(
        tmp_path,
        "trainer.max_staleness=1",
        "trainer.steps=5",
        "trainer.save_every=2",
        "trainer.eval_every=5",
        "trainer.eval_prompts=4",
        "learner.micro_batch_size=2",
        "rollout.inflight_weight_updates=true",
        "rollout.tree={roots: 2, branch_points: 2, branches: 2}",
        "rollout.kv_block_size=32",
    )
    train(cfg)
    evaluated, *rows = _rows(tmp_path)
    assert evaluated["step"] == 0 and 0 <= evaluated["eval/reward_mean"] <= 1  # before training
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    learned = [r for r in rows if "entropy/kept_tokens" in r]
    assert len(learned) >= 4
    for r in learned:  # exactly ceil(rho N) of the step's tokens, whatever the mode
        assert r["entropy/kept_tokens"] == math.ceil(0.2 * r["entropy/num_valid"])
        assert r["entropy/kept_frac"] == pytest.approx(r["entropy/kept_tokens"] / r["entropy/num_valid"])
    for r in rows:  # the trees: 4 leaves a group, shared prefixes generated once, with their policy versions
        assert r["tree/leaves_mean"] == 4.0 and r["tree/unique_tokens"] < r["tree/flat_tokens"], r
        assert r["rollout/generated_tokens"] == r["tree/generated_tokens"] > 0, r
        # the groups finished since the previous step, signal_share of them with signal (the others dropped)
        made, dropped = r["batch/groups_generated"], r["batch/groups_discarded"]
        assert r["batch/signal_share"] == (pytest.approx(1 - dropped / made) if made else 0.0), r
    # the first step can only train on the initial policy's groups; the second on groups generated while the
    # first learned (version 0, trained at version 1): one step off. Never more than max_staleness.
    assert rows[0]["async/staleness_max"] == 0.0
    assert rows[1]["async/staleness_min"] == 1.0
    assert all(r["async/staleness_max"] <= 1.0 for r in rows)
    for r in rows:  # one engine: its busy and idle seconds make up the step; the learner waited only for groups
        assert r["timing/engine_busy"] + r["timing/engine_idle"] == pytest.approx(r["timing/step"], abs=1e-6)
        assert r["timing/learner_idle"] == r["timing/generate"] < r["timing/step"]
    assert "eval/reward_mean" in rows[-1]  # evaluation runs on the streaming engines
    _every_metric_has_a_rule(rows)
    # the checkpoint records which prompts are finished: the lowest not finished, and the finished ones above
    from actors.driver.data import load_examples

    state = json.loads((RunDir(tmp_path).checkpoint(4) / "driver.json").read_text())["sampler"]
    assert set(state) == {"epoch", "pos", "done"}
    low = state["epoch"] * len(load_examples(cfg.data)) + state["pos"]
    assert low + len(state["done"]) >= 4 * 4 and all(s > low for s in state["done"])  # 4 steps x 4 groups trained


def test_async_run_survives_a_killed_engine_and_resumes_after_a_killed_learner(tmp_path):
    """SIGKILL the streaming engine mid-stream: its groups run again on the replacement, the job goes on.
    Then SIGKILL a learner: the driver fails at once naming it (no hang while the stream runs), and a new
    driver resumes from the newest checkpoint to the end. (A killed driver's resume: tests/service/test_jobs.)"""
    run = tmp_path / "run"
    settings = ["trainer.max_staleness=2", "trainer.save_every=2", "rollout.engine_restarts=1"]
    proc = _start_tiny(run, 60, settings)
    try:
        (engine,) = _actors_after_step(run, proc, 2, "StreamingEngine")
        engine.kill()
        deadline = time.time() + 300  # two steps after the replacement
        while not [r for r in _rows(run) if r.get("rollout/engine_replacements") == 1.0][1:]:
            assert time.time() < deadline and proc.poll() is None, "the job did not go on after the replacement"
            time.sleep(0.2)
        while not RunDir(run).complete_checkpoints():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint"
            time.sleep(0.2)
        learners = _actors_after_step(run, proc, 1, "Learner")
        learners[0].kill()
        out, _ = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    log = out.decode(errors="replace")
    assert proc.returncode != 0 and "Learner" in log and "ActorDiedError" in log, log[-3000:]
    expected = _resumed_steps(run, [])
    # the second attempt runs to the end: two steps past the furthest logged
    target = max(r["step"] for r in _rows(run)) + 2
    last = _last_checkpoint(run)
    second = _start_tiny(run, target, settings)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out.decode(errors="replace")[-3000:]
    assert f"at step {last}" in out.decode(errors="replace")
    steps = [r["step"] for r in _rows(run)]
    # each attempt's steps in turn, each attempt from its checkpoint on (run directly, the driver appends;
    # through the control plane the rows past the checkpoint are dropped first)
    assert steps == expected + list(range(last + 1, target + 1)), (expected, steps)


def _last_checkpoint(run) -> int:
    return int(RunDir(run).complete_checkpoints()[-1].name.rsplit("_", 1)[-1])


def _resumed_steps(run, expected: list[int]) -> list[int]:
    """The steps logged so far, checked against what the earlier attempts logged plus this attempt's."""
    steps = [r["step"] for r in _rows(run)]
    assert steps[: len(expected)] == expected, (expected, steps)
    new = steps[len(expected) :]
    if expected:  # a resumed attempt starts right after a checkpoint the previous attempt completed
        assert new and new == list(range(new[0], new[0] + len(new))) and new[0] - 1 in {0, *expected}, new
    else:
        assert new == list(range(1, len(new) + 1)), new
    return steps


def test_a_stalled_streaming_engine_fails_the_step_after_its_timeout_naming_it(tmp_path):
    settings = ["trainer.max_staleness=1", "rollout.generate_timeout_s=15", "learner.weight_sync_timeout_s=15"]
    out, took = _run_and_stall(tmp_path, "StreamingEngine", settings, 15)
    assert "rollout engine 0 did not finish" in out and "within 15 s" in out, out[-3000:]
    assert took < 15 + 90, took
