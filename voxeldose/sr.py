"""Objects for the PACS: a SEG of the VOIs of a run on the reference CT, and a DICOM SR
measurement report (TID 1500, Comprehensive 3D SR) with the per-VOI dose metrics of ``summary.json``.

SEG
---
The VOIs of a run live on the dose (SPECT) grid; a SEG needs source images, so the VOI series the
run used (``summary.methods.voi_source``, an RTSTRUCT or SEG of ``result.cycle.vois``) is
re-rasterised onto the reference CT grid with :func:`voxeldose.voi.load_vois` (occupancy ≥ 0.5),
and written by :func:`voxeldose.dicom_writers.write_seg` referencing the reference CT slices.
Segment ``n`` = the ``n``-th VOI of ``result.vois`` that is non-empty on the CT grid.

SR (TID 1500 "Measurement Report", highdicom)
--------------------------------------------
* Observer: device "voxeldose" (TID 1004), UID derived from the name; the software version is
  in Software Versions (0018,1020) and in each group's Algorithm Identification (TID 4019).
* Procedure reported: SCT 371572003 "Nuclear medicine procedure" plus the private
  ``99VOXELDOSE RPTDOSIMETRY`` "Radiopharmaceutical therapy dosimetry".
* One TID 1411 volumetric group per VOI: tracking identifier = ROI name (plus a UID), the SEG
  segment referenced (Referenced Segment + Source series for segmentation = CT series),
  finding category/type = the segment's codes.
* Measurements (TID 1419): see :data:`MEASUREMENTS`.  Standard codes are taken from pydicom's copy
  of PS3.16 (DCM 128513 "Absorbed Dose", SCT 373098007 "Mean", SCT 56851009 "Maximum",
  SCT 118565006 "Volume", SCT 118538004 "Mass", UCUM "Gy", "cm3").  Quantities without a
  standard code (D2/D50/D98 as derivations, dose per activity, BED, EQD2) use the private
  coding scheme ``99VOXELDOSE``; its meanings say exactly what they are.
* Partial-volume correction (``summary.methods.pvc``, summary /3): following TID 1500's conventions
  (PS3.16 TID 1419 row "Measurement Method", TID 300 row 2 "Measurement Method" (SCT 370129005) as a
  HAS CONCEPT MOD of a measurement), two measurements of the same concept — mean absorbed dose — are told apart
  by their method: the corrected mean (the VOI's ``mean_gy``) carries :data:`PVC_METHODS` ``[method]``, the
  uncorrected mean (``pvc.uncorrected_mean_gy``) beside it :data:`UNCORRECTED`.  The figures derived from the
  corrected mean (dose per activity, BED, EQD2) carry the method too, and with ``rbv`` (a corrected dose map)
  also max and D-values; with ``rc``/``gtm`` those come from the uncorrected map and carry no method.  Each
  corrected VOI's group also has a qualitative evaluation (TID 1419 row "Qualitative Evaluations")
  :data:`PVC_CONCEPT` = the method.  No standard code for partial-volume correction exists in PS3.16 (checked
  against pydicom's copy), hence private codes.  The corrected group's Algorithm Identification (TID 4019) states
  the correction's parameters as Algorithm Parameters (DCM 111002): the method, the camera profile whose resolution
  or recovery curve it used and that resolution (:func:`pvc_algorithm_parameters`), so that the PACS copy names the
  camera profile the doses depend on.  Without a correction the SR is as before.
* Measurement uncertainty (``VoiMetrics.uncertainty``, issue 13): each dose with a stated standard uncertainty u
  — the mean absorbed dose, BED and EQD2 — carries TID 310 "Measurement Properties" (HAS PROPERTIES, row
  "Measurement Uncertainty", the concepts of CID 225 "Measurement Uncertainty Concept"): SCT 371886008
  "+, range of upper measurement uncertainty" and SCT 371885007 "-, range of lower measurement uncertainty",
  each the expanded uncertainty U = k·u (k = 2, ≈ 95 %, GUM JCGM 100:2008 §6) in the measurement's unit (Gy),
  as highdicom's :class:`highdicom.sr.MeasurementProperties` writes them but with the dose's unit rather than
  "no units" (a ± range of a dose is a dose); beside them the standard uncertainty u itself,
  :data:`STANDARD_UNCERTAINTY` (private: PS3.16 has no concept for a GUM standard uncertainty of a single
  measurement — CID 226/227's "Standard Deviation" describe a reference population, TID 311), so a reader has
  k = U/u.  A dose without a stated u gets no uncertainty items (never invented).  :func:`sr_uncertainty` reads
  them back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from .dicom_writers import segment_codes, write_seg
from .dicomutil import PatientStudy, SeriesInfo, save_part10, software_version
from .errors import VoxeldoseError
from .geometry import Volume, resample
from .ingest import Series, ct_geometry
from .result import Result
from .summary import PvcRecord, VoiMetrics
from .voi import load_vois

__all__ = [
    "MEASUREMENTS",
    "PRIVATE_SCHEME",
    "PROCEDURE_CODES",
    "PVC_CONCEPT",
    "PVC_METHODS",
    "SR_SERIES_DESCRIPTION",
    "STANDARD_UNCERTAINTY",
    "UNCERTAIN_FIELDS",
    "UNCORRECTED",
    "build_measurement_report",
    "pvc_algorithm_parameters",
    "reference_ct_datasets",
    "vois_on_ct",
    "write_dose_sr",
    "write_voi_seg",
]

PRIVATE_SCHEME = "99VOXELDOSE"
SR_SERIES_DESCRIPTION = "voxeldose dose report (SR)"

ABSORBED_DOSE = Code("128513", "DCM", "Absorbed Dose")  # CID 218/7469 (PS3.16)
MEAN = Code("373098007", "SCT", "Mean")  # CID 7464 derivation
MAXIMUM = Code("56851009", "SCT", "Maximum")  # CID 7464 derivation
VOLUME = Code("118565006", "SCT", "Volume")  # CID 7469
MASS = Code("118538004", "SCT", "Mass")

GY = Code("Gy", "UCUM", "Gy")
CM3 = Code("cm3", "UCUM", "cubic centimeter")  # 1 cm3 = 1 ml
GRAM = Code("g", "UCUM", "gram")
GY_PER_GBQ = Code("Gy/GBq", "UCUM", "Gy/GBq")

D2 = Code("D2%", PRIVATE_SCHEME, "D2%: minimum absorbed dose to the hottest 2% of the volume")
D50 = Code("D50%", PRIVATE_SCHEME, "D50%: minimum absorbed dose to the hottest 50% of the volume")
D98 = Code("D98%", PRIVATE_SCHEME, "D98%: minimum absorbed dose to the hottest 98% of the volume")
DOSE_PER_ACTIVITY = Code("GYPERGBQ", PRIVATE_SCHEME, "Mean absorbed dose per administered activity")
BED = Code("BED", PRIVATE_SCHEME, "Biologically effective dose of the mean absorbed dose")
EQD2 = Code("EQD2", PRIVATE_SCHEME, "Equivalent dose in 2 Gy fractions of the BED")

#: Measurement Method (TID 300) of the partial-volume corrected figures, by ``summary.methods.pvc.method``
#: (rc: :func:`voxeldose.pvc.sphere_recovery` curve; gtm: Rousset et al. 1998; rbv: Thomas et al. 2011).
#: Meanings kept within Code Meaning's 64 characters (LO).
PVC_METHODS: dict[str, Code] = {
    "rc": Code("PVC-RC", PRIVATE_SCHEME, "Partial-volume corrected: sphere recovery coefficient"),
    "gtm": Code("PVC-GTM", PRIVATE_SCHEME, "Partial-volume corrected: geometric transfer matrix"),
    "rbv": Code("PVC-RBV", PRIVATE_SCHEME, "Partial-volume corrected: region-based voxel-wise (RBV)"),
}
#: Measurement Method of the uncorrected mean dose reported beside a corrected one.
UNCORRECTED = Code("PVC-NONE", PRIVATE_SCHEME, "Without partial-volume correction")
#: Concept name of a corrected VOI's qualitative evaluation; its value is the :data:`PVC_METHODS` code.
PVC_CONCEPT = Code("PVC", PRIVATE_SCHEME, "Partial-volume correction")
#: Summary fields computed from the corrected mean dose (so corrected by every method).
_FROM_CORRECTED_MEAN = frozenset({"mean_gy", "gy_per_gbq", "bed_gy", "eqd2_gy"})
#: Summary fields of the dose map, corrected only where the map is (``rbv``).
_FROM_DOSE_MAP = frozenset({"max_gy", "D2_gy", "D50_gy", "D98_gy"})

#: CID 225 "Measurement Uncertainty Concept" (PS3.16), as TID 310 uses them (and highdicom writes them).
UPPER_UNCERTAINTY = Code("371886008", "SCT", "+, range of upper measurement uncertainty")
LOWER_UNCERTAINTY = Code("371885007", "SCT", "-, range of lower measurement uncertainty")
#: The standard uncertainty u (k = 1) beside the ± U range (no standard concept: see the module docstring).
STANDARD_UNCERTAINTY = Code("U-STD", PRIVATE_SCHEME, "Standard uncertainty u (GUM, coverage factor k = 1)")
#: Summary fields whose uncertainty the SR carries -> the :class:`~voxeldose.summary.VoiUncertainty` field.
UNCERTAIN_FIELDS: dict[str, str] = {"mean_gy": "mean_gy", "bed_gy": "bed_gy", "eqd2_gy": "eqd2_gy"}

PROCEDURE_CODES = [
    Code("371572003", "SCT", "Nuclear medicine procedure"),
    Code("RPTDOSIMETRY", PRIVATE_SCHEME, "Radiopharmaceutical therapy dosimetry"),
]

#: :class:`~voxeldose.summary.VoiMetrics` field -> (concept name, unit, derivation or None).
MEASUREMENTS: dict[str, tuple[Code, Code, Code | None]] = {
    "mean_gy": (ABSORBED_DOSE, GY, MEAN),
    "max_gy": (ABSORBED_DOSE, GY, MAXIMUM),
    "D2_gy": (ABSORBED_DOSE, GY, D2),
    "D50_gy": (ABSORBED_DOSE, GY, D50),
    "D98_gy": (ABSORBED_DOSE, GY, D98),
    "volume_ml": (VOLUME, CM3, None),
    "mass_g": (MASS, GRAM, None),
    "gy_per_gbq": (DOSE_PER_ACTIVITY, GY_PER_GBQ, None),
    "bed_gy": (BED, GY, None),
    "eqd2_gy": (EQD2, GY, None),
}


def reference_ct_datasets(result: Result) -> list[pydicom.Dataset]:
    """The reference CT slices (full datasets, pixel data included) in slice order ``k`` of ``result.ct``."""
    series = result.reference.ct
    if series is None or result.ct is None:
        raise VoxeldoseError(
            "the run has no reference CT: a SEG of the VOIs needs CT source images",
            tag="CT series",
            expected="a CT with the reference SPECT",
        )
    geo = ct_geometry(series)
    return [pydicom.dcmread(series.instances[i].path) for i in geo.order]


def _voi_series(result: Result) -> Series | None:
    src = result.summary.methods.voi_source
    for s in result.cycle.vois:
        if s.series_instance_uid and s.series_instance_uid in src:
            return s
    return None


def vois_on_ct(result: Result) -> dict[str, np.ndarray]:
    """Boolean masks ``[k, j, i]`` of the run's VOIs on the reference CT grid (empty ones left out).

    The VOI series the run used is re-rasterised onto the CT grid; where it cannot be found, each
    dose-grid VOI is resampled (nearest neighbour of its occupancy, ≥ 0.5; coarse: the dose voxels).
    A VOI empty on the CT grid gets no segment, and so no measurement group in the SR."""
    if result.ct is None:
        raise VoxeldoseError("the run has no reference CT: no VOIs on a CT grid", tag="CT series")
    ct_grid = result.ct.grid
    names = list(result.vois)
    series = _voi_series(result)
    masks: dict[str, np.ndarray] = {}
    if series is not None:
        spacing = float(np.linalg.norm(np.asarray(result.ct.affine)[:3, 2]))
        on_ct = load_vois(series, ct_grid, names=names, default_slab_mm=spacing)
        for name in names:
            if name in on_ct:
                masks[name] = on_ct[name].mask
    for name in names:
        if name not in masks:
            voi = result.vois[name]
            frac = Volume(
                np.asarray(voi.fraction, dtype=np.float32), voi.grid.affine, result.dose.frame_of_reference_uid
            )
            masks[name] = np.asarray(resample(frac, ct_grid, order=0, fill=0.0).array) >= 0.5
    return {n: m for n, m in masks.items() if m.any()}


def write_voi_seg(
    result: Result, path: Path, *, ctx: PatientStudy, series: SeriesInfo, ct: list[pydicom.Dataset] | None = None
) -> pydicom.Dataset:
    """Write the SEG of the run's VOIs on the reference CT (see the module docstring)."""
    ct = reference_ct_datasets(result) if ct is None else ct
    masks = vois_on_ct(result)
    if not masks:
        raise VoxeldoseError(
            "no VOI of the run overlaps the reference CT: no SEG to write",
            tag="SegmentSequence",
            expected="at least one VOI inside the CT",
        )
    return write_seg(path, masks, ctx=ctx, series=series, referenced_ct=ct)


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _measured(entry: VoiMetrics, field: str) -> float | None:
    """The value of one :data:`MEASUREMENTS` field of a VOI's metrics (every key is a field: see
    tests/test_summary.py)."""
    value = getattr(entry, field)
    return None if value is None else float(value)


def _uncertainty_properties(entry: VoiMetrics, key: str, unit: Code) -> Any:
    """TID 310 Measurement Properties with the dose's measurement uncertainty (± U = k·u, and u; module
    docstring), or ``None`` when the dose has no stated uncertainty."""
    import highdicom as hd  # heavy import, needed only on the PACS path

    budget = entry.uncertainty
    field = UNCERTAIN_FIELDS.get(key)
    if budget is None or field is None:
        return None
    vu = getattr(budget, field)
    u = None if vu is None else _finite(vu.u)
    k = _finite(budget.coverage_factor)
    if u is None or k is None:
        return None
    props = hd.sr.MeasurementProperties()
    for concept, value in ((UPPER_UNCERTAINTY, k * u), (LOWER_UNCERTAINTY, k * u), (STANDARD_UNCERTAINTY, u)):
        props.append(
            hd.sr.NumContentItem(
                name=concept, value=value, unit=unit, relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES
            )
        )
    return props


def pvc_algorithm_parameters(pvc: PvcRecord) -> list[str]:
    """The Algorithm Parameters (TID 4019, DCM 111002) of a partial-volume corrected VOI group: the method, the
    camera profile whose resolution or recovery curve it used, the resolution (FWHM, mm) or the recovery fit."""
    out = [f"partial-volume correction: {pvc.method} ({pvc.description})"]
    if pvc.camera_profile:
        out.append(f"camera profile: {pvc.camera_profile}")
    if pvc.fwhm_mm is not None:
        out.append(f"PSF FWHM: {pvc.fwhm_mm:g} mm")
    if pvc.recovery_curve:
        out.append(f"recovery curve: {pvc.recovery_curve}")
    return out


def build_measurement_report(result: Result, seg: pydicom.Dataset) -> Any:
    """The TID 1500 content (highdicom MeasurementReport) of ``result`` referencing ``seg``'s segments."""
    import highdicom as hd  # heavy import (about a second), needed only on the PACS path

    version = software_version()
    algo = hd.sr.AlgorithmIdentification(name="voxeldose", version=version)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["voxeldose device observer"]),
            name="voxeldose",
            manufacturer_name="voxeldose",
            model_name=f"voxeldose {version}",
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=device)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    number_of = {label: n for n, label in labels.items()}
    ct_series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    pvc_method = result.summary.methods.pvc.method
    pvc_algo = hd.sr.AlgorithmIdentification(
        name="voxeldose", version=version, parameters=pvc_algorithm_parameters(result.summary.methods.pvc)
    )
    corrected_fields = set(_FROM_CORRECTED_MEAN) | (set(_FROM_DOSE_MAP) if pvc_method == "rbv" else set())
    groups = []
    for name, entry in result.summary.vois.items():
        if name not in number_of:
            continue  # not on the CT (no segment to reference)
        ref = hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=number_of[name],
            source_series=hd.sr.SourceSeriesForSegmentation(ct_series_uid),
        )
        corrected = entry.pvc is not None and pvc_method != "none"
        method = PVC_METHODS[pvc_method] if corrected else None
        measurements = []
        for key, (concept, unit, derivation) in MEASUREMENTS.items():
            value = _finite(_measured(entry, key))
            if value is None:
                continue
            measurements.append(
                hd.sr.Measurement(
                    name=concept,
                    value=value,
                    unit=unit,
                    derivation=derivation,
                    method=method if key in corrected_fields else None,
                    algorithm_id=algo,
                    properties=_uncertainty_properties(entry, key, unit),
                )
            )
        evaluations = []
        if corrected and method is not None and entry.pvc is not None:
            uncorrected = _finite(entry.pvc.uncorrected_mean_gy)
            if uncorrected is not None:
                measurements.append(
                    hd.sr.Measurement(
                        name=ABSORBED_DOSE,
                        value=uncorrected,
                        unit=GY,
                        derivation=MEAN,
                        method=UNCORRECTED,
                        algorithm_id=algo,
                    )
                )
            evaluations.append(hd.sr.QualitativeEvaluation(name=PVC_CONCEPT, value=method))
        category, typ = segment_codes(name)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=name),
                referenced_segment=ref,
                finding_category=category,
                finding_type=typ,
                algorithm_id=pvc_algo if corrected else algo,
                measurements=measurements,
                qualitative_evaluations=evaluations or None,
            )
        )
    if not groups:
        raise VoxeldoseError("no VOI of the summary has a segment in the SEG: nothing to report", tag="SegmentSequence")
    return hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=PROCEDURE_CODES, imaging_measurements=groups
    )


def write_dose_sr(result: Result, path: Path, *, seg: pydicom.Dataset, series: SeriesInfo) -> pydicom.Dataset:
    """Write the Comprehensive 3D SR (TID 1500) of ``result``'s per-VOI dose metrics.

    Patient and study are copied by highdicom from the evidence (``seg``, itself of the reference
    CT's patient and study); ``series.frame_of_reference_uid`` is not used (SR has none)."""
    import highdicom as hd  # heavy import (about a second), needed only on the PACS path

    report = build_measurement_report(result, seg)
    when = series.acquisition_datetime
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report,
        series_instance_uid=series.series_instance_uid,
        series_number=int(series.series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="voxeldose",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series.series_description or SR_SERIES_DESCRIPTION,
        software_versions=software_version(),
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="voxeldose private codes",
                responsible_organization="voxeldose",
            )
        ],
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    save_part10(sr, path)
    return sr


def _walk(items: Any) -> Any:
    for it in items or []:
        yield it
        yield from _walk(getattr(it, "ContentSequence", None))


def _modifier(item: pydicom.Dataset, scheme: str, value: str) -> str | None:
    """The code value of ``item``'s concept modifier named (``scheme``, ``value``), if any."""
    for mod in getattr(item, "ContentSequence", None) or []:
        mcn = mod.ConceptNameCodeSequence[0]
        if mcn.CodeValue == value and mcn.CodingSchemeDesignator == scheme and "ConceptCodeSequence" in mod:
            return str(mod.ConceptCodeSequence[0].CodeValue)
    return None


def sr_measurements(sr: pydicom.Dataset) -> dict[str, dict[tuple[str, str, str | None], float]]:
    """Read back: {tracking identifier: {(scheme, code value, derivation code or None): value}}; the uncorrected
    mean beside a partial-volume corrected one (Measurement Method :data:`UNCORRECTED`) is in :func:`sr_pvc`."""
    out: dict[str, dict[tuple[str, str, str | None], float]] = {}
    for item in _walk(sr.ContentSequence):
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if name is None or name.CodeValue != "125007" or name.CodingSchemeDesignator != "DCM":
            continue  # Measurement Group
        tracking = None
        values: dict[tuple[str, str, str | None], float] = {}
        for child in item.ContentSequence:
            cn = child.ConceptNameCodeSequence[0]
            if child.ValueType == "TEXT" and cn.CodeValue == "112039":  # Tracking Identifier
                tracking = str(child.TextValue)
            elif child.ValueType == "NUM":
                mv = child.MeasuredValueSequence[0]
                value = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
                deriv = None
                for mod in getattr(child, "ContentSequence", None) or []:
                    mcn = mod.ConceptNameCodeSequence[0]
                    if mcn.CodeValue == "121401" and mcn.CodingSchemeDesignator == "DCM":
                        deriv = str(mod.ConceptCodeSequence[0].CodeValue)
                if _modifier(child, "SCT", "370129005") == UNCORRECTED.value:
                    continue
                values[(str(cn.CodingSchemeDesignator), str(cn.CodeValue), deriv)] = value
        if tracking is not None:
            out[tracking] = values
    return out


def sr_pvc(sr: pydicom.Dataset) -> dict[str, dict[str, Any]]:
    """Read back the partial-volume correction: {tracking identifier: {"evaluation": the qualitative evaluation's
    code value, "methods": {measurement method code value: [(concept code value, derivation or None, value)]},
    "parameters": the group's Algorithm Parameters (DCM 111002, :func:`pvc_algorithm_parameters`)}} for each group
    whose measurements name a method (Measurement Method, SCT 370129005)."""
    out: dict[str, dict[str, Any]] = {}
    for item in _walk(sr.ContentSequence):
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if name is None or name.CodeValue != "125007" or name.CodingSchemeDesignator != "DCM":
            continue
        tracking, evaluation = None, None
        methods: dict[str, list[tuple[str, str | None, float]]] = {}
        parameters: list[str] = []
        for child in item.ContentSequence:
            cn = child.ConceptNameCodeSequence[0]
            if child.ValueType == "TEXT" and cn.CodeValue == "112039":
                tracking = str(child.TextValue)
            elif child.ValueType == "TEXT" and (cn.CodingSchemeDesignator, cn.CodeValue) == ("DCM", "111002"):
                parameters.append(str(child.TextValue))
            elif child.ValueType == "CODE" and (cn.CodingSchemeDesignator, cn.CodeValue) == (
                PVC_CONCEPT.scheme_designator,
                PVC_CONCEPT.value,
            ):
                evaluation = str(child.ConceptCodeSequence[0].CodeValue)
            elif child.ValueType == "NUM":
                method = _modifier(child, "SCT", "370129005")
                if method is None:
                    continue
                mv = child.MeasuredValueSequence[0]
                value = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
                methods.setdefault(method, []).append((str(cn.CodeValue), _modifier(child, "DCM", "121401"), value))
        if tracking is not None and (methods or evaluation is not None):
            out[tracking] = {"evaluation": evaluation, "methods": methods, "parameters": parameters}
    return out


def sr_uncertainty(sr: pydicom.Dataset) -> dict[str, dict[tuple[str, str, str | None], dict[str, float]]]:
    """Read back the measurement uncertainty: {tracking identifier: {measurement key (as :func:`sr_measurements`):
    {"upper": +U, "lower": −U range, "u": standard u}}} for each measurement carrying TID 310 uncertainty items."""
    wanted = {
        (UPPER_UNCERTAINTY.scheme_designator, UPPER_UNCERTAINTY.value): "upper",
        (LOWER_UNCERTAINTY.scheme_designator, LOWER_UNCERTAINTY.value): "lower",
        (STANDARD_UNCERTAINTY.scheme_designator, STANDARD_UNCERTAINTY.value): "u",
    }
    out: dict[str, dict[tuple[str, str, str | None], dict[str, float]]] = {}
    for item in _walk(sr.ContentSequence):
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if name is None or name.CodeValue != "125007" or name.CodingSchemeDesignator != "DCM":
            continue
        tracking = None
        found: dict[tuple[str, str, str | None], dict[str, float]] = {}
        for child in item.ContentSequence:
            cn = child.ConceptNameCodeSequence[0]
            if child.ValueType == "TEXT" and cn.CodeValue == "112039":
                tracking = str(child.TextValue)
            elif child.ValueType == "NUM" and _modifier(child, "SCT", "370129005") != UNCORRECTED.value:
                props: dict[str, float] = {}
                for mod in getattr(child, "ContentSequence", None) or []:
                    mcn = mod.ConceptNameCodeSequence[0]
                    which = wanted.get((str(mcn.CodingSchemeDesignator), str(mcn.CodeValue)))
                    if which is not None and mod.ValueType == "NUM" and mod.RelationshipType == "HAS PROPERTIES":
                        mv = mod.MeasuredValueSequence[0]
                        props[which] = (
                            float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
                        )
                if props:
                    key = (str(cn.CodingSchemeDesignator), str(cn.CodeValue), _modifier(child, "DCM", "121401"))
                    found[key] = props
        if tracking is not None and found:
            out[tracking] = found
    return out


def measurement_key(summary_key: str) -> tuple[str, str, str | None]:
    """The :func:`sr_measurements` key of a summary metric (``"mean_gy"`` -> ``("DCM", "128513", "373098007")``)."""
    concept, _unit, deriv = MEASUREMENTS[summary_key]
    return (concept.scheme_designator, concept.value, None if deriv is None else deriv.value)


__all__ += ["measurement_key", "sr_measurements", "sr_pvc", "sr_uncertainty"]
