"""The job description refuses what would give a wrong dose or poison the store (issue 14, defects 1, 4, 6)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from voxeldose.errors import VoxeldoseError
from voxeldose.pipeline import invalid_spec
from voxeldose.spec import MAX_JSON_DEPTH, JobSpec, check_json_depth, json_depth


def refused(fields: dict[str, Any]) -> VoxeldoseError:
    """The error a job with ``fields`` gives (it must not validate)."""
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"inputs": ["/data"], **fields})
    return invalid_spec(info.value, "job.json")


def cycle(**fields: Any) -> dict[str, Any]:
    return {"earlier_cycles": [{"number": 1, "activity_mbq": 7400, **fields}]}


@pytest.mark.parametrize(
    ("fields", "tag"),
    [
        ({"calibration": {"cps_per_mbq": 5.67, "source": "\ud800"}}, "calibration.source"),
        (cycle(date="2025-\udfff-01"), "earlier_cycles.0.date"),
        ({"patient_id": "P\ud83d"}, "patient_id"),
        ({"injection": {"nuclide": "\udc80Lu-177"}}, "injection.nuclide"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field(fields: dict[str, Any], tag: str) -> None:
    err = refused(fields)
    assert err.tag == tag and err.expected is not None and err.expected.startswith("text encodable as UTF-8")
    str(err).encode("utf-8")  # the message itself can be stored and sent


def test_a_lone_surrogate_in_a_key_is_refused_and_the_message_is_encodable() -> None:
    err = refused({"roles": {"kidney\ud800": "kidney"}})
    assert err.tag is not None and err.tag.startswith("roles.")
    str(err).encode("utf-8")
    json.dumps(err.to_dict(), ensure_ascii=False).encode("utf-8")


def test_text_that_utf8_can_encode_is_kept() -> None:
    """A proper surrogate pair (one emoji) and non-Latin text are ordinary text."""
    spec = JobSpec.model_validate(
        {
            "inputs": ["/data"],
            "calibration": {"cps_per_mbq": 5.67, "source": "Säule 😀 校准"},
            **cycle(date="2025-01-02"),
        }
    )
    assert spec.calibration.source == "Säule 😀 校准" and spec.earlier_cycles[0].date == "2025-01-02"


@pytest.mark.parametrize(
    ("fields", "tag"),
    [
        ({"calibration": {"cps_per_mbq": True}}, "calibration.cps_per_mbq"),
        ({"calibration": {"cps_per_mbq": "5.67"}}, "calibration.cps_per_mbq"),
        ({"injection": {"activity_mbq": "7400"}}, "injection.activity_mbq"),
        ({"cycle_number": True}, "cycle_number"),
        ({"dose": {"kernel_size": "51"}}, "dose.kernel_size"),
        ({"limits": {"kidney_risk_factors": "no"}}, "limits.kidney_risk_factors"),
    ],
)
def test_no_silent_coercion_of_booleans_or_numeric_strings(fields: dict[str, Any], tag: str) -> None:
    assert refused(fields).tag == tag


def test_an_integer_is_a_valid_float() -> None:
    spec = JobSpec.model_validate({"inputs": ["/data"], "calibration": {"cps_per_mbq": 6}})
    assert spec.calibration.cps_per_mbq == 6.0


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    "where",
    [
        lambda v: {"calibration": {"cps_per_mbq": v}},
        lambda v: {"injection": {"activity_mbq": v}},
        lambda v: {"limits": {"kidney_gy": v}},
        lambda v: {"radiobiology": {"kidney": {"alpha_beta_gy": v, "repair_half_time_h": 2.8}}},
        lambda v: {"marrow": {"blood_samples": [{"hours_after_injection": 24, "bq_per_ml": v}]}},
        lambda v: {"fit": {"stp_effective_half_life_h": {"default": v}}},
        lambda v: cycle(kidney_gy=v),
        lambda v: cycle(vois={"tumour": v}),
    ],
)
def test_numbers_must_be_finite(where: Any, value: float) -> None:
    """Python's json.loads reads Infinity and NaN; no such number may reach a dose."""
    refused(where(value))


def test_infinity_from_json_text_is_refused() -> None:
    err = refused(json.loads('{"calibration": {"cps_per_mbq": Infinity}}'))
    assert err.tag == "calibration.cps_per_mbq" and err.expected == "a finite number"


@pytest.mark.parametrize(
    ("fields", "tag"),
    [
        # 1000 cps/MBq: counts per GBq or per whole acquisition, not a camera's sensitivity (~5-20 cps/MBq)
        ({"calibration": {"cps_per_mbq": 1000.0}}, "calibration.cps_per_mbq"),
        ({"calibration": {"cps_per_mbq": 0}}, "calibration.cps_per_mbq"),
        # 7.4 GBq entered in kBq
        ({"injection": {"activity_mbq": 7_400_000}}, "injection.activity_mbq"),
        ({"limits": {"planned_activity_mbq": 74_000}}, "limits.planned_activity_mbq"),
        ({"dose": {"kernel_size": 1_000_001}}, "dose.kernel_size"),
        ({"dose": {"kernel_size": 203}}, "dose.kernel_size"),
        ({"dose": {"kernel_size": 52}}, "dose.kernel_size"),
        ({"cycle_number": 10**30}, "cycle_number"),
        (cycle(kidney_gy=-1.0), "earlier_cycles.0.kidney_gy"),
        (cycle(kidney_gy=367_607.0), "earlier_cycles.0.kidney_gy"),
        (cycle(vois={"liver": -0.5}), "earlier_cycles.0.vois.liver"),
        (cycle(vois={"tumour": 5000.0}), "earlier_cycles.0.vois.tumour"),
        (cycle(activity_mbq=7_400_000), "earlier_cycles.0.activity_mbq"),
        (cycle(date="2025-13-01"), "earlier_cycles.0.date"),
        (cycle(date="last spring"), "earlier_cycles.0.date"),
    ],
)
def test_implausible_values_are_refused(fields: dict[str, Any], tag: str) -> None:
    assert refused(fields).tag == tag


def test_plausible_values_are_kept() -> None:
    """The ordinary values of a Lu-177 cycle (the largest allowed included) validate."""
    spec = JobSpec.model_validate(
        {
            "inputs": ["/data"],
            "calibration": {"cps_per_mbq": 100},
            "injection": {"activity_mbq": 15000, "datetime": "2025-01-02T09:30:00"},
            "dose": {"kernel_size": 201},
            "cycle_number": 4,
            **cycle(date="2024-11-05", kidney_gy=4.1, kidney_bed_gy=4.6, marrow_gy=0.2, vois={"tumour": 35.0}),
        }
    )
    assert spec.dose.kernel_size == 201 and spec.earlier_cycles[0].vois == {"tumour": 35.0}


def test_json_depth_counts_brackets_outside_strings() -> None:
    assert json_depth('{"a": [1, {"b": "[[[{{{"}]}') == 3
    assert json_depth('{"a": "\\"[[["}') == 1
    assert json_depth("5") == 0


def test_deep_nesting_is_refused_before_parsing() -> None:
    bomb = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(bomb)  # what the check keeps the parser from
    with pytest.raises(ValueError, match="nested too deeply"):
        check_json_depth(bomb)
    check_json_depth("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
