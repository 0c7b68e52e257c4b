"""Summary of a `mutmut run` over the algorithm core (make mutation): counts, score, and every
surviving mutant with its diff and why it survives (bench/mutation_equivalents.yaml).

    python bench/mutation_summary.py > bench/results/mutation.txt

mutmut runs, for each mutant, only the tests it saw calling the mutated function in the pytest
process, and not the two-rank gloo tests (spawned processes deadlock under its fork server). Tests
that reach the code in a subprocess (the Triton interpreter check, the two real gloo ranks) are
invisible to it, so every survivor is run once more against those tests here, in a plain pytest; a
failure there counts as killed and is listed as such.

Exit status 1 when fewer than 90% of the mutants are killed or a survivor is not explained.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = str(Path(sys.executable).parent / "mutmut")
GOAL = 0.90


def _results() -> dict[str, str]:
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    status = {}
    for line in out.stdout.splitlines():
        name, sep, state = line.strip().partition(": ")
        if sep:
            status[name] = state
    return status


def _diff(name: str) -> str:
    out = subprocess.run([MUTMUT, "show", name], cwd=ROOT, capture_output=True, text=True, check=False)
    changed = [ln for ln in out.stdout.splitlines() if ln.startswith(("-", "+")) and not ln.startswith(("---", "+++"))]
    return "\n".join(changed)


def _killed_in_a_plain_pytest(name: str) -> bool:
    """The mutant against the subprocess-based unit tests (the mutants/ copy of the tree)."""
    env = dict(os.environ, MUTANT_UNDER_TEST=name)
    tests = ["tests/unit/test_split_invariance.py", "tests/unit/test_triton_kernel.py"]
    args = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "--timeout=300"]
    out = subprocess.run(args, cwd=ROOT / "mutants", env=env, capture_output=True, text=True, check=False)
    return out.returncode not in (0, 5)


def main() -> int:
    status = _results()
    survived = [n for n, s in status.items() if s == "survived"]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        second = dict(zip(survived, pool.map(_killed_in_a_plain_pytest, survived), strict=True))
    for name, killed in second.items():
        if killed:
            status[name] = "killed (second pass)"
    counts = Counter(status.values())
    caught = counts["killed"] + counts["timeout"] + counts["killed (second pass)"]
    tested = caught + counts["survived"]
    explained = yaml.safe_load((ROOT / "bench" / "mutation_equivalents.yaml").read_text()) or {}
    print("mutmut over actors/algo/*.py, actors/learner/logits.py against tests/unit/")
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    score = caught / tested if tested else 0.0
    print(f"killed (incl. timeouts): {caught} of {tested} tested = {score:.1%} (goal {GOAL:.0%})")
    late = sorted(n for n, s in status.items() if s == "killed (second pass)")
    print(f"killed only by the second pass (tests that run the code in spawned processes): {len(late)}")
    for name in late:
        print(f"  {name}")
    survivors = sorted(n for n, s in status.items() if s == "survived")
    unexplained = [n for n in survivors if n not in explained]
    print(f"survivors: {len(survivors)}, explained as equivalent: {len(survivors) - len(unexplained)}")
    for name in survivors:
        print(f"\n{name}\n{_diff(name)}\n  why: {explained.get(name, 'UNEXPLAINED')}")
    return 0 if score >= GOAL and not unexplained and not counts["not checked"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
