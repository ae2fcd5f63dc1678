"""Cumulative dose/BED over cycles and cycles left — exact arithmetic on hand examples."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from voxeldose.cycles import KIDNEY_FIGURE, CycleDose, Limits, cumulative, cumulative_summary, cycles_left
from voxeldose.errors import VoxeldoseError
from voxeldose.metrics import bed
from voxeldose.spec import JobSpec
from voxeldose.summary import Dvh, Marrow, MarrowImageBased, VoiMetrics


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
