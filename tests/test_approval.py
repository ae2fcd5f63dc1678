"""The approval state of the DICOM results (voxeldose.approval): a run's SR and RT Dose are preliminary; the
approved copies say VERIFIED / FINAL with a Verifying Observer (DICOM PS3.3 C.17.2) and "APPROVED" in the RT
Dose's Dose Comment, as new instances, and pass dciodvfy."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pydicom
import pytest
from support import dciodvfy_errors

from voxeldose.approval import (
    PRELIMINARY_DOSE_COMMENT,
    approval_state,
    approved_rtdose,
    approved_sr,
    dt_text,
    person_name,
)
from voxeldose.dicomutil import save_part10
from voxeldose.outputs import write_pacs_objects
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs

WHEN = datetime(2026, 12, 3, 14, 5, 9, 123456, tzinfo=timezone(timedelta(hours=1)))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("approval")
    write_phantom(tmp, PhantomSettings.small())
    truth = json.loads((tmp / "truth" / "truth.json").read_text())
    result = run({"inputs": [str(tmp / "dicom")], "calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}})
    out = tmp / "out"
    write_pacs_objects(result, out)
    write_outputs(result, out)
    return out


def test_written_results_are_preliminary(results) -> None:
    sr = pydicom.dcmread(results / "sr.dcm")
    # the content is all there (COMPLETE), but nobody accountable has attested it
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in sr
    rd = pydicom.dcmread(results / "rtdose.dcm")
    assert rd.DoseComment.startswith(PRELIMINARY_DOSE_COMMENT)
    assert approval_state(sr) == approval_state(rd) == "preliminary"


def test_approved_sr_is_verified_final_new_instance(results, tmp_path, dciodvfy_exe: str) -> None:
    pre = pydicom.dcmread(results / "sr.dcm")
    sr = approved_sr(pre, observer="Dr Jane^Doe", organisation="Nuclear Medicine, Example Hospital", when=WHEN)
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL" and sr.CompletionFlag == "COMPLETE"
    [obs] = sr.VerifyingObserverSequence
    assert str(obs.VerifyingObserverName) == "Dr Jane Doe"  # '^' would split the name into components
    assert obs.VerifyingOrganization == "Nuclear Medicine, Example Hospital"
    assert obs.VerificationDateTime == "20261203140509.123456+0100"
    assert len(obs.VerifyingObserverIdentificationCodeSequence) == 0  # Type 2: present, may be empty
    # a new instance of the same series, naming the preliminary document it replaces
    assert sr.SOPInstanceUID != pre.SOPInstanceUID and sr.SeriesInstanceUID == pre.SeriesInstanceUID
    [study] = sr.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [ref] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (pre.StudyInstanceUID, pre.SeriesInstanceUID)
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (pre.SOPClassUID, pre.SOPInstanceUID)
    assert sr.ContentSequence == pre.ContentSequence  # the measurements are unchanged
    assert pre.VerificationFlag == "UNVERIFIED"  # the input is not changed
    save_part10(sr, tmp_path / "sr-approved.dcm")
    assert dciodvfy_errors(dciodvfy_exe, tmp_path / "sr-approved.dcm") == []
    assert approval_state(pydicom.dcmread(tmp_path / "sr-approved.dcm")) == "approved"


def test_approved_rtdose(results, tmp_path, dciodvfy_exe: str) -> None:
    pre = pydicom.dcmread(results / "rtdose.dcm")
    rd = approved_rtdose(pre, observer="physicist-a", when=WHEN)
    assert rd.DoseComment == "APPROVED 2026-12-03 physicist-a"
    assert rd.SOPInstanceUID != pre.SOPInstanceUID and rd.SeriesInstanceUID == pre.SeriesInstanceUID
    assert rd.PixelData == pre.PixelData and rd.DoseGridScaling == pre.DoseGridScaling
    save_part10(rd, tmp_path / "rd.dcm")
    assert dciodvfy_errors(dciodvfy_exe, tmp_path / "rd.dcm") == []
    long = approved_rtdose(pre, observer="x" * 200, when=WHEN)
    assert len(long.DoseComment) <= 64  # LO


def test_refuses_wrong_objects_and_naive_times(results) -> None:
    sr = pydicom.dcmread(results / "sr.dcm")
    rd = pydicom.dcmread(results / "rtdose.dcm")
    with pytest.raises(ValueError, match="not an SR"):
        approved_sr(rd, observer="a", organisation="b", when=WHEN)
    with pytest.raises(ValueError, match="not an RT Dose"):
        approved_rtdose(sr, observer="a", when=WHEN)
    with pytest.raises(ValueError, match="naive"):
        dt_text(datetime(2026, 1, 1))
    assert dt_text(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "20260102030405.000000+0000"
    assert person_name("a=b\\c^d") == "a b c d"
