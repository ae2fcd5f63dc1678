"""``voxeldose recon``: reconstruct every SPECT acquisition (NM TOMO projections) found in DICOM folders.

Each projection object is paired with the CT of its Frame of Reference (the SPECT/CT's shared frame), reconstructed
by :func:`voxeldose.projections.reconstruct` (OSEM, attenuation from that CT, the collimator's distance-dependent
resolution; PyTomography, the ``recon`` extra) and written as a ``RECON TOMO`` NM object in reconstructed counts
(see :func:`~voxeldose.projections.reconstruct` for their relation to activity) into the projections' study, with the
reconstruction stated in ReconstructionMethod (0054,1103) and SeriesDescription.  ``voxeldose run`` then reads the
reconstructions with the CT and structures of the original folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from .dicomutil import SeriesInfo, tag_label
from .errors import VoxeldoseError
from .ingest import Series, acquisition_datetime, read_ct, scan
from .outputs import patient_study_from
from .projections import ProjectionSet, read_projections, reconstruct, reconstruction_method
from .scanner import CameraHeaders, SpectAcquisition, write_nm_tomo

__all__ = ["Reconstructed", "reconstruct_folders"]

#: SeriesNumber of a reconstruction: the projections' own plus this.
SERIES_NUMBER_OFFSET = 100


@dataclass(frozen=True)
class Reconstructed:
    """One reconstruction written: from which projections and CT, to which file, how."""

    projections: Path
    ct_series_instance_uid: str
    output: Path
    method: str


def _is_projection_series(series: Series) -> bool:
    return series.kind == "projections"  # NM, ImageType ORIGINAL\\PRIMARY\\TOMO (ingest.classify)


def _camera_headers(ps: ProjectionSet, method: str) -> CameraHeaders | None:
    """The acquiring camera, named again on its reconstruction (so that a camera profile matches it), with how
    the reconstruction was made; ``None`` when the projections do not name their camera."""
    ident = ps.identity
    if ident is None:
        return None
    return CameraHeaders(
        ident.manufacturer, ident.model, ident.device_serial_number or "", ps.collimator[:16], method[:64]
    )


def reconstruct_folders(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    iterations: int = 4,
    subsets: int = 8,
    collimator: str | None = None,
) -> list[Reconstructed]:
    """Reconstruct every projection object under ``paths`` into ``out/NN_YYYYMMDD_HHMM/SPECT.dcm`` (in order of
    acquisition), each with the CT that shares its Frame of Reference.

    ``collimator`` (a code of :data:`voxeldose.recon.COLLIMATORS`) replaces the headers' CollimatorGridName.
    Errors (:class:`VoxeldoseError`): no projections found; no CT in a projection object's Frame of Reference;
    anything :func:`~voxeldose.projections.read_projections` refuses; subsets that do not divide the views; counts that do not fit the written uint16.
    """
    index = scan([Path(p) for p in paths])
    found = [s for s in index.series.values() if _is_projection_series(s)]
    if not found:
        raise VoxeldoseError(
            "no SPECT projections found",
            path=", ".join(str(p) for p in paths),
            tag=tag_label("ImageType"),
            expected="NM objects with ImageType ORIGINAL\\PRIMARY\\TOMO",
        )
    cts: dict[str, Series] = {}
    for s in index.series.values():
        if s.kind == "ct" and s.frame_of_reference_uid:
            cts.setdefault(s.frame_of_reference_uid, s)
    acquisitions = sorted(
        ((acquisition_datetime(inst.header, inst.path)[0], inst) for s in found for inst in s.instances),
        key=lambda item: (item[0], str(item[1].path)),
    )
    out_dir = Path(out)
    done: list[Reconstructed] = []
    for n, (when, inst) in enumerate(acquisitions, start=1):
        ps = read_projections(inst.path, collimator=collimator)
        ct_series = cts.get(ps.frame_of_reference_uid)
        if ct_series is None:
            raise VoxeldoseError(
                "no CT in the projections' Frame of Reference: attenuation cannot be corrected",
                path=inst.path,
                tag=tag_label("FrameOfReferenceUID"),
                expected="the CT of the same SPECT/CT session in the folders given",
                found=ps.frame_of_reference_uid,
            )
        if ps.injection is None:
            raise VoxeldoseError(
                "the projections do not state the injection",
                path=inst.path,
                tag=tag_label("RadiopharmaceuticalInformationSequence"),
                expected="the radiopharmaceutical, its activity and injection date and time",
            )
        if ps.views % subsets:
            divisors = [d for d in range(1, ps.views + 1) if ps.views % d == 0]
            raise VoxeldoseError(
                f"{subsets} OSEM subsets do not divide the {ps.views} views",
                path=inst.path,
                tag="subsets (--subsets)",
                expected="one of " + ", ".join(map(str, divisors)),
                found=subsets,
            )
        image = reconstruct(ps, read_ct(ct_series), iterations, subsets)
        counts = np.rint(image.array)
        if counts.max() > 65535:
            raise VoxeldoseError(
                "reconstructed counts do not fit the 16-bit image",
                path=inst.path,
                expected="at most 65535 counts in a voxel",
                found=float(counts.max()),
            )
        method = reconstruction_method(ps.collimator, iterations, subsets)
        lo, hi = ps.window.lower_kev, ps.window.upper_kev
        header = inst.header
        number = int(getattr(header, "SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
        target = out_dir / f"{n:02d}_{when:%Y%m%d_%H%M}" / "SPECT.dcm"
        write_nm_tomo(
            target,
            image.with_array(counts),
            ctx=patient_study_from(header),
            series=SeriesInfo(generate_uid(), number, f"SPECT {method}", ps.frame_of_reference_uid, when),
            injection=ps.injection,
            acquisition=SpectAcquisition(
                frame_duration_ms=round(ps.frame_duration_s * 1000.0),
                frames_in_rotation=ps.views_per_detector,
                angular_step_deg=ps.angular_step_deg,
                energy_window_keV=(lo, hi),
                energy_window_name=ps.window.name,
            ),
            pixel_mode="counts",
            body_part_examined=str(getattr(header, "BodyPartExamined", "") or "") or None,
            reconstruction_method=method,
            camera=_camera_headers(ps, method),
        )
        done.append(Reconstructed(inst.path, ct_series.series_instance_uid, target, method))
    return done
