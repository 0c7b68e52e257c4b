"""Hostile job names on the page (issue 36, display): a tenant names jobs with HTML and with bidi controls;
the admin, who sees every job, opens the jobs list, a job, the confirm dialog and Compare. Nothing of the
name is rendered as markup (the chart legend and hover labels included: plotly.js reads trace names as
its own HTML subset) and a name's bidi controls stay inside it: the text beside it reads in order.

The jobs never run (a service with no Ray: they stay queued); their curves are pushed through the ingest
route with each job's own token. Debian's chromium, headless, driven by Playwright; about half a minute."""

from __future__ import annotations

import httpx
import pytest

from .conftest import UNREACHABLE_RAY, Server, arm_ingest
from .test_dashboard import browser, tiny  # noqa: F401 (the browser fixture)

HTML = '<a href="https://evil.example/">pay here</a> <b>urgent</b><span style="font-size:40px">big</span>'
RLO = "\u202erlo-name"  # RIGHT-TO-LEFT OVERRIDE, never closed
ESCAPE = "pdi\u2069\u202eescape"  # closes the isolate it sits in (POP DIRECTIONAL ISOLATE), then overrides
BENIGN = ["alpha-run", "café-訓練"]
SAMPLE = {"prompt": "2+2", "answer": "4", "reward": 0.0, "tokens": ["\u2069\u202eab", "cd", "ef"],
          "entropy": [0.5, 0.5, 0.5], "kept": [1, 0, 0], "truncated": False}  # fmt: skip

# how far right the last character of `needle` is drawn from its first, in the first text node under
# an element matching `sel` that holds it: > 0 when it reads left to right, < 0 when an override turned it
IN_ORDER_JS = """([sel, needle]) => {
  for (const el of document.querySelectorAll(sel)) {
    const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let n; (n = walk.nextNode());) {
      const i = n.data.indexOf(needle);
      if (i < 0) continue;
      const x = (k) => { const r = document.createRange(); r.setStart(n, k); r.setEnd(n, k + 1);
                         return r.getBoundingClientRect().left; };
      return x(i + needle.length - 1) - x(i);
    }
  }
  return null;
}"""
# the left edge of the first character of `needle` in an element's text
TEXT_LEFT_JS = """(el, needle) => {
  const walk = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let n; (n = walk.nextNode());) {
    const i = n.data.indexOf(needle);
    if (i < 0) continue;
    const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 1);
    return r.getBoundingClientRect().left;
  }
  return null;
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Benign jobs first, then a tenant's hostile ones (newest first: the hostile names come before the
    benign ones in every list), each with three steps of reward."""
    base = tmp_path_factory.mktemp("abuse-display")
    db = f"sqlite:///{base / 'jobs.db'}"
    server = Server(base / "data", db, UNREACHABLE_RAY).start()
    try:
        with server.client() as admin:
            mallory = admin.post("/v1/tokens", json={"owner": "mallory"}).json()["token"]
        ids = {}
        with server.client(mallory) as c:
            for name in [*BENIGN, HTML, RLO, ESCAPE]:
                r = c.post("/v1/jobs", json=tiny(name, 3, 0.2))
                assert r.status_code == 201, r.text
                ids[name] = r.json()["id"]
        for name, job_id in ids.items():
            records: list[dict] = [{"step": s, "reward/mean": s / 3} for s in (1, 2, 3)]
            if name == ESCAPE:  # the model's output is the tenant's too: a token that breaks out
                records[-1]["samples"] = [SAMPLE]
            r = httpx.post(f"{server.url}/v1/jobs/{job_id}/ingest", json={"metrics": records},
                           headers={"Authorization": f"Bearer {arm_ingest(db, job_id)}"})  # fmt: skip
            assert r.status_code == 202, r.text
        yield {"server": server, "ids": ids}
    finally:
        server.stop()


@pytest.fixture
def page(browser, site):  # noqa: F811 (the browser fixture imported above)
    """A tab signed in as the admin, who sees every tenant's jobs."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.goto(site["server"].url + "/")
    pg.get_by_label("Access token").fill(site["server"].admin_token)
    pg.get_by_role("button", name="Sign in", exact=True).click()
    pg.get_by_role("heading", name="Jobs", exact=True).wait_for()
    yield pg
    assert problems == [], problems
    ctx.close()


def in_order(pg, sel: str, needle: str) -> float:
    dx = pg.evaluate(IN_ORDER_JS, [sel, needle])
    assert dx is not None, f"{needle!r} not found under {sel}"
    return float(dx)


def test_compare_legend_and_hover_show_html_in_a_name_as_text(page, site):
    ids = site["ids"]
    page.goto(f"{site['server'].url}/#/compare/{ids[HTML]},{ids['alpha-run']}")
    chart = page.locator("#cmp-reward-mean")
    chart.locator(".scatterlayer .trace").nth(1).wait_for()
    legend = chart.locator(".legend")
    # no link, no bold or resized text made from the name: plotly.js would draw <a> as a live link
    # and <b>, <span style> as styled tspans
    assert legend.locator("a").count() == 0
    styled = legend.locator("tspan[style]").evaluate_all("ts => ts.map(t => t.getAttribute('style'))")
    assert styled == [], styled
    assert HTML in (legend.text_content() or "")  # the name as the tenant typed it, literally
    # the hover label lists every trace by name: the same
    chart.locator(".nsewdrag").first.hover()
    hover = chart.locator(".hoverlayer")
    hover.locator("text").first.wait_for()
    assert hover.locator("a").count() == 0 and HTML in (hover.text_content() or "")
    # the jobs list shows it as text too
    page.goto(f"{site['server'].url}/#/jobs")
    page.locator(f'tr[data-job="{ids[HTML]}"]').wait_for()
    assert page.locator('a[href*="evil.example"]').count() == 0
    assert page.locator(f'tr[data-job="{ids[HTML]}"] td').nth(1).inner_text() == HTML


def test_bidi_controls_in_a_name_do_not_turn_the_text_beside_it(page, site):
    ids = site["ids"]
    page.goto(f"{site['server'].url}/#/compare/{ids[RLO]},{ids[ESCAPE]},{ids['alpha-run']}")
    picker = page.locator("#compare-picker")
    picker.locator("label").nth(len(ids) - 1).wait_for()
    # every name in the picker is isolated, and the names after the hostile ones read left to right
    isolated = picker.locator("label").evaluate_all(
        "ls => ls.map(l => l.querySelector('bdi') !== null || getComputedStyle(l).unicodeBidi === 'isolate')"
    )
    assert all(isolated), isolated
    for name in BENIGN:
        assert in_order(page, "#compare-picker label", name) > 0, name
    # the legend: what follows a name in its label (rho and the id) reads in order
    chart = page.locator("#cmp-reward-mean")
    chart.locator(".scatterlayer .trace").nth(2).wait_for()
    for name in (RLO, ESCAPE):
        tail = f", {ids[name][-6:]})"
        assert in_order(page, "#cmp-reward-mean .legend", tail) > 0, name
    # the confirm dialog names the job in a sentence: the sentence after the name reads in order
    page.goto(f"{site['server'].url}/#/jobs")
    for name in (RLO, ESCAPE):
        page.locator(f'tr[data-job="{ids[name]}"] button.danger').click()
        assert in_order(page, "#confirm-text", "It stops at once") > 0, name
        page.get_by_role("button", name="Keep it", exact=True).click()
    # the job's page: the state badge beside the name in the heading stays after it, and the sampled
    # tokens after the hostile one stay in order
    page.goto(f"{site['server'].url}/#/jobs/{ids[ESCAPE]}")
    page.locator("h1 [data-state]").wait_for()
    badge = page.locator("h1 [data-state]").bounding_box()
    assert badge and badge["x"] > page.locator("h1").evaluate(TEXT_LEFT_JS, "escape")
    toks = page.locator("#forking .tok")
    toks.nth(2).wait_for()
    xs = [(toks.nth(i).bounding_box() or {}).get("x", 0) for i in range(3)]
    assert xs[0] < xs[1] < xs[2], xs
