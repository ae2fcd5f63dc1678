"""DICOM node, second part: job origin and versions, trigger bookkeeping, output series, deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("source", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("cycle_key", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("version", sa.Integer(), nullable=True))
        b.add_column(sa.Column("supersedes", sa.String(length=32), nullable=True))
    op.create_index("ix_jobs_cycle", "jobs", ["cycle_key", "version"])

    op.create_table(
        "pending_patients",
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("patient_id", name="pk_pending_patients"),
    )
    op.create_table(
        "trigger_cycles",
        sa.Column("cycle_key", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("injection", sa.String(length=32), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("timepoints", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("cycle_key", name="pk_trigger_cycles"),
    )
    op.create_index("ix_trigger_cycles_patient", "trigger_cycles", ["patient_id"])
    op.create_index("ix_trigger_cycles_deadline", "trigger_cycles", ["state", "deadline_at"])
    op.create_table(
        "output_series",
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("series_instance_uid", name="pk_output_series"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("job_id", "destination", name="uq_deliveries_job_destination"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_table("output_series")
    op.drop_index("ix_trigger_cycles_deadline", table_name="trigger_cycles")
    op.drop_index("ix_trigger_cycles_patient", table_name="trigger_cycles")
    op.drop_table("trigger_cycles")
    op.drop_table("pending_patients")
    op.drop_index("ix_jobs_cycle", table_name="jobs")
    with op.batch_alter_table("jobs") as b:
        for c in ("supersedes", "version", "cycle_key", "source"):
            b.drop_column(c)
