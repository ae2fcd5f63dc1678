"""Database tables (SQLAlchemy 2 ORM).  The schema is created only by the Alembic migrations in
``service/migrations``; change both together (``alembic revision --autogenerate`` from ``service/``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned tz-aware (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    # the Idempotency-Key of the request that created it (keys are looked up in ``idempotency_keys``)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    input_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    spec_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    input_dir: Mapped[str] = mapped_column(Text, nullable=False)
    result_dir: Mapped[str | None] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    submitted_by: Mapped[str | None] = mapped_column(String(128))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # where the job came from: "upload" (HTTP), "dicom" (started by the DICOM node's trigger), "api" (series named)
    source: Mapped[str | None] = mapped_column(String(16))
    # the therapy cycle (patient + injection) of a node-started job, its version and the version it replaces
    cycle_key: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int | None] = mapped_column(Integer)
    supersedes: Mapped[str | None] = mapped_column(String(32))
    # the camera profile whose calibration the job took (migration 0005), and how it was chosen
    camera_profile_id: Mapped[int | None] = mapped_column(Integer)
    camera_match: Mapped[str | None] = mapped_column(Text)
    # an upload whose files the job's first stage still checks (migration 0006): what that stage needs; null after
    intake: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # an upload's SHA-256 of its files' digests: the same files sent again are the same job before any stage ran
    upload_hash: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_jobs_cycle", "cycle_key", "version"),
        Index("ix_jobs_state_created", "state", "created_at"),
        Index("ix_jobs_patient", "patient_id", "state"),
        Index("ix_jobs_input", "input_hash", "spec_hash"),
        Index("ix_jobs_upload", "upload_hash", "spec_hash"),
        Index("ix_jobs_created", "created_at"),
    )


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` a submitter (token name) used, the job its request got (created, or an existing job
    for the same input set), and that request's fingerprint: the same key with another request is refused."""

    __tablename__ = "idempotency_keys"

    submitted_by: Mapped[str] = mapped_column(String(128), primary_key=True)  # "" for none
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))  # None: unknown (a job from before 0004)
    job_id: Mapped[str] = mapped_column(String(32), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class CameraProfileRow(Base):
    """A registered camera profile (``camera.json``, :class:`voxeldose.camera.CameraProfile`).  Never deleted:
    a profile a job used is retired (``active`` false), so the job's record still names what it used."""

    __tablename__ = "camera_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    nuclide: Mapped[str] = mapped_column(String(32), nullable=False)
    manufacturer: Mapped[str] = mapped_column(String(200), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    device_serial_number: Mapped[str | None] = mapped_column(String(200))
    profile: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    retired_by: Mapped[str | None] = mapped_column(String(128))
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_camera_profiles_active", "active", "created_at"),)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Instance(Base):
    """One DICOM instance received by the DICOM node (the first copy of its SOPInstanceUID)."""

    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    study_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    series_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    flagged_conflict: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)

    __table_args__ = (
        Index("ix_instances_series", "series_instance_uid"),
        Index("ix_instances_study", "study_instance_uid"),
        Index("ix_instances_patient", "patient_id"),
    )


class InstanceConflict(Base):
    """A later copy of a SOPInstanceUID with different content, kept next to the first one."""

    __tablename__ = "instance_conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    calling_ae: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        Index("ix_instance_conflicts_sop", "sop_instance_uid"),
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_instance_conflicts_sop_sha256"),
    )


class PendingPatient(Base):
    """A patient whose received data changed: the trigger looks at it once ``ready_at`` has passed
    (the quiet period after the last instance, or at once after an association release)."""

    __tablename__ = "pending_patients"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ready_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    touched_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)


class TriggerCycle(Base):
    """What the trigger knows of one therapy cycle received through the DICOM node."""

    __tablename__ = "trigger_cycles"

    cycle_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), nullable=False)
    injection: Mapped[str | None] = mapped_column(String(32))  # local date-time as in DICOM, ISO 8601
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    evaluated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # waiting | started | error
    reason: Mapped[str | None] = mapped_column(Text)
    timepoints: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    job_id: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_trigger_cycles_patient", "patient_id"),
        Index("ix_trigger_cycles_deadline", "state", "deadline_at"),
    )


class OutputSeries(Base):
    """A series voxeldose wrote (RT Dose, SEG, SR): never taken as input when it comes back from the PACS."""

    __tablename__ = "output_series"

    series_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), nullable=False)


class Delivery(Base):
    """Sending one job's results to one DICOM destination (C-STORE), with retries."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), nullable=False)
    destination: Mapped[str] = mapped_column(String(128), nullable=False)  # AE@host:port
    state: Mapped[str] = mapped_column(String(16), nullable=False)  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # what is sent (migration 0007): "results" (the files as the job wrote them: preliminary, unapproved) or
    # "approval-<id>" (the approved copies written for approval <id>, :mod:`service.approval`)
    kind: Mapped[str] = mapped_column(String(32), nullable=False, default="results", server_default="results")

    __table_args__ = (
        UniqueConstraint("job_id", "destination", "kind", name="uq_deliveries_job_destination_kind"),
        Index("ix_deliveries_due", "state", "next_attempt_at"),
    )


class Approval(Base):
    """One review decision on one job's result (a job is one result version): never updated or deleted, so the
    rows of a job are its review history and the newest one is its state (:mod:`service.approval`)."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), nullable=False)
    decision: Mapped[str] = mapped_column(String(16), nullable=False)  # approved | rejected | revoked
    reason: Mapped[str | None] = mapped_column(Text)
    by_name: Mapped[str] = mapped_column(String(128), nullable=False)  # the token's name
    by_role: Mapped[str] = mapped_column(String(16), nullable=False)
    organisation: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    __table_args__ = (Index("ix_approvals_job", "job_id", "id"),)


class AuditEvent(Base):
    """The audit trail: who did what to which job, and when (append-only; written in the same transaction as
    the change it records)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128), nullable=False)
    actor_role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), nullable=False)  # e.g. "job.approved"
    job_id: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (Index("ix_audit_events_job", "job_id", "id"), Index("ix_audit_events_at", "at"))
