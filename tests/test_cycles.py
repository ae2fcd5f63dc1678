"""Cumulative dose/BED over cycles and cycles left — exact arithmetic on hand examples."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from voxeldose.cycles import CycleDose, Limits, cumulative, cycles_left
from voxeldose.errors import VoxeldoseError
from voxeldose.metrics import bed


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
