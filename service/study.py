"""Controlled studies: arms x seeds of one job, run by forkrl itself, summarised with the spread.

    python -m service.study --spec examples/study.yaml                    # through the control plane
    python -m service.study --spec examples/study.yaml --direct           # the driver, no service
    python -m service.study --spec examples/study.yaml --report           # results and plots only

Every run is one job: the spec's base config, its common overrides, the arm's overrides and
`trainer.seed` (service/study_spec.py). Through the control plane (FORKRL_URL / FORKRL_TOKEN, as the
CLI) each run is submitted as a job named `<study>-<arm>-s<seed>` (so the dashboard's compare view
shows them) and followed until it ends; the service restarts a job that dies. With --direct each run
is `python -m actors.train --resume` in `<runs>/<study>/<arm>-s<seed>`, so an interrupted run
continues from its newest checkpoint. The study keeps its state in `<out>/state.json` (the job of each
run, and which are done) and each finished run's per-step numbers in `<out>/runs/<arm>-s<seed>.jsonl`;
run again, it skips what is done and follows what is running (and re-reads finished --direct runs from
their run directories where they are still here). `--report` (and the end of every run)
writes `<out>/results.json`, `<out>/table.md` and the plots `<out>/*.png` (service/study_report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from actors.common.config_load import ConfigError, load_config
from actors.common.contract import JobState
from service.client import ApiError, ForkrlClient
from service.study_report import X_KEYS, summarize
from service.study_spec import Arm, StudySpec, job_overrides, load_spec, run_key, runs_of

__all__ = ["StudySpec", "load_spec", "summarize", "main"]

log = logging.getLogger("forkrl.study")

# per-step numbers a study keeps (the rest stays in the job's own metrics)
KEEP = (
    "reward/mean",
    "eval/reward_mean",
    "eval/reward_stderr",
    "entropy/mean",
    "entropy/p80",
    "entropy/frac_below_0.01",
    "entropy/kept_frac",
    "response/length_mean",
    "timing/step",
    "batch/sequences",
    "rollout/generated_tokens",
    "batch/rounds",
    "batch/groups_kept",
    "batch/groups_generated",
    "batch/signal_share",
)
ENDED_BADLY = (JobState.FAILED, JobState.CANCELLED)


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


def kept_keys(spec: StudySpec) -> list[str]:
    """The per-step numbers a study keeps: KEEP, every panel's metric, what its x axes count and spec.keep."""
    x = [X_KEYS[a][0] for a in [spec.x, *spec.also_x] if a in X_KEYS]
    return list(dict.fromkeys([*KEEP, *(key for key, _ in spec.panels), *x, *spec.keep]))


def _scalars(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """The kept numbers of each step, once: a run directory's metrics.jsonl holds again the steps a
    resumed attempt logged after its checkpoint, and the last record of a step is the one that counts."""
    out = []
    for r in sorted({int(r["step"]): r for r in rows}.values(), key=lambda r: int(r["step"])):
        row = {"step": int(r["step"])} | {k: r[k] for k in keys if isinstance(r.get(k), (int, float))}
        if "forking_tokens" in r:
            row["forking_tokens"] = r["forking_tokens"][:20]
        out.append(row)
    return out


# -- running ---------------------------------------------------------------------------------------


def run_direct(spec: StudySpec, base: Path, arm: Arm, seed: int, runs_dir: Path) -> list[dict[str, Any]]:
    run_dir = (runs_dir / spec.name / run_key(arm, seed)).resolve()
    cfg = load_config(str(base), [*job_overrides(spec, arm, seed), f"trainer.output_dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "study-config.yaml"
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    cmd = [sys.executable, "-m", "actors.train", "--config", str(cfg_path), "--resume"]
    subprocess.run(cmd, check=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return _scalars(rows, kept_keys(spec))


def run_service(
    spec: StudySpec, base: Path, arm: Arm, seed: int, state: State, url: str, token: str
) -> list[dict[str, Any]]:
    key = run_key(arm, seed)
    with ForkrlClient(url, token, timeout=60) as api:
        job = state.runs.get(key, {}).get("job")
        attempt = int(state.runs.get(key, {}).get("attempt", 0))
        if job is not None and _gone(api, key, job):  # past the service's own restarts, or deleted
            job, attempt = None, attempt + 1  # a new job for this run
        if job is None:
            cfg = load_config(str(base), job_overrides(spec, arm, seed))
            try:
                # the key makes a submission that was sent but not recorded here come back as the same job
                job = api.submit(cfg, idempotency_key=f"study-{spec.name}-{key}-{attempt}").id
            except ApiError as e:
                raise RuntimeError(
                    f"{key}: the control plane refused the job ({e.status}): {e.response.text}"
                ) from None
            state.set(key, job=job, attempt=attempt, done=False)
            log.info("%s: submitted job %s", key, job)
        _wait(api, key, job)
        rows: list[dict[str, Any]] = []
        while True:  # pages of at most 1000 steps
            page = api.metrics(job, after_step=rows[-1]["step"] if rows else -1).metrics
            if not page:
                break
            rows += page
    return _scalars(rows, kept_keys(spec))


def _gone(api: ForkrlClient, key: str, job: str) -> bool:
    """Whether the run's job ended without success or was deleted (said in the log)."""
    try:
        ended: JobState | None = api.job(job).state
    except ApiError as e:
        if e.status != 404:
            raise  # a refused token or a broken service: said once, in main
        ended = None
    if ended is not None and ended not in ENDED_BADLY:
        return False
    log.warning("%s: job %s is %s; submitting the run again", key, job, "gone" if ended is None else ended.value)
    return True


def _wait(api: ForkrlClient, key: str, job: str) -> None:
    """Until the job SUCCEEDED (RuntimeError when it ended otherwise), saying each new step."""
    last = -1
    while True:
        j = api.job(job)
        if j.last_step != last:
            log.info("%s: job %s %s, step %d", key, job, j.state.value, j.last_step)
            last = j.last_step
        if j.state == JobState.SUCCEEDED:
            return
        if j.state in ENDED_BADLY:
            raise RuntimeError(f"{key}: job {job} ended {j.state.value}: {j.message or ''}")
        time.sleep(10)


# -- main ------------------------------------------------------------------------------------------


def run_all(spec: StudySpec, base: Path, args: argparse.Namespace, out: Path, state: State) -> None:
    """Every run not yet done, seed-major: every arm gets its first seed before any gets a second."""
    for arm, seed in runs_of(spec):
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


def refresh_direct(spec: StudySpec, out: Path, state: State) -> int:
    """Re-read each finished --direct run's numbers from its run directory, where it is still on this
    machine, so the report draws what the spec asks now (a panel added after the run). Returns how
    many were refreshed; the others keep the numbers stored when they finished."""
    refreshed = 0
    keys = {run_key(arm, seed) for arm, seed in runs_of(spec)}
    for key, run in state.runs.items():
        if key not in keys:  # a run the spec no longer holds
            continue
        metrics = Path(str(run.get("job", ""))) / "metrics.jsonl"
        if run.get("done") and metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            scalars = _scalars(rows, kept_keys(spec))
            (out / "runs" / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scalars))
            refreshed += 1
    return refreshed


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m service.study", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--spec", required=True, help="study YAML (see examples/study.yaml)")
    ap.add_argument("--out", help="results folder (default: bench/results/study/<name>)")
    ap.add_argument("--direct", action="store_true", help="run the driver directly instead of the control plane")
    ap.add_argument("--report", action="store_true", help="only write results, table and plots")
    ap.add_argument("--only", nargs="*", default=[], help="run keys to run (e.g. top20-s1); default all")
    ap.add_argument("--url", default=os.environ.get("FORKRL_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--token", default=os.environ.get("FORKRL_TOKEN", ""))
    ap.add_argument("--runs-dir", default=os.environ.get("FORKRL_RUNS_DIR", "runs"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        spec, base = load_spec(args.spec)
    except ConfigError as e:
        sys.stderr.write(f"forkrl study: {e}\n")
        return 2
    unknown = sorted(set(args.only) - {run_key(arm, seed) for arm, seed in runs_of(spec)})
    if unknown:
        keys = " ".join(run_key(arm, seed) for arm, seed in runs_of(spec))
        sys.stderr.write(f"forkrl study: --only: {' '.join(unknown)}: not runs of {spec.name} (its runs: {keys})\n")
        return 2
    out = Path(args.out or f"bench/results/study/{spec.name}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    state = State(out)
    try:
        if not args.report:
            run_all(spec, base, args, out, state)
    except (RuntimeError, ConfigError, OSError, subprocess.CalledProcessError) as e:
        sys.stderr.write(f"forkrl study: {e}\n(run the same command again to go on; finished runs are kept)\n")
        return 1
    except httpx.HTTPError as e:  # the control plane is not reachable, or answered with an error
        sys.stderr.write(f"forkrl study: the control plane at {args.url}: {e}\n")
        return 1
    if refresh_direct(spec, out, state):
        log.info("numbers re-read from the run directories on this machine")
    results = summarize(spec, out)
    sys.stdout.write((out / "table.md").read_text())
    done = sum(1 for arm, seed in runs_of(spec) if state.runs.get(run_key(arm, seed), {}).get("done"))
    sys.stdout.write(f"\n{done} of {len(runs_of(spec))} runs done; results in {out}\n")
    return 0 if results["arms"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
