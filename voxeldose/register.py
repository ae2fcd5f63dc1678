"""Register: bring every time point onto the reference (first) time point.

Stage four of the pipeline (DESIGN.md).  Each SPECT/CT session has its own Frame of Reference and
the patient lies a little differently on the couch each time, so the SPECT of time point *n* is
aligned to the reference through its own CT: a rigid (6 degrees of freedom) CT-to-CT registration,
then the SPECT is resampled onto the reference SPECT grid with :func:`align_to_reference` (through
:func:`voxeldose.geometry.resample`, the one resampling function).

Method (:func:`register_rigid`)
-------------------------------
* Both CTs are clamped to [−1000, 1500] HU (metal and dense contrast do not dominate) and
  block-averaged to a working grid of about :data:`WORKING_SPACING_MM` (4 mm): the body outline,
  lungs, bones and organs that drive a rigid fit are all far larger than that, and the SPECT it is
  for has 4–5 mm voxels.  The reference CT is prepared once for all time points
  (:func:`prepare_ct`).
* Metric: normalised cross-correlation (ITK's ``Correlation``).  Both images are CT of the same
  patient, so the intensity relation is linear (identity up to calibration drift between sessions
  or a different kVp), which is what correlation assumes; it is smoother and less noisy than
  Mattes mutual information for one modality, and unlike mean squares it does not care about an
  HU offset/gain between sessions.  The metric is evaluated only inside the reference body (HU >
  −500, the largest connected object — so the couch is left out — holes filled slice by slice so
  the lungs are in, dilated by one working voxel so the skin edge is in).
* Transform: ``Euler3DTransform`` about the reference body centroid, started from the best (by the
  metric, at the coarsest level) of: identity (or ``initial``), the image centres aligned
  (``CenteredTransformInitializer`` GEOMETRY) and the body centroids aligned (MOMENTS of the body
  masks).
* Multi-resolution: a pyramid of the working grid block-averaged by 4, 2, 1 (≈16, 8, 4 mm,
  :data:`SHRINK_FACTORS`) and smoothed with a Gaussian of σ = 0.5 voxel of each level; each level
  is registered in turn (its own ``ImageRegistrationMethod``) from the previous level's result.
  The images are shrunk, not only the sampling domain (as ITK's built-in shrink factors do, which
  smooths both full-size images and filters a full-size gradient image at every level: most of
  the time at a few thousand samples), and the image gradient is taken by central differences at
  the sample points.  Optimiser: regular-step gradient descent with parameter scales from physical
  shift (see :func:`_set_optimizer`).  Sampling: :data:`METRIC_SAMPLES` body voxels per level drawn
  at random with the fixed seed :data:`SAMPLING_SEED`, so the same inputs give the same transform
  (bit for bit) and the run time does not grow with the CT matrix.
* Cost and accuracy on the default patient (256 × 256 × 230 CT, 3 moving time points, 2 cores):
  about 1.7 s of CPU for the three registrations with the reference prepared once, 16–20
  iterations per level; error against the phantom's true repositioning < 0.2 mm over the whole
  body (0.12–0.13 mm).  Before (ITK's shrink factors, conjugate gradient with a line search): 8.6 s
  for the same three on a quiet machine, 0.07–0.11 mm (benchmarks/RESULTS.md).

ITK's registration transform maps points of the *fixed* image to the *moving* image; here the fixed
image is the reference, so the transform found maps reference → moving and
``moving_to_reference`` is its inverse.

Quality
-------
After registration the moving CT is interpolated (trilinear, as
:func:`~voxeldose.geometry.resample` does for the SPECT) at :data:`SIMILARITY_VOXELS` voxels of the
reference body on the working grid (drawn at random with :data:`SAMPLING_SEED`; all when fewer),
and the normalised cross-correlation (NCC) is computed over those where the moving CT has data.
The result is ``"poor"`` when any of these holds, and the message says which and what to check:

* NCC after registration < :data:`NCC_POOR_BELOW` (0.85).  Derivation on the synthetic patient,
  NCC at the true transform and at the truth composed with a deliberate error (the three moving
  time points; measured 2026-12-03 on 50 000 body voxels as computed here):

  ==================================  ===========  ===================================================
  phantom (CT voxels)                 truth        10 mm along x / y / z  (5 mm along x; 5° about z)
  ==================================  ===========  ===================================================
  default (1.875 × 1.875 × 2 mm)      0.980–0.983  0.74 / 0.72 / 0.83  (0.85; 0.82–0.83)
  small, tests (3.6 × 3.6 × 4.32 mm)  0.90–0.92    0.59 / 0.53–0.54 / 0.71–0.72  (0.75; 0.82)
  ==================================  ===========  ===================================================

  With all body voxels every figure is within 0.007 of these.  The small phantom's truth is lower
  because its coarse voxels are sampled without partial volume, so interpolation differs at every
  edge.  0.85 lies below every correct alignment and above every 10 mm error.  Real patients add
  non-rigid differences (breathing, bowel, arms) that lower NCC, so a real "poor" asks for a look
  at the fused images, not an automatic rejection; revisit the threshold with patient data.  A
  left–right flip of a nearly symmetric body can still score above it (the phantom's: 0.88, measured
  on all body voxels with the previous optimiser):
  mirrored data must be caught by reading the DICOM orientation right, not here.
* less than :data:`MIN_OVERLAP` (50 %) of the reference body lies inside the moving CT.
* the optimiser stopped on its iteration limit rather than converging.
* the patient would have moved more than :data:`MAX_TRANSLATION_MM` (50 mm, at the body centre) or
  rotated more than :data:`MAX_ROTATION_DEG` (15°) between sessions relative to the start
  (identity, or ``initial``): implausible for repositioning on a couch; if the scanner's table
  coordinate really differs between sessions, pass a rough ``initial``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import SimpleITK as sitk
from numpy.typing import ArrayLike, DTypeLike, NDArray
from scipy import ndimage

from .errors import VoxeldoseError
from .geometry import Grid, Volume, resample

__all__ = [
    "MAX_ROTATION_DEG",
    "MAX_TRANSLATION_MM",
    "MIN_OVERLAP",
    "NCC_POOR_BELOW",
    "FixedParts",
    "PreparedCT",
    "Registration",
    "align_to_reference",
    "body_mask",
    "euler_angles_deg",
    "from_sitk",
    "prepare_ct",
    "register_rigid",
    "to_sitk",
]

#: CT numbers are clamped to this range before registering, HU.
HU_RANGE = (-1000.0, 1500.0)
#: Body: HU above this (air −1000, lung ≈ −750…−850 are below; fat −100 above).
BODY_HU = -500.0
#: Target voxel size of the working grid, mm (block averaging by an integer factor per axis).
WORKING_SPACING_MM = 4.0
#: Number of body voxels sampled for the metric at each level (random, fixed seed; all when fewer).
METRIC_SAMPLES = 5_000
#: Seed of the random metric sampling (fixed: same inputs, same result).
SAMPLING_SEED = 20260105
#: Block-averaging factors of the pyramid relative to the working grid, coarsest first (≈16, 8, 4 mm).
SHRINK_FACTORS = (4, 2, 1)
#: Gaussian smoothing after block averaging, σ in voxels of each level.
SMOOTHING_SIGMAS_VOXELS = (0.5, 0.5, 0.5)
#: The Gaussian kernel is cut at this many σ (2: three taps at σ = 0.5 voxel).
GAUSSIAN_TRUNCATE = 2.0
#: Iteration limit of the optimiser at each level (it converges in ~15–25).
MAX_ITERATIONS = 200
#: First step of the optimiser at each level, in voxels of that level.
LEARNING_RATE_VOXELS = (0.5, 0.5, 0.25)
#: A level has converged when the step is below this, in voxels of that level (0.04 mm at 4 mm at the
#: finest; the coarser levels only need to land well within a voxel of the next).
MIN_STEP_VOXELS = (0.02, 0.02, 0.01)
#: Factor by which the step shrinks each time the gradient turns back.
RELAXATION = 0.8
#: NCC in the body below this after registration: "poor" (see the module docstring).
NCC_POOR_BELOW = 0.85
#: Fraction of the reference body that must lie inside the moving CT.
MIN_OVERLAP = 0.5
#: The quality NCC and overlap are computed on this many body voxels of the working grid, drawn
#: at random with SAMPLING_SEED (0: all).
SIMILARITY_VOXELS = 50_000
#: Plausible repositioning between sessions on a couch: displacement of the body centre, mm.
MAX_TRANSLATION_MM = 50.0
#: Plausible repositioning between sessions: total rotation angle, degrees.
MAX_ROTATION_DEG = 15.0
METRIC_NAME = "normalised cross-correlation of CT (HU clamped to [-1000, 1500]) in the reference body"


# ------------------------------------------------------------------------------ conversions
def to_sitk(volume: Volume, dtype: DTypeLike = np.float32) -> sitk.Image:
    """A SimpleITK image with ``volume``'s values and geometry.

    SimpleITK indexes ``(x, y, z) = (i, j, k)`` and ``GetImageFromArray`` takes ``[k, j, i]``
    arrays, so the array goes in as it is; origin = ``affine[:3, 3]``, spacing = column norms,
    direction = normalised columns (flattened row by row).  ITK's physical space is LPS, as DICOM's.
    """
    arr = np.ascontiguousarray(np.asarray(volume.array), dtype=dtype)
    img = sitk.GetImageFromArray(arr, isVector=False)
    a = volume.affine
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in a[:3, 3]])
    img.SetDirection([float(v) for v in (a[:3, :3] / spacing).ravel()])
    return img


def from_sitk(image: sitk.Image, *, units: str = "1", frame_of_reference_uid: str | None = None) -> Volume:
    """The inverse of :func:`to_sitk`."""
    arr = sitk.GetArrayFromImage(image)
    return Volume(arr, _sitk_affine(image), frame_of_reference_uid, units)


def _sitk_affine(image: sitk.Image) -> NDArray[np.float64]:
    a = np.eye(4)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    a[:3, :3] = d * np.asarray(image.GetSpacing(), dtype=float)
    a[:3, 3] = image.GetOrigin()
    return a


def _euler_matrix(tx: sitk.Euler3DTransform) -> NDArray[np.float64]:
    """4x4 of an ITK Euler transform: ``x ↦ R (x − c) + c + t``."""
    r = np.asarray(tx.GetMatrix(), dtype=float).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=float)
    t = np.asarray(tx.GetTranslation(), dtype=float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + t - r @ c
    return m


def euler_angles_deg(matrix: ArrayLike) -> tuple[float, float, float]:
    """Angles ``(ax, ay, az)`` in degrees with ``R = Rz(az) · Ry(ay) · Rx(ax)`` (rotations about the
    LPS x, y, z axes, applied x first), for reporting."""
    r = np.asarray(matrix, dtype=float)[:3, :3]
    ay = math.asin(max(-1.0, min(1.0, -r[2, 0])))
    ax = math.atan2(r[2, 1], r[2, 2])
    az = math.atan2(r[1, 0], r[0, 0])
    return (math.degrees(ax), math.degrees(ay), math.degrees(az))


def _rotation_angle_deg(matrix: ArrayLike) -> float:
    r = np.asarray(matrix, dtype=float)[:3, :3]
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0))))


# ------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class Registration:
    """A rigid registration of one time point's CT to the reference CT.

    ``moving_to_reference`` (4x4, LPS mm) takes a point in the moving time point's scanner
    coordinates to the same anatomy in the reference's: pass it as ``moving_to_target`` to
    :func:`~voxeldose.geometry.resample` (as :func:`align_to_reference` does).
    ``translation_mm`` and ``rotation_deg`` describe the same matrix: ``p ↦ R p + t`` with
    ``R = Rz·Ry·Rx`` (angles about the LPS axes, degrees).
    """

    moving_to_reference: NDArray[np.floating[Any]]
    translation_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    metric: str
    similarity_before: float
    similarity_after: float
    quality: Literal["good", "poor"]
    message: str
    #: Displacement of the reference body centre between the sessions, mm (plausibility check).
    displacement_at_body_centre_mm: float = math.nan
    #: Total rotation angle, degrees.
    rotation_angle_deg: float = math.nan
    #: Fraction of the reference body inside the moving CT.
    overlap_fraction: float = math.nan
    converged: bool = True
    optimizer_stop: str = ""
    iterations: int = 0
    runtime_s: float = math.nan
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def apply(self, points_mm: ArrayLike) -> NDArray[np.float64]:
        """Map moving-scanner LPS points ``(..., 3)`` to reference LPS points."""
        p = np.asarray(points_mm, dtype=float)
        m = self.moving_to_reference
        moved: NDArray[np.float64] = p @ m[:3, :3].T + m[:3, 3]
        return moved

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain floats, lists, strings)."""
        return {
            "method": "rigid (6 degrees of freedom) CT-to-CT, SimpleITK Euler3DTransform",
            "moving_to_reference_lps_4x4": np.asarray(self.moving_to_reference, dtype=float).tolist(),
            "moving_to_reference_meaning": "moving scanner LPS point (mm) -> same anatomy in the reference's LPS (mm)",
            "translation_mm": [float(v) for v in self.translation_mm],
            "rotation_deg": [float(v) for v in self.rotation_deg],
            "rotation_convention": "R = Rz(az) Ry(ay) Rx(ax), angles (ax, ay, az) about LPS axes",
            "rotation_angle_deg": _f(self.rotation_angle_deg),
            "displacement_at_body_centre_mm": _f(self.displacement_at_body_centre_mm),
            "metric": self.metric,
            "similarity_before": _f(self.similarity_before),
            "similarity_after": _f(self.similarity_after),
            "similarity_poor_below": NCC_POOR_BELOW,
            "overlap_fraction": _f(self.overlap_fraction),
            "quality": self.quality,
            "message": self.message,
            "converged": bool(self.converged),
            "optimizer_stop": self.optimizer_stop,
            "iterations": int(self.iterations),
            "runtime_s": _f(self.runtime_s),
            "details": _jsonable(self.details),
        }


def _f(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _jsonable(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, float)):
        return _f(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------ preprocessing
def _block_mean(arr: NDArray[Any], factors: tuple[int, int, int]) -> NDArray[np.float32]:
    """Mean over ``factors = (fk, fj, fi)`` blocks of a ``[k, j, i]`` array (trailing partial blocks
    dropped), float32.  Summed slice by slice along one axis at a time: several times faster than a mean over
    the axes of a 6-D reshape, which numpy reduces with strided loops."""
    a: NDArray[Any] = np.asarray(arr)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = a.shape[axis] // f
        take = [slice(None)] * 3
        take[axis] = slice(0, n * f, f)
        acc = a[tuple(take)].astype(np.float32, copy=True)
        for s in range(1, f):
            take[axis] = slice(s, n * f, f)
            acc += a[tuple(take)]
        a = acc
    out: NDArray[np.float32] = np.ascontiguousarray(a, dtype=np.float32)
    if any(f > 1 for f in factors):
        out *= np.float32(1.0 / (factors[0] * factors[1] * factors[2]))
    return out


def _block_affine(affine: NDArray[np.floating[Any]], factors: tuple[int, int, int]) -> NDArray[np.float64]:
    """Affine of the grid of ``factors = (fk, fj, fi)`` blocks: block (0,0,0)'s centre is the centre
    of voxels 0..f−1."""
    f_ijk = np.array(factors[::-1], dtype=float)
    a = np.asarray(affine, dtype=float)
    out = a.copy()
    out[:3, :3] = a[:3, :3] * f_ijk
    out[:3, 3] = a[:3, :3] @ ((f_ijk - 1) / 2) + a[:3, 3]
    return out


def _working_ct(ct: Volume, what: str) -> Volume:
    """Clamp HU and block-average to about WORKING_SPACING_MM (integer factor per axis)."""
    arr = np.asarray(ct.array)
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise VoxeldoseError(
            f"the {what} CT is not a 3-D volume", expected="a CT series of several slices", found=arr.shape
        )
    if not np.all(np.isfinite(ct.affine)) or abs(np.linalg.det(ct.affine[:3, :3])) < 1e-9:
        raise VoxeldoseError(f"the {what} CT has no usable geometry", expected="an invertible index-to-patient affine")
    spacing = ct.spacing
    f = [max(1, int(np.rint(WORKING_SPACING_MM / s))) for s in spacing]  # (fi, fj, fk)
    factors = (f[2], f[1], f[0])
    nk, nj, ni = (arr.shape[0] // factors[0], arr.shape[1] // factors[1], arr.shape[2] // factors[2])
    if min(nk, nj, ni) < 4:
        raise VoxeldoseError(
            f"the {what} CT is too small to register ({arr.shape[::-1]} voxels of {np.round(spacing, 2).tolist()} mm)",
            expected=f"at least 4 voxels of {WORKING_SPACING_MM:g} mm along each axis",
        )
    # clamp and block-average a few slices at a time: the chunk stays in cache (≈3× faster than
    # clamping the whole CT first; the same numbers)
    out = np.empty((nk, nj, ni), dtype=np.float32)
    chunk = factors[0] * max(1, 8 // factors[0])
    buf = np.empty((chunk, arr.shape[1], arr.shape[2]), dtype=np.float32)
    for k0 in range(0, nk * factors[0], chunk):
        part = arr[k0 : min(k0 + chunk, nk * factors[0])]
        b = buf[: part.shape[0]]
        np.clip(part, HU_RANGE[0], HU_RANGE[1], out=b, casting="unsafe")
        out[k0 // factors[0] : k0 // factors[0] + part.shape[0] // factors[0]] = _block_mean(b, factors)
    return Volume(out, _block_affine(ct.affine, factors), ct.frame_of_reference_uid, "HU")


def body_mask(hu: ArrayLike, *, dilate: int = 1) -> NDArray[np.bool_]:
    """The patient's body in a CT array ``[k, j, i]``: HU > −500, largest connected object (not the
    couch), holes filled slice by slice (lungs, bowel gas), dilated by ``dilate`` voxels.

    The holes are filled for all slices at once: the background is labelled with in-plane
    4-connectivity, and every background component that does not touch the slice's edge is a hole
    (what :func:`scipy.ndimage.binary_fill_holes` does slice by slice)."""
    m: NDArray[np.bool_] = np.asarray(hu) > BODY_HU
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    m = lab == int(np.argmax(sizes))
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    bg, n_bg = ndimage.label(~m, structure=in_plane)
    outside = np.zeros(n_bg + 1, dtype=bool)
    for edge in (bg[:, 0, :], bg[:, -1, :], bg[:, :, 0], bg[:, :, -1]):
        outside[edge] = True
    outside[0] = False  # label 0 is the body itself
    m = ~outside[bg]
    if dilate > 0:
        m = ndimage.binary_dilation(m, structure=ndimage.generate_binary_structure(3, 1), iterations=dilate)
    return m


def _centroid(mask: NDArray[np.bool_], grid: Grid) -> NDArray[np.float64]:
    """Centre of the mask's voxels, LPS mm (from per-axis sums: no index list of all voxels)."""
    n = float(mask.sum())
    kji = [
        float(np.arange(mask.shape[ax]) @ mask.sum(axis=tuple(a for a in range(3) if a != ax), dtype=np.float64)) / n
        for ax in range(3)
    ]
    return grid.index_to_world(np.array(kji[::-1]))


class PreparedCT:
    """A CT ready to register, so that the reference is prepared once for all time points.

    ``working``: HU clamped and block-averaged to about :data:`WORKING_SPACING_MM`; ``levels``: the
    multi-resolution pyramid (SimpleITK images, coarsest first): ``working`` block-averaged by each of
    :data:`SHRINK_FACTORS` and smoothed with a Gaussian of :data:`SMOOTHING_SIGMAS_VOXELS` (voxels of
    that level).  The fixed-image parts (:class:`FixedParts`: body mask, its pyramid, the body centre)
    are computed when first needed, i.e. only for a CT used as the reference.
    """

    def __init__(self, ct: Volume, what: str = "reference") -> None:
        self.what = what
        self.working = _working_ct(ct, what)
        self.factors = [self._level_factors(s) for s in SHRINK_FACTORS]
        self.level_volumes = [self._level(f, sigma) for f, sigma in zip(self.factors, SMOOTHING_SIGMAS_VOXELS)]
        self.levels = [to_sitk(v) for v in self.level_volumes]
        coarse = self.level_volumes[0]
        self._coarse_body = body_mask(coarse.array, dilate=0)
        self._fixed: FixedParts | None = None

    def _level_factors(self, shrink: int) -> tuple[int, int, int]:
        """Block factors (k, j, i) of a level: ``shrink``, less along an axis that would keep < 4 voxels."""
        return cast(
            "tuple[int, int, int]",
            tuple(max(1, min(shrink, n // 4)) for n in self.working.shape),
        )

    def _level(self, factors: tuple[int, int, int], sigma: float) -> Volume:
        w = self.working
        arr = _block_mean(w.array, factors)
        if sigma > 0:
            arr = ndimage.gaussian_filter(arr, sigma, mode="nearest", truncate=GAUSSIAN_TRUNCATE)
        return Volume(arr, _block_affine(w.affine, factors), w.frame_of_reference_uid, "HU")

    @property
    def has_body(self) -> bool:
        """Whether the coarsest level shows a body at all (a few voxels above BODY_HU)."""
        return int(self._coarse_body.sum()) >= 2

    @property
    def coarse_body_centre(self) -> NDArray[np.float64]:
        """Body centroid on the coarsest level, LPS mm (a start candidate)."""
        return _centroid(self._coarse_body, self.level_volumes[0].grid)

    @property
    def geometric_centre(self) -> NDArray[np.float64]:
        """Centre of the working grid's box, LPS mm (ITK's ``CenteredTransformInitializer`` GEOMETRY)."""
        return self.working.grid.index_to_world((np.array(self.working.shape[::-1], dtype=float) - 1) / 2)

    @property
    def fixed(self) -> FixedParts:
        """What the CT needs as the fixed (reference) image; computed on first use, then kept."""
        if self._fixed is None:
            self._fixed = _fixed_parts(self.working, self.factors)
        return self._fixed


@dataclass(frozen=True)
class FixedParts:
    """The fixed-image parts of a :class:`PreparedCT`.

    ``mask``: the body on the working grid dilated by one voxel; ``mask_levels``: it block-reduced to
    each pyramid level (a block is in when any voxel is), with ``mask_level_counts`` voxels;
    ``centre``: the centroid of ``mask`` (the centre of rotation), LPS mm; ``similarity_kji`` (3, n)
    and ``similarity_values``: the body voxels (k, j, i) and their HU on which the quality NCC is
    computed (:data:`SIMILARITY_VOXELS` of them at random, fixed seed; all when fewer)."""

    mask: NDArray[np.bool_]
    mask_levels: list[sitk.Image]
    mask_level_counts: list[int]
    centre: NDArray[np.float64]
    similarity_kji: NDArray[np.float64]
    similarity_values: NDArray[np.float64]


def _fixed_parts(working: Volume, factors: list[tuple[int, int, int]]) -> FixedParts:
    m = body_mask(working.array, dilate=1)
    n = int(m.sum())
    levels = [
        to_sitk(Volume((_block_mean(m, f) > 0).astype(np.uint8), _block_affine(working.affine, f)), np.uint8)
        for f in factors
    ]
    kji = np.nonzero(m)
    if SIMILARITY_VOXELS and kji[0].size > SIMILARITY_VOXELS:
        pick = np.sort(np.random.default_rng(SAMPLING_SEED).choice(kji[0].size, SIMILARITY_VOXELS, replace=False))
        kji = tuple(i[pick] for i in kji)
    return FixedParts(
        mask=m,
        mask_levels=levels,
        mask_level_counts=[int(sitk.GetArrayViewFromImage(x).sum()) for x in levels],
        centre=_centroid(m, working.grid) if n else np.zeros(3),
        similarity_kji=np.stack(kji).astype(np.float64),
        similarity_values=np.asarray(working.array)[kji].astype(np.float64),
    )


def prepare_ct(ct: Volume, what: str = "reference") -> PreparedCT:
    """Prepare a CT for :func:`register_rigid` (pass the result instead of the volume to reuse it)."""
    return PreparedCT(ct, what)


def _ncc(a: NDArray[Any], b: NDArray[Any]) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def _similarity(ref: PreparedCT, moving: Volume, moving_to_reference: NDArray[np.floating[Any]]) -> tuple[float, float]:
    """NCC in the reference body (working grid) where the moving CT has data, and that overlap
    fraction.  The moving CT is interpolated trilinearly at the body voxels only: the same values as
    :func:`~voxeldose.geometry.resample` gives there (the same scipy routine, NaN outside)."""
    fx = ref.fixed
    mask_n = fx.similarity_values.size
    # reference voxel index (i, j, k) -> reference LPS -> moving LPS -> moving voxel index
    m = np.linalg.inv(moving.affine) @ np.linalg.inv(moving_to_reference) @ ref.working.affine
    perm = np.array([2, 1, 0])
    matrix = m[:3, :3][np.ix_(perm, perm)]  # in (k, j, i) order
    offset = m[:3, 3][perm]
    coords = matrix @ fx.similarity_kji + offset[:, None]
    moved = ndimage.map_coordinates(moving.array, coords, order=1, mode="constant", cval=np.nan, prefilter=False)
    inside = np.isfinite(moved)
    n_in = int(inside.sum())
    overlap = n_in / max(1, mask_n)
    if n_in < 10:
        return 0.0, overlap
    return _ncc(fx.similarity_values[inside], moved[inside]), overlap


# ------------------------------------------------------------------------------ registration
def register_rigid(
    reference_ct: Volume | PreparedCT,
    moving_ct: Volume | PreparedCT,
    *,
    initial: ArrayLike | None = None,
) -> Registration:
    """Rigidly register ``moving_ct`` to ``reference_ct`` (both in HU); see the module docstring.

    Either CT may be given prepared (:func:`prepare_ct`), so that a reference used for several time
    points is prepared once.  ``initial`` (4x4, moving → reference, LPS mm) is a starting estimate,
    e.g. when the scanner's table coordinate differs between sessions; the plausibility check is
    made relative to it.  Raises :class:`~voxeldose.errors.VoxeldoseError` when a CT cannot be used
    at all (not 3-D, no body); a registration that ran but is doubtful comes back with
    ``quality == "poor"``.
    """
    t0 = time.perf_counter()
    ref = reference_ct if isinstance(reference_ct, PreparedCT) else PreparedCT(reference_ct, "reference")
    mov = moving_ct if isinstance(moving_ct, PreparedCT) else PreparedCT(moving_ct, "moving")
    fx = ref.fixed
    ref_mask = fx.mask
    if ref_mask.sum() < 100 or not mov.has_body:
        which = "reference" if ref_mask.sum() < 100 else "moving"
        raise VoxeldoseError(
            f"the {which} CT shows no patient body to register (too few voxels above {BODY_HU:g} HU)",
            expected="a CT of the patient in HU",
        )
    start = np.eye(4) if initial is None else np.asarray(initial, dtype=float)
    if start.shape != (4, 4) or not np.all(np.isfinite(start)):
        raise VoxeldoseError("the initial transform must be a finite 4x4 matrix", tag="initial", found=start.shape)

    # centre of rotation: the reference body centroid (decouples rotation from translation)
    centre = fx.centre

    # candidates for the start, as reference -> moving matrices
    ref_to_mov_start = np.linalg.inv(start)
    geom_m = np.eye(4)
    geom_m[:3, 3] = mov.geometric_centre - ref.geometric_centre
    moments = np.eye(4)
    moments[:3, 3] = mov.coarse_body_centre - ref.coarse_body_centre
    candidates = {"start": ref_to_mov_start, "image centres": geom_m, "body centroids": moments}

    scores: dict[str, float] = {}
    for name, m in candidates.items():
        ev = _method(fixed_mask=fx.mask_levels[0], percentage=1.0)
        ev.SetInitialTransform(_euler_from_matrix(m, centre), inPlace=False)
        try:
            scores[name] = float(ev.MetricEvaluate(ref.levels[0], mov.levels[0]))
        except RuntimeError:  # no overlap at all
            scores[name] = math.inf
    best = min(scores, key=lambda k: scores[k])  # ITK's correlation metric is −NCC: lower is better

    tx = _euler_from_matrix(candidates[best], centre)
    percentages = [min(1.0, METRIC_SAMPLES / max(1, n)) for n in fx.mask_level_counts]
    per_level: list[dict[str, Any]] = []
    stop, iterations = "", 0
    for level, (fixed, moving, mask, pct) in enumerate(zip(ref.levels, mov.levels, fx.mask_levels, percentages)):
        reg = _method(fixed_mask=mask, percentage=pct)
        _set_optimizer(reg, level=level, level_spacing_mm=max(fixed.GetSpacing()))
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(fixed, moving)
        except RuntimeError as exc:
            raise VoxeldoseError(
                f"the CT-to-CT registration failed inside SimpleITK: {str(exc).strip().splitlines()[-1]}",
                expected="two CTs of the same patient that overlap",
            ) from None
        stop = reg.GetOptimizerStopConditionDescription().strip()
        iterations = int(reg.GetOptimizerIteration())
        per_level.append(
            {
                "spacing_mm": list(fixed.GetSpacing()),
                "iterations": iterations,
                "metric": float(reg.GetMetricValue()),
                "stop": stop,
            }
        )
    converged = "Maximum number of iterations" not in stop

    ref_to_mov = _euler_matrix(tx)
    m2r = np.linalg.inv(ref_to_mov)
    t_reg = time.perf_counter() - t0

    before, overlap_before = _similarity(ref, mov.working, start)
    after, overlap = _similarity(ref, mov.working, m2r)

    # plausibility, relative to the start estimate
    rel = m2r @ np.linalg.inv(start)  # start-corrected reference -> registered reference
    c_h = np.append(centre, 1.0)
    displacement = float(np.linalg.norm((np.linalg.inv(m2r) @ c_h)[:3] - (np.linalg.inv(start) @ c_h)[:3]))
    angle = _rotation_angle_deg(rel)

    problems = []
    if not converged:
        problems.append(f"the optimiser did not converge ({iterations} iterations at the finest level: {stop})")
    if displacement > MAX_TRANSLATION_MM or angle > MAX_ROTATION_DEG:
        problems.append(
            f"the patient would have moved {displacement:.0f} mm and rotated {angle:.1f}° between the sessions "
            f"(more than {MAX_TRANSLATION_MM:g} mm / {MAX_ROTATION_DEG:g}° is implausible for repositioning on a couch): "
            "check that both CTs are of this patient and cover the same region, or give an initial alignment "
            "if the scanner's table coordinates differ between sessions"
        )
    if overlap < MIN_OVERLAP:
        problems.append(
            f"only {overlap:.0%} of the reference body lies inside the moving CT after registration "
            f"(at least {MIN_OVERLAP:.0%} needed): check the scan ranges of the two CTs"
        )
    if after < NCC_POOR_BELOW:
        problems.append(
            f"the CTs agree poorly after registration (normalised cross-correlation in the body {after:.3f}, "
            f"below {NCC_POOR_BELOW:.2f}; before {before:.3f}): check that both CTs are of this patient, "
            "that neither is flipped or mislabelled in orientation, and look at the fused images "
            "(large breathing, bowel or arm differences also lower it)"
        )
    quality: Literal["good", "poor"] = "poor" if problems else "good"
    if problems:
        message = "registration needs checking: " + "; ".join(problems) + "."
    else:
        message = (
            f"rigid CT-to-CT registration converged: the patient moved {displacement:.1f} mm and rotated "
            f"{angle:.1f}° between sessions; normalised cross-correlation in the body {before:.3f} → {after:.3f}."
        )
    angles = euler_angles_deg(m2r)
    return Registration(
        moving_to_reference=m2r,
        translation_mm=cast("tuple[float, float, float]", tuple(float(v) for v in m2r[:3, 3])),  # x, y, z
        rotation_deg=angles,
        metric=METRIC_NAME,
        similarity_before=before,
        similarity_after=after,
        quality=quality,
        message=message,
        displacement_at_body_centre_mm=displacement,
        rotation_angle_deg=angle,
        overlap_fraction=overlap,
        converged=converged,
        optimizer_stop=stop,
        iterations=iterations,
        runtime_s=time.perf_counter() - t0,
        details={
            "working_spacing_mm": {"reference": ref.working.spacing.tolist(), "moving": mov.working.spacing.tolist()},
            "pyramid": "working grid block-averaged by each shrink factor, then Gaussian-smoothed (sigma in voxels "
            "of that level); each level registered in turn, starting from the previous level's result",
            "shrink_factors": list(SHRINK_FACTORS),
            "smoothing_sigmas_voxels": list(SMOOTHING_SIGMAS_VOXELS),
            "levels": per_level,
            "sampling": {
                "strategy": "random",
                "samples_per_level": METRIC_SAMPLES,
                "percentage_per_level": percentages,
                "seed": SAMPLING_SEED,
            },
            "optimizer": "regular-step gradient descent, scales from physical shift, first step "
            f"{list(LEARNING_RATE_VOXELS)} voxels of the level, times {RELAXATION:g} on each reversal, converged below "
            f"{list(MIN_STEP_VOXELS)} voxels",
            "start_candidates_metric": scores,
            "start_chosen": best,
            "centre_of_rotation_mm": centre.tolist(),
            "overlap_fraction_before": overlap_before,
            "registration_s": t_reg,
            "ncc_poor_below": NCC_POOR_BELOW,
        },
    )


def _method(*, fixed_mask: sitk.Image, percentage: float) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fixed_mask)
    if percentage < 1.0:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(percentage, SAMPLING_SEED)
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    # image gradients by central differences at the sample points only, not as a whole gradient
    # image filtered at every level (that filter took most of the time at a few thousand samples)
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    return reg


def _set_optimizer(reg: sitk.ImageRegistrationMethod, *, level: int, level_spacing_mm: float) -> None:
    """Regular-step gradient descent with parameter scales from physical shift (1 radian of rotation
    weighs as the largest displacement it causes in the image, so rotation and translation steps are
    comparable): the first step is LEARNING_RATE_VOXELS voxels of the level, the step shrinks by
    RELAXATION each time the gradient turns back, and the level has converged when the step is below
    MIN_STEP_VOXELS[level] voxels (or the gradient vanishes).

    Chosen over conjugate gradient with a golden-section line search (the previous optimiser here):
    the same accuracy on the phantoms with ~20–30 iterations of one metric evaluation each per level
    instead of ~31 iterations of a line search of up to 20 evaluations.  The step must shrink slowly
    (0.8): halving it on each reversal (ITK's default 0.5) stopped "step too small" 1–2 mm short of
    the optimum on the small phantom, whose edges (no partial volume) make the metric rough."""
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=LEARNING_RATE_VOXELS[level] * level_spacing_mm,
        minStep=MIN_STEP_VOXELS[level] * level_spacing_mm,
        numberOfIterations=MAX_ITERATIONS,
        relaxationFactor=RELAXATION,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()


def _euler_from_matrix(ref_to_mov: NDArray[np.float64], centre: NDArray[np.float64]) -> sitk.Euler3DTransform:
    """An ITK Euler transform about ``centre`` equal to the rigid 4x4 ``ref_to_mov``."""
    r = np.asarray(ref_to_mov, dtype=float)[:3, :3]
    u, _, vt = np.linalg.svd(r)  # nearest rotation (guards against round-off in a given matrix)
    r = u @ vt
    if np.linalg.det(r) < 0:
        raise VoxeldoseError("the initial transform is not a rotation (it mirrors)", tag="initial")
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in centre])
    tx.SetMatrix([float(v) for v in r.ravel()], 1e-6)
    offset = np.asarray(ref_to_mov, dtype=float)[:3, 3]
    # x -> R (x - c) + c + t  ==  R x + offset  =>  t = offset - c + R c
    tx.SetTranslation([float(v) for v in offset - centre + r @ centre])
    return tx


# ------------------------------------------------------------------------------ applying it
def align_to_reference(
    moving: Volume,
    reference_grid: Grid | Volume,
    reg: Registration,
    *,
    order: int = 1,
    fill: float = 0.0,
) -> Volume:
    """Resample an image of the moving time point (e.g. its SPECT in Bq/ml) onto ``reference_grid``.

    Goes through :func:`~voxeldose.geometry.resample` with ``moving_to_target =
    reg.moving_to_reference``.  Resample concentrations (Bq/ml), not amounts, when voxel sizes
    differ; ``fill`` is used outside the moving image (0 for activity, −1000 for CT).
    """
    out = resample(moving, reference_grid, order=order, fill=fill, moving_to_target=reg.moving_to_reference)
    meta = dict(out.meta)
    meta["registration"] = {"quality": reg.quality, "moving_to_reference_lps_4x4": reg.moving_to_reference.tolist()}
    return Volume(out.array, out.affine, out.frame_of_reference_uid, out.units, meta)
