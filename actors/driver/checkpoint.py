"""Checkpoints: DeepSpeed engine state (model, optimizer, scheduler) per step tag, plus the
driver's state (step, data position). A checkpoint counts only once its marker (RunDir.MARKER) is
written, after every rank finished saving, so a run killed mid-save resumes from the previous one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from actors.common.contract import RunDir

LOW_DISK_BYTES = 64 << 20  # a failed save with less free than this is reported as a full disk


class CheckpointError(OSError):
    """A checkpoint that could not be written (the run fails; its previous checkpoint is untouched)."""


def save_checkpoint(
    learners: Any, run: RunDir, step: int, sampler_state: dict[str, Any], keep: int, commit: bool = True
) -> Path:
    """Save the learners' state for `step`; with commit (default) also write its marker, which makes it
    count. The driver commits after it has logged the step's metrics: a checkpoint that counts never
    resumes past a step whose metrics were lost with a killed driver."""
    tag = run.checkpoint_tag(step)
    state = {"step": step, "sampler": sampler_state}
    try:
        learners.save_checkpoint(str(run.checkpoints), tag, state)
    except Exception as e:  # torch reports a full disk as "iostream error" / "unexpected pos": say what it is
        free = shutil.disk_usage(run.checkpoints).free
        cause = "the disk is full" if free < LOW_DISK_BYTES else "the save failed"
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise CheckpointError(
            f"checkpoint of step {step} not saved to {run.checkpoint(step)}: {cause} ({free / 2**20:.1f} MiB free "
            f"there); the previous checkpoint stays the newest. Cause: {last}"
        ) from e
    if commit:
        commit_checkpoint(run, step, sampler_state, keep)
    return run.checkpoint(step)


def commit_checkpoint(run: RunDir, step: int, sampler_state: dict[str, Any], keep: int) -> None:
    """Write the marker of a saved checkpoint (whole or not at all: written aside, flushed, then renamed
    into place) and prune the oldest complete ones past `keep`."""
    state = {"step": step, "sampler": sampler_state}
    marker = run.checkpoint(step) / RunDir.MARKER
    part = marker.with_suffix(".part")
    with part.open("w") as f:
        f.write(json.dumps(state))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, marker)
    for old in run.complete_checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run: RunDir, resume: str) -> Path | None:
    """resume = never | auto (newest complete checkpoint, if any) | a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = run.complete_checkpoints()
        return found[-1] if found else None
    path = Path(resume).expanduser().resolve()
    if not (path / RunDir.MARKER).is_file():
        raise ValueError(f"trainer.resume={resume!r} is not a complete forkrl checkpoint (no {RunDir.MARKER} in it)")
    return path
