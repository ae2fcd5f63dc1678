"""Calibration phantoms: a uniform cylinder and the NEMA IEC body phantom, imaged like the synthetic patient.

A site calibrates its SPECT/CT camera for 177Lu with two phantom scans (MIRD Pamphlet 26, Ljungberg et al.
2016, J Nucl Med 57:151; Tran-Gia et al. 2021, EJNMMI Phys 8:55):

* a **uniform cylinder** of known activity, for the volume sensitivity (reconstructed cps per MBq).  Ours is a
  Jaszczak-like water cylinder of 216 mm inner diameter and 186 mm inner height (the flangeless Jaszczak
  phantom's interior) with a 3.2 mm PMMA wall;
* the **NEMA IEC body phantom** (NEMA NU 2-2018 section 7 "image quality"; IEC 61675-1): a D-shaped body
  (interior: a half circle of 147 mm radius on a 140 × 77 mm rectangle with two quarter circles of 77 mm radius
  at its lower corners, 294 × 224 mm, 180 mm long inside, 3 mm PMMA walls), a lung insert on the axis of the
  sphere ring 35 mm above the arc's centre (50 mm outer diameter, 4 mm PMMA wall, low-density filling of
  0.30 g/ml, no activity — NU 2-2018 states 0.30 ± 0.10 g/ml), and six spheres of 10, 13, 17, 22, 28 and 37 mm
  inner diameter with centres on a 114.4 mm diameter circle around the insert, 60° apart, in the transverse
  plane 70 mm from the lid.  The spheres hold ``sphere_to_background`` times the background concentration.
  The sphere ring, the 70 mm and the 180 mm interior length are NEMA NU 2's; the cross-section's radii and the
  insert's walls are those of GATE's model of the phantom (opengate.contrib.phantoms.nemaiec), 3 mm inside its
  outer shell.

Both are imaged through the patient's camera models (:mod:`voxeldose.phantom`: ``"gaussian"`` image-space blur
and Poisson counts, or ``"osem"`` projections with attenuation and collimator response, Poisson counts and
OSEM) on the patient's SPECT and CT grids, and written as CT + NM RECON TOMO DICOM with the same camera
identity headers (:func:`voxeldose.phantom.camera_headers`).  The Radiopharmaceutical Information states the
phantom's activity (RadionuclideTotalDose, MBq) at its reference time (RadiopharmaceuticalStartDateTime), as a
site writes the dose-calibrator reading; the scan starts ``scan_delay_h`` later.

Simplifications: the spheres' 1 mm glass walls and filling stems are not modelled (no cold wall around the
spheres); the activity is uniform in each compartment.  The truth (``truth/truth.json``) is for tests:
:mod:`voxeldose.calibrate` never reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter

from .dicomutil import PatientStudy, SeriesInfo
from .geometry import FWHM_PER_SIGMA, Grid, Volume
from .nuclides import load
from .phantom import (
    PhantomSettings,
    _hu_for_density,
    _jsonable,
    _uid,
    camera_headers,
    ct_grid,
    spect_grid,
)
from .scanner import Injection, write_ct_series, write_nm_tomo

__all__ = [
    "CYLINDER_HEIGHT_MM",
    "CYLINDER_RADIUS_MM",
    "IEC",
    "CalibrationManifest",
    "CalibrationPhantom",
    "CalibrationScan",
    "IecGeometry",
    "PhantomKind",
    "Placement",
    "materials_on",
    "region_activity",
    "region_fractions",
    "simulate_calibration",
    "write_calibration_phantom",
]

PhantomKind = Literal["cylinder", "iec"]

#: Uniform cylinder: inner radius and half height (mm), PMMA wall (mm).
CYLINDER_RADIUS_MM = 108.0
CYLINDER_HEIGHT_MM = 186.0
CYLINDER_WALL_MM = 3.2


@dataclass(frozen=True)
class IecGeometry:
    """The NEMA IEC body phantom in its own frame (mm): ``a`` across, ``b`` from the flat base towards the round
    top (origin at the centre of the 147 mm arc), ``c`` along the axis (origin mid-length, lid at ``+c``)."""

    arc_radius_mm: float = 147.0
    corner_radius_mm: float = 77.0
    half_flat_mm: float = 70.0
    length_mm: float = 180.0
    wall_mm: float = 3.0
    lung_offset_mm: float = 35.0  # the insert's (and the sphere ring's) centre on the b axis
    lung_outer_radius_mm: float = 25.0
    lung_inner_radius_mm: float = 21.0
    ring_radius_mm: float = 57.2
    sphere_plane_from_lid_mm: float = 70.0
    sphere_diameters_mm: tuple[float, ...] = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
    #: Angle of each sphere on the ring (degrees, from +a towards +b), in the order of ``sphere_diameters_mm``:
    #: the 37 mm sphere at 180°, then 28, 22, 17, 13, 10 mm every 60°.
    sphere_angles_deg: tuple[float, ...] = (480.0, 420.0, 360.0, 300.0, 240.0, 180.0)

    @property
    def sphere_plane_c_mm(self) -> float:
        return self.length_mm / 2 - self.sphere_plane_from_lid_mm

    def sphere_centres(self) -> list[tuple[float, float, float]]:
        """Sphere centres ``(a, b, c)`` in the phantom frame, in the order of ``sphere_diameters_mm``."""
        out = []
        for ang in self.sphere_angles_deg:
            t = math.radians(ang)
            out.append(
                (
                    self.ring_radius_mm * math.cos(t),
                    self.lung_offset_mm + self.ring_radius_mm * math.sin(t),
                    self.sphere_plane_c_mm,
                )
            )
        return out

    def sphere_volumes_ml(self) -> list[float]:
        return [4.0 / 3.0 * math.pi * (d / 2) ** 3 / 1000.0 for d in self.sphere_diameters_mm]

    def interior_area_mm2(self, grow_mm: float = 0.0) -> float:
        r, q, h = self.arc_radius_mm + grow_mm, self.corner_radius_mm + grow_mm, self.half_flat_mm
        return math.pi * r * r / 2 + 2 * h * q + math.pi * q * q / 2

    def background_volume_ml(self) -> float:
        """Interior volume less the lung insert and the spheres (ml)."""
        body = self.interior_area_mm2() * self.length_mm
        lung = math.pi * self.lung_outer_radius_mm**2 * self.length_mm
        return (body - lung) / 1000.0 - sum(self.sphere_volumes_ml())

    def inside_body(self, a: NDArray[Any], b: NDArray[Any], grow_mm: float = 0.0) -> NDArray[np.bool_]:
        """The D-shaped cross-section (grown outwards by ``grow_mm``), any length."""
        r, q, h = self.arc_radius_mm + grow_mm, self.corner_radius_mm + grow_mm, self.half_flat_mm
        aa = np.abs(a)
        top = (b >= 0) & (a * a + b * b <= r * r)
        bottom = (b < 0) & (b >= -q) & ((aa <= h) | ((aa - h) ** 2 + b * b <= q * q))
        out: NDArray[np.bool_] = top | bottom
        return out


#: The geometry every phantom and every calibration uses.
IEC = IecGeometry()

# Materials (index into _MATERIALS) and their mass densities (g/ml).
_AIR, _WATER, _LUNG, _PMMA = 0, 1, 2, 3
_MATERIALS: dict[int, tuple[str, float, str]] = {
    _AIR: ("air", 0.0012, "ICRU 44 (dry air)"),
    _WATER: ("water", 1.00, "water"),
    _LUNG: ("lung insert", 0.30, "NEMA NU 2-2018 section 7: 0.30 ± 0.10 g/ml"),
    _PMMA: ("PMMA", 1.19, "ICRU 44 polymethyl methacrylate"),
}


@dataclass(frozen=True)
class Placement:
    """Where the phantom lies: its frame's origin (LPS mm) and its rotation about the scanner's z axis
    (degrees).  The phantom frame's ``b`` axis (towards the round top) points anterior (−y) at 0°."""

    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_deg: float = 0.0

    def to_frame(
        self, x: NDArray[Any], y: NDArray[Any], z: NDArray[Any]
    ) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        """LPS (mm) → phantom frame ``(a, b, c)``."""
        t = math.radians(self.rotation_deg)
        dx, dy = x - self.centre_mm[0], y - self.centre_mm[1]
        xr = math.cos(t) * dx + math.sin(t) * dy
        yr = -math.sin(t) * dx + math.cos(t) * dy
        return xr, -yr, z - self.centre_mm[2]

    def to_lps(self, a: float, b: float, c: float) -> tuple[float, float, float]:
        """Phantom frame → LPS (mm)."""
        t = math.radians(self.rotation_deg)
        xr, yr = a, -b
        return (
            self.centre_mm[0] + math.cos(t) * xr - math.sin(t) * yr,
            self.centre_mm[1] + math.sin(t) * xr + math.cos(t) * yr,
            self.centre_mm[2] + c,
        )


@dataclass(frozen=True)
class CalibrationPhantom:
    """One calibration scan: which phantom, how much activity, when, and where it lies.

    ``activity_bq`` is the whole phantom's activity at ``reference_datetime`` (the dose-calibrator reading a
    site writes down); the SPECT starts ``scan_delay_h`` later.  Defaults (judgment): 1 GBq in the cylinder
    (≈ 147 kBq/ml), 500 MBq in the IEC phantom (≈ 51 kBq/ml background, 10:1 spheres) — of the order of a
    patient's abdominal concentrations a day after 7.4 GBq.  ``sphere_to_background``: concentration ratio of
    the IEC spheres to the background (10:1 here; NEMA NU 2 uses 4:1 and 8:1 for PET).
    """

    kind: PhantomKind
    activity_bq: float | None = None
    sphere_to_background: float = 10.0
    reference_datetime: datetime = datetime(2026, 1, 2, 8, 0)
    scan_delay_h: float = 2.0
    placement: Placement = Placement((4.0, 6.0, 3.0), 8.0)

    @property
    def total_activity_bq(self) -> float:
        if self.activity_bq is not None:
            return self.activity_bq
        return 1.0e9 if self.kind == "cylinder" else 5.0e8

    @property
    def acquisition_start(self) -> datetime:
        return self.reference_datetime + timedelta(hours=self.scan_delay_h)

    def concentrations_bq_per_ml(self) -> dict[str, float]:
        """Concentration of each compartment at the reference time: ``background`` (the cylinder's water or the
        IEC background) and, for the IEC phantom, ``spheres``."""
        a = self.total_activity_bq
        if self.kind == "cylinder":
            return {"background": a / (math.pi * CYLINDER_RADIUS_MM**2 * CYLINDER_HEIGHT_MM / 1000.0)}
        r = self.sphere_to_background
        cb = a / (IEC.background_volume_ml() + r * sum(IEC.sphere_volumes_ml()))
        return {"background": cb, "spheres": r * cb}


# --------------------------------------------------------------------------------------------
# Sampling the phantom on a grid
# --------------------------------------------------------------------------------------------


def _regions(
    kind: PhantomKind, a: NDArray[Any], b: NDArray[Any], c: NDArray[Any]
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """(material, activity region) at points of the phantom frame.  Regions: 0 none, 1 background (or the
    cylinder's water), 2 + n the IEC sphere n (order of :attr:`IecGeometry.sphere_diameters_mm`)."""
    mat = np.zeros(a.shape, dtype=np.uint8)
    reg = np.zeros(a.shape, dtype=np.uint8)
    if kind == "cylinder":
        r2 = a * a + b * b
        h = CYLINDER_HEIGHT_MM / 2
        w = CYLINDER_WALL_MM
        mat[(r2 <= (CYLINDER_RADIUS_MM + w) ** 2) & (np.abs(c) <= h + w)] = _PMMA
        inside = (r2 <= CYLINDER_RADIUS_MM**2) & (np.abs(c) <= h)
        mat[inside] = _WATER
        reg[inside] = 1
        return mat, reg
    g = IEC
    h = g.length_mm / 2
    mat[g.inside_body(a, b, g.wall_mm) & (np.abs(c) <= h + g.wall_mm)] = _PMMA
    inside = g.inside_body(a, b) & (np.abs(c) <= h)
    mat[inside] = _WATER
    reg[inside] = 1
    rl2 = a * a + (b - g.lung_offset_mm) ** 2
    tube = inside & (rl2 <= g.lung_outer_radius_mm**2)
    mat[tube] = _PMMA
    mat[tube & (rl2 <= g.lung_inner_radius_mm**2)] = _LUNG
    reg[tube] = 0
    for n, ((sa, sb, sc), d) in enumerate(zip(g.sphere_centres(), g.sphere_diameters_mm)):
        s = (a - sa) ** 2 + (b - sb) ** 2 + (c - sc) ** 2 <= (d / 2) ** 2
        mat[s] = _WATER
        reg[s] = 2 + n
    return mat, reg


def _points(grid: Grid, ss: int, k0: int, k1: int) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """LPS coordinates (float64) of the ``ss³`` sub-points of every voxel of slices ``k0..k1``, array order
    ``[k, j, i]`` of the fine grid."""
    nk, nj, ni = grid.shape
    a = grid.affine
    off = (np.arange(ss) + 0.5) / ss - 0.5
    ii = (np.arange(ni)[:, None] + off[None, :]).ravel()[None, None, :]
    jj = (np.arange(nj)[:, None] + off[None, :]).ravel()[None, :, None]
    kk = (np.arange(k0, k1)[:, None] + off[None, :]).ravel()[:, None, None]
    xyz = [a[r, 0] * ii + a[r, 1] * jj + a[r, 2] * kk + a[r, 3] for r in range(3)]
    return xyz[0], xyz[1], xyz[2]


def _chunks(nk: int, chunk: int) -> Iterator[tuple[int, int]]:
    for k0 in range(0, nk, chunk):
        yield k0, min(nk, k0 + chunk)


def _block_sum(fine: NDArray[Any], ss: int) -> NDArray[Any]:
    nk, nj, ni = fine.shape[0] // ss, fine.shape[1] // ss, fine.shape[2] // ss
    out: NDArray[Any] = fine.reshape(nk, ss, nj, ss, ni, ss).sum(axis=(1, 3, 5))
    return out


def region_activity(
    grid: Grid,
    phantom: CalibrationPhantom,
    activity_bq: dict[int, float],
    supersample: int = 3,
    *,
    per_ml: bool = False,
) -> NDArray[np.float64]:
    """Bq per voxel of ``grid``: each region's ``activity_bq`` spread over its ``supersample³`` sub-points, so
    that the image sums to the regions' total exactly whenever the phantom lies inside the grid.  With
    ``per_ml`` the values are concentrations (Bq/ml) instead: each sub-point holds its volume's share."""
    ss = int(supersample)
    nreg = 2 + len(IEC.sphere_diameters_mm)
    stored = []
    n_sub = np.zeros(nreg, dtype=np.int64)
    for k0, k1 in _chunks(grid.shape[0], 4):
        reg = _regions(phantom.kind, *phantom.placement.to_frame(*_points(grid, ss, k0, k1)))[1]
        n_sub += np.bincount(reg.ravel(), minlength=nreg)[:nreg]
        stored.append((k0, k1, reg))
    lut = np.zeros(nreg)
    for r, act in activity_bq.items():
        if per_ml:
            lut[r] = act * grid.voxel_volume_ml / ss**3
            continue
        if n_sub[r] == 0:
            raise ValueError(f"phantom region {r} lies outside the grid")
        lut[r] = act / n_sub[r]
    out = np.zeros(grid.shape)
    for k0, k1, reg in stored:
        out[k0:k1] = _block_sum(lut[reg], ss)
    return out


def region_fractions(grid: Grid, phantom: CalibrationPhantom, supersample: int = 4) -> NDArray[np.float64]:
    """Fraction of each voxel of ``grid`` in each activity region (``[region, k, j, i]``, see :func:`_regions`),
    by ``supersample³`` sub-points."""
    ss = int(supersample)
    nreg = 2 + len(IEC.sphere_diameters_mm)
    out = np.zeros((nreg, *grid.shape))
    for k0, k1 in _chunks(grid.shape[0], 4):
        reg = _regions(phantom.kind, *phantom.placement.to_frame(*_points(grid, ss, k0, k1)))[1]
        for r in np.unique(reg):
            out[r, k0:k1] = _block_sum((reg == r).astype(np.float64), ss) / ss**3
    return out


def materials_on(grid: Grid, phantom: CalibrationPhantom) -> NDArray[np.uint8]:
    """Material index at the voxel centres of ``grid``."""
    out = np.zeros(grid.shape, dtype=np.uint8)
    for k0, k1 in _chunks(grid.shape[0], 16):
        out[k0:k1] = _regions(phantom.kind, *phantom.placement.to_frame(*_points(grid, 1, k0, k1)))[0]
    return out


def _hu(materials: NDArray[np.uint8], rng: np.random.Generator | None, noise_hu: float) -> NDArray[np.int16]:
    lut = np.array([_hu_for_density(_MATERIALS[m][1]) for m in range(len(_MATERIALS))], dtype=np.float32)
    hu = lut[materials]
    if rng is not None and noise_hu > 0:
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
        hu[materials == _AIR] = -1000.0
    out: NDArray[np.int16] = np.rint(hu).astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------
# Imaging
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationScan:
    """One simulated phantom scan in memory."""

    settings: PhantomSettings
    phantom: CalibrationPhantom
    grid: Grid
    activity_at_start_bq: float
    decay_factor: float
    expected_counts: NDArray[np.float64]
    image: NDArray[Any]  # uint16 counts, or Bq/ml
    units: str


def _osem_counts(
    st: PhantomSettings,
    grid: Grid,
    activity_bq: NDArray[Any],
    materials: NDArray[np.uint8],
    df: float,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """The ``"osem"`` camera (:func:`voxeldose.phantom.osem_counts`) on a phantom: true attenuation = each
    material's density × water's μ/ρ at 208 keV; reconstruction with μ from the noise-free CT numbers."""
    from . import recon

    acq = st.acquisition
    camera = recon.Camera(recon.collimator(st.collimator), sensitivity_cps_per_mbq=st.calibration_cps_per_mbq / 2)
    radius = max(st.orbit_radius_mm, st.spect_matrix * st.spect_voxel_mm / 2)
    orbit = recon.Orbit.circular(2 * acq.frames_in_rotation, radius, acq.frame_duration_ms / 1000.0)
    voxel = (st.spect_voxel_mm,) * 3
    mu_water = recon.mu_per_cm("Water, Liquid", camera.energy_keV)
    rho = np.array([_MATERIALS[m][1] for m in range(len(_MATERIALS))], dtype=np.float32)
    mu_true = (rho * np.float32(mu_water))[materials]
    expected = recon.project(activity_bq / grid.voxel_volume_ml * df, mu_true, voxel, orbit, camera)
    g = rng.poisson(expected) if st.poisson_noise else expected
    mu_ct = recon.hu_to_mu_per_cm(_hu(materials, None, 0.0), camera.energy_keV)
    bq_ml = recon.reconstruct_osem(g, mu_ct, voxel, orbit, camera, st.osem_iterations, st.osem_subsets)
    counts: NDArray[np.float64] = np.maximum(bq_ml, 0.0).astype(np.float64) * grid.voxel_volume_ml / 1e6
    return counts * st.calibration_cps_per_mbq * st.acquisition_duration_s


def simulate_calibration(phantom: CalibrationPhantom, settings: PhantomSettings | None = None) -> CalibrationScan:
    """Image ``phantom`` with the camera of ``settings`` (grids, camera model, acquisition, noise)."""
    st = settings or PhantomSettings()
    nuc = load(st.radionuclide)
    lam = nuc.decay_constant_per_s
    a_start = phantom.total_activity_bq * math.exp(-lam * phantom.scan_delay_h * 3600.0)
    conc = phantom.concentrations_bq_per_ml()
    decay = a_start / phantom.total_activity_bq
    if phantom.kind == "cylinder":
        acts = {1: a_start}
    else:
        acts = {1: conc["background"] * decay * IEC.background_volume_ml()}
        for n, v in enumerate(IEC.sphere_volumes_ml()):
            acts[2 + n] = conc["spheres"] * decay * v
    grid = spect_grid(st)
    act = region_activity(grid, phantom, acts, st.supersample)
    t_acq = st.acquisition_duration_s
    x = lam * t_acq
    df = 1.0 if x == 0 else -math.expm1(-x) / x
    cf = st.calibration_cps_per_mbq
    rng = np.random.default_rng(np.random.SeedSequence([int(st.seed), 404, 1 if phantom.kind == "cylinder" else 2]))
    expected = act / 1e6 * cf * t_acq * df
    counts: NDArray[Any]
    if st.camera == "osem":
        counts = _osem_counts(st, grid, act, materials_on(grid, phantom), df, rng)
    else:
        blurred = act
        if st.fwhm_mm > 0:
            sigma = st.fwhm_mm / FWHM_PER_SIGMA / np.asarray(grid.spacing)[::-1]
            blurred = gaussian_filter(act, sigma=sigma, mode="constant", cval=0.0, truncate=4.0)
        expected = np.maximum(blurred, 0.0) / 1e6 * cf * t_acq * df
        counts = rng.poisson(expected) if st.poisson_noise else np.rint(expected)
    if counts.max() > 65535:
        raise ValueError(
            f"{counts.max():.0f} counts in a voxel do not fit uint16; lower the phantom's activity or the frame time"
        )
    if st.pixel_mode == "counts":
        image: NDArray[Any] = np.rint(counts).astype(np.uint16)
        units = "counts"
    else:
        image = counts / (cf * t_acq * df) / grid.voxel_volume_ml * 1e6
        units = "Bq/ml"
    return CalibrationScan(st, phantom, grid, a_start, df, expected, image, units)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_NAMES = {
    "cylinder": ("VD-CAL-CYLINDER", "PHANTOM^CYLINDER", "Calibration: uniform cylinder (Jaszczak-like), 177Lu"),
    "iec": ("VD-CAL-NEMA-IEC", "PHANTOM^NEMA IEC", "Calibration: NEMA IEC body phantom, 177Lu"),
}


@dataclass(frozen=True)
class CalibrationManifest:
    """What :func:`write_calibration_phantom` wrote."""

    out_dir: Path
    nm_file: Path
    ct_folder: Path
    truth_json: Path
    readme: Path
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)


_README = """\
voxeldose calibration phantom: {what}
{line}

{description}
Activity {mbq:.1f} MBq at {ref} (the dose-calibrator reading, in the NM header's Radiopharmaceutical
Information); SPECT from {start}, {tacq:.0f} s, camera model "{camera}" (the synthetic patient's).
THIS IS NOT PATIENT DATA.

dicom/NM/SPECT.dcm   reconstructed SPECT (NM RECON TOMO), counts
dicom/CT/*.dcm       CT of the phantom (same Frame of Reference)
truth/truth.json     activity, concentrations, placement{spheres}; for tests only

Calibrate a camera profile with:  voxeldose calibrate CYLINDER_DIR IEC_DIR --out camera.json
"""


def write_calibration_phantom(
    out_dir: str | Path, phantom: CalibrationPhantom, settings: PhantomSettings | None = None
) -> CalibrationManifest:
    """Simulate ``phantom`` through the camera of ``settings`` and write DICOM (NM + CT), truth and a README."""
    st = settings or PhantomSettings()
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    scan = simulate_calibration(phantom, st)
    timings = {"simulate": time.perf_counter() - t0}
    key = json.dumps(_jsonable(dataclasses.asdict(phantom)), sort_keys=True)
    pid, pname, study_desc = _NAMES[phantom.kind]
    study_uid, for_uid = _uid(st, "calphantom", key, "study"), _uid(st, "calphantom", key, "for")
    start = phantom.acquisition_start
    ctx = PatientStudy(
        patient_id=pid,
        patient_name=pname,
        patient_birth_date="",
        patient_sex="O",
        study_instance_uid=study_uid,
        study_datetime=start,
        study_description=study_desc,
    )
    nm_path = out / "dicom" / "NM" / "SPECT.dcm"
    grid = spect_grid(st, for_uid)
    write_nm_tomo(
        nm_path,
        Volume(scan.image, grid.affine, for_uid, scan.units),
        ctx=ctx,
        series=SeriesInfo(_uid(st, "calphantom", key, "NM"), 1, f"SPECT 177Lu {phantom.kind} phantom", for_uid, start),
        injection=Injection(st.radionuclide, phantom.total_activity_bq, phantom.reference_datetime, "Lu-177 chloride"),
        acquisition=st.acquisition,
        pixel_mode=st.pixel_mode,
        sop_instance_uid=_uid(st, "calphantom", key, "sop"),
        camera=camera_headers(st),
    )
    cg = ct_grid(st, for_uid)
    rng = np.random.default_rng(np.random.SeedSequence([int(st.seed), 505]))
    hu = _hu(materials_on(cg, phantom), rng, st.ct_noise_hu)
    t_acq = st.acquisition_duration_s
    write_ct_series(
        out / "dicom" / "CT",
        Volume(hu, cg.affine, for_uid, "HU"),
        ctx=ctx,
        series=SeriesInfo(
            _uid(st, "calphantom", key, "CT"),
            2,
            f"CT {phantom.kind} phantom",
            for_uid,
            start + timedelta(seconds=t_acq),
        ),
    )
    timings["dicom"] = time.perf_counter() - t0 - timings["simulate"]
    conc = phantom.concentrations_bq_per_ml()
    truth: dict[str, Any] = {
        "description": f"voxeldose calibration phantom ({phantom.kind}): ground truth, for tests only",
        "kind": phantom.kind,
        "radionuclide": st.radionuclide,
        "activity_bq_at_reference": phantom.total_activity_bq,
        "reference_datetime": phantom.reference_datetime.isoformat(),
        "acquisition_start": start.isoformat(),
        "acquisition_duration_s": t_acq,
        "activity_bq_at_acquisition_start": scan.activity_at_start_bq,
        "decay_during_acquisition_factor": scan.decay_factor,
        "expected_total_counts": float(scan.expected_counts.sum()),
        "concentrations_bq_per_ml_at_reference": conc,
        "placement": {
            "centre_lps_mm": list(phantom.placement.centre_mm),
            "rotation_deg": phantom.placement.rotation_deg,
        },
        "camera": st.camera,
        "fwhm_mm": st.fwhm_mm if st.camera == "gaussian" else None,
        "calibration_cps_per_mbq": st.calibration_cps_per_mbq,
        "settings": _jsonable(dataclasses.asdict(st)),
        "materials": {v[0]: {"density_g_per_ml": v[1], "source": v[2]} for v in _MATERIALS.values()},
    }
    if phantom.kind == "cylinder":
        truth["geometry"] = {
            "inner_radius_mm": CYLINDER_RADIUS_MM,
            "inner_height_mm": CYLINDER_HEIGHT_MM,
            "volume_ml": math.pi * CYLINDER_RADIUS_MM**2 * CYLINDER_HEIGHT_MM / 1000.0,
        }
    else:
        truth["geometry"] = _jsonable(dataclasses.asdict(IEC)) | {"background_volume_ml": IEC.background_volume_ml()}
        truth["sphere_to_background"] = phantom.sphere_to_background
        truth["spheres"] = [
            {"diameter_mm": d, "volume_ml": v, "centre_lps_mm": list(phantom.placement.to_lps(*c))}
            for d, v, c in zip(IEC.sphere_diameters_mm, IEC.sphere_volumes_ml(), IEC.sphere_centres())
        ]
    truth_json = out / "truth" / "truth.json"
    truth_json.write_text(json.dumps(_jsonable(truth), indent=2))
    what = "uniform cylinder" if phantom.kind == "cylinder" else "NEMA IEC body phantom"
    description = (
        f"Water cylinder, {2 * CYLINDER_RADIUS_MM:.0f} mm inner diameter x {CYLINDER_HEIGHT_MM:.0f} mm, uniform 177Lu."
        if phantom.kind == "cylinder"
        else f"NEMA NU 2 / IEC 61675-1 body phantom: six spheres (10-37 mm) at {phantom.sphere_to_background:g}:1 "
        "to the background,\nlung insert without activity."
    )
    readme = out / "README.txt"
    readme.write_text(
        _README.format(
            what=what,
            line="=" * (40 + len(what)),
            description=description,
            mbq=phantom.total_activity_bq / 1e6,
            ref=phantom.reference_datetime.isoformat(sep=" "),
            start=start.isoformat(sep=" "),
            tacq=t_acq,
            camera=st.camera,
            spheres="" if phantom.kind == "cylinder" else ", sphere centres and volumes",
        )
    )
    timings["total"] = time.perf_counter() - t0
    return CalibrationManifest(out, nm_path, out / "dicom" / "CT", truth_json, readme, timings)
