"""Results back to the PACS: C-STORE of a job's RT Dose, SEG and SR to the configured destination AE.

    VOXELDOSE_DICOM_DESTINATION_AE_TITLE=PACS VOXELDOSE_DICOM_DESTINATION_HOST=10.0.0.5 \
    VOXELDOSE_DICOM_DESTINATION_PORT=104 voxeldose serve

Every succeeded job whose origin is in ``dicom_send_sources`` (by default: jobs the DICOM node started)
gets a *delivery* row for the destination.  :meth:`Sender.tick` sends the due ones in one association
(``rtdose.dcm``, ``seg.dcm``, ``sr.dcm`` of the job's results, those that exist).  A failure — peer down,
association rejected, a C-STORE status other than success or warning — is recorded on the delivery
(``GET /v1/jobs/{id}`` shows it) and retried after ``dicom_send_retry_s``, doubling each time up to one
hour, until ``dicom_send_max_attempts``; then the delivery is *failed* (an operator may retry it with
``POST /v1/jobs/{id}/send``).  The results stay available over the API whatever happens here.

Approval (:mod:`service.approval`): a job's own files are *preliminary* (SR UNVERIFIED/PRELIMINARY, RT Dose
"PRELIMINARY"); they are sent (delivery kind ``results``) only when ``dicom_send_unapproved`` is true (the
default).  A physicist's approval writes approved copies; a job whose newest decision is an approval made within
``dicom_send_max_age_h`` gets a delivery ``approval-<id>`` that sends them (with the SEG): after the preliminary
results when those went first, instead of them when the job was approved before any sending.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from .approval import APPROVED_FILES, approval_id_of, approved_dir, delivery_kind
from .config import Settings
from .models import utcnow
from .store import DeliveryInfo, JobRecord, Store

log = logging.getLogger("service.sender")

#: The result files sent, in this order (those a job wrote).
RESULT_FILES = ("rtdose.dcm", "seg.dcm", "sr.dcm")
#: C-STORE statuses that mean "stored" (PS3.4 Table B.2-1): success, and the warnings coercion of data
#: elements (0xB000), elements discarded (0xB006), data set does not match SOP class (0xB007).
STORED_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)
MAX_RETRY_S = 3600.0


class SendError(Exception):
    """Sending failed; the message says how (no patient data)."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send_files(paths: list[Path], dest: Destination, *, calling_ae: str, timeout_s: float = 60.0) -> list[int]:
    """C-STORE ``paths`` to ``dest`` in one association; returns the status of each.  Raises
    :class:`SendError` when the association fails or any status is not in :data:`STORED_STATUSES`."""
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    for sop in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as exc:  # noqa: BLE001 - a bad host name, say
        raise SendError(f"cannot reach {dest}: {type(exc).__name__}: {exc}") from None
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SendError(f"association with {dest} not established ({why})")
    statuses: list[int] = []
    try:
        for path, ds in zip(paths, datasets):
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            statuses.append(code)
            if code not in STORED_STATUSES:
                what = "no response (timeout or aborted)" if code == -1 else f"status 0x{code:04X}"
                raise SendError(f"{dest} did not store {path.name}: {what}")
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def delivery_files(job: JobRecord, kind: str) -> list[Path]:
    """The files a delivery of ``kind`` sends (those that exist): the job's own (preliminary) results, or the
    approved copies of one approval with the job's SEG."""
    result = Path(job.result_dir or "")
    approval_id = approval_id_of(kind)
    if approval_id is None:
        files = [result / n for n in RESULT_FILES]
    else:
        approved = approved_dir(job, approval_id)
        if not any((approved / n).is_file() for n in APPROVED_FILES):
            return []  # never the SEG alone in place of the approved copies
        files = [approved / n if n in APPROVED_FILES else result / n for n in RESULT_FILES]
    return [f for f in files if f.is_file()]


class Sender:
    """Creates and works off the deliveries of one destination (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        s = settings
        self.destination = (
            Destination(s.dicom_destination_ae_title, s.dicom_destination_host, int(s.dicom_destination_port))
            if s.dicom_destination_ae_title and s.dicom_destination_host and s.dicom_destination_port
            else None
        )

    def retry_delay_s(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones (1, 2, …)."""
        return min(MAX_RETRY_S, float(self.settings.dicom_send_retry_s) * 2.0 ** max(0, attempts - 1))

    def tick(self, now: datetime | None = None) -> int:
        """Queue deliveries for newly succeeded jobs, then send the due ones; returns how many were sent."""
        dest = self.settings.dicom_destination  # the key of its deliveries (also what POST /v1/jobs/{id}/send uses)
        if self.destination is None or dest is None:
            return 0
        now = now or utcnow()
        since = now - timedelta(hours=self.settings.dicom_send_max_age_h)
        sources = tuple(self.settings.dicom_send_sources)
        # approvals first: a job approved before it was ever sent gets only its approved copies
        for job, approval in self.store.approved_since(since):
            if job.source in sources:
                self.store.add_delivery(job.id, dest, now, kind=delivery_kind(approval.id))
        if self.settings.dicom_send_unapproved:
            for job in self.store.jobs_needing_delivery(sources, dest, since):
                self.store.add_delivery(job.id, dest, now)
        sent = 0
        # deliveries queued for a destination no longer configured are left as they are
        for d in self.store.due_deliveries(now, dest):
            sent += self.deliver(d, now)
        return sent

    def deliver(self, d: DeliveryInfo, now: datetime) -> bool:
        """One attempt at one delivery; True when sent."""
        destination = self.destination
        if destination is None:  # no destination configured: nothing can be sent (tick() does not call this)
            return False
        job = self.store.get_job(d["job_id"])
        files = delivery_files(job, d["kind"]) if job and job.result_dir else []
        attempts = d["attempts"] + 1
        if not files:
            error = "the job has no result files to send"
            self.store.delivery_attempted(d["id"], ok=False, error=error, now=now, next_attempt_at=None)
            log.error("job %s: %s", d["job_id"], error)
            return False
        try:
            send_files(
                files,
                destination,
                calling_ae=self.settings.dicom_ae_title,
                timeout_s=self.settings.dicom_send_timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - SendError, or unreadable files
            error = str(exc) if isinstance(exc, SendError) else f"{type(exc).__name__}: {exc}"
            retry = None
            if attempts < self.settings.dicom_send_max_attempts:  # counted from the end of this attempt
                retry = max(now, utcnow()) + timedelta(seconds=self.retry_delay_s(attempts))
            self.store.delivery_attempted(d["id"], ok=False, error=error, now=now, next_attempt_at=retry)
            log.warning(
                "job %s: sending results to %s failed (attempt %d%s): %s",
                d["job_id"],
                self.destination,
                attempts,
                "" if retry else ", giving up",
                error,
            )
            return False
        self.store.delivery_attempted(d["id"], ok=True, error=None, now=now, next_attempt_at=None)
        log.info("job %s: %d result file(s) sent to %s", d["job_id"], len(files), self.destination)
        return True
