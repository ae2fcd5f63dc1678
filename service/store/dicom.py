"""The DICOM node's tables: received instances (and conflicting copies), the series voxeldose wrote itself,
the patients pending a look by the trigger, and the trigger's verdict on each therapy cycle."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypedDict

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.orm import Session

from ..models import Delivery, Instance, InstanceConflict, OutputSeries, PendingPatient, TriggerCycle, utcnow
from .db import Database, affected
from .redact import message_without_paths

log = logging.getLogger("service.store")


def instances_digest(sop_instance_uids: Iterable[str]) -> str:
    """SHA-256 (hex) of a set of SOPInstanceUIDs, whatever their order: what the trigger compares to tell that no
    instance of a patient arrived between looking and writing (:meth:`service.trigger.Trigger.apply`)."""
    return hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode()).hexdigest()


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance (the first copy of its SOPInstanceUID), detached from any session."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    path: str
    sha256: str
    size: int
    received_at: datetime
    calling_ae: str | None
    flagged_conflict: bool


def _instance_record(i: Instance) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=i.sop_instance_uid,
        sop_class_uid=i.sop_class_uid,
        study_instance_uid=i.study_instance_uid,
        series_instance_uid=i.series_instance_uid,
        patient_id=i.patient_id,
        modality=i.modality,
        path=i.path,
        sha256=i.sha256,
        size=int(i.size),
        received_at=i.received_at,
        calling_ae=i.calling_ae,
        flagged_conflict=bool(i.flagged_conflict),
    )


def _iso(d: datetime | None) -> str | None:
    return None if d is None else d.isoformat()


class ConflictInfo(TypedDict):
    """A later copy of an instance with other content (kept beside the first)."""

    path: str
    sha256: str
    size: int
    received_at: datetime
    calling_ae: str | None


class SeriesInfo(TypedDict):
    """One received series."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    instances: int
    conflicts: int
    first_received_at: datetime | None
    last_received_at: datetime | None


@dataclass(frozen=True)
class CycleUpdate:
    """What the trigger decided for one therapy cycle (a row of ``trigger_cycles``)."""

    cycle_key: str
    patient_id: str
    injection: str | None  # ISO 8601 injection date and time, or None when the headers name none
    state: str  # waiting | error | started
    reason: str | None
    timepoints: int
    job_id: str | None  # the job started for it (None: keep the row's)
    deadline_after: timedelta | None  # deadline = first seen + this; None: no deadline
    now: datetime


class CycleInfo(TypedDict):
    """The trigger's verdict on one therapy cycle (date-times as ISO 8601 text)."""

    cycle_key: str
    patient_id: str
    injection: str | None
    state: str
    reason: str | None
    timepoints: int
    job_id: str | None
    first_seen_at: str | None
    evaluated_at: str | None
    deadline_at: str | None


class NodeCounts(TypedDict):
    """For metrics: received instances, trigger cycles by state, deliveries by state."""

    instances: int
    cycles: dict[str, int]
    deliveries: dict[str, int]


def _cycle_dict(r: TriggerCycle) -> CycleInfo:
    return {
        "cycle_key": r.cycle_key,
        "patient_id": r.patient_id,
        "injection": r.injection,
        "state": r.state,
        "reason": r.reason,
        "timepoints": int(r.timepoints or 0),
        "job_id": r.job_id,
        "first_seen_at": _iso(r.first_seen_at),
        "evaluated_at": _iso(r.evaluated_at),
        "deadline_at": _iso(r.deadline_at),
    }


class InstanceTable:
    """Received instances, their conflicting copies, and the output series (never inputs)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        patient_id: str | None,
        modality: str | None,
        path: str,
        sha256: str,
        size: int,
        calling_ae: str | None,
    ) -> tuple[InstanceRecord, bool]:
        """Index a received instance; returns ``(record, created)``.  An existing row for the SOPInstanceUID
        is returned unchanged (``created=False``): the caller compares hashes and records a conflict."""
        with self.db.write() as s:
            row = s.get(Instance, sop_instance_uid)
            if row is not None:
                return _instance_record(row), False
            row = Instance(
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                patient_id=patient_id,
                modality=modality,
                path=path,
                sha256=sha256,
                size=size,
                received_at=utcnow(),
                calling_ae=calling_ae,
                flagged_conflict=False,
            )
            s.add(row)
            s.flush()
            return _instance_record(row), True

    def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self.db.read() as s:
            row = s.get(Instance, sop_instance_uid)
            return None if row is None else _instance_record(row)

    def record_conflict(
        self, *, sop_instance_uid: str, path: str, sha256: str, size: int, calling_ae: str | None
    ) -> bool:
        """Record a later copy with different content and flag the instance; False when this exact
        content was recorded before (nothing changed)."""
        with self.db.write() as s:
            exists = s.scalars(
                select(InstanceConflict.id).where(
                    InstanceConflict.sop_instance_uid == sop_instance_uid, InstanceConflict.sha256 == sha256
                )
            ).first()
            if exists is not None:
                return False
            s.add(
                InstanceConflict(
                    sop_instance_uid=sop_instance_uid,
                    path=path,
                    sha256=sha256,
                    size=size,
                    received_at=utcnow(),
                    calling_ae=calling_ae,
                )
            )
            s.execute(
                update(Instance).where(Instance.sop_instance_uid == sop_instance_uid).values(flagged_conflict=True)
            )
        return True

    def instance_conflicts(self, sop_instance_uid: str) -> list[ConflictInfo]:
        """The conflicting copies of one instance, oldest first: ``path, sha256, size, received_at, calling_ae``."""
        with self.db.read() as s:
            rows = s.scalars(
                select(InstanceConflict)
                .where(InstanceConflict.sop_instance_uid == sop_instance_uid)
                .order_by(InstanceConflict.received_at, InstanceConflict.id)
            ).all()
            return [
                {
                    "path": c.path,
                    "sha256": c.sha256,
                    "size": int(c.size),
                    "received_at": c.received_at,
                    "calling_ae": c.calling_ae,
                }
                for c in rows
            ]

    def series_instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        """Every instance of one series (ordered by SOPInstanceUID)."""
        with self.db.read() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.series_instance_uid == series_instance_uid)
                .order_by(Instance.sop_instance_uid)
            ).all()
            return [_instance_record(i) for i in rows]

    def series_summary(
        self, *, study_instance_uid: str | None = None, patient_id: str | None = None
    ) -> list[SeriesInfo]:
        """One dict per received series: ``study_instance_uid, series_instance_uid, patient_id, modality,
        instances, conflicts, first_received_at, last_received_at`` (oldest series first)."""
        q = select(
            Instance.study_instance_uid,
            Instance.series_instance_uid,
            func.min(Instance.patient_id),
            func.min(Instance.modality),
            func.count(),
            func.sum(case((Instance.flagged_conflict.is_(True), 1), else_=0)),
            func.min(Instance.received_at),
            func.max(Instance.received_at),
        ).group_by(Instance.study_instance_uid, Instance.series_instance_uid)
        if study_instance_uid is not None:
            q = q.where(Instance.study_instance_uid == study_instance_uid)
        if patient_id is not None:
            q = q.where(Instance.patient_id == patient_id)

        with self.db.read() as s:
            rows = s.execute(q).all()
        out = [
            SeriesInfo(
                study_instance_uid=st,
                series_instance_uid=se,
                patient_id=pid,
                modality=mod,
                instances=int(n),
                conflicts=int(nc or 0),
                first_received_at=self.db.as_utc(t0),
                last_received_at=self.db.as_utc(t1),
            )
            for st, se, pid, mod, n, nc, t0, t1 in rows
        ]
        out.sort(key=lambda d: (d["first_received_at"] or datetime.min.replace(tzinfo=UTC), d["series_instance_uid"]))
        return out

    def count_instances(self) -> int:
        with self.db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    def patient_instances(self, patient_id: str) -> list[InstanceRecord]:
        """The first copies of every instance received for one patient (by series, then SOPInstanceUID)."""
        with self.db.read() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.patient_id == patient_id)
                .order_by(Instance.series_instance_uid, Instance.sop_instance_uid)
            ).all()
            return [_instance_record(i) for i in rows]

    def received_digest_in(self, s: Session, patient_id: str) -> str:
        """:func:`instances_digest` of every instance received for one patient, inside the caller's transaction."""
        uids = s.scalars(select(Instance.sop_instance_uid).where(Instance.patient_id == patient_id)).all()
        return instances_digest(uids)

    def instances_of_series(self, series_instance_uids: list[str]) -> list[InstanceRecord]:
        with self.db.read() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.series_instance_uid.in_(list(series_instance_uids)))
                .order_by(Instance.series_instance_uid, Instance.sop_instance_uid)
            ).all()
            return [_instance_record(i) for i in rows]

    def output_series_among(self, series_instance_uids: list[str]) -> set[str]:
        """Which of these series voxeldose wrote itself."""
        if not series_instance_uids:
            return set()
        with self.db.read() as s:
            return set(
                s.scalars(
                    select(OutputSeries.series_instance_uid).where(
                        OutputSeries.series_instance_uid.in_(list(series_instance_uids))
                    )
                ).all()
            )

    def node_counts(self) -> NodeCounts:
        """For metrics: received instances, trigger cycles by state, deliveries by state."""
        with self.db.read() as s:
            instances = int(s.scalar(select(func.count()).select_from(Instance)) or 0)
            cycles = dict(s.execute(select(TriggerCycle.state, func.count()).group_by(TriggerCycle.state)).all())
            deliveries = dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        return {
            "instances": instances,
            "cycles": {k: int(v) for k, v in cycles.items()},
            "deliveries": {k: int(v) for k, v in deliveries.items()},
        }


class CycleTable:
    """Pending patients (the trigger looks at them after the quiet period) and the trigger's cycle rows."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def touch_patient(self, patient_id: str, ready_at: datetime) -> None:
        """Mark a patient's data as changed; the trigger looks at it from ``ready_at`` on.  A later
        touch replaces ``ready_at`` (the quiet period restarts with every instance)."""
        with self.db.write() as s:
            self.touch_in(s, patient_id, ready_at)

    def touch_in(self, s: Session, patient_id: str, ready_at: datetime) -> None:
        """:meth:`touch_patient` inside the caller's transaction ``s``."""
        now = utcnow()
        # one statement (an upsert), so concurrent marks and a concurrent clear cannot lose a mark
        stmt = self.db.insert(PendingPatient).values(patient_id=patient_id, ready_at=ready_at, touched_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[PendingPatient.patient_id], set_={"ready_at": ready_at, "touched_at": now}
        )
        s.execute(stmt)

    def wake_waiting_cycles(self, reason_contains: str, ready_at: datetime) -> int:
        """Mark pending (from ``ready_at``) every patient with a waiting or error cycle whose reason contains
        ``reason_contains`` (e.g. a camera profile was registered: the cycles waiting for one are looked at
        again); the number of patients marked."""
        with self.db.write() as s:
            pids = s.scalars(
                select(TriggerCycle.patient_id)
                .where(
                    TriggerCycle.state.in_(("waiting", "error")),
                    TriggerCycle.reason.contains(reason_contains, autoescape=True),
                )
                .distinct()
            ).all()
            for pid in pids:
                self.touch_in(s, pid, ready_at)
        return len(pids)

    def due_patients(self, now: datetime) -> list[tuple[str, datetime]]:
        """``(patient_id, touched_at)`` of the pending patients whose ``ready_at`` has passed."""
        with self.db.read() as s:
            rows = s.execute(
                select(PendingPatient.patient_id, PendingPatient.touched_at)
                .where(PendingPatient.ready_at <= now)
                .order_by(PendingPatient.ready_at)
            ).all()
            return [(p, t) for p, t in rows]

    def clear_patient(self, patient_id: str, touched_at: datetime) -> bool:
        """Remove a pending patient unless it was touched again after ``touched_at`` (then it stays)."""
        with self.db.write() as s:  # one statement: a mark committed meanwhile has a later touched_at and stays
            n = affected(
                s.execute(
                    delete(PendingPatient).where(
                        PendingPatient.patient_id == patient_id, PendingPatient.touched_at <= touched_at
                    )
                )
            )
        return bool(n)

    def upsert_trigger_cycle(self, u: CycleUpdate) -> CycleInfo:
        """Record what the trigger decided for a cycle; ``first_seen_at`` is kept from the first call and
        the deadline is ``first_seen_at + deadline_after``.  Returns the row."""
        with self.db.write() as s:
            return self.upsert_in(s, u)

    def upsert_in(self, s: Session, u: CycleUpdate) -> CycleInfo:
        """:meth:`upsert_trigger_cycle` inside the caller's transaction ``s``."""
        row = s.get(TriggerCycle, u.cycle_key)
        if row is None:
            row = TriggerCycle(
                cycle_key=u.cycle_key,
                patient_id=u.patient_id,
                first_seen_at=u.now,
                evaluated_at=u.now,
                state=u.state,
                timepoints=u.timepoints,
            )
            s.add(row)
        row.injection, row.state, row.reason, row.timepoints, row.evaluated_at = (
            u.injection,
            u.state,
            message_without_paths(u.reason),
            u.timepoints,
            u.now,
        )
        if u.job_id is not None:
            row.job_id = u.job_id
        row.deadline_at = None if u.deadline_after is None else row.first_seen_at + u.deadline_after
        s.flush()
        return _cycle_dict(row)

    def retire_trigger_cycles(self, patient_id: str, keep: set[str]) -> int:
        """Remove the patient's waiting/error rows whose cycle is no longer formed (keys in ``keep`` stay;
        started rows stay as history)."""
        with self.db.write() as s:
            return self.retire_in(s, patient_id, keep)

    def retire_in(self, s: Session, patient_id: str, keep: set[str]) -> int:
        """:meth:`retire_trigger_cycles` inside the caller's transaction ``s``."""
        n: int = affected(
            s.execute(
                delete(TriggerCycle).where(
                    TriggerCycle.patient_id == patient_id,
                    TriggerCycle.state.in_(("waiting", "error")),
                    TriggerCycle.cycle_key.not_in(list(keep) or [""]),
                )
            )
        )
        return n

    def trigger_cycles(self, *, patient_id: str | None = None) -> list[CycleInfo]:
        """What the trigger knows of each cycle (newest first)."""
        q = select(TriggerCycle).order_by(TriggerCycle.first_seen_at.desc())
        if patient_id is not None:
            q = q.where(TriggerCycle.patient_id == patient_id)
        with self.db.read() as s:
            return [_cycle_dict(r) for r in s.scalars(q).all()]

    def get_trigger_cycle(self, cycle_key: str) -> CycleInfo | None:
        with self.db.read() as s:
            r = s.get(TriggerCycle, cycle_key)
            return None if r is None else _cycle_dict(r)

    def deadline_patients(self, now: datetime) -> list[str]:
        """Patients with a waiting cycle whose deadline has passed."""
        with self.db.read() as s:
            return list(
                dict.fromkeys(
                    s.scalars(
                        select(TriggerCycle.patient_id).where(
                            TriggerCycle.state == "waiting", TriggerCycle.deadline_at <= now
                        )
                    ).all()
                )
            )
