"""The REST API through a real uvicorn server, on SQLite and on a real PostgreSQL. Ray is not
reachable here on purpose: jobs stay queued, which is what these tests need (the job lifecycle on
a real Ray is tests/service/test_jobs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from .conftest import ROOT, Server, arm_ingest

TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def submit(c: httpx.Client, body: dict | None = None, **headers: str) -> httpx.Response:
    return c.post("/v1/jobs", json=body if body is not None else TINY, headers=headers)


def make_token(server: Server, owner: str) -> str:
    with server.client() as admin:
        r = admin.post("/v1/tokens", json={"owner": owner})
        assert r.status_code == 201, r.text
        return r.json()["token"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_health_readiness_and_prometheus(api_server):
    assert httpx.get(f"{api_server.url}/healthz").json()["status"] == "ok"
    deadline = time.time() + 30
    while (r := httpx.get(f"{api_server.url}/readyz")).json()["checks"].get("reconciler") != "leader":
        assert time.time() < deadline, r.text  # the first reconcile pass (after Ray's wait) elects it
        time.sleep(0.5)
    # ready: the job store answers; Ray's state is reported, not required (the API keeps serving and
    # jobs wait in the store while the head is away)
    assert r.status_code == 200
    assert r.json()["checks"] == {"database": "ok", "ray": "not reachable", "reconciler": "leader"}
    with api_server.client() as admin:  # /metrics counts every owner's jobs: an admin or the scrape token
        text = admin.get("/metrics").text
    assert 'forkrl_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert "forkrl_ray_reachable 0.0" in text and "forkrl_reconciler_leader 1.0" in text
    assert "forkrl_jobs_submitted_total 0.0" in text
    paths = set(httpx.get(f"{api_server.url}/openapi.json").json()["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/metrics",
            "/v1/jobs/{job_id}/logs", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/checkpoints",
            "/healthz", "/readyz", "/metrics"} <= paths  # fmt: skip


def test_auth_401_and_403(api_server):
    assert httpx.get(f"{api_server.url}/v1/jobs").status_code == 401
    bad = httpx.get(f"{api_server.url}/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    alice, bob = make_token(api_server, "alice"), make_token(api_server, "bob")
    with api_server.client(alice) as a, api_server.client(bob) as b, api_server.client() as admin:
        job = submit(a).json()
        assert job["owner"] == "alice" and job["state"] == "QUEUED"
        for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/metrics"), ("DELETE", "")]:
            assert b.request(method, f"/v1/jobs/{job['id']}{path}").status_code == 403
        assert b.get("/v1/jobs").json()["jobs"] == []  # bob sees only his own
        assert [j["id"] for j in admin.get("/v1/jobs").json()["jobs"]] == [job["id"]]
        assert b.post("/v1/tokens", json={"owner": "mallory"}).status_code == 403  # only admins create tokens


def test_tokens_are_stored_hashed(api_server, database_url):
    token = make_token(api_server, "carol")
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as c:
        stored = [r[0] for r in c.execute(text("SELECT token_hash FROM tokens"))]
    engine.dispose()
    assert token not in stored and api_server.admin_token not in stored
    import hashlib

    assert hashlib.sha256(token.encode()).hexdigest() in stored


def test_idempotent_submit(api_server):
    with api_server.client() as c:
        first = submit(c, **{"Idempotency-Key": "run-42"})
        assert first.status_code == 201
        again = submit(c, **{"Idempotency-Key": "run-42"})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        other = dict(TINY, trainer=dict(TINY["trainer"], steps=7))
        clash = submit(c, other, **{"Idempotency-Key": "run-42"})
        assert clash.status_code == 409 and "run-42" in clash.json()["detail"]
        assert len(c.get("/v1/jobs").json()["jobs"]) == 1
        assert submit(c).json()["id"] != first.json()["id"]  # no key: a new job each time


BAD_BODIES = [
    ({"algorithm": {"top_entropy_quantile": 0}}, "algorithm.top_entropy_quantile = 0"),
    ({"algorithm": {"top_entropy_quantile": 1.5}}, "algorithm.top_entropy_quantile = 1.5"),
    ({"trainer": {"steps": "many"}}, "trainer.steps = 'many'"),
    ({"rollout": {"group_size": -3}}, "rollout.group_size = -3"),
    ({"learner": {"zero_stage": 5}}, "learner.zero_stage = 5"),
    ({"algorithm": {"top_entropy_quantlie": 0.2}}, "algorithm.top_entropy_quantlie = 0.2: unknown field"),
    ({"bogus": 1}, "bogus = 1: unknown field"),
]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_bad_bodies_are_422_naming_the_field_and_value(api_server):
    with api_server.client() as c:
        for body, expected in BAD_BODIES:
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 422, (body, r.text)
            assert expected in r.json()["message"], (body, r.json()["message"])
        assert c.get("/v1/jobs").json()["jobs"] == []  # nothing stored


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_malformed_huge_and_bad_ids(api_server):
    with api_server.client() as c:
        r = c.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/jobs", content=b"[1, 2]", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/jobs", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
        assert r.status_code == 413

        def chunks():  # no Content-Length: the body arrives chunked and is cut off at the limit
            for _ in range(64):
                yield b"x" * (64 << 10)

        r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "content-length" not in {k.lower() for k in r.request.headers}
        assert c.get("/v1/jobs/not-a-job").status_code == 422
        assert c.get("/v1/jobs/forkrl-0000000000000000").status_code == 404
        assert c.get("/v1/jobs", params={"cursor": "abc"}).status_code == 422
        assert c.get("/v1/jobs", params={"state": "EXPLODED"}).status_code == 422
        assert c.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_list_filter_and_cursor_pagination(api_server):
    with api_server.client() as c:
        ids = [submit(c).json()["id"] for _ in range(5)]
        c.post(f"/v1/jobs/{ids[1]}/cancel")
        seen, cursor = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["id"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]  # newest first, each once
        assert [j["id"] for j in c.get("/v1/jobs", params={"state": "CANCELLED"}).json()["jobs"]] == [ids[1]]
        assert len(c.get("/v1/jobs", params={"state": "QUEUED"}).json()["jobs"]) == 4


def test_cancel_is_idempotent_and_delete_needs_a_finished_job(api_server):
    with api_server.client() as c:
        job = submit(c).json()
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 409 and "QUEUED" in r.json()["detail"]
        one = c.post(f"/v1/jobs/{job['id']}/cancel").json()
        two = c.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert one["state"] == two["state"] == "CANCELLED"
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_ingest_metrics_checkpoints_and_events(api_server, database_url):
    with api_server.client() as c:
        job = submit(c).json()
        assert "report_token" not in job["config"]["tracking"]  # the ingest token is never returned
        ingest_token = arm_ingest(database_url, job["id"])
        url = f"/v1/jobs/{job['id']}/ingest"
        assert c.post(url, json={"metrics": []}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        auth = {"Authorization": f"Bearer {ingest_token}"}
        rows = [{"step": 1, "reward/mean": 0.1, "entropy/mean": float("nan")}, {"step": 2, "reward/mean": 0.3}]
        r = c.post(url, content=json.dumps({"metrics": rows}), headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 202 and r.json() == {"metrics_stored": 2, "stop": False}
        again = c.post(url, json={"metrics": [{"step": 1}]}, headers=auth)
        assert again.json() == {"metrics_stored": 0, "stop": False}  # each step is stored once
        c.post(url, json={"checkpoints": [{"step": 2, "path": "/runs/x/checkpoints/step_00000002"}]}, headers=auth)
        m = c.get(f"/v1/jobs/{job['id']}/metrics").json()
        assert [x["step"] for x in m["metrics"]] == [1, 2] and m["last_step"] == 2
        assert m["metrics"][0]["entropy/mean"] is None  # NaN is stored as null
        assert [
            x["step"] for x in c.get(f"/v1/jobs/{job['id']}/metrics", params={"after_step": 1}).json()["metrics"]
        ] == [2]
        assert [x["step"] for x in c.get(f"/v1/jobs/{job['id']}/checkpoints").json()["checkpoints"]] == [2]
        c.post(f"/v1/jobs/{job['id']}/cancel")
        events = []
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((kind, json.loads(line[5:])))
        assert [e[1]["state"] for e in events if e[0] == "state"] == ["QUEUED", "CANCELLED"]
        assert [e[1]["step"] for e in events if e[0] == "metrics"] == [1, 2]
        assert events[-1] == ("end", {"state": "CANCELLED", "last_step": 2})


def test_a_lora_job_says_so_with_its_rank_and_trainable_parameters(api_server, database_url):
    with api_server.client() as c:
        job = submit(c, {**TINY, "model": {**TINY["model"], "lora": {"rank": 8, "alpha": 16}}}).json()
        # sync auto, stored as what it chose: merged weights for engines on CPU
        assert job["lora"] == {"rank": 8, "alpha": 16, "sync": "merged"} and job["trainable_params"] is None
        assert job["training"] == "LoRA rank 8 (alpha 16, merged sync)"  # the counts come with the run
        full = submit(c).json()
        assert full["lora"] is None and full["training"] == "full fine-tuning"
        assert full["demand"]["cpus"] == 3 and full["demand"]["resources"] == {"CPU": 3.0}
        token = arm_ingest(database_url, job["id"])
        record = {"step": 1, "model/trainable_params": 921_600, "model/params": 135_436_608}
        r = c.post(
            f"/v1/jobs/{job['id']}/ingest", json={"metrics": [record]}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 202, r.text
        got = c.get(f"/v1/jobs/{job['id']}").json()
        assert (got["trainable_params"], got["params"]) == (921_600, 135_436_608)  # a BIGINT column: any model
    status = cli(api_server, "status", job["id"])
    assert "trains: LoRA rank 8 (alpha 16, merged sync): 0.92 M of 135.4 M parameters" in status.stdout, status.stdout


def test_jobs_survive_a_restart(api_server):
    with api_server.client() as c:
        job = submit(c).json()
    api_server.stop()
    api_server.start()
    with api_server.client() as c:
        again = c.get(f"/v1/jobs/{job['id']}").json()
    assert again["id"] == job["id"] and again["config"] == job["config"]


def test_production_needs_an_admin_token(tmp_path):
    server = Server(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", "http://127.0.0.1:9")
    server.env["FORKRL_ADMIN_TOKEN"] = ""
    with pytest.raises(RuntimeError, match="FORKRL_ADMIN_TOKEN must be set"):
        server.start(timeout=60)


def cli(server: Server, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FORKRL_URL=server.url, FORKRL_TOKEN=token or server.admin_token)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cli_mirrors_ray_job(api_server):
    out = cli(api_server, "submit", "examples/tiny.yaml", "--set", "trainer.steps=2")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[1]
    listed = cli(api_server, "list")
    assert job_id in listed.stdout and "QUEUED" in listed.stdout
    status = cli(api_server, "status", job_id)
    assert "step 0/2" in status.stdout
    # what the job asks of the cluster, from its config: engine 1 CPU, 2 learners x 1 CPU, reward workers 0
    needs = "needs: 3 CPUs, 0 GPUs: rollout engines 1 x 1 CPU, learners 2 x 1 CPU, reward workers 2 x 0 CPU"
    assert needs in status.stdout, status.stdout
    assert cli(api_server, "logs", job_id).returncode == 0  # not started: empty log
    assert "CANCELLED" in cli(api_server, "cancel", job_id).stdout
    assert cli(api_server, "delete", job_id).returncode == 0
    assert cli(api_server, "list").stdout.strip() == "no jobs"
    bad = cli(api_server, "submit", "examples/tiny.yaml", "--set", "algorithm.top_entropy_quantile=1.5")
    assert bad.returncode == 2 and "algorithm.top_entropy_quantile = 1.5" in bad.stderr
    missing = cli(api_server, "status", "forkrl-0000000000000000")
    assert missing.returncode == 1 and "404" in missing.stderr
    denied = cli(api_server, "list", token="wrong")
    assert denied.returncode == 1 and "401" in denied.stderr
    made = cli(api_server, "token", "create", "dave")
    assert made.returncode == 0
    dave = made.stdout.strip()
    assert len(dave) >= 32 and cli(api_server, "list", token=dave).stdout.strip() == "no jobs"
    assert "403" in cli(api_server, "token", "create", "eve", token=dave).stderr  # not an admin


def test_replicas_on_postgresql_migrate_once_and_run_one_reconciler(postgres_url, tmp_path):
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import create_engine, text

    from .conftest import UNREACHABLE_RAY

    servers = [Server(tmp_path / f"data{i}", postgres_url, UNREACHABLE_RAY) for i in range(2)]
    servers[1].admin_token = servers[1].env["FORKRL_ADMIN_TOKEN"] = servers[0].admin_token  # one bootstrap token

    def role(s: Server) -> str:
        return httpx.get(f"{s.url}/readyz", timeout=10).json()["checks"]["reconciler"]

    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once on an empty database: one migrates, one waits
            list(pool.map(lambda s: s.start(), servers))
        deadline = time.time() + 30
        while sorted(role(s) for s in servers) != ["leader", "standby"]:
            assert time.time() < deadline, [role(s) for s in servers]
            time.sleep(0.5)
        with servers[1].client() as c:
            job = submit(c).json()
        with servers[0].client() as c:
            assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "QUEUED"  # one store behind both
        leader, standby = sorted(servers, key=role)  # "leader" < "standby"
        leader.stop(signal.SIGKILL)  # the leader dies: its session, and the lock with it, ends
        deadline = time.time() + 30
        while role(standby) != "leader":
            assert time.time() < deadline, "the standby did not take over the reconciler"
            time.sleep(0.5)
    finally:
        for s in servers:
            s.stop()
        engine = create_engine(postgres_url)
        with engine.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()


def test_each_pool_lands_on_its_group_when_the_chart_says_so(tmp_path):
    from actors.common.config_load import load_config
    from service.core import Service
    from service.settings import Settings

    cfg = load_config(None, ["learner.ray_resources={gpu_pool: 1}"])
    placed = Service(Settings(data_dir=tmp_path, pool_resources=True)).effective_config("forkrl-0000000000000001", cfg)
    assert placed.rollout.ray_resources == {"forkrl_rollout": 1.0}
    assert placed.reward.ray_resources == {"forkrl_reward": 1.0}
    assert placed.learner.ray_resources == {"gpu_pool": 1.0}  # the job's own placement stands
    anywhere = Service(Settings(data_dir=tmp_path)).effective_config("forkrl-0000000000000001", cfg)
    assert anywhere.rollout.ray_resources == {} and anywhere.reward.ray_resources == {}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_config_check_names_fields_with_their_yaml_lines(api_server):
    def check(c: httpx.Client, text: str) -> dict:
        r = c.post("/v1/configs/validate", json={"yaml": text})
        assert r.status_code == 200, r.text
        return r.json()

    good = yaml.safe_dump(TINY, sort_keys=False)
    with api_server.client() as admin:
        ok = check(admin, good)
        assert ok["valid"] and ok["errors"] == [] and ok["config"]["algorithm"]["top_entropy_quantile"] == 0.2
        assert submit(admin, ok["config"]).status_code == 201  # what it returns is what POST /v1/jobs takes
        # a bad value and an unknown key: each error carries the line of its own key
        bad = good.replace("top_entropy_quantile: 0.2", "top_entropy_quantile: 1.5\n  clip_hgh: 0.3")
        lines = bad.splitlines()
        got = {e["field"]: e for e in check(admin, bad)["errors"]}
        assert set(got) == {"algorithm.top_entropy_quantile", "algorithm.clip_hgh"}
        assert lines[got["algorithm.top_entropy_quantile"]["line"] - 1].strip() == "top_entropy_quantile: 1.5"
        assert got["algorithm.top_entropy_quantile"]["input"] == "1.5"
        assert lines[got["algorithm.clip_hgh"]["line"] - 1].strip() == "clip_hgh: 0.3"
        # strict as the API: a quoted number is a string; a verifier inside a list is found by index
        quoted = good.replace("max_new_tokens: 8", "max_new_tokens: '8'").replace("pattern:", "patern:")
        errs = {e["field"]: e["line"] for e in check(admin, quoted)["errors"]}
        qlines = quoted.splitlines()
        assert "max_new_tokens: '8'" in qlines[errs["rollout.max_new_tokens"] - 1]
        assert "patern" in qlines[errs["reward.verifiers.0.patern"] - 1]
        # not YAML, not a mapping, aliases (a billion-laughs expansion), deep nesting: all 200 with a reason
        syntax = check(admin, "name: x\nrollout: {group_size: 4\n")["errors"][0]
        assert syntax["field"] == "yaml" and syntax["line"] is not None and "not valid YAML" in syntax["msg"]
        assert "mapping" in check(admin, "- 1\n- 2\n")["errors"][0]["msg"]
        bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        )
        alias = check(admin, bomb)["errors"][0]
        assert "aliases" in alias["msg"] and alias["line"] == 2
        assert not check(admin, "a: " + "[" * 20_000 + "]" * 20_000)["valid"]
        assert check(admin, "")["config"]["name"] == "forkrl-run"  # an empty document: every default, as POST {}
        r = admin.post("/v1/configs/validate", json={"yaml": "x" * (200 * 1024)})
        assert r.status_code in (413, 422)  # over the config bound: refused, not parsed
    # the tenancy policy for the caller, with the line of the refused field
    alice = make_token(api_server, "alice")
    with api_server.client(alice) as c:
        evil = yaml.safe_dump({**TINY, "reward": {"verifiers": [{"type": "plugin", "function": "os:system"}]}})
        refused = check(c, evil)
        assert not refused["valid"] and refused["errors"][0]["type"] == "policy"
        assert "os:system" in evil.splitlines()[refused["errors"][0]["line"] - 1]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_scalar_metrics_and_samples_of_a_step(api_server, database_url):
    with api_server.client() as c:
        job = submit(c).json()
        ingest = arm_ingest(database_url, job["id"])
        sample = {"prompt": "1+1", "answer": "2", "reward": 1.0, "tokens": ["2"], "entropy": [0.5], "kept": [1],
                  "truncated": False}  # fmt: skip
        forking = [{"id": 17, "text": "2", "kept": 1, "dropped": 0}]
        records = [
            {"step": 1, "reward/mean": 0.5, "samples": [sample], "forking_tokens": forking, "nan": None},
            {"step": 2, "reward/mean": 0.7, "entropy/top_forking_tokens": [[17, 1]]},
        ]
        r = httpx.post(f"{api_server.url}/v1/jobs/{job['id']}/ingest", json={"metrics": records},
                       headers={"Authorization": f"Bearer {ingest}"})  # fmt: skip
        assert r.status_code == 202 and r.json() == {"metrics_stored": 2, "stop": False}, r.text
        full = c.get(f"/v1/jobs/{job['id']}/metrics").json()["metrics"]
        assert full[0]["samples"] == [sample]
        scal = c.get(f"/v1/jobs/{job['id']}/metrics", params={"view": "scalars"}).json()["metrics"]
        assert scal == [{"step": 1, "reward/mean": 0.5, "nan": None, "samples/n": 1}, {"step": 2, "reward/mean": 0.7}]
        newest = c.get(f"/v1/jobs/{job['id']}/samples").json()  # step 2 has none: the newest with samples
        assert newest == {"job_id": job["id"], "step": 1, "samples": [sample], "forking_tokens": forking}
        r = c.get(f"/v1/jobs/{job['id']}/samples", params={"step": 2})
        assert r.status_code == 404 and "step 2" in r.json()["detail"]
        assert c.get(f"/v1/jobs/{job['id']}/samples", params={"step": 0}).status_code == 422
        assert c.get(f"/v1/jobs/{job['id']}/metrics", params={"view": "all"}).status_code == 422
    with api_server.client(make_token(api_server, "mallory")) as m:
        assert m.get(f"/v1/jobs/{job['id']}/samples").status_code == 403


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_dashboard_is_served_with_a_script_policy(api_server):
    page = httpx.get(f"{api_server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # plotly.js from the installed plotly package, named by its version
    src = next(s.split('"')[1] for s in page.text.split("<script src=")[1:] if "plotly" in s)
    js = httpx.get(f"{api_server.url}{src}")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript") and len(js.content) > 1e6
    assert httpx.get(f"{api_server.url}/ui/app.js").status_code == 200
    for bad in ("/ui/..%2Fapp.py", "/ui/index.html", "/ui/nope.js", "/ui/%2e%2e%2fsettings.py"):
        assert httpx.get(f"{api_server.url}{bad}").status_code == 404, bad
