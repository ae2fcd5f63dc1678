"""Independent DVH cross-check with dicompyler-core (run in its own virtual environment).

dicompyler-core 0.5.6 does not import with pydicom 3, which voxeldose needs, so this script runs
under a separate interpreter (``.venv-dvh``, see ``tests/test_rtdose.py``)::

    python3 -m venv .venv-dvh
    .venv-dvh/bin/pip install pydicom==2.4.5 dicompyler-core==0.5.6
    .venv-dvh/bin/python tests/dvh_crosscheck.py RS.dcm RD.dcm [--roi NAME ...]

It prints one JSON object ``{roi_name: {"mean_gy", "volume_cc", "max_gy", "min_gy", "roi_number"}}``
computed by ``dicompylercore.dvhcalc.get_dvh(rtstruct, rtdose, roi_number)`` (dicompyler samples
the dose at the dose-grid pixel centres inside each contour, interpolates linearly between dose
planes, and takes the volume from the contour areas × the contour-plane spacing).  It imports
nothing from voxeldose: this is the point of the check.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rtstruct", help="RT Structure Set file")
    ap.add_argument("rtdose", help="RT Dose file")
    ap.add_argument("--roi", action="append", default=None, help="ROI name (repeatable; default: all)")
    ap.add_argument(
        "--interpolation-mm",
        type=float,
        default=None,
        help="in-plane resolution (mm) to resample structure masks and dose to (needs scikit-image; "
        "the dose pixel spacing must be square and a multiple of it)",
    )
    args = ap.parse_args(argv)

    import pydicom
    from dicompylercore import dvhcalc

    rs = pydicom.dcmread(args.rtstruct)
    rd = pydicom.dcmread(args.rtdose)
    rois = {int(r.ROINumber): str(r.ROIName) for r in rs.StructureSetROISequence}
    wanted = set(args.roi) if args.roi else None
    if wanted is not None:
        missing = wanted - set(rois.values())
        if missing:
            print(f"ROI(s) not in the structure set: {sorted(missing)}", file=sys.stderr)
            return 2
    out: dict[str, dict[str, float]] = {}
    for number, name in rois.items():
        if wanted is not None and name not in wanted:
            continue
        dvh = dvhcalc.get_dvh(rs, rd, number, interpolation_resolution=args.interpolation_mm)
        if dvh.volume == 0 or len(dvh.counts) == 0:
            out[name] = {"roi_number": number, "mean_gy": None, "volume_cc": 0.0, "max_gy": None, "min_gy": None}
            continue
        out[name] = {
            "roi_number": number,
            "mean_gy": float(dvh.mean),
            "volume_cc": float(dvh.volume),
            "max_gy": float(dvh.max),
            "min_gy": float(dvh.min),
        }
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
