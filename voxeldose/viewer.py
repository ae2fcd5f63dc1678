"""Volumes for the interactive slice viewer of the job page: CT, absorbed dose and a VOI label map as NIfTI-1.

Everything is on the **dose grid** (the RT Dose's voxels): the dose as written (Gy, float32), the reference CT
resampled onto it (HU, trilinear, -1000 outside), and the VOIs of the SEG sampled onto it (label ``n`` = the
``n``-th VOI by decreasing size, occupancy ≥ 0.5; where VOIs overlap the smaller one wins).  One grid keeps the three volumes
aligned voxel for voxel in any viewer; the cost is a CT no finer than the dose grid (4-5 mm for SPECT doses).

Read from a job's DICOM results — ``rtdose.dcm`` and ``seg.dcm`` in the result folder — and the CT series the SEG
references among the job's inputs.  NIfTI is written by SimpleITK (a dependency already), which turns the DICOM
LPS geometry into the NIfTI's RAS qform/sform.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from .errors import VoxeldoseError
from .geometry import Volume, resample
from .ingest import read_ct, read_rtdose, scan
from .voi import read_seg

#: The volumes written, by name.
VOLUMES = ("ct", "dose", "vois")


@dataclass(frozen=True)
class ViewerVolumes:
    """The written files (``<name>.nii.gz``), the VOI names by label value (1, 2, …) and the dose maximum (Gy)."""

    files: dict[str, Path]
    labels: dict[int, str]
    dose_max_gy: float


def write_nifti(vol: Volume, path: Path, dtype: type[np.generic] = np.float32) -> None:
    """``vol`` as NIfTI-1 (``.nii.gz``), its geometry from the index→LPS affine."""
    aff = np.asarray(vol.affine, dtype=float)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise VoxeldoseError("a volume with a zero voxel size cannot be written", path=path)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(vol.array).astype(dtype)))  # [k, j, i] → (i, j, k)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    img.SetDirection([float(v) for v in (aff[:3, :3] / spacing).ravel()])  # row-major 3x3, columns = axes
    sitk.WriteImage(img, str(path), useCompression=True)


def write_viewer_volumes(result_dir: Path, input_dir: Path, out_dir: Path) -> ViewerVolumes:
    """Write ``ct.nii.gz``, ``dose.nii.gz`` and ``vois.nii.gz`` of a job into ``out_dir`` (see the module
    docstring).  No RT Dose → :class:`VoxeldoseError`; no SEG or no CT → that volume is left out."""
    rt = result_dir / "rtdose.dcm"
    if not rt.is_file():
        raise VoxeldoseError("the job has no RT Dose", path=rt)
    dose_series = scan([str(rt)]).by_kind("rtdose")
    if not dose_series:
        raise VoxeldoseError("not an RT Dose", path=rt, tag="Modality", expected="RTDOSE")
    dose = read_rtdose(dose_series[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    labels: dict[int, str] = {}
    write_nifti(dose, out_dir / "dose.nii.gz")
    files["dose"] = out_dir / "dose.nii.gz"

    seg_path = result_dir / "seg.dcm"
    ct_uid: str | None = None
    if seg_path.is_file():
        seg_index = scan([str(seg_path)])
        seg_series = seg_index.by_kind("seg")
        if seg_series:
            header = pydicom.dcmread(seg_path, stop_before_pixels=True)
            refs = header.get("ReferencedSeriesSequence") or []
            ct_uid = str(refs[0].SeriesInstanceUID) if refs else None
            vois = read_seg(seg_series[0], dose.grid)
            label = np.zeros(dose.shape, dtype=np.uint8)
            # largest first: a small VOI inside a large one (a tumour in the liver, all in the body) stays visible
            ordered = sorted(vois.items(), key=lambda kv: -int(np.count_nonzero(kv[1].mask)))
            for n, (name, voi) in enumerate(ordered, start=1):
                if n > 255:
                    break
                label[voi.mask] = n
                labels[n] = name
            write_nifti(dose.with_array(label, "1"), out_dir / "vois.nii.gz", np.uint8)
            files["vois"] = out_dir / "vois.nii.gz"

    cts = scan([str(input_dir)]).by_kind("ct") if input_dir.is_dir() else []
    chosen = [s for s in cts if s.series_instance_uid == ct_uid] or [
        s for s in cts if s.frame_of_reference_uid == dose.frame_of_reference_uid
    ]
    if chosen:
        ct = resample(read_ct(chosen[0]), dose.grid, order=1, fill=-1000.0)
        write_nifti(ct, out_dir / "ct.nii.gz", np.int16)
        files["ct"] = out_dir / "ct.nii.gz"
    dmax = float(np.nanmax(np.asarray(dose.array))) if np.asarray(dose.array).size else 0.0
    return ViewerVolumes(files=files, labels=labels, dose_max_gy=dmax)
