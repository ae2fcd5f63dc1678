"""Partial-volume correction on the default patient: uncorrected vs rc / gtm / rbv vs the reference dose.

    .venv/bin/python benchmarks/bench_pvc.py                      # default phantom, seed 0, gaussian camera
    .venv/bin/python benchmarks/bench_pvc.py --seeds 0,1,2 --methods gtm,rbv --json out.json
    .venv/bin/python benchmarks/bench_pvc.py --profile-from-calibrate --seeds 0 --methods gtm
    .venv/bin/python -u benchmarks/bench_pvc.py --camera osem --profile-from-calibrate --seeds 0,1,2 \
        --methods rc,gtm,rbv --workdir /tmp/bench-pvc-osem --json /tmp/bench-pvc-osem.json

For each seed: writes the default phantom (``PhantomSettings(seed=…)``, 11 mm Gaussian camera, noise,
repositioning), runs the pipeline once without correction and once per method, and prints per kidney and tumour
the reference mean dose (``truth.json`` ``reference_dose``: the pipeline's kernel on the exact TIA) and each run's
mean dose as a ratio to it; then each run's wall time, its ``pvc`` stage and the time it adds to the
uncorrected run.

The camera profile is the phantom camera's design values (FWHM 11 mm, 5.67 cps/MBq), never the patient's truth.
Its recovery curve (for ``rc``) is the analytic mean recovery of uniform spheres of the NEMA IEC sizes
(10–37 mm) in a cold background under that Gaussian (:func:`voxeldose.pvc.sphere_recovery`), fitted with the
profile's model — a stand-in for ``voxeldose calibrate`` on the IEC phantom.

With ``--profile-from-calibrate`` the profile is instead what a site would measure (issue 12's "Done when"): for
each seed the uniform cylinder and the NEMA IEC phantom are written through the SAME camera as the patient
(:func:`voxeldose.calphantom.write_calibration_phantom` with the patient's ``PhantomSettings``) and
``voxeldose calibrate --cylinder … --iec …`` is run on their DICOM alone; its ``camera.json`` is the job's
profile.  The patient's truth is never read for it.  The phantoms are imaged once, with the first seed's settings
(a site calibrates its camera once, not per patient), and every seed's job uses that profile.

``--camera osem`` images the patient and the calibration phantoms through projections and OSEM (issue 11's camera:
``PhantomSettings(camera="osem")``, about 3 min per scan on 2 cores); ``--workdir`` keeps every phantom and run there
and reuses a phantom already written (its ``truth/truth.json`` present), so seeds can be added in later calls.  For
each seed and time point the table also gives the reconstructed total over ``truth.json``'s
``expected_total_counts`` (issue 11's "total activity within 3 %").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy.optimize import curve_fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voxeldose.calphantom import CalibrationPhantom, write_calibration_phantom
from voxeldose.camera import CameraIdentity, CameraProfile, RecoveryFit, RecoveryPoint
from voxeldose.cli import main as voxeldose_main
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run
from voxeldose.pvc import sphere_recovery

IEC_DIAMETERS_MM = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
VOIS = ("Kidney_L", "Kidney_R", "Tumor_1", "Tumor_2", "Tumor_3", "Tumor_4", "Tumor_5")


def design_profile(st: PhantomSettings) -> CameraProfile:
    """The phantom camera's profile from its design values (see the module docstring)."""
    vols = np.array([math.pi / 6 * d**3 / 1000 for d in IEC_DIAMETERS_MM])
    rcs = np.array([sphere_recovery(v, st.fwhm_mm) for v in vols])

    def model(v: np.ndarray, rc_max: float, v_half: float, slope: float) -> np.ndarray:
        return np.asarray(rc_max / (1 + (v_half / v) ** slope))

    p, cov = curve_fit(model, vols, rcs, p0=(1.0, 2.0, 1.0), bounds=((0.1, 1e-3, 0.1), (2.0, 1e3, 5.0)))
    fit = RecoveryFit(
        rc_max=float(p[0]),
        v_half_ml=float(p[1]),
        slope=float(p[2]),
        covariance=tuple(map(tuple, cov.tolist())),
        residuals=[float(r) for r in rcs - model(vols, *p)],
    )
    return CameraProfile(
        name=f"phantom camera, design values (FWHM {st.fwhm_mm:g} mm)",
        identity=CameraIdentity(manufacturer="voxeldose", model="phantom"),
        nuclide=st.radionuclide,
        sensitivity_cps_per_mbq=st.calibration_cps_per_mbq,
        sensitivity_u_cps_per_mbq=0.0,
        fwhm_mm=st.fwhm_mm,
        fwhm_u_mm=0.0,
        recovery=[
            RecoveryPoint(label=f"{d:g} mm", volume_ml=float(v), rc=float(r), rc_u=0.0)
            for d, v, r in zip(IEC_DIAMETERS_MM, vols, rcs)
        ],
        recovery_fit=fit,
        measured="2026-01-01",
        source="analytic spheres 10-37 mm under the design Gaussian (benchmark stand-in for voxeldose calibrate)",
    )


def calibrated_profile(st: PhantomSettings, root: Path) -> CameraProfile:
    """``voxeldose calibrate`` on the cylinder and NEMA IEC phantoms imaged through the camera of ``st``."""
    t = time.perf_counter()
    for kind in ("cylinder", "iec"):
        if not (root / kind / "truth").is_dir():
            write_calibration_phantom(root / kind, CalibrationPhantom(kind), st)
    t_write = time.perf_counter() - t
    out = root / "camera.json"
    rc = voxeldose_main(
        ["calibrate", "--cylinder", str(root / "cylinder"), "--iec", str(root / "iec"), "--out", str(out)]
    )
    if rc != 0:
        raise SystemExit(f"voxeldose calibrate failed ({rc})")
    print(f"calibration phantoms written in {t_write:.1f} s, calibrated in {time.perf_counter() - t - t_write:.1f} s")
    return CameraProfile.load(out)


def one_seed(
    seed: int, methods: list[str], root: Path, profile: CameraProfile | None, camera: str = "gaussian"
) -> dict[str, Any]:
    st = PhantomSettings(seed=seed, camera=camera)  # type: ignore[arg-type]  # checked by argparse's choices
    out = root / f"seed{seed}"
    from_calibrate = profile is not None
    profile = profile if profile is not None else design_profile(st)
    t = time.perf_counter()
    if not (out / "truth" / "truth.json").is_file():
        write_phantom(out, st)
        print(f"seed {seed}: phantom ({camera} camera) written in {time.perf_counter() - t:.1f} s", flush=True)
    truth = json.loads((out / "truth" / "truth.json").read_text())
    ref = truth["reference_dose"]["voi_mean_gy"]
    camera_json = profile.model_dump(mode="json", by_alias=True)
    rows: dict[str, Any] = {
        "seed": seed,
        "profile": {
            "source": "voxeldose calibrate" if from_calibrate else "design values",
            "sensitivity_cps_per_mbq": profile.sensitivity_cps_per_mbq,
            "fwhm_mm": profile.fwhm_mm,
        },
        "camera": camera,
        "reference_gy": {n: ref[n] for n in VOIS},
        "totals": _totals(out, truth),
        "runs": {},
    }
    for method in ["none", *methods]:
        t = time.perf_counter()
        result = run({"inputs": [str(out / "dicom")], "pvc": method, "camera": camera_json})
        wall = time.perf_counter() - t
        s = result.summary
        rows["runs"][method] = {
            "wall_s": wall,
            "pipeline_total_s": s.provenance.total_s,
            "timings_s": s.provenance.timings_s,
            "mean_gy": {n: s.vois[n].mean_gy for n in VOIS},
            "volume_ml": {n: s.vois[n].volume_ml for n in VOIS},
        }
        print(
            f"seed {seed} {method}: {wall:.1f} s (pvc stage {s.provenance.timings_s.get('pvc', 0.0):.2f} s)", flush=True
        )
    return rows


def _totals(out: Path, truth: dict[str, Any]) -> dict[str, float]:
    """Per time point: the written reconstruction's total counts over ``expected_total_counts``."""
    ratios: dict[str, float] = {}
    for tp in truth["timepoints"]:
        spect = out / tp["folder"] / "NM" / "SPECT.dcm"
        if "expected_total_counts" not in tp or not spect.is_file():
            continue
        counts = float(pydicom.dcmread(spect).pixel_array.astype(np.int64).sum())  # counts, as bench_recon reads them
        ratios[f"{tp['hours_after_injection']:g} h"] = counts / float(tp["expected_total_counts"])
    return ratios


def table(results: list[dict[str, Any]], methods: list[str]) -> str:
    lines = []
    for r in results:
        runs = r["runs"]
        prof = r.get("profile", {})
        if r.get("totals"):
            cells = ", ".join(f"{k} {v:.4f}" for k, v in r["totals"].items())
            lines.append(
                f"seed {r['seed']} ({r.get('camera', 'gaussian')} camera): reconstructed / true total: {cells}"
            )
        lines.append(
            f"seed {r['seed']}: mean dose / reference dose (profile: {prof.get('source', 'design values')}, "
            f"{prof.get('sensitivity_cps_per_mbq', float('nan')):.4f} cps/MBq, FWHM {prof.get('fwhm_mm') or float('nan'):.2f} mm)"
        )
        lines.append("| VOI | ml | reference Gy | uncorrected | " + " | ".join(methods) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(methods))
        for n in VOIS:
            ref = r["reference_gy"][n]
            ratios = [f"{runs[m]['mean_gy'][n] / ref:.3f}" for m in ["none", *methods]]
            lines.append(f"| {n} | {runs['none']['volume_ml'][n]:.1f} | {ref:.2f} | " + " | ".join(ratios) + " |")
        base = runs["none"]["pipeline_total_s"]
        lines.append("")
        lines.append("| run | pipeline s | pvc stage s | pvc stage / uncorrected run | run − uncorrected run |")
        lines.append("|---|---:|---:|---:|---:|")
        for m in ["none", *methods]:
            tot = runs[m]["pipeline_total_s"]
            pvc_s = runs[m]["timings_s"].get("pvc", 0.0)
            lines.append(
                f"| {m} | {tot:.1f} | {pvc_s:.2f} | {100 * pvc_s / base:.1f} % | {100 * (tot - base) / base:+.0f} % |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated phantom seeds (default 0)")
    ap.add_argument("--methods", default="rc,gtm,rbv", help="comma-separated pvc methods (default rc,gtm,rbv)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument(
        "--profile-from-calibrate",
        action="store_true",
        help="the camera profile from voxeldose calibrate on the cylinder and NEMA IEC phantoms imaged through the "
        "patient's camera (default: the camera's design values)",
    )
    ap.add_argument("--camera", choices=["gaussian", "osem"], default="gaussian", help="the phantom's camera model")
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) phantoms and runs here")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-pvc-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        profile = None
        if args.profile_from_calibrate:
            st = PhantomSettings(seed=seeds[0], camera=args.camera)
            profile = calibrated_profile(st, root / f"calib-{args.camera}")
        results = []
        for seed in seeds:
            results.append(one_seed(seed, methods, root, profile, args.camera))
            if args.json is not None:  # after every seed: a long run interrupted keeps what it measured
                args.json.write_text(json.dumps(results, indent=2))
    print(table(results, methods))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
