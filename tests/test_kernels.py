"""Dose-voxel kernels: physics validation with tolerances derived from the physics and the MC statistics.

Reference values and where they come from:
- Collision stopping powers and CSDA ranges of electrons in liquid water: NIST ESTAR (Berger, Coursey,
  Zucker & Chang, NIST SRD 124; method of ICRU Report 37, I = 75 eV).  ICRU 37 quotes 1–2 % uncertainty
  above 100 keV and 2–3 % at 10–100 keV for low-Z media.
- Energy per decay of Lu-177: ICRP Publication 107 (147.9 keV electrons, 35.1 keV photons).
- Photon μ_en/ρ and μ/ρ: xraylib (NIST compound tables).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxeldose import kernelphysics as KP
from voxeldose import kernels as K
from voxeldose import nuclides as N
from voxeldose.errors import VoxeldoseError

# NIST ESTAR, liquid water: (T MeV, S_col MeV cm²/g, CSDA range g/cm²)
ESTAR_WATER = [
    (0.01, 22.56, 2.515e-4),
    (0.05, 6.603, 4.320e-3),
    (0.1, 4.115, 1.431e-2),
    (0.2, 2.793, 4.488e-2),
    (0.5, 2.034, 1.766e-1),
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXELDOSE_KERNEL_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# Nuclide data
# ---------------------------------------------------------------------------------------------


def test_lu177_energy_per_decay_matches_icrp107():
    nuc = N.load("Lu-177")
    assert N.electron_energy_per_decay_MeV(nuc) == pytest.approx(0.1479, rel=2e-3)
    assert N.photon_energy_per_decay_MeV(nuc) == pytest.approx(0.0351, rel=3e-3)
    assert max(e for e, _ in N.beta_spectrum(nuc)) == pytest.approx(0.498, abs=1e-3)
    e, w = KP.electron_components("Lu-177")
    # β continuum rescaled to the ICRP mean β energy; + IE + Auger = total electron energy
    assert w.sum() == pytest.approx(N.electron_energy_per_decay_MeV(nuc), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Electron stopping power and CSDA range (Bethe, ICRU 37) against ESTAR
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_mev,s_ref,r_ref", ESTAR_WATER)
def test_bethe_stopping_power_and_csda_range_vs_estar(t_mev, s_ref, r_ref):
    s = float(KP.collision_stopping_power_MeV_cm2_g(t_mev, "water"))
    r = float(KP.csda_range_g_cm2(t_mev, "water"))
    # same formula as ESTAR (no shell corrections, δ = 0 below 0.5 MeV): agreement to table rounding
    assert s == pytest.approx(s_ref, rel=5e-3)
    # range integration: the S ∝ 1/E extrapolation below 1 keV adds < 1 % at 10 keV
    assert r == pytest.approx(r_ref, rel=0.02)


def test_lu177_max_beta_csda_range_in_water():
    # Lu-177 β end-point 0.4978 MeV (ICRP-107).  Reference: ESTAR's 0.5 MeV row, stepped down by ΔT/S_total
    # (dR/dT = 1/S; the radiative part of S at 0.5 MeV is < 1 % of the collision part, ESTAR), in water
    # (1 g/cm³, so g/cm² × 10 = mm): 0.1766 − 0.0022/2.034 ≈ 0.1755 g/cm² → 1.755 mm.
    t_ref, s_ref, r_ref = ESTAR_WATER[-1]
    assert t_ref == 0.5
    r_ref_mm = 10.0 * (r_ref - (t_ref - 0.4978) / s_ref)
    r_mm = float(KP.csda_range_g_cm2(0.4978, "water")) * 10.0
    # same tolerance as the range integration against ESTAR above (2 %)
    assert r_mm == pytest.approx(r_ref_mm, rel=0.02)


# ---------------------------------------------------------------------------------------------
# Electron condensed-history Monte Carlo
# ---------------------------------------------------------------------------------------------


def test_electron_mc_conserves_energy_and_stays_within_csda_range():
    h = KP.simulate_electron_dpk(0.2, "water", 2000, rng=np.random.default_rng(1))
    assert h.sum() == pytest.approx(1.0, abs=1e-12)  # CSDA: every MeV deposited, none beyond R_CSDA
    assert h.shape == (KP.ELECTRON_TABLE_NBINS,)


def test_electron_mc_straight_tracks_reproduce_analytic_mean_radius():
    # Without scattering the deposition radius of the energy lost at energy E is R(E0) − R(E), so the
    # energy-weighted mean scaled radius is 1 − ∫₀^E0 R(E) dE / (E0 R(E0)).
    e0 = 0.3
    h = KP.simulate_electron_dpk(e0, "water", 400, rng=np.random.default_rng(2), scattering=False)
    x = (np.arange(h.size) + 0.5) / h.size
    e = np.linspace(0, e0, 20001)
    r = KP.csda_range_g_cm2(np.maximum(e, 1e-3), "water") * (e >= 1e-3)
    expected = 1.0 - np.trapezoid(r, e) / (e0 * float(KP.csda_range_g_cm2(e0, "water")))
    # histogram-bin discretisation (1/400) and the hinge position are the only differences
    assert (h * x).sum() == pytest.approx(expected, abs=3e-3)


def test_electron_mc_scattering_pulls_energy_inward_and_step_size_converged():
    rng = np.random.default_rng(3)
    x = (np.arange(KP.ELECTRON_TABLE_NBINS) + 0.5) / KP.ELECTRON_TABLE_NBINS
    fine = KP.simulate_electron_dpk(0.2, "water", 4000, rng=rng, loss_fraction=0.02)
    coarse = KP.simulate_electron_dpk(0.2, "water", 4000, rng=rng, loss_fraction=0.05)
    straight = KP.simulate_electron_dpk(0.2, "water", 200, rng=rng, scattering=False)
    m_f, m_c, m_s = (fine * x).sum(), (coarse * x).sum(), (straight * x).sum()
    assert m_f < 0.8 * m_s  # multiple scattering folds the tracks
    # MC standard error of the mean scaled radius with 4000 histories ≈ 0.003
    assert m_f == pytest.approx(m_c, abs=0.012)


def test_electron_table_shipped_and_consistent():
    tab = K.electron_table("water")
    assert tab["scaled_fraction"].shape == (len(KP.ELECTRON_TABLE_ENERGIES_MEV), KP.ELECTRON_TABLE_NBINS)
    np.testing.assert_allclose(tab["scaled_fraction"].sum(axis=1), 1.0, atol=1e-9)
    prov = tab["provenance"]
    assert prov["seed"] == KP.ELECTRON_TABLE_SEED and "xraylib" in prov["data_versions"]


# ---------------------------------------------------------------------------------------------
# Photon Monte Carlo
# ---------------------------------------------------------------------------------------------


def test_photon_mc_energy_conservation_in_infinite_medium():
    lines = N.photon_lines(N.load("Lu-177"), KP.PHOTON_CUTOFF_MEV)
    res = KP.simulate_photon_radial(lines, "water", 5000, rng=np.random.default_rng(4))
    assert res["fraction"].sum() + res["escaped_fraction"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("e_mev", [0.11295, 0.208366])
def test_photon_first_collision_energy_transfer_matches_mu_en(e_mev):
    # Energy deposited at the first interaction / E = (τ + σ_inc⟨T⟩/E)/μ ≈ μ_en/μ (fluorescence and
    # bremsstrahlung losses are < 0.1 % in water here).  MC relative standard error with 1e5 photons ≈ 0.6 %.
    import xraylib

    name = "Water, Liquid"
    k = e_mev * 1e3
    mu = xraylib.CS_Photo_CP(name, k) + xraylib.CS_Compt_CP(name, k) + xraylib.CS_Rayl_CP(name, k)
    res = KP.simulate_photon_radial(
        [(e_mev, 1.0)], "water", 100_000, rng=np.random.default_rng(5), first_collision_only=True
    )
    assert res["fraction"].sum() == pytest.approx(xraylib.CS_Energy_CP(name, k) / mu, rel=0.03)


def test_photon_first_collision_radial_distribution_is_exponential():
    # First interactions of a 208 keV point source: P(r < R) = 1 − exp(−μR) (narrow-beam attenuation).
    import xraylib

    e = 0.208366
    name = "Water, Liquid"
    mu = sum(f(name, e * 1e3) for f in (xraylib.CS_Photo_CP, xraylib.CS_Compt_CP, xraylib.CS_Rayl_CP))
    res = KP.simulate_photon_radial(
        [(e, 1.0)], "water", 40_000, rng=np.random.default_rng(6), first_collision_only=True
    )
    edges, frac = res["edges_g_cm2"], res["fraction"]
    cdf = np.concatenate([[0.0], np.cumsum(frac)]) / frac.sum()
    for r in (2.0, 5.0, 10.0):
        i = np.searchsorted(edges, r)
        assert cdf[i] == pytest.approx(1.0 - math.exp(-mu * edges[i]), abs=0.015)  # binomial σ ≤ 0.0025


# ---------------------------------------------------------------------------------------------
# Voxel averaging
# ---------------------------------------------------------------------------------------------


def _stay_probability(r: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """Isotropically averaged set covariogram of an a×b×c box / its volume: the probability that a point
    uniform in the box, moved by r ≤ min(a,b,c) in a random direction, is still inside it.
    Average of Π(1 − r|uᵢ|/aᵢ) over the sphere with ⟨|u_x|⟩ = 1/2, ⟨|u_x u_y|⟩ = 2/(3π), ⟨|u_x u_y u_z|⟩ = 1/(4π)."""
    s1 = 1 / a + 1 / b + 1 / c
    s2 = 1 / (a * b) + 1 / (b * c) + 1 / (a * c)
    return 1 - r * s1 / 2 + 2 * r**2 * s2 / (3 * math.pi) - r**3 / (4 * math.pi * a * b * c)


@pytest.mark.parametrize("voxel", [(4.8, 4.8, 4.8), (2.0, 2.0, 4.0)])
def test_electron_self_voxel_matches_covariogram_and_energy_balance(voxel):
    n = 1_000_000
    kern = K.get_kernel("Lu-177", voxel, "soft-tissue", (7, 7, 5), n_samples=n, use_cache=False)
    b = kern.energy_balance
    rho = kern.density_g_cm3
    mass_kg = rho * np.prod(voxel) * 1e-6
    # energy balance: every electron stops within 1.8 mm ≪ the 7×7×5 kernel extent
    absorbed_MeV = kern.electron.sum() * mass_kg / KP.J_PER_MEV
    assert absorbed_MeV == pytest.approx(N.electron_energy_per_decay_MeV(N.load("Lu-177")), rel=0.01)
    # self-voxel: exact for r ≤ min side (R_max = 1.76 mm < 2 mm)
    edges_g, cdf = K.electron_radial_cdf("Lu-177", "soft-tissue")
    r_mm = 0.5 * (edges_g[1:] + edges_g[:-1]) * 10 / rho
    assert r_mm.max() < min(voxel)
    expected = float(np.sum(np.diff(cdf) * _stay_probability(r_mm, *voxel)))
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert b["electron_self_voxel_fraction"] == pytest.approx(expected, abs=5 * sigma + 2e-4)
    # below the local-deposition limit by the escaping fraction, and that fraction ~ (S/4V)·⟨r⟩ (Cauchy)
    c = tuple(s // 2 for s in kern.array.shape)
    limit = N.electron_energy_per_decay_MeV(N.load("Lu-177")) * KP.J_PER_MEV / mass_kg
    escape = 1 - kern.electron[c] / limit
    assert escape == pytest.approx(1 - b["electron_self_voxel_fraction"], rel=1e-6)
    mean_r = b["electron_mean_deposition_radius_mm"]
    first_order = mean_r * (1 / voxel[0] + 1 / voxel[1] + 1 / voxel[2]) / 2
    assert 0.8 * first_order < escape < first_order  # higher orders of the covariogram reduce it
    assert escape < b["electron_max_csda_range_mm"] * (1 / voxel[0] + 1 / voxel[1] + 1 / voxel[2]) / 2


def test_kernel_symmetry_and_components():
    kern = K.get_kernel("Lu-177", 3.0, "water", 9, n_samples=200_000, use_cache=False)
    a = kern.array
    np.testing.assert_allclose(a, a[::-1], rtol=1e-12)
    np.testing.assert_allclose(a, a[:, ::-1], rtol=1e-12)
    np.testing.assert_allclose(a, np.transpose(a, (2, 1, 0)), rtol=1e-12)
    np.testing.assert_allclose(a, kern.electron + kern.photon)
    assert np.unravel_index(np.argmax(a), a.shape) == (4, 4, 4)
    assert (a >= 0).all()


def test_anisotropic_voxels_keep_energy():
    # a (2, 2, 4) mm and a 4 mm cubic kernel of the same extent absorb the same electron energy
    k1 = K.get_kernel("Lu-177", (2.0, 2.0, 4.0), "water", (9, 9, 5), n_samples=300_000, use_cache=False)
    k2 = K.get_kernel("Lu-177", 4.0, "water", 5, n_samples=300_000, use_cache=False)
    e1 = k1.electron.sum() * 16e-6
    e2 = k2.electron.sum() * 64e-6
    assert e1 == pytest.approx(e2, rel=1e-3)
    assert k1.array.shape == (5, 9, 9)
    np.testing.assert_allclose(k1.array, k1.array[::-1, ::-1, ::-1], rtol=1e-12)


def test_far_field_quadrature_agrees_with_sampling(monkeypatch):
    # Photon kernel at offset (4, 0, 0): point sampling (NEAR_FIELD = 4) vs Gauss quadrature (NEAR_FIELD = 3).
    edges_g, cdf, _, _ = K.photon_radial_cdf("Lu-177", "water")
    edges = edges_g * 10.0
    n = 4_000_000
    quad = KP.voxelise(edges, cdf, (4.8,) * 3, (11, 11, 11), n_samples=10_000)
    monkeypatch.setattr(K, "NEAR_FIELD", 5)
    samp = KP.voxelise(edges, cdf, (4.8,) * 3, (11, 11, 11), n_samples=n)
    for off in ((4, 0, 0), (4, 4, 0), (5, 2, 1)):
        q, s = quad[5 + off[2], 5 + off[1], 5 + off[0]], samp[5 + off[2], 5 + off[1], 5 + off[0]]
        # symmetrisation averages over the 6–48 equivalent voxels: σ_rel ≲ 1/sqrt(6 · s · n)
        assert q == pytest.approx(s, rel=5 / math.sqrt(6 * s * n) + 0.01)


# ---------------------------------------------------------------------------------------------
# Media and density scaling
# ---------------------------------------------------------------------------------------------


def test_electron_density_scaling_lung_vs_water():
    # Electron transport depends on mass thickness ρr; lung (ICRP) and water differ only slightly in
    # Z/A and I, so a lung kernel at voxel L/ρ_lung absorbs the same fractions as water at voxel L.
    lung = KP.get_medium("lung")
    L = 1.2
    kw = K.get_kernel("Lu-177", L, "water", 5, n_samples=400_000, use_cache=False)
    kl = K.get_kernel("Lu-177", L / lung.density_g_cm3, "lung", 5, n_samples=400_000, use_cache=False)
    fw = kw.energy_balance["electron_self_voxel_fraction"]
    fl = kl.energy_balance["electron_self_voxel_fraction"]
    assert fl == pytest.approx(fw, rel=0.02)
    # kernel values scale with 1/(ρV): same fraction, mass ratio
    ratio = kl.electron[2, 2, 2] / kw.electron[2, 2, 2]
    mass_ratio = (1.0 * L**3) / (lung.density_g_cm3 * (L / lung.density_g_cm3) ** 3)
    assert ratio == pytest.approx(mass_ratio, rel=0.02)


def _bethe_stopping_number(t_mev: float, i_ev: float) -> float:
    """L(T) of the Bethe collision stopping power for electrons, S = k (Z/A) L / β² (ICRU 37 eq. 2.1, δ = 0
    below 0.5 MeV): L = ln[τ²(τ+2) / (2 (I/mc²)²)] + F⁻(τ), F⁻ = 1 − β² + [τ²/8 − (2τ+1) ln 2]/(τ+1)²."""
    mc2 = 0.51099895  # electron rest energy, MeV (CODATA 2018)
    tau = t_mev / mc2
    beta2 = 1.0 - 1.0 / (1.0 + tau) ** 2
    f = 1.0 - beta2 + (tau**2 / 8.0 - (2.0 * tau + 1.0) * math.log(2.0)) / (1.0 + tau) ** 2
    return math.log(tau**2 * (tau + 2.0) / (2.0 * (i_ev * 1e-6 / mc2) ** 2)) + f


def test_bone_range_in_mass_thickness_follows_z_over_a_and_i_value():
    # Bethe: S ∝ (Z/A)·L(T, I)/β², so at each energy S_water/S_bone = (Z/A)_w/(Z/A)_b × L_w/L_b.  The CSDA
    # range ratio R_bone/R_water is that ratio averaged over the slowing-down path, so it lies between its
    # values at 0.3 MeV and at 10 keV (below 10 keV lies < 0.5 % of the 0.3 MeV path: ESTAR 2.5e-4 of
    # 0.084 g/cm²); 0.5 % margin for that part.  Z/A and I (water 75 eV, ICRP cortical bone 106.4 eV, ICRU 37)
    # are the media's data.
    w, b = KP.get_medium("water"), KP.get_medium("cortical-bone")
    za = KP._z_over_a(w) / KP._z_over_a(b)

    def s_ratio(t: float) -> float:
        return za * _bethe_stopping_number(t, w.mean_excitation_eV) / _bethe_stopping_number(t, b.mean_excitation_eV)

    lo, hi = s_ratio(0.3), s_ratio(0.01)
    ratio = float(KP.csda_range_g_cm2(0.3, "cortical-bone") / KP.csda_range_g_cm2(0.3, "water"))
    assert lo * 0.995 < ratio < hi * 1.005


# ---------------------------------------------------------------------------------------------
# Shipped kernel, cache, CLI helper, errors
# ---------------------------------------------------------------------------------------------


def test_shipped_kernel_4p8mm_soft_tissue_energy_balance_and_photon_bounds():
    import xraylib

    kern = K.get_kernel("Lu-177", 4.8, "soft-tissue", 51)
    assert kern.provenance["kernel_id"] == kern.id
    b = kern.energy_balance
    nuc = N.load("Lu-177")
    mass_kg = kern.density_g_cm3 * 4.8**3 * 1e-6
    e_el = kern.electron.sum() * mass_kg / KP.J_PER_MEV
    assert e_el == pytest.approx(N.electron_energy_per_decay_MeV(nuc), rel=0.01)
    # photon absorbed fraction in the 51³ cube (inscribed sphere 122.4 mm, circumscribed 212 mm):
    # ≥ energy transferred at first collisions inside the inscribed sphere (μ_en/μ)(1 − e^{−μR}),
    # ≤ 1 − uncollided escape beyond the circumscribed sphere.
    name = "Tissue, Soft (ICRP)"
    lines = N.photon_lines(nuc, KP.PHOTON_CUTOFF_MEV)
    e_ph = N.photon_energy_per_decay_MeV(nuc)

    def mu(e):
        return sum(f(name, e * 1e3) for f in (xraylib.CS_Photo_CP, xraylib.CS_Compt_CP, xraylib.CS_Rayl_CP))

    r_in, r_out = 12.24 * kern.density_g_cm3, 21.2 * kern.density_g_cm3
    lower = (
        sum(e * y * xraylib.CS_Energy_CP(name, e * 1e3) / mu(e) * (1 - math.exp(-mu(e) * r_in)) for e, y in lines)
        / e_ph
    )
    upper = 1 - sum(e * y * math.exp(-mu(e) * r_out) for e, y in lines) / e_ph
    f_ph = kern.photon.sum() * mass_kg / KP.J_PER_MEV / e_ph
    assert lower < f_ph < upper
    assert f_ph == pytest.approx(b["photon_absorbed_fraction_in_kernel"], rel=1e-5)
    # self voxel below the local-deposition limit, electrons dominate it
    c = (25, 25, 25)
    assert kern.array[c] < b["local_deposition_limit_Gy_per_Bqs"] * (1 + b["photon_self_voxel_fraction"])
    assert kern.electron[c] > 50 * kern.photon[c]


def test_cache_roundtrip_and_ids(tmp_path):
    k1 = K.get_kernel("Lu-177", 2.5, "water", 5, n_samples=50_000)
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and k1.id in cached[0].name
    k2 = K.get_kernel("Lu-177", 2.5, "water", 5, n_samples=50_000)
    np.testing.assert_allclose(k2.array, k1.array, rtol=1e-6)  # stored as float32 octant
    assert k2.id == k1.id
    assert K.kernel_id("Lu-177", (2.5,) * 3, "lung", (5,) * 3, 0.26) != k1.id


def test_kernel_command_writes_npy(tmp_path):
    out = tmp_path / "k.npy"
    text = K.kernel_command("Lu177", 3.0, "water", 7, out)
    arr = np.load(out)
    assert arr.shape == (7, 7, 7) and arr[3, 3, 3] == arr.max()
    assert "electrons" in text and "Gy/(Bq·s)" in text
    assert (tmp_path / "k.json").exists()


def test_bad_parameters_raise():
    with pytest.raises(VoxeldoseError):
        K.get_kernel("Lu-177", 4.8, "granite", 5)
    with pytest.raises(VoxeldoseError):
        K.get_kernel("Lu-177", 4.8, "water", 4)
    with pytest.raises(VoxeldoseError):
        K.get_kernel("Lu-177", (4.8, -1, 2), "water", 5)
