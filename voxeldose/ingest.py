"""Ingest: read a folder (or files) of DICOM, index it, classify series, group a therapy cycle.

Stage one of the pipeline (DESIGN.md).  What it guarantees to the stages after it:

* every instance read is indexed by patient / study / series and deduplicated by SOPInstanceUID;
* series are classified: reconstructed SPECT (multi-frame NM RECON TOMO, or per-slice NM storage),
  CT, RTSTRUCT, SEG, RT Dose; anything else is listed and left alone;
* geometry is read, never guessed: NM from the Detector Information Sequence
  (ImagePositionPatient/ImageOrientationPatient) with SpacingBetweenSlices, CT sorted along the
  slice normal with a spacing check;
* the pixel-value meaning of every SPECT is recorded (Real World Value Mapping Bq/ml, Units BQML, or
  raw counts with the frame duration needed to calibrate them);
* acquisition times and the injection (time, activity, nuclide) come from the files or from the
  caller, and the source of each is recorded; nothing missing is filled in silently.

Problems are collected as :class:`Problem` records (``inspect`` prints them); :func:`load_cycle`
raises the first error as a :class:`~voxeldose.errors.VoxeldoseError`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)
from pydicom.valuerep import PersonName

from .dicomutil import normalise_utc_offset, parse_da, parse_dt, parse_tm, tag_label
from .errors import VoxeldoseError
from .geometry import Volume, affine_from_dicom
from .nuclides import require_supported
from .spec import MAX_SCAN_DAYS_AFTER_INJECTION

# SOP classes (PS3.4 Annex B)
_NM = str(NuclearMedicineImageStorage)
_CT = str(CTImageStorage)
_ENHANCED_CT = str(EnhancedCTImageStorage)
_RTSTRUCT = str(RTStructureSetStorage)
_RTDOSE = str(RTDoseStorage)
_SEG = str(SegmentationStorage)
_PET = str(PositronEmissionTomographyImageStorage)

SeriesKind = Literal["spect", "projections", "ct", "rtstruct", "seg", "rtdose", "nm-other", "unsupported"]
PixelMode = Literal["bqml-rwvm", "bqml-units", "counts"]

#: Relative tolerance on slice spacing within a series (1 %: well below one voxel over a 500 mm stack
#: is not the point — any gap or duplicate position is, and those deviate by ≥ 50 %).
SLICE_SPACING_RTOL = 0.01
#: An absolute GridFrameOffsetVector (RT Dose) must start at ImagePositionPatient's coordinate along the
#: normal to within this, mm (a tenth of the finest dose grid in use; DS rounding is far below it).
GRID_OFFSET_TOL_MM = 0.1
#: Same injection when start times agree within this (s) and activities within 1 %.
SAME_INJECTION_S = 60.0
#: Plausible administered activity for one 177Lu therapy cycle, Bq (used only to catch unit errors:
#: DICOM NM writes RadionuclideTotalDose in MBq, PET in Bq).
PLAUSIBLE_THERAPY_BQ = (1.0e8, 5.0e10)
#: What ``inspect`` says of a time point's values when its SPECT is still to be reconstructed from projections.
PROJECTIONS_PIXEL_VALUES = "projections (will be reconstructed)"


# --------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Problem:
    """Something found while reading: ``error`` blocks a job, ``warning`` needs a look, ``info`` is FYI."""

    severity: Literal["error", "warning", "info"]
    message: str
    path: str | None = None
    tag: str | None = None

    @classmethod
    def from_error(cls, err: VoxeldoseError, severity: Literal["error", "warning"] = "error") -> Problem:
        return cls(severity, str(err), err.path, err.tag)

    def to_dict(self) -> dict[str, str | None]:
        return {"severity": self.severity, "message": self.message, "path": self.path, "tag": self.tag}


@dataclass
class Instance:
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    header: Dataset  # without PixelData


@dataclass
class Series:
    """One DICOM series as found on disk (headers only; pixels are read by the ``read_*`` functions)."""

    series_instance_uid: str
    kind: SeriesKind
    modality: str
    patient_id: str
    patient_name: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    description: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.instances[0].header

    @property
    def paths(self) -> list[Path]:
        return [inst.path for inst in self.instances]

    def summary(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "kind": self.kind,
            "modality": self.modality,
            "description": self.description,
            "instances": len(self.instances),
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "folder": str(self.instances[0].path.parent) if self.instances else None,
        }


@dataclass(frozen=True)
class InjectionInfo:
    """The administration of one cycle and where each value came from."""

    nuclide: str  # ICRP-107 name, e.g. "Lu-177"
    activity_bq: float
    start: datetime
    radiopharmaceutical: str | None
    start_source: str  # e.g. "RadiopharmaceuticalStartDateTime (0018,1078)" or "caller"
    activity_source: str
    #: UTC offset the file states for ``start`` ("+0100"), or None when not stated (or from the caller).
    #: ``start`` itself stays the naive local time, as DICOM stores it.
    utc_offset: str | None = None
    utc_offset_source: str | None = None


@dataclass
class TimePoint:
    """One imaging session: a reconstructed SPECT and the CT it shares a Frame of Reference with.

    ``spect`` is a reconstruction (kind ``spect``), or — for a session whose projections are to be reconstructed
    (none given, or the job asks for it) — the projection series itself (kind ``projections``; see
    :attr:`needs_reconstruction`).
    """

    spect: Series
    ct: Series | None
    acquisition: datetime
    acquisition_source: str
    hours_after_injection: float = math.nan
    #: UTC offset the file states for ``acquisition`` ("+0100"), or None; ``acquisition`` stays naive.
    utc_offset: str | None = None
    utc_offset_source: str | None = None

    @property
    def needs_reconstruction(self) -> bool:
        """True when the SPECT is to be reconstructed from this time point's projections."""
        return self.spect.kind == "projections"

    def summary(self) -> dict[str, Any]:
        values = PROJECTIONS_PIXEL_VALUES if self.needs_reconstruction else spect_pixel_mode(self.spect.first)
        return {
            "hours_after_injection": round(self.hours_after_injection, 3),
            "acquisition_datetime": self.acquisition.isoformat(),
            "acquisition_time_source": self.acquisition_source,
            "acquisition_utc_offset": self.utc_offset,
            "spect": self.spect.summary() | {"pixel_values": values},
            "ct": None if self.ct is None else self.ct.summary(),
        }


@dataclass
class Cycle:
    """One patient, one injection: its time points in time order and the VOI and dose series."""

    patient_id: str
    patient_name: str
    injection: InjectionInfo
    timepoints: list[TimePoint]
    vois: list[Series]
    rtdoses: list[Series]

    def summary(self) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id,
            "patient_name": self.patient_name,
            "injection": {
                "nuclide": self.injection.nuclide,
                "radiopharmaceutical": self.injection.radiopharmaceutical,
                "activity_MBq": self.injection.activity_bq / 1e6,
                "activity_source": self.injection.activity_source,
                "datetime": self.injection.start.isoformat(),
                "datetime_source": self.injection.start_source,
                "utc_offset": self.injection.utc_offset,
            },
            "timepoints": [tp.summary() for tp in self.timepoints],
            "vois": [s.summary() | {"roi_names": roi_names(s)} for s in self.vois],
            "rtdoses": [s.summary() for s in self.rtdoses],
        }


@dataclass
class Index:
    """Everything read from the inputs, by series, plus the problems met."""

    series: dict[str, Series] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    files_read: int = 0

    def by_kind(self, kind: SeriesKind) -> list[Series]:
        return [s for s in self.series.values() if s.kind == kind]

    def patients(self) -> dict[str, str]:
        """Patient ID → name."""
        return {s.patient_id: s.patient_name for s in self.series.values()}

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# --------------------------------------------------------------------------------------- reading
def _iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterable[tuple[Path, bool]]:
    """Yield (file, named_explicitly).  Folders are walked recursively in sorted order."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    yield Path(root) / f, False
        elif p.exists():
            yield p, True
        else:
            raise VoxeldoseError("no such file or folder", path=p)


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    return (rows * cols * frames * spp * bits + 7) // 8


#: The attributes :func:`scan` reads from every file (with :func:`classify`), checked by :func:`read_header` to
#: carry their standard value representation: a fuzzed or broken file (e.g. ImageType written as US) is then a
#: problem of that file, not a TypeError deep in the indexing.
SCANNED_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "SeriesDescription",
    "ImageType",
)
#: Binary value representations: pydicom converts their values lazily and raises (a length that is not a
#: multiple of the value size) where the value is first used, so :func:`read_header` converts them at once.
#: Text VRs are left to be read where used (their conversion does not raise, and its validation warnings
#: would quote values that may be patient data).
_BINARY_VRS = frozenset({"AT", "FD", "FL", "OD", "OF", "OL", "OV", "SL", "SS", "SV", "UL", "US", "UV"})


_UNDEFINED_LENGTH = 0xFFFFFFFF


def _tag_text(tag: BaseTag) -> str:
    """``"Keyword (gggg,eeee)"`` for any tag (``"(gggg,eeee)"`` alone for one the dictionary does not name)."""
    keyword = keyword_for_tag(tag)
    return tag_label(keyword) if keyword else f"({tag.group:04X},{tag.element:04X})"


def _raw_vr(ds: Dataset, tag: BaseTag) -> str | None:
    """The VR an element was written with (the dictionary's for implicit VR files); None when unknown."""
    vr = ds.get_item(tag).VR
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    return str(vr)


def _check_elements(ds: Dataset, path: Path) -> None:
    """Raise :class:`VoxeldoseError` (file, tag, expected, found — never the value, which may be patient data)
    for a top-level element whose value the file cuts short (a truncated file: pydicom keeps the bytes that are
    there, e.g. an RT Structure Set losing its last contours), a public top-level element of a binary VR whose
    value cannot be read, and an attribute of :data:`SCANNED_KEYWORDS` with another VR than the standard's."""
    for tag in list(ds.keys()):
        if tag == 0x7FE00010:  # pixel data: checked against Rows × Columns × frames × bits by read_header
            continue
        item = ds.get_item(tag)
        raw = item.value if isinstance(item, RawDataElement) and item.length != _UNDEFINED_LENGTH else None
        if isinstance(raw, bytes) and len(raw) < item.length:  # pydicom keeps what the file holds of a cut value
            raise VoxeldoseError(
                "the file is truncated: a value is shorter than its length field says",
                path=path,
                tag=_tag_text(tag),
                expected=f"{item.length} bytes",
                found=f"{len(raw)} bytes",
            )
        if tag.is_private:
            continue
        vr = _raw_vr(ds, tag)
        if vr not in _BINARY_VRS:
            continue
        raw = ds.get_item(tag).value
        size = f"{len(raw)} bytes" if isinstance(raw, bytes) else "a value"
        try:
            ds[tag]
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types (BytesLengthException, struct.error, …)
            raise VoxeldoseError(
                "unreadable header element: its value does not fit its value representation",
                path=path,
                tag=_tag_text(tag),
                expected=f"a valid {vr} value",
                found=f"{size} ({type(exc).__name__})",
            ) from None
    for kw in SCANNED_KEYWORDS:
        tag = BaseTag(pydicom.datadict.tag_for_keyword(kw) or 0)
        if tag not in ds:
            continue
        vr, standard = _raw_vr(ds, tag), dictionary_VR(tag)
        if vr not in (standard, "UN"):
            raise VoxeldoseError(
                "header attribute of the wrong type",
                path=path,
                tag=tag_label(kw),
                expected=f"VR {standard}",
                found=f"VR {vr}",
            )
        try:
            value = ds[tag].value
        except Exception as exc:  # noqa: BLE001 - as above: a malformed value raises on conversion
            raise VoxeldoseError(
                "unreadable header attribute",
                path=path,
                tag=tag_label(kw),
                expected=f"a valid {standard} value",
                found=type(exc).__name__,
            ) from None
        items = value if isinstance(value, (MultiValue, list, tuple)) else [value]
        if not all(v is None or isinstance(v, (str, PersonName)) for v in items):
            raise VoxeldoseError(
                "header attribute of the wrong type",
                path=path,
                tag=tag_label(kw),
                expected=f"{standard} text",
                found=type(value).__name__,
            )


#: Type 1 attributes of the modules voxeldose reads, per SOP class, checked by :func:`read_header` so that a file
#: lacking one is a problem of that file when it is scanned (visible wherever it is scanned: upload checks, the
#: trigger), not a failure of a later job: CT Image IOD (PS3.3 A.3.3: the Frame of Reference module is M; CT Image
#: module C.8.2.1: Rescale Intercept and Slope), RT Structure Set IOD (A.19.3: C.8.8.5 Structure Set ROI
#: Sequence, C.8.8.6 ROI Contour Sequence).
_REQUIRED_BY_SOP_CLASS: dict[str, tuple[str, ...]] = {
    _CT: ("FrameOfReferenceUID", "RescaleIntercept", "RescaleSlope"),
    _RTSTRUCT: ("StructureSetROISequence", "ROIContourSequence"),
}


def _check_iod_values(ds: Dataset, path: Path) -> None:
    """Raise :class:`VoxeldoseError` (file, tag, expected; never a value that may be patient data) for a Type 1
    attribute of :data:`_REQUIRED_BY_SOP_CLASS` missing or empty, a rescale that is not a finite number (a zero
    slope maps every pixel to one value), and BitsAllocated that is neither 1 nor a positive multiple of 8
    (PS3.5 §8.1.1) — with BitsAllocated 0 or 12 no pixel count can be checked nor read."""
    sop = str(ds.get("SOPClassUID", "") or "")
    for kw in _REQUIRED_BY_SOP_CLASS.get(sop, ()):
        value = ds.get(kw)
        if value is None or value == "" or (isinstance(value, (list, MultiValue)) and len(value) == 0):
            raise VoxeldoseError(
                "required attribute missing", path=path, tag=tag_label(kw), expected="a value (Type 1)"
            )
    for kw in ("RescaleSlope", "RescaleIntercept"):
        if kw not in ds:
            continue
        try:
            number = float(ds[kw].value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (kw == "RescaleSlope" and number == 0):
            raise VoxeldoseError(
                "rescale is not a finite number" if not math.isfinite(number) else "rescale slope is zero",
                path=path,
                tag=tag_label(kw),
                expected="a finite number" + (", not zero" if kw == "RescaleSlope" else ""),
            )
    if "PixelData" in ds and "BitsAllocated" in ds:
        try:
            bits = int(ds.BitsAllocated)
        except (TypeError, ValueError):
            bits = -1
        if not (bits == 1 or (bits > 0 and bits % 8 == 0)):
            raise VoxeldoseError(
                "BitsAllocated is neither 1 nor a multiple of 8",
                path=path,
                tag=tag_label("BitsAllocated"),
                expected="1, 8, 16 or 32 (PS3.5 §8.1.1)",
                found=bits,
            )


def _transfer_syntax(ds: Dataset, path: Path) -> UID:
    """The file meta's TransferSyntaxUID (0002,0010), which must name a transfer syntax (PS3.10 §7.1; PS3.5
    §10): another UID (a typing error, a private syntax nobody can decode) is an error of the file."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if not ts.is_transfer_syntax:
        raise VoxeldoseError(
            "unknown transfer syntax: the pixel data cannot be decoded",
            path=path,
            tag=tag_label("TransferSyntaxUID"),
            expected="a DICOM transfer syntax UID (PS3.5 §10, PS3.6 Table A-1)",
            found=str(ts)[:64],
        )
    return ts


def read_header(path: Path) -> Dataset:
    """Read one file completely, check it is whole, and return it without its pixel data.

    Raises :class:`VoxeldoseError` for non-DICOM files, truncated files and random bytes.
    """
    try:
        ds = pydicom.dcmread(path, force=False)
    except InvalidDicomError:
        raise VoxeldoseError(
            "not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
            path=path,
            expected="a DICOM Part 10 file",
        ) from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError, IndexError) as exc:
        raise VoxeldoseError(
            f"unreadable DICOM file, truncated or corrupt ({type(exc).__name__}: {exc})",
            path=path,
            expected="a complete DICOM Part 10 file",
        ) from None
    _check_elements(ds, path)
    _check_iod_values(ds, path)
    for kw in ("SOPInstanceUID", "SOPClassUID"):
        if not str(getattr(ds, kw, "") or "").strip():
            raise VoxeldoseError("required attribute missing", path=path, tag=tag_label(kw), expected="a UID")
    if "PixelData" in ds:
        expected = _expected_pixel_bytes(ds)
        try:
            got = len(ds.PixelData)
        except Exception as exc:  # a deferred or broken element  # noqa: BLE001
            raise VoxeldoseError(
                f"pixel data cannot be read ({exc})",
                path=path,
                tag=tag_label("PixelData"),
                expected="complete pixel data",
            ) from None
        encapsulated = _transfer_syntax(ds, path).is_compressed if "TransferSyntaxUID" in ds.file_meta else False
        if expected is not None and not encapsulated and got < expected:
            raise VoxeldoseError(
                "the file is truncated: its pixel data is shorter than Rows × Columns × frames × bits say",
                path=path,
                tag=tag_label("PixelData"),
                expected=f"{expected} bytes",
                found=f"{got} bytes",
            )
        del ds.PixelData
    return ds


def classify(ds: Dataset) -> SeriesKind:
    """Kind of series an instance belongs to, from its SOP Class and Image Type."""
    sop = str(ds.SOPClassUID)
    if sop == _CT:
        return "ct"
    if sop == _NM:
        image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
        if len(image_type) >= 3 and image_type[2] in ("RECON TOMO", "RECON GATED TOMO"):
            return "spect"
        if len(image_type) >= 3 and image_type[2] == "TOMO":
            return "projections"  # a SPECT acquisition's projections (voxeldose.projections reads them)
        return "nm-other"
    if sop == _RTSTRUCT:
        return "rtstruct"
    if sop == _SEG:
        return "seg"
    if sop == _RTDOSE:
        return "rtdose"
    return "unsupported"


def scan(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Index:
    """Read and index DICOM files from folders (recursive) and/or files.

    Files that fail to read are recorded as problems: an ``error`` when the file was named
    explicitly or looks like DICOM but is broken, an ``info`` for non-DICOM files found while walking a
    folder (notes, ground-truth arrays).  Duplicate SOPInstanceUIDs are read once.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    index = Index()
    seen: dict[str, Instance] = {}
    skipped_non_dicom: list[Path] = []
    for path, explicit in _iter_files(paths):
        try:
            ds = read_header(path)
        except VoxeldoseError as err:
            if "not a DICOM file" in err.reason and not explicit:
                skipped_non_dicom.append(path)
            else:
                index.problems.append(Problem.from_error(err))
            continue
        index.files_read += 1
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            first = seen[uid]
            same = first.header == ds
            index.problems.append(
                Problem(
                    "info" if same else "warning",
                    f"duplicate SOPInstanceUID {uid}: kept {first.path}"
                    + ("" if same else " (the copies differ — check which is right)"),
                    str(path),
                    tag_label("SOPInstanceUID"),
                )
            )
            continue
        inst = Instance(path, uid, str(ds.SOPClassUID), ds)
        seen[uid] = inst
        kind = classify(ds)
        suid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not suid:
            index.problems.append(
                Problem("error", "instance without SeriesInstanceUID", str(path), tag_label("SeriesInstanceUID"))
            )
            continue
        series = index.series.get(suid)
        if series is None:
            series = Series(
                series_instance_uid=suid,
                kind=kind,
                modality=str(getattr(ds, "Modality", "")),
                patient_id=str(getattr(ds, "PatientID", "")),
                patient_name=str(getattr(ds, "PatientName", "")),
                study_instance_uid=str(getattr(ds, "StudyInstanceUID", "")),
                frame_of_reference_uid=_frame_of_reference(ds),
                description=str(getattr(ds, "SeriesDescription", "")),
            )
            index.series[suid] = series
        pid = str(getattr(ds, "PatientID", ""))
        if pid != series.patient_id:
            index.problems.append(
                Problem(
                    "error",
                    f"mixed patients in one series: this instance's PatientID {pid!r} differs from the series' "
                    f"{series.patient_id!r} (first read from {series.instances[0].path})",
                    str(path),
                    tag_label("PatientID"),
                )
            )
            continue
        series.instances.append(inst)
    if skipped_non_dicom:
        index.problems.append(
            Problem(
                "info",
                f"skipped {len(skipped_non_dicom)} non-DICOM file(s), e.g. {skipped_non_dicom[0]}",
                str(skipped_non_dicom[0]),
            )
        )
    if index.files_read == 0 and not index.errors:
        index.problems.append(Problem("error", "no DICOM files found", ", ".join(str(p) for p in paths)))
    for s in index.series.values():
        if s.kind == "unsupported":
            index.problems.append(
                Problem(
                    "info",
                    f"series {s.description or s.series_instance_uid} ({s.modality}, SOP class "
                    f"{s.instances[0].sop_class_uid}) is not used by voxeldose",
                    str(s.instances[0].path),
                    tag_label("SOPClassUID"),
                )
            )
        if s.kind == "nm-other":
            image_type = "\\".join(getattr(s.first, "ImageType", []) or [])
            index.problems.append(
                Problem(
                    "info",
                    f"NM series {s.description!r} is not a reconstructed SPECT (ImageType {image_type}); ignored",
                    str(s.instances[0].path),
                    tag_label("ImageType"),
                )
            )
    return index


def _frame_of_reference(ds: Dataset) -> str | None:
    if "FrameOfReferenceUID" in ds:
        return str(ds.FrameOfReferenceUID)
    # RTSTRUCT: the referenced frame of reference
    seq = getattr(ds, "ReferencedFrameOfReferenceSequence", None)
    if seq:
        return str(seq[0].FrameOfReferenceUID)
    return None


# ------------------------------------------------------------------------------------ date/time


def _stated_offset(ds: Dataset, explicit: str | None, dt_keyword: str) -> tuple[str | None, str | None]:
    """(UTC offset, where it was stated) of a time read from ``ds``.

    An offset written in the DT value itself wins; otherwise TimezoneOffsetFromUTC (0008,0201), which
    applies to every DA, TM and DT of the instance without their own offset (PS3.3 C.12.1.1.8).
    """
    if explicit is not None:
        return explicit, f"{tag_label(dt_keyword)} (offset suffix)"
    tz = normalise_utc_offset(getattr(ds, "TimezoneOffsetFromUTC", None))
    if tz is not None:
        return tz, tag_label("TimezoneOffsetFromUTC")
    return None, None


def _require_naive(value: datetime | None, what: str) -> None:
    """Caller datetimes must be naive local times, like DICOM's: a UTC offset cannot be reconciled."""
    if value is not None and value.tzinfo is not None and value.utcoffset() is not None:
        raise VoxeldoseError(
            f"the {what} has a UTC offset: give the local date and time without a UTC offset, as DICOM stores it",
            tag=what,
            expected="a date and time such as 2026-01-05T09:30",
            found=value.isoformat(),
        )


def acquisition_datetime(ds: Dataset, path: Path | str | None = None) -> tuple[datetime, str]:
    """Acquisition start of an image and which attributes gave it.

    AcquisitionDateTime (0008,002A) first, then AcquisitionDate (0008,0022) + AcquisitionTime
    (0008,0032).  Series or content times are not acquisition times and are not used.
    """
    dt, src, _, _ = _acquisition(ds, path)
    return dt, src


def _acquisition(ds: Dataset, path: Path | str | None = None) -> tuple[datetime, str, str | None, str | None]:
    """:func:`acquisition_datetime` plus the UTC offset the file states for it (and where)."""
    dt, explicit = parse_dt(getattr(ds, "AcquisitionDateTime", None))
    if dt is not None:
        return (dt, tag_label("AcquisitionDateTime"), *_stated_offset(ds, explicit, "AcquisitionDateTime"))
    d = parse_da(getattr(ds, "AcquisitionDate", None))
    t = parse_tm(getattr(ds, "AcquisitionTime", None))
    if d is not None and t is not None:
        return (
            datetime.combine(d, t),
            f"{tag_label('AcquisitionDate')} + {tag_label('AcquisitionTime')}",
            *_stated_offset(ds, None, "AcquisitionTime"),
        )
    raise VoxeldoseError(
        "the acquisition time is missing",
        path=path,
        tag=f"{tag_label('AcquisitionDateTime')} or {tag_label('AcquisitionDate')} + {tag_label('AcquisitionTime')}",
        expected="the date and time the acquisition started (or pass it for this series)",
    )


def injection_from_header(
    ds: Dataset,
    path: Path | str | None = None,
    *,
    start: datetime | None = None,
    activity_bq: float | None = None,
    nuclide: str | None = None,
) -> InjectionInfo:
    """Read the injection from the Radiopharmaceutical Information Sequence (0054,0016).

    Caller-supplied values take precedence and are recorded as such; a caller's ``start`` must be the
    naive local date and time (a tz-aware datetime is an error).  The UTC offset the file states for
    the injection time (DT suffix, else TimezoneOffsetFromUTC) is recorded, not applied.  RadionuclideTotalDose
    (0018,1074) is in MBq in NM objects (PS3.3 C.8.4.10) and in Bq in PET objects (C.8.9.2);
    a value outside :data:`PLAUSIBLE_THERAPY_BQ` after conversion is an error, not a guess.
    """
    seq = getattr(ds, "RadiopharmaceuticalInformationSequence", None)
    item = seq[0] if seq else Dataset()
    rp_tag = tag_label("RadiopharmaceuticalInformationSequence")

    # nuclide
    nuclide_source = "caller"
    if nuclide is None:
        # Only the coded radionuclide is used; the free-text Radiopharmaceutical name is not parsed.
        for code in getattr(item, "RadionuclideCodeSequence", None) or []:
            meaning = str(getattr(code, "CodeMeaning", "") or "")
            if meaning.strip():
                nuclide, nuclide_source = meaning, tag_label("RadionuclideCodeSequence")
                break
        if nuclide is None:
            raise VoxeldoseError(
                "the radionuclide is not given (the free-text radiopharmaceutical name is not parsed)",
                path=path,
                tag=f"{rp_tag} > {tag_label('RadionuclideCodeSequence')}",
                expected="a radionuclide code such as ^177^Lutetium (or pass the nuclide)",
            )
    nuc = require_supported(
        nuclide, path=str(path) if path else None, tag=nuclide_source if nuclide_source != "caller" else "nuclide"
    )

    # start
    _require_naive(start, "injection date and time")
    utc_offset = utc_offset_source = None
    if start is not None:
        start_source = "caller"
    else:
        dt, explicit = parse_dt(getattr(item, "RadiopharmaceuticalStartDateTime", None))
        if dt is not None:
            start, start_source = dt, tag_label("RadiopharmaceuticalStartDateTime")
            utc_offset, utc_offset_source = _stated_offset(ds, explicit, "RadiopharmaceuticalStartDateTime")
        else:
            t = parse_tm(getattr(item, "RadiopharmaceuticalStartTime", None))
            if t is not None:
                raise VoxeldoseError(
                    "only the time of injection is given, not its date; the date cannot be assumed "
                    "(post-therapy scans are days after injection)",
                    path=path,
                    tag=f"{rp_tag} > {tag_label('RadiopharmaceuticalStartTime')}",
                    expected="RadiopharmaceuticalStartDateTime (0018,1078), or pass the injection date and time",
                    found=str(item.RadiopharmaceuticalStartTime),
                )
            raise VoxeldoseError(
                "the injection time is missing",
                path=path,
                tag=f"{rp_tag} > {tag_label('RadiopharmaceuticalStartDateTime')}",
                expected="the injection date and time (or pass them)",
            )

    # activity
    if activity_bq is not None:
        activity_source = "caller"
    else:
        raw = getattr(item, "RadionuclideTotalDose", None)
        if raw is None or str(raw).strip() == "":
            raise VoxeldoseError(
                "the injected activity is missing",
                path=path,
                tag=f"{rp_tag} > {tag_label('RadionuclideTotalDose')}",
                expected="the administered activity (MBq in NM objects), or pass it",
            )
        is_pet = str(ds.SOPClassUID) == _PET
        activity_bq = float(raw) * (1.0 if is_pet else 1.0e6)
        activity_source = tag_label("RadionuclideTotalDose") + (" [Bq, PET]" if is_pet else " [MBq, NM]")
    lo, hi = PLAUSIBLE_THERAPY_BQ
    if not (lo <= activity_bq <= hi):
        raise VoxeldoseError(
            f"the injected activity {activity_bq / 1e6:g} MBq is not a plausible therapeutic activity "
            "— wrong units? (NM objects store MBq)",
            path=path,
            tag=tag_label("RadionuclideTotalDose") if activity_source != "caller" else "activity",
            expected=f"{lo / 1e6:g}–{hi / 1e6:g} MBq",
            found=activity_bq / 1e6,
        )
    return InjectionInfo(
        nuclide=nuc.name,
        activity_bq=float(activity_bq),
        start=start,
        radiopharmaceutical=str(getattr(item, "Radiopharmaceutical", "") or "") or None,
        start_source=start_source,
        activity_source=activity_source,
        utc_offset=utc_offset,
        utc_offset_source=utc_offset_source,
    )


# ----------------------------------------------------------------------------------- grouping
def load_cycle(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Index,
    *,
    patient_id: str | None = None,
    injection_start: datetime | None = None,
    activity_bq: float | None = None,
    nuclide: str | None = None,
    acquisition_times: dict[str, datetime] | None = None,
    reconstruct: bool = False,
) -> Cycle:
    """Read the inputs and return the one therapy cycle they hold; raise on the first error.

    ``acquisition_times`` maps a SPECT SeriesInstanceUID to its acquisition start when the files do not
    carry one.  ``reconstruct``: time points with projections take them even where a reconstruction is given
    (see :func:`group_cycles`).  The caller's injection values override the files' (and are recorded as "caller").
    Caller datetimes are naive local times, as DICOM stores them; a tz-aware one is an error.
    """
    _require_naive(injection_start, "injection date and time")
    for when in (acquisition_times or {}).values():
        _require_naive(when, "acquisition date and time")
    index = paths if isinstance(paths, Index) else scan(paths)
    cycles, problems = group_cycles(
        index,
        injection_start=injection_start,
        activity_bq=activity_bq,
        nuclide=nuclide,
        acquisition_times=acquisition_times,
        reconstruct=reconstruct,
    )
    errors = [p for p in index.problems + problems if p.severity == "error"]
    if patient_id is not None:
        cycles = [c for c in cycles if c.patient_id == patient_id]
    if errors:
        e = errors[0]
        more = (
            f" (and {len(errors) - 1} more problem(s); run 'voxeldose inspect' to list them)" if len(errors) > 1 else ""
        )
        raise VoxeldoseError(e.message + more, tag=None)
    if not cycles:
        raise VoxeldoseError(
            "no reconstructed SPECT or SPECT projections found",
            expected="at least one NM RECON TOMO series, or NM TOMO projections with their CT, with its injection",
        )
    if len(cycles) > 1:
        desc = "; ".join(f"patient {c.patient_id}, injection {c.injection.start:%Y-%m-%d %H:%M}" for c in cycles)
        raise VoxeldoseError(
            f"the inputs hold {len(cycles)} therapy cycles ({desc}); give one cycle at a time",
            expected="one patient and one injection",
        )
    return cycles[0]


def group_cycles(
    index: Index,
    *,
    injection_start: datetime | None = None,
    activity_bq: float | None = None,
    nuclide: str | None = None,
    acquisition_times: dict[str, datetime] | None = None,
    reconstruct: bool = False,
) -> tuple[list[Cycle], list[Problem]]:
    """Group SPECT series into time points (with their CT) and time points into cycles.

    A time point's SPECT is its reconstruction; a session that has projections (NM TOMO) and no reconstruction
    (same Frame of Reference, acquisition start within :data:`SAME_SESSION_S`) takes its projections instead, to be
    reconstructed by the pipeline — and so does every session with projections when ``reconstruct`` is true.

    A cycle is one patient and one injection (start within :data:`SAME_INJECTION_S`, activity within
    1 %).  A time point's CT is the CT series with the SPECT's FrameOfReferenceUID (hybrid SPECT/CT).

    Times are naive local times.  Where the files state UTC offsets (DT suffix or TimezoneOffsetFromUTC
    (0008,0201)) they are recorded; offsets that differ within a cycle (e.g. injection before and scan
    after a daylight-saving change) are an error, since the naive differences would be off by the gap.
    """
    _require_naive(injection_start, "injection date and time")
    for when in (acquisition_times or {}).values():
        _require_naive(when, "acquisition date and time")
    problems: list[Problem] = []
    patients = index.patients()
    if len(patients) > 1:
        listing = ", ".join(f"{pid!r} ({name})" for pid, name in sorted(patients.items()))
        first_paths: dict[str, Path] = {}
        for s in index.series.values():
            first_paths.setdefault(s.patient_id, s.instances[0].path)
        problems.append(
            Problem(
                "error",
                f"mixed patients in one input: {listing}; give one patient's data per job",
                str(sorted(first_paths.values())[-1]),
                tag_label("PatientID"),
            )
        )
    cts_by_for: dict[str | None, list[Series]] = defaultdict(list)
    for ct_series in index.by_kind("ct"):
        try:
            ct_geometry(ct_series)
        except VoxeldoseError as err:
            problems.append(Problem.from_error(err))
            continue
        cts_by_for[ct_series.frame_of_reference_uid].append(ct_series)

    entries: list[tuple[TimePoint, InjectionInfo, str]] = []
    for sp in _sessions(index, reconstruct, problems):
        hdr, path = sp.first, sp.instances[0].path
        try:
            if sp.kind == "spect":
                _spect_geometry(sp)
            inj = injection_from_header(hdr, path, start=injection_start, activity_bq=activity_bq, nuclide=nuclide)
            if acquisition_times and sp.series_instance_uid in acquisition_times:
                acq, acq_src = acquisition_times[sp.series_instance_uid], "caller"
                acq_off = acq_off_src = None
            else:
                acq, acq_src, acq_off, acq_off_src = _acquisition(hdr, path)
            if sp.kind == "spect":
                spect_pixel_mode(hdr, path)
        except VoxeldoseError as err:
            problems.append(Problem.from_error(err))
            continue
        cts = cts_by_for.get(sp.frame_of_reference_uid, [])
        ct: Series | None = None
        if not cts:
            problems.append(
                Problem(
                    "warning",
                    f"SPECT {sp.description!r} has no CT with its FrameOfReferenceUID: no attenuation map, "
                    "no registration, no density correction for this time point",
                    str(path),
                    tag_label("FrameOfReferenceUID"),
                )
            )
        else:
            ct = min(cts, key=lambda c: _time_gap(c, acq))
            if len(cts) > 1:
                problems.append(
                    Problem(
                        "warning",
                        f"{len(cts)} CT series share the SPECT's frame of reference; using {ct.description!r}, "
                        "the one acquired closest in time",
                        str(ct.instances[0].path),
                        tag_label("FrameOfReferenceUID"),
                    )
                )
        tp = TimePoint(sp, ct, acq, acq_src, utc_offset=acq_off, utc_offset_source=acq_off_src)
        entries.append((tp, inj, sp.patient_id))

    cycles: list[Cycle] = []
    injection_path: dict[int, Path] = {}  # the file each cycle's injection was read from
    for tp, inj, pid in entries:
        for c in cycles:
            same = (
                c.patient_id == pid
                and abs((c.injection.start - inj.start).total_seconds()) <= SAME_INJECTION_S
                and math.isclose(c.injection.activity_bq, inj.activity_bq, rel_tol=0.01)
            )
            if same:
                c.timepoints.append(tp)
                break
        else:
            cycles.append(Cycle(pid, tp.spect.patient_name, inj, [tp], [], []))
            injection_path[id(cycles[-1])] = tp.spect.instances[0].path

    for c in cycles:
        c.timepoints.sort(key=lambda tp: tp.acquisition)
        for tp in c.timepoints:
            tp.hours_after_injection = (tp.acquisition - c.injection.start).total_seconds() / 3600.0
            # A caller's injection time is checked where it is given (pipeline.scan_time_problems names the job's
            # field); one read from the headers is checked here, so that every reader of the cycle sees it.
            late = tp.hours_after_injection > MAX_SCAN_DAYS_AFTER_INJECTION * 24.0
            if late and c.injection.start_source != "caller":
                problems.append(
                    Problem(
                        "error",
                        f"SPECT acquired {tp.acquisition:%Y-%m-%d %H:%M} is "
                        f"{tp.hours_after_injection / 24.0:,.0f} days after the injection "
                        f"({c.injection.start:%Y-%m-%d %H:%M}), more than {MAX_SCAN_DAYS_AFTER_INJECTION:.0f}: "
                        "check the injection and acquisition dates",
                        str(tp.spect.instances[0].path),
                        c.injection.start_source,
                    )
                )
            if tp.hours_after_injection <= 0:
                problems.append(
                    Problem(
                        "error",
                        f"SPECT acquired {tp.acquisition:%Y-%m-%d %H:%M} is not after the injection "
                        f"({c.injection.start:%Y-%m-%d %H:%M})",
                        str(tp.spect.instances[0].path),
                        tp.acquisition_source,
                    )
                )
        stated = (
            [(c.injection.utc_offset, "injection", injection_path[id(c)], c.injection.utc_offset_source)]
            if c.injection.utc_offset
            else []
        )
        stated += [
            (
                tp.utc_offset,
                f"acquisition {tp.acquisition:%Y-%m-%d %H:%M}",
                tp.spect.instances[0].path,
                tp.utc_offset_source,
            )
            for tp in c.timepoints
            if tp.utc_offset
        ]
        if len({o for o, *_ in stated}) > 1:
            first = stated[0]
            odd = next(x for x in stated if x[0] != first[0])
            listing = "; ".join(f"{what} {off} from {src}" for off, what, _, src in stated)
            problems.append(
                Problem.from_error(
                    VoxeldoseError(
                        f"the times of this cycle are stated in different UTC offsets ({listing}): the hours after "
                        "injection, computed from local times, would be off by the difference",
                        path=odd[2],
                        tag=odd[3],
                        expected=f"one UTC offset ({first[0]}), or the injection date and time (and acquisition times) "
                        "passed as local times in one offset",
                        found=odd[0],
                    )
                )
            )
        for a, b in zip(c.timepoints, c.timepoints[1:]):
            if abs((b.acquisition - a.acquisition).total_seconds()) < 60:
                problems.append(
                    Problem(
                        "error",
                        f"two SPECT series acquired at the same time ({a.acquisition:%Y-%m-%d %H:%M}): "
                        f"{a.spect.description!r} and {b.spect.description!r}",
                        str(b.spect.instances[0].path),
                        b.acquisition_source,
                    )
                )
        fors = {tp.spect.frame_of_reference_uid for tp in c.timepoints}
        for s in index.series.values():
            if s.patient_id != c.patient_id:
                continue
            if s.kind in ("rtstruct", "seg") and s.frame_of_reference_uid in fors:
                c.vois.append(s)
            elif s.kind == "rtdose":
                c.rtdoses.append(s)
    voi_series = {s.series_instance_uid for c in cycles for s in c.vois}
    for s in index.series.values():
        if s.kind in ("rtstruct", "seg") and s.series_instance_uid not in voi_series:
            problems.append(
                Problem(
                    "warning",
                    f"{s.kind.upper()} {s.description!r} is on a frame of reference no time point has; not used",
                    str(s.instances[0].path),
                    tag_label("FrameOfReferenceUID"),
                )
            )
    return cycles, problems


#: A reconstruction and projections are of one session when they share the Frame of Reference and their
#: acquisition starts agree within this (s): a reconstruction states its projections' acquisition start.
SAME_SESSION_S = 60.0


def _session_start(series: Series) -> datetime | None:
    try:
        return acquisition_datetime(series.first, series.instances[0].path)[0]
    except VoxeldoseError:
        return None  # group_cycles reports it for the series that is used


def _sessions(index: Index, reconstruct: bool, problems: list[Problem]) -> list[Series]:
    """The series that make time points: every reconstruction, and the projections of every session that has
    none; with ``reconstruct``, every session's projections in place of its reconstructions.  What is set aside
    is said (``info``)."""
    chosen = list(index.by_kind("spect"))
    for proj in index.by_kind("projections"):
        path = str(proj.instances[0].path)
        if len(proj.instances) != 1:
            problems.append(
                Problem(
                    "error",
                    f"projection series {proj.description!r} has {len(proj.instances)} objects; one NM TOMO object "
                    "holding every view is expected",
                    path,
                    tag_label("SeriesInstanceUID"),
                )
            )
            continue
        start = _session_start(proj)
        twins = [
            r
            for r in index.by_kind("spect")
            if r.frame_of_reference_uid == proj.frame_of_reference_uid
            and start is not None
            and (r_start := _session_start(r)) is not None
            and abs((r_start - start).total_seconds()) <= SAME_SESSION_S
        ]
        if not twins:
            chosen.append(proj)
        elif reconstruct:
            for r in twins:
                if r in chosen:
                    chosen.remove(r)
                    problems.append(
                        Problem(
                            "info",
                            f"reconstruction {r.description!r} not used: the job reconstructs its projections "
                            f"{proj.description!r} (reconstruct: true)",
                            str(r.instances[0].path),
                        )
                    )
            chosen.append(proj)
        else:
            problems.append(
                Problem(
                    "info",
                    f"projections {proj.description!r}: the session's reconstruction {twins[0].description!r} is used "
                    "(reconstruct: true in the job reconstructs them instead)",
                    path,
                )
            )
    return chosen


def _time_gap(series: Series, when: datetime) -> float:
    try:
        acq, _ = acquisition_datetime(series.first)
    except VoxeldoseError:
        return math.inf
    return abs((acq - when).total_seconds())


# ------------------------------------------------------------------------------------ geometry
def _require(ds: Dataset, keyword: str, path: Path | str, expected: str) -> Any:
    value = getattr(ds, keyword, None)
    if (
        value is None
        or (isinstance(value, (str, bytes)) and not str(value).strip())
        or (hasattr(value, "__len__") and not isinstance(value, (str, bytes)) and len(value) == 0)
    ):
        raise VoxeldoseError("required attribute missing", path=path, tag=tag_label(keyword), expected=expected)
    return value


def _floats(value: Any, n: int, ds_path: Path | str, keyword: str) -> np.ndarray:
    try:
        arr = np.array(
            [float(v) for v in (value if hasattr(value, "__iter__") and not isinstance(value, str) else [value])]
        )
    except (TypeError, ValueError):
        raise VoxeldoseError(
            "value is not numeric", path=ds_path, tag=tag_label(keyword), expected=f"{n} numbers", found=value
        ) from None
    if arr.size != n or not np.all(np.isfinite(arr)):
        raise VoxeldoseError(
            "wrong number of values", path=ds_path, tag=tag_label(keyword), expected=f"{n} numbers", found=list(arr)
        )
    return arr


def _require_positive(values: np.ndarray, path: Path | str, keyword: str) -> None:
    """Spacings are distances (PS3.3 C.7.6.2.1.1: PixelSpacing in mm): zero or negative is an error."""
    if np.any(values <= 0):
        raise VoxeldoseError(
            "spacing must be positive",
            path=path,
            tag=tag_label(keyword),
            expected="positive distances, mm",
            found=[float(v) for v in values],
        )


def _matrix(ds: Dataset, path: Path | str) -> tuple[int, int]:
    """(Rows, Columns) of an image (PS3.3 C.7.6.3, both Type 1): a missing or non-positive one is an error of
    the file, not an AttributeError deep in the geometry."""
    out = []
    for kw in ("Rows", "Columns"):
        value = _require(ds, kw, path, "the number of pixels, a positive integer")
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = 0
        if n <= 0:
            raise VoxeldoseError(
                "image matrix size is not a positive integer",
                path=path,
                tag=tag_label(kw),
                expected="a positive integer",
                found=type(value).__name__ if n == 0 else n,
            )
        out.append(n)
    return out[0], out[1]


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of an image stack read from its headers (Image Plane module, PS3.3 C.7.6.2)."""

    affine: np.ndarray  #: 4x4, index (i, j, k, 1) -> LPS mm
    order: list[int]  #: instance order along the slice normal (per-slice storage)
    shape: tuple[int, int, int]  #: (slices, rows, columns)


def _stack_geometry(series: Series, what: str) -> StackGeometry:
    """Sort single-frame slices along the slice normal and check the spacing is uniform."""
    positions: list[np.ndarray] = []
    orient: np.ndarray | None = None
    spacing: np.ndarray | None = None
    for inst in series.instances:
        ds, path = inst.header, inst.path
        iop = _floats(
            _require(ds, "ImageOrientationPatient", path, "six direction cosines"), 6, path, "ImageOrientationPatient"
        )
        ipp = _floats(
            _require(ds, "ImagePositionPatient", path, "the x, y, z of the first voxel, mm"),
            3,
            path,
            "ImagePositionPatient",
        )
        ps = _floats(_require(ds, "PixelSpacing", path, "row and column spacing, mm"), 2, path, "PixelSpacing")
        _require_positive(ps, path, "PixelSpacing")
        if orient is None:
            orient, spacing = iop, ps
        elif not np.allclose(iop, orient, atol=1e-4):
            raise VoxeldoseError(
                f"{what} slices have different orientations",
                path=path,
                tag=tag_label("ImageOrientationPatient"),
                expected=str([float(v) for v in np.round(orient, 5)]),
                found=list(iop),
            )
        positions.append(ipp)
    if orient is None or spacing is None:
        raise VoxeldoseError(f"{what} series {series.description!r} has no slices", expected="at least one slice")
    normal = np.cross(orient[:3], orient[3:])
    dist = np.array([p @ normal for p in positions])
    order = list(np.argsort(dist, kind="stable"))
    n = len(order)
    if n >= 2:
        d = np.diff(dist[order])
        step = float(np.median(d))
        if step <= 1e-6 or np.any(np.abs(d - step) > SLICE_SPACING_RTOL * step + 1e-3):
            bad = int(np.argmax(np.abs(d - step)))
            raise VoxeldoseError(
                f"{what} series {series.description!r} has inconsistent slice spacing: "
                f"gap of {d[bad]:.3f} mm between slices where the series' spacing is {step:.3f} mm "
                "(missing, duplicated or mixed slices?)",
                path=series.instances[order[bad + 1]].path,
                tag=tag_label("ImagePositionPatient"),
                expected=f"uniform spacing {step:.3f} mm",
                found=f"{d[bad]:.3f} mm",
            )
        slice_vec = (positions[order[-1]] - positions[order[0]]) / (n - 1)
    else:
        thick = getattr(series.first, "SliceThickness", None) or getattr(series.first, "SpacingBetweenSlices", None)
        if thick is None:
            raise VoxeldoseError(
                f"single-slice {what} without SliceThickness",
                path=series.instances[0].path,
                tag=tag_label("SliceThickness"),
                expected="slice thickness, mm",
            )
        slice_vec = normal * float(thick)
    ds0 = series.instances[order[0]].header
    affine = affine_from_dicom(positions[order[0]].tolist(), orient.tolist(), spacing.tolist(), slice_vec.tolist())
    return StackGeometry(affine, [int(i) for i in order], (n, *_matrix(ds0, series.instances[order[0]].path)))


def ct_geometry(series: Series) -> StackGeometry:
    """Geometry of a single-frame CT series (PS3.3 C.7.6.2): slices sorted along the normal, uniform spacing.

    Raises :class:`VoxeldoseError` for multi-frame CT, mixed orientations or a gap in the slices.
    """
    for inst in series.instances:
        nf = int(getattr(inst.header, "NumberOfFrames", 1) or 1)
        if nf != 1:
            raise VoxeldoseError(
                "multi-frame CT is not supported",
                path=inst.path,
                tag=tag_label("NumberOfFrames"),
                expected="1",
                found=nf,
            )
    return _stack_geometry(series, "CT")


def _nm_slice_header(ds: Dataset) -> Dataset:
    """A per-slice NM instance with its position in the Detector Information Sequence: lift it up."""
    if "ImagePositionPatient" in ds or "DetectorInformationSequence" not in ds:
        return ds
    det = ds.DetectorInformationSequence[0]
    out = Dataset()
    out.update(ds)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient"):
        if kw in det:
            setattr(out, kw, getattr(det, kw))
    return out


def _spect_geometry(series: Series) -> StackGeometry:
    """Geometry of a reconstructed SPECT (multi-frame RECON TOMO or per-slice storage)."""
    if len(series.instances) > 1:
        lifted = Series(
            **{
                **series.__dict__,
                "instances": [
                    Instance(i.path, i.sop_instance_uid, i.sop_class_uid, _nm_slice_header(i.header))
                    for i in series.instances
                ],
            }
        )
        for inst in lifted.instances:
            nf = int(getattr(inst.header, "NumberOfFrames", 1) or 1)
            if nf != 1:
                raise VoxeldoseError(
                    "a SPECT series with several multi-frame objects: which one is the volume is ambiguous",
                    path=inst.path,
                    tag=tag_label("NumberOfFrames"),
                    expected="one multi-frame object or single-frame slices",
                    found=nf,
                )
        return _stack_geometry(lifted, "SPECT")
    ds, path = series.first, series.instances[0].path
    det_seq = getattr(ds, "DetectorInformationSequence", None)
    if not det_seq:
        raise VoxeldoseError(
            "reconstructed SPECT without a Detector Information Sequence: its position and orientation are unknown",
            path=path,
            tag=tag_label("DetectorInformationSequence"),
            expected="an item with ImagePositionPatient and ImageOrientationPatient",
        )
    det = det_seq[0]
    if "ImageOrientationPatient" not in det:
        raise VoxeldoseError(
            "missing orientation: the SPECT's orientation is not given and will not be guessed",
            path=path,
            tag=f"{tag_label('DetectorInformationSequence')} > {tag_label('ImageOrientationPatient')}",
            expected="six direction cosines",
        )
    if "ImagePositionPatient" not in det:
        raise VoxeldoseError(
            "missing position: the SPECT's first-voxel position is not given",
            path=path,
            tag=f"{tag_label('DetectorInformationSequence')} > {tag_label('ImagePositionPatient')}",
            expected="the x, y, z of the first voxel, mm",
        )
    iop = _floats(det.ImageOrientationPatient, 6, path, "ImageOrientationPatient")
    ipp = _floats(det.ImagePositionPatient, 3, path, "ImagePositionPatient")
    ps = _floats(_require(ds, "PixelSpacing", path, "row and column spacing, mm"), 2, path, "PixelSpacing")
    n = int(_require(ds, "NumberOfFrames", path, "number of slices"))
    _require_positive(ps, path, "PixelSpacing")
    spacing_kw = "SpacingBetweenSlices"
    raw_spacing = getattr(ds, spacing_kw, None)
    if raw_spacing is None or _floats(raw_spacing, 1, path, spacing_kw)[0] == 0:
        spacing_kw, raw_spacing = "SliceThickness", getattr(ds, "SliceThickness", None)
        if raw_spacing is None:
            raise VoxeldoseError(
                "the distance between SPECT slices is not given",
                path=path,
                tag=tag_label("SpacingBetweenSlices"),
                expected="slice spacing, mm (or SliceThickness)",
            )
    spacing = float(_floats(raw_spacing, 1, path, spacing_kw)[0])  # a finite number (NaN, Inf, text: an error)
    # SpacingBetweenSlices is signed in NM (PS3.3 C.8.4.15): negative means slices go against X × Y.
    normal = np.cross(iop[:3], iop[3:])
    sv = getattr(ds, "SliceVector", None)
    if sv is not None and len(sv) != n:
        raise VoxeldoseError(
            "SliceVector does not list one entry per frame",
            path=path,
            tag=tag_label("SliceVector"),
            expected=f"{n} values",
            found=len(sv),
        )
    # SliceVector (0054,0080), PS3.3 C.8.4.8.1: frame f holds slice number sv[f] (1-based).  The slice
    # in position s of the volume is therefore the frame whose entry is s + 1: order = argsort(sv).
    if sv is not None:
        try:
            sv_int = [int(v) for v in sv]
        except (TypeError, ValueError):
            sv_int = None
        if sv_int is None or sorted(sv_int) != list(range(1, n + 1)):
            raise VoxeldoseError(
                "SliceVector is not a permutation of the slice numbers 1..N: which frame is which slice is unknown",
                path=path,
                tag=tag_label("SliceVector"),
                expected=f"each of 1..{n} exactly once",
                found=list(sv),
            )
        order = [int(i) for i in np.argsort(sv_int, kind="stable")]
    else:
        order = list(range(n))
    affine = affine_from_dicom(ipp.tolist(), iop.tolist(), ps.tolist(), (normal * spacing).tolist())
    return StackGeometry(affine, order, (n, *_matrix(ds, path)))


# ------------------------------------------------------------------------------------ pixels
def spect_pixel_mode(ds: Dataset, path: Path | str | None = None) -> PixelMode:
    """How a SPECT's stored values map to activity: RWV Bq/ml, Units BQML, or counts."""
    if _rwvm_item(ds) is not None:
        return "bqml-rwvm"
    units = str(getattr(ds, "Units", "") or "").upper()
    if units == "BQML":
        return "bqml-units"
    if units not in ("", "CNTS", "COUNTS"):
        raise VoxeldoseError(
            f"SPECT pixel units {units!r} are not supported",
            path=path,
            tag=tag_label("Units"),
            expected="BQML, CNTS, or a Real World Value Mapping in Bq/ml",
            found=units,
        )
    return "counts"


def _rwvm_item(ds: Dataset) -> Dataset | None:
    for item in getattr(ds, "RealWorldValueMappingSequence", None) or []:
        for code in getattr(item, "MeasurementUnitsCodeSequence", None) or []:
            if str(getattr(code, "CodeValue", "")).lower() in ("bq/ml", "bq/cm3"):
                return cast(Dataset, item)
    for frame in getattr(ds, "SharedFunctionalGroupsSequence", None) or []:
        for pvm in getattr(frame, "RealWorldValueMappingSequence", None) or []:
            for code in getattr(pvm, "MeasurementUnitsCodeSequence", None) or []:
                if str(getattr(code, "CodeValue", "")).lower() in ("bq/ml", "bq/cm3"):
                    return cast(Dataset, pvm)
    return None


@dataclass(frozen=True)
class SpectImage:
    """A reconstructed SPECT: values as stored and what they mean.

    ``volume.units`` is ``"Bq/ml"`` for quantitative series and ``"counts"`` otherwise.  For counts,
    ``acquisition_duration_s`` (= ActualFrameDuration × NumberOfFramesInRotation of the Rotation
    Information Sequence, s) is what a calibration factor in cps/MBq needs.
    """

    volume: Volume
    pixel_mode: PixelMode
    acquisition_duration_s: float | None
    frame_duration_ms: float | None
    frames_in_rotation: int | None
    total_counts: float | None


def _pixels(inst: Instance) -> np.ndarray:
    ds = pydicom.dcmread(inst.path)
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        raise VoxeldoseError(
            f"pixel data cannot be decoded ({exc})",
            path=inst.path,
            tag=tag_label("PixelData"),
            expected="uncompressed or supported-compressed pixel data",
        ) from None


def read_spect(series: Series) -> SpectImage:
    """Read a SPECT series into a :class:`SpectImage` (float64 values)."""
    geo = _spect_geometry(series)
    ds, path = series.first, series.instances[0].path
    if len(series.instances) == 1:
        arr = _pixels(series.instances[0]).astype(np.float64)
        if arr.ndim == 2:
            arr = arr[None]
        arr = arr[geo.order]
    else:
        arr = np.stack([_pixels(series.instances[i]).astype(np.float64) for i in geo.order])
    mode = spect_pixel_mode(ds, path)
    if mode == "bqml-rwvm":
        item = _rwvm_item(ds)
        assert item is not None  # spect_pixel_mode found the Bq/ml mapping
        slope = float(getattr(item, "RealWorldValueSlope", 1.0))
        intercept = float(getattr(item, "RealWorldValueIntercept", 0.0))
        if "RealWorldValueLUTData" in item:
            raise VoxeldoseError(
                "Real World Value LUTs are not supported",
                path=path,
                tag=tag_label("RealWorldValueLUTData"),
                expected="a slope and intercept",
            )
        values, units = arr * slope + intercept, "Bq/ml"
    elif mode == "bqml-units":
        if len(series.instances) == 1:
            slope = float(getattr(ds, "RescaleSlope", 1.0))
            intercept = float(getattr(ds, "RescaleIntercept", 0.0))
            values = arr * slope + intercept
        else:
            slopes = np.array([float(getattr(series.instances[i].header, "RescaleSlope", 1.0)) for i in geo.order])
            inters = np.array([float(getattr(series.instances[i].header, "RescaleIntercept", 0.0)) for i in geo.order])
            values = arr * slopes[:, None, None] + inters[:, None, None]
        units = "Bq/ml"
    else:
        values, units = arr, "counts"
    rot = (getattr(ds, "RotationInformationSequence", None) or [None])[0]
    frame_ms = getattr(rot, "ActualFrameDuration", None) if rot is not None else None
    if frame_ms is None:
        frame_ms = getattr(ds, "ActualFrameDuration", None)
    frames = getattr(rot, "NumberOfFramesInRotation", None) if rot is not None else None
    frame_ms = float(frame_ms) if frame_ms is not None else None
    frames = int(frames) if frames is not None else None
    duration = frame_ms / 1000.0 * frames if (frame_ms and frames) else None
    vol = Volume(
        values,
        geo.affine,
        series.frame_of_reference_uid,
        units,
        {"series_instance_uid": series.series_instance_uid, "modality": "NM"},
    )
    return SpectImage(vol, mode, duration, frame_ms, frames, float(arr.sum()) if mode == "counts" else None)


def read_ct(series: Series) -> Volume:
    """Read a CT series into a Volume in HU (float32), slices sorted along the normal.

    Each slice is rescaled straight into its place in one preallocated array (no per-slice float
    copies and no stack of them at the end: the same float32 numbers)."""
    geo = ct_geometry(series)
    out: np.ndarray | None = None
    shapes: list[tuple[int, ...]] = []
    for n, i in enumerate(geo.order):
        inst = series.instances[i]
        px = _pixels(inst)
        shapes.append(tuple(px.shape))
        if out is None:
            out = np.empty((len(geo.order), *px.shape), dtype=np.float32)
        if tuple(px.shape) != out.shape[1:]:
            continue  # reported below, with every size seen
        slope = float(getattr(inst.header, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(inst.header, "RescaleIntercept", 0.0) or 0.0)
        np.multiply(px, np.float32(slope), out=out[n], casting="unsafe")
        out[n] += np.float32(intercept)
    if len(set(shapes)) != 1 or out is None:
        raise VoxeldoseError(
            "CT slices have different sizes",
            path=series.instances[0].path,
            tag=tag_label("Rows"),
            expected="equal Rows and Columns",
            found=sorted(set(shapes)),
        )
    return Volume(
        out,
        geo.affine,
        series.frame_of_reference_uid,
        "HU",
        {"series_instance_uid": series.series_instance_uid, "modality": "CT"},
    )


def read_rtdose(series: Series) -> Volume:
    """Read an RT Dose (a dose imported from elsewhere) into a Volume in Gy."""
    inst = series.instances[0]
    ds, path = inst.header, inst.path
    units = str(getattr(ds, "DoseUnits", "")).upper()
    if units != "GY":
        raise VoxeldoseError("RT Dose not in Gy", path=path, tag=tag_label("DoseUnits"), expected="GY", found=units)
    iop = _floats(
        _require(ds, "ImageOrientationPatient", path, "six direction cosines"), 6, path, "ImageOrientationPatient"
    )
    ipp = _floats(
        _require(ds, "ImagePositionPatient", path, "x, y, z of the first voxel"), 3, path, "ImagePositionPatient"
    )
    ps = _floats(_require(ds, "PixelSpacing", path, "row and column spacing"), 2, path, "PixelSpacing")
    offsets = np.array([float(v) for v in _require(ds, "GridFrameOffsetVector", path, "offsets of each frame, mm")])
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if offsets.size != n:
        raise VoxeldoseError(
            "GridFrameOffsetVector length differs from NumberOfFrames",
            path=path,
            tag=tag_label("GridFrameOffsetVector"),
            expected=f"{n} values",
            found=offsets.size,
        )
    normal = np.cross(iop[:3], iop[3:])
    # PS3.3 C.8.8.3.2: a first element of 0 means offsets relative to ImagePositionPatient (the first
    # frame is at IPP); otherwise they are absolute coordinates along the normal and the first equals
    # IPP's (its z for axial frames).  Either way frame k is at IPP + (offsets[k] − offsets[0]) · N.
    ipp_along_normal = float(ipp @ normal)
    if offsets[0] != 0.0 and abs(offsets[0] - ipp_along_normal) > GRID_OFFSET_TOL_MM:
        raise VoxeldoseError(
            "GridFrameOffsetVector starts neither at 0 (relative offsets) nor at the ImagePositionPatient "
            "coordinate along the slice normal (absolute offsets): where the frames are is ambiguous",
            path=path,
            tag=tag_label("GridFrameOffsetVector"),
            expected=f"first value 0 or {ipp_along_normal:g} mm",
            found=float(offsets[0]),
        )
    rel = offsets - offsets[0]
    if n > 1:
        d = np.diff(rel)
        if np.any(np.abs(d - d[0]) > SLICE_SPACING_RTOL * abs(d[0]) + 1e-3) or d[0] == 0:
            raise VoxeldoseError(
                "RT Dose frames are not evenly spaced",
                path=path,
                tag=tag_label("GridFrameOffsetVector"),
                expected="uniform spacing",
                found=list(offsets),
            )
        step = float(d[0])
    else:
        step = float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    affine = affine_from_dicom(ipp.tolist(), iop.tolist(), ps.tolist(), (normal * step).tolist())
    arr = _pixels(inst).astype(np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    scale = float(_require(ds, "DoseGridScaling", path, "Gy per stored value"))
    return Volume(
        arr * scale,
        affine,
        series.frame_of_reference_uid,
        "Gy",
        {"series_instance_uid": series.series_instance_uid, "modality": "RTDOSE"},
    )


def roi_names(series: Series) -> list[str]:
    """ROI names of an RTSTRUCT or segment labels of a SEG."""
    ds = series.first
    if series.kind == "rtstruct":
        return [str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", None) or []]
    if series.kind == "seg":
        return [str(s.SegmentLabel) for s in getattr(ds, "SegmentSequence", None) or []]
    return []
