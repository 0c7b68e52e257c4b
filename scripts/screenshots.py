"""Screenshots of the dashboard for the README: a job's page and its forking-token view.

    make screenshots                      # after `make demo`: its service data, newest finished job
    python scripts/screenshots.py --url http://127.0.0.1:8000 --token T --job forkrl-... --out docs/img

Without --url it starts the control plane on the demo's data directory (runs/service) for the
duration. Drives Debian's chromium headless with Playwright, like the dashboard's tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def start_service(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FORKRL_DATA_DIR": str(data_dir), "FORKRL_PORT": str(port)}
    # the pages only read stored jobs: no Ray head is needed (an address nothing answers on)
    env["FORKRL_RAY_ADDRESS"] = "http://127.0.0.1:9"
    log = (data_dir / "screenshots-service.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"screenshots: the service did not start; see {log.name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running control plane (default: start one on --data-dir)")
    ap.add_argument("--data-dir", default=str(ROOT / "runs" / "service"), help="the demo's service data")
    ap.add_argument("--token", help="bearer token (default: <data dir>/admin_token)")
    ap.add_argument("--job", help="job id (default: the newest SUCCEEDED job)")
    ap.add_argument("--step", type=int, help="the step whose samples are shown (default: the newest)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    token = args.token or (data_dir / "admin_token").read_text().strip()
    proc, url = (None, args.url) if args.url else start_service(data_dir)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            job = args.job or next(
                (j["id"] for j in c.get("/v1/jobs", params={"state": "SUCCEEDED"}).json()["jobs"]), None
            )
        if job is None:
            raise SystemExit("screenshots: no finished job (run `make demo` first, or pass --job)")
        from playwright.sync_api import sync_playwright

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
            )
            page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
            page.goto(url + "/")
            page.get_by_label("Access token").fill(token)
            page.get_by_role("button", name="Sign in", exact=True).click()
            page.get_by_role("heading", name="Jobs", exact=True).wait_for()
            page.goto(f"{url}/#/jobs/{job}")
            page.locator("#chart-reward .scatterlayer .trace").first.wait_for(timeout=60_000)
            page.locator("#forking .tok").first.wait_for(timeout=60_000)
            if args.step:
                page.get_by_label("Step to show").select_option(str(args.step))
                page.locator("#forking").get_by_text(f"step {args.step} ·").wait_for()
            page.mouse.move(2, 2)  # no chart toolbar shown under the pointer
            page.wait_for_timeout(1500)  # the charts' transitions
            page.screenshot(path=str(out / "job-page.png"))
            page.locator("#forking").screenshot(path=str(out / "forking-tokens.png"))
            browser.close()
        print(f"screenshots: {out / 'job-page.png'} and {out / 'forking-tokens.png'} (job {job})")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
