"""Benchmark: ingest of the default 4-time-point synthetic patient (target < 10 s on 2 cores).

    .venv/bin/python benchmarks/bench_ingest.py [--dir DIR]   # writes the phantom first if DIR lacks it

Times (1) scan + grouping (every file read whole, checked and indexed) and (2) reading every SPECT and CT
volume, and the VOIs on the reference SPECT grid.  Prints one line per stage and the total.  When it writes the
phantom, it also prints how long writing the default phantom took (target < 60 s on 2 cores; a benchmark, not a
test, since a busy machine can take longer).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from voxeldose.ingest import load_cycle, read_ct, read_spect, scan
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.voi import load_vois


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="vd-bench-"))
    if not (root / "dicom").exists():
        t = time.perf_counter()
        write_phantom(root, PhantomSettings())
        print(
            f"default phantom written in {time.perf_counter() - t:.1f} s (target < 60 s; not part of the ingest figure)"
        )
    files = sum(1 for _ in (root / "dicom").rglob("*.dcm"))
    t0 = time.perf_counter()
    index = scan(root / "dicom")
    cycle = load_cycle(index)
    t1 = time.perf_counter()
    for tp in cycle.timepoints:
        read_spect(tp.spect)
        if tp.ct is not None:
            read_ct(tp.ct)
    t2 = time.perf_counter()
    ref = read_spect(cycle.timepoints[0].spect).volume.grid
    vois = load_vois(cycle.vois[0], ref)
    t3 = time.perf_counter()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {os.cpu_count()} cores, {cpu}")
    print(f"files: {files}; time points: {len(cycle.timepoints)}; VOIs: {len(vois)} from {cycle.vois[0].kind}")
    print(f"scan + group:        {t1 - t0:6.2f} s")
    print(f"read SPECT + CT:     {t2 - t1:6.2f} s")
    print(f"VOIs on SPECT grid:  {t3 - t2:6.2f} s")
    print(f"ingest total:        {t3 - t0:6.2f} s  (target < 10 s)")


if __name__ == "__main__":
    main()
