"""Throughput of the DICOM node: dcmtk ``storescu`` sends the default phantom (~926 instances) to a
node started in this process (SQLite in a temporary data folder); prints instances/s.

    .venv/bin/python benchmarks/bench_dicom_node.py [--dir /tmp/bench-phantom] [--nagle]

``storescu`` runs with ``TCP_NODELAY=1`` in its environment (dcmtk reads it) unless ``--nagle``: with
Nagle's algorithm on the sender every instance waits for a delayed ACK (~40-90 ms on Linux loopback),
which limits *any* SCP (dcmtk's own storescp included) to ~10-20 instances/s.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="phantom folder (written when it has no dicom/)")
    p.add_argument("--nagle", action="store_true", help="leave storescu's Nagle algorithm on (dcmtk default)")
    args = p.parse_args()
    if shutil.which("storescu") is None:
        print("storescu (dcmtk) not found", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)

    from service.config import Settings
    from service.dicom_node import DicomNode
    from service.store import Store
    from voxeldose.phantom import PhantomSettings, write_phantom

    work = Path(tempfile.mkdtemp(prefix="bench-dicom-node-"))
    phantom = args.dir or work / "phantom"
    if not (phantom / "dicom").exists():
        t = time.perf_counter()
        write_phantom(phantom, PhantomSettings())
        print(f"phantom written in {time.perf_counter() - t:.1f} s")
    files = [f for f in (phantom / "dicom").rglob("*") if f.is_file()]
    size_mb = sum(f.stat().st_size for f in files) / 1e6

    settings = Settings(data_dir=work / "data", dicom_port=0, dicom_allowed_aets=["BENCH"], dicom_min_free_mb=0)
    settings.ensure_dirs()
    store = Store(settings.database_url)
    store.migrate()
    from service.trigger import Trigger

    trigger = Trigger(settings, store)
    node = DicomNode(settings, store, trigger)  # as `voxeldose serve` runs it: every patient marked for the trigger
    node.start()
    env = dict(os.environ)
    if not args.nagle:
        env["TCP_NODELAY"] = "1"
    try:
        t = time.perf_counter()
        r = subprocess.run(
            [
                "storescu",
                "-aet",
                "BENCH",
                "-aec",
                settings.dicom_ae_title,
                "-R",
                "+sd",
                "+r",
                "127.0.0.1",
                str(node.port),
                str(phantom / "dicom"),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - t
    finally:
        node.stop()
    n = store.count_instances()
    t = time.perf_counter()
    from service.models import utcnow

    decisions = trigger.tick(utcnow())  # the association was released: due at once
    t_trigger = time.perf_counter() - t
    store.dispose()
    shutil.rmtree(work / "data", ignore_errors=True)
    if r.returncode != 0 or n != len(files) or [d.state for d in decisions] != ["started"]:
        print(f"FAILED: storescu rc={r.returncode}, {n}/{len(files)} stored\n{r.stderr[-2000:]}", file=sys.stderr)
        return 1
    print(
        f"{n} instances ({size_mb:.0f} MB) in {wall:.2f} s: {n / wall:.0f} instances/s, {size_mb / wall:.1f} MB/s"
        f" (storescu {'with Nagle' if args.nagle else 'TCP_NODELAY=1'})"
    )
    print(f"trigger after the release: {[d.state for d in decisions]} in {t_trigger:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
