"""Flow snapshots and the state generation they are checked against (controller/flowsnap.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    generation = op.create_table(
        "state_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_state_generation_one_row"),
        sa.PrimaryKeyConstraint("id", name="pk_state_generation"),
    )
    op.bulk_insert(generation, [{"id": 1, "value": 0}])
    op.create_table(
        "flow_snapshots",
        sa.Column("dpid", sa.String(20), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("config_digest", sa.String(64), nullable=False),
        sa.Column("ports", sa.Text(), nullable=False),
        sa.Column("valid_until", sa.Double(), nullable=True),
        sa.Column("taken_at", sa.Double(), nullable=False),
        sa.Column("flow_mods", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("dpid", name="pk_flow_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("flow_snapshots")
    op.drop_table("state_generation")
