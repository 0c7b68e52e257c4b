"""The parts of KubeRay's RayJob (and Kueue's Workload) that the control plane reads and writes, typed.

Field names are KubeRay's (camelCase). Every model keeps the fields it does not name (extra="allow"): a
RayJob made from the chart's template carries the whole pod specs through untouched. `RayJob.dump()`
writes what the template had plus what was set, without defaults the template did not have.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RayJob", "RayJobStatus", "WorkerGroup", "Workload", "quantity"]

Quantity = str | int | float


def quantity(value: Quantity) -> float:
    """A Kubernetes CPU or GPU quantity as a number: "500m" -> 0.5, "2" -> 2.0, 4 -> 4.0."""
    text = str(value).strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Resources(_Open):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class Container(_Open):
    resources: Resources = Field(default_factory=Resources)


class PodSpec(_Open):
    containers: list[Container]


class PodTemplate(_Open):
    spec: PodSpec


class HeadGroup(_Open):
    template: PodTemplate


class WorkerGroup(_Open):
    groupName: str
    replicas: int = 0
    minReplicas: int | None = None
    maxReplicas: int | None = None
    rayStartParams: dict[str, Quantity] = Field(default_factory=dict)
    template: PodTemplate

    def pod_resources(self) -> dict[str, float]:
        """What one pod gives Ray: num-cpus / num-gpus of its rayStartParams, else what KubeRay tells Ray:
        its first container's limits (its requests where it sets no limit; GPUs as nvidia.com/gpu)."""
        res = self.template.spec.containers[0].resources if self.template.spec.containers else Resources()
        asked = {**res.requests, **res.limits}
        cpu = self.rayStartParams.get("num-cpus", asked.get("cpu", 0))
        gpu = self.rayStartParams.get("num-gpus", asked.get("nvidia.com/gpu", 0))
        return {"CPU": quantity(cpu), "GPU": quantity(gpu)}

    def advertised(self) -> list[str]:
        """The custom Ray resources its pods advertise (rayStartParams resources, e.g. the chart's
        '{"forkrl_learner": 1000}')."""
        text = str(self.rayStartParams.get("resources", "")).strip().strip("'\"")
        try:
            return sorted(json.loads(text)) if text else []
        except ValueError:
            return []


class RayClusterSpec(_Open):
    headGroupSpec: HeadGroup
    workerGroupSpecs: list[WorkerGroup] = Field(default_factory=list)
    enableInTreeAutoscaling: bool | None = None
    autoscalerOptions: dict[str, Any] | None = None
    upgradeStrategy: dict[str, Any] | None = None


class RayJobSpec(_Open):
    entrypoint: str = ""
    runtimeEnvYAML: str | None = None
    suspend: bool = False
    shutdownAfterJobFinishes: bool | None = None
    rayClusterSpec: RayClusterSpec | None = None


class ObjectMeta(_Open):
    name: str = ""
    uid: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class RayJobStatus(_Open):
    jobDeploymentStatus: str = ""
    jobStatus: str = ""
    message: str = ""
    reason: str = ""
    dashboardURL: str = ""
    jobId: str = ""


class RayJob(_Open):
    apiVersion: str = "ray.io/v1"
    kind: Literal["RayJob"] = "RayJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: RayJobSpec
    status: RayJobStatus = Field(default_factory=RayJobStatus)

    def dump(self) -> dict[str, Any]:
        """The manifest: the fields it was made with and those set since (a field set to None: removed)."""
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=True)


class Condition(_Open):
    type: str = ""
    status: str = ""
    message: str = ""


class WorkloadStatus(_Open):
    conditions: list[Condition] = Field(default_factory=list)


class Workload(_Open):
    status: WorkloadStatus = Field(default_factory=WorkloadStatus)
