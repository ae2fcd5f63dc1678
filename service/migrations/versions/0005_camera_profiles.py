"""Camera profiles (issue 12): registered ``camera.json`` profiles, and the profile each job's calibration came from

``camera_profiles`` keeps every profile ever registered (a profile is retired, never deleted: the jobs that used
it still name it); ``jobs.camera_profile_id`` and ``jobs.camera_match`` say which profile a job took and how it
was chosen.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
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
        "camera_profiles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("nuclide", sa.String(length=32), nullable=False),
        sa.Column("manufacturer", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("device_serial_number", sa.String(length=200), nullable=True),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("retired_by", sa.String(length=128), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_camera_profiles"),
    )
    op.create_index("ix_camera_profiles_active", "camera_profiles", ["active", "created_at"])
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("camera_profile_id", sa.Integer(), nullable=True))
        b.add_column(sa.Column("camera_match", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as b:
        b.drop_column("camera_match")
        b.drop_column("camera_profile_id")
    op.drop_index("ix_camera_profiles_active", table_name="camera_profiles")
    op.drop_table("camera_profiles")
