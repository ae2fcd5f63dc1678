"""Voxel dose-uncertainty map (issue 13 part 3) from first principles.

The dose is linear in the voxel TIAs, D(x) = Σ_s K(x−s) Ã(s); for independent voxels the GUM law of propagation
(JCGM 100:2008 eq. 10) gives Var D(x) = Σ_s K²(x−s) Var Ã(s).  The expected values below are that sum written out
over the kernel (uniform source, point source), and Monte-Carlo sampling of the inputs through the real dose
computation (:func:`voxeldose.convolution.convolve`, :func:`voxeldose.timeactivity.voxel_tia`).
"""

from __future__ import annotations

import numpy as np
import pytest

from voxeldose import backend
from voxeldose.convolution import convolve
from voxeldose.dose import J_PER_MEV, electron_energy_per_decay_MeV
from voxeldose.errors import VoxeldoseError
from voxeldose.geometry import Grid, Volume
from voxeldose.kernels import DoseKernel
from voxeldose.timeactivity import voxel_tia
from voxeldose.voxeluncertainty import (
    counting_variance,
    dose_uncertainty,
    dose_variance,
    dvh_band,
    voxel_tia_sensitivities,
    voxel_tia_variance,
)

VOXEL = (4.8, 4.8, 4.8)
LAMBDA = np.log(2) / (6.647 * 86400.0)  # Lu-177, s⁻¹
TIMES = np.array([4.0, 24.0, 96.0, 168.0]) * 3600.0


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "cpu")


def _kernel(size: int = 7, rho: float = 1.0) -> DoseKernel:
    """A hand-made kernel (Gy per Bq·s): a compact electron part and a broad photon part, both positive."""
    h = (size - 1) // 2
    z, y, x = np.mgrid[-h : h + 1, -h : h + 1, -h : h + 1].astype(float)
    r = np.sqrt(x * x + y * y + z * z) * VOXEL[0]
    ke = np.where(r < 1.5 * VOXEL[0], np.exp(-r / 3.0), 0.0) * 1e-10
    kp = np.exp(-r / 40.0) / np.maximum(r, 2.4) ** 2 * 1e-11
    return DoseKernel(
        array=ke + kp,
        electron=ke,
        photon=kp,
        nuclide="Lu-177",
        voxel_mm=VOXEL,
        medium="water",
        density_g_cm3=rho,
        energy_balance={},
        provenance={"made_by": "tests"},
    )


def _vol(a: np.ndarray, units: str) -> Volume:
    return Volume(a, Grid.axial(a.shape, VOXEL).affine, "1.2.3", units)


def test_uniform_source_equals_the_analytic_sum() -> None:
    """Var Ã = v everywhere: far enough from the edges Var D = v·Σ K² (every kernel offset lands on a source);
    at a corner only the octant of offsets that stays inside the grid contributes."""
    k = _kernel()
    v = 3.0e14
    var = dose_variance(_vol(np.full((15, 15, 15), v), "Bq2.s2"), kernel=k).array
    kk = k.array**2
    assert var[7, 7, 7] == pytest.approx(v * kk.sum(), rel=1e-9)
    assert var[0, 0, 0] == pytest.approx(v * kk[3:, 3:, 3:].sum(), rel=1e-9)


def test_point_source_variance_is_the_squared_kernel() -> None:
    k = _kernel()
    a = np.zeros((13, 13, 13))
    a[6, 5, 7] = 2.0e15
    var = dose_variance(_vol(a, "Bq2.s2"), kernel=k).array
    expected = np.zeros_like(a)
    expected[3:10, 2:9, 4:11] = 2.0e15 * k.array**2
    np.testing.assert_allclose(var, expected, rtol=1e-7, atol=1e-9 * expected.max())


def test_density_method_at_the_kernel_density_equals_dvk() -> None:
    """dvk-density with ρ ≡ ρ_kernel is the homogeneous kernel (N ≡ ρ_k), so its variance is (K_e + K_p)² ⊛ V."""
    rng = np.random.default_rng(1)
    k = _kernel(rho=1.04)
    v = _vol(rng.uniform(0, 1e14, (12, 13, 14)), "Bq2.s2")
    rho = _vol(np.full(v.shape, 1.04), "g/cm3")
    a = dose_variance(v, method="dvk-density", density=rho, kernel=k).array
    b = dose_variance(v, kernel=k).array
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9 * b.max())


def test_led_variance_is_the_local_energy_squared() -> None:
    v = np.full((4, 4, 4), 5e13)
    var = dose_variance(_vol(v, "Bq2.s2"), method="led", kernel=_kernel(rho=1.0)).array
    mass_kg = 1.0 * VOXEL[0] ** 3 / 1000.0 * 1e-3
    e_j = electron_energy_per_decay_MeV("Lu-177") * J_PER_MEV
    np.testing.assert_allclose(var, 5e13 * (e_j / mass_kg) ** 2, rtol=1e-12)


def test_monte_carlo_std_of_the_dose_matches_the_map() -> None:
    """Independent normal voxel TIAs with a known variance map, each sample convolved with the kernel: the
    standard deviation over 400 samples matches √(K² ⊛ Var) (sampling error of a std: 1/√(2n) ≈ 3.5 %)."""
    rng = np.random.default_rng(7)
    k = _kernel()
    shape = (10, 11, 12)
    mean = rng.uniform(1e10, 5e10, shape)
    sd = mean * rng.uniform(0.05, 0.3, shape)
    n = 400
    doses = np.stack([convolve(mean + sd * rng.standard_normal(shape), k, dtype=np.float64) for _ in range(n)])
    std = doses.std(axis=0, ddof=1)
    u = np.sqrt(dose_variance(_vol(sd**2, "Bq2.s2"), kernel=k).array)
    ratio = std / u
    assert abs(float(ratio.mean()) - 1.0) < 0.03
    assert float(np.abs(ratio - 1.0).max()) < 5 * 0.0354 + 0.02


def _curves(shape: tuple[int, ...], rng: np.random.Generator, lo: float = 1.0) -> np.ndarray:
    """Voxel time-activity curves (Bq) with uptake then washout (effective rate ``lo``…3 × λ), every 7th with
    a rate below λ (the physical-decay tail branch)."""
    a0 = rng.uniform(1e5, 1e6, shape)
    lam_eff = rng.uniform(lo, 3.0, shape) * LAMBDA
    lam_eff.flat[::7] = LAMBDA * (0.8 if lo <= 1.0 else 0.5)
    up = 1.0 - np.exp(-np.log(2) / (3 * 3600.0) * TIMES[:, None, None, None])
    out: np.ndarray = a0 * up * np.exp(-lam_eff * TIMES[:, None, None, None])
    return out


@pytest.mark.parametrize("method", ["exponential", "hybrid"])
def test_analytic_sensitivities_match_finite_differences(method: str) -> None:
    """∂Ã/∂A_i against central differences of voxel_tia itself (its tail, its segments, its branches)."""
    rng = np.random.default_rng(3)
    a = _curves((3, 4, 5), rng)
    a[:, 0, 0, 0] = 0.0  # no data
    a[2, 1, 1, 1] = 0.0  # a zero inside the curve
    s = voxel_tia_sensitivities(a, TIMES, decay_constant_per_s=LAMBDA, method=method)
    for i in range(TIMES.size):
        h = 1e-6 * np.maximum(a[i], 1.0)
        p, m = a.copy(), a.copy()
        p[i] += h
        m[i] -= h
        p[i] = np.where(a[i] > 0, p[i], a[i])  # one-sided at 0 (max(A, 0) has no derivative there)
        m[i] = np.where(a[i] > 0, m[i], a[i])
        fd = (
            voxel_tia(p, TIMES, decay_constant_per_s=LAMBDA, method=method).tia
            - voxel_tia(m, TIMES, decay_constant_per_s=LAMBDA, method=method).tia
        ) / (2 * h)
        fd = np.where(a[i] > 0, fd, 0.0)
        np.testing.assert_allclose(s[i][a[i] > 0], fd[a[i] > 0], rtol=2e-5)


def test_monte_carlo_chain_from_counts_to_dose() -> None:
    """The whole chain: Poisson-like voxel activities (Var A = A·10⁶/(S·T)) at four scans → voxel TIA
    (exponential method) → dose; the std of 300 sampled doses matches the propagated map."""
    rng = np.random.default_rng(11)
    shape = (8, 9, 10)
    a = _curves(shape, rng, lo=1.6)
    cps, dur = 20.0, [900.0, 900.0, 1200.0, 1800.0]
    var_a = counting_variance(a, cps, dur)
    np.testing.assert_allclose(var_a[2], a[2] * 1e6 / (cps * 1200.0))
    k = _kernel()
    var_tia = voxel_tia_variance(a, TIMES, var_a, decay_constant_per_s=LAMBDA)
    u = np.sqrt(dose_variance(_vol(var_tia, "Bq2.s2"), kernel=k).array)
    n = 300
    doses = np.empty((n, *shape))
    for j in range(n):
        noisy = a + np.sqrt(var_a) * rng.standard_normal(a.shape)
        tia = voxel_tia(noisy, TIMES, decay_constant_per_s=LAMBDA).tia
        doses[j] = convolve(np.asarray(tia), k, dtype=np.float64)
    # Precondition: no voxel's tail rate k = ln(A₃/A₄)/Δt within 3σ of λ.  There the estimator has a kink (fitted
    # tail for k ≥ λ, physical decay below), the linearisation holds on one side only and the samples scatter
    # less than the map says (conservative; module docstring).
    rel = np.sqrt(var_a) / a
    k_tail = np.log(a[2] / a[3]) / (TIMES[3] - TIMES[2])
    u_k = np.sqrt(rel[2] ** 2 + rel[3] ** 2) / (TIMES[3] - TIMES[2])
    assert np.all(np.abs(k_tail - LAMBDA) > 3 * u_k)
    ratio = doses.std(axis=0, ddof=1) / u
    assert abs(float(ratio.mean()) - 1.0) < 0.03
    assert float(np.abs(ratio - 1.0).max()) < 5 * 0.041


def test_common_relative_components_add_in_quadrature() -> None:
    d = _vol(np.array([[[2.0, 4.0]]]), "Gy")
    var = _vol(np.array([[[0.01, 0.04]]]), "Gy2")
    u = dose_uncertainty(d, var, [0.03, None, 0.04]).array
    np.testing.assert_allclose(u, np.sqrt([[[0.01 + (0.05 * 2) ** 2, 0.04 + (0.05 * 4) ** 2]]]))
    np.testing.assert_allclose(dose_uncertainty(d, None, [0.05]).array, 0.05 * d.array)


def test_dvh_band_of_a_uniform_dose() -> None:
    """Every voxel at 10 Gy with u = 1 Gy: the band's DVHs step from 1 to 0 at 8 Gy and at 12 Gy."""
    d = np.full((3, 3, 3), 10.0)
    b = dvh_band(d, np.ones_like(d), np.ones_like(d))
    assert b is not None
    x = b.dose_gy
    assert b.coverage_factor == 2.0
    np.testing.assert_array_equal(b.lower, np.where(x <= 8.0, 1.0, 0.0))
    np.testing.assert_array_equal(b.upper, np.where(x <= 12.0, 1.0, 0.0))
    assert dvh_band(d, np.ones_like(d), np.zeros_like(d)) is None


def test_bad_inputs_are_named() -> None:
    a = np.ones((2, 2, 2, 2))
    with pytest.raises(VoxeldoseError, match="acquisition duration"):
        counting_variance(a, 10.0, [100.0])
    with pytest.raises(VoxeldoseError, match="sensitivity"):
        counting_variance(a, 0.0, [100.0, 100.0])
    with pytest.raises(VoxeldoseError, match="units"):
        dose_variance(_vol(np.ones((3, 3, 3)), "Bq.s"), kernel=_kernel())
