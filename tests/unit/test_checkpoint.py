"""Checkpoint bookkeeping on disk: the marker makes a checkpoint count, the newest
`trainer.keep_checkpoints` are kept, and `trainer.resume` picks auto / never / an explicit path."""

import json

import pytest

from actors.common.contract import RunDir
from actors.driver.checkpoint import latest_checkpoint, save_checkpoint


class _Shards:
    """Writes a file where the learners' DeepSpeed shards would go (the learners run in tests/ray)."""

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        from pathlib import Path

        (Path(directory) / tag).mkdir(parents=True)
        (Path(directory) / tag / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    for step in (2, 4, 6):
        save_checkpoint(_Shards(), run, step, {"epoch": 0, "pos": step}, keep=2)
    assert [p.name for p in run.complete_checkpoints()] == ["step_00000004", "step_00000006"]
    assert json.loads((run.checkpoint(6) / RunDir.MARKER).read_text()) == {"step": 6, "sampler": {"epoch": 0, "pos": 6}}
    # a save killed before its marker does not count and is not resumed from
    (run.checkpoints / "step_00000008").mkdir()
    assert latest_checkpoint(run, "auto") == run.checkpoint(6)
    assert RunDir.checkpoint_step(run.checkpoint(6)) == 6 and RunDir.checkpoint_step(run.checkpoints / "x") is None
    # nor a torn marker (a disk that filled up while it was written), nor the half-written one beside it
    (run.checkpoints / "step_00000010").mkdir()
    (run.checkpoints / "step_00000010" / RunDir.MARKER).write_text('{"step": 1')
    (run.checkpoints / "step_00000012").mkdir()
    (run.checkpoints / "step_00000012" / "driver.part").write_text('{"step": 12}')
    assert latest_checkpoint(run, "auto") == run.checkpoint(6)
    assert not list(run.checkpoints.glob("step_0000000[46]/*.part"))  # a completed save leaves no part file


def test_resume_auto_never_and_an_explicit_path(tmp_path):
    run = RunDir(tmp_path / "run")
    assert latest_checkpoint(run, "auto") is None  # nothing yet: start fresh
    save_checkpoint(_Shards(), run, 2, {"epoch": 0, "pos": 2}, keep=3)
    save_checkpoint(_Shards(), run, 4, {"epoch": 0, "pos": 4}, keep=3)
    assert latest_checkpoint(run, "never") is None
    assert latest_checkpoint(run, "auto") == run.checkpoint(4)
    assert latest_checkpoint(run, str(run.checkpoint(2))) == run.checkpoint(2)  # an older one, by path
    with pytest.raises(ValueError, match="trainer.resume=.*is not a complete forkrl checkpoint"):
        latest_checkpoint(run, str(tmp_path / "elsewhere"))
