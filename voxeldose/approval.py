"""The approval state of the DICOM results: the approved copies of a dose SR and an RT Dose.

What a job writes is *preliminary*: its SR (``sr.dcm``, :func:`voxeldose.sr.write_dose_sr`) has, in the SR
Document General Module (DICOM PS3.3 C.17.2), Completion Flag ``COMPLETE`` (its content is all there: PARTIAL
would say content is missing), Verification Flag ``UNVERIFIED`` ("not attested by a legally accountable person")
and Preliminary Flag ``PRELIMINARY``; its RT Dose says so in Dose Comment (3004,0006) of the RT Dose Module
(C.8.8.3), the one free-text attribute of that module: the RT Dose IOD has no approval attribute — Approval Status
(300E,0002) belongs to the RT Approval Module (C.8.8.16), which the RT Plan and RT Structure Set IODs include and
the RT Dose IOD does not.

Once a physicist approves the result, :func:`approved_sr` and :func:`approved_rtdose` make new instances (a new
SOP Instance UID: a changed document is a new instance; same series) that say so:

- SR: Verification Flag ``VERIFIED`` with one Verifying Observer Sequence item — Verifying Observer Name (PN),
  Verifying Observer Identification Code Sequence (Type 2, empty), Verifying Organization, Verification DateTime —
  required when VERIFIED (C.17.2); Preliminary Flag ``FINAL``; Predecessor Documents Sequence (C.17.2.3) naming
  the preliminary SR it replaces;
- RT Dose: Dose Comment ``APPROVED <date> <name>`` (LO, at most 64 characters) instead of ``PRELIMINARY``.
"""

from __future__ import annotations

from copy import deepcopy
from datetime import datetime

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

#: Dose Comment of a result not (yet) approved.
PRELIMINARY_DOSE_COMMENT = "PRELIMINARY (not approved)"
#: LO and PN components hold at most 64 characters (PS3.5 Table 6.2-1).
_LO_MAX = 64


def _lo(text: str) -> str:
    text = text.replace("\\", "/").strip()
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def person_name(name: str) -> str:
    """A token's name as a DICOM person name (PN): one family-name component, no ``^``/``=``/``\\``, ≤ 64."""
    clean = "".join(" " if c in "^=\\" else c for c in name).strip() or "unknown"
    return clean[:_LO_MAX]


def dt_text(when: datetime) -> str:
    """A DICOM DT value (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``) of an aware date-time."""
    if when.tzinfo is None:
        raise ValueError("naive datetime: give the approval time with its time zone")
    return when.strftime("%Y%m%d%H%M%S.%f%z")


def _new_instance(ds: Dataset, when: datetime) -> Dataset:
    out = deepcopy(ds)
    uid = generate_uid()
    out.SOPInstanceUID = uid
    if hasattr(out, "file_meta") and out.file_meta is not None:
        out.file_meta.MediaStorageSOPInstanceUID = uid
    out.InstanceCreationDate = when.strftime("%Y%m%d")
    out.InstanceCreationTime = when.strftime("%H%M%S")
    number = int(ds.get("InstanceNumber", 1) or 1)
    out.InstanceNumber = number + 1
    return out


def approved_sr(sr: Dataset, *, observer: str, organisation: str, when: datetime) -> Dataset:
    """A new SR instance: ``sr``'s content, VERIFIED by ``observer`` of ``organisation`` at ``when``, FINAL, with
    ``sr`` as its predecessor (PS3.3 C.17.2).  ``sr`` is not changed."""
    if str(sr.get("Modality", "")) != "SR":
        raise ValueError(f"not an SR: Modality (0008,0060) is {sr.get('Modality')!r}")
    out = _new_instance(sr, when)
    out.CompletionFlag = "COMPLETE"
    out.VerificationFlag = "VERIFIED"
    observer_item = Dataset()
    observer_item.VerifyingObserverName = person_name(observer)
    observer_item.VerifyingObserverIdentificationCodeSequence = pydicom.Sequence([])
    observer_item.VerifyingOrganization = _lo(organisation) or "unknown"
    observer_item.VerificationDateTime = dt_text(when)
    out.VerifyingObserverSequence = pydicom.Sequence([observer_item])
    out.PreliminaryFlag = "FINAL"
    ref = Dataset()
    ref.ReferencedSOPClassUID = sr.SOPClassUID
    ref.ReferencedSOPInstanceUID = sr.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = sr.SeriesInstanceUID
    series.ReferencedSOPSequence = pydicom.Sequence([ref])
    study = Dataset()
    study.StudyInstanceUID = sr.StudyInstanceUID
    study.ReferencedSeriesSequence = pydicom.Sequence([series])
    out.PredecessorDocumentsSequence = pydicom.Sequence([study])
    return out


def approved_rtdose(rtdose: Dataset, *, observer: str, when: datetime) -> Dataset:
    """A new RT Dose instance: ``rtdose``'s dose, Dose Comment ``APPROVED <YYYY-MM-DD> <observer>``."""
    if str(rtdose.get("Modality", "")) != "RTDOSE":
        raise ValueError(f"not an RT Dose: Modality (0008,0060) is {rtdose.get('Modality')!r}")
    out = _new_instance(rtdose, when)
    out.DoseComment = _lo(f"APPROVED {when.date().isoformat()} {person_name(observer)}")
    return out


def approval_state(ds: Dataset) -> str:
    """``approved`` or ``preliminary``, as an SR or RT Dose written here says (for readers and tests)."""
    if str(ds.get("Modality", "")) == "SR":
        return "approved" if ds.get("VerificationFlag") == "VERIFIED" else "preliminary"
    return "approved" if str(ds.get("DoseComment", "")).startswith("APPROVED") else "preliminary"
