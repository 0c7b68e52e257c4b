"""The trackers for real, without network: MLflow on a local SQLite store, Weights & Biases in offline
mode (its transaction log read back), TensorBoard event files. One run per job across a resume, the
config as parameters (no secret), every step once, sampled completions as tables, the summary and
the Hugging Face export registered, and failures that never fail or stall the training loop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from actors.common.config_load import load_config
from actors.common.contract import REPORT_TOKEN_ENV, RunDir
from actors.driver import tracking
from actors.driver.tracking import Tracker, flat_params
from tests.wandb_log import history, run_ids

SAMPLE = {"prompt": "2+3=", "answer": "5", "reward": 1.0, "tokens": ["The", " answer", " is", " 5"],
          "entropy": [0.9, 0.01, 0.3, 1.2], "kept": [1, 0, 0, 1], "truncated": False}  # fmt: skip


def _cfg(tmp_path, **tracking):
    return load_config(None, [f"tracking.{k}={v}" for k, v in tracking.items()] + [f"trainer.output_dir={tmp_path}"])


def _steps(tracker: Tracker, steps: range) -> None:
    for step in steps:
        tracker.log(step, {"reward/mean": step / 10, "entropy/mean": 1.0 + step}, [SAMPLE] if step == 2 else [])


def test_mlflow_and_wandb_keep_one_run_per_job_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv(REPORT_TOKEN_ENV, "secret-ingest-token")
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    cfg = _cfg(tmp_path, mlflow_tracking_uri=f"sqlite:///{db}", wandb_project="forkrl-test", wandb_mode="offline")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "llama"}')

    first = Tracker(run, cfg)
    first.log(0, {"eval/reward_mean": 0.25})  # the evaluation before training: step 0, in every sink
    _steps(first, range(1, 4))  # steps 1-3, then the job dies after its checkpoint at step 1 ...
    assert first.close() == {"tracking/errors": 0.0, "tracking/dropped": 0.0}
    held = json.loads((run.path / "tracking.json").read_text())
    assert [held[f"{s}_last_step"] for s in ("tensorboard", "wandb", "mlflow")] == [3, 3, 3]
    again = Tracker(run, cfg)  # ... and resumes from it: steps 2-3 run again, then 4-5
    _steps(again, range(2, 6))
    health = again.close({"reward_last": 0.5, "steps": 5}, str(export))
    assert health == {"tracking/errors": 0.0, "tracking/dropped": 0.0}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == "forkrl"]
    (mrun,) = client.search_runs([exp.experiment_id])  # one run for the job, resumed
    assert mrun.info.status == "FINISHED" and mrun.data.tags["forkrl.run_dir"] == str(run.path)
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "reward_mean")] == [1, 2, 3, 4, 5]
    assert [(m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, "eval_reward_mean")] == [(0, 0.25)]
    params = mrun.data.params
    assert params["algorithm.top_entropy_quantile"] == "0.2" and params["trainer.steps"] == "20"
    assert params == flat_params(cfg)
    assert "secret-ingest-token" not in json.dumps(params)
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"summary.json", "hf", "samples"} <= artifacts
    assert [a.path for a in client.list_artifacts(mrun.info.run_id, "hf")] == ["hf/config.json"]
    local = client.download_artifacts(mrun.info.run_id, "samples/step_00000002.json", str(tmp_path))
    rows = json.loads(Path(local).read_text())
    assert rows["completion"] == ["The answer is 5"] and rows["kept"] == ["2/4"] and rows["reward"] == [1.0]
    assert json.loads(rows["entropy"][0]) == SAMPLE["entropy"]
    summary = json.loads(Path(client.download_artifacts(mrun.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary == {"reward_last": 0.5, "steps": 5}

    # W&B: both processes wrote to the same run id; every step once across them
    assert run_ids(run.path) == {json.loads((run.path / "tracking.json").read_text())["wandb_run_id"]}
    steps = [r["_step"] for r in history(run.path) if "reward/mean" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert [r["_step"] for r in history(run.path) if "eval/reward_mean" in r] == [0]
    (row,) = [r for r in history(run.path) if any(k.startswith("samples") for k in r)]  # the table of step 2
    assert row["_step"] == 2
    tables = list((run.path / "wandb").glob("offline-run-*/files/media/table/samples_2_*.table.json"))
    (t,) = tables
    data = json.loads(t.read_text())
    assert data["columns"][:5] == ["step", "sample", "reward", "completion", "kept"] and data["data"][0][3] == (
        "The answer is 5"
    )
    # TensorBoard holds each step once as well, and the samples as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert sorted({e.step for e in acc.Scalars("reward/mean")}) == [1, 2, 3, 4, 5]
    assert len(acc.Scalars("reward/mean")) == 5
    assert "samples/text_summary" in acc.Tags()["tensors"]
    # the run directory's own record keeps what happened, resumed steps included (the control plane drops
    # a failed attempt's steps after its checkpoint and stores the next attempt's)
    lines = [json.loads(ln) for ln in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert lines[2]["samples"] == [SAMPLE] and "samples" not in lines[1]


def test_tracking_failures_are_counted_and_never_stall_the_loop(tmp_path, monkeypatch):
    # MLflow behind a closed port, with the client's own retries on (its default): the loop must not wait
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(tracking, "CLOSE_WAIT_S", 5.0)  # the bound on the end of a run, short for the test
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for uri in ("http://127.0.0.1:9", f"sqlite:///{not_a_dir}/mlflow.db"):  # a server down; an unwritable store
        run = RunDir(tmp_path / f"run{len(uri)}")
        run.path.mkdir()
        tracker = Tracker(run, _cfg(tmp_path, mlflow_tracking_uri=uri, tensorboard=False))
        t0 = time.monotonic()
        _steps(tracker, range(1, 21))
        assert time.monotonic() - t0 < 2.0, "logging waited on a tracker that is down"
        t0 = time.monotonic()
        health = tracker.close()
        assert time.monotonic() - t0 <= 5.0 + 2
        assert health["tracking/errors"] >= 1, uri  # counted (and logged), not raised
        assert len(run.metrics.read_text().splitlines()) == 20  # the job's own record is complete


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_backend_that_is_not_installed_is_an_error_counted_not_a_crash(tmp_path, monkeypatch, backend):
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):  # the package is installed here: hide it, as on a minimal image
        if name.split(".")[0] == backend:
            raise ImportError(f"No module named {backend!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    settings = {"wandb": {"wandb_project": "p", "wandb_mode": "offline"},
                "mlflow": {"mlflow_tracking_uri": f"sqlite:///{tmp_path}/m.db"}}[backend]  # fmt: skip
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    tracker = Tracker(run, _cfg(tmp_path, tensorboard=False, **settings))
    _steps(tracker, range(1, 4))
    assert tracker.close()["tracking/errors"] == 1.0  # the failed start, once; the steps are skipped quietly


def test_a_resume_backfills_the_steps_a_tracker_never_got(tmp_path):
    # the attempt that ended logged steps 1-3 to metrics.jsonl, but MLflow got none of them (its queue died
    # with the process: here, it was not on); step 3 was logged twice, the later record counts
    db = tmp_path / "mlflow.db"
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    first = Tracker(run, _cfg(tmp_path, tensorboard="false"))
    _steps(first, range(1, 4))
    first.log(3, {"reward/mean": 0.35, "entropy/mean": 4.0})
    first.close()
    again = Tracker(run, _cfg(tmp_path, tensorboard="false", mlflow_tracking_uri=f"sqlite:///{db}"))
    assert again.backfill(3) == 3  # steps 1, 2, 3 queued for MLflow
    assert again.backfill(0) == 0
    _steps(again, range(4, 6))
    assert again.close() == {"tracking/errors": 0.0, "tracking/dropped": 0.0}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == "forkrl"]
    (mrun,) = client.search_runs([exp.experiment_id])
    got = [(m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, "reward_mean")]
    assert sorted(got) == [(1, 0.1), (2, 0.2), (3, 0.35), (4, 0.4), (5, 0.5)]
    assert "samples/step_00000002.json" in {a.path for a in client.list_artifacts(mrun.info.run_id, "samples")}
    # killed between a send and its note in tracking.json: the run holds step 5, the note says 3; a resume
    # at step 5 backfills nothing twice (MLflow itself is asked what the run holds)
    state = json.loads((run.path / "tracking.json").read_text())
    (run.path / "tracking.json").write_text(json.dumps({**state, "mlflow_last_step": 3}))
    third = Tracker(run, _cfg(tmp_path, tensorboard="false", mlflow_tracking_uri=f"sqlite:///{db}"))
    third.backfill(5)
    _steps(third, range(5, 7))
    assert third.close() == {"tracking/errors": 0.0, "tracking/dropped": 0.0}
    got = [m.step for m in client.get_metric_history(mrun.info.run_id, "reward_mean")]
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
