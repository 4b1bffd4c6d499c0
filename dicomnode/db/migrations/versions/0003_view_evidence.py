"""Instance: free text that may tell a radiograph's view, for routing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("view_evidence", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("view_evidence")
