"""Checkpoints: DeepSpeed engine state (model, optimizer, scheduler) per step tag, plus the
driver's state (step, data position). A checkpoint counts only once its marker (RunDir.MARKER) is
written, after every rank finished saving, so a run killed mid-save resumes from the previous one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from actors.contract import RunDir


def save_checkpoint(learners: Any, run: RunDir, step: int, sampler_state: dict[str, int], keep: int) -> Path:
    tag = run.checkpoint_tag(step)
    state = {"step": step, "sampler": sampler_state}
    learners.save_checkpoint(str(run.checkpoints), tag, state)
    (run.checkpoint(step) / RunDir.MARKER).write_text(json.dumps(state))
    for old in run.complete_checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return run.checkpoint(step)


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
