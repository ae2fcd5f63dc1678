"""Idempotency keys per submitter, with the fingerprint of the request that used each key

An ``Idempotency-Key`` belongs to its submitter (token name) instead of the whole service, so that a submitter
reusing another's key gets a job of its own and learns nothing of the other's; the key remembers the request
that used it (``request_fingerprint``), so that the same key with another request body is refused, also when
that request got an existing job for the same input set (issue 14).  Keys of jobs created before are copied
with an unknown (NULL) fingerprint.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("submitted_by", sa.String(length=128), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("request_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("submitted_by", "idempotency_key", name="pk_idempotency_keys"),
    )
    op.execute(
        "INSERT INTO idempotency_keys (submitted_by, idempotency_key, request_fingerprint, job_id, created_at) "
        "SELECT COALESCE(submitted_by, ''), idempotency_key, NULL, id, created_at FROM jobs "
        "WHERE idempotency_key IS NOT NULL"
    )
    with op.batch_alter_table("jobs") as b:
        b.drop_constraint("uq_jobs_idempotency_key", type_="unique")


def downgrade() -> None:
    # the service-wide uniqueness comes back only if no two submitters used the same key meanwhile
    with op.batch_alter_table("jobs") as b:
        b.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
    op.drop_table("idempotency_keys")
