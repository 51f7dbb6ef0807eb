"""named leases (leases: name, holder, expires_at, renewed_at)

Issue 10: one owner of the re-queue sweep. The node sweeps by default, but any process
that runs the sweep (two nodes, ``cxr worker --sweep``) first takes the ``requeue-sweep``
lease for the interval, so each stranded instance is re-queued once. See
db/lifecycle.py (``take_lease``, ``sweep``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
