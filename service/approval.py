"""A physicist's review of a result (issue 17 part 3): approve, reject (with a reason), revoke.

Who: ``physicist`` or ``admin`` (:data:`REVIEWER_ROLE`; a ``submitter`` may not).  What: one job's result — a job
is one result version; a later version of the cycle is another job, unreviewed until someone reviews it.  The
states and which decision is allowed from which: :mod:`service.store.approvals`.  Every decision is stored with
who (token name and role) and when, and written to the audit trail (``audit_events``) in the same transaction.

An approval writes the approved copies of the job's SR and RT Dose (:mod:`voxeldose.approval`: SR VERIFIED with
the Verifying Observer Sequence, FINAL; RT Dose "APPROVED …") into ``<result dir>/approved-<approval id>/``;
the sender (:mod:`service.sender`) sends them as the delivery ``approval-<id>``.  A rejection or revocation sends
nothing: what was sent as preliminary stays at the PACS marked preliminary (withdrawing instances from a PACS —
IHE IOCM rejection notes — is not done here).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pydicom import dcmread

from voxeldose import approval as dicom_approval
from voxeldose.dicomutil import save_part10

from .auth import Principal
from .config import Settings
from .errors import ErrorKind, ServiceError
from .store import ApprovalRecord, JobRecord, Store

log = logging.getLogger("service.approval")

#: The least role that may review a result.
REVIEWER_ROLE = "physicist"
#: The files an approval re-issues (the SEG is sent unchanged beside them).
APPROVED_FILES = ("rtdose.dcm", "sr.dcm")


def approved_dir(job: JobRecord, approval_id: int) -> Path:
    """Where the approved copies of ``approval_id`` lie."""
    if not job.result_dir:
        raise ValueError(f"job {job.id} has no result folder")
    return Path(job.result_dir) / f"approved-{approval_id}"


def delivery_kind(approval_id: int) -> str:
    """The delivery kind that sends the approved copies of ``approval_id``."""
    return f"approval-{approval_id}"


def approval_id_of(kind: str) -> int | None:
    """The approval a delivery kind sends (None: the job's own, preliminary files)."""
    prefix = "approval-"
    return int(kind[len(prefix) :]) if kind.startswith(prefix) and kind[len(prefix) :].isdigit() else None


def write_approved_copies(job: JobRecord, rec: ApprovalRecord, organisation: str) -> list[str]:
    """The approved SR and RT Dose of ``job`` for approval ``rec``; returns the file names written."""
    src = Path(job.result_dir or "")
    dest = approved_dir(job, rec.id)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = []
    try:
        if (src / "rtdose.dcm").is_file():
            ds = dicom_approval.approved_rtdose(dcmread(src / "rtdose.dcm"), observer=rec.by_name, when=rec.at)
            save_part10(ds, tmp / "rtdose.dcm")
            written.append("rtdose.dcm")
        if (src / "sr.dcm").is_file():
            ds = dicom_approval.approved_sr(
                dcmread(src / "sr.dcm"), observer=rec.by_name, organisation=organisation, when=rec.at
            )
            save_part10(ds, tmp / "sr.dcm")
            written.append("sr.dcm")
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def decide(
    settings: Settings, store: Store, job_id: str, who: Principal, decision: str, reason: str | None
) -> ApprovalRecord:
    """Record ``who``'s ``decision`` on the job's result (see the module docstring); raises :class:`ServiceError`
    (forbidden, not found, refused by the rules of :mod:`service.store.approvals`)."""
    if not who.at_least(REVIEWER_ROLE):
        raise ServiceError(
            ErrorKind.FORBIDDEN,
            "Forbidden",
            f"the role {who.role!r} may not approve or reject results; it needs {REVIEWER_ROLE!r} or above",
            slug="forbidden",
        )
    organisation = settings.review_organisation

    def _copies(job: JobRecord, rec: ApprovalRecord) -> dict[str, Any]:
        if rec.decision != "approved":
            return {}
        try:
            files = write_approved_copies(job, rec, organisation)
        except (OSError, ValueError) as exc:
            log.error("job %s: cannot write the approved copies: %s", job.id, type(exc).__name__)
            raise ServiceError(
                ErrorKind.INVALID,
                "Cannot approve",
                f"job {job.id}: the approved SR/RT Dose cannot be written ({type(exc).__name__})",
                slug="approval-failed",
            ) from None
        return {"files": files}

    rec = store.record_decision(
        job_id,
        decision,
        reason,
        by_name=who.name,
        by_role=who.role,
        organisation=organisation,
        before_commit=_copies,
    )
    if rec is None:
        raise ServiceError(ErrorKind.NOT_FOUND, "Not found", f"no job {job_id}", slug="not-found")
    return rec
