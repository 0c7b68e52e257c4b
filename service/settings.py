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

    @field_validator("data_dir", "runs_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

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
