"""Where a run's files go: trainer.output_dir made absolute, explicitly.

An absolute output_dir is used as it is. A relative one is taken under FORKRL_STORAGE_ROOT when that is
set, else under the current directory - except in Ray's temporary copy of a job's working directory
(`ray job submit --working-dir .`: <session>/runtime_resources/working_dir_files/_ray_pkg_*/), which
Ray deletes with its session and which on a cluster lies on the head node: there a relative
output_dir is refused, naming what to set instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from actors.common.config import JobConfig
from actors.common.config_load import ConfigError

__all__ = ["STORAGE_ROOT_ENV", "RAY_WORKING_DIR_MARK", "run_location", "with_run_location"]

STORAGE_ROOT_ENV = "FORKRL_STORAGE_ROOT"
RAY_WORKING_DIR_MARK = "runtime_resources/working_dir_files"  # where Ray unpacks a job's working_dir


def run_location(output_dir: str, cwd: Path, storage_root: str | None) -> Path:
    """The absolute run directory of trainer.output_dir; ConfigError for a relative one inside Ray's
    temporary working directory with no storage root."""
    path = Path(output_dir)
    if path.is_absolute():
        return path
    if storage_root:
        root = Path(storage_root)
        if not root.is_absolute():
            raise ConfigError(f"{STORAGE_ROOT_ENV} = {storage_root!r}: must be an absolute path")
        return root / path
    if RAY_WORKING_DIR_MARK in cwd.as_posix():
        raise ConfigError(
            f"trainer.output_dir = {output_dir!r} is relative, and this job runs in Ray's temporary copy of its "
            f"working directory ({cwd}), which Ray deletes with its session (on a cluster: on the head node). "
            f"Give an absolute trainer.output_dir on storage that outlives the job (shared storage on a "
            f"cluster; e.g. --set trainer.output_dir=$PWD/runs/<name> on one machine), or set {STORAGE_ROOT_ENV} "
            "to such a directory in the job's runtime env"
        )
    return cwd / path


def with_run_location(cfg: JobConfig, cwd: Path | None = None, environ: dict[str, str] | None = None) -> JobConfig:
    """cfg with trainer.output_dir absolute (run_location)."""
    env = os.environ if environ is None else environ
    where = run_location(cfg.trainer.output_dir, cwd or Path.cwd(), env.get(STORAGE_ROOT_ENV))
    return cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"output_dir": str(where)})})
