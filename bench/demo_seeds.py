"""`make demo` with three seeds, as a newcomer runs it: wall time, time to the first step, and the held-out
accuracy before (step 0) and after, per seed.

    python bench/demo_seeds.py                       # each seed not yet in the results (resumable)
    python bench/demo_seeds.py --seeds 0 1 2 --again
    python bench/demo_seeds.py --from-logs LOG...    # record runs made with `make demo ... > LOG`

Each seed is `bash scripts/demo.sh` with `--set trainer.seed=S` (the control plane, its Ray head, the job
through `forkrl submit --follow`), one after another. Its output is kept beside the results; its run
directory's metrics.jsonl and summary.json are copied there. Results: bench/results/demo/results.json,
table.md, and seed<S>.log / seed<S>-metrics.jsonl / seed<S>-summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "demo"


def run_seed(seed: int) -> Path:
    """One `make demo` of the given seed; its output in OUT/seed<S>.log with the wall time appended."""
    log = OUT / f"seed{seed}.log"
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.call(
            ["bash", "scripts/demo.sh"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "ARGS": f"--set trainer.seed={seed}"},
        )  # fmt: skip
        f.write(f"rc={rc} wall={time.time() - t0:.1f}\n")
    return log


def record(log: Path, seed: int | None = None) -> dict[str, Any]:
    """What one demo's output and its run directory say."""
    text = log.read_text(errors="replace")
    job = re.search(r"^submitted (\S+)", text, re.M)
    wall = re.search(r"^rc=(-?\d+) wall=([\d.]+)", text, re.M)
    first = re.search(r"^demo: first step ([\d.]+) s after make demo started", text, re.M)
    if job is None or wall is None:
        raise SystemExit(f"{log}: no 'submitted <job>' or 'rc= wall=' line: not the output of a finished make demo")
    run = Path(os.environ.get("FORKRL_RUNS_DIR", ROOT / "runs")) / job.group(1)  # where scripts/demo.sh put it
    summary = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    seed = cfg["trainer"]["seed"] if seed is None else seed
    dest = OUT / f"seed{seed}.log"
    if log.resolve() != dest.resolve():
        shutil.copy(log, dest)
    shutil.copy(run / "metrics.jsonl", OUT / f"seed{seed}-metrics.jsonl")
    shutil.copy(run / "summary.json", OUT / f"seed{seed}-summary.json")
    evals = summary["evals"]
    first_eval, last_eval = evals[0], evals[-1]
    diff = last_eval["mean"] - first_eval["mean"]
    err = (first_eval["stderr"] ** 2 + last_eval["stderr"] ** 2) ** 0.5
    return {
        "seed": seed,
        "job": job.group(1),
        "rc": int(wall.group(1)),
        "wall_s": float(wall.group(2)),
        "first_step_after_s": float(first.group(1)) if first else None,
        "startup_s": summary.get("startup_s"),
        "evals": evals,
        "rise": diff,
        "rise_in_standard_errors": diff / err if err else None,
        "reward_first": summary["reward_first"],
        "reward_last": summary["reward_last"],
        "seconds_per_step": summary["seconds_per_step"],
        "kept_frac": summary["kept_frac"],
        "top_kept_tokens": [t["text"] for t in summary["top_kept_tokens"]],
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| seed | held-out accuracy, step 0 | step 8 | step 16 | rise | wall time | first step after | s / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ev = {e["step"]: e for e in r["evals"]}
        cell = [f"{ev[s]['mean']:.3f} ± {ev[s]['stderr']:.3f}" if s in ev else "-" for s in (0, 8, 16)]
        first = f"{r['first_step_after_s']:.1f} s" if r["first_step_after_s"] is not None else "-"
        out.append(
            f"| {r['seed']} | {' | '.join(cell)} | {r['rise']:+.3f} ({r['rise_in_standard_errors']:+.1f} SE) | "
            f"{r['wall_s'] / 60:.1f} min | {first} | {r['seconds_per_step']:.1f} |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--again", action="store_true", help="rerun seeds already in the results")
    ap.add_argument("--from-logs", type=Path, nargs="+", help="record these make demo outputs instead of running")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"machine": {}, "seeds": {}}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}
    if args.from_logs:
        done = [record(log) for log in args.from_logs]
    else:
        todo = [s for s in args.seeds if args.again or str(s) not in results["seeds"]]
        done = []
        for seed in todo:
            print(f"demo_seeds: seed {seed} (make demo, about 8-10 minutes)", flush=True)
            done.append(record(run_seed(seed), seed))
            results["seeds"][str(seed)] = done[-1]
            path.write_text(json.dumps(results, indent=1))  # each seed kept as it finishes
    for r in done:
        results["seeds"][str(r["seed"])] = r
    path.write_text(json.dumps(results, indent=1))
    rows = [results["seeds"][k] for k in sorted(results["seeds"], key=int)]
    (OUT / "table.md").write_text(table(rows))
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
