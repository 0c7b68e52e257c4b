"""Load an anchor script of ../shared/bench (the peers' methods, timed the same way) by path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_anchor(env: str, name: str) -> ModuleType:
    """The module at $env, else ../shared/bench/<name> beside the checkout."""
    path = Path(os.environ.get(env, ROOT.parent / "shared" / "bench" / name))
    if not path.is_file():
        raise SystemExit(f"{name} not found at {path}; set {env}=/path/to/{name}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
