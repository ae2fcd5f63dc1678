"""The dosimetry pipeline: one entry point, :func:`run`, from DICOM files to doses, metrics and cycles.

    ingest → quantify → register → time-activity (VOI fits, voxel TIA) → dose → metrics → cycles

The CLI (``voxeldose run``), the HTTP service and the Ray workers all call :func:`run` with a
:class:`~voxeldose.spec.JobSpec`; :func:`write_outputs` writes ``rtdose.dcm``, ``summary.json`` and
``report.html``.  Each stage is a plain function of the modules named after it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import VoxeldoseError
from .geometry import Volume, resample
from .ingest import Cycle, TimePoint, load_cycle, read_ct, read_spect, roi_names, scan
from .nuclides import load as load_nuclide
from .spec import JobSpec, radiobiology_for, role_of
from .voi import VOI, load_vois

log = logging.getLogger(__name__)

SUMMARY_SCHEMA = "voxeldose.summary/1"
Progress = Callable[[str, float], None]

#: Stages in order, with their share of a typical run's time (for progress bars).
STAGES: tuple[tuple[str, float], ...] = (
    ("ingest", 0.10),
    ("quantify", 0.05),
    ("register", 0.30),
    ("vois", 0.15),
    ("time-activity", 0.10),
    ("dose", 0.20),
    ("metrics", 0.10),
)


@dataclass
class Result:
    """Everything a run produced.  Volumes are on the reference SPECT grid (the dose grid)."""

    spec: JobSpec
    summary: dict[str, Any]
    dose: Volume  # Gy
    tia: Volume  # Bq·s per voxel
    activity: list[Volume]  # Bq per voxel at each time point, aligned to the reference grid
    vois: dict[str, VOI]
    ct: Volume | None  # reference CT (HU)
    cycle: Cycle
    reference: TimePoint
    fits: dict[str, Any] = field(default_factory=dict)
    tia_quality: np.ndarray | None = None

    @property
    def warnings(self) -> list[str]:
        return list(self.summary.get("warnings", []))


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


def load_spec_cycle(spec: JobSpec, index: Any) -> Cycle:
    """The one cycle of ``index`` (an :class:`~voxeldose.ingest.Index`) with the job's injection overrides."""
    inj = spec.injection
    return load_cycle(
        index,
        patient_id=spec.patient_id,
        injection_start=inj.datetime,
        activity_bq=None if inj.activity_mbq is None else inj.activity_mbq * 1e6,
        nuclide=inj.nuclide,
    )


def _choose_reference(cycle: Cycle, spec: JobSpec) -> int:
    if spec.reference_timepoint is not None:
        if spec.reference_timepoint >= len(cycle.timepoints):
            raise VoxeldoseError(
                f"reference time point {spec.reference_timepoint} does not exist",
                tag="reference_timepoint",
                expected=f"0 … {len(cycle.timepoints) - 1}",
                found=spec.reference_timepoint,
            )
        return spec.reference_timepoint
    fors = {s.frame_of_reference_uid for s in cycle.vois}
    for n, tp in enumerate(cycle.timepoints):
        if tp.spect.frame_of_reference_uid in fors:
            return n
    return 0


def _voi_series(cycle: Cycle, ref: TimePoint, spec: JobSpec):
    cands = [s for s in cycle.vois if s.frame_of_reference_uid == ref.spect.frame_of_reference_uid]
    if spec.voi_source != "auto":
        cands = [s for s in cands if s.kind == spec.voi_source]
    cands.sort(key=lambda s: 0 if s.kind == "rtstruct" else 1)
    if not cands:
        raise VoxeldoseError(
            "no VOIs on the reference time point: an RTSTRUCT or SEG on the reference CT is needed",
            tag="RTSTRUCT/SEG FrameOfReferenceUID",
            expected=f"a structure set or segmentation on frame of reference {ref.spect.frame_of_reference_uid}",
        )
    return cands[0]


def input_fingerprint(cycle: Cycle) -> dict[str, Any]:
    """The input set of a cycle: its series, instance count and a SHA-256 over the sorted SOPInstanceUIDs
    (what the service uses to never run the same input set twice)."""
    series = []
    uids: list[str] = []
    for tp in cycle.timepoints:
        for s in (tp.spect, tp.ct):
            if s is not None:
                series.append(
                    {"kind": s.kind, "series_instance_uid": s.series_instance_uid, "instances": len(s.instances)}
                )
                uids += [i.sop_instance_uid for i in s.instances]
    for s in cycle.vois:
        series.append({"kind": s.kind, "series_instance_uid": s.series_instance_uid, "instances": len(s.instances)})
        uids += [i.sop_instance_uid for i in s.instances]
    digest = hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()
    return {"series": series, "sop_instances": len(uids), "sop_instance_uids_sha256": digest}


def run(spec: JobSpec | dict[str, Any], *, progress: Progress | None = None) -> Result:
    """Run the whole dosimetry for one cycle.  Raises :class:`VoxeldoseError` on bad input."""
    from . import cycles as cycles_mod
    from . import metrics, quantify, register, timeactivity
    from .dose import absorbed_dose, density_on_grid, hu_to_density, medium_density

    if not isinstance(spec, JobSpec):
        from pydantic import ValidationError

        try:
            spec = JobSpec.model_validate(spec)
        except ValidationError as exc:
            msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
            raise VoxeldoseError(f"invalid job description: {msg}", tag="spec") from None
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []

    # ---------------------------------------------------------------- ingest
    _emit(progress, "ingest")
    t = time.perf_counter()
    index = scan(spec.inputs)
    cycle = load_spec_cycle(spec, index)
    for p in index.problems:
        if p.severity == "warning":
            warnings.append(p.message)
    nuclide = load_nuclide(cycle.injection.nuclide)
    lam = nuclide.decay_constant_per_s
    ref_n = _choose_reference(cycle, spec)
    ref_tp = cycle.timepoints[ref_n]
    if spec.dose.method == "dvk-density" and ref_tp.ct is None:
        raise VoxeldoseError(
            "the density-corrected dose needs the reference time point's CT, and it has none",
            path=ref_tp.spect.instances[0].path,
            tag="dose.method",
            expected="a CT with the reference SPECT's FrameOfReferenceUID, or dose.method 'dvk'",
        )
    timings["ingest"] = time.perf_counter() - t

    # ---------------------------------------------------------------- quantify
    _emit(progress, "quantify")
    t = time.perf_counter()
    conc: list[Volume] = []
    quants = []
    cts: list[Volume | None] = []
    for tp in cycle.timepoints:
        img = read_spect(tp.spect)
        c, q = quantify.to_bq_per_ml(
            img,
            decay_constant_per_s=lam,
            calibration_cps_per_mbq=spec.calibration.cps_per_mbq,
            calibration_source=spec.calibration.source,
            acquisition_start=tp.acquisition,
            injection_start=cycle.injection.start,
            decay_correction=str(getattr(tp.spect.first, "DecayCorrection", "") or ""),
        )
        conc.append(c)
        quants.append(q)
        cts.append(read_ct(tp.ct) if tp.ct is not None else None)
    timings["quantify"] = time.perf_counter() - t

    # ---------------------------------------------------------------- register
    _emit(progress, "register")
    t = time.perf_counter()
    ref_grid = conc[ref_n].grid
    ref_ct = cts[ref_n]
    aligned: list[Volume] = []
    registrations: list[dict[str, Any] | None] = []
    for n, (tp, c) in enumerate(zip(cycle.timepoints, conc)):
        _emit(progress, "register", n / len(conc))
        if n == ref_n:
            aligned.append(c)
            registrations.append({"reference": True, "quality": "good", "message": "reference time point"})
            continue
        if spec.registration == "none":
            aligned.append(resample(c, ref_grid, order=1, fill=0.0))
            registrations.append(
                {
                    "quality": "not registered",
                    "message": "registration switched off by the job: scanner coordinates taken as aligned",
                }
            )
            warnings.append(f"time point {tp.hours_after_injection:.1f} h not registered (registration: none)")
            continue
        if cts[n] is None or ref_ct is None:
            raise VoxeldoseError(
                f"time point {tp.hours_after_injection:.1f} h cannot be registered: "
                + ("it has no CT" if cts[n] is None else "the reference time point has no CT"),
                path=tp.spect.instances[0].path,
                tag="CT series with the SPECT's FrameOfReferenceUID",
                expected="a CT per time point (or registration: none in the job)",
            )
        reg = register.register_rigid(ref_ct, cts[n])
        aligned.append(register.align_to_reference(c, ref_grid, reg))
        registrations.append(reg.to_dict())
        if reg.quality != "good":
            warnings.append(f"registration of the {tp.hours_after_injection:.1f} h time point is poor: {reg.message}")
    timings["register"] = time.perf_counter() - t

    # ---------------------------------------------------------------- VOIs
    _emit(progress, "vois")
    t = time.perf_counter()
    voi_series = _voi_series(cycle, ref_tp, spec)
    vois = load_vois(voi_series, ref_grid, default_slab_mm=_slice_thickness(ref_ct))
    for name in roi_names(voi_series):
        if name not in vois:
            warnings.append(
                f"VOI {name!r} has no contours in {voi_series.kind.upper()} {voi_series.description!r}: not evaluated"
            )
    for name in [n for n, v in vois.items() if float(v.fraction.sum()) == 0.0]:
        warnings.append(
            f"VOI {name!r} has no voxel on the dose grid (empty, or outside the SPECT field of view): not evaluated"
        )
        del vois[name]
    if not vois:
        raise VoxeldoseError(
            "the VOI series holds no ROI with contours or segments on the SPECT grid",
            path=voi_series.instances[0].path,
            tag="ROIContourSequence / SegmentSequence",
            expected="at least one contoured ROI or non-empty segment",
        )
    timings["vois"] = time.perf_counter() - t

    # ---------------------------------------------------------------- time-activity
    _emit(progress, "time-activity")
    t = time.perf_counter()
    voxel_ml = ref_grid.voxel_volume_ml
    activity = [a.with_array((a.array * voxel_ml).astype(np.float32), "Bq") for a in aligned]
    times_s = np.array([tp.hours_after_injection * 3600.0 for tp in cycle.timepoints])
    stack = np.stack([a.array for a in activity]).astype(np.float64)
    fits: dict[str, Any] = {}
    roles = {name: role_of(name, spec) for name in vois}
    n_t = len(times_s)
    quality = None
    voxel_flags = None
    if n_t == 1 and spec.fit.model not in ("stp", "auto"):
        raise VoxeldoseError(
            f"the {spec.fit.model!r} time-activity model needs several time points; only one "
            f"({cycle.timepoints[0].hours_after_injection:.1f} h) was given",
            tag="fit.model",
            expected="a single-time-point method: fit.model 'stp' (Hänscheid 2018 or Madsen 2018)",
        )
    if spec.fit.model == "stp" or n_t == 1:
        if n_t != 1 and spec.fit.model == "stp":
            raise VoxeldoseError(
                f"a single-time-point method was requested but {n_t} time points were given",
                tag="fit.model",
                expected="one time point, or a multi-point model (auto, monoexp, biexp, trapezoid)",
            )
        tia_arr, fit_note = _stp_tia(stack[0], times_s[0], spec, timeactivity)
        method_note = fit_note
    else:
        vt = timeactivity.voxel_tia(stack, times_s, decay_constant_per_s=lam, method=spec.fit.voxel_method)
        tia_arr, quality = np.asarray(vt.tia, dtype=np.float64), vt.quality
        voxel_flags = np.asarray(vt.flags)
        method_note = f"voxel-wise {spec.fit.voxel_method}"
    for name, voi in vois.items():
        a_voi = np.array([float((voi.fraction * s).sum(dtype=np.float64)) for s in stack])
        if spec.fit.model == "stp" or n_t == 1:
            fits[name] = {"model": "stp", "times_h": (times_s / 3600).tolist(), "activity_mbq": (a_voi / 1e6).tolist()}
            continue
        try:
            fr = timeactivity.fit_voi(times_s, a_voi, decay_constant_per_s=lam, model=spec.fit.model)
        except VoxeldoseError as err:
            if spec.fit.model != "auto":
                raise VoxeldoseError(f"VOI {name!r}: {err.reason}", tag="fit.model", expected=err.expected) from None
            warnings.append(f"VOI {name!r}: time-activity fit failed ({err.reason})")
            continue
        fits[name] = fr
    tia = Volume(tia_arr, ref_grid.affine, ref_grid.frame_of_reference_uid, "Bq.s")
    timings["time-activity"] = time.perf_counter() - t

    # ---------------------------------------------------------------- dose
    _emit(progress, "dose")
    t = time.perf_counter()
    density = None
    if ref_ct is not None:
        # Outside the CT's field of view (a 61 cm SPECT field is wider than a 50 cm CT reconstruction)
        # the kernel medium's density is assumed, and said when a VOI reaches there.
        fill = medium_density(spec.dose.medium)
        density = density_on_grid(ref_ct.with_array(hu_to_density(ref_ct.array), "g/ml"), ref_grid, fill=float("nan"))
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
    kernel_id = str(dose.meta.get("kernel_id", "")) or None
    timings["dose"] = time.perf_counter() - t

    # ---------------------------------------------------------------- metrics
    _emit(progress, "metrics")
    t = time.perf_counter()
    a_inj = cycle.injection.activity_bq
    dose_arr = np.asarray(dose.array, dtype=np.float64)
    rho = None if density is None else density.array
    voi_out: dict[str, Any] = {}
    for name, voi in vois.items():
        role = roles[name]
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
        if rho is not None:
            m["mass_g"] = float((voi.fraction * rho).sum(dtype=np.float64) * voxel_ml)
            m["notes"] = [n for n in m.get("notes", []) if not n.startswith("no density map")]
            m["mass_source"] = "CT (Schneider et al. 2000 HU→density)"
        entry: dict[str, Any] = {"role": role, "source": voi.source}
        entry.update(m)
        if voxel_flags is not None:
            w = voi.fraction > 0
            phys = float(voi.fraction[w & (voxel_flags == 1)].sum() / max(voi.fraction[w].sum(), 1e-12))
            entry["voxel_tia_physical_decay_tail_fraction"] = phys
            if phys > 0.5 and role in ("kidney", "tumour", "marrow"):
                warnings.append(
                    f"VOI {name!r}: {100 * phys:.0f} % of its voxels have no measurable washout after the "
                    "last scan; their tail assumes physical decay only (an upper bound)"
                )
        fr = fits.get(name)
        rb = radiobiology_for(name, role, spec)
        if fr is not None and not isinstance(fr, dict):
            entry["tia_bqs"] = float(fr.tia_bqs)
            entry["time_activity"] = _fit_summary(fr, times_s)
        elif isinstance(fr, dict):
            entry["time_activity"] = fr
        if rb is not None:
            exps, bed_model = _bed_kinetics(fr, times_s, lam, spec)
            if exps is None:
                warnings.append(f"VOI {name!r}: BED not computed ({bed_model})")
            else:
                g = metrics.lea_catcheside_g(exps, rb.repair_half_time_h * 3600.0)
                b = metrics.bed(entry["mean_gy"], g, rb.alpha_beta_gy)
                entry.update(
                    {
                        "bed_gy": b,
                        "eqd2_gy": metrics.eqd2(b, rb.alpha_beta_gy),
                        "g_factor": g,
                        "alpha_beta_gy": rb.alpha_beta_gy,
                        "repair_half_time_h": rb.repair_half_time_h,
                        "bed_kinetics": bed_model,
                    }
                )
        entry["tia_voxel_sum_bqs"] = float((voi.fraction * tia_arr).sum(dtype=np.float64))
        voi_out[name] = entry
    marrow = _marrow(voi_out, spec, lam, metrics)
    cumulative = _cycles(voi_out, marrow, spec, cycle, cycles_mod, warnings)
    timings["metrics"] = time.perf_counter() - t

    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "patient": {"id": cycle.patient_id, "name": cycle.patient_name},
        "cycle": {
            "number": spec.cycle_number,
            "injection": {
                "datetime": cycle.injection.start.isoformat(),
                "datetime_source": cycle.injection.start_source,
                "activity_MBq": a_inj / 1e6,
                "activity_source": cycle.injection.activity_source,
                "nuclide": cycle.injection.nuclide,
                "radiopharmaceutical": cycle.injection.radiopharmaceutical,
            },
        },
        "reference_timepoint": ref_n,
        "timepoints": [
            {
                "hours": tp.hours_after_injection,
                "acquisition_datetime": tp.acquisition.isoformat(),
                "acquisition_time_source": tp.acquisition_source,
                "spect_series_uid": tp.spect.series_instance_uid,
                "ct_series_uid": None if tp.ct is None else tp.ct.series_instance_uid,
                "quantification": q.to_dict(),
                "registration": r,
            }
            for tp, q, r in zip(cycle.timepoints, quants, registrations)
        ],
        "methods": {
            "quantification": "; ".join(
                sorted(
                    {
                        f"counts → Bq/ml with {q.calibration_cps_per_mbq} cps/MBq (MIRD 26), decay during acquisition corrected"
                        if q.pixel_mode == "counts"
                        else f"{q.pixel_mode}: {q.decay_correction}"
                        for q in quants
                    }
                )
            ),
            "fit": spec.fit.model,
            "voxel_tia": method_note,
            "dose": spec.dose.method,
            "medium": spec.dose.medium,
            "kernel_id": kernel_id,
            "kernel_density_g_cm3": dose.meta.get("medium_density_g_cm3"),
            "dose_grid": "reference SPECT grid, CT frame of reference",
            "voi_source": f"{voi_series.kind.upper()} {voi_series.series_instance_uid}",
        },
        "vois": voi_out,
        "marrow": marrow,
        "cumulative": cumulative,
        "warnings": warnings,
        "provenance": {
            "software": _versions(),
            "kernel_id": kernel_id,
            "nuclide": {
                "name": nuclide.name,
                "half_life_s": nuclide.half_life_s,
                "data": "ICRP-107 (icrp107-database)",
            },
            "calibration": {**spec.calibration.model_dump(), "applied": any(q.pixel_mode == "counts" for q in quants)},
            "inputs": input_fingerprint(cycle),
            "spec": json.loads(spec.model_dump_json()),
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "total_s": round(time.perf_counter() - t_start, 3),
        },
    }
    _emit(progress, "done", 1.0)
    return Result(spec, summary, dose, tia, activity, vois, ref_ct, cycle, ref_tp, fits, quality)


def _fit_summary(fr: Any, times_s: np.ndarray) -> dict[str, Any]:
    d = fr.to_dict() if hasattr(fr, "to_dict") else {}
    t_max = max(float(times_s[-1]) * 1.5, 24 * 3600.0)
    tt = np.linspace(0.0, t_max, 121)
    try:
        curve = np.asarray(fr.activity(tt), dtype=float)
        d["curve"] = {"times_h": (tt / 3600).round(4).tolist(), "activity_mbq": (curve / 1e6).tolist()}
    except Exception:  # noqa: BLE001 - a curve is a nicety for the report
        pass
    d.setdefault("times_h", (np.asarray(times_s) / 3600).tolist())
    return d


def _slice_thickness(ct: Volume | None) -> float | None:
    """Slice spacing of the reference CT, mm: the thickness a single-plane contour stands for."""
    return None if ct is None else float(ct.spacing[2])


def _bed_kinetics(
    fr: Any, times_s: np.ndarray, lam: float, spec: JobSpec
) -> tuple[list[tuple[float, float]] | None, str]:
    """The dose-rate shape for the Lea–Catcheside factor: the VOI's fitted exponentials when it has them;
    for a trapezoid fit, a mono-exponential with the effective rate of its last two scans (at least the
    physical rate) — Dale 1985's mono-exponential form; for one time point, the effective half-life the
    single-time-point method assumes (Hänscheid: T_eff = t; Madsen: the given population value)."""
    if fr is not None and not isinstance(fr, dict) and getattr(fr, "exponentials", None):
        return list(fr.exponentials), f"{fr.model} fit"
    if isinstance(fr, dict) and fr.get("model") == "stp":
        if spec.fit.stp_method == "hanscheid":
            k = math.log(2) / float(times_s[0])
            return [(1.0, k)], "mono-exponential with T_eff = scan time (the Hänscheid 2018 assumption)"
        teff = spec.fit.stp_effective_half_life_h.get("default")
        if teff:
            return [
                (1.0, math.log(2) / (teff * 3600.0))
            ], f"mono-exponential with the population T_eff {teff} h (Madsen 2018)"
        return None, "no effective half-life for the single time point"
    if fr is not None and not isinstance(fr, dict) and len(getattr(fr, "activities_bq", ())) >= 2:
        a1, a2 = fr.activities_bq[-2], fr.activities_bq[-1]
        t1, t2 = fr.times_s[-2], fr.times_s[-1]
        k = lam
        if a1 > 0 and a2 > 0 and a2 < a1:
            k = max(lam, math.log(a1 / a2) / (t2 - t1))
        return [(1.0, k)], "mono-exponential approximation from the last two scans (trapezoid fit has no exponentials)"
    return None, "no time-activity fit for this VOI"


def _stp_tia(a: np.ndarray, t_s: float, spec: JobSpec, timeactivity: Any) -> tuple[np.ndarray, str]:
    if spec.fit.stp_method == "hanscheid":
        return np.asarray(timeactivity.stp_hanscheid(a, t_s)), "single time point, Hänscheid et al. 2018"
    teff = spec.fit.stp_effective_half_life_h.get("default")
    if teff is None:
        raise VoxeldoseError(
            "the Madsen single-time-point method needs a population effective half-life",
            tag="fit.stp_effective_half_life_h",
            expected="e.g. {'default': 50.0} (hours)",
        )
    return (
        np.asarray(timeactivity.stp_madsen(a, t_s, teff * 3600.0)),
        f"single time point, Madsen et al. 2018, T_eff {teff} h",
    )


def _marrow(voi_out: dict[str, Any], spec: JobSpec, lam: float, metrics: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"image_based": None, "blood_based": None}
    for name, e in voi_out.items():
        if e["role"] == "marrow":
            d = metrics.marrow_image_based(e["mean_gy"], recovery_coefficient=spec.marrow.recovery_coefficient)
            out["image_based"] = {"voi": name, **d}
            break
    if spec.marrow.blood_samples:
        samples = [(s.hours_after_injection * 3600.0, s.bq_per_ml) for s in spec.marrow.blood_samples]
        out["blood_based"] = metrics.marrow_blood_based(samples, rmblr=spec.marrow.rmblr, decay_constant_per_s=lam)
    return out


def _cycles(
    voi_out: dict[str, Any], marrow: dict[str, Any], spec: JobSpec, cycle: Cycle, cycles_mod: Any, warnings: list[str]
) -> dict[str, Any]:
    """Cumulative dose across cycles and cycles left.  The kidney figure is the higher of the kidneys'
    mean doses (the limiting kidney; conservative); the marrow figure is the blood-based dose when blood
    samples were given, else the image-based one.  An earlier cycle without dosimetry is estimated from
    this cycle's dose per GBq and that cycle's activity (said in the warnings), never counted as 0 Gy."""
    kid = sorted((e for e in voi_out.values() if e["role"] == "kidney"), key=lambda e: e["mean_gy"], reverse=True)
    a_bq = cycle.injection.activity_bq
    dose: dict[str, float] = {}
    g: dict[str, float] = {}
    bed: dict[str, float] = {}
    ab: dict[str, float] = {}
    if kid:
        k = kid[0]
        dose["kidney"] = float(k["mean_gy"])
        if k.get("g_factor") is not None:
            g["kidney"] = float(k["g_factor"])
            bed["kidney"] = float(k["bed_gy"])
            ab["kidney"] = float(k["alpha_beta_gy"])
    m = marrow.get("blood_based") or marrow.get("image_based")
    if m and m.get("red_marrow_gy") is not None:
        dose["marrow"] = float(m["red_marrow_gy"])
    rows = [
        cycles_mod.CycleDose(
            cycle=spec.cycle_number,
            date=cycle.injection.start.date(),
            activity_bq=a_bq,
            dose_gy=dose,
            g_factor=g,
            bed_gy=bed,
        )
    ]
    estimated: list[dict[str, Any]] = []
    for c in spec.earlier_cycles:
        d = {k: v for k, v in (("kidney", c.kidney_gy), ("marrow", c.marrow_gy)) if v is not None}
        b = {"kidney": c.kidney_bed_gy} if c.kidney_bed_gy is not None else {}
        gg: dict[str, float] = {}
        for organ in ("kidney", "marrow"):
            if organ not in d and organ in dose:
                d[organ] = dose[organ] / a_bq * c.activity_mbq * 1e6
                estimated.append({"cycle": c.number, "organ": organ, "dose_gy": d[organ]})
                warnings.append(
                    f"cycle {c.number} has no {organ} dosimetry: estimated as {d[organ]:.2f} Gy from this "
                    f"cycle's {dose[organ] / (a_bq / 1e9):.3f} Gy/GBq × {c.activity_mbq:.0f} MBq"
                )
        if "kidney" in d and "kidney" not in b and "kidney" in g:
            gg["kidney"] = g["kidney"]
            warnings.append(
                f"cycle {c.number} has no kidney BED: computed from its dose with this cycle's kinetics "
                f"(G = {g['kidney']:.3f})"
            )
        rows.append(
            cycles_mod.CycleDose(
                cycle=c.number, date=c.date, activity_bq=c.activity_mbq * 1e6, dose_gy=d, bed_gy=b, g_factor=gg
            )
        )
    if spec.cycle_number in {c.number for c in spec.earlier_cycles}:
        raise VoxeldoseError(f"cycle {spec.cycle_number} is both this cycle and an earlier one", tag="earlier_cycles")
    cum = cycles_mod.cumulative(rows, alpha_beta_gy=ab)
    lim = spec.limits
    limits = cycles_mod.Limits(
        kidney_dose_gy=lim.kidney_gy,
        kidney_bed_gy_with_risk_factors=lim.kidney_bed_gy_with_risk_factors,
        kidney_bed_gy_without_risk_factors=lim.kidney_bed_gy_without_risk_factors,
        kidney_risk_factors=lim.kidney_risk_factors,
        marrow_dose_gy=lim.marrow_gy,
    )
    left: dict[str, Any] | None = None
    note = None
    if dose:
        left = cycles_mod.cycles_left(
            cumulative_dose_gy=cum["dose_gy"],
            cumulative_bed_gy=cum["bed_gy"],
            dose_per_gbq={k: v / (a_bq / 1e9) for k, v in dose.items()},
            g_factor=g,
            alpha_beta_gy=ab,
            activity_per_cycle_bq=lim.planned_activity_mbq * 1e6,
            limits=limits,
        )
    else:
        note = "no kidney or marrow VOI: cycles left not computed"
    table = []
    for r in cum["per_cycle"]:
        table.append(
            {
                "number": r["cycle"],
                "date": r["date"],
                "activity_MBq": r["activity_bq"] / 1e6,
                "kidney_gy": r["dose_gy"].get("kidney"),
                "kidney_bed_gy": r["bed_gy"].get("kidney"),
                "marrow_gy": r["dose_gy"].get("marrow"),
            }
        )
    return {
        "cycles": table,
        "total": {"dose_gy": cum["dose_gy"], "bed_gy": cum["bed_gy"], "activity_MBq": cum["activity_bq_total"] / 1e6},
        "limits": {
            "kidney_gy": lim.kidney_gy,
            "kidney_bed_gy": limits.kidney_bed_gy,
            "kidney_risk_factors": lim.kidney_risk_factors,
            "marrow_gy": lim.marrow_gy,
            "sources": dict(limits.sources),
        },
        "planned_activity_MBq": lim.planned_activity_mbq,
        "cycles_left": left,
        "notes": cum["notes"] + ([note] if note else []),
        "kidney_figure": "the higher of the kidneys' mean absorbed doses",
        "estimated_earlier_cycles": estimated,
    }


def write_outputs(result: Result, out_dir: str | Path) -> dict[str, Path]:
    """Write ``rtdose.dcm``, ``summary.json`` and ``report.html`` into ``out_dir``."""
    from .outputs import write_all

    return write_all(result, Path(out_dir))
