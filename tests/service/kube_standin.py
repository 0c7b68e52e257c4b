"""A stand-in for what cannot run on this box: a Kubernetes API server holding KubeRay's RayJob resource
and Kueue's Workloads, with the Kueue and KubeRay controllers reduced to what the control plane relies
on. There is no Kubernetes here (no API server, no kubelet, no container runtime), so this is a mock, and
the tests that use it say so. What is real: the HTTP API's shape as lightkube speaks it (paths, list
paging, Status errors, bearer token), every RayJob validated against KubeRay's RayJob CRD as the API
server would (unknown fields refused), Kueue's quota arithmetic over the pods' CPU requests, and the
job itself: an admitted RayJob's entrypoint and runtime environment go to a real Ray head's Jobs API,
where the real driver trains.

Kueue, as here: suspended RayJobs are admitted by priority (their WorkloadPriorityClass's value), then in
creation order, while the ClusterQueue's CPU quota covers all their pods at once (head, each worker
group's replicas, the submitter); a waiting one's Workload says why. KubeRay, as here: an admitted
RayJob is submitted to Ray (a new Ray job id per admission), its status follows the Ray job, and a
deleted or suspended one has its Ray job stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.rayjob_model import quantity

NS_PATH = "/apis/ray.io/v1/namespaces/{ns}/rayjobs"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _status(code: int, reason: str, message: str) -> JSONResponse:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip
    return JSONResponse(body, status_code=code)


def _container_cpu(c: dict[str, Any]) -> float:
    res = c.get("resources") or {}
    return quantity((res.get("requests") or res.get("limits") or {}).get("cpu", 0))


def pods_cpu(rayjob: dict[str, Any]) -> float:
    """The CPUs Kueue counts for a RayJob: every pod's requests (head, workers x replicas, submitter)."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    total = sum(_container_cpu(c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"])
    for g in cluster.get("workerGroupSpecs") or []:
        total += g.get("replicas", 0) * sum(_container_cpu(c) for c in g["template"]["spec"]["containers"])
    submitter = (spec.get("submitterPodTemplate") or {}).get("spec") or {}
    return total + sum(_container_cpu(c) for c in submitter.get("containers") or [])


class KubeStandIn:
    def __init__(
        self, schema: dict[str, Any], ray_address: str, ray_token: str, cpu_quota: float, port: int,
        priority_classes: dict[str, int],
    ) -> None:  # fmt: skip
        self.schema, self.cpu_quota, self.port, self.classes = schema, cpu_quota, port, priority_classes
        self.token = uuid.uuid4().hex
        self.ray_address, self.ray_headers = ray_address, {"Authorization": f"Bearer {ray_token}"}
        self._ray: Any = None
        self.dashboard = ray_address.removeprefix("http://")
        self.jobs: dict[str, dict[str, Any]] = {}  # name -> RayJob object
        self.waiting_reason: dict[str, str] = {}  # name -> why Kueue has not admitted it
        self.created: list[dict[str, Any]] = []  # every RayJob as it was created (what the control plane sent)
        self.deleted: list[str] = []
        self._admissions = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.server = uvicorn.Server(uvicorn.Config(self._app(), host="127.0.0.1", port=port, log_level="warning"))

    @property
    def ray(self) -> Any:
        """The Jobs API client of the Ray head the admitted RayJobs run on (made on first use)."""
        if self._ray is None:
            from ray.job_submission import JobSubmissionClient

            self._ray = JobSubmissionClient(self.ray_address, headers=self.ray_headers)
        return self._ray

    # -- the API server
    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Any:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized", "Unauthorized")
            return await call_next(request)

        @app.post(NS_PATH)
        async def create(ns: str, request: Request) -> Any:
            obj = await request.json()
            try:
                jsonschema.validate(obj, self.schema)
            except jsonschema.ValidationError as e:
                return _status(422, "Invalid", f"RayJob is invalid: {e.message} at {list(e.absolute_path)}")
            name = obj["metadata"]["name"]
            with self._lock:
                if name in self.jobs:
                    return _status(409, "AlreadyExists", f'rayjobs.ray.io "{name}" already exists')
                self.created.append(obj)
                stored = {**obj, "status": {}}
                made = {"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                        "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
                stored["metadata"] = {**obj["metadata"], **made}
                self.jobs[name] = stored
            return JSONResponse(stored, status_code=201)

        @app.get(NS_PATH)
        async def listing(ns: str) -> Any:
            with self._lock:
                items = list(self.jobs.values())
            return {"kind": "RayJobList", "apiVersion": "ray.io/v1", "metadata": {"resourceVersion": "1"},
                    "items": items}  # fmt: skip

        @app.get(NS_PATH + "/{name}")
        async def get(ns: str, name: str) -> Any:
            with self._lock:
                obj = self.jobs.get(name)
            return obj if obj is not None else _status(404, "NotFound", f'rayjobs.ray.io "{name}" not found')

        @app.delete(NS_PATH + "/{name}")
        async def delete(ns: str, name: str) -> Any:
            with self._lock:
                obj = self.jobs.pop(name, None)
            if obj is None:
                return _status(404, "NotFound", f'rayjobs.ray.io "{name}" not found')
            self.deleted.append(name)
            self._stop_ray(obj)
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

        @app.get("/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads")
        async def workloads(ns: str, labelSelector: str = "") -> Any:  # noqa: N803 (the API's name)
            uid = labelSelector.partition("kueue.x-k8s.io/job-uid=")[2]
            items = []
            with self._lock:
                for name, obj in self.jobs.items():
                    if obj["metadata"]["uid"] == uid and name in self.waiting_reason:
                        cond = {"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                "message": self.waiting_reason[name]}  # fmt: skip
                        items.append({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
                                      "metadata": {"name": f"rayjob-{name}", "namespace": ns},
                                      "status": {"conditions": [cond]}})  # fmt: skip
            return {"kind": "WorkloadList", "apiVersion": "kueue.x-k8s.io/v1beta2", "metadata": {}, "items": items}

        return app

    # -- the controllers
    def _used(self) -> float:
        return sum(pods_cpu(o) for o in self.jobs.values() if not o["spec"].get("suspend") and not self._ended(o))

    @staticmethod
    def _ended(obj: dict[str, Any]) -> bool:
        return obj["status"].get("jobDeploymentStatus") in ("Complete", "Failed")

    def _priority(self, obj: dict[str, Any]) -> int:
        return self.classes.get(obj["metadata"]["labels"].get("kueue.x-k8s.io/priority-class", ""), 0)

    def _reconcile(self) -> None:
        with self._lock:
            # dicts keep creation order; a stable sort puts higher priorities first
            for name, obj in sorted(self.jobs.items(), key=lambda kv: -self._priority(kv[1])):
                if obj["spec"].get("suspend"):  # Kueue: admit while the quota covers every pod
                    need, free = pods_cpu(obj), self.cpu_quota - self._used()
                    if need > free + 1e-9:
                        self.waiting_reason[name] = (
                            f"couldn't assign flavors to pod set head: insufficient unused quota for cpu in "
                            f"flavor default-flavor, {need - free:g} more needed"
                        )
                        continue
                    self.waiting_reason.pop(name, None)
                    obj["spec"]["suspend"] = False
                    obj["status"] = {"jobDeploymentStatus": "Initializing"}
                elif obj["status"].get("jobDeploymentStatus") == "Initializing":  # KubeRay: submit to Ray
                    env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"])
                    ray_id = f"{name}-k{next(self._admissions)}"
                    self.ray.submit_job(entrypoint=obj["spec"]["entrypoint"], submission_id=ray_id, runtime_env=env)
                    obj["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "PENDING", "jobId": ray_id,
                                     "dashboardURL": self.dashboard}  # fmt: skip
                elif obj["status"].get("jobDeploymentStatus") == "Running":
                    info = self.ray.get_job_info(obj["status"]["jobId"])
                    state = str(getattr(info.status, "value", info.status))
                    obj["status"]["jobStatus"] = state
                    if state in TERMINAL:
                        obj["status"]["jobDeploymentStatus"] = "Complete"
                        obj["status"]["message"] = info.message or ""

    def preempt(self, name: str) -> None:
        """Kueue preempts the RayJob: it suspends it; KubeRay deletes its cluster (the Ray job stops)."""
        with self._lock:
            obj = self.jobs[name]
            obj["spec"]["suspend"] = True
            self._stop_ray(obj)
            obj["status"] = {"jobDeploymentStatus": "Suspended"}

    def _stop_ray(self, obj: dict[str, Any]) -> None:
        ray_id = obj["status"].get("jobId")
        if ray_id:
            with contextlib.suppress(RuntimeError):  # already ended
                self.ray.stop_job(ray_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile()
            except Exception as e:  # keep going, as a controller does; the test sees the effect
                print(f"stand-in controller: {e!r}")
            time.sleep(0.5)

    # -- lifecycle
    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "forkrl", "user": {"token": self.token}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "forkrl", "namespace": "ml"}}],
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self) -> KubeStandIn:
        self._serving = threading.Thread(target=self.server.run, daemon=True)
        self._serving.start()
        threading.Thread(target=self._loop, daemon=True).start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the stand-in API server did not start"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.should_exit = True
        with self._lock:
            for obj in self.jobs.values():
                self._stop_ray(obj)
        self._serving.join(timeout=30)  # the port is closed when this returns
