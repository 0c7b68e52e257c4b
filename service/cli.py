"""`forkrl`: the command line of the control plane, mirroring `ray job`.

    forkrl serve                                   # the API (python -m service)
    forkrl submit examples/demo.yaml [--set trainer.steps=5] [--follow]
    forkrl list [--state RUNNING]   forkrl status ID   forkrl logs ID [--follow] [--raw]
    forkrl cancel ID   forkrl delete ID   forkrl queue   forkrl quota set OWNER --max-running-jobs 2
    forkrl token create OWNER

The API address and token come from --url/--token or FORKRL_URL/FORKRL_TOKEN; with no token, a
local development server's admin token file (<data dir>/admin_token) is used.

What the service sends (job names, messages, logs: chosen by whoever submitted the job) reaches the
terminal with its control characters escaped (`\x1b`, `\u202e`), never as escape sequences.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from actors.common.contract import TERMINAL_STATES, JobState
from service.cli_admin import queue, quota_app, token_app
from service.cli_base import (
    DEFAULT_URL,
    TokenOpt,
    UrlOpt,
    escape_line,
    escape_log,
    escape_stream,
    escape_text,
)
from service.cli_base import api as _api
from service.cli_base import die as _die
from service.client import ApiError, ForkrlClient
from service.schemas import JobOut

app = typer.Typer(help="Submit and watch forkrl training jobs.", no_args_is_help=True, add_completion=False)
app.add_typer(token_app, name="token")
app.add_typer(quota_app, name="quota")
app.command("queue")(queue)


def _row(j: JobOut) -> str:
    return escape_line(f"{j.id}  {j.state.value:<9}  step {j.last_step}/{j.total_steps}  {j.owner:<10}  {j.name}")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (FORKRL_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (FORKRL_PORT)")] = None,
) -> None:
    """Run the control plane (uvicorn). Without FORKRL_RAY_ADDRESS it starts and owns a local Ray head."""
    import logging

    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=os.environ.get("FORKRL_LOG_LEVEL", "INFO").upper(), format="%(asctime)s %(name)s %(message)s"
    )
    # a server-sent event stream never closes by itself: without a grace limit a SIGTERM would wait for
    # every open dashboard tab
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="job config YAML (JobConfig)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override KEY=VALUE, repeatable")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="show live progress until the job ends")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="same key + same config returns the same job")] = None,
    priority: Annotated[int, typer.Option(help="admission order, higher first (owners: up to their bound)")] = 0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Submit a training job; it waits QUEUED until the cluster has room for all of it."""
    from actors.common.config_load import ConfigError, load_config

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        _die(f"invalid config {config}:\n{e}")
    with _api(url, token) as api:
        job = api.submit(cfg, idempotency_key, priority)
    typer.echo(escape_line(f"submitted {job.id} ({job.state.value})"))
    if follow:
        raise typer.Exit(_follow(url, token, job.id, job.total_steps))


@app.command("list")
def list_(
    state: Annotated[str | None, typer.Option(help=", ".join(s.value for s in JobState))] = None,
    limit: int = 50,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """List jobs, newest first."""
    try:
        wanted = JobState(state.upper()) if state else None
    except ValueError:
        _die(f"--state {state!r}: expected one of {', '.join(s.value for s in JobState)}")
    with _api(url, token) as api:
        page = api.jobs(wanted, limit)
    for j in page.jobs:
        typer.echo(_row(j))
    if not page.jobs:
        typer.echo("no jobs")


@app.command()
def status(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """A job's state, progress and latest metrics."""
    with _api(url, token) as api:
        j = api.job(job_id)
        typer.echo(_row(j))
        if j.message:
            typer.echo(f"message: {escape_text(j.message)}")
        if j.queue_position is not None:
            where = f"queue position: {j.queue_position} (priority {j.priority}); `forkrl queue` shows the queue"
            typer.echo(escape_line(where))
        restarts = (j.config or {}).get("trainer", {}).get("max_restarts")
        if j.restarts or j.failures:
            typer.echo(escape_line(f"restarts: {j.restarts} of {restarts}"))
            for f in j.failures:
                reason = f.reason.splitlines()[-1] if f.reason else ""
                typer.echo(escape_line(f"  failed at step {f.step} ({f.at}): {reason}"))
        if j.preemptions or j.preempting:
            now = " (stopping now for a higher-priority job)" if j.preempting else ""
            typer.echo(escape_line(f"preempted: {j.preemptions} time(s){now}"))
        typer.echo(escape_line(f"run dir: {j.run_dir}") + "\n" + escape_line(f"trains: {j.training}"))
        if j.demand is not None:
            typer.echo(escape_line(f"needs: {j.demand.summary}"))
        m = api.metrics(job_id, after_step=max(0, j.last_step - 1))
    if m.metrics:
        last = m.metrics[-1]
        typer.echo(
            escape_line(
                f"step {last['step']}: reward {last.get('reward/mean')}, entropy {last.get('entropy/mean')}, "
                f"tau {last.get('entropy/threshold')}, kept {last.get('entropy/kept_frac')}"
            )
        )


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=1, max=100_000, help="without --follow: the last N")
    ] = 1000,
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=0, help="without --follow: attempt N (0 = first, N = restart N)")
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="as the job wrote it, escape sequences included (trusted jobs only)")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Print the end of a job's driver log (--follow: the whole log, streamed live; --attempt: an
    earlier attempt's after restarts). The log is the job's own output: colours are dropped and every
    other control character but newline and tab is escaped, unless --raw."""
    if follow and attempt is not None:
        raise typer.BadParameter(
            f"--attempt {attempt}: --follow streams the current attempt only", param_hint="--attempt"
        )
    with _api(url, token) as api:
        if not follow:
            text = api.logs(job_id, lines, attempt)
            sys.stdout.write(text if raw else escape_log(text))
            return
        while True:
            try:
                for chunk in api.follow_logs(job_id) if raw else escape_stream(api.follow_logs(job_id)):
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
                return
            except ApiError as e:  # too many streams open: wait as the service asks, then again
                _back_off(e)


@app.command()
def cancel(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Cancel a job (idempotent)."""
    with _api(url, token) as api:
        j = api.cancel(job_id)
    requested = " (cancel requested)" if j.state.value not in TERMINAL_STATES else ""
    typer.echo(escape_line(f"{j.id}: {j.state.value}{requested}"))


@app.command()
def delete(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Delete a finished job's record (its run directory stays on disk)."""
    with _api(url, token) as api:
        api.delete(job_id)
    typer.echo(escape_line(f"deleted {job_id}"))


def _follow(url: str, token: str, job_id: str, total: int) -> int:
    """Live progress from the job's server-sent events; returns 0 when it succeeded."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=job_id, unit="step", dynamic_ncols=True)
    ended = False
    with _api(url, token) as api:
        try:
            while not ended:  # the service ends an idle stream; follow on from the last step seen
                try:
                    ended = _follow_stream(api, job_id, bar)
                except ApiError as e:
                    _back_off(e, bar.write)
        except httpx.TransportError as e:
            bar.close()
            _die(f"lost the control plane at {url}: {e}; `forkrl status {job_id}` shows where the job is", 1)
        bar.close()
        j = api.job(job_id)
    typer.echo(escape_line(f"{job_id}: {j.state.value} after {j.last_step} steps; run directory {j.run_dir}"))
    if j.message and j.state != JobState.SUCCEEDED:
        typer.echo(f"message: {escape_text(j.message)}")
    return 0 if j.state == JobState.SUCCEEDED else 1


def _back_off(e: ApiError, say: Any = None) -> None:
    """A 429 (the token or the service has as many streams open as allowed): wait `Retry-After`
    seconds; any other error is raised again."""
    if e.response.status_code != 429:
        raise e
    wait = int(e.response.headers.get("Retry-After", "10"))
    (say or (lambda text: sys.stderr.write(text + "\n")))(escape_line(f"{e}; retrying in {wait} s"))
    time.sleep(wait)


def _follow_stream(api: ForkrlClient, job_id: str, bar: Any) -> bool:
    """One events stream; True when the job ended, False when the service closed an idle stream."""
    for event, data in api.events(job_id, after_step=bar.n):
        if event == "state":
            bar.set_description(escape_line(f"{job_id} {data['state']}"))
            if data.get("message"):
                bar.write(escape_text(f"{data['state']}: {data['message']}"))
        elif event == "metrics":
            bar.update(max(0, data["step"] - bar.n))
            bar.set_postfix(reward=_fmt(data.get("reward/mean")), H=_fmt(data.get("entropy/mean")))
        elif event == "end":
            return bool(data.get("reason") != "idle")
    return False


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, int | float) else "-"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
