"""The ``voxeldose`` command line.

    voxeldose phantom --out DIR [--kind patient|cylinder|iec] [--seed N] [--hours 4,24,96,168] [--bqml] [--small]
                      [--camera gaussian|osem]
    voxeldose calibrate DIR [DIR ...] --out camera.json [--name NAME] [--activity-u-percent U]
    voxeldose inspect DIR [--json] [--injection-datetime ISO] [--activity-mbq A] [--nuclide Lu-177]
    voxeldose run DIR [DIR|FILE ...] --out OUT [--calibration CPS_PER_MBQ] [--method dvk|dvk-density|led]
                  [--fit auto|monoexp|biexp|triexp|trapezoid|stp] [--spec job.json]
                  [--camera camera.json] [--pvc none|rc|gtm|rbv]
    voxeldose recon DIR [DIR|FILE ...] --out OUT [--iterations 4] [--subsets 8] [--collimator CODE]
    voxeldose kernel --nuclide Lu-177 --voxel-mm 4.8[,4.8,4.8] --medium soft-tissue --size 51 --out k.npy
    voxeldose demo [--out DIR]

Installed packages add sub-commands through the entry-point group ``voxeldose.commands`` (the
service adds ``voxeldose serve`` and ``voxeldose token``); ``voxeldose --help`` lists them.

Bad input ends with one line ``error: …`` naming the file, the tag and what was expected, and exit
status 2 — never a traceback.  Set ``VOXELDOSE_DEBUG=1`` to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import __version__
from .calibrate import DEFAULT_ACTIVITY_U, calibrate
from .calphantom import CalibrationPhantom, write_calibration_phantom
from .camera import CameraProfile
from .console import run_and_write
from .demo import run_demo
from .errors import VoxeldoseError
from .ingest import Cycle, Problem, group_cycles, scan
from .kernels import kernel_command
from .phantom import PhantomSettings, write_phantom
from .pipeline import blocking_problems, invalid_spec
from .recon import COLLIMATORS
from .reconstruction import reconstruct_folders
from .spec import JobSpec, check_json_depth


def _parse_hours(text: str) -> tuple[float, ...]:
    try:
        hours = tuple(float(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hours expects comma-separated numbers of hours, got {text!r}") from None
    if not hours or any(h <= 0 for h in hours):
        raise argparse.ArgumentTypeError("--hours expects positive hours after injection, e.g. 4,24,96,168")
    return hours


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def _parse_datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date and time such as 2026-01-05T09:30, got {text!r}"
        ) from None
    if value.utcoffset() is not None:
        raise argparse.ArgumentTypeError(
            f"give the local date and time without a UTC offset, as DICOM stores it (got {text!r})"
        )
    return value


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxeldose", description="Patient-specific 177Lu dosimetry from SPECT/CT DICOM.")
    p.add_argument("--version", action="version", version=f"voxeldose {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write the synthetic 177Lu patient (DICOM + ground truth)")
    ph.add_argument("--out", required=True, type=Path, help="output folder")
    ph.add_argument(
        "--kind",
        choices=["patient", "cylinder", "iec"],
        default="patient",
        help="patient (default): the synthetic 177Lu patient; cylinder: a uniform cylinder of known activity "
        "(sensitivity); iec: the NEMA IEC body phantom's six spheres at 10:1 (recovery, resolution)",
    )
    ph.add_argument("--seed", type=int, default=0, help="random seed (noise, repositioning); default 0")
    ph.add_argument(
        "--hours", type=_parse_hours, default=None, help="imaging times after injection, h (default 4,24,96,168)"
    )
    ph.add_argument("--bqml", action="store_true", help="write SPECT as Bq/ml real-world values instead of counts")
    ph.add_argument("--small", action="store_true", help="a coarse, fast phantom (for tests)")
    ph.add_argument(
        "--camera",
        choices=["gaussian", "osem"],
        default="gaussian",
        help="imaging model: gaussian (image-space blur + noise, fast; default) or osem (projections through the "
        "attenuation with the collimator response, Poisson counts, OSEM; needs the 'recon' extra, minutes per time point)",
    )

    ins = sub.add_parser("inspect", help="list patient, cycle, injection, time points, VOIs and problems")
    ins.add_argument("paths", nargs="+", type=Path, help="DICOM folders (recursive) or files")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    _add_injection_options(ins)

    run = sub.add_parser("run", help="dosimetry for one cycle: RT Dose, summary.json, report.html")
    run.add_argument("paths", nargs="+", type=Path, help="DICOM folders (recursive) or files of one cycle")
    run.add_argument("--out", required=True, type=Path, help="output folder")
    run.add_argument("--spec", type=Path, default=None, help="job description (JSON); options below override it")
    run.add_argument(
        "--calibration",
        type=float,
        default=None,
        metavar="CPS_PER_MBQ",
        help="camera volume sensitivity, cps/MBq (needed for count-valued SPECT)",
    )
    run.add_argument("--method", choices=["dvk", "dvk-density", "led"], default=None, help="dose method (default dvk)")
    run.add_argument(
        "--fit",
        choices=["auto", "monoexp", "biexp", "triexp", "trapezoid", "stp"],
        default=None,
        help="VOI time-activity model (default auto: AICc)",
    )
    run.add_argument("--cycle", type=int, default=None, help="cycle number of this therapy (default 1)")
    run.add_argument(
        "--reconstruct",
        action="store_true",
        default=None,
        help="reconstruct every time point that has projections, even where a reconstruction is given "
        "(default: only those without one)",
    )
    run.add_argument(
        "--iterations", type=_positive_int, default=None, help="OSEM iterations for projections (default 4)"
    )
    run.add_argument(
        "--subsets",
        type=_positive_int,
        default=None,
        help="OSEM subsets for projections; must divide the views (default 8)",
    )
    run.add_argument(
        "--camera",
        type=Path,
        default=None,
        metavar="CAMERA_JSON",
        help="the camera's profile (voxeldose calibrate): calibrates a counts SPECT, feeds --pvc",
    )
    run.add_argument(
        "--pvc",
        choices=["none", "rc", "gtm", "rbv"],
        default=None,
        help="partial-volume correction (default none): rc recovery curve, gtm transfer matrix, rbv corrected map",
    )
    _add_injection_options(run)

    rec = sub.add_parser(
        "recon",
        help="reconstruct SPECT projections (NM TOMO) with OSEM, attenuation from the CT and resolution modelling",
    )
    rec.add_argument("paths", nargs="+", type=Path, help="DICOM folders (recursive) or files: projections and CT")
    rec.add_argument("--out", required=True, type=Path, help="output folder (one RECON TOMO per acquisition)")
    rec.add_argument("--iterations", type=_positive_int, default=4, help="OSEM iterations (default 4)")
    rec.add_argument("--subsets", type=_positive_int, default=8, help="OSEM subsets; must divide the views (default 8)")
    rec.add_argument(
        "--collimator",
        default=None,
        metavar="CODE",
        help=f"collimator model when the header's name is not one of: {', '.join(COLLIMATORS)}",
    )

    cal = sub.add_parser(
        "calibrate",
        help="a camera profile (camera.json) from SPECT/CT scans of a uniform cylinder and the NEMA IEC phantom",
    )
    cal.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="phantom scan folders; which phantom each is comes from its study/series description "
        "('cylinder', 'Jaszczak', 'uniform'; 'NEMA', 'IEC')",
    )
    cal.add_argument("--cylinder", type=Path, action="append", default=[], help="the uniform cylinder's scan folder")
    cal.add_argument("--iec", type=Path, action="append", default=[], help="the NEMA IEC phantom's scan folder")
    cal.add_argument("--out", required=True, type=Path, help="the camera profile to write (camera.json)")
    cal.add_argument("--name", default=None, help="a label for the profile (default: manufacturer and model)")
    cal.add_argument(
        "--activity-u-percent",
        type=float,
        default=DEFAULT_ACTIVITY_U * 100,
        help="standard uncertainty of each phantom's activity, %% (default %(default).2f: a dose calibrator within "
        "its ±5 %% accuracy tolerance, uniform distribution, 5/√3)",
    )
    cal.add_argument(
        "--sphere-to-background",
        type=float,
        default=10.0,
        help="the IEC spheres' concentration over the background's (default 10)",
    )

    kern = sub.add_parser("kernel", help="build a dose-voxel kernel (Gy per Bq·s) and print its energy balance")
    kern.add_argument("--nuclide", default="Lu-177")
    kern.add_argument("--voxel-mm", required=True, help="voxel size, mm: one value or di,dj,dk")
    kern.add_argument("--medium", default="soft-tissue", choices=["water", "soft-tissue", "cortical-bone", "lung"])
    kern.add_argument("--size", type=int, default=51, help="kernel size in voxels (odd)")
    kern.add_argument("--out", required=True, type=Path, help="output .npy")

    demo = sub.add_parser("demo", help="run the main job on the embedded synthetic patient")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default ./demo-output)")
    demo.add_argument("--small", action="store_true", help="use the small phantom")

    for name, ep in sorted(_plugin_commands().items()):  # listed in --help; run by main() before parsing
        sub.add_parser(name, help=_plugin_help(ep), add_help=False)
    return p


#: Entry-point group of sub-commands that other installed packages add (e.g. the service's
#: ``serve`` and ``token``).  Each is ``fn(argv: list[str]) -> int`` and gets the argv after its name.
PLUGIN_GROUP = "voxeldose.commands"


def _plugin_commands() -> dict[str, EntryPoint]:
    try:
        eps = entry_points(group=PLUGIN_GROUP)
    except Exception:  # noqa: BLE001 - broken metadata must not break the built-in commands
        return {}
    return {ep.name: ep for ep in eps if ep.name not in COMMANDS}


def _plugin_help(ep: EntryPoint) -> str:
    try:
        doc = (ep.load().__doc__ or "").strip()
    except Exception as exc:  # noqa: BLE001 - e.g. the plugin's dependencies are not installed
        return f"(unavailable: {type(exc).__name__}: {exc})"
    return doc.splitlines()[0] if doc else f"provided by {ep.value}"


def _add_injection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--injection-datetime",
        type=_parse_datetime,
        default=None,
        help="injection date and time (ISO), when the files lack it or are wrong",
    )
    p.add_argument("--activity-mbq", type=float, default=None, help="injected activity, MBq, when the files lack it")
    p.add_argument("--nuclide", default=None, help="radionuclide, e.g. Lu-177, when the files lack it")


def _injection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "injection_start": args.injection_datetime,
        "activity_bq": None if args.activity_mbq is None else args.activity_mbq * 1e6,
        "nuclide": args.nuclide,
    }


# --------------------------------------------------------------------------------------- commands
def cmd_phantom(args: argparse.Namespace) -> int:
    settings = PhantomSettings.small() if args.small else PhantomSettings()
    changes: dict[str, Any] = {"seed": args.seed, "camera": args.camera}
    if args.hours is not None:
        changes["hours"] = args.hours
    if args.bqml:
        changes["pixel_mode"] = "bqml"
    settings = replace(settings, **changes)
    t0 = time.perf_counter()
    if args.kind != "patient":
        if args.hours is not None:
            raise VoxeldoseError("--hours applies to the patient only", tag="--hours", expected="--kind patient")
        m = write_calibration_phantom(args.out, CalibrationPhantom(args.kind), settings)
        print(f"wrote the {args.kind} calibration phantom to {args.out} in {time.perf_counter() - t0:.1f} s")
        print(f"  DICOM:        {m.nm_file.parent.parent}")
        print(f"  ground truth: {m.truth_json}")
        return 0
    write_phantom(args.out, settings)
    print(f"wrote the synthetic patient to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(f"  DICOM:        {args.out / 'dicom'}")
    print(f"  ground truth: {args.out / 'truth' / 'truth.json'}")
    return 0


def inspect_report(paths: Sequence[Path], **injection: Any) -> dict[str, Any]:
    """What ``voxeldose inspect`` reports, as a JSON-ready dict.  Besides what reading found, each cycle
    is checked as ``voxeldose run`` would check it (:func:`voxeldose.pipeline.blocking_problems`) with the
    default job, so that what ``run`` refuses is an error here too."""
    index = scan(list(paths))
    cycles, problems = group_cycles(index, **injection)
    all_problems = index.problems + problems + _job_problems(cycles, JobSpec(inputs=[str(p) for p in paths]))
    patients = index.patients()
    return {
        "inputs": [str(p) for p in paths],
        "files_read": index.files_read,
        "patients": [{"patient_id": k, "patient_name": v} for k, v in sorted(patients.items())],
        "series": [s.summary() for s in index.series.values()],
        "cycles": [c.summary() for c in cycles],
        "problems": [p.to_dict() for p in all_problems],
        "ok": not any(p.severity == "error" for p in all_problems),
    }


#: A blocking problem that only the job can resolve: reported as information, since ``inspect`` takes
#: no calibration and no OSEM subsets (``voxeldose run --calibration``, ``--subsets`` give them).
_JOB_OPTION_TAGS = ("calibration.cps_per_mbq", "reconstruction.subsets")


def _job_problems(cycles: list[Cycle], spec: JobSpec) -> list[Problem]:
    """What would stop ``voxeldose run`` on each cycle (see :func:`voxeldose.pipeline.blocking_problems`)."""
    out = []
    for n, cycle in enumerate(cycles, start=1):
        for err in blocking_problems(cycle, spec):
            if err.tag in _JOB_OPTION_TAGS:
                out.append(Problem("info", f"cycle {n}: {err} — give it to voxeldose run", err.path, err.tag))
            else:
                out.append(Problem("error", f"cycle {n}: {err}", err.path, err.tag))
    return out


def _print_inspect(rep: dict[str, Any]) -> None:
    print(f"{rep['files_read']} DICOM file(s) read from {', '.join(rep['inputs'])}")
    for pat in rep["patients"]:
        print(f"patient {pat['patient_id']}  {pat['patient_name']}")
    for n, c in enumerate(rep["cycles"], start=1):
        inj = c["injection"]
        print(
            f"cycle {n}: {inj['nuclide']} {inj['radiopharmaceutical'] or ''}, "
            f"{inj['activity_MBq']:.0f} MBq at {inj['datetime']}"
        )
        print(f"  injection time from {inj['datetime_source']}; activity from {inj['activity_source']}")
        for t, tp in enumerate(c["timepoints"], start=1):
            sp, ct = tp["spect"], tp["ct"]
            print(
                f"  time point {t}: {tp['hours_after_injection']:.1f} h after injection "
                f"(acquired {tp['acquisition_datetime']}, from {tp['acquisition_time_source']})"
            )
            print(f"    SPECT {sp['description']!r}: {sp['instances']} instance(s), values {sp['pixel_values']}")
            print(f"    CT    {ct['description']!r}: {ct['instances']} slice(s)" if ct else "    CT    none")
        for v in c["vois"]:
            print(f"  VOIs from {v['kind'].upper()} {v['description']!r}: {', '.join(v['roi_names'])}")
        if not c["vois"]:
            print("  VOIs: none (no RTSTRUCT or SEG on a time point's frame of reference)")
    if not rep["cycles"]:
        print("no therapy cycle found")
    if rep["problems"]:
        print("problems:")
        for p in rep["problems"]:
            print(
                f"  [{p['severity']}] {p['message']}"
                + (f" — {p['path']}" if p["path"] and p["path"] not in p["message"] else "")
            )
    else:
        print("problems: none")


def cmd_inspect(args: argparse.Namespace) -> int:
    rep = inspect_report(args.paths, **_injection_kwargs(args))
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        print()
    else:
        _print_inspect(rep)
    return 0 if rep["ok"] else 1


def build_spec(args: argparse.Namespace) -> JobSpec:
    """A JobSpec from ``--spec`` and the command-line options (options win).  An invalid one is an
    error naming the job file and the field at fault."""
    base: dict[str, Any] = {}
    if args.spec is not None:
        try:
            text = args.spec.read_text(encoding="utf-8")
            check_json_depth(text)  # before json.loads, which recurses once per level
            base = json.loads(text)
        except (OSError, ValueError) as exc:  # ValueError: JSON, UTF-8 and nesting errors
            raise VoxeldoseError(
                f"cannot read the job description ({exc})", path=args.spec, expected="a JSON object"
            ) from None
        if not isinstance(base, dict):
            raise VoxeldoseError(
                "the job description is not a JSON object",
                path=args.spec,
                expected='a JSON object such as {"calibration": {"cps_per_mbq": 5.67}}',
                found=type(base).__name__,
            )

    def section(key: str) -> dict[str, Any]:
        value = base.get(key)
        if value is None:
            value = base[key] = {}
        if not isinstance(value, dict):
            raise VoxeldoseError(
                f"the job description's {key!r} must be an object", path=args.spec, tag=key, found=type(value).__name__
            )
        return value

    base["inputs"] = [str(p) for p in args.paths]
    if args.calibration is not None:
        section("calibration")["cps_per_mbq"] = args.calibration
        base["calibration"].setdefault("source", "command line --calibration")
    if args.method is not None:
        section("dose")["method"] = args.method
    if args.fit is not None:
        section("fit")["model"] = args.fit
    if args.cycle is not None:
        base["cycle_number"] = args.cycle
    if args.reconstruct:
        base["reconstruct"] = True
    if args.iterations is not None:
        section("reconstruction")["iterations"] = args.iterations
    if args.subsets is not None:
        section("reconstruction")["subsets"] = args.subsets
    if args.camera is not None:
        base["camera"] = CameraProfile.load(args.camera).model_dump(mode="json", by_alias=True)
    if args.pvc is not None:
        base["pvc"] = args.pvc
    inj = section("injection")
    if args.injection_datetime is not None:
        inj["datetime"] = args.injection_datetime.isoformat()
    if args.activity_mbq is not None:
        inj["activity_mbq"] = args.activity_mbq
    if args.nuclide is not None:
        inj["nuclide"] = args.nuclide
    try:
        return JobSpec.model_validate(base)
    except ValidationError as exc:
        raise invalid_spec(exc, args.spec) from None


def cmd_run(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    run_and_write(spec, args.out)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if not (args.paths or args.cylinder or args.iec):
        raise VoxeldoseError("no phantom scans given", expected="DIR ... or --cylinder DIR --iec DIR")
    res = calibrate(
        args.paths,
        cylinder=args.cylinder,
        iec=args.iec,
        name=args.name,
        activity_u_rel=args.activity_u_percent / 100.0,
        sphere_to_background=args.sphere_to_background,
    )
    p = res.profile
    p.save(args.out)
    sens = res.sensitivity
    print(f"camera: {p.identity.manufacturer} {p.identity.model} ({p.identity.reconstruction or 'reconstruction ?'})")
    print(
        f"sensitivity: {p.sensitivity_cps_per_mbq:.4f} ± {p.sensitivity_u_cps_per_mbq:.4f} cps/MBq (k=1; counting "
        f"alone ± {sens.u_poisson:.4f})"
    )
    if p.fwhm_mm is not None and p.fwhm_u_mm is not None:
        print(f"effective resolution: FWHM {p.fwhm_mm:.2f} ± {p.fwhm_u_mm:.2f} mm")
        for pt in p.recovery:
            print(f"  {pt.label:>14}  {pt.volume_ml:6.2f} ml  RC {pt.rc:.3f} ± {pt.rc_u:.3f}")
    else:
        print("no NEMA IEC scan: no recovery coefficients or resolution")
    print(f"wrote {args.out}")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    try:
        voxel = [float(v) for v in str(args.voxel_mm).split(",")]
    except ValueError:
        raise VoxeldoseError(
            "--voxel-mm expects one number or three comma-separated numbers (mm)", found=args.voxel_mm
        ) from None
    if len(voxel) not in (1, 3) or any(v <= 0 for v in voxel):
        raise VoxeldoseError("--voxel-mm expects one or three positive sizes in mm", found=args.voxel_mm)
    print(kernel_command(args.nuclide, voxel[0] if len(voxel) == 1 else tuple(voxel), args.medium, args.size, args.out))
    return 0


def cmd_recon(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    done = reconstruct_folders(
        args.paths, args.out, iterations=args.iterations, subsets=args.subsets, collimator=args.collimator
    )
    for r in done:
        print(f"{r.output}  <- {r.projections} ({r.method})")
    print(f"reconstructed {len(done)} acquisition(s) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.out, small=args.small)


COMMANDS = {
    "phantom": cmd_phantom,
    "inspect": cmd_inspect,
    "run": cmd_run,
    "recon": cmd_recon,
    "calibrate": cmd_calibrate,
    "kernel": cmd_kernel,
    "demo": cmd_demo,
}


def _run_plugin(name: str, rest: list[str]) -> int | None:
    """Run the plugin command ``name`` if one is installed (None if not)."""
    ep = _plugin_commands().get(name)
    if ep is None:
        return None
    try:
        fn = ep.load()
    except ImportError as exc:
        print(f"error: the command {name!r} ({ep.value}) cannot be loaded: {exc}", file=sys.stderr)
        return 3
    code = fn(rest)
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
            code = _run_plugin(argv[0], argv[1:])
            if code is not None:
                return code
        args = _build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except VoxeldoseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("VOXELDOSE_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} — please report it with VOXELDOSE_DEBUG=1 output",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
