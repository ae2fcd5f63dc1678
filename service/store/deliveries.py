"""The deliveries table: a job's results sent (C-STORE) to the configured DICOM destination, with retries."""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from ..models import Delivery, Job
from .db import Database, affected
from .dicom import _iso
from .jobs import JobRecord, _record
from .redact import message_without_paths


class DeliveryInfo(TypedDict):
    """One delivery (date-times as ISO 8601 text)."""

    id: int
    job_id: str
    destination: str
    state: str
    attempts: int
    next_attempt_at: str | None
    last_error: str | None
    created_at: str | None
    sent_at: str | None
    kind: str


def _delivery_dict(d: Delivery) -> DeliveryInfo:
    return {
        "id": int(d.id),
        "job_id": d.job_id,
        "destination": d.destination,
        "state": d.state,
        "attempts": int(d.attempts),
        "next_attempt_at": _iso(d.next_attempt_at),
        "last_error": d.last_error,
        "created_at": _iso(d.created_at),
        "sent_at": _iso(d.sent_at),
        "kind": d.kind,
    }


class DeliveryTable:
    """Queue, attempt, retry and list deliveries."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def jobs_needing_delivery(
        self, sources: tuple[str, ...], destination: str, finished_after: datetime, limit: int = 20
    ) -> list[JobRecord]:
        """Succeeded jobs of these sources, finished after ``finished_after``, with no delivery row (of any kind)
        for ``destination`` yet (a new destination does not receive the whole history)."""
        with self.db.read() as s:
            have = select(Delivery.job_id).where(Delivery.destination == destination)
            rows = s.scalars(
                select(Job)
                .where(
                    Job.state == "succeeded",
                    Job.source.in_(sources),
                    Job.id.not_in(have),
                    Job.finished_at >= finished_after,
                )
                .order_by(Job.finished_at, Job.id)
                .limit(limit)
            ).all()
            return [_record(j) for j in rows]

    def add_delivery(self, job_id: str, destination: str, now: datetime, kind: str = "results") -> bool:
        """A pending delivery of ``kind`` ("results", "approval-<id>"), due at once; False when it exists."""
        try:
            with self.db.write() as s:
                exists = s.scalars(
                    select(Delivery.id).where(
                        Delivery.job_id == job_id, Delivery.destination == destination, Delivery.kind == kind
                    )
                ).first()
                if exists is not None:
                    return False
                s.add(
                    Delivery(
                        job_id=job_id,
                        destination=destination,
                        state="pending",
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                        kind=kind,
                    )
                )
            return True
        except IntegrityError:
            return False

    def due_deliveries(self, now: datetime, destination: str, limit: int = 10) -> list[DeliveryInfo]:
        with self.db.read() as s:
            rows = s.scalars(
                select(Delivery)
                .where(
                    Delivery.state == "pending", Delivery.next_attempt_at <= now, Delivery.destination == destination
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(limit)
            ).all()
            return [_delivery_dict(d) for d in rows]

    def delivery_attempted(
        self, delivery_id: int, *, ok: bool, error: str | None, now: datetime, next_attempt_at: datetime | None
    ) -> None:
        """Record one attempt: sent, or failed with a retry at ``next_attempt_at`` (None: given up)."""
        with self.db.write() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                return
            d.attempts += 1
            if ok:
                d.state, d.sent_at, d.last_error, d.next_attempt_at = "sent", now, None, None
            else:
                d.last_error = message_without_paths(error)
                d.state = "pending" if next_attempt_at is not None else "failed"
                d.next_attempt_at = next_attempt_at

    def job_deliveries(self, job_id: str) -> list[DeliveryInfo]:
        with self.db.read() as s:
            rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)).all()
            return [_delivery_dict(d) for d in rows]

    def retry_delivery(self, job_id: str, now: datetime) -> int:
        """Failed deliveries of a job back to pending (an operator's retry); returns how many."""
        with self.db.write() as s:
            return affected(
                s.execute(
                    update(Delivery)
                    .where(Delivery.job_id == job_id, Delivery.state == "failed")
                    .values(state="pending", next_attempt_at=now)
                )
            )
