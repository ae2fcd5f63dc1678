"""The store: the service's database, by table group over one engine/session module.

- :mod:`.db` — the engine, read/write sessions, migrations (:class:`Database`);
- :mod:`.jobs` — the jobs table, the durable queue (:class:`JobTable`, :class:`JobRecord`);
- :mod:`.tokens` — API tokens (:class:`TokenTable`);
- :mod:`.dicom` — received instances and output series (:class:`InstanceTable`), pending patients and the
  trigger's cycle rows (:class:`CycleTable`);
- :mod:`.cameras` — registered camera profiles (:class:`CameraTable`, :class:`CameraRecord`);
- :mod:`.deliveries` — results sent to the PACS (:class:`DeliveryTable`);
- :mod:`.approvals` — review decisions on results and the audit trail (:class:`ApprovalTable`);
- :mod:`.redact` — message texts without server paths (:func:`without_paths`), for the message columns.

:class:`Store` is all of them over one :class:`Database` (the groups are its bases, so callers keep one
object); :meth:`Store.trigger_writes` is the one transaction in which the trigger applies its decisions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .approvals import ApprovalRecord, ApprovalTable, AuditRecord, ReviewRefused, ReviewState
from .cameras import CameraRecord, CameraTable
from .db import MIGRATIONS_DIR, Database, normalise_url
from .deliveries import DeliveryInfo, DeliveryTable
from .dicom import (
    ConflictInfo,
    CycleInfo,
    CycleTable,
    CycleUpdate,
    InstanceRecord,
    InstanceTable,
    NodeCounts,
    SeriesInfo,
    instances_digest,
)
from .jobs import (
    ACTIVE_STATES,
    JOB_STATES,
    TERMINAL_STATES,
    IdempotencyKeyReused,
    JobRecord,
    JobTable,
    KeyUse,
    NewJob,
    spec_hash,
)
from .redact import message_without_paths, without_paths
from .tokens import TokenInfo, TokenTable

__all__ = [
    "ACTIVE_STATES",
    "ApprovalRecord",
    "AuditRecord",
    "ReviewRefused",
    "ReviewState",
    "JOB_STATES",
    "MIGRATIONS_DIR",
    "TERMINAL_STATES",
    "CameraRecord",
    "ConflictInfo",
    "CycleInfo",
    "CycleUpdate",
    "Database",
    "DeliveryInfo",
    "IdempotencyKeyReused",
    "InstanceRecord",
    "JobRecord",
    "KeyUse",
    "NewJob",
    "NodeCounts",
    "SeriesInfo",
    "Store",
    "TokenInfo",
    "TriggerWrites",
    "instances_digest",
    "message_without_paths",
    "normalise_url",
    "spec_hash",
    "without_paths",
]


class TriggerWrites:
    """The writes of one trigger decision round, all in one transaction (see :meth:`Store.trigger_writes`)."""

    def __init__(self, store: Store, s: Session) -> None:
        self._store = store
        self._s = s

    def create_job(self, new: NewJob) -> tuple[JobRecord, bool]:
        return self._store.create_in(self._s, new)

    def upsert_cycle(self, u: CycleUpdate) -> CycleInfo:
        return self._store.upsert_in(self._s, u)

    def touch_patient(self, patient_id: str, ready_at: datetime) -> None:
        self._store.touch_in(self._s, patient_id, ready_at)

    def retire_cycles(self, patient_id: str, keep: set[str]) -> int:
        return self._store.retire_in(self._s, patient_id, keep)

    def received_digest(self, patient_id: str) -> str:
        """:func:`.dicom.instances_digest` of the patient's received instances, as this transaction sees them."""
        return self._store.received_digest_in(self._s, patient_id)


class Store(JobTable, TokenTable, InstanceTable, CycleTable, DeliveryTable, CameraTable, ApprovalTable):
    """Every table group over one database.  Call :meth:`migrate` once before use."""

    def __init__(self, database_url: str, *, max_attempts: int = 3) -> None:
        self.db = Database(database_url)
        self.max_attempts = max_attempts

    def __repr__(self) -> str:  # never print a password
        return f"Store({self.db.safe_url!r})"

    @property
    def url(self) -> str:
        return self.db.url

    @property
    def dialect(self) -> str:
        return self.db.dialect

    @property
    def engine(self) -> Engine:
        return self.db.engine

    def migrate(self) -> None:
        """``alembic upgrade head`` on this database (the scripts ship inside the package)."""
        self.db.migrate()

    def ping(self) -> bool:
        return self.db.ping()

    def dispose(self) -> None:
        self.db.dispose()

    @contextmanager
    def trigger_writes(self) -> Iterator[TriggerWrites]:
        """One writing transaction for the trigger's decisions on a patient: jobs, cycle rows, marks."""
        with self.db.write() as s:
            yield TriggerWrites(self, s)
