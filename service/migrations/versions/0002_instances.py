"""DICOM node: received instances (first copy per SOPInstanceUID) and conflicting later copies

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("flagged_conflict", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("sop_instance_uid", name="pk_instances"),
    )
    op.create_index("ix_instances_series", "instances", ["series_instance_uid"])
    op.create_index("ix_instances_study", "instances", ["study_instance_uid"])
    op.create_index("ix_instances_patient", "instances", ["patient_id"])

    op.create_table(
        "instance_conflicts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_instance_conflicts"),
        sa.UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_conflicts_sop_sha256"),
    )
    op.create_index("ix_instance_conflicts_sop", "instance_conflicts", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_instance_conflicts_sop", table_name="instance_conflicts")
    op.drop_table("instance_conflicts")
    for ix in ("ix_instances_patient", "ix_instances_study", "ix_instances_series"):
        op.drop_index(ix, table_name="instances")
    op.drop_table("instances")
