"""The operator's tenancy policy: what a non-admin owner's job may do on the cluster.

A job config is valid JobConfig before it gets here; this decides whether *this owner* may run it.
In `tenancy: shared` (the default) a non-admin owner's job
- names only the plugin verifiers and plugin environments the operator allowed (`allowed_plugins`): a
  plugin is code that runs in the reward workers, so `os:system` would be code execution on the cluster;
- reads data, evaluation data and model directories only inside the operator's `data_roots`,
  after `..` and symlinks are resolved (a built-in model or task needs no path); a path that cannot be
  resolved (a symlink loop, an unreadable component) is not inside, and a leading `~` is refused before
  any lookup (the driver would expand it on a Ray node as the Ray user, and looking `~user` up here
  would tell a tenant which host users exist);
- resumes only from a checkpoint of one of the owner's own jobs (DeepSpeed loads checkpoints
  with pickle, so a foreign or planted checkpoint is code execution and another owner's weights);
- logs only to the operator's MLflow URIs (`tracking_uris`), and to W&B online only when `allow_wandb`
  (offline W&B writes into the job's own run directory).
Admin tokens belong to the operator and are not restricted; `tenancy: single_user` turns every
rule off. A refusal names the field, the value and the rule (HTTP 403).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

from actors.common.config import JobConfig, JsonlData, ParquetData
from actors.common.config_load import show_value
from actors.common.env_config import PluginEnvironment
from actors.common.models import BUILTIN_MODELS, TINY
from actors.common.verifier_config import PluginVerifier
from service.settings import Settings

__all__ = ["PolicyRefused", "check_job"]


class PolicyRefused(PermissionError):
    """A field the tenancy policy does not allow this owner (403)."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(f"{field} = {show_value(value, 120)}: {rule} (tenancy policy)")
        self.field = field


def _resolved(field: str, path: str) -> Path | None:
    """`path` with `..` and symlinks resolved, or None where it cannot be; PolicyRefused for a leading `~`."""
    if path.startswith("~"):
        raise PolicyRefused(field, path, "a leading ~ is not expanded for tenants' jobs; write the absolute path")
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, an unreadable component, a NUL byte
        return None


def _inside(field: str, path: str, roots: list[Path]) -> bool:
    resolved = _resolved(field, path)  # None: not provably inside
    return resolved is not None and any(resolved == root or resolved.is_relative_to(root) for root in roots)


def check_job(
    cfg: JobConfig, owner: str, is_admin: bool, s: Settings, owner_of_job: Callable[[str], str | None]
) -> None:
    """Raise PolicyRefused for the first field this owner may not use. `owner_of_job(job_id)` is the
    owner of a stored job, or None."""
    if is_admin or s.tenancy == "single_user":
        return
    plugins = [(f"reward.verifiers.{i}.function", v.function) for i, v in enumerate(cfg.reward.verifiers)
               if isinstance(v, PluginVerifier)]  # fmt: skip
    if cfg.environment is not None and isinstance(cfg.environment.tool, PluginEnvironment):
        plugins.append(("environment.tool.function", cfg.environment.tool.function))
    for field, function in plugins:
        if not any(fnmatch.fnmatchcase(function, p) for p in s.allowed_plugins):
            allowed = ", ".join(s.allowed_plugins) or "none"
            raise PolicyRefused(field, function, f"not an operator-approved plugin (allowed: {allowed})")
    roots = s.data_root_paths
    where = "inside " + ", ".join(str(r) for r in roots)
    for field, source in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
        if isinstance(source, JsonlData | ParquetData) and not _inside(f"{field}.path", source.path, roots):
            raise PolicyRefused(f"{field}.path", source.path, f"data files must lie {where}")
    model = cfg.model.path
    if model not in BUILTIN_MODELS and model != TINY and not _inside("model.path", model, roots):
        raise PolicyRefused(
            "model.path", model, f"a built-in model ({', '.join(BUILTIN_MODELS)}) or a directory {where}"
        )
    resume = cfg.trainer.resume
    if resume not in ("auto", "never"):
        runs = s.runs_path.resolve()
        resolved = _resolved("trainer.resume", resume) or runs  # unresolvable: no job's checkpoint
        job_id = resolved.relative_to(runs).parts[0] if resolved.is_relative_to(runs) and resolved != runs else ""
        if not job_id or owner_of_job(job_id) != owner:
            raise PolicyRefused(
                "trainer.resume",
                resume,
                f"auto, never, or a checkpoint of one of your own jobs (under {runs}/<job id>)",
            )
    uri = cfg.tracking.mlflow_tracking_uri
    if uri is not None and uri not in s.tracking_uris:
        raise PolicyRefused(
            "tracking.mlflow_tracking_uri",
            uri,
            f"not an operator-configured URI (allowed: {s.tracking_uris or 'none'})",
        )
    if cfg.tracking.wandb_project is not None and cfg.tracking.wandb_mode == "online" and not s.allow_wandb:
        raise PolicyRefused(
            "tracking.wandb_project", cfg.tracking.wandb_project,
            "W&B online is not enabled by the operator (wandb_mode: offline writes to the run directory only)",
        )  # fmt: skip
