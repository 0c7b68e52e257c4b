"""ARCHITECTURE.md stays true: every path it names exists, and it names every package of actors/
and every module of service/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "ARCHITECTURE.md").read_text()
# `actors/common/`, `service/store.py`, `actors/learner/kernels/`: backticked paths under a top-level folder
NAMED = set(re.findall(r"`((?:actors|service|examples|scripts|deploy|helm|bench|tests)/[\w./]*)`", TEXT))


def test_the_map_names_paths():
    assert len(NAMED) > 30, sorted(NAMED)


def test_every_path_named_exists():
    missing = sorted(p for p in NAMED if not (ROOT / p).exists())
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_package_and_service_module_is_named():
    packages = [f"actors/{p.name}/" for p in (ROOT / "actors").iterdir() if (p / "__init__.py").exists()]
    modules = [
        f"service/{p.name}" for p in (ROOT / "service").glob("*.py") if p.name not in ("__init__.py", "__main__.py")
    ]
    unnamed = sorted(p for p in packages + modules if p not in NAMED)
    assert not unnamed, f"ARCHITECTURE.md does not name: {unnamed}"
