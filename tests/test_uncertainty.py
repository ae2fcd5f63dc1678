"""The EANM uncertainty budget (voxeldose.uncertainty) against first principles.

Expected values: the hand-derived sensitivity coefficients of a two-point mono-exponential TIA, the linear
coefficients of the trapezoid rule, the definition of a root-sum-square of independent components (GUM eq. 10),
a Monte-Carlo of the fit itself, and closed-form geometry — never the code's own output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxeldose.nuclides import load
from voxeldose.timeactivity import fit_voi
from voxeldose.uncertainty import (
    counting_relative_u,
    delineation_dose_relative_u,
    delineation_relative_u,
    fit_parameter_covariance,
    tia_sensitivities,
    tia_variance,
    voi_budget,
)

H = 3600.0
LP = load("Lu-177").decay_constant_per_s
LAM = LP + math.log(2.0) / (80.0 * H)  # effective rate of an 80 h biological half-life
A0 = 1.0e8


def mono(t: np.ndarray) -> np.ndarray:
    return A0 * np.exp(-LAM * t)


def test_two_point_monoexp_tia_uncertainty_is_the_analytic_propagation() -> None:
    """TIA = A1 e^{λ t1}/λ with λ = ln(A1/A2)/Δ: ∂TIA/∂A1 = TIA/A1 + TIA(t1 − 1/λ)/(A1Δ), ∂TIA/∂A2 =
    −TIA(t1 − 1/λ)/(A2Δ); u² = Σ (∂TIA/∂A_i)² u_i² for independent inputs."""
    t = np.array([24.0, 96.0]) * H
    a = mono(t)
    fit = fit_voi(t, a, decay_constant_per_s=LP, model="monoexp")
    tia = A0 / LAM
    assert fit.tia_bqs == pytest.approx(tia, rel=1e-8)
    d = t[1] - t[0]
    c = tia * (t[0] - 1.0 / LAM)
    expected_s = np.array([tia / a[0] + c / (a[0] * d), -c / (a[1] * d)])
    np.testing.assert_allclose(tia_sensitivities(fit), expected_s, rtol=1e-6)
    u = np.array([0.03, 0.05]) * a
    expected_var = float(np.sum(expected_s**2 * u**2))
    assert tia_variance(fit, np.diag(u**2)) == pytest.approx(expected_var, rel=1e-6)


def test_parameter_covariance_keeps_the_correlation_of_amplitude_and_rate() -> None:
    """For the two-point mono-exponential ln A0 = ln A1 + λ t1 and λ = (ln A1 − ln A2)/Δ: with relative input
    uncertainties r1, r2 (ε_i independent standard normal): dλ = (r1 ε1 − r2 ε2)/Δ, dA0/A0 = r1 ε1 + t1 dλ."""
    t = np.array([24.0, 96.0]) * H
    a = mono(t)
    fit = fit_voi(t, a, decay_constant_per_s=LP, model="monoexp")
    r = np.array([0.04, 0.02])
    cov = fit_parameter_covariance(fit, np.diag((r * a) ** 2))
    d = t[1] - t[0]
    var_l = (r[0] ** 2 + r[1] ** 2) / d**2
    cov_a_l = A0 * (r[0] ** 2 / d + t[0] * var_l)
    var_a = A0**2 * (r[0] ** 2 * (1 + t[0] / d) ** 2 + (t[0] * r[1] / d) ** 2)
    np.testing.assert_allclose(cov, [[var_a, cov_a_l], [cov_a_l, var_l]], rtol=1e-6)
    assert cov[0, 1] > 0  # the correlation is real and positive here: a higher A0 goes with a faster rate


def test_trapezoid_sensitivities_are_its_linear_coefficients() -> None:
    t = np.array([4.0, 24.0, 96.0]) * H
    a = np.array([5.0, 4.0, 1.0]) * 1e7
    fit = fit_voi(t, a, decay_constant_per_s=LP, model="trapezoid")
    expected = np.array([t[0] / 2 + (t[1] - t[0]) / 2, (t[2] - t[0]) / 2, (t[2] - t[1]) / 2 + 1 / LP])
    np.testing.assert_allclose(tia_sensitivities(fit), expected, rtol=1e-12)
    assert float(tia_sensitivities(fit) @ a) == pytest.approx(fit.tia_bqs, rel=1e-12)  # the rule is linear


def test_monte_carlo_of_the_fit_matches_the_propagated_tia_uncertainty() -> None:
    """Refit noisy copies of a four-point mono-exponential (5 % independent noise): the TIA's spread agrees with
    the first-order propagation within the Monte-Carlo's own sampling error (200 draws: σ of an SD ≈ 5 %, 3σ allowed)."""
    t = np.array([4.0, 24.0, 96.0, 168.0]) * H
    a = mono(t)
    u = 0.05 * a
    fit = fit_voi(t, a, decay_constant_per_s=LP, model="monoexp")
    u_tia = math.sqrt(tia_variance(fit, np.diag(u**2)))
    rng = np.random.default_rng(13)
    tias = [fit_voi(t, a + rng.normal(0.0, u), decay_constant_per_s=LP, model="monoexp").tia_bqs for _ in range(200)]
    assert float(np.std(tias, ddof=1)) == pytest.approx(u_tia, rel=0.15)
    assert float(np.mean(tias)) == pytest.approx(fit.tia_bqs, rel=0.01)


def test_counting_noise_is_poisson_of_the_voi_counts() -> None:
    # 10 MBq, 10 cps/MBq, 900 s → 90 000 counts → 1/300
    rel = counting_relative_u([10e6, 1e6], 10.0, [900.0, 900.0])
    np.testing.assert_allclose(rel, [1 / 300.0, 1 / math.sqrt(9000.0)])


def test_delineation_of_a_sphere_is_one_voxel_layer_over_root_three() -> None:
    # sphere of radius 30 mm, 3 mm voxels: ΔV ≈ 4πr²·d, relative 3d/r, then /√3
    v_ml = 4 / 3 * math.pi * 30.0**3 / 1000.0
    assert delineation_relative_u(v_ml, (3.0, 3.0, 3.0)) == pytest.approx(3 * 3.0 / 30.0 / math.sqrt(3), rel=1e-9)


def _budget(calibration: float | None) -> tuple[object, np.ndarray]:
    t = np.array([4.0, 24.0, 96.0, 168.0]) * H
    a = mono(t) * (1 + np.array([0.01, -0.02, 0.015, -0.01]))
    fit = fit_voi(t, a, decay_constant_per_s=LP, model="monoexp")
    b = voi_budget(
        fit,
        mean_gy=4.0,
        volume_ml=150.0,
        voxel_size_mm=(4.8, 4.8, 4.8),
        counting_rel_u=counting_relative_u(a, 10.0, [900.0] * 4),
        calibration_rel_u=calibration,
        recovery_rel_u=0.03,
        recovery_how="rc",
        bed_gy=4.5,
        g_factor=0.25,
        alpha_beta_gy=2.5,
    )
    return b, a


def test_combined_uncertainty_is_the_root_sum_square_of_independent_components() -> None:
    b, _ = _budget(0.04)
    rel = [c.relative_u for c in b.components if c.relative_u is not None]
    assert b.mean_gy.relative_u == pytest.approx(math.sqrt(sum(r * r for r in rel)), rel=1e-12)
    assert b.mean_gy.interval == pytest.approx((4.0 - 2 * b.mean_gy.u, 4.0 + 2 * b.mean_gy.u))
    # the residual scatter (1-2 %) exceeds the counting noise (< 0.2 %): the fit component carries it
    assert b.component("time–activity fit").relative_u > b.component("counting").relative_u
    # the TIA lacks only the mass (volume) component
    tia_rel = [c.relative_u for c in b.components if c.relative_u is not None and c.name != "delineation"]
    assert b.tia_bqs.relative_u == pytest.approx(math.sqrt(sum(r * r for r in tia_rel)), rel=1e-12)
    # BED = D + G D²/(α/β): dBED/dD = 1 + 2 G D/(α/β)
    assert b.bed_gy is not None and b.eqd2_gy is not None
    assert b.bed_gy.u == pytest.approx((1 + 2 * 0.25 * 4.0 / 2.5) * b.mean_gy.u, rel=1e-12)
    assert b.eqd2_gy.relative_u == pytest.approx(b.bed_gy.relative_u, rel=1e-12)


def test_unstated_calibration_is_not_invented() -> None:
    b, a = _budget(None)
    assert b.component("calibration").relative_u is None
    assert "not stated" in b.component("calibration").how
    assert any("lower bound" in n for n in b.notes)
    # activity at each scan: recovery and counting only (calibration not stated)
    cu = counting_relative_u(a, 10.0, [900.0] * 4)
    for est, ai, ci in zip(b.activities_bq, a, cu):
        assert est.u == pytest.approx(ai * math.sqrt(0.03**2 + ci**2), rel=1e-12)


def test_outline_of_a_hot_cube_in_cold_surroundings() -> None:
    """Dose 1 Gy in a 4³ cube, 0 outside: grown by one face-connected layer it has 64 + 6·16 = 160 voxels, mean
    0.4 Gy; shrunk (2³), mean 1 Gy: u = |0.4 − 1|/(2√3) relative to 1 Gy.  Uniform dose: no outline effect."""
    frac = np.zeros((10, 10, 10))
    frac[3:7, 3:7, 3:7] = 1.0
    dose = frac.copy()
    assert delineation_dose_relative_u(dose, frac) == pytest.approx(0.6 / (2 * math.sqrt(3)), rel=1e-12)
    assert delineation_dose_relative_u(np.full(frac.shape, 3.0), frac) == pytest.approx(0.0, abs=1e-15)
    assert delineation_dose_relative_u(dose, frac * 0.4) is None  # no voxel half inside
