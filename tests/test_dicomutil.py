"""Tests of voxeldose.dicomutil: value representations as PS3.5 6.2 defines them, tags from PS3.6."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import pytest

from voxeldose.dicomutil import (
    format_da,
    format_ds,
    format_ds_list,
    format_dt,
    format_tm,
    normalise_utc_offset,
    parse_da,
    parse_dt,
    parse_tm,
    tag_label,
)


def test_tag_label_from_the_data_dictionary() -> None:
    # PS3.6 6: Patient ID (0010,0020), Image Position (Patient) (0020,0032)
    assert tag_label("PatientID") == "PatientID (0010,0020)"
    assert tag_label("ImagePositionPatient") == "ImagePositionPatient (0020,0032)"
    assert tag_label("NotADicomKeyword") == "NotADicomKeyword"


def test_da_and_tm() -> None:
    assert parse_da("20240229") == date(2024, 2, 29)
    assert parse_da("20230229") is None  # no 29 February in 2023
    assert parse_da("") is None and parse_da(None) is None
    # TM: HH, HHMM, HHMMSS, fractional seconds to 6 digits; the ACR-NEMA form HH:MM:SS is accepted
    assert parse_tm("07") == time(7, 0, 0)
    assert parse_tm("0715") == time(7, 15, 0)
    assert parse_tm("071530.5") == time(7, 15, 30, 500000)
    assert parse_tm("07:15:30") == time(7, 15, 30)
    assert parse_tm("2561") is None
    when = datetime(2024, 3, 2, 10, 5, 7, 120000)
    assert (format_da(when), format_tm(when)) == ("20240302", "100507.120000")
    assert format_tm(when.replace(microsecond=0)) == "100507"


def test_dt_offset_is_returned_not_applied() -> None:
    assert parse_dt("20240302101530.25+0100") == (datetime(2024, 3, 2, 10, 15, 30, 250000), "+0100")
    assert parse_dt("20240302") == (datetime(2024, 3, 2), None)
    assert parse_dt("20240302-0000")[1] == "+0000"  # -0000 is the same offset as +0000
    assert normalise_utc_offset("+1500") is None  # offsets run from -1200 to +1400
    assert normalise_utc_offset("+0560") is None
    aware = datetime(2024, 3, 2, 10, 15, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert format_dt(aware) == "20240302101530-0500"
    assert parse_dt(format_dt(aware)) == (aware.replace(tzinfo=None), "-0500")
    assert format_dt(aware.replace(tzinfo=None)) == "20240302101530"


@pytest.mark.parametrize("value", [1 / 3, -123456.7891234, 1e-7, -1e-9, 299792458.123456])
def test_ds_fits_sixteen_characters(value: float) -> None:
    text = str(format_ds(value))
    assert len(text) <= 16  # PS3.5 6.2: DS is at most 16 bytes
    assert not text.startswith("-0") or float(text) != 0.0
    assert float(text) == pytest.approx(round(value, 6), abs=5e-7, rel=1e-9)


def test_ds_list_flattens() -> None:
    assert [float(v) for v in format_ds_list([[1.0, 0.0], [0.0, -1.0]], 3)] == [1.0, 0.0, 0.0, -1.0]
    assert str(format_ds(-1e-9)) == "0.0"  # rounds to zero without a sign
