"""API tokens: the bootstrap admin token of a start (FORKRL_ADMIN_TOKEN, or in development a generated
one in <data dir>/admin_token) and the bearer tokens the API creates. Only a token's SHA-256 is
stored; the secret is shown once, when it is made."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets

from sqlalchemy.exc import IntegrityError

from service.db import Token, now
from service.settings import Settings
from service.store import Conflict, JobStore, NotFound

log = logging.getLogger("forkrl.service")

__all__ = ["Tokens", "Unauthorized", "sha256"]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Unauthorized(PermissionError):
    """No valid token (401)."""


def _not_bootstrap(tok: Token) -> None:
    if tok.bootstrap:
        raise Conflict(
            f"token {tok.id} is the bootstrap admin token (FORKRL_ADMIN_TOKEN): rotate it by restarting the service "
            "with a new one, which revokes this one"
        )


def _warn_shared_owners(tokens: list[Token]) -> None:
    """Tokens made before owner names were kept apart: a live non-admin token named like an admin."""
    admins = {t.owner for t in tokens if t.is_admin}
    shared = sorted({t.owner for t in tokens if not t.is_admin and t.revoked_at is None and t.owner in admins})
    if shared:
        log.warning("non-admin tokens share an owner name with an admin token and see its jobs: %s; revoke them "
                    "(GET /v1/tokens, DELETE /v1/tokens/<id>)", ", ".join(shared))  # fmt: skip


class Tokens:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.admin_token = settings.admin_token

    def bootstrap_admin(self) -> None:
        """Store this start's admin token (revoking the earlier ones); refuse a weak, revoked or API-made one."""
        s = self.settings
        if not self.admin_token:
            if s.env == "production":
                raise RuntimeError("FORKRL_ADMIN_TOKEN must be set when FORKRL_ENV=production")
            path = s.data_dir / "admin_token"
            if path.is_file():
                self.admin_token = path.read_text().strip()
            else:
                self.admin_token = secrets.token_urlsafe(32)
                path.write_text(self.admin_token + "\n")
                path.chmod(0o600)
            log.warning("development mode: admin token in %s", path)
        if len(self.admin_token) < 16:
            raise RuntimeError("FORKRL_ADMIN_TOKEN must be at least 16 characters")
        digest = sha256(self.admin_token)
        try:
            revoked = self._store_bootstrap(digest)
        except IntegrityError:  # a replica starting beside this one stored the same token first: it is there now
            revoked = self._store_bootstrap(digest)
        if revoked:
            log.warning("admin token rotated: %d earlier bootstrap admin token(s) revoked", revoked)

    def _store_bootstrap(self, digest: str) -> int:
        with self.store.session(write=True) as db:
            tok = self.store.token_by_hash(db, digest)
            if tok is None:
                self.store.add_token(db, "admin", digest, True, bootstrap=True)
            elif not tok.bootstrap or tok.revoked_at is not None:
                raise RuntimeError("FORKRL_ADMIN_TOKEN is a revoked or API-created token: set a fresh one")
            revoked = self.store.revoke_bootstrap_except(db, digest)
            _warn_shared_owners(self.store.tokens(db))
        return revoked

    def authenticate(self, token: str) -> Token:
        with self.store.session() as db:
            tok = self.store.token_by_hash(db, sha256(token)) if token else None
        if tok is None or not tok.usable(now()):
            raise Unauthorized("invalid, revoked or expired token")
        return tok

    def lapsed(self, token_id: int) -> str | None:
        """Why a token authenticated earlier no longer holds ("revoked", "expired"), or None while it does
        (an open stream asks this on a timer)."""
        try:
            with self.store.session() as db:
                tok = self.store.token(db, token_id)
        except NotFound:
            return "revoked"
        if tok.revoked_at is not None:
            return "revoked"
        return None if tok.usable(now()) else "expired"

    def create(self, owner: str, admin: bool, expires_at: dt.datetime | None) -> tuple[Token, str]:
        """A new token (row, secret); only its hash is stored. Jobs belong to an owner name, so a name is either
        an admin's or a tenant's, never both: a tenant token named like an admin would read and cancel the
        admin's jobs (Conflict)."""
        token = secrets.token_urlsafe(32)
        with self.store.session(write=True) as db:
            was_admin, has_tenant = self.store.owner_kinds(db, owner)
            if was_admin and not admin:
                raise Conflict(
                    f"owner {owner!r} holds or held an admin token: a non-admin token for it would read and cancel "
                    "that admin's jobs (jobs belong to the owner name); choose another owner name"
                )
            if has_tenant and admin:
                raise Conflict(
                    f"owner {owner!r} holds non-admin tokens: an admin token under the same name would share its "
                    "jobs with them; revoke them first or choose another owner name"
                )
            return self.store.add_token(db, owner, sha256(token), admin, expires_at), token

    def all(self) -> list[Token]:
        with self.store.session() as db:
            return self.store.tokens(db)

    def revoke(self, token_id: int) -> Token:
        with self.store.session(write=True) as db:
            tok = self.store.token(db, token_id)
            _not_bootstrap(tok)
            if tok.revoked_at is None:
                tok.revoked_at = now()
            return tok

    def set_expiry(self, token_id: int, expires_at: dt.datetime | None) -> Token:
        with self.store.session(write=True) as db:
            tok = self.store.token(db, token_id)
            _not_bootstrap(tok)
            tok.expires_at = expires_at
            return tok
