"""The approval state of the DICOM results (voxeldose.approval): a run's SR and RT Dose are preliminary; the
approved copies say VERIFIED / FINAL with a Verifying Observer (DICOM PS3.3 C.17.2) and "APPROVED" in the RT
Dose's Dose Comment, as new instances, and pass dciodvfy.  And the slice viewer's volumes (voxeldose.viewer),
made from the same results: NIfTI that reads back with the RT Dose's geometry and values."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
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
from voxeldose.ingest import read_rtdose, scan
from voxeldose.outputs import write_pacs_objects
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs
from voxeldose.viewer import write_viewer_volumes

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


def test_viewer_volumes_on_the_dose_grid(results, tmp_path) -> None:
    made = write_viewer_volumes(results, results.parent / "dicom", tmp_path / "viewer")
    assert set(made.files) == {"ct", "dose", "vois"}
    rd = read_rtdose(scan([str(results / "rtdose.dcm")]).by_kind("rtdose")[0])
    images = {name: sitk.ReadImage(str(path)) for name, path in made.files.items()}
    for img in images.values():  # one grid: the RT Dose's, in LPS as SimpleITK reports it
        assert img.GetSize() == tuple(reversed(rd.shape))
        assert np.allclose(img.GetOrigin(), rd.affine[:3, 3], atol=1e-3)
        assert np.allclose(img.GetSpacing(), np.linalg.norm(rd.affine[:3, :3], axis=0), atol=1e-4)
    dose = sitk.GetArrayFromImage(images["dose"])
    assert np.allclose(dose, rd.array, rtol=1e-6, atol=1e-9)
    assert made.dose_max_gy == pytest.approx(float(np.max(rd.array)))
    ct = sitk.GetArrayFromImage(images["ct"])
    assert ct.min() >= -1024 and ct.max() > 100  # HU: air around a body with bone
    labels = sitk.GetArrayFromImage(images["vois"])
    names = made.labels
    assert {"Kidney_L", "Kidney_R", "Liver", "Body"} <= set(names.values())
    by_name = {v: k for k, v in names.items()}
    # every VOI keeps voxels (a small one inside a large one is drawn over it), the body holds them all
    assert all(np.count_nonzero(labels == k) > 0 for k in names)
    assert by_name["Body"] == 1 and np.count_nonzero(labels) > np.count_nonzero(labels == by_name["Body"])
    # the kidneys get dose: their mean on the viewer grid is well above the body's
    kid = dose[labels == by_name["Kidney_L"]].mean()
    assert kid > 3 * dose[labels == by_name["Body"]].mean()


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
