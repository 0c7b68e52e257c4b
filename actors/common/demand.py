"""What a job asks of the Ray cluster, from its config alone, before it runs: pure Python.

Each pool's actors request Ray resources (actors.rollout.pool, actors.learner.group,
actors.reward.pool); a job starts only when all of them can be placed at once. `job_demand` adds
them up: the control plane shows it and admits jobs by it (service/admission.py).
Memory is not a Ray request here (no actor asks for it), so it is not part of the demand.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from actors.common.config import JobConfig

__all__ = ["Demand", "PoolDemand", "job_demand", "stored_demand"]


class PoolDemand(BaseModel):
    role: str = Field(description="rollout engines, learners or reward workers")
    count: int = Field(description="actors in the pool")
    cpus: float = Field(description="Ray CPUs each actor requests")
    gpus: float = Field(description="Ray GPUs each actor requests")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each requests")


class Demand(BaseModel):
    pools: list[PoolDemand]

    @property
    def cpus(self) -> float:
        return sum(p.count * p.cpus for p in self.pools)

    @property
    def gpus(self) -> float:
        return sum(p.count * p.gpus for p in self.pools)

    @property
    def resources(self) -> dict[str, float]:
        """Every Ray resource the whole job requests at once: CPU, GPU and the custom ones."""
        total = {"CPU": self.cpus, "GPU": self.gpus}
        for p in self.pools:
            for name, amount in p.resources.items():
                total[name] = total.get(name, 0.0) + p.count * amount
        return {k: v for k, v in total.items() if v > 0}

    def describe(self) -> str:
        """In words, e.g. "3 CPUs, 0 GPUs: rollout engines 1 x 1 CPU, learners 2 x 1 CPU, reward workers 2 x 0 CPU"."""
        parts = []
        for p in self.pools:
            each = f"{p.cpus:g} CPU" + (f" + {p.gpus:g} GPU" if p.gpus else "")
            each += "".join(f" + {v:g} {k}" for k, v in p.resources.items())
            parts.append(f"{p.role} {p.count} x {each}")
        return f"{self.cpus:g} CPUs, {self.gpus:g} GPUs: " + ", ".join(parts)


def job_demand(cfg: JobConfig) -> Demand:
    """The Ray resources of every actor the job starts (the driver itself asks for none)."""
    r, lrn, rew = cfg.rollout, cfg.learner, cfg.reward
    return Demand(
        pools=[
            PoolDemand(
                role="rollout engines", count=r.num_engines, cpus=r.num_cpus_per_engine, gpus=r.num_gpus_per_engine,
                resources=dict(r.ray_resources),
            ),
            PoolDemand(
                role="learners", count=lrn.num_learners, cpus=lrn.num_cpus_per_learner, gpus=lrn.num_gpus_per_learner,
                resources=dict(lrn.ray_resources),
            ),
            PoolDemand(role="reward workers", count=rew.num_workers, cpus=0, gpus=0, resources=dict(rew.ray_resources)),
        ]
    )  # fmt: skip


def stored_demand(config: dict[str, Any] | None) -> Demand | None:
    """The demand of a config as the job store keeps it (validated JSON); None for one this version no
    longer reads (its driver would refuse it, naming why)."""
    if not config:
        return None
    try:
        return job_demand(JobConfig.model_validate(config))
    except ValidationError:
        return None
