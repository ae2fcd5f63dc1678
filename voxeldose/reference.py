"""The reference dose of a synthetic patient: the pipeline's own dose kernel applied to the exact TIA.

The phantom knows the time-integrated activity (TIA) of every voxel of the reference SPECT grid exactly
(``truth/tia_bqs.npy``).  Convolving it with the same dose-voxel kernel the pipeline uses (``dvk`` in
the kernel medium, :func:`voxeldose.dose.absorbed_dose`) gives the dose the pipeline would report
with a perfect camera, perfect registration and perfect kinetics.  Comparing a run against this
reference therefore measures the imaging chain alone (resolution, noise, quantification, registration,
time-activity sampling), not the known differences between a kernel convolution and the local-energy
estimate ``dose_led_gy`` of ``truth.json`` (photons, cross-fire).

A VOI's reference mean dose is its occupancy-weighted mean, ``Σ f_v D_v / Σ f_v``, with the occupancy
``f_v`` of voxel ``v`` from ``supersample³`` sub-points per voxel (as the pipeline weights by the
occupancy of its RTSTRUCT/SEG VOIs): a volume-weighted mean, as the pipeline's ``dvk`` mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from .backend import to_host
from .dose import absorbed_dose
from .geometry import Grid, Volume

#: File name of the reference dose map inside the phantom's ``truth`` folder.
REFERENCE_DOSE_FILE: Final = "reference_dose_gy.npy"

#: A function giving the integer VOI label at the voxel centres of any grid (0 outside the body).
Labeller = Callable[[Grid], NDArray[Any]]


def reference_dose(
    tia_bqs: NDArray[np.float64], grid: Grid, *, nuclide: str, medium: str = "soft-tissue"
) -> NDArray[np.float32]:
    """The absorbed dose (Gy, float32, ``[k, j, i]``) of the exact voxel TIA (Bq·s) on ``grid``, by the
    pipeline's default dose method (``dvk``, its automatic kernel size, ``medium``)."""
    tia = Volume(np.asarray(tia_bqs, dtype=np.float64), grid.affine, grid.frame_of_reference_uid, "Bq.s")
    dose = absorbed_dose(tia, nuclide=nuclide, method="dvk", medium=medium)
    out: NDArray[np.float32] = to_host(dose.array).astype(np.float32)
    return out


def _fine_grid(grid: Grid, ss: int, k0: int, k1: int) -> Grid:
    """Slices ``k0:k1`` of ``grid`` with ``ss³`` sub-points per voxel (centres of equal sub-cells)."""
    a = grid.affine
    step = a[:3, :3] / ss
    corner = a[:3, 3] + a[:3, :3] @ np.array([0.0, 0.0, float(k0)]) - step @ np.full(3, (ss - 1) / 2.0)
    fa = np.eye(4)
    fa[:3, :3] = step
    fa[:3, 3] = corner
    return Grid(((k1 - k0) * ss, grid.shape[1] * ss, grid.shape[2] * ss), fa)


def voi_mean_doses(
    dose_gy: NDArray[Any],
    grid: Grid,
    labeller: Labeller,
    label_names: Mapping[int, str],
    *,
    supersample: int = 3,
    body_name: str | None = "Body",
    chunk: int = 4,
) -> dict[str, float]:
    """Occupancy-weighted mean dose (Gy) of each labelled VOI, and of ``body_name`` (every label > 0).

    Occupancies come from ``labeller`` on ``supersample³`` sub-points per voxel, a few slices at a time
    (memory stays at one slab of sub-points).
    """
    ss = int(supersample)
    nlab = max(label_names) + 1
    d = np.asarray(dose_gy, dtype=np.float64)
    nk, nj, ni = grid.shape
    weighted = np.zeros(nlab)
    counts = np.zeros(nlab)
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        lab = np.asarray(labeller(_fine_grid(grid, ss, k0, k1)), dtype=np.int64)
        # voxel index of each sub-point, then sub-point counts per (voxel, label)
        vox = np.arange((k1 - k0) * nj * ni).reshape(k1 - k0, 1, nj, 1, ni, 1)
        vox = np.broadcast_to(vox, (k1 - k0, ss, nj, ss, ni, ss)).reshape(lab.shape)
        per = np.bincount((vox * nlab + lab).ravel(), minlength=(k1 - k0) * nj * ni * nlab)
        per = per.reshape(-1, nlab).astype(np.float64)
        weighted += per.T @ d[k0:k1].ravel()
        counts += per.sum(axis=0)
    out = {name: float(weighted[lab] / counts[lab]) for lab, name in label_names.items() if counts[lab] > 0}
    if body_name is not None:
        out[body_name] = float(weighted[1:].sum() / counts[1:].sum())
    return out


def write_reference_dose(
    truth_dir: str | Path,
    tia_bqs: NDArray[np.float64],
    grid: Grid,
    *,
    nuclide: str,
    labeller: Labeller,
    label_names: Mapping[int, str],
    supersample: int = 3,
) -> dict[str, Any]:
    """Write ``truth_dir/reference_dose_gy.npy`` (:func:`reference_dose`) and return its ``truth.json`` block:
    the file, the method and the per-VOI mean reference dose (:func:`voi_mean_doses`)."""
    dose = reference_dose(tia_bqs, grid, nuclide=nuclide)
    np.save(Path(truth_dir) / REFERENCE_DOSE_FILE, dose)
    means = voi_mean_doses(dose, grid, labeller, label_names, supersample=supersample)
    return {
        "file": REFERENCE_DOSE_FILE,
        "units": "Gy",
        "method": (
            "the pipeline's dose kernel (dvk, soft-tissue, automatic size) convolved with the exact voxel TIA "
            "(tia_bqs.npy) on the reference SPECT grid: the dose a perfect imaging chain would give"
        ),
        "voi_mean_weighting": f"occupancy from {supersample}^3 sub-points per voxel (volume-weighted)",
        "voi_mean_gy": means,
    }
