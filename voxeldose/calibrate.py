"""``voxeldose calibrate``: a camera profile (:class:`voxeldose.camera.CameraProfile`) from phantom scans.

Inputs are what a site has: the DICOM SPECT/CT of a uniform cylinder and of the NEMA IEC body phantom, the
phantoms' activities as the NM headers state them (RadionuclideTotalDose (0018,1074), MBq, at
RadiopharmaceuticalStartDateTime (0018,1078), the dose-calibrator reading) and the phantoms' known geometry
(:mod:`voxeldose.calphantom`).  Never a simulation's truth file.

* **Sensitivity** (MIRD Pamphlet 26, Ljungberg et al. 2016, J Nucl Med 57:151): ``S = N / (A · T · f)`` with
  ``N`` the reconstructed counts in a VOI of the cylinder (its CT outline, HU > −500, grown by
  :data:`SENSITIVITY_MARGIN_MM` to hold the counts the resolution spreads out), ``A`` the activity at the
  acquisition start (MBq, decayed from the reference time), ``T`` the acquisition duration
  (ActualFrameDuration × NumberOfFramesInRotation) and ``f = (1 − e^{−λT})/(λT)`` the decay during it — the
  quantity :func:`voxeldose.quantify.to_bq_per_ml` divides by.  Its statistical uncertainty is Poisson,
  ``u(S)/S = 1/√N``; the activity's, ``u_A``, is combined in quadrature (GUM JCGM 100:2008).  Default
  ``u_A`` = 2.9 %: a dose calibrator meeting the ±5 % accuracy tolerance of its acceptance and routine tests
  (IAEA TRS-454 (2006); EANM, Busemann Sokole et al. 2010, Eur J Nucl Med Mol Imaging 37:662) with the
  error taken as uniform within the tolerance, 5 %/√3 (GUM 4.3.7).
* **Recovery coefficients**: the six spheres are found in the SPECT from the phantom's geometry — the lung
  insert's axis in the CT, then the ring of spheres' plane and rotation by a matched filter (the image summed
  over the six sphere volumes, maximised over the plane's position and the ring's angle, then refined with the
  axis free); the phantom lies with its axis along the scanner's z, as NEMA NU 2 positions it (a tilt is not
  searched).  RC = mean image in the true sphere volume (each voxel weighted by the fraction of it inside
  the sphere) / the spheres' true concentration (from the header's activity, the geometry's volumes and the
  stated sphere-to-background ratio), both at the acquisition start.  The RC includes the background's
  spill-in (as measured).  ``rc_u`` combines counting (Poisson on the weighted voxel counts; for OSEM images,
  whose noise is correlated, a lower bound), the sensitivity's and the phantom activity's uncertainties.
* **Recovery curve**: :class:`voxeldose.camera.RecoveryFit` by weighted least squares
  (:func:`scipy.optimize.curve_fit`, ``absolute_sigma``), with covariance and residuals.
* **Effective resolution**: the FWHM of the Gaussian that, applied on the SPECT grid to the located phantom's
  activity (spheres and background at the stated ratio, lung insert cold, each voxel's share by supersampling),
  gives the measured RCs — the model a geometric transfer matrix or RBV correction uses.  Fitted with a free
  scale factor (which absorbs the common activity-calibration error; reported), weights from counting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy.ndimage import binary_fill_holes, distance_transform_edt, gaussian_filter, map_coordinates
from scipy.optimize import curve_fit, minimize

from .calphantom import IEC, CalibrationPhantom, Placement, region_fractions
from .camera import CameraIdentity, CameraProfile, RecoveryFit, RecoveryPoint, identity_from_dataset
from .dicomutil import parse_dt, tag_label
from .errors import VoxeldoseError
from .geometry import FWHM_PER_SIGMA, Grid, Volume, resample
from .ingest import Series, acquisition_datetime, read_ct, read_spect, scan
from .nuclides import require_supported

__all__ = [
    "DEFAULT_ACTIVITY_U",
    "SENSITIVITY_MARGIN_MM",
    "CalibrationResult",
    "IecMeasurement",
    "PhantomScan",
    "Sensitivity",
    "calibrate",
    "load_scans",
    "measure_iec",
    "measure_sensitivity",
]

#: Default relative standard uncertainty of a phantom's activity: 5 % / √3 (see the module docstring).
DEFAULT_ACTIVITY_U = 0.05 / math.sqrt(3.0)
#: The cylinder's counting VOI: its CT outline grown by this much (mm), ≥ 3 FWHM of a 12 mm SPECT.
SENSITIVITY_MARGIN_MM = 40.0
#: CT numbers above this are phantom (water, PMMA); the lung insert's filling lies below −300 HU.
_PHANTOM_HU, _LUNG_HU = -500.0, -300.0

Role = Literal["cylinder", "iec"]
_ROLE_WORDS: dict[Role, tuple[str, ...]] = {
    "iec": ("IEC", "NEMA"),
    "cylinder": ("CYLINDER", "JASZCZAK", "UNIFORM"),
}


@dataclass
class PhantomScan:
    """One phantom's SPECT (counts) and CT, with what the headers say about its activity and camera."""

    role: Role
    path: Path
    header: Dataset
    spect: Volume  # counts
    ct: Volume | None
    nuclide: str
    decay_constant_per_s: float
    activity_bq: float  # at the reference time
    reference: datetime
    acquisition_start: datetime
    duration_s: float
    identity: CameraIdentity

    @property
    def activity_at_start_bq(self) -> float:
        dt = (self.acquisition_start - self.reference).total_seconds()
        return self.activity_bq * math.exp(-self.decay_constant_per_s * dt)

    @property
    def decay_factor(self) -> float:
        """Mean fraction of the start activity present during the acquisition, ``(1 − e^{−λT})/(λT)``."""
        x = self.decay_constant_per_s * self.duration_s
        return 1.0 if x == 0 else -math.expm1(-x) / x


def _role(series: Series, forced: Role | None) -> Role:
    if forced is not None:
        return forced
    ds = series.first
    text = " ".join(str(ds.get(k, "") or "") for k in ("StudyDescription", "SeriesDescription")).upper()
    found = {role for role, words in _ROLE_WORDS.items() if any(w in text for w in words)}
    if len(found) != 1:
        raise VoxeldoseError(
            "cannot tell which calibration phantom this SPECT shows",
            path=series.instances[0].path,
            tag=f"{tag_label('StudyDescription')} / {tag_label('SeriesDescription')}",
            expected="'cylinder' (or 'Jaszczak', 'uniform') or 'NEMA'/'IEC' in a description, or name the folder "
            "with --cylinder / --iec",
            found=series.description or None,
        )
    return found.pop()


def _activity(ds: Dataset, path: Path) -> tuple[str, float, datetime]:
    """Nuclide, activity (Bq) and its reference time from the Radiopharmaceutical Information Sequence."""
    rp_tag = tag_label("RadiopharmaceuticalInformationSequence")
    seq = ds.get("RadiopharmaceuticalInformationSequence") or []
    item = seq[0] if len(seq) else Dataset()
    meaning = ""
    for code in item.get("RadionuclideCodeSequence") or []:
        meaning = str(code.get("CodeMeaning", "") or "").strip()
        if meaning:
            break
    if not meaning:
        raise VoxeldoseError(
            "the phantom's radionuclide is not stated",
            path=path,
            tag=f"{rp_tag} > {tag_label('RadionuclideCodeSequence')}",
            expected="a radionuclide code such as ^177^Lutetium",
        )
    nuc = require_supported(meaning, path=str(path), tag=tag_label("RadionuclideCodeSequence"))
    raw = item.get("RadionuclideTotalDose")
    try:
        mbq = float(raw)
    except (TypeError, ValueError):
        mbq = math.nan
    if not (math.isfinite(mbq) and mbq > 0):
        raise VoxeldoseError(
            "the phantom's activity is not known",
            path=path,
            tag=f"{rp_tag} > {tag_label('RadionuclideTotalDose')}",
            expected="the activity in the phantom, MBq > 0, at RadiopharmaceuticalStartDateTime",
            found=None if raw is None else str(raw),
        )
    when, _ = parse_dt(item.get("RadiopharmaceuticalStartDateTime"))
    if when is None:
        raise VoxeldoseError(
            "the time at which the phantom's activity was measured is not known",
            path=path,
            tag=f"{rp_tag} > {tag_label('RadiopharmaceuticalStartDateTime')}",
            expected="the date and time of the activity measurement",
        )
    return nuc.name, mbq * 1e6, when.replace(tzinfo=None)


def load_scans(
    paths: Sequence[str | Path] = (),
    *,
    cylinder: Sequence[str | Path] = (),
    iec: Sequence[str | Path] = (),
) -> list[PhantomScan]:
    """Read every SPECT (and the CT on its Frame of Reference) under ``paths`` (role from the descriptions),
    ``cylinder`` and ``iec`` (role given)."""
    out: list[PhantomScan] = []
    groups: list[tuple[Sequence[str | Path], Role | None]] = [(paths, None), (cylinder, "cylinder"), (iec, "iec")]
    for group, forced in groups:
        if not group:
            continue
        index = scan([Path(p) for p in group])
        if index.errors:
            raise VoxeldoseError(index.errors[0].message)  # names the file and the tag already
        spects = index.by_kind("spect")
        if not spects:
            raise VoxeldoseError(
                "no reconstructed SPECT found", path=", ".join(map(str, group)), expected="an NM RECON TOMO series"
            )
        for series in spects:
            role = _role(series, forced)
            path = series.instances[0].path
            ds = series.first
            image = read_spect(series)
            if image.pixel_mode != "counts":
                raise VoxeldoseError(
                    "the phantom's SPECT holds Bq/ml, so the camera was already calibrated; calibration needs counts",
                    path=path,
                    tag=tag_label("RealWorldValueMappingSequence"),
                    expected="reconstructed counts",
                )
            if not image.acquisition_duration_s:
                raise VoxeldoseError(
                    "the acquisition duration is not known",
                    path=path,
                    tag=f"{tag_label('RotationInformationSequence')} > {tag_label('ActualFrameDuration')}, "
                    f"{tag_label('NumberOfFramesInRotation')}",
                    expected="the time per projection (ms) and the number of projections",
                )
            cts = [s for s in index.by_kind("ct") if s.frame_of_reference_uid == series.frame_of_reference_uid]
            nuclide, activity, reference = _activity(ds, path)
            start, _ = acquisition_datetime(ds, path)
            out.append(
                PhantomScan(
                    role=role,
                    path=path,
                    header=ds,
                    spect=image.volume,
                    ct=read_ct(cts[0]) if cts else None,
                    nuclide=nuclide,
                    decay_constant_per_s=require_supported(nuclide).decay_constant_per_s,
                    activity_bq=activity,
                    reference=reference,
                    acquisition_start=start,
                    duration_s=float(image.acquisition_duration_s),
                    identity=identity_from_dataset(ds, path),
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# Sensitivity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sensitivity:
    """The cylinder's volume sensitivity (cps/MBq) and its standard uncertainties."""

    cps_per_mbq: float
    u_poisson: float
    u_activity_rel: float
    counts: float
    activity_at_start_mbq: float
    voi: str

    @property
    def u(self) -> float:
        """Combined standard uncertainty (Poisson and the activity measurement, in quadrature)."""
        return self.cps_per_mbq * math.hypot(self.u_poisson / self.cps_per_mbq, self.u_activity_rel)


def _ct_on(scan_: PhantomScan) -> NDArray[Any] | None:
    if scan_.ct is None:
        return None
    out: NDArray[Any] = np.asarray(resample(scan_.ct, scan_.spect.grid, order=1, fill=-1000.0).array)
    return out


def measure_sensitivity(cyl: PhantomScan, activity_u_rel: float = DEFAULT_ACTIVITY_U) -> Sensitivity:
    """Volume sensitivity from the uniform cylinder (see the module docstring)."""
    counts = np.asarray(cyl.spect.array, dtype=np.float64)
    hu = _ct_on(cyl)
    if hu is None:
        voi = "the whole SPECT (no CT on the cylinder's Frame of Reference)"
        mask = np.ones(counts.shape, dtype=bool)
    else:
        body = hu > _PHANTOM_HU
        if not body.any():
            raise VoxeldoseError(
                "the cylinder is not seen in its CT",
                path=cyl.path,
                expected="CT numbers above −500 HU in the SPECT's field",
            )
        mask = distance_transform_edt(~body, sampling=cyl.spect.spacing[::-1]) <= SENSITIVITY_MARGIN_MM
        voi = f"the cylinder's CT outline (HU > {_PHANTOM_HU:g}) grown by {SENSITIVITY_MARGIN_MM:g} mm"
    n = float(counts[mask].sum())
    if not n > 0:
        raise VoxeldoseError("the cylinder's SPECT holds no counts", path=cyl.path, tag=tag_label("PixelData"))
    a_mbq = cyl.activity_at_start_bq / 1e6
    s = n / (a_mbq * cyl.duration_s * cyl.decay_factor)
    return Sensitivity(s, s / math.sqrt(n), activity_u_rel, n, a_mbq, voi)


# --------------------------------------------------------------------------------------------
# The IEC phantom
# --------------------------------------------------------------------------------------------


def _placement(x0: float, y0: float, z_plane: float, theta_deg: float) -> Placement:
    """The placement whose sphere ring is centred on ``(x0, y0)`` (the lung insert's axis) in the plane ``z``."""
    t = math.radians(theta_deg)
    # to_lps(0, lung_offset, c_s) must be (x0, y0, z_plane): the frame point (0, b) sits at rotate(0, −b).
    b = IEC.lung_offset_mm
    dx, dy = math.sin(t) * b, -math.cos(t) * b
    return Placement((x0 - dx, y0 - dy, z_plane - IEC.sphere_plane_c_mm), theta_deg)


@cache
def _sphere_offsets(step_mm: float) -> tuple[NDArray[np.float64], ...]:
    """Points (mm, relative to the centre) on a lattice of ``step_mm`` inside each sphere."""
    out = []
    for d in IEC.sphere_diameters_mm:
        r = d / 2
        g = np.arange(-r + step_mm / 2, r, step_mm)
        p = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
        out.append(p[(p**2).sum(axis=1) <= r * r])
    return tuple(out)


def _ring_points(theta_deg: float, step_mm: float) -> NDArray[np.float64]:
    """All spheres' lattice points, relative to the ring centre, for a ring rotated by ``theta_deg``."""
    t = math.radians(theta_deg)
    pts = []
    for (a, b, _), off in zip(IEC.sphere_centres(), _sphere_offsets(step_mm)):
        ar, br = a, -(b - IEC.lung_offset_mm)  # frame → unrotated LPS offset from the ring centre
        cx, cy = math.cos(t) * ar - math.sin(t) * br, math.sin(t) * ar + math.cos(t) * br
        pts.append(off + np.array([cx, cy, 0.0]))
    return np.concatenate(pts)


def _sample(volume: Volume, xyz: NDArray[Any], image: NDArray[Any]) -> NDArray[np.float64]:
    """``image`` (on ``volume``'s grid) at LPS points ``xyz`` (``(..., 3)``), trilinear, 0 outside."""
    return _sample_ijk(volume.world_to_index(xyz), image)


def _sample_ijk(ijk: NDArray[Any], image: NDArray[Any]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = map_coordinates(
        image, ijk.reshape(-1, 3)[:, ::-1].T, order=1, mode="constant", cval=0.0
    ).reshape(ijk.shape[:-1])
    return out


def _lung_axis(iec: PhantomScan) -> tuple[float, float, float, float]:
    """(x, y) of the lung insert's axis and the z range (mm) over which the CT shows it."""
    if iec.ct is None:
        raise VoxeldoseError(
            "the NEMA IEC phantom's SPECT has no CT on its Frame of Reference; the spheres are located from the "
            "lung insert's axis in the CT",
            path=iec.path,
            tag=tag_label("FrameOfReferenceUID"),
            expected="the phantom's CT with the SPECT's Frame of Reference",
        )
    ct = iec.ct
    hu = np.asarray(ct.array)
    body = hu > _PHANTOM_HU
    lung = np.zeros(hu.shape, dtype=bool)
    for k in range(hu.shape[0]):
        if body[k].any():
            lung[k] = binary_fill_holes(body[k]) & ~body[k] & (hu[k] < _LUNG_HU)
    ks, js, is_ = np.nonzero(lung)
    expected_ml = math.pi * IEC.lung_inner_radius_mm**2 * IEC.length_mm / 1000.0
    found_ml = len(ks) * ct.voxel_volume_ml
    if found_ml < 0.3 * expected_ml:
        raise VoxeldoseError(
            "the NEMA IEC phantom's lung insert is not seen in the CT, so the spheres cannot be located",
            path=iec.path,
            tag="CT",
            expected=f"a cold cylinder (HU < {_LUNG_HU:g}) of ~{2 * IEC.lung_inner_radius_mm:.0f} mm inside the phantom "
            f"(~{expected_ml:.0f} ml)",
            found=f"{found_ml:.0f} ml",
        )
    xyz = ct.index_to_world(np.stack([is_, js, ks], axis=1).astype(float))
    return float(xyz[:, 0].mean()), float(xyz[:, 1].mean()), float(xyz[:, 2].min()), float(xyz[:, 2].max())


def _locate(iec: PhantomScan) -> Placement:
    """The phantom's placement from the lung insert's axis (CT) and the spheres (SPECT matched filter)."""
    x0, y0, z_lo, z_hi = _lung_axis(iec)
    vol = iec.spect
    img = gaussian_filter(np.asarray(vol.array, dtype=np.float64), 1.0)
    step = float(min(vol.spacing))
    zs = np.arange(z_lo, z_hi + step / 2, step / 2)
    # matched filter over (angle, plane) with the axis fixed, in index space: ijk = L⁻¹ (p − o)
    linv = np.linalg.inv(vol.affine[:3, :3])
    axis_ijk = (np.stack([np.full_like(zs, x0), np.full_like(zs, y0), zs], 1) - vol.affine[:3, 3]) @ linv.T
    best = (-math.inf, 0.0, 0.0)
    for theta in np.arange(0.0, 360.0, 3.0):
        rel = _ring_points(float(theta), 3.0) @ linv.T
        score = _sample_ijk(axis_ijk[:, None, :] + rel[None, :, :], img).sum(axis=1)
        k = int(np.argmax(score))
        if score[k] > best[0]:
            best = (float(score[k]), float(theta), float(zs[k]))
    counts = np.asarray(vol.array, dtype=np.float64)

    def cost(p: NDArray[np.float64]) -> float:
        return -float(_sample(vol, _ring_points(float(p[3]), 1.5) + p[:3], counts).sum())

    res = minimize(
        cost, np.array([x0, y0, best[2], best[1]]), method="Nelder-Mead", options={"xatol": 0.05, "fatol": 1e-3}
    )
    x, y, z, th = (float(v) for v in res.x)
    return _placement(x, y, z, th % 360.0)


@dataclass(frozen=True)
class IecMeasurement:
    """What the IEC scan gave: located placement, recovery points, background, fits."""

    placement: Placement
    points: list[RecoveryPoint]
    true_sphere_bq_per_ml: float
    background_rc: float
    recovery_fit: RecoveryFit
    fwhm_mm: float
    fwhm_u_mm: float
    fwhm_scale: float  # least-squares scale of the Gaussian model at the fitted FWHM (diagnostic; the fit fixes 1)
    fwhm_scale_u: float
    counting_u_rel: list[float] = field(default_factory=list)


def _crop(
    vol: Volume, centre_mm: tuple[float, float, float], half_mm: tuple[float, float, float]
) -> tuple[tuple[slice, slice, slice], Grid]:
    """The part of ``vol``'s grid within the box ``centre ± half`` (LPS mm), as array slices and a grid."""
    signs = [(sx, sy, sz) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    corners = np.array([[centre_mm[n] + s[n] * half_mm[n] for n in range(3)] for s in signs])
    ijk = vol.world_to_index(corners)
    lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, np.array(vol.shape[::-1]))
    if np.any(hi <= lo):
        raise VoxeldoseError("the spheres lie outside the SPECT", expected="the phantom inside the field of view")
    sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    aff = vol.affine.copy()
    aff[:3, 3] = vol.index_to_world(lo.astype(float))
    shape = (int(hi[2] - lo[2]), int(hi[1] - lo[1]), int(hi[0] - lo[0]))
    return sl, Grid(shape, aff, vol.grid.frame_of_reference_uid)


def _background_variability(counts: NDArray[Any], bg: NDArray[np.bool_], w: NDArray[Any]) -> float | None:
    """Relative standard deviation of a sphere's weighted mean when its VOI (weights ``w``) is moved, in whole
    voxels and without overlap, to every place where it lies inside the background ``bg`` (the background ROIs of
    NEMA NU 2-2018 section 7.4.1 with the sphere's own shape).  It holds the reconstruction's correlated noise,
    which the Poisson figure misses for OSEM.  None with fewer than 6 places."""
    nz = np.nonzero(w > 0)
    lo = [int(x.min()) for x in nz]
    hi = [int(x.max()) + 1 for x in nz]
    box = w[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    support = box > 0
    dk, dj, di = box.shape
    means = []
    for k in range(0, counts.shape[0] - dk + 1, dk):
        for j in range(0, counts.shape[1] - dj + 1, dj):
            for i in range(0, counts.shape[2] - di + 1, di):
                if bg[k : k + dk, j : j + dj, i : i + di][support].all():
                    means.append(float((box * counts[k : k + dk, j : j + dj, i : i + di]).sum()) / float(box.sum()))
    if len(means) < 6 or not np.mean(means) > 0:
        return None
    return float(np.std(means, ddof=1) / np.mean(means))


def _rc_curve(v: NDArray[Any], rc_max: float, v_half: float, slope: float) -> NDArray[Any]:
    out: NDArray[Any] = rc_max / (1.0 + (v_half / v) ** slope)
    return out


def measure_iec(
    iec: PhantomScan,
    sens: Sensitivity,
    *,
    sphere_to_background: float,
    activity_u_rel: float = DEFAULT_ACTIVITY_U,
) -> IecMeasurement:
    """Recovery coefficients, recovery curve and effective FWHM from the IEC scan (see the module docstring)."""
    if not sphere_to_background > 1:
        raise VoxeldoseError(
            "the spheres must be hotter than the background",
            tag="--sphere-to-background",
            expected="a ratio above 1",
            found=sphere_to_background,
        )
    placement = _locate(iec)
    ring = placement.to_lps(0.0, IEC.lung_offset_mm, IEC.sphere_plane_c_mm)
    sl, grid = _crop(iec.spect, ring, (IEC.arc_radius_mm + 40.0, IEC.arc_radius_mm + 40.0, 70.0))
    counts = np.asarray(iec.spect.array, dtype=np.float64)[sl]
    fractions = region_fractions(grid, CalibrationPhantom("iec", placement=placement), 4)
    weights = [fractions[2 + n] for n in range(len(IEC.sphere_diameters_mm))]
    # true concentrations (Bq/ml) at the acquisition start
    decay = iec.activity_at_start_bq / iec.activity_bq
    vols = IEC.sphere_volumes_ml()
    cb = iec.activity_bq / (IEC.background_volume_ml() + sphere_to_background * sum(vols)) * decay
    cs = sphere_to_background * cb
    to_bq_ml = 1e6 / (sens.cps_per_mbq * iec.duration_s * iec.decay_factor * grid.voxel_volume_ml)
    s_rel = sens.u / sens.cps_per_mbq
    # background: the body's interior away from walls, lung insert and spheres, within 40 mm of the plane
    xyz = grid.world_coordinates()
    a, b, c = placement.to_frame(xyz[..., 0], xyz[..., 1], xyz[..., 2])
    bg = IEC.inside_body(a, b, -25.0) & (np.abs(c - IEC.sphere_plane_c_mm) <= 40.0)
    bg &= a * a + (b - IEC.lung_offset_mm) ** 2 > (IEC.lung_outer_radius_mm + 20.0) ** 2
    for (sa, sb, sc), dd in zip(IEC.sphere_centres(), IEC.sphere_diameters_mm):
        bg &= (a - sa) ** 2 + (b - sb) ** 2 + (c - sc) ** 2 > (dd / 2 + 20.0) ** 2
    bg_mean = float(counts[bg].mean()) if bg.any() else 0.0
    points: list[RecoveryPoint] = []
    count_u: list[float] = []
    means: list[float] = []
    for d, v, w in zip(IEC.sphere_diameters_mm, vols, weights):
        sw = float(w.sum())
        mean = float((w * counts).sum()) / sw
        u_cnt = math.sqrt(float((w * w * counts).sum())) / sw
        rc = mean * to_bq_ml / cs
        cu = u_cnt / mean if mean > 0 else math.inf
        cv_bg = _background_variability(counts, bg, w)
        if cv_bg is not None and mean > 0 and bg_mean > 0:
            cu = max(cu, cv_bg * math.sqrt(bg_mean / mean))
        count_u.append(cu)
        means.append(mean)
        points.append(
            RecoveryPoint(
                label=f"sphere {d:g} mm",
                volume_ml=v,
                rc=max(rc, 0.0),
                rc_u=abs(rc) * math.sqrt(cu**2 + s_rel**2 + activity_u_rel**2),
            )
        )
    bg_u = math.sqrt(bg_mean / max(int(bg.sum()), 1))
    for n in (-1, -2, -3):  # the three largest spheres must stand out
        if not (means[n] > 1.5 * bg_mean and means[n] - bg_mean > 5 * math.hypot(count_u[n] * means[n], bg_u)):
            raise VoxeldoseError(
                f"the NEMA IEC phantom's {points[n].label} is not found where the phantom's geometry puts it "
                "(no hot sphere there)",
                path=iec.path,
                tag=tag_label("PixelData"),
                expected="six hot spheres in one transverse plane around the lung insert",
                found=f"sphere/background {means[n] / bg_mean if bg_mean > 0 else math.inf:.2f}",
            )
    rcs = np.array([p.rc for p in points])
    rc_us = np.array([p.rc_u for p in points])
    v_arr = np.array(vols)
    try:
        popt, pcov = curve_fit(
            _rc_curve,
            v_arr,
            rcs,
            p0=(float(rcs.max()), float(np.median(v_arr)), 1.0),
            sigma=rc_us,
            absolute_sigma=True,
            bounds=([1e-3, 1e-4, 0.05], [10.0, 1e4, 10.0]),
            maxfev=20000,
        )
    except RuntimeError as exc:
        raise VoxeldoseError(
            f"the recovery curve cannot be fitted to the spheres ({exc})", path=iec.path, found=rcs.round(3).tolist()
        ) from None
    c3 = [(float(r[0]), float(r[1]), float(r[2])) for r in pcov]
    fit = RecoveryFit(
        rc_max=float(popt[0]),
        v_half_ml=float(popt[1]),
        slope=float(popt[2]),
        covariance=(c3[0], c3[1], c3[2]),
        residuals=[float(r) for r in rcs - _rc_curve(v_arr, *popt)],
    )
    # effective FWHM: the located phantom's activity (spheres 1, background 1/ratio) blurred on the grid
    model_act = fractions[1] / sphere_to_background + fractions[2:].sum(axis=0)
    spacing = np.asarray(grid.spacing)[::-1]
    wsum = [float(w.sum()) for w in weights]

    def model(_x: NDArray[Any], fwhm: float) -> NDArray[Any]:
        sigma = fwhm / FWHM_PER_SIGMA / spacing
        img = gaussian_filter(model_act, sigma=sigma, mode="constant", cval=0.0, truncate=4.0)
        return np.array([float((w * img).sum()) / s for w, s in zip(weights, wsum)])

    # The cylinder's sensitivity makes the spheres' RC absolute, so the Gaussian is fitted with its scale fixed at 1.
    # A free scale is degenerate with the FWHM when the recovery curve is not a Gaussian's (OSEM at clinical
    # iterations recovers large spheres relatively better than small ones): on the OSEM camera's IEC scan the
    # free fit gave FWHM 32 ± 23 mm at scale 1.7, the fixed one 19 mm.  The least-squares scale at the fitted FWHM
    # is kept as a diagnostic (``fwhm_scale``: 1 when the camera's blur is Gaussian and the calibrations agree).
    sig = np.maximum(rcs * np.array(count_u), 1e-6)
    try:
        fpopt, fpcov = curve_fit(model, v_arr, rcs, p0=(10.0,), sigma=sig, absolute_sigma=True, bounds=([0.5], [60.0]))
    except RuntimeError as exc:
        raise VoxeldoseError(
            f"no Gaussian resolution explains the spheres' recovery ({exc})", path=iec.path, found=rcs.round(3).tolist()
        ) from None
    m_fit = model(v_arr, float(fpopt[0]))
    chi2 = float((((rcs - m_fit) / sig) ** 2).sum())
    # counting-only weights understate a model's misfit: scale the covariance by the reduced χ² when above 1
    inflate = max(1.0, chi2 / max(len(rcs) - 1, 1))
    w2 = 1.0 / sig**2
    scale = float((w2 * rcs * m_fit).sum() / (w2 * m_fit**2).sum())
    scale_u = float(math.sqrt(inflate / (w2 * m_fit**2).sum()))
    return IecMeasurement(
        placement=placement,
        points=points,
        true_sphere_bq_per_ml=cs,
        background_rc=bg_mean * to_bq_ml / cb if cb > 0 else math.nan,
        recovery_fit=fit,
        fwhm_mm=float(fpopt[0]),
        fwhm_u_mm=float(math.sqrt(fpcov[0][0] * inflate)),
        fwhm_scale=scale,
        fwhm_scale_u=scale_u,
        counting_u_rel=count_u,
    )


# --------------------------------------------------------------------------------------------
# The whole calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationResult:
    """The profile and the measurements behind it."""

    profile: CameraProfile
    sensitivity: Sensitivity
    iec: IecMeasurement | None


#: Where each field of a camera identity comes from (voxeldose.camera.identity_from_dataset).
_IDENTITY_TAGS = {
    "manufacturer": tag_label("Manufacturer"),
    "model": tag_label("ManufacturerModelName"),
    "device_serial_number": tag_label("DeviceSerialNumber"),
    "collimator": tag_label("CollimatorGridName"),
    "energy_window_kev": f"{tag_label('EnergyWindowLowerLimit')} / {tag_label('EnergyWindowUpperLimit')}",
    "reconstruction": tag_label("ReconstructionMethod"),
}


def _same_camera(scans: list[PhantomScan]) -> CameraIdentity:
    first = scans[0]
    for other in scans[1:]:
        diff = first.identity.mismatches(other.identity)
        for name in ("device_serial_number", "collimator", "energy_window_kev", "reconstruction"):
            if (getattr(first.identity, name) is None) != (getattr(other.identity, name) is None):
                diff.append(name)
        if diff:
            raise VoxeldoseError(
                f"the phantoms were not imaged with the same camera and reconstruction ({first.path} and "
                f"{other.path} differ)",
                path=other.path,
                tag=", ".join(_IDENTITY_TAGS[name] for name in sorted(set(diff))),
                expected=f"the camera of {first.path}",
                found={
                    name: (getattr(first.identity, name), getattr(other.identity, name)) for name in sorted(set(diff))
                },
            )
    return first.identity


def calibrate(
    paths: Sequence[str | Path] = (),
    *,
    cylinder: Sequence[str | Path] = (),
    iec: Sequence[str | Path] = (),
    name: str | None = None,
    activity_u_rel: float = DEFAULT_ACTIVITY_U,
    sphere_to_background: float = 10.0,
) -> CalibrationResult:
    """Calibrate a camera from its phantom scans (see the module docstring); refuses what cannot calibrate."""
    if not (0 <= activity_u_rel < 1):
        raise VoxeldoseError(
            "the activity's relative uncertainty must lie in [0, 1)", tag="--activity-u-percent", found=activity_u_rel
        )
    scans = load_scans(paths, cylinder=cylinder, iec=iec)
    by_role: dict[Role, list[PhantomScan]] = {"cylinder": [], "iec": []}
    for s in scans:
        by_role[s.role].append(s)
    for role, found in by_role.items():
        if len(found) > 1:
            raise VoxeldoseError(
                f"more than one {role} scan given", path=", ".join(str(s.path) for s in found), expected="one of each"
            )
    if not by_role["cylinder"]:
        raise VoxeldoseError(
            "no uniform-cylinder scan: the sensitivity needs one",
            path=", ".join(str(s.path) for s in scans),
            expected="a SPECT/CT of a uniform cylinder of known activity",
        )
    identity = _same_camera(scans)
    nuclides = {s.nuclide for s in scans}
    if len(nuclides) > 1:
        raise VoxeldoseError(
            "the phantoms hold different radionuclides",
            tag=tag_label("RadionuclideCodeSequence"),
            expected="one nuclide",
            found=sorted(nuclides),
        )
    cyl = by_role["cylinder"][0]
    sens = measure_sensitivity(cyl, activity_u_rel)
    meas = (
        measure_iec(by_role["iec"][0], sens, sphere_to_background=sphere_to_background, activity_u_rel=activity_u_rel)
        if by_role["iec"]
        else None
    )
    source = (
        f"uniform cylinder: {cyl.activity_bq / 1e6:.1f} MBq at {cyl.reference.isoformat()} "
        f"(RadionuclideTotalDose), {sens.counts:.0f} counts in {sens.voi}; activity u {activity_u_rel * 100:.2f} % (k=1)"
    )
    if meas is not None:
        i = by_role["iec"][0]
        ring = meas.placement.to_lps(0.0, IEC.lung_offset_mm, IEC.sphere_plane_c_mm)
        source += (
            f"; NEMA IEC body phantom: {i.activity_bq / 1e6:.1f} MBq at {i.reference.isoformat()}, spheres:background "
            f"{sphere_to_background:g}:1, sphere ring found centred at ({ring[0]:.1f}, {ring[1]:.1f}, {ring[2]:.1f}) mm "
            f"LPS, rotated {meas.placement.rotation_deg:.1f}°; FWHM fit scale {meas.fwhm_scale:.3f} ± "
            f"{meas.fwhm_scale_u:.3f}"
        )
    profile = CameraProfile(
        name=name or f"{identity.manufacturer} {identity.model}".strip(),
        identity=identity,
        nuclide=cyl.nuclide,
        sensitivity_cps_per_mbq=sens.cps_per_mbq,
        sensitivity_u_cps_per_mbq=sens.u,
        fwhm_mm=None if meas is None else meas.fwhm_mm,
        fwhm_u_mm=None if meas is None else meas.fwhm_u_mm,
        recovery=[] if meas is None else meas.points,
        recovery_fit=None if meas is None else meas.recovery_fit,
        measured=cyl.acquisition_start.date().isoformat(),
        source=source,
    )
    return CalibrationResult(profile, sens, meas)
