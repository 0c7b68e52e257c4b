"""What the training runtime and the control plane agree on, in one place.

The driver writes a run directory and the service reads it (when it can see it); the driver pushes
metric records and the service stores them; the service submits the driver as a Ray job and follows
its state. Both sides import the names below and never spell them again. Imports the standard
library only (the service loads it without torch or Ray).
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = [
    "JOB_CONFIG_ENV",
    "ENTRYPOINT",
    "JOB_ENV_VARS",
    "JobState",
    "TERMINAL_STATES",
    "MetricRecord",
    "RunDir",
    "finite",
    "metric_record",
    "parse_metric_line",
]


class JobState(str, Enum):
    """A training job's state, as stored by the service and reported by Ray. QUEUED is the service's
    alone: waiting for admission (capacity, quota, priority); PENDING: admitted, starting on Ray."""

    QUEUED = "QUEUED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value})

# How the service starts a driver: the effective JobConfig travels as JSON in this variable.
JOB_CONFIG_ENV = "FORKRL_JOB_CONFIG"
ENTRYPOINT = f"python -m actors.train --config-env {JOB_CONFIG_ENV}"
# The driver's bearer token for tracking.report_url; never part of the stored or returned config.
REPORT_TOKEN_ENV = "FORKRL_REPORT_TOKEN"
# Environment of every driver and actor process (the service's Ray job and a local Ray alike).
JOB_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::FutureWarning"}

# One line of metrics.jsonl and one element of an ingest body: {"step": int >= 0, "<ns>/<name>": value, ...}
# (step 0: the held-out evaluation before training; steps 1.. the optimizer steps)
MetricRecord = dict[str, Any]


def metric_record(step: int, metrics: dict[str, Any]) -> MetricRecord:
    return {"step": step, **metrics}


def parse_metric_line(line: str) -> MetricRecord | None:
    """A metrics.jsonl line as a record, or None when it is not one (a torn or foreign line)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def finite(x: Any) -> Any:
    """JSON has no NaN/Infinity: null instead, recursively (keys become strings)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


class RunDir:
    """The layout of one run directory (`trainer.output_dir`).

    config.json            the validated JobConfig
    metrics.jsonl          one MetricRecord per step, appended
    summary.json           written at the end
    tensorboard/           event files
    checkpoints/step_00000010/   DeepSpeed shards + driver.json (the completion marker)
    hf/                    the Hugging Face export
    """

    MARKER = "driver.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def hf_export(self) -> Path:
        return self.path / "hf"

    @property
    def scratch(self) -> Path:
        return self.path / ".tmp"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @staticmethod
    def checkpoint_tag(step: int) -> str:
        return f"step_{step:08d}"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / self.checkpoint_tag(step)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories whose marker exists and reads back, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.is_dir() and self.checkpoint_step(p) is not None)

    @classmethod
    def checkpoint_step(cls, checkpoint: Path) -> int | None:
        """The step recorded in a checkpoint's marker; None when it is missing or unreadable."""
        try:
            return int(json.loads((checkpoint / cls.MARKER).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return None
