"""Admission by Kueue on Kubernetes (FORKRL_ADMISSION=kueue): each attempt of a job is a KubeRay RayJob
that brings its own Ray cluster, created suspended in Kueue's LocalQueue; Kueue admits it (unsuspends
it) when the ClusterQueue's quota has room for every pod at once, and preempts it by suspending it.

The RayJob is the chart's template (FORKRL_KUEUE_RAYJOB_TEMPLATE, rendered from the same values as the
standing RayCluster) with this job's name, queue and priority-class labels, entrypoint and environment,
and each worker group sized to the job's demand: Kueue counts every pod's requests, so a job asks for
exactly the pods its engines, learners and reward workers need. The control plane follows the RayJob's
status, reads its driver's log through the job's own Ray dashboard, and cancels by deleting it.

`KueueJobs` answers the control plane as `service.rayjobs.RayJobs` does; the rest here is pure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from actors.common.contract import JOB_CONFIG_ENV, JobState
from actors.common.demand import Demand, PoolDemand, stored_demand
from service.admission import RayNode
from service.rayjob_model import ObjectMeta, RayJob, Workload
from service.rayjobs import JobNotFound, RayJobs, RayUnavailable

log = logging.getLogger("forkrl.service.kueue")

__all__ = ["KueueJobs", "group_replicas", "priority_class", "rayjob_manifest", "state_of"]

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
JOB_LABEL = "forkrl.io/job"
# the worker group (the chart's, one per pool) that holds each pool's actors (actors.common.demand roles)
POOL_GROUPS = {"rollout engines": "rollout", "learners": "learner", "reward workers": "reward"}


def group_replicas(pool: PoolDemand, pod: Mapping[str, float], group: str) -> int:
    """Pods of one worker group that hold every actor of the pool: as many actors per pod as its CPUs and
    GPUs allow (whole actors: a 4-CPU pod holds two 1.5-CPU actors), at least one pod for a pool that
    asks for neither. ValueError when one actor is larger than a pod."""
    if pool.count == 0:
        return 0
    fits = [math.floor(pod.get(k, 0.0) / need + 1e-9) for k, need in (("CPU", pool.cpus), ("GPU", pool.gpus)) if need]
    per_pod = min(fits) if fits else pool.count
    if per_pod < 1:
        raise ValueError(
            f"one of the {pool.role} needs {pool.cpus:g} CPU and {pool.gpus:g} GPU; a pod of the RayJob template's "
            f"worker group {group!r} gives {pod.get('CPU', 0):g} CPU and {pod.get('GPU', 0):g} GPU"
        )
    return math.ceil(pool.count / per_pod)


def priority_class(priority: int, classes: Mapping[str, int]) -> str:
    """The Kueue WorkloadPriorityClass of a job: the one with the highest value at most its priority
    ('' when every class is above it, or there are none)."""
    fitting = [(value, name) for name, value in classes.items() if value <= priority]
    return max(fitting)[1] if fitting else ""


def rayjob_manifest(
    template: RayJob,
    name: str,
    entrypoint: str,
    env: Mapping[str, str],
    demand: Demand,
    queue: str,
    priority_class_name: str = "",
) -> RayJob:
    """The RayJob of one attempt: the template with this job's name, labels, entrypoint and environment,
    created suspended (Kueue unsuspends it on admission), its Ray cluster deleted when the job ends, and
    each pool's worker group sized to the pool (a group of a pool the job does not use gets 0 pods)."""
    m = template.model_copy(deep=True)
    labels = {**m.metadata.labels, QUEUE_LABEL: queue, JOB_LABEL: name}
    if priority_class_name:
        labels[PRIORITY_LABEL] = priority_class_name
    m.metadata = ObjectMeta(name=name, labels=labels)
    m.spec.entrypoint = entrypoint
    m.spec.runtimeEnvYAML = yaml.safe_dump({"env_vars": dict(env)}, sort_keys=True)
    m.spec.suspend = True
    m.spec.shutdownAfterJobFinishes = True  # Kueue manages only RayJobs whose cluster goes with them
    cluster = m.spec.rayClusterSpec
    if cluster is None:
        raise ValueError("the RayJob template has no spec.rayClusterSpec")
    cluster.enableInTreeAutoscaling = False  # Kueue admits a fixed set of pods
    cluster.autoscalerOptions = None
    cluster.upgradeStrategy = None  # KubeRay refuses it on a cluster a RayJob creates
    pools = {POOL_GROUPS[p.role]: p for p in demand.pools}
    for group in cluster.workerGroupSpecs:
        pool = pools.get(group.groupName)
        if pool is not None and pool.count and (missing := set(pool.resources) - set(group.advertised())):
            raise ValueError(
                f"the {pool.role} ask for Ray resource(s) {', '.join(sorted(missing))} that the RayJob template's "
                f"worker group {group.groupName!r} does not advertise ({', '.join(group.advertised()) or 'none'})"
            )
        n = 0 if pool is None else group_replicas(pool, group.pod_resources(), group.groupName)
        group.replicas = group.minReplicas = group.maxReplicas = n
    return m


def state_of(obj: RayJob) -> tuple[str, str]:
    """The job state and message a RayJob object says (KubeRay's jobDeploymentStatus and jobStatus)."""
    st = obj.status
    deployment, job, message = st.jobDeploymentStatus, st.jobStatus, st.message
    if deployment == "Complete":
        if job == "SUCCEEDED":
            return JobState.SUCCEEDED.value, message
        return (JobState.CANCELLED.value if job == "STOPPED" else JobState.FAILED.value), message
    if deployment in ("Failed", "ValidationFailed"):
        return JobState.FAILED.value, f"RayJob {deployment.lower()}" + (f" ({st.reason})" if st.reason else "") + (
            f": {message}" if message else ""
        )
    if obj.spec.suspend or deployment in ("Suspended", "Suspending"):
        queue = obj.metadata.labels.get(QUEUE_LABEL, "?")
        return JobState.QUEUED.value, f"waiting for Kueue to admit it (LocalQueue {queue})"
    if deployment == "Running" and job == "RUNNING":
        return JobState.RUNNING.value, ""
    return JobState.PENDING.value, f"admitted by Kueue; its Ray cluster is starting (RayJob: {deployment or 'New'})"


class KueueJobs:
    """The control plane's jobs as RayJobs in one namespace (the Kubernetes API through lightkube: in a
    pod its service account, elsewhere the kubeconfig of KUBECONFIG)."""

    def __init__(
        self,
        template_path: Path,
        queue: str,
        namespace: str = "",
        priority_classes: Mapping[str, int] | None = None,
        ray_token: str = "",
    ) -> None:
        try:
            template = RayJob.model_validate(yaml.safe_load(Path(template_path).read_text()))
            if template.spec.rayClusterSpec is None:
                raise ValueError("not a RayJob with spec.rayClusterSpec")
        except (OSError, ValueError, yaml.YAMLError) as e:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"FORKRL_KUEUE_RAYJOB_TEMPLATE={template_path}: {e}") from e
        self.template = template
        self.queue, self.namespace = queue, namespace or None
        self.priority_classes = dict(priority_classes or {})
        self.ray_token = ray_token
        self._client: Any = None
        self._dashboards: dict[str, RayJobs] = {}

    def client(self) -> Any:
        if self._client is None:
            from lightkube import Client

            logging.getLogger("httpx2").setLevel(logging.WARNING)  # lightkube's transport: a line per request
            try:
                self._client = Client(namespace=self.namespace, field_manager="forkrl")
            except Exception as e:  # no service account, no kubeconfig
                raise RayUnavailable(f"the Kubernetes API is not reachable: {e}") from e
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A Kubernetes API call: 404 -> JobNotFound, other API errors and transport errors -> RayUnavailable
        (the job stays as stored; the next pass retries)."""
        from lightkube import ApiError

        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            if e.status.code == 404:
                raise JobNotFound(what) from e
            raise RayUnavailable(f"Kubernetes API, {what}: {e.status.code} {e.status.message}") from e
        except Exception as e:
            self._client = None
            raise RayUnavailable(f"Kubernetes API, {what}: {e}") from e

    @staticmethod
    def _resource() -> Any:
        from lightkube.generic_resource import create_namespaced_resource

        return create_namespaced_resource("ray.io", "v1", "RayJob", "rayjobs")

    def _get(self, name: str) -> RayJob:
        obj = self._call(f"RayJob {name}", self.client().get, self._resource(), name)
        return RayJob.model_validate(obj.to_dict())

    def ping(self) -> bool:
        try:
            self._call("list RayJobs", lambda: next(iter(self.client().list(self._resource(), chunk_size=1)), None))
            return True
        except (RayUnavailable, JobNotFound):
            return False

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Nothing to wait for: each job brings its own Ray cluster."""

    def submit(self, job_id: str, entrypoint: str, runtime_env: dict[str, Any], priority: int = 0) -> bool:
        """Create the attempt's RayJob, suspended in the LocalQueue. True when this call created it, False
        when it existed (a second submission of one attempt starts nothing)."""
        from lightkube import ApiError

        env = dict(runtime_env.get("env_vars") or {})
        demand = stored_demand(json.loads(env.get(JOB_CONFIG_ENV, "{}")))
        if demand is None:
            raise ValueError(f"job {job_id}: its config does not validate; no RayJob created")
        cls = priority_class(priority, self.priority_classes)
        manifest = rayjob_manifest(self.template, job_id, entrypoint, env, demand, self.queue, cls)
        try:
            self.client().create(self._resource()(**manifest.dump()))
        except ApiError as e:
            if e.status.code == 409:
                log.info("RayJob %s already exists", job_id)
                return False
            code = e.status.code or 0
            if 400 <= code < 500 and code not in (401, 408, 429):  # refused for good: the job fails naming why
                why = f"{e.status.code} {e.status.message}"
                raise ValueError(f"the Kubernetes API refused RayJob {job_id}: {why}") from e
            raise RayUnavailable(f"Kubernetes API, create RayJob {job_id}: {e.status.code} {e.status.message}") from e
        except Exception as e:
            self._client = None
            raise RayUnavailable(f"Kubernetes API, create RayJob {job_id}: {e}") from e
        log.info("RayJob %s created in LocalQueue %s%s", job_id, self.queue, f" ({cls})" if cls else "")
        return True

    def status(self, job_id: str) -> tuple[str, str]:
        obj = self._get(job_id)
        state, message = state_of(obj)
        if state == JobState.QUEUED.value:
            message = self._why_waiting(obj) or message
        return state, message

    def _why_waiting(self, obj: RayJob) -> str:
        """Kueue's reason on the RayJob's Workload ("couldn't assign flavors ...: insufficient quota ..."), if
        the control plane may read Workloads; '' otherwise."""
        from lightkube.generic_resource import create_namespaced_resource

        uid = obj.metadata.uid
        if not uid:
            return ""
        workload = create_namespaced_resource("kueue.x-k8s.io", "v1beta2", "Workload", "workloads")
        try:
            found = list(self.client().list(workload, labels={"kueue.x-k8s.io/job-uid": uid}))
        except Exception:  # no RBAC for Workloads, an older Kueue: the plain reason stands
            return ""
        for w in found:
            for c in Workload.model_validate(w.to_dict()).status.conditions:
                if c.type == "QuotaReserved" and c.status == "False" and c.message:
                    return f"waiting for Kueue (LocalQueue {obj.metadata.labels.get(QUEUE_LABEL, '?')}): {c.message}"
        return ""

    def stop(self, job_id: str) -> None:
        """Cancel: delete the RayJob (KubeRay deletes its Ray cluster with it)."""
        self._call(f"delete RayJob {job_id}", self.client().delete, self._resource(), job_id)

    def delete(self, job_id: str) -> None:
        try:
            self.stop(job_id)
        except (JobNotFound, RayUnavailable) as e:  # the record is ours; the RayJob may already be gone
            log.info("no RayJob %s to delete: %s", job_id, e)

    def never_runs(self, demand: Demand) -> str:
        """Why no RayJob made from the template could hold the job (an actor larger than its group's pod);
        '' when one can."""
        try:
            rayjob_manifest(self.template, "check", "", {}, demand, self.queue)
        except ValueError as e:
            return str(e)
        return ""

    def nodes(self) -> list[RayNode]:
        """Capacity is Kueue's to count: the control plane's own queue is not used."""
        return []

    def _dashboard(self, job_id: str) -> tuple[RayJobs, str] | None:
        """The Jobs API of the RayJob's own Ray cluster and the Ray job id in it; None until both exist (not
        admitted yet, its cluster starting); JobNotFound when the RayJob is gone."""
        status = self._get(job_id).status
        url, ray_job = status.dashboardURL, status.jobId
        if not url or not ray_job:
            return None
        url = url if url.startswith("http") else f"http://{url}"
        if url not in self._dashboards:
            if len(self._dashboards) >= 64:  # clients of clusters long gone
                self._dashboards.clear()
            self._dashboards[url] = RayJobs(url, self.ray_token)
        return self._dashboards[url], ray_job

    def log_tail(self, job_id: str, lines: int, max_bytes: int) -> str:
        found = self._dashboard(job_id)
        return "" if found is None else found[0].log_tail(found[1], lines, max_bytes)

    async def tail(self, job_id: str) -> AsyncIterator[str]:
        """The driver's log as it grows, once Kueue admitted the job and its cluster runs it (the caller's
        idle bound ends a wait that lasts too long)."""
        while (found := await asyncio.to_thread(self._dashboard, job_id)) is None:
            await asyncio.sleep(2)
        async for chunk in found[0].tail(found[1]):
            yield chunk
