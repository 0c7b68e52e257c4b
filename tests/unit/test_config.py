"""JobConfig: YAML + --set overrides, and errors that name the field, the value and what is accepted."""

from pathlib import Path

import pytest

from actors.common.config import JobConfig
from actors.common.config_load import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


JOB_EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("study") or
                      p.name == "study_base.yaml")  # fmt: skip


@pytest.mark.parametrize("name", JOB_EXAMPLES)
def test_examples_validate(name):
    cfg = load_config(ROOT / "examples" / name)
    assert isinstance(cfg, JobConfig)
    if name == "tree.yaml":
        assert cfg.rollout.tree is not None and cfg.rollout.tree.credit == "tree"


def test_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["trainer.steps=3", "trainer.output_dir=/tmp/run", "algorithm.log_entropy=false"])
    assert cfg.trainer.steps == 3
    assert cfg.trainer.output_dir == "/tmp/run"
    assert cfg.algorithm.log_entropy is False
    assert cfg.algorithm.top_entropy_quantile == 0.2  # the paper's default


@pytest.mark.parametrize(
    "override,needle",
    [
        ("algorithm.top_entropy_quantile=0", "algorithm.top_entropy_quantile = 0: Input should be greater than 0"),
        ("algorithm.top_entropy_quantile=1.5", "algorithm.top_entropy_quantile = 1.5: Input should be less than or"),
        ("learner.lrr=1", "learner.lrr = 1: unknown field"),
        ("trainer.steps=many", "trainer.steps = 'many'"),
        ("data.source.type=csv", "data.source.type = 'csv': unknown type; accepted: 'builtin', 'jsonl', 'parquet'"),
    ],
)
def test_errors_name_field_value_and_accepted(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_cross_field_check_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="max_new_tokens=600 must be < rollout.max_model_len=512"):
        load_config(None, ["rollout.max_new_tokens=600"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["trainer.steps"])


def test_yaml_files_are_bounded_before_they_are_built(tmp_path):
    import time

    from actors.common.config_load import MAX_CONFIG_DEPTH, MAX_CONFIG_FILE_BYTES, MAX_CONFIG_NODES

    def refused(text: str) -> str:
        f = tmp_path / "c.yaml"
        f.write_text(text)
        t0 = time.perf_counter()
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert time.perf_counter() - t0 < 0.5  # PyYAML's pure-Python parser took 17 s on the first one
        return str(e.value)

    deep = refused("a: " + "[" * 10_000 + "]" * 10_000)
    assert f"limit of {MAX_CONFIG_DEPTH} levels" in deep and "line 1" in deep
    block = refused("".join(" " * i + f"k{i}:\n" for i in range(MAX_CONFIG_DEPTH + 1)) + " " * 65 + "x: 1\n")
    assert f"nested {MAX_CONFIG_DEPTH + 1} levels" in block
    assert f"limit of {MAX_CONFIG_NODES}" in refused("".join(f"k{i}: 1\n" for i in range(MAX_CONFIG_NODES)))
    # a billion laughs: 9 aliases of 9 aliases of ... counted as what they repeat, refused at the bound
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert f"limit of {MAX_CONFIG_NODES}" in refused(bomb) and "line 5" in refused(bomb)
    assert "4300 digits" in refused("name: " + "1" * 5_000 + "\n")  # int() refuses it: a ConfigError, not a crash
    assert "not valid YAML" in refused("name: x\nrollout: {group_size: 4\n")
    assert f"limit of {MAX_CONFIG_FILE_BYTES}" in refused("#" * (MAX_CONFIG_FILE_BYTES + 1))
    # anchors and merge keys a person writes stay usable in files
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: &n run-a\ntracking: {mlflow_experiment: *n}\n")
    assert load_config(ok).tracking.mlflow_experiment == "run-a"


def test_check_shape_stops_at_the_first_bound():
    from actors.common.config_load import MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, InputRefused, check_shape

    check_shape(JobConfig().model_dump(mode="json"))  # a real config: about 200 nodes, 5 deep
    deep: object = 1
    for _ in range(MAX_CONFIG_DEPTH):
        deep = [deep]
    check_shape(deep)  # exactly at the bound
    with pytest.raises(InputRefused, match=f"nested {MAX_CONFIG_DEPTH + 1} levels"):
        check_shape([deep])
    with pytest.raises(InputRefused, match=f"limit of {MAX_CONFIG_NODES}") as e:
        check_shape({"a": list(range(MAX_CONFIG_NODES))})  # 1 + 2 (key, list) + 10,000 items
    assert e.value.value == MAX_CONFIG_NODES + 3


def test_validation_errors_are_capped_and_paths_refuse_nul():
    from actors.common.config_load import MAX_REPORTED_ERRORS, validate_config

    with pytest.raises(ConfigError) as e:
        validate_config({f"k{i}": 1 for i in range(500)})
    lines = str(e.value).splitlines()
    assert len(lines) == MAX_REPORTED_ERRORS + 1 and lines[-1].startswith("500 errors in all")
    for override in ("model.path=/m/a\x00b", "trainer.resume=/r\x00", 'data.source={type: jsonl, path: "a\\0"}'):
        with pytest.raises(ConfigError, match="NUL byte"):
            load_config(None, [override])
