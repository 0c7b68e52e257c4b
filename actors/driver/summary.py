"""The run's summary: reward and entropy first against last, phase timings; written to summary.json and printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["print_summary", "summarize"]


def summarize(history: list[dict[str, Any]], run_dir: Path, export: str | None) -> dict[str, Any]:
    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    k = max(1, min(5, len(history) // 4 or 1))
    first, last = history[:k], history[-k:]
    keys = ["entropy/mean", "entropy/p80", "entropy/threshold", "entropy/frac_below_0.01", "entropy/kept_mean"]
    return {
        "run_dir": str(run_dir),
        "export": export,
        "steps_run": len(history),
        "window": k,
        "reward_first": mean("reward/mean", first),
        "reward_last": mean("reward/mean", last),
        "entropy_first": {key: first[0].get(key) for key in keys} if history else {},
        "entropy_last": {key: last[-1].get(key) for key in keys} if history else {},
        "eval_first": next((r["eval/reward_mean"] for r in history if "eval/reward_mean" in r), None),
        "eval_last": next((r["eval/reward_mean"] for r in reversed(history) if "eval/reward_mean" in r), None),
        "seconds_per_step": mean("timing/step", history),
        "rounds_per_step": mean("batch/rounds", history),
        "sequences_per_step": mean("batch/sequences", history),
        "phase_seconds": {
            key[7:]: mean(key, history) for key in sorted({k for r in history for k in r if k.startswith("timing/")})
        },
    }


def print_summary(s: dict[str, Any]) -> None:
    out = sys.stdout

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    out.write("\n== forkrl run summary ==\n")
    out.write(f"steps run: {s['steps_run']}   seconds/step: {fmt(s['seconds_per_step'])}\n")
    out.write(
        f"generation rounds/step: {fmt(s['rounds_per_step'])}   sequences trained/step: "
        f"{fmt(s['sequences_per_step'])}\n"
    )
    w = s["window"]
    out.write(f"mean reward: first {w} step(s) {fmt(s['reward_first'])} -> last {w} {fmt(s['reward_last'])}\n")
    if s["eval_first"] is not None:
        out.write(f"greedy eval reward: first {fmt(s['eval_first'])} -> last {fmt(s['eval_last'])}\n")
    for label, ent in (("first step", s["entropy_first"]), ("last step", s["entropy_last"])):
        out.write(f"entropy, {label}: " + "  ".join(f"{k[8:]}={fmt(v)}" for k, v in ent.items()) + "\n")
    out.write("phase seconds: " + "  ".join(f"{k}={fmt(v)}" for k, v in s["phase_seconds"].items()) + "\n")
    out.write(f"run directory: {s['run_dir']}  (metrics.jsonl, tensorboard/, checkpoints/, summary.json)\n")
    if s["export"]:
        out.write(f"Hugging Face export: {s['export']}\n")
