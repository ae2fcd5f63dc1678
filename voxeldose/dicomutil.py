"""DICOM helpers shared by the readers and writers: tag labels, DA/TM/DT/DS values, codes, common modules.

Used by :mod:`voxeldose.ingest` and :mod:`voxeldose.voi` (reading), :mod:`voxeldose.dicom_writers`
(the product's RT Dose and SEG), :mod:`voxeldose.scanner` (the synthetic scanner's NM, CT and RTSTRUCT),
:mod:`voxeldose.outputs`, :mod:`voxeldose.sr` and :mod:`voxeldose.quantify`.  Nothing here reads or
writes pixel data.

References: PS3.5 6.2 (value representations DA, TM, DT, DS), PS3.6 6 (data dictionary: tags of
keywords), PS3.3 8.8 (code sequence items), PS3.3 C.7.1.1 / C.7.2.1 / C.7.2.2 / C.7.3.1 / C.7.5.1 /
C.12.1 (Patient, General Study, Patient Study, General Series, General Equipment and SOP Common modules),
PS3.3 C.7.6.2 (Image Plane geometry), PS3.10 7.1 (Part 10 file meta information).

Geometry follows :mod:`voxeldose.geometry`: arrays ``[k, j, i]``; the affine maps ``(i, j, k, 1)``
to LPS mm, ``P = IPP + i*Δc*X + j*Δr*Y + k*S``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DSfloat

from . import __version__
from .geometry import Volume

__all__ = [
    "MANUFACTURER",
    "RT_STRUCTURE_SET_STORAGE",
    "PatientStudy",
    "SeriesInfo",
    "base_dataset",
    "check_frame_of_reference",
    "code_item",
    "format_da",
    "format_ds",
    "format_ds_list",
    "format_dt",
    "format_tm",
    "normalise_utc_offset",
    "parse_da",
    "parse_dt",
    "parse_tm",
    "plane_geometry",
    "save_part10",
    "software_version",
    "tag_label",
]

#: RT Structure Set Storage SOP Class UID (PS3.4 B.5), written by the scanner and referenced by RT Dose.
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

#: Manufacturer (0008,0070) and Manufacturer's Model Name (0008,1090) of everything voxeldose writes.
MANUFACTURER = "voxeldose"


# --------------------------------------------------------------------------------------------
# Tags (PS3.6)
# --------------------------------------------------------------------------------------------


def tag_label(keyword: str) -> str:
    """``"Keyword (gggg,eeee)"`` for messages, the tag from the PS3.6 data dictionary (the keyword
    alone when the dictionary does not know it)."""
    t = pydicom.datadict.tag_for_keyword(keyword)
    if t is None:
        return keyword
    return f"{keyword} ({t >> 16:04X},{t & 0xFFFF:04X})"


# --------------------------------------------------------------------------------------------
# Reading DA, TM, DT (PS3.5 6.2)
# --------------------------------------------------------------------------------------------


def parse_da(value: Any) -> date | None:
    """A DA value ``YYYYMMDD`` as a date, or None when empty or malformed (PS3.5 6.2)."""
    s = str(value or "").strip()
    if not s:
        return None
    try:
        return datetime.strptime(s[:8], "%Y%m%d").date()
    except ValueError:
        return None


def parse_tm(value: Any) -> time | None:
    """A TM value ``HH[MM[SS[.FFFFFF]]]`` (the ACR-NEMA ``HH:MM:SS`` form too) as a time, or None when
    empty or malformed (PS3.5 6.2); missing minutes or seconds are 0."""
    s = str(value or "").strip().replace(":", "")
    if not s:
        return None
    frac = 0
    if "." in s:
        s, f = s.split(".", 1)
        frac = int((f + "000000")[:6])
    s = (s + "0000")[:6]
    try:
        return time(int(s[:2]), int(s[2:4]), int(s[4:6]), frac)
    except ValueError:
        return None


_OFFSET_RE = re.compile(r"^([+-])(\d{2})(\d{2})$")


def normalise_utc_offset(value: Any) -> str | None:
    """A DICOM UTC offset ``&ZZXX`` ("+0100", "-0500") normalised, or None if absent or malformed.

    The DT suffix and TimezoneOffsetFromUTC (0008,0201) share this form (PS3.5 6.2, PS3.3 C.12.1.1.8);
    ``-0000`` becomes ``+0000``.
    """
    m = _OFFSET_RE.match(str(value or "").strip())
    if m is None:
        return None
    sign, hh, mm = m.groups()
    if int(hh) > 14 or int(mm) >= 60:
        return None
    if hh == mm == "00":
        sign = "+"
    return f"{sign}{hh}{mm}"


def parse_dt(value: Any) -> tuple[datetime | None, str | None]:
    """Parse a DT (PS3.5 6.2: ``YYYYMMDDHHMMSS.FFFFFF&ZZXX``); return (naive datetime, UTC offset or None).

    The datetime is the local time as written; the offset suffix, if any, is returned separately
    (normalised, e.g. ``"+0100"``) and not applied: the other times voxeldose compares against are
    naive local times, and turning them into UTC needs the site's time zone, which DICOM does not give.
    """
    s = str(value or "").strip()
    if not s:
        return None, None
    offset = None
    for sign in ("+", "-"):
        if sign in s[8:]:
            cut = 8 + s[8:].index(sign)
            offset = normalise_utc_offset(s[cut:]) or offset
            s = s[:cut]
    d = parse_da(s[:8])
    if d is None:
        return None, offset
    t = parse_tm(s[8:]) if len(s) > 8 else time(0)
    if t is None:
        return None, offset
    return datetime.combine(d, t), offset


# --------------------------------------------------------------------------------------------
# Writing DS, DA, TM, DT (PS3.5 6.2) and code items (PS3.3 8.8)
# --------------------------------------------------------------------------------------------


def format_ds(x: float, decimals: int = 6) -> DSfloat:
    """A DS value of at most 16 characters, rounded to ``decimals`` (no ``-0``)."""
    v = round(float(x), decimals) + 0.0
    return DSfloat(v, auto_format=True)


def format_ds_list(values: Sequence[float] | np.ndarray, decimals: int = 6) -> list[DSfloat]:
    """A multi-valued DS of ``values`` (flattened), each as :func:`format_ds`."""
    return [format_ds(v, decimals) for v in np.asarray(values, dtype=float).ravel()]


def format_da(dt: datetime) -> str:
    """The DA value ``YYYYMMDD`` of a date and time."""
    return dt.strftime("%Y%m%d")


def format_tm(dt: datetime) -> str:
    """The TM value ``HHMMSS`` (``HHMMSS.FFFFFF`` with microseconds) of a date and time."""
    return dt.strftime("%H%M%S.%f") if dt.microsecond else dt.strftime("%H%M%S")


def format_dt(dt: datetime) -> str:
    """The DT value ``YYYYMMDDHHMMSS[.FFFFFF][&ZZXX]``; the UTC offset only for an aware datetime."""
    s = format_da(dt) + format_tm(dt)
    if dt.utcoffset() is not None:
        s += dt.strftime("%z")
    return s


def code_item(code: Code) -> Dataset:
    """A code sequence item: Code Value, Coding Scheme Designator, Code Meaning (PS3.3 8.8)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def software_version() -> str:
    """Software Versions (0018,1020) of everything voxeldose writes: the package version."""
    return str(__version__)


# --------------------------------------------------------------------------------------------
# Patient, study, series
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientStudy:
    """Patient and study attributes shared by every object of one study."""

    patient_id: str
    patient_name: str  # DICOM PN, e.g. "PHANTOM^LU177"
    patient_birth_date: str  # YYYYMMDD
    patient_sex: str  # "M", "F" or "O"
    study_instance_uid: str
    study_datetime: datetime
    study_id: str = "1"
    accession_number: str = ""
    study_description: str = "Post-therapy 177Lu SPECT/CT"
    patient_weight_kg: float | None = None
    patient_size_m: float | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """The series an object belongs to (General Series C.7.3.1) and its Frame of Reference (C.7.4.1)."""

    series_instance_uid: str
    series_number: int
    series_description: str
    frame_of_reference_uid: str
    acquisition_datetime: datetime  # also used for SeriesDate/Time, ContentDate/Time


def _patient_study(ds: Dataset, ctx: PatientStudy) -> None:
    """Patient C.7.1.1, General Study C.7.2.1 and Patient Study C.7.2.2 modules."""
    if ctx.patient_sex not in ("M", "F", "O"):
        raise ValueError(f"patient_sex must be 'M', 'F' or 'O', got {ctx.patient_sex!r}")
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.patient_birth_date
    ds.PatientSex = ctx.patient_sex
    ds.StudyInstanceUID = ctx.study_instance_uid
    ds.StudyDate = format_da(ctx.study_datetime)
    ds.StudyTime = format_tm(ctx.study_datetime)
    ds.ReferringPhysicianName = ""
    ds.StudyID = ctx.study_id
    ds.AccessionNumber = ctx.accession_number
    if ctx.study_description:
        ds.StudyDescription = ctx.study_description
    if ctx.patient_weight_kg is not None:
        ds.PatientWeight = format_ds(ctx.patient_weight_kg, 3)
    if ctx.patient_size_m is not None:
        ds.PatientSize = format_ds(ctx.patient_size_m, 3)


def base_dataset(
    ctx: PatientStudy,
    series: SeriesInfo,
    *,
    modality: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> Dataset:
    """SOP Common C.12.1, Patient C.7.1.1, General Study C.7.2.1, Patient Study C.7.2.2, General Series
    C.7.3.1 and General Equipment C.7.5.1 modules of a new instance (UTF-8, ``ISO_IR 192``)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    now = datetime.now()
    ds.InstanceCreationDate = format_da(now)
    ds.InstanceCreationTime = format_tm(now)
    _patient_study(ds, ctx)
    ds.Modality = modality
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = int(series.series_number)
    ds.SeriesDescription = series.series_description
    ds.SeriesDate = format_da(series.acquisition_datetime)
    ds.SeriesTime = format_tm(series.acquisition_datetime)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = software_version()
    ds.InstanceNumber = int(instance_number)
    return ds


def save_part10(ds: Dataset, path: str | Path) -> None:
    """Write ``ds`` as a Part 10 file, explicit VR little endian, file meta per PS3.10 7.1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------
# Geometry (Image Plane C.7.6.2, Frame of Reference C.7.4.1)
# --------------------------------------------------------------------------------------------


def check_frame_of_reference(volume: Volume, series: SeriesInfo) -> None:
    """``ValueError`` unless ``volume`` has no Frame of Reference or the series' one."""
    if volume.frame_of_reference_uid not in (None, series.frame_of_reference_uid):
        raise ValueError(
            "volume.frame_of_reference_uid "
            f"{volume.frame_of_reference_uid} differs from series.frame_of_reference_uid "
            f"{series.frame_of_reference_uid}"
        )


def plane_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Row cosine X, column cosine Y, Δc, Δr (mm) and slice vector S (mm) of a 4x4 affine.

    ``ValueError`` for a zero pixel spacing or rows and columns that are not orthogonal (C.7.6.2.1.1).
    """
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    dc = float(np.linalg.norm(a[:3, 0]))
    dr = float(np.linalg.norm(a[:3, 1]))
    if dc <= 0 or dr <= 0:
        raise ValueError("affine has a zero pixel spacing")
    x, y = a[:3, 0] / dc, a[:3, 1] / dr
    if abs(float(x @ y)) > 1e-4:
        raise ValueError(f"row and column directions are not orthogonal (X·Y = {float(x @ y):.2e})")
    return x, y, dc, dr, a[:3, 2].copy()
