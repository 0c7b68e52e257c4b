"""The bootstrap admin token when replicas start at once on one database: both read "no such token",
one inserts, the other's insert hits the unique token hash (seen on PostgreSQL in CI). The loser must
find the winner's row and start, not fail. A real SQLite store; the race is forced by a store whose
first lookup answers "none" as the losing replica's lookup did (the interleaving cannot be timed here)."""

from __future__ import annotations

from service.db import migrate
from service.settings import Settings
from service.store import JobStore
from service.tokens import Tokens, sha256


class _LostRace(JobStore):
    """A replica whose first lookup ran before the other replica's insert committed."""

    misses = 1

    def token_by_hash(self, db, digest):
        if self.misses:
            self.misses -= 1
            return None
        return super().token_by_hash(db, digest)


def test_the_replica_that_loses_the_bootstrap_insert_race_starts(tmp_path):
    url = f"sqlite:///{tmp_path / 'forkrl.db'}"
    settings = Settings(data_dir=tmp_path, database_url=url, admin_token="a-shared-admin-token-0123456789")
    first = JobStore(url)
    migrate(first.engine)
    Tokens(first, settings).bootstrap_admin()  # the winner
    second = Tokens(_LostRace(url), settings)
    second.bootstrap_admin()  # its insert fails on the unique hash; the retry finds the winner's token
    with first.session() as db:
        toks = first.tokens(db)
    assert [(t.owner, t.is_admin, t.bootstrap, t.revoked_at) for t in toks] == [("admin", True, True, None)]
    assert toks[0].token_hash == sha256("a-shared-admin-token-0123456789")
    assert second.authenticate("a-shared-admin-token-0123456789").id == toks[0].id
