"""`make setup` fills the caches a first run would otherwise fill while its user waits
(actors/common/warm.py). Real DeepSpeed and vLLM in a subprocess; vLLM's model-info cache is pointed at
a fresh directory so the test sees it filled (DeepSpeed's op is built in the usual place: a fresh
directory would mean a 40 s compile in every test run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_warm_fills_the_model_info_cache_and_builds_the_learners_op(tmp_path):
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}
    out = subprocess.run(
        [sys.executable, "-m", "actors.common.warm", "tiny-random-llama"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "caches warm: deepspeed_shm_op" in out.stderr and "vllm_model_info" in out.stderr, out.stderr[-3000:]
    assert [p.name for p in (tmp_path / "vllm" / "modelinfos").iterdir()] == [
        "vllm-model_executor-models-llama-LlamaForCausalLM.json"
    ]


def test_the_interpreters_ninja_comes_first_whatever_path_the_process_was_given(monkeypatch, tmp_path):
    from actors.common import warm

    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr(warm.sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", str(bindir), "/bin"]))
    warm.use_one_ninja()
    assert os.environ["PATH"] == "/usr/bin" + os.pathsep + str(bindir) + os.pathsep + "/bin"  # no ninja there
    (bindir / "ninja").write_text("")
    warm.use_one_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(bindir), "/usr/bin", "/bin"]  # moved, not repeated
    warm.use_one_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(bindir), "/usr/bin", "/bin"]
