"""Control-plane settings, from the environment (prefix FORKRL_) or given to create_app()."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Pool = Literal["rollout", "reward", "learner"]


def _own_groups() -> dict[Pool, list[str]]:
    """Each pool the Ray resource of its worker group in the chart (helm/forkrl: forkrl_<pool>)."""
    return {"rollout": ["forkrl_rollout"], "reward": ["forkrl_reward"], "learner": ["forkrl_learner"]}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FORKRL_", extra="ignore")

    env: Literal["development", "production"] = Field(
        "development",
        description="production refuses to start without an admin token; development writes a fresh one to "
        "<data_dir>/admin_token when none is set.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(Path("~/.local/share/forkrl").expanduser(), description="SQLite file, runs, admin token.")
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite at <data_dir>/forkrl.db.")
    ray_address: str = Field(
        "", description="Ray dashboard URL (http://head:8265). Empty: start and own a local Ray head (embedded)."
    )
    ray_auth_token: str = Field("", description="Token for a Ray cluster that has token authentication enabled.")
    ray_num_cpus: int = Field(
        0,
        ge=0,
        description="Logical CPUs the embedded head advertises (admission counts these); 0: max(4, cores), "
        "which lets one small job run beside the service on a 2-core machine.",
    )
    admin_token: str = Field("", description="Bootstrap admin bearer token (stored hashed).")
    public_url: str = Field("", description="URL training drivers push metrics to; empty: http://<host>:<port>.")
    runs_dir: Path | None = Field(None, description="Where jobs write their runs; default <data_dir>/runs.")
    reconcile_interval_s: float = Field(2.0, gt=0, le=3600)
    admission: Literal["queue", "off", "kueue"] = Field(
        "queue",
        description="queue: jobs wait in QUEUED until their whole demand fits the cluster's free capacity "
        "(service/admission.py); off: every job goes to Ray at once (a cluster whose autoscaler decides); kueue: "
        "each job attempt is a RayJob with its own Ray cluster, which Kueue admits on Kubernetes (service/kueue.py).",
    )
    kueue_rayjob_template: Path = Field(
        Path("/etc/forkrl/rayjob.yaml"),
        description="admission=kueue: the RayJob manifest each job's RayJob is made from (the chart renders it).",
    )
    kueue_local_queue: str = Field(
        "forkrl", min_length=1, max_length=63, description="admission=kueue: the LocalQueue the RayJobs go to."
    )
    kueue_namespace: str = Field(
        "", description="admission=kueue: the namespace of the RayJobs; empty: the service account's (or kubeconfig's)."
    )
    kueue_priority_classes: dict[str, int] = Field(
        default_factory=dict,
        description="admission=kueue: Kueue WorkloadPriorityClass name -> value; a job gets the class with the highest "
        "value at most its priority (none below it: no class).",
    )
    preemption: Literal["off", "lower_priority"] = Field(
        "off",
        description="lower_priority: a queued job that waits for capacity stops running jobs of a lower priority "
        "(the lowest first, then the most recently started) at their next step, each saving a checkpoint there and "
        "going back to the queue to resume from it; off: a running job is never stopped for another.",
    )
    preempt_grace_s: float = Field(
        900,
        gt=0,
        le=86400,
        description="A job asked to stop for a higher-priority one that has not stopped after this long is stopped "
        "through Ray (it resumes from its newest checkpoint).",
    )
    max_owner_priority: int = Field(
        0, ge=-1000, le=1000, description="Highest priority a non-admin owner may give a job (its quota may differ)."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024)
    stream_idle_s: float = Field(
        600, gt=0, le=86400, description="A log or event stream with nothing new for this long ends (reconnect)."
    )
    shutdown_grace_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="On SIGTERM, open streams (events, followed logs) get this long to end; "
        "clients reconnect to the next server.",
    )
    log_tail_max_lines: int = Field(100_000, ge=1, description="Most log lines one GET .../logs returns.")
    # -- streams (GET .../events, GET .../logs?follow=true) and metric reads; counted per process
    stream_max_per_token: int = Field(
        8, ge=1, le=100_000, description="Streams (events and followed logs) one token may hold open at once."
    )
    stream_max_total: int = Field(
        256, ge=1, le=1_000_000, description="Streams this process holds open at once, all tokens together."
    )
    stream_retry_after_s: int = Field(
        10, ge=1, le=3600, description="Retry-After (seconds) of the 429 that refuses a stream over either limit."
    )
    stream_token_check_s: float = Field(
        5,
        gt=0,
        le=300,
        description="How often an open stream checks that its token is neither revoked nor expired; it ends "
        "(events: an `end` event with the reason) once the token no longer holds.",
    )
    metrics_read_max: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Largest `limit` of GET .../metrics (step records in one read); beyond: 422. Page on with "
        "after_step.",
    )
    store_page_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=1 << 30,
        description="Metric reads and event replays load step records from the store in pages of at most this "
        "many bytes of stored JSON (at least one record, at most 500): what one reader holds in memory at once.",
    )

    pool_resources: bool = Field(
        False,
        description="Place each pool on its own worker group: a job whose rollout/reward/learner.ray_resources "
        "is empty gets {forkrl_rollout|forkrl_reward|forkrl_learner: 1}, the resources the chart's groups "
        "advertise (the chart turns this on for the RayCluster it creates).",
    )

    # -- tenancy policy (what non-admin owners may ask a job to do; admins are the operator)
    tenancy: Literal["shared", "single_user"] = Field(
        "shared",
        description="shared: the rules below hold for every non-admin token (the safe default for a deployment "
        "several teams use); single_user: no rules (a laptop where the only user runs the service).",
    )
    allowed_plugins: list[str] = Field(
        default_factory=list,
        description="Plugin verifiers non-admin owners may name: module:function, or module:* for every function "
        "of a module (exact module names; none by default). JSON list in the environment.",
    )
    data_roots: list[Path] = Field(
        default_factory=list,
        description="Directories that data.source.path, data.eval_source.path and a model.path directory must "
        "resolve inside (after `..` and symlinks); empty: <data_dir>/datasets. Built-in models and tasks "
        "need none.",
    )
    tracking_uris: list[str] = Field(
        default_factory=list,
        description="MLflow tracking URIs non-admin owners may set in tracking.mlflow_tracking_uri (none by default).",
    )
    allow_wandb: bool = Field(
        False, description="Whether non-admin owners may log to Weights & Biases (tracking.wandb_project)."
    )

    # -- tenancy limits (service/quotas.py): the hard bounds of one non-admin owner in `tenancy: shared`
    max_jobs_per_owner: int = Field(
        500, ge=1, le=10_000_000, description="Jobs an owner may have stored, in any state (delete finished ones)."
    )
    max_active_jobs_per_owner: int = Field(
        16, ge=1, le=100_000, description="Jobs an owner may have queued or running at once (each goes to Ray)."
    )
    submit_rate_per_minute: float = Field(
        30, gt=0, le=1e6, description="Accepted submissions per owner and minute, after a burst (per process)."
    )
    submit_burst: int = Field(10, ge=1, le=100_000, description="Submissions an idle owner may make at once.")
    max_rollout_engines: int = Field(32, ge=1, le=1024, description="Largest rollout.num_engines.")
    max_reward_workers: int = Field(128, ge=1, le=4096, description="Largest reward.num_workers.")
    max_learners: int = Field(32, ge=1, le=4096, description="Largest learner.num_learners.")
    max_gpus_per_actor: float = Field(
        8, ge=0, le=64, description="Largest rollout.num_gpus_per_engine and learner.num_gpus_per_learner."
    )
    max_job_gpus: float = Field(64, ge=0, le=1e6, description="Most GPUs one job's engines and learners reserve.")
    max_job_cpus: float = Field(256, gt=0, le=1e6, description="Most CPUs one job's engines and learners reserve.")
    max_cpu_kv_cache_gib: int = Field(
        64, ge=1, le=1024, description="Largest rollout.cpu_kv_cache_gib (host memory of each CPU engine)."
    )
    allowed_ray_resources: dict[Pool, list[str]] = Field(
        default_factory=_own_groups,
        description="Custom Ray resources each pool's ray_resources may name (fnmatch patterns; default: the "
        "chart's worker group of that pool). node:* is refused whatever this says. JSON object in the environment.",
    )
    metrics_token: str = Field(
        "", description="Bearer token Prometheus scrapes /metrics with (admin tokens work too); empty: admins only."
    )

    @field_validator("data_dir", "runs_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @field_validator("data_roots", mode="after")
    @classmethod
    def _expand_all(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in v]

    @field_validator("metrics_token", mode="after")
    @classmethod
    def _strong(cls, v: str) -> str:
        if v and len(v) < 16:
            raise ValueError(f"a metrics token of {len(v)} characters: at least 16 (or empty: admin tokens only)")
        return v

    @model_validator(mode="after")
    def _one_preemptor(self) -> Settings:
        if self.admission == "kueue" and self.preemption != "off":
            raise ValueError(
                f"preemption={self.preemption!r} with admission='kueue': Kueue decides who runs and preempts "
                "(its ClusterQueue's preemption); set FORKRL_PREEMPTION=off"
            )
        return self

    @property
    def data_root_paths(self) -> list[Path]:
        return self.data_roots or [self.data_dir / "datasets"]

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'forkrl.db'}"

    @property
    def runs_path(self) -> Path:
        return self.runs_dir or self.data_dir / "runs"

    @property
    def report_base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return (self.public_url or f"http://{host}:{self.port}").rstrip("/")
