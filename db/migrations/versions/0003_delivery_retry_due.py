"""delivery retries that wait in the audit DB (instances.retry_due_at, retry_attempt)
and the claim owner (instances.claimed_by)

A delivery retry whose backoff is longer than CXR_RETRY_ETA_MAX is not held by the
broker as a countdown (Redis would redeliver it after its visibility timeout) but written
here; the re-queue sweep sends it when it is due. See db/lifecycle.py. The task id that
holds an instance's ``processing`` claim used to be parsed out of an event's text; it is a
column now (existing claims keep working: a claim without an owner is taken over when
stale, as before).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 08:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("retry_due_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retry_attempt", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.create_index("ix_instances_retry_due_at", ["retry_due_at"])


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_index("ix_instances_retry_due_at")
        batch.drop_column("claimed_by")
        batch.drop_column("retry_attempt")
        batch.drop_column("retry_due_at")
