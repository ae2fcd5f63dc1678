"""The synthetic scanner: NM reconstructed SPECT, CT series and RTSTRUCT, as a SPECT/CT camera and a
contouring system would write them.

Used by the synthetic patient (:mod:`voxeldose.phantom`) to play the scanner, and by tests to build
inputs; voxeldose's own results are written by :mod:`voxeldose.dicom_writers` (RT Dose, SEG).  Every
object written here passes dicom3tools' ``dciodvfy`` with no errors (``tests/test_dicom_writers.py``).

Geometry follows :mod:`voxeldose.geometry`: arrays ``[k, j, i]``; the affine maps ``(i, j, k, 1)``
to LPS mm, ``P = IPP + i*Δc*X + j*Δr*Y + k*S``.

References (DICOM PS3.3):

* NM Image IOD A.5: NM/PET Patient Orientation C.8.4.6, NM Image Pixel C.8.4.7, NM Multi-frame
  C.8.4.8, NM Image C.8.4.9, NM Isotope C.8.4.10, NM Detector C.8.4.11, NM TOMO Acquisition
  C.8.4.12, NM Reconstruction C.8.4.14, Real World Value Mapping C.7.6.16.2.11.
* CT Image IOD A.3: Image Plane C.7.6.2, CT Image C.8.2.1.
* RT Structure Set IOD A.19: RT Series C.8.8.1, Structure Set C.8.8.5, ROI Contour C.8.8.6,
  RT ROI Observations C.8.8.8.

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
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from .dicomutil import (
    RT_STRUCTURE_SET_STORAGE,
    PatientStudy,
    SeriesInfo,
    base_dataset,
    check_frame_of_reference,
    code_item,
    format_da,
    format_ds,
    format_ds_list,
    format_dt,
    format_tm,
    plane_geometry,
    save_part10,
)
from .geometry import Volume

__all__ = [
    "CT_IMAGE_STORAGE",
    "NM_IMAGE_STORAGE",
    "CameraHeaders",
    "Injection",
    "PatientStudy",
    "SeriesInfo",
    "SpectAcquisition",
    "contours_from_mask",
    "radionuclide_code",
    "write_ct_series",
    "write_nm_tomo",
    "write_rtstruct",
    "nm_image_pixel",
]

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Injection:
    """The administration, as written in the Radiopharmaceutical Information Sequence."""

    radionuclide: str  # "Lu-177"
    activity_bq: float  # written as RadionuclideTotalDose in MBq
    start: datetime  # RadiopharmaceuticalStartDateTime / StartTime (+ date)
    radiopharmaceutical: str = "Lu-177-DOTATATE"


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


@dataclass(frozen=True)
class CameraHeaders:
    """The camera a SPECT series names (read back by :func:`voxeldose.camera.identity_from_dataset`).

    Manufacturer (0008,0070) and ManufacturerModelName (0008,1090) of the General Equipment module replace
    voxeldose's own; DeviceSerialNumber (0018,1000); CollimatorGridName (0018,1180, SH: ≤ 16 characters) in the
    NM Detector item; ReconstructionMethod (0054,1103, LO: ≤ 64 characters; a PET Series attribute that vendors
    also write in NM, dciodvfy warns only).
    """

    manufacturer: str
    model: str
    device_serial_number: str
    collimator: str
    reconstruction: str


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


def _orientation_letters(v: np.ndarray) -> str:
    """Patient Orientation (0020,0020) letters of a direction, C.7.6.1.1.1 (L/R, P/A, H/F)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(v))
    return "".join(letters[a][0 if v[a] > 0 else 1] for a in order if abs(v[a]) > 1e-3)


def _body_part(ds: Dataset, body_part_examined: str | None) -> None:
    """BodyPartExamined (0018,0015) when known; otherwise Laterality (0020,0060, Type 2C) empty.

    A series over the trunk has no laterality: with a body part given, Laterality is absent.
    """
    if body_part_examined:
        ds.BodyPartExamined = body_part_examined
    else:
        ds.Laterality = None


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
    ds.AcquisitionDate = format_da(acq)
    ds.AcquisitionTime = format_tm(acq)
    ds.ContentDate = format_da(acq)
    ds.ContentTime = format_tm(acq)


def nm_image_pixel(ds: Dataset, rows: int, columns: int, row_spacing_mm: float, column_spacing_mm: float) -> None:
    """Image Pixel (C.7.6.3) and NM Image Pixel (C.8.4.7) attributes of an unsigned 16-bit monochrome NM frame:
    ``rows`` × ``columns`` pixels, PixelSpacing = row spacing \\ column spacing (mm)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [format_ds(row_spacing_mm), format_ds(column_spacing_mm)]


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
    reconstruction_method: str | None = None,
    camera: CameraHeaders | None = None,
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
    without it Laterality is written empty (one dciodvfy warning).  ``camera`` names the camera that made the
    image (:class:`CameraHeaders`); without it the equipment is voxeldose and no collimator is named.
    ``reconstruction_method`` (e.g. ``"OSEM 4i8s AC RR SY-ME"``) is written as ReconstructionMethod (0054,1103),
    where vendors state it and :func:`voxeldose.camera.identity_from_dataset` reads it (a PET Series attribute:
    dciodvfy warns "not present in standard DICOM IOD").
    """
    check_frame_of_reference(volume, series)
    arr = np.asarray(volume.array)
    nk, nj, ni = arr.shape
    x, y, dc, dr, s = plane_geometry(volume.affine)
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
    ds = base_dataset(
        ctx,
        series,
        modality="NM",
        sop_class_uid=NM_IMAGE_STORAGE,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
    )
    _body_part(ds, body_part_examined)
    if camera is not None:
        if len(camera.collimator) > 16 or len(camera.reconstruction) > 64:
            raise ValueError("CollimatorGridName holds at most 16 and ReconstructionMethod 64 characters")
        ds.Manufacturer = camera.manufacturer
        ds.ManufacturerModelName = camera.model
        ds.DeviceSerialNumber = camera.device_serial_number
        ds.ReconstructionMethod = camera.reconstruction
    _frame_and_times(ds, series, acq)
    ds.AcquisitionDateTime = format_dt(acq)
    ds.PatientOrientation = [_orientation_letters(x), _orientation_letters(y)]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.AcquisitionContextSequence = DicomSequence([])  # Acquisition Context C.7.6.14, Type 2
    # NM/PET Patient Orientation C.8.4.6
    orient, modifier, gantry = _POSITION_CODES[patient_position]
    orient_item = code_item(orient)
    orient_item.PatientOrientationModifierCodeSequence = DicomSequence([code_item(modifier)])
    ds.PatientOrientationCodeSequence = DicomSequence([orient_item])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([code_item(gantry)])
    nm_image_pixel(ds, nj, ni, dr, dc)
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
    ds.SpacingBetweenSlices = format_ds(spacing)
    ds.SliceThickness = format_ds(spacing)
    if reconstruction_method:
        ds.ReconstructionMethod = reconstruction_method
    # NM Isotope C.8.4.10
    window = Dataset()
    rng = Dataset()
    lo_kev, hi_kev = (float(v) for v in acquisition.energy_window_keV)
    if not 0 < lo_kev < hi_kev:
        raise ValueError(f"energy window must satisfy 0 < lower < upper keV, got {(lo_kev, hi_kev)}")
    rng.EnergyWindowLowerLimit = format_ds(lo_kev, 3)
    rng.EnergyWindowUpperLimit = format_ds(hi_kev, 3)
    window.EnergyWindowRangeSequence = DicomSequence([rng])
    window.EnergyWindowName = acquisition.energy_window_name
    ds.EnergyWindowInformationSequence = DicomSequence([window])
    rp = Dataset()
    rp.Radiopharmaceutical = injection.radiopharmaceutical
    rp.RadiopharmaceuticalStartTime = format_tm(injection.start)
    rp.RadiopharmaceuticalStartDateTime = format_dt(injection.start)  # PET field; dciodvfy warns only
    rp.RadionuclideTotalDose = format_ds(injection.activity_bq / 1e6, 6)  # (0018,1074) in MBq
    nuclide = radionuclide_code(injection.radionuclide)
    rp.RadionuclideCodeSequence = DicomSequence([code_item(nuclide)])
    rp_code = _radiopharmaceutical_code(injection.radiopharmaceutical)
    if rp_code is not None:
        rp.RadiopharmaceuticalCodeSequence = DicomSequence([code_item(rp_code)])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([rp])
    # NM Detector C.8.4.11 (one item for RECON TOMO)
    det = Dataset()
    det.CollimatorType = None
    if camera is not None:
        det.CollimatorGridName = camera.collimator
    det.FocalDistance = None
    det.ImagePositionPatient = format_ds_list(ipp)
    det.ImageOrientationPatient = format_ds_list(np.concatenate([x, y]), 8)
    ds.DetectorInformationSequence = DicomSequence([det])
    # NM TOMO Acquisition C.8.4.12 (one item for RECON TOMO)
    if acquisition.frame_duration_ms <= 0 or acquisition.frames_in_rotation <= 0:
        raise ValueError("frame_duration_ms and frames_in_rotation must be positive")
    rot = Dataset()
    rot.StartAngle = format_ds(start_angle_deg, 3)
    rot.AngularStep = format_ds(acquisition.angular_step_deg, 4)
    if rotation_direction not in ("CW", "CC"):
        raise ValueError(f"rotation_direction must be 'CW' or 'CC', got {rotation_direction!r}")
    rot.RotationDirection = rotation_direction
    arc = acquisition.angular_step_deg * acquisition.frames_in_rotation if scan_arc_deg is None else scan_arc_deg
    rot.ScanArc = format_ds(arc, 3)
    rot.ActualFrameDuration = int(acquisition.frame_duration_ms)
    rot.NumberOfFramesInRotation = int(acquisition.frames_in_rotation)
    ds.RotationInformationSequence = DicomSequence([rot])
    if rwv is not None:
        ds.RealWorldValueMappingSequence = DicomSequence([_rwvm_bqml(*rwv)])
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    save_part10(ds, path)
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
    check_frame_of_reference(volume, series)
    arr = np.asarray(volume.array)
    if not np.all(np.isfinite(arr)):
        raise ValueError("CT volume contains NaN or infinite values")
    hu = np.rint(arr.astype(np.float64))
    if hu.size and (hu.min() < -32768 or hu.max() > 32767):
        raise ValueError(f"HU range {hu.min()}..{hu.max()} does not fit int16")
    hu = hu.astype("<i2")
    nk, nj, ni = arr.shape
    x, y, dc, dr, s = plane_geometry(volume.affine)
    normal = np.cross(x, y)
    thickness = float(np.linalg.norm(s))
    iop = format_ds_list(np.concatenate([x, y]), 8)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acq = series.acquisition_datetime
    out: list[pydicom.Dataset] = []
    for k in range(nk):
        ds = base_dataset(
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
        ds.ImagePositionPatient = format_ds_list(pos)
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [format_ds(dr), format_ds(dc)]
        ds.SliceThickness = format_ds(thickness)
        ds.SliceLocation = format_ds(float(pos @ normal))
        # Image Pixel C.7.6.3 / CT Image C.8.2.1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = format_ds(0)
        ds.RescaleSlope = format_ds(1)
        ds.RescaleType = "HU"
        ds.KVP = None if kvp is None else format_ds(kvp, 2)
        ds.PixelData = np.ascontiguousarray(hu[k]).tobytes()
        save_part10(ds, folder / f"CT_{k + 1:04d}.dcm")
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

    ds = base_dataset(
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
    ds.StructureSetDate = format_da(when)
    ds.StructureSetTime = format_tm(when)

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
            item.ContourData = format_ds_list(pts, decimals)
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
    save_part10(ds, path)
    return ds
