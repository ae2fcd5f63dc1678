"""The dosimetry pipeline: one entry point, :func:`run`, from DICOM files to doses, metrics and cycles.

    ingest → quantify → register → VOIs → time-activity (VOI fits, voxel TIA) → dose → metrics → cycles

The CLI (``voxeldose run``), the HTTP service and the Ray workers all call :func:`run` with a
:class:`~voxeldose.spec.JobSpec`; :func:`write_outputs` writes ``rtdose.dcm``, ``summary.json`` and
``report.html``.  Each stage is a function here that returns a typed part and calls the module named
after it; :func:`blocking_problems` decides, before any pixel is read, what stops a job (``voxeldose
inspect`` asks it too).  The run's record is a :class:`~voxeldose.summary.Summary`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from . import __version__, metrics, pvc, quantify, register, timeactivity, uncertainty, voxeluncertainty
from .cycles import cumulative_summary
from .dose import absorbed_dose, density_on_grid, hu_to_density, medium_density
from .errors import VoxeldoseError
from .geometry import Grid, Volume, resample
from .ingest import (
    Cycle,
    Index,
    Series,
    SpectImage,
    TimePoint,
    load_cycle,
    read_ct,
    read_spect,
    roi_names,
    scan,
    spect_pixel_mode,
)
from .nuclides import Nuclide
from .nuclides import load as load_nuclide
from .outputs import write_all
from .projections import read_projections, reconstruct, reconstruction_method
from .recon import torch_device
from .result import Result, VoiFit
from .spec import (
    MAX_KIDNEY_GY_PER_CYCLE,
    MAX_SCAN_DAYS_AFTER_INJECTION,
    MAX_VOI_GY_PER_CYCLE,
    JobSpec,
    printable,
    radiobiology_for,
    role_of,
)
from .summary import (
    SCHEMA_VERSION,
    CalibrationRecord,
    CycleInfo,
    DvhBand,
    Injection,
    InputSet,
    Marrow,
    MarrowBloodBased,
    MarrowImageBased,
    Methods,
    NuclideData,
    Patient,
    Provenance,
    PvcRecord,
    Quantification,
    Registration,
    SingleTimePoint,
    SpectReconstruction,
    Summary,
    TimeActivity,
    UncertaintyComponent,
    ValueU,
    VoiMetrics,
    VoiPvc,
    VoiUncertainty,
)
from .summary import TimePoint as TimePointRecord
from .timeactivity import FitResult
from .voi import VOI, load_vois

log = logging.getLogger(__name__)

#: The ``schema`` of the summaries this version writes (kept here for older imports).
SUMMARY_SCHEMA = SCHEMA_VERSION
Progress = Callable[[str, float], None]

#: Stages in order, with their share of a typical run's time (for progress bars).
STAGES: tuple[tuple[str, float], ...] = (
    ("ingest", 0.10),
    ("quantify", 0.05),
    ("register", 0.30),
    ("vois", 0.15),
    ("pvc", 0.03),
    ("time-activity", 0.10),
    ("dose", 0.20),
    ("metrics", 0.10),
)

#: Where the injection's nuclide and radiopharmaceutical come from when the caller does not give them
#: (the Radiopharmaceutical Information Sequence (0054,0016) of the SPECT, see ingest.injection_from_header).
NUCLIDE_TAG = "RadionuclideCodeSequence (0054,0300)"
RADIOPHARMACEUTICAL_TAG = "Radiopharmaceutical (0018,0031)"

__all__ = [
    "STAGES",
    "SUMMARY_SCHEMA",
    "Progress",
    "Result",
    "blocking_problems",
    "input_fingerprint",
    "input_set",
    "invalid_spec",
    "load_spec_cycle",
    "run",
    "scan_time_problems",
    "write_outputs",
]


# =========================================================================================== the job
def invalid_spec(exc: ValidationError, path: str | Path | None = None) -> VoxeldoseError:
    """A job description that does not validate, as one error naming the first field at fault as its tag
    (``calibration.cps_per_mbq``) and ``path`` (the job file) as its file."""
    errors = exc.errors()
    parts = []
    for e in errors:
        loc = ".".join(printable(x) for x in e["loc"])  # a dict key may hold a lone surrogate
        parts.append(f"{loc}: {printable(e['msg'])}" if loc else printable(e["msg"]))
    first = errors[0]
    msg = printable(first["msg"])
    expected = msg.removeprefix("Input should be ").removeprefix("Value error, ")
    if first["type"] == "missing":
        expected = "a value"
    elif first["type"] == "extra_forbidden":
        expected = "only the fields of the job description (see voxeldose.spec.JobSpec)"
    return VoxeldoseError(
        f"invalid job description: {'; '.join(parts)}",
        path=path,
        tag=".".join(printable(x) for x in first["loc"]) or "job description",
        expected=expected,
        found=None if first["type"] == "missing" else _found(first.get("input")),
    )


def _found(value: Any) -> Any:
    """A refused value for a message, text made encodable (a container's repr escapes it already)."""
    return printable(value) if isinstance(value, str) else value


def _as_spec(spec: JobSpec | dict[str, Any]) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    try:
        return JobSpec.model_validate(spec)
    except ValidationError as exc:
        raise invalid_spec(exc) from None


def load_spec_cycle(spec: JobSpec, index: Index) -> Cycle:
    """The one cycle of ``index`` with the job's injection overrides."""
    inj = spec.injection
    return load_cycle(
        index,
        patient_id=spec.patient_id,
        injection_start=inj.datetime,
        activity_bq=None if inj.activity_mbq is None else inj.activity_mbq * 1e6,
        nuclide=inj.nuclide,
        reconstruct=spec.reconstruct,
    )


def _reference_index(cycle: Cycle, spec: JobSpec) -> int:
    """The job's reference time point, else the first with VOIs on its frame of reference, else 0."""
    if spec.reference_timepoint is not None:
        return spec.reference_timepoint
    fors = {s.frame_of_reference_uid for s in cycle.vois}
    for n, tp in enumerate(cycle.timepoints):
        if tp.spect.frame_of_reference_uid in fors:
            return n
    return 0


def _voi_candidates(cycle: Cycle, ref: TimePoint, spec: JobSpec) -> list[Series]:
    """RTSTRUCT/SEG series on the reference time point's frame of reference, RTSTRUCT first."""
    cands = [s for s in cycle.vois if s.frame_of_reference_uid == ref.spect.frame_of_reference_uid]
    if spec.voi_source != "auto":
        cands = [s for s in cands if s.kind == spec.voi_source]
    return sorted(cands, key=lambda s: 0 if s.kind == "rtstruct" else 1)


def blocking_problems(cycle: Cycle, spec: JobSpec) -> list[VoxeldoseError]:
    """Everything that stops :func:`run` on ``cycle`` with ``spec``, found from the headers alone, in the
    order ``run`` meets them (``run`` raises the first; ``voxeldose inspect`` lists them all)."""
    out: list[VoxeldoseError] = scan_time_problems(cycle) + _reconstruction_problems(cycle, spec)
    n_t = len(cycle.timepoints)
    if spec.reference_timepoint is not None and spec.reference_timepoint >= n_t:
        out.append(
            VoxeldoseError(
                f"reference time point {spec.reference_timepoint} does not exist",
                tag="reference_timepoint",
                expected=f"0 … {n_t - 1}",
                found=spec.reference_timepoint,
            )
        )
        return out  # the checks below need the reference
    ref = cycle.timepoints[_reference_index(cycle, spec)]
    if spec.dose.method == "dvk-density" and ref.ct is None:
        out.append(
            VoxeldoseError(
                "the density-corrected dose needs the reference time point's CT, and it has none",
                path=ref.spect.instances[0].path,
                tag="dose.method",
                expected="a CT with the reference SPECT's FrameOfReferenceUID, or dose.method 'dvk'",
            )
        )
    out += _calibration_problems(cycle, spec)
    out += _registration_problems(cycle, spec, ref)
    if not _voi_candidates(cycle, ref, spec):
        out.append(
            VoxeldoseError(
                "no VOIs on the reference time point: an RTSTRUCT or SEG on the reference CT is needed",
                path=ref.spect.instances[0].path,
                tag="RTSTRUCT/SEG FrameOfReferenceUID",
                expected=f"a structure set or segmentation on frame of reference {ref.spect.frame_of_reference_uid}",
            )
        )
    out += _fit_problems(cycle, spec)
    return out


def scan_time_problems(cycle: Cycle) -> list[VoxeldoseError]:
    """Scans later than :data:`~voxeldose.spec.MAX_SCAN_DAYS_AFTER_INJECTION` days after the injection: the
    injection date (the job's or the header's) is wrong, and every decay correction with it.  (A scan
    before the injection is refused when the cycle is read.)"""
    limit_h = MAX_SCAN_DAYS_AFTER_INJECTION * 24.0
    late = [tp for tp in cycle.timepoints if tp.hours_after_injection > limit_h]
    if not late:
        return []
    tp, given = late[0], cycle.injection.start_source
    return [
        VoxeldoseError(
            f"the SPECT acquired {tp.acquisition:%Y-%m-%d %H:%M} is {tp.hours_after_injection / 24.0:,.0f} days "
            f"after the injection ({cycle.injection.start:%Y-%m-%d %H:%M}); check the injection date and time",
            path=tp.spect.instances[0].path,
            tag="injection.datetime" if given == "caller" else given,  # the job's value, or the header's tag
            expected=f"scans within {MAX_SCAN_DAYS_AFTER_INJECTION:.0f} days after the injection (Lu-177 T½ 6.65 d: "
            "after 60 d less than 0.2 % is left)",
        )
    ]


def _reconstruction_problems(cycle: Cycle, spec: JobSpec) -> list[VoxeldoseError]:
    """A time point reconstructed from its projections needs its CT (attenuation) and OSEM subsets that divide
    its views (from the header: NumberOfFramesInRotation × NumberOfDetectors).  What only the pixels show is
    refused when they are read (:func:`voxeldose.projections.read_projections`)."""
    out = []
    subsets = spec.reconstruction.subsets
    for tp in cycle.timepoints:
        if not tp.needs_reconstruction:
            continue
        path = tp.spect.instances[0].path
        if tp.ct is None:
            out.append(
                VoxeldoseError(
                    f"the projections of time point {tp.hours_after_injection:.1f} h cannot be reconstructed: "
                    "no CT in their Frame of Reference, so no attenuation correction",
                    path=path,
                    tag="FrameOfReferenceUID (0020,0052)",
                    expected="the CT of the same SPECT/CT session among the inputs",
                    found=tp.spect.frame_of_reference_uid,
                )
            )
        rot = (tp.spect.first.get("RotationInformationSequence") or [None])[0]
        per_head = rot.get("NumberOfFramesInRotation") if rot is not None else None
        heads = tp.spect.first.get("NumberOfDetectors")
        try:
            views = int(str(per_head)) * int(str(heads))
        except ValueError:
            continue  # missing or not a number: read_projections names the tag
        if views > 0 and views % subsets:
            divisors = [d for d in range(1, views + 1) if views % d == 0]
            out.append(
                VoxeldoseError(
                    f"{subsets} OSEM subsets do not divide the {views} views of the projections",
                    path=path,
                    tag="reconstruction.subsets",
                    expected="one of " + ", ".join(map(str, divisors)),
                    found=subsets,
                )
            )
    return out


def _calibration_problems(cycle: Cycle, spec: JobSpec) -> list[VoxeldoseError]:
    """A SPECT holding raw counts needs the camera calibration (MIRD 26), from the job or its camera profile; a
    camera profile is for one nuclide.  Projections hold counts."""
    cam = spec.camera
    if cam is not None and cam.nuclide.casefold() != cycle.injection.nuclide.casefold():
        return [
            VoxeldoseError(
                f"the camera profile {printable(cam.name)!r} was measured with {printable(cam.nuclide)}, "
                f"the patient received {cycle.injection.nuclide}",
                tag="camera.nuclide",
                expected=f"a camera profile for {cycle.injection.nuclide}",
                found=printable(cam.nuclide),
            )
        ]
    if spec.cps_per_mbq is not None:
        return []
    for tp in cycle.timepoints:
        try:
            mode = "counts" if tp.needs_reconstruction else spect_pixel_mode(tp.spect.first, tp.spect.instances[0].path)
        except VoxeldoseError as err:
            return [err]
        if mode == "counts":
            return [
                VoxeldoseError(
                    f"SPECT series {tp.spect.series_instance_uid} holds raw counts and no calibration factor was given",
                    path=tp.spect.instances[0].path,
                    tag="calibration.cps_per_mbq",
                    expected="the camera's volume sensitivity in cps/MBq (voxeldose run --calibration CPS_PER_MBQ "
                    "or --camera camera.json, or calibration.cps_per_mbq or camera in the job)",
                )
            ]
    return []


def _registration_problems(cycle: Cycle, spec: JobSpec, ref: TimePoint) -> list[VoxeldoseError]:
    """Registration (unless switched off) needs a CT at every time point."""
    if spec.registration == "none":
        return []
    out = []
    for tp in cycle.timepoints:
        if tp is not ref and (tp.ct is None or ref.ct is None):
            out.append(
                VoxeldoseError(
                    f"time point {tp.hours_after_injection:.1f} h cannot be registered: "
                    + ("it has no CT" if tp.ct is None else "the reference time point has no CT"),
                    path=tp.spect.instances[0].path,
                    tag="CT series with the SPECT's FrameOfReferenceUID",
                    expected="a CT per time point (or registration: none in the job)",
                )
            )
    return out


def _fit_problems(cycle: Cycle, spec: JobSpec) -> list[VoxeldoseError]:
    """The time-activity model must suit the number of time points."""
    n_t, model = len(cycle.timepoints), spec.fit.model
    if n_t == 1 and model not in ("stp", "auto"):
        return [
            VoxeldoseError(
                f"the {model!r} time-activity model needs several time points; only one "
                f"({cycle.timepoints[0].hours_after_injection:.1f} h) was given",
                tag="fit.model",
                expected="a single-time-point method: fit.model 'stp' (Hänscheid 2018 or Madsen 2018)",
            )
        ]
    if n_t != 1 and model == "stp":
        return [
            VoxeldoseError(
                f"a single-time-point method was requested but {n_t} time points were given",
                tag="fit.model",
                expected="one time point, or a multi-point model (auto, monoexp, biexp, trapezoid)",
            )
        ]
    if n_t == 1 and spec.fit.stp_method == "madsen" and spec.fit.stp_effective_half_life_h.get("default") is None:
        return [
            VoxeldoseError(
                "the Madsen single-time-point method needs a population effective half-life",
                tag="fit.stp_effective_half_life_h",
                expected="e.g. {'default': 50.0} (hours)",
            )
        ]
    return []


def input_set(cycle: Cycle) -> InputSet:
    """The input set of a cycle: its series, instance count and a SHA-256 over the sorted SOPInstanceUIDs
    (what the service uses to never run the same input set twice)."""
    series = [s for tp in cycle.timepoints for s in (tp.spect, tp.ct) if s is not None] + list(cycle.vois)
    uids = [i.sop_instance_uid for s in series for i in s.instances]
    digest = hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()
    return InputSet.model_validate(
        {
            "series": [
                {"kind": s.kind, "series_instance_uid": s.series_instance_uid, "instances": len(s.instances)}
                for s in series
            ],
            "sop_instances": len(uids),
            "sop_instance_uids_sha256": digest,
        }
    )


def input_fingerprint(cycle: Cycle) -> dict[str, Any]:
    """:func:`input_set` as a plain dict (``series``, ``sop_instances``, ``sop_instance_uids_sha256``)."""
    return input_set(cycle).model_dump()


# =========================================================================================== stages
@dataclass(frozen=True)
class _Ingested:
    cycle: Cycle
    nuclide: Nuclide
    ref_n: int
    voi_series: Series

    @property
    def ref_tp(self) -> TimePoint:
        return self.cycle.timepoints[self.ref_n]


@dataclass(frozen=True)
class _Quantified:
    conc: list[Volume]  # Bq/ml at each time point, own grid
    records: list[Quantification]
    cts: list[Volume | None]  # HU
    reconstructions: list[SpectReconstruction]  # how each SPECT was made

    @property
    def applied(self) -> bool:
        return any(q.pixel_mode == "counts" for q in self.records)


@dataclass(frozen=True)
class _Kinetics:
    activity: list[Volume]  # Bq per voxel, reference grid
    times_s: np.ndarray
    tia: Volume  # Bq·s per voxel
    fits: dict[str, VoiFit]
    quality: np.ndarray | None
    voxel_flags: np.ndarray | None
    method_note: str
    tia_factors: dict[str, float]  # partial-volume correction: corrected / uncorrected VOI TIA (empty without)
    single_time_point: SingleTimePoint | None = None  # one time point: how its TIA was made


@dataclass(frozen=True)
class _Dosed:
    dose: Volume  # Gy
    density: Volume | None  # g/ml on the dose grid
    kernel_id: str | None
    kernel_density_g_cm3: float | None


def _ingest(spec: JobSpec, warnings: list[str]) -> _Ingested:
    """Read the inputs into one cycle; stop on what blocks the job."""
    index = scan(spec.inputs)
    cycle = load_spec_cycle(spec, index)
    warnings += [p.message for p in index.problems if p.severity == "warning"]
    problems = blocking_problems(cycle, spec)
    if problems:
        raise problems[0]
    ref_n = _reference_index(cycle, spec)
    voi_series = _voi_candidates(cycle, cycle.timepoints[ref_n], spec)[0]
    return _Ingested(cycle, load_nuclide(cycle.injection.nuclide), ref_n, voi_series)


def _quantify(cycle: Cycle, spec: JobSpec, decay_constant_per_s: float) -> _Quantified:
    """Each SPECT in Bq/ml at its acquisition start (MIRD 26), and each CT."""
    conc: list[Volume] = []
    records: list[Quantification] = []
    cts: list[Volume | None] = []
    made: list[SpectReconstruction] = []
    for tp in cycle.timepoints:
        ct = read_ct(tp.ct) if tp.ct is not None else None
        if tp.needs_reconstruction:
            image, how = _reconstruct(tp, ct, spec)
        else:
            image, how = read_spect(tp.spect), _vendor_reconstruction(tp.spect)
        c, q = quantify.to_bq_per_ml(
            image,
            decay_constant_per_s=decay_constant_per_s,
            calibration_cps_per_mbq=spec.cps_per_mbq,
            calibration_source=spec.calibration_source,
            acquisition_start=tp.acquisition,
            injection_start=cycle.injection.start,
            decay_correction=str(getattr(tp.spect.first, "DecayCorrection", "") or ""),
        )
        conc.append(c)
        records.append(Quantification.model_validate(q.to_dict()))
        cts.append(ct)
        made.append(how)
    return _Quantified(conc, records, cts, made)


def _vendor_reconstruction(series: Series) -> SpectReconstruction:
    """A reconstruction read as given: its ReconstructionMethod (0054,1103) when stated."""
    method = str(series.first.get("ReconstructionMethod", "") or "").strip()
    return SpectReconstruction(made_by="vendor", method=method or None)


def _reconstruct(tp: TimePoint, ct: Volume | None, spec: JobSpec) -> tuple[SpectImage, SpectReconstruction]:
    """The time point's SPECT reconstructed from its projections, in memory (:func:`voxeldose.projections.reconstruct`:
    OSEM with the job's iterations × subsets, attenuation from the CT, resolution recovery for the header's
    collimator, on :func:`voxeldose.recon.torch_device`), in reconstructed counts with the acquisition time a
    calibration factor needs."""
    path = tp.spect.instances[0].path
    if ct is None:  # blocking_problems stops such a job before any pixel is read
        raise VoxeldoseError(
            "projections cannot be reconstructed without the CT of their Frame of Reference",
            path=path,
            tag="FrameOfReferenceUID (0020,0052)",
            expected="the CT of the same SPECT/CT session among the inputs",
        )
    ps = read_projections(path)
    it, sub = spec.reconstruction.iterations, spec.reconstruction.subsets
    if ps.views % sub:  # the header's view count was checked; the photopeak frames decide
        raise VoxeldoseError(
            f"{sub} OSEM subsets do not divide the {ps.views} views of the projections",
            path=path,
            tag="reconstruction.subsets",
            expected="one of " + ", ".join(str(d) for d in range(1, ps.views + 1) if ps.views % d == 0),
            found=sub,
        )
    device = torch_device()
    counts = reconstruct(ps, ct, it, sub)
    volume = Volume(
        counts.array.astype(np.float64),
        counts.affine,
        counts.frame_of_reference_uid,
        "counts",
        {"series_instance_uid": tp.spect.series_instance_uid, "modality": "NM"},
    )
    image = SpectImage(
        volume,
        "counts",
        ps.acquisition_duration_s,
        ps.frame_duration_s * 1000.0,
        ps.views_per_detector,
        float(volume.array.sum()),
    )
    how = SpectReconstruction(
        made_by="voxeldose",
        method=reconstruction_method(ps.collimator, it, sub),
        algorithm="OSEM (PyTomography)",
        iterations=it,
        subsets=sub,
        models=["attenuation from the CT", f"resolution recovery with collimator {ps.collimator}", "no scatter"],
        projections_series_uid=tp.spect.series_instance_uid,
        device=device,
    )
    return image, how


def _register(
    ing: _Ingested, spec: JobSpec, quant: _Quantified, progress: Progress | None, warnings: list[str]
) -> tuple[list[Volume], list[Registration]]:
    """Every time point's concentration on the reference grid (rigid CT-to-CT unless switched off)."""
    ref_grid, ref_ct = quant.conc[ing.ref_n].grid, quant.cts[ing.ref_n]
    aligned: list[Volume] = []
    records: list[Registration] = []
    ref_prepared: register.PreparedCT | None = None  # the reference CT prepared once for all time points
    for n, (tp, c, ct) in enumerate(zip(ing.cycle.timepoints, quant.conc, quant.cts)):
        _emit(progress, "register", n / len(quant.conc))
        if n == ing.ref_n:
            aligned.append(c)
            records.append(Registration(reference=True, quality="good", message="reference time point"))
        elif spec.registration == "none":
            aligned.append(resample(c, ref_grid, order=1, fill=0.0))
            records.append(
                Registration(
                    quality="not registered",
                    message="registration switched off by the job: scanner coordinates taken as aligned",
                )
            )
            warnings.append(f"time point {tp.hours_after_injection:.1f} h not registered (registration: none)")
        elif ct is None or ref_ct is None:  # stopped by blocking_problems before any pixel was read
            raise _registration_problems(ing.cycle, spec, ing.ref_tp)[0]
        else:
            if ref_prepared is None:
                ref_prepared = register.prepare_ct(ref_ct, "reference")
            reg = register.register_rigid(ref_prepared, ct)
            aligned.append(register.align_to_reference(c, ref_grid, reg))
            records.append(Registration.model_validate(reg.to_dict()))
            if reg.quality != "good":
                warnings.append(
                    f"registration of the {tp.hours_after_injection:.1f} h time point is poor: {reg.message}"
                )
    return aligned, records


def _vois(series: Series, grid: Grid, ref_ct: Volume | None, warnings: list[str]) -> dict[str, VOI]:
    """The VOIs of ``series`` on the dose grid; ROIs without voxels there are said and left out."""
    vois = load_vois(series, grid, default_slab_mm=None if ref_ct is None else float(ref_ct.spacing[2]))
    for name in roi_names(series):
        if name not in vois:
            warnings.append(
                f"VOI {name!r} has no contours in {series.kind.upper()} {series.description!r}: not evaluated"
            )
    for name in [n for n, v in vois.items() if float(v.fraction.sum()) == 0.0]:
        warnings.append(
            f"VOI {name!r} has no voxel on the dose grid (empty, or outside the SPECT field of view): not evaluated"
        )
        del vois[name]
    if not vois:
        raise VoxeldoseError(
            "the VOI series holds no ROI with contours or segments on the SPECT grid",
            path=series.instances[0].path,
            tag="ROIContourSequence / SegmentSequence",
            expected="at least one contoured ROI or non-empty segment",
        )
    return vois


@dataclass(frozen=True)
class _Corrected:
    """The partial-volume correction of every time point (see :mod:`voxeldose.pvc`)."""

    record: PvcRecord
    observed: dict[str, np.ndarray]  # VOI activity as imaged, Bq, per time point
    corrected: dict[str, np.ndarray]  # VOI activity after the correction, Bq, per time point
    stack: np.ndarray | None  # rbv: the corrected activity map (Bq per voxel) of every time point
    #: gtm/rbv: each VOI's relative standard uncertainty of its corrected activity from the camera profile's FWHM
    #: uncertainty (:func:`_fwhm_sensitivity`); empty when the profile states none
    recovery_u: dict[str, float] = field(default_factory=dict)
    recovery_how: str = ""


def _activity(aligned: list[Volume]) -> list[Volume]:
    """Activity per voxel (Bq) on the reference grid from the aligned concentrations (Bq/ml)."""
    voxel_ml = aligned[0].grid.voxel_volume_ml
    return [a.with_array((a.array * voxel_ml).astype(np.float32), "Bq") for a in aligned]


#: How the VOI doses are corrected (summary ``methods.pvc.dose_correction``).
PVC_DOSE_CORRECTION = {
    "voi": (
        "VOI mean dose × (TIA of the corrected VOI activities / TIA of the imaged ones); assumes that a VOI's "
        "dose comes from its own activity (self-dose: 177Lu's electrons, ~80 % of its emitted energy, stop within "
        "~2 mm); the dose map, DVHs, min/max and D-values are not corrected"
    ),
    "map": (
        "the dose map is the kernel convolution of the corrected activity maps' TIA (mean, DVH, D-values all "
        "corrected); the uncorrected mean dose beside it is estimated as corrected × (TIA of the imaged VOI "
        "activities / TIA of the corrected ones), assuming self-dose dominates"
    ),
}


def _pvc_description(spec: JobSpec, n_regions: int) -> str:
    cam = spec.camera
    assert cam is not None  # JobSpec refuses a pvc without a camera profile
    if spec.pvc == "rc":
        return (
            "recovery coefficient: VOI activity / RC(V) of a sphere of the VOI's volume from the camera's recovery "
            "curve (sphere-equivalent)"
        )
    gtm = (
        f"geometric transfer matrix (Rousset et al. 1998, J Nucl Med 39:904) over {n_regions} regions (the VOIs, "
        f"the remaining body, outside it), Gaussian PSF of FWHM {cam.fwhm_mm:g} mm"
    )
    if spec.pvc == "gtm":
        return gtm
    return (
        "region-based voxel-wise correction (Thomas et al. 2011, Eur J Nucl Med Mol Imaging 38:1104): activity × "
        f"S / (PSF ⊗ S), S the piecewise-constant image of the {gtm}"
    )


def _resampling_maps(ing: _Ingested, quant: _Quantified, aligned: list[Volume]) -> list[tuple[np.ndarray, Grid] | None]:
    """For each time point resampled onto the reference grid: the 4×4 map from reference indices to its own
    indices (as :func:`voxeldose.geometry.resample` used it) and its own grid; None for the reference."""
    ref_grid = aligned[ing.ref_n].grid
    out: list[tuple[np.ndarray, Grid] | None] = []
    for n, (own, moved) in enumerate(zip(quant.conc, aligned)):
        if n == ing.ref_n:
            out.append(None)
            continue
        reg = moved.meta.get("registration")
        to_ref = np.eye(4) if reg is None else np.asarray(reg["moving_to_reference_lps_4x4"], dtype=np.float64)
        out.append((np.linalg.inv(own.affine) @ np.linalg.inv(to_ref) @ ref_grid.affine, own.grid))
    return out


def _pvc_fwhms(
    fwhm_mm: float, fractions: dict[str, np.ndarray], maps: list[tuple[np.ndarray, Grid] | None]
) -> list[float]:
    """The PSF of each time point on the reference grid: the camera's FWHM, widened for a resampled time point
    by its trilinear interpolation (:func:`voxeldose.pvc.resampling_variance_mm2`, over the VOIs' voxels)."""
    inside = np.argwhere(sum(f for f in fractions.values()) > 0)[::5, ::-1].astype(np.float64)  # (i, j, k)
    out = []
    for m in maps:
        if m is None:
            out.append(fwhm_mm)
        else:
            out.append(pvc.effective_fwhm_mm(fwhm_mm, pvc.resampling_variance_mm2(m[0], inside, m[1].spacing.tolist())))
    return out


def _pvc(
    spec: JobSpec,
    cycle: Cycle,
    activity: list[Volume],
    vois: dict[str, VOI],
    maps: list[tuple[np.ndarray, Grid] | None],
    warnings: list[str],
) -> _Corrected | None:
    """Partial-volume correction of every time point's activity on the reference grid (``spec.pvc``): VOI
    activities (rc, gtm) or the activity map (rbv).  VOIs smaller than 2 × FWHM are warned, and for ``rc`` shapes
    far from a sphere.  gtm/rbv model each time point's PSF: the camera's, widened by the registration's
    resampling (``maps``, :func:`_resampling_maps`); a GTM is built once per distinct PSF."""
    cam = spec.camera
    if spec.pvc == "none" or cam is None:
        return None
    grid = activity[0].grid
    spacing = tuple(float(x) for x in grid.spacing)
    fractions = {name: v.fraction for name, v in vois.items()}
    for name, frac in fractions.items():
        w = pvc.size_warning(name, pvc.voi_shape(frac, spacing), cam.fwhm_mm)
        if w is not None:
            warnings.append(w)
    if spec.marrow.recovery_coefficient != 1.0:
        warnings.append(
            f"marrow.recovery_coefficient {spec.marrow.recovery_coefficient:g} is applied on top of the "
            f"partial-volume correction {spec.pvc!r}: the marrow VOI is corrected twice unless it is 1"
        )
    fwhms = [0.0] * len(activity) if cam.fwhm_mm is None else _pvc_fwhms(cam.fwhm_mm, fractions, maps)
    models: dict[float, pvc.Gtm] = {}
    if spec.pvc in ("gtm", "rbv"):
        for f in sorted(set(round(x, 2) for x in fwhms)):
            if not pvc.negligible_blur(f, spacing):
                models[f] = pvc.Gtm.build(fractions, f, spacing)
    observed: dict[str, list[float]] = {n: [] for n in fractions}
    corrected: dict[str, list[float]] = {n: [] for n in fractions}
    images: list[np.ndarray] = []
    notes: list[str] = []
    for tp, a, fwhm_t in zip(cycle.timepoints, activity, fwhms):
        model = models.get(round(fwhm_t, 2))
        if spec.pvc != "rc" and fwhm_t != cam.fwhm_mm:
            notes.append(
                f"{tp.hours_after_injection:.1f} h: PSF FWHM {fwhm_t:.1f} mm (the camera's {cam.fwhm_mm:g} mm and the "
                "registration's trilinear resampling)"
            )
        if spec.pvc == "rc":
            assert cam.recovery_fit is not None  # JobSpec refuses rc without a recovery curve
            res = pvc.rc(a.array, fractions, spacing, cam.recovery_fit)
        elif spec.pvc == "gtm":
            assert cam.fwhm_mm is not None  # JobSpec refuses gtm without a FWHM
            res = pvc.gtm(a.array, fractions, round(fwhm_t, 2), spacing, model)
        else:
            assert cam.fwhm_mm is not None
            res = pvc.rbv(a.array, fractions, round(fwhm_t, 2), spacing, model)
            images.append(np.asarray(res.image))
        for name in fractions:
            observed[name].append(res.observed[name])
            corrected[name].append(res.corrected[name])
        for note in res.notes:
            text = note if "sphericity" in note or "FWHM" in note else f"{tp.hours_after_injection:.1f} h: {note}"
            if "sphericity" in note and note not in warnings:
                warnings.append(note)
            elif "sphericity" not in note and text not in notes:
                notes.append(text)
    record = PvcRecord(
        method=spec.pvc,
        description=_pvc_description(spec, len(next(iter(models.values())).names) if models else len(fractions) + 1),
        camera_profile=cam.name,
        fwhm_mm=cam.fwhm_mm if spec.pvc != "rc" else None,
        recovery_curve=None
        if spec.pvc != "rc" or cam.recovery_fit is None
        else (
            f"RC(V) = {cam.recovery_fit.rc_max:.4g} / (1 + ({cam.recovery_fit.v_half_ml:.4g} ml / V)^"
            f"{cam.recovery_fit.slope:.4g})"
        ),
        dose_correction=PVC_DOSE_CORRECTION["map" if spec.pvc == "rbv" else "voi"],
        notes=notes,
    )
    recovery_u, recovery_how = _fwhm_sensitivity(spec, activity, fractions, spacing, fwhms, maps, corrected)
    return _Corrected(
        record,
        {n: np.array(v) for n, v in observed.items()},
        {n: np.array(v) for n, v in corrected.items()},
        np.stack(images).astype(np.float64) if images else None,
        recovery_u,
        recovery_how,
    )


def _fwhm_sensitivity(
    spec: JobSpec,
    activity: list[Volume],
    fractions: dict[str, np.ndarray],
    spacing: tuple[float, ...],
    fwhms: list[float],
    maps: list[tuple[np.ndarray, Grid] | None],
    corrected: dict[str, list[float]],
) -> tuple[dict[str, float], str]:
    """gtm/rbv: the relative standard uncertainty of each VOI's corrected activity that the camera profile's FWHM
    uncertainty causes, u_r = |A(F + u_F) − A(F)| / A(F) (GUM JCGM 100:2008 §5.1.3: the sensitivity coefficient by a
    forward difference of one standard uncertainty), on the reference time point (not resampled: the camera's own
    FWHM).

    The same relative error applies to every scan (one FWHM for all: fully correlated), so it enters the budget
    as a common component, like the calibration.  ``corrected``: the VOIs' corrected activities of every scan at
    their own FWHM (A(F) of the reference scan is among them).  Cost: one more GTM build (and rbv correction) of
    one scan."""
    cam = spec.camera
    if spec.pvc not in ("gtm", "rbv") or cam is None or cam.fwhm_mm is None or not cam.fwhm_u_mm:
        return {}, ""
    n = next((i for i, m in enumerate(maps) if m is None), 0)
    f0, uf = fwhms[n], float(cam.fwhm_u_mm)
    correct = pvc.gtm if spec.pvc == "gtm" else pvc.rbv
    hi = correct(activity[n].array, fractions, f0 + uf, spacing).corrected
    base = {name: corrected[name][n] for name in fractions}
    out = {name: abs(hi[name] - base[name]) / abs(base[name]) for name in fractions if abs(base[name]) > 0.0}
    how = (
        f"{spec.pvc} rerun at the camera profile's FWHM {cam.fwhm_mm:g} + {uf:.2g} mm on the reference scan: "
        "|A(F+u) − A(F)| / A, common to every scan"
    )
    return out, how


def _voi_fit(
    name: str, times_s: np.ndarray, a_voi: np.ndarray, lam: float, spec: JobSpec, single: bool, warnings: list[str]
) -> VoiFit | None:
    """The time-activity fit of one VOI's activities (Bq), or its single-time-point record."""
    if single:
        return TimeActivity(model="stp", times_h=(times_s / 3600).tolist(), activity_mbq=(a_voi / 1e6).tolist())
    try:
        return timeactivity.fit_voi(times_s, a_voi, decay_constant_per_s=lam, model=spec.fit.model)
    except VoxeldoseError as err:
        if spec.fit.model != "auto":
            raise VoxeldoseError(f"VOI {name!r}: {err.reason}", tag="fit.model", expected=err.expected) from None
        warnings.append(f"VOI {name!r}: time-activity fit failed ({err.reason})")
        return None


def _tia_factor(fit_c: VoiFit | None, fit_u: VoiFit | None, a_c: np.ndarray, a_u: np.ndarray) -> float:
    """Corrected over uncorrected TIA of a VOI: of its fits when both have a TIA, else of its summed activities
    (a single time point: the ratio of the activities, as both TIAs scale with it)."""
    if isinstance(fit_c, FitResult) and isinstance(fit_u, FitResult) and fit_u.tia_bqs > 0:
        return float(fit_c.tia_bqs / fit_u.tia_bqs)
    total = float(a_u.sum())
    return float(a_c.sum()) / total if total > 0 else 1.0


def _time_activity(
    cycle: Cycle,
    spec: JobSpec,
    activity: list[Volume],
    vois: dict[str, VOI],
    lam: float,
    warnings: list[str],
    corr: _Corrected | None = None,
) -> _Kinetics:
    """Voxel TIA (voxel-wise curves, or a single-time-point method) and each VOI's time-activity fit, of the
    partial-volume corrected activities when ``corr`` is given."""
    grid = activity[0].grid
    times_s = np.array([tp.hours_after_injection * 3600.0 for tp in cycle.timepoints])
    if corr is not None and corr.stack is not None:
        stack = corr.stack
    else:
        stack = np.stack([a.array for a in activity]).astype(np.float64)
    single = spec.fit.model == "stp" or len(times_s) == 1
    quality = flags = None
    stp_record = None
    if single:
        tia_arr, method_note, stp_record = _stp_tia(stack[0], float(times_s[0]), spec, vois, warnings)
    else:
        vt = timeactivity.voxel_tia(stack, times_s, decay_constant_per_s=lam, method=spec.fit.voxel_method)
        tia_arr, quality, flags = np.asarray(vt.tia, dtype=np.float64), vt.quality, np.asarray(vt.flags)
        method_note = f"voxel-wise {spec.fit.voxel_method}"
    fits: dict[str, VoiFit] = {}
    factors: dict[str, float] = {}
    for name, voi in vois.items():
        if corr is not None:
            a_voi = corr.corrected[name]
        else:
            a_voi = np.array([float((voi.fraction * s).sum(dtype=np.float64)) for s in stack])
        fit = _voi_fit(name, times_s, a_voi, lam, spec, single, warnings)
        if fit is not None:
            fits[name] = fit
        if corr is not None:
            fit_u = _voi_fit(name, times_s, corr.observed[name], lam, spec, single, [])
            factors[name] = _tia_factor(fit, fit_u, a_voi, corr.observed[name])
    tia = Volume(tia_arr, grid.affine, grid.frame_of_reference_uid, "Bq.s")
    return _Kinetics(activity, times_s, tia, fits, quality, flags, method_note, factors, stp_record)


def _dose(
    spec: JobSpec, nuclide: Nuclide, tia: Volume, ref_ct: Volume | None, vois: dict[str, VOI], warnings: list[str]
) -> _Dosed:
    """The absorbed dose (Gy) on the TIA's grid, and the CT's density there when there is a CT."""
    density = None
    if ref_ct is not None:
        # Outside the CT's field of view (a 61 cm SPECT field is wider than a 50 cm CT reconstruction)
        # the kernel medium's density is assumed, and said when a VOI reaches there.
        fill = medium_density(spec.dose.medium)
        density = density_on_grid(ref_ct.with_array(hu_to_density(ref_ct.array), "g/ml"), tia.grid, fill=float("nan"))
        outside = ~np.isfinite(density.array)
        if outside.any():
            for name, voi in vois.items():
                if float(voi.fraction[outside].sum()) > 0:
                    warnings.append(
                        f"VOI {name!r} extends beyond the CT field of view: density {fill} g/ml assumed there"
                    )
            density = density.with_array(np.where(outside, fill, density.array))
    dose = absorbed_dose(
        tia,
        nuclide=nuclide.name,
        method=spec.dose.method,
        density=density if spec.dose.method != "dvk" else None,
        medium=spec.dose.medium,
        kernel_size=spec.dose.kernel_size,
    )
    rho = dose.meta.get("medium_density_g_cm3")
    return _Dosed(dose, density, str(dose.meta.get("kernel_id", "")) or None, None if rho is None else float(rho))


def _metrics(
    spec: JobSpec,
    vois: dict[str, VOI],
    kin: _Kinetics,
    dosed: _Dosed,
    a_inj: float,
    lam: float,
    warnings: list[str],
    corr: _Corrected | None = None,
    quants: list[Quantification] | None = None,
) -> dict[str, VoiMetrics]:
    """Per-VOI dose metrics, time-activity and radiobiology (BED, EQD2); with a partial-volume correction the
    corrected mean dose (``mean_gy``, and BED from it) beside the uncorrected one (:data:`PVC_DOSE_CORRECTION`)."""
    dose_arr = np.asarray(dosed.dose.array, dtype=np.float64)
    tia_arr = np.asarray(kin.tia.array, dtype=np.float64)
    rho = None if dosed.density is None else dosed.density.array
    voxel_ml = dosed.dose.grid.voxel_volume_ml
    out: dict[str, VoiMetrics] = {}
    for name, voi in vois.items():
        role = role_of(name, spec)
        # Mean absorbed dose = energy / mass.  With dvk-density the dose map is already per the voxel's
        # own mass, so the mean is mass-weighted; with dvk (and led without a density map) every voxel's
        # dose assumes the kernel medium, so the mean is volume-weighted (as in the RT Dose DVH).
        m = metrics.voi_metrics(
            dose_arr,
            voi.fraction,
            voxel_ml=voxel_ml,
            density_g_per_ml=rho if spec.dose.method == "dvk-density" else None,
            injected_activity_bq=a_inj,
        )
        if corr is not None:
            m = {**m, **_pvc_means(name, m, kin, corr)}
        entry: dict[str, Any] = {"role": role, "source": voi.source, **m}
        if rho is not None:
            entry["mass_g"] = float((voi.fraction * rho).sum(dtype=np.float64) * voxel_ml)
            entry["notes"] = [n for n in m["notes"] if not n.startswith("no density map")]
            entry["mass_source"] = "CT (Schneider et al. 2000 HU→density)"
        if kin.voxel_flags is not None:
            entry["voxel_tia_physical_decay_tail_fraction"] = _tail_fraction(name, voi, role, kin.voxel_flags, warnings)
        fr = kin.fits.get(name)
        if isinstance(fr, FitResult):
            entry["tia_bqs"] = float(fr.tia_bqs)
            entry["time_activity"] = _fit_summary(fr, kin.times_s)
        elif fr is not None:
            entry["time_activity"] = fr
        entry.update(_radiobiology(name, role, float(m["mean_gy"]), fr, kin.times_s, lam, spec, warnings))
        entry["tia_voxel_sum_bqs"] = float((voi.fraction * tia_arr).sum(dtype=np.float64))
        if isinstance(fr, FitResult):
            observed = None if corr is None else corr.observed[name]
            outline_u = uncertainty.delineation_dose_relative_u(
                dose_arr, voi.fraction, rho if spec.dose.method == "dvk-density" else None
            )
            entry["uncertainty"] = _uncertainty(
                spec, fr, entry, dosed.dose.grid.spacing, quants or [], observed, outline_u, name=name, recovery=corr
            )
        out[name] = VoiMetrics.model_validate(entry)
    return out


def _pvc_means(name: str, m: dict[str, Any], kin: _Kinetics, corr: _Corrected) -> dict[str, Any]:
    """The corrected mean dose (and dose per GBq) of a VOI, with its ``pvc`` record (corrected and uncorrected
    mean side by side).  rc/gtm: the map's mean × the TIA factor; rbv: the map is corrected already, the
    uncorrected mean is the map's mean / the TIA factor."""
    f = kin.tia_factors.get(name, 1.0)
    by_map = corr.stack is not None
    mean = float(m["mean_gy"])
    corrected, uncorrected = (mean, mean / f if f > 0 else mean) if by_map else (mean * f, mean)
    fit = kin.fits.get(name)
    tia_c = float(fit.tia_bqs) if isinstance(fit, FitResult) else None
    obs, cor = corr.observed[name], corr.corrected[name]
    record = VoiPvc(
        method=corr.record.method,  # never "none": there is no _Corrected then
        uncorrected_mean_gy=uncorrected,
        corrected_mean_gy=corrected,
        factor=corrected / uncorrected if uncorrected > 0 else 1.0,
        uncorrected_tia_bqs=None if tia_c is None or f <= 0 else tia_c / f,
        corrected_tia_bqs=tia_c,
        activity_factors=[float(c / o) if o > 0 else 1.0 for c, o in zip(cor, obs)],
        notes=[] if by_map else ["min, max, D-values and DVH are of the uncorrected dose map"],
    )
    out: dict[str, Any] = {"mean_gy": corrected, "pvc": record}
    if m.get("gy_per_gbq") is not None:
        out["gy_per_gbq"] = float(m["gy_per_gbq"]) * corrected / mean if mean > 0 else m["gy_per_gbq"]
    return out


def _check_plausible(voi_out: dict[str, VoiMetrics], spect_path: Path | str) -> None:
    """A mean dose no therapy gives is an input error, not a result: a kidney above
    :data:`~voxeldose.spec.MAX_KIDNEY_GY_PER_CYCLE` or any VOI above :data:`~voxeldose.spec.MAX_VOI_GY_PER_CYCLE`
    (Gy, one cycle) stops the run (a wrong calibration, activity or injection time scales every dose); the
    error names the reference SPECT, whose counts and header gave the dose."""
    for name, m in voi_out.items():
        bound = MAX_KIDNEY_GY_PER_CYCLE if m.role == "kidney" else MAX_VOI_GY_PER_CYCLE
        if not m.mean_gy <= bound:  # NaN too
            raise VoxeldoseError(
                f"implausible dose: VOI {printable(name)!r} ({m.role}) has a mean absorbed dose of {m.mean_gy:.4g} Gy "
                "in one cycle, more than any Lu-177 therapy gives; check calibration and injection data",
                path=spect_path,
                tag="calibration.cps_per_mbq / injection",
                expected=f"a mean dose per cycle ≤ {bound:g} Gy ({m.role})",
                found=f"{m.mean_gy:.4g} Gy",
            )


def _tail_fraction(name: str, voi: VOI, role: str, flags: np.ndarray, warnings: list[str]) -> float:
    """Fraction of the VOI whose voxel TIA tail assumes physical decay only (no washout after the last scan)."""
    w = voi.fraction > 0
    phys = float(voi.fraction[w & (flags == 1)].sum() / max(voi.fraction[w].sum(), 1e-12))
    if phys > 0.5 and role in ("kidney", "tumour", "marrow"):
        warnings.append(
            f"VOI {name!r}: {100 * phys:.0f} % of its voxels have no measurable washout after the "
            "last scan; their tail assumes physical decay only (an upper bound)"
        )
    return phys


def _radiobiology(
    name: str,
    role: str,
    mean_gy: float,
    fr: VoiFit | None,
    times_s: np.ndarray,
    lam: float,
    spec: JobSpec,
    warnings: list[str],
) -> dict[str, Any]:
    """BED and EQD2 (Gy) of a VOI with radiobiology, with the G factor and the kinetics it assumes."""
    rb = radiobiology_for(name, role, spec)
    if rb is None:
        return {}
    exps, bed_model = _bed_kinetics(fr, times_s, lam, spec, name)
    if exps is None:
        warnings.append(f"VOI {name!r}: BED not computed ({bed_model})")
        return {}
    g = metrics.lea_catcheside_g(exps, rb.repair_half_time_h * 3600.0)
    b = metrics.bed(mean_gy, g, rb.alpha_beta_gy)
    return {
        "bed_gy": b,
        "eqd2_gy": metrics.eqd2(b, rb.alpha_beta_gy),
        "g_factor": g,
        "alpha_beta_gy": rb.alpha_beta_gy,
        "repair_half_time_h": rb.repair_half_time_h,
        "bed_kinetics": bed_model,
    }


def _value_u(e: uncertainty.Estimate) -> ValueU:
    iv = e.interval
    return ValueU(value=e.value, u=e.u, lower_95=None if iv is None else iv[0], upper_95=None if iv is None else iv[1])


def _uncertainty(
    spec: JobSpec,
    fr: FitResult,
    entry: dict[str, Any],
    spacing: np.ndarray,
    quants: list[Quantification],
    observed_bq: np.ndarray | None,
    outline_u: float | None = None,
    *,
    name: str = "",
    recovery: _Corrected | None = None,
) -> VoiUncertainty:
    """The VOI's EANM uncertainty budget (:mod:`voxeldose.uncertainty`) from the job's camera profile, the
    quantification of each scan (counts behind the VOI activity) and the partial-volume correction."""
    cam = spec.camera
    # the profile's sensitivity calibrates the job (also when the job repeats it as calibration.cps_per_mbq)
    from_profile = cam is not None and spec.calibration.cps_per_mbq in (None, cam.sensitivity_cps_per_mbq)
    calibration_u = (
        cam.sensitivity_u_cps_per_mbq / cam.sensitivity_cps_per_mbq if cam is not None and from_profile else None
    )
    counting = None
    durations = [q.acquisition_duration_s for q in quants]
    cps = spec.cps_per_mbq
    if cps is not None and len(durations) == fr.n_points and all(d is not None and d > 0 for d in durations):
        counts_bq = np.asarray(fr.activities_bq) if observed_bq is None else np.asarray(observed_bq, dtype=np.float64)
        counting = uncertainty.counting_relative_u(counts_bq, cps, [float(d or 0.0) for d in durations])
    recovery_u, recovery_how = None, "no partial-volume correction: recovery not part of the measurement model"
    volume_ml = float(entry["volume_ml"])
    if spec.pvc == "rc" and cam is not None and cam.recovery_fit is not None:
        rfit = cam.recovery_fit
        recovery_u = rfit.rc_u(volume_ml) / rfit.rc(volume_ml)
        recovery_how = f"recovery fit of camera profile {cam.name!r} at {volume_ml:.3g} ml: u(RC)/RC"
    elif spec.pvc in ("gtm", "rbv") and recovery is not None and name in recovery.recovery_u:
        recovery_u, recovery_how = recovery.recovery_u[name], recovery.recovery_how
    elif spec.pvc in ("gtm", "rbv"):
        recovery_how = f"{spec.pvc}: not evaluated (the camera profile states no FWHM uncertainty)"
    b = uncertainty.voi_budget(
        fr,
        mean_gy=float(entry["mean_gy"]),
        volume_ml=volume_ml,
        voxel_size_mm=[float(x) for x in spacing],
        counting_rel_u=counting,
        calibration_rel_u=calibration_u,
        recovery_rel_u=recovery_u,
        recovery_how=recovery_how,
        bed_gy=entry.get("bed_gy"),
        g_factor=entry.get("g_factor"),
        alpha_beta_gy=entry.get("alpha_beta_gy"),
        delineation_rel_u=outline_u,
    )
    return VoiUncertainty(
        method="EANM (Gear et al. 2018) first-order propagation, GUM JCGM 100:2008",
        coverage_factor=uncertainty.COVERAGE_FACTOR,
        components=[UncertaintyComponent(name=c.name, relative_u=c.relative_u, how=c.how) for c in b.components],
        activity_bq=[_value_u(e) for e in b.activities_bq],
        tia_bqs=_value_u(b.tia_bqs),
        mean_gy=_value_u(b.mean_gy),
        bed_gy=None if b.bed_gy is None else _value_u(b.bed_gy),
        eqd2_gy=None if b.eqd2_gy is None else _value_u(b.eqd2_gy),
        notes=list(b.notes),
    )


def _dose_uncertainty(
    spec: JobSpec, kin: _Kinetics, corr: _Corrected | None, dosed: _Dosed, quants: list[Quantification], lam: float
) -> tuple[Volume | None, str]:
    """The voxel dose-uncertainty map (standard uncertainty, k = 1, Gy; :mod:`voxeldose.voxeluncertainty`) and
    what it holds (or why there is none): Poisson counting noise of every voxel through the voxel TIA and the
    squared kernel, plus the camera profile's calibration uncertainty as a relative term common to all voxels."""
    cam = spec.camera
    from_profile = cam is not None and spec.calibration.cps_per_mbq in (None, cam.sensitivity_cps_per_mbq)
    cal_u = cam.sensitivity_u_cps_per_mbq / cam.sensitivity_cps_per_mbq if cam is not None and from_profile else None
    cal_u = cal_u if cal_u else None
    if kin.voxel_flags is None:
        return None, "not evaluated: single-time-point voxel TIA"
    durations = [q.acquisition_duration_s for q in quants]
    cps = spec.cps_per_mbq
    counted = cps is not None and len(durations) == len(kin.times_s) and all(d is not None and d > 0 for d in durations)
    if not counted and cal_u is None:
        return (
            None,
            "not evaluated: neither the counts behind the image (calibration, durations) nor a calibration uncertainty are known",
        )
    variance = None
    parts = []
    if counted:
        stack = corr.stack if corr is not None and corr.stack is not None else np.stack([a.array for a in kin.activity])
        var_a = voxeluncertainty.counting_variance(stack, float(cps or 0.0), [float(d or 0.0) for d in durations])
        var_tia = voxeluncertainty.voxel_tia_variance(
            stack, kin.times_s, var_a, decay_constant_per_s=lam, method=spec.fit.voxel_method
        )
        tia_var = Volume(var_tia, kin.tia.affine, kin.tia.frame_of_reference_uid, "Bq2.s2")
        variance = voxeluncertainty.dose_variance(
            tia_var,
            str(dosed.dose.meta.get("nuclide", "Lu-177")),
            spec.dose.method,
            dosed.density if spec.dose.method != "dvk" else None,
            medium=spec.dose.medium,
            kernel_size=spec.dose.kernel_size,
        )
        parts.append(
            "Poisson counting noise per voxel and scan (independent voxels: a lower bound for OSEM's correlated "
            "noise) through the voxel TIA, convolved with the squared kernel"
        )
    if cal_u is not None:
        parts.append(f"calibration {100 * cal_u:.3g} % (camera profile) common to all voxels, in quadrature")
    u = voxeluncertainty.dose_uncertainty(dosed.dose, variance, [cal_u])
    note = "standard uncertainty (k = 1) of the voxel dose, Gy: " + "; ".join(parts) + "; dose factor not stated"
    return u, note


def _with_dvh_bands(
    voi_out: dict[str, VoiMetrics], vois: dict[str, VOI], dose: Volume, u: Volume | None
) -> dict[str, VoiMetrics]:
    """Each VOI's per-voxel DVH band (:func:`voxeldose.voxeluncertainty.dvh_band`) when there is a map."""
    if u is None:
        return voi_out
    out = {}
    for name, m in voi_out.items():
        b = voxeluncertainty.dvh_band(dose.array, u.array, vois[name].fraction)
        band = None
        if b is not None:
            band = DvhBand(
                dose_gy=[round(float(v), 6) for v in b.dose_gy],
                volume_fraction_lower=[round(float(v), 6) for v in b.lower],
                volume_fraction_upper=[round(float(v), 6) for v in b.upper],
                coverage_factor=b.coverage_factor,
                definition=voxeluncertainty.BAND_MEANING,
            )
        out[name] = m.model_copy(update={"dvh_band": band})
    return out


def _marrow(vois: dict[str, VoiMetrics], spec: JobSpec, lam: float) -> Marrow:
    """Red-marrow dose: image-based from the first marrow VOI; blood-based when the job has samples."""
    image = None
    for name, e in vois.items():
        if e.role == "marrow":
            d = metrics.marrow_image_based(e.mean_gy, recovery_coefficient=spec.marrow.recovery_coefficient)
            image = MarrowImageBased.model_validate({"voi": name, **d})
            break
    blood = None
    if spec.marrow.blood_samples:
        samples = [(s.hours_after_injection * 3600.0, s.bq_per_ml) for s in spec.marrow.blood_samples]
        blood = MarrowBloodBased.model_validate(
            metrics.marrow_blood_based(samples, rmblr=spec.marrow.rmblr, decay_constant_per_s=lam)
        )
    return Marrow(image_based=image, blood_based=blood)


# =========================================================================================== run
@contextmanager
def _stage(name: str, progress: Progress | None, timings: dict[str, float]) -> Iterator[None]:
    """Announce a stage and record its wall time (s) in ``timings``."""
    _emit(progress, name)
    t = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t


def run(spec: JobSpec | dict[str, Any], *, progress: Progress | None = None) -> Result:
    """Run the whole dosimetry for one cycle.  Raises :class:`VoxeldoseError` on bad input."""
    spec = _as_spec(spec)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    with _stage("ingest", progress, timings):
        ing = _ingest(spec, warnings)
    lam = ing.nuclide.decay_constant_per_s
    with _stage("quantify", progress, timings):
        quant = _quantify(ing.cycle, spec, lam)
    with _stage("register", progress, timings):
        aligned, registrations = _register(ing, spec, quant, progress, warnings)
    ref_ct = quant.cts[ing.ref_n]
    with _stage("vois", progress, timings):
        vois = _vois(ing.voi_series, aligned[ing.ref_n].grid, ref_ct, warnings)
    activity = _activity(aligned)
    with _stage("pvc", progress, timings):
        corr = _pvc(spec, ing.cycle, activity, vois, _resampling_maps(ing, quant, aligned), warnings)
    with _stage("time-activity", progress, timings):
        kin = _time_activity(ing.cycle, spec, activity, vois, lam, warnings, corr)
    with _stage("dose", progress, timings):
        dosed = _dose(spec, ing.nuclide, kin.tia, ref_ct, vois, warnings)
    with _stage("dose uncertainty", progress, timings):
        dose_u, dose_u_note = _dose_uncertainty(spec, kin, corr, dosed, quant.records, lam)
    a_inj = ing.cycle.injection.activity_bq
    with _stage("metrics", progress, timings):
        voi_out = _metrics(spec, vois, kin, dosed, a_inj, lam, warnings, corr, quant.records)
        voi_out = _with_dvh_bands(voi_out, vois, dosed.dose, dose_u)
        _check_plausible(voi_out, ing.ref_tp.spect.instances[0].path)
        marrow = _marrow(voi_out, spec, lam)
        date = ing.cycle.injection.start.date()
        cumulative = cumulative_summary(
            voi_out, marrow, spec, injection_date=date, activity_bq=a_inj, warnings=warnings
        )
    summary = Summary(
        patient=Patient(id=ing.cycle.patient_id, name=ing.cycle.patient_name),
        cycle=CycleInfo(number=spec.cycle_number, injection=_injection(ing.cycle, spec)),
        reference_timepoint=ing.ref_n,
        timepoints=_timepoints(ing.cycle, quant.records, registrations, quant.reconstructions),
        methods=_methods(
            spec, quant.records, kin.method_note, dosed, ing.voi_series, corr, kin.single_time_point
        ).model_copy(update={"dose_uncertainty": dose_u_note}),
        vois=voi_out,
        marrow=marrow,
        cumulative=cumulative,
        warnings=warnings,
        provenance=_provenance(spec, ing, quant, dosed, timings, time.perf_counter() - t_start),
    )
    _emit(progress, "done", 1.0)
    return Result(
        spec,
        summary,
        dosed.dose,
        kin.tia,
        kin.activity,
        vois,
        ref_ct,
        ing.cycle,
        ing.ref_tp,
        kin.fits,
        kin.quality,
        dose_uncertainty=dose_u,
    )


# =========================================================================================== summary parts
def _injection(cycle: Cycle, spec: JobSpec) -> Injection:
    """The injection with the source of each value (``caller`` where the job gave it)."""
    inj = cycle.injection
    return Injection(
        datetime=inj.start.isoformat(),
        datetime_source=inj.start_source,
        activity_MBq=inj.activity_bq / 1e6,
        activity_source=inj.activity_source,
        nuclide=inj.nuclide,
        nuclide_source="caller" if spec.injection.nuclide is not None else NUCLIDE_TAG,
        radiopharmaceutical=inj.radiopharmaceutical,
        radiopharmaceutical_source=None if inj.radiopharmaceutical is None else RADIOPHARMACEUTICAL_TAG,
    )


def _timepoints(
    cycle: Cycle,
    quants: list[Quantification],
    registrations: list[Registration],
    reconstructions: list[SpectReconstruction],
) -> list[TimePointRecord]:
    return [
        TimePointRecord(
            hours=tp.hours_after_injection,
            acquisition_datetime=tp.acquisition.isoformat(),
            acquisition_time_source=tp.acquisition_source,
            spect_series_uid=tp.spect.series_instance_uid,
            ct_series_uid=None if tp.ct is None else tp.ct.series_instance_uid,
            quantification=q,
            registration=r,
            reconstruction=m,
        )
        for tp, q, r, m in zip(cycle.timepoints, quants, registrations, reconstructions)
    ]


def _methods(
    spec: JobSpec,
    quants: list[Quantification],
    voxel_tia: str,
    dosed: _Dosed,
    voi_series: Series,
    corr: _Corrected | None = None,
    single_time_point: SingleTimePoint | None = None,
) -> Methods:
    quantification = {
        f"counts → Bq/ml with {q.calibration_cps_per_mbq} cps/MBq (MIRD 26), decay during acquisition corrected"
        if q.pixel_mode == "counts"
        else f"{q.pixel_mode}: {q.decay_correction}"
        for q in quants
    }
    return Methods(
        quantification="; ".join(sorted(quantification)),
        fit=spec.fit.model,
        voxel_tia=voxel_tia,
        dose=spec.dose.method,
        medium=spec.dose.medium,
        kernel_id=dosed.kernel_id,
        kernel_density_g_cm3=dosed.kernel_density_g_cm3,
        dose_grid="reference SPECT grid, CT frame of reference",
        voi_source=f"{voi_series.kind.upper()} {voi_series.series_instance_uid}",
        pvc=PvcRecord.none() if corr is None else corr.record,
        single_time_point=single_time_point,
    )


def _provenance(
    spec: JobSpec, ing: _Ingested, quant: _Quantified, dosed: _Dosed, timings: dict[str, float], total_s: float
) -> Provenance:
    return Provenance(
        software=_versions(),
        kernel_id=dosed.kernel_id,
        nuclide=NuclideData(
            name=ing.nuclide.name, half_life_s=ing.nuclide.half_life_s, data="ICRP-107 (icrp107-database)"
        ),
        calibration=CalibrationRecord(
            cps_per_mbq=spec.cps_per_mbq, source=spec.calibration_source, applied=quant.applied
        ),
        inputs=input_set(ing.cycle),
        spec=spec,
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        total_s=round(total_s, 3),
    )


def _versions() -> dict[str, str]:
    out = {"voxeldose": __version__, "python": platform.python_version()}
    for dist in ("numpy", "scipy", "pydicom", "highdicom", "SimpleITK", "icrp107-database", "xraylib", "pydantic"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _emit(progress: Progress | None, stage: str, frac: float = 0.0) -> None:
    if progress is not None:
        progress(stage, frac)
    log.info("stage %s %.0f%%", stage, 100 * frac)


# =========================================================================================== helpers
def _fit_summary(fr: FitResult, times_s: np.ndarray) -> TimeActivity:
    """The fit as ``summary.json`` records it, with its curve sampled for plotting."""
    d = fr.to_dict()
    t_max = max(float(times_s[-1]) * 1.5, 24 * 3600.0)
    tt = np.linspace(0.0, t_max, 121)
    try:
        curve = np.asarray(fr.activity(tt), dtype=float)
        d["curve"] = {"times_h": (tt / 3600).round(4).tolist(), "activity_mbq": (curve / 1e6).tolist()}
    except Exception:  # noqa: BLE001 - a curve is a nicety for the report
        pass
    d.setdefault("times_h", (np.asarray(times_s) / 3600).tolist())
    return TimeActivity.model_validate(d)


def _bed_kinetics(
    fr: VoiFit | None, times_s: np.ndarray, lam: float, spec: JobSpec, name: str | None = None
) -> tuple[list[tuple[float, float]] | None, str]:
    """The dose-rate shape for the Lea–Catcheside factor: the VOI's fitted exponentials when it has them;
    for a trapezoid fit, a mono-exponential with the effective rate of its last two scans (at least the
    physical rate) — Dale 1985's mono-exponential form; for one time point, the effective half-life the
    single-time-point method assumes (Hänscheid: T_eff = t; Madsen: the given population value)."""
    if isinstance(fr, FitResult) and fr.exponentials:
        return list(fr.exponentials), f"{fr.model} fit"
    if isinstance(fr, TimeActivity) and fr.model == "stp":
        prior = spec.fit.prior.vois.get(name or "") if spec.fit.stp_method == "prior" and spec.fit.prior else None
        if prior is not None and spec.fit.prior is not None:
            return list(prior.terms()), f"the patient's own curve from the earlier result ({spec.fit.prior.source})"
        if spec.fit.stp_method in ("hanscheid", "prior"):
            k = math.log(2) / float(times_s[0])
            return [(1.0, k)], "mono-exponential with T_eff = scan time (the Hänscheid 2018 assumption)"
        teff = spec.fit.stp_effective_half_life_h.get("default")
        if teff:
            return [
                (1.0, math.log(2) / (teff * 3600.0))
            ], f"mono-exponential with the population T_eff {teff} h (Madsen 2018)"
        return None, "no effective half-life for the single time point"
    if isinstance(fr, FitResult) and len(fr.activities_bq) >= 2:
        a1, a2 = fr.activities_bq[-2], fr.activities_bq[-1]
        t1, t2 = fr.times_s[-2], fr.times_s[-1]
        k = lam
        if a1 > 0 and a2 > 0 and a2 < a1:
            k = max(lam, math.log(a1 / a2) / (t2 - t1))
        return [(1.0, k)], "mono-exponential approximation from the last two scans (trapezoid fit has no exponentials)"
    return None, "no time-activity fit for this VOI"


#: Expected error of each single-time-point method, as published (timeactivity module docstring).
STP_EXPECTED_ERROR: dict[str, tuple[str, list[str]]] = {
    "hanscheid": (
        "exact for a mono-exponential with T_eff = t or t/2, up to +6.2 % for T_eff between t/2 and t, "
        "increasingly low outside that range",
        ["Hänscheid et al. 2018, J Nucl Med 59(1):75-81"],
    ),
    "madsen": (
        "exact for a mono-exponential with the population T_eff; off by the patient's deviation from it "
        "(177Lu kidney STP errors < 30 %, J Nucl Med 2021;62(7):1006)",
        ["Madsen et al. 2018, Med Phys 45:2318", "J Nucl Med 2021;62(7):1006, PMC8882881"],
    ),
    "prior": (
        "kidneys: 2 % mean deviation from full imaging with a 24 h scan, 13 % with a 4 h scan, cycle-1 "
        "half-life (EJNMMI Phys 2018); dose ratio to full imaging median 1.01, IQR 0.98-1.04, with a 1 d scan "
        "and the initial cycle's T_eff (EJNMMI Phys 2022)",
        [
            "Feasibility and accuracy of single time point imaging for renal dosimetry following "
            "177Lu-DOTATATE ('Lutate') therapy, EJNMMI Phys 2018, doi:10.1186/s40658-018-0232-9",
            "Simplified dosimetry for kidneys and tumors in 177Lu-labeled peptide receptor radionuclide therapy, "
            "EJNMMI Phys 2022, doi:10.1186/s40658-022-00473-z",
        ],
    ),
}


def _stp_record(method: str, t_s: float, vois: dict[str, str], source: str | None = None) -> SingleTimePoint:
    error, references = STP_EXPECTED_ERROR[method]
    return SingleTimePoint.model_validate(
        {
            "method": method,
            "scan_h": t_s / 3600.0,
            "prior_source": source,
            "vois": vois,
            "expected_error": error,
            "references": references,
        }
    )


def _stp_tia(
    a: np.ndarray, t_s: float, spec: JobSpec, vois: dict[str, VOI], warnings: list[str]
) -> tuple[np.ndarray, str, SingleTimePoint]:
    """Voxel TIA from one time point (Hänscheid et al. 2018, Madsen et al. 2018 with a population T_eff, or the
    patient's own earlier-cycle curve per VOI: :func:`_stp_prior_factor`)."""
    if spec.fit.stp_method == "hanscheid":
        return (
            np.asarray(timeactivity.stp_hanscheid(a, t_s)),
            "single time point, Hänscheid et al. 2018",
            _stp_record("hanscheid", t_s, dict.fromkeys(vois, "hanscheid")),
        )
    if spec.fit.stp_method == "prior":
        factor, per_voi, source = _stp_prior_factor(a.shape, t_s, spec, vois, warnings)
        return (
            a * factor,
            f"single time point, the patient's own kinetics per VOI from {source} (Hänscheid 2018 elsewhere)",
            _stp_record("prior", t_s, per_voi, source),
        )
    teff = spec.fit.stp_effective_half_life_h.get("default")
    if teff is None:  # blocking_problems says so first
        raise VoxeldoseError(
            "the Madsen single-time-point method needs a population effective half-life",
            tag="fit.stp_effective_half_life_h",
            expected="e.g. {'default': 50.0} (hours)",
        )
    return (
        np.asarray(timeactivity.stp_madsen(a, t_s, teff * 3600.0)),
        f"single time point, Madsen et al. 2018, T_eff {teff} h",
        _stp_record("madsen", t_s, dict.fromkeys(vois, f"madsen (T_eff {teff} h)")),
    )


def _stp_prior_factor(
    shape: tuple[int, ...], t_s: float, spec: JobSpec, vois: dict[str, VOI], warnings: list[str]
) -> tuple[np.ndarray, dict[str, str], str]:
    """TIA / A(t) per voxel from the earlier cycle's curves (:func:`voxeldose.timeactivity.stp_prior_factor`).

    A voxel takes the factor of the smallest VOI that holds it (VOIs painted largest first, each blending in by
    its occupancy, so a kidney inside the body outline takes the kidney's curve); voxels outside every VOI, and
    VOIs without a prior (with a warning), take Hänscheid 2018's 2t/ln 2.  No VOI of this cycle in the
    prior is an error (names that do not match are a mistake, not a fallback)."""
    prior = spec.fit.prior
    if prior is None:  # the spec's validator demands it
        raise VoxeldoseError("stp_method 'prior' needs fit.prior", tag="fit.prior")
    matched = [n for n in vois if n in prior.vois]
    if not matched:
        raise VoxeldoseError(
            f"no VOI of this cycle has kinetics in the earlier result ({prior.source})",
            tag="fit.prior.vois",
            expected="VOI names of the earlier result: " + ", ".join(sorted(prior.vois)),
            found=", ".join(sorted(vois)),
        )
    hanscheid = 2.0 * t_s / math.log(2)
    factor = np.full(shape, hanscheid, dtype=np.float64)
    per_voi: dict[str, str] = {}
    for name in sorted(vois, key=lambda n: -float(vois[n].fraction.sum())):
        pv = prior.vois.get(name)
        if pv is None:
            warnings.append(f"VOI {name!r}: no kinetics in the earlier result; its TIA is Hänscheid 2018's")
            per_voi[name] = "hanscheid (no prior for this VOI)"
            f_v = hanscheid
        else:
            try:
                f_v = timeactivity.stp_prior_factor(t_s, pv.terms())
            except VoxeldoseError as err:
                raise VoxeldoseError(
                    f"VOI {name!r}: {err.reason}", tag=f"fit.prior.vois.{name}", expected=err.expected
                ) from None
            per_voi[name] = f"prior ({pv.model or 'curve'} of {prior.source}): TIA = A(t) x {f_v / 3600.0:.4g} h"
        occ = vois[name].fraction
        factor = factor * (1.0 - occ) + f_v * occ
    return factor, per_voi, prior.source


def write_outputs(result: Result, out_dir: str | Path) -> dict[str, Path]:
    """Write ``rtdose.dcm``, ``summary.json`` and ``report.html`` into ``out_dir``."""
    return write_all(result, Path(out_dir))
