"""the heat map result of an inference (inferences.hm_series_uid, hm_sop_instance_uid)

Issue 11 adds a third result object next to the Secondary Capture and the Structured
Report: the Grad-CAM heat map as a DICOM Segmentation (FRACTIONAL). Its UIDs are recorded
like the others so that delivery (kind ``HM``), the audit and the spool clean-up know it.
NULL for inferences made before, or with ``CXR_SEND_HEATMAP=false``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 18:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inferences") as batch:
        batch.add_column(sa.Column("hm_series_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hm_sop_instance_uid", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inferences") as batch:
        batch.drop_column("hm_sop_instance_uid")
        batch.drop_column("hm_series_uid")
