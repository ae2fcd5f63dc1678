"""Outputs of a run: ``rtdose.dcm`` (RT Dose in Gy, CT frame of reference), ``rtdose_uncertainty.dcm`` (its
standard uncertainty, k = 1, Gy, DoseType ERROR; when the run has a dose-uncertainty map), ``summary.json`` and
``report.html``.  Everything written atomically (temporary file, then rename) so that a failed write
never leaves a half file that looks complete.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .approval import PRELIMINARY_DOSE_COMMENT
from .dicom_writers import DOSE_TYPE_ERROR_NOTE, PatientStudy, SeriesInfo, write_rtdose
from .dicomutil import parse_da, parse_tm
from .errors import VoxeldoseError
from .geometry import resample
from .report import render_report
from .result import Result
from .sr import SR_SERIES_DESCRIPTION, reference_ct_datasets, write_dose_sr, write_voi_seg
from .summary import Summary


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary_json(summary: Summary) -> str:
    """The summary as strict JSON text (NaN → null): :meth:`Summary.to_json`."""
    return summary.to_json()


def patient_study_from(header: Dataset) -> PatientStudy:
    """Patient and study of a DICOM header (the reference CT), for results that join its study."""
    d = parse_da(getattr(header, "StudyDate", None))
    t = parse_tm(getattr(header, "StudyTime", None))
    when = datetime.combine(d, t) if d and t else datetime.now()
    return PatientStudy(
        patient_id=str(getattr(header, "PatientID", "")),
        patient_name=str(getattr(header, "PatientName", "")),
        patient_birth_date=str(getattr(header, "PatientBirthDate", "") or ""),
        patient_sex=str(getattr(header, "PatientSex", "") or "O") or "O",
        study_instance_uid=str(header.StudyInstanceUID),
        study_datetime=when,
        study_id=str(getattr(header, "StudyID", "") or "1"),
        accession_number=str(getattr(header, "AccessionNumber", "") or ""),
        study_description=str(getattr(header, "StudyDescription", "") or ""),
    )


def rtdose_series_description(summary: Summary) -> str:
    """The RT Dose's Series Description (LO, 64 characters): the dose method, cycle, and whether the map is
    partial-volume corrected — only ``rbv`` corrects the map; ``rc``/``gtm`` correct the VOI means (in the SR and
    summary), the map stays as imaged."""
    pvc = summary.methods.pvc.method
    state = "" if pvc == "none" else f"; PVC {pvc}" if pvc == "rbv" else "; map no PVC"
    return f"voxeldose absorbed dose ({summary.methods.dose}{state}) cycle {summary.cycle.number}"[:64]


def uncertainty_series_description(summary: Summary) -> str:
    """Series Description (LO, 64 characters) of the dose-uncertainty RT Dose: what its values are."""
    return f"voxeldose dose uncertainty u (k=1, Gy) cycle {summary.cycle.number}"[:64]


def write_uncertainty_rtdose(result: Result, out_dir: Path, ctx: PatientStudy) -> Path:
    """``rtdose_uncertainty.dcm``: the voxel dose's standard uncertainty (k = 1, Gy) as an RT Dose with DoseType
    ERROR (see :data:`voxeldose.dicom_writers.DOSE_TYPE_ERROR_NOTE` for why ERROR), on the dose's grid and
    Frame of Reference, in a series of its own; what the map holds goes to the Derivation Description."""
    summary = result.summary
    u = result.dose_uncertainty
    if u is None:
        raise ValueError("the result has no dose-uncertainty map")
    series = SeriesInfo(
        series_instance_uid=generate_uid(),
        series_number=9004,
        series_description=uncertainty_series_description(summary),
        frame_of_reference_uid=str(result.dose.frame_of_reference_uid),
        acquisition_datetime=datetime.now(),
    )
    path = out_dir / "rtdose_uncertainty.dcm"
    tmp = out_dir / ".rtdose_uncertainty.dcm.tmp"
    try:
        write_rtdose(
            tmp,
            u.with_array(np.asarray(u.array, dtype=np.float64), "Gy"),
            ctx=ctx,
            series=series,
            bits_allocated=16,
            dose_type="ERROR",
            comment=DOSE_TYPE_ERROR_NOTE,
            description=(
                f"DoseType ERROR = {DOSE_TYPE_ERROR_NOTE}, of the RT Dose series '{rtdose_series_description(summary)}' (voxeldose "
                f"{summary.provenance.software['voxeldose']}): {summary.methods.dose_uncertainty or ''}"
            ),
        )
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise VoxeldoseError(f"cannot write the dose-uncertainty RT Dose ({exc})", path=path) from None
    return path


def write_all(result: Result, out_dir: Path) -> dict[str, Path]:
    """Write every output of ``result`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    summary = result.summary
    ref = result.reference
    header = (ref.ct or ref.spect).first
    ctx = patient_study_from(header)
    series = SeriesInfo(
        series_instance_uid=generate_uid(),
        series_number=9001,
        series_description=rtdose_series_description(summary),
        frame_of_reference_uid=str(result.dose.frame_of_reference_uid),
        acquisition_datetime=datetime.now(),
    )
    rtstruct = None
    src = summary.methods.voi_source
    for s in result.cycle.vois:
        if s.kind == "rtstruct" and s.series_instance_uid in src:
            rtstruct = s.first
    dose = result.dose.with_array(np.asarray(result.dose.array, dtype=np.float64), "Gy")
    rt_path = out_dir / "rtdose.dcm"
    tmp = out_dir / ".rtdose.dcm.tmp"
    try:
        # 16-bit dose values: a resolution of max/65535 (≈ 1e-5 of the maximum) is far below any
        # clinical significance, and every DICOM consumer (and dciodvfy) reads 16-bit RT Dose.
        write_rtdose(
            tmp,
            dose,
            ctx=ctx,
            series=series,
            referenced_rtstruct=rtstruct,
            bits_allocated=16,
            # not approved until a physicist says so (voxeldose.approval): the approved copy says APPROVED
            comment=f"{PRELIMINARY_DOSE_COMMENT}; voxeldose {summary.provenance.software['voxeldose']}; "
            f"kernel {summary.methods.kernel_id}",
        )
        os.replace(tmp, rt_path)
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise VoxeldoseError(f"cannot write the RT Dose ({exc})", path=rt_path) from None
    paths["rtdose"] = rt_path
    if result.dose_uncertainty is not None:
        paths["rtdose_uncertainty"] = write_uncertainty_rtdose(result, out_dir, ctx)

    paths["summary"] = out_dir / "summary.json"
    _atomic_write(paths["summary"], summary.to_json().encode())

    paths["report"] = out_dir / "report.html"
    masks = {name: voi.mask for name, voi in result.vois.items()}
    ct_on_dose = None
    if result.ct is not None:
        ct_on_dose = resample(result.ct, result.dose.grid, order=1, fill=-1000.0)
    tmp_report = out_dir / ".report.html.tmp"
    render_report(
        summary, dose=result.dose, ct=ct_on_dose, vois=masks, path=tmp_report, dose_uncertainty=result.dose_uncertainty
    )
    os.replace(tmp_report, paths["report"])
    return paths


def write_pacs_objects(result: Result, out_dir: Path) -> dict[str, Path]:
    """Write the objects the PACS receives besides the RT Dose: ``seg.dcm`` (SEG of the run's VOIs on
    the reference CT, referencing its slices) and ``sr.dcm`` (Comprehensive 3D SR, TID 1500
    measurement report of the per-VOI metrics of ``summary.json``, referencing the SEG's segments).

    Same patient and study as the reference CT (highdicom copies them from the CT slices).  Each file
    is written to a temporary name and renamed; a failure raises :class:`VoxeldoseError` and leaves
    neither file behind.  See :mod:`voxeldose.sr` for the codes used.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ct = reference_ct_datasets(result)
    ctx = patient_study_from(ct[0])
    when = datetime.now()
    cycle = result.summary.cycle.number
    seg_series = SeriesInfo(
        series_instance_uid=generate_uid(),
        series_number=9002,
        series_description=f"voxeldose VOIs (SEG) cycle {cycle}"[:64],
        frame_of_reference_uid=str(ct[0].FrameOfReferenceUID),
        acquisition_datetime=when,
    )
    sr_series = SeriesInfo(
        series_instance_uid=generate_uid(),
        series_number=9003,
        series_description=SR_SERIES_DESCRIPTION,
        frame_of_reference_uid=str(ct[0].FrameOfReferenceUID),
        acquisition_datetime=when,
    )
    paths = {"seg": out_dir / "seg.dcm", "sr": out_dir / "sr.dcm"}
    tmps = {k: out_dir / f".{p.name}.tmp" for k, p in paths.items()}
    try:
        seg = write_voi_seg(result, tmps["seg"], ctx=ctx, series=seg_series, ct=ct)
        write_dose_sr(result, tmps["sr"], seg=seg, series=sr_series)
        for k, final in paths.items():
            os.replace(tmps[k], final)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        for p in (*tmps.values(), *paths.values()):
            p.unlink(missing_ok=True)
        raise VoxeldoseError(f"cannot write the SEG/SR ({exc})", path=paths["seg"]) from None
    except BaseException:
        for p in tmps.values():
            p.unlink(missing_ok=True)
        raise
    return paths
