"""The review of results (issue 17 part 3) and the audit trail.

``approvals``: one row per decision on one job's result — a job is one result version (a later version of a
therapy cycle is another job, reviewed on its own).  Rows are never changed or deleted: the newest row of a job is
its *review state*, the rows together its history.  The states and the decisions allowed from each
(:func:`check_decision`):

=============  ===========================================  ===================
state          decisions allowed                             reason
=============  ===========================================  ===================
unreviewed     ``approved``, ``rejected``                    rejected: required
approved       ``rejected`` (withdraws it), ``revoked``      required
rejected       ``approved``, ``revoked``                     revoked: required
=============  ===========================================  ===================

``revoked`` takes a job back to *unreviewed*; a decision equal to the state is refused (409), so that two
physicists approving at once give one approval, not two.  Only succeeded jobs with results are reviewed.

``audit_events``: who did what to which job and when, written in the same transaction as the change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..errors import ErrorKind, ServiceError
from ..models import Approval, AuditEvent, Job, utcnow
from .db import Database
from .jobs import JobRecord, _record

log = logging.getLogger("service.store")

Decision = Literal["approved", "rejected", "revoked"]
ReviewState = Literal["unreviewed", "approved", "rejected"]
DECISIONS: tuple[Decision, ...] = ("approved", "rejected", "revoked")
#: Longest reason kept (characters).
MAX_REASON = 2000


@dataclass(frozen=True)
class ApprovalRecord:
    """One review decision (detached from any session)."""

    id: int
    job_id: str
    decision: Decision
    reason: str | None
    by_name: str
    by_role: str
    organisation: str | None
    at: datetime

    @property
    def state(self) -> ReviewState:
        """The review state this decision leaves the job in."""
        return "unreviewed" if self.decision == "revoked" else self.decision


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    actor_role: str | None
    action: str
    job_id: str | None
    detail: dict[str, Any] | None


def _approval(a: Approval) -> ApprovalRecord:
    return ApprovalRecord(
        id=int(a.id),
        job_id=a.job_id,
        decision=cast(Decision, a.decision),  # the column holds only DECISIONS (check_decision)
        reason=a.reason,
        by_name=a.by_name,
        by_role=a.by_role,
        organisation=a.organisation,
        at=a.at,
    )


def _audit(e: AuditEvent) -> AuditRecord:
    return AuditRecord(
        id=int(e.id),
        at=e.at,
        actor=e.actor,
        actor_role=e.actor_role,
        action=e.action,
        job_id=e.job_id,
        detail=dict(e.detail) if e.detail is not None else None,
    )


class ReviewRefused(ServiceError):
    """A review decision that the job's state or the rules above do not allow."""


def check_decision(job: JobRecord, current: ReviewState, decision: str, reason: str | None) -> str | None:
    """The decision's reason, cleaned (None when empty), or :class:`ReviewRefused` saying why it is not allowed."""
    if decision not in DECISIONS:
        raise ReviewRefused(
            ErrorKind.BAD_REQUEST,
            "Unknown decision",
            f"decision {decision!r}: expected one of {', '.join(DECISIONS)}",
            slug="bad-request",
        )
    text = (reason or "").strip() or None
    if text is not None and len(text) > MAX_REASON:
        raise ReviewRefused(
            ErrorKind.BAD_REQUEST,
            "Reason too long",
            f"the reason has {len(text)} characters; at most {MAX_REASON}",
            slug="bad-request",
        )
    if job.state != "succeeded" or not job.result_dir:
        raise ReviewRefused(
            ErrorKind.CONFLICT,
            "Nothing to review",
            f"job {job.id} is {job.state}: only a succeeded job's result can be approved or rejected",
            slug="not-reviewable",
        )
    if decision in ("rejected", "revoked") and text is None:
        raise ReviewRefused(
            ErrorKind.BAD_REQUEST, "Reason required", f"a {decision} decision needs a reason", slug="reason-required"
        )
    if decision == current or (decision == "revoked" and current == "unreviewed"):
        raise ReviewRefused(
            ErrorKind.CONFLICT,
            "Already decided",
            f"job {job.id} is already {current}: a {decision} decision changes nothing",
            slug="already-decided",
            state=current,
        )
    return text


class ApprovalTable:
    """Record and read review decisions and audit events."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _latest(s: Session, job_id: str) -> Approval | None:
        return s.scalars(
            select(Approval).where(Approval.job_id == job_id).order_by(Approval.id.desc()).limit(1)
        ).first()

    def record_decision(
        self,
        job_id: str,
        decision: str,
        reason: str | None,
        *,
        by_name: str,
        by_role: str,
        organisation: str | None,
        before_commit: Callable[[JobRecord, ApprovalRecord], dict[str, Any]] | None = None,
        now: datetime | None = None,
    ) -> ApprovalRecord | None:
        """Record one decision (rules: :func:`check_decision`) and its audit event in one transaction; None when
        there is no such job.  ``before_commit(job, approval)`` runs inside the transaction (an error undoes the
        decision); what it returns is added to the audit event's detail."""
        now = now or utcnow()
        with self.db.write() as s:
            row = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
            if row is None:
                return None
            job = _record(row)
            latest = self._latest(s, job_id)
            current: ReviewState = _approval(latest).state if latest is not None else "unreviewed"
            text = check_decision(job, current, decision, reason)
            a = Approval(
                job_id=job_id,
                decision=decision,
                reason=text,
                by_name=by_name,
                by_role=by_role,
                organisation=organisation,
                at=now,
            )
            s.add(a)
            s.flush()
            rec = _approval(a)
            extra = before_commit(job, rec) if before_commit is not None else {}
            detail: dict[str, Any] = {"approval_id": rec.id, "from": current, "to": rec.state, **extra}
            if text is not None:
                detail["reason"] = text
            s.add(
                AuditEvent(
                    at=now, actor=by_name, actor_role=by_role, action=f"job.{decision}", job_id=job_id, detail=detail
                )
            )
        log.info("job %s: result %s (approval %d)", job_id, decision, rec.id)
        return rec

    def review_state(self, job_id: str) -> ApprovalRecord | None:
        """The job's newest decision (None: never reviewed)."""
        with self.db.read() as s:
            a = self._latest(s, job_id)
            return None if a is None else _approval(a)

    def review_history(self, job_id: str) -> list[ApprovalRecord]:
        """All decisions on the job, oldest first."""
        with self.db.read() as s:
            rows = s.scalars(select(Approval).where(Approval.job_id == job_id).order_by(Approval.id)).all()
            return [_approval(a) for a in rows]

    def approved_since(self, since: datetime, limit: int = 50) -> list[tuple[JobRecord, ApprovalRecord]]:
        """Succeeded jobs whose newest decision is an approval made after ``since``, with that approval."""
        with self.db.read() as s:
            newest = select(Approval.job_id, func.max(Approval.id).label("id")).group_by(Approval.job_id).subquery()
            rows = s.execute(
                select(Job, Approval)
                .join(newest, newest.c.job_id == Job.id)
                .join(Approval, Approval.id == newest.c.id)
                .where(Approval.decision == "approved", Approval.at >= since, Job.state == "succeeded")
                .order_by(Approval.id)
                .limit(limit)
            ).all()
            return [(_record(j), _approval(a)) for j, a in rows]

    def audit(
        self, actor: str, actor_role: str | None, action: str, job_id: str | None, detail: dict[str, Any] | None
    ) -> None:
        """Append one audit event (for changes that are not review decisions)."""
        with self.db.write() as s:
            s.add(
                AuditEvent(at=utcnow(), actor=actor, actor_role=actor_role, action=action, job_id=job_id, detail=detail)
            )

    def audit_events(self, *, job_id: str | None = None, limit: int = 200) -> list[AuditRecord]:
        """Audit events, newest first (of one job when ``job_id`` is given)."""
        q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if job_id is not None:
            q = q.where(AuditEvent.job_id == job_id)
        with self.db.read() as s:
            return [_audit(e) for e in s.scalars(q).all()]
