"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright, against the real
service on loopback whose jobs ran for real on a local Ray (the tiny model). Sign-in and a bad token,
the jobs list, a finished job's curves and forking tokens, compare, submitting from YAML with errors
shown beside their lines, a live job page that reconnects after the service restarts, cancel and
delete. Minutes: marked slow.

FORKRL_SCREENSHOTS=<dir> also saves the job page and the forking-token view there (the README's
pictures come from `scripts/screenshots.py`, which does the same against a real SmolLM2 run)."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import ROOT, UNREACHABLE_RAY, Server, arm_ingest, state_events, wait_for
from .test_api import make_token

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
TINY = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())


def tiny(name: str, steps: int, rho: float) -> dict:
    return {
        **TINY,
        "name": name,
        "algorithm": {**TINY["algorithm"], "top_entropy_quantile": rho},
        "trainer": {**TINY["trainer"], "steps": steps, "save_every": 2, "eval_every": 2, "eval_prompts": 4},
    }


@pytest.fixture(scope="module")
def site(ray_head, tmp_path_factory):
    """The service on a real Ray head, a user token, two finished jobs of that user (rho 0.2 and 1.0) and
    one of another user, all three submitted at once (3 CPUs each on the 4-CPU head: one fits at a time)."""
    base = tmp_path_factory.mktemp("dash")
    server = Server(base / "data", f"sqlite:///{base / 'jobs.db'}", ray_head.address, ray_head.token).start()
    try:
        with server.client() as admin:
            user = admin.post("/v1/tokens", json={"owner": "alice"}).json()["token"]
        with server.client(user) as c:
            a = c.post("/v1/jobs", json=tiny("filter-0.2", 4, 0.2)).json()["id"]
            b = c.post("/v1/jobs", json=tiny("plain-1.0", 4, 1.0)).json()["id"]
        with server.client(make_token(server, "bob")) as other:
            third = other.post("/v1/jobs", json=tiny("bob-0.2", 2, 0.2)).json()["id"]
        with server.client() as c:
            for job_id in (a, b, third):
                job = wait_for(c, job_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, 600)
                assert job["state"] == "SUCCEEDED", job
        yield {"server": server, "token": user, "filtered": a, "plain": b, "third": third}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: `make setup` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-component-update",
            ],  # fmt: skip
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    """A fresh browser tab (its own session storage) that records console errors and failed requests."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.problems = problems  # type: ignore[attr-defined]
    yield pg
    ctx.close()


def sign_in(pg, site, token: str | None = None) -> None:
    pg.goto(site["server"].url + "/")
    pg.get_by_label("Access token").fill(token or site["token"])
    pg.get_by_role("button", name="Sign in", exact=True).click()
    pg.get_by_role("heading", name="Jobs", exact=True).wait_for()


def shoot(pg, name: str, locator=None) -> None:
    where = os.environ.get("FORKRL_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (locator or pg).screenshot(path=str(Path(where) / name))


def test_three_jobs_that_do_not_fit_together_ran_one_at_a_time_and_all_succeeded(site):
    """The fixture submitted three tiny jobs (3 CPUs each, two owners) at once to the 4-CPU head: the
    admission queue started each when the one before had ended, never two side by side (where their
    actors would wait for each other's CPUs), in submission order, and all three succeeded."""
    utc = lambda s: dt.datetime.fromisoformat(s).replace(tzinfo=None)  # noqa: E731 (both UTC; SQLite keeps no zone)
    spans = []
    with site["server"].client() as c:
        for key in ("filtered", "plain", "third"):
            job = c.get(f"/v1/jobs/{site[key]}").json()
            events = state_events(c, job["id"])
            assert [e["state"] for e in events] == ["QUEUED", "PENDING", "RUNNING", "SUCCEEDED"], events
            assert events[1]["message"] == "admitted: 3 CPU of 4 CPU"
            spans.append((utc(events[1]["at"]), utc(job["ended_at"])))
    for (_, ended), (admitted, _) in itertools.pairwise(spans):
        assert admitted >= ended, spans  # FIFO, one at a time


def test_a_bad_token_is_refused_and_the_page_has_no_errors(page, site):
    page.goto(site["server"].url + "/")
    page.get_by_label("Access token").fill("not-a-token")
    page.get_by_role("button", name="Sign in", exact=True).click()
    alert = page.locator("#signin-error")
    alert.filter(has_text="401").wait_for()
    assert "Sign-in refused (401)" in alert.inner_text()
    assert page.evaluate("sessionStorage.getItem('forkrl.token')") is None  # a refused token is not kept
    # the real one signs in; it is kept in the tab's session storage only, never in local storage
    sign_in(page, site)
    assert page.evaluate("sessionStorage.getItem('forkrl.token')") == site["token"]
    assert page.evaluate("localStorage.length") == 0
    # the page sets a script policy: model output is never run as code
    csp = httpx.get(site["server"].url + "/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    # sign out forgets it
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Access token").wait_for()
    assert page.evaluate("sessionStorage.getItem('forkrl.token')") is None
    # the one error the browser logged is the refused sign-in's answer
    assert len(page.problems) == 1 and "401" in page.problems[0], page.problems  # type: ignore[attr-defined]


def test_jobs_list_filters_by_state(page, site):
    sign_in(page, site)
    rows = page.locator("tbody tr[data-job]")
    rows.first.wait_for()
    assert {rows.nth(i).get_attribute("data-job") for i in range(rows.count())} >= {site["filtered"], site["plain"]}
    page.get_by_label("Filter by state").select_option("FAILED")
    page.get_by_role("status").filter(has_text="No jobs yet").wait_for()
    assert rows.count() == 0
    page.get_by_label("Filter by state").select_option("SUCCEEDED")
    page.locator(f'tr[data-job="{site["filtered"]}"]').wait_for()
    assert page.locator(f'tr[data-job="{site["filtered"]}"] [data-state]').inner_text() == "SUCCEEDED"
    assert page.problems == [], page.problems  # type: ignore[attr-defined]


def test_a_finished_job_shows_its_curves_and_forking_tokens(page, site):
    server: Server = site["server"]
    with server.client(site["token"]) as c:
        metrics = c.get(f"/v1/jobs/{site['filtered']}/metrics").json()["metrics"]
        newest = c.get(f"/v1/jobs/{site['filtered']}/samples").json()
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]  # 0: the evaluation before training
    sign_in(page, site)
    page.get_by_role("link", name="filter-0.2").click()
    page.get_by_role("heading", name=re.compile("filter-0.2")).wait_for()
    # every curve drawn from the job's own records: the reward chart has a point per step (train) and
    # the held-out evals (steps 0, 2 and 4); the step-time breakdown has its phases
    reward = page.locator("#chart-reward")
    reward.locator(".scatterlayer .trace").first.wait_for()
    assert reward.get_attribute("data-points") == str(4 + 3)
    for key in ("entropy", "shares", "length", "clip", "kl", "gradnorm", "cov", "mismatch"):
        assert int(page.locator(f"#chart-{key}").get_attribute("data-traces") or 0) >= 1, key
    assert int(page.locator("#chart-time").get_attribute("data-traces") or 0) >= 4
    # the state timeline, checkpoints and config
    page.locator("ol.timeline li[data-state=SUCCEEDED]").wait_for()
    assert page.locator("ol.timeline li").first.get_attribute("data-state") == "QUEUED"
    ckpts = page.get_by_role("table", name="Checkpoints").locator("tbody tr td:first-child")
    ckpts.filter(has_text="4").wait_for()  # the final step's checkpoint
    assert '"top_entropy_quantile": 0.2' in page.locator("#config").inner_text()
    page.locator("#logs").filter(has_text="step 4").wait_for()
    shoot(page, "job-page.png")

    # forking tokens: the newest step's samples, each token with its entropy, the kept ones boxed
    forking = page.locator("#forking")
    forking.locator(".tok").first.wait_for()
    assert page.get_by_label("Step to show").input_value() == str(newest["step"])
    sample = newest["samples"][0]
    toks = forking.locator("article").first.locator(".tok")
    assert toks.count() == len(sample["tokens"])
    assert [float(toks.nth(i).get_attribute("data-entropy")) for i in range(toks.count())] == sample["entropy"]
    kept = [i for i in range(toks.count()) if "kept" in (toks.nth(i).get_attribute("class") or "")]
    assert kept == [i for i, k in enumerate(sample["kept"]) if k]
    assert "".join(toks.nth(i).inner_text() for i in range(toks.count())) == "".join(sample["tokens"])
    table = page.locator("#forking-table tbody tr")
    assert table.count() == len(newest["forking_tokens"]) > 0
    first = newest["forking_tokens"][0]
    assert table.first.locator("td").nth(2).inner_text() == str(first["kept"])
    assert table.first.locator("td").nth(3).inner_text() == str(first["dropped"])
    shoot(page, "forking-tokens.png", forking)
    # an earlier step on request
    page.get_by_label("Step to show").select_option("1")
    forking.get_by_text("step 1 ·").wait_for()
    assert page.problems == [], page.problems  # type: ignore[attr-defined]


def test_compare_overlays_two_jobs_by_step(page, site):
    sign_in(page, site)
    for job_id in (site["filtered"], site["plain"]):
        page.locator(f'tr[data-job="{job_id}"] input[type=checkbox]').check()
    page.get_by_role("button", name="Compare selected").click()
    chart = page.locator("#cmp-reward-mean")
    chart.locator(".scatterlayer .trace").nth(1).wait_for()
    assert chart.get_attribute("data-traces") == "2" and chart.get_attribute("data-points") == "8"
    legend = chart.locator(".legend").text_content() or ""
    assert "ρ=0.2" in legend and "ρ=1" in legend
    kept = page.locator("#cmp-entropy-kept-frac")
    kept.locator(".scatterlayer .trace").nth(1).wait_for()
    # the plain run keeps every token, the filtered one about a fifth: the overlay shows both
    ys = page.evaluate("id => document.getElementById(id).data.map(t => t.y)", "cmp-entropy-kept-frac")
    plain, filtered = sorted(ys, key=max, reverse=True)
    assert plain == [1.0] * 4 and max(filtered) < 0.35
    assert page.problems == [], page.problems  # type: ignore[attr-defined]


def test_submit_from_yaml_live_page_reconnects_then_cancel_and_delete(page, site):
    server: Server = site["server"]
    sign_in(page, site)
    bad = yaml.safe_dump(tiny("from-the-page", 2000, 0.2), sort_keys=False).replace(
        "top_entropy_quantile: 0.2", "top_entropy_quantile: 2.5\n  clip_hgh: 0.3"
    )
    page.get_by_label("Job config (YAML)").fill(bad)
    page.get_by_role("button", name="Submit").click()
    errors = page.locator(".field-error")
    errors.nth(1).wait_for()
    lines = bad.splitlines()
    shown = {int(errors.nth(i).get_attribute("data-line") or 0): errors.nth(i).inner_text() for i in range(2)}
    # each error sits under its own line: the quantile's and the misspelt key's
    assert "top_entropy_quantile" in lines[min(shown) - 1] and "2.5" in shown[min(shown)]
    assert "clip_hgh" in lines[max(shown) - 1] and "unknown field" in shown[max(shown)]
    with server.client(site["token"]) as c:
        before = {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
    assert len(before) == 2  # nothing was submitted
    page.get_by_label("Job config (YAML)").fill(bad.replace("2.5\n  clip_hgh: 0.3", "0.2"))
    page.get_by_role("button", name="Submit").click()
    page.get_by_role("link", name=re.compile("^forkrl-")).click()
    page.get_by_role("heading", name=re.compile("from-the-page")).wait_for()
    job_id = page.url.rsplit("/", 1)[1]
    assert job_id not in before

    # live: steps arrive over the event stream; the service restarts; the page reconnects and goes on
    step = page.locator("#last-step")
    page.wait_for_function("() => Number(document.getElementById('last-step').textContent) >= 1", timeout=240_000)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 30  # open event streams do not hold the shutdown (FORKRL_SHUTDOWN_GRACE_S)
    page.locator("#conn.down").wait_for(timeout=60_000)
    seen = int(step.inner_text())
    server.start()
    page.wait_for_function(f"() => Number(document.getElementById('last-step').textContent) > {seen}", timeout=240_000)
    assert page.locator("#conn").inner_text() == "Live"

    # cancel, with confirmation; then delete from the list
    page.get_by_role("button", name=re.compile("^Cancel from-the-page")).click()
    page.get_by_role("button", name="Keep it", exact=True).click()  # declined: nothing happens
    with server.client(site["token"]) as c:
        assert not c.get(f"/v1/jobs/{job_id}").json()["cancel_requested"]
    page.get_by_role("button", name=re.compile("^Cancel from-the-page")).click()
    page.get_by_role("button", name="Cancel job", exact=True).click()
    page.locator("h1 [data-state=CANCELLED]").wait_for(timeout=120_000)
    page.get_by_role("link", name="Jobs").click()
    page.get_by_role("button", name=re.compile(f"^Delete from-the-page .{job_id}")).click()
    page.get_by_role("button", name="Delete", exact=True).click()
    page.locator(f'tr[data-job="{job_id}"]').wait_for(state="detached")
    with server.client(site["token"]) as c:
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
    # the fetches the restart broke are the only errors the page logged
    assert all("Failed to load resource" in p or "ERR_" in p for p in page.problems), page.problems  # type: ignore[attr-defined]


def _push(server: Server, job: str, token: str, records: list[dict]) -> None:
    r = httpx.post(f"{server.url}/v1/jobs/{job}/ingest", json={"metrics": records},
                   headers={"Authorization": f"Bearer {token}"}, timeout=60)  # fmt: skip
    assert r.status_code == 202, r.text


def _admin_page(browser, server: Server):
    """A 1280 x 800 tab signed in as the admin, on the jobs list."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.goto(server.url + "/")
    page.get_by_label("Access token").fill(server.admin_token)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("heading", name="Jobs", exact=True).wait_for()
    return ctx, page


def test_a_long_run_is_downsampled_fits_a_laptop_and_every_control_is_named(browser, tmp_path):
    """900 steps pushed to a job (a service with no Ray: the job stays queued and takes pushes): every
    curve holds at most 600 points, the page fits a 1280 x 800 screen without sideways scrolling, and
    every button, field and list on it has an accessible name."""
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", UNREACHABLE_RAY).start()
    try:
        with server.client() as c:
            body = tiny("long", 900, 0.2)
            body["model"]["lora"] = {"rank": 8, "alpha": 16, "sync": "adapter"}  # the page says what the job trains
            job = c.post("/v1/jobs", json=body).json()["id"]
            token = arm_ingest(f"sqlite:///{tmp_path / 'jobs.db'}", job)
            # a multi-turn trajectory: a tool call, the tool's answer (observation: never trained), the answer
            sample = {"prompt": "2+2", "answer": "4", "reward": 1.0,
                      "tokens": ["```python\n", "print(2+2)", "\n```\n", "```output\n", "4", "\n```\n", " 4", "<"],
                      "entropy": [0.2, 0.5, 0.1, 0.0, 0.0, 0.0, 0.9, 0.001], "kept": [0, 1, 0, 0, 0, 0, 1, 0],
                      "observation": [0, 0, 0, 1, 1, 1, 0, 0], "truncated": False}  # fmt: skip
            # a tree rollout's group: " The answer" shared by two leaves that fork there, and a root of its own
            tree = {"nodes": [{"parent": -1, "tokens": [" The", " answer"], "entropy": [0.3, 0.1]},
                              {"parent": 0, "tokens": [" is", " 4"], "entropy": [1.2, 0.2]},
                              {"parent": 0, "tokens": [" =", " 5"], "entropy": [1.2, 0.4]},
                              {"parent": -1, "tokens": [" 4"], "entropy": [0.3]}],
                    "leaves": [{"node": 1, "reward": 1.0}, {"node": 2, "reward": 0.0}, {"node": 3, "reward": 1.0}],
                    "shown": 1, "truncated": False}  # fmt: skip
            leaf = {
                "prompt": "2+2",
                "answer": "4",
                "reward": 1.0,
                "tokens": [" The", " answer", " is", " 4"],
                "entropy": [0.3, 0.1, 1.2, 0.2],
                "kept": [0, 0, 1, 0],
                "truncated": False,
                "tree": tree,
            }
            for start in range(1, 901, 300):
                records = [
                    {"step": s, "reward/mean": s / 900, "entropy/mean": 1 - s / 1800, "entropy/kept_frac": 0.2,
                     "timing/step": 1.0, "timing/generate": 0.5, "timing/learn": 0.4, "actor/grad_norm": 1.0,
                     "timing/engine_busy": 0.8,  # asynchronous mode: the engines generated while the learner learned
                     "model/trainable_params": 921_600, "model/params": 135_436_608,
                     **({"samples": [sample, leaf],
                         "forking_tokens": [{"id": 1, "text": " 4", "kept": 1, "dropped": 0}]} if s % 100 == 0 else {})}
                    for s in range(start, start + 300)
                ]  # fmt: skip
                _push(server, job, token, records)
        ctx, page = _admin_page(browser, server)
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # the jobs list fits
        page.get_by_role("link", name="long").click()
        page.locator("#chart-reward .scatterlayer .trace").first.wait_for()
        page.locator("#forking .tok").first.wait_for()
        # the trajectory as turns: model tokens shaded and boxed, the observation set apart as one block
        card = page.locator("#forking article").first
        assert card.locator(".tok").count() == 5 and card.locator(".tok.kept").count() == 2
        assert card.locator(".obs").count() == 1 and card.locator(".obs").text_content() == "tool```output\n4\n```\n"
        assert "2 of 5 tokens kept" in card.inner_text() and card.locator(".turns").inner_text() == "2 turns"
        # the tree group: the shared prefix once, the two branches under it, each fork's first token marked,
        # the leaves coloured by reward (green the highest, red the lowest) and the sample shown outlined
        tree_el = page.get_by_role("list", name="Group tree")
        assert tree_el.locator(".tnode").count() == 4 and tree_el.get_by_text(" answer", exact=True).count() == 1
        assert tree_el.locator(".tok.fork").all_inner_texts() == [" The", " is", " =", " 4"]
        colours = tree_el.locator(".leaf").evaluate_all(
            "els => els.map(e => [e.textContent, getComputedStyle(e).backgroundColor.match(/\\d+/g).map(Number)])"
        )
        assert [text for text, _ in colours] == ["reward 1", "reward 0", "reward 1"], colours
        assert [rgb[1] > 2 * rgb[0] for _, rgb in colours] == [True, False, True], colours  # green
        assert colours[1][1][0] > 2 * colours[1][1][1], colours  # red
        assert tree_el.locator(".leaf.shown").inner_text() == "reward 1"
        # the branches sit inside the shared prefix's node: nested, not side by side
        assert tree_el.locator(".tnode .tnode").count() == 2
        # 900 steps averaged into buckets of 2: 450 points per curve
        points = page.evaluate(
            "Array.from(document.querySelectorAll('.chart')).map(c => (c.data || []).map(t => t.x.length))"
        )
        assert max(n for chart in points for n in chart) == 450, points
        assert page.evaluate("document.getElementById('chart-reward').data[0].y.at(-1)") == pytest.approx(899.5 / 900)
        # the step-time chart: the learner's phases as stacked bars, the engines' busy seconds as a line over them
        time_chart = page.evaluate("document.getElementById('chart-time').data.map(t => [t.name, t.type, t.y.at(-1)])")
        assert ["engines generating (async)", "scatter", 0.8] in time_chart, time_chart
        assert ["learn", "bar", 0.4] in time_chart, time_chart
        assert (
            page.locator("#job-params").inner_text()
            == "LoRA rank 8 (alpha 16, adapter sync): 0.92 M of 135.4 M parameters"
        )
        assert page.get_by_label("Step to show").locator("option").count() == 9  # the steps that hold samples
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # the job page fits too
        unnamed = page.evaluate(
            """() => Array.from(document.querySelectorAll('button, input, select, textarea, table, a'))
                .filter(e => e.offsetParent !== null && !e.closest('.modebar'))
                .filter(e => !(e.getAttribute('aria-label') || e.labels?.length || e.textContent.trim()
                              || e.getAttribute('title')))
                .map(e => e.outerHTML.slice(0, 120))"""
        )
        assert unnamed == [], unnamed
        ctx.close()
    finally:
        server.stop()


def test_compare_averages_the_seeds_of_each_study_arm(browser, tmp_path):
    """Jobs named <study>-<arm>-s<seed> (what a study submits; a service with no Ray, records pushed):
    with "average the seeds" on, the compare view draws one curve per arm, the mean over its seeds,
    whichever studies the arms come from."""
    server = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'jobs.db'}", UNREACHABLE_RAY).start()
    try:
        evals = {"methods-top20-s1": (0.2, 0.6), "methods-top20-s2": (0.4, 0.8), "async-all-s1": (0.5, 0.9)}
        ids = []
        with server.client() as c:
            for name, (first, last) in evals.items():
                job = c.post("/v1/jobs", json=tiny(name, 10, 0.2)).json()["id"]
                token = arm_ingest(f"sqlite:///{tmp_path / 'jobs.db'}", job)
                records = [{"step": 0, "eval/reward_mean": first}, {"step": 10, "eval/reward_mean": last}]
                _push(server, job, token, records)
                ids.append(job)
        ctx, page = _admin_page(browser, server)
        page.goto(f"{server.url}/#/compare/{','.join(ids)}")
        chart = page.locator("#cmp-eval-reward-mean")
        chart.locator(".scatterlayer .trace").nth(2).wait_for()
        assert chart.get_attribute("data-traces") == "3"  # one curve per job
        page.get_by_label(re.compile("Average the seeds of each study arm")).check()
        page.locator('#cmp-eval-reward-mean[data-traces="2"]').wait_for()
        arms = page.evaluate("document.getElementById('cmp-eval-reward-mean').data.map(t => [t.name, t.y])")
        # (each name isolated for bidirectional text, as every label on the page)
        names = [name.replace("\u2068", "").replace("\u2069", "") for name, _ in arms]
        assert names == ["methods-top20 (mean of 2 seeds)", "async-all (mean of 1 seed)"], arms
        assert arms[0][1] == pytest.approx([0.3, 0.7]) and arms[1][1] == pytest.approx([0.5, 0.9])
        assert page.url.endswith("/arms")  # the choice is in the address: a shared link shows the same view
        ctx.close()
    finally:
        server.stop()
