"""A study's report, from the finished runs under <out>/runs: `results.json` (mean and sample sd over the
seeds of the first, final and best held-out accuracy, seconds per step, and the entropy pattern of the
first and last steps), `table.md`, and the plots `curves.png` (mean over seeds, band = min..max; against spec.x, and
`curves_by_step.png` when that is not the step)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from service.study_spec import StudySpec, arm_seeds, run_key

__all__ = ["summarize"]


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(spec: StudySpec, out: Path) -> dict[str, Any]:
    """results.json, table.md and the plots from the finished runs under <out>/runs."""
    arms: dict[str, Any] = {}
    for arm in spec.arms:
        runs = {}
        for seed in arm_seeds(spec, arm):
            f = out / "runs" / f"{run_key(arm, seed)}.jsonl"
            if f.exists():
                runs[seed] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not runs:
            continue
        evals = {
            s: [(r["step"], r["eval/reward_mean"]) for r in rows if "eval/reward_mean" in r] for s, rows in runs.items()
        }
        final = [e[-1][1] for e in evals.values() if e]
        best = [max(v for _, v in e) for e in evals.values() if e]
        first = [e[0][1] for e in evals.values() if e]
        step_s = [
            statistics.median(t)
            for rows in runs.values()
            if (t := [r["timing/step"] for r in rows if "timing/step" in r])
        ]
        arms[arm.name] = {
            "label": arm.label or arm.name,
            "seeds": sorted(runs),
            "steps": max(max((r["step"] for r in rows), default=0) for rows in runs.values()),
            "eval_first": _mean_sd(first) if first else None,
            "eval_final": _mean_sd(final) if final else None,
            "eval_best": _mean_sd(best) if best else None,
            "eval_final_by_seed": {s: e[-1][1] for s, e in sorted(evals.items()) if e},
            "eval_best_by_seed": {s: max(v for _, v in e) for s, e in sorted(evals.items()) if e},
            "step_s": _mean_sd(step_s) if step_s else None,
            "entropy": _entropy_pattern(runs),
            "last_steps": _last_steps(spec, runs),
            "generation": _generation(spec, runs),
        }
    results = {"study": spec.name, "seeds": spec.seeds, "arms": arms, "reference": spec.reference}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(_table(spec, arms))
    _plots(spec, out)
    return results


def _last_steps(spec: StudySpec, runs: dict[int, list[dict[str, Any]]], window: int = 5) -> dict[str, Any]:
    """Each panel's metric over each run's last `window` steps that have it: mean ± sd over the seeds."""
    out: dict[str, Any] = {}
    for key, _ in spec.panels:
        per_run = [[r[key] for r in rows if key in r][-window:] for rows in runs.values()]
        means = [statistics.fmean(v) for v in per_run if v]
        out[key] = _mean_sd(means) if means else None
    return out


def _generation(spec: StudySpec, runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Over each whole run (the optimizer steps): the tokens generated, the groups generated and the share
    with signal, the generated tokens per group with signal found (those beyond a step's need count too)
    and per group trained on, and the mean of each spec.keep number; mean ± sd over the seeds. None for
    runs that did not log them."""
    keys = ("rollout/generated_tokens", "batch/groups_generated", "batch/signal_share")
    rows = [[r for r in rs if r["step"] > 0 and all(k in r for k in keys)] for rs in runs.values()]
    rows = [rs for rs in rows if rs]
    if not rows:
        return None
    tokens = [sum(r[keys[0]] for r in rs) for rs in rows]
    groups = [sum(r[keys[1]] for r in rs) for rs in rows]
    signal = [sum(r[keys[1]] * r[keys[2]] for r in rs) for rs in rows]
    per_signal = [t / s for t, s in zip(tokens, signal, strict=True) if s]
    trained = [sum(r.get("batch/groups_kept", 0.0) for r in rs) for rs in rows]  # (older runs did not keep it)
    per_trained = [t / k for t, k in zip(tokens, trained, strict=True) if k]
    out: dict[str, Any] = {
        "generated_tokens": _mean_sd(tokens),
        "signal_share": _mean_sd([s / g for s, g in zip(signal, groups, strict=True) if g]),
        "tokens_per_signal_group": _mean_sd(per_signal) if per_signal else None,
        "tokens_per_trained_group": _mean_sd(per_trained) if per_trained else None,
    }
    for key in spec.keep:
        means = [statistics.fmean(v) for rs in rows if (v := [r[key] for r in rs if key in r])]
        out[key] = _mean_sd(means) if means else None
    return out


def _entropy_pattern(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """First and last step of every seed: share below 0.01 and p80 (mean over seeds), and the 20 tokens
    kept most often, their kept counts summed over the seeds (ties: first seen first)."""
    pat: dict[str, Any] = {}
    trained = [[r for r in rs if r["step"] > 0] for rs in runs.values()]  # (step 0: the evaluation before training)
    for which, pick in (("first", 0), ("last", -1)):
        rows = [rs[pick] for rs in trained if rs]
        below = [r["entropy/frac_below_0.01"] for r in rows if "entropy/frac_below_0.01" in r]
        p80 = [r["entropy/p80"] for r in rows if "entropy/p80" in r]
        kept: dict[int, list[Any]] = {}  # token id -> [text, kept count over seeds]
        for r in rows:
            for t in r.get("forking_tokens") or []:
                kept.setdefault(t["id"], [t["text"], 0])[1] += t["kept"]
        top = sorted(kept.values(), key=lambda tc: -tc[1])[:20]  # stable: ties keep their first-seen order
        pat[which] = {
            "frac_below_0.01": statistics.fmean(below) if below else None,
            "p80": statistics.fmean(p80) if p80 else None,
            "forking_tokens": [text for text, _ in top],
        }
    return pat


def _fmt(ms: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if ms is None else f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _by_seed(values: dict[Any, float]) -> str:
    return " / ".join(f"{v:.3f}" for _, v in sorted(values.items(), key=lambda kv: int(kv[0])))


def _table(spec: StudySpec, arms: dict[str, Any]) -> str:
    lines = [
        f"Study `{spec.name}`: held-out greedy accuracy (mean ± sd over seeds), wall time per step.\n",
        "| arm | seeds | steps | first eval* | final eval | final, by seed | best eval | best, by seed | s / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a in arms.values():
        lines.append(
            f"| {a['label']} | {len(a['seeds'])} | {a['steps']} | {_fmt(a['eval_first'])} | {_fmt(a['eval_final'])} "
            f"| {_by_seed(a['eval_final_by_seed'])} | {_fmt(a['eval_best'])} | {_by_seed(a['eval_best_by_seed'])} "
            f"| {_fmt(a['step_s'], 1)} |"
        )
    lines += [
        "",
        "\\* at step 0, before any update (in runs from before step-0 evaluations: at step trainer.eval_every).",
        "",
    ]
    keys = [k for k, _ in spec.panels if k != "eval/reward_mean"]
    lines += [
        "Over each run's last 5 steps (mean ± sd over seeds):\n",
        "| arm | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "| --- |" + " --- |" * len(keys),
    ]
    for a in arms.values():
        lines.append(f"| {a['label']} | " + " | ".join(_fmt(a["last_steps"].get(k)) for k in keys) + " |")
    lines.append("")
    lines += _generation_table(spec, arms)
    lines += [
        "| arm | step | share of tokens with H < 0.01 (mean over seeds) | p80 of H "
        "| 20 tokens kept most often, over the seeds (the forking tokens under highest) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a in arms.values():
        for which in ("first", "last"):
            e = a["entropy"][which]
            share = "-" if e["frac_below_0.01"] is None else f"{e['frac_below_0.01']:.3f}"
            p80 = "-" if e["p80"] is None else f"{e['p80']:.3f}"
            toks = " ".join(f"`{t!r}`".replace("|", "\\|") for t in e["forking_tokens"])
            lines.append(f"| {a['label']} | {which} | {share} | {p80} | {toks} |")
    ref = spec.reference
    if ref:
        lines.append(
            f"| {ref.get('label', 'paper')} | - | {ref.get('frac_below_0.01', '-')} | {ref.get('p80', '-')} | - |"
        )
    return "\n".join(lines) + "\n"


def _generation_table(spec: StudySpec, arms: dict[str, Any]) -> list[str]:
    gen = [(a["label"], a["generation"]) for a in arms.values() if a.get("generation")]
    if not gen:
        return []
    cols = [
        "generated tokens",
        "share of groups with signal",
        "generated tokens per group with signal",
        "generated tokens per group trained on",
    ]
    lines = [
        "Generation over each whole run (mean ± sd over seeds; a group with signal is one whose completions do not"
        " all score the same; those a step found beyond its need, and in asynchronous mode those dropped as stale,"
        " count as found but not as trained on):\n",
        "| arm | " + " | ".join([*cols, *(f"`{k}`, mean" for k in spec.keep)]) + " |",
        "| --- |" + " --- |" * (len(cols) + len(spec.keep)),
    ]
    for label, g in gen:
        cells = [
            _fmt(g["generated_tokens"], 0),
            _fmt(g["signal_share"]),
            _fmt(g["tokens_per_signal_group"], 1),
            _fmt(g.get("tokens_per_trained_group"), 1),
        ]
        lines.append(f"| {label} | " + " | ".join([*cells, *(_fmt(g.get(k)) for k in spec.keep)]) + " |")
    return [*lines, ""]


# what the x axis counts up to each step, when it is not the step itself
X_KEYS = {
    "sequences": ("batch/sequences", "trained sequences"),
    "tokens": ("entropy/kept_tokens", "trained tokens"),
    "generated": ("rollout/generated_tokens", "generated tokens"),
    "seconds": ("timing/step", "wall seconds of the steps"),
}


def _trained_sequences(runs: list[list[dict[str, Any]]], key: str = "batch/sequences") -> dict[int, float]:
    """Step -> the sequences (or another per-step count `key`, e.g. the kept tokens that carried the
    gradient) trained up to and including it, mean over the runs that reached it."""
    per: dict[int, list[float]] = {}
    for rows in runs:
        total = 0.0
        for r in sorted(rows, key=lambda r: r["step"]):
            total += float(r.get(key, 0.0))
            per.setdefault(r["step"], []).append(total)
    return {step: statistics.fmean(v) for step, v in per.items()}


def _plots(spec: StudySpec, out: Path) -> None:
    """curves.png against spec.x; curves_by_step.png (when that is not the step) and curves_by_<x>.png for
    each of spec.also_x."""
    _plot(spec, out / "curves.png", spec.x)
    for x in dict.fromkeys(["step", *spec.also_x]):
        if x != spec.x:
            _plot(spec, out / f"curves_by_{x}.png", x)


def _plot(spec: StudySpec, path: Path, x: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = spec.panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for arm in spec.arms:
        runs = [
            [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            for seed in arm_seeds(spec, arm)
            if (f := path.parent / "runs" / f"{run_key(arm, seed)}.jsonl").exists()
        ]
        if not runs:
            continue
        trained = _trained_sequences(runs, X_KEYS[x][0]) if x != "step" else {}
        for ax, (key, title) in zip(axes, panels, strict=True):
            steps = sorted({r["step"] for rows in runs for r in rows if key in r})
            per = [[r[key] for rows in runs for r in rows if r["step"] == s and key in r] for s in steps]
            mean = [statistics.fmean(v) for v in per]
            lo = [min(v) for v in per]
            hi = [max(v) for v in per]
            xs = [trained[s] for s in steps] if trained else steps
            (line,) = ax.plot(xs, mean, label=f"{arm.label or arm.name} (n={len(runs)})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
            ax.set_title(title)
            ax.set_xlabel(X_KEYS[x][1] if x != "step" else "step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{spec.name}: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
