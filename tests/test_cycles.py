"""Cumulative dose/BED over cycles and cycles left — exact arithmetic on hand examples."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from voxeldose.cycles import (
    CORRELATED_BETWEEN_CYCLES,
    KIDNEY_FIGURE,
    CycleDose,
    DoseUncertainty,
    Limits,
    cumulative,
    cumulative_summary,
    cumulative_uncertainty,
    cycles_left,
    cycles_left_upper,
)
from voxeldose.errors import VoxeldoseError
from voxeldose.metrics import bed
from voxeldose.spec import JobSpec
from voxeldose.summary import (
    Cumulative,
    Dvh,
    Marrow,
    MarrowImageBased,
    UncertaintyComponent,
    ValueU,
    VoiMetrics,
    VoiUncertainty,
)


def _cycle(n, kidney, marrow=0.1, g=0.1, **kw):
    return CycleDose(
        n,
        dt.date(2024, 1, 1) + dt.timedelta(weeks=8 * (n - 1)),
        7.4e9,
        {"kidney": kidney, "marrow": marrow},
        g_factor={"kidney": g},
        **kw,
    )


def test_cumulative_sums_dose_and_bed():
    cycles = [_cycle(2, 4.0), _cycle(1, 5.0, bed_gy={"kidney": 6.5})]
    res = cumulative(cycles)
    assert res["cycles"] == [1, 2] and res["n_cycles"] == 2
    assert res["dose_gy"]["kidney"] == pytest.approx(9.0)
    assert res["dose_gy"]["marrow"] == pytest.approx(0.2)
    assert res["activity_bq_total"] == pytest.approx(14.8e9)
    # cycle 1 BED given; cycle 2 computed with G = 0.1 and the kidney default α/β = 2.6 Gy
    assert res["bed_gy"]["kidney"] == pytest.approx(6.5 + 4.0 + 0.1 * 16.0 / 2.6)
    assert "marrow" not in res["bed_gy"]  # no G / BED for marrow
    assert res["per_cycle"][0]["date"] == "2024-01-01"


def test_bed_summed_over_cycles_is_below_single_delivery():
    # four identical well-separated cycles: Σ BED = 4d(1 + G d/(α/β)) < BED of 4d at once
    d, g, ab = 5.0, 0.12, 2.6
    res = cumulative([_cycle(i, d, g=g) for i in range(1, 5)])
    assert res["bed_gy"]["kidney"] == pytest.approx(4 * d * (1 + g * d / ab))
    assert res["bed_gy"]["kidney"] < bed(4 * d, g, ab)


def test_cumulative_bed_omitted_when_a_cycle_lacks_it():
    c1 = _cycle(1, 5.0)
    c2 = CycleDose(2, None, 7.4e9, {"kidney": 4.0})  # no G, no BED
    res = cumulative([c1, c2])
    assert "kidney" not in res["bed_gy"] and any("cycle(s) [2]" in n for n in res["notes"])
    with pytest.raises(VoxeldoseError, match="twice"):
        cumulative([c1, _cycle(1, 3.0)])
    with pytest.raises(VoxeldoseError):
        cumulative([])


def test_cycles_left_absorbed_dose_hand_example():
    # 10 Gy so far, 4.2 Gy per 7.4 GBq cycle: floor((23 − 10)/4.2) = floor(3.095) = 3 → 22.6 Gy
    res = cycles_left(
        cumulative_dose_gy={"kidney": 10.0}, dose_per_gbq={"kidney": 4.2 / 7.4}, activity_per_cycle_bq=7.4e9
    )
    row = res["limits"][0]
    assert res["cycles_left"] == 3 and res["binding_limit"] == "kidney absorbed dose"
    assert row["per_cycle_gy"] == pytest.approx(4.2)
    assert row["after_cycles_gy"] == pytest.approx(22.6)
    assert row["after_next_cycle_gy"] == pytest.approx(26.8)
    assert any("BED limit not checked" in n for n in res["notes"])


def test_cycles_left_landing_exactly_on_the_limit():
    res = cycles_left(cumulative_dose_gy={"kidney": 0.0}, dose_per_gbq={"kidney": 5.75}, activity_per_cycle_bq=1e9)
    assert res["cycles_left"] == 4 and res["limits"][0]["after_cycles_gy"] == pytest.approx(23.0)


def test_cycles_left_bed_limited_hand_example():
    # kidney: 10 Gy, BED 15 Gy so far; d = 4.2 Gy/cycle, G = 0.1, α/β = 2.6 Gy
    # BED per cycle = 4.2 + 0.1·4.2²/2.6 = 4.87846…; with risk factors (28 Gy):
    # floor((28 − 15)/4.87846) = floor(2.665) = 2 → binding (dose allows 3)
    b = 4.2 + 0.1 * 4.2**2 / 2.6
    kw = {
        "cumulative_dose_gy": {"kidney": 10.0, "marrow": 0.3},
        "cumulative_bed_gy": {"kidney": 15.0},
        "dose_per_gbq": {"kidney": 4.2 / 7.4, "marrow": 0.04},
        "g_factor": {"kidney": 0.1},
        "activity_per_cycle_bq": 7.4e9,
    }
    res = cycles_left(**kw)
    rows = {r["limit"]: r for r in res["limits"]}
    bed_row = rows["kidney BED (with risk factors)"]
    assert bed_row["per_cycle_gy"] == pytest.approx(b)
    assert bed_row["cycles_left"] == 2 and bed_row["after_cycles_gy"] == pytest.approx(15 + 2 * b)
    assert rows["kidney absorbed dose"]["cycles_left"] == 3
    # marrow: 0.3 Gy, 0.296 Gy/cycle: floor(1.7/0.296) = 5
    assert rows["red marrow absorbed dose"]["cycles_left"] == 5
    assert res["cycles_left"] == 2 and res["binding_limit"] == "kidney BED (with risk factors)"
    # without risk factors (40 Gy): floor(25/4.87846) = 5 → the absorbed dose (3) binds
    res2 = cycles_left(**kw, limits=Limits(kidney_risk_factors=False))
    assert res2["cycles_left"] == 3 and res2["binding_limit"] == "kidney absorbed dose"
    assert {r["limit"]: r for r in res2["limits"]}["kidney BED (without risk factors)"]["cycles_left"] == math.floor(
        25 / b
    )


def test_cycles_left_zero_when_exceeded_with_message():
    res = cycles_left(
        cumulative_dose_gy={"kidney": 24.1, "marrow": 0.5},
        dose_per_gbq={"kidney": 0.6, "marrow": 0.03},
        activity_per_cycle_bq=7.4e9,
    )
    assert res["cycles_left"] == 0
    row = res["limits"][0]
    assert row["exceeded"] and "exceeds" in row["message"] and "no further cycle" in res["message"]
    # a configurable limit
    res2 = cycles_left(
        cumulative_dose_gy={"marrow": 0.5},
        dose_per_gbq={"marrow": 0.05},
        activity_per_cycle_bq=7.4e9,
        limits=Limits(marrow_dose_gy=1.5),
    )
    assert res2["cycles_left"] == math.floor(1.0 / 0.37)


def test_cycles_left_rejects_bad_input():
    with pytest.raises(VoxeldoseError):
        cycles_left(cumulative_dose_gy={"kidney": 1.0}, dose_per_gbq={}, activity_per_cycle_bq=7.4e9)
    with pytest.raises(VoxeldoseError):
        cycles_left(cumulative_dose_gy={"liver": 1.0}, dose_per_gbq={"liver": 1.0}, activity_per_cycle_bq=7.4e9)
    with pytest.raises(VoxeldoseError):
        cycles_left(cumulative_dose_gy={"kidney": 1.0}, dose_per_gbq={"kidney": 1.0}, activity_per_cycle_bq=0)
    with pytest.raises(VoxeldoseError):
        CycleDose(1, None, 7.4e9, {"kidney": -1.0})


def _kidney(mean_gy: float, g: float, ab: float) -> VoiMetrics:
    return VoiMetrics(
        role="kidney",
        source="RTSTRUCT",
        volume_ml=150.0,
        mass_g=None,
        mean_gy=mean_gy,
        mean_weighting="volume",
        min_gy=None,
        max_gy=None,
        min_max_over="fraction>=0.5",
        D2_gy=None,
        D50_gy=None,
        D98_gy=None,
        D2cc_gy=None,
        injected_activity_bq=7.4e9,
        gy_per_gbq=mean_gy / 7.4,
        dvh=Dvh(
            dose_gy=[0.0], volume_fraction=[1.0], total_volume_ml=150.0, bin_gy=0.1, downsampled=False, definition=""
        ),
        notes=[],
        g_factor=g,
        bed_gy=bed(mean_gy, g, ab),
        alpha_beta_gy=ab,
    )


def test_cumulative_summary_of_a_run_hand_example():
    """This cycle (7.4 GBq): kidneys 4 and 5 Gy (the higher counts), image-based marrow 0.5 Gy.  Earlier
    cycle 1 (3.7 GBq): kidney 6 Gy measured, no marrow dosimetry → estimated 0.5 × 3.7/7.4 = 0.25 Gy; its
    kidney BED from this cycle's G: 6 + 0.1·36/2.6.  Cycles left at 7.4 GBq: kidney dose ⌊(23 − 11)/5⌋ = 2,
    kidney BED ⌊(28 − 13.35)/5.96⌋ = 2, marrow ⌊(2 − 0.75)/0.5⌋ = 2."""
    g, ab = 0.1, 2.6
    vois = {"Kidney_L": _kidney(4.0, g, ab), "Kidney_R": _kidney(5.0, g, ab)}
    marrow = Marrow(
        image_based=MarrowImageBased(
            voi="L2L4", red_marrow_gy=0.5, method="image", mean_dose_l2l4_gy=0.5, recovery_coefficient=1.0, notes=[]
        ),
        blood_based=None,
    )
    spec = JobSpec(
        inputs=["x"],
        cycle_number=2,
        earlier_cycles=[{"number": 1, "date": "2025-11-10", "activity_mbq": 3700, "kidney_gy": 6.0}],
    )
    warnings: list[str] = []
    cum = cumulative_summary(
        vois, marrow, spec, injection_date=dt.date(2026, 1, 5), activity_bq=7.4e9, warnings=warnings
    )
    assert [(c.number, c.date, c.activity_MBq) for c in cum.cycles] == [
        (1, "2025-11-10", 3700.0),
        (2, "2026-01-05", 7400.0),
    ]
    assert [c.kidney_gy for c in cum.cycles] == [6.0, 5.0]
    assert [c.marrow_gy for c in cum.cycles] == [pytest.approx(0.25), 0.5]
    bed_1, bed_2 = 6.0 + g * 36.0 / ab, 5.0 + g * 25.0 / ab
    assert [c.kidney_bed_gy for c in cum.cycles] == [pytest.approx(bed_1), pytest.approx(bed_2)]
    assert cum.total.dose_gy == {"kidney": pytest.approx(11.0), "marrow": pytest.approx(0.75)}
    assert cum.total.bed_gy["kidney"] == pytest.approx(bed_1 + bed_2)
    assert cum.total.activity_MBq == pytest.approx(11100.0)
    assert [(e.cycle, e.organ, e.dose_gy) for e in cum.estimated_earlier_cycles] == [(1, "marrow", pytest.approx(0.25))]
    assert cum.cycles_left is not None and cum.cycles_left.cycles_left == 2
    assert [r.cycles_left for r in cum.cycles_left.limits] == [2, math.floor((28 - bed_1 - bed_2) / bed_2), 2]
    assert any("cycle 1 has no marrow dosimetry" in w for w in warnings)
    assert any("cycle 1 has no kidney BED" in w for w in warnings)
    assert cum.limits.kidney_bed_gy == 28.0 and cum.kidney_figure == KIDNEY_FIGURE


def test_cumulative_summary_without_organs_at_risk_says_so():
    cum = cumulative_summary(
        {},
        Marrow(image_based=None, blood_based=None),
        JobSpec(inputs=["x"]),
        injection_date=dt.date(2026, 1, 5),
        activity_bq=7.4e9,
        warnings=[],
    )
    assert cum.cycles_left is None and "no kidney or marrow VOI: cycles left not computed" in cum.notes
    with pytest.raises(VoxeldoseError, match="both this cycle and an earlier one"):
        cumulative_summary(
            {},
            Marrow(image_based=None, blood_based=None),
            JobSpec(inputs=["x"], earlier_cycles=[{"number": 1, "activity_mbq": 7400}]),
            injection_date=dt.date(2026, 1, 5),
            activity_bq=7.4e9,
            warnings=[],
        )


# ------------------------------------------------------------------------------------------ uncertainty
def test_cumulative_uncertainty_correlated_linear_independent_in_quadrature():
    """GUM eq. 16, two cycles: calibration fully correlated (r = 1) adds linearly, counting independent (r = 0) in
    quadrature: u² = (a₁ + a₂)² + b₁² + b₂²."""
    c1 = DoseUncertainty({"calibration": 0.20, "counting": 0.12}, origin=1)
    c2 = DoseUncertainty({"calibration": 0.25, "counting": 0.15}, origin=2)
    u = cumulative_uncertainty([c1, c2])
    assert u == pytest.approx(math.sqrt(0.45**2 + 0.12**2 + 0.15**2), rel=1e-12)
    # all in quadrature would understate it; delineation on reused contours becomes correlated
    assert u > math.sqrt(0.20**2 + 0.25**2 + 0.12**2 + 0.15**2) * 1.05
    d1, d2 = DoseUncertainty({"delineation": 0.1}, 1), DoseUncertainty({"delineation": 0.3}, 2)
    assert cumulative_uncertainty([d1, d2]) == pytest.approx(math.sqrt(0.1**2 + 0.3**2))
    assert cumulative_uncertainty([d1, d2], same_contours=True) == pytest.approx(0.4)
    # an estimated cycle carries this cycle's origin: its counting error is the same random error (linear)
    est = DoseUncertainty({"counting": 0.06}, origin=2)
    assert cumulative_uncertainty([c2, est]) == pytest.approx(math.sqrt(0.25**2 + (0.15 + 0.06) ** 2))
    assert "calibration" in CORRELATED_BETWEEN_CYCLES and "counting" not in CORRELATED_BETWEEN_CYCLES


def test_cycles_left_at_the_upper_bound_hand_example():
    """Kidney: 10 Gy so far with u = 0.5 Gy; 4 Gy per cycle with 5 % relative u.  Central ⌊(23 − 10)/4⌋ = 3; at the
    upper bound ⌊(23 − (10 + 2·0.5))/(4·(1 + 2·0.05))⌋ = ⌊12/4.4⌋ = 2.  Marrow has no uncertainty: left out, said."""
    central = cycles_left(
        cumulative_dose_gy={"kidney": 10.0, "marrow": 0.5},
        dose_per_gbq={"kidney": 4.0 / 7.4, "marrow": 0.3 / 7.4},
        activity_per_cycle_bq=7.4e9,
    )
    assert central["cycles_left"] == 3 and central["binding_limit"] == "kidney absorbed dose"
    up = cycles_left_upper(
        central, cumulative_u_gy={"kidney": 0.5}, cumulative_bed_u_gy={}, per_cycle_relative_u={"kidney": 0.05}
    )
    assert up["cycles_left"] == math.floor((23.0 - 11.0) / 4.4) == 2
    assert up["binding_limit"] == "kidney absorbed dose" and "upper bound" in up["message"]
    (row,) = up["limits"]
    assert row["current_gy"] == pytest.approx(11.0) and row["per_cycle_gy"] == pytest.approx(4.4)
    assert any(n.startswith("red marrow absorbed dose: not checked at the 95 % upper bound") for n in up["notes"])


def test_cycles_left_upper_bound_bed_binds():
    """Kidney BED: 15 Gy so far (u 1 Gy), d = 4.2 Gy, G = 0.1, α/β = 2.6: b = 4.2 + 0.1·4.2²/2.6; u_b = (1 + 2·0.1·4.2/2.6)
    ·0.1·4.2.  Upper: ⌊(28 − 17)/(b + 2u_b)⌋; dose: ⌊(23 − (10 + 2·0.6))/(4.2·1.2)⌋."""
    g, ab, d = 0.1, 2.6, 4.2
    central = cycles_left(
        cumulative_dose_gy={"kidney": 10.0},
        cumulative_bed_gy={"kidney": 15.0},
        dose_per_gbq={"kidney": d / 7.4},
        g_factor={"kidney": g},
        alpha_beta_gy={"kidney": ab},
        activity_per_cycle_bq=7.4e9,
    )
    up = cycles_left_upper(
        central,
        cumulative_u_gy={"kidney": 0.6},
        cumulative_bed_u_gy={"kidney": 1.0},
        per_cycle_relative_u={"kidney": 0.1},
    )
    b = d + g * d * d / ab
    u_b = (1 + 2 * g * d / ab) * 0.1 * d
    n_bed = math.floor((28.0 - 17.0) / (b + 2 * u_b))
    n_dose = math.floor((23.0 - 11.2) / (d * 1.2))
    assert [r["cycles_left"] for r in up["limits"]] == [n_dose, n_bed]
    assert n_bed < n_dose and up["cycles_left"] == n_bed and up["binding_limit"].startswith("kidney BED")


def _budget(mean_gy: float, rel: dict[str, float | None]) -> VoiUncertainty:
    total = math.sqrt(sum(v * v for v in rel.values() if v is not None))
    vu = ValueU(value=mean_gy, u=total * mean_gy, lower_95=None, upper_95=None)
    return VoiUncertainty(
        method="test",
        coverage_factor=2.0,
        components=[UncertaintyComponent(name=n, relative_u=v, how="") for n, v in rel.items()],
        activity_bq=[],
        tia_bqs=vu,
        mean_gy=vu,
    )


def test_cumulative_summary_carries_uncertainty_and_says_not_stated():
    """Cycle 3 (this, 7.4 GBq): kidney 5 Gy, calibration 4 %, counting 2 %, dose factor not stated.  Cycle 1: 6 Gy with
    its own components (calibration 0.24, counting 0.3 Gy).  Cycle 2: 4 Gy from an older result without u → not
    stated.  Marrow has no uncertainty model → not stated.  Cumulative kidney u over the stated cycles 1 and 3:
    √((0.24 + 0.2)² + 0.3² + 0.1²), a lower bound (cycle 2 said)."""
    g, ab = 0.1, 2.6
    kid = _kidney(5.0, g, ab).model_copy(
        update={"uncertainty": _budget(5.0, {"calibration": 0.04, "counting": 0.02, "dose factor": None})}
    )
    vois = {"Kidney_L": _kidney(4.0, g, ab), "Kidney_R": kid}
    marrow = Marrow(
        image_based=MarrowImageBased(
            voi="L2L4", red_marrow_gy=0.5, method="image", mean_dose_l2l4_gy=0.5, recovery_coefficient=1.0, notes=[]
        ),
        blood_based=None,
    )
    spec = JobSpec(
        inputs=["x"],
        cycle_number=3,
        earlier_cycles=[
            {
                "number": 1,
                "activity_mbq": 7400,
                "kidney_gy": 6.0,
                "kidney_u_components_gy": {"calibration": 0.24, "counting": 0.3},
            },
            {"number": 2, "activity_mbq": 7400, "kidney_gy": 4.0},
        ],
    )
    cum = cumulative_summary(vois, marrow, spec, injection_date=dt.date(2026, 1, 5), activity_bq=7.4e9, warnings=[])
    rows = {c.number: c for c in cum.cycles}
    assert rows[3].kidney_u is not None and rows[3].kidney_u.u_gy == pytest.approx(5.0 * math.sqrt(0.04**2 + 0.02**2))
    assert rows[2].kidney_u is not None and rows[2].kidney_u.u_gy is None
    assert rows[2].kidney_u.source.startswith("not stated")
    assert rows[1].kidney_u is not None and rows[1].kidney_u.u_gy == pytest.approx(math.hypot(0.24, 0.3))
    assert all(r.marrow_u is not None and r.marrow_u.u_gy is None for r in rows.values())
    u = cum.uncertainty
    assert u is not None
    expected = math.sqrt((0.24 + 0.2) ** 2 + 0.3**2 + 0.1**2)
    assert u.dose_gy["kidney"].value == pytest.approx(15.0) and u.dose_gy["kidney"].u == pytest.approx(expected)
    assert u.dose_gy["kidney"].upper_95 == pytest.approx(15.0 + 2 * expected)
    assert u.not_stated == {"kidney": [2], "marrow": [1, 2, 3]} and u.dose_gy["marrow"].u is None
    assert any("lower bound" in n for n in u.notes) and any("red marrow" in n for n in u.notes)
    left = cum.cycles_left
    assert left is not None and left.upper_95 is not None
    rel = math.sqrt(0.04**2 + 0.02**2)
    n_dose = math.floor((23.0 - (15.0 + 2 * expected)) / (5.0 * (1 + 2 * rel)))
    dose_row = next(r for r in left.upper_95.limits if r.limit == "kidney absorbed dose")
    assert dose_row.cycles_left == n_dose and left.upper_95.binding_limit is not None
    assert any("red marrow" in n and "not stated" in n for n in left.upper_95.notes)
    # the JSON round trip keeps it (additive, schema /3)
    again = Cumulative.model_validate_json(cum.model_dump_json())
    assert again.uncertainty == cum.uncertainty
