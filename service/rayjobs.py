"""The control plane's side of Ray: the Jobs API client, and the embedded local Ray head it starts
and owns when no Ray address is configured."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from actors.common.contract import JobState
from actors.common.demand import Demand
from service.admission import RayNode

log = logging.getLogger("forkrl.service.ray")

# Ray job status -> forkrl job state
RAY_TO_STATE = {
    "PENDING": JobState.PENDING.value,
    "RUNNING": JobState.RUNNING.value,
    "SUCCEEDED": JobState.SUCCEEDED.value,
    "FAILED": JobState.FAILED.value,
    "STOPPED": JobState.CANCELLED.value,
}


class _NodePage(BaseModel):
    result: list[RayNode]


class _NodeData(BaseModel):
    result: _NodePage


class _NodesAnswer(BaseModel):
    """The state API's answer: {"data": {"result": {"result": [node, ...]}}}."""

    data: _NodeData


class RayUnavailable(RuntimeError):
    """The Ray cluster could not be reached; the job stays as stored and is retried."""


class JobNotFound(LookupError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayHead:
    """`ray start --head` on loopback, owned by the service: started on startup, stopped on shutdown.

    Every port is picked free (the dashboard agent's default 52365 is often held by another Ray on
    the same machine, which makes job submission fail with 'No available agent'), and the head gets
    its own dashboard token.
    """

    def __init__(self, num_cpus: int) -> None:
        self.num_cpus = num_cpus or max(4, os.cpu_count() or 1)
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port, self.agent_port = _free_port(), _free_port(), _free_port()
        # a short private temp dir: Ray's socket paths must stay under 108 bytes, and every process of
        # this head carries the path in its command line, which is how stop() finds them
        self.temp_dir = Path(f"/tmp/forkrl-ray-{self.gcs_port}")
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # jobs run `python -m actors.train` with this venv
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("RAY_ADDRESS", None)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0")
        return env

    def _ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        ray_cli = shutil.which("ray", path=self.env["PATH"]) or "ray"
        return subprocess.run(
            [ray_cli, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        out = self._ray(
            "start", "--head", f"--num-cpus={self.num_cpus}", f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--dashboard-agent-listen-port={self.agent_port}", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"could not start the embedded Ray head: {out.stderr[-2000:]}")
        log.info(
            "embedded Ray head up: GCS 127.0.0.1:%d, dashboard %s, temp dir %s",
            self.gcs_port,
            self.address,
            self.temp_dir,
        )

    def stop(self) -> None:
        """Stop this head's processes only (`ray stop` would stop every Ray on the machine)."""
        import psutil  # comes with ray[default]

        mine = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.temp_dir) in a for a in (p.info["cmdline"] or [])):
                    mine += [p, *p.children(recursive=True)]
        for p in mine:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(mine, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        # `ray start` recorded this head as the machine's current cluster; don't leave a dead entry
        current = Path("/tmp/ray/ray_current_cluster")
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink()
        log.info("embedded Ray head stopped (%d processes)", len(mine))


class JobBackend(Protocol):
    """Where the control plane runs its jobs: Ray's Jobs API on one cluster (RayJobs), or a RayJob per
    attempt that Kueue admits (service.kueue.KueueJobs). Blocking calls: run them in a thread."""

    def ping(self) -> bool: ...

    def submit(self, job_id: str, entrypoint: str, runtime_env: dict[str, Any], priority: int = 0) -> bool: ...

    def status(self, job_id: str) -> tuple[str, str]: ...

    def stop(self, job_id: str) -> None: ...

    def delete(self, job_id: str) -> None: ...

    def log_tail(self, job_id: str, lines: int, max_bytes: int) -> str: ...

    def nodes(self) -> list[RayNode]: ...

    def tail(self, job_id: str) -> AsyncIterator[str]: ...

    def never_runs(self, demand: Demand) -> str: ...


REQUEST_TIMEOUT_S = 60.0  # one call to the Ray Jobs API; past it the call counts as "Ray unavailable"
NODES_TTL_S = 5.0  # how long a status call reuses the node list it read (one read per reconcile pass or so)


class RayJobs:
    """A thin wrapper over ray.job_submission.JobSubmissionClient (blocking calls: run them in a thread)."""

    def __init__(self, address: str, token: str = "") -> None:
        self.address = address
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client: Any = None
        self._node_states: tuple[float, dict[str, str]] | None = None  # (read at, node id -> state)

    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            class TimedClient(JobSubmissionClient):  # type: ignore[misc]
                # the SDK sends its requests without a timeout: a head that accepts the connection and
                # never answers would hold the reconciler forever
                def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
                    kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
                    return super()._do_request(method, endpoint, **kwargs)

            try:
                self._client = TimedClient(self.address, headers=self.headers)
            except Exception as e:  # connection refused, DNS, auth: all mean "not now"
                raise RayUnavailable(f"Ray at {self.address} is not reachable: {e}") from e
        return self._client

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until the head's job agent accepts work (it registers a few seconds after the head)."""
        deadline = time.time() + timeout_s
        last: Exception | None = None
        while time.time() < deadline:
            try:
                self.client().list_jobs()
                return
            except Exception as e:
                last, self._client = e, None
                time.sleep(1)
        raise RayUnavailable(f"Ray at {self.address} not ready after {timeout_s:.0f}s: {last}")

    def ping(self) -> bool:
        try:
            self.client().list_jobs()
            return True
        except Exception:
            self._client = None
            return False

    def submit(self, job_id: str, entrypoint: str, runtime_env: dict[str, Any], priority: int = 0) -> bool:
        """Submit with submission_id = job_id: a second submission of the same job is refused by Ray,
        so a crash between submitting and recording it cannot start the job twice. True when this
        call started it, False when Ray already had it. (The priority is the admission queue's.)"""
        try:
            self.client().submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env)
            return True
        except RuntimeError as e:
            if "already exists" in str(e):
                log.info("job %s was already submitted to Ray", job_id)
                return False
            if "No available agent" in str(e):
                raise RayUnavailable(str(e)) from e
            raise
        except Exception as e:
            self._client = None
            raise RayUnavailable(f"Ray at {self.address}: {e}") from e

    def status(self, job_id: str) -> tuple[str, str]:
        try:
            info = self.client().get_job_info(job_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                raise JobNotFound(job_id) from e
            self._client = None
            raise RayUnavailable(str(e)) from e
        except Exception as e:
            self._client = None
            raise RayUnavailable(f"Ray at {self.address}: {e}") from e
        state = RAY_TO_STATE.get(str(getattr(info.status, "value", info.status)), JobState.PENDING.value)
        node = getattr(info, "driver_node_id", None) or ""
        if state in (JobState.PENDING.value, JobState.RUNNING.value) and node and self._dead(node):
            # a head restarted with GCS fault tolerance keeps the record of a job whose driver died with the
            # old head, as running, for good (Ray 2.60): its driver's node says it ended
            return JobState.FAILED.value, (
                f"Job supervisor lost: the Ray node that ran its driver ({node}) died; Ray still reports the job "
                f"{state}"
            )
        return state, info.message or ""

    def _dead(self, node_id: str) -> bool:
        """Whether Ray lists this node as DEAD (the last node list read, if under NODES_TTL_S old)."""
        if self._node_states is None or time.monotonic() - self._node_states[0] > NODES_TTL_S:
            try:
                self.nodes()  # records what it read (the admission pass's read is usually fresh enough)
            except RayUnavailable:  # the node list cannot say: the job's own status stands
                return False
        return self._node_states is not None and self._node_states[1].get(node_id) == "DEAD"

    def stop(self, job_id: str) -> None:
        try:
            self.client().stop_job(job_id)
        except RuntimeError as e:
            if "does not exist" in str(e):
                raise JobNotFound(job_id) from e
            raise RayUnavailable(str(e)) from e

    def delete(self, job_id: str) -> None:
        try:
            self.client().delete_job(job_id)
        except Exception as e:  # the record is ours; Ray's copy may already be gone
            log.info("Ray kept no record of %s to delete: %s", job_id, e)

    def log_tail(self, job_id: str, lines: int, max_bytes: int) -> str:
        """The last `lines` lines of the job's driver log, and at most its last `max_bytes` bytes: read
        through the dashboard's log API, which tails on the node, so a long log never travels whole."""
        import httpx

        try:  # the log API finds a job's driver log by the node the driver ran on
            node = getattr(self.client().get_job_info(job_id), "driver_node_id", None) or ""
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                raise JobNotFound(job_id) from e
            raise RayUnavailable(str(e)) from e
        if not node:
            return ""  # not started on a node yet: no log
        url = f"{self.address.rstrip('/')}/api/v0/logs/file"
        params: dict[str, str | int] = {"submission_id": job_id, "node_id": node, "lines": lines, "timeout": 30}
        kept = bytearray()
        try:
            with httpx.stream("GET", url, params=params, headers=self.headers, timeout=60) as r:
                if r.status_code != 200:
                    text = r.read().decode(errors="replace")
                    if r.status_code == 404 or "not found" in text.lower() or "does not exist" in text.lower():
                        raise JobNotFound(job_id)
                    raise RayUnavailable(f"Ray log API answered {r.status_code}: {text[:300]}")
                for chunk in r.iter_bytes():
                    kept += chunk
                    if len(kept) > max_bytes:
                        del kept[: len(kept) - max_bytes]
        except httpx.HTTPError as e:
            raise RayUnavailable(f"Ray at {self.address}: {e}") from e
        return kept.decode(errors="replace")

    def nodes(self) -> list[RayNode]:
        """The cluster's nodes as Ray's state API lists them (their states kept for `_dead`)."""
        import httpx
        from pydantic import ValidationError

        url = f"{self.address.rstrip('/')}/api/v0/nodes"
        try:
            r = httpx.get(url, params={"limit": 10_000, "timeout": 30}, headers=self.headers, timeout=REQUEST_TIMEOUT_S)
            if r.status_code != 200:
                raise RayUnavailable(f"Ray's node list answered {r.status_code}: {r.text[:300]}")
            nodes = _NodesAnswer.model_validate_json(r.content).data.result.result
        except (httpx.HTTPError, ValidationError) as e:
            raise RayUnavailable(f"Ray at {self.address}: no node list: {e}") from e
        self._node_states = (time.monotonic(), {n.node_id: n.state for n in nodes})
        return nodes

    async def tail(self, job_id: str) -> AsyncIterator[str]:
        async for chunk in self.client().tail_job_logs(job_id):
            yield chunk

    def never_runs(self, demand: Demand) -> str:
        """Nothing: whether a job fits this cluster is the admission queue's question (its nodes)."""
        return ""
