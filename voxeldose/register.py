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
  lungs, bones and organs that drive a rigid fit are all far larger than that, the SPECT it is for
  has 4–5 mm voxels, and it keeps a pair at a few seconds (≈2.7 s wall, 4.6 s CPU, for the default
  phantom's 256 × 256 × 230 CT on 2 cores, TRE < 0.1 mm).
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
* Multi-resolution: shrink factors 4, 2, 1 of the working grid (≈16, 8, 4 mm) with Gaussian
  smoothing σ = 2, 1, 0.5 working voxels; conjugate-gradient descent with a line search and
  parameter scales from physical shift (see :func:`_set_optimizer`).  Sampling:
  :data:`METRIC_SAMPLES` body voxels per level drawn at random with the fixed seed
  :data:`SAMPLING_SEED`, so the same inputs give the same transform (bit for bit) and the run time
  does not grow with the CT matrix.

ITK's registration transform maps points of the *fixed* image to the *moving* image; here the fixed
image is the reference, so the transform found maps reference → moving and
``moving_to_reference`` is its inverse.

Quality
-------
After registration the moving CT is resampled onto the reference working grid with the result
(through :func:`~voxeldose.geometry.resample`, i.e. exactly as the SPECT will be) and the
normalised cross-correlation (NCC) is computed inside the reference body mask, where the moving CT
has data.  The result is ``"poor"`` when any of these holds, and the message says which and what to
check:

* NCC after registration < :data:`NCC_POOR_BELOW` (0.85).  Derivation on the synthetic patient,
  NCC on the working grid at the true transform and at the truth composed with a deliberate error:

  ====================================  =========  =====================================
  phantom (CT voxels)                   truth      10 mm along x / y / z  (5 mm along x)
  ====================================  =========  =====================================
  default (1.875 × 1.875 × 2 mm)        0.984      0.76 / 0.74 / 0.84  (0.87)
  small, tests (3.6 × 3.6 × 4.32 mm)    0.90–0.92  0.61–0.62 / 0.54–0.55 / 0.73–0.75  (0.73–0.77)
  ====================================  =========  =====================================

  (5° about z: 0.84 / 0.82–0.84.)  The small phantom's truth is lower because its coarse voxels
  are sampled without partial volume, so interpolation differs at every edge.  0.85 lies below
  every correct alignment and above every 10 mm error.  Real patients add non-rigid differences
  (breathing, bowel, arms) that lower NCC, so a real "poor" asks for a look at the fused images,
  not an automatic rejection; revisit the threshold with patient data.  A left–right flip of a
  nearly symmetric body can still score above it (the phantom's: 0.88): mirrored data must be
  caught by reading the DICOM orientation right, not here.
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
    "Registration",
    "align_to_reference",
    "body_mask",
    "euler_angles_deg",
    "from_sitk",
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
METRIC_SAMPLES = 10_000
#: Seed of the random metric sampling (fixed: same inputs, same result).
SAMPLING_SEED = 20260105
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS_VOXELS = (2.0, 1.0, 0.5)
MAX_ITERATIONS = 100
CONVERGENCE_MINIMUM = 1e-6
CONVERGENCE_WINDOW = 10
MAX_STEP_MM = 4.0
#: NCC in the body below this after registration: "poor" (see the module docstring).
NCC_POOR_BELOW = 0.85
#: Fraction of the reference body that must lie inside the moving CT.
MIN_OVERLAP = 0.5
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
def _working_ct(ct: Volume, what: str) -> Volume:
    """Clamp HU and block-average to about WORKING_SPACING_MM (integer factor per axis)."""
    arr = np.asarray(ct.array)
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise VoxeldoseError(
            f"the {what} CT is not a 3-D volume", expected="a CT series of several slices", found=arr.shape
        )
    if not np.all(np.isfinite(ct.affine)) or abs(np.linalg.det(ct.affine[:3, :3])) < 1e-9:
        raise VoxeldoseError(f"the {what} CT has no usable geometry", expected="an invertible index-to-patient affine")
    hu = np.clip(arr.astype(np.float32, copy=False), *HU_RANGE)
    spacing = ct.spacing
    f = [max(1, int(np.rint(WORKING_SPACING_MM / s))) for s in spacing]  # (fi, fj, fk)
    fk, fj, fi = f[2], f[1], f[0]
    nk, nj, ni = (hu.shape[0] // fk, hu.shape[1] // fj, hu.shape[2] // fi)
    if min(nk, nj, ni) < 4:
        raise VoxeldoseError(
            f"the {what} CT is too small to register ({hu.shape[::-1]} voxels of {np.round(spacing, 2).tolist()} mm)",
            expected=f"at least 4 voxels of {WORKING_SPACING_MM:g} mm along each axis",
        )
    if (fk, fj, fi) != (1, 1, 1):
        hu = hu[: nk * fk, : nj * fj, : ni * fi].reshape(nk, fk, nj, fj, ni, fi).mean(axis=(1, 3, 5), dtype=np.float32)
    aff = ct.affine.copy()
    aff[:3, :3] = ct.affine[:3, :3] * np.array([fi, fj, fk], dtype=float)
    # centre of block (0,0,0) = centre of voxels 0..f-1
    aff[:3, 3] = ct.affine[:3, :3] @ np.array([(fi - 1) / 2, (fj - 1) / 2, (fk - 1) / 2]) + ct.affine[:3, 3]
    return Volume(np.ascontiguousarray(hu, dtype=np.float32), aff, ct.frame_of_reference_uid, "HU")


def body_mask(hu: ArrayLike, *, dilate: int = 1) -> NDArray[np.bool_]:
    """The patient's body in a CT array ``[k, j, i]``: HU > −500, largest connected object (not the
    couch), holes filled slice by slice (lungs, bowel gas), dilated by ``dilate`` voxels."""
    m: NDArray[np.bool_] = np.asarray(hu) > BODY_HU
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    m = lab == int(np.argmax(sizes))
    for k in range(m.shape[0]):
        m[k] = ndimage.binary_fill_holes(m[k])
    if dilate > 0:
        m = ndimage.binary_dilation(m, structure=ndimage.generate_binary_structure(3, 1), iterations=dilate)
    return m


def _ncc(a: NDArray[Any], b: NDArray[Any]) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def _similarity(
    ref: Volume, mask: NDArray[np.bool_], moving: Volume, moving_to_reference: NDArray[np.floating[Any]]
) -> tuple[float, float]:
    """NCC in the reference body where the moving CT has data, and that overlap fraction."""
    moved = resample(moving, ref.grid, order=1, fill=np.nan, moving_to_target=moving_to_reference)
    inside = mask & np.isfinite(moved.array)
    overlap = float(inside.sum()) / max(1, int(mask.sum()))
    if inside.sum() < 10:
        return 0.0, overlap
    return _ncc(ref.array[inside], moved.array[inside]), overlap


# ------------------------------------------------------------------------------ registration
def register_rigid(
    reference_ct: Volume,
    moving_ct: Volume,
    *,
    initial: ArrayLike | None = None,
) -> Registration:
    """Rigidly register ``moving_ct`` to ``reference_ct`` (both in HU); see the module docstring.

    ``initial`` (4x4, moving → reference, LPS mm) is a starting estimate, e.g. when the scanner's
    table coordinate differs between sessions; the plausibility check is made relative to it.
    Raises :class:`~voxeldose.errors.VoxeldoseError` when a CT cannot be used at all (not 3-D, no
    body); a registration that ran but is doubtful comes back with ``quality == "poor"``.
    """
    t0 = time.perf_counter()
    ref = _working_ct(reference_ct, "reference")
    mov = _working_ct(moving_ct, "moving")
    ref_mask = body_mask(ref.array, dilate=1)
    mov_body = body_mask(mov.array, dilate=0)
    if ref_mask.sum() < 100 or mov_body.sum() < 100:
        which = "reference" if ref_mask.sum() < 100 else "moving"
        raise VoxeldoseError(
            f"the {which} CT shows no patient body to register (too few voxels above {BODY_HU:g} HU)",
            expected="a CT of the patient in HU",
        )
    start = np.eye(4) if initial is None else np.asarray(initial, dtype=float)
    if start.shape != (4, 4) or not np.all(np.isfinite(start)):
        raise VoxeldoseError("the initial transform must be a finite 4x4 matrix", tag="initial", found=start.shape)

    fixed = to_sitk(ref)
    moving = to_sitk(mov)
    fixed_mask = to_sitk(Volume(ref_mask.astype(np.uint8), ref.affine), dtype=np.uint8)

    # centre of rotation: the reference body centroid (decouples rotation from translation)
    kji = np.argwhere(ref_mask)
    centre = ref.grid.index_to_world(kji[:, ::-1].mean(axis=0))
    mov_kji = np.argwhere(mov_body)
    mov_centre = mov.grid.index_to_world(mov_kji[:, ::-1].mean(axis=0))

    # candidates for the start, as reference -> moving matrices
    ref_to_mov_start = np.linalg.inv(start)
    geom = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    geom_m = _euler_matrix(sitk.Euler3DTransform(geom))
    moments = np.eye(4)
    moments[:3, 3] = mov_centre - centre
    candidates = {"start": ref_to_mov_start, "image centres": geom_m, "body centroids": moments}

    coarse = SHRINK_FACTORS[0]
    fixed_c = sitk.SmoothingRecursiveGaussian(fixed, [SMOOTHING_SIGMAS_VOXELS[0] * s for s in fixed.GetSpacing()])
    fixed_c = sitk.Shrink(fixed_c, [coarse] * 3)
    moving_c = sitk.SmoothingRecursiveGaussian(moving, [SMOOTHING_SIGMAS_VOXELS[0] * s for s in moving.GetSpacing()])
    moving_c = sitk.Shrink(moving_c, [coarse] * 3)
    mask_c = sitk.Resample(fixed_mask, fixed_c, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    scores: dict[str, float] = {}
    for name, m in candidates.items():
        ev = _method(fixed_mask=mask_c, percentage=1.0)
        ev.SetInitialTransform(_euler_from_matrix(m, centre), inPlace=False)
        try:
            scores[name] = float(ev.MetricEvaluate(fixed_c, moving_c))
        except RuntimeError:  # no overlap at all
            scores[name] = math.inf
    best = min(scores, key=lambda k: scores[k])  # ITK's correlation metric is −NCC: lower is better

    tx = _euler_from_matrix(candidates[best], centre)
    reg = _method(fixed_mask=fixed_mask, percentage=0.5)
    n_mask = float(ref_mask.sum())
    percentages = [min(1.0, METRIC_SAMPLES * f**3 / n_mask) for f in SHRINK_FACTORS]
    reg.SetMetricSamplingPercentagePerLevel(percentages, SAMPLING_SEED)
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS_VOXELS))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    _set_optimizer(reg)
    reg.SetInitialTransform(tx, inPlace=True)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise VoxeldoseError(
            f"the CT-to-CT registration failed inside SimpleITK: {str(exc).strip().splitlines()[-1]}",
            expected="two CTs of the same patient that overlap",
        ) from None
    stop = reg.GetOptimizerStopConditionDescription()
    iterations = int(reg.GetOptimizerIteration())
    converged = "Maximum number of iterations" not in stop

    ref_to_mov = _euler_matrix(tx)
    m2r = np.linalg.inv(ref_to_mov)
    t_reg = time.perf_counter() - t0

    before, overlap_before = _similarity(ref, ref_mask, mov, start)
    after, overlap = _similarity(ref, ref_mask, mov, m2r)

    # plausibility, relative to the start estimate
    rel = m2r @ np.linalg.inv(start)  # start-corrected reference -> registered reference
    c_h = np.append(centre, 1.0)
    displacement = float(np.linalg.norm((np.linalg.inv(m2r) @ c_h)[:3] - (np.linalg.inv(start) @ c_h)[:3]))
    angle = _rotation_angle_deg(rel)

    problems = []
    if not converged:
        problems.append(f"the optimiser did not converge ({iterations} iterations at the finest level: {stop.strip()})")
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
        optimizer_stop=stop.strip(),
        iterations=iterations,
        runtime_s=time.perf_counter() - t0,
        details={
            "working_spacing_mm": {"reference": ref.spacing.tolist(), "moving": mov.spacing.tolist()},
            "shrink_factors": list(SHRINK_FACTORS),
            "smoothing_sigmas_voxels": list(SMOOTHING_SIGMAS_VOXELS),
            "sampling": {"strategy": "random", "percentage_per_level": percentages, "seed": SAMPLING_SEED},
            "optimizer": "conjugate gradient with golden-section line search, scales from physical shift",
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
    return reg


def _set_optimizer(reg: sitk.ImageRegistrationMethod) -> None:
    """Conjugate gradient with a golden-section line search, parameter scales from physical shift
    (1 radian of rotation weighs as the largest displacement it causes in the image, so rotation and
    translation steps are comparable), steps of at most MAX_STEP_MM; converged when the metric has
    changed by less than CONVERGENCE_MINIMUM over the last CONVERGENCE_WINDOW iterations.

    Chosen over regular-step gradient descent, which on these images stopped creeping towards the
    optimum early ("step too small" while still ~0.5° off: the NCC gradient is tiny near 1)."""
    reg.SetOptimizerAsConjugateGradientLineSearch(
        learningRate=1.0,
        numberOfIterations=MAX_ITERATIONS,
        convergenceMinimumValue=CONVERGENCE_MINIMUM,
        convergenceWindowSize=CONVERGENCE_WINDOW,
        estimateLearningRate=reg.Once,
        maximumStepSizeInPhysicalUnits=MAX_STEP_MM,
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
