"""The physics behind the dose-voxel kernels (DVK): media, electron and photon Monte Carlo, voxel averaging.

A kernel ``K[k, j, i]`` is the mean absorbed dose (Gy) in the target voxel at offset ``(i, j, k)`` per
decay (Bq·s) uniformly distributed in the source voxel at the centre, in an infinite homogeneous
medium.  It is built in three steps (details and validation in ``docs/kernels.md``):

1. **Electrons** – a condensed-history Monte Carlo (class I, CSDA) for monoenergetic electrons in an
   infinite medium (:func:`simulate_electron_dpk`): energy loss per step from the Bethe collision
   stopping power (ICRU Report 37), angular deflections per step from the *modified Wentzel* (MW)
   distribution whose first transport moment equals the Goudsmit–Saunderson value
   ``<cos θ> = exp(-∫ds/λ₁)`` for the screened-Rutherford cross section with Molière's screening
   parameter (Fernández-Varea, Mayol, Baró & Salvat 1993, Nucl. Instrum. Methods B 73:447;
   Molière 1948, Z. Naturforsch. 3a:78), and the random-hinge transport step (PENELOPE, Salvat et al.,
   OECD/NEA manual).  It tallies the radial energy-deposition distribution in scaled radius r/R_CSDA
   for an energy grid (a table shipped in ``kernels/tables``).  The ICRP-107 β spectrum plus the IE and
   Auger lines weight these into the nuclide's electron point kernel.
2. **Photons** – an analogue photon Monte Carlo (:func:`simulate_photon_radial`) for every γ/X line
   ≥ 1 keV, in an infinite medium, with xraylib cross sections (photoelectric, incoherent, coherent;
   angular distributions from xraylib's differential cross sections: Klein–Nishina × incoherent
   scattering function, Thomson × atomic form factor); secondary-electron energy is deposited
   where the photon interacts.  Tallies radial energy deposition out to 60 g/cm².
3. **Voxel averaging** (:func:`voxelise`): the fraction of emitted energy absorbed in each target voxel
   is the point kernel averaged over source and target voxels.  Near the source (Chebyshev offset ≤ 3)
   it is sampled: a uniform point in the source voxel, a radius from the radial energy-deposition
   distribution, an isotropic direction, landing point binned (handles r → 0 exactly).  Farther
   (photons only) the point kernel varies slowly and the average is done by tensor-product Gauss
   quadrature over the exact displacement density of two uniform points in two boxes (a tent per
   axis).  Octant (and, for cubic voxels, axis-permutation) symmetry is imposed by averaging.

Kernel (Gy per Bq·s) = absorbed fraction × energy per decay (J) / (ρ · V) with ρ·V in kg.

This module computes; :mod:`voxeldose.kernels` looks the tables and kernels up on disk (shipped in
``kernels/``, else cached), assembles a kernel (:func:`voxeldose.kernels.build_kernel`) and caches it.

Units: energies MeV, mass thickness g/cm², lengths mm (kernel geometry), density g/cm³.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from itertools import permutations
from typing import Any, cast

import numpy as np

from . import nuclides as _nuc
from .errors import VoxeldoseError

#: Media a kernel can be built for (names as used on the command line).
MEDIA: tuple[str, ...] = ("water", "soft-tissue", "cortical-bone", "lung")

#: Version of the kernel method; part of every kernel id (bump when the physics or sampling changes).
METHOD_VERSION = "1"

# --- physical constants (CODATA 2018, exact SI where defined) ------------------------------------
ELECTRON_REST_ENERGY_MEV = 0.51099895000  #: m_e c², MeV (CODATA 2018)
CLASSICAL_ELECTRON_RADIUS_CM = 2.8179403262e-13  #: r_e, cm (CODATA 2018)
AVOGADRO_PER_MOL = 6.02214076e23  #: N_A, mol⁻¹ (SI 2019, exact)
FINE_STRUCTURE = 7.2973525693e-3  #: α (CODATA 2018)
J_PER_MEV = _nuc.J_PER_MEV  #: J per MeV (SI 2019, exact e): voxeldose.nuclides' constant

#: Highest photon energy of xraylib's cross-section tables, keV (CS_Photo_CP/CS_Compt_CP/CS_Rayl_CP raise
#: above 800 keV in xraylib 4.3.0); see :func:`_photon_xs` for the extension above it.
XRAYLIB_MAX_KEV = 799.0
#: Lowest photon energy transported, MeV; below it the photon is absorbed on the spot.  The mean free
#: path of a 1 keV photon in water is 0.25 µm (μ/ρ ≈ 4e3 cm²/g, xraylib), negligible against any voxel.
PHOTON_CUTOFF_MEV = 1.0e-3
#: Electron tracking cut-off, MeV: an electron below it travels its remaining CSDA range in one last
#: (hinged) step, so no energy is lost and r ≤ R_CSDA(E₀) holds exactly.
ELECTRON_CUTOFF_MEV = 1.0e-3
#: Energy grid of the monoenergetic electron table, MeV (log-spaced 1 keV – 1 MeV).  The density effect
#: is neglected, which is exact for water below 0.51 MeV (Sternheimer x₀ = 0.24, ESTAR δ = 0 below
#: 0.5 MeV) and < 0.5 % in collision stopping power at 1 MeV; nuclides with β end-points above 1 MeV
#: are rejected.
ELECTRON_TABLE_ENERGIES_MEV = tuple(float(e) for e in np.geomspace(1e-3, 1.0, 31))
#: Energy grid of the *extended* electron table, MeV (1 keV – 3 MeV, the same 10 points per decade), used
#: only for nuclides that emit electrons above 1 MeV (Y-90, Bi-212, Tl-208, Bi-213, Tl-209 …); it includes
#: the density-effect correction (:data:`STERNHEIMER`), which matters above 0.5 MeV (water, 2 MeV: δ lowers
#: S_col by ≈ 2 %).  The 1 MeV table and hence every kernel built from it (Lu-177, Tb-161, I-131 …) is unchanged.
ELECTRON_TABLE_HE_ENERGIES_MEV = tuple(float(e) for e in np.geomspace(1e-3, 3.0, 36))
#: Highest electron energy of the extended table, MeV.
ELECTRON_TABLE_HE_MAX_MEV = 3.0
#: Scaled-radius bins (r / R_CSDA(E₀)) of the electron table.
ELECTRON_TABLE_NBINS = 400
#: Photon radial tally: log-spaced bins in mass thickness ρr, g/cm²; photons beyond the last edge
#: are counted as escaped (60 g/cm² = 60 cm of water: far beyond any kernel extent used here).
PHOTON_R_MIN_G_CM2 = 1.0e-4
PHOTON_R_MAX_G_CM2 = 60.0
PHOTON_NBINS = 240

#: Chebyshev offset up to which kernels are sampled (beyond: Gauss quadrature of the point kernel).
NEAR_FIELD = 3

#: Default number of point samples for voxel averaging (per component).
DEFAULT_SAMPLES = 10_000_000
#: Monte Carlo sizes and seeds of the shipped tables (recorded in their provenance).
ELECTRON_TABLE_HISTORIES = 100_000
PHOTON_TABLE_HISTORIES = 2_000_000
ELECTRON_TABLE_SEED = 20260101
PHOTON_TABLE_SEED = 20260102
KERNEL_SAMPLING_SEED = 20260103
ELECTRON_STEP_ENERGY_LOSS_FRACTION = 0.02


# =================================================================================================
# Media
# =================================================================================================


@dataclass(frozen=True)
class Medium:
    """A homogeneous medium: NIST compound composition (via xraylib), default density, I-value."""

    name: str
    nist_name: str  #: name in xraylib's NIST compound list
    density_g_cm3: float
    mean_excitation_eV: float
    source: str

    @property
    def composition(self) -> tuple[tuple[int, float], ...]:
        """(Z, mass fraction) pairs from xraylib's NIST compound table."""
        return _composition(self.nist_name)

    @property
    def table_key(self) -> str:
        """Name of the composition (transport tables in g/cm² depend on composition, not density)."""
        return self.nist_name.lower().replace(",", "").replace("(", "").replace(")", "").replace(" ", "-")


#: Media.  Densities: water 1.00 g/cm³ and ICRP soft tissue 1.00 g/cm³ and cortical bone 1.85 g/cm³
#: as in the NIST compound table (xraylib ``GetCompoundDataNISTByName``; ICRU Report 37 / 44
#: compositions); lung 0.26 g/cm³ = inflated lung (ICRP Publication 23, 1975: 260–1050 kg/m³
#: inflated–deflated), with the NIST 'Lung (ICRP)' composition.  I-values from ICRU Report 37
#: (as used by NIST ESTAR): water 75.0 eV, soft tissue (ICRP) 72.3 eV, cortical bone (ICRP) 106.4 eV,
#: lung (ICRP) 75.3 eV.
MEDIUM_DATA: dict[str, Medium] = {
    "water": Medium("water", "Water, Liquid", 1.00, 75.0, "ICRU 37; NIST compound 'Water, Liquid'"),
    "soft-tissue": Medium("soft-tissue", "Tissue, Soft (ICRP)", 1.00, 72.3, "ICRU 37; NIST 'Tissue, Soft (ICRP)'"),
    "cortical-bone": Medium(
        "cortical-bone", "Bone, Cortical (ICRP)", 1.85, 106.4, "ICRU 37; NIST 'Bone, Cortical (ICRP)'"
    ),
    "lung": Medium("lung", "Lung (ICRP)", 0.26, 75.3, "ICRU 37 composition; inflated density ICRP 23"),
}


#: Sternheimer density-effect parameters (C̄, x₀, x₁, a, m) per medium, δ₀ = 0 (insulators): Sternheimer,
#: Berger & Seltzer 1984, At. Data Nucl. Data Tables 30:261, table 1 ('Water, liquid', 'Tissue, soft (ICRP)',
#: 'Bone, cortical (ICRP)', 'Lung (ICRP)'; as used by NIST ESTAR).  C̄ = 1 + 2 ln(I/ħω_p) with
#: ħω_p = 28.816 √(ρ ⟨Z/A⟩) eV at the reference densities 1.00, 1.00, 1.85 and 1.05 g/cm³ (checked in the tests).
#: δ(x) = 0 for x < x₀; 2 ln10 x − C̄ + a (x₁ − x)^m for x₀ ≤ x < x₁; 2 ln10 x − C̄ above; x = log₁₀(p/mc).
#: Used only by the extended (≤ 3 MeV) electron table.  For lung the tabulated δ is that of 1.05 g/cm³; at the
#: inflated 0.26 g/cm³ δ is smaller (it scales with ln ρ at high energy), so the lung range above 1 MeV is
#: slightly short (< 1 % at 2 MeV).
STERNHEIMER: dict[str, tuple[float, float, float, float, float]] = {
    "water": (3.5017, 0.2400, 2.8004, 0.09116, 3.4773),
    "soft-tissue": (3.4354, 0.2211, 2.7799, 0.08926, 3.5110),
    "cortical-bone": (3.6488, 0.1161, 3.0919, 0.06198, 3.5919),
    "lung": (3.4708, 0.2261, 2.8001, 0.08588, 3.5353),
}


def density_effect_delta(energy_MeV: np.ndarray | float, med: Medium | str) -> np.ndarray:
    """Sternheimer density-effect correction δ(T) of the collision stopping power (:data:`STERNHEIMER`)."""
    med = get_medium(med) if isinstance(med, str) else med
    c_bar, x0, x1, a, m = STERNHEIMER[med.name]
    t = np.asarray(energy_MeV, dtype=float) / ELECTRON_REST_ENERGY_MEV
    x = np.log10(np.sqrt(t * (t + 2.0)))
    two_ln10 = 2.0 * math.log(10.0)
    mid = two_ln10 * x - c_bar + a * np.clip(x1 - x, 0.0, None) ** m
    out: np.ndarray = np.where(x < x0, 0.0, mid)
    return out


def get_medium(name: str) -> Medium:
    """The :class:`Medium` called ``name`` (one of :data:`MEDIA`; '_' and case are ignored)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    aliases = {"tissue": "soft-tissue", "softtissue": "soft-tissue", "bone": "cortical-bone"}
    key = aliases.get(key, key)
    if key not in MEDIUM_DATA:
        raise VoxeldoseError(f"unknown kernel medium {name!r}", expected=" or ".join(MEDIA), found=name)
    return MEDIUM_DATA[key]


@cache
def _composition(nist_name: str) -> tuple[tuple[int, float], ...]:
    import xraylib  # loads its data tables on import: only when a composition or cross section is computed

    c = xraylib.GetCompoundDataNISTByName(nist_name)
    return tuple((int(z), float(w)) for z, w in zip(c["Elements"], c["massFractions"]))


@cache
def _atomic_weight(z: int) -> float:
    import xraylib  # loads its data tables on import: only when a composition or cross section is computed

    return float(xraylib.AtomicWeight(z))


def data_versions() -> dict[str, str]:
    """Versions of the physics data packages a kernel depends on."""
    out = {}
    for pkg in ("icrp107-database", "xraylib", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "unknown"
    return out


# =================================================================================================
# Electron stopping power, CSDA range, elastic scattering
# =================================================================================================


def _z_over_a(med: Medium) -> float:
    """⟨Z/A⟩ = Σ wᵢ Zᵢ/Aᵢ, mol/g."""
    return sum(w * z / _atomic_weight(z) for z, w in med.composition)


def collision_stopping_power_MeV_cm2_g(
    energy_MeV: np.ndarray | float, med: Medium | str, *, density_effect: bool = False
) -> np.ndarray:
    """Mass collision stopping power of electrons, MeV cm²/g (Bethe formula, ICRU Report 37 eq. 2.3).

    S/ρ = 2π r_e² m c² N_A (Z/A) / β² · [ ln(τ²(τ+2) / (2 (I/mc²)²)) + F⁻(τ) − δ ],
    F⁻(τ) = 1 − β² + [τ²/8 − (2τ+1) ln 2] / (τ+1)²,  τ = T / mc².

    The density-effect correction δ is neglected by default (zero for water below 0.51 MeV, Sternheimer,
    Berger & Seltzer 1984, At. Data Nucl. Data Tables 30:261; the 1 MeV tables are built so) and included
    with ``density_effect=True`` (:func:`density_effect_delta`; the 3 MeV tables).  No shell corrections (as in
    ICRU 37 / ESTAR); ICRU 37 quotes 1–2 % uncertainty above 100 keV and 2–3 % at 10–100 keV for
    low-Z media.  Radiative stopping is left out: the radiation yield of a 0.5 MeV electron in water
    is 0.20 % (ESTAR), so ≤ 0.2 % of the electron energy would be re-emitted as bremsstrahlung; the
    kernel deposits it along the track instead.
    """
    med = get_medium(med) if isinstance(med, str) else med
    t = np.asarray(energy_MeV, dtype=float) / ELECTRON_REST_ENERGY_MEV
    gamma = t + 1.0
    beta2 = 1.0 - 1.0 / gamma**2
    i_rel = med.mean_excitation_eV * 1e-6 / ELECTRON_REST_ENERGY_MEV
    f_minus = 1.0 - beta2 + (t**2 / 8.0 - (2.0 * t + 1.0) * math.log(2.0)) / gamma**2
    k = 2.0 * math.pi * CLASSICAL_ELECTRON_RADIUS_CM**2 * ELECTRON_REST_ENERGY_MEV * AVOGADRO_PER_MOL
    delta = density_effect_delta(energy_MeV, med) if density_effect else 0.0
    return k * _z_over_a(med) / beta2 * (np.log(t**2 * (t + 2.0) / (2.0 * i_rel**2)) + f_minus - delta)


def _transport_xs_per_g(energy_MeV: np.ndarray, med: Medium) -> np.ndarray:
    """1/λ₁, first transport cross section per gram, cm²/g, screened Rutherford with Molière screening.

    Per atom: σ₁ = 2π Z(Z+1) (r_e m c² / (p v))² [ln(1 + 1/η) − 1/(1+η)], from
    dσ/dΩ = Z(Z+1) (r_e m c²/(p v))² / (1 − cos θ + 2η)²; the Z(Z+1) counts atomic electrons.  Molière's
    screening parameter η = ¼ (α Z^{1/3} m c / (0.885 p))² (1.13 + 3.76 (αZ/β)²) (Molière 1948; as in
    EGS4, Nelson, Hirayama & Rogers 1985, SLAC-265).
    """
    e = np.asarray(energy_MeV, dtype=float)
    m = ELECTRON_REST_ENERGY_MEV
    pc2 = e * (e + 2.0 * m)
    beta2 = pc2 / (e + m) ** 2
    pv = pc2 / (e + m)
    out = np.zeros_like(e)
    for z, w in med.composition:
        eta = (
            0.25
            * (FINE_STRUCTURE * z ** (1.0 / 3.0) / 0.885) ** 2
            * m**2
            / pc2
            * (1.13 + 3.76 * (FINE_STRUCTURE * z) ** 2 / beta2)
        )
        sigma1 = (
            2.0
            * math.pi
            * z
            * (z + 1.0)
            * (CLASSICAL_ELECTRON_RADIUS_CM * m / pv) ** 2
            * (np.log1p(1.0 / eta) - 1.0 / (1.0 + eta))
        )
        out += AVOGADRO_PER_MOL * w / _atomic_weight(z) * sigma1
    return out


@dataclass(frozen=True)
class _ElectronTables:
    """CSDA range R(E) (g/cm²) and G(E) = ∫ dE/(S λ₁) (number of transport mean free paths) on a log grid."""

    log_e: np.ndarray
    range_g_cm2: np.ndarray
    g_transport: np.ndarray

    def range(self, e: np.ndarray | float) -> np.ndarray:
        """CSDA range, g/cm², at energy ``e`` (MeV)."""
        out: np.ndarray = np.interp(np.log(e), self.log_e, self.range_g_cm2)
        return out

    def transport(self, e: np.ndarray | float) -> np.ndarray:
        """Transport mean free paths G(E) travelled while slowing down from ``e`` (MeV) to rest."""
        out: np.ndarray = np.interp(np.log(e), self.log_e, self.g_transport)
        return out


@cache
def _electron_tables(med_name: str, density_effect: bool = False) -> _ElectronTables:
    med = get_medium(med_name)
    e = np.geomspace(1e-3, 3.0, 2001)
    s = collision_stopping_power_MeV_cm2_g(e, med, density_effect=density_effect)
    # Below 1 keV (where Bethe fails) S ∝ 1/E is assumed: R(E_min) = E_min / (2 S(E_min)).
    inv = 1.0 / s
    r = np.concatenate([[0.0], np.cumsum(0.5 * (inv[1:] + inv[:-1]) * np.diff(e))]) + e[0] / (2.0 * s[0])
    gi = inv * _transport_xs_per_g(e, med)
    g = np.concatenate([[0.0], np.cumsum(0.5 * (gi[1:] + gi[:-1]) * np.diff(e))])
    return _ElectronTables(np.log(e), r, g)


def csda_range_g_cm2(
    energy_MeV: np.ndarray | float, medium: str = "water", *, density_effect: bool = False
) -> np.ndarray:
    """CSDA range R(T) = ∫₀^T dT'/S_col(T'), g/cm², by trapezoid integration of :func:`collision_stopping_power_MeV_cm2_g`."""
    return _electron_tables(get_medium(medium).name, density_effect).range(np.asarray(energy_MeV, dtype=float))


# --- modified Wentzel angular distribution --------------------------------------------------------

_MW_A = np.geomspace(1e-12, 1e7, 4000)
_MW_T = 2.0 * _MW_A * ((1.0 + _MW_A) * np.log1p(1.0 / _MW_A) - 1.0)


def _mw_screening_for_mean(t_mean: np.ndarray | float) -> np.ndarray:
    """A such that the distribution p(μ) = 2A(1+A)/(1−μ+2A)² has ⟨1−μ⟩ = t_mean (0 < t_mean < 1).

    ⟨1−μ⟩ = 2A[(1+A) ln((1+A)/A) − 1] (Fernández-Varea et al. 1993), inverted by log interpolation.
    """
    t = np.clip(t_mean, _MW_T[0], _MW_T[-1])
    out: np.ndarray = np.exp(np.interp(np.log(t), np.log(_MW_T), np.log(_MW_A)))
    return out


def _rotate(u: np.ndarray, cos_t: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Directions ``u`` (n,3) deflected by polar cos θ and azimuth φ (standard rotation formulas)."""
    sin_t = np.sqrt(np.maximum(0.0, 1.0 - cos_t**2))
    cp, sp = np.cos(phi), np.sin(phi)
    ux, uy, uz = u[:, 0], u[:, 1], u[:, 2]
    s = np.sqrt(np.maximum(0.0, 1.0 - uz**2))
    small = s < 1e-8
    s_safe = np.where(small, 1.0, s)
    nx = ux * cos_t + sin_t * (ux * uz * cp - uy * sp) / s_safe
    ny = uy * cos_t + sin_t * (uy * uz * cp + ux * sp) / s_safe
    nz = uz * cos_t - sin_t * cp * s
    if small.any():
        sign = np.where(uz >= 0, 1.0, -1.0)
        nx = np.where(small, sin_t * cp, nx)
        ny = np.where(small, sin_t * sp, ny)
        nz = np.where(small, sign * cos_t, nz)
    out = np.stack([nx, ny, nz], axis=1)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def simulate_electron_dpk(
    energy_MeV: float,
    medium: str = "water",
    n_histories: int = 20_000,
    *,
    rng: np.random.Generator | None = None,
    loss_fraction: float = ELECTRON_STEP_ENERGY_LOSS_FRACTION,
    nbins: int = ELECTRON_TABLE_NBINS,
    scattering: bool = True,
    density_effect: bool = False,
) -> np.ndarray:
    """Radial energy deposition of monoenergetic electrons from a point in an infinite medium.

    Returns the fraction of the initial energy deposited in each scaled-radius bin
    ``x = r / R_CSDA(E₀)`` of width ``1/nbins`` on [0, 1] (sums to 1: CSDA, no energy escapes).

    Class-I condensed history: every step loses the fraction ``loss_fraction`` of the energy (CSDA,
    so all histories share the energy sequence and step lengths s = R(Eᵢ) − R(Eᵢ₊₁)); the step is
    split at a uniformly random hinge point where the deflection, sampled from the modified Wentzel
    distribution with ⟨1 − cos θ⟩ = 1 − exp(−∫ds/λ₁), is applied, and where the step's energy loss is
    deposited.  Below :data:`ELECTRON_CUTOFF_MEV` one last hinged step of the residual range ends the
    track.  Energy-loss straggling and δ-ray transport are not modelled (CSDA).  ``scattering=False``
    gives straight tracks (for tests: the mean deposition radius is then known analytically).
    ``density_effect`` selects the stopping power with Sternheimer's δ (the extended 3 MeV tables).
    """
    rng = np.random.default_rng() if rng is None else rng
    tabs = _electron_tables(get_medium(medium).name, density_effect)
    e_seq = [float(energy_MeV)]
    while e_seq[-1] * (1.0 - loss_fraction) >= ELECTRON_CUTOFF_MEV:
        e_seq.append(e_seq[-1] * (1.0 - loss_fraction))
    e_seq.append(0.0)
    r0 = float(tabs.range(energy_MeV))
    n = int(n_histories)
    pos = np.zeros((n, 3))
    u = np.zeros((n, 3))
    u[:, 2] = 1.0  # by isotropy of the medium the starting direction is arbitrary
    hist = np.zeros(nbins)
    for e_hi, e_lo in zip(e_seq[:-1], e_seq[1:]):
        r_hi = float(tabs.range(e_hi))
        r_lo = float(tabs.range(e_lo)) if e_lo > 0 else 0.0
        s = r_hi - r_lo
        # transport mean free paths travelled in the step; the last step (to rest) is isotropising
        g = float(tabs.transport(e_hi) - tabs.transport(e_lo)) if e_lo > 0 else 50.0
        t_mean = -math.expm1(-g)
        a = float(_mw_screening_for_mean(t_mean)) if scattering else 0.0
        tau = rng.random(n) * s
        hinge = pos + tau[:, None] * u
        x = np.linalg.norm(hinge, axis=1) / r0
        idx = np.minimum((x * nbins).astype(np.int64), nbins - 1)
        hist += np.bincount(idx, minlength=nbins) * ((e_hi - e_lo) / energy_MeV / n)
        xi = rng.random(n)
        cos_t = 1.0 - 2.0 * a * xi / (1.0 - xi + a)
        u = _rotate(u, cos_t, rng.random(n) * (2.0 * math.pi))
        pos = hinge + (s - tau)[:, None] * u
    return hist


def build_electron_table(
    medium: str,
    n_histories: int = ELECTRON_TABLE_HISTORIES,
    seed: int = ELECTRON_TABLE_SEED,
    *,
    extended: bool = False,
) -> dict[str, Any]:
    """Monoenergetic scaled-DPK table (see :func:`simulate_electron_dpk`): :data:`ELECTRON_TABLE_ENERGIES_MEV`
    without the density effect, or with ``extended`` :data:`ELECTRON_TABLE_HE_ENERGIES_MEV` with it."""
    med = get_medium(medium)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    energies = ELECTRON_TABLE_HE_ENERGIES_MEV if extended else ELECTRON_TABLE_ENERGIES_MEV
    hists = np.array(
        [simulate_electron_dpk(e, med.name, n_histories, rng=rng, density_effect=extended) for e in energies]
    )
    return {
        "energies_MeV": np.array(energies),
        "csda_range_g_cm2": _electron_tables(med.name, extended).range(np.array(energies)),
        "scaled_fraction": hists,
        "provenance": {
            "kind": "electron scaled dose-point-kernel table",
            "medium_composition": med.nist_name,
            "mean_excitation_eV": med.mean_excitation_eV,
            "method": "class-I condensed history, CSDA Bethe (ICRU 37), modified-Wentzel angular deflection "
            "matched to screened-Rutherford/Moliere first transport moment, random hinge",
            "n_histories_per_energy": n_histories,
            "step_energy_loss_fraction": ELECTRON_STEP_ENERGY_LOSS_FRACTION,
            "electron_cutoff_MeV": ELECTRON_CUTOFF_MEV,
            "nbins_scaled_radius": ELECTRON_TABLE_NBINS,
            "seed": seed,
            "build_seconds": round(time.perf_counter() - t0, 1),
            **(
                {
                    "density_effect": "Sternheimer, Berger & Seltzer 1984 (C, x0, x1, a, m) = "
                    + str(STERNHEIMER[med.name])
                }
                if extended
                else {}
            ),
        },
    }


# =================================================================================================
# Photon Monte Carlo
# =================================================================================================


@dataclass(frozen=True)
class _PhotonXS:
    log_e: np.ndarray  # grid, ln(keV)
    photo: np.ndarray  # cm²/g
    incoh: np.ndarray
    coh: np.ndarray
    total: np.ndarray
    mu_en: np.ndarray
    cos_incoh: np.ndarray  # [n_e, n_u] inverse-CDF tables of cos θ
    cos_coh: np.ndarray


@cache
def _photon_xs(nist_name: str, e_max_keV: float) -> _PhotonXS:
    """xraylib cross sections (cm²/g) on a log grid 1 keV … e_max and inverse-CDF tables of cos θ."""
    import xraylib  # loads its data tables on import: only when a composition or cross section is computed

    e = np.geomspace(1.0, max(e_max_keV * 1.02, 2.0), 160)
    lo = e <= XRAYLIB_MAX_KEV
    photo = np.array([xraylib.CS_Photo_CP(nist_name, x) for x in e[lo]])
    incoh = np.array([xraylib.CS_Compt_CP(nist_name, x) for x in e[lo]])
    coh = np.array([xraylib.CS_Rayl_CP(nist_name, x) for x in e[lo]])
    mu_en = np.array([xraylib.CS_Energy_CP(nist_name, x) for x in e])
    if not lo.all():
        # above xraylib's tables (photons of Y-90, Tl-208, Bi-212/213, Tl-209 …): Compton = Klein–Nishina per
        # free electron × electrons per gram (binding is negligible: at 700 keV CS_Compt_CP/KN = 1.000 in
        # water); photoelectric and coherent extrapolated log-log from the top two grid points below 800 keV
        # (both < 0.1 % of μ there).  Pair production (threshold 1.022 MeV) is not modelled: in water 0.8 % of
        # μ at 2 MeV and ≈ 2 % at Tl-208's 2.6 MeV line (XCOM), whose mean free path is that much too long.
        med = next(m for m in MEDIUM_DATA.values() if m.nist_name == nist_name)
        e_per_g = AVOGADRO_PER_MOL * _z_over_a(med) * 1e-24  # electrons per g × (barn → cm²)
        hi = e[~lo]
        le = np.log(e[lo][-2:])

        def extrap(arr: np.ndarray) -> np.ndarray:
            la = np.log(arr[-2:])
            out: np.ndarray = np.exp(la[1] + (np.log(hi) - le[1]) * (la[1] - la[0]) / (le[1] - le[0]))
            return out

        photo = np.concatenate([photo, extrap(photo)])
        coh = np.concatenate([coh, extrap(coh)])
        incoh = np.concatenate([incoh, np.array([xraylib.CS_KN(x) for x in hi]) * e_per_g])
    theta = np.concatenate([np.linspace(1e-6, 0.2, 400, endpoint=False), np.linspace(0.2, math.pi, 1200)])
    levels = np.linspace(0.0, 1.0, 1025)
    cos_tabs = []
    for fn in (xraylib.DCS_Compt_CP, xraylib.DCS_Rayl_CP):
        tab = np.empty((e.size, levels.size))
        for i, x in enumerate(e):
            if x <= XRAYLIB_MAX_KEV:
                d = np.array([_safe_dcs(fn, nist_name, x, th) for th in theta])
            elif fn is xraylib.DCS_Compt_CP:  # Klein–Nishina (S(q) → Z beyond xraylib's range)
                d = np.array([xraylib.DCS_KN(x, th) for th in theta])
            else:  # coherent: the angular shape at the table's end, squeezed by q ∝ E sin(θ/2)
                th_lo = np.clip(
                    2.0 * np.arcsin(np.minimum(1.0, np.sin(theta / 2) * x / XRAYLIB_MAX_KEV)), 1e-6, math.pi
                )
                d = np.array([_safe_dcs(fn, nist_name, XRAYLIB_MAX_KEV, th) for th in th_lo])
            ok = np.isfinite(d)
            # outside xraylib's S(q)/F(q) tables: forward of the first valid angle the incoherent DCS → 0
            # (S(0) = 0) and the coherent DCS ≈ its first valid value; backward, the last valid value.
            first, last = np.argmax(ok), ok.size - 1 - np.argmax(ok[::-1])
            d[:first] = 0.0 if fn is xraylib.DCS_Compt_CP else d[first]
            d[last + 1 :] = d[last]
            d = d * np.sin(theta)
            cdf = np.concatenate([[0.0], np.cumsum(0.5 * (d[1:] + d[:-1]) * np.diff(theta))])
            cdf /= cdf[-1]
            tab[i] = np.cos(np.interp(levels, cdf, theta))
        cos_tabs.append(tab)
    return _PhotonXS(np.log(e), photo, incoh, coh, photo + incoh + coh, mu_en, cos_tabs[0], cos_tabs[1])


def _safe_dcs(fn: Any, name: str, e_keV: float, theta: float) -> float:
    try:
        return float(fn(name, e_keV, theta))
    except ValueError:
        return float("nan")


def _loglog(xs: _PhotonXS, arr: np.ndarray, e_keV: np.ndarray) -> np.ndarray:
    """``arr`` (on the grid ``xs.log_e``) at ``e_keV``, interpolated linearly in log-log."""
    out: np.ndarray = np.exp(np.interp(np.log(e_keV), xs.log_e, np.log(arr)))
    return out


def _sample_cos(tab: np.ndarray, xs: _PhotonXS, e_keV: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """cos θ from the inverse-CDF table, energy interpolated stochastically between grid points."""
    le = np.log(e_keV)
    f = (le - xs.log_e[0]) / (xs.log_e[1] - xs.log_e[0])
    i0 = np.clip(np.floor(f).astype(np.int64), 0, xs.log_e.size - 2)
    ie = i0 + (rng.random(e_keV.size) < (f - i0))
    ie = np.clip(ie, 0, xs.log_e.size - 1)
    q = rng.random(e_keV.size) * (tab.shape[1] - 1)
    j = np.minimum(q.astype(np.int64), tab.shape[1] - 2)
    w = q - j
    out: np.ndarray = np.clip(tab[ie, j] * (1.0 - w) + tab[ie, j + 1] * w, -1.0, 1.0)
    return out


def photon_radial_edges() -> np.ndarray:
    """Edges (g/cm²) of the photon radial tally: [0, r_min, …log-spaced…, r_max]."""
    return np.concatenate([[0.0], np.geomspace(PHOTON_R_MIN_G_CM2, PHOTON_R_MAX_G_CM2, PHOTON_NBINS)])


def simulate_photon_radial(
    lines: Sequence[tuple[float, float]],
    medium: str = "water",
    n_histories: int = 200_000,
    *,
    rng: np.random.Generator | None = None,
    first_collision_only: bool = False,
) -> dict[str, Any]:
    """Energy deposition versus radius (g/cm²) for photons from a point in an infinite medium.

    ``lines`` are (energy MeV, yield) pairs; photons are started with energies drawn by yield.
    Returns the deposited energy per bin of :func:`photon_radial_edges` and the escaped energy
    (beyond :data:`PHOTON_R_MAX_G_CM2`), both as fractions of the emitted photon energy.

    Interactions: photoelectric absorption (all energy deposited locally: fluorescence of O, C, N is
    < 0.6 keV; Ca K (3.7 keV, bone) travels < 0.1 mm), incoherent scattering (angle from xraylib
    ``DCS_Compt_CP`` = Klein–Nishina × incoherent scattering function; scattered energy from the
    Compton formula; the electron's energy deposited locally, its range ≪ voxel), coherent scattering
    (angle from ``DCS_Rayl_CP``).  Photons below :data:`PHOTON_CUTOFF_MEV` are absorbed on the spot.
    With ``first_collision_only`` each photon's first interaction is scored and the photon then dropped
    (used to validate against μ_en/μ).
    """
    rng = np.random.default_rng() if rng is None else rng
    med = get_medium(medium)
    e_lines = np.array([e for e, _ in lines], dtype=float) * 1e3  # keV
    y_lines = np.array([y for _, y in lines], dtype=float)
    xs = _photon_xs(med.nist_name, float(e_lines.max()))
    n = int(n_histories)
    e = rng.choice(e_lines, size=n, p=y_lines / y_lines.sum())
    e_emitted = float(e.sum())
    pos = np.zeros((n, 3))
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    edges = photon_radial_edges()
    log_lo, log_hi = math.log(PHOTON_R_MIN_G_CM2), math.log(PHOTON_R_MAX_G_CM2)
    nb = edges.size - 1
    dep = np.zeros(nb)
    escaped = 0.0

    def score(p: np.ndarray, w: np.ndarray) -> None:
        r = np.linalg.norm(p, axis=1)
        k = np.where(
            r < PHOTON_R_MIN_G_CM2,
            0,
            1
            + np.floor((np.log(np.maximum(r, PHOTON_R_MIN_G_CM2)) - log_lo) / (log_hi - log_lo) * (nb - 1)).astype(
                np.int64
            ),
        )
        dep[:] += np.bincount(np.minimum(k, nb - 1), weights=w, minlength=nb)

    low = e < PHOTON_CUTOFF_MEV * 1e3
    if low.any():
        score(pos[low], e[low])
    alive = ~low
    pos, u, e = pos[alive], u[alive], e[alive]
    while e.size:
        mu = _loglog(xs, xs.total, e)
        d = -np.log(rng.random(e.size)) / mu
        pos = pos + d[:, None] * u
        r = np.linalg.norm(pos, axis=1)
        out = r >= PHOTON_R_MAX_G_CM2
        escaped += float(e[out].sum())
        pos, u, e, mu = pos[~out], u[~out], e[~out], mu[~out]
        xi = rng.random(e.size) * mu
        pe = _loglog(xs, xs.photo, e)
        inc = _loglog(xs, xs.incoh, e)
        is_pe = xi < pe
        is_inc = (~is_pe) & (xi < pe + inc)
        deposit = np.where(is_pe, e, 0.0)
        cos_t = np.ones(e.size)
        if is_inc.any():
            c = _sample_cos(xs.cos_incoh, xs, e[is_inc], rng)
            e_new = e[is_inc] / (1.0 + e[is_inc] / (ELECTRON_REST_ENERGY_MEV * 1e3) * (1.0 - c))
            deposit[is_inc] = e[is_inc] - e_new
            cos_t[is_inc] = c
            e = e.copy()
            e[is_inc] = e_new
        is_coh = ~(is_pe | is_inc)
        if is_coh.any():
            cos_t[is_coh] = _sample_cos(xs.cos_coh, xs, e[is_coh], rng)
        low = ~is_pe & (e < PHOTON_CUTOFF_MEV * 1e3)
        deposit[low] += e[low]
        keep = ~is_pe & ~low
        if first_collision_only:
            keep[:] = False
        score(pos, deposit)
        u = _rotate(u[keep], cos_t[keep], rng.random(int(keep.sum())) * (2.0 * math.pi))
        pos, e = pos[keep], e[keep]
    return {"edges_g_cm2": edges, "fraction": dep / e_emitted, "escaped_fraction": escaped / e_emitted}


def build_photon_table(
    nuclide: str, medium: str, n_histories: int = PHOTON_TABLE_HISTORIES, seed: int = PHOTON_TABLE_SEED
) -> dict[str, Any]:
    """Radial photon energy-deposition table for a nuclide's lines ≥ :data:`PHOTON_CUTOFF_MEV` in a medium."""
    nuc = _nuc.load(nuclide)
    med = get_medium(medium)
    lines = _nuc.photon_lines(nuc, PHOTON_CUTOFF_MEV)
    t0 = time.perf_counter()
    res = simulate_photon_radial(lines, med.name, n_histories, rng=np.random.default_rng(seed))
    e_transported = sum(e * y for e, y in lines)
    return {
        "edges_g_cm2": res["edges_g_cm2"],
        "fraction": res["fraction"],
        "escaped_fraction": np.array(res["escaped_fraction"]),
        "transported_energy_MeV": np.array(e_transported),
        "provenance": {
            "kind": "photon radial energy-deposition table",
            "nuclide": nuc.name,
            "medium_composition": med.nist_name,
            "method": "analogue photon MC: xraylib CS_Photo_CP/CS_Compt_CP/CS_Rayl_CP, angles from DCS_Compt_CP "
            "(Klein-Nishina x incoherent scattering function) and DCS_Rayl_CP, local deposition of electron energy",
            "lines": len(lines),
            "photon_cutoff_MeV": PHOTON_CUTOFF_MEV,
            "r_max_g_cm2": PHOTON_R_MAX_G_CM2,
            "n_histories": n_histories,
            "seed": seed,
            "build_seconds": round(time.perf_counter() - t0, 1),
        },
    }


# =================================================================================================
# Nuclide electron source spectrum
# =================================================================================================


def electron_components(nuclide: str, n_beta: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Electron source energies (MeV) and their energy weights (MeV per decay).

    β continuum: the ICRP-107 'b-spectra' density, refined to ``n_beta`` bins, each bin's energy
    weight ∫E p(E) dE, rescaled so that the total equals the ICRP-107 mean β energy per decay (the
    trapezoid integral of the tabulated spectrum differs by 0.2 % for Lu-177).  Plus every IE and
    Auger line (energy × yield).
    """
    nuc = _nuc.load(nuclide)
    es, ws = [], []
    spec = np.array(_nuc.beta_spectrum(nuc), dtype=float)
    beta_mean = _nuc.mean_energy_per_decay_MeV(nuc, ("beta-",))
    if spec.size and beta_mean > 0:
        edges = np.linspace(0.0, spec[:, 0].max(), n_beta + 1)
        fine = np.linspace(0.0, spec[:, 0].max(), 20 * n_beta + 1)
        dens = np.interp(fine, spec[:, 0], spec[:, 1]) * fine
        cum = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(fine))])
        w = np.diff(np.interp(edges, fine, cum))
        mid = 0.5 * (edges[1:] + edges[:-1])
        w *= beta_mean / w.sum()
        es.append(mid)
        ws.append(w)
    lines = _nuc.discrete_electron_lines(nuc)
    if lines:
        es.append(np.array([e for e, _ in lines]))
        ws.append(np.array([e * y for e, y in lines]))
    if not es:
        return np.zeros(0), np.zeros(0)
    e, w = np.concatenate(es), np.concatenate(ws)
    if e.max() > ELECTRON_TABLE_HE_MAX_MEV:
        raise VoxeldoseError(
            f"{nuc.name} emits electrons up to {e.max():.3f} MeV; the electron kernel tables cover "
            f"≤ {ELECTRON_TABLE_HE_MAX_MEV:g} MeV",
            expected=f"a nuclide with β end-point and conversion lines ≤ {ELECTRON_TABLE_HE_MAX_MEV:g} MeV",
        )
    return e, w


def needs_extended_electron_table(nuclide: str) -> bool:
    """True when the nuclide emits electrons above the 1 MeV table (β end-point or a conversion line)."""
    e, _ = electron_components(nuclide)
    return bool(e.size) and float(e.max()) > ELECTRON_TABLE_ENERGIES_MEV[-1]


# =================================================================================================
# Alpha particles: local deposition with a range check
# =================================================================================================

#: Highest α energy for which :data:`ALPHA_RANGE_BOUND_WATER_G_CM2` is a bound, MeV.  The most energetic α of
#: the supported chains is Po-212's 8.785 MeV (ICRP-107).
ALPHA_MAX_ENERGY_MEV = 9.0
#: Upper bound of the CSDA range of an α particle of ≤ 9 MeV in liquid water, g/cm² (= 0.1 mm at 1 g/cm³).
#: NIST ASTAR (Berger, Coursey, Zucker & Chang, NIST Standard Reference Database 124; stopping powers of
#: ICRU Report 49, 1993): CSDA ranges of 5–9 MeV α in liquid water ≈ 40–90 µm.  Other media: scaled by the
#: ratio of electron CSDA ranges at 1 MeV when that is > 1 (Bethe: the same ⟨Z/A⟩ and I-value dependence).
ALPHA_RANGE_BOUND_WATER_G_CM2 = 0.010
#: Largest accepted bound on the fraction of α energy escaping the source voxel (else: voxels too small for
#: local deposition, an error).
ALPHA_MAX_ESCAPE_FRACTION = 0.05


def alpha_range_bound_mm(medium: str, density_g_cm3: float) -> float:
    """Upper bound (mm) of the range of α particles of ≤ 9 MeV in the medium at this density."""
    med = get_medium(medium)
    scale = float(csda_range_g_cm2(1.0, med.name) / csda_range_g_cm2(1.0, "water"))
    return ALPHA_RANGE_BOUND_WATER_G_CM2 * max(scale, 1.0) * 10.0 / density_g_cm3


def alpha_escape_bound(range_mm: float, voxel_mm: tuple[float, float, float]) -> float:
    """Upper bound of the fraction of the energy deposited within ``range_mm`` of a uniform point in a box
    that lands outside it: the first-order covariogram term r·Σ(1/aᵢ)/2 (Cauchy's S/4V) at r = range; the
    exact escape (r ≤ min side) lies below its first-order term (docs/kernels.md)."""
    return range_mm * sum(1.0 / a for a in voxel_mm) / 2.0


# =================================================================================================
# Voxel averaging
# =================================================================================================


def _gauss_tent(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes/weights on [−1, 1] for ∫ f(t) (1 − |t|) dt (n Gauss–Legendre points per half), weights sum to 1."""
    x, w = np.polynomial.legendre.leggauss(n)
    t = 0.5 * (x + 1.0)  # [0, 1]
    wt = 0.5 * w * (1.0 - t)
    nodes = np.concatenate([-t[::-1], t])
    weights = np.concatenate([wt[::-1], wt])
    return nodes, weights / weights.sum()


def _sample_voxels(
    edges_mm: np.ndarray,
    cdf: np.ndarray,
    voxel: tuple[float, float, float],
    half: tuple[int, int, int],
    n_samples: int,
    rng: np.random.Generator,
    chunk: int = 1_000_000,
) -> np.ndarray:
    """Energy fraction per voxel of the (2h+1) box by point sampling.  ``cdf`` must end at the total
    fraction deposited within the last edge; the remainder is drawn as 'beyond' and not scored."""
    hi, hj, hk = half
    shape = (2 * hk + 1, 2 * hj + 1, 2 * hi + 1)
    counts = np.zeros(int(np.prod(shape)))
    dx, dy, dz = voxel
    total = float(cdf[-1])
    done = 0
    while done < n_samples:
        m = min(chunk, n_samples - done)
        q = rng.random(m)
        inside = q < total
        r = np.interp(q[inside], cdf, edges_mm)
        k = r.size
        z = 2.0 * rng.random(k) - 1.0
        phi = 2.0 * math.pi * rng.random(k)
        s = np.sqrt(1.0 - z * z)
        px = (rng.random(k) - 0.5) * dx + r * s * np.cos(phi)
        py = (rng.random(k) - 0.5) * dy + r * s * np.sin(phi)
        pz = (rng.random(k) - 0.5) * dz + r * z
        ii = np.floor(px / dx + 0.5).astype(np.int64)
        jj = np.floor(py / dy + 0.5).astype(np.int64)
        kk = np.floor(pz / dz + 0.5).astype(np.int64)
        ok = (np.abs(ii) <= hi) & (np.abs(jj) <= hj) & (np.abs(kk) <= hk)
        flat = ((kk[ok] + hk) * shape[1] + (jj[ok] + hj)) * shape[2] + (ii[ok] + hi)
        counts += np.bincount(flat, minlength=counts.size)
        done += m
    return counts.reshape(shape) / n_samples


def _symmetrise(a: np.ndarray, cubic: bool) -> np.ndarray:
    """Average over the 8 reflections (and the 6 axis permutations when voxels and shape are cubic)."""
    a = (a + a[::-1]) / 2
    a = (a + a[:, ::-1]) / 2
    a = (a + a[:, :, ::-1]) / 2
    if cubic and a.shape[0] == a.shape[1] == a.shape[2]:
        a = cast(np.ndarray, sum(np.transpose(a, p) for p in permutations(range(3))) / 6.0)
    return a


def voxelise(
    edges_mm: np.ndarray,
    cdf: np.ndarray,
    voxel_mm: tuple[float, float, float],
    size: tuple[int, int, int],
    *,
    n_samples: int = DEFAULT_SAMPLES,
    rng: np.random.Generator | None = None,
    far_field: bool = True,
    gauss_points: int = 3,
    near_field: int = NEAR_FIELD,
) -> np.ndarray:
    """Fraction of the energy emitted uniformly in the central voxel that is absorbed in each voxel.

    ``edges_mm``/``cdf``: cumulative radial energy-deposition distribution (fraction within r).
    ``voxel_mm`` = (di, dj, dk); ``size`` = (ni, nj, nk) odd; returns array ``[k, j, i]``.
    Voxels with Chebyshev offset ≤ ``near_field`` (default :data:`NEAR_FIELD`) are sampled; farther ones (if ``far_field``)
    use Gauss quadrature over the tent-shaped displacement density of the shell-averaged point kernel.
    """
    rng = np.random.default_rng(KERNEL_SAMPLING_SEED) if rng is None else rng
    ni, nj, nk = size
    half = (ni // 2, nj // 2, nk // 2)
    dx, dy, dz = voxel_mm
    near = cast(tuple[int, int, int], tuple(min(h, near_field) for h in half))
    out = np.zeros((nk, nj, ni))
    ns = _sample_voxels(edges_mm, cdf, voxel_mm, near, n_samples, rng)
    sk, sj, si = (slice(h - n, h + n + 1) for h, n in zip(half[::-1], near[::-1]))
    out[sk, sj, si] = ns
    if far_field and max(half) > near_field:
        # shell-averaged point kernel (fraction per mm³) at shell mid-radii, log-log interpolated
        de = np.diff(cdf)
        vol = 4.0 / 3.0 * math.pi * np.diff(edges_mm**3)
        r_mid = np.cbrt(0.5 * (edges_mm[1:] ** 3 + edges_mm[:-1] ** 3))
        good = (de > 0) & (r_mid > 0)
        lr, lg = np.log(r_mid[good]), np.log(de[good] / vol[good])
        kk, jj, ii = np.meshgrid(
            np.arange(-half[2], half[2] + 1),
            np.arange(-half[1], half[1] + 1),
            np.arange(-half[0], half[0] + 1),
            indexing="ij",
        )
        far = np.maximum(np.maximum(np.abs(ii), np.abs(jj)), np.abs(kk)) > near_field
        ci, cj, ck = ii[far] * dx, jj[far] * dy, kk[far] * dz
        t, w = _gauss_tent(gauss_points)
        acc = np.zeros(ci.size)
        r_max = edges_mm[-1]
        for a, wa in zip(t, w):
            for b, wb in zip(t, w):
                for c, wc in zip(t, w):
                    r = np.sqrt((ci + a * dx) ** 2 + (cj + b * dy) ** 2 + (ck + c * dz) ** 2)
                    g = np.exp(np.interp(np.log(r), lr, lg))
                    acc += wa * wb * wc * np.where(r < r_max, g, 0.0)
        out[far] = acc * (dx * dy * dz)
    cubic = abs(dx - dy) < 1e-9 and abs(dy - dz) < 1e-9 and ni == nj == nk
    return _symmetrise(out, cubic)
