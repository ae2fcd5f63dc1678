"""The product's DICOM writers: RT Dose (with its DVH) and a binary SEG.

What voxeldose writes as results (:mod:`voxeldose.outputs`, :mod:`voxeldose.sr`); the synthetic patient
also writes its SEG with :func:`write_seg`.  The NM, CT and RTSTRUCT a scanner would write for the
synthetic patient are in :mod:`voxeldose.scanner`; shared DICOM helpers in :mod:`voxeldose.dicomutil`.
Every object written here passes dicom3tools' ``dciodvfy`` with no errors (``tests/test_rtdose.py``,
``tests/test_dicom_writers.py``).

Geometry follows :mod:`voxeldose.geometry`: arrays ``[k, j, i]``; the affine maps ``(i, j, k, 1)``
to LPS mm, ``P = IPP + i*Δc*X + j*Δr*Y + k*S``.

References (DICOM PS3.3):

* RT Dose IOD A.18: RT Series C.8.8.1, RT Dose C.8.8.3, RT DVH C.8.8.4, Image Plane C.7.6.2,
  Multi-frame C.7.6.6.
* Segmentation IOD A.51 (written by highdicom): Segmentation Image C.8.20.2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DSfloat

from .dicomutil import (
    MANUFACTURER,
    RT_STRUCTURE_SET_STORAGE,
    PatientStudy,
    SeriesInfo,
    base_dataset,
    check_frame_of_reference,
    format_da,
    format_ds,
    format_ds_list,
    format_tm,
    plane_geometry,
    save_part10,
    software_version,
)
from .geometry import Volume
from .voi import rasterise_rtstruct

__all__ = [
    "DOSE_TYPE_ERROR_NOTE",
    "RTDOSE_SUMMATION_TYPE",
    "RT_DOSE_STORAGE",
    "PatientStudy",
    "SeriesInfo",
    "segment_codes",
    "write_rtdose",
    "write_seg",
]


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


#: Why the dose-uncertainty map is written with DoseType (3004,0004) ``ERROR``.  PS3.3 C.8.8.3 has three
#: Enumerated Values: PHYSICAL (physical dose), EFFECTIVE (after correction for biological effect) and ERROR,
#: defined there as the "difference between desired and planned dose" — no value names an uncertainty.  ERROR is
#: the only one that marks the grid as *not a dose to sum or plan with*, and a standard uncertainty is the
#: expected size of the difference between the computed and the true dose; issue 13 asks for it.  What the values
#: are (k = 1 standard uncertainty in Gy, and its components) is said in the Series Description, Dose Comment and
#: Derivation Description, which a reader must consult: a generic viewer only learns "ERROR".
DOSE_TYPE_ERROR_NOTE = "standard uncertainty (k=1) of the absorbed dose, Gy"


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
    dose_type: Literal["PHYSICAL", "ERROR"] = "PHYSICAL",
) -> pydicom.Dataset:
    """Write a multi-frame RT Dose Storage object (PS3.3 A.18) of ``dose`` (Gy) on its own grid.

    The grid is the SPECT grid in the CT's Frame of Reference (``series.frame_of_reference_uid``);
    it need not be the CT grid.  Modules: Patient, General Study, Patient Study, RT Series
    (C.8.8.1), Frame of Reference, General Equipment, General Image, Image Plane, Image Pixel,
    Multi-frame, RT Dose (C.8.8.3), SOP Common.

    * DoseUnits GY, DoseType ``dose_type`` (``"ERROR"``: the standard uncertainty of a dose, see
      :data:`DOSE_TYPE_ERROR_NOTE`; no DVH then), DoseSummationType :data:`RTDOSE_SUMMATION_TYPE` (see there
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
    check_frame_of_reference(dose, series)
    arr = np.asarray(dose.array, dtype=np.float64)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"dose array must be 3-D [k, j, i] and non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("dose contains NaN or infinite values")
    if str(dose.units) not in ("Gy", "GY", "gy"):
        raise ValueError(f"dose.units must be 'Gy', got {dose.units!r}")
    nk, nj, ni = arr.shape
    x, y, dc, dr, s = plane_geometry(dose.affine)
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
    ds = base_dataset(
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
    ds.ContentDate = format_da(when)
    ds.ContentTime = format_tm(when)
    derivation = "; ".join(t for t in (description, comment if len(comment) > 64 else "") if t)
    if derivation:
        ds.DerivationDescription = derivation[:1024]  # ST
    # Image Plane C.7.6.2
    ds.PixelSpacing = [format_ds(dr), format_ds(dc)]
    ds.ImageOrientationPatient = format_ds_list(np.concatenate([x, y]), 8)
    ds.ImagePositionPatient = format_ds_list(ipp)
    ds.SliceThickness = format_ds(spacing)
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
    if dose_type not in ("PHYSICAL", "ERROR"):
        raise ValueError(f"dose_type must be 'PHYSICAL' or 'ERROR', got {dose_type!r}")
    if dose_type == "ERROR" and referenced_rtstruct is not None:
        raise ValueError("an ERROR (uncertainty) grid carries no DVH: give no referenced_rtstruct")
    ds.DoseType = dose_type
    if comment:
        ds.DoseComment = comment if len(comment) <= 64 else comment[:61] + "..."  # LO: 64 characters
    ds.DoseSummationType = RTDOSE_SUMMATION_TYPE
    ds.GridFrameOffsetVector = format_ds_list(np.arange(nk) * spacing)
    ds.DoseGridScaling = DSfloat(scale, auto_format=True)
    if referenced_rtstruct is not None:
        _rt_dvh(ds, referenced_rtstruct, dose.with_array(arr))
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    save_part10(ds, path)
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
        item.DVHDoseScaling = format_ds(1.0)
        item.DVHVolumeUnits = "CM3"
        item.DVHNumberOfBins = nbins
        w_ds = DSfloat(width, auto_format=True)
        item.DVHData = [v for c in cum for v in (w_ds, format_ds(c, 6))]
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


def segment_codes(name: str) -> tuple[Code, Code]:
    """Segmented property category and type for a mask name (prefix lookup, Organ fallback), PS3.3 C.8.20.2
    (Segmented Property Category Code Sequence, CID 7150; Segmented Property Type Code Sequence, CID 7151)."""
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
    :func:`voxeldose.scanner.write_ct_series`); segment ``n`` (1-based, in the order of ``masks``) is ``masks``'
    ``n``-th entry, SegmentLabel = its name, codes from a prefix table (Tumor* -> Morphologically
    abnormal structure / Neoplasm, organs -> Anatomical structure / organ, fallback Organ).
    Empty frames are omitted.  Segmentation IOD (PS3.3 A.51, C.8.20).
    """
    import highdicom as hd  # heavy (about a second to import): only when a SEG is written

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
            name=algorithm_name, family=algorithm_family, version=software_version()
        )
    descriptions = []
    for number, name in enumerate(masks, start=1):
        cat, typ = segment_codes(name)
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
        software_versions=software_version(),
        device_serial_number="none",
        omit_empty_frames=True,
        series_description=series.series_description,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    save_part10(seg, path)
    return seg
