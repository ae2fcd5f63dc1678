"""The job store: the database is the durable queue (SQLite by default, PostgreSQL by URL).

Every state change is one short transaction.  Writers on SQLite take the database lock up front
(``BEGIN IMMEDIATE``; WAL journal, busy timeout), so a read-then-write such as claiming jobs is
atomic across threads and processes; on PostgreSQL a claim is ``SELECT … FOR UPDATE SKIP LOCKED``
and job creation takes a transaction-scoped advisory lock on the input hash, so two replicas
never claim the same job nor queue the same input set twice.

States: ``queued → running → succeeded | failed | cancelled``; ``running → queued`` when a worker
was lost (up to ``max_attempts`` runs) or the service restarted.  Only job ids are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import case, create_engine, delete, event, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from voxeldose.spec import JobSpec

from .auth import check_role, digest_matches, generate_token, hash_token
from .models import (
    Delivery,
    Instance,
    InstanceConflict,
    Job,
    OutputSeries,
    PendingPatient,
    Token,
    TriggerCycle,
    UTCDateTime,
    utcnow,
)

log = logging.getLogger("service.store")

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
_DEDUP_STATES = ("queued", "running", "succeeded")
_TOKEN_TOUCH_EVERY = timedelta(seconds=60)
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


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
    spec: dict
    submitted_by: str | None
    cancel_requested: bool
    source: str | None = None  # "upload" | "dicom" | "api"
    cycle_key: str | None = None  # node-started jobs: the therapy cycle (patient + injection)
    version: int | None = None  # node-started jobs: 1, 2, … per cycle (a late series adds a version)
    supersedes: str | None = None  # the job of the previous version

    def summary(self) -> dict[str, Any] | None:
        """The job's ``summary.json`` when it succeeded and the file is readable, else None."""
        if self.state != "succeeded" or not self.result_dir:
            return None
        try:
            return json.loads((Path(self.result_dir) / "summary.json").read_text())
        except (OSError, ValueError):
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
    )


def spec_hash(spec: dict) -> str:
    """SHA-256 of the spec without its ``inputs`` (they point into each upload's own folder),
    normalised through :class:`voxeldose.spec.JobSpec` when it validates (defaults spelled out)."""
    body = {k: v for k, v in spec.items() if k != "inputs"}
    try:
        body = JobSpec.model_validate({**spec, "inputs": ["."]}).model_dump(mode="json")
        body.pop("inputs", None)
    except Exception:  # noqa: BLE001 - an invalid spec still gets a stable hash; the run reports the problem
        pass
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_engine(url: str) -> Engine:
    u = make_url(url)
    if u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # hide_parameters: error texts (logged) must not carry bound values such as patient IDs
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite must not emit BEGIN itself: we do (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


class Store:
    """Jobs and tokens in one database.  Call :meth:`migrate` once before use."""

    def __init__(self, database_url: str, *, max_attempts: int = 3) -> None:
        self.url = normalise_url(database_url)
        self.max_attempts = max_attempts
        self.dialect = make_url(self.url).get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(self.url)
        else:
            self.engine = create_engine(
                self.url, pool_pre_ping=True, pool_size=5, max_overflow=10, hide_parameters=True
            )
        # Writers: BEGIN IMMEDIATE on SQLite (the lock first, so read-then-write cannot deadlock/race).
        self._writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")

    def __repr__(self) -> str:  # never print a password
        return f"Store({make_url(self.url).render_as_string(hide_password=True)!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ sessions
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer, expire_on_commit=False) as s, s.begin():
            yield s

    def _lock_input(self, s: Session, input_hash: str) -> None:
        if self.dialect == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(input_hash[:15], 16)})

    # ------------------------------------------------------------------ schema
    def migrate(self) -> None:
        """``alembic upgrade head`` on this database (the scripts ship inside the package)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._writer.begin() as conn:
            if self.dialect == "postgresql":  # two replicas starting at once migrate one after the other
                conn.execute(text("SELECT pg_advisory_xact_lock(7418230941)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            log.warning("database ping failed", exc_info=True)
            return False

    # ------------------------------------------------------------------ jobs
    def create_job(
        self,
        *,
        spec: dict,
        input_dir: str,
        input_hash: str,
        patient_id: str | None,
        idempotency_key: str | None,
        submitted_by: str | None,
        source: str | None = None,
        cycle_key: str | None = None,
        version: int | None = None,
        supersedes: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job; ``(job, created)``.  The same idempotency key, or the same input set with the
        same spec as a queued/running/succeeded job, returns that job with ``created=False``."""
        s_hash = spec_hash(spec)
        for attempt in range(2):
            try:
                with self._write() as s:
                    self._lock_input(s, input_hash)
                    if idempotency_key is not None:
                        j = s.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).first()
                        if j is not None:
                            return _record(j), False
                    j = s.scalars(
                        select(Job)
                        .where(Job.input_hash == input_hash, Job.spec_hash == s_hash, Job.state.in_(_DEDUP_STATES))
                        .order_by(Job.created_at.desc())
                    ).first()
                    if j is not None:
                        log.info("job %s: same input set and spec submitted again", j.id)
                        return _record(j), False
                    j = Job(
                        id=uuid.uuid4().hex,
                        state="queued",
                        progress=0.0,
                        created_at=utcnow(),
                        attempts=0,
                        patient_id=patient_id,
                        idempotency_key=idempotency_key,
                        input_hash=input_hash,
                        spec_hash=s_hash,
                        input_dir=str(input_dir),
                        spec=dict(spec),
                        submitted_by=submitted_by,
                        cancel_requested=False,
                        source=source,
                        cycle_key=cycle_key,
                        version=version,
                        supersedes=supersedes,
                    )
                    s.add(j)
                    s.flush()
                    rec = _record(j)
                log.info("job %s queued", rec.id)
                return rec, True
            except IntegrityError:  # a concurrent request with the same idempotency key won the race
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._read() as s:
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
        with self._read() as s:
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
        with self._write() as s:
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
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        with self._write() as s:
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
        with self._write() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(stage=stage, progress=p))

    def finish(self, job_id: str, result_dir: str, patient_id: str | None, output_series: list[str] = ()) -> None:
        """Running → succeeded; ``output_series``: the SeriesInstanceUIDs the job wrote (never inputs later)."""
        values: dict[str, Any] = dict(
            state="succeeded", result_dir=str(result_dir), stage="done", progress=1.0, error=None, finished_at=utcnow()
        )
        if patient_id:
            values["patient_id"] = patient_id
        with self._write() as s:
            n = s.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(**values)).rowcount
            if n:
                for uid in dict.fromkeys(output_series):
                    if s.get(OutputSeries, uid) is None:
                        s.add(OutputSeries(series_instance_uid=uid, job_id=job_id))
        if n:
            log.info("job %s succeeded", job_id)
        else:
            log.warning("job %s: finish ignored (not running)", job_id)

    def fail(self, job_id: str, error: str) -> None:
        """Queued/running → failed with a message for the physicist."""
        with self._write() as s:
            n = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES))
                .values(state="failed", error=error, finished_at=utcnow())
            ).rowcount
        if n:
            log.info("job %s failed", job_id)
        else:
            log.warning("job %s: fail ignored (not active)", job_id)

    def requeue(self, job_id: str, reason: str, *, count_attempt: bool = True) -> None:
        """Running → queued because its worker was lost; failed instead once ``attempts >= max_attempts``.
        ``count_attempt=False`` (an orderly service shutdown) gives the attempt back."""
        with self._write() as s:
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
            j.error = f"the job was stopped {j.attempts} times before it could finish ({reason}); not retried again"
            log.warning("job %s failed after %d attempts: %s", j.id, j.attempts, reason)
        else:
            if not count_attempt:
                j.attempts = max(0, j.attempts - 1)
            j.state, j.stage, j.progress, j.started_at = "queued", None, 0.0, None
            log.warning("job %s requeued: %s", j.id, reason)

    def mark_cancelled(self, job_id: str) -> None:
        with self._write() as s:
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
        with self._write() as s:
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
        with self._read() as s:
            return set(s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested.is_(True))).all())

    def counts_by_state(self) -> dict[str, int]:
        with self._read() as s:
            rows = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        out = {st: 0 for st in JOB_STATES}
        out.update({st: int(n) for st, n in rows})
        return out

    def patient_jobs(self, patient_id: str) -> list[JobRecord]:
        """The patient's succeeded jobs, oldest first (one per therapy cycle, normally)."""
        with self._read() as s:
            rows = s.scalars(
                select(Job)
                .where(Job.patient_id == patient_id, Job.state == "succeeded")
                .order_by(Job.created_at, Job.id)
            ).all()
            return [_record(j) for j in rows]

    # ------------------------------------------------------------------ tokens
    def create_token(self, name: str, role: str) -> str:
        """A new token; the plain text is returned once and only its SHA-256 is stored."""
        check_role(role)
        name = name.strip()
        if not name:
            raise ValueError("a token needs a name")
        plain = generate_token()
        with self._write() as s:
            if s.scalars(select(Token).where(Token.name == name, Token.revoked_at.is_(None))).first() is not None:
                raise ValueError(f"an active token named {name!r} exists: revoke it first")
            s.add(Token(name=name, role=role, token_hash=hash_token(plain), created_at=utcnow()))
        log.info("token %r created (role %s)", name, role)
        return plain

    def verify_token(self, plain: str) -> tuple[str, str] | None:
        """``(name, role)`` of an active token, else None."""
        if not plain:
            return None
        digest = hash_token(plain)
        with self._read() as s:
            t = s.scalars(select(Token).where(Token.token_hash == digest, Token.revoked_at.is_(None))).first()
            if t is None or not digest_matches(plain, t.token_hash):
                return None
            name, role, last, tid = t.name, t.role, t.last_used_at, t.id
        now = utcnow()
        if last is None or now - last > _TOKEN_TOUCH_EVERY:  # a write at most once a minute per token
            try:
                with self._write() as s:
                    s.execute(update(Token).where(Token.id == tid).values(last_used_at=now))
            except Exception:
                log.debug("could not update last_used_at", exc_info=True)
        return name, role

    def list_tokens(self) -> list[dict]:
        """Every token (never its hash): name, role, created_at, last_used_at, revoked_at, active."""
        with self._read() as s:
            rows = s.scalars(select(Token).order_by(Token.created_at, Token.id)).all()
            return [
                {
                    "name": t.name,
                    "role": t.role,
                    "created_at": t.created_at,
                    "last_used_at": t.last_used_at,
                    "revoked_at": t.revoked_at,
                    "active": t.revoked_at is None,
                }
                for t in rows
            ]

    def revoke_token(self, name: str) -> bool:
        """Revoke the active token(s) with this name; False when there was none."""
        with self._write() as s:
            n = s.execute(
                update(Token).where(Token.name == name, Token.revoked_at.is_(None)).values(revoked_at=utcnow())
            ).rowcount
        if n:
            log.info("token %r revoked", name)
        return bool(n)

    # ------------------------------------------------------------------ DICOM node (received instances)
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
        with self._write() as s:
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
        with self._read() as s:
            row = s.get(Instance, sop_instance_uid)
            return None if row is None else _instance_record(row)

    def record_conflict(
        self, *, sop_instance_uid: str, path: str, sha256: str, size: int, calling_ae: str | None
    ) -> bool:
        """Record a later copy with different content and flag the instance; False when this exact
        content was recorded before (nothing changed)."""
        with self._write() as s:
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

    def instance_conflicts(self, sop_instance_uid: str) -> list[dict]:
        """The conflicting copies of one instance, oldest first: ``path, sha256, size, received_at, calling_ae``."""
        with self._read() as s:
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
        with self._read() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.series_instance_uid == series_instance_uid)
                .order_by(Instance.sop_instance_uid)
            ).all()
            return [_instance_record(i) for i in rows]

    def series_summary(self, *, study_instance_uid: str | None = None, patient_id: str | None = None) -> list[dict]:
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

        def as_utc(v: Any) -> datetime | None:  # aggregates lose the column type on SQLite
            if v is None or isinstance(v, datetime) and v.tzinfo is not None:
                return v
            if isinstance(v, str):
                v = datetime.fromisoformat(v)
            return UTCDateTime().process_result_value(v, self.engine.dialect)

        with self._read() as s:
            rows = s.execute(q).all()
        out = [
            {
                "study_instance_uid": st,
                "series_instance_uid": se,
                "patient_id": pid,
                "modality": mod,
                "instances": int(n),
                "conflicts": int(nc or 0),
                "first_received_at": as_utc(t0),
                "last_received_at": as_utc(t1),
            }
            for st, se, pid, mod, n, nc, t0, t1 in rows
        ]
        out.sort(key=lambda d: (d["first_received_at"] or datetime.min.replace(tzinfo=UTC), d["series_instance_uid"]))
        return out

    def count_instances(self) -> int:
        with self._read() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    # ------------------------------------------------------------------ trigger (DICOM node → jobs)
    def patient_instances(self, patient_id: str) -> list[InstanceRecord]:
        """The first copies of every instance received for one patient (by series, then SOPInstanceUID)."""
        with self._read() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.patient_id == patient_id)
                .order_by(Instance.series_instance_uid, Instance.sop_instance_uid)
            ).all()
            return [_instance_record(i) for i in rows]

    def instances_of_series(self, series_instance_uids: list[str]) -> list[InstanceRecord]:
        with self._read() as s:
            rows = s.scalars(
                select(Instance)
                .where(Instance.series_instance_uid.in_(list(series_instance_uids)))
                .order_by(Instance.series_instance_uid, Instance.sop_instance_uid)
            ).all()
            return [_instance_record(i) for i in rows]

    def touch_patient(self, patient_id: str, ready_at: datetime) -> None:
        """Mark a patient's data as changed; the trigger looks at it from ``ready_at`` on.  A later
        touch replaces ``ready_at`` (the quiet period restarts with every instance)."""
        now = utcnow()
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        # one statement (an upsert), so concurrent marks and a concurrent clear cannot lose a mark
        stmt = insert(PendingPatient).values(patient_id=patient_id, ready_at=ready_at, touched_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[PendingPatient.patient_id], set_={"ready_at": ready_at, "touched_at": now}
        )
        with self._write() as s:
            s.execute(stmt)

    def due_patients(self, now: datetime) -> list[tuple[str, datetime]]:
        """``(patient_id, touched_at)`` of the pending patients whose ``ready_at`` has passed."""
        with self._read() as s:
            rows = s.execute(
                select(PendingPatient.patient_id, PendingPatient.touched_at)
                .where(PendingPatient.ready_at <= now)
                .order_by(PendingPatient.ready_at)
            ).all()
            return [(p, t) for p, t in rows]

    def clear_patient(self, patient_id: str, touched_at: datetime) -> bool:
        """Remove a pending patient unless it was touched again after ``touched_at`` (then it stays)."""
        with self._write() as s:  # one statement: a mark committed meanwhile has a later touched_at and stays
            n = s.execute(
                delete(PendingPatient).where(
                    PendingPatient.patient_id == patient_id, PendingPatient.touched_at <= touched_at
                )
            ).rowcount
        return bool(n)

    def upsert_trigger_cycle(
        self,
        *,
        cycle_key: str,
        patient_id: str,
        injection: str | None,
        state: str,
        reason: str | None,
        timepoints: int,
        job_id: str | None,
        deadline_after: timedelta | None,
        now: datetime,
    ) -> dict:
        """Record what the trigger decided for a cycle; ``first_seen_at`` is kept from the first call and
        the deadline is ``first_seen_at + deadline_after``.  Returns the row as a dict."""
        with self._write() as s:
            row = s.get(TriggerCycle, cycle_key)
            if row is None:
                row = TriggerCycle(
                    cycle_key=cycle_key,
                    patient_id=patient_id,
                    first_seen_at=now,
                    evaluated_at=now,
                    state=state,
                    timepoints=timepoints,
                )
                s.add(row)
            row.injection, row.state, row.reason, row.timepoints, row.evaluated_at = (
                injection,
                state,
                reason,
                timepoints,
                now,
            )
            if job_id is not None:
                row.job_id = job_id
            row.deadline_at = None if deadline_after is None else row.first_seen_at + deadline_after
            s.flush()
            return _cycle_dict(row)

    def retire_trigger_cycles(self, patient_id: str, keep: set[str]) -> int:
        """Remove the patient's waiting/error rows whose cycle is no longer formed (keys in ``keep`` stay;
        started rows stay as history)."""
        with self._write() as s:
            return s.execute(
                delete(TriggerCycle).where(
                    TriggerCycle.patient_id == patient_id,
                    TriggerCycle.state.in_(("waiting", "error")),
                    TriggerCycle.cycle_key.not_in(list(keep) or [""]),
                )
            ).rowcount

    def trigger_cycles(self, *, patient_id: str | None = None) -> list[dict]:
        """What the trigger knows of each cycle (newest first)."""
        q = select(TriggerCycle).order_by(TriggerCycle.first_seen_at.desc())
        if patient_id is not None:
            q = q.where(TriggerCycle.patient_id == patient_id)
        with self._read() as s:
            return [_cycle_dict(r) for r in s.scalars(q).all()]

    def get_trigger_cycle(self, cycle_key: str) -> dict | None:
        with self._read() as s:
            r = s.get(TriggerCycle, cycle_key)
            return None if r is None else _cycle_dict(r)

    def deadline_patients(self, now: datetime) -> list[str]:
        """Patients with a waiting cycle whose deadline has passed."""
        with self._read() as s:
            return list(
                dict.fromkeys(
                    s.scalars(
                        select(TriggerCycle.patient_id).where(
                            TriggerCycle.state == "waiting", TriggerCycle.deadline_at <= now
                        )
                    ).all()
                )
            )

    def jobs_for_input(self, input_hash: str) -> list[JobRecord]:
        """Every job ever created for this input set, oldest first."""
        with self._read() as s:
            rows = s.scalars(select(Job).where(Job.input_hash == input_hash).order_by(Job.created_at, Job.id)).all()
            return [_record(j) for j in rows]

    def cycle_jobs(self, cycle_key: str) -> list[JobRecord]:
        """The versions of one cycle's node-started jobs, oldest first."""
        with self._read() as s:
            rows = s.scalars(select(Job).where(Job.cycle_key == cycle_key).order_by(Job.version, Job.created_at)).all()
            return [_record(j) for j in rows]

    def output_series_among(self, series_instance_uids: list[str]) -> set[str]:
        """Which of these series voxeldose wrote itself."""
        if not series_instance_uids:
            return set()
        with self._read() as s:
            return set(
                s.scalars(
                    select(OutputSeries.series_instance_uid).where(
                        OutputSeries.series_instance_uid.in_(list(series_instance_uids))
                    )
                ).all()
            )

    def node_counts(self) -> dict[str, Any]:
        """For metrics: received instances, trigger cycles by state, deliveries by state."""
        with self._read() as s:
            instances = int(s.scalar(select(func.count()).select_from(Instance)) or 0)
            cycles = dict(s.execute(select(TriggerCycle.state, func.count()).group_by(TriggerCycle.state)).all())
            deliveries = dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        return {
            "instances": instances,
            "cycles": {k: int(v) for k, v in cycles.items()},
            "deliveries": {k: int(v) for k, v in deliveries.items()},
        }

    # ------------------------------------------------------------------ deliveries (results → PACS)
    def jobs_needing_delivery(
        self, sources: tuple[str, ...], destination: str, finished_after: datetime, limit: int = 20
    ) -> list[JobRecord]:
        """Succeeded jobs of these sources, finished after ``finished_after``, with no delivery row for
        ``destination`` yet (a new destination does not receive the whole history)."""
        with self._read() as s:
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

    def add_delivery(self, job_id: str, destination: str, now: datetime) -> bool:
        """A pending delivery, due at once; False when it exists."""
        try:
            with self._write() as s:
                exists = s.scalars(
                    select(Delivery.id).where(Delivery.job_id == job_id, Delivery.destination == destination)
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
                    )
                )
            return True
        except IntegrityError:
            return False

    def due_deliveries(self, now: datetime, destination: str, limit: int = 10) -> list[dict]:
        with self._read() as s:
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
        with self._write() as s:
            d = s.get(Delivery, delivery_id)
            if d is None:
                return
            d.attempts += 1
            if ok:
                d.state, d.sent_at, d.last_error, d.next_attempt_at = "sent", now, None, None
            else:
                d.last_error = error
                d.state = "pending" if next_attempt_at is not None else "failed"
                d.next_attempt_at = next_attempt_at

    def job_deliveries(self, job_id: str) -> list[dict]:
        with self._read() as s:
            rows = s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)).all()
            return [_delivery_dict(d) for d in rows]

    def retry_delivery(self, job_id: str, now: datetime) -> int:
        """Failed deliveries of a job back to pending (an operator's retry); returns how many."""
        with self._write() as s:
            return s.execute(
                update(Delivery)
                .where(Delivery.job_id == job_id, Delivery.state == "failed")
                .values(state="pending", next_attempt_at=now)
            ).rowcount


# ---------------------------------------------------------------------- DICOM node records
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


def _cycle_dict(r: TriggerCycle) -> dict:
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


def _delivery_dict(d: Delivery) -> dict:
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
    }
