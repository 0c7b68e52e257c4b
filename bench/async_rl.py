"""Asynchronous mode against synchronous steps: trained sequences per second on the demo's job, side by side.

Every arm is `python -m actors.train` on examples/study_base.yaml (the demo's job until 2026-12-07), with
only the mode and the cores changed, one after another on this machine (never two at once):
  sync-shared   max_staleness 0, every phase on every core (the synchronous setup before async mode)
  sync-split    max_staleness 0, the engine on core 0, the learner on core 1
  async1-split  max_staleness 1, the same split
  async2-split  max_staleness 2, the same split (the engines load new weights while the learner goes on)
  async2-wait-split  max_staleness 2, the learner waits for the engines' loads (rollout.weight_load=wait)
  async1-inflight-split  max_staleness 1, weights reach the engine mid-generation
  async2-inflight-split  max_staleness 2, the same
Throughput = trained sequences / step seconds over the steps after --warmup (first steps compile and
fill the pipeline). Where the rest goes: the learner's idle share (it waited for groups), the engine's
idle share, and the learn / generate / weight-sync seconds per step.

    python bench/async_rl.py                  # every arm not yet in the results file (resumable)
    python bench/async_rl.py --again --steps 6 --only async1-split
Results: bench/results/async_rl.json (per arm), async_rl.png, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ["rollout.cpu_cores=0", "learner.cpu_cores=1"]
ARMS: dict[str, list[str]] = {
    "sync-shared": ["trainer.max_staleness=0"],
    "sync-split": ["trainer.max_staleness=0", *SPLIT],
    "async1-split": ["trainer.max_staleness=1", *SPLIT],
    "async2-split": ["trainer.max_staleness=2", *SPLIT],
    "async2-wait-split": ["trainer.max_staleness=2", "rollout.weight_load=wait", *SPLIT],
    "async1-inflight-split": ["trainer.max_staleness=1", "rollout.inflight_weight_updates=true", *SPLIT],
    "async2-inflight-split": ["trainer.max_staleness=2", "rollout.inflight_weight_updates=true", *SPLIT],
}
COMMON = ["trainer.eval_every=0", "trainer.save_every=0", "trainer.export_hf=false", "tracking.tensorboard=false"]


def train_rows(name: str, config: str, sets: list[str]) -> tuple[list[dict[str, Any]], float]:
    """Run `python -m actors.train` on config with the overrides in a fresh output folder: its metric
    records and the wall seconds it took."""
    with tempfile.TemporaryDirectory(prefix=f"forkrl-bench-{name}-") as out:
        cmd = [sys.executable, "-m", "actors.train", "--config", config]
        for s in [*sets, f"trainer.output_dir={out}", "trainer.resume=never"]:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return rows, time.perf_counter() - t0


def run_arm(name: str, steps: int, warmup: int, config: str) -> dict[str, Any]:
    rows, wall_s = train_rows(name, config, [*ARMS[name], *COMMON, f"trainer.steps={steps}"])
    timed = rows[warmup:]
    total = sum(r["timing/step"] for r in timed)
    per_step = {k: sum(r.get(k, 0.0) for r in timed) / len(timed) for k in (
        "timing/step", "timing/generate", "timing/learn", "timing/weight_sync", "timing/engine_idle",
        "timing/learner_idle", "batch/sequences", "async/staleness_mean", "async/dropped_stale",
    )}  # fmt: skip
    return {
        "settings": ARMS[name],
        "steps": steps,
        "warmup": warmup,
        "measured_steps": len(timed),
        "sequences_per_s": sum(r["batch/sequences"] for r in timed) / total,
        "learner_idle_share": per_step["timing/learner_idle"] / per_step["timing/step"],
        "per_step": per_step,
        "reward_first_last": [rows[0]["reward/mean"], rows[-1]["reward/mean"]],
        "wall_s": wall_s,
    }


def table(results: dict[str, Any]) -> str:
    base = results.get("sync-split", {}).get("sequences_per_s")
    best = results.get("sync-shared", {}).get("sequences_per_s")
    lines = [
        "| arm | seq/s | vs sync-split | vs sync-shared | s/step | learn | generate wait | weight sync | "
        "learner idle | engine idle | staleness |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ARMS:
        r = results.get(name)
        if r is None:
            continue
        p, v = r["per_step"], r["sequences_per_s"]
        vs_base, vs_best = v / base if base else float("nan"), v / best if best else float("nan")
        lines.append(
            f"| {name} | {v:.2f} | {vs_base:.2f}x | {vs_best:.2f}x "
            f"| {p['timing/step']:.1f} | {p['timing/learn']:.1f} | {p['timing/generate']:.1f} | "
            f"{p['timing/weight_sync']:.2f} | {r['learner_idle_share']:.0%} | {p['timing/engine_idle']:.1f} s | "
            f"{p['async/staleness_mean']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Seconds per step of each arm, split into the learner's phases, with the throughput on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ARMS if n in results]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.4))
    left = [0.0] * len(names)
    for key, label in [("timing/generate", "generate (sync) or wait for groups (async)"), ("timing/learn", "learn"),
                       ("timing/weight_sync", "weight sync")]:  # fmt: skip
        vals = [results[n]["per_step"][key] for n in names]
        ax.barh(names, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for i, n in enumerate(names):
        ax.text(left[i], i, f"  {results[n]['sequences_per_s']:.2f} seq/s", va="center", fontsize=8)
    ax.set_xlabel("seconds per step (the learner's view; mean over the measured steps)")
    ax.invert_yaxis()
    fig.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    ax.set_xlim(0, max(left) * 1.35)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", action="append", choices=list(ARMS), help="run just these arms (repeatable)")
    ap.add_argument("--again", action="store_true", help="run arms already in the results file again")
    ap.add_argument("--config", default=str(ROOT / "examples" / "study_base.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "async_rl.json"))
    args = ap.parse_args()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    results = doc.setdefault("arms", {})
    doc["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    for name in args.only or list(ARMS):
        if name in results and not args.again:
            print(f"{name}: in {out} already (--again to rerun)", flush=True)
            continue
        print(f"{name}: {args.steps} steps ...", flush=True)
        results[name] = run_arm(name, args.steps, args.warmup, args.config)
        out.write_text(json.dumps(doc, indent=1))  # each arm is kept as soon as it ends: resumable
        print(f"{name}: {results[name]['sequences_per_s']:.2f} sequences/s", flush=True)
    print(table(results))
    if results:
        plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
