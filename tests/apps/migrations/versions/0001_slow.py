"""a table, made slowly

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    sleep = (
        "SELECT pg_sleep(0.5)" if op.get_bind().dialect.name == "postgresql" else "DO SLEEP(0.5)"
    )
    op.execute(sleep)
    op.create_table("slow", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("slow")
