"""``voxeldose demo``: the main job on the embedded synthetic patient, every stage that exists.

Stages run now: synthetic patient → ingest (cycle, time points, injection) → images (SPECT, CT) →
VOIs on the reference SPECT grid, checked against the phantom's ground truth.  The stages that do not
exist yet (quantification, registration, time–activity fitting, dose, DVH) are named, and no number is
invented for them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .phantom import PhantomSettings, write_phantom


def _stage(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def _phantom(out: Path, settings: PhantomSettings) -> Path:
    """Write the phantom under ``out/phantom`` unless the same settings are already there."""
    root = out / "phantom"
    truth = root / "truth" / "truth.json"
    if truth.exists():
        try:
            if json.loads(truth.read_text()).get("settings_fingerprint") == settings.fingerprint():
                print(f"      reusing {root} (same settings)")
                return root
        except (OSError, json.JSONDecodeError):
            pass
    t = time.perf_counter()
    write_phantom(root, settings)
    print(f"      wrote {root} in {time.perf_counter() - t:.1f} s")
    return root


def run_demo(out: Path, *, small: bool = False) -> int:
    """Run the demo into ``out``; returns the process exit status."""
    from .ingest import load_cycle, read_ct, read_spect, scan
    from .voi import load_vois

    total = 5
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = PhantomSettings.small() if small else PhantomSettings()

    _stage(1, total, "synthetic 177Lu patient (7.4 GBq, SPECT/CT at " + ", ".join(f"{h:g}" for h in settings.hours) + " h)")
    root = _phantom(out, settings)
    truth = json.loads((root / "truth" / "truth.json").read_text())

    _stage(2, total, "ingest: index, classify, group into a therapy cycle")
    t = time.perf_counter()
    index = scan(root / "dicom")
    cycle = load_cycle(index)
    summary: dict[str, Any] = {"cycle": cycle.summary()}
    inj = cycle.injection
    print(f"      {index.files_read} files in {time.perf_counter() - t:.1f} s; patient {cycle.patient_id}; "
          f"{inj.nuclide} {inj.activity_bq / 1e6:.0f} MBq at {inj.start:%Y-%m-%d %H:%M}")
    for n, tp in enumerate(cycle.timepoints, start=1):
        print(f"      time point {n}: {tp.hours_after_injection:6.1f} h  SPECT + "
              + (f"CT ({len(tp.ct.instances)} slices)" if tp.ct else "no CT"))

    _stage(3, total, "images: SPECT values and CT")
    images = []
    for n, tp in enumerate(cycle.timepoints, start=1):
        sp = read_spect(tp.spect)
        ct = read_ct(tp.ct) if tp.ct else None
        line = (f"      time point {n}: SPECT {sp.volume.shape[::-1]} voxels of "
                f"{sp.volume.spacing[0]:.2f} mm, values {sp.pixel_mode}")
        if sp.total_counts is not None:
            line += f", {sp.total_counts / 1e6:.2f} Mcounts in {sp.acquisition_duration_s:.0f} s"
        if ct is not None:
            line += f"; CT {ct.shape[::-1]}"
        print(line)
        images.append({"hours": tp.hours_after_injection, "pixel_mode": sp.pixel_mode,
                       "total_counts": sp.total_counts, "acquisition_duration_s": sp.acquisition_duration_s})
    summary["images"] = images

    _stage(4, total, "VOIs on the reference SPECT grid, against the phantom's ground truth")
    ref = read_spect(cycle.timepoints[0].spect).volume.grid
    vois = load_vois(cycle.vois[0], ref)
    rows = []
    print(f"      {'VOI':<12} {'volume ml':>10} {'truth ml':>10} {'diff':>7}")
    for name, voi in vois.items():
        true_ml = truth["voi"].get(name, {}).get("volume_ml")
        diff = (voi.volume_ml / true_ml - 1.0) if true_ml else None
        rows.append({"name": name, "volume_ml": voi.volume_ml, "truth_volume_ml": true_ml, "relative_difference": diff})
        print(f"      {name:<12} {voi.volume_ml:10.1f} {true_ml if true_ml else float('nan'):10.1f} "
              + (f"{100 * diff:+6.1f}%" if diff is not None else "   n/a"))
    summary["vois"] = rows

    _stage(5, total, "quantification, registration, time-activity fits, dose, DVH")
    print("      NOT YET AVAILABLE: these stages belong to the Dose engine and Dosimetry pipeline work;")
    print("      the demo stops here and reports no dose numbers.")
    summary["stopped_at"] = "quantification (Dosimetry pipeline not yet implemented)"

    report = out / "demo-summary.json"
    report.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(f"outputs: synthetic patient DICOM  {root / 'dicom'}")
    print(f"         ground truth             {root / 'truth' / 'truth.json'}")
    print(f"         demo summary (JSON)      {report}")
    return 0
