"""The run's summary, written to summary.json and printed: held-out accuracy before training and at the end
with its standard error, the train reward curve, what the filter kept (share, threshold, the tokens it kept
most), entropy first against last, phase timings, where the run's files and its dashboard page are."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from actors.common.contract import parse_metric_line

__all__ = ["dashboard_page", "print_summary", "read_evals", "sparkline", "startup_line", "summarize"]

BARS = "▁▂▃▄▅▆▇█"


def read_evals(metrics_path: Path, last_step: int | None = None) -> list[dict[str, float]]:
    """Every held-out evaluation the run's metrics file holds up to last_step, over all its attempts (a step
    logged twice: the last record counts), in step order: [{"step", "mean", "stderr", "prompts"}]."""
    found: dict[int, dict[str, float]] = {}
    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    for rec in filter(None, map(parse_metric_line, lines)):
        if isinstance(rec.get("eval/reward_mean"), int | float) and (last_step is None or rec["step"] <= last_step):
            found[int(rec["step"])] = {
                "step": int(rec["step"]),
                "mean": float(rec["eval/reward_mean"]),
                "stderr": float(rec.get("eval/reward_stderr", 0.0)),
                "prompts": float(rec.get("eval/prompts", 0.0)),
            }
    return [found[s] for s in sorted(found)]


def sparkline(values: list[float], width: int = 40) -> str:
    """values as one line of block characters (bucket means when longer than width), low to high."""
    if not values:
        return ""
    k = -(-len(values) // width)  # ceil: values per character
    pts = [sum(values[i : i + k]) / len(values[i : i + k]) for i in range(0, len(values), k)]
    lo, hi = min(pts), max(pts)
    span = hi - lo or 1.0
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / span * len(BARS)))] for v in pts)


def _top_kept(history: list[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    """The tokens the filter kept most over the run (per step: entropy/top_forking_tokens decoded), with
    how often they were kept and dropped."""
    kept: dict[str, list[int]] = {}
    for r in history:
        for t in r.get("forking_tokens") or []:
            k = kept.setdefault(t["text"], [0, 0])
            k[0] += int(t["kept"])
            k[1] += int(t.get("dropped", 0))
    top = sorted(kept.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"text": text, "kept": k, "dropped": d} for text, (k, d) in top]


def dashboard_page(report_url: str | None) -> str | None:
    """The job's dashboard page, from the ingestion URL the control plane gave the driver
    (<base>/v1/jobs/<id>/ingest -> <base>/#/jobs/<id>); None for a run not submitted through it."""
    m = re.fullmatch(r"(.*)/v1/jobs/([^/]+)/ingest", report_url or "")
    return f"{m[1]}/#/jobs/{m[2]}" if m else None


def summarize(
    history: list[dict[str, Any]], run_dir: Path, export: str | None, evals: list[dict[str, float]] | None = None,
    steps: int | None = None, dashboard: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    evals = evals or []
    k = max(1, min(5, len(history) // 4 or 1))
    first, last = history[:k], history[-k:]
    keys = ["entropy/mean", "entropy/p80", "entropy/threshold", "entropy/frac_below_0.01", "entropy/kept_mean"]
    return {
        "run_dir": str(run_dir),
        "dashboard": dashboard,
        "export": export,
        # the same run, twice as long: it resumes from its newest checkpoint (trainer.resume = auto)
        "extend_command": (
            f"python -m actors.train --config {run_dir / 'config.json'} --set trainer.steps={2 * steps}"
            if steps
            else None
        ),
        "steps_run": len(history),
        "window": k,
        "reward_first": mean("reward/mean", first),
        "reward_last": mean("reward/mean", last),
        "reward_curve": [r["reward/mean"] for r in history if "reward/mean" in r],
        "entropy_first": {key: first[0].get(key) for key in keys} if history else {},
        "entropy_last": {key: last[-1].get(key) for key in keys} if history else {},
        "kept_frac": mean("entropy/kept_frac", history),
        "threshold_last": next((r["entropy/threshold"] for r in reversed(history) if "entropy/threshold" in r), None),
        "top_kept_tokens": _top_kept(history),
        "evals": evals,
        "eval_first": evals[0]["mean"] if evals else None,
        "eval_last": evals[-1]["mean"] if evals else None,
        "seconds_per_step": mean("timing/step", history),
        "rounds_per_step": mean("batch/rounds", history),
        "sequences_per_step": mean("batch/sequences", history),
        "phase_seconds": {
            key[7:]: mean(key, history) for key in sorted({k for r in history for k in r if k.startswith("timing/")})
        },
    }


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _eval_line(evals: list[dict[str, float]]) -> str:
    a, b = evals[0], evals[-1]
    line = (
        f"held-out accuracy (greedy, {int(b['prompts'])} prompts): step {a['step']} {a['mean']:.3f} ± {a['stderr']:.3f}"
    )
    if len(evals) > 1:
        diff, err = b["mean"] - a["mean"], (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5
        sigmas = f", {diff / err:+.1f} standard errors" if err > 0 else ""
        line += f" -> step {b['step']} {b['mean']:.3f} ± {b['stderr']:.3f} ({diff:+.3f}{sigmas})"
    return line + "\n"


def startup_line(t: dict[str, float]) -> str:
    """Where the time before the first step went (seconds from the driver process's start)."""
    parts = [f"python and imports {t['process']:.1f} s", f"Ray {t['ray']:.1f} s"]
    if "pools" in t:
        parts.append(
            f"pools {t['pools']:.1f} s (rollout engines {t['engines']:.1f} s, learners {t['learners']:.1f} s, side by "
            "side unless they share GPUs)"
        )
    if "eval" in t:
        parts.append(f"step-0 evaluation {t['eval']:.1f} s")
    return f"start-up: first step after {t['total']:.1f} s: " + ", ".join(parts)


def print_summary(s: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    out.write("\n== forkrl run summary ==\n")
    if s.get("evals"):
        out.write(_eval_line(s["evals"]))
    w = s["window"]
    out.write(f"train reward: first {w} step(s) {_fmt(s['reward_first'])} -> last {w} {_fmt(s['reward_last'])}")
    out.write(f"   {sparkline(s.get('reward_curve') or [])}\n")
    if s.get("kept_frac") is not None:
        out.write(
            f"filter: kept {s['kept_frac']:.1%} of the response tokens, last threshold {_fmt(s['threshold_last'])}\n"
        )
    if s.get("top_kept_tokens"):
        out.write(
            "kept most (forking tokens): "
            + "  ".join(f"{t['text']!r}×{t['kept']}" for t in s["top_kept_tokens"])
            + "\n"
        )
    out.write(
        f"steps run: {s['steps_run']}   seconds/step: {_fmt(s['seconds_per_step'])}   generation rounds/step: "
        f"{_fmt(s['rounds_per_step'])}   sequences trained/step: {_fmt(s['sequences_per_step'])}\n"
    )
    for label, ent in (("first step", s["entropy_first"]), ("last step", s["entropy_last"])):
        out.write(f"entropy, {label}: " + "  ".join(f"{k[8:]}={_fmt(v)}" for k, v in ent.items()) + "\n")
    out.write("phase seconds: " + "  ".join(f"{k}={_fmt(v)}" for k, v in s["phase_seconds"].items()) + "\n")
    if s.get("startup_s"):
        out.write(startup_line(s["startup_s"]) + "\n")
    out.write(f"run directory: {s['run_dir']}  (metrics.jsonl, tensorboard/, checkpoints/, summary.json)\n")
    if s.get("dashboard"):
        out.write(f"dashboard page: {s['dashboard']}\n")
    else:
        out.write("dashboard page: none (a job submitted with `forkrl submit` to `make serve` has one, live)\n")
    if s.get("extend_command"):
        out.write(f"go on from the newest checkpoint: {s['extend_command']}\n")
    if s["export"]:
        out.write(f"Hugging Face export: {s['export']}\n")
