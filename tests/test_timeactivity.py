"""Time–activity fitting, voxel-wise TIA and single-time-point formulas, checked against analytic physics.

Expected values come from closed-form integrals of the generating curves, from error bounds derived
here (trapezoid rule, linearised least-squares covariance) and from the STP derivations — not from the
code under test.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy.special import lambertw

from voxeldose import backend
from voxeldose.errors import VoxeldoseError
from voxeldose.nuclides import load
from voxeldose.timeactivity import (
    FLAG_FIT,
    FLAG_NO_DATA,
    FLAG_PHYSICAL,
    fit_voi,
    stp_hanscheid,
    stp_madsen,
    voxel_tia,
)

H = 3600.0
LN2 = math.log(2.0)
LP = load("Lu-177").decay_constant_per_s  # physical decay constant, s⁻¹
CLINICAL = np.array([4.0, 24.0, 96.0, 168.0]) * H


def lam_eff(t_bio_h: float) -> float:
    """Effective decay constant for a biological half-life in hours."""
    return LP + LN2 / (t_bio_h * H)


# ----------------------------------------------------------------------------------------------
# Generating curves and their analytic integrals 0 → ∞
# ----------------------------------------------------------------------------------------------

MONO = {"A0": 1.0e8, "l": lam_eff(80.0)}
BI = {"A0": 1.0e8, "l1": lam_eff(60.0), "l2": LN2 / (3.0 * H)}
TRI = {
    "A1": 6.0e7,
    "A2": 4.0e7,
    "l1": lam_eff(150.0),
    "l2": lam_eff(15.0),
    "l3": LN2 / (1.5 * H),
}


def mono(t, A0=MONO["A0"], lam=MONO["l"]):
    return A0 * np.exp(-lam * t)


def bi(t, A0=BI["A0"], l1=BI["l1"], l2=BI["l2"]):
    return A0 * (np.exp(-l1 * t) - np.exp(-l2 * t))


def tri(t, A1=TRI["A1"], A2=TRI["A2"], l1=TRI["l1"], l2=TRI["l2"], l3=TRI["l3"]):
    return A1 * np.exp(-l1 * t) + A2 * np.exp(-l2 * t) - (A1 + A2) * np.exp(-l3 * t)


TIA_MONO = MONO["A0"] / MONO["l"]
TIA_BI = BI["A0"] * (1 / BI["l1"] - 1 / BI["l2"])
TIA_TRI = TRI["A1"] / TRI["l1"] + TRI["A2"] / TRI["l2"] - (TRI["A1"] + TRI["A2"]) / TRI["l3"]

T5 = np.array([4.0, 24.0, 48.0, 96.0, 168.0]) * H
T6 = np.array([1.0, 4.0, 24.0, 48.0, 96.0, 168.0]) * H
T10 = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 24.0, 48.0, 96.0, 168.0, 240.0]) * H


# ----------------------------------------------------------------------------------------------
# VOI fits: exact data
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, curve, times, tia, rates",
    [
        ("monoexp", mono, T5, TIA_MONO, [MONO["l"]]),
        ("biexp", bi, T6, TIA_BI, [BI["l1"], BI["l2"]]),
        ("triexp", tri, T10, TIA_TRI, [TRI["l1"], TRI["l2"], TRI["l3"]]),
    ],
)
@pytest.mark.parametrize("requested", ["explicit", "auto"])
def test_exact_data_recovered(model, curve, times, tia, rates, requested):
    r = fit_voi(
        times,
        curve(times),
        decay_constant_per_s=LP,
        model=model if requested == "explicit" else "auto",
    )
    assert r.model == model
    assert r.tia_bqs == pytest.approx(tia, rel=1e-6)
    fitted_rates = sorted(k for _, k in r.exponentials)
    assert fitted_rates == pytest.approx(sorted(rates), rel=1e-4)
    # the exponentials describe the same curve, and the analytic integral is Σ c/k
    tt = np.linspace(0, 400 * H, 50)
    assert r.activity(tt) == pytest.approx(curve(tt), rel=1e-5, abs=1e-6 * curve(times).max())
    assert sum(c / k for c, k in r.exponentials) == pytest.approx(r.tia_bqs, rel=1e-12)
    assert all(k >= LP for _, k in r.exponentials)
    assert r.n_points == len(times)
    assert max(abs(x) for x in r.residuals) < 1e-5 * curve(times).max()


def test_monoexp_with_exactly_two_points_and_named_params():
    t = CLINICAL[-2:]
    r = fit_voi(t, mono(t), decay_constant_per_s=LP, model="monoexp")
    assert r.params["lambda_per_s"] == pytest.approx(MONO["l"], rel=1e-8)
    assert r.params["A0_bq"] == pytest.approx(MONO["A0"], rel=1e-8)
    assert r.params["effective_half_life_s"] == pytest.approx(LN2 / MONO["l"], rel=1e-8)
    assert r.aicc is None  # n = k: no AICc


def test_monoexp_rate_never_below_physical_decay():
    """Data flatter than physical decay: the constrained fit sits at λ = λ_phys."""
    t = T5
    A = 1e6 * np.exp(-0.5 * LP * t)
    r = fit_voi(t, A, decay_constant_per_s=LP, model="monoexp")
    assert r.params["lambda_per_s"] >= LP
    assert r.params["lambda_per_s"] == pytest.approx(LP, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# VOI fits: noise, with a tolerance from the linearised least-squares covariance
# ----------------------------------------------------------------------------------------------


def _linearised_sd_tia(curve, tia_of, theta, t, sigma_rel):
    """sd of the TIA for relative (log-normal-like) noise σ: Cov θ = σ² (JᵀJ)⁻¹, J = ∂ ln f/∂θ."""
    theta = np.asarray(theta, dtype=float)
    J = np.empty((t.size, theta.size))
    g = np.empty(theta.size)
    for j in range(theta.size):
        d = np.zeros_like(theta)
        d[j] = 1e-6 * abs(theta[j])
        J[:, j] = (np.log(curve(t, *(theta + d))) - np.log(curve(t, *(theta - d)))) / (2 * d[j])
        g[j] = (tia_of(*(theta + d)) - tia_of(*(theta - d))) / (2 * d[j])
    cov = sigma_rel**2 * np.linalg.inv(J.T @ J)
    return float(np.sqrt(g @ cov @ g))


@pytest.mark.parametrize(
    "model, curve, tia_of, theta, times",
    [
        ("monoexp", mono, lambda A0, lam: A0 / lam, [MONO["A0"], MONO["l"]], T5),
        (
            "biexp",
            bi,
            lambda A0, l1, l2: A0 * (1 / l1 - 1 / l2),
            [BI["A0"], BI["l1"], BI["l2"]],
            T6,
        ),
    ],
)
def test_noisy_tia_within_derived_tolerance(model, curve, tia_of, theta, times):
    sigma = 0.05
    sd = _linearised_sd_tia(curve, tia_of, theta, times, sigma)
    true = tia_of(*theta)
    assert 0.005 < sd / true < 0.1  # the tolerance is meaningful: neither trivial nor huge
    rng = np.random.default_rng(20240601)
    errors = []
    for _ in range(20):
        A = curve(times, *theta) * (1 + sigma * rng.standard_normal(times.size))
        r = fit_voi(times, A, decay_constant_per_s=LP, model=model)
        errors.append((r.tia_bqs - true) / sd)
    errors = np.asarray(errors)
    assert np.all(np.abs(errors) < 4.0)  # 4 σ of the linearised estimator
    assert abs(errors.mean()) < 4.0 / math.sqrt(errors.size)  # no gross bias


# ----------------------------------------------------------------------------------------------
# AICc model choice
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("times", [T5, T6, np.array([2.0, 4.0, 24.0, 48.0, 72.0, 96.0, 168.0]) * H])
def test_auto_picks_monoexp_for_mono_data(times):
    # exact data: biexp fits no better (relative RMS floor), so the AICc penalty decides
    r = fit_voi(times, mono(times), decay_constant_per_s=LP)
    assert r.model == "monoexp"
    assert r.candidates["biexp"]["aicc"] > r.candidates["monoexp"]["aicc"]
    # noisy data, 10 realisations: the extra parameter never buys enough
    rng = np.random.default_rng(7)
    for _ in range(10):
        A = mono(times) * (1 + 0.05 * rng.standard_normal(times.size))
        assert fit_voi(times, A, decay_constant_per_s=LP).model == "monoexp"


def test_auto_keeps_every_candidate_and_their_diagnostics():
    r = fit_voi(T6, bi(T6), decay_constant_per_s=LP)
    assert r.model == "biexp"
    assert set(r.candidates) == {"monoexp", "biexp", "triexp"}
    assert r.candidates["monoexp"]["success"] and r.candidates["monoexp"]["aicc"] is not None
    assert r.candidates["triexp"]["success"] is False  # 6 points: k = 5 is not < n − 1
    assert "not fitted" in r.candidates["triexp"]["message"]
    assert r.aicc == r.candidates["biexp"]["aicc"]
    assert r.r2 == pytest.approx(1.0, abs=1e-9)


def test_auto_with_three_points_uses_monoexp_not_the_trapezoid():
    """Three scans (4, 24, 96 h): AICc is undefined for every model, but a mono-exponential keeps one degree
    of freedom and is exact for mono-exponential data, where the trapezoid's straight segments overestimate
    the 24→96 h decay by ≈ (1+r)/2·λΔt/(1−r) − 1 (r = e^{−λΔt}; ≈ +9 % at T_eff 40 h) — so auto takes it."""
    t = np.array([4.0, 24.0, 96.0]) * H
    r = fit_voi(t, mono(t), decay_constant_per_s=LP)
    assert r.model == "monoexp" and r.exponentials is not None
    assert "AICc undefined" in r.message
    assert r.tia_bqs == pytest.approx(MONO["A0"] / MONO["l"], rel=1e-6)
    trap = fit_voi(t, mono(t), decay_constant_per_s=LP, model="trapezoid")
    assert trap.tia_bqs > r.tia_bqs * 1.02


def test_unmeasured_early_peak_is_not_chosen():
    """A fast transient before the first scan is invisible in the data; a fit inventing one is excluded."""
    t = np.array([2.0, 4.0, 8.0, 24.0, 48.0, 96.0, 168.0, 240.0]) * H
    spike = {
        "A1": 1e6,
        "A2": 1e9,
        "l1": lam_eff(100.0),
        "l2": LN2 / (0.3 * H),
        "l3": LN2 / (0.1 * H),
    }
    A = tri(t, **spike)
    early = np.geomspace(t[0] * 1e-3, t[0], 200)
    assert tri(early, **spike).max() > 10 * A.max()  # the generating curve does peak unseen
    r = fit_voi(t, A, decay_constant_per_s=LP)
    assert r.model != "triexp"
    assert float(np.max(r.activity(early))) <= 2 * A.max()
    if r.candidates["triexp"]["success"] is False:
        assert "implausible" in r.candidates["triexp"]["message"]
    explicit = fit_voi(t, A, decay_constant_per_s=LP, model="triexp")
    if float(np.max(explicit.activity(early))) > 2 * A.max():
        assert "WARNING implausible" in explicit.message


# ----------------------------------------------------------------------------------------------
# Trapezoid with A(0) = 0 and a physical-decay tail
# ----------------------------------------------------------------------------------------------


def _trapezoid_bracket(t, A0, lam, lam_tail_used, exact_tail):
    """[low, high] for (trapezoid estimate − true TIA) of A0 e^{−λt}, derived analytically.

    * first segment (0, t1) with A(0) = 0: exact error A1 t1/2 − A0 (1 − e^{−λ t1})/λ (< 0);
    * interior segments: f convex, so 0 ≤ trapezoid − integral ≤ h³/12 · max f'' = h³/12 · A0 λ² e^{−λ t_i};
    * tail after t_n: A_n/λ_tail − A_n/λ (0 when the tail uses the true rate).
    """
    f = A0 * np.exp(-lam * t)
    first = 0.5 * f[0] * t[0] - A0 * (1 - math.exp(-lam * t[0])) / lam
    tail = 0.0 if exact_tail else f[-1] / lam_tail_used - f[-1] / lam
    h = np.diff(t)
    interior_max = float(np.sum(h**3 / 12 * A0 * lam**2 * np.exp(-lam * t[:-1])))
    return first + tail, first + tail + interior_max


def test_trapezoid_clinical_four_points_within_derived_bound():
    t = CLINICAL
    r = fit_voi(t, mono(t), decay_constant_per_s=LP, model="trapezoid")
    low, high = _trapezoid_bracket(t, MONO["A0"], MONO["l"], LP, exact_tail=False)
    err = r.tia_bqs - TIA_MONO
    assert low <= err <= high
    # the parts add up and are what the rule says
    p = r.params
    assert p["tia_uptake_bqs"] + p["tia_measured_bqs"] + p["tia_tail_bqs"] == pytest.approx(r.tia_bqs, rel=1e-12)
    assert p["tia_tail_bqs"] == pytest.approx(mono(t[-1]) / LP, rel=1e-12)
    assert p["tia_uptake_bqs"] == pytest.approx(0.5 * mono(t[0]) * t[0], rel=1e-12)


def test_trapezoid_converges_with_denser_sampling():
    """Physical-decay-only data (tail exact): the error is the first segment + interior terms → 0."""
    A0, lam = 1e8, LP
    errors = []
    for step_h in (48.0, 24.0, 12.0, 6.0, 3.0, 1.0):
        t = np.arange(step_h, 800.0 + step_h / 2, step_h) * H
        r = fit_voi(t, A0 * np.exp(-lam * t), decay_constant_per_s=LP, model="trapezoid")
        low, high = _trapezoid_bracket(t, A0, lam, LP, exact_tail=True)
        err = r.tia_bqs - A0 / lam
        assert low - 1e-9 * A0 / lam <= err <= high + 1e-9 * A0 / lam
        errors.append(abs(err) / (A0 / lam))
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 5e-3


def test_trapezoid_curve_evaluator():
    t = CLINICAL
    A = mono(t)
    r = fit_voi(t, A, decay_constant_per_s=LP, model="trapezoid")
    assert r.activity(t) == pytest.approx(A, rel=1e-12)
    assert float(r.activity(0.0)) == 0.0
    assert float(r.activity(t[0] / 2)) == pytest.approx(A[0] / 2, rel=1e-12)
    later = t[-1] + 10 * 24 * H
    assert float(r.activity(later)) == pytest.approx(A[-1] * math.exp(-LP * 10 * 24 * H), rel=1e-12)


def test_to_dict_is_json_ready():
    for model in ("auto", "trapezoid"):
        d = fit_voi(T6, bi(T6), decay_constant_per_s=LP, model=model).to_dict()
        again = json.loads(json.dumps(d, allow_nan=False))
        assert again["model"] in ("biexp", "trapezoid")
        assert again["tia_bqs"] > 0
        assert len(again["residuals_bq"]) == 6
        assert "candidates" in again and again["n_points"] == 6


# ----------------------------------------------------------------------------------------------
# Errors a physicist can act on
# ----------------------------------------------------------------------------------------------


def test_duplicated_times_named_in_hours():
    with pytest.raises(VoxeldoseError, match=r"24 h appear more than once"):
        fit_voi(np.array([4, 24, 24, 96]) * H, [1, 2, 3, 4], decay_constant_per_s=LP)


def test_unordered_times_named_in_hours():
    with pytest.raises(VoxeldoseError, match=r"96 h is followed by 24 h"):
        fit_voi(np.array([4, 96, 24]) * H, [1, 2, 3], decay_constant_per_s=LP)


def test_times_before_injection_rejected():
    with pytest.raises(VoxeldoseError, match="after the injection"):
        fit_voi(np.array([0, 24, 96]) * H, [1, 2, 3], decay_constant_per_s=LP)


@pytest.mark.parametrize(
    "bad",
    [
        [1.0, -2.0, 3.0],
        [1.0, float("nan"), 3.0],
        [1.0, float("inf"), 3.0],
        [0.0, 0.0, 0.0],
    ],
)
def test_bad_activities_rejected(bad):
    with pytest.raises(VoxeldoseError, match="activities"):
        fit_voi(np.array([4, 24, 96]) * H, bad, decay_constant_per_s=LP)


def test_length_mismatch_rejected():
    with pytest.raises(VoxeldoseError, match="one activity per time point"):
        fit_voi(np.array([4, 24, 96]) * H, [1.0, 2.0], decay_constant_per_s=LP)


@pytest.mark.parametrize("model", ["auto", "monoexp", "trapezoid"])
def test_single_point_suggests_stp(model):
    with pytest.raises(VoxeldoseError, match="single-time-point method.*stp"):
        fit_voi([96 * H], [1e6], decay_constant_per_s=LP, model=model)


@pytest.mark.parametrize("model, n", [("biexp", 2), ("triexp", 4)])
def test_too_few_points_for_model(model, n):
    t = CLINICAL[:n]
    with pytest.raises(VoxeldoseError, match=f"{model}' needs at least"):
        fit_voi(t, mono(t), decay_constant_per_s=LP, model=model)


def test_unknown_model_and_bad_decay_constant():
    with pytest.raises(VoxeldoseError, match="unknown"):
        fit_voi(CLINICAL, mono(CLINICAL), decay_constant_per_s=LP, model="gamma")
    with pytest.raises(VoxeldoseError, match="decay constant"):
        fit_voi(CLINICAL, mono(CLINICAL), decay_constant_per_s=-1.0)


# ----------------------------------------------------------------------------------------------
# Voxel-wise TIA
# ----------------------------------------------------------------------------------------------

T_BIO_H = np.array([[20.0, 50.0], [100.0, 500.0]])  # one biological half-life per voxel
A0_MAP = np.array([[1e3, 2e3], [3e3, 4e3]])


def _mono_stack(t, dtype=np.float64):
    lam = LP + LN2 / (T_BIO_H * H)
    stack = A0_MAP[None] * np.exp(-lam[None] * t[:, None, None])
    return stack[:, None].astype(dtype), lam[None], A0_MAP[None]  # [n_t, k=1, j, i]


def test_voxel_hybrid_matches_analytic_within_trapezoid_bound():
    t = CLINICAL
    stack, lam, A0 = _mono_stack(t)
    res = voxel_tia(stack, t, decay_constant_per_s=LP)
    assert res.tia.shape == stack.shape[1:]
    assert np.all(res.flags == FLAG_FIT)
    for idx in np.ndindex(lam.shape):
        # the tail through the last two exact points has the true rate: only the trapezoid part errs
        low, high = _trapezoid_bracket(t, A0[idx], lam[idx], None, exact_tail=True)
        err = res.tia[idx] - A0[idx] / lam[idx]
        assert low - 1e-9 * A0[idx] / lam[idx] <= err <= high + 1e-9 * A0[idx] / lam[idx]
        # quality = share of the TIA after the last scan
        assert res.quality[idx] == pytest.approx(stack[(-1, *idx)] / lam[idx] / res.tia[idx], rel=1e-9)


@pytest.mark.parametrize("tail_points", [2, 3, 4])
def test_voxel_tail_fit_is_exact_for_mono_data(tail_points):
    t = CLINICAL
    stack, _lam, _ = _mono_stack(t)
    hybrid2 = voxel_tia(stack, t, decay_constant_per_s=LP, tail_points=2)
    other = voxel_tia(stack, t, decay_constant_per_s=LP, tail_points=tail_points)
    np.testing.assert_allclose(other.tia, hybrid2.tia, rtol=1e-10)


def test_voxel_monoexp_exact_for_mono_data():
    t = CLINICAL
    stack, lam, A0 = _mono_stack(t)
    res = voxel_tia(stack, t, decay_constant_per_s=LP, method="monoexp")
    np.testing.assert_allclose(res.tia, A0 / lam, rtol=1e-9)
    np.testing.assert_allclose(res.quality, np.exp(-lam * t[-1]), rtol=1e-9)
    assert np.all(res.flags == FLAG_FIT)
    assert res.method == "monoexp"


def test_voxel_float32_stays_float32_and_agrees():
    t = CLINICAL
    s64, _, _ = _mono_stack(t)
    r64 = voxel_tia(s64, t, decay_constant_per_s=LP)
    r32 = voxel_tia(s64.astype(np.float32), t, decay_constant_per_s=LP)
    assert r32.tia.dtype == np.float32 and r32.quality.dtype == np.float32 and r32.flags.dtype == np.int8
    np.testing.assert_allclose(r32.tia, r64.tia, rtol=1e-5)


def test_voxel_integer_counts_promoted_to_float():
    t = CLINICAL
    s64, _, _ = _mono_stack(t)
    counts = np.round(s64).astype(np.int16)
    res = voxel_tia(counts, t, decay_constant_per_s=LP)
    assert res.tia.dtype == np.float32
    np.testing.assert_allclose(res.tia, voxel_tia(np.round(s64), t, decay_constant_per_s=LP).tia, rtol=1e-5)


@pytest.mark.parametrize("method", ["hybrid", "monoexp"])
def test_voxel_fallback_flags(method):
    t = CLINICAL
    stack, _lam, _ = _mono_stack(t)
    stack = stack.copy()
    stack[:, 0, 0, 0] = 0.0  # no activity at any time → 0 TIA
    stack[-1, 0, 0, 1] = -5.0  # last value ≤ 0 → physical-decay tail of nothing
    stack[:, 0, 1, 0] = 100.0 * (1.0 + t / t[-1])  # still rising at the end (continued uptake)
    res = voxel_tia(stack, t, decay_constant_per_s=LP, method=method)
    assert res.flags[0, 0, 0] == FLAG_NO_DATA and res.tia[0, 0, 0] == 0.0 and res.quality[0, 0, 0] == 0.0
    assert res.flags[0, 0, 1] == FLAG_PHYSICAL
    assert res.flags[0, 1, 0] == FLAG_PHYSICAL
    assert res.flags[0, 1, 1] == FLAG_FIT
    # the physical-decay fallback = trapezoid from (0, 0) with negatives as 0, plus A_n/λ_phys
    a = np.maximum(stack[:, 0, 1, 0], 0)
    expected = 0.5 * a[0] * t[0] + np.sum(0.5 * (a[1:] + a[:-1]) * np.diff(t)) + a[-1] / LP
    assert res.tia[0, 1, 0] == pytest.approx(expected, rel=1e-12)
    a = np.maximum(stack[:, 0, 0, 1], 0)
    expected = 0.5 * a[0] * t[0] + np.sum(0.5 * (a[1:] + a[:-1]) * np.diff(t))
    assert res.tia[0, 0, 1] == pytest.approx(expected, rel=1e-12)
    assert res.flag_counts() == {
        "fit": 1,
        "physical_decay_tail": 2,
        "no_positive_data": 1,
    }


def test_voxel_min_activity_widens_fallback():
    t = CLINICAL
    stack, _, _ = _mono_stack(t)
    res = voxel_tia(stack, t, decay_constant_per_s=LP, min_activity=float(stack[-1].max()) * 2)
    assert np.all(res.flags == FLAG_PHYSICAL)


def test_voxel_errors():
    t = CLINICAL
    stack, _, _ = _mono_stack(t)
    with pytest.raises(VoxeldoseError, match="one image per time point"):
        voxel_tia(stack[:3], t, decay_constant_per_s=LP)
    bad = stack.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(VoxeldoseError, match="1 non-finite"):
        voxel_tia(bad, t, decay_constant_per_s=LP)
    with pytest.raises(VoxeldoseError, match="single-time-point"):
        voxel_tia(stack[:1], t[:1], decay_constant_per_s=LP)
    with pytest.raises(VoxeldoseError, match="followed by"):
        voxel_tia(stack, t[::-1], decay_constant_per_s=LP)
    with pytest.raises(VoxeldoseError, match="unknown voxel TIA method"):
        voxel_tia(stack, t, decay_constant_per_s=LP, method="spline")


def test_voxel_result_in_input_namespace():
    """The same code path serves NumPy and CuPy: outputs live in the input's namespace."""
    t = CLINICAL
    stack, _, _ = _mono_stack(t)
    res = voxel_tia(stack, t, decay_constant_per_s=LP)
    for arr in (res.tia, res.quality, res.flags):
        assert backend.xp_for(arr) is np and isinstance(arr, np.ndarray)


@pytest.mark.gpu
def test_voxel_tia_on_gpu_matches_cpu():
    if not backend.gpu_available():
        pytest.skip("no usable CUDA device / CuPy")
    import cupy

    t = CLINICAL
    stack, _, _ = _mono_stack(t)
    stack = stack.copy()
    stack[-1, 0, 1, 0] = 1.5 * stack[-2, 0, 1, 0]
    for method in ("hybrid", "monoexp"):
        cpu = voxel_tia(stack, t, decay_constant_per_s=LP, method=method)
        gpu = voxel_tia(
            cupy.asarray(stack, dtype=cupy.float32),
            t,
            decay_constant_per_s=LP,
            method=method,
        )
        assert isinstance(gpu.tia, cupy.ndarray) and gpu.tia.dtype == cupy.float32
        np.testing.assert_allclose(backend.to_host(gpu.tia), cpu.tia, rtol=1e-5)
        np.testing.assert_array_equal(backend.to_host(gpu.flags), cpu.flags)
    A = cupy.asarray(np.array([1.0, 2.0]))
    np.testing.assert_allclose(
        backend.to_host(stp_hanscheid(A, 96 * H)),
        stp_hanscheid(np.array([1.0, 2.0]), 96 * H),
    )


# ----------------------------------------------------------------------------------------------
# Single time point
# ----------------------------------------------------------------------------------------------


def _hanscheid_ratio(x):
    """Estimate/true for A0 e^{−λt}: (A0 e^{−x}·2t/ln2)/(A0/λ) = (2/ln 2)·x e^{−x}, x = λt."""
    return 2.0 / LN2 * x * np.exp(-x)


def test_hanscheid_exact_conditions():
    t = 96 * H
    # the two roots of (2/ln2) x e^{−x} = 1: x = −W(−ln2/2) on both real branches of Lambert W
    x1 = -lambertw(-LN2 / 2, 0).real
    x2 = -lambertw(-LN2 / 2, -1).real
    assert x1 == pytest.approx(LN2, rel=1e-12)  # t = T_eff
    assert x2 == pytest.approx(2 * LN2, rel=1e-12)  # t = 2 T_eff: 2ln2·e^{−2ln2} = ln2/2
    for x in (x1, x2):
        lam = x / t
        A0 = 5e7
        assert stp_hanscheid(A0 * math.exp(-lam * t), t) == pytest.approx(A0 / lam, rel=1e-12)
    # maximal overestimate at x = 1 (t = T_eff/ln 2): 2/(e ln 2)
    lam = 1.0 / t
    assert stp_hanscheid(math.exp(-1.0), t) * lam == pytest.approx(2 / (math.e * LN2), rel=1e-12)
    xs = np.linspace(0.05, 5, 200)
    assert np.all(_hanscheid_ratio(xs) <= 2 / (math.e * LN2) + 1e-12)


def test_hanscheid_arrays():
    t = 96 * H
    A = np.array([[1.0, 2.0], [3.0, 0.0]])
    out = stp_hanscheid(A, t)
    assert isinstance(out, np.ndarray) and out.shape == A.shape
    np.testing.assert_allclose(out, A * 2 * t / LN2)


def test_madsen_exact_for_mono_with_population_half_life():
    t = 72 * H
    T_eff = np.array([30.0, 50.0, 120.0]) * H
    lam = LN2 / T_eff
    A0 = np.array([1e6, 2e6, 3e6])
    A_t = A0 * np.exp(-lam * t)
    np.testing.assert_allclose(stp_madsen(A_t, t, T_eff), A0 / lam, rtol=1e-12)
    assert stp_madsen(float(A_t[1]), t, float(T_eff[1])) == pytest.approx(A0[1] / lam[1], rel=1e-12)
    # Hänscheid and Madsen agree when the scan is at t = T_eff
    assert stp_madsen(1.0, 50 * H, 50 * H) == pytest.approx(stp_hanscheid(1.0, 50 * H), rel=1e-12)


def test_stp_errors():
    with pytest.raises(VoxeldoseError, match="scan time"):
        stp_hanscheid(1.0, -3.0)
    with pytest.raises(VoxeldoseError, match="effective half-life"):
        stp_madsen(1.0, 96 * H, 0.0)
    with pytest.raises(VoxeldoseError, match="effective half-life"):
        stp_madsen(np.ones(2), 96 * H, np.array([50 * H, -1.0]))


def test_voxel_exponential_interpolation_is_exact_for_piecewise_monoexponential():
    """Uptake finished before the first scan: A(t) = A0 e^{-kt} for t ≥ t1.  Exponential interpolation
    between scans integrates each segment exactly; only [0, t1] (linear uptake assumed) and the tail
    (fitted through the last two points, exact for mono-exponential data) remain."""
    from voxeldose.timeactivity import voxel_tia

    lam = math.log(2) / (6.647 * 86400)
    t = np.array([4.0, 24.0, 96.0, 168.0]) * 3600
    k = np.array([math.log(2) / (52 * 3600), math.log(2) / (90 * 3600), lam])
    a0 = np.array([1e6, 2e6, 5e5])
    stack = a0[None, :] * np.exp(-np.outer(t, k))
    res = voxel_tia(stack.reshape(4, 1, 1, 3), t, decay_constant_per_s=lam, method="exponential")
    exact_after_t1 = a0 * np.exp(-k * t[0]) / k
    first = 0.5 * stack[0] * t[0]  # the linear-uptake triangle assumed on [0, t1]
    assert np.allclose(res.tia.ravel(), exact_after_t1 + first, rtol=1e-9)
    # the trapezoid (hybrid) overestimates the faster-clearing curves by over a per cent between scans
    hyb = voxel_tia(stack.reshape(4, 1, 1, 3), t, decay_constant_per_s=lam, method="hybrid")
    assert np.all(hyb.tia.ravel()[:2] > res.tia.ravel()[:2] * 1.01)
