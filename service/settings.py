"""Control-plane settings, from the environment (prefix FORKRL_) or given to create_app()."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    ray_num_cpus: int = Field(0, ge=0, description="Logical CPUs of the embedded head; 0: enough for small jobs.")
    admin_token: str = Field("", description="Bootstrap admin bearer token (stored hashed).")
    public_url: str = Field("", description="URL training drivers push metrics to; empty: http://<host>:<port>.")
    runs_dir: Path | None = Field(None, description="Where jobs write their runs; default <data_dir>/runs.")
    reconcile_interval_s: float = Field(2.0, gt=0, le=3600)
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

    @field_validator("data_dir", "runs_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @field_validator("data_roots", mode="after")
    @classmethod
    def _expand_all(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in v]

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
