"""Orthanc (a real PACS, Debian package ``orthanc``) and our DICOM node, both ways, over real associations.

- Orthanc → voxeldose: a study uploaded into Orthanc over REST is pushed by Orthanc's own C-STORE SCU
  (``POST /modalities/{id}/store``) to :class:`service.dicom_node.DicomNode`; every instance arrives,
  byte-for-byte the same data set.  A calling AE title not in our allow-list is refused, nothing stored.
- voxeldose → Orthanc: pynetdicom's SCU as ``VOXELDOSE`` stores an RT Dose (``write_rtdose``) and a SEG
  into Orthanc, which finds them with ``/tools/find`` and keeps their tags.

One Orthanc for the module (our own process, free ports, storage in a temp folder: see ``orthanc.py``),
stopped at the end whatever happens.  Skipped when Orthanc is not installed, unless
``VOXELDOSE_REQUIRE_ORTHANC=1`` (CI), where that fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")

from orthanc import Orthanc, OrthancError, require_orthanc, start_orthanc
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import stored_files

pytestmark = [pytest.mark.xdist_group("orthanc")]

PACS_AET = "ORTHANC"
NODE_ALLOWED_AETS = [PACS_AET]  # for the start_node fixture (conftest.py)
OUR_AET = "VOXELDOSE"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    require_orthanc()
    with start_orthanc(tmp_path_factory.mktemp("orthanc"), aet=PACS_AET) as o:
        yield o
    assert not o.running


@pytest.fixture(scope="module")
def study_in_pacs(pacs: Orthanc, small_phantom: dict) -> dict[str, Any]:
    """The first time point's study (its NM, 60 CT slices, the RTSTRUCT and the SEG) uploaded over REST."""
    root = small_phantom["dicom"]
    first_tp = sorted(p for p in root.iterdir() if p.is_dir())[0]
    files = sorted(p for p in first_tp.rglob("*") if p.is_file())
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    for extra in sorted(p for p in root.iterdir() if p.is_file()):  # RTSTRUCT.dcm, SEG.dcm
        if dcmread(extra, stop_before_pixels=True).StudyInstanceUID == study_uid:
            files.append(extra)
    ids = pacs.upload_many(files)
    assert len(set(ids)) == len(files)
    studies = pacs.find("Study", {"StudyInstanceUID": study_uid})
    assert len(studies) == 1
    sops = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    return {"id": studies[0]["ID"], "uid": study_uid, "files": files, "sops": sops}


# ------------------------------------------------------------------ Orthanc → voxeldose
def test_orthanc_pushes_a_study_to_our_node(
    pacs: Orthanc, study_in_pacs: dict, start_node: Callable[..., Any], store: Any
) -> None:
    node = start_node()
    pacs.put_modality("voxeldose", OUR_AET, "127.0.0.1", node.port)
    assert pacs.echo("voxeldose")

    in_pacs = pacs.study_instances(study_in_pacs["id"])
    assert len(in_pacs) == len(study_in_pacs["files"])
    ans = pacs.push_study("voxeldose", study_in_pacs["id"])
    assert ans["InstancesCount"] == len(in_pacs) and ans["FailedInstancesCount"] == 0
    assert (ans["LocalAet"], ans["RemoteAet"]) == (PACS_AET, OUR_AET)

    # every instance Orthanc holds is in our store, series by series
    assert store.count_instances() == len(in_pacs) == len(stored_files(node))
    pacs_series = {
        s["MainDicomTags"]["SeriesInstanceUID"]: s
        for s in pacs.find("Series", {"StudyInstanceUID": study_in_pacs["uid"]})
    }
    ours = {s["series_instance_uid"]: s for s in store.series_summary(study_instance_uid=study_in_pacs["uid"])}
    assert set(ours) == set(pacs_series)
    for uid, s in pacs_series.items():
        assert ours[uid]["instances"] == len(s["Instances"])
        assert ours[uid]["modality"] == s["MainDicomTags"]["Modality"]
        assert ours[uid]["conflicts"] == 0
    assert {s["modality"] for s in ours.values()} == {"CT", "NM", "RTSTRUCT", "SEG"}

    # each file we wrote parses to the SOP instance Orthanc sent, with the data set as uploaded
    sops = {i["MainDicomTags"]["SOPInstanceUID"] for i in in_pacs}
    assert sops == set(study_in_pacs["sops"])
    for sop in sops:
        rec = store.get_instance(sop)
        assert rec is not None and rec.calling_ae == PACS_AET and not rec.flagged_conflict
        ds = dcmread(rec.path)
        assert ds.SOPInstanceUID == sop
    for sop in sorted(sops)[:3] + [
        s for s, f in study_in_pacs["sops"].items() if f.name in ("RTSTRUCT.dcm", "SEG.dcm")
    ]:
        assert dcmread(store.get_instance(sop).path) == dcmread(study_in_pacs["sops"][sop])

    # a series sent again (Orthanc pushes any level): it succeeds, we keep one copy each
    nm = next(s for s in pacs_series.values() if s["MainDicomTags"]["Modality"] == "NM")
    ans = pacs.push("voxeldose", [nm["ID"]])
    assert (ans["InstancesCount"], ans["FailedInstancesCount"]) == (len(nm["Instances"]), 0)
    assert store.count_instances() == len(in_pacs) == len(stored_files(node))


def test_orthanc_under_an_aet_we_do_not_allow_is_refused(
    pacs: Orthanc, study_in_pacs: dict, start_node: Callable[..., Any], store: Any
) -> None:
    node = start_node()
    # the same Orthanc, calling as STRANGER for this peer (per-modality LocalAet)
    pacs.put_modality("stranger", OUR_AET, "127.0.0.1", node.port, LocalAet="STRANGER")
    assert not pacs.echo("stranger")
    with pytest.raises(OrthancError) as err:
        pacs.push_study("stranger", study_in_pacs["id"])
    assert err.value.status is not None and err.value.status >= 400
    assert "rejected" in str(err.value.body.get("Details", "")).lower(), err.value.body
    assert store.count_instances() == 0 and stored_files(node) == []
    # allowed under its own AET on the same node: the refusal was the AE title, nothing else
    pacs.put_modality("voxeldose", OUR_AET, "127.0.0.1", node.port)
    assert pacs.echo("voxeldose")


# ------------------------------------------------------------------ voxeldose → Orthanc
def _rtdose_for(ct_header: Any, path: Path) -> Any:
    import numpy as np

    from voxeldose import dicom_writers as dw
    from voxeldose.geometry import Volume
    from voxeldose.outputs import patient_study_from

    k, j, i = np.meshgrid(np.arange(6), np.arange(10), np.arange(8), indexing="ij")
    dose = 5.0 * np.exp(-((i - 4) ** 2 + (j - 5) ** 2 + (k - 3) ** 2) / 10.0)
    affine = np.array([[4.8, 0, 0, -20.0], [0, 4.8, 0, -25.0], [0, 0, 4.8, -15.0], [0, 0, 0, 1.0]])
    for_uid = str(ct_header.FrameOfReferenceUID)
    series = dw.SeriesInfo(
        generate_uid(), 90, "Absorbed dose (Orthanc peer test)", for_uid, datetime(2024, 5, 9, 14, 30)
    )
    return dw.write_rtdose(path, Volume(dose, affine, for_uid, "Gy"), ctx=patient_study_from(ct_header), series=series)


def _c_store(pacs: Orthanc, paths: list[Path]) -> list[int]:
    from pynetdicom import AE

    ae = AE(ae_title=OUR_AET)
    for sop_class in sorted({str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    assert assoc.is_established, "Orthanc refused the association"
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def test_we_store_rtdose_and_seg_into_orthanc(pacs: Orthanc, small_phantom: dict, tmp_path: Path) -> None:
    root = small_phantom["dicom"]
    ct = dcmread(sorted(root.glob("*/CT/*"))[0], stop_before_pixels=True)
    rd_path = tmp_path / "RD.dcm"
    rd = _rtdose_for(ct, rd_path)
    # the phantom's SEG under new UIDs, so that Orthanc cannot have it already
    seg = dcmread(root / "SEG.dcm")
    seg.SOPInstanceUID = seg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    seg.SeriesInstanceUID = generate_uid()
    seg_path = tmp_path / "SEG.dcm"
    seg.save_as(seg_path, enforce_file_format=True)

    since = pacs.changes(limit=0)["Last"]
    assert _c_store(pacs, [rd_path, seg_path]) == [0x0000, 0x0000]

    (dose_series,) = pacs.find("Series", {"Modality": "RTDOSE", "SeriesInstanceUID": rd.SeriesInstanceUID})
    (dose_inst,) = pacs.find("Instance", {"SOPInstanceUID": rd.SOPInstanceUID})
    assert dose_series["Instances"] == [dose_inst["ID"]]
    tags = pacs.instance_tags(dose_inst["ID"])
    assert tags["SOPInstanceUID"] == rd.SOPInstanceUID and tags["Modality"] == "RTDOSE"
    assert (tags["DoseUnits"], tags["DoseType"]) == ("GY", "PHYSICAL")
    assert tags["StudyInstanceUID"] == ct.StudyInstanceUID  # joins the patient's study in the PACS
    assert float(tags["DoseGridScaling"]) == pytest.approx(float(rd.DoseGridScaling))

    (seg_series,) = pacs.find("Series", {"Modality": "SEG", "SeriesInstanceUID": seg.SeriesInstanceUID})
    (seg_id,) = seg_series["Instances"]
    tags = pacs.instance_tags(seg_id)
    assert tags["SOPInstanceUID"] == seg.SOPInstanceUID and tags["SegmentationType"] == seg.SegmentationType
    assert len(tags["SegmentSequence"]) == len(seg.SegmentSequence)
    # what Orthanc keeps is the data set we sent
    from io import BytesIO

    assert dcmread(BytesIO(pacs.instance_file(seg_id))) == dcmread(seg_path)
    assert (
        dcmread(BytesIO(pacs.instance_file(dose_inst["ID"]))).pixel_array.tobytes()
        == dcmread(rd_path).pixel_array.tobytes()
    )

    new = {c["ID"] for c in pacs.changes(since=since)["Changes"] if c["ChangeType"] == "NewInstance"}
    assert new == {dose_inst["ID"], seg_id}


def test_orthanc_checks_the_called_aet(pacs: Orthanc) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=OUR_AET)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title="NOTORTHANC")
    assert not assoc.is_established
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.aet)
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
