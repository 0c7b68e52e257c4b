"""An attacker with an ordinary owner token against a real server: the tenancy policy, token
lifecycle, private files, and every input that once answered 500. Ray is not reachable (jobs stay
queued), which these tests do not need."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ROOT, UNREACHABLE_RAY, Server, arm_ingest
from .test_api import TINY, make_token, submit


def jsonl_job(path: str, **extra: object) -> dict:
    return {**TINY, "data": {**TINY["data"], "source": {"type": "jsonl", "path": path}}, **extra}


@pytest.fixture
def shared(tmp_path):
    """The default shared tenancy with a data root, one approved plugin module and one MLflow URI."""
    root = tmp_path / "datasets"
    root.mkdir()
    (root / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (root / "escape.jsonl").symlink_to("/etc/passwd")
    (root / "loop").symlink_to(root / "loop")  # resolving it raises: refused, not a 500
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", UNREACHABLE_RAY)
    server.env.update(
        FORKRL_DATA_ROOTS=json.dumps([str(root)]),
        FORKRL_ALLOWED_PLUGINS=json.dumps(["tests.toy_rewards:*"]),
        FORKRL_TRACKING_URIS=json.dumps(["http://mlflow.internal:5000"]),
    )
    server.start()
    yield server, root
    server.stop()


def test_the_tenancy_policy_refuses_code_foreign_files_and_foreign_checkpoints(shared, tmp_path):
    server, root = shared
    alice, bob = make_token(server, "alice"), make_token(server, "bob")
    runs = tmp_path / "data" / "runs"
    with server.client(alice) as a, server.client(bob) as b, server.client() as admin:
        bobs_job = submit(b).json()["id"]
        refused = [
            *[({**TINY, "reward": {"verifiers": [{"type": "plugin", "function": f}]}}, "reward.verifiers.0.function")
              for f in ("os:system", "subprocess:getoutput", "builtins:exec", "timeit:timeit")],
            ({**TINY, "environment": {"tool": {"type": "plugin", "function": "os:system"}, "max_tokens": 64}},
             "environment.tool.function"),
            (jsonl_job("/etc/passwd"), "data.source.path"),
            (jsonl_job(f"{root}/../../../etc/passwd"), "data.source.path"),
            (jsonl_job(str(root / "escape.jsonl")), "data.source.path"),  # a symlink out of the root
            (jsonl_job(str(root / "loop" / "train.jsonl")), "data.source.path"),
            ({**TINY, "data": {**TINY["data"], "eval_source": {"type": "jsonl", "path": "/"}}},
             "data.eval_source.path"),
            ({**TINY, "model": {"path": "/"}}, "model.path"),
            ({**TINY, "model": {"path": f"{root}/.."}}, "model.path"),
            ({**TINY, "trainer": {**TINY["trainer"], "resume": "/tmp/planted"}}, "trainer.resume"),
            ({**TINY, "trainer": {**TINY["trainer"], "resume": f"{runs}/{bobs_job}/checkpoints/step_00000002"}},
             "trainer.resume"),
            ({**TINY, "trainer": {**TINY["trainer"], "resume": f"{runs}/../runs/{bobs_job}"}}, "trainer.resume"),
            ({**TINY, "tracking": {"mlflow_tracking_uri": "file:///tmp/steal"}}, "tracking.mlflow_tracking_uri"),
            ({**TINY, "tracking": {"wandb_project": "exfil"}}, "tracking.wandb_project"),
        ]  # fmt: skip
        for body, field in refused:
            r = submit(a, body)
            assert r.status_code == 403, (field, r.text)
            assert r.json()["detail"].startswith(f"{field} = ") and "tenancy policy" in r.json()["detail"], r.text
        assert a.get("/v1/jobs").json()["jobs"] == []  # nothing refused was stored
        own = submit(a).json()["id"]
        allowed = [
            {**TINY, "reward": {"verifiers": [{"type": "plugin", "function": "tests.toy_rewards:lowercase_fraction"}]}},
            jsonl_job(str(root / "train.jsonl")),
            jsonl_job(f"{root}/sub/../train.jsonl"),
            {**TINY, "trainer": {**TINY["trainer"], "resume": f"{runs}/{own}/checkpoints/step_00000002"}},
            {**TINY, "tracking": {"mlflow_tracking_uri": "http://mlflow.internal:5000"}},
        ]
        for body in allowed:
            assert submit(a, body).status_code == 201, body
        # admin tokens are the operator's: not restricted
        operator = {**TINY, "reward": {"verifiers": [{"type": "plugin", "function": "os:system"}]}}
        assert submit(admin, operator).status_code == 201


def test_token_rotation_listing_revocation_and_expiry(tmp_path):
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", UNREACHABLE_RAY).start()
    old_admin = server.admin_token
    try:
        with server.client() as admin:
            made = admin.post("/v1/tokens", json={"owner": "alice", "expires_in_s": 3600})
            assert made.status_code == 201
            alice = made.json()
            assert alice["expires_at"] is not None and alice["revoked_at"] is None
            carol = admin.post("/v1/tokens", json={"owner": "carol"}).json()
            for bad in ({"owner": "x", "admin": "yes"}, {"owner": "x", "admin": 1},
                        {"owner": "x", "expires_in_s": "60"}, {"owner": "x", "expires_in_s": 5}):  # fmt: skip
                r = admin.post("/v1/tokens", json=bad)
                assert r.status_code == 422, (bad, r.text)
            listed = admin.get("/v1/tokens").json()["tokens"]
            assert [(t["owner"], t["admin"], t["bootstrap"]) for t in listed] == [
                ("admin", True, True), ("alice", False, False), ("carol", False, False)]  # fmt: skip
            text = json.dumps(listed)
            assert alice["token"] not in text and "hash" not in text and old_admin not in text
        with server.client(alice["token"]) as a:
            assert a.get("/v1/jobs").status_code == 200
            assert a.get("/v1/tokens").status_code == 403 and a.delete(f"/v1/tokens/{carol['id']}").status_code == 403
        with server.client() as admin:
            assert admin.patch(f"/v1/tokens/{alice['id']}", json={"expires_in_s": 0}).status_code == 200
            assert admin.delete(f"/v1/tokens/{carol['id']}").json()["revoked_at"] is not None
            assert admin.delete("/v1/tokens/999999").status_code == 404
            assert admin.delete("/v1/tokens/1").status_code == 409  # the bootstrap token: rotated, not revoked
        for gone in (alice["token"], carol["token"]):
            r = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {gone}"})
            assert r.status_code == 401 and "revoked or expired" in r.json()["detail"]
        with server.client() as admin:
            dave = admin.post("/v1/tokens", json={"owner": "dave"}).json()["token"]
        # the operator rotates FORKRL_ADMIN_TOKEN: the old one stops working, tokens it made do not
        server.stop()
        server.admin_token = server.env["FORKRL_ADMIN_TOKEN"] = "rotated-" + old_admin
        server.start()
        old = httpx.post(f"{server.url}/v1/tokens", json={"owner": "x", "admin": True},
                         headers={"Authorization": f"Bearer {old_admin}"})  # fmt: skip
        assert old.status_code == 401
        with server.client() as admin:
            rows = {t["id"]: t for t in admin.get("/v1/tokens").json()["tokens"]}
            assert rows[1]["bootstrap"] and rows[1]["revoked_at"] is not None
        with server.client(dave) as d:
            assert d.get("/v1/jobs").status_code == 200
    finally:
        server.stop()


def test_the_job_store_and_data_dir_are_private(tmp_path):
    data = tmp_path / "data"
    server = Server(data, f"sqlite:///{data / 'forkrl.db'}", UNREACHABLE_RAY).start()
    try:
        with server.client() as c:
            assert submit(c).status_code == 201
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for name in ("forkrl.db", "forkrl.db-wal"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    finally:
        server.stop()


def _deep(n: int) -> object:
    value: object = 1
    for _ in range(n):
        value = {"a": value}
    return value


def test_inputs_that_once_answered_500(api_server, database_url):
    with api_server.client() as c:
        raw = {"Content-Type": "application/json"}
        for field, text in [
            ("algorithm.top_entropy_quantile", '{"algorithm": {"top_entropy_quantile": NaN}}'),
            ("reward.verifiers.0.weight", '{"reward": {"verifiers": [{"type": "numeric", "weight": Infinity}]}}'),
            ("algorithm.kl_coef", '{"algorithm": {"kl_coef": NaN}}'),
            ("learner.grad_clip", '{"learner": {"grad_clip": -Infinity}}'),
            ("name", '{"name": "\\ud800"}'),  # a lone surrogate
            ("trainer.steps", '{"trainer": {"steps": "20"}}'),  # strict: no strings for numbers
            ("data.use_chat_template", '{"data": {"use_chat_template": "yes"}}'),
            ("data.system_prompt", json.dumps({"data": {"system_prompt": "x" * 900_000}})),
            ("reward.verifiers.0.pattern", '{"reward": {"verifiers": [{"type": "regex", "pattern": "("}]}}'),
            ("trainer.seed", '{"trainer": {"seed": 100000000000000000000000000000}}'),
            ("rollout.ray_resources", json.dumps({"rollout": {"ray_resources": {f"r{i}": 1 for i in range(40)}}})),
        ]:
            r = c.post("/v1/jobs", content=text, headers=raw)
            assert r.status_code == 422, (field, r.status_code, r.text[:300])
            assert field in r.json()["message"], (field, r.json()["message"][:300])
        assert c.get("/v1/jobs").json()["jobs"] == []

        job = submit(c).json()
        url, token = f"/v1/jobs/{job['id']}/ingest", arm_ingest(database_url, job["id"])
        auth = {"Authorization": f"Bearer {token}"}
        for body in [
            {"metrics": [{"step": 10**20}]},
            {"metrics": [{"step": -1}]},
            {"metrics": [{"step": "3"}]},
            {"metrics": [{"no": "step"}]},
            {"checkpoints": [{"step": 10**20, "path": "x"}]},
            {"metrics": [{"step": 1, "deep": _deep(300)}]},
            {"metrics": [{"step": 1, "big": "x" * 300_000}]},
        ]:
            r = c.post(url, json=body, headers=auth)
            assert r.status_code == 422, (str(body)[:80], r.status_code, r.text[:200])
        deeper = '{"metrics": [{"step": 1, "deep": ' + '{"a": ' * 600 + "1" + "}" * 600 + "}]}"
        assert c.post(url, content=deeper, headers={**auth, **raw}).status_code == 422
        for lone in ('{"metrics": [{"step": 1, "note": "\\ud800"}]}', '{"metrics": [{"step": 1, "\\udfff": 1}]}',
                     '{"checkpoints": [{"step": 1, "path": "\\ud800"}]}'):  # fmt: skip
            assert c.post(url, content=lone, headers={**auth, **raw}).status_code == 422, lone

        def push(_: int) -> int:
            with httpx.Client(base_url=api_server.url, timeout=60) as one:
                return one.post(url, json={"metrics": [{"step": 5, "reward/mean": 0.5}]}, headers=auth).status_code

        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(push, range(10)))
        assert codes == [202] * 10
        stored = c.get(f"/v1/jobs/{job['id']}/metrics").json()
        assert [m["step"] for m in stored["metrics"]] == [5] and stored["last_step"] == 5
        c.post(f"/v1/jobs/{job['id']}/cancel")
        late = c.post(url, json={"metrics": [{"step": 6}]}, headers=auth)
        assert late.status_code == 409 and "CANCELLED" in late.json()["detail"]
        assert c.get(f"/v1/jobs/{job['id']}/metrics").status_code == 200
    with api_server.client() as admin:  # /metrics counts every owner's jobs: an admin or the scrape token
        counted = admin.get("/metrics").text
    assert 'status="5' not in counted, [ln for ln in counted.splitlines() if 'status="5' in ln]


def test_every_server_error_is_counted(tmp_path):
    # the counting middleware alone, in process: no input reaches a 500 any more, so a route that raises
    # stands in for the bug that would (the app's lifespan, and with it Ray, is not started)
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, ray_address=UNREACHABLE_RAY))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> int:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/boom")).status_code

    assert asyncio.run(call()) == 500
    svc = app.state.service
    assert svc.registry.get_sample_value(
        "forkrl_http_requests_total", {"method": "GET", "route": "/boom", "status": "500"}
    ) == 1.0  # fmt: skip


def test_streams_end_and_log_reads_are_bounded(tmp_path):
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", UNREACHABLE_RAY)
    server.env["FORKRL_STREAM_IDLE_S"] = "2"
    server.start()
    try:
        with server.client() as c:
            job = submit(c).json()["id"]  # never starts: Ray is not reachable
            t0 = time.monotonic()
            with c.stream("GET", f"/v1/jobs/{job}/events", timeout=30) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data:")]
            # last_step: the last step sent, -1 for none yet (reconnect with after_step = last_step to go on)
            assert json.loads(lines[-1][5:]) == {"reason": "idle", "last_step": -1}
            with c.stream("GET", f"/v1/jobs/{job}/logs", params={"follow": True}, timeout=30) as r:
                text = "".join(r.iter_text())
            assert "reconnect" in text and time.monotonic() - t0 < 20
            for lines_param in (0, 100_001, "all"):
                assert c.get(f"/v1/jobs/{job}/logs", params={"lines": lines_param}).status_code == 422
            assert c.get(f"/v1/jobs/{job}/logs", params={"lines": 10}).status_code == 200
    finally:
        server.stop()


def test_help_starts_nothing():
    out = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, FORKRL_PORT="9"))  # fmt: skip
    assert out.returncode == 0 and "--port" in out.stdout and "Usage" in out.stdout, out.stdout + out.stderr
