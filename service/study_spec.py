"""A study's spec (examples/study.yaml): the base job config, overrides common to every run, the arms
with their own overrides, the seeds, and published figures to show beside ours. Each arm x seed is
one run, keyed `<arm>-s<seed>`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.common.config_load import ConfigError

__all__ = ["Arm", "StudySpec", "load_spec", "run_key", "runs_of", "arm_seeds", "job_overrides"]


XAxis = Literal["step", "sequences", "tokens", "generated", "seconds"]


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,30}$", description="Short name (job names, files).")
    label: str = Field("", max_length=80, description="Legend text; default: the name.")
    set: list[str] = Field(default_factory=list, description="Overrides of this arm, KEY=VALUE.")
    seeds: list[int] | None = Field(
        None, min_length=1, description="This arm's seeds, some of the study's (a costly side arm); default: all."
    )


DEFAULT_PANELS = [
    ("eval/reward_mean", "held-out greedy accuracy"),
    ("reward/mean", "train reward"),
    ("entropy/mean", "entropy, mean"),
    ("entropy/p80", "entropy, p80"),
    ("response/length_mean", "response length (tokens)"),
]


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    base: str = Field(..., description="Job config every run starts from (a path, relative to the spec).")
    set: list[str] = Field(default_factory=list, description="Overrides common to every arm.")
    arms: list[Arm] = Field(..., min_length=1)
    seeds: list[int] = Field(..., min_length=1)
    reference: dict[str, Any] = Field(default_factory=dict, description="Published figures shown beside ours.")
    x: XAxis = Field(
        "step",
        description="The curves' x axis: the step, or the trained sequences, the trained tokens (those that carried "
        "the gradient), the generated tokens or the wall seconds of the steps so far, mean over seeds.",
    )
    also_x: list[XAxis] = Field(
        default_factory=list, max_length=4, description="More x axes, a plot each (curves_by_<x>.png)."
    )
    keep: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="More per-step numbers each run keeps, beside the panels' (e.g. tree/prefix_cache_hit); the "
        "table gives each one's mean over the run.",
    )
    panels: list[tuple[str, str]] = Field(
        default_factory=lambda: list(DEFAULT_PANELS),
        min_length=1,
        max_length=8,
        description="The curves drawn, [metric, title] each; the table adds each one's mean over the last 5 steps.",
    )


def load_spec(path: str) -> tuple[StudySpec, Path]:
    """The spec and the resolved path of its base config. Raises ConfigError naming each bad field."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"study spec {path}: {e}") from None
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"study spec {path}:\n" + "\n".join(lines)) from None
    names = [a.name for a in spec.arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"study spec {path}: arms: names repeat ({names})")
    for a in spec.arms:
        if a.seeds is not None and not set(a.seeds) <= set(spec.seeds):
            raise ConfigError(f"study spec {path}: arms.{a.name}.seeds: {a.seeds} are not all among seeds {spec.seeds}")
    return spec, (p.parent / spec.base).resolve()


def arm_seeds(spec: StudySpec, arm: Arm) -> list[int]:
    return [s for s in spec.seeds if arm.seeds is None or s in arm.seeds]


def runs_of(spec: StudySpec) -> list[tuple[Arm, int]]:
    """Every run, seed-major (every arm gets its first seed before any gets a second)."""
    return [(arm, seed) for seed in spec.seeds for arm in spec.arms if seed in arm_seeds(spec, arm)]


def run_key(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def job_overrides(spec: StudySpec, arm: Arm, seed: int) -> list[str]:
    return [*spec.set, *arm.set, f"trainer.seed={seed}", f"name={spec.name}-{run_key(arm, seed)}"]
