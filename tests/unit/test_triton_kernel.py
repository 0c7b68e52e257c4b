"""The CUDA kernel's code, run on CPU through Triton's interpreter (no GPU here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton  # noqa: F401 - a required dependency (the cpu/gpu extras): missing, this test must fail

ROOT = Path(__file__).resolve().parents[2]


def _interpreter_loops_over_int_args() -> bool:
    """Triton <= 3.6's interpreter turns a loop bound into int() of a 1-element array, which NumPy
    >= 2.5 refuses ('only 0-dimensional arrays can be converted'); later Triton squeezes it first."""
    import inspect

    import numpy as np
    from triton.runtime import interpreter

    squeezes = "handle.data.squeeze()" in inspect.getsource(interpreter)
    return squeezes or tuple(int(x) for x in np.__version__.split(".")[:2]) < (2, 5)


@pytest.mark.skipif(
    not _interpreter_loops_over_int_args(),
    reason="this Triton's interpreter cannot run loops over int arguments with this NumPy (>= 2.5)",
)
def test_triton_kernel_matches_float64_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", FORKRL_TRITON_ON_CPU="1")
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.triton_checks"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton interpreter checks passed" in out.stdout
    assert "invalid value" not in out.stderr  # no NaN/inf arithmetic even on masked lanes
