"""Per-VOI metrics, DVH, radiobiology and red-marrow dose — checked against hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from voxeldose import metrics as M
from voxeldose.errors import VoxeldoseError

H = M.HOUR_S
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------- DVH
def test_uniform_dose_gives_a_step_dvh():
    dose = np.full((6, 7, 8), 3.0, dtype=np.float32)
    w = np.zeros_like(dose)
    w[1:5, 2:6, 1:7] = 1.0
    h = M.dvh(dose, w, voxel_ml=0.1, bin_gy=0.5)
    assert h.total_volume_ml == pytest.approx(4 * 4 * 6 * 0.1)
    below = h.dose_gy <= 3.0
    assert np.all(h.volume_fraction[below] == 1.0)
    assert np.all(h.volume_fraction[~below] == 0.0)
    assert h.dose_gy[0] == 0.0 and h.dose_gy[-1] > 3.0
    for x in (0, 2, 50, 98, 100):
        assert h.D(x) == pytest.approx(3.0)
    assert h.V(3.0) == 1.0 and h.V(3.0 + 1e-9) == 0.0 and h.V(0.0) == 1.0
    assert h.volume_ml[0] == pytest.approx(h.total_volume_ml)


def test_linear_ramp_quantiles_are_analytic():
    # N equal voxels with doses at the centres of N equal dose intervals on [0, Dmax]: the volume is
    # uniformly distributed in dose, so V(D) = 1 − D/Dmax and D_x = (1 − x/100)·Dmax exactly.
    n, dmax = 1000, 12.0
    dose = ((np.arange(n) + 0.5) / n * dmax).reshape(10, 10, 10)
    rng = np.random.default_rng(1)
    dose = rng.permutation(dose.ravel()).reshape(10, 10, 10)  # order must not matter
    h = M.dvh(dose, np.ones_like(dose), voxel_ml=0.2)
    assert h.D(50) == pytest.approx(0.5 * dmax, abs=1e-12)  # the median
    assert h.D(2) == pytest.approx(0.98 * dmax, abs=1e-12)
    assert h.D(98) == pytest.approx(0.02 * dmax, abs=1e-12)
    assert h.D_cc(0.2 * 250) == pytest.approx(0.75 * dmax, abs=1e-12)  # hottest 50 ml of 200 ml
    for g in (0.0, 3.0, 6.0, 11.0):
        assert h.V(g) == pytest.approx(1 - g / dmax, abs=1.0 / n)
    # tabulated curve agrees with V() at the bin edges
    for e, v in zip(h.dose_gy, h.volume_fraction):
        assert v == pytest.approx(h.V(e))


def test_fractional_weights():
    # voxel A: dose 1 Gy fully inside; voxel B: dose 3 Gy half inside; voxel C: 9 Gy outside (w = 0)
    dose = np.array([1.0, 3.0, 9.0])
    w = np.array([1.0, 0.5, 0.0])
    h = M.dvh(dose, w, voxel_ml=2.0)
    assert h.total_volume_ml == pytest.approx(3.0)
    assert h.V(2.0) == pytest.approx(0.5 / 1.5)
    assert h.V(1.0) == pytest.approx(1.0)
    assert h.max_gy == 3.0  # the outside voxel does not count
    # same volume distribution written as three whole half-size voxels gives the same V(D)
    h2 = M.dvh(np.array([1.0, 1.0, 3.0]), np.ones(3), voxel_ml=1.0)
    for g in (0.5, 1.0, 2.0, 3.0, 3.5):
        assert h.V(g) == pytest.approx(h2.V(g))
    met = M.voi_metrics(dose, w, voxel_ml=2.0, injected_activity_bq=7.4e9, dose_cc=())
    assert met["mean_gy"] == pytest.approx((1 * 1 + 0.5 * 3) / 1.5)
    assert met["volume_ml"] == pytest.approx(3.0)
    assert met["min_gy"] == 1.0 and met["max_gy"] == 3.0  # both have w ≥ 0.5


def test_mean_dose_is_mass_weighted_with_a_density():
    dose = np.array([1.0, 2.0])
    w = np.ones(2)
    rho = np.array([1.0, 3.0])
    met = M.voi_metrics(dose, w, voxel_ml=0.5, density_g_per_ml=rho, injected_activity_bq=2e9, dose_cc=())
    # energy/mass: (1·1 + 3·2) / (1 + 3)
    assert met["mean_gy"] == pytest.approx(7.0 / 4.0)
    assert met["mean_weighting"] == "mass"
    assert met["mass_g"] == pytest.approx(4 * 0.5)
    assert met["gy_per_gbq"] == pytest.approx(1.75 / 2.0)
    met_v = M.voi_metrics(dose, w, voxel_ml=0.5, injected_activity_bq=2e9, dose_cc=())
    assert met_v["mean_gy"] == pytest.approx(1.5) and met_v["mass_g"] is None
    assert met_v["mean_weighting"] == "volume" and any("density" in n for n in met_v["notes"])
    # a scalar density gives the volume-weighted mean and mass = ρ·V
    met_s = M.voi_metrics(dose, w, voxel_ml=0.5, density_g_per_ml=1.05, injected_activity_bq=2e9, dose_cc=())
    assert met_s["mean_gy"] == pytest.approx(1.5) and met_s["mass_g"] == pytest.approx(1.05)


def test_dx_bounds_monotonic_and_v_matches_counting():
    rng = np.random.default_rng(7)
    dose = rng.gamma(2.0, 2.0, size=(12, 12, 12))
    w = np.clip(rng.uniform(-0.3, 1.3, size=dose.shape), 0, 1)
    h = M.dvh(dose, w, voxel_ml=0.064)
    inside = w > 0
    xs = np.linspace(0, 100, 41)
    ds = np.array([h.D(x) for x in xs])
    assert np.all(np.diff(ds) <= 1e-12)
    assert dose[inside].min() <= h.D(98) <= h.D(50) <= h.D(2) <= dose[inside].max()
    for g in (0.5, 2.0, 4.0, 9.0):
        expected = w[dose >= g].sum() / w.sum()
        assert h.V(g) == pytest.approx(expected)
    # about x % of the volume receives ≥ D_x (within one voxel's share)
    wmax = w.max() / w.sum()
    for x in (2, 10, 50, 90, 98):
        assert abs(h.V(h.D(x)) - x / 100) <= wmax + 1e-12


def test_dcc_beyond_volume_and_voi_metrics_keys():
    dose = np.linspace(0, 10, 1000).reshape(10, 10, 10)
    w = np.ones_like(dose)
    met = M.voi_metrics(
        dose,
        w,
        voxel_ml=0.001,
        injected_activity_bq=7.4e9,
        dose_cc=(0.5, 2.0),
        v_gy=(5, 7.5),
        d_percent=(2, 50, 98, 99.5),
    )
    assert met["volume_ml"] == pytest.approx(1.0)
    assert met["D2cc_gy"] is None and any("D2cc" in n for n in met["notes"])
    assert met["D0.5cc_gy"] == pytest.approx(5.0, abs=0.01)
    assert met["V5Gy_fraction"] == pytest.approx(0.5, abs=0.001)
    assert met["V7.5Gy_fraction"] == pytest.approx(0.25, abs=0.001)
    assert {"D2_gy", "D50_gy", "D98_gy", "D99.5_gy", "min_gy", "max_gy", "dvh"} <= set(met)
    assert met["max_gy"] == pytest.approx(10.0) and met["min_gy"] == 0.0


def test_min_max_fall_back_when_no_voxel_is_half_inside():
    dose = np.array([1.0, 4.0])
    met = M.voi_metrics(dose, np.array([0.2, 0.3]), voxel_ml=1.0, injected_activity_bq=1e9, dose_cc=())
    assert met["min_max_over"] == "fraction>0" and (met["min_gy"], met["max_gy"]) == (1.0, 4.0)


def test_dvh_to_dict_is_compact_and_keeps_shape():
    rng = np.random.default_rng(3)
    dose = np.concatenate([rng.normal(20, 0.3, 5000), rng.uniform(0, 40, 500)])
    h = M.dvh(dose, np.ones_like(dose), voxel_ml=0.1, bin_gy=0.01)
    assert h.dose_gy.size > 3000
    d = h.to_dict(max_points=100)
    assert d["downsampled"] and len(d["dose_gy"]) <= 102 and len(d["dose_gy"]) == len(d["volume_fraction"])
    assert d["dose_gy"][0] == 0.0 and d["volume_fraction"][0] == 1.0 and d["volume_fraction"][-1] == 0.0
    assert np.all(np.diff(d["volume_fraction"]) <= 0)
    # the steep fall near 20 Gy keeps points: the curve interpolated from the compact form stays close
    vi = np.interp(h.dose_gy, d["dose_gy"], d["volume_fraction"])
    assert np.max(np.abs(vi - h.volume_fraction)) < 0.05
    small = M.dvh(np.array([1.0, 2.0]), np.ones(2), voxel_ml=1.0, bin_gy=0.5).to_dict()
    assert not small["downsampled"]


def test_dvh_rejects_bad_input():
    with pytest.raises(VoxeldoseError, match="empty"):
        M.dvh(np.ones(4), np.zeros(4), voxel_ml=1.0)
    with pytest.raises(VoxeldoseError, match="different grids"):
        M.dvh(np.ones((2, 3)), np.ones((3, 2)), voxel_ml=1.0)
    with pytest.raises(VoxeldoseError, match=r"\[0, 1\]"):
        M.dvh(np.ones(3), np.array([0.5, 1.5, 1.0]), voxel_ml=1.0)
    with pytest.raises(VoxeldoseError):
        M.voi_metrics(np.ones(3), np.ones(3), voxel_ml=1.0, injected_activity_bq=0.0)
    with pytest.raises(VoxeldoseError):
        M.dvh(np.ones(3), np.ones(3), voxel_ml=1.0).D(120)


# -------------------------------------------------------------------------------- radiobiology
def _g_numeric(coeffs, rates_per_h, t_rep_h):
    """G by direct double integration (hours): (2/D²)∫₀^∞ R(t)∫₀^t R(t′)e^{−μ(t−t′)}dt′dt."""
    mu = LN2 / t_rep_h

    def r(t):
        return sum(c * math.exp(-k * t) for c, k in zip(coeffs, rates_per_h))

    dose = sum(c / k for c, k in zip(coeffs, rates_per_h))
    inner, _ = integrate.dblquad(
        lambda tp, t: r(t) * r(tp) * math.exp(-mu * (t - tp)), 0, np.inf, 0, lambda t: t, epsabs=1e-13, epsrel=1e-11
    )
    return 2 * inner / dose**2


@pytest.mark.parametrize(
    "coeffs, half_lives_h, t_rep_h",
    [
        ([-1.0, 1.0], [1.5, 60.0], 2.8),  # uptake (negative coefficient) + clearance: kidney-like
        ([0.3, 0.7], [4.0, 50.0], 1.5),  # fast + slow clearance
        ([-2.0, 0.5, 1.5], [0.5, 10.0, 80.0], 2.8),  # tri-exponential
        ([-1.0, 1.0], [2.8, 40.0], 2.8),  # a rate equal to μ (the μ − k cancels)
    ],
)
def test_g_closed_form_matches_double_integral(coeffs, half_lives_h, t_rep_h):
    rates_h = [LN2 / t for t in half_lives_h]
    g_closed = M.lea_catcheside_g([(c, k / H) for c, k in zip(coeffs, rates_h)], t_rep_h * H)
    g_num = _g_numeric(coeffs, rates_h, t_rep_h)
    assert g_closed == pytest.approx(g_num, rel=1e-6)
    assert 0 < g_closed < 1


def test_g_mono_exponential_is_dale():
    lam = LN2 / (50 * H)
    mu = LN2 / (2.8 * H)
    assert M.lea_catcheside_g([(123.0, lam)], 2.8 * H) == pytest.approx(lam / (lam + mu), rel=1e-14)
    # limits: very fast delivery → 1 (acute), very slow → 0
    assert M.lea_catcheside_g([(1.0, 1e3)], 2.8 * H) == pytest.approx(1.0, abs=1e-6)
    assert M.lea_catcheside_g([(1.0, 1e-12)], 2.8 * H) < 1e-6
    # coefficient scale cancels
    ex = [(-5.0, LN2 / (2 * H)), (5.0, LN2 / (70 * H))]
    assert M.lea_catcheside_g(ex, 2.8 * H) == pytest.approx(
        M.lea_catcheside_g([(c * 1e9, k) for c, k in ex], 2.8 * H), rel=1e-12
    )


def test_with_physical_decay():
    lam = LN2 / (6.647 * 24 * H)
    assert M.with_physical_decay([(1.0, 1e-6)], lam) == [(1.0, 1e-6 + lam)]


def test_g_rejects_unphysical_curves():
    with pytest.raises(VoxeldoseError, match="decay"):
        M.lea_catcheside_g([(1.0, 0.0)], 3600)
    with pytest.raises(VoxeldoseError, match="negative"):
        M.lea_catcheside_g([(1.0, 1e-4), (-2.0, 1e-5)], 3600)  # slowest term negative
    with pytest.raises(VoxeldoseError, match="negative"):
        M.lea_catcheside_g([(-3.0, 1e-4), (1.0, 1e-5)], 3600)  # A(0) < 0
    with pytest.raises(VoxeldoseError):
        M.lea_catcheside_g([(1.0, 1e-5)], 0.0)


def test_bed_and_eqd2_identities():
    d = 5.0
    # α/β → ∞ : BED → D
    assert M.bed(d, 0.3, math.inf) == d
    assert M.bed(d, 0.3, 1e12) == pytest.approx(d)
    # G = 0 (infinitely protracted): BED = D; G = 1 acute single fraction: d(1 + d/(α/β))
    assert M.bed(d, 0.0, 2.6) == d
    assert M.bed(d, 1.0, 2.6) == pytest.approx(d * (1 + d / 2.6))
    # n acute 2 Gy fractions: BED = 2n(1 + 2/(α/β)) and EQD2 = 2n
    for ab in (2.6, 3.0, 10.0):
        total_bed = sum(M.bed(2.0, 1.0, ab) for _ in range(25))
        assert M.eqd2(total_bed, ab) == pytest.approx(50.0)
    # arrays (a dose map with one VOI's G)
    arr = M.bed(np.array([1.0, 2.0]), 0.2, 2.6)
    assert np.allclose(arr, [1 + 0.2 / 2.6, 2 + 0.2 * 4 / 2.6])
    with pytest.raises(VoxeldoseError):
        M.bed(1.0, 1.5, 2.6)
    with pytest.raises(VoxeldoseError):
        M.eqd2(1.0, 0.0)


def test_bed_from_exponentials_kidney_defaults():
    rb = M.radiobiology_for("kidneys")
    assert rb.alpha_beta_gy == 2.6 and rb.repair_half_time_s == pytest.approx(2.8 * H)
    assert M.radiobiology_for("tumor").alpha_beta_gy == 10.0
    assert M.radiobiology_for("kidney", alpha_beta_gy=2.5).source == "user-supplied"
    with pytest.raises(VoxeldoseError):
        M.radiobiology_for("spleen")
    assert M.radiobiology_for("spleen", alpha_beta_gy=3.0, repair_half_time_s=H).alpha_beta_gy == 3.0
    lam = LN2 / (50 * H)
    res = M.bed_from_exponentials(4.0, [(1.0, lam)], params=rb)
    g = lam / (lam + LN2 / (2.8 * H))
    assert res["g_factor"] == pytest.approx(g)
    assert res["bed_gy"] == pytest.approx(4.0 + g * 16.0 / 2.6)
    assert res["eqd2_gy"] == pytest.approx(res["bed_gy"] / (1 + 2 / 2.6))


# -------------------------------------------------------------------------------- red marrow
def test_marrow_image_based():
    res = M.marrow_image_based(0.5, recovery_coefficient=0.78)
    assert res["red_marrow_gy"] == pytest.approx(0.5 / 0.78)
    assert M.marrow_image_based(0.2)["red_marrow_gy"] == 0.2
    with pytest.raises(VoxeldoseError):
        M.marrow_image_based(0.5, recovery_coefficient=0.0)


def test_marrow_blood_based_mono_exponential_by_hand():
    # blood C(t) = C0·e^{−k t}, k effective (T_eff = 30 h): Ã_blood = C0/k;
    # D_self = RMBLR · Ã_blood[Bq·s/ml ≈ Bq·s/g] · E_e · φ = (C0/k)·E[J]·1000 Gy
    c0, k = 2.0e4, LN2 / (30 * H)
    samples = [(t * H, c0 * math.exp(-k * t * H)) for t in (0.5, 4, 24, 48, 96)]
    e_mev = 0.1479
    res = M.marrow_blood_based(samples, electron_energy_per_decay_mev=e_mev)
    tia = c0 / k
    assert res["blood_tia_bq_s_per_ml"] == pytest.approx(tia, rel=1e-9)
    expected = tia * e_mev * 1.602176634e-13 * 1000.0
    assert res["self_dose_gy"] == pytest.approx(expected, rel=1e-9)
    assert res["red_marrow_gy"] == res["self_dose_gy"] and any("cross-dose" in n for n in res["notes"])
    assert res["red_marrow_tia_bq_s"] == pytest.approx(tia * 1170.0, rel=1e-9)
    # marrow mass cancels in the self-dose; RMBLR scales it; cross-dose adds
    res2 = M.marrow_blood_based(
        samples, electron_energy_per_decay_mev=e_mev, patient_mass_kg=90.0, rmblr=0.5, cross_dose_gy=0.01
    )
    assert res2["red_marrow_mass_g"] == pytest.approx(1170.0 * 90 / 73)
    assert res2["self_dose_gy"] == pytest.approx(0.5 * expected, rel=1e-9)
    assert res2["red_marrow_gy"] == pytest.approx(0.5 * expected + 0.01, rel=1e-9)
    # default electron energy is ICRP-107 Lu-177's
    assert M.marrow_blood_based(samples)["electron_energy_per_decay_mev"] == pytest.approx(0.1479, abs=5e-4)
    # two samples give the exact mono-exponential too
    two = M.marrow_blood_based(samples[1:3], electron_energy_per_decay_mev=e_mev)
    assert two["blood_tia_bq_s_per_ml"] == pytest.approx(tia, rel=1e-9)


def test_blood_tia_bi_exponential_and_trapezoid():
    lam = LN2 / (6.647 * 24 * H)
    a1, k1, a2, k2 = 3.0e4, LN2 / (1.0 * H), 5.0e3, LN2 / (40 * H)
    times = np.array([0.25, 1, 2, 4, 8, 24, 48, 96, 168]) * H
    samples = [(t, a1 * math.exp(-k1 * t) + a2 * math.exp(-k2 * t)) for t in times]
    bi = M.blood_time_integrated_concentration(samples, model="bi", decay_constant_per_s=lam)
    assert bi["tia_bq_s_per_ml"] == pytest.approx(a1 / k1 + a2 / k2, rel=1e-6)
    # trapezoid on a dense mono-exponential: exact head and tail, interior within 0.1 %
    k = LN2 / (20 * H)
    dense = [(t * H, 1e4 * math.exp(-k * t * H)) for t in np.arange(1, 200, 1.0)]
    tr = M.blood_time_integrated_concentration(dense, model="trapezoid", decay_constant_per_s=lam)
    assert tr["tia_bq_s_per_ml"] == pytest.approx(1e4 / k, rel=1e-3)
    with pytest.raises(VoxeldoseError, match="slower than physical decay"):
        slow = [(t * H, 1e4 * math.exp(-lam / 2 * t * H)) for t in (1, 24, 96)]
        M.blood_time_integrated_concentration(slow, model="mono", decay_constant_per_s=lam)
    with pytest.raises(VoxeldoseError):
        M.blood_time_integrated_concentration(samples[:1], decay_constant_per_s=lam)
    with pytest.raises(VoxeldoseError):
        M.blood_time_integrated_concentration(samples, model="spline", decay_constant_per_s=lam)


def test_job_spec_radiobiology_defaults_come_from_metrics():
    """One set of default numbers: kidney α/β 2.6 Gy, T_rep 2.8 h (Barone et al. 2005, J Nucl Med 46:99S);
    tumour α/β 10 Gy, 1.5 h.  The job spec's defaults and the BED in the pipeline use metrics' table."""
    from voxeldose import spec as S

    literature = {"kidney": (2.6, 2.8), "tumour": (10.0, 1.5)}
    assert set(S.DEFAULT_RADIOBIOLOGY) == set(M.RADIOBIOLOGY_DEFAULTS) == set(literature)
    job = S.JobSpec(inputs=["x"])
    for role, (ab, trep_h) in literature.items():
        m = M.RADIOBIOLOGY_DEFAULTS[role]
        assert (m.alpha_beta_gy, m.repair_half_time_s) == pytest.approx((ab, trep_h * H))
        assert m.source  # cited
        d = S.DEFAULT_RADIOBIOLOGY[role]
        assert (d.alpha_beta_gy, d.repair_half_time_h) == pytest.approx((ab, trep_h))
        rb = S.radiobiology_for("Some VOI", role, job)
        assert (rb.alpha_beta_gy, rb.repair_half_time_h) == pytest.approx((ab, trep_h))
    # a table change shows up in the spec's answer (no second copy of the numbers)
    orig = M.RADIOBIOLOGY_DEFAULTS["kidney"]
    try:
        M.RADIOBIOLOGY_DEFAULTS["kidney"] = M.Radiobiology(3.0, 2.0 * H, "test")
        assert S.radiobiology_for("Kidney_L", "kidney", job).alpha_beta_gy == 3.0
    finally:
        M.RADIOBIOLOGY_DEFAULTS["kidney"] = orig
    # per-VOI, then per-role values from the spec win; roles without defaults get none
    job2 = S.JobSpec(
        inputs=["x"],
        radiobiology={
            "Kidney_L": {"alpha_beta_gy": 2.0, "repair_half_time_h": 1.0},
            "kidney": {"alpha_beta_gy": 2.4, "repair_half_time_h": 2.5},
        },
    )
    assert S.radiobiology_for("Kidney_L", "kidney", job2).alpha_beta_gy == 2.0
    assert S.radiobiology_for("Kidney_R", "kidney", job2).alpha_beta_gy == 2.4
    assert S.radiobiology_for("Liver", "organ", job) is None
