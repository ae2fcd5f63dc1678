"""SPECT projections as a camera writes them: NM Image objects with ImageType ``ORIGINAL\\PRIMARY\\TOMO\\EMISSION``.

:class:`ProjectionSet` holds one acquisition's photopeak projections and everything reconstruction needs:
:func:`write_projections` writes it as one NM Image Storage object, :func:`read_projections` reads one back (ours
or a camera's) and refuses, with a :class:`~voxeldose.errors.VoxeldoseError` naming the file, the tag and what was
expected, what it cannot use.  No torch here: :mod:`voxeldose.recon` reconstructs.

The object (DICOM PS3.3 A.5 NM Image IOD)
-----------------------------------------
* NM Multi-frame (C.8.4.8): frames ordered by energy window, then detector, then rotation, then angular view —
  Frame Increment Pointer = EnergyWindowVector (0054,0010) \\ DetectorVector (0054,0020) \\ RotationVector
  (0054,0050) \\ AngularViewVector (0054,0090), each vector giving every frame's index (1-based).
* Rotation Information Sequence (C.8.4.12), one item (one rotation): StartAngle, AngularStep, RotationDirection,
  ScanArc, ActualFrameDuration (ms per view), NumberOfFramesInRotation (views per detector).
* Detector Information Sequence (C.8.4.11), one item per head: CollimatorGridName, CollimatorType ``PARA``, the
  head's StartAngle and RadialPosition (mm, one value per view of the rotation), and the position of the
  reconstruction space (below).  A dual-head camera cannot state its second head's start angle or orbit in the
  single Rotation item, so each head's start angle and radii are written in its Detector item, where PyTomography's
  reader looks for them first (dciodvfy accepts them there).
* Energy Window Information Sequence (C.8.4.10): the photopeak window's name and limits (keV).

Geometry
--------
DICOM's detector angle φ (Start Angle, C.8.4.11): 0° with the detector behind the patient (at the back), growing
counter-clockwise seen from the feet (from the back towards the patient's left); CC increases it view by view, CW
decreases it.  :mod:`voxeldose.recon`'s projector (PyTomography's) uses θ = φ + 180° (its detector at θ = 0 is
in front of the patient; checked by projecting through an attenuator behind the patient, ``tests/test_projections``)
and puts a point at LPS ``(x, y)`` into the bin ``r = x cos θ − y sin θ``: the image's columns run along
``(cos θ, −sin θ, 0)`` and its rows from head to feet, ``(0, 0, −1)``.  This is the mapping PyTomography's own reader
(``pytomography.io.SPECT.dicom.parse_projection_dataset``: θ = φ + 180°, rows flipped) applies to cameras'
files, so PyTomography reads what is written here into the same arrays and grid (tested).  Only head-first
supine acquisitions are written and read (the projector's axes are then the patient's).

The reconstruction space: the Detector item's ImagePositionPatient is the LPS centre of the first voxel of the top
(most superior) transverse slice of the grid the projections define (``bins × bins × rows`` voxels of the pixel
spacing, axes along LPS, rotation axis through the transverse centre), with ImageOrientationPatient ``1\\0\\0\\0\\1\\0``
— how PyTomography's reader places the object of a file whose y coordinate there is not 0
(``_get_affine_spect_projections``; with y = 0 it takes the position as the grid's centre line instead, so a grid
whose first voxel lies at y = 0 cannot be written this way — a centred grid never does).

Arrays: ``counts[view, slice, bin]`` with ``slice`` growing towards the head (the grid's ``k``) and ``bin`` along
``r``, views in frame order (detector 1's, then detector 2's), angles in the projector's convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from .camera import CameraIdentity, identity_from_dataset
from .dicomutil import (
    PatientStudy,
    SeriesInfo,
    base_dataset,
    code_item,
    format_da,
    format_ds,
    format_ds_list,
    format_dt,
    format_tm,
    save_part10,
    tag_label,
)
from .errors import VoxeldoseError
from .geometry import Grid, Volume, resample
from .ingest import acquisition_datetime, injection_from_header
from .recon import (
    COLLIMATORS,
    LU177_PHOTOPEAK_KEV,
    Camera,
    Orbit,
    hu_to_mu_per_cm,
    reconstruct_osem,
)
from .recon import (
    collimator as collimator_model,
)
from .scanner import NM_IMAGE_STORAGE, Injection, nm_image_pixel, radionuclide_code

__all__ = [
    "EnergyWindow",
    "ProjectionSet",
    "dicom_angle_deg",
    "mu_map",
    "projector_angle_deg",
    "read_projections",
    "reconstruct",
    "reconstruction_method",
    "write_projections",
]


def projector_angle_deg(dicom_deg: float) -> float:
    """The projector's angle θ (:mod:`voxeldose.recon`, PyTomography) of a DICOM detector angle φ: θ = φ + 180°."""
    return (float(dicom_deg) + 180.0) % 360.0


def dicom_angle_deg(projector_deg: float) -> float:
    """The DICOM detector angle φ (PS3.3 C.8.4.11 Start Angle) of a projector angle θ: φ = θ − 180°."""
    return (float(projector_deg) - 180.0) % 360.0


@dataclass(frozen=True)
class EnergyWindow:
    """An acquisition energy window (keV), as the Energy Window Information Sequence names it."""

    name: str
    lower_kev: float
    upper_kev: float


@dataclass(frozen=True)
class ProjectionSet:
    """One SPECT acquisition's photopeak projections and what reconstruction needs (see the module docstring).

    ``counts``: ``[view, slice, bin]`` (counts per view, non-negative integers as a camera records them).
    ``angles_deg``: the projector's angle θ of each view (:func:`projector_angle_deg` of the header's angles).
    ``radius_mm``: distance of the collimator face from the rotation axis per view (RadialPosition).
    ``frame_duration_s``: time per view.  ``bin_mm`` / ``slice_mm``: the pixel spacing across / along the axis.
    ``detectors``: heads; views are ``detectors`` equal blocks in frame order, each head's views ``angular_step_deg``
    apart in ``rotation_direction``.  ``image_position_mm``: LPS centre of the reconstruction grid's first voxel of
    its top slice.  ``window``: the photopeak window the counts are.  ``collimator``: CollimatorGridName.
    """

    counts: NDArray[Any]
    angles_deg: tuple[float, ...]
    radius_mm: tuple[float, ...]
    frame_duration_s: float
    bin_mm: float
    slice_mm: float
    window: EnergyWindow
    collimator: str
    acquisition_start: datetime
    frame_of_reference_uid: str
    image_position_mm: tuple[float, float, float]
    detectors: int = 2
    rotation_direction: Literal["CW", "CC"] = "CC"
    identity: CameraIdentity | None = None
    injection: Injection | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def views(self) -> int:
        return int(self.counts.shape[0])

    @property
    def views_per_detector(self) -> int:
        return self.views // self.detectors

    @property
    def angular_step_deg(self) -> float:
        """The step between a head's successive views (≥ 0)."""
        if self.views_per_detector < 2:
            return 0.0
        return abs(_wrap(self.angles_deg[1] - self.angles_deg[0]))

    @property
    def acquisition_duration_s(self) -> float:
        """Elapsed time of the acquisition: one head's views × frame duration."""
        return self.views_per_detector * self.frame_duration_s

    def grid(self) -> Grid:
        """The reconstruction grid (``bins × bins`` transverse, one slice per row; axes along LPS, ``k`` to the
        head) in this acquisition's Frame of Reference."""
        nz, nb = int(self.counts.shape[1]), int(self.counts.shape[2])
        x0, y0, z_top = self.image_position_mm
        origin = (x0, y0, z_top - (nz - 1) * self.slice_mm)
        return Grid.axial((nz, nb, nb), (self.bin_mm, self.bin_mm, self.slice_mm), origin, self.frame_of_reference_uid)


def _wrap(deg: float) -> float:
    """An angle difference folded into (−180°, 180°]."""
    d = (float(deg) + 180.0) % 360.0 - 180.0
    return 180.0 if d == -180.0 else d


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _check_for_writing(ps: ProjectionSet, series: SeriesInfo) -> NDArray[np.uint16]:
    c = np.asarray(ps.counts)
    if c.ndim != 3 or 0 in c.shape:
        raise ValueError(f"counts must be [view, slice, bin], got shape {c.shape}")
    n = c.shape[0]
    if ps.detectors < 1 or n % ps.detectors:
        raise ValueError(f"{n} views do not split into {ps.detectors} detectors")
    if len(ps.angles_deg) != n or len(ps.radius_mm) != n:
        raise ValueError(f"one angle and one radius per view needed: {n} views")
    if not np.all(np.isfinite(c)) or (c.size and c.min() < 0):
        raise ValueError("counts must be finite and non-negative")
    rounded = np.rint(c)
    if not np.array_equal(rounded, c):
        raise ValueError("counts must be integers (a camera counts photons)")
    if c.size and rounded.max() > 65535:
        raise ValueError(f"counts up to {rounded.max():.0f} do not fit uint16 (max 65535)")
    if ps.frame_duration_s <= 0 or ps.bin_mm <= 0 or ps.slice_mm <= 0:
        raise ValueError("frame duration and pixel spacings must be positive")
    if not 0 < ps.window.lower_kev < ps.window.upper_kev:
        raise ValueError(f"energy window must satisfy 0 < lower < upper keV, got {ps.window}")
    if ps.image_position_mm[1] == 0.0:
        raise ValueError("a grid whose first voxel lies at y = 0 would be misplaced by PyTomography's reader")
    if ps.frame_of_reference_uid != series.frame_of_reference_uid:
        raise ValueError("the projection set and the series name different Frames of Reference")
    if ps.acquisition_start != series.acquisition_datetime:
        raise ValueError("the projection set and the series give different acquisition starts")
    m = ps.views_per_detector
    sign = 1.0 if ps.rotation_direction == "CC" else -1.0
    step = ps.angular_step_deg
    for d in range(ps.detectors):
        for a in range(m):
            want = ps.angles_deg[d * m] + sign * step * a
            if abs(_wrap(ps.angles_deg[d * m + a] - want)) > 1e-3:
                raise ValueError(
                    f"detector {d + 1}'s views are not {step:g}° apart in the {ps.rotation_direction} direction"
                )
    out: NDArray[np.uint16] = rounded.astype("<u2")
    return out


def write_projections(
    path: str | Path,
    ps: ProjectionSet,
    *,
    ctx: PatientStudy,
    series: SeriesInfo,
    sop_instance_uid: str | None = None,
    body_part_examined: str | None = None,
) -> Dataset:
    """Write ``ps`` as one NM Image Storage object (``ORIGINAL\\PRIMARY\\TOMO\\EMISSION``; see the module
    docstring for the frame order, sequences and geometry) and return the dataset.

    ``ctx`` and ``series`` as for :func:`voxeldose.scanner.write_nm_tomo`; the series' Frame of Reference and
    acquisition start must be the projection set's.  ``ps.injection`` fills the Radiopharmaceutical Information
    Sequence (required); ``ps.identity``, when given, the Manufacturer, model and serial number.  Counts must be
    non-negative integers that fit uint16 (``ValueError`` otherwise, and for views that are not equally spaced
    per head).  Only head-first supine is written (the projector's axes are the patient's).
    """
    stored = _check_for_writing(ps, series)
    if ps.injection is None or ps.injection.activity_bq <= 0:
        raise ValueError("the projection set needs its injection (Radiopharmaceutical Information Sequence)")
    n, nz, nb = stored.shape
    m = ps.views_per_detector
    ds = base_dataset(
        ctx,
        series,
        modality="NM",
        sop_class_uid=NM_IMAGE_STORAGE,
        sop_instance_uid=sop_instance_uid or pydicom.uid.generate_uid(),
        instance_number=1,
    )
    if ps.identity is not None:
        ds.Manufacturer = ps.identity.manufacturer
        ds.ManufacturerModelName = ps.identity.model
        if ps.identity.device_serial_number:
            ds.DeviceSerialNumber = ps.identity.device_serial_number
    acq = ps.acquisition_start
    if body_part_examined:  # e.g. "ABDOMEN"; Laterality (Type 2C) is then absent, as for an unpaired part
        ds.BodyPartExamined = body_part_examined
    else:
        ds.Laterality = None
    ds.FrameOfReferenceUID = ps.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionDate = format_da(acq)
    ds.AcquisitionTime = format_tm(acq)
    ds.AcquisitionDateTime = format_dt(acq)
    ds.ContentDate = format_da(acq)
    ds.ContentTime = format_tm(acq)
    ds.PatientOrientation = ""  # Type 2: projections at many angles have no single orientation
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    ds.AcquisitionContextSequence = DicomSequence([])
    # NM/PET Patient Orientation C.8.4.6 (HFS)
    orient_item = code_item(codes.SCT.Recumbent)
    orient_item.PatientOrientationModifierCodeSequence = DicomSequence([code_item(codes.SCT.Supine)])
    ds.PatientOrientationCodeSequence = DicomSequence([orient_item])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([code_item(codes.SCT.Headfirst)])
    # Image Pixel C.7.6.3 / NM Image Pixel C.8.4.7: rows are slices (head at the top), columns bins
    nm_image_pixel(ds, nz, nb, ps.slice_mm, ps.bin_mm)
    # Multi-frame C.7.6.6 / NM Multi-frame C.8.4.8
    ds.NumberOfFrames = n
    ds.FrameIncrementPointer = [
        pydicom.tag.Tag(0x0054, 0x0010),  # EnergyWindowVector
        pydicom.tag.Tag(0x0054, 0x0020),  # DetectorVector
        pydicom.tag.Tag(0x0054, 0x0050),  # RotationVector
        pydicom.tag.Tag(0x0054, 0x0090),  # AngularViewVector
    ]
    ds.EnergyWindowVector = [1] * n
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [d + 1 for d in range(ps.detectors) for _ in range(m)]
    ds.NumberOfDetectors = ps.detectors
    ds.RotationVector = [1] * n
    ds.NumberOfRotations = 1
    ds.AngularViewVector = [a + 1 for _ in range(ps.detectors) for a in range(m)]
    # NM Image C.8.4.9
    ds.CountsAccumulated = int(stored.sum(dtype=np.int64))
    # NM Isotope C.8.4.10
    rng = Dataset()
    rng.EnergyWindowLowerLimit = format_ds(ps.window.lower_kev, 3)
    rng.EnergyWindowUpperLimit = format_ds(ps.window.upper_kev, 3)
    window = Dataset()
    window.EnergyWindowRangeSequence = DicomSequence([rng])
    window.EnergyWindowName = ps.window.name
    ds.EnergyWindowInformationSequence = DicomSequence([window])
    inj = ps.injection
    rp = Dataset()
    rp.Radiopharmaceutical = inj.radiopharmaceutical
    rp.RadiopharmaceuticalStartTime = format_tm(inj.start)
    rp.RadiopharmaceuticalStartDateTime = format_dt(inj.start)  # PET field; dciodvfy warns only
    rp.RadionuclideTotalDose = format_ds(inj.activity_bq / 1e6, 6)  # MBq in NM
    rp.RadionuclideCodeSequence = DicomSequence([code_item(radionuclide_code(inj.radionuclide))])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([rp])
    # NM Detector C.8.4.11: one item per head
    detectors = []
    for d in range(ps.detectors):
        det = Dataset()
        det.CollimatorGridName = ps.collimator
        det.CollimatorType = "PARA"
        det.FieldOfViewShape = "RECTANGLE"
        det.FieldOfViewDimensions = [round(nb * ps.bin_mm), round(nz * ps.slice_mm)]
        det.FocalDistance = None
        det.StartAngle = format_ds(dicom_angle_deg(ps.angles_deg[d * m]), 4)
        det.RadialPosition = format_ds_list(ps.radius_mm[d * m : (d + 1) * m], 3)
        det.ImagePositionPatient = format_ds_list(ps.image_position_mm)
        det.ImageOrientationPatient = format_ds_list([1, 0, 0, 0, 1, 0])
        detectors.append(det)
    ds.DetectorInformationSequence = DicomSequence(detectors)
    # NM TOMO Acquisition C.8.4.12: one rotation
    rot = Dataset()
    rot.StartAngle = format_ds(dicom_angle_deg(ps.angles_deg[0]), 4)
    rot.AngularStep = format_ds(ps.angular_step_deg, 4)
    rot.RotationDirection = ps.rotation_direction
    rot.ScanArc = format_ds(ps.angular_step_deg * m, 4)
    rot.ActualFrameDuration = round(ps.frame_duration_s * 1000.0)
    rot.NumberOfFramesInRotation = m
    rot.TableHeight = None
    rot.TableTraverse = None
    ds.RotationInformationSequence = DicomSequence([rot])
    # frames: detector-major, each frame's rows from head to feet
    ds.PixelData = np.ascontiguousarray(stored[:, ::-1, :]).tobytes()
    save_part10(ds, path)
    return ds


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _ensure(value: Any, path: Path, keyword: str, expected: str, *, within: str = "") -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise VoxeldoseError(
            f"the projections lack {keyword}", path=path, tag=within + tag_label(keyword), expected=expected
        )
    return value


def _number(value: Any, path: Path, tag: str, expected: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise VoxeldoseError("not a number", path=path, tag=tag, expected=expected, found=value) from None
    if not math.isfinite(x):
        raise VoxeldoseError("not a finite number", path=path, tag=tag, expected=expected, found=value)
    return x


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _photopeak(ds: Dataset, path: Path) -> tuple[int, EnergyWindow]:
    """Index (0-based) and limits of the window that holds 208 keV."""
    seq_tag = tag_label("EnergyWindowInformationSequence")
    windows = ds.get("EnergyWindowInformationSequence") or []
    found: list[tuple[float, float]] = []
    for w, item in enumerate(windows):
        ranges = item.get("EnergyWindowRangeSequence") or []
        if not len(ranges):
            continue
        lo, hi = ranges[0].get("EnergyWindowLowerLimit"), ranges[0].get("EnergyWindowUpperLimit")
        limits_tag = f"{seq_tag} > {tag_label('EnergyWindowLowerLimit')} / {tag_label('EnergyWindowUpperLimit')}"
        lo_f = _number(lo, path, limits_tag, "keV")
        hi_f = _number(hi, path, limits_tag, "keV")
        found.append((lo_f, hi_f))
        if lo_f < LU177_PHOTOPEAK_KEV < hi_f:
            return w, EnergyWindow(str(item.get("EnergyWindowName") or f"window {w + 1}"), lo_f, hi_f)
    raise VoxeldoseError(
        "the projections have no 177Lu photopeak window",
        path=path,
        tag=seq_tag,
        expected=f"an energy window with limits around {LU177_PHOTOPEAK_KEV:g} keV",
        found=found or None,
    )


def _require_head_first_supine(ds: Dataset, path: Path) -> None:
    """Refuse a patient position other than head-first supine (PatientPosition, or the NM/PET Patient
    Orientation codes, C.8.4.6): the projector's axes are the patient's only then."""
    position = str(ds.get("PatientPosition") or "").strip().upper()
    if position and position != "HFS":
        raise VoxeldoseError(
            "only head-first supine acquisitions can be reconstructed",
            path=path,
            tag=tag_label("PatientPosition"),
            expected="HFS",
            found=position,
        )
    stated: list[tuple[str, str]] = []
    for orient in ds.get("PatientOrientationCodeSequence") or []:
        for mod in orient.get("PatientOrientationModifierCodeSequence") or []:
            stated.append((tag_label("PatientOrientationModifierCodeSequence"), str(mod.get("CodeValue", ""))))
    for gantry in ds.get("PatientGantryRelationshipCodeSequence") or []:
        stated.append((tag_label("PatientGantryRelationshipCodeSequence"), str(gantry.get("CodeValue", ""))))
    for tag, code in stated:
        if code in (codes.SCT.Prone.value, codes.SCT.FeetFirst.value):
            raise VoxeldoseError(
                "only head-first supine acquisitions can be reconstructed",
                path=path,
                tag=tag,
                expected=f"SCT {codes.SCT.Supine.value} supine, SCT {codes.SCT.Headfirst.value} headfirst",
                found=f"SCT {code}",
            )


def read_projections(path: str | Path, *, collimator: str | None = None) -> ProjectionSet:
    """Read an NM TOMO projection object (ours or a camera's) into a :class:`ProjectionSet`.

    The photopeak window is the one whose limits hold 208 keV; only its frames are read.  ``collimator``
    overrides the header's CollimatorGridName (which must otherwise be a code of
    :data:`voxeldose.recon.COLLIMATORS`).  Refused, naming the file and tag: not TOMO, no photopeak window, a
    collimator without a model, missing frame duration or radial positions, angles that are not one rotation of
    equally spaced, distinct views, frame vectors that do not match the frames, several rotations, a patient
    position other than head-first supine.
    """
    p = Path(path)
    try:
        ds = pydicom.dcmread(p)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise VoxeldoseError(f"cannot read the projections: {exc.__class__.__name__}", path=p) from None
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if str(ds.get("SOPClassUID", "")) != NM_IMAGE_STORAGE or len(image_type) < 3 or image_type[2] != "TOMO":
        raise VoxeldoseError(
            "not SPECT projections",
            path=p,
            tag=tag_label("ImageType"),
            expected="an NM Image object with ImageType ORIGINAL\\PRIMARY\\TOMO",
            found="\\".join(image_type) or None,
        )
    _require_head_first_supine(ds, p)
    w_index, window = _photopeak(ds, p)

    n_frames = int(_ensure(ds.get("NumberOfFrames"), p, "NumberOfFrames", "the number of frames"))
    vectors: dict[str, NDArray[np.int64]] = {}
    for keyword in ("EnergyWindowVector", "DetectorVector", "RotationVector", "AngularViewVector"):
        raw = ds.get(keyword)
        if raw is None and keyword in ("EnergyWindowVector", "RotationVector"):
            vectors[keyword] = np.ones(n_frames, dtype=np.int64)
            continue
        values = np.asarray(_numbers(_ensure(raw, p, keyword, f"{n_frames} frame indices")), dtype=np.int64)
        if values.shape != (n_frames,) or values.min() < 1:
            raise VoxeldoseError(
                "the frame vector does not give every frame's index",
                path=p,
                tag=tag_label(keyword),
                expected=f"{n_frames} indices from 1",
                found=f"{values.size} values",
            )
        vectors[keyword] = values
    if np.unique(vectors["RotationVector"]).size != 1:
        raise VoxeldoseError(
            "projections of several rotations are not supported",
            path=p,
            tag=tag_label("RotationVector"),
            expected="one rotation",
        )

    rotations = _ensure(ds.get("RotationInformationSequence"), p, "RotationInformationSequence", "one item")
    rot = rotations[0]
    rot_tag = tag_label("RotationInformationSequence") + " > "
    m = int(
        _ensure(rot.get("NumberOfFramesInRotation"), p, "NumberOfFramesInRotation", "views per head", within=rot_tag)
    )
    step = _number(
        _ensure(rot.get("AngularStep"), p, "AngularStep", "degrees between views", within=rot_tag),
        p,
        rot_tag + tag_label("AngularStep"),
        "degrees",
    )
    direction = str(_ensure(rot.get("RotationDirection"), p, "RotationDirection", "CW or CC", within=rot_tag))
    if direction not in ("CW", "CC"):
        raise VoxeldoseError(
            "unknown rotation direction",
            path=p,
            tag=rot_tag + tag_label("RotationDirection"),
            expected="CW or CC",
            found=direction,
        )
    duration_ms = rot.get("ActualFrameDuration", ds.get("ActualFrameDuration"))
    duration_ms = _number(
        _ensure(duration_ms, p, "ActualFrameDuration", "the time per view in ms", within=rot_tag),
        p,
        rot_tag + tag_label("ActualFrameDuration"),
        "ms",
    )
    if duration_ms <= 0:
        raise VoxeldoseError(
            "the frame duration is not positive",
            path=p,
            tag=rot_tag + tag_label("ActualFrameDuration"),
            expected="ms > 0",
            found=duration_ms,
        )
    arc = rot.get("ScanArc")
    if (
        arc is not None
        and str(arc).strip()
        and abs(_number(arc, p, rot_tag + "ScanArc", "degrees") - step * m) > 0.5 * step
    ):
        raise VoxeldoseError(
            "inconsistent angles: the scan arc is not the angular step times the views per head",
            path=p,
            tag=f"{rot_tag}{tag_label('ScanArc')} / {tag_label('AngularStep')} / {tag_label('NumberOfFramesInRotation')}",
            expected=f"{step * m:g}°",
            found=float(arc),
        )

    heads = int(_ensure(ds.get("NumberOfDetectors"), p, "NumberOfDetectors", "the number of heads"))
    det_items = _ensure(ds.get("DetectorInformationSequence"), p, "DetectorInformationSequence", f"{heads} items")
    det_tag = tag_label("DetectorInformationSequence") + " > "
    if len(det_items) < heads:
        raise VoxeldoseError(
            "fewer detector items than heads",
            path=p,
            tag=tag_label("DetectorInformationSequence"),
            expected=f"{heads} items",
            found=len(det_items),
        )
    names = {str(item.get("CollimatorGridName") or "").strip() for item in det_items[:heads]}
    coll = collimator if collimator is not None else (names.pop() if len(names) == 1 else "")
    if coll.upper() not in COLLIMATORS:
        raise VoxeldoseError(
            "no resolution model for this collimator; name one of the table (--collimator)",
            path=p,
            tag=det_tag + tag_label("CollimatorGridName"),
            expected=", ".join(COLLIMATORS),
            found=coll or None,
        )

    # each selected frame's angle and radius
    keep = np.nonzero(vectors["EnergyWindowVector"] == w_index + 1)[0]
    sign = 1.0 if direction == "CC" else -1.0
    angles: list[float] = []
    radii: list[float] = []
    for f in keep:
        d, a = int(vectors["DetectorVector"][f]), int(vectors["AngularViewVector"][f])
        if d > heads or a > m:
            raise VoxeldoseError(
                "inconsistent angles: a frame's detector or view index is out of range",
                path=p,
                tag=f"{tag_label('DetectorVector')} / {tag_label('AngularViewVector')}",
                expected=f"detectors 1..{heads}, views 1..{m}",
                found=(d, a),
            )
        item = det_items[d - 1]
        start = item.get("StartAngle", rot.get("StartAngle"))
        start_f = _number(
            _ensure(start, p, "StartAngle", "the head's start angle", within=det_tag), p, det_tag + "StartAngle", "deg"
        )
        r = item.get("RadialPosition", rot.get("RadialPosition"))
        r_values = _numbers(_ensure(r, p, "RadialPosition", f"{m} radii (mm) per head", within=det_tag))
        if len(r_values) not in (1, m):
            raise VoxeldoseError(
                "not one radial position per view",
                path=p,
                tag=det_tag + tag_label("RadialPosition"),
                expected=f"1 or {m} values",
                found=len(r_values),
            )
        angles.append(projector_angle_deg(start_f + sign * step * (a - 1)))
        radii.append(_number(r_values[a - 1 if len(r_values) == m else 0], p, det_tag + "RadialPosition", "mm"))
    if len(keep) != heads * m:
        raise VoxeldoseError(
            "inconsistent angles: the photopeak frames are not every head's views",
            path=p,
            tag=tag_label("NumberOfFrames"),
            expected=f"{heads} heads × {m} views",
            found=len(keep),
        )
    order = sorted(
        range(len(keep)),
        key=lambda i: (int(vectors["DetectorVector"][keep[i]]), int(vectors["AngularViewVector"][keep[i]])),
    )
    seen = sorted(a for a in angles)
    gaps = [seen[i + 1] - seen[i] for i in range(len(seen) - 1)]
    if gaps and min(gaps) < 0.1 * max(step, 1e-6):
        raise VoxeldoseError(
            "inconsistent angles: two views at the same angle (do the heads' start angles overlap?)",
            path=p,
            tag=f"{det_tag}{tag_label('StartAngle')} / {rot_tag}{tag_label('AngularStep')}",
            expected="distinct view angles",
            found=[round(dicom_angle_deg(a), 3) for a in seen[:2]],
        )
    if any(abs(r) <= 0 for r in radii):
        raise VoxeldoseError(
            "a radial position is not positive", path=p, tag=det_tag + tag_label("RadialPosition"), expected="mm > 0"
        )

    spacing = [
        _number(v, p, tag_label("PixelSpacing"), "mm")
        for v in _numbers(_ensure(ds.get("PixelSpacing"), p, "PixelSpacing", "row and column spacing, mm"))
    ]
    if len(spacing) != 2 or min(spacing) <= 0:
        raise VoxeldoseError(
            "unusable pixel spacing", path=p, tag=tag_label("PixelSpacing"), expected="two positive mm", found=spacing
        )
    ipp = [
        _number(v, p, det_tag + tag_label("ImagePositionPatient"), "mm")
        for v in _numbers(
            _ensure(det_items[0].get("ImagePositionPatient"), p, "ImagePositionPatient", "x, y, z (mm)", within=det_tag)
        )
    ]
    if len(ipp) != 3:
        raise VoxeldoseError(
            "not three coordinates", path=p, tag=det_tag + tag_label("ImagePositionPatient"), expected="x, y, z"
        )
    for_uid = str(_ensure(ds.get("FrameOfReferenceUID"), p, "FrameOfReferenceUID", "the SPECT/CT's Frame of Reference"))
    start_dt, _ = acquisition_datetime(ds, p)
    injection = None
    if ds.get("RadiopharmaceuticalInformationSequence"):
        info = injection_from_header(ds, p)
        injection = Injection(info.nuclide, info.activity_bq, info.start, info.radiopharmaceutical or "")

    frames = ds.pixel_array.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    counts = frames[keep][order][:, ::-1, :].astype(np.float32)
    return ProjectionSet(
        counts=counts,
        angles_deg=tuple(angles[i] for i in order),
        radius_mm=tuple(radii[i] for i in order),
        frame_duration_s=duration_ms / 1000.0,
        bin_mm=spacing[1],
        slice_mm=spacing[0],
        window=window,
        collimator=coll.upper(),
        acquisition_start=start_dt,
        frame_of_reference_uid=for_uid,
        image_position_mm=(ipp[0], ipp[1], ipp[2]),
        detectors=heads,
        rotation_direction="CC" if direction == "CC" else "CW",
        identity=identity_from_dataset(ds, p),
        injection=injection,
        source=str(p),
    )


# --------------------------------------------------------------------------------------------
# Reconstruction: attenuation from the CT, OSEM (voxeldose.recon, PyTomography)
# --------------------------------------------------------------------------------------------


def reconstruction_method(collimator: str, iterations: int, subsets: int) -> str:
    """How a reconstruction was made, as vendors state it: ``OSEM 4i8s AC RR SY-ME`` (iterations × subsets,
    attenuation correction from the CT, resolution recovery for the collimator; no scatter correction)."""
    return f"OSEM {iterations}i{subsets}s AC RR {collimator}"


def mu_map(ct: Volume, grid: Grid, energy_keV: float = LU177_PHOTOPEAK_KEV) -> NDArray[np.float32]:
    """μ (1/cm) at ``energy_keV`` on ``grid``: the CT (HU) resampled trilinearly onto it (air outside the CT), then
    the bilinear HU → μ model (:func:`voxeldose.recon.hu_to_mu_per_cm`).  ``VoxeldoseError`` when the CT is in
    another Frame of Reference (the SPECT/CT's shared frame is what places the CT under the projections)."""
    if ct.frame_of_reference_uid != grid.frame_of_reference_uid:
        raise VoxeldoseError(
            "the CT is not in the projections' Frame of Reference",
            tag=tag_label("FrameOfReferenceUID"),
            expected=str(grid.frame_of_reference_uid),
            found=ct.frame_of_reference_uid,
        )
    hu = resample(ct.with_array(np.asarray(ct.array, dtype=np.float32)), grid, order=1, fill=-1000.0).array
    return hu_to_mu_per_cm(np.asarray(hu), energy_keV)


def reconstruct(ps: ProjectionSet, ct: Volume, iterations: int, subsets: int) -> Volume:
    """OSEM reconstruction of ``ps`` (attenuation from ``ct``, the collimator's distance-dependent resolution) on
    :meth:`ProjectionSet.grid`, in **reconstructed counts** (float32; needs the ``recon`` extra).

    Units: a voxel's reconstructed counts ``C`` are OSEM's estimate of the counts per view that the voxel's
    activity sends to one head in air, times the number of views.  So ``A [MBq] = C / (T_acq × S)`` with
    ``T_acq`` = views per head × frame duration (:attr:`ProjectionSet.acquisition_duration_s`) and ``S`` the
    volume sensitivity = heads × one head's planar sensitivity (cps/MBq, photopeak, point source in air): the
    calibration factor of the reconstructed counts, the same as a vendor's reconstruction takes
    (:class:`voxeldose.scanner.SpectAcquisition`).  The synthetic patient's ``calibration_cps_per_mbq`` is this
    ``S``: each of its two heads detects half of it.  The activity is that at the acquisition start times the
    decay during the acquisition (not decay-corrected).  No scatter correction.
    """
    grid = ps.grid()
    mu = mu_map(ct, grid)
    camera = Camera(collimator_model(ps.collimator), sensitivity_cps_per_mbq=1.0)
    orbit = Orbit(ps.angles_deg, ps.radius_mm, ps.frame_duration_s)
    spacing = (ps.slice_mm, ps.bin_mm, ps.bin_mm)
    bq_ml = reconstruct_osem(ps.counts, mu, spacing, orbit, camera, iterations, subsets)
    # Bq/ml at 1 cps/MBq → counts per view per voxel (one head, in air) → × views
    per_view = (
        np.maximum(bq_ml, 0.0) * grid.voxel_volume_ml * 1e-6 * camera.sensitivity_cps_per_mbq * ps.frame_duration_s
    )
    counts = (per_view * ps.views).astype(np.float32)
    return Volume(counts, grid.affine, grid.frame_of_reference_uid, "counts")
