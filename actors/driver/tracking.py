"""Per-step metrics: JSONL in the run directory, TensorBoard, Weights & Biases, MLflow, and the control
plane's ingestion endpoint when the job was submitted through the service.

One tracked run per job: the W&B and MLflow run ids are kept in <run dir>/tracking.json, with the
last step each sink has taken, so a job that resumes from a checkpoint (by hand or resubmitted by
the control plane) continues the same runs and sends each sink only the steps it does not hold yet
(the first record of a step is kept, as the control plane keeps it): no step twice, none missing.

W&B and MLflow are optional extras (`make setup EXTRAS=tracking`); each runs in a thread of its own
behind a bounded queue, and every failure of one (not installed, server down, disk full) is logged
and counted in `tracking/errors` (`tracking/dropped` when its queue was full) - it never fails or
stalls the training job. The loop itself has no `if backend:`: a sink that is off is not in the list.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.common.config import JobConfig
from actors.common.contract import REPORT_TOKEN_ENV, RunDir, finite, metric_record, parse_metric_line

log = logging.getLogger("forkrl.tracking")

__all__ = ["Tracker", "flat_params", "samples_markdown"]

QUEUE_SIZE = 10_000  # calls waiting per backend; more are dropped (and counted), never waited for
CLOSE_WAIT_S = 60.0  # at the end, how long the backends may take to drain their queues


def flat_params(cfg: JobConfig) -> dict[str, str]:
    """The job config as flat `section.field` parameters (no secret lives in it)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if not isinstance(value, str) else value

    walk("", cfg.model_dump(mode="json"))
    return out


def samples_markdown(step: int, samples: list[dict[str, Any]]) -> str:
    """Sampled completions as Markdown (TensorBoard text): kept tokens in bold, entropy in brackets."""
    lines = [f"step {step}"]
    for i, s in enumerate(samples):
        cells = zip(s["tokens"], s["entropy"], s["kept"], strict=True)
        toks = [f"**{t}**[{h:.2f}]" if k else f"{t}[{h:.2f}]" for t, h, k in cells]
        lines.append(f"\n{i}. reward {s['reward']:.3f} | prompt: {s['prompt'][:200]}\n\n    " + " ".join(toks))
    return "\n".join(lines)


def _sample_rows(step: int, samples: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per sampled completion: step, index, reward, text, kept tokens / tokens, the
    per-token lists as JSON (the same records the dashboard shows)."""
    return [
        [step, i, s["reward"], "".join(s["tokens"]), f"{sum(s['kept'])}/{len(s['kept'])}", s["prompt"],
         json.dumps(s["tokens"]), json.dumps(s["entropy"]), json.dumps(s["kept"])]
        for i, s in enumerate(samples)
    ]  # fmt: skip


SAMPLE_COLUMNS: list[str | int] = [
    "step",
    "sample",
    "reward",
    "completion",
    "kept",
    "prompt",
    "tokens",
    "entropy",
    "kept_flags",
]


class _Backend:
    """One external tracker in a worker thread: calls are queued, run in order, and any failure is
    logged and counted instead of reaching the training loop. `sent(step)` is called once a step's
    metrics are with the backend (it records the step in tracking.json)."""

    name = "backend"

    def __init__(self, last_step: int, sent: Callable[[str, int], None]) -> None:
        self.errors = 0
        self.dropped = 0
        self.last_step = last_step  # the newest step this backend holds
        self._sent = sent
        self._q: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._work, name=f"tracking-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._q.put_nowait((fn, args))
        except queue.Full:
            self.dropped += 1

    def log(self, step: int, scalars: dict[str, float], samples: list[dict[str, Any]]) -> None:
        if step > self.last_step:  # after a resume: only the steps this backend does not hold yet
            self.submit(self._step, step, scalars, samples)

    def _step(self, step: int, scalars: dict[str, float], samples: list[dict[str, Any]]) -> None:
        if step <= self.last_step:  # the tracker itself says it holds the step (see _start)
            return
        self._log(step, scalars)
        if samples:
            self._samples(step, samples)
        self.last_step = step
        self._sent(self.name, step)

    def _work(self) -> None:
        failed_start = False
        while (item := self._q.get()) is not None:
            fn, args = item
            if failed_start and fn != self._finish:
                continue  # a run that never started takes nothing more (one error, not one per step)
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must never fail the job
                self.errors += 1
                failed_start = failed_start or fn == self._start
                log.warning("%s: %s failed: %s: %s", self.name, getattr(fn, "__name__", fn), type(e).__name__, e)

    def close(self, deadline: float) -> None:
        with contextlib.suppress(queue.Full):
            self._q.put(None, timeout=max(0.1, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.errors += 1
            log.warning("%s: still busy after the run ended; abandoning what it had not sent", self.name)

    # each backend: _start(), _log(step, scalars), _samples(step, samples), _finish(summary, export)
    def _start(self) -> None: ...
    def _log(self, step: int, scalars: dict[str, float]) -> None: ...
    def _samples(self, step: int, samples: list[dict[str, Any]]) -> None: ...
    def _finish(self, summary: dict[str, Any], export: str | None) -> None: ...


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, cfg: JobConfig, run: RunDir, state: dict[str, Any], sent: Callable[[str, int], None]) -> None:
        self.cfg, self.run_dir, self.state = cfg, run.path, state
        self.run: Any = None
        super().__init__(int(state.get(f"{self.name}_last_step", -1)), sent)
        self.submit(self._start)

    def _start(self) -> None:
        import wandb

        tr = self.cfg.tracking
        run_id = self.state.get("wandb_run_id") or secrets.token_hex(4)
        self.state["wandb_run_id"] = run_id
        self.run = wandb.init(
            project=tr.wandb_project, entity=tr.wandb_entity, name=self.cfg.name, id=run_id, resume="allow",
            config=self.cfg.model_dump(mode="json"), dir=str(self.run_dir), mode=tr.wandb_mode,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )  # fmt: skip

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def _samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        import wandb

        self.run.log({"samples": wandb.Table(columns=SAMPLE_COLUMNS, data=_sample_rows(step, samples))}, step=step)

    def _finish(self, summary: dict[str, Any], export: str | None) -> None:
        if self.run is None:
            return
        import wandb

        for k, v in summary.items():
            if isinstance(v, int | float | str):
                self.run.summary[f"final/{k}"] = v
        if export and self.cfg.tracking.log_export:
            art = wandb.Artifact(f"{self.cfg.name}-hf", type="model", metadata={"run_dir": str(self.run_dir)})
            art.add_dir(export)
            self.run.log_artifact(art)
        self.run.finish()


class _MLflow(_Backend):
    name = "mlflow"

    def __init__(self, cfg: JobConfig, run: RunDir, state: dict[str, Any], sent: Callable[[str, int], None]) -> None:
        self.cfg, self.state = cfg, state
        self.client: Any = None
        self.run_id = ""
        super().__init__(int(state.get(f"{self.name}_last_step", -1)), sent)
        self.submit(self._start)

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        tr = self.cfg.tracking
        uri = tr.mlflow_tracking_uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(tr.mlflow_experiment)
        if exp is None:
            # a local store keeps its artifacts beside its database; a server uses its own artifact root
            where = None
            if uri is not None and uri.startswith("sqlite:///"):
                where = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlflow-artifacts").as_uri()
            exp_id = self.client.create_experiment(tr.mlflow_experiment, artifact_location=where)
        else:
            exp_id = exp.experiment_id
        if self.state.get("mlflow_run_id"):
            self.run_id = self.state["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            # MLflow appends a step logged twice: what the run holds wins over tracking.json, which a kill
            # between a send and its note leaves one step behind
            held = self.client.get_metric_history(self.run_id, "reward_mean")
            self.last_step = max([self.last_step, *(m.step for m in held)])
            return
        tags = {"forkrl.run_dir": str(self.state["run_dir"])}
        run = self.client.create_run(exp_id, run_name=self.cfg.name, tags=tags)
        self.run_id = self.state["mlflow_run_id"] = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_params(self.cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k.replace("/", "_"), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def _samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        rows = _sample_rows(step, samples)
        table = {c: [r[j] for r in rows] for j, c in enumerate(SAMPLE_COLUMNS)}
        self.client.log_dict(self.run_id, table, f"samples/step_{step:08d}.json")

    def _finish(self, summary: dict[str, Any], export: str | None) -> None:
        if not self.run_id:
            return
        self.client.log_dict(self.run_id, finite(summary), "summary.json")
        if export and self.cfg.tracking.log_export:
            self.client.log_artifacts(self.run_id, export, "hf")
        self.client.set_terminated(self.run_id, status="FINISHED")


class Tracker:
    """Where each step's record goes. `log` never raises for a tracker's failure and never waits on one."""

    def __init__(self, run: RunDir, cfg: JobConfig) -> None:
        tr = cfg.tracking
        self.run = run
        self.state_path = run.path / "tracking.json"
        self.state: dict[str, Any] = {"run_dir": str(run.path)}
        if self.state_path.is_file():
            self.state.update(json.loads(self.state_path.read_text()))
        self._lock = threading.Lock()
        self.jsonl = run.metrics.open("a", buffering=1)
        self.tb: Any = None
        # the newest step a sink holds: -1 for none yet (step 0 is the evaluation before training)
        self.tb_last_step = int(self.state.get("tensorboard_last_step", -1))
        if tr.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard))
        self.backends: list[_Backend] = []
        if tr.wandb_project:
            self.backends.append(_WandB(cfg, run, self.state, self._sent))
        if tr.mlflow_tracking_uri:
            self.backends.append(_MLflow(cfg, run, self.state, self._sent))
        self.report_url, self.report_token = tr.report_url, os.environ.get(REPORT_TOKEN_ENV, "")
        # the control plane's answer to a push asked this run to stop after its current step (preempted)
        self.stop_requested = False

    def log(self, step: int, metrics: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> None:
        """One step's record: metrics (and the step's sampled completions, if any) to every sink."""
        metrics = {**metrics, **self.health()}
        record = metric_record(step, {**metrics, **({"samples": samples} if samples else {})})
        self.jsonl.write(json.dumps(finite(record)) + "\n")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None and step > self.tb_last_step:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            if samples:
                self.tb.add_text("samples", samples_markdown(step, samples), step)
            self.tb.flush()
            self.tb_last_step = step
            self._sent("tensorboard", step)
        for b in self.backends:
            b.log(step, scalars, samples or [])
        if self.report_url:
            self._report({"metrics": [record]}, f"step {step}")

    def backfill(self, upto: int) -> int:
        """After a resume at step `upto`: the steps an external tracker never got from the attempt that
        ended (they were still in its queue when the process died) are sent again from metrics.jsonl (the
        last record of a step counts), so no step is skipped. Returns how many step records were queued."""
        behind = [b for b in self.backends if b.last_step < upto]
        if not behind or not self.run.metrics.is_file():
            return 0
        records: dict[int, dict[str, Any]] = {}
        for line in self.run.metrics.read_text().splitlines():
            rec = parse_metric_line(line)
            step = rec.get("step") if rec else None
            if rec is not None and isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= upto:
                records[step] = rec
        queued = 0
        for step in sorted(records):
            rec = records[step]
            scalars = {
                k: float(v)
                for k, v in rec.items()
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
            for b in behind:
                if step > b.last_step:
                    b.log(step, scalars, rec.get("samples") or [])
                    queued += 1
        return queued

    def health(self) -> dict[str, float]:
        """tracking/errors and tracking/dropped over every backend so far (0 when none is on)."""
        return {
            "tracking/errors": float(sum(b.errors for b in self.backends)),
            "tracking/dropped": float(sum(b.dropped for b in self.backends)),
        }

    def checkpoint(self, step: int, path: Any) -> None:
        """Tell the control plane (if any) about a complete checkpoint."""
        if self.report_url:
            self._report({"checkpoints": [{"step": step, "path": str(path)}]}, f"checkpoint {step}")

    def _sent(self, sink: str, step: int) -> None:
        """A sink holds `step` now: recorded at once, so a resume after a crash neither repeats nor skips it."""
        with self._lock:
            self.state[f"{sink}_last_step"] = step
            self._save_state()

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(dict(self.state)))  # a copy: backends add their run ids from their threads
        tmp.replace(self.state_path)

    def _report(self, payload: dict[str, Any], what: str) -> None:
        import httpx

        try:
            r = httpx.post(
                self.report_url,  # type: ignore[arg-type]
                content=json.dumps(finite(payload)),
                headers={"Authorization": f"Bearer {self.report_token}", "Content-Type": "application/json"},
                timeout=5,
            )
            r.raise_for_status()
        except httpx.HTTPError as e:  # the run goes on; the service also reads metrics.jsonl
            log.warning("could not report %s to the control plane: %s", what, e)
            return
        with contextlib.suppress(ValueError, AttributeError):
            if r.json().get("stop") is True and not self.stop_requested:
                log.warning("the control plane asks this job to stop (preempted for a higher-priority job)")
                self.stop_requested = True

    def close(
        self, summary: dict[str, Any] | None = None, export: str | None = None, finish: bool = True
    ) -> dict[str, float]:
        """End every run (the summary and the export registered first); returns the final tracking health.
        finish=False (a preempted attempt): send what is queued and leave the runs open for the next one."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        for b in self.backends if finish else ():
            b.submit(b._finish, summary or {}, export)
        for b in self.backends:
            b.close(deadline)
        with self._lock:
            self._save_state()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        return self.health()
