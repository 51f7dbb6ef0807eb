"""inference out-of-distribution score and flag (classifier v2)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 01:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inferences") as batch:
        batch.add_column(sa.Column("ood_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("ood", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inferences") as batch:
        batch.drop_column("ood")
        batch.drop_column("ood_score")
