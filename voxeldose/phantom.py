"""The synthetic patient: embedded demo data and ground truth for voxeldose.

A torso built from analytic shapes (elliptic cylinders, ellipsoids, one superquadric) in DICOM
patient coordinates (LPS, mm), given [177Lu]Lu-DOTATATE kinetics per volume of interest (VOI) from
the literature, imaged by quantitative SPECT/CT at several time points after injection, and
written as DICOM (NM, CT, RTSTRUCT, SEG) together with the exact truth (time-integrated activity per
voxel and per VOI, activities per time point, local-energy-deposition doses).

What is exact and what is a simplification
------------------------------------------
* Within each VOI the activity concentration is uniform, so the truth is exact by construction:
  the time-integrated activity (TIA) of a VOI is the analytic integral of its time–activity curve,
  and the TIA of a voxel of the reference SPECT grid is ``Σ_VOI TIA_VOI × (fraction of the VOI's
  volume inside the voxel)``.  Fractions and VOI volumes are computed by regular supersampling
  (``supersample**3`` sub-points per voxel), so partial voxels are right and the voxel map sums
  to ``Σ TIA_VOI`` exactly (to rounding).
* Imaging: the activity of each time point, sampled the same way on that time point's SPECT grid
  with the patient moved by a small rigid transform (repositioning), is blurred with a Gaussian
  point-spread function (FWHM ``fwhm_mm``), converted to expected reconstructed counts
  ``A[MBq] × CF × T_acq × (1 − e^{−λT})/(λT)`` (physical decay during the acquisition; biological
  redistribution during the ~40 min acquisition is neglected) and given Poisson noise.  Real
  reconstructed SPECT noise is spatially correlated and not Poisson per voxel, and real images have
  attenuation/scatter residuals and partial-volume effects beyond a Gaussian blur: Poisson on voxel
  counts is a deliberate simplification.  The blur conserves counts: every VOI lies well inside the
  field of view.
* ``camera="osem"`` images it the way a camera does instead (:mod:`voxeldose.recon`, PyTomography, the
  ``recon`` extra): the activity (times the decay factor above) is projected through the *true* attenuation
  of the time point's anatomy (each tissue's density × the μ/ρ of water, or of ICRP cortical bone for bone, at
  208 keV) with the distance-dependent response of ``collimator`` on a circular orbit of
  ``2 × frames_in_rotation`` views (a dual-head camera), each head detecting ``CF/2`` counts per second per MBq
  in air (so the projections hold the counts the Gaussian model's image holds); the projections get Poisson
  noise and are written as an NM TOMO series of their own (:mod:`voxeldose.projections`,
  ``dicom/tpN_HHHh/NM-PROJ/PROJECTIONS.dcm``); OSEM (``osem_iterations × osem_subsets``) reconstructs them, as
  written, with attenuation from the time point's CT as written (resampled onto the SPECT grid, bilinear HU → μ,
  :func:`voxeldose.recon.hu_to_mu_per_cm`) and the same collimator model
  (:func:`voxeldose.projections.reconstruct`, what ``voxeldose recon`` runs).  No scatter.  The reconstructed
  counts relate to activity by the same CF.  ``expected_counts`` is then the truth itself in counts (no blur).
* The torso is the whole phantom: activity in the head and limbs is not modelled, so the sum of
  VOI activities is the *torso* activity, below the injected activity (the rest is "outside the
  phantom" or excreted).
* Dose truth here is the local-energy-deposition (LED) estimate only:
  ``D_VOI = TIA_VOI × E_e / m_VOI`` with ``E_e`` the mean electron energy emitted per decay
  (ICRP-107 β⁻ mean energies × yields + internal-conversion + Auger electrons, ≈ 147.9 keV for
  Lu-177).  Photons (≈ 35 keV per decay) and electron cross-fire between VOIs are ignored; a dose
  engine with kernels will give slightly different numbers (higher for small VOIs surrounded by
  activity, photon cross-dose added).

Coordinates: the torso is centred on the LPS origin; ``x`` to the patient's left, ``y`` posterior,
``z`` superior.  Anatomy scale 1 is an adult torso (34 × 22 cm, 40 cm long);
:meth:`PhantomSettings.small` is a half-size copy on coarse grids for fast tests, with every uptake
fraction scaled by ``scale³`` so that concentrations — and therefore doses per GBq — are the same.

Sources (see each constant): ICRP-107 (nuclide data, via :mod:`voxeldose.nuclides`); ICRU Report 44
(tissue densities); MIRD Pamphlet 26 (Ljungberg et al. 2016, J Nucl Med 57:151–162) for
quantitative 177Lu SPECT; the other kinetic sources are cited where the parameters are defined
(:func:`default_kinetics`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from .camera import CameraIdentity
from .dicom_writers import write_seg
from .dicomutil import PatientStudy, SeriesInfo
from .dose import RHO_AIR, SCHNEIDER_2000
from .geometry import FWHM_PER_SIGMA, Grid, Volume
from .nuclides import J_PER_MEV, electron_energy_per_decay_MeV, load
from .projections import EnergyWindow, ProjectionSet, reconstruct, reconstruction_method, write_projections
from .reference import write_reference_dose
from .scanner import (
    CameraHeaders,
    Injection,
    SpectAcquisition,
    contours_from_mask,
    write_ct_series,
    write_nm_tomo,
    write_rtstruct,
)

__all__ = [
    "TISSUES",
    "VOI_NAMES",
    "Kinetics",
    "PhantomData",
    "PhantomManifest",
    "PhantomSettings",
    "TimePoint",
    "camera_headers",
    "ct_grid",
    "default_kinetics",
    "electron_energy_per_decay_j",
    "hu_on",
    "label_names",
    "labels_on",
    "repositioning_transforms",
    "simulate",
    "spect_grid",
    "tissues_on",
    "voxel_sums",
    "write_phantom",
]

# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

#: Acquisition of every SPECT: 60 frames per detector head × 40 s, 3° steps (dual head, 120
#: views over 360°, 40 min).  The MRTDosimetry multicentre 177Lu protocol (Tran-Gia et al. 2021,
#: EJNMMI Phys 8:55, doi:10.1186/s40658-021-00397-0, Table 2) uses medium-energy collimators,
#: the 208 keV ±10 % window (187.5–229.2 keV), 120 projections (60 per detector), 60 s per
#: projection; 40 s per projection is our judgment of a clinically tolerable patient protocol.
DEFAULT_ACQUISITION = SpectAcquisition(frame_duration_ms=40_000, frames_in_rotation=60)


@dataclass(frozen=True)
class PhantomSettings:
    """Everything that defines one synthetic patient; the same settings give the same files.

    Grids: the SPECT grid is ``spect_matrix × spect_matrix × spect_slices`` voxels of
    ``spect_voxel_mm`` (isotropic), the CT grid ``ct_matrix × ct_matrix`` pixels of
    ``ct_pixel_mm`` and slices of ``ct_slice_mm`` covering the same z range; both centred on the
    torso.  Every time point has its own SPECT/CT (one Frame of Reference per time point) on grids
    of the same geometry, with the patient moved by a random rigid transform (translation up to
    ``repositioning_mm`` per axis, rotation up to ``repositioning_deg`` about each axis; identity
    at the first time point).
    """

    seed: int = 0
    hours: tuple[float, ...] = (4.0, 24.0, 96.0, 168.0)
    injected_activity_bq: float = 7.4e9
    injection_datetime: datetime = datetime(2026, 1, 5, 9, 30)
    pixel_mode: Literal["counts", "bqml"] = "counts"
    radionuclide: str = "Lu-177"
    # SPECT: 128 x 128 at 4.7952 mm (a common 128-matrix reconstruction pixel), 96 slices = 46 cm.
    spect_matrix: int = 128
    spect_slices: int = 96
    spect_voxel_mm: float = 4.7952
    # CT: 256 x 256 at 1.875 mm (48 cm display field), 2 mm slices over the same 46 cm.
    ct_matrix: int = 256
    ct_pixel_mm: float = 1.875
    ct_slice_mm: float = 2.0
    ct_noise_hu: float = 8.0
    #: Reconstructed spatial resolution (Gaussian FWHM), mm.  Judgment: ~10–12 mm is typical of
    #: OSEM with resolution recovery at 208 keV with a medium-energy collimator.
    fwhm_mm: float = 11.0
    #: Imaging model: ``"gaussian"`` (image-space blur of ``fwhm_mm`` and Poisson voxel noise: fast, the default)
    #: or ``"osem"`` (projections, Poisson counts and OSEM with PyTomography: needs the ``recon`` extra; see
    #: the module docstring).  ``fwhm_mm`` applies to ``"gaussian"`` only.
    camera: Literal["gaussian", "osem"] = "gaussian"
    #: ``"osem"``: the collimator (a code of :data:`voxeldose.recon.COLLIMATORS`; Siemens ME by default).
    collimator: str = "SY-ME"
    #: ``"osem"``: iterations × subsets.  4 × 8 is in the range of vendor 177Lu protocols (judgment).
    osem_iterations: int = 4
    osem_subsets: int = 8
    #: ``"osem"``: collimator-face distance from the rotation axis, mm (a circular orbit); raised to half the
    #: SPECT grid's width when the grid is wider.
    orbit_radius_mm: float = 250.0
    #: System volume sensitivity, reconstructed counts per second per MBq.  5.67 ± 0.08 cps/MBq was
    #: measured for 177Lu SPECT/CT (208 keV, medium-energy collimator) by Santoro et al. 2018,
    #: "Implementation of patient dosimetry in the clinical practice after targeted radiotherapy
    #: using [177Lu-[DOTA0, Tyr3]-octreotate", EJNMMI Res 8:103, doi:10.1186/s13550-018-0459-4.
    calibration_cps_per_mbq: float = 5.67
    acquisition: SpectAcquisition = DEFAULT_ACQUISITION
    repositioning_mm: float = 3.0
    #: Poisson noise on the reconstructed counts; False writes the expected counts rounded to integers
    #: (an "ideal" camera, for validating the pipeline without noise).
    poisson_noise: bool = True
    repositioning_deg: float = 2.0
    patient_id: str = "VD-PHANTOM-LU177"
    patient_name: str = "PHANTOM^LU177"
    patient_birth_date: str = "19580312"
    patient_sex: str = "M"
    patient_weight_kg: float = 74.0
    patient_size_m: float = 1.76
    #: Linear size of the anatomy (1 = adult torso); uptake fractions scale with its cube.
    anatomy_scale: float = 1.0
    #: Sub-points per voxel edge for the TIA truth on the reference SPECT grid.
    supersample: int = 3
    #: Sub-points per voxel edge for the activity images (blurred afterwards; 2 is plenty).
    imaging_supersample: int = 2
    #: Write Body (the external contour) into RTSTRUCT and SEG as well as the organs/tumours.
    body_in_structures: bool = True

    @classmethod
    def small(cls, **overrides: Any) -> PhantomSettings:
        """A half-size patient on coarse grids for unit tests, with every organ and tumour.

        SPECT 48 × 48 × 36 at 7.2 mm, CT 96 × 96 × 60 at 3.6 mm × 4.32 mm.  Concentrations (and
        LED doses per GBq) equal the default phantom's; activities are 1/8.
        """
        base: dict[str, Any] = {
            "anatomy_scale": 0.5,
            "spect_matrix": 48,
            "spect_slices": 36,
            "spect_voxel_mm": 7.2,
            "ct_matrix": 96,
            "ct_pixel_mm": 3.6,
            "ct_slice_mm": 4.32,
            "supersample": 5,
        }
        base.update(overrides)
        return cls(**base)

    @classmethod
    def ideal(cls, base: PhantomSettings | None = None, **overrides: Any) -> PhantomSettings:
        """``base`` (default: the default phantom) with a perfect camera: no blur, no noise, no
        repositioning — the images are the truth sampled on the SPECT grid.  For validating the pipeline."""
        changes: dict[str, Any] = {
            "fwhm_mm": 0.0,
            "poisson_noise": False,
            "repositioning_mm": 0.0,
            "repositioning_deg": 0.0,
        }
        changes.update(overrides)
        return dataclasses.replace(base or cls(), **changes)

    @property
    def acquisition_duration_s(self) -> float:
        """``frame_duration_ms / 1000 × frames_in_rotation`` (see :class:`SpectAcquisition`)."""
        return self.acquisition.frame_duration_ms / 1000.0 * self.acquisition.frames_in_rotation

    def fingerprint(self) -> str:
        """A short hash of all settings: part of every UID's entropy.

        The projection camera's settings count only when it is used, so that a Gaussian-camera patient keeps the
        UIDs it had before they existed.
        """
        d = dataclasses.asdict(self)
        if self.camera == "gaussian":
            for name in _PROJECTION_CAMERA_FIELDS:
                del d[name]
        return hashlib.sha256(json.dumps(_jsonable(d), sort_keys=True).encode()).hexdigest()[:16]


_PROJECTION_CAMERA_FIELDS = ("camera", "collimator", "osem_iterations", "osem_subsets", "orbit_radius_mm")


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------

#: VOI label → name (0 is outside the body).  Tumours override their host organs.
VOI_NAMES: dict[int, str] = {
    1: "Remainder",  # body tissue outside every other VOI; the RTSTRUCT/SEG "Body" is the whole body
    2: "Lung_L",
    3: "Lung_R",
    4: "Liver",
    5: "Spleen",
    6: "Kidney_L",
    7: "Kidney_R",
    8: "Marrow_L2L4",
    9: "Bladder",
    10: "Tumor_1",
    11: "Tumor_2",
    12: "Tumor_3",
    13: "Tumor_4",
    14: "Tumor_5",
}
_LABEL = {name: lab for lab, name in VOI_NAMES.items()}


def _hu_for_density(rho: float) -> float:
    """The CT number (integer HU) that the pipeline's HU → density calibration maps to ``rho`` g/cm³.

    Inverts :data:`voxeldose.dose.SCHNEIDER_2000` (piecewise linear, ``ρ = a + b·H``) row by row and
    takes the lowest HU that gives ``rho``; densities at or below the air floor map to −1000 HU.
    """
    if rho <= RHO_AIR:
        return -1000.0
    for lo, hi, a, b in SCHNEIDER_2000:
        if b == 0.0:
            if math.isclose(a, rho):
                return float(math.ceil(lo))
            continue
        h = (rho - a) / b
        if lo <= h < hi:
            return float(round(h))
    raise ValueError(f"no CT number maps to {rho} g/cm³")  # pragma: no cover - every ρ ≥ air is reachable


#: Tissue classes: (name, mass density g/cm³, source of the density).  Densities from ICRU Report 44
#: (1989) where it lists the tissue.
_TISSUE_DENSITIES: dict[int, tuple[str, float, str]] = {
    0: ("air", 0.0012, "ICRU 44 (dry air)"),
    1: ("adipose", 0.95, "ICRU 44 adipose tissue"),
    2: ("soft_tissue", 1.05, "ICRU 44 skeletal muscle"),
    3: ("lung", 0.26, "ICRU 44 lung (inflated)"),
    4: ("liver", 1.06, "ICRU 44 liver"),
    5: ("spleen", 1.06, "ICRU 44 spleen"),
    6: ("kidney", 1.05, "ICRU 44 kidney"),
    7: ("cortical_bone", 1.92, "ICRU 44 cortical bone"),
    8: ("spongiosa", 1.18, "judgment: lumbar trabecular bone + red marrow mixture"),
    9: ("urine", 1.02, "judgment (≈ water with solutes)"),
    10: ("tumour", 1.05, "judgment (soft tissue; hypodense vs liver)"),
}

#: Tissue classes: (name, CT number HU, mass density g/cm³, source).  The CT number of each tissue is
#: the inverse of the pipeline's HU → density calibration (:func:`voxeldose.dose.hu_to_density`,
#: Schneider et al. 2000) at its density, rounded to whole HU, so that the density the pipeline derives
#: from the phantom's CT is the truth's (to < 0.1 %).  Some differ from typical clinical CT numbers
#: (adipose −76 HU vs ≈ −100, cortical bone ≈ 1525 HU vs ≈ 1200): a real scanner needs its own
#: calibration; the phantom is consistent with the one the pipeline uses.
TISSUES: dict[int, tuple[str, float, float, str]] = {
    k: (name, _hu_for_density(rho), rho, src) for k, (name, rho, src) in _TISSUE_DENSITIES.items()
}
_T = {v[0]: k for k, v in TISSUES.items()}


@dataclass(frozen=True)
class _Shape:
    """An axis-aligned analytic solid in anatomy coordinates (LPS mm at anatomy scale 1).

    ``ellipsoid``: Σ (d/a)² ≤ 1; ``superquadric``: Σ |d/a|^p ≤ 1; ``cylinder``: elliptic
    cylinder along z, ``(dx/a)² + (dy/b)² ≤ 1`` and ``|dz| ≤ c``.
    """

    kind: str
    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    label: int | None  # VOI label painted (None: keep the label underneath)
    tissue: int
    exponent: float = 2.0


def _anatomy() -> list[_Shape]:
    """The shapes in painting order (later shapes override earlier ones)."""
    B = _LABEL["Remainder"]
    s: list[_Shape] = [
        # torso: 34 x 22 cm elliptic cylinder, 40 cm long, 15 mm subcutaneous fat
        _Shape("cylinder", (0, 0, 0), (170, 110, 200), B, _T["adipose"]),
        _Shape("cylinder", (0, 0, 0), (155, 95, 200), B, _T["soft_tissue"]),
        # iliac wings (cortical shell, spongiosa core): realism for CT, part of Body
        _Shape("ellipsoid", (-105, 35, -125), (14, 50, 55), B, _T["cortical_bone"]),
        _Shape("ellipsoid", (-105, 35, -125), (9, 45, 50), B, _T["spongiosa"]),
        _Shape("ellipsoid", (105, 35, -125), (14, 50, 55), B, _T["cortical_bone"]),
        _Shape("ellipsoid", (105, 35, -125), (9, 45, 50), B, _T["spongiosa"]),
        # lungs: bases at z ≈ +50..+60, cut by the top of the torso
        _Shape("ellipsoid", (85, 15, 195), (58, 72, 135), _LABEL["Lung_L"], _T["lung"]),
        _Shape("ellipsoid", (-85, 15, 190), (62, 72, 140), _LABEL["Lung_R"], _T["lung"]),
        # liver: a rounded box under the right dome
        _Shape("superquadric", (-58, -5, 62), (82, 70, 62), _LABEL["Liver"], _T["liver"], 2.6),
        _Shape("ellipsoid", (92, 42, 45), (30, 42, 48), _LABEL["Spleen"], _T["spleen"]),
        _Shape("ellipsoid", (75, 58, -22), (30, 24, 55), _LABEL["Kidney_L"], _T["kidney"]),
        _Shape("ellipsoid", (-75, 58, -40), (30, 24, 55), _LABEL["Kidney_R"], _T["kidney"]),
        _Shape("ellipsoid", (0, -5, -165), (45, 35, 30), _LABEL["Bladder"], _T["urine"]),
    ]
    # lumbar vertebral bodies L1..L5: cortical shell (3 mm wall, 2.5 mm end plates) around
    # spongiosa; the spongiosa of L2-L4 is the marrow VOI (image-based L2-L4 method).
    for name, zc in (("L1", 43.0), ("L2", 7.0), ("L3", -29.0), ("L4", -65.0), ("L5", -101.0)):
        s.append(_Shape("cylinder", (0, 50, zc), (25, 19, 14), B, _T["cortical_bone"]))
        lab = _LABEL["Marrow_L2L4"] if name in ("L2", "L3", "L4") else B
        s.append(_Shape("cylinder", (0, 50, zc), (22, 16, 11.5), lab, _T["spongiosa"]))
    tum = _T["tumour"]
    s += [
        # three liver metastases of 40, 25 and 15 mm diameter
        _Shape("ellipsoid", (-85, -20, 72), (20, 20, 20), _LABEL["Tumor_1"], tum),
        _Shape("ellipsoid", (-25, -38, 40), (12.5, 12.5, 12.5), _LABEL["Tumor_2"], tum),
        _Shape("ellipsoid", (-100, 22, 35), (7.5, 7.5, 7.5), _LABEL["Tumor_3"], tum),
        # a mesenteric / para-aortic lymph node, 22 x 16 x 28 mm
        _Shape("ellipsoid", (30, 8, -50), (11, 8, 14), _LABEL["Tumor_4"], tum),
        # a 20 mm bone metastasis in the L1 vertebral body (outside the L2-L4 marrow VOI)
        _Shape("ellipsoid", (7, 50, 43), (10, 10, 10), _LABEL["Tumor_5"], tum),
    ]
    return s


_SHAPES = _anatomy()


def label_names() -> dict[int, str]:
    """VOI label → ROI name, as used in labels, truth.json, RTSTRUCT and SEG."""
    return dict(VOI_NAMES)


def _index_map(grid: Grid, transform: np.ndarray | None, scale: float) -> np.ndarray:
    """4x4 map from grid indices (i, j, k, 1) to anatomy coordinates at scale 1.

    ``transform`` moves the patient (anatomy point q → scanner point T q), so a scanner point p
    holds the anatomy found at ``T⁻¹ p``.
    """
    m = grid.affine
    if transform is not None:
        m = np.linalg.inv(np.asarray(transform, dtype=float)) @ m
    out: np.ndarray = np.diag([1.0 / scale] * 3 + [1.0]) @ m
    return out


def _paint(grid: Grid, transform: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate every shape on the voxel centres of ``grid``: (labels uint8, tissues uint8)."""
    shape = grid.shape
    labels = np.zeros(shape, dtype=np.uint8)
    tissues = np.zeros(shape, dtype=np.uint8)
    m = _index_map(grid, transform, scale)
    minv = np.linalg.inv(m)
    body = np.zeros(shape, dtype=bool)
    for n_shape, sh in enumerate(_SHAPES):
        c = np.asarray(sh.center, dtype=float)
        a = np.asarray(sh.semi_axes, dtype=float)
        # bounding box in grid indices (transform the 8 corners of the shape's box)
        corners = np.array(
            [
                [c[0] + sx * a[0], c[1] + sy * a[1], c[2] + sz * a[2], 1.0]
                for sx in (-1, 1)
                for sy in (-1, 1)
                for sz in (-1, 1)
            ]
        )
        idx = corners @ minv.T
        lo = np.floor(idx[:, :3].min(axis=0)).astype(int) - 1
        hi = np.ceil(idx[:, :3].max(axis=0)).astype(int) + 2
        ni, nj, nk = shape[2], shape[1], shape[0]
        i0, j0, k0 = max(lo[0], 0), max(lo[1], 0), max(lo[2], 0)
        i1, j1, k1 = min(hi[0], ni), min(hi[1], nj), min(hi[2], nk)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        ii = np.arange(i0, i1, dtype=np.float32)[None, None, :]
        jj = np.arange(j0, j1, dtype=np.float32)[None, :, None]
        kk = np.arange(k0, k1, dtype=np.float32)[:, None, None]
        u = []
        for r in range(3):
            row = m[r].astype(np.float64)
            u.append(
                (np.float32(row[0] / a[r]) * ii + np.float32(row[1] / a[r]) * jj)
                + (np.float32(row[2] / a[r]) * kk + np.float32((row[3] - c[r]) / a[r]))
            )
        if sh.kind == "ellipsoid":
            inside = u[0] * u[0] + u[1] * u[1] + u[2] * u[2] <= 1.0
        elif sh.kind == "cylinder":
            inside = (u[0] * u[0] + u[1] * u[1] <= 1.0) & (np.abs(u[2]) <= 1.0)
        elif sh.kind == "superquadric":
            p = np.float32(sh.exponent)
            inside = np.abs(u[0]) ** p + np.abs(u[1]) ** p + np.abs(u[2]) ** p <= 1.0
        else:  # pragma: no cover - programming error
            raise ValueError(sh.kind)
        sub = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        if n_shape == 0:  # the torso's outer surface
            body[sub] = inside
        if sh.label is not None:
            labels[sub][inside] = sh.label
        tissues[sub][inside] = sh.tissue
    labels[~body] = 0
    tissues[~body] = _T["air"]
    return labels, tissues


def labels_on(
    grid: Grid,
    *,
    settings: PhantomSettings | None = None,
    transform: np.ndarray | None = None,
) -> np.ndarray:
    """VOI labels (uint8, see :data:`VOI_NAMES`) at the voxel centres of any ``grid``.

    ``transform`` (4x4, LPS → LPS) moves the patient before sampling (a time point's
    repositioning); ``settings`` gives the anatomy scale (default: adult).
    """
    scale = (settings or PhantomSettings()).anatomy_scale
    return _paint(grid, transform, scale)[0]


def tissues_on(
    grid: Grid, *, settings: PhantomSettings | None = None, transform: np.ndarray | None = None
) -> np.ndarray:
    """Tissue classes (uint8, see :data:`TISSUES`) at the voxel centres of ``grid``."""
    scale = (settings or PhantomSettings()).anatomy_scale
    return _paint(grid, transform, scale)[1]


def hu_on(
    grid: Grid,
    *,
    settings: PhantomSettings | None = None,
    transform: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    noise_hu: float = 0.0,
) -> np.ndarray:
    """CT numbers (int16 HU) on ``grid``; optional Gaussian noise of ``noise_hu`` (seeded ``rng``)."""
    tis = tissues_on(grid, settings=settings, transform=transform)
    lut = np.array([TISSUES[t][1] for t in range(len(TISSUES))], dtype=np.float32)
    hu = lut[tis]
    if noise_hu > 0:
        rng = rng or np.random.default_rng(0)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
        hu[tis == _T["air"]] = -1000.0
    out: np.ndarray = np.rint(hu).astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------
# Grids and repositioning
# --------------------------------------------------------------------------------------------


def spect_grid(settings: PhantomSettings, frame_of_reference_uid: str | None = None) -> Grid:
    """The SPECT grid (axial, k toward the head), centred on the torso."""
    n, nz, d = settings.spect_matrix, settings.spect_slices, settings.spect_voxel_mm
    origin = (-(n - 1) / 2 * d, -(n - 1) / 2 * d, -(nz - 1) / 2 * d)
    return Grid.axial((nz, n, n), (d, d, d), origin, frame_of_reference_uid)


def ct_grid(settings: PhantomSettings, frame_of_reference_uid: str | None = None) -> Grid:
    """The CT grid: same z coverage as the SPECT (to the nearest slice), centred on the torso."""
    n, d, dz = settings.ct_matrix, settings.ct_pixel_mm, settings.ct_slice_mm
    length = settings.spect_slices * settings.spect_voxel_mm
    nz = max(1, round(length / dz))
    origin = (-(n - 1) / 2 * d, -(n - 1) / 2 * d, -(nz - 1) / 2 * dz)
    return Grid.axial((nz, n, n), (d, d, dz), origin, frame_of_reference_uid)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    out: np.ndarray = rz @ ry @ rx
    return out


def repositioning_transforms(settings: PhantomSettings) -> list[np.ndarray]:
    """One 4x4 LPS rigid transform per time point (identity first), seeded by ``settings.seed``.

    Anatomy point q (reference, first time point) → scanner point ``T q`` at that time point.
    Rotation about the torso centre (the origin), each angle uniform in ±``repositioning_deg``;
    translation uniform in ±``repositioning_mm`` per axis.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(settings.seed), 101]))
    out = [np.eye(4)]
    for _ in settings.hours[1:]:
        ang = np.deg2rad(rng.uniform(-settings.repositioning_deg, settings.repositioning_deg, 3))
        t = rng.uniform(-settings.repositioning_mm, settings.repositioning_mm, 3)
        m = np.eye(4)
        m[:3, :3] = _rotation(*ang)
        m[:3, 3] = t
        out.append(m)
    return out


# --------------------------------------------------------------------------------------------
# Supersampled voxel sums (TIA truth, activity images, volumes, masses)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sampling:
    counts: np.ndarray  # sub-points per label (index = label)
    mass_g: np.ndarray  # mass per label, g
    sub_volume_ml: float


def _fine_chunks(grid: Grid, ss: int, chunk: int) -> Iterator[tuple[int, int, Grid]]:
    """Yield (k0, k1, fine sub-grid) covering slices k0..k1 of ``grid`` with ss³ sub-points each."""
    nk, nj, ni = grid.shape
    a = grid.affine
    step = a[:3, :3] / ss
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        # centre of sub-point (0,0,0) of voxel (0,0,k0): voxel centre - (ss-1)/(2ss) of each axis
        corner = a[:3, 3] + a[:3, :3] @ np.array([0.0, 0.0, float(k0)]) - step @ np.full(3, (ss - 1) / 2.0)
        fa = np.eye(4)
        fa[:3, :3] = step
        fa[:3, 3] = corner
        yield k0, k1, Grid(((k1 - k0) * ss, nj * ss, ni * ss), fa)


def _block_sum(fine: np.ndarray, ss: int) -> np.ndarray:
    nk, nj, ni = fine.shape[0] // ss, fine.shape[1] // ss, fine.shape[2] // ss
    out: np.ndarray = fine.reshape(nk, ss, nj, ss, ni, ss).sum(axis=(1, 3, 5))
    return out


def voxel_sums(
    grid: Grid,
    values: dict[str, float] | None,
    *,
    settings: PhantomSettings,
    supersample: int,
    transform: np.ndarray | None = None,
    chunk: int = 6,
) -> tuple[np.ndarray | None, _Sampling]:
    """Distribute per-VOI amounts over the voxels of ``grid`` by supersampling.

    Voxel value ``= Σ_VOI values[VOI] × n_VOI(voxel) / N_VOI`` where ``n_VOI(voxel)`` is the number of
    the voxel's ``supersample³`` sub-points inside the VOI and ``N_VOI`` the VOI's total: the image
    sums to ``Σ values`` exactly whenever the VOIs lie inside the grid.  Also returns the sampling
    (sub-point counts and masses per label).  ``values=None`` only samples.
    """
    ss = int(supersample)
    nlab = max(VOI_NAMES) + 1
    dens = np.array([TISSUES[t][2] for t in range(len(TISSUES))])
    sub_ml = grid.voxel_volume_ml / ss**3
    counts = np.zeros(nlab, dtype=np.int64)
    mass = np.zeros(nlab)
    stored: list[tuple[int, int, np.ndarray]] = []
    for k0, k1, fg in _fine_chunks(grid, ss, chunk):
        lab, tis = _paint(fg, transform, settings.anatomy_scale)
        counts += np.bincount(lab.ravel(), minlength=nlab)[:nlab]
        mass += np.bincount(lab.ravel(), weights=dens[tis.ravel()], minlength=nlab)[:nlab] * sub_ml
        if values is not None:
            stored.append((k0, k1, lab))
    sampling = _Sampling(counts, mass, sub_ml)
    if values is None:
        return None, sampling
    lut = np.zeros(nlab)
    for name, v in values.items():
        label = _LABEL[name]
        if counts[label] == 0:
            raise ValueError(f"VOI {name} has no sample inside the grid")
        lut[label] = float(v) / counts[label]
    out = np.zeros(grid.shape)
    for k0, k1, lab in stored:
        out[k0:k1] = _block_sum(lut[lab], ss)
    return out, sampling


# --------------------------------------------------------------------------------------------
# Kinetics
# --------------------------------------------------------------------------------------------


def electron_energy_per_decay_j(radionuclide: str = "Lu-177") -> float:
    """Mean electron energy emitted per decay (J): ICRP-107 β⁻ mean energies × yields + IE + Auger
    (:func:`voxeldose.nuclides.electron_energy_per_decay_MeV` × :data:`~voxeldose.nuclides.J_PER_MEV`)."""
    return electron_energy_per_decay_MeV(radionuclide) * J_PER_MEV


@dataclass(frozen=True)
class Kinetics:
    """A time–activity curve as a sum of exponentials with effective (physical-decay-included) rates.

    ``A(t) = A_inj × scale³ × Σ_i c_i exp(−ln2 t / T_i)``, ``t`` in seconds after injection,
    ``c_i`` fractions of the injected activity (negative for an uptake phase), ``T_i`` effective
    half-lives in hours (each ≤ the physical half-life).  ``TIA = ∫₀^∞ A dt = A_inj × scale³ ×
    Σ c_i T_i / ln2``.
    """

    coefficients: tuple[float, ...]
    effective_half_lives_h: tuple[float, ...]
    model: str
    source: str

    def activity_bq(self, t_s: Any, injected_bq: float, scale: float = 1.0) -> Any:
        t = np.asarray(t_s, dtype=float)
        out = np.zeros_like(t)
        for c, th in zip(self.coefficients, self.effective_half_lives_h):
            out = out + c * np.exp(-math.log(2.0) * t / (th * 3600.0))
        return out * injected_bq * scale**3

    def tia_bqs(self, injected_bq: float, scale: float = 1.0) -> float:
        s = sum(c * th * 3600.0 / math.log(2.0) for c, th in zip(self.coefficients, self.effective_half_lives_h))
        return float(s * injected_bq * scale**3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "formula": "A(t) = A_inj * scale^3 * sum_i c_i * exp(-ln2 * t / T_eff_i)",
            "coefficients_fraction_of_injected": list(self.coefficients),
            "effective_half_lives_h": list(self.effective_half_lives_h),
            "source": self.source,
        }


def _uptake_washout(f: float, t_up_h: float, t_wash_h: float, source: str) -> Kinetics:
    """``f (e^{−ln2 t/T_wash} − e^{−ln2 t/T_up})``: uptake with effective half-time ``T_up``."""
    return Kinetics((f, -f), (t_wash_h, t_up_h), "uptake-washout", source)


_SRC_KIDNEY = (
    "Washout: population effective half-life 56 ± 13 h for [177Lu]Lu-DOTA-TATE kidneys (Spink et al. "
    "2024, EJNMMI Phys 11, doi:10.1186/s40658-024-00665-9); kidney LED target ~0.4–0.6 Gy/GBq as "
    "reported for DOTATATE: 0.46 Gy/GBq mean (Staanum et al. 2021, EJNMMI Phys 8:78), 0.43 ± 0.13 "
    "(Santoro et al. 2018, EJNMMI Res 8:103), 0.57 ± 0.09 mGy/MBq (Clin Nucl Med 2013;38(3), 61 "
    "patients, 'Dosimetric analyses of kidneys, liver, spleen, pituitary gland, and neuroendocrine "
    "tumors of patients treated with 177Lu-DOTATATE'). Uptake half-time 1 h and uptake fraction: "
    "judgment, chosen to give these doses."
)
_SRC_SPLEEN = (
    "Spleen dose ~0.5–1.2 Gy/GBq: 0.54 (Santoro et al. 2018), 1.17 ± 0.14 mGy/MBq (Clin Nucl Med "
    "2013;38(3)); effective half-life 70 h, uptake half-time 2 h and fraction: judgment."
)
_SRC_LIVER = (
    "Normal-liver dose 0.27 ± 0.05 mGy/MBq (Clin Nucl Med 2013;38(3)); effective half-life 80 h, "
    "uptake half-time 1.5 h and fraction: judgment."
)
_SRC_MARROW = (
    "Marrow concentration follows blood (Forrer et al. 2009, Eur J Nucl Med Mol Imaging 36:1138; "
    "EANM bone-marrow dosimetry guideline, Hindorf et al. 2010): fast blood clearance (effective "
    "half-life 1.5 h) plus a small slowly cleared component (60 h), fractions chosen (judgment) for "
    "a marrow dose of a few hundredths of a Gy/GBq as in PRRT (PHYSICS.md clinical context)."
)
_SRC_BLADDER = (
    "Urinary excretion is the main elimination route of [177Lu]Lu-DOTATATE (Lutathera prescribing "
    "information, section 12.3: predominantly renal within the first 1–2 days). Bladder content as "
    "filling (1.5 h) and voiding/emptying (4 h) effective half-times: judgment, not patient data."
)
_SRC_BODY = (
    "Remainder of the torso: blood/extracellular pool cleared to urine within hours (effective "
    "half-life 2 h) and a slow component (60 h): judgment, consistent with predominantly renal early "
    "excretion (Lutathera PI) and a whole-body retention that decreases monotonically."
)
_SRC_TUMOUR = (
    "NET lesion doses are several Gy/GBq (3.41 ± 0.68 mGy/MBq mean in Clin Nucl Med 2013;38(3); "
    "PHYSICS.md: 'tumours several Gy/GBq', varying with SST expression); effective half-lives "
    "longer than the kidneys'. Per-lesion uptake, uptake half-time 3 h and washout: judgment, "
    "varied per lesion."
)


def default_kinetics() -> dict[str, Kinetics]:
    """The time–activity model of every VOI (fractions of injected activity at anatomy scale 1)."""
    return {
        "Remainder": Kinetics((0.50, 0.060), (2.0, 60.0), "bi-exponential", _SRC_BODY),
        "Lung_L": Kinetics((0.004, 0.0008), (2.0, 60.0), "bi-exponential (blood pool)", _SRC_BODY),
        "Lung_R": Kinetics((0.005, 0.0010), (2.0, 60.0), "bi-exponential (blood pool)", _SRC_BODY),
        "Liver": _uptake_washout(0.060, 1.5, 80.0, _SRC_LIVER),
        "Spleen": _uptake_washout(0.030, 2.0, 70.0, _SRC_SPLEEN),
        "Kidney_L": _uptake_washout(0.0175, 1.0, 52.0, _SRC_KIDNEY),
        "Kidney_R": _uptake_washout(0.0160, 1.0, 60.0, _SRC_KIDNEY),
        "Marrow_L2L4": Kinetics((0.0040, 0.00030), (1.5, 60.0), "bi-exponential (blood-based)", _SRC_MARROW),
        "Bladder": _uptake_washout(0.30, 1.5, 4.0, _SRC_BLADDER),
        "Tumor_1": _uptake_washout(0.0120, 3.0, 90.0, _SRC_TUMOUR),
        "Tumor_2": _uptake_washout(0.0055, 3.0, 100.0, _SRC_TUMOUR),
        "Tumor_3": _uptake_washout(0.00055, 3.0, 80.0, _SRC_TUMOUR),
        "Tumor_4": _uptake_washout(0.0027, 3.0, 85.0, _SRC_TUMOUR),
        "Tumor_5": _uptake_washout(0.0013, 3.0, 95.0, _SRC_TUMOUR),
    }


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


@dataclass
class TimePoint:
    """One imaging session: what was simulated and what the truth is."""

    index: int  # 0-based
    hours: float
    acquisition_start: datetime
    transform: np.ndarray  # 4x4 LPS, reference anatomy → scanner
    activity_bq: dict[str, float]  # true VOI activities at acquisition start
    decay_factor: float  # (1 - exp(-λT)) / (λT)
    expected_counts: np.ndarray  # blurred, noiseless reconstructed counts (float64)
    image: np.ndarray  # what is written: uint16 counts or float Bq/ml
    units: str
    projections: ProjectionSet | None = None  # camera="osem": the projections the image is reconstructed from

    @property
    def folder_name(self) -> str:
        return f"tp{self.index + 1}_{self.hours:03.0f}h"


@dataclass
class PhantomData:
    """The simulated study in memory (no files): truth plus the SPECT image of every time point."""

    settings: PhantomSettings
    spect_grid: Grid  # reference (first time point) SPECT grid
    ct_grid: Grid
    labels_spect: np.ndarray  # VOI labels at voxel centres of the reference SPECT grid
    tia_bqs: np.ndarray  # voxel TIA truth on the reference SPECT grid, Bq·s
    kinetics: dict[str, Kinetics]
    voi: dict[str, dict[str, Any]]  # volume_ml, mass_g, tia_bqs, residence_time_h, dose_led_gy ...
    timepoints: list[TimePoint]
    electron_energy_j: float

    @property
    def scale(self) -> float:
        return self.settings.anatomy_scale

    def whole_body_activity_bq(self, t_s: Any) -> Any:
        """Σ over VOIs of A(t): the torso's activity (Bq) at ``t_s`` seconds after injection."""
        return sum(k.activity_bq(t_s, self.settings.injected_activity_bq, self.scale) for k in self.kinetics.values())


def true_mu_per_cm(tissues: np.ndarray, energy_keV: float = 208.0) -> np.ndarray:
    """The true linear attenuation coefficient (1/cm, float32) of each tissue class (:data:`TISSUES`) at
    ``energy_keV``: its density × the mass attenuation coefficient of water (of ICRP cortical bone for cortical
    bone, of dry air for air), from xraylib.  At 208 keV Compton scattering dominates, so μ/ρ of soft tissues
    differs from water's by the electron density per gram only (≈ 1 %)."""
    import xraylib  # loads its data tables on import: only when a coefficient is computed

    ref = {"cortical_bone": "Bone, Cortical (ICRP)", "air": "Air, Dry (near sea level)"}
    lut = np.array(
        [
            rho * xraylib.CS_Total_CP(ref.get(name, "Water, Liquid"), energy_keV)
            for name, _hu, rho, _src in TISSUES.values()
        ],
        dtype=np.float32,
    )
    out: np.ndarray = lut[tissues]
    return out


def osem_counts(
    st: PhantomSettings,
    grid: Grid,
    activity_bq: np.ndarray,
    transform: np.ndarray,
    df: float,
    rng: np.random.Generator,
    *,
    ct: Volume,
    acquisition_start: datetime,
) -> tuple[np.ndarray, ProjectionSet]:
    """The ``camera="osem"`` image of one time point, in reconstructed counts (float; see the module docstring),
    and the projections it is reconstructed from.

    ``activity_bq``: Bq per voxel of ``grid`` (which carries the time point's Frame of Reference) at the start of
    the acquisition; ``df``: the decay factor during it; ``ct``: the time point's CT as written (HU).  The
    reconstruction is :func:`voxeldose.projections.reconstruct` of the projection set as it is written, so
    ``voxeldose recon`` on the written projections and CT gives the same image.
    """
    from . import recon

    acq = st.acquisition
    camera = recon.Camera(recon.collimator(st.collimator), sensitivity_cps_per_mbq=st.calibration_cps_per_mbq / 2)
    radius = max(st.orbit_radius_mm, st.spect_matrix * st.spect_voxel_mm / 2)
    orbit = recon.Orbit.circular(2 * acq.frames_in_rotation, radius, acq.frame_duration_ms / 1000.0)
    voxel = (st.spect_voxel_mm,) * 3
    mu_true = true_mu_per_cm(tissues_on(grid, settings=st, transform=transform), camera.energy_keV)
    expected = recon.project(activity_bq / grid.voxel_volume_ml * df, mu_true, voxel, orbit, camera)
    g = rng.poisson(expected) if st.poisson_noise else np.rint(expected)
    assert grid.frame_of_reference_uid is not None
    top = grid.index_to_world([0, 0, grid.shape[0] - 1])
    ps = ProjectionSet(
        counts=g.astype(np.float32),
        angles_deg=orbit.angles_deg,
        radius_mm=orbit.radius_mm,
        frame_duration_s=orbit.frame_duration_s,
        bin_mm=st.spect_voxel_mm,
        slice_mm=st.spect_voxel_mm,
        window=EnergyWindow(acq.energy_window_name, *acq.energy_window_keV),
        collimator=st.collimator,
        acquisition_start=acquisition_start,
        frame_of_reference_uid=grid.frame_of_reference_uid,
        image_position_mm=(float(top[0]), float(top[1]), float(top[2])),
        detectors=2,
        rotation_direction="CC",
        injection=Injection(st.radionuclide, st.injected_activity_bq, st.injection_datetime),
        identity=_projection_identity(st),
    )
    counts: np.ndarray = reconstruct(ps, ct, st.osem_iterations, st.osem_subsets).array
    return counts, ps  # the counts hold the decay during the acquisition, as the projections do


def _ct_volume(st: PhantomSettings, n: int, transform: np.ndarray, for_uid: str) -> Volume:
    """The CT (int16 HU with noise) of time point ``n`` as it is written."""
    cg = ct_grid(st, for_uid)
    rng = np.random.default_rng(np.random.SeedSequence([int(st.seed), 303, n]))
    hu = hu_on(cg, settings=st, transform=transform, rng=rng, noise_hu=st.ct_noise_hu)
    return Volume(hu, cg.affine, for_uid, "HU")


def _nm_series_description(st: PhantomSettings, hours: float) -> str:
    """``SPECT 177Lu 24h``; with the projection camera the reconstruction as vendors state it (≤ 64 characters),
    e.g. ``SPECT 177Lu 24h OSEM 4i8s AC RR SY-ME``."""
    text = f"SPECT 177Lu {hours:.0f}h"
    if st.camera == "osem":
        text += f" OSEM {st.osem_iterations}i{st.osem_subsets}s AC RR {st.collimator}"
    return text


def _projection_identity(st: PhantomSettings) -> CameraIdentity:
    """The camera that acquires the projections: :func:`camera_headers`' camera, before any reconstruction."""
    cam = camera_headers(st)
    return CameraIdentity(
        manufacturer=cam.manufacturer,
        model=cam.model,
        device_serial_number=cam.device_serial_number,
        collimator=cam.collimator,
        energy_window_kev=st.acquisition.energy_window_keV,
    )


def camera_headers(st: PhantomSettings) -> CameraHeaders:
    """The camera identity the SPECT states (the same for the patient and the calibration phantoms of one
    camera model, :mod:`voxeldose.calphantom`): a simulated camera; the collimator; the reconstruction (the
    Gaussian model with its FWHM, or OSEM iterations × subsets with attenuation correction and resolution
    recovery), so that a profile calibrated with one camera model never matches images of another."""
    if st.camera == "osem":
        recon = reconstruction_method(st.collimator, st.osem_iterations, st.osem_subsets)
    else:
        recon = f"Gaussian image model FWHM {st.fwhm_mm:g} mm"
    return CameraHeaders("voxeldose (simulated)", "synthetic SPECT/CT", "VD-SIM-0001", st.collimator, recon)


def _imaging_model(st: PhantomSettings) -> str | dict[str, Any]:
    """How the images were made, for truth.json."""
    if st.camera != "osem":
        return (
            "counts = Poisson(gaussian_blur(A_voxel[MBq], FWHM) * CF * T_acq * (1-exp(-lambda T))/(lambda T)); "
            "bqml = counts / (CF * T_acq * decay factor) / voxel ml * 1e6"
        )
    acq = st.acquisition
    return {
        "projections": "Poisson(project(A * decay factor, true mu at 208 keV, collimator response)), no scatter",
        "reconstruction": "OSEM, attenuation from the written CT resampled onto the SPECT grid (bilinear HU to mu), "
        "collimator response modelled (voxeldose.projections.reconstruct)",
        "projections_file": "dicom/tpN_HHHh/NM-PROJ/PROJECTIONS.dcm (NM TOMO, ORIGINAL\\PRIMARY\\TOMO)",
        "collimator": st.collimator,
        "views": 2 * acq.frames_in_rotation,
        "orbit_radius_mm": max(st.orbit_radius_mm, st.spect_matrix * st.spect_voxel_mm / 2),
        "sensitivity_per_head_cps_per_mbq": st.calibration_cps_per_mbq / 2,
        "iterations": st.osem_iterations,
        "subsets": st.osem_subsets,
        "counts": "reconstructed Bq * decay factor [MBq] * CF * T_acq",
    }


def _decay_during_acquisition(lam: float, t_acq: float) -> float:
    x = lam * t_acq
    return 1.0 if x == 0 else (1.0 - math.exp(-x)) / x


def simulate(settings: PhantomSettings | None = None) -> PhantomData:
    """Build the truth and the SPECT images of every time point (no files written)."""
    st = settings or PhantomSettings()
    if st.pixel_mode not in ("counts", "bqml"):
        raise ValueError(f"pixel_mode must be 'counts' or 'bqml', got {st.pixel_mode!r}")
    kin = default_kinetics()
    nuc = load(st.radionuclide)
    lam = nuc.decay_constant_per_s
    for name, k in kin.items():
        if any(th * 3600.0 > nuc.half_life_s * (1 + 1e-9) for th in k.effective_half_lives_h):
            raise ValueError(f"{name}: an effective half-life exceeds the physical half-life")
    a_inj, scale = st.injected_activity_bq, st.anatomy_scale
    e_e = electron_energy_per_decay_j(st.radionuclide)
    grid = spect_grid(st)
    cgrid = ct_grid(st)

    tia_voi = {n: k.tia_bqs(a_inj, scale) for n, k in kin.items()}
    tia_map, samp = voxel_sums(grid, tia_voi, settings=st, supersample=st.supersample)
    assert tia_map is not None
    voi: dict[str, dict[str, Any]] = {}
    for lab, name in VOI_NAMES.items():
        vol = float(samp.counts[lab] * samp.sub_volume_ml)
        mass = float(samp.mass_g[lab])
        tia = tia_voi[name]
        dose = tia * e_e / (mass / 1000.0) if mass > 0 else float("nan")
        voi[name] = {
            "label": lab,
            "volume_ml": vol,
            "mass_g": mass,
            "mean_density_g_per_ml": mass / vol if vol > 0 else float("nan"),
            "tia_bqs": tia,
            "residence_time_h": tia / a_inj / 3600.0,
            "dose_led_gy": dose,
            "dose_led_gy_per_gbq": dose / (a_inj / 1e9),
            "kinetics": kin[name].as_dict(),
        }
    # "Body" as a physicist contours it (the external outline): every labelled VOI together.
    body_mass = sum(v["mass_g"] for v in voi.values())
    body_tia = sum(v["tia_bqs"] for v in voi.values())
    body_dose = body_tia * e_e / (body_mass / 1000.0)
    voi["Body"] = {
        "label": None,
        "volume_ml": sum(v["volume_ml"] for v in voi.values()),
        "mass_g": body_mass,
        "mean_density_g_per_ml": body_mass / sum(v["volume_ml"] for v in voi.values()),
        "tia_bqs": body_tia,
        "residence_time_h": body_tia / a_inj / 3600.0,
        "dose_led_gy": body_dose,
        "dose_led_gy_per_gbq": body_dose / (a_inj / 1e9),
        "kinetics": {"model": "sum of all VOIs (external contour)"},
    }

    transforms = repositioning_transforms(st)
    t_acq = st.acquisition_duration_s
    df = _decay_during_acquisition(lam, t_acq)
    cf = st.calibration_cps_per_mbq
    sigma_vox = st.fwhm_mm / FWHM_PER_SIGMA / np.asarray(grid.spacing)[::-1]
    tps: list[TimePoint] = []
    for n, (h, tr) in enumerate(zip(st.hours, transforms)):
        t_s = h * 3600.0
        acts = {name: float(k.activity_bq(t_s, a_inj, scale)) for name, k in kin.items()}
        act_img, _ = voxel_sums(grid, acts, settings=st, supersample=st.imaging_supersample, transform=tr)
        assert act_img is not None
        rng = np.random.default_rng(np.random.SeedSequence([int(st.seed), 202, n]))
        counts: np.ndarray
        projections = None
        if st.camera == "osem":
            expected = act_img / 1e6 * cf * t_acq * df  # the truth in counts
            for_uid = _uid(st, "frame-of-reference", n)
            counts, projections = osem_counts(
                st,
                spect_grid(st, for_uid),
                act_img,
                tr,
                df,
                rng,
                ct=_ct_volume(st, n, tr, for_uid),
                acquisition_start=st.injection_datetime + timedelta(hours=float(h)),
            )
        else:
            if st.fwhm_mm > 0:
                blurred = gaussian_filter(act_img, sigma=sigma_vox, mode="constant", cval=0.0, truncate=4.0)
            else:  # ideal resolution (pipeline validation)
                blurred = act_img.copy()
            np.maximum(blurred, 0.0, out=blurred)
            expected = blurred / 1e6 * cf * t_acq * df
            counts = rng.poisson(expected) if st.poisson_noise else np.rint(expected).astype(np.int64)
        if counts.max() > 65535:
            raise ValueError(
                f"time point {n + 1} ({h} h): {counts.max()} counts in a voxel do not fit uint16; "
                "shorten the acquisition (frame_duration_ms) or lower the injected activity"
            )
        if st.pixel_mode == "counts":
            image: np.ndarray = np.rint(counts).astype(np.uint16)
            units = "counts"
        else:
            image = counts / (cf * t_acq * df) / grid.voxel_volume_ml * 1e6  # Bq/ml at acq. start
            units = "Bq/ml"
        tps.append(
            TimePoint(
                index=n,
                hours=float(h),
                acquisition_start=st.injection_datetime + timedelta(hours=float(h)),
                transform=tr,
                activity_bq=acts,
                decay_factor=df,
                expected_counts=expected,
                image=image,
                units=units,
                projections=projections,
            )
        )
    return PhantomData(
        settings=st,
        spect_grid=grid,
        ct_grid=cgrid,
        labels_spect=labels_on(grid, settings=st),
        tia_bqs=tia_map,
        kinetics=kin,
        voi=voi,
        timepoints=tps,
        electron_energy_j=e_e,
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomManifest:
    """What :func:`write_phantom` wrote."""

    out_dir: Path
    readme: Path
    truth_json: Path
    tia_npy: Path
    labels_npy: Path
    nm_files: tuple[Path, ...]
    ct_folders: tuple[Path, ...]
    rtstruct: Path
    seg: Path
    study_instance_uids: tuple[str, ...]
    frame_of_reference_uids: tuple[str, ...]
    nm_series_uids: tuple[str, ...]
    ct_series_uids: tuple[str, ...]
    rtstruct_series_uid: str
    seg_series_uid: str
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)
    #: ``camera="osem"``: the NM TOMO projections of each time point (``dicom/tpN_HHHh/NM-PROJ/PROJECTIONS.dcm``).
    projection_files: tuple[Path, ...] = ()


_UID_NAMESPACE = uuid.UUID("5f0c2a7e-3b1d-5c44-9e2a-6d1b7c0f4a11")


def _uid(st: PhantomSettings, *parts: object) -> str:
    """A deterministic UID: ``2.25.<name-based UUID (v5) as integer>`` (PS3.5 B.2, ISO/IEC 9834-8).

    The name is the settings fingerprint (seed included) plus ``parts``.  (``pydicom``'s
    ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and is random, hence this.)
    """
    name = "/".join(["voxeldose.phantom", st.fingerprint(), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, datetime):
        return x.isoformat()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


_README = """\
voxeldose synthetic patient ("PHANTOM^LU177") -- demo data and ground truth
============================================================================

A torso made of analytic shapes, given [177Lu]Lu-DOTATATE kinetics from the literature and
imaged by quantitative SPECT/CT at {n} time points ({hours} h after injection of {mbq:.0f} MBq on
{inj}).  Generated by voxeldose.phantom.write_phantom (seed {seed}); the same settings give the
same images.  THIS IS NOT PATIENT DATA.

dicom/tpN_HHHh/NM/SPECT.dcm   reconstructed SPECT (NM multi-frame), pixel mode "{mode}"
dicom/tpN_HHHh/CT/*.dcm       CT of the same session (same Frame of Reference as its SPECT)
dicom/tpN_HHHh/NM-PROJ/       camera "osem" only: the SPECT's projections (NM TOMO), as acquired
dicom/RTSTRUCT.dcm, SEG.dcm   VOIs on the first time point's CT
truth/truth.json              settings, calibration ({cf} cps/MBq, {tacq:.0f} s per SPECT), per time
                              point activities and repositioning transforms, per VOI kinetics with
                              sources, volume, mass, TIA, residence time, LED dose (Gy, Gy/GBq)
truth/tia_bqs.npy             voxel TIA truth (Bq*s, float64, [k, j, i]) on the first SPECT grid
truth/labels_spect.npy        VOI labels on the same grid (label -> name in truth.json)
truth/reference_dose_gy.npy   the pipeline's dose kernel on that TIA (Gy, float32); per VOI mean in
                              truth.json reference_dose: what a perfect imaging chain would report

Each imaging session is its own DICOM study (as in the clinic); all share the patient and the
Radiopharmaceutical Information (injection date/time and activity), so they group into one cycle.
Simplifications: uniform activity per VOI, {camera_simplification}, torso only, LED dose ignores
photons and cross-fire.
"""

_CAMERA_SIMPLIFICATIONS = {
    "gaussian": "Gaussian resolution, Poisson noise per voxel (real\nreconstruction noise is correlated)",
    "osem": "projections without scatter (attenuation and collimator\nresponse only), reconstructed by OSEM "
    "(truth.json: imaging_model)",
}


def write_phantom(out_dir: str | Path, settings: PhantomSettings | None = None) -> PhantomManifest:
    """Simulate the patient and write DICOM, truth files and a README under ``out_dir``.

    Study model: one StudyInstanceUID per imaging session (time point), as a clinic's PACS would
    hold them; the SPECT and CT of a session share a FrameOfReferenceUID (hybrid SPECT/CT), each
    session its own.  RTSTRUCT and SEG belong to the first session's study and reference its CT.
    UIDs are name-based (UUID v5 of the settings fingerprint, seed included), so the same settings
    give the same Study/Series/Frame-of-Reference/NM-instance UIDs (the CT and SEG/RTSTRUCT writers
    draw their own SOP Instance UIDs).
    """
    st = settings or PhantomSettings()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    dcm = out / "dicom"
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    dcm.mkdir(parents=True, exist_ok=True)

    data = simulate(st)
    timings["simulate"] = time.perf_counter() - t0
    injection = Injection(st.radionuclide, st.injected_activity_bq, st.injection_datetime)
    t_acq = st.acquisition_duration_s

    study_uids, for_uids, nm_uids, ct_uids = [], [], [], []
    nm_files, ct_folders = [], []
    projection_files: list[Path] = []
    ref_ct: list[Any] = []
    ref_ctx: PatientStudy | None = None
    tp_truth = []
    t_ct = 0.0
    for tp in data.timepoints:
        n = tp.index
        study_uid = _uid(st, "study", n)
        for_uid = _uid(st, "frame-of-reference", n)
        nm_uid = _uid(st, "series", "NM", n)
        ct_uid = _uid(st, "series", "CT", n)
        ctx = PatientStudy(
            patient_id=st.patient_id,
            patient_name=st.patient_name,
            patient_birth_date=st.patient_birth_date,
            patient_sex=st.patient_sex,
            study_instance_uid=study_uid,
            study_datetime=tp.acquisition_start,
            study_id=str(n + 1),
            accession_number=f"VDPH{st.seed % 10000:04d}{n + 1}",
            study_description=f"Post-therapy 177Lu SPECT/CT day {tp.hours / 24:.1f} (phantom)",
            patient_weight_kg=st.patient_weight_kg,
            patient_size_m=st.patient_size_m,
        )
        folder = dcm / tp.folder_name
        nm_path = folder / "NM" / "SPECT.dcm"
        grid = spect_grid(st, for_uid)
        write_nm_tomo(
            nm_path,
            Volume(tp.image, grid.affine, for_uid, tp.units),
            ctx=ctx,
            series=SeriesInfo(nm_uid, 1, _nm_series_description(st, tp.hours), for_uid, tp.acquisition_start),
            injection=injection,
            acquisition=st.acquisition,
            pixel_mode=st.pixel_mode,
            sop_instance_uid=_uid(st, "sop", "NM", n),
            camera=camera_headers(st),
        )
        if tp.projections is not None:  # the acquisition the reconstruction was made from, as its own series
            proj_path = folder / "NM-PROJ" / "PROJECTIONS.dcm"
            write_projections(
                proj_path,
                tp.projections,
                ctx=ctx,
                series=SeriesInfo(
                    _uid(st, "series", "NM-PROJ", n),
                    10,
                    f"SPECT 177Lu {tp.hours:.0f}h projections {st.collimator}",
                    for_uid,
                    tp.acquisition_start,
                ),
                sop_instance_uid=_uid(st, "sop", "NM-PROJ", n),
            )
            projection_files.append(proj_path)
        t1 = time.perf_counter()
        ct_time = tp.acquisition_start + timedelta(seconds=t_acq)  # CT after the SPECT
        ct_ds = write_ct_series(
            folder / "CT",
            _ct_volume(st, n, tp.transform, for_uid),
            ctx=ctx,
            series=SeriesInfo(ct_uid, 2, f"CT for SPECT {tp.hours:.0f}h", for_uid, ct_time),
        )
        t_ct += time.perf_counter() - t1
        if n == 0:
            ref_ct, ref_ctx = ct_ds, ctx
        study_uids.append(study_uid)
        for_uids.append(for_uid)
        nm_uids.append(nm_uid)
        ct_uids.append(ct_uid)
        nm_files.append(nm_path)
        ct_folders.append(folder / "CT")
        tp_truth.append(
            {
                "index": n + 1,
                "hours_after_injection": tp.hours,
                "acquisition_start": tp.acquisition_start.isoformat(),
                "acquisition_duration_s": t_acq,
                "decay_during_acquisition_factor": tp.decay_factor,
                "folder": f"dicom/{tp.folder_name}",
                "study_instance_uid": study_uid,
                "frame_of_reference_uid": for_uid,
                "nm_series_uid": nm_uid,
                "ct_series_uid": ct_uid,
                "transform_lps_4x4": tp.transform.tolist(),
                "transform_meaning": "reference-anatomy point q (first time point) -> scanner point T q",
                "activity_bq_at_acquisition_start": tp.activity_bq,
                "torso_activity_bq": float(sum(tp.activity_bq.values())),
                "expected_total_counts": float(tp.expected_counts.sum()),
            }
        )
    timings["nm_ct"] = time.perf_counter() - t0 - timings["simulate"]
    timings["ct_only"] = t_ct

    # VOIs on the reference CT
    t2 = time.perf_counter()
    assert ref_ctx is not None
    cg0 = ct_grid(st, for_uids[0])
    lab_ct = labels_on(cg0, settings=st)
    names = [nm for lab, nm in VOI_NAMES.items() if nm != "Remainder"]
    masks = {nm: lab_ct == _LABEL[nm] for nm in names}
    if st.body_in_structures:
        masks["Body"] = lab_ct > 0
    rt_uid = _uid(st, "series", "RTSTRUCT")
    seg_uid = _uid(st, "series", "SEG")
    when = data.timepoints[0].acquisition_start + timedelta(seconds=t_acq + 600)
    rt_path, seg_path = dcm / "RTSTRUCT.dcm", dcm / "SEG.dcm"
    write_rtstruct(
        rt_path,
        {nm: contours_from_mask(m, cg0.affine) for nm, m in masks.items()},
        ctx=ref_ctx,
        series=SeriesInfo(rt_uid, 3, "Phantom VOIs (truth)", for_uids[0], when),
        referenced_ct=ref_ct,
    )
    write_seg(
        seg_path,
        masks,
        ctx=ref_ctx,
        series=SeriesInfo(seg_uid, 4, "Phantom VOIs (truth)", for_uids[0], when),
        referenced_ct=ref_ct,
    )
    timings["rtstruct_seg"] = time.perf_counter() - t2

    # truth
    g = data.spect_grid
    np.save(truth_dir / "tia_bqs.npy", data.tia_bqs.astype(np.float64))
    np.save(truth_dir / "labels_spect.npy", data.labels_spect)
    truth = {
        "description": "voxeldose synthetic patient: ground truth (see README.txt)",
        "settings": _jsonable(dataclasses.asdict(st)),
        "settings_fingerprint": st.fingerprint(),
        "radionuclide": st.radionuclide,
        "half_life_s": load(st.radionuclide).half_life_s,
        "injection": {
            "datetime": st.injection_datetime.isoformat(),
            "activity_bq": st.injected_activity_bq,
            "radiopharmaceutical": injection.radiopharmaceutical,
        },
        "calibration_cps_per_mbq": st.calibration_cps_per_mbq,
        "calibration_source": "Santoro et al. 2018, EJNMMI Res 8:103 (177Lu SPECT/CT, 5.67 cps/MBq)",
        "acquisition": {
            "frame_duration_ms": st.acquisition.frame_duration_ms,
            "frames_in_rotation": st.acquisition.frames_in_rotation,
            "angular_step_deg": st.acquisition.angular_step_deg,
            "energy_window_keV": list(st.acquisition.energy_window_keV),
            "duration_s": t_acq,
        },
        "imaging_model": _imaging_model(st),
        "camera": st.camera,
        "fwhm_mm": st.fwhm_mm,
        "reference_spect_grid": {
            "shape_kji": list(g.shape),
            "affine": g.affine.tolist(),
            "frame_of_reference_uid": for_uids[0],
        },
        "reference_ct_grid": {
            "shape_kji": list(cg0.shape),
            "affine": cg0.affine.tolist(),
            "frame_of_reference_uid": for_uids[0],
        },
        "labels": {str(k): v for k, v in VOI_NAMES.items()},
        "tissues": {
            str(k): {"name": v[0], "hu": v[1], "density_g_per_ml": v[2], "source": v[3]} for k, v in TISSUES.items()
        },
        "electron_energy_per_decay_j": data.electron_energy_j,
        "electron_energy_per_decay_kev": data.electron_energy_j / (J_PER_MEV * 1e-3),
        "dose_method": (
            "LED: D = TIA * E_e / m, E_e = ICRP-107 mean electron energy per decay (beta- + IE + Auger); "
            "photons (~35 keV/decay) and cross-fire ignored; m = supersampled volume x tissue density"
        ),
        "tia_map": {"file": "tia_bqs.npy", "units": "Bq.s", "sum_bqs": float(data.tia_bqs.sum())},
        "voi": data.voi,
        "timepoints": tp_truth,
        "rtstruct": {"file": "dicom/RTSTRUCT.dcm", "series_uid": rt_uid},
        "seg": {"file": "dicom/SEG.dcm", "series_uid": seg_uid},
        "study_model": "one StudyInstanceUID per imaging session (time point)",
    }
    truth["reference_dose"] = write_reference_dose(
        truth_dir,
        data.tia_bqs,
        g,
        nuclide=st.radionuclide,
        labeller=partial(labels_on, settings=st),
        label_names=VOI_NAMES,
        supersample=st.supersample,
    )
    (truth_dir / "truth.json").write_text(json.dumps(_jsonable(truth), indent=2))
    readme = out / "README.txt"
    readme.write_text(
        _README.format(
            n=len(st.hours),
            hours=", ".join(f"{h:g}" for h in st.hours),
            mbq=st.injected_activity_bq / 1e6,
            inj=st.injection_datetime.isoformat(sep=" "),
            seed=st.seed,
            mode=st.pixel_mode,
            cf=st.calibration_cps_per_mbq,
            tacq=t_acq,
            camera_simplification=_CAMERA_SIMPLIFICATIONS[st.camera],
        )
    )
    timings["total"] = time.perf_counter() - t0
    return PhantomManifest(
        out_dir=out,
        readme=readme,
        truth_json=truth_dir / "truth.json",
        tia_npy=truth_dir / "tia_bqs.npy",
        labels_npy=truth_dir / "labels_spect.npy",
        nm_files=tuple(nm_files),
        ct_folders=tuple(ct_folders),
        rtstruct=rt_path,
        seg=seg_path,
        study_instance_uids=tuple(study_uids),
        frame_of_reference_uids=tuple(for_uids),
        nm_series_uids=tuple(nm_uids),
        ct_series_uids=tuple(ct_uids),
        rtstruct_series_uid=rt_uid,
        seg_series_uid=seg_uid,
        timings_s=timings,
        projection_files=tuple(projection_files),
    )
