"""Fill, once, the caches a first run would otherwise fill while its user waits (`make setup` runs this).

    python -m actors.common.warm smollm2-135m-instruct

- DeepSpeed's shared-memory collective op for CPU learners is compiled on first use (cached under
  ~/.cache/torch_extensions): 22 s alone on this 2-core box, about 40 s beside a starting vLLM engine.
- vLLM inspects a model architecture in a subprocess that imports vLLM again the first time it meets
  it (cached under ~/.cache/vllm/modelinfos): 9 s alone, 17 s beside the learners' start.
Measured here (2026-12-07): the first run on a machine without these started its learners in 57 s and
its engine in 43 s; the next runs in 10-14 s and 13-19 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("forkrl.warm")


def use_one_ninja() -> None:
    """Put this interpreter's bin directory first on PATH when it holds a `ninja`. DeepSpeed's op is built
    by whichever ninja PATH finds first; with two on a machine (the venv's from PyPI, the system's: 1.13
    and 1.11 here) each takes the other's build for stale, and every process that finds the other one
    first builds the op again (24-26 s measured here; a driver run directly and one started by the
    control plane's Ray see different PATHs). The learners call this before DeepSpeed starts."""
    bindir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.isfile(os.path.join(bindir, "ninja")) and parts[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in parts if p != bindir)])


def warm(model: str) -> dict[str, float]:
    """Seconds each cache took to fill (about nothing when it was full already)."""
    import torch

    from actors.common.models import resolve_model_path

    took: dict[str, float] = {}
    if not torch.cuda.is_available():  # GPU learners use NCCL, not this op
        from deepspeed.comm.torch import build_shm_op

        use_one_ninja()  # the learners' ninja, so that they find the op built
        t = time.perf_counter()
        build_shm_op()
        took["deepspeed_shm_op"] = time.perf_counter() - t
    from vllm.config import ModelConfig

    t = time.perf_counter()
    ModelConfig(model=resolve_model_path(model))  # resolves the architecture through vLLM's registry
    took["vllm_model_info"] = time.perf_counter() - t
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.common.warm", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a built-in model name or a checkpoint directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    took = warm(args.model)
    log.info("caches warm: %s", ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
