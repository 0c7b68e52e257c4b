"""preemption: jobs.preempt_at (when the admission queue asked the job to stop for a higher-priority one)
and jobs.preemptions (how often it went back to the queue so)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 16:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("preemptions")
        batch_op.drop_column("preempt_at")
