"""Per-step metrics: JSONL in the run directory, TensorBoard, optional W&B / MLflow, and the
control plane's ingestion endpoint when the job was submitted through the service."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from actors.config import JobConfig
from actors.contract import REPORT_TOKEN_ENV, RunDir, finite, metric_record

log = logging.getLogger("forkrl.tracking")

__all__ = ["Tracker"]


class Tracker:
    def __init__(self, run: RunDir, cfg: JobConfig) -> None:
        tr = cfg.tracking
        self.jsonl = run.metrics.open("a", buffering=1)
        self.tb: Any = None
        if tr.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard))
        self.wandb: Any = None
        self.mlflow: Any = None
        if tr.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=tr.wandb_project, name=cfg.name, config=cfg.model_dump(mode="json"))
            except ImportError:
                log.warning("tracking.wandb_project is set but wandb is not installed: skipping W&B")
        if tr.mlflow_tracking_uri:
            try:
                import mlflow

                mlflow.set_tracking_uri(tr.mlflow_tracking_uri)
                mlflow.start_run(run_name=cfg.name)
                self.mlflow = mlflow
            except ImportError:
                log.warning("tracking.mlflow_tracking_uri is set but mlflow is not installed: skipping MLflow")
        self.report_url, self.report_token = tr.report_url, os.environ.get(REPORT_TOKEN_ENV, "")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = metric_record(step, metrics)
        self.jsonl.write(json.dumps(record) + "\n")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)
        if self.report_url:
            self._report({"metrics": [record]}, f"step {step}")

    def checkpoint(self, step: int, path: Any) -> None:
        """Tell the control plane (if any) about a complete checkpoint."""
        if self.report_url:
            self._report({"checkpoints": [{"step": step, "path": str(path)}]}, f"checkpoint {step}")

    def _report(self, payload: dict[str, Any], what: str) -> None:
        import httpx

        try:
            httpx.post(
                self.report_url,  # type: ignore[arg-type]
                content=json.dumps(finite(payload)),
                headers={"Authorization": f"Bearer {self.report_token}", "Content-Type": "application/json"},
                timeout=5,
            ).raise_for_status()
        except httpx.HTTPError as e:  # the run goes on; the service also reads metrics.jsonl
            log.warning("could not report %s to the control plane: %s", what, e)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
