"""The config schema and the control plane import without the heavy runtime; the packages of
actors/ import one way (ARCHITECTURE.md's code map)."""

import ast
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "ray", "vllm", "deepspeed")
ACTORS = Path(__file__).resolve().parents[2] / "actors"

# package -> the actors packages it may import (itself always); nothing in actors/ imports service
MAY_IMPORT = {
    "common": set(),
    "algo": {"common"},
    "rollout": {"common", "algo"},  # the pure core: the engine's top-k entropy bound (algo.tree)
    "reward": {"common", "algo"},
    "learner": {"common", "algo"},
    "driver": {"common", "algo", "rollout", "reward", "learner"},
}


def test_config_and_service_import_without_torch_ray_vllm_deepspeed():
    code = (
        "import sys, actors.common.config, actors.common.config_load, actors.common.contract, service\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('service.app'): import service.app\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_the_check_can_fail():
    # the same probe sees torch when something does import it
    code = "import sys, actors.common.config, actors.algo.loss; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_the_algorithm_imports_no_ray():
    code = (
        "import sys, actors.algo.selection, actors.algo.loss, actors.algo.advantages, actors.algo.stats, "
        "actors.algo.metrics, actors.algo.batching, actors.algo.entropy_filter\n"
        "print(','.join(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the algorithm pulled in: {out.stdout.strip()}"


def imported_packages(path: Path) -> set[str]:
    """The actors packages (and 'service') that a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "service":
                found.add("service")
            elif parts[0] == "actors" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_packages_import_one_way():
    wrong = []
    for package, allowed in MAY_IMPORT.items():
        for path in sorted((ACTORS / package).rglob("*.py")):
            extra = imported_packages(path) - allowed - {package}
            if extra:
                wrong.append(f"{path.relative_to(ACTORS.parent)} imports {sorted(extra)}")
    assert not wrong, "\n".join(wrong)


def test_every_actors_package_has_a_rule():
    packages = {p.name for p in ACTORS.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(MAY_IMPORT), packages ^ set(MAY_IMPORT)


def test_the_direction_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from actors.driver.loop import train\n    import service.app\n")
    assert imported_packages(bad) == {"driver", "service"}
