"""The jobs table: the durable queue.

States: ``queued → running → succeeded | failed | cancelled``; ``running → queued`` when a worker
was lost (up to ``max_attempts`` runs) or the service restarted.  Only job ids are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from voxeldose.errors import VoxeldoseError
from voxeldose.spec import JobSpec
from voxeldose.summary import Summary

from ..errors import ErrorKind, ServiceError
from ..models import IdempotencyKey, Job, OutputSeries, utcnow
from .db import Database, affected
from .redact import without_paths

log = logging.getLogger("service.store")

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
_DEDUP_STATES = ("queued", "running", "succeeded")


@dataclass(frozen=True)
class JobRecord:
    """One job as the store returns it (detached from any session)."""

    id: str
    state: str
    stage: str | None
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    error: str | None
    patient_id: str | None
    idempotency_key: str | None
    input_hash: str
    input_dir: str
    result_dir: str | None
    spec: dict[str, Any]
    submitted_by: str | None
    cancel_requested: bool
    source: str | None = None  # "upload" | "dicom" | "api"
    cycle_key: str | None = None  # node-started jobs: the therapy cycle (patient + injection)
    version: int | None = None  # node-started jobs: 1, 2, … per cycle (a late series adds a version)
    supersedes: str | None = None  # the job of the previous version
    camera_profile_id: int | None = None  # the camera profile whose calibration it took
    camera_match: str | None = None  # which profile, and how it was chosen (for people)
    intake: dict[str, Any] | None = None  # an upload not checked yet: what the first stage needs (None: checked)
    upload_hash: str | None = None  # an upload: SHA-256 of its files' digests

    def summary(self) -> Summary | None:
        """The job's validated ``summary.json`` (:class:`voxeldose.summary.Summary`) when it succeeded, else None.

        A summary that cannot be read or does not follow the schema is logged (with the job id and the field at
        fault, never its values) and counts as none: the trigger then estimates that cycle and says so."""
        if self.state != "succeeded" or not self.result_dir:
            return None
        try:
            return Summary.load(Path(self.result_dir) / "summary.json")
        except VoxeldoseError as err:
            log.warning("job %s: its summary.json is unusable: %s (tag %s)", self.id, err.reason, err.tag)
            return None


def _record(j: Job) -> JobRecord:
    return JobRecord(
        id=j.id,
        state=j.state,
        stage=j.stage,
        progress=float(j.progress or 0.0),
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        attempts=j.attempts,
        error=j.error,
        patient_id=j.patient_id,
        idempotency_key=j.idempotency_key,
        input_hash=j.input_hash,
        input_dir=j.input_dir,
        result_dir=j.result_dir,
        spec=dict(j.spec or {}),
        submitted_by=j.submitted_by,
        cancel_requested=bool(j.cancel_requested),
        source=j.source,
        cycle_key=j.cycle_key,
        version=j.version,
        supersedes=j.supersedes,
        camera_profile_id=j.camera_profile_id,
        camera_match=j.camera_match,
        intake=dict(j.intake) if j.intake is not None else None,
        upload_hash=j.upload_hash,
    )


class IdempotencyKeyReused(ServiceError):
    """The caller's ``Idempotency-Key`` was used before with another request (422, as the IETF draft
    "The Idempotency-Key HTTP Header Field" asks for a key reused with a different payload)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            ErrorKind.INVALID,
            "Idempotency-Key reused",
            f"the Idempotency-Key {key!r} was used for job {job_id} with another request (other files, other "
            "series or another job description); send that request unchanged to get its job again, or use a new "
            "key for a new job",
            slug="idempotency-key-reused",
            job_id=job_id,
        )


@dataclass(frozen=True)
class KeyUse:
    """An ``Idempotency-Key`` a submitter used: the job its request got and that request's fingerprint."""

    job: JobRecord
    request_fingerprint: str | None  # None: unknown (a key used before fingerprints were kept)

    def same_request(self, fingerprint: str | None) -> bool:
        """Is a request with ``fingerprint`` a repeat of the one that used the key?  An unknown fingerprint on
        either side counts as the same request."""
        return self.request_fingerprint is None or fingerprint is None or self.request_fingerprint == fingerprint


def spec_hash(spec: Mapping[str, Any]) -> str:
    """SHA-256 of the spec without its ``inputs`` (they point into each upload's own folder),
    normalised through :class:`voxeldose.spec.JobSpec` when it validates (defaults spelled out)."""
    body = {k: v for k, v in spec.items() if k != "inputs"}
    try:
        body = JobSpec.model_validate({**spec, "inputs": ["."]}).model_dump(mode="json")
        body.pop("inputs", None)
    except Exception:  # noqa: BLE001 - an invalid spec still gets a stable hash; the run reports the problem
        pass
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class NewJob:
    """A job to queue (see :meth:`JobTable.create_job`)."""

    spec: Mapping[str, Any]  # the JobSpec as JSON (inputs point into input_dir)
    input_dir: str
    input_hash: str
    patient_id: str | None
    submitted_by: str | None
    idempotency_key: str | None = None
    source: str | None = None  # "upload" | "api" | "dicom"
    cycle_key: str | None = None  # node-started jobs: the therapy cycle
    version: int | None = None  # node-started jobs: 1, 2, … per cycle
    supersedes: str | None = None  # the job of the previous version
    request_fingerprint: str | None = None  # with an idempotency key: the request's fingerprint
    dedup_within: str | None = None  # reuse only this submitter's job for the same input set (None: anyone's)
    camera_profile_id: int | None = None  # the camera profile whose calibration the spec took
    camera_match: str | None = None  # which profile and how it was chosen
    intake: Mapping[str, Any] | None = None  # an upload whose files the first stage checks (see Job.intake)
    upload_hash: str | None = None  # an upload: the same files again are this job (instead of input_hash)


class JobTable:
    """Jobs: create (deduplicated), claim, progress, finish/fail/requeue/cancel, and the queries on them."""

    def __init__(self, db: Database, *, max_attempts: int = 3) -> None:
        self.db = db
        self.max_attempts = max_attempts

    def create_job(
        self,
        *,
        spec: dict[str, Any],
        input_dir: str,
        input_hash: str,
        patient_id: str | None,
        idempotency_key: str | None,
        submitted_by: str | None,
        source: str | None = None,
        cycle_key: str | None = None,
        version: int | None = None,
        supersedes: str | None = None,
        request_fingerprint: str | None = None,
        dedup_within: str | None = None,
        camera_profile_id: int | None = None,
        camera_match: str | None = None,
        intake: Mapping[str, Any] | None = None,
        upload_hash: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job; ``(job, created)``.  The same idempotency key of the same submitter with the same
        ``request_fingerprint``, or the same input set with the same spec as a queued/running/succeeded job (of
        the submitter ``dedup_within`` when given), returns that job with ``created=False``.  The same key with
        another fingerprint raises :class:`IdempotencyKeyReused`.

        An upload not checked yet (``intake``, ``upload_hash``): "the same input set" is the same files (by their
        bytes) until the first stage has read them; :meth:`intake_done` then applies the rule to the instances."""
        new = NewJob(
            spec=spec,
            input_dir=input_dir,
            input_hash=input_hash,
            patient_id=patient_id,
            idempotency_key=idempotency_key,
            submitted_by=submitted_by,
            source=source,
            cycle_key=cycle_key,
            version=version,
            supersedes=supersedes,
            request_fingerprint=request_fingerprint,
            dedup_within=dedup_within,
            camera_profile_id=camera_profile_id,
            camera_match=camera_match,
            intake=intake,
            upload_hash=upload_hash,
        )
        for attempt in range(2):
            try:
                with self.db.write() as s:
                    return self.create_in(s, new)
            except IntegrityError:  # a concurrent request with the same idempotency key won the race
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def create_in(self, s: Session, new: NewJob) -> tuple[JobRecord, bool]:
        """:meth:`create_job` inside the caller's transaction ``s``."""
        s_hash = spec_hash(new.spec)
        self.db.lock_input(s, new.upload_hash or new.input_hash)
        owner = new.submitted_by or ""
        if new.idempotency_key is not None:
            use = self._key_use(s, owner, new.idempotency_key)
            if use is not None:
                if not use.same_request(new.request_fingerprint):
                    raise IdempotencyKeyReused(new.idempotency_key, use.job.id)
                return use.job, False
        same = Job.input_hash == new.input_hash if new.upload_hash is None else Job.upload_hash == new.upload_hash
        same_input = [same, Job.spec_hash == s_hash, Job.state.in_(_DEDUP_STATES)]
        if new.dedup_within is not None:
            same_input.append(Job.submitted_by == new.dedup_within)
        j = s.scalars(select(Job).where(*same_input).order_by(Job.created_at.desc())).first()
        created = j is None
        if j is not None:
            log.info("job %s: same input set and spec submitted again", j.id)
        else:
            j = Job(
                id=uuid.uuid4().hex,
                state="queued",
                progress=0.0,
                created_at=utcnow(),
                attempts=0,
                patient_id=new.patient_id,
                idempotency_key=new.idempotency_key,
                input_hash=new.input_hash,
                spec_hash=s_hash,
                input_dir=str(new.input_dir),
                spec=dict(new.spec),
                submitted_by=new.submitted_by,
                cancel_requested=False,
                source=new.source,
                cycle_key=new.cycle_key,
                version=new.version,
                supersedes=new.supersedes,
                camera_profile_id=new.camera_profile_id,
                camera_match=new.camera_match,
                intake=dict(new.intake) if new.intake is not None else None,
                upload_hash=new.upload_hash,
            )
            s.add(j)
        if new.idempotency_key is not None:  # the key now names this job, whichever it is
            s.add(
                IdempotencyKey(
                    submitted_by=owner,
                    idempotency_key=new.idempotency_key,
                    request_fingerprint=new.request_fingerprint,
                    job_id=j.id,
                    created_at=utcnow(),
                )
            )
        s.flush()
        rec = _record(j)
        if created:
            log.info("job %s queued", rec.id)
        return rec, created

    @staticmethod
    def _key_use(s: Session, owner: str, key: str) -> KeyUse | None:
        k = s.get(IdempotencyKey, (owner, key))
        j = None if k is None else s.get(Job, k.job_id)
        return None if k is None or j is None else KeyUse(_record(j), k.request_fingerprint)

    def key_use(self, submitted_by: str | None, key: str) -> KeyUse | None:
        """What this submitter's (token name's) ``Idempotency-Key`` was used for, if it was."""
        with self.db.read() as s:
            return self._key_use(s, submitted_by or "", key)

    def intake_done(
        self,
        job_id: str,
        *,
        spec: dict[str, Any],
        input_hash: str,
        patient_id: str,
        camera_profile_id: int | None,
        camera_match: str | None,
    ) -> JobRecord | None:
        """The first stage checked a running upload's files: record its input set (``input_hash``: the SOP
        instances' digest), the patient, the job description (with a camera profile's calibration) and the profile.

        "The same input set" rule, now that the instances are known: when a queued, running or succeeded job (of
        the same submitter, unless the upload came from a physicist or admin: ``intake["dedup_within"]``) already
        has these instances and this description, that job is returned (the caller fails this one naming it);
        else None.  Under the input set's lock, so of two such uploads checked at once exactly one goes on."""
        with self.db.write() as s:
            self.db.lock_input(s, input_hash)
            j = s.get(Job, job_id)
            if j is None or j.state != "running" or j.intake is None:
                return None
            s_hash = spec_hash(spec)
            same = [
                Job.id != job_id,
                Job.input_hash == input_hash,
                Job.spec_hash == s_hash,
                Job.state.in_(_DEDUP_STATES),
            ]
            within = j.intake.get("dedup_within")
            if within is not None:
                same.append(Job.submitted_by == within)
            other = s.scalars(select(Job).where(*same).order_by(Job.created_at)).first()
            j.input_hash, j.spec_hash, j.spec, j.patient_id = input_hash, s_hash, dict(spec), patient_id
            j.camera_profile_id, j.camera_match, j.intake = camera_profile_id, camera_match, None
            if other is not None:
                log.info("job %s: the same input set and spec as job %s", job_id, other.id)
            s.flush()
            return None if other is None else _record(other)

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.db.read() as s:
            j = s.get(Job, job_id)
            return None if j is None else _record(j)

    def list_jobs(
        self,
        *,
        state: str | None = None,
        patient_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
        submitted_by: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        """Newest first, and the total number matching (``submitted_by``: one token name's jobs only)."""
        conds = []
        if submitted_by is not None:
            conds.append(Job.submitted_by == submitted_by)
        if state is not None:
            conds.append(Job.state == state)
        if patient_id is not None:
            conds.append(Job.patient_id == patient_id)
        with self.db.read() as s:
            total = s.scalar(select(func.count()).select_from(Job).where(*conds)) or 0
            rows = s.scalars(
                select(Job)
                .where(*conds)
                .order_by(Job.created_at.desc(), Job.id)
                .limit(max(0, limit))
                .offset(max(0, offset))
            ).all()
            return [_record(j) for j in rows], int(total)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Queued → cancelled at once; running → ``cancel_requested`` (the dispatcher stops it);
        finished jobs are returned unchanged."""
        with self.db.write() as s:
            j = s.get(Job, job_id)
            if j is None:
                return None
            if j.state == "queued":
                j.state, j.finished_at, j.cancel_requested = "cancelled", utcnow(), True
                log.info("job %s cancelled while queued", job_id)
            elif j.state == "running":
                j.cancel_requested = True
                log.info("job %s: cancel requested", job_id)
            s.flush()
            return _record(j)

    def claim_queued(self, limit: int) -> list[JobRecord]:
        """Queued → running (oldest first), ``attempts += 1``; no job is ever claimed twice."""
        if limit <= 0:
            return []
        q = select(Job).where(Job.state == "queued").order_by(Job.created_at, Job.id).limit(limit)
        if self.db.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        with self.db.write() as s:
            jobs = s.scalars(q).all()
            now = utcnow()
            for j in jobs:
                j.state, j.attempts, j.started_at = "running", j.attempts + 1, now
                j.stage, j.progress, j.finished_at = None, 0.0, None
            s.flush()
            out = [_record(j) for j in jobs]
        for r in out:
            log.info("job %s claimed (attempt %d)", r.id, r.attempts)
        return out

    def set_progress(self, job_id: str, stage: str, progress: float) -> None:
        p = min(1.0, max(0.0, float(progress)))
        with self.db.write() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(stage=stage, progress=p))

    def finish(self, job_id: str, result_dir: str, patient_id: str | None, output_series: Sequence[str] = ()) -> None:
        """Running → succeeded; ``output_series``: the SeriesInstanceUIDs the job wrote (never inputs later)."""
        values: dict[str, Any] = dict(
            state="succeeded", result_dir=str(result_dir), stage="done", progress=1.0, error=None, finished_at=utcnow()
        )
        if patient_id:
            values["patient_id"] = patient_id
        with self.db.write() as s:
            n = affected(s.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(**values)))
            if n:
                for uid in dict.fromkeys(output_series):
                    if s.get(OutputSeries, uid) is None:
                        s.add(OutputSeries(series_instance_uid=uid, job_id=job_id))
        if n:
            log.info("job %s succeeded", job_id)
        else:
            log.warning("job %s: finish ignored (not running)", job_id)

    def fail(self, job_id: str, error: str) -> None:
        """Queued/running → failed with a message for the physicist (any absolute path in it reduced to its last
        component: :func:`service.store.redact.without_paths`)."""
        with self.db.write() as s:
            n = affected(
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES))
                    .values(state="failed", error=without_paths(error), finished_at=utcnow())
                )
            )
        if n:
            log.info("job %s failed", job_id)
        else:
            log.warning("job %s: fail ignored (not active)", job_id)

    def requeue(self, job_id: str, reason: str, *, count_attempt: bool = True) -> None:
        """Running → queued because its worker was lost; failed instead once ``attempts >= max_attempts``.
        ``count_attempt=False`` (an orderly service shutdown) gives the attempt back."""
        with self.db.write() as s:
            j = s.get(Job, job_id)
            if j is None or j.state != "running":
                return
            self._requeue_row(j, reason, count_attempt)

    def _requeue_row(self, j: Job, reason: str, count_attempt: bool) -> None:
        if j.cancel_requested:
            j.state, j.finished_at = "cancelled", utcnow()
            log.info("job %s cancelled (%s)", j.id, reason)
        elif count_attempt and j.attempts >= self.max_attempts:
            j.state, j.finished_at = "failed", utcnow()
            j.error = without_paths(
                f"the job was stopped {j.attempts} times before it could finish ({reason}); not retried again"
            )
            log.warning("job %s failed after %d attempts: %s", j.id, j.attempts, reason)
        else:
            if not count_attempt:
                j.attempts = max(0, j.attempts - 1)
            j.state, j.stage, j.progress, j.started_at = "queued", None, 0.0, None
            log.warning("job %s requeued: %s", j.id, reason)

    def mark_cancelled(self, job_id: str) -> None:
        with self.db.write() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES))
                .values(state="cancelled", finished_at=utcnow(), cancel_requested=True)
            )
        log.info("job %s cancelled", job_id)

    def recover_after_restart(self) -> int:
        """Jobs left ``running`` by a service that died: back to queued (their run counts as an
        attempt, so a job that kills the service is not retried forever).  Returns how many."""
        n = 0
        with self.db.write() as s:
            for j in s.scalars(select(Job).where(Job.state == "running")).all():
                self._requeue_row(j, "the service stopped while the job ran", True)
                n += j.state == "queued"
        if n:
            log.warning("%d running job(s) requeued after a restart", n)
        return n

    def cancel_requested_ids(self, job_ids: list[str]) -> set[str]:
        """Which of these running jobs a user asked to cancel (for the dispatcher)."""
        if not job_ids:
            return set()
        with self.db.read() as s:
            return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True))).all())

    def counts_by_state(self) -> dict[str, int]:
        with self.db.read() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        out = {st: 0 for st in JOB_STATES}
        out.update({st: int(n) for st, n in rows})
        return out

    def patient_jobs(self, patient_id: str) -> list[JobRecord]:
        """The patient's succeeded jobs, oldest first (one per therapy cycle, normally)."""
        with self.db.read() as s:
            rows = s.scalars(
                select(Job)
                .where(Job.patient_id == patient_id, Job.state == "succeeded")
                .order_by(Job.created_at, Job.id)
            ).all()
            return [_record(j) for j in rows]

    def jobs_for_input(self, input_hash: str) -> list[JobRecord]:
        """Every job ever created for this input set, oldest first."""
        with self.db.read() as s:
            rows = s.scalars(select(Job).where(Job.input_hash == input_hash).order_by(Job.created_at, Job.id)).all()
            return [_record(j) for j in rows]

    def cycle_jobs(self, cycle_key: str) -> list[JobRecord]:
        """The versions of one cycle's node-started jobs, oldest first."""
        with self.db.read() as s:
            rows = s.scalars(select(Job).where(Job.cycle_key == cycle_key).order_by(Job.version, Job.created_at)).all()
            return [_record(j) for j in rows]
