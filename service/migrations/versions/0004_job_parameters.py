"""jobs: the model's trainable and total parameters, as the run reports them (LoRA: the adapters)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 02:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trainable_params", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("params", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("params")
        batch_op.drop_column("trainable_params")
