"""absorbed_dose: DVK, LED, density correction, HU→density, grids, errors.

Kernels here are made by hand from the nuclide's ICRP-107 energies (the physics kernels are built
elsewhere): an electron kernel whose absorbed energy is exactly the emitted electron energy E_e, and a
photon kernel that absorbs a known fraction f of the photon energy E_γ.  Expected values follow from
energy balance, not from running the code.
"""

from __future__ import annotations

import numpy as np
import pytest

from voxeldose import backend
from voxeldose.dose import (
    J_PER_MEV,
    RHO_AIR,
    SCHNEIDER_2000,
    absorbed_dose,
    default_kernel_size,
    density_on_grid,
    electron_energy_per_decay_MeV,
    hu_to_density,
    photon_energy_per_decay_MeV,
)
from voxeldose.errors import VoxeldoseError
from voxeldose.geometry import Grid, Volume
from voxeldose.kernels import DoseKernel

# Lu-177, ICRP-107 (shared PHYSICS.md): 147.9 keV electrons and 35.1 keV photons per decay.
E_E_MEV = 0.1479
E_P_MEV = 0.0351
PHOTON_ABSORBED = 0.3  # fraction f of photon energy the hand-made photon kernel absorbs


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cpu")


def make_kernel(voxel=(4.8, 4.8, 4.8), size=9, sigma_mm=3.0, rho=1.0, photon=True, medium="water"):
    """Electron kernel: a Gaussian that absorbs E_e; photon kernel: exp(−r/60 mm)/r² absorbing f·E_γ."""
    di, dj, dk = voxel
    h = (size - 1) // 2
    z, y, x = np.mgrid[-h : h + 1, -h : h + 1, -h : h + 1].astype(float)
    r2 = (x * di) ** 2 + (y * dj) ** 2 + (z * dk) ** 2
    mass_kg = rho * di * dj * dk / 1000.0 * 1e-3
    g = np.exp(-r2 / (2 * sigma_mm**2))
    ke = g / g.sum() * E_E_MEV * J_PER_MEV / mass_kg
    if photon:
        r = np.sqrt(np.maximum(r2, (0.5 * min(voxel)) ** 2))
        p = np.exp(-r / 60.0) / r**2
        kp = p / p.sum() * PHOTON_ABSORBED * E_P_MEV * J_PER_MEV / mass_kg
    else:
        kp = np.zeros_like(ke)
    return DoseKernel(
        array=ke + kp,
        electron=ke,
        photon=kp,
        nuclide="Lu-177",
        voxel_mm=tuple(voxel),
        medium=medium,
        density_g_cm3=rho,
        energy_balance={},
        provenance={"made_by": "tests"},
    )


def tia_volume(array, voxel=(4.8, 4.8, 4.8), units="Bq.s"):
    return Volume(np.asarray(array, dtype=np.float32), Grid.axial(array.shape, voxel).affine, "1.2.3", units)


# ---------------------------------------------------------------------------- nuclide data


def test_nuclide_energies_match_icrp107():
    assert electron_energy_per_decay_MeV("Lu-177") == pytest.approx(E_E_MEV, rel=2e-3)
    assert photon_energy_per_decay_MeV("Lu-177") == pytest.approx(E_P_MEV, rel=5e-3)


# ---------------------------------------------------------------------------- DVK and LED


def test_dvk_delta_is_kernel_and_metadata():
    k = make_kernel()
    a = np.zeros((15, 15, 15))
    a[7, 7, 7] = 1e9
    d = absorbed_dose(tia_volume(a), kernel=k)
    assert d.units == "Gy"
    assert d.grid.same_as(tia_volume(a).grid)
    assert d.array.dtype == np.float32
    np.testing.assert_allclose(d.array[3:12, 3:12, 3:12], 1e9 * k.array, rtol=1e-5, atol=1e-6 * 1e9 * k.array.max())
    assert d.meta["method"] == "dvk" and d.meta["nuclide"] == "Lu-177" and d.meta["kernel_id"]


def test_led_value_from_first_principles():
    """1 GBq·h in a 4.8 mm water voxel: D = Ã·E_e/(ρV) with E_e = 147.9 keV."""
    a = np.zeros((5, 5, 5))
    a[2, 2, 2] = 1e9 * 3600
    d = absorbed_dose(tia_volume(a), method="led", medium="water").array
    expect = 1e9 * 3600 * E_E_MEV * 1.602176634e-13 / (1.0 * 4.8**3 / 1000 * 1e-3)
    assert d[2, 2, 2] == pytest.approx(expect, rel=2e-3)  # 147.9 keV is rounded to 4 digits
    assert d.sum() == pytest.approx(d[2, 2, 2])  # nothing leaves the voxel


def test_led_equals_dvk_in_large_uniform_region():
    """Centre of a uniform block larger than the kernel: DVK absorbs E_e + f·E_γ per decay, LED E_e.

    So 0 ≤ D_dvk/D_led − 1 ≤ E_γ/E_e (all photons absorbed, ≈ 0.24 for Lu-177); with this kernel,
    exactly f·E_γ/E_e.
    """
    k = make_kernel(size=11)
    a = np.full((31, 31, 31), 1e10)
    dvk = absorbed_dose(tia_volume(a), kernel=k).array[15, 15, 15]
    led = absorbed_dose(tia_volume(a), method="led", kernel=k).array[15, 15, 15]
    ratio = dvk / led - 1
    assert 0 <= ratio <= E_P_MEV / E_E_MEV
    assert ratio == pytest.approx(PHOTON_ABSORBED * E_P_MEV / E_E_MEV, rel=5e-3)


def test_led_with_density_uses_voxel_density():
    a = np.full((6, 6, 6), 1e9)
    rho = np.full((6, 6, 6), 1.0, np.float32)
    rho[:3] = 0.25
    dens = Volume(rho, Grid.axial((6, 6, 6), (4.8,) * 3).affine, "1.2.3", "g/cm3")
    d = absorbed_dose(tia_volume(a), method="led", density=dens, medium="water").array
    assert d[0, 0, 0] / d[5, 5, 5] == pytest.approx(4.0, rel=1e-5)


# ---------------------------------------------------------------------------- density correction


def density_volume(rho, voxel=(4.8, 4.8, 4.8)):
    return Volume(np.asarray(rho, np.float32), Grid.axial(rho.shape, voxel).affine, "1.2.3", "g/cm3")


def test_density_correction_leaves_water_unchanged():
    rng = np.random.default_rng(5)
    k = make_kernel(rho=1.0)
    a = rng.random((20, 18, 16)) * 1e9
    a[:, :, :3] = 0
    water = density_volume(np.ones(a.shape))
    d0 = absorbed_dose(tia_volume(a), kernel=k).array
    d1 = absorbed_dose(tia_volume(a), method="dvk-density", density=water, kernel=k).array
    # up to the grid borders: the density is extended beyond the grid, not zero
    assert np.abs(d1 - d0).max() <= 1e-5 * d0.max()


def test_density_correction_soft_tissue_kernel_at_its_own_density():
    k = make_kernel(rho=1.04, medium="soft-tissue")
    a = np.random.default_rng(6).random((12, 12, 12)) * 1e9
    dens = density_volume(np.full(a.shape, 1.04))
    d0 = absorbed_dose(tia_volume(a), kernel=k).array
    d1 = absorbed_dose(tia_volume(a), method="dvk-density", density=dens, kernel=k).array
    assert np.abs(d1 - d0).max() <= 1e-5 * d0.max()


def boundary_case(tia_in_air: bool):
    """Tissue (ρ = 1) for k < 20, air above; activity uniform across (or up to) the boundary."""
    shape = (40, 24, 24)
    rho = np.ones(shape)
    rho[20:] = RHO_AIR
    a = np.zeros(shape)
    a[8 : 32 if tia_in_air else 20, 6:18, 6:18] = 1e9  # ≥ 6 voxels from every edge
    return a, rho


@pytest.mark.parametrize("tia_in_air", [True, False])
def test_density_correction_conserves_energy_and_is_finite_in_air(tia_in_air):
    """Σ D·ρ·V equals the water case's Σ D·ρ·V: each source's electron energy is only redistributed.

    Electron-only kernel (photons are not redistributed by design, see next test), activity ≥ the
    kernel half-width (4 voxels) from the grid edges so that no energy leaves the grid in either case.
    """
    k = make_kernel(size=9, photon=False)
    a, rho = boundary_case(tia_in_air)
    v_kg = 4.8**3 / 1000 * 1e-3
    dw = absorbed_dose(tia_volume(a), kernel=k).array.astype(float)
    dd = absorbed_dose(tia_volume(a), method="dvk-density", density=density_volume(rho), kernel=k).array.astype(float)
    assert np.isfinite(dd).all()
    e_water = (dw * 1.0 * v_kg).sum()
    e_dens = (dd * rho * v_kg).sum()
    assert e_dens == pytest.approx(e_water, rel=1e-4)
    # the emitted electron energy, all of it absorbed (kernel absorbs E_e, nothing leaves the grid)
    assert e_water == pytest.approx(a.sum() * E_E_MEV * J_PER_MEV, rel=1e-4)
    # No voxel exceeds local deposition in the lightest medium: D ≤ E_e·Ã_max/(ρ_air V).
    assert dd.max() <= a.max() * E_E_MEV * J_PER_MEV / (RHO_AIR * v_kg) * (1 + 1e-5)
    if not tia_in_air:
        # Targets in air get energy ∝ their mass; a tissue source at a plane boundary keeps at least
        # half its (symmetric) kernel weight in tissue, N ≥ ρ/2, so D_air ≤ 2·D_water there —
        # where D_water/ρ_air would be ~800× D_water.
        air = rho < 0.5
        assert (dd[air] <= 2 * dw[air] + 1e-6 * dw.max()).all()
        assert dd[air].max() > 0
        # deep inside the tissue, far from the boundary (> kernel half-width), nothing changes
        np.testing.assert_allclose(dd[8:15], dw[8:15], rtol=1e-4, atol=1e-5 * dw.max())


def test_density_correction_equilibrium_in_lung():
    """Uniform activity filling a large region of density ρ: D = Ã·E_e/(ρV) (charged-particle equilibrium)."""
    k = make_kernel(size=9, photon=False)
    a = np.full((24, 24, 24), 1e9)
    rho = np.full(a.shape, 0.3)
    d = absorbed_dose(tia_volume(a), method="dvk-density", density=density_volume(rho), kernel=k).array
    v_kg = 4.8**3 / 1000 * 1e-3
    assert d[12, 12, 12] == pytest.approx(1e9 * E_E_MEV * J_PER_MEV / (0.3 * v_kg), rel=1e-4)


def test_photon_part_is_the_homogeneous_photon_dose():
    k = make_kernel(size=9)
    a, rho = boundary_case(True)
    kp = make_kernel(size=9)
    k_ph = DoseKernel(kp.photon, np.zeros_like(kp.photon), kp.photon, "Lu-177", kp.voxel_mm, "water", 1.0, {})
    dp = absorbed_dose(tia_volume(a), kernel=k_ph).array
    k_el = DoseKernel(k.electron, k.electron, np.zeros_like(k.electron), "Lu-177", k.voxel_mm, "water", 1.0, {})
    de = absorbed_dose(tia_volume(a), method="dvk-density", density=density_volume(rho), kernel=k_el).array
    both = absorbed_dose(tia_volume(a), method="dvk-density", density=density_volume(rho), kernel=k).array
    np.testing.assert_allclose(both, de + dp, rtol=1e-5, atol=1e-6 * both.max())


# ---------------------------------------------------------------------------- HU → density, CT grid


@pytest.mark.parametrize(
    "hu, rho",
    [
        (-1000, 0.00121),  # air (Schneider et al. 2000)
        (-3024, RHO_AIR),  # padding outside the reconstruction circle: clamped to air
        (-98, 1.018 - 0.893e-3 * 98),  # eq. 21 lower end, continuous with the lung segment
        (-549, 0.00121 + (0.930486 - 0.00121) * 451 / 902),  # halfway air → −98 HU
        (0, 1.018),  # eq. 21
        (20, 1.03),  # eq. 22
        (50, 1.003 + 1.169e-3 * 50),  # eq. 23
        (100, 1.017 + 0.592e-3 * 100),  # eq. 19 (skeletal)
        (1000, 1.609),  # eq. 19
    ],
)
def test_hu_to_density_calibration_points(hu, rho):
    assert hu_to_density(float(hu)) == pytest.approx(rho, rel=1e-5, abs=1e-7)
    assert hu_to_density(np.array([[[hu]]], np.int16))[0, 0, 0] == pytest.approx(rho, rel=1e-5, abs=1e-7)


def test_hu_to_density_segments_are_half_open_and_non_finite_is_air():
    """Each segment of the table holds lo ≤ H < hi (evaluated in float32 as a + b·H); an edge value
    belongs to the segment above it; NaN and ±inf (no segment) come out as air."""
    edges = [seg[0] for seg in SCHNEIDER_2000[1:]]
    hu = np.array([v for e in edges for v in (np.nextafter(np.float32(e), np.float32(-np.inf)), e)], np.float32)
    want = []
    for h in hu:
        (a, b) = next((seg[2], seg[3]) for seg in SCHNEIDER_2000 if seg[0] <= h < seg[1])
        want.append(max(np.float32(a) + np.float32(b) * h, np.float32(RHO_AIR)))
    np.testing.assert_array_equal(hu_to_density(hu), np.array(want, np.float32))
    odd = hu_to_density(np.array([np.nan, np.inf, -np.inf], np.float32))
    np.testing.assert_array_equal(odd, np.full(3, RHO_AIR, np.float32))


def test_density_on_grid_is_voxel_mean():
    """5 mm SPECT voxels over 1 mm CT voxels, CT columns alternating 0 HU / −1000 HU: each SPECT voxel
    holds 3 of one and 2 of the other (centred on a CT column), so its density is their mean — not the
    value at its centre."""
    ct_arr = np.zeros((20, 20, 40), np.int16)
    ct_arr[:, :, 1::2] = -1000
    ct = Volume(ct_arr, Grid.axial(ct_arr.shape, (1.0, 1.0, 1.0)).affine, "1.2.3", "HU")
    spect = Grid.axial((2, 2, 6), (5.0, 5.0, 5.0), origin_mm=(4.0, 4.0, 4.0))
    rho = density_on_grid(ct, spect, fill=1.0).array
    soft, air = 1.018, 0.00121
    # SPECT i = 0 centred at CT column 4 (even: soft): columns 2..6 = soft, air, soft, air, soft
    assert rho[0, 0, 0] == pytest.approx((3 * soft + 2 * air) / 5, rel=1e-5)
    # i = 1 centred at column 9 (odd: air): air, soft, air, soft, air
    assert rho[0, 0, 1] == pytest.approx((2 * soft + 3 * air) / 5, rel=1e-5)


def test_grid_ct_resamples_dose():
    k = make_kernel(size=9)
    a = np.zeros((10, 10, 10))
    a[3:7, 3:7, 3:7] = 1e9
    t = tia_volume(a)
    ct = Volume(np.zeros((20, 20, 20), np.int16), Grid.axial((20, 20, 20), (2.4, 2.4, 2.4)).affine, "1.2.3", "HU")
    d_spect = absorbed_dose(t, kernel=k)
    d_ct = absorbed_dose(t, kernel=k, grid="ct", ct=ct)
    assert d_ct.units == "Gy" and d_ct.shape == (20, 20, 20)
    assert d_ct.grid.same_as(ct.grid)
    # CT voxel (10, 10, 10) sits at 24 mm = SPECT voxel (5, 5, 5): same value; (11,…) halfway (trilinear)
    assert d_ct.array[10, 10, 10] == pytest.approx(d_spect.array[5, 5, 5], rel=1e-5)
    assert d_ct.array[11, 10, 10] == pytest.approx(0.5 * (d_spect.array[5, 5, 5] + d_spect.array[6, 5, 5]), rel=1e-5)


def test_dvk_density_from_ct_on_other_grid():
    """Water-equivalent CT (0 HU → 1.018 g/cm³) on a finer grid; kernel made for 1.018: unchanged dose."""
    k = make_kernel(rho=1.018)
    a = np.random.default_rng(2).random((10, 10, 10)) * 1e9
    ct = Volume(np.zeros((24, 24, 24), np.int16), Grid.axial((24, 24, 24), (2.4, 2.4, 2.4)).affine, "1.2.3", "HU")
    d0 = absorbed_dose(tia_volume(a), kernel=k).array
    d1 = absorbed_dose(tia_volume(a), method="dvk-density", ct=ct, kernel=k)
    assert d1.meta["density_source"] == "ct"
    assert np.abs(d1.array - d0).max() <= 1e-5 * d0.max()


# ---------------------------------------------------------------------------- kernel choice, errors


def test_default_kernel_size():
    assert default_kernel_size((4.8, 4.8, 4.8)) == 51
    assert default_kernel_size((4.42, 4.42, 4.42)) == 57  # ±120 mm
    assert default_kernel_size((2.0, 2.0, 2.0)) == 101  # capped
    assert default_kernel_size((4.8, 4.8, 4.8), shape=(16, 16, 16)) == 31


def test_kernel_from_get_kernel(monkeypatch):
    calls = []

    def fake_get_kernel(nuclide, voxel_mm, medium, size):
        calls.append((nuclide, voxel_mm, medium, size))
        return make_kernel(voxel=voxel_mm, size=9)

    import voxeldose.kernels

    monkeypatch.setattr(voxeldose.kernels, "get_kernel", fake_get_kernel)
    a = np.zeros((40, 40, 40))
    a[20, 20, 20] = 1.0
    absorbed_dose(tia_volume(a), "lu177")
    assert calls == [("Lu-177", (4.8, 4.8, 4.8), "soft-tissue", 51)]


def test_errors_name_the_field():
    a = np.ones((5, 5, 5))
    k = make_kernel()
    with pytest.raises(VoxeldoseError, match=r"tia\.units.*Bq\.s"):
        absorbed_dose(tia_volume(a, units="Bq/ml"), kernel=k)
    with pytest.raises(VoxeldoseError, match="density"):
        absorbed_dose(tia_volume(a), method="dvk-density", kernel=k)
    with pytest.raises(VoxeldoseError, match="method"):
        absorbed_dose(tia_volume(a), method="mc", kernel=k)
    with pytest.raises(VoxeldoseError, match="kernel.voxel_mm"):
        absorbed_dose(tia_volume(a, voxel=(4.0, 4.0, 4.0)), kernel=k)
    with pytest.raises(VoxeldoseError, match="ct"):
        absorbed_dose(tia_volume(a), kernel=k, grid="ct")
    with pytest.raises(VoxeldoseError, match="nuclide"):
        absorbed_dose(tia_volume(a), "I-131", kernel=k)
    bad = Volume(np.ones((5, 5, 5)), np.eye(4), None, "kg")
    with pytest.raises(VoxeldoseError, match="density.units"):
        absorbed_dose(tia_volume(a), method="dvk-density", density=bad, kernel=k)


def test_gpu_requested_without_gpu(monkeypatch):
    backend._reset_probe()
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    with pytest.raises(VoxeldoseError, match="VOXELDOSE_DEVICE"):
        absorbed_dose(tia_volume(np.ones((5, 5, 5))), kernel=make_kernel())
    backend._reset_probe()


@pytest.mark.gpu
def test_gpu_dose_matches_cpu():
    backend._reset_probe()
    if not backend.gpu_available():
        pytest.skip("needs CuPy and a working CUDA device")
    k = make_kernel(size=11)
    a, rho = boundary_case(True)
    for method in ("dvk", "dvk-density"):
        kw = {"density": density_volume(rho)} if method == "dvk-density" else {}
        cpu = absorbed_dose(tia_volume(a), method=method, kernel=k, device="cpu", **kw).array
        gpu = absorbed_dose(tia_volume(a), method=method, kernel=k, device="gpu", **kw).array
        assert isinstance(gpu, np.ndarray)  # host in, host out
        assert np.abs(gpu - cpu).max() <= 1e-5 * cpu.max()


def _icrp107_raw(nuclide: str) -> dict:
    """The ICRP-107 record straight from the icrp107-database package's JSON (not via voxeldose.nuclides)."""
    import json
    from importlib import resources

    data = json.loads(resources.files("icrp107_database").joinpath("icrp107", f"{nuclide}.json").read_text())
    return json.loads(data) if isinstance(data, str) else data


def test_energy_per_decay_and_j_per_mev_have_one_source():
    """Electron (β⁻ mean energies × yields + IC + Auger) and photon (γ + X + annihilation) energy per decay,
    summed here from the raw ICRP-107 JSON, and J/MeV = 10⁶ e (CODATA 2018, exact): every module uses them."""
    from scipy.constants import physical_constants

    from voxeldose import kernels, metrics, nuclides, phantom

    em = _icrp107_raw("Lu-177")["emissions"]
    e_el = sum(e * y for kind in ("beta-", "beta+", "IE", "auger") for e, y in em[kind])
    e_ph = sum(e * y for kind in ("gamma", "X", "annihilation") for e, y in em[kind])
    assert e_el * 1e3 == pytest.approx(147.9, abs=0.1) and e_ph * 1e3 == pytest.approx(35.1, abs=0.1)
    j_per_mev = physical_constants["electron volt-joule relationship"][0] * 1e6  # 1.602176634e-13
    for mod in (nuclides, kernels, metrics):
        assert pytest.approx(j_per_mev, rel=1e-15) == mod.J_PER_MEV, mod.__name__
    assert J_PER_MEV is nuclides.J_PER_MEV
    for f in (nuclides.electron_energy_per_decay_MeV, electron_energy_per_decay_MeV):
        assert f("Lu-177") == pytest.approx(e_el, rel=1e-12)
        assert f(nuclides.load("Lu-177")) == pytest.approx(e_el, rel=1e-12)
    for f in (nuclides.photon_energy_per_decay_MeV, photon_energy_per_decay_MeV):
        assert f("Lu-177") == pytest.approx(e_ph, rel=1e-12)
    assert phantom.electron_energy_per_decay_j("Lu-177") == pytest.approx(e_el * j_per_mev, rel=1e-12)
    assert metrics.marrow_blood_based([(1.0, 100.0), (24.0, 50.0), (96.0, 10.0)])[
        "electron_energy_per_decay_mev"
    ] == pytest.approx(e_el, rel=1e-12)
