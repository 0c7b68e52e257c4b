"""The study's summary, with worked numbers: mean and sample sd over seeds of the final and best
held-out accuracy, the entropy pattern of the first and last steps, and the spec's refusals."""

import json
from pathlib import Path

import pytest

from actors.common.config_load import ConfigError
from service.study import StudySpec, load_spec, summarize


def _write(out, key, rows):
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_takes_mean_and_sd_over_seeds(tmp_path):
    spec = StudySpec(
        name="t",
        base="x.yaml",
        arms=[{"name": "top", "label": "highest"}, {"name": "none"}],
        seeds=[1, 2],
        reference={"label": "paper", "p80": 0.672},
    )
    tok = [{"id": 5, "text": " so", "kept": 3, "dropped": 1}, {"id": 7, "text": " wait", "kept": 2, "dropped": 0}]
    _write(tmp_path, "top-s1", [
        {"step": 1, "timing/step": 10.0, "entropy/p80": 0.5, "entropy/frac_below_0.01": 0.4, "forking_tokens": tok},
        {"step": 2, "timing/step": 12.0, "eval/reward_mean": 0.2},
        {"step": 3, "timing/step": 14.0, "eval/reward_mean": 0.3, "entropy/p80": 0.3, "entropy/frac_below_0.01": 0.6},
    ])  # fmt: skip
    _write(tmp_path, "top-s2", [
        {"step": 1, "timing/step": 20.0, "entropy/p80": 0.7, "entropy/frac_below_0.01": 0.2,
         "forking_tokens": [{"id": 7, "text": " wait", "kept": 4, "dropped": 0}]},
        {"step": 2, "timing/step": 20.0, "eval/reward_mean": 0.1},
        {"step": 3, "timing/step": 20.0, "eval/reward_mean": 0.25, "entropy/p80": 0.5, "entropy/frac_below_0.01": 0.4},
    ])  # fmt: skip
    res = summarize(spec, tmp_path)["arms"]
    assert list(res) == ["top"]  # an arm without a finished run is left out
    top = res["top"]
    assert top["eval_final"] == pytest.approx((0.275, 0.0353553), abs=1e-6)  # (0.3, 0.25): sd = 0.05 / sqrt 2
    assert top["eval_best"] == pytest.approx((0.275, 0.0353553), abs=1e-6)
    assert top["eval_first"] == pytest.approx((0.15, 0.0707107), abs=1e-6)
    assert top["step_s"] == pytest.approx((16.0, 5.656854), abs=1e-5)  # medians 12 and 20
    assert top["entropy"]["first"] == {
        "frac_below_0.01": pytest.approx(0.3),
        "p80": pytest.approx(0.6),
        "forking_tokens": [" wait", " so"],  # kept counts summed over the seeds: 2 + 4 = 6 against 3
    }
    assert top["entropy"]["last"]["p80"] == pytest.approx(0.4)
    table = (tmp_path / "table.md").read_text()
    assert top["eval_final_by_seed"] == {1: 0.3, 2: 0.25} and top["eval_best_by_seed"] == {1: 0.3, 2: 0.25}
    row = (
        "| highest | 2 | 3 | 0.150 ± 0.071 | 0.275 ± 0.035 | 0.300 / 0.250 | 0.275 ± 0.035 | 0.300 / 0.250 "
        "| 16.0 ± 5.7 |"
    )
    assert row in table, table
    assert "| paper | - | - | 0.672 | - |" in table
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert not (tmp_path / "curves_by_seconds.png").exists()
    summarize(spec.model_copy(update={"x": "generated", "also_x": ["seconds"]}), tmp_path)
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("curves_by_step.png", "curves_by_seconds.png"))


def test_a_spec_with_a_bad_field_or_repeated_arms_is_refused(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nbase: x.yaml\narms: [{name: a}, {name: a}]\nseeds: [1]\n")
    with pytest.raises(ConfigError, match="names repeat"):
        load_spec(str(p))
    p.write_text("name: t\nbase: x.yaml\narms: [{name: a, sett: []}]\nseeds: []\n")
    with pytest.raises(ConfigError) as e:
        load_spec(str(p))
    assert "arms.0.sett" in str(e.value) and "seeds" in str(e.value)
    p.write_text("name: t\nbase: x.yaml\narms: [{name: a}, {name: b, seeds: [1, 4]}]\nseeds: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"arms.b.seeds: \[1, 4\] are not all among seeds \[1, 2\]"):
        load_spec(str(p))


def test_an_arm_with_its_own_seeds_runs_only_those_seed_major():
    from service.study_spec import run_key, runs_of

    spec = StudySpec(name="t", base="x.yaml", arms=[{"name": "a"}, {"name": "b", "seeds": [2]}], seeds=[1, 2, 3])
    assert [run_key(a, s) for a, s in runs_of(spec)] == ["a-s1", "a-s2", "b-s2", "a-s3"]


def test_a_report_draws_only_the_runs_of_the_spec(tmp_path):
    from service.study import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nbase: ../examples/tiny.yaml\narms: [{name: a}, {name: b, seeds: [2]}]\nseeds: [1, 2]\n")
    row = {"step": 1, "timing/step": 1.0, "eval/reward_mean": 0.5}
    for key in ("a-s1", "b-s1", "b-s2"):  # b-s1: a run of a seed since taken off arm b
        _write(tmp_path / "out", key, [row | {"eval/reward_mean": 0.9 if key == "b-s1" else 0.5}])
    assert main(["--spec", str(spec), "--out", str(tmp_path / "out"), "--report"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["arms"]["b"]["eval_final_by_seed"] == {"2": 0.5}


def test_only_names_runs_of_the_spec(tmp_path, capsys):
    from service.study import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nbase: x.yaml\narms: [{name: a}, {name: b, seeds: [2]}]\nseeds: [1, 2]\n")
    assert main(["--spec", str(spec), "--out", str(tmp_path / "out"), "--only", "b-s1", "a-s1"]) == 2
    assert "--only: b-s1: not runs of t (its runs: a-s1 a-s2 b-s2)" in capsys.readouterr().err


def test_generation_over_a_run_counts_tokens_per_group_with_signal(tmp_path):
    spec = StudySpec(name="t", base="x.yaml", arms=[{"name": "tree"}], seeds=[1, 2], keep=["tree/prefix_cache_hit"])
    g = ("rollout/generated_tokens", "batch/groups_generated", "batch/signal_share", "batch/groups_kept")
    # seed 1: 300 + 500 tokens over 8 + 16 groups, 4 + 4 with signal: 800 / 8 = 100 tokens per group with
    # signal; 4 + 2 groups trained on: 800 / 6 per group trained on
    _write(tmp_path, "tree-s1", [
        {"step": 0, "eval/reward_mean": 0.1},
        {"step": 1, g[0]: 300.0, g[1]: 8.0, g[2]: 0.5, g[3]: 4.0, "tree/prefix_cache_hit": 0.6},
        {"step": 2, g[0]: 500.0, g[1]: 16.0, g[2]: 0.25, g[3]: 2.0, "tree/prefix_cache_hit": 0.8,
         "eval/reward_mean": 0.2},
    ])  # fmt: skip
    # seed 2: 400 tokens over 8 groups, all with signal: 50 per group with signal; 4 trained on: 100 per group
    _write(tmp_path, "tree-s2", [{"step": 1, g[0]: 400.0, g[1]: 8.0, g[2]: 1.0, g[3]: 4.0, "eval/reward_mean": 0.3}])
    gen = summarize(spec, tmp_path)["arms"]["tree"]["generation"]
    assert gen["generated_tokens"] == pytest.approx((600.0, 282.842712))  # 800 and 400
    assert gen["signal_share"] == pytest.approx((0.666667, 0.471405), abs=1e-6)  # 8 of 24, 8 of 8
    assert gen["tokens_per_signal_group"] == pytest.approx((75.0, 35.355339))  # 100 and 50
    assert gen["tokens_per_trained_group"] == pytest.approx((116.666667, 23.570226))  # 133.3 and 100
    assert gen["tree/prefix_cache_hit"] == pytest.approx((0.7, 0.0))  # seed 2 did not log it
    table = (tmp_path / "table.md").read_text()
    assert "| tree | 600 ± 283 | 0.667 ± 0.471 | 75.0 ± 35.4 | 116.7 ± 23.6 | 0.700 ± 0.000 |" in table, table


def test_trained_sequences_add_up_per_run_and_average_over_runs():
    from service.study_report import _trained_sequences

    runs = [
        [{"step": 2, "batch/sequences": 60.0}, {"step": 1, "batch/sequences": 64.0}],  # 64, then 124
        [{"step": 1, "batch/sequences": 32.0}, {"step": 2}, {"step": 3, "batch/sequences": 8.0}],  # 32, 32, 40
    ]
    assert _trained_sequences(runs) == {1: 48.0, 2: 78.0, 3: 40.0}
    # trained tokens: the kept tokens each step trained on, the same way
    tokens = [[{"step": 1, "entropy/kept_tokens": 10.0}, {"step": 2, "entropy/kept_tokens": 6.0}]]
    assert _trained_sequences(tokens, "entropy/kept_tokens") == {1: 10.0, 2: 16.0}


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in Path("examples").glob("study*.yaml") if p.name != "study_base.yaml"),
)
def test_every_run_of_the_committed_studies_is_a_valid_job(path):
    from actors.common.config_load import load_config
    from service.study_spec import job_overrides, runs_of

    spec, base = load_spec(path)
    for arm, seed in runs_of(spec):
        cfg = load_config(str(base), job_overrides(spec, arm, seed))
        assert cfg.trainer.seed == seed and cfg.trainer.steps == (40 if "tools" in path else 80)
    if path.endswith("methods.yaml"):  # several optimizer steps per rollout: the methods differ only there
        cfgs = {a.name: load_config(str(base), job_overrides(spec, a, 1)).algorithm for a in spec.arms}
        assert all(c.ppo_mini_batch == 2 for c in cfgs.values()) and cfgs["gspo"].policy_loss == "gspo"
        assert {c.policy_loss for c in cfgs.values()} == {"ppo_clip", "clip_cov", "kl_cov", "gspo", "cispo"}
        assert cfgs["top20-lr"].lr_scale == "inverse_rho" and spec.x == "tokens"
    if path.endswith("async.yaml"):
        assert spec.x == "sequences"
        stale = {a.name: load_config(str(base), job_overrides(spec, a, 1)).trainer.max_staleness for a in spec.arms}
        assert stale == {"sync-top20": 0, "async1-top20": 1, "sync-all": 0, "async1-all": 1}


def test_a_study_keeps_the_numbers_its_panels_and_x_axis_need():
    from service.study import KEEP, _scalars, kept_keys

    spec, _ = load_spec("examples/study_tools.yaml")
    assert {"env/tool_calls_mean", "env/tool_error_rate"} <= set(kept_keys(spec)) and set(KEEP) <= set(kept_keys(spec))
    methods, _ = load_spec("examples/study_methods.yaml")
    assert {"entropy/kept_tokens", "cov/p99", "actor/clipfrac"} <= set(kept_keys(methods))
    tree, _ = load_spec("examples/study_tree.yaml")  # x: generated tokens, also wall seconds
    assert {"rollout/generated_tokens", "timing/step", "batch/signal_share", "batch/groups_generated"} <= set(
        kept_keys(tree)
    ) and {"tree/branch_agreement", "tree/prefix_cache_hit"} <= set(kept_keys(tree))
    row = {"step": 3, "env/tool_calls_mean": 0.5, "actor/grad_norm": 1.0, "eval/reward_mean": "n/a"}
    assert _scalars([row], kept_keys(spec)) == [{"step": 3, "env/tool_calls_mean": 0.5}]
    # a resumed run logs again the steps after its checkpoint: each step once, its last record, in order
    logged = [{"step": s, "env/tool_calls_mean": v} for s, v in ((1, 0.1), (2, 0.2), (3, 0.3), (2, 0.25), (3, 0.35))]
    once = _scalars(logged, kept_keys(spec))
    assert [(r["step"], r["env/tool_calls_mean"]) for r in once] == [(1, 0.1), (2, 0.25), (3, 0.35)]


def test_a_report_rereads_finished_direct_runs_from_their_run_directories(tmp_path):
    from service.study import State, refresh_direct

    spec, _ = load_spec("examples/study_tools.yaml")
    run_dir = tmp_path / "runs" / "tool-s1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "env/tool_calls_mean": 0.25, "x/other": 1}) + "\n")
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "tool-s1.jsonl").write_text(json.dumps({"step": 1}) + "\n")  # stored before the panel existed
    (out / "runs" / "no-tool-s1.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    state = State(out)
    state.set("tool-s1", job=str(run_dir), done=True)
    state.set("no-tool-s1", job=str(tmp_path / "gone"), done=True)  # its run directory is on another machine
    assert refresh_direct(spec, out, state) == 1
    assert json.loads((out / "runs" / "tool-s1.jsonl").read_text()) == {"step": 1, "env/tool_calls_mean": 0.25}
    assert json.loads((out / "runs" / "no-tool-s1.jsonl").read_text()) == {"step": 1, "reward/mean": 0.5}
