"""Partial-volume correction on the default patient: uncorrected vs rc / gtm / rbv vs the reference dose.

    .venv/bin/python benchmarks/bench_pvc.py                      # default phantom, seed 0, gaussian camera
    .venv/bin/python benchmarks/bench_pvc.py --seeds 0,1,2 --methods gtm,rbv --json out.json
    .venv/bin/python benchmarks/bench_pvc.py --profile-from-calibrate --seeds 0 --methods gtm

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
profile.  The patient's truth is never read for it.
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


def one_seed(seed: int, methods: list[str], root: Path, from_calibrate: bool = False) -> dict[str, Any]:
    st = PhantomSettings(seed=seed)
    out = root / f"seed{seed}"
    profile = calibrated_profile(st, root / f"calib{seed}") if from_calibrate else design_profile(st)
    write_phantom(out, st)
    truth = json.loads((out / "truth" / "truth.json").read_text())
    ref = truth["reference_dose"]["voi_mean_gy"]
    camera = profile.model_dump(mode="json", by_alias=True)
    rows: dict[str, Any] = {
        "seed": seed,
        "profile": {
            "source": "voxeldose calibrate" if from_calibrate else "design values",
            "sensitivity_cps_per_mbq": profile.sensitivity_cps_per_mbq,
            "fwhm_mm": profile.fwhm_mm,
        },
        "reference_gy": {n: ref[n] for n in VOIS},
        "runs": {},
    }
    for method in ["none", *methods]:
        t = time.perf_counter()
        result = run({"inputs": [str(out / "dicom")], "pvc": method, "camera": camera})
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


def table(results: list[dict[str, Any]], methods: list[str]) -> str:
    lines = []
    for r in results:
        runs = r["runs"]
        prof = r.get("profile", {})
        lines.append(
            f"seed {r['seed']}: mean dose / reference dose (profile: {prof.get('source', 'design values')}, "
            f"{prof.get('sensitivity_cps_per_mbq', float('nan')):.4f} cps/MBq, FWHM {prof.get('fwhm_mm') or float('nan'):.2f} mm)"
        )
        lines.append("| VOI | ml | reference Gy | uncorrected | " + " | ".join(methods) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(methods))
        for n in VOIS:
            ref = r["reference_gy"][n]
            cells = [f"{runs[m]['mean_gy'][n] / ref:.3f}" for m in ["none", *methods]]
            lines.append(f"| {n} | {runs['none']['volume_ml'][n]:.1f} | {ref:.2f} | " + " | ".join(cells) + " |")
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
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="bench-pvc-") as tmp:
        results = [one_seed(int(s), methods, Path(tmp), args.profile_from_calibrate) for s in args.seeds.split(",")]
    print(table(results, methods))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
