"""Benchmark: SPECT reconstruction from projections (issue 11) — time per time point and total activity vs truth.

    PYTHONPATH=$PWD .venv/bin/python -u benchmarks/bench_recon.py --grid small   [--dir DIR] [--threads N] [--hours H,..]
    PYTHONPATH=$PWD .venv/bin/python -u benchmarks/bench_recon.py --grid default [--dir DIR] [--threads N] [--hours H,..]

Writes the synthetic patient with the projection camera (``camera="osem"``: 120 views, OSEM 4 × 8, SY-ME; the small
or the default grid) unless DIR already holds one, then runs ``voxeldose recon``'s code
(:func:`voxeldose.reconstruction.reconstruct_folders`) on each time point's projections and CT alone, and prints per
time point: the reconstruction time (reading, μ from the CT, OSEM, writing) and the reconstructed total counts over
the truth's (``truth.json``: ``expected_total_counts`` = torso activity × decay during the acquisition × CF ×
T_acq), i.e. total reconstructed activity / true activity (the issue asks for ±3 % on the default patient).  Also
whether the reconstruction equals the one the phantom wrote (max voxel difference).  The load average before and
after is printed: the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.reconstruction import reconstruct_folders


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", choices=["small", "default"], default="small")
    ap.add_argument("--dir", type=Path, default=None, help="phantom folder (written when it lacks dicom/)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--hours", default=None, help="time points, h (default the phantom's 4,24,96,168), e.g. 24")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    root = args.dir or Path(tempfile.mkdtemp(prefix="vd-bench-recon-"))
    if not (root / "dicom").exists():
        base = PhantomSettings.small() if args.grid == "small" else PhantomSettings()
        settings = dataclasses.replace(base, camera="osem")
        if args.hours:
            settings = dataclasses.replace(settings, hours=tuple(float(h) for h in args.hours.split(",")))
        t = time.perf_counter()
        write_phantom(root, settings)
        print(f"phantom (camera osem, {args.grid} grid) written in {time.perf_counter() - t:.1f} s")
    truth = json.loads((root / "truth" / "truth.json").read_text())
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    st = truth["settings"]
    print(f"machine: {os.cpu_count()} cores, {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"grid {st['spect_matrix']}x{st['spect_matrix']}x{st['spect_slices']} at {st['spect_voxel_mm']} mm, "
        f"{2 * st['acquisition']['frames_in_rotation']} views, OSEM {st['osem_iterations']}x{st['osem_subsets']}, "
        f"{st['collimator']}"
    )
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print("| time point | reconstruction s | reconstructed / true activity | max voxel diff vs phantom's |")
    print("|---|---|---|---|")
    out = Path(tempfile.mkdtemp(prefix="vd-bench-recon-out-"))
    for tp in truth["timepoints"]:
        folder = root / tp["folder"]
        t = time.perf_counter()
        (done,) = reconstruct_folders([folder / "NM-PROJ", folder / "CT"], out / folder.name)
        elapsed = time.perf_counter() - t
        mine = pydicom.dcmread(done.output).pixel_array.astype(np.int64)
        written = pydicom.dcmread(folder / "NM" / "SPECT.dcm").pixel_array.astype(np.int64)
        ratio = float(mine.sum()) / tp["expected_total_counts"]
        print(
            f"| {tp['hours_after_injection']:g} h | {elapsed:.1f} | {ratio:.4f} ({100 * (ratio - 1):+.2f} %) "
            f"| {int(np.abs(mine - written).max())} |"
        )
    load1 = os.getloadavg()
    print(f"load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
