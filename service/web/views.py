"""What the API and the pages both show: the public form of a job, the jobs a caller may see, a patient's cycles.

The routes (:mod:`service.web.jobs`, :mod:`service.web.patients`) answer these as JSON; the pages
(:mod:`service.web.pages`) render them.  A job's public form never carries file system paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from voxeldose.summary import CyclesLeft as CyclesLeftSummary
from voxeldose.summary import Summary, ValueU

from ..auth import Principal
from ..store import ApprovalRecord, JobRecord, Store
from .deps import may_read
from .problems import ProblemError

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

#: The most jobs one list request returns (API ``limit``; the job-list page shows fewer).
MAX_LIMIT = 500
#: The largest ``offset`` a job list accepts, API and page alike (larger values overflow the database's
#: 64-bit integers; ten million jobs is far beyond any clinic's history).
MAX_OFFSET = 10_000_000


# --------------------------------------------------------------------------------------- jobs
class JobLinks(BaseModel):
    self: str
    cancel: str
    summary: str | None = Field(None, description="present once the job succeeded")
    rtdose: str | None = None
    report: str | None = None
    page: str = Field(description="the job's web page")


class Delivery(BaseModel):
    """Sending the results (RT Dose, SEG, SR) to a DICOM destination."""

    destination: str = Field(description="AE@host:port")
    state: Literal["pending", "sent", "failed"] = Field(description="pending (retrying), sent, or failed (gave up)")
    attempts: int
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    sent_at: datetime | None = None
    kind: str = Field(
        "results", description="results (the job's files, preliminary) or approval-<id> (the approved SR and RT Dose)"
    )


class ReviewDecision(BaseModel):
    """One decision of a physicist (or admin) on the job's result."""

    decision: Literal["approved", "rejected", "revoked"]
    reason: str | None = Field(None, description="required for rejected and revoked")
    by: str = Field(description="name of the token that decided")
    role: str
    organisation: str | None = None
    at: datetime


class Review(BaseModel):
    """The physicist's review of the job's result (one job = one result version)."""

    state: Literal["unreviewed", "approved", "rejected"] = Field(
        description="unreviewed until a physicist approves or rejects it; revoked goes back to unreviewed"
    )
    latest: ReviewDecision | None = Field(None, description="the decision that set the state")
    history: list[ReviewDecision] = Field(default_factory=list, description="every decision, oldest first")


def review_out(history: Sequence[ApprovalRecord]) -> Review:
    """The public form of a job's review history (oldest first)."""
    items = [
        ReviewDecision(
            decision=a.decision, reason=a.reason, by=a.by_name, role=a.by_role, organisation=a.organisation, at=a.at
        )
        for a in history
    ]
    return Review(
        state=history[-1].state if history else "unreviewed", latest=items[-1] if items else None, history=items
    )


class Job(BaseModel):
    """A dosimetry job.  Timestamps are UTC (ISO 8601)."""

    id: str = Field(description="uuid4 hex")
    state: JobState
    stage: str | None = Field(None, description="current pipeline stage (ingest, quantify, register, …, done)")
    progress: float = Field(ge=0, le=1)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(ge=0, description="runs started (a lost worker's job is retried)")
    error: str | None = Field(None, description="why the job failed, for a physicist")
    patient_id: str | None = None
    idempotency_key: str | None = None
    input_hash: str = Field(description="SHA-256 over the sorted SOPInstanceUIDs of the input set")
    spec: dict[str, Any] = Field(description="the job description (JobSpec) without its input paths")
    submitted_by: str | None = Field(None, description="name of the token that submitted it")
    cancel_requested: bool
    has_result: bool = Field(description="summary, RT Dose and report are available")
    source: str | None = Field(
        None, description="upload (HTTP files), api (series named), dicom (started by the DICOM node)"
    )
    version: int | None = Field(None, description="jobs the DICOM node started: 1, 2, … per therapy cycle")
    supersedes: str | None = Field(None, description="the job of the previous version of this cycle")
    deliveries: list[Delivery] = Field(default_factory=list, description="results sent to the PACS (DICOM C-STORE)")
    camera_profile_id: int | None = Field(
        None, description="the camera profile (/v1/cameras/{id}) matched to the job's SPECT camera"
    )
    camera_match: str | None = Field(
        None, description="which camera profile the job took and how (the newest of several matching ones)"
    )
    review: Review | None = Field(None, description="the physicist's review (on GET /v1/jobs/{id}, not in lists)")
    links: JobLinks


class JobList(BaseModel):
    items: list[Job]
    total: int = Field(description="jobs matching the filter (all pages)")
    limit: int
    offset: int


def job_out(
    rec: JobRecord,
    deliveries: Sequence[Mapping[str, Any]] | None = None,
    review: Sequence[ApprovalRecord] | None = None,
) -> Job:
    """The public form of a job (the one way to make it): no file system paths, not even the spec's inputs."""
    base = f"/v1/jobs/{rec.id}"
    done = rec.state == "succeeded" and rec.result_dir is not None
    spec = {k: v for k, v in (rec.spec or {}).items() if k != "inputs"}
    return Job(
        id=rec.id,
        state=rec.state,
        stage=rec.stage,
        progress=min(1.0, max(0.0, rec.progress or 0.0)),
        created_at=rec.created_at,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        attempts=rec.attempts,
        error=rec.error,
        patient_id=rec.patient_id,
        idempotency_key=rec.idempotency_key,
        input_hash=rec.input_hash,
        spec=spec,
        submitted_by=rec.submitted_by,
        cancel_requested=rec.cancel_requested,
        has_result=done,
        source=rec.source,
        version=rec.version,
        supersedes=rec.supersedes,
        deliveries=[Delivery.model_validate(d) for d in deliveries or []],
        camera_profile_id=rec.camera_profile_id,
        camera_match=rec.camera_match,
        review=review_out(review) if review is not None else None,
        links=JobLinks(
            self=base,
            cancel=f"{base}/cancel",
            page=f"/jobs/{rec.id}",
            summary=f"{base}/summary" if done else None,
            rtdose=f"{base}/rtdose" if done else None,
            report=f"{base}/report" if done else None,
        ),
    )


def not_found(job_id: str) -> ProblemError:
    return ProblemError(404, "Not found", f"no job {job_id}", slug="not-found")


def readable_job(store: Store, job_id: str, who: Principal) -> JobRecord:
    """The job, or 404 — also for a submitter asking for someone else's job (its existence is not revealed)."""
    rec = store.get_job(job_id)
    if rec is None or not may_read(who, rec):
        raise not_found(job_id)
    return rec


def list_visible(
    store: Store, who: Principal, *, state: str | None, patient_id: str | None, limit: int, offset: int
) -> tuple[list[JobRecord], int]:
    """Jobs the caller may see: all for physicists/admins, their own for submitters."""
    own = None if who.at_least("physicist") else who.name
    return store.list_jobs(state=state, patient_id=patient_id, limit=limit, offset=offset, submitted_by=own)


def job_summary(rec: JobRecord) -> Summary | None:
    """The job's validated summary, or None (see :meth:`service.store.JobRecord.summary`)."""
    return rec.summary()


# ----------------------------------------------------------------------------------- patients
class CycleRow(BaseModel):
    number: int | None = Field(None, description="therapy cycle number")
    date: str | None = Field(None, description="injection date (YYYY-MM-DD)")
    activity_mbq: float | None = None
    kidney_gy: float | None = None
    kidney_bed_gy: float | None = None
    marrow_gy: float | None = None
    job_id: str | None = Field(
        None, description="the job that measured this cycle (none for cycles only given as earlier cycles in a job)"
    )
    gy_per_gbq: dict[str, float] = Field(default_factory=dict, description="kidney/marrow absorbed dose per GBq")
    kidney_u_gy: float | None = Field(
        None, description="standard uncertainty of kidney_gy, Gy; null: not stated (an older result, or no budget)"
    )
    marrow_u_gy: float | None = Field(None, description="standard uncertainty of marrow_gy, Gy; null: not stated")


class Totals(BaseModel):
    kidney_gy: float | None = None
    kidney_bed_gy: float | None = None
    marrow_gy: float | None = None
    activity_mbq: float | None = None
    kidney_u_gy: float | None = Field(None, description="standard uncertainty of kidney_gy, Gy; null: not stated")
    kidney_bed_u_gy: float | None = Field(None, description="standard uncertainty of kidney_bed_gy, Gy")
    marrow_u_gy: float | None = Field(None, description="standard uncertainty of marrow_gy, Gy; null: not stated")
    coverage_factor: float | None = Field(None, description="k of the expanded uncertainty U = k·u (2: ≈ 95 %)")


class LimitRow(BaseModel):
    limit: str
    limit_gy: float | None = None
    current_gy: float | None = None
    per_cycle_gy: float | None = None
    cycles_left: int | None = None
    exceeded: bool | None = None
    message: str | None = None
    source: str | None = None


class PatientCycles(BaseModel):
    patient_id: str
    patient_name: str | None = None
    cycles: list[CycleRow] = Field(description="one row per cycle, in cycle order")
    cumulative: Totals = Field(description="totals over all cycles, from the newest job")
    limits: list[LimitRow] = Field(default_factory=list, description="each limit, from the newest job")
    cycles_left: int | None = Field(None, description="further cycles at the planned activity (newest job)")
    binding_limit: str | None = None
    planned_activity_mbq: float | None = None
    message: str | None = None
    newest_job_id: str | None = None
    cycles_left_upper_95: int | None = Field(
        None, description="further cycles at the 95 % upper bound of the doses (newest job); null: not computed"
    )
    binding_limit_upper_95: str | None = None
    message_upper_95: str | None = None


@dataclass(frozen=True)
class _SummaryCycles:
    """What one job's summary says about the patient's cycles (read in one place: :func:`_summary_cycles`)."""

    patient_name: str | None
    cycle_number: int | None  # the cycle this job measured
    cycles: list[CycleRow]  # cumulative.cycles, without job ids
    totals: Totals
    limits: list[LimitRow] = field(default_factory=list)
    cycles_left: int | None = None
    binding_limit: str | None = None
    planned_activity_mbq: float | None = None
    message: str | None = None
    upper: CyclesLeftSummary | None = None


def _u(vu: ValueU | None) -> float | None:
    return None if vu is None else vu.u


def _summary_cycles(summary: Summary) -> _SummaryCycles:
    """The cycle facts of one job's summary (the typed :class:`voxeldose.summary.Summary`)."""
    cum = summary.cumulative
    left = cum.cycles_left
    cu = cum.uncertainty
    return _SummaryCycles(
        patient_name=summary.patient.name,
        cycle_number=summary.cycle.number,
        cycles=[
            CycleRow(
                number=c.number,
                date=c.date,
                activity_mbq=c.activity_MBq,
                kidney_gy=c.kidney_gy,
                kidney_bed_gy=c.kidney_bed_gy,
                marrow_gy=c.marrow_gy,
                kidney_u_gy=None if c.kidney_u is None else c.kidney_u.u_gy,
                marrow_u_gy=None if c.marrow_u is None else c.marrow_u.u_gy,
            )
            for c in cum.cycles
        ],
        totals=Totals(
            kidney_gy=cum.total.dose_gy.get("kidney"),
            marrow_gy=cum.total.dose_gy.get("marrow"),
            kidney_bed_gy=cum.total.bed_gy.get("kidney"),
            activity_mbq=cum.total.activity_MBq,
            kidney_u_gy=None if cu is None else _u(cu.dose_gy.get("kidney")),
            kidney_bed_u_gy=None if cu is None else _u(cu.bed_gy.get("kidney")),
            marrow_u_gy=None if cu is None else _u(cu.dose_gy.get("marrow")),
            coverage_factor=None if cu is None else cu.coverage_factor,
        ),
        limits=[
            LimitRow(
                limit=x.limit,
                limit_gy=x.limit_gy,
                current_gy=x.current_gy,
                per_cycle_gy=x.per_cycle_gy,
                cycles_left=x.cycles_left,
                exceeded=x.exceeded,
                message=x.message,
                source=x.source,
            )
            for x in (left.limits if left is not None else [])
        ],
        cycles_left=None if left is None else left.cycles_left,
        binding_limit=None if left is None else left.binding_limit,
        planned_activity_mbq=cum.planned_activity_MBq,
        message=None if left is None else left.message,
        upper=None if left is None else left.upper_95,
    )


def patient_cycles(store: Store, patient_id: str) -> PatientCycles:
    """A patient's cycles from their succeeded jobs (oldest first); totals and limits from the newest."""
    jobs = store.patient_jobs(patient_id)
    if not jobs:
        raise ProblemError(404, "Not found", "no finished dosimetry for this patient", slug="not-found")
    rows: dict[int | None, CycleRow] = {}
    newest: _SummaryCycles | None = None
    newest_job = None
    name = None
    for rec in jobs:  # oldest first: a later job's row for the same cycle number replaces an earlier one
        summary = job_summary(rec)
        if summary is None:
            continue
        facts = _summary_cycles(summary)
        newest, newest_job = facts, rec
        name = facts.patient_name or name
        for c in facts.cycles:
            n = c.number
            measured_here = n == facts.cycle_number
            if n in rows and rows[n].job_id is not None and not measured_here:
                continue  # keep the row of the job that measured that cycle
            row = c.model_copy(update={"job_id": rec.id if measured_here else None})
            if measured_here and row.activity_mbq:
                gbq = row.activity_mbq / 1000.0
                row.gy_per_gbq = {
                    k: v / gbq for k, v in (("kidney", row.kidney_gy), ("marrow", row.marrow_gy)) if v is not None
                }
            rows[n] = row
    if newest is None:
        raise ProblemError(404, "Not found", "the results of this patient's jobs are missing", slug="not-found")
    return PatientCycles(
        patient_id=patient_id,
        patient_name=name,
        cycles=sorted(rows.values(), key=lambda r: (r.number is None, r.number or 0)),
        cumulative=newest.totals,
        limits=newest.limits,
        cycles_left=newest.cycles_left,
        binding_limit=newest.binding_limit,
        planned_activity_mbq=newest.planned_activity_mbq,
        message=newest.message,
        newest_job_id=newest_job.id if newest_job else None,
        cycles_left_upper_95=None if newest.upper is None else newest.upper.cycles_left,
        binding_limit_upper_95=None if newest.upper is None else newest.upper.binding_limit,
        message_upper_95=None if newest.upper is None else newest.upper.message,
    )
