"""JobConfig: YAML + --set overrides, and errors that name the field, the value and what is accepted."""

from pathlib import Path

import pytest

from actors.common.config import JobConfig
from actors.common.config_load import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml"])
def test_examples_validate(name):
    cfg = load_config(ROOT / "examples" / name)
    assert isinstance(cfg, JobConfig)


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
