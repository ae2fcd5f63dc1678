"""Geometry: a voxel grid in DICOM patient coordinates, and the one resampling function.

Conventions (see shared DESIGN.md):

* Arrays are indexed ``[k, j, i]``: slice, row, column.
* The 4x4 ``affine`` maps the column vector ``(i, j, k, 1)`` — column index first, as in DICOM
  PS3.3 C.7.6.2.1.1 — to DICOM patient coordinates ``(x, y, z, 1)`` in LPS, millimetres:

  ``P = ImagePositionPatient + i * Δc * X + j * Δr * Y + k * S``

  where ``X`` is the row direction cosine (first three values of ImageOrientationPatient),
  ``Y`` the column direction cosine (last three), ``Δc`` the column spacing
  (PixelSpacing[1]), ``Δr`` the row spacing (PixelSpacing[0]) and ``S`` the vector from one slice
  to the next (mm).  Index ``(0, 0, 0)`` is the centre of the first voxel.
* Lengths in mm, volumes in ml (cm³).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .backend import Array
from .errors import VoxeldoseError

__all__ = ["FWHM_PER_SIGMA", "Grid", "Volume", "affine_from_dicom", "resample"]

#: FWHM of a Gaussian over its standard deviation, 2·√(2 ln 2) ≈ 2.3548 (dimensionless; from exp(−x²/2σ²) = 1/2).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def affine_from_dicom(
    image_position: Sequence[float],
    image_orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_vector: Sequence[float],
) -> NDArray[np.float64]:
    """Build the index→LPS affine from DICOM attributes.

    Parameters
    ----------
    image_position:
        ImagePositionPatient (0020,0032) of the first slice, mm.
    image_orientation:
        ImageOrientationPatient (0020,0037): row cosine then column cosine.
    pixel_spacing:
        PixelSpacing (0028,0030) as stored: ``[row spacing Δr, column spacing Δc]``, mm.
    slice_vector:
        Displacement from slice ``k`` to slice ``k + 1``, mm (3-vector).  For a stack whose slices
        follow the normal ``X × Y`` this is ``spacing * (X × Y)``; it may point the other way.
    """
    iop = np.asarray(image_orientation, dtype=float)
    if iop.shape != (6,):
        raise VoxeldoseError(
            "ImageOrientationPatient must have six values",
            tag="ImageOrientationPatient (0020,0037)",
            expected="6 direction cosines",
            found=list(iop.ravel()),
        )
    row, col = iop[:3], iop[3:]
    if not (
        np.isclose(np.linalg.norm(row), 1, atol=1e-3)
        and np.isclose(np.linalg.norm(col), 1, atol=1e-3)
        and abs(float(row @ col)) < 1e-3
    ):
        raise VoxeldoseError(
            "ImageOrientationPatient is not a pair of orthogonal unit vectors",
            tag="ImageOrientationPatient (0020,0037)",
            expected="two orthonormal direction cosines",
            found=list(iop),
        )
    dr, dc = (float(v) for v in pixel_spacing)
    a = np.eye(4)
    a[:3, 0] = row * dc
    a[:3, 1] = col * dr
    a[:3, 2] = np.asarray(slice_vector, dtype=float)
    a[:3, 3] = np.asarray(image_position, dtype=float)
    if abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise VoxeldoseError(
            "the slice vector lies in the image plane: the slices do not form a volume",
            tag="ImagePositionPatient (0020,0032)",
            expected="slices displaced along the slice normal",
            found=list(np.asarray(slice_vector, dtype=float)),
        )
    return a


@dataclass(frozen=True)
class Grid:
    """A voxel grid: its shape ``(nk, nj, ni)`` and its index→LPS affine (see module docstring)."""

    shape: tuple[int, int, int]
    affine: NDArray[np.float64]
    frame_of_reference_uid: str | None = None

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=float)
        if aff.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {aff.shape}")
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 3:
            raise ValueError(f"shape must have three entries (nk, nj, ni), got {self.shape}")

    @classmethod
    def axial(
        cls,
        shape: tuple[int, int, int],
        spacing_mm: Sequence[float],
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
        frame_of_reference_uid: str | None = None,
    ) -> Grid:
        """An axial (identity-orientation) grid; ``spacing_mm`` is ``(di, dj, dk)``."""
        aff = np.diag([*map(float, spacing_mm), 1.0])
        aff[:3, 3] = np.asarray(origin_mm, dtype=float)
        return cls(shape, aff, frame_of_reference_uid)

    @property
    def spacing(self) -> NDArray[np.float64]:
        """Voxel spacing along ``(i, j, k)``, mm."""
        spacing: NDArray[np.float64] = np.linalg.norm(self.affine[:3, :3], axis=0)  # column norms
        return spacing

    @property
    def direction(self) -> NDArray[np.float64]:
        """3x3 matrix whose columns are the unit vectors of the ``i``, ``j``, ``k`` axes in LPS."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> NDArray[np.float64]:
        """LPS position of the centre of voxel ``(0, 0, 0)``, mm."""
        return self.affine[:3, 3].copy()

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel, ml (= cm³); the parallelepiped volume for skewed grids."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_to_world(self, ijk: ArrayLike) -> NDArray[np.float64]:
        """Map indices ``(..., 3)`` ordered ``(i, j, k)`` to LPS mm ``(..., 3)``."""
        p = np.asarray(ijk, dtype=float)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz: ArrayLike) -> NDArray[np.float64]:
        """Map LPS mm ``(..., 3)`` to fractional indices ``(i, j, k)`` ``(..., 3)``."""
        p = np.asarray(xyz, dtype=float) - self.affine[:3, 3]
        return p @ np.linalg.inv(self.affine[:3, :3]).T

    def world_coordinates(self) -> NDArray[np.float64]:
        """LPS centres of every voxel, shape ``(nk, nj, ni, 3)``, mm."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        return self.index_to_world(np.stack([i, j, k], axis=-1))

    def same_as(self, other: Grid, tol_mm: float = 1e-3) -> bool:
        """True when both grids have the same shape and voxel centres within ``tol_mm``."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=tol_mm, rtol=0))


@dataclass(frozen=True)
class Volume:
    """An image on a :class:`Grid`: ``array[k, j, i]`` plus geometry and units.

    ``units`` is a UCUM-like string such as ``"Bq/ml"``, ``"counts"``, ``"HU"``, ``"Gy"``,
    ``"Bq.s"`` or ``"1"`` (masks, dimensionless).
    """

    array: Array
    affine: NDArray[np.float64]
    frame_of_reference_uid: str | None = None
    units: str = "1"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if getattr(self.array, "ndim", None) != 3:
            raise ValueError(f"Volume array must be 3-D [k, j, i], got ndim={getattr(self.array, 'ndim', None)}")
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=float))

    @property
    def grid(self) -> Grid:
        return Grid(tuple(self.array.shape), self.affine, self.frame_of_reference_uid)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> NDArray[np.float64]:
        """Voxel spacing along ``(i, j, k)``, mm."""
        return self.grid.spacing

    @property
    def voxel_volume_ml(self) -> float:
        return self.grid.voxel_volume_ml

    def index_to_world(self, ijk: ArrayLike) -> NDArray[np.float64]:
        """Map indices ``(..., 3)`` ordered ``(i, j, k)`` to LPS mm ``(..., 3)``."""
        return self.grid.index_to_world(ijk)

    def world_to_index(self, xyz: ArrayLike) -> NDArray[np.float64]:
        """Map LPS mm ``(..., 3)`` to fractional indices ``(i, j, k)`` ``(..., 3)``."""
        return self.grid.world_to_index(xyz)

    def with_array(self, array: Array, units: str | None = None) -> Volume:
        """The same geometry with another array (same shape), optionally other units."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"shape {tuple(array.shape)} differs from {self.shape}")
        return replace(self, array=array, units=self.units if units is None else units)


def resample(
    volume: Volume,
    target: Grid | Volume,
    *,
    order: int = 1,
    fill: float = 0.0,
    moving_to_target: NDArray[np.floating[Any]] | None = None,
) -> Volume:
    """Resample ``volume`` onto ``target``'s grid (the one resampling function of the project).

    Each target voxel centre is mapped to world coordinates, optionally through the rigid/affine
    transform ``moving_to_target`` inverted (a 4x4 LPS→LPS matrix that takes points of the moving
    image to the target image), then to fractional indices of ``volume``, and interpolated with
    :func:`scipy.ndimage.affine_transform` (``cupyx.scipy.ndimage`` for CuPy arrays): ``order=0``
    nearest neighbour (labels, masks), ``1`` trilinear, ``3`` cubic spline.  Points outside take
    ``fill``.  Intensities are interpolated, not integrated: to keep total activity when the voxel
    size changes, resample a concentration (Bq/ml), not an amount (Bq).
    """
    grid = target.grid if isinstance(target, Volume) else target
    # index_target -> world_target -> world_moving -> index_moving
    m = (
        np.linalg.inv(volume.affine)
        @ (np.eye(4) if moving_to_target is None else np.linalg.inv(moving_to_target))
        @ grid.affine
    )
    # affine_transform works in array axis order (k, j, i); m works on (i, j, k).
    perm = np.array([2, 1, 0])
    matrix = m[:3, :3][np.ix_(perm, perm)]
    offset = m[:3, 3][perm]
    xp_ndimage = _ndimage_for(volume.array)
    out = xp_ndimage.affine_transform(
        volume.array,
        matrix,
        offset=offset,
        output_shape=grid.shape,
        order=order,
        mode="constant",
        cval=fill,
        prefilter=order > 1,
    )
    return Volume(out, grid.affine, grid.frame_of_reference_uid, volume.units, dict(volume.meta))


def _ndimage_for(array: Array) -> ModuleType:
    """scipy.ndimage for NumPy arrays, cupyx.scipy.ndimage for CuPy arrays."""
    if type(array).__module__.startswith("cupy"):
        import cupyx.scipy.ndimage as ndi  # pragma: no cover - GPU only

        return cast(ModuleType, ndi)  # no type information for CuPy/SciPy: the module is Any to mypy
    import scipy.ndimage as ndi

    return cast(ModuleType, ndi)
