"""Where a run's files go (actors/driver/location.py): explicit, never Ray's temporary working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.common.config_load import ConfigError, load_config
from actors.driver.location import run_location, with_run_location

RAY_COPY = Path("/tmp/ray/session_2026/runtime_resources/working_dir_files/_ray_pkg_0153b57e")


def test_an_absolute_output_dir_is_kept_and_a_relative_one_goes_under_the_root_or_the_directory():
    assert run_location("/data/runs/a", RAY_COPY, None) == Path("/data/runs/a")
    assert run_location("runs/a", Path("/home/u/forkrl"), None) == Path("/home/u/forkrl/runs/a")
    assert run_location("runs/a", RAY_COPY, "/shared/forkrl") == Path("/shared/forkrl/runs/a")
    assert run_location("runs/a", Path("/home/u/forkrl"), "/shared/forkrl") == Path("/shared/forkrl/runs/a")


def test_a_relative_output_dir_in_rays_temporary_copy_is_refused_naming_what_to_set():
    with pytest.raises(ConfigError) as e:
        run_location("runs/tiny", RAY_COPY, None)
    msg = str(e.value)
    assert "trainer.output_dir = 'runs/tiny'" in msg and str(RAY_COPY) in msg and "FORKRL_STORAGE_ROOT" in msg
    with pytest.raises(ConfigError, match="FORKRL_STORAGE_ROOT = 'shared': must be an absolute path"):
        run_location("runs/tiny", RAY_COPY, "shared")


def test_the_config_comes_back_with_the_absolute_run_directory():
    cfg = load_config("examples/tiny.yaml", [])
    assert cfg.trainer.output_dir == "runs/tiny"
    moved = with_run_location(cfg, Path("/home/u/forkrl"), {})
    assert moved.trainer.output_dir == "/home/u/forkrl/runs/tiny" and moved.trainer.steps == cfg.trainer.steps
    assert with_run_location(cfg, RAY_COPY, {"FORKRL_STORAGE_ROOT": "/nfs"}).trainer.output_dir == "/nfs/runs/tiny"
