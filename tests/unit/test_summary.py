"""The run's closing summary: held-out accuracy before training (step 0) and at the end with standard errors,
the reward curve as one line, what the filter kept. Worked numbers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from actors.driver.loop import eval_metrics
from actors.driver.summary import dashboard_page, print_summary, read_evals, sparkline, startup_line, summarize


def test_eval_metrics_give_the_mean_and_its_standard_error():
    # scores 1,0,1,1: mean 0.75; sample variance (3 x 0.25^2 + 0.75^2) / 3 = 0.25; stderr sqrt(0.25 / 4) = 0.25
    m = eval_metrics([1.0, 0.0, 1.0, 1.0])
    assert m == {"eval/reward_mean": 0.75, "eval/reward_stderr": pytest.approx(0.25), "eval/prompts": 4.0}
    assert eval_metrics([1.0])["eval/reward_stderr"] == 0.0  # one prompt: no spread to speak of


def test_sparkline_scales_from_lowest_to_highest_and_buckets_long_curves():
    assert sparkline([0.0, 1.0]) == "▁█"
    assert sparkline([0.5, 0.5, 0.5]) == "▁▁▁"
    assert sparkline([0.0, 0.0, 1.0, 1.0], width=2) == "▁█"  # bucket means of two values each
    assert len(sparkline([float(i) for i in range(100)], width=40)) == 34  # ceil(100/40) = 3 per char
    assert sparkline([]) == ""


def test_the_summary_reads_step_0_and_the_last_evaluation_across_attempts(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "eval/reward_mean": 0.25, "eval/reward_stderr": 0.1, "eval/prompts": 64},
        {"step": 1, "reward/mean": 0.1, "entropy/kept_frac": 0.2, "entropy/threshold": 1.5,
         "forking_tokens": [{"id": 5, "text": " so", "kept": 3, "dropped": 1}]},
        {"step": 2, "reward/mean": 0.3, "eval/reward_mean": 0.3, "eval/reward_stderr": 0.1, "eval/prompts": 64},
        # a resumed attempt logs step 2 again: its record counts
        {"step": 2, "reward/mean": 0.4, "eval/reward_mean": 0.5, "eval/reward_stderr": 0.1, "eval/prompts": 64,
         "entropy/kept_frac": 0.2, "entropy/threshold": 1.25,
         "forking_tokens": [{"id": 5, "text": " so", "kept": 2, "dropped": 0}, {"id": 6, "text": "=", "kept": 4}]},
    ]  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = read_evals(metrics)
    assert [(e["step"], e["mean"]) for e in evals] == [(0, 0.25), (2, 0.5)]
    s = summarize([rows[1], rows[3]], tmp_path, None, evals, steps=2)
    assert (s["eval_first"], s["eval_last"], s["reward_curve"]) == (0.25, 0.5, [0.1, 0.4])
    assert s["kept_frac"] == pytest.approx(0.2) and s["threshold_last"] == 1.25
    assert s["top_kept_tokens"] == [{"text": " so", "kept": 5, "dropped": 1}, {"text": "=", "kept": 4, "dropped": 0}]
    out = io.StringIO()
    print_summary(s, out)
    text = out.getvalue()
    # +0.25 over an error of sqrt(0.1^2 + 0.1^2) = 0.1414: +1.8 standard errors
    assert "step 0 0.250 ± 0.100 -> step 2 0.500 ± 0.100 (+0.250, +1.8 standard errors)" in text, text
    assert "64 prompts" in text and "kept 20.0% of the response tokens, last threshold 1.250" in text
    assert "' so'×5" in text and "▁█" in text
    extend = f"python -m actors.train --config {tmp_path / 'config.json'} --set trainer.steps=4"
    assert f"go on from the newest checkpoint: {extend}" in text
    assert "dashboard page: none (a job submitted with `forkrl submit` to `make serve` has one, live)" in text


def test_the_dashboard_page_comes_from_the_ingestion_url_the_service_gave():
    assert (
        dashboard_page("http://10.0.0.5:8000/v1/jobs/forkrl-ab12/ingest") == "http://10.0.0.5:8000/#/jobs/forkrl-ab12"
    )
    assert (
        dashboard_page("https://rl.example.org/forkrl/v1/jobs/j1/ingest") == "https://rl.example.org/forkrl/#/jobs/j1"
    )
    assert dashboard_page(None) is None and dashboard_page("http://x/v1/jobs/j1/metrics") is None
    out = io.StringIO()
    print_summary(summarize([], Path("/runs/x"), None, dashboard="http://h:8000/#/jobs/j1"), out)
    assert "dashboard page: http://h:8000/#/jobs/j1\n" in out.getvalue()


def test_the_start_up_line_says_where_the_time_before_the_first_step_went():
    t = {"process": 4.2, "ray": 5.8, "engines": 18.9, "learners": 13.7, "pools": 20.04, "eval": 13.3, "total": 44.0}
    assert startup_line(t) == (
        "start-up: first step after 44.0 s: python and imports 4.2 s, Ray 5.8 s, pools 20.0 s (rollout engines "
        "18.9 s, learners 13.7 s, side by side unless they share GPUs), step-0 evaluation 13.3 s"
    )
    # no evaluation at step 0 (trainer.eval_every = 0): no such part; the summary prints the line
    no_eval = {k: v for k, v in t.items() if k != "eval"}
    assert "evaluation" not in startup_line(no_eval)
    out = io.StringIO()
    print_summary(summarize([], Path("/runs/x"), None) | {"startup_s": t}, out)
    assert "\nstart-up: first step after 44.0 s: python and imports 4.2 s" in out.getvalue()
