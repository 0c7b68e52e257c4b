"""Abuse by an ordinary tenant (issue 36) against a real server: submission floods, job counts,
pool sizes and Ray resources past the operator's limits, an owner name shared with the operator,
what an anonymous caller sees, and the headers of every answer. Each test replays the attack the
issue reports; the limits are set small so a few requests reach them. Ray is not reachable: jobs
stay queued, which is all a limit needs."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat

import httpx
import pytest

from .conftest import UNREACHABLE_RAY, Server
from .test_api import TINY, make_token, submit

SCRAPE = secrets.token_urlsafe(24)
LIMITS = {
    "FORKRL_MAX_JOBS_PER_OWNER": "3",
    "FORKRL_MAX_ACTIVE_JOBS_PER_OWNER": "2",
    "FORKRL_SUBMIT_BURST": "4",
    "FORKRL_SUBMIT_RATE_PER_MINUTE": "6",  # one more every 10 s: none comes back within a test
    "FORKRL_MAX_ROLLOUT_ENGINES": "4",
    "FORKRL_MAX_REWARD_WORKERS": "8",
    "FORKRL_MAX_LEARNERS": "4",
    "FORKRL_MAX_GPUS_PER_ACTOR": "2",
    "FORKRL_MAX_JOB_GPUS": "4",
    "FORKRL_MAX_JOB_CPUS": "16",
    "FORKRL_MAX_CPU_KV_CACHE_GIB": "8",
    "FORKRL_METRICS_TOKEN": SCRAPE,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("abuse")
    srv = Server(base / "data", f"sqlite:///{base / 'jobs.db'}", UNREACHABLE_RAY)
    srv.env.update(LIMITS, FORKRL_RUNS_DIR=str(base / "elsewhere" / "runs"))  # outside the data dir
    srv.start()
    yield srv
    srv.stop()


def with_(section: str, **fields: object) -> dict:
    return {**TINY, section: {**TINY.get(section, {}), **fields}}


def refused(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert all(w in detail for w in words), (words, detail)


def test_a_submission_flood_is_cut_off_with_retry_after(server):
    # the attack: 1,405 jobs in 60 s. Cancelling and deleting each job at once keeps the owner under
    # the job-count limits, so the rate alone stops it, and deleting does not give the rate back
    with server.client(make_token(server, "flood")) as f:
        for _ in range(4):
            job = submit(f).json()["id"]
            assert f.post(f"/v1/jobs/{job}/cancel").json()["state"] == "CANCELLED"
            assert f.delete(f"/v1/jobs/{job}").status_code == 204
        r = submit(f)
        refused(r, 429, "submit_rate_per_minute = 6", "submit_burst = 4")
        assert 1 <= int(r.headers["retry-after"]) <= 10
        assert f.get("/v1/jobs").json()["jobs"] == []
    with server.client() as admin:  # the operator's tokens are not limited
        assert [submit(admin).status_code for _ in range(5)] == [201] * 5


def test_stored_and_active_jobs_per_owner(server):
    with server.client(make_token(server, "hoarder")) as h:
        first, second = submit(h).json()["id"], submit(h).json()["id"]
        refused(submit(h), 403, "max_active_jobs_per_owner = 2", "hoarder")
        h.post(f"/v1/jobs/{first}/cancel")
        third = submit(h).json()["id"]  # one queued job ended: room again
        h.post(f"/v1/jobs/{second}/cancel")
        refused(submit(h), 403, "max_jobs_per_owner = 3", "hoarder", "delete")
        assert h.delete(f"/v1/jobs/{first}").status_code == 204
        assert submit(h).status_code == 201
        assert third in {j["id"] for j in h.get("/v1/jobs").json()["jobs"]}
    # another owner's jobs are not counted against this one
    with server.client(make_token(server, "neighbour")) as n:
        assert submit(n).status_code == 201


ATTACKS = [
    (with_("rollout", num_engines=1024), "rollout.num_engines = 1024", "max_rollout_engines = 4"),
    (with_("reward", num_workers=4096), "reward.num_workers = 4096", "max_reward_workers = 8"),
    (with_("learner", num_learners=4096), "learner.num_learners = 4096", "max_learners = 4"),
    (with_("rollout", num_gpus_per_engine=64), "rollout.num_gpus_per_engine = 64", "max_gpus_per_actor = 2"),
    (with_("learner", num_gpus_per_learner=8), "learner.num_gpus_per_learner = 8", "max_gpus_per_actor = 2"),
    (with_("rollout", num_engines=4, num_gpus_per_engine=2), "GPUs", "max_job_gpus = 4"),
    (with_("learner", num_learners=4, num_cpus_per_learner=8), "CPUs", "max_job_cpus = 16"),
    (with_("rollout", cpu_kv_cache_gib=1024), "rollout.cpu_kv_cache_gib = 1024", "max_cpu_kv_cache_gib = 8"),
    (with_("rollout", ray_resources={"node:10.0.0.5": 0.01}), "rollout.ray_resources.node:10.0.0.5", "node"),
    (with_("learner", ray_resources={"node:10.0.0.5": 1}), "learner.ray_resources.node:10.0.0.5", "node"),
    (with_("reward", ray_resources={"forkrl_learner": 1}), "reward.ray_resources.forkrl_learner", "forkrl_reward"),
    (with_("learner", ray_resources={"team_b_h100": 1}), "learner.ray_resources.team_b_h100", "allowed_ray"),
]


def test_pools_and_ray_resources_past_the_limits_are_refused(server):
    with server.client(make_token(server, "greedy")) as g:
        for body, field, limit in ATTACKS:
            refused(submit(g, body), 403, field, limit, "tenancy limit")
        assert g.get("/v1/jobs").json()["jobs"] == []  # nothing refused was stored
        own_groups = {**TINY, **{name: {**TINY[name], "ray_resources": {f"forkrl_{name}": 1}}
                                 for name in ("rollout", "reward", "learner")}}  # fmt: skip
        assert submit(g, own_groups).status_code == 201
        at_the_limit = with_("rollout", num_engines=4, num_gpus_per_engine=1)  # 4 GPUs, the most a job may reserve
        assert submit(g, at_the_limit).status_code == 201
    with server.client() as admin:  # the operator may pin its own jobs anywhere
        assert submit(admin, with_("rollout", ray_resources={"node:10.0.0.5": 0.01})).status_code == 201


def test_an_admin_owner_name_is_never_a_tenants(server):
    with server.client() as admin:
        # the attack: a tenant token for owner "admin" read and cancelled the operator's jobs
        operator_job = submit(admin).json()["id"]
        r = admin.post("/v1/tokens", json={"owner": "admin"})
        refused(r, 409, "'admin'", "admin token")
        assert admin.post("/v1/tokens", json={"owner": "ops", "admin": True}).status_code == 201
        refused(admin.post("/v1/tokens", json={"owner": "ops"}), 409, "'ops'")
        # the other way round: an owner with tenant tokens does not become an admin under the same name
        assert admin.post("/v1/tokens", json={"owner": "erin"}).status_code == 201
        refused(admin.post("/v1/tokens", json={"owner": "erin", "admin": True}), 409, "'erin'")
        # a revoked admin token's jobs stay stored under its owner name: the name stays the operator's
        ops2 = admin.post("/v1/tokens", json={"owner": "ops2", "admin": True}).json()
        assert admin.delete(f"/v1/tokens/{ops2['id']}").status_code == 200
        refused(admin.post("/v1/tokens", json={"owner": "ops2"}), 409, "'ops2'")
        assert admin.get(f"/v1/jobs/{operator_job}").json()["state"] == "QUEUED"


def test_anonymous_callers_see_no_job_counts(server):
    anon = httpx.get(f"{server.url}/metrics")
    assert anon.status_code == 401 and "forkrl_jobs" not in anon.text
    with server.client(make_token(server, "peeker")) as p:
        assert p.get("/metrics").status_code == 403  # a tenant sees no other tenant's counts either
    scraped = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {SCRAPE}"})
    assert scraped.status_code == 200 and "forkrl_jobs_submitted_total" in scraped.text
    with server.client() as admin:
        assert admin.get("/metrics").status_code == 200
        assert admin.get("/v1/jobs", params={"state": "QUEUED"}).json()["jobs"]  # there are jobs to count
    ready = httpx.get(f"{server.url}/readyz").json()
    assert set(ready) <= {"status", "checks"} and set(ready["checks"]) <= {"database", "ray", "reconciler"}
    assert ready["status"] == "ready" and not any(ch.isdigit() for ch in str(ready))


def test_every_answer_carries_the_security_headers(server):
    for path, status in (("/healthz", 200), ("/v1/jobs", 401), ("/openapi.json", 200), ("/nope", 404), ("/", 200)):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == status, path
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "no-referrer", path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
    api = httpx.get(f"{server.url}/v1/jobs").headers["content-security-policy"]
    assert api.startswith("default-src 'none'")  # JSON is never a document that runs anything
    page = httpx.get(f"{server.url}/").headers["content-security-policy"]
    assert "script-src 'self';" in page and "http" not in page  # the dashboard loads nothing from elsewhere
    # production serves no page that loads Swagger or ReDoc from a CDN; the schema stays
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(f"{server.url}{path}").status_code == 404, path


def test_development_docs_have_a_policy_of_their_own(tmp_path):
    # in process, without the lifespan (no store, no Ray): only the page and its headers matter
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(env="development", data_dir=tmp_path, ray_address=UNREACHABLE_RAY))

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    docs = asyncio.run(get("/docs"))
    csp = docs.headers["content-security-policy"]
    assert docs.status_code == 200 and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src")).split()[1:]
    # the CDN's script and the page's one inline script by its hash; nothing else runs there
    assert "'unsafe-inline'" not in script_src and all(s.startswith(("https://", "'sha256-")) for s in script_src)
    assert asyncio.run(get("/redoc")).status_code == 404


def test_a_runs_dir_outside_the_data_dir_is_private(server):
    runs = server.env["FORKRL_RUNS_DIR"]
    assert stat.S_IMODE(os.stat(runs).st_mode) == 0o700


def test_the_submission_bucket_refills_at_the_rate():
    from service.quotas import SubmitRate

    now = [0.0]
    rate = SubmitRate(per_minute=6, burst=2, clock=lambda: now[0])  # 0.1 submission a second
    assert [rate.take("a"), rate.take("a")] == [0, 0]
    assert rate.take("a") == pytest.approx(10)  # none left: the next one in 1 / 0.1 s
    assert rate.take("b") == 0  # each owner has a bucket of its own
    now[0] = 5
    assert rate.take("a") == pytest.approx(5)  # half of one back: 5 s more, and a refusal takes nothing
    now[0] = 10
    assert rate.take("a") == 0
    now[0] = 100  # both buckets full again: forgotten, so the table holds only recent submitters
    assert rate.take("c") == 0 and set(rate._buckets) == {"c"}


def test_config_checks_spend_no_room_and_a_replay_is_answered_at_the_limit(server):
    import yaml

    with server.client(make_token(server, "checker")) as c:
        # more checks than the burst (4) take none of the rate and count no job; a pool past its bound is
        # valid: false naming the limit, not a 403 (the check always answers 200)
        for _ in range(6):
            ok = c.post("/v1/configs/validate", json={"yaml": yaml.safe_dump(TINY)})
            assert ok.status_code == 200 and ok.json()["valid"], ok.text
        big = c.post("/v1/configs/validate", json={"yaml": yaml.safe_dump(with_("rollout", num_engines=64))})
        assert big.status_code == 200 and not big.json()["valid"], big.text
        assert "max_rollout_engines = 4" in big.json()["errors"][0]["msg"], big.text
        key = {"Idempotency-Key": "once"}
        first = c.post("/v1/jobs", json=TINY, headers=key)
        second = submit(c)
        assert first.status_code == second.status_code == 201  # the checks left the burst whole
        refused(submit(c), 403, "max_active_jobs_per_owner = 2")
        # the owner is at its limit: a retry of the first submission (its answer lost) still gets its job
        again = c.post("/v1/jobs", json=TINY, headers=key)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
