"""Checkpoints: DeepSpeed engine state (model, optimizer, scheduler) per step tag, plus the
driver's state (step, data position). A checkpoint counts only once `driver.json` is written,
after every rank finished saving, so a run killed mid-save resumes from the previous one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

MARKER = "driver.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(learners: Any, run_dir: Path, step: int, sampler_state: dict[str, int], keep: int) -> Path:
    root = checkpoint_root(run_dir)
    tag = f"step_{step:08d}"
    state = {"step": step, "sampler": sampler_state}
    learners.save_checkpoint(str(root), tag, state)
    (root / tag / MARKER).write_text(json.dumps(state))
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / tag


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def latest_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """resume = never | auto (newest complete checkpoint, if any) | a checkpoint directory."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser().resolve()
    if not (path / MARKER).is_file():
        raise ValueError(f"trainer.resume={resume!r} is not a complete forkrl checkpoint (no {MARKER} in it)")
    return path
