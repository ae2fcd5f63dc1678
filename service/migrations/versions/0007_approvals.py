"""The physicist's review (issue 17 part 3): approvals, the audit trail, and what a delivery sends

``approvals``: one row per review decision on a job's result (approved, rejected with a reason, revoked with a
reason), never updated: the newest row of a job is its review state.  ``audit_events``: who did what to which job
and when (append-only).  ``deliveries.kind``: "results" (the files as the job wrote them, preliminary) or
"approval-<id>" (the approved copies of approval <id>), so that an approval after the first sending gets a
delivery of its own: the unique key becomes (job_id, destination, kind).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("by_name", sa.String(length=128), nullable=False),
        sa.Column("by_role", sa.String(length=16), nullable=False),
        sa.Column("organisation", sa.String(length=64), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_approvals"),
    )
    op.create_index("ix_approvals_job", "approvals", ["job_id", "id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("actor_role", sa.String(length=16), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_job", "audit_events", ["job_id", "id"])
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    with op.batch_alter_table("deliveries") as b:
        b.add_column(sa.Column("kind", sa.String(length=32), nullable=False, server_default="results"))
        b.drop_constraint("uq_deliveries_job_destination", type_="unique")
        b.create_unique_constraint("uq_deliveries_job_destination_kind", ["job_id", "destination", "kind"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as b:
        b.drop_constraint("uq_deliveries_job_destination_kind", type_="unique")
        b.execute("DELETE FROM deliveries WHERE kind <> 'results'")
        b.create_unique_constraint("uq_deliveries_job_destination", ["job_id", "destination"])
        b.drop_column("kind")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_index("ix_audit_events_job", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_approvals_job", table_name="approvals")
    op.drop_table("approvals")
