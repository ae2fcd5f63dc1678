"""Quantitative SPECT from projections: a camera's forward model and OSEM, with PyTomography.

Model
-----
A parallel-hole camera rotating about the slice axis records, in view ``v`` at angle θ_v, the expected counts

.. math::

    \\bar g_v(r, z) = S\\,t_v \\sum_{x} A(x, y, z)\\; e^{-\\int_x^{\\rm det} \\mu\\,dl}\\; * \\;{\\rm PSF}_{d(x)}(r, z)

— the activity ``A`` (MBq) of every voxel times the planar sensitivity ``S`` (counts per second per MBq that one
detector head records from a point source in air, in the photopeak window) and the frame duration ``t_v``,
attenuated along its path to the detector (narrow-beam μ at the photopeak energy) and blurred by the
collimator–detector response for its distance ``d`` from the collimator face (a 2-D Gaussian whose FWHM is
:meth:`Collimator.fwhm_mm`).  Scatter is not modelled (its counts would have to be added as an additive term).
PyTomography's rotate-and-sum projector (Barrett & Myers, "Foundations of Image Science", 2004, ch. 17; the
``SPECTSystemMatrix`` of Polson et al., "PyTomography: A python library for medical image reconstruction",
SoftwareX 29 (2025) 102020) applies exactly this.

:func:`reconstruct_osem` inverts it with OSEM (Hudson & Larkin 1994, IEEE TMI 13:601) on the Poisson likelihood,
with the same attenuation and resolution models, and divides by ``S·t_v`` and the voxel volume: Bq/ml at the
start of the acquisition, before decay correction.  OSEM keeps the total counts: after every full MLEM iteration
the forward projection of the estimate sums to the measured counts (Shepp & Vardi 1982, IEEE TMI 1:113), so the
reconstructed total activity is the truth within the Poisson statistics of the counts, whatever the iteration
number; what the few clinical iterations do not recover is resolution (partial-volume loss, Gibbs ringing at edges).

Arrays and units
----------------
Volumes are indexed ``[k, j, i]`` (slice, row, column) like :class:`~voxeldose.geometry.Volume` arrays: the
rotation axis is the slice axis through the centre of the (square) transverse grid.  Projections are
``[view, slice, bin]``.  Voxel spacings are mm, μ is 1/cm (the unit of attenuation maps), activity Bq/ml.
In PyTomography's object axes ``x = i`` (columns), ``y = j`` (rows), ``z = k``; view ``v`` at angle θ puts a
source at ``(x, y)`` into radial bin ``r = x cos θ − y sin θ`` (PyTomography's convention, measured; mapping
to the DICOM Detector Information Sequence is the projection reader's business).

PyTomography (``pip install 'voxeldose[recon]'``) and torch are imported here only, lazily: nothing else in
voxeldose needs them.  Its quirks handled here: lengths are cm; ``import pytomography`` prints a line when it
finds no GPU and sets ``warnings.simplefilter("ignore")`` for the whole process (both undone); it works on CUDA by
itself when torch sees a GPU (``pytomography.device``; :func:`torch_device` sets it from ``VOXELDOSE_DEVICE`` instead, the
dose engine's switch); the μ-map is rotated anew for every view (≈ 2/3 of the
projector's time on a CPU).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .backend import ENV_VAR
from .errors import VoxeldoseError
from .geometry import FWHM_PER_SIGMA

__all__ = [
    "COLLIMATORS",
    "CT_EFFECTIVE_ENERGY_KEV",
    "SOFT_TISSUE_MAX_HU",
    "LU177_PHOTOPEAK_KEV",
    "Camera",
    "Collimator",
    "Orbit",
    "hu_to_mu_per_cm",
    "mu_per_cm",
    "project",
    "reconstruct_osem",
    "torch_device",
]

FloatArray = NDArray[np.float32]

#: The 208.4 keV γ line of 177Lu (ENSDF / DDEP; 10.4 % per decay) that quantitative 177Lu SPECT images.
LU177_PHOTOPEAK_KEV = 208.0

#: Effective photon energy (keV) of a clinical CT beam (120 kVp, after the patient's own filtering), used to
#: place cortical bone on the HU axis in :func:`hu_to_mu_per_cm`.  Judgment: 70 keV is the figure commonly
#: used for 120–140 kVp beams in CT-based attenuation correction (e.g. Kinahan et al. 1998, Med. Phys.
#: 25:2046); PyTomography's ``from_cortical_bone_fit`` estimates it from the CT's bone peak instead.
CT_EFFECTIVE_ENERGY_KEV = 70.0

_WATER = "Water, Liquid"
_CORTICAL_BONE = "Bone, Cortical (ICRP)"
_AIR = "Air, Dry (near sea level)"


# --------------------------------------------------------------------------------------------
# Attenuation: μ from NIST compositions (xraylib) and from CT numbers
# --------------------------------------------------------------------------------------------


@cache
def mu_per_cm(material: str, energy_keV: float = LU177_PHOTOPEAK_KEV) -> float:
    """Narrow-beam linear attenuation coefficient (1/cm, coherent scattering included) of a NIST compound
    (xraylib's name, e.g. ``"Water, Liquid"``) or an element symbol (``"Pb"``) at its reference density.

    Water at 208 keV: 0.1352 /cm; lead: 10.33 /cm (Hubbell & Seltzer's NIST tables, log–log between 200 and
    300 keV: 0.1351 and 10.38 /cm).
    """
    import xraylib  # loads its data tables on import: only when a coefficient is computed

    if material in _ELEMENTS:
        z = _ELEMENTS[material]
        return float(xraylib.CS_Total(z, energy_keV) * xraylib.ElementDensity(z))
    try:
        rho = float(xraylib.GetCompoundDataNISTByName(material)["density"])
    except ValueError as exc:
        raise VoxeldoseError(
            f"no NIST composition named {material!r} in xraylib", tag="material", found=material
        ) from exc
    return float(xraylib.CS_Total_CP(material, energy_keV) * rho)


_ELEMENTS = {"Pb": 82, "W": 74}


#: Upper CT number (HU) of soft tissues: Schneider et al. 2000 (Phys. Med. Biol. 45:459, Table 2 and the
#: segments of :data:`voxeldose.dose.SCHNEIDER_2000`) put the soft-tissue range below 100 HU and bone-like mixtures
#: above it.  :func:`hu_to_mu_per_cm` scales μ like water's up to here.
SOFT_TISSUE_MAX_HU = 100.0


def hu_to_mu_per_cm(
    hu: NDArray[Any] | float,
    energy_keV: float = LU177_PHOTOPEAK_KEV,
    ct_effective_energy_keV: float = CT_EFFECTIVE_ENERGY_KEV,
) -> FloatArray:
    """μ (1/cm) at ``energy_keV`` from CT numbers: air–water–soft tissue scaled like water, bone as a water–bone mix.

    A CT number is ``H = 1000 (μ_CT − μ_w,CT) / (μ_w,CT − μ_air,CT)`` at the CT's effective energy.

    * ``H ≤ 100`` (:data:`SOFT_TISSUE_MAX_HU`): ``μ = μ_w + (H/1000)(μ_w − μ_air)`` — exact at air (−1000) and water
      (0).  Lung, fat and soft tissues have water's effective atomic number closely enough that their CT number
      measures their electron density relative to water, and at the photopeak (Compton-dominated) μ is proportional
      to it.  The classic bilinear model (Blankespoor et al. 1996, IEEE TNS 43:2263; Kinahan et al. 1998, Med. Phys.
      25:2046; Brown et al. 2008, Appl. Radiat. Isot. 66:1206) breaks at 0 HU and gives soft tissue the bone
      slope, which under-estimates μ of muscle, liver and kidney (40–60 HU) by 1–3 %; the break at the top of the
      soft-tissue range is the one of Carney et al. 2006 (Med. Phys. 33:976) in kind.  Caveat: iodinated contrast
      raises the CT number with little effect at 208 keV, so contrast-enhanced tissue below 100 HU gets a μ up to
      ~6 % high (post-therapy SPECT/CT is acquired without contrast).
    * ``H > 100``: linear from the soft-tissue top to cortical bone (ICRP, 1.85 g/cm³) at its CT number ``H_b`` at
      ``ct_effective_energy_keV`` (≈ 1450 HU at 70 keV): a mixture of soft tissue and bone by volume.

    All μ are xraylib's (:func:`mu_per_cm`).  Values below −1000 HU (CT padding) give μ_air.  The dose engine's
    HU → *mass density* (``dose.hu_to_density``, Schneider et al. 2000) is a different calibration for a
    different quantity: it maps 0 HU to 1.018 g/cm³ (a soft-tissue fit), where attenuation must be water's.
    """
    mu_w, mu_b, mu_a = (mu_per_cm(m, energy_keV) for m in (_WATER, _CORTICAL_BONE, _AIR))
    ct_w, ct_b, ct_a = (mu_per_cm(m, ct_effective_energy_keV) for m in (_WATER, _CORTICAL_BONE, _AIR))
    hu_bone = 1000.0 * (ct_b - ct_w) / (ct_w - ct_a)
    h = np.maximum(np.asarray(hu, dtype=np.float64), -1000.0)
    h_soft = SOFT_TISSUE_MAX_HU
    mu_soft = mu_w + h_soft / 1000.0 * (mu_w - mu_a)
    mu = np.where(
        h <= h_soft,
        mu_w + h / 1000.0 * (mu_w - mu_a),
        mu_soft + (h - h_soft) * (mu_b - mu_soft) / (hu_bone - h_soft),
    )
    return mu.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Collimators and the camera
# --------------------------------------------------------------------------------------------

#: Where the collimator figures come from.
_SIMIND = (
    "SIMIND collimator database collim.col (M. Ljungberg, Lund University), as bundled with PyTomography 3.4.0 "
    "(pytomography/data/collim.col), code {code}"
)


@dataclass(frozen=True)
class Collimator:
    """A parallel-hole collimator: hole diameter, septal thickness and hole length (mm), with their source.

    Geometric resolution (Cherry, Sorenson & Phelps, "Physics in Nuclear Medicine", 4th ed. 2012, ch. 14,
    eqs. 14-5 and 14-6) at distance ``b`` from the collimator face:

    ``R_g = d (L_eff + b) / L_eff``,  ``L_eff = L − 2/μ``

    with μ the septal material's (lead's) linear attenuation coefficient at the photon energy: penetration
    near the hole edges lengthens the apparent hole.  The system FWHM adds the intrinsic resolution in
    quadrature, ``R = sqrt(R_g² + R_i²)``.  The response is modelled as a Gaussian of that FWHM (septal
    penetration tails and scatter in the collimator are not modelled).
    """

    code: str
    description: str
    hole_diameter_mm: float
    septal_thickness_mm: float
    hole_length_mm: float
    source: str
    material: str = "Pb"

    def effective_length_mm(self, energy_keV: float = LU177_PHOTOPEAK_KEV) -> float:
        """``L_eff = L − 2/μ`` (mm)."""
        return self.hole_length_mm - 2.0 * 10.0 / mu_per_cm(self.material, energy_keV)

    def fwhm_mm(
        self, distance_mm: float | NDArray[Any], energy_keV: float = LU177_PHOTOPEAK_KEV, intrinsic_fwhm_mm: float = 0.0
    ) -> NDArray[np.float64]:
        """System FWHM (mm) at ``distance_mm`` from the collimator face (see the class docstring)."""
        l_eff = self.effective_length_mm(energy_keV)
        geometric = self.hole_diameter_mm * (l_eff + np.asarray(distance_mm, dtype=np.float64)) / l_eff
        return np.sqrt(geometric**2 + intrinsic_fwhm_mm**2)


def _simind(code: str, description: str, d_cm: float, septa_cm: float, length_cm: float) -> Collimator:
    return Collimator(code, description, 10.0 * d_cm, 10.0 * septa_cm, 10.0 * length_cm, _SIMIND.format(code=code))


#: Common medium-energy collimators used for 177Lu (208 keV), by SIMIND code (hexagonal holes; the figures are
#: SIMIND's, in cm there: diameter, septa, length).
COLLIMATORS: dict[str, Collimator] = {
    c.code: c
    for c in (
        _simind("SY-ME", "Siemens Symbia medium energy (MELP)", 0.294, 0.114, 4.064),
        _simind("GI-MEGP", "GE Infinia medium energy general purpose", 0.300, 0.105, 5.800),
        _simind("G8-MEGP", "GE Discovery NM/CT 870 DR medium energy", 0.350, 0.105, 5.800),
        _simind("PB-MEGP", "Philips BrightView medium energy general purpose", 0.340, 0.086, 5.840),
        _simind("ME-MEGP", "Mediso Nucline SPIRIT DH-V medium energy general purpose", 0.250, 0.120, 3.500),
    )
}


def collimator(code: str) -> Collimator:
    """The collimator with SIMIND code ``code`` (exact, case-insensitive), or a :class:`VoxeldoseError`."""
    try:
        return COLLIMATORS[code.upper()]
    except KeyError:
        raise VoxeldoseError(
            f"unknown collimator {code!r}", tag="collimator", expected=", ".join(COLLIMATORS), found=code
        ) from None


@dataclass(frozen=True)
class Camera:
    """The detector side of the model: collimator, photopeak energy, intrinsic resolution, sensitivity.

    ``sensitivity_cps_per_mbq`` is the planar sensitivity of one head: counts per second in the photopeak
    window per MBq of a point source in air (NEMA NU 1 style), the same for every view.
    ``intrinsic_fwhm_mm`` is the crystal's resolution at the photopeak energy (default 0: collimator only).
    """

    collimator: Collimator
    sensitivity_cps_per_mbq: float
    energy_keV: float = LU177_PHOTOPEAK_KEV
    intrinsic_fwhm_mm: float = 0.0


@dataclass(frozen=True)
class Orbit:
    """Views of one acquisition: angles (degrees), collimator-face distance from the rotation axis (mm) per
    view, and the time per view (s)."""

    angles_deg: tuple[float, ...]
    radius_mm: tuple[float, ...]
    frame_duration_s: float

    @classmethod
    def circular(
        cls, n_views: int, radius_mm: float, frame_duration_s: float, start_deg: float = 0.0, arc_deg: float = 360.0
    ) -> Orbit:
        """``n_views`` equally spaced over ``arc_deg`` (the 360° of a dual-head camera's full rotation)."""
        step = arc_deg / n_views
        return cls(tuple(start_deg + step * v for v in range(n_views)), (float(radius_mm),) * n_views, frame_duration_s)


# --------------------------------------------------------------------------------------------
# PyTomography
# --------------------------------------------------------------------------------------------


@cache
def _pytomography() -> ModuleType:
    """``import pytomography`` (and torch), with its import-time print and global warning filter undone."""
    try:
        # catch_warnings restores the filters that the import replaces with simplefilter("ignore")
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            import pytomography
            import torch  # noqa: F401 - pytomography imports it; named here so that its absence reads the same
    except ImportError as exc:
        raise VoxeldoseError(
            f"SPECT reconstruction needs the optional 'recon' extra (PyTomography and PyTorch): {exc}",
            tag="recon",
            expected="pip install 'voxeldose[recon]'",
        ) from exc
    module: ModuleType = pytomography
    return module


def torch_device() -> str:
    """The torch device reconstruction and projection run on, from ``VOXELDOSE_DEVICE`` (the dose engine's switch,
    :mod:`voxeldose.backend`), and set as PyTomography's (``pytomography.set_device``):

    * ``cpu`` — ``"cpu"``;
    * ``gpu`` — ``"cuda"`` when torch sees a CUDA device, else :class:`VoxeldoseError` naming the variable (a job
      that asked for the GPU must not silently take minutes per time point on the CPU);
    * ``auto`` (default, also when unset) — ``"cuda"`` when torch sees one, else ``"cpu"`` (never Apple's ``mps``,
      which PyTomography calls experimental).

    Torch's CUDA build and the GPU are independent of CuPy's: the dose engine may compute on the CPU while
    reconstruction uses the GPU, or the reverse.
    """
    ptm = _pytomography()
    import torch

    want = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if want not in ("cpu", "gpu", "auto"):
        raise VoxeldoseError(
            f"environment variable {ENV_VAR} has an unknown value",
            tag=ENV_VAR,
            expected="'cpu', 'gpu' or 'auto'",
            found=want,
        )
    cuda = want != "cpu" and bool(torch.cuda.is_available())
    if want == "gpu" and not cuda:
        raise VoxeldoseError(
            f"{ENV_VAR}=gpu asks for the GPU, but torch sees no CUDA device (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'none'}); unset {ENV_VAR} or set it to 'auto' or 'cpu' to "
            "reconstruct on the CPU",
            tag=ENV_VAR,
            expected="torch's CUDA build and a working CUDA device and driver",
            found="gpu",
        )
    device = "cuda" if cuda else "cpu"
    ptm.set_device(device)
    return device


def _system_matrix(mu: FloatArray, voxel_mm: Sequence[float], orbit: Orbit, camera: Camera) -> Any:
    """PyTomography's SPECT system matrix with attenuation and distance-dependent resolution."""
    ptm = _pytomography()
    import torch
    from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta, SPECTPSFMeta
    from pytomography.projectors.SPECT import SPECTSystemMatrix
    from pytomography.transforms.SPECT import SPECTPSFTransform

    nz, ny, nx = mu.shape
    dz, dy, dx = (float(s) / 10.0 for s in voxel_mm)  # cm
    object_meta = SPECTObjectMeta((dx, dy, dz), (nx, ny, nz))
    radii_cm = np.asarray(orbit.radius_mm, dtype=np.float64) / 10.0
    proj_meta = SPECTProjMeta((nx, nz), (dx, dz), np.asarray(orbit.angles_deg, dtype=np.float64), radii=radii_cm)
    # σ(d) in cm: the collimator's FWHM(d) (Collimator.fwhm_mm), as PyTomography's sigma_fit(r, *params)
    col = camera.collimator
    slope = col.hole_diameter_mm / col.effective_length_mm(camera.energy_keV) / FWHM_PER_SIGMA
    params = (slope, col.hole_diameter_mm / 10.0 / FWHM_PER_SIGMA, camera.intrinsic_fwhm_mm / 10.0 / FWHM_PER_SIGMA)
    psf_meta = SPECTPSFMeta(params, sigma_fit=_sigma_fit, min_sigmas=3)
    mu_t = torch.as_tensor(np.ascontiguousarray(mu.transpose(2, 1, 0)), dtype=ptm.dtype)
    attenuation = _cached_attenuation_class()(attenuation_map=mu_t)
    transforms = [attenuation, SPECTPSFTransform(psf_meta)]
    return SPECTSystemMatrix(transforms, [], object_meta, proj_meta)


#: Most memory (bytes) that the per-view detection-probability maps of one system matrix may take; above it they are
#: recomputed for every projection as PyTomography does.  128 × 128 × 96 voxels and 120 views take 1.5 GB.
ATTENUATION_CACHE_MAX_BYTES = 3 * 2**30


@cache
def _cached_attenuation_class() -> type:
    """PyTomography's ``SPECTAttenuationTransform`` that computes each view's probability of detection
    ``exp(−∫μ dl)`` once and keeps it.

    PyTomography recomputes it at every forward and back projection (rotate the padded μ-map, cumulative sum,
    exponential): on a CPU about 30 % of a projector call on the default grid, repeated 2 × iterations times per
    view by OSEM.  The map depends only on μ and the view, so keeping it gives the same numbers (up to float
    round-off order; a test checks this) for memory :data:`ATTENUATION_CACHE_MAX_BYTES` at most.
    """
    _pytomography()
    import torch
    from pytomography.transforms.SPECT import SPECTAttenuationTransform
    from pytomography.transforms.SPECT.attenuation import get_prob_of_detection_matrix
    from pytomography.utils import pad_object, rotate_detector_z

    class CachedAttenuationTransform(SPECTAttenuationTransform):  # type: ignore[misc]  # PyTomography is untyped
        _factors: dict[int, torch.Tensor]

        def configure(self, object_meta: Any, proj_meta: Any) -> None:
            super().configure(object_meta, proj_meta)
            self._factors = {}
            padded = pad_object(self.attenuation_map) if self.assume_padded else self.attenuation_map
            self._padded = padded
            per_view = padded.numel() * padded.element_size()
            self._keep = per_view * len(proj_meta.angles) <= ATTENUATION_CACHE_MAX_BYTES

        def _factor(self, ang_idx: Any) -> torch.Tensor:
            key = int(ang_idx)
            factor = self._factors.get(key)
            if factor is None:
                factor = get_prob_of_detection_matrix(
                    rotate_detector_z(self._padded, self.proj_meta.angles[ang_idx]), self.object_meta.dx
                )
                if self._keep:
                    self._factors[key] = factor
            return factor

        def forward(self, object_i: torch.Tensor, ang_idx: Any) -> torch.Tensor:
            return object_i * self._factor(ang_idx)

        def backward(self, object_i: torch.Tensor, ang_idx: Any) -> torch.Tensor:
            return object_i * self._factor(ang_idx)

    return CachedAttenuationTransform


def _sigma_fit(r: NDArray[Any], a: float, b: float, c: float) -> NDArray[Any]:
    """σ(r) = sqrt((a r + b)² + c²): PyTomography's own form for a collimator plus intrinsic resolution."""
    return np.sqrt((a * r + b) ** 2 + c**2)


def _check(activity_shape: tuple[int, ...], mu: NDArray[Any], voxel_mm: Sequence[float], orbit: Orbit) -> None:
    if mu.ndim != 3 or mu.shape != activity_shape:
        raise VoxeldoseError(
            "the attenuation map must be a 3-D array on the activity's grid",
            tag="mu",
            expected=str(activity_shape),
            found=mu.shape,
        )
    if mu.shape[1] != mu.shape[2]:
        raise VoxeldoseError("the transverse grid must be square", tag="shape", found=mu.shape)
    if len(voxel_mm) != 3 or not math.isclose(voxel_mm[1], voxel_mm[2], rel_tol=1e-6):
        raise VoxeldoseError("voxels must be square in the transverse plane", tag="voxel_mm", found=tuple(voxel_mm))
    if len(orbit.radius_mm) != len(orbit.angles_deg) or not orbit.angles_deg:
        raise VoxeldoseError("one radius per view is needed", tag="orbit", found=len(orbit.radius_mm))
    half_width_mm = mu.shape[2] * float(voxel_mm[2]) / 2.0
    if min(orbit.radius_mm) < half_width_mm:
        raise VoxeldoseError(
            "the camera would pass through the grid",
            tag="radius_mm",
            expected=f"≥ {half_width_mm:.1f} mm (half the grid's width)",
            found=min(orbit.radius_mm),
        )


def _counts_per_bq_ml(voxel_mm: Sequence[float], orbit: Orbit, camera: Camera) -> float:
    """Expected counts per view, in air, from one voxel at 1 Bq/ml."""
    voxel_ml = float(np.prod(np.asarray(voxel_mm, dtype=np.float64))) / 1000.0
    return voxel_ml * 1e-6 * camera.sensitivity_cps_per_mbq * orbit.frame_duration_s


def project(
    activity_bq_per_ml: NDArray[Any], mu: NDArray[Any], voxel_mm: Sequence[float], orbit: Orbit, camera: Camera
) -> FloatArray:
    """Expected counts ``[view, slice, bin]`` of an activity map (Bq/ml, ``[k, j, i]`` on a grid of ``voxel_mm``
    = (slice, row, column) spacing) through the attenuation map ``mu`` (1/cm at the photopeak energy, same grid).

    Projection bins are the grid's columns and slices (same spacing).  No noise: draw Poisson counts from it.
    """
    a = np.asarray(activity_bq_per_ml, dtype=np.float32)
    mu = np.asarray(mu, dtype=np.float32)
    _check(a.shape, mu, voxel_mm, orbit)
    device = torch_device()
    import torch

    H = _system_matrix(mu, voxel_mm, orbit, camera)
    obj = torch.as_tensor(
        np.ascontiguousarray(a.transpose(2, 1, 0)) * _counts_per_bq_ml(voxel_mm, orbit, camera), device=device
    )
    with torch.no_grad():
        proj = H.forward(obj)
    out: FloatArray = proj.cpu().numpy().transpose(0, 2, 1).astype(np.float32)  # [view, r, z] → [view, z, r]
    return out


def reconstruct_osem(
    projections: NDArray[Any],
    mu: NDArray[Any],
    voxel_mm: Sequence[float],
    orbit: Orbit,
    camera: Camera,
    iterations: int,
    subsets: int,
) -> FloatArray:
    """OSEM reconstruction (Bq/ml, ``[k, j, i]``) of ``projections`` (counts, ``[view, slice, bin]``) with
    attenuation from ``mu`` (1/cm, on the output grid) and the camera's distance-dependent resolution.

    ``iterations × subsets`` sub-iterations from a uniform start; subsets take every ``subsets``-th view.
    Clinical 177Lu protocols use few (judgment: of the order of 4 × 8 … 6 × 16): resolution is not converged,
    totals are.  Runs on :func:`torch_device`.
    """
    g = np.asarray(projections, dtype=np.float32)
    mu = np.asarray(mu, dtype=np.float32)
    if g.ndim != 3 or g.shape[0] != len(orbit.angles_deg) or g.shape[1:] != (mu.shape[0], mu.shape[2]):
        raise VoxeldoseError(
            "projections do not match the views and the grid",
            tag="projections",
            expected=f"[{len(orbit.angles_deg)} views, {mu.shape[0]} slices, {mu.shape[2]} bins]",
            found=g.shape,
        )
    if iterations < 1 or subsets < 1 or len(orbit.angles_deg) % subsets:
        raise VoxeldoseError(
            "iterations ≥ 1 and a number of subsets that divides the views are needed",
            tag="subsets",
            found=(iterations, subsets),
        )
    _check(mu.shape, mu, voxel_mm, orbit)
    ptm = _pytomography()
    torch_device()
    import torch
    from pytomography.algorithms import OSEM
    from pytomography.likelihoods import PoissonLogLikelihood

    H = _system_matrix(mu, voxel_mm, orbit, camera)
    g_t = torch.as_tensor(np.ascontiguousarray(g.transpose(0, 2, 1)), dtype=ptm.dtype).to(ptm.device)
    with torch.no_grad():
        f = OSEM(PoissonLogLikelihood(H, g_t))(iterations, subsets)
    counts = f.cpu().numpy().transpose(2, 1, 0)
    out: FloatArray = (counts / _counts_per_bq_ml(voxel_mm, orbit, camera)).astype(np.float32)
    return out
