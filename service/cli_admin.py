"""`forkrl token ...` (admin only), `forkrl quota ...` and `forkrl queue`: API tokens, per-owner
admission quotas, and the admission queue with the cluster's capacity."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from service.admission import resources_text
from service.cli_base import DEFAULT_URL, TokenOpt, UrlOpt, die, escape_line
from service.cli_base import api as _api
from service.schemas import TokenInfo

token_app = typer.Typer(help="API tokens (admin only).", no_args_is_help=True)
quota_app = typer.Typer(help="Per-owner admission quotas (admins set them).", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str | None) -> int | None:
    """'90d', '12h', '30m', '3600s' or '3600' -> seconds; None/'never' -> None."""
    if text is None or text == "never":
        return None
    unit = text[-1] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    if not number.isdigit():
        die(f"--expires-in {text!r}: expected a number with an optional unit s, m, h or d (e.g. 90d), or never")
    return int(number) * _UNITS[unit]


@token_app.command("create")
def token_create(
    owner: str,
    admin: Annotated[bool, typer.Option(help="the token may create tokens and see every job")] = False,
    expires_in: Annotated[str | None, typer.Option(help="e.g. 90d, 12h, 30m; default: never")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Create a token for OWNER; it is printed once."""
    expires_in_s = _duration(expires_in)
    with _api(url, token) as api:
        out = api.create_token(owner, admin, expires_in_s)
    typer.echo(out.token)


@token_app.command("list")
def token_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Every token: id, owner, role, created, expires, revoked (never the secret)."""
    with _api(url, token) as api:
        listed = api.tokens()
    typer.echo(f"{'ID':>5}  {'OWNER':20} {'ROLE':6} {'CREATED':20} {'EXPIRES':20} REVOKED")
    for t in listed.tokens:
        role = "admin" if t.admin else "owner"
        when = [(_times(t)[k] or "-")[:19] for k in ("created_at", "expires_at", "revoked_at")]
        typer.echo(escape_line(f"{t.id:>5}  {t.owner[:20]:20} {role:6} {when[0]:20} {when[1]:20} {when[2]}"))


def _times(t: TokenInfo) -> dict[str, str | None]:
    """A token's times as the API writes them (ISO 8601; None: never)."""
    shown: dict[str, str | None] = t.model_dump(mode="json", include={"created_at", "expires_at", "revoked_at"})
    return shown


@token_app.command("revoke")
def token_revoke(token_id: int, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Revoke a token by its id (from `forkrl token list`); it stops working at once."""
    with _api(url, token) as api:
        t = api.revoke_token(token_id)
    typer.echo(escape_line(f"revoked token {t.id} of {t.owner}"))


@token_app.command("expire")
def token_expire(
    token_id: int,
    expires_in: Annotated[str, typer.Argument(help="e.g. 90d, 12h, 0 (now), or never")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Set when a token expires."""
    expires_in_s = _duration(expires_in)
    with _api(url, token) as api:
        t = api.expire_token(token_id, expires_in_s)
    typer.echo(escape_line(f"token {t.id} of {t.owner} expires {_times(t)['expires_at'] or 'never'}"))


QUOTA_FIELDS = ("max_running_jobs", "max_cpus", "max_gpus", "max_priority")


def _quota_line(q: dict[str, Any]) -> str:
    bounds = "  ".join(f"{k}={'-' if q.get(k) is None else q[k]}" for k in QUOTA_FIELDS)
    return escape_line(f"{q['owner']:<20} {bounds}")


@quota_app.command("set")
def quota_set(
    owner: str,
    max_running_jobs: Annotated[int | None, typer.Option(help="jobs admitted at once")] = None,
    max_cpus: Annotated[float | None, typer.Option(help="Ray CPUs its admitted jobs request")] = None,
    max_gpus: Annotated[float | None, typer.Option(help="Ray GPUs its admitted jobs request")] = None,
    max_priority: Annotated[int | None, typer.Option(help="highest --priority it may submit with")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = "",
) -> None:
    """Set OWNER's quota (admin): every bound given; one left out is lifted."""
    body = {"max_running_jobs": max_running_jobs, "max_cpus": max_cpus, "max_gpus": max_gpus,
            "max_priority": max_priority}  # fmt: skip
    with _api(url, token) as api:
        typer.echo(_quota_line(api.set_quota(owner, body)))


@quota_app.command("get")
def quota_get(owner: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """OWNER's quota ('-': no bound)."""
    with _api(url, token) as api:
        typer.echo(_quota_line(api.quota(owner)))


@quota_app.command("list")
def quota_list(url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Every owner's quota (admin)."""
    with _api(url, token) as api:
        rows = api.quotas()
    for q in rows:
        typer.echo(_quota_line(q))
    if not rows:
        typer.echo("no quotas: every owner is bounded by the tenancy limits alone")


@quota_app.command("delete")
def quota_delete(owner: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """Remove OWNER's quota (admin)."""
    with _api(url, token) as api:
        api.delete_quota(owner)
    typer.echo(escape_line(f"removed the quota of {owner}"))


def queue(url: UrlOpt = DEFAULT_URL, token: TokenOpt = "") -> None:
    """The admission queue in order (an owner sees its own jobs), and the cluster's capacity."""
    with _api(url, token) as api:
        q = api.queue()
    if q.get("admission") == "kueue":
        typer.echo("admission: Kueue (each job is a RayJob; `forkrl status ID` shows why one waits)")
        return
    nodes = "Ray did not answer" if q["nodes"] is None else f"{q['nodes']} node(s), {resources_text(q['capacity'])}"
    typer.echo(escape_line(f"cluster: {nodes}; admitted jobs hold {resources_text(q['admitted'])}"))
    for r in q["queued"]:
        line = f"{r['position']:>4}. {r['id']}  priority {r['priority']}  {r['owner']}: {r['message']}"
        typer.echo(escape_line(line))
    if not q["queued"]:
        typer.echo("no job is queued")
