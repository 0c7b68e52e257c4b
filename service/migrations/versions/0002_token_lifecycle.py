"""tokens: expiry, revocation, the bootstrap admin flag; no ingest token in stored configs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("bootstrap", sa.Boolean(), nullable=False, server_default=sa.false()))
    # before 0002 the bootstrap admin token was stored as owner "admin": mark those rows, so that the
    # next start with a rotated FORKRL_ADMIN_TOKEN revokes every earlier one
    tokens = sa.table("tokens", sa.column("owner", sa.String), sa.column("is_admin", sa.Boolean),
                      sa.column("bootstrap", sa.Boolean))  # fmt: skip
    op.execute(tokens.update().where(tokens.c.owner == "admin", tokens.c.is_admin.is_(True)).values(bootstrap=True))
    # stored configs carried the job's ingest token in plain text (tracking.report_token): drop it;
    # the token itself stays valid by its hash until the job is submitted again
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("config", sa.JSON))
    conn = op.get_bind()
    for job_id, config in conn.execute(sa.select(jobs.c.id, jobs.c.config)).all():
        tracking = (config or {}).get("tracking") or {}
        if "report_token" in tracking:
            tracking.pop("report_token")
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(config=config))


def downgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_column("bootstrap")
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("expires_at")
