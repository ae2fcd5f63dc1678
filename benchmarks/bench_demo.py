"""Benchmark: the main job (``voxeldose demo``'s dosimetry) on the default 4-time-point phantom.

    .venv/bin/python benchmarks/bench_demo.py [--dir DIR]

Targets (Dosimetry pipeline issue): < 20 s on 2 cores excluding phantom generation, peak memory < 4 GB.
The phantom is written first (not timed) unless DIR already holds one; then a fresh Python process runs
``pipeline.run`` + ``write_outputs`` exactly as the demo does, and its wall time, per-stage times and
peak resident memory (ru_maxrss of that process) are printed, and the registration error of each moving
time point against the phantom's true repositioning (truth.json): the largest displacement, over the
reference body, between where the registration puts the anatomy and where it is (mm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from voxeldose.pipeline import run, write_outputs
root = sys.argv[1]
truth = json.load(open(root + "/truth/truth.json"))
r = run({"inputs": [root + "/dicom"], "calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}})
t1 = time.perf_counter()
write_outputs(r, root + "/bench-out")
t2 = time.perf_counter()
# registration error against the phantom's true repositioning T_n (reference anatomy q -> scanner point T_n q):
# the largest |M_n T_n q - q| over the reference body (CT voxels above -500 HU, every 2nd along each axis), mm
import numpy as np
ct = r.ct
kji = np.argwhere(np.asarray(ct.array)[::2, ::2, ::2] > -500) * 2
q = ct.index_to_world(kji[:, ::-1].astype(float))
errors = []
for tp, rec in zip(truth["timepoints"], r.summary.timepoints):
    m = rec.registration.moving_to_reference_lps_4x4
    if m is None:
        continue
    t, m = np.asarray(tp["transform_lps_4x4"]), np.asarray(m)
    p = q @ t[:3, :3].T + t[:3, 3]
    errors.append(float(np.linalg.norm(p @ m[:3, :3].T + m[:3, 3] - q, axis=1).max()))
print(json.dumps({"import_and_run_s": t1 - t0, "outputs_s": t2 - t1, "stages": r.summary.provenance.timings_s,
                  "registration_error_mm": errors}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="vd-bench-demo-"))
    if not (root / "truth" / "truth.json").exists():
        from voxeldose.phantom import PhantomSettings, write_phantom

        t = time.perf_counter()
        write_phantom(root, PhantomSettings())
        print(f"phantom written in {time.perf_counter() - t:.1f} s (not timed below)")
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    info = json.loads(res.stdout.strip().splitlines()[-1])
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}")
    print("stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in info["stages"].items()))
    print(f"outputs (RT Dose, summary.json, report.html): {info['outputs_s']:.2f} s")
    errs = ", ".join(f"{e:.2f}" for e in info["registration_error_mm"])
    print(f"registration error vs the true repositioning, max over the body, per moving time point: {errs} mm")
    print(f"wall time of the whole process (start-up, imports, run, outputs): {wall:.1f} s  (target < 20 s)")
    print(f"peak resident memory: {peak_mb:.0f} MB  (target < 4096 MB)")


if __name__ == "__main__":
    main()
