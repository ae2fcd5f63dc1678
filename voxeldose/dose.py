"""Absorbed dose from time-integrated activity: dose-voxel-kernel convolution, density correction, LED.

Public entry point: :func:`absorbed_dose`.  Three methods:

``"dvk"``
    ``D = K ⊛ Ã`` — the time-integrated activity map ``Ã`` (Bq·s per voxel) convolved with the
    dose-voxel kernel ``K`` (Gy per Bq·s) of the kernel's homogeneous medium (MIRD Pamphlet 17,
    Bolch et al. 1999).  Exact for a homogeneous patient of that medium.

``"dvk-density"``
    Electrons redistributed by mass, photons as in the homogeneous medium — see
    :func:`density_corrected_dose` for the model and its derivation.  Needs a density map
    (``density=`` in g/cm³ or HU, or ``ct=`` in HU, converted with :func:`hu_to_density`).

``"led"``
    Local energy deposition: every electron's energy stays in its source voxel, every photon
    escapes: ``D = Ã · E_e / (ρ V)``, with ``E_e`` the total electron energy per decay
    (β⁻ + internal-conversion + Auger electrons, ICRP-107: 147.9 keV for Lu-177) and ``ρ`` the
    medium's density (or the voxel's, when a density map or CT is given).  Photons (35.1 keV per
    decay for Lu-177) are ignored: in a large uniform region LED therefore lies *below* the DVK dose by
    the absorbed photon energy, at most ``E_γ/E_e`` ≈ 24 % for Lu-177, in practice a few per cent in
    organs.

Grids: dose is always computed on the SPECT (TIA) grid.  ``grid="ct"`` then resamples the dose
trilinearly onto the CT grid for display and DICOM export — interpolated, not recomputed at CT
resolution; a VOI's mean dose should be read on the SPECT grid.

Devices: the computation runs on the device :func:`voxeldose.backend.get_device` picks (or the GPU if
the TIA array is already there); the result comes back in the namespace of the input array.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol, TypedDict, cast, overload

import numpy as np
from numpy.typing import NDArray

from . import backend, nuclides
from .backend import Array
from .convolution import convolve, kernel_key
from .errors import VoxeldoseError
from .geometry import Grid, Volume, resample
from .nuclides import (
    J_PER_MEV,
    electron_energy_per_decay_MeV,
    photon_energy_per_decay_MeV,
)

__all__ = [
    "J_PER_MEV",
    "METHODS",
    "RHO_AIR",
    "SCHNEIDER_2000",
    "DoseKernelLike",
    "DoseOptions",
    "absorbed_dose",
    "default_kernel_size",
    "density_corrected_dose",
    "density_on_grid",
    "electron_energy_per_decay_MeV",
    "hu_to_density",
    "kernel_weighted_density",
    "medium_density",
    "photon_energy_per_decay_MeV",
    "trimmed_electron_kernel",
]

log = logging.getLogger(__name__)

METHODS = ("dvk", "dvk-density", "led")

#: Density of dry air at 20 °C, 101.325 kPa, g/cm³ (NIST "Air, Dry (near sea level)": 1.205e-3);
#: the floor of every density map, so that no voxel has zero mass.
RHO_AIR = 0.0012

#: Kernel media → NIST compound names in xraylib (densities taken from there when no kernel is given).
_NIST_NAMES = {
    "water": "Water, Liquid",
    "soft-tissue": "Tissue, Soft (ICRP)",
    "cortical-bone": "Bone, Cortical (ICRP)",
    "lung": "Lung (ICRP)",
}

#: Half-extent the default kernel covers, mm: about two mean free paths of Lu-177's 113 keV photons
#: in soft tissue (μ/ρ ≈ 0.164 cm²/g → 1/μ ≈ 61 mm); beyond it the photon kernel is below e⁻² of its
#: primary-fluence value and adds ≲ 1 % of the total dose in a patient-size region.
KERNEL_HALF_EXTENT_MM = 120.0
DEFAULT_KERNEL_SIZE = 51
MAX_KERNEL_SIZE = 101

# --------------------------------------------------------------------------------------------
# HU → density (Schneider et al. 2000)
# --------------------------------------------------------------------------------------------

#: Piecewise-linear HU → mass density (g/cm³) of Schneider, Bortfeld & Schlegel 2000,
#: "Correlation between CT numbers and tissue parameters needed for Monte Carlo simulations of clinical
#: dose distributions", Phys. Med. Biol. 45:459–478, eqs. (19)–(23), as rows
#: ``(HU_low, HU_high, a, b)`` meaning ``ρ = a + b·H`` for ``HU_low ≤ H < HU_high``:
#:
#: ======================  ===========================  =============================
#: HU range                ρ (g/cm³)                    tissues
#: ======================  ===========================  =============================
#: H < −98                 linear from air (−1000 HU,   air, lung
#:                         0.00121) to eq. 21 at −98
#: −98 ≤ H < 14            1.018 + 0.893e-3·H (eq. 21)   adipose → soft tissue
#: 14 ≤ H < 23             1.03                          soft tissue (eq. 22)
#: 23 ≤ H < 100            1.003 + 1.169e-3·H (eq. 23)   soft tissue (muscle, organs)
#: H ≥ 100                 1.017 + 0.592e-3·H (eq. 19)   skeletal tissues
#: ======================  ===========================  =============================
#:
#: The step at 100 HU (1.120 → 1.076) is in the paper (separate fits to soft and skeletal tissues).
#: Results are clamped to ≥ :data:`RHO_AIR` (CT padding values such as −1024 or −3024 HU).
#: The calibration is for the scanner Schneider et al. characterised; a site calibration (CT
#: phantom) should replace it where available.
_RHO_AIR_SCHNEIDER = 0.00121
_RHO_M98 = 1.018 + 0.893e-3 * -98.0
SCHNEIDER_2000: tuple[tuple[float, float, float, float], ...] = (
    (
        -math.inf,
        -98.0,
        _RHO_AIR_SCHNEIDER + (_RHO_M98 - _RHO_AIR_SCHNEIDER) * 1000.0 / 902.0,
        (_RHO_M98 - _RHO_AIR_SCHNEIDER) / 902.0,
    ),
    (-98.0, 14.0, 1.018, 0.893e-3),
    (14.0, 23.0, 1.03, 0.0),
    (23.0, 100.0, 1.003, 1.169e-3),
    (100.0, math.inf, 1.017, 0.592e-3),
)


@overload
def hu_to_density(hu: float) -> float: ...
@overload
def hu_to_density(hu: Array) -> Array: ...
def hu_to_density(hu: Array | float) -> Array | float:
    """Mass density (g/cm³) from CT numbers (HU), Schneider et al. 2000; see :data:`SCHNEIDER_2000`.

    Works on NumPy and CuPy arrays (and scalars); returns float32 for arrays, a float for a scalar.
    """
    scalar = np.isscalar(hu)
    xp = backend.xp_for(np.asarray(hu) if scalar else hu)
    h = xp.asarray(hu, dtype=xp.float32)
    # the segment of each voxel (lo ≤ H < hi) by one binary search over the 4 inner edges, then one
    # float32 a + b·H: the same numbers as five masked passes over the CT, about twice as fast
    edges = xp.asarray([seg[0] for seg in SCHNEIDER_2000[1:]], dtype=xp.float32)
    a = xp.asarray([seg[2] for seg in SCHNEIDER_2000], dtype=xp.float32)
    b = xp.asarray([seg[3] for seg in SCHNEIDER_2000], dtype=xp.float32)
    seg_index = xp.searchsorted(edges, h, side="right").astype(xp.uint8)
    rho = a[seg_index] + b[seg_index] * xp.where(xp.isfinite(h), h, xp.float32(0))
    rho = xp.where(xp.isfinite(h), rho, xp.float32(0))  # NaN, ±inf: no segment, air below
    rho = xp.maximum(rho, xp.float32(RHO_AIR))
    return float(rho) if scalar else rho


# --------------------------------------------------------------------------------------------
# Nuclide energies, media
# --------------------------------------------------------------------------------------------


# J_PER_MEV, electron_energy_per_decay_MeV and photon_energy_per_decay_MeV are voxeldose.nuclides'
# (the one definition), re-exported here.


def medium_density(medium: str) -> float:
    """Density (g/cm³) of a kernel medium: the kernels' own :class:`~voxeldose.kernels.Medium`
    density (so LED and DVK agree), else xraylib's NIST compound density."""
    try:
        from .kernelphysics import get_medium

        return float(get_medium(medium).density_g_cm3)
    except ImportError:  # pragma: no cover - kernels without media table
        pass
    if medium not in _NIST_NAMES:
        raise VoxeldoseError(f"unknown medium {medium!r}", tag="medium", expected=", ".join(_NIST_NAMES), found=medium)
    import xraylib

    return float(xraylib.GetCompoundDataNISTByName(_NIST_NAMES[medium])["density"])


def default_kernel_size(
    spacing_mm: Sequence[float] | NDArray[np.floating[Any]], shape: Sequence[int] | None = None
) -> int:
    """Odd kernel size (voxels, all axes) for voxel spacing ``spacing_mm``.

    Covers ±:data:`KERNEL_HALF_EXTENT_MM` (≈ 2 photon mean free paths) along the finest axis, at
    least :data:`DEFAULT_KERNEL_SIZE` (51: ±122 mm at 4.8 mm voxels), at most
    :data:`MAX_KERNEL_SIZE` (101), and never more than ``2n − 1`` for the largest axis ``n`` of the
    map (larger offsets connect no two voxels).
    """
    s = float(min(spacing_mm))
    size = max(DEFAULT_KERNEL_SIZE, 2 * math.ceil(KERNEL_HALF_EXTENT_MM / s) + 1)
    size = min(size, MAX_KERNEL_SIZE)
    if shape is not None:
        size = min(size, 2 * int(max(shape)) - 1)
    return size if size % 2 else size - 1


# --------------------------------------------------------------------------------------------
# Density maps on the SPECT grid
# --------------------------------------------------------------------------------------------

_DENSITY_UNITS = ("g/cm3", "g/ml", "g/cm^3", "g.cm-3", "g/mL")


def _odd(x: float) -> int:
    """Nearest odd integer ≥ 1 to ``x``."""
    return max(1, 2 * round((x - 1.0) / 2.0) + 1)


def density_on_grid(source: Volume, target: Grid | Volume, *, fill: float) -> Volume:
    """Mean mass density (g/cm³) in each voxel of ``target``, from a density or CT (HU) volume.

    HU are converted with :func:`hu_to_density` on the CT grid first (the calibration is not linear,
    so densities — not HU — are averaged).  Then each target voxel gets the *mean* density over its
    extent, not the density at its centre: the map is box-filtered on its own grid with a width equal
    to a target voxel's extent along each source axis (rounded to an odd number of source voxels),
    then interpolated trilinearly (:func:`voxeldose.geometry.resample`) at the target voxel centres.
    For a 4.8 mm SPECT voxel over a 0.98 × 0.98 × 3 mm CT this averages 5 × 5 × 1 CT voxels and
    interpolates the rest — close to the exact box average, at the cost of one separable filter.
    Outside the source's field of view the density is ``fill``.
    """
    grid = target.grid if isinstance(target, Volume) else target
    units = source.units
    if units == "HU":
        rho = hu_to_density(source.array)
    elif units in _DENSITY_UNITS:
        xp = backend.xp_for(source.array)
        rho = xp.maximum(xp.asarray(source.array, dtype=xp.float32), xp.float32(RHO_AIR))
    else:
        raise VoxeldoseError(
            "the density volume has units the dose engine does not know",
            tag="density.units",
            expected="'HU' (CT numbers) or 'g/cm3' (mass density)",
            found=units,
        )
    src = Volume(rho, source.affine, source.frame_of_reference_uid, "g/cm3")
    if grid.same_as(src.grid):
        return src
    # Target voxel edges in source index units: columns of inv(A_src) · A_tgt (i, j, k order).
    m = np.linalg.inv(src.affine[:3, :3]) @ grid.affine[:3, :3]
    extent_ijk = np.abs(m).sum(axis=1)
    size_kji = tuple(_odd(e) for e in extent_ijk[::-1])
    if any(s > 1 for s in size_kji):
        xp = backend.xp_for(rho)
        if xp is np:
            import scipy.ndimage as ndi
        else:  # pragma: no cover - GPU only
            import cupyx.scipy.ndimage as ndi
        src = src.with_array(ndi.uniform_filter(rho, size=size_kji, mode="nearest"))
    return resample(src, grid, order=1, fill=fill)


# --------------------------------------------------------------------------------------------
# The density-corrected model
# --------------------------------------------------------------------------------------------

#: Energy fraction of the electron kernel that may be cut off when trimming it to its support.
_ELECTRON_TRIM = 1e-7


def _trim_centred(k: NDArray[np.float64], tol: float) -> NDArray[np.float64]:
    """Smallest centred sub-box of ``k`` that keeps all but ``tol`` of its sum (index cube, clipped)."""
    total = float(np.abs(k).sum())
    c = [(m - 1) // 2 for m in k.shape]
    if total == 0.0:
        return k[c[0] : c[0] + 1, c[1] : c[1] + 1, c[2] : c[2] + 1]
    for r in range(max(c) + 1):
        box = tuple(slice(ci - min(r, ci), ci + min(r, ci) + 1) for ci in c)
        if total - float(np.abs(k[box]).sum()) <= tol * total:
            return k[box]
    return k


def trimmed_electron_kernel(electron_kernel: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """The electron kernel (float64) trimmed to the centred box holding all but 1e-7 of its energy."""
    return _trim_centred(np.asarray(electron_kernel, dtype=np.float64), _ELECTRON_TRIM)


def kernel_weighted_density(rho: Array, electron_kernel: NDArray[np.float64], *, xp: ModuleType) -> Array:
    """``N = w̃ ⊛ ρ`` (g/cm³, float64, ≥ :data:`RHO_AIR`) of :func:`density_corrected_dose`: the density around
    each source voxel weighted by the normalised electron kernel ``w = K_e / ΣK_e`` (``electron_kernel`` as
    :func:`trimmed_electron_kernel` returns it, with a positive sum); the density extended by its edge values."""
    w = electron_kernel / float(electron_kernel.sum())
    half = tuple((m - 1) // 2 for m in w.shape)
    rho64 = xp.asarray(rho, dtype=xp.float64)
    rho_ext = xp.pad(rho64, [(h, h) for h in half], mode="edge")
    n_ext = convolve(rho_ext, w[::-1, ::-1, ::-1].copy(), xp=xp, dtype=np.float64)
    n = n_ext[tuple(slice(h, h + s) for h, s in zip(half, rho64.shape))]
    del n_ext, rho_ext
    return xp.maximum(n, RHO_AIR)  # ρ ≥ RHO_AIR and w ≥ 0 make N ≥ RHO_AIR: guards round-off only


def density_corrected_dose(
    tia: Array,
    rho: Array,
    electron_kernel: NDArray[np.floating[Any]],
    photon_kernel: NDArray[np.floating[Any]] | None,
    kernel_density: float,
    *,
    xp: ModuleType | None = None,
) -> tuple[Array, Array | None]:
    """Density-corrected dose ``(D_e, D_p)`` in Gy for a TIA map (Bq·s) and a density map (g/cm³) on one grid.

    ``electron_kernel`` and ``photon_kernel`` are in Gy per Bq·s in the kernel medium of density
    ``kernel_density`` (g/cm³); ``D_p`` is ``None`` without a (non-zero) photon kernel.

    The model (energy-conserving redistribution of electron energy by mass):

    The electron kernel ``K_e`` (Gy per Bq·s in the kernel medium of density ``ρ_k``) deposits
    ``E_k = Σ K_e · ρ_k V`` per decay (J).  Its normalised shape ``w = K_e / Σ K_e`` (``Σ w = 1``) says
    where that energy goes in the homogeneous medium.  In a heterogeneous patient we keep *where*
    the electrons can go (the kernel's support — the ranges are short) but share the energy among
    the target voxels in proportion to the mass they hold there:

        energy from source ``s`` into ``x`` = ``Ã(s) · E_k · w(x−s) ρ(x) / N(s)``,
        ``N(s) = Σ_x w(x−s) ρ(x) = (w̃ ⊛ ρ)(s)``        (kernel-weighted density around ``s``;
                                                          ``w̃(u) = w(−u)``)

    Summed over ``x`` the energy from ``s`` is exactly ``Ã(s) E_k``: **energy is conserved** source by
    source.  Dividing by the target mass ``ρ(x) V``:

        ``D_e(x) = E_k / V · Σ_s w(x−s) Ã(s) / N(s) = ρ_k · (K_e ⊛ (Ã / N))(x)``

    — two convolutions: ``N`` (of the density) and the kernel applied to the "mass-scaled" activity.
    Properties:

    * ``ρ ≡ ρ_k`` ⇒ ``N ≡ ρ_k`` ⇒ ``D_e = K_e ⊛ Ã``: the homogeneous kernel, unchanged (the density is
      extended by its edge values beyond the grid, so this holds up to the borders).
    * Uniform ``Ã`` in a large region of any density ``ρ`` ⇒ ``D_e = E_k Ã / (ρ V)``: charged-particle
      equilibrium, as it must.
    * A target in air next to tissue receives energy ∝ its tiny mass, so its dose stays of the order
      of the tissue dose — unlike ``D_water / ρ``, which is ~800× too high there.  ``N ≥ ρ_min`` gives
      ``D_e ≤ E_k Ã_max / (ρ_min V)`` everywhere: finite.  Where activity itself sits in air (SPECT
      spill-out), ``D_e`` there tends to the local deposition in air, which is large but is the
      physics of a truncated kernel; such voxels are outside every VOI.
    * Limitation: the kernel's *extent* is not stretched by 1/ρ (electrons in lung travel ~3×
      farther); at SPECT voxel sizes (≥ 3 mm vs. a mean Lu-177 β range of ~0.3 mm in water) this
      moves little energy, and only across a voxel or two.

    Photons: ``D_p = K_p ⊛ Ã``, the homogeneous-medium photon dose (dose to the kernel medium in the
    photon fluence of a homogeneous patient).  Lu-177's photons (113, 208 keV, Compton-dominated) have
    ``μ_en/ρ`` of soft tissue, lung and air within a few per cent of each other, so we do not rescale
    by the target's ``μ_en/ρ`` (that hook would need a tissue assignment, which HU→density alone does
    not give); the photon energy is not redistributed by mass — photons that cross air deposit little
    there, which is physical.

    Numerics: ``Ã/N`` can span ~3 orders of magnitude (activity in air), more than float32 FFT
    round-off tolerates relative to the maximum, so the two electron convolutions run in float64.
    The electron kernel is first trimmed to the centred box holding all but 1e-7 of its energy, so
    they run on a barely padded grid.
    """
    xp = backend.xp_for(tia) if xp is None else xp
    ke = trimmed_electron_kernel(electron_kernel)
    d_e = xp.zeros(tia.shape, dtype=xp.float64)
    if float(ke.sum()) > 0.0:
        n = kernel_weighted_density(rho, ke, xp=xp)
        scaled = xp.asarray(tia, dtype=xp.float64) * (float(kernel_density) / n)
        d_e = convolve(scaled, ke, xp=xp, dtype=np.float64)
    d_p = None
    if photon_kernel is not None and float(np.abs(photon_kernel).sum()) > 0.0:
        d_p = convolve(tia, photon_kernel, xp=xp, dtype=np.float32)
    return d_e, d_p


# --------------------------------------------------------------------------------------------
# The public API
# --------------------------------------------------------------------------------------------


class DoseKernelLike(Protocol):
    """What :func:`absorbed_dose` reads of a kernel: :class:`voxeldose.kernels.DoseKernel` qualifies.

    Arrays ``[k, j, i]`` with odd shape, Gy per Bq·s, source voxel at the centre; ``array`` is
    ``electron + photon``.  An optional ``nuclide`` attribute (str) is checked when present.
    """

    @property
    def array(self) -> NDArray[Any]:
        """Total kernel, Gy per Bq·s."""
        ...

    @property
    def electron(self) -> NDArray[Any]:
        """Electron part, Gy per Bq·s."""
        ...

    @property
    def photon(self) -> NDArray[Any]:
        """Photon part, Gy per Bq·s."""
        ...

    @property
    def voxel_mm(self) -> Sequence[float]:
        """Voxel size ``(di, dj, dk)``, mm."""
        ...

    @property
    def density_g_cm3(self) -> float:
        """Density of the kernel medium, g/cm³."""
        ...

    @property
    def id(self) -> str:
        """Stable identifier (a stub may raise; then the kernel is identified by its content hash)."""
        ...


def _kernel_identity(kernel: DoseKernelLike) -> str:
    try:
        return str(kernel.id)
    except (NotImplementedError, AttributeError, KeyError, TypeError, ValueError):  # stub or hand-made kernel
        return "sha:" + kernel_key(kernel.array)


def _check_kernel(kernel: DoseKernelLike, tia: Volume, nuclide: str) -> None:
    for attr in ("array", "electron", "photon", "voxel_mm", "density_g_cm3"):
        if not hasattr(kernel, attr):
            raise VoxeldoseError(
                "kernel must be a voxeldose.kernels.DoseKernel", tag="kernel", found=type(kernel).__name__
            )
    if not np.allclose(np.asarray(kernel.voxel_mm, float), tia.spacing, rtol=1e-3, atol=1e-3):
        raise VoxeldoseError(
            "the dose kernel was made for another voxel size than the TIA map's",
            tag="kernel.voxel_mm",
            expected=f"(di, dj, dk) = {tuple(round(float(s), 4) for s in tia.spacing)} mm",
            found=tuple(float(v) for v in kernel.voxel_mm),
        )
    kn = getattr(kernel, "nuclide", None)
    if kn and nuclides.canonical_name(kn) != nuclides.canonical_name(nuclide):
        raise VoxeldoseError("the dose kernel is for another nuclide", tag="kernel.nuclide", expected=nuclide, found=kn)


class DoseOptions(TypedDict, total=False):
    """The keyword-only options of :func:`absorbed_dose`, for wrappers that pass them on."""

    medium: str
    kernel: DoseKernelLike | None
    grid: str
    ct: Volume | None
    kernel_size: int | None
    device: str | None


def absorbed_dose(
    tia: Volume,
    nuclide: str = "Lu-177",
    method: str = "dvk",
    density: Volume | None = None,
    *,
    medium: str = "soft-tissue",
    kernel: DoseKernelLike | None = None,
    grid: str = "spect",
    ct: Volume | None = None,
    kernel_size: int | None = None,
    device: str | None = None,
) -> Volume:
    """Absorbed-dose map (Gy) from a time-integrated activity map (Bq·s per voxel).

    Parameters
    ----------
    tia:
        Time-integrated activity, ``units == "Bq.s"`` (activity per voxel, integrated over time).
    nuclide:
        Radionuclide (any spelling :func:`voxeldose.nuclides.canonical_name` accepts).
    method:
        ``"dvk"``, ``"dvk-density"`` or ``"led"`` (see the module docstring).
    density:
        Density map (``units`` ``"g/cm3"``) or CT (``"HU"``) on any grid of the same frame of
        reference; averaged onto the TIA grid (:func:`density_on_grid`).  Used by ``dvk-density``
        (required there, unless ``ct`` is given) and by ``led`` (per-voxel ρ); ignored by ``dvk``.
    medium:
        Kernel medium (:data:`voxeldose.kernels.MEDIA`); also the density assumed by ``led`` without
        a density map, and outside the CT's field of view.
    kernel:
        A :class:`~voxeldose.kernels.DoseKernel` to use instead of
        ``get_kernel(nuclide, voxel_mm=tia.spacing, medium=medium, size=kernel_size)``; it must
        have the TIA's voxel size.
    grid:
        ``"spect"`` (default; the TIA grid, where the dose is computed) or ``"ct"`` (the dose
        resampled trilinearly onto ``ct``'s grid).
    ct:
        CT volume (HU): the density source when ``density`` is not given, and the target of
        ``grid="ct"``.
    kernel_size:
        Kernel size in voxels (odd); default :func:`default_kernel_size`.
    device:
        ``"cpu"`` or ``"gpu"``; default: the GPU if ``tia.array`` is a CuPy array, else
        :func:`voxeldose.backend.get_device` (``VOXELDOSE_DEVICE``).

    Returns
    -------
    Volume with ``units == "Gy"``, float32, on the TIA grid (or the CT grid), its array in the
    namespace of ``tia.array``; ``meta`` records method, nuclide, kernel id, medium, device.
    """
    if not isinstance(tia, Volume):
        raise VoxeldoseError("tia must be a voxeldose Volume", tag="tia", found=type(tia).__name__)
    if tia.units != "Bq.s":
        raise VoxeldoseError(
            "the time-integrated activity map has the wrong units",
            tag="tia.units",
            expected="'Bq.s' (time-integrated activity per voxel)",
            found=tia.units,
        )
    if method not in METHODS:
        raise VoxeldoseError("unknown dose method", tag="method", expected=" or ".join(METHODS), found=method)
    if grid not in ("spect", "ct"):
        raise VoxeldoseError("unknown dose grid", tag="grid", expected="'spect' or 'ct'", found=grid)
    if grid == "ct" and ct is None:
        raise VoxeldoseError("grid='ct' needs the CT volume", tag="ct", expected="a CT Volume (HU)")
    nuc = nuclides.require_supported(nuclide, tag="nuclide")

    input_xp = backend.xp_for(tia.array)
    if device is None:
        device = "gpu" if input_xp is not np else backend.get_device()
    xp = backend.namespace(device)
    a = xp.asarray(tia.array)
    if not bool(xp.all(xp.isfinite(a))):
        raise VoxeldoseError("the TIA map contains NaN or infinite values", tag="tia.array")

    rho_map = None
    dens_src = density if density is not None else ct
    if method == "dvk-density" and dens_src is None:
        raise VoxeldoseError(
            "method 'dvk-density' needs a density map or a CT",
            tag="density",
            expected="density=Volume (g/cm3 or HU) or ct=Volume (HU)",
        )
    meta: dict[str, Any] = {
        "method": method,
        "nuclide": nuc.name,
        "medium": medium,
        "device": device,
        "dose_grid": "spect",
        "software": "voxeldose.dose",
    }

    k: DoseKernelLike | None = None
    if method in ("dvk", "dvk-density"):
        if kernel is None:
            from .kernels import get_kernel

            size = kernel_size or default_kernel_size(tia.spacing, tia.shape)
            kernel = get_kernel(nuc.name, voxel_mm=tuple(float(s) for s in tia.spacing), medium=medium, size=size)
        _check_kernel(kernel, tia, nuc.name)
        k = kernel
        meta["kernel_id"] = _kernel_identity(k)
        meta["kernel_shape"] = tuple(k.array.shape)
        rho_k = float(k.density_g_cm3)
    else:
        rho_k = float(kernel.density_g_cm3) if kernel is not None else medium_density(medium)
    meta["medium_density_g_cm3"] = rho_k

    if dens_src is not None and method != "dvk":
        rho_map = density_on_grid(dens_src, tia, fill=rho_k).array
        rho_map = xp.asarray(rho_map, dtype=xp.float32)
        meta["density_source"] = "density" if density is not None else "ct"

    if method == "dvk":
        dose = convolve(a, k, xp=xp, dtype=np.float32)
    elif method == "dvk-density":
        kd = cast(DoseKernelLike, k)  # set above for both kernel methods
        d_e, d_p = density_corrected_dose(a, rho_map, kd.electron, kd.photon, rho_k, xp=xp)
        dose = d_e.astype(xp.float32) if d_p is None else (d_e + d_p).astype(xp.float32)
    else:  # led
        e_j = electron_energy_per_decay_MeV(nuc.name) * J_PER_MEV
        mass_kg = (rho_map if rho_map is not None else xp.float32(rho_k)) * (tia.voxel_volume_ml * 1e-3)
        dose = (xp.asarray(a, dtype=xp.float64) * (e_j / mass_kg)).astype(xp.float32)
        meta["electron_energy_per_decay_MeV"] = e_j / J_PER_MEV

    dose_host_or_dev = dose if input_xp is not np else backend.to_host(dose)
    out = Volume(dose_host_or_dev, tia.affine, tia.frame_of_reference_uid, "Gy", meta)
    if grid == "ct":
        out = resample(out, cast(Volume, ct), order=1, fill=0.0)  # grid="ct" without ct was refused above
        out = Volume(
            out.array, out.affine, out.frame_of_reference_uid, "Gy", {**meta, "dose_grid": "ct (trilinear from spect)"}
        )
    return out
