"""A typed client of the control plane's REST API, for the CLI (service/cli.py) and the study runner
(service/study.py): each call returns the API's own response model (service/schemas.py), job states
as `JobState`.

    with ForkrlClient("http://127.0.0.1:8000", token) as api:
        job = api.submit(cfg)
        page = api.metrics(job.id)  # from step 0: the evaluation before training

An answer of 400 or more raises `ApiError` (an httpx.HTTPStatusError whose text names the call, the
status and the service's message); an unreachable service raises httpx.TransportError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx

from actors.common.config import JobConfig
from actors.common.contract import JobState
from service.schemas import JobList, JobOut, MetricsOut, TokenInfo, TokenList, TokenOut

__all__ = ["ApiError", "ForkrlClient", "MetricsPage"]


class ApiError(httpx.HTTPStatusError):
    """The service answered with an error: `METHOD /path -> status: message`."""

    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
            detail = body.get("message") or body.get("detail")
        except ValueError:
            detail = response.text
        request = response.request
        super().__init__(
            f"{request.method} {request.url.path} -> {response.status_code}: {detail}",
            request=request,
            response=response,
        )

    @property
    def status(self) -> int:
        return self.response.status_code


class MetricsPage(MetricsOut):
    """GET /v1/jobs/{id}/metrics, with the job's state as a JobState."""

    state: JobState  # the API sends the same strings; here they are typed


def _checked(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        r.read()  # a streamed answer: its body names the error
        raise ApiError(r)
    return r


class ForkrlClient:
    def __init__(self, url: str, token: str, timeout: float | None = 30) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def __enter__(self) -> ForkrlClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return _checked(self.http.request(method, path, **kw))

    # -- jobs
    def submit(self, cfg: JobConfig, idempotency_key: str | None = None, priority: int = 0) -> JobOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"priority": priority} if priority else {}
        r = self._call("POST", "/v1/jobs", json=cfg.model_dump(mode="json"), headers=headers, params=params)
        return JobOut.model_validate(r.json())

    def jobs(self, state: JobState | None = None, limit: int = 50) -> JobList:
        """The newest jobs (one page)."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state.value
        return JobList.model_validate(self._call("GET", "/v1/jobs", params=params).json())

    def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> None:
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def metrics(self, job_id: str, after_step: int = -1) -> MetricsPage:
        """The step records after `after_step` (-1: from the first, step 0), one page (the service's default size)."""
        r = self._call("GET", f"/v1/jobs/{job_id}/metrics", params={"after_step": after_step})
        return MetricsPage.model_validate(r.json())

    def logs(self, job_id: str, lines: int, attempt: int | None = None) -> str:
        """The end of the driver log: the current attempt's, or attempt N's."""
        params = {"lines": lines} if attempt is None else {"lines": lines, "attempt": attempt}
        return self._call("GET", f"/v1/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """The current attempt's whole log as it grows, until the service ends the stream."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True}, timeout=None) as r:
            yield from _checked(r).iter_text()

    def events(self, job_id: str, after_step: int = -1) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events as (event, data): `state`, `metrics`, and `end` last."""
        event = ""
        params = {"after_step": after_step}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params=params, timeout=None) as r:
            for line in _checked(r).iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    yield event, json.loads(line[5:])

    # -- the admission queue
    def queue(self) -> dict[str, Any]:
        r: dict[str, Any] = self._call("GET", "/v1/queue").json()
        return r

    def quota(self, owner: str) -> dict[str, Any]:
        r: dict[str, Any] = self._call("GET", f"/v1/quotas/{owner}").json()
        return r

    def quotas(self) -> list[dict[str, Any]]:
        r: list[dict[str, Any]] = self._call("GET", "/v1/quotas").json()["quotas"]
        return r

    def set_quota(self, owner: str, body: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = self._call("PUT", f"/v1/quotas/{owner}", json=body).json()
        return r

    def delete_quota(self, owner: str) -> None:
        self._call("DELETE", f"/v1/quotas/{owner}")

    # -- tokens (admin only)
    def create_token(self, owner: str, admin: bool = False, expires_in_s: int | None = None) -> TokenOut:
        body = {"owner": owner, "admin": admin, "expires_in_s": expires_in_s}
        return TokenOut.model_validate(self._call("POST", "/v1/tokens", json=body).json())

    def tokens(self) -> TokenList:
        return TokenList.model_validate(self._call("GET", "/v1/tokens").json())

    def revoke_token(self, token_id: int) -> TokenInfo:
        return TokenInfo.model_validate(self._call("DELETE", f"/v1/tokens/{token_id}").json())

    def expire_token(self, token_id: int, expires_in_s: int | None) -> TokenInfo:
        r = self._call("PATCH", f"/v1/tokens/{token_id}", json={"expires_in_s": expires_in_s})
        return TokenInfo.model_validate(r.json())
