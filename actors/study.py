"""Controlled studies: arms x seeds of one job, run by forkrl itself, summarised with the spread.

    python -m actors.study --spec examples/study.yaml                     # through the control plane
    python -m actors.study --spec examples/study.yaml --direct            # the driver, no service
    python -m actors.study --spec examples/study.yaml --report            # results and plots only

Every run is one job: the spec's base config, its common overrides, the arm's overrides and
`trainer.seed`. Through the control plane (FORKRL_URL / FORKRL_TOKEN, as the CLI) each run is
submitted as a job named `<study>-<arm>-s<seed>` (so the dashboard's compare view shows them) and
followed until it ends; the service restarts a job that dies. With --direct each run is
`python -m actors.train --resume` in `<runs>/<study>/<arm>-s<seed>`, so an interrupted run continues
from its newest checkpoint. The study keeps its state in `<out>/state.json` (the job of each run, and
which are done) and each finished run's per-step numbers in `<out>/runs/<arm>-s<seed>.jsonl`; run
again, it skips what is done and follows what is running. `--report` (and the end of every run)
writes `<out>/results.json`, `<out>/table.md` and the plots `<out>/*.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.config import ConfigError, load_config

log = logging.getLogger("forkrl.study")

# per-step numbers a study keeps (the rest stays in the job's own metrics)
KEEP = (
    "reward/mean",
    "eval/reward_mean",
    "entropy/mean",
    "entropy/p80",
    "entropy/frac_below_0.01",
    "entropy/kept_frac",
    "response/length_mean",
    "timing/step",
    "batch/sequences",
)


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,30}$", description="Short name (job names, files).")
    label: str = Field("", max_length=80, description="Legend text; default: the name.")
    set: list[str] = Field(default_factory=list, description="Overrides of this arm, KEY=VALUE.")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    base: str = Field(..., description="Job config every run starts from (a path, relative to the spec).")
    set: list[str] = Field(default_factory=list, description="Overrides common to every arm.")
    arms: list[Arm] = Field(..., min_length=1)
    seeds: list[int] = Field(..., min_length=1)
    reference: dict[str, Any] = Field(default_factory=dict, description="Published figures shown beside ours.")


def load_spec(path: str) -> tuple[StudySpec, Path]:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"study spec {path}: {e}") from None
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"study spec {path}:\n" + "\n".join(lines)) from None
    names = [a.name for a in spec.arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"study spec {path}: arms: names repeat ({names})")
    return spec, (p.parent / spec.base).resolve()


def run_key(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def job_overrides(spec: StudySpec, arm: Arm, seed: int) -> list[str]:
    return [*spec.set, *arm.set, f"trainer.seed={seed}", f"name={spec.name}-{run_key(arm, seed)}"]


class State:
    """<out>/state.json: {run key: {"job": id or run dir, "done": bool}}, written atomically."""

    def __init__(self, out: Path) -> None:
        self.path = out / "state.json"
        self.runs: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def set(self, key: str, **kw: Any) -> None:
        self.runs.setdefault(key, {}).update(kw)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.runs, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _scalars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row = {"step": int(r["step"])} | {k: r[k] for k in KEEP if isinstance(r.get(k), (int, float))}
        if "forking_tokens" in r:
            row["forking_tokens"] = r["forking_tokens"][:20]
        out.append(row)
    return out


# -- running ---------------------------------------------------------------------------------------


def run_direct(spec: StudySpec, base: Path, arm: Arm, seed: int, runs_dir: Path) -> list[dict[str, Any]]:
    run_dir = runs_dir / spec.name / run_key(arm, seed)
    cfg = load_config(str(base), [*job_overrides(spec, arm, seed), f"trainer.output_dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "study-config.yaml"
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    cmd = [sys.executable, "-m", "actors.train", "--config", str(cfg_path), "--resume"]
    subprocess.run(cmd, check=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return _scalars(rows)


def run_service(
    spec: StudySpec, base: Path, arm: Arm, seed: int, state: State, url: str, token: str
) -> list[dict[str, Any]]:
    import httpx

    key = run_key(arm, seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        job = state.runs.get(key, {}).get("job")
        attempt = int(state.runs.get(key, {}).get("attempt", 0))
        if job is not None:
            r = http.get(f"/v1/jobs/{job}")
            if r.status_code != 404:
                r.raise_for_status()  # a refused token or a broken service: said once, in main
            gone = r.status_code == 404 or r.json().get("state") in ("FAILED", "CANCELLED")
            if gone:  # past the service's own restarts, or deleted: a new job for this run
                log.warning(
                    "%s: job %s is %s; submitting the run again",
                    key,
                    job,
                    "gone" if r.status_code == 404 else r.json()["state"],
                )
                job, attempt = None, attempt + 1
        if job is None:
            cfg = load_config(str(base), job_overrides(spec, arm, seed))
            # the key makes a submission that was sent but not recorded here come back as the same job
            idem = {"Idempotency-Key": f"study-{spec.name}-{key}-{attempt}"}
            r = http.post("/v1/jobs", json=cfg.model_dump(mode="json"), headers=idem)
            if r.status_code >= 400:
                raise RuntimeError(f"{key}: the control plane refused the job ({r.status_code}): {r.text}")
            job = r.json()["id"]
            state.set(key, job=job, attempt=attempt, done=False)
            log.info("%s: submitted job %s", key, job)
        last = -1
        while True:
            r = http.get(f"/v1/jobs/{job}")
            r.raise_for_status()
            j = r.json()
            step = int(j.get("last_step") or 0)
            if step != last:
                log.info("%s: job %s %s, step %d", key, job, j["state"], step)
                last = step
            if j["state"] == "SUCCEEDED":
                break
            if j["state"] in ("FAILED", "CANCELLED"):
                raise RuntimeError(f"{key}: job {job} ended {j['state']}: {j.get('message') or ''}")
            time.sleep(10)
        rows: list[dict[str, Any]] = []
        while True:  # pages of at most 1000 steps
            r = http.get(f"/v1/jobs/{job}/metrics", params={"after_step": rows[-1]["step"] if rows else 0})
            r.raise_for_status()
            page = r.json()["metrics"]
            if not page:
                break
            rows += page
    return _scalars(rows)


# -- report ----------------------------------------------------------------------------------------


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(spec: StudySpec, out: Path) -> dict[str, Any]:
    """results.json, table.md and the plots from the finished runs under <out>/runs."""
    arms: dict[str, Any] = {}
    for arm in spec.arms:
        runs = {}
        for seed in spec.seeds:
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
        step_s = [statistics.median(r["timing/step"] for r in rows if "timing/step" in r) for rows in runs.values()]
        arms[arm.name] = {
            "label": arm.label or arm.name,
            "seeds": sorted(runs),
            "steps": max(len(rows) for rows in runs.values()),
            "eval_first": _mean_sd(first) if first else None,
            "eval_final": _mean_sd(final) if final else None,
            "eval_best": _mean_sd(best) if best else None,
            "eval_final_by_seed": {s: e[-1][1] for s, e in sorted(evals.items()) if e},
            "eval_best_by_seed": {s: max(v for _, v in e) for s, e in sorted(evals.items()) if e},
            "step_s": _mean_sd(step_s),
            "entropy": _entropy_pattern(runs),
        }
    results = {"study": spec.name, "seeds": spec.seeds, "arms": arms, "reference": spec.reference}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(_table(spec, arms))
    _plots(spec, out)
    return results


def _entropy_pattern(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """First and last step of every seed: share below 0.01 and p80 (mean over seeds), and the 20 tokens
    kept most often, their kept counts summed over the seeds (ties: first seen first)."""
    pat: dict[str, Any] = {}
    for which, pick in (("first", 0), ("last", -1)):
        rows = [rs[pick] for rs in runs.values() if rs]
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
    lines += ["", "\\* at step trainer.eval_every: none is made before the first update.", ""]
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


def _plots(spec: StudySpec, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("eval/reward_mean", "held-out greedy accuracy"),
        ("reward/mean", "train reward"),
        ("entropy/mean", "entropy, mean"),
        ("entropy/p80", "entropy, p80"),
        ("response/length_mean", "response length (tokens)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for arm in spec.arms:
        runs = [
            [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            for seed in spec.seeds
            if (f := out / "runs" / f"{run_key(arm, seed)}.jsonl").exists()
        ]
        if not runs:
            continue
        for ax, (key, title) in zip(axes, panels, strict=True):
            steps = sorted({r["step"] for rows in runs for r in rows if key in r})
            per = [[r[key] for rows in runs for r in rows if r["step"] == s and key in r] for s in steps]
            mean = [statistics.fmean(v) for v in per]
            lo = [min(v) for v in per]
            hi = [max(v) for v in per]
            (line,) = ax.plot(steps, mean, label=f"{arm.label or arm.name} (n={len(runs)})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{spec.name}: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------


def run_all(spec: StudySpec, base: Path, args: argparse.Namespace, out: Path, state: State) -> None:
    """Every run not yet done, seed-major: every arm gets its first seed before any gets a second."""
    for seed in spec.seeds:
        for arm in spec.arms:
            key = run_key(arm, seed)
            if (args.only and key not in args.only) or state.runs.get(key, {}).get("done"):
                continue
            t0 = time.time()
            if args.direct:
                state.set(key, job=str(Path(args.runs_dir) / spec.name / key), done=False)
                rows = run_direct(spec, base, arm, seed, Path(args.runs_dir))
            else:
                rows = run_service(spec, base, arm, seed, state, args.url, args.token)
            (out / "runs" / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            state.set(key, done=True, wall_s=round(time.time() - t0, 1))
            summarize(spec, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m actors.study", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="study YAML (see examples/study.yaml)")
    ap.add_argument("--out", help="results folder (default: bench/results/study/<name>)")
    ap.add_argument("--direct", action="store_true", help="run the driver directly instead of the control plane")
    ap.add_argument("--report", action="store_true", help="only write results, table and plots")
    ap.add_argument("--only", nargs="*", default=[], help="run keys to run (e.g. top20-s1); default all")
    ap.add_argument("--url", default=os.environ.get("FORKRL_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--token", default=os.environ.get("FORKRL_TOKEN", ""))
    ap.add_argument("--runs-dir", default=os.environ.get("FORKRL_RUNS_DIR", "runs"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        spec, base = load_spec(args.spec)
    except ConfigError as e:
        sys.stderr.write(f"forkrl study: {e}\n")
        return 2
    out = Path(args.out or f"bench/results/study/{spec.name}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    state = State(out)
    import httpx

    try:
        if not args.report:
            run_all(spec, base, args, out, state)
    except (RuntimeError, ConfigError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write(f"forkrl study: {e}\n(run the same command again to go on; finished runs are kept)\n")
        return 1
    except httpx.HTTPError as e:  # the control plane is not reachable, or answered with an error
        sys.stderr.write(f"forkrl study: the control plane at {args.url}: {e}\n")
        return 1
    results = summarize(spec, out)
    sys.stdout.write((out / "table.md").read_text())
    done = sum(1 for r in state.runs.values() if r.get("done"))
    sys.stdout.write(f"\n{done} of {len(spec.arms) * len(spec.seeds)} runs done; results in {out}\n")
    return 0 if results["arms"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
