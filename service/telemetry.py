"""The control plane's Prometheus metrics: one registry per Service (GET /metrics), and the counters and
gauges its parts update."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["Telemetry"]


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "forkrl_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.jobs_submitted = Counter("forkrl_jobs_submitted", "jobs accepted by the API", registry=self.registry)
        self.metrics_ingested = Counter(
            "forkrl_metrics_ingested", "step metrics stored", ["source"], registry=self.registry
        )
        self.jobs_gauge = Gauge("forkrl_jobs", "jobs by state", ["state"], registry=self.registry)
        self.restarts_total = Counter(
            "forkrl_job_restarts", "failed jobs resubmitted (trainer.max_restarts)", registry=self.registry
        )
        self.preemptions_total = Counter(
            "forkrl_job_preemptions", "jobs stopped for a higher-priority one and queued again", registry=self.registry
        )
        self.reconcile_seconds = Gauge(
            "forkrl_reconcile_last_seconds", "duration of the last reconcile pass", registry=self.registry
        )
        self.ray_gauge = Gauge("forkrl_ray_reachable", "1 when the Ray Jobs API answers", registry=self.registry)
        self.leader_gauge = Gauge(
            "forkrl_reconciler_leader", "1 on the replica that runs the reconciler", registry=self.registry
        )
