"""Uploads answered at once (issue 15 part 2): an upload's files are checked by the job's first stage

``jobs.intake``: for an upload whose files are not checked yet, what that stage needs (JSON: the job description
as sent, whether a .zip came, the submitter scope of the "same input set" rule); null once checked (and for jobs
on received series or started by the DICOM node).  ``jobs.upload_hash``: the SHA-256 of the upload's file
digests, so that the same files sent again are the same job at once, before any stage has run.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("intake", sa.JSON(), nullable=True))
        b.add_column(sa.Column("upload_hash", sa.String(length=64), nullable=True))
    op.create_index("ix_jobs_upload", "jobs", ["upload_hash", "spec_hash"])


def downgrade() -> None:
    op.drop_index("ix_jobs_upload", table_name="jobs")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("upload_hash")
        b.drop_column("intake")
