"""DICOM writers: NM reconstructed SPECT, CT series, RTSTRUCT and SEG (and, later, RT Dose).

Used by the synthetic patient (:mod:`voxeldose.phantom`) and by the outputs stage.  Every object
written here passes dicom3tools' ``dciodvfy`` with no errors (``tests/test_dicom_writers.py``).

Geometry follows :mod:`voxeldose.geometry`: arrays ``[k, j, i]``; the affine maps ``(i, j, k, 1)``
to LPS mm, ``P = IPP + i*Δc*X + j*Δr*Y + k*S``.

References (DICOM PS3.3):

* NM Image IOD A.5: NM/PET Patient Orientation C.8.4.6, NM Image Pixel C.8.4.7, NM Multi-frame
  C.8.4.8, NM Image C.8.4.9, NM Isotope C.8.4.10, NM Detector C.8.4.11, NM TOMO Acquisition
  C.8.4.12, NM Reconstruction C.8.4.14, Real World Value Mapping C.7.6.16.2.11.
* CT Image IOD A.3: Image Plane C.7.6.2, CT Image C.8.2.1.
* RT Structure Set IOD A.19: RT Series C.8.8.1, Structure Set C.8.8.5, ROI Contour C.8.8.6,
  RT ROI Observations C.8.8.8.
* Segmentation IOD A.51 (written by highdicom): Segmentation Image C.8.20.2.

Choices worth knowing
---------------------
* NM injection date/time: ``RadiopharmaceuticalStartTime`` (NM Isotope module, TM) *and*
  ``RadiopharmaceuticalStartDateTime`` (DT).  The latter belongs to the PET Isotope module;
  ``dciodvfy`` accepts it in NM with a warning only ("not present in standard DICOM IOD"), and it is
  the only standard attribute that carries the injection *date*.
* NM slice order: NM has no per-frame position, so frame ``f`` lies at ``IPP + f*|S|*(X × Y)``.  A
  stack whose slice vector points along ``-(X × Y)`` is written with its frames reversed (first
  frame = last slice of ``volume``), which describes the same voxels in space.
* CT pixel values: stored signed int16 = HU, RescaleIntercept 0, RescaleSlope 1 (RescaleType HU).
* Laterality (Type 2C): absent when ``body_part_examined`` is given (trunk: unpaired), else empty.
* Codes: Lu-177 = SCT 447553000 "^177^Lutetium" (CID 18); Lu-177 DOTATATE = SCT 781259000
  "Lutetium^177^ DOTATATE" (CID 25), both from pydicom's copy of PS3.16.
* RTSTRUCT holes: each boundary (outer or hole) is its own CLOSED_PLANAR contour; outer
  boundaries and holes run in opposite directions, so even-odd and non-zero winding readers agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from .geometry import Volume

__all__ = [
    "PatientStudy",
    "Injection",
    "SeriesInfo",
    "SpectAcquisition",
    "write_nm_tomo",
    "write_ct_series",
    "write_rtstruct",
    "write_seg",
    "contours_from_mask",
    "radionuclide_code",
    "NM_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE",
    "RT_STRUCTURE_SET_STORAGE",
]

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"

MANUFACTURER = "voxeldose"


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
class Injection:
    """The administration, as written in the Radiopharmaceutical Information Sequence."""

    radionuclide: str  # "Lu-177"
    activity_bq: float  # written as RadionuclideTotalDose in MBq
    start: datetime  # RadiopharmaceuticalStartDateTime / StartTime (+ date)
    radiopharmaceutical: str = "Lu-177-DOTATATE"


@dataclass(frozen=True)
class SeriesInfo:
    series_instance_uid: str
    series_number: int
    series_description: str
    frame_of_reference_uid: str
    acquisition_datetime: datetime  # also used for SeriesDate/Time, ContentDate/Time


@dataclass(frozen=True)
class SpectAcquisition:
    """How the reconstructed SPECT was acquired: what quantification needs.

    Acquisition duration (s) = ``frame_duration_ms / 1000 * frames_in_rotation`` (elapsed time of one
    rotation of a detector).  The reconstructed counts ``C`` of a volume relate to activity by
    ``A [MBq] = C / (duration_s * calibration_cps_per_mbq)`` (before decay correction).
    """

    frame_duration_ms: int  # time per projection, (0018,1242) ActualFrameDuration
    frames_in_rotation: int  # (0054,0053) NumberOfFramesInRotation
    angular_step_deg: float = 3.0
    energy_window_keV: tuple[float, float] = (187.5, 229.2)  # 208 keV +- 10 %
    energy_window_name: str = "Lu177_208keV"


# --------------------------------------------------------------------------------------------
# Coded values (SNOMED CT codes as listed in DICOM PS3.16; taken from pydicom's copy of PS3.16)
# --------------------------------------------------------------------------------------------

#: CID 18 "Radiopharmaceutical Isotope": our nuclide names -> SCT codes.
_RADIONUCLIDE_CODES: dict[str, Code] = {
    "Lu-177": codes.SCT._177Lutetium,  # SCT 447553000 "^177^Lutetium"
    "Y-90": codes.SCT._90Yttrium,  # SCT 14691008
    "I-131": codes.SCT._131Iodine,  # SCT 1368003
    "Tc-99m": codes.SCT._99mTechnetium,  # SCT 72454006
    "In-111": codes.SCT._111Indium,  # SCT 56609000
}

#: CID 25 "Radiopharmaceutical": normalised name -> SCT code.
_RADIOPHARMACEUTICAL_CODES: dict[str, Code] = {
    "lu177dotatate": codes.SCT.Lutetium177DOTATATE,  # SCT 781259000 "Lutetium^177^ DOTATATE"
    "lu177oxodotreotide": codes.SCT.Lutetium177DOTATATE,
    "lutathera": codes.SCT.Lutetium177DOTATATE,
}

#: Patient position (0018,5100) -> (orientation, modifier, gantry relationship) codes, C.8.4.6.
_POSITION_CODES: dict[str, tuple[Code, Code, Code]] = {
    "HFS": (codes.SCT.Recumbent, codes.SCT.Supine, codes.SCT.Headfirst),
    "HFP": (codes.SCT.Recumbent, codes.SCT.Prone, codes.SCT.Headfirst),
    "FFS": (codes.SCT.Recumbent, codes.SCT.Supine, codes.SCT.FeetFirst),
    "FFP": (codes.SCT.Recumbent, codes.SCT.Prone, codes.SCT.FeetFirst),
}


def radionuclide_code(name: str) -> Code:
    """The CID 18 code of a radionuclide (``"Lu-177"`` -> SCT 447553000 ``^177^Lutetium``)."""
    try:
        return _RADIONUCLIDE_CODES[name]
    except KeyError:
        raise ValueError(
            f"no CID 18 code known for radionuclide {name!r}; known: {sorted(_RADIONUCLIDE_CODES)}"
        ) from None


def _radiopharmaceutical_code(name: str) -> Code | None:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = key.replace("lutetium", "lu").replace("177lu", "lu177").replace("lu177lu", "lu177")
    return _RADIOPHARMACEUTICAL_CODES.get(key)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _ds(x: float, decimals: int = 6) -> DSfloat:
    """A DS value of at most 16 characters, rounded to ``decimals`` (no ``-0``)."""
    v = round(float(x), decimals) + 0.0
    return DSfloat(v, auto_format=True)


def _ds_list(values: Sequence[float] | np.ndarray, decimals: int = 6) -> list[DSfloat]:
    return [_ds(v, decimals) for v in np.asarray(values, dtype=float).ravel()]


def _da(dt: datetime) -> str:
    return dt.strftime("%Y%m%d")


def _tm(dt: datetime) -> str:
    return dt.strftime("%H%M%S.%f") if dt.microsecond else dt.strftime("%H%M%S")


def _dt(dt: datetime) -> str:
    s = _da(dt) + _tm(dt)
    if dt.utcoffset() is not None:
        s += dt.strftime("%z")
    return s


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _software_version() -> str:
    from . import __version__

    return str(__version__)


def _check_for(volume: Volume, series: SeriesInfo) -> None:
    if volume.frame_of_reference_uid not in (None, series.frame_of_reference_uid):
        raise ValueError(
            "volume.frame_of_reference_uid "
            f"{volume.frame_of_reference_uid} differs from series.frame_of_reference_uid "
            f"{series.frame_of_reference_uid}"
        )


def _plane_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Row cosine X, column cosine Y, Δc, Δr (mm) and slice vector S (mm) of a 4x4 affine."""
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


def _orientation_letters(v: np.ndarray) -> str:
    """Patient Orientation (0020,0020) letters of a direction, C.7.6.1.1.1 (L/R, P/A, H/F)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(v))
    return "".join(letters[a][0 if v[a] > 0 else 1] for a in order if abs(v[a]) > 1e-3)


def _patient_study(ds: Dataset, ctx: PatientStudy) -> None:
    """Patient C.7.1.1, General Study C.7.2.1 and Patient Study C.7.2.2 modules."""
    if ctx.patient_sex not in ("M", "F", "O"):
        raise ValueError(f"patient_sex must be 'M', 'F' or 'O', got {ctx.patient_sex!r}")
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.patient_birth_date
    ds.PatientSex = ctx.patient_sex
    ds.StudyInstanceUID = ctx.study_instance_uid
    ds.StudyDate = _da(ctx.study_datetime)
    ds.StudyTime = _tm(ctx.study_datetime)
    ds.ReferringPhysicianName = ""
    ds.StudyID = ctx.study_id
    ds.AccessionNumber = ctx.accession_number
    if ctx.study_description:
        ds.StudyDescription = ctx.study_description
    if ctx.patient_weight_kg is not None:
        ds.PatientWeight = _ds(ctx.patient_weight_kg, 3)
    if ctx.patient_size_m is not None:
        ds.PatientSize = _ds(ctx.patient_size_m, 3)


def _base(
    ctx: PatientStudy,
    series: SeriesInfo,
    *,
    modality: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> Dataset:
    """SOP Common C.12.1, patient/study, General Series C.7.3.1, General Equipment C.7.5.1."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    now = datetime.now()
    ds.InstanceCreationDate = _da(now)
    ds.InstanceCreationTime = _tm(now)
    _patient_study(ds, ctx)
    ds.Modality = modality
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = int(series.series_number)
    ds.SeriesDescription = series.series_description
    ds.SeriesDate = _da(series.acquisition_datetime)
    ds.SeriesTime = _tm(series.acquisition_datetime)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = _software_version()
    ds.InstanceNumber = int(instance_number)
    return ds


def _body_part(ds: Dataset, body_part_examined: str | None) -> None:
    """BodyPartExamined (0018,0015) when known; otherwise Laterality (0020,0060, Type 2C) empty.

    A series over the trunk has no laterality: with a body part given, Laterality is absent.
    """
    if body_part_examined:
        ds.BodyPartExamined = body_part_examined
    else:
        ds.Laterality = None


def _save(ds: Dataset, path: str | Path) -> None:
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
# NM
# --------------------------------------------------------------------------------------------


def _nm_pixels(array: np.ndarray, pixel_mode: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Stored uint16 frames and, for ``bqml``, (slope, intercept) with value = stored*slope + b."""
    a = np.asarray(array)
    if not np.all(np.isfinite(a)):
        raise ValueError("volume.array contains NaN or infinite values")
    if pixel_mode == "counts":
        if a.size and a.min() < 0:
            raise ValueError(f"counts must be non-negative, minimum is {a.min()}")
        rounded = np.rint(a)
        if not np.array_equal(rounded, a):
            raise ValueError("pixel_mode='counts' needs integer counts; got non-integer values")
        if a.size and rounded.max() > 65535:
            raise ValueError(
                f"counts up to {rounded.max():.0f} do not fit uint16 (max 65535); "
                "write Bq/ml with pixel_mode='bqml' or rebin"
            )
        return rounded.astype("<u2"), None
    if pixel_mode == "bqml":
        a = a.astype(np.float64)
        lo = min(float(a.min()), 0.0) if a.size else 0.0
        hi = float(a.max()) if a.size else 0.0
        slope = (hi - lo) / 65535.0 if hi > lo else 1.0
        stored = np.clip(np.rint((a - lo) / slope), 0, 65535).astype("<u2")
        return stored, (slope, lo)
    raise ValueError(f"pixel_mode must be 'counts' or 'bqml', got {pixel_mode!r}")


def _rwvm_bqml(slope: float, intercept: float) -> Dataset:
    """Real World Value Mapping item (C.7.6.16.2.11): Bq/ml = stored * slope + intercept."""
    item = Dataset()
    item.add(DataElement(0x00409216, "US", 0))  # RealWorldValueFirstValueMapped
    item.add(DataElement(0x00409211, "US", 65535))  # RealWorldValueLastValueMapped
    item.RealWorldValueIntercept = float(intercept)  # FD
    item.RealWorldValueSlope = float(slope)  # FD
    item.LUTExplanation = "Activity concentration, Bq/ml"
    item.LUTLabel = "BQML"
    unit = Dataset()
    unit.CodeValue = "Bq/ml"
    unit.CodingSchemeDesignator = "UCUM"
    unit.CodeMeaning = "Becquerels/milliliter"
    item.MeasurementUnitsCodeSequence = DicomSequence([unit])
    return item


def _frame_and_times(ds: pydicom.Dataset, series: SeriesInfo, acq: datetime) -> None:
    """Frame of Reference module (PS3.3 C.7.4.1) and the acquisition/content date and time of the
    General Acquisition (C.7.10.1) and General Image (C.7.6.1) modules, shared by the image writers."""
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionDate = _da(acq)
    ds.AcquisitionTime = _tm(acq)
    ds.ContentDate = _da(acq)
    ds.ContentTime = _tm(acq)


def write_nm_tomo(
    path: str | Path,
    volume: Volume,
    *,
    ctx: PatientStudy,
    series: SeriesInfo,
    injection: Injection,
    acquisition: SpectAcquisition,
    pixel_mode: Literal["counts", "bqml"],
    sop_instance_uid: str | None = None,
    patient_position: Literal["HFS", "HFP", "FFS", "FFP"] = "HFS",
    start_angle_deg: float = 0.0,
    rotation_direction: Literal["CW", "CC"] = "CW",
    scan_arc_deg: float | None = None,
    body_part_examined: str | None = None,
) -> pydicom.Dataset:
    """Write one multi-frame NM Image Storage object, ImageType ORIGINAL\\PRIMARY\\RECON TOMO\\EMISSION.

    Frames are slices (``pixel_array[f] = volume.array[f]``), unless the slice vector points along
    ``-(X × Y)``: then frames are the slices in reverse order (``volume.array[::-1]``) and
    ImagePositionPatient is that of the last slice, so the written geometry describes the same
    voxels.  A slice vector not parallel to ``X × Y`` (sheared stack) raises ``ValueError``.

    ``pixel_mode="counts"``: non-negative integer counts stored as uint16 (``ValueError`` above
    65535), no rescaling.  ``pixel_mode="bqml"``: Bq/ml stored as uint16 with a Real World Value
    Mapping (UCUM ``Bq/ml``), ``Bq/ml = stored * RealWorldValueSlope + RealWorldValueIntercept``;
    the quantisation error is at most ``range / 131070``.

    The acquisition is recorded in the Rotation Information Sequence (C.8.4.12): ActualFrameDuration
    (ms per projection), NumberOfFramesInRotation, AngularStep, ScanArc (default
    ``angular_step * frames_in_rotation``), StartAngle and RotationDirection (defaults ``0`` and
    ``CW``: descriptive only, not used for quantification).  Injection: see module docstring.
    ``patient_position`` (default HFS) fills the NM/PET Patient Orientation codes (C.8.4.6).
    ``body_part_examined`` (e.g. ``"ABDOMEN"``, CID 4031 defined terms) is written when given;
    without it Laterality is written empty (one dciodvfy warning).
    """
    _check_for(volume, series)
    arr = np.asarray(volume.array)
    nk, nj, ni = arr.shape
    x, y, dc, dr, s = _plane_geometry(volume.affine)
    spacing = float(np.linalg.norm(s))
    normal = np.cross(x, y)
    if spacing <= 0:
        raise ValueError("slice vector is zero")
    cos = float(s @ normal) / spacing
    if abs(abs(cos) - 1.0) > 1e-6:
        raise ValueError(
            "NM stores slices along X × Y only: the slice vector "
            f"{s.tolist()} is not parallel to the image normal {normal.tolist()}"
        )
    a = volume.affine
    if cos > 0:
        frames_src = arr
        ipp = a[:3, 3]
    else:
        frames_src = arr[::-1]
        ipp = a[:3, 3] + (nk - 1) * s
    stored, rwv = _nm_pixels(frames_src, pixel_mode)
    if patient_position not in _POSITION_CODES:
        raise ValueError(f"patient_position must be one of {sorted(_POSITION_CODES)}")
    if injection.activity_bq <= 0:
        raise ValueError(f"injection.activity_bq must be positive, got {injection.activity_bq}")

    acq = series.acquisition_datetime
    ds = _base(
        ctx,
        series,
        modality="NM",
        sop_class_uid=NM_IMAGE_STORAGE,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
    )
    _body_part(ds, body_part_examined)
    _frame_and_times(ds, series, acq)
    ds.AcquisitionDateTime = _dt(acq)
    ds.PatientOrientation = [_orientation_letters(x), _orientation_letters(y)]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.AcquisitionContextSequence = DicomSequence([])  # Acquisition Context C.7.6.14, Type 2
    # NM/PET Patient Orientation C.8.4.6
    orient, modifier, gantry = _POSITION_CODES[patient_position]
    orient_item = _code_item(orient)
    orient_item.PatientOrientationModifierCodeSequence = DicomSequence([_code_item(modifier)])
    ds.PatientOrientationCodeSequence = DicomSequence([orient_item])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([_code_item(gantry)])
    # Image Pixel C.7.6.3 / NM Image Pixel C.8.4.7
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [_ds(dr), _ds(dc)]
    # Multi-frame C.7.6.6 / NM Multi-frame C.8.4.8
    ds.NumberOfFrames = nk
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0054, 0x0080)  # SliceVector
    ds.SliceVector = list(range(1, nk + 1))
    ds.NumberOfSlices = nk
    ds.NumberOfEnergyWindows = 1
    ds.NumberOfDetectors = 1
    ds.NumberOfRotations = 1
    # NM Image C.8.4.9
    ds.CountsAccumulated = None
    # NM Reconstruction C.8.4.14
    ds.SpacingBetweenSlices = _ds(spacing)
    ds.SliceThickness = _ds(spacing)
    # NM Isotope C.8.4.10
    window = Dataset()
    rng = Dataset()
    lo_kev, hi_kev = (float(v) for v in acquisition.energy_window_keV)
    if not 0 < lo_kev < hi_kev:
        raise ValueError(f"energy window must satisfy 0 < lower < upper keV, got {(lo_kev, hi_kev)}")
    rng.EnergyWindowLowerLimit = _ds(lo_kev, 3)
    rng.EnergyWindowUpperLimit = _ds(hi_kev, 3)
    window.EnergyWindowRangeSequence = DicomSequence([rng])
    window.EnergyWindowName = acquisition.energy_window_name
    ds.EnergyWindowInformationSequence = DicomSequence([window])
    rp = Dataset()
    rp.Radiopharmaceutical = injection.radiopharmaceutical
    rp.RadiopharmaceuticalStartTime = _tm(injection.start)
    rp.RadiopharmaceuticalStartDateTime = _dt(injection.start)  # PET field; dciodvfy warns only
    rp.RadionuclideTotalDose = _ds(injection.activity_bq / 1e6, 6)  # (0018,1074) in MBq
    nuclide = radionuclide_code(injection.radionuclide)
    rp.RadionuclideCodeSequence = DicomSequence([_code_item(nuclide)])
    rp_code = _radiopharmaceutical_code(injection.radiopharmaceutical)
    if rp_code is not None:
        rp.RadiopharmaceuticalCodeSequence = DicomSequence([_code_item(rp_code)])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([rp])
    # NM Detector C.8.4.11 (one item for RECON TOMO)
    det = Dataset()
    det.CollimatorType = None
    det.FocalDistance = None
    det.ImagePositionPatient = _ds_list(ipp)
    det.ImageOrientationPatient = _ds_list(np.concatenate([x, y]), 8)
    ds.DetectorInformationSequence = DicomSequence([det])
    # NM TOMO Acquisition C.8.4.12 (one item for RECON TOMO)
    if acquisition.frame_duration_ms <= 0 or acquisition.frames_in_rotation <= 0:
        raise ValueError("frame_duration_ms and frames_in_rotation must be positive")
    rot = Dataset()
    rot.StartAngle = _ds(start_angle_deg, 3)
    rot.AngularStep = _ds(acquisition.angular_step_deg, 4)
    if rotation_direction not in ("CW", "CC"):
        raise ValueError(f"rotation_direction must be 'CW' or 'CC', got {rotation_direction!r}")
    rot.RotationDirection = rotation_direction
    arc = acquisition.angular_step_deg * acquisition.frames_in_rotation if scan_arc_deg is None else scan_arc_deg
    rot.ScanArc = _ds(arc, 3)
    rot.ActualFrameDuration = int(acquisition.frame_duration_ms)
    rot.NumberOfFramesInRotation = int(acquisition.frames_in_rotation)
    ds.RotationInformationSequence = DicomSequence([rot])
    if rwv is not None:
        ds.RealWorldValueMappingSequence = DicomSequence([_rwvm_bqml(*rwv)])
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    _save(ds, path)
    return ds


# --------------------------------------------------------------------------------------------
# CT
# --------------------------------------------------------------------------------------------


def write_ct_series(
    folder: str | Path,
    volume: Volume,
    *,
    ctx: PatientStudy,
    series: SeriesInfo,
    patient_position: str = "HFS",
    kvp: float | None = None,
    body_part_examined: str | None = None,
) -> list[pydicom.Dataset]:
    """Write a CT Image Storage series, one file per slice, HU via RescaleSlope/Intercept.

    Files ``folder/CT_0001.dcm`` ... in slice order ``k`` (InstanceNumber ``k + 1``).  HU are
    rounded to integers and stored as signed int16 with RescaleIntercept 0, RescaleSlope 1
    (``ValueError`` outside -32768..32767).  ImagePositionPatient of slice ``k`` is
    ``affine @ (0, 0, k, 1)``, so any affine (flipped order, oblique, tilted) is written exactly.
    ``kvp`` (kV, Type 2) is written empty when unknown; ``patient_position`` defaults to HFS;
    ``body_part_examined`` as for :func:`write_nm_tomo`.
    Returns the datasets in slice order ``k``.
    """
    _check_for(volume, series)
    arr = np.asarray(volume.array)
    if not np.all(np.isfinite(arr)):
        raise ValueError("CT volume contains NaN or infinite values")
    hu = np.rint(arr.astype(np.float64))
    if hu.size and (hu.min() < -32768 or hu.max() > 32767):
        raise ValueError(f"HU range {hu.min()}..{hu.max()} does not fit int16")
    hu = hu.astype("<i2")
    nk, nj, ni = arr.shape
    x, y, dc, dr, s = _plane_geometry(volume.affine)
    normal = np.cross(x, y)
    thickness = float(np.linalg.norm(s))
    iop = _ds_list(np.concatenate([x, y]), 8)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acq = series.acquisition_datetime
    out: list[pydicom.Dataset] = []
    for k in range(nk):
        ds = _base(
            ctx,
            series,
            modality="CT",
            sop_class_uid=CT_IMAGE_STORAGE,
            sop_instance_uid=generate_uid(),
            instance_number=k + 1,
        )
        ds.PatientPosition = patient_position
        _body_part(ds, body_part_examined)
        _frame_and_times(ds, series, acq)
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # Image Plane C.7.6.2
        pos = volume.affine[:3, 3] + k * s
        ds.ImagePositionPatient = _ds_list(pos)
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_ds(dr), _ds(dc)]
        ds.SliceThickness = _ds(thickness)
        ds.SliceLocation = _ds(float(pos @ normal))
        # Image Pixel C.7.6.3 / CT Image C.8.2.1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(0)
        ds.RescaleSlope = _ds(1)
        ds.RescaleType = "HU"
        ds.KVP = None if kvp is None else _ds(kvp, 2)
        ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
        _save(ds, folder / f"CT_{k + 1:04d}.dcm")
        out.append(ds)
    return out


# --------------------------------------------------------------------------------------------
# Contours and RTSTRUCT
# --------------------------------------------------------------------------------------------


def _segment_table() -> dict[int, list[tuple[int, int]]]:
    """Marching-squares cases: cell corners a,b,c,d (bits 1,2,4,8) in cyclic order.

    Edges e0=a→b, e1=b→c, e2=c→d, e3=d→a.  Each crossing where the cycle goes from outside to
    inside ("entry") is joined to the next crossing going from inside to outside ("exit"); the
    inside then always lies on the same side of the directed segment, so that segments chain into
    consistently oriented loops.  In the two saddle cases the inside corners are kept apart
    (inside 4-connected).
    """
    table: dict[int, list[tuple[int, int]]] = {}
    for case in range(16):
        inside = [(case >> b) & 1 for b in range(4)]
        kinds = {}
        for e in range(4):
            u, v = inside[e], inside[(e + 1) % 4]
            if u != v:
                kinds[e] = "exit" if u else "entry"
        segs = []
        for e, kind in kinds.items():
            if kind == "entry":
                for step in range(1, 4):
                    f = (e + step) % 4
                    if kinds.get(f) == "exit":
                        segs.append((e, f))
                        break
        table[case] = segs
    return table


_CASES = _segment_table()
#: Doubled (row, col) offset of each edge midpoint from the cell's top-left corner (doubled).
_EDGE_MID = np.array([[0, 1], [1, 2], [2, 1], [1, 0]])


def _slice_loops(sl: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a 2-D bool mask, as (n, 2) arrays of (row, col) pixel coordinates.

    Vertices are the mid-points between an inside and an outside pixel centre (marching squares at
    level 0.5).  Collinear vertices are dropped.
    """
    p = np.pad(np.asarray(sl, dtype=bool), 1)
    a, b, c, d = p[:-1, :-1], p[:-1, 1:], p[1:, 1:], p[1:, :-1]
    case = a * 1 + b * 2 + c * 4 + d * 8
    starts, ends = [], []
    for code in range(1, 15):
        rr, cc = np.nonzero(case == code)
        if rr.size == 0:
            continue
        corner = 2 * np.stack([rr, cc], axis=1)
        for e0, e1 in _CASES[code]:
            starts.append(corner + _EDGE_MID[e0])
            ends.append(corner + _EDGE_MID[e1])
    if not starts:
        return []
    st = np.concatenate(starts)
    en = np.concatenate(ends)
    width = 2 * p.shape[1] + 1
    skey = st[:, 0] * width + st[:, 1]
    ekey = en[:, 0] * width + en[:, 1]
    order = np.argsort(skey)
    pos = np.searchsorted(skey[order], ekey)
    nxt = order[pos]
    if not np.array_equal(skey[nxt], ekey):  # pragma: no cover - would be a bug in the table
        raise RuntimeError("marching squares produced an open contour")
    seen = np.zeros(len(st), dtype=bool)
    loops: list[np.ndarray] = []
    for first in range(len(st)):
        if seen[first]:
            continue
        idx = []
        cur = first
        while not seen[cur]:
            seen[cur] = True
            idx.append(cur)
            cur = nxt[cur]
        pts = st[idx]
        prev, post = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (post[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (
            post[:, 0] - pts[:, 0]
        )
        pts = pts[cross != 0]
        loops.append(pts / 2.0 - 1.0)  # undouble, undo the padding
    return loops


def contours_from_mask(mask: np.ndarray, grid_affine: np.ndarray) -> list[np.ndarray]:
    """Per-slice closed polygons (LPS mm, each ``(n, 3)``) tracing the boundary of ``mask[k, j, i]``.

    Vertices lie half-way between inside and outside voxel centres of the same slice (marching
    squares at 0.5 on a zero-padded slice, no scikit-image needed), so an even-odd
    centre-in-polygon test on the same grid gives back ``mask`` exactly.  Each 4-connected component
    gives one contour and each hole another; outer boundaries and holes have opposite
    orientations.  Polygons are not closed explicitly (DICOM CLOSED_PLANAR).  Returned in slice
    order ``k``; the contours of slice ``k`` lie in the plane ``affine @ (., ., k, 1)``.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3-D [k, j, i], got shape {m.shape}")
    aff = np.asarray(grid_affine, dtype=float)
    if aff.shape != (4, 4):
        raise ValueError(f"grid_affine must be 4x4, got {aff.shape}")
    out: list[np.ndarray] = []
    for k in range(m.shape[0]):
        if not m[k].any():
            continue
        for loop in _slice_loops(m[k]):
            ijk = np.column_stack([loop[:, 1], loop[:, 0], np.full(len(loop), float(k))])
            out.append(ijk @ aff[:3, :3].T + aff[:3, 3])
    return out


_COLOURS = [
    (255, 0, 0),
    (0, 160, 255),
    (0, 200, 0),
    (255, 160, 0),
    (200, 0, 200),
    (0, 200, 200),
    (160, 100, 40),
    (255, 255, 0),
    (120, 120, 255),
    (255, 120, 160),
]


def _interpreted_type(name: str) -> str:
    """RT ROI Interpreted Type (3006,00A4), C.8.8.8.1, from the ROI name."""
    low = name.lower()
    if low.startswith(("tumor", "tumour", "gtv", "lesion")):
        return "GTV"
    if low.startswith("ctv"):
        return "CTV"
    if low.startswith("ptv"):
        return "PTV"
    if low in ("body", "external", "skin", "outline"):
        return "EXTERNAL"
    return "ORGAN"


def _ct_planes(referenced_ct: Sequence[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """Unit normal (from the first slice) and plane offsets ``IPP · n`` of every CT slice."""
    iop = np.asarray(referenced_ct[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    offsets = []
    for ds in referenced_ct:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-5):
            raise ValueError(f"CT slice {ds.SOPInstanceUID} has another orientation")
        offsets.append(float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal))
    return normal, np.asarray(offsets)


def write_rtstruct(
    path: str | Path,
    contours: Mapping[str, Sequence[np.ndarray]],
    *,
    ctx: PatientStudy,
    series: SeriesInfo,
    referenced_ct: Sequence[pydicom.Dataset],
    roi_generation_algorithm: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "AUTOMATIC",
    plane_tolerance_mm: float = 0.05,
    decimals: int = 3,
) -> pydicom.Dataset:
    """Write an RT Structure Set; ``contours[name]`` is a list of (N, 3) CLOSED_PLANAR polygons in LPS mm.

    Every polygon must lie (within ``plane_tolerance_mm``) in the plane of one slice of
    ``referenced_ct`` (the CT series of the same Frame of Reference): its ContourImageSequence
    references that slice; otherwise ``ValueError``.  Coordinates are rounded to ``decimals``
    (default 0.001 mm) so that every DS value fits 16 characters.  ROI numbers are 1, 2, ... in
    the order of ``contours``; RTROIInterpretedType is GTV for names starting with Tumor/Tumour/
    GTV/Lesion, CTV/PTV for those prefixes, EXTERNAL for Body/External, ORGAN otherwise.
    """
    if not referenced_ct:
        raise ValueError("referenced_ct is empty: an RTSTRUCT must reference its CT series")
    ct_series = {ds.SeriesInstanceUID for ds in referenced_ct}
    if len(ct_series) != 1:
        raise ValueError(f"referenced_ct spans {len(ct_series)} series; pass one CT series")
    for ds in referenced_ct:
        if ds.FrameOfReferenceUID != series.frame_of_reference_uid:
            raise ValueError(
                f"CT slice {ds.SOPInstanceUID} has FrameOfReferenceUID {ds.FrameOfReferenceUID}, "
                f"the structure set {series.frame_of_reference_uid}"
            )
        if ds.StudyInstanceUID != ctx.study_instance_uid:
            raise ValueError(f"CT slice {ds.SOPInstanceUID} belongs to another study")
    normal, offsets = _ct_planes(referenced_ct)

    ds = _base(
        ctx,
        series,
        modality="RTSTRUCT",
        sop_class_uid=RT_STRUCTURE_SET_STORAGE,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = series.frame_of_reference_uid  # Frame of Reference C.7.4.1
    ds.PositionReferenceIndicator = ""
    when = series.acquisition_datetime
    ds.StructureSetLabel = (series.series_description or "voxeldose")[:16]
    ds.StructureSetName = (series.series_description or "voxeldose")[:64]
    ds.StructureSetDate = _da(when)
    ds.StructureSetTime = _tm(when)

    contour_images = []
    for ct in referenced_ct:
        item = Dataset()
        item.ReferencedSOPClassUID = ct.SOPClassUID
        item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        contour_images.append(item)
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = next(iter(ct_series))
    rt_series.ContourImageSequence = DicomSequence(contour_images)
    rt_study = Dataset()
    # RT Referenced Study Sequence, C.8.8.5: the customary (retired) Detached Study Management
    # SOP Class, as written by treatment planning systems; dciodvfy accepts it.
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    rt_study.ReferencedSOPInstanceUID = ctx.study_instance_uid
    rt_study.RTReferencedSeriesSequence = DicomSequence([rt_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = series.frame_of_reference_uid
    ref_for.RTReferencedStudySequence = DicomSequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])

    ss_rois, roi_contours, observations = [], [], []
    for number, (name, polys) in enumerate(contours.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = roi_generation_algorithm
        ss_rois.append(roi)

        rc = Dataset()
        rc.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        items = []
        for cnum, poly in enumerate(polys, start=1):
            pts = np.asarray(poly, dtype=float)
            if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 3:
                raise ValueError(f"ROI {name!r} contour {cnum}: need an (N>=3, 3) array, got {pts.shape}")
            pts = np.round(pts, decimals)
            d = pts @ normal
            if np.ptp(d) > 2 * plane_tolerance_mm:
                raise ValueError(f"ROI {name!r} contour {cnum} is not planar along the CT normal")
            kslice = int(np.argmin(np.abs(offsets - d.mean())))
            if np.max(np.abs(d - offsets[kslice])) > plane_tolerance_mm:
                raise ValueError(
                    f"ROI {name!r} contour {cnum} lies at {d.mean():.3f} mm along the CT normal, "
                    f"on no CT slice (nearest {offsets[kslice]:.3f} mm)"
                )
            item = Dataset()
            item.ContourNumber = cnum
            img = Dataset()
            img.ReferencedSOPClassUID = referenced_ct[kslice].SOPClassUID
            img.ReferencedSOPInstanceUID = referenced_ct[kslice].SOPInstanceUID
            item.ContourImageSequence = DicomSequence([img])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(pts)
            item.ContourData = _ds_list(pts, decimals)
            items.append(item)
        rc.ContourSequence = DicomSequence(items)
        rc.ReferencedROINumber = number
        roi_contours.append(rc)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = _interpreted_type(name)
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(ss_rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    _save(ds, path)
    return ds


# --------------------------------------------------------------------------------------------
# SEG
# --------------------------------------------------------------------------------------------

#: Name prefix (lower case) -> (segmented property category, type), CID 7150 / CID 7151 etc.
_SEGMENT_CODES: list[tuple[str, Code, Code]] = [
    ("tumo", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    ("lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    ("kidney", codes.SCT.AnatomicalStructure, codes.SCT.Kidney),
    ("liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver),
    ("spleen", codes.SCT.AnatomicalStructure, codes.SCT.Spleen),
    ("bone marrow", codes.SCT.Tissue, codes.SCT.BoneMarrow),
    ("bone_marrow", codes.SCT.Tissue, codes.SCT.BoneMarrow),
    ("bonemarrow", codes.SCT.Tissue, codes.SCT.BoneMarrow),
    ("marrow", codes.SCT.Tissue, codes.SCT.BoneMarrow),
    ("red marrow", codes.SCT.Tissue, codes.SCT.BoneMarrow),
    ("bladder", codes.SCT.AnatomicalStructure, codes.SCT.Bladder),
    ("urinary", codes.SCT.AnatomicalStructure, codes.SCT.Bladder),
    ("lung", codes.SCT.AnatomicalStructure, codes.SCT.Lung),
    ("heart", codes.SCT.AnatomicalStructure, codes.SCT.Heart),
    ("parotid", codes.SCT.AnatomicalStructure, codes.SCT.ParotidGland),
    ("submandibular", codes.SCT.AnatomicalStructure, codes.SCT.SubmandibularGland),
    ("salivary", codes.SCT.AnatomicalStructure, codes.SCT.SalivaryGland),
    ("lacrimal", codes.SCT.AnatomicalStructure, codes.SCT.LacrimalGland),
    ("pancreas", codes.SCT.AnatomicalStructure, codes.SCT.Pancreas),
    ("stomach", codes.SCT.AnatomicalStructure, codes.SCT.Stomach),
    ("bone", codes.SCT.Tissue, codes.SCT.Bone),
    ("soft", codes.SCT.Tissue, codes.SCT.SoftTissue),
]
_GENERIC_SEGMENT = (codes.SCT.AnatomicalStructure, codes.SCT.Organ)


def _segment_codes(name: str) -> tuple[Code, Code]:
    """Segmented property category and type for a mask name (prefix lookup, Organ fallback)."""
    low = name.lower()
    for prefix, cat, typ in _SEGMENT_CODES:
        if low.startswith(prefix):
            return cat, typ
    return _GENERIC_SEGMENT


def write_seg(
    path: str | Path,
    masks: Mapping[str, np.ndarray],
    *,
    ctx: PatientStudy,
    series: SeriesInfo,
    referenced_ct: Sequence[pydicom.Dataset],
    algorithm_type: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "AUTOMATIC",
    algorithm_name: str = "voxeldose",
    algorithm_family: Code = codes.cid7162.MorphologicalOperations,
) -> pydicom.Dataset:
    """Write a binary Segmentation (highdicom) of ``masks[name]`` (bool arrays on the CT grid [k, j, i]).

    ``referenced_ct`` are the CT slices in slice order ``k`` (as returned by
    :func:`write_ct_series`); segment ``n`` (1-based, in the order of ``masks``) is ``masks``'
    ``n``-th entry, SegmentLabel = its name, codes from a prefix table (Tumor* -> Morphologically
    abnormal structure / Neoplasm, organs -> Anatomical structure / organ, fallback Organ).
    Empty frames are omitted.  Segmentation IOD (PS3.3 A.51, C.8.20).
    """
    import highdicom as hd

    if not masks:
        raise ValueError("no masks to write")
    if not referenced_ct:
        raise ValueError("referenced_ct is empty")
    shape = (len(referenced_ct), int(referenced_ct[0].Rows), int(referenced_ct[0].Columns))
    for ds in referenced_ct:
        if ds.FrameOfReferenceUID != series.frame_of_reference_uid:
            raise ValueError(f"CT slice {ds.SOPInstanceUID} has another FrameOfReferenceUID")
    stack = []
    for name, m in masks.items():
        m = np.asarray(m)
        if m.shape != shape:
            raise ValueError(f"mask {name!r} has shape {m.shape}, the CT grid is {shape}")
        stack.append(m.astype(bool))
    pixel_array = np.stack(stack, axis=-1).astype(np.uint8)
    algo = None
    if algorithm_type != "MANUAL":
        algo = hd.AlgorithmIdentificationSequence(
            name=algorithm_name, family=algorithm_family, version=_software_version()
        )
    descriptions = []
    for number, name in enumerate(masks, start=1):
        cat, typ = _segment_codes(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=cat,
                segmented_property_type=typ,
                algorithm_type=algorithm_type,
                algorithm_identification=algo,
            )
        )
    when = series.acquisition_datetime
    seg = hd.seg.Segmentation(
        source_images=list(referenced_ct),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series.series_instance_uid,
        series_number=int(series.series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=_software_version(),
        device_serial_number="none",
        omit_empty_frames=True,
        series_description=series.series_description,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    _save(seg, path)
    return seg


# --------------------------------------------------------------------------------------------
# RT Dose
# --------------------------------------------------------------------------------------------

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"

#: Dose Summation Type (3004,000A) written by :func:`write_rtdose`.
#:
#: PS3.3 C.8.8.3 lists Defined Terms that all describe doses of *radiotherapy plans or records*, and
#: makes a reference to that object a condition of each: PLAN, MULTI_PLAN, FRACTION, BEAM, BRACHY,
#: FRACTION_SESSION, BEAM_SESSION, BRACHY_SESSION and CONTROL_POINT require a Referenced RT Plan
#: Sequence (300C,0002) (MULTI_PLAN two or more items), RECORD a Referenced Treatment Record
#: Sequence (3008,0030).  A dose from a radiopharmaceutical administration has neither an RT Plan
#: nor an RT Treatment Record, so every listed term would either break its condition (dciodvfy:
#: error) or need a made-up reference (dishonest).  The list is one of *Defined Terms*, which an
#: implementation may extend, so we write our own term naming what the grid is: the absorbed dose
#: of one radiopharmaceutical administration (one therapy cycle), integrated to infinity.  dciodvfy
#: reports it as an unrecognised defined term (a warning, not an error).  Readers that only
#: accept PLAN should be configured to ignore the summation type; the dose values are unaffected.
RTDOSE_SUMMATION_TYPE = "ADMINISTRATION"


def _dose_scaling(max_gy: float, top: int) -> float:
    """DoseGridScaling (Gy per stored unit, as read back from its DS string) for stored values <= top."""
    if max_gy <= 0:
        return 1.0
    # aim slightly below the full range so that rounding the DS string cannot overflow
    target = max_gy / (top - top // 100_000 - 1)
    scale = float(str(DSfloat(target, auto_format=True)))
    while max_gy / scale > top - 0.5:  # pragma: no cover - DS rounding went down
        scale = float(str(DSfloat(scale * (1 + 1e-9), auto_format=True)))
    return scale


def write_rtdose(
    path: str | Path,
    dose: Volume,
    *,
    ctx: PatientStudy,
    series: SeriesInfo,
    referenced_rtstruct: pydicom.Dataset | None = None,
    comment: str = "",
    description: str = (
        "Absorbed dose from a 177Lu radiopharmaceutical administration, time-integrated SPECT "
        "activity convolved with a dose-voxel kernel (voxeldose)"
    ),
    bits_allocated: Literal[16, 32] = 32,
) -> pydicom.Dataset:
    """Write a multi-frame RT Dose Storage object (PS3.3 A.18) of ``dose`` (Gy) on its own grid.

    The grid is the SPECT grid in the CT's Frame of Reference (``series.frame_of_reference_uid``);
    it need not be the CT grid.  Modules: Patient, General Study, Patient Study, RT Series
    (C.8.8.1), Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel,
    Multi-frame, RT Dose (C.8.8.3), SOP Common.

    * DoseUnits GY, DoseType PHYSICAL, DoseSummationType :data:`RTDOSE_SUMMATION_TYPE` (see there
      why not PLAN), no Referenced RT Plan Sequence.
    * Geometry: ImageOrientationPatient / PixelSpacing from the affine's ``i`` and ``j`` columns
      (any orthonormal orientation, oblique included); frames are slices along the normal
      ``N = X × Y``, GridFrameOffsetVector ``[0, Δk, 2Δk, ...]`` mm relative to
      ImagePositionPatient along ``N`` (FrameIncrementPointer → GridFrameOffsetVector).  A volume
      whose slice vector points along ``-N`` is written with its frames reversed (IPP = its last
      slice), which describes the same voxels.  A slice vector not parallel to ``N`` (a sheared
      grid), or non-orthogonal rows and columns, raise ``ValueError``: RT Dose frames are parallel
      planes stacked along their normal.
    * Pixels: unsigned 32-bit (``bits_allocated=16``: 16-bit), ``Gy = stored × DoseGridScaling``;
      the scaling (a DS of at most 16 characters) uses nearly the full range, so the quantisation
      error is at most ``DoseGridScaling / 2`` ≈ ``max / 8.6e9`` (16-bit: ``max / 131 000``).
      Negative values within that half step of zero (FFT round-off) are written as 0; more
      negative values, NaN or inf raise ``ValueError``.  dicom3tools' ``dciodvfy`` (up to at least
      the 2022 Debian build) aborts on any 32-bit Pixel Data (assertion ``bitsallocated <=
      bytesinword*8u``); the 16-bit option exists for such readers, and the tests validate the
      32-bit header through a 16-bit twin.
    * ``referenced_rtstruct``: an RT Structure Set of the same patient and Frame of Reference
      (``ValueError`` otherwise).  In the RT Dose IOD the Referenced Structure Set Sequence
      (300C,0060) belongs to the RT DVH module (C.8.8.4), whose DVH Sequence is Type 1, so the
      reference is written *with* a cumulative DVH of every ROI that overlaps the dose grid: each
      ROI is rasterised onto the dose grid by :func:`voxeldose.voi.rasterise_rtstruct`
      (supersampled occupancy), volumes in cm³, ≤ 1000 bins of a 1-2-5 width, plus DVH
      Minimum/Maximum/Mean Dose.  No ROI overlapping the grid → ``ValueError``.
    * ``comment`` → DoseComment (3004,0006, LO: cut to 64 characters, the whole text then also
      goes to Derivation Description); ``description`` → Derivation Description (0008,2111), and
      SeriesDescription when ``series.series_description`` is empty.
    * ContentDate/Time = ``series.acquisition_datetime`` (when the dose was computed).
    """
    _check_for(dose, series)
    arr = np.asarray(dose.array, dtype=np.float64)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"dose array must be 3-D [k, j, i] and non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("dose contains NaN or infinite values")
    if str(dose.units) not in ("Gy", "GY", "gy"):
        raise ValueError(f"dose.units must be 'Gy', got {dose.units!r}")
    nk, nj, ni = arr.shape
    x, y, dc, dr, s = _plane_geometry(dose.affine)
    normal = np.cross(x, y)
    spacing = float(np.linalg.norm(s))
    if spacing <= 0:
        raise ValueError("the affine's slice vector is zero")
    cos = float(s @ normal) / spacing
    if abs(abs(cos) - 1.0) > 1e-6:
        angle = float(np.degrees(np.arccos(np.clip(abs(cos), -1.0, 1.0))))
        raise ValueError(
            "RT Dose frames are planes stacked along their normal X × Y: the slice vector "
            f"{np.round(s, 6).tolist()} is {angle:.3f}° off the image normal "
            f"{np.round(normal, 6).tolist()} (a sheared grid); resample the dose onto a "
            "rectilinear grid first"
        )
    if cos > 0:
        frames = arr
        ipp = dose.affine[:3, 3]
    else:
        frames = arr[::-1]
        ipp = dose.affine[:3, 3] + (nk - 1) * s

    if bits_allocated not in (16, 32):
        raise ValueError(f"bits_allocated must be 16 or 32, got {bits_allocated!r}")
    top = 2**bits_allocated - 1
    max_gy = float(frames.max())
    scale = _dose_scaling(max_gy, top)
    lowest = float(frames.min())
    if lowest < -scale / 2:
        raise ValueError(f"dose has negative values (minimum {lowest:.6g} Gy)")
    stored = np.clip(np.rint(frames / scale), 0, top).astype("<u4" if bits_allocated == 32 else "<u2")

    if referenced_rtstruct is not None:
        if str(getattr(referenced_rtstruct, "SOPClassUID", "")) != RT_STRUCTURE_SET_STORAGE:
            raise ValueError("referenced_rtstruct is not an RT Structure Set (SOP Class UID)")
        rs_for = {
            str(item.FrameOfReferenceUID)
            for item in getattr(referenced_rtstruct, "ReferencedFrameOfReferenceSequence", None) or []
        }
        if "FrameOfReferenceUID" in referenced_rtstruct:
            rs_for.add(str(referenced_rtstruct.FrameOfReferenceUID))
        if rs_for and series.frame_of_reference_uid not in rs_for:
            raise ValueError(
                f"referenced_rtstruct is in Frame of Reference {sorted(rs_for)}, the dose in "
                f"{series.frame_of_reference_uid}"
            )
        if str(getattr(referenced_rtstruct, "PatientID", ctx.patient_id)) != ctx.patient_id:
            raise ValueError(
                f"referenced_rtstruct belongs to patient {referenced_rtstruct.PatientID!r}, "
                f"the dose to {ctx.patient_id!r}"
            )
    ds = _base(
        ctx,
        series,
        modality="RTDOSE",
        sop_class_uid=RT_DOSE_STORAGE,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    if not series.series_description and description:
        ds.SeriesDescription = description[:64]
    ds.OperatorsName = ""  # RT Series C.8.8.1, Type 2
    # Frame of Reference C.7.4.1
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Image C.7.6.1
    when = series.acquisition_datetime
    ds.ContentDate = _da(when)
    ds.ContentTime = _tm(when)
    derivation = "; ".join(t for t in (description, comment if len(comment) > 64 else "") if t)
    if derivation:
        ds.DerivationDescription = derivation[:1024]  # ST
    # Image Plane C.7.6.2
    ds.PixelSpacing = [_ds(dr), _ds(dc)]
    ds.ImageOrientationPatient = _ds_list(np.concatenate([x, y]), 8)
    ds.ImagePositionPatient = _ds_list(ipp)
    ds.SliceThickness = _ds(spacing)
    # Image Pixel C.7.6.3 with the RT Dose specialisations C.8.8.3.4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_allocated
    ds.HighBit = bits_allocated - 1
    ds.PixelRepresentation = 0
    # Multi-frame C.7.6.6
    ds.NumberOfFrames = nk
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)  # GridFrameOffsetVector
    # RT Dose C.8.8.3
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    if comment:
        ds.DoseComment = comment if len(comment) <= 64 else comment[:61] + "..."  # LO: 64 characters
    ds.DoseSummationType = RTDOSE_SUMMATION_TYPE
    ds.GridFrameOffsetVector = _ds_list(np.arange(nk) * spacing)
    ds.DoseGridScaling = DSfloat(scale, auto_format=True)
    if referenced_rtstruct is not None:
        _rt_dvh(ds, referenced_rtstruct, dose.with_array(arr))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    _save(ds, path)
    return ds


def _dvh_bin_width(max_gy: float, max_bins: int = 1000) -> float:
    """Smallest 1-2-5 bin width (Gy) giving at most ``max_bins`` bins up to ``max_gy``."""
    if max_gy <= 0:
        return 0.01
    raw = max_gy / (max_bins - 1)
    decade = 10.0 ** np.floor(np.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * decade >= raw:
            return float(m * decade)
    return float(10 * decade)  # pragma: no cover


def _rt_dvh(ds: Dataset, rtstruct: pydicom.Dataset, dose: Volume) -> None:
    """RT DVH module C.8.8.4: Referenced Structure Set Sequence + one cumulative DVH per ROI."""
    from .voi import rasterise_rtstruct  # late import: voi imports ingest

    numbers = {str(r.ROIName): int(r.ROINumber) for r in rtstruct.StructureSetROISequence}
    vois = rasterise_rtstruct(rtstruct, dose.grid)
    d = np.asarray(dose.array, dtype=np.float64)
    voxel_cc = dose.grid.voxel_volume_ml
    items = []
    for name, voi in vois.items():
        w = np.asarray(voi.fraction, dtype=np.float64)
        total = float(w.sum())
        if total <= 0:
            continue
        sel = w > 0
        dv, wv = d[sel], w[sel]
        dmax = float(dv.max())
        width = _dvh_bin_width(dmax)
        nbins = int(np.floor(dmax / width)) + 1
        # cumulative: volume receiving at least the lower edge of each bin
        hist, _ = np.histogram(dv, bins=nbins, range=(0.0, nbins * width), weights=wv)
        cum = np.cumsum(hist[::-1])[::-1] * voxel_cc
        item = Dataset()
        roi_ref = Dataset()
        roi_ref.ReferencedROINumber = numbers[name]
        roi_ref.DVHROIContributionType = "INCLUDED"
        item.DVHReferencedROISequence = DicomSequence([roi_ref])
        item.DVHType = "CUMULATIVE"
        item.DoseUnits = "GY"
        item.DoseType = "PHYSICAL"
        item.DVHDoseScaling = _ds(1.0)
        item.DVHVolumeUnits = "CM3"
        item.DVHNumberOfBins = nbins
        w_ds = DSfloat(width, auto_format=True)
        item.DVHData = [v for c in cum for v in (w_ds, _ds(c, 6))]
        item.DVHMinimumDose = DSfloat(float(dv.min()), auto_format=True)
        item.DVHMaximumDose = DSfloat(dmax, auto_format=True)
        item.DVHMeanDose = DSfloat(float((dv * wv).sum() / total), auto_format=True)
        items.append(item)
    if not items:
        raise ValueError("no ROI of referenced_rtstruct overlaps the dose grid: nothing to reference")
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ref.ReferencedSOPInstanceUID = rtstruct.SOPInstanceUID
    ds.ReferencedStructureSetSequence = DicomSequence([ref])
    ds.DVHSequence = DicomSequence(items)


__all__ += ["write_rtdose", "RT_DOSE_STORAGE", "RTDOSE_SUMMATION_TYPE"]
