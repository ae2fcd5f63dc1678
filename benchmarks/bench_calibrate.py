"""Benchmark: ``voxeldose calibrate`` on the default-size cylinder and NEMA IEC phantoms (issue 12 parts 1–2).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_calibrate.py [--camera gaussian|osem] [--dir DIR] [--seed N]

Writes both phantoms with the default :class:`voxeldose.phantom.PhantomSettings` (128 × 128 × 96 SPECT at
4.8 mm, the patient's camera; ``--camera osem`` takes minutes per phantom), calibrates from them, and prints the
timings, the sensitivity ± u (k = 1) against the camera's 5.67 cps/MBq, the effective FWHM ± u against the
Gaussian camera's 11 mm, the RC of each sphere and the recovery fit, as a Markdown table row for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from voxeldose.calibrate import calibrate
from voxeldose.calphantom import CalibrationPhantom, PhantomKind, write_calibration_phantom
from voxeldose.phantom import PhantomSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--camera", choices=["gaussian", "osem"], default="gaussian")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.camera == "osem":
        import torch

        torch.set_num_threads(2)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-calibrate-"))
    st = replace(PhantomSettings(), camera=args.camera, seed=args.seed)
    times = {}
    kinds: tuple[PhantomKind, ...] = ("cylinder", "iec")
    for kind in kinds:
        t0 = time.perf_counter()
        if not (root / kind / "dicom").is_dir():
            write_calibration_phantom(root / kind, CalibrationPhantom(kind), st)
        times[f"write_{kind}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = calibrate([root / "cylinder", root / "iec"])
    times["calibrate_s"] = time.perf_counter() - t0
    p = res.profile
    fit = p.recovery_fit
    out = {
        "camera": args.camera,
        "seed": args.seed,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "sensitivity_cps_per_mbq": [round(p.sensitivity_cps_per_mbq, 4), round(p.sensitivity_u_cps_per_mbq, 4)],
        "sensitivity_poisson_u": round(res.sensitivity.u_poisson, 4),
        "true_cps_per_mbq": st.calibration_cps_per_mbq,
        "fwhm_mm": [round(p.fwhm_mm or 0, 2), round(p.fwhm_u_mm or 0, 2)],
        "fwhm_scale": [round(res.iec.fwhm_scale, 3), round(res.iec.fwhm_scale_u, 3)] if res.iec else None,
        "rc": {pt.label: [round(pt.rc, 3), round(pt.rc_u, 3)] for pt in p.recovery},
        "fit": None if fit is None else {"rc_max": fit.rc_max, "v_half_ml": fit.v_half_ml, "slope": fit.slope},
        "dir": str(root),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
