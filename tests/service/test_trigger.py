"""The job trigger on real received files (DicomNode.receive_file → store → Trigger.tick), on SQLite and
PostgreSQL.  The network side (associations, release) is covered in test_pacs_roundtrip.py.

The expected input sets are computed independently of the trigger: by reading the phantom's folders with
voxeldose.ingest and fingerprinting them, not from what the trigger stored.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from summaries import cycle_summary
from support import wait_for

from service.dicom_node import STATUS_SUCCESS, DicomNode
from service.models import utcnow
from service.trigger import Trigger, cycle_key
from voxeldose import recon
from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import load_cycle, scan
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import input_fingerprint
from voxeldose.scanner import SpectAcquisition

QUIET_S = 5.0
SITE_SPEC = {"calibration": {"cps_per_mbq": 5.67, "source": "site setting"}}


def _files(phantom: dict[str, Any], *parts: str) -> list[Path]:
    root = Path(phantom["dicom"])
    out: list[Path] = []
    for p in parts:
        q = root / p
        out += sorted(q.rglob("*.dcm")) if q.is_dir() else [q]
    return out


def _patient(phantom: dict[str, Any]) -> str:
    return str(pydicom.dcmread(_files(phantom, "RTSTRUCT.dcm")[0], stop_before_pixels=True).PatientID)


def _expected_hash(files: list[Path]) -> str:
    return input_fingerprint(load_cycle(scan(files)))["sop_instance_uids_sha256"]


@pytest.fixture
def setup(make_settings: Any, store: Any) -> tuple[Any, DicomNode, Trigger]:
    # the phantom's SPECT holds counts: a site-wide calibration (trigger_spec), else the cycle waits for a camera
    # profile (test_cameras.py)
    settings = make_settings(
        dicom_quiet_period_s=QUIET_S, trigger_min_timepoints=3, trigger_deadline_h=48.0, trigger_spec=SITE_SPEC
    )
    settings.ensure_dirs()
    trigger = Trigger(settings, store)
    return settings, DicomNode(settings, store, trigger), trigger


def _receive(node: DicomNode, files: list[Path]) -> None:
    for f in files:
        out = node.receive_file(f, calling_ae="PACS")
        assert out.status == STATUS_SUCCESS, (f, out)


def _after_quiet() -> Any:
    return utcnow() + timedelta(seconds=QUIET_S + 2)


ALL = ("tp1_004h", "tp2_024h", "tp3_096h", "tp4_168h", "RTSTRUCT.dcm", "SEG.dcm")


def test_complete_cycle_starts_one_job_after_the_quiet_period(setup: Any, store: Any, small_phantom: dict) -> None:
    settings, node, trigger = setup
    files = _files(small_phantom, *ALL)
    _receive(node, files)
    assert trigger.tick(utcnow()) == []  # still inside the quiet period
    assert store.list_jobs()[1] == 0

    decisions = trigger.tick(_after_quiet())
    started = [d for d in decisions if d.state == "started"]
    assert len(started) == 1
    job = store.get_job(started[0].job_id)
    assert job.state == "queued" and job.source == "dicom" and job.version == 1 and job.supersedes is None
    assert job.patient_id == _patient(small_phantom)
    # exactly the phantom's cycle: the same SOP instances as ingest finds in the folders
    assert job.input_hash == _expected_hash(files)
    linked = sorted(p for p in Path(job.input_dir).rglob("*") if p.is_file())
    assert len(linked) == len(files)
    assert job.spec["cycle_number"] == 1 and job.spec["earlier_cycles"] == []
    assert job.spec.get("fit", {}).get("model", "auto") != "stp"
    row = store.get_trigger_cycle(started[0].cycle_key)
    assert row["state"] == "started" and row["job_id"] == job.id and row["timepoints"] == 4

    # the same study again (a second push): duplicates, and no second job
    _receive(node, files)
    again = trigger.tick(_after_quiet())
    assert [d.state for d in again] == ["exists"]
    assert store.list_jobs()[1] == 1
    # nothing pending is left once looked at
    assert store.due_patients(_after_quiet() + timedelta(days=1)) == []


def test_two_halves_start_one_job_after_the_second(setup: Any, store: Any, small_phantom: dict) -> None:
    settings, node, trigger = setup
    first = _files(small_phantom, "tp1_004h", "tp2_024h", "RTSTRUCT.dcm")
    second = _files(small_phantom, "tp3_096h", "tp4_168h", "SEG.dcm")
    _receive(node, first)
    d1 = trigger.tick(_after_quiet())
    assert [d.state for d in d1] == ["waiting"]
    assert "2 of 3 SPECT time points" in d1[0].reason
    assert store.list_jobs()[1] == 0
    row = store.get_trigger_cycle(d1[0].cycle_key)
    assert row["state"] == "waiting" and row["deadline_at"] is not None

    _receive(node, second)
    d2 = trigger.tick(_after_quiet())
    assert [d.state for d in d2] == ["started"]
    assert store.list_jobs()[1] == 1
    job = store.get_job(d2[0].job_id)
    assert job.input_hash == _expected_hash(first + second) and job.version == 1


def test_late_series_starts_a_new_version_and_keeps_the_old(setup: Any, store: Any, small_phantom: dict) -> None:
    settings, node, trigger = setup
    three = _files(small_phantom, "tp1_004h", "tp2_024h", "tp3_096h", "RTSTRUCT.dcm")
    _receive(node, three)
    v1 = trigger.tick(_after_quiet())[0]
    assert v1.state == "started" and v1.version == 1 and v1.timepoints == 3
    assert store.get_job(v1.job_id).input_hash == _expected_hash(three)

    late = _files(small_phantom, "tp4_168h")
    _receive(node, late)
    v2 = trigger.tick(_after_quiet())[0]
    assert v2.state == "started" and v2.version == 2 and v2.timepoints == 4
    job2 = store.get_job(v2.job_id)
    assert job2.supersedes == v1.job_id and job2.cycle_key == v1.cycle_key
    assert job2.input_hash == _expected_hash(three + late)
    # the first version is kept, its input folder untouched (still 3 time points)
    job1 = store.get_job(v1.job_id)
    assert job1 is not None and Path(job1.input_dir).is_dir()
    assert _expected_hash(sorted(p for p in Path(job1.input_dir).rglob("*.dcm"))) == _expected_hash(three)
    assert [j.version for j in store.cycle_jobs(v1.cycle_key)] == [1, 2]


def _ref_tp(phantom: dict[str, Any]) -> str:
    """The time point whose frame of reference the RTSTRUCT is drawn on."""
    rt = pydicom.dcmread(_files(phantom, "RTSTRUCT.dcm")[0], stop_before_pixels=True)
    rt_for = rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    hits = [
        tp
        for tp in ("tp1_004h", "tp2_024h", "tp3_096h", "tp4_168h")
        if pydicom.dcmread(_files(phantom, f"{tp}/NM")[0], stop_before_pixels=True).FrameOfReferenceUID == rt_for
    ]
    assert len(hits) == 1
    return hits[0]


def test_deadline_starts_single_time_point_job(setup: Any, store: Any, small_phantom: dict) -> None:
    """The time point that carries the VOIs alone: waiting until the deadline, then an STP job."""
    from datetime import datetime

    settings, node, trigger = setup
    _receive(node, _files(small_phantom, _ref_tp(small_phantom), "RTSTRUCT.dcm"))
    d = trigger.tick(_after_quiet())
    assert [x.state for x in d] == ["waiting"] and "1 of 3" in d[0].reason
    deadline = datetime.fromisoformat(store.get_trigger_cycle(d[0].cycle_key)["deadline_at"])
    first_seen = datetime.fromisoformat(store.get_trigger_cycle(d[0].cycle_key)["first_seen_at"])
    assert deadline - first_seen == timedelta(hours=48)
    assert [x.state for x in trigger.tick(deadline - timedelta(minutes=1))] in ([], ["waiting"])
    assert store.list_jobs()[1] == 0
    after = trigger.tick(deadline + timedelta(seconds=1))
    assert [x.state for x in after] == ["started"]
    job = store.get_job(after[0].job_id)
    assert job.spec["fit"]["model"] == "stp" and job.version == 1
    assert "deadline" in store.get_trigger_cycle(d[0].cycle_key)["reason"]


def test_deadline_without_vois_starts_nothing(setup: Any, store: Any, small_phantom: dict) -> None:
    """A time point whose frame of reference has no VOIs: the deadline cannot start a job, and says why."""
    from datetime import datetime

    settings, node, trigger = setup
    other = next(tp for tp in ("tp1_004h", "tp2_024h", "tp3_096h", "tp4_168h") if tp != _ref_tp(small_phantom))
    _receive(node, _files(small_phantom, other, "RTSTRUCT.dcm"))
    d = trigger.tick(_after_quiet())
    assert [x.state for x in d] == ["waiting"] and "no RTSTRUCT or SEG" in d[0].reason
    deadline = datetime.fromisoformat(store.get_trigger_cycle(d[0].cycle_key)["deadline_at"])
    after = trigger.tick(deadline + timedelta(seconds=1))
    assert [x.state for x in after] == ["waiting"]
    assert "has passed" in after[0].reason
    assert store.list_jobs()[1] == 0
    # looked at once after the deadline, not at every round from then on
    assert store.deadline_patients(deadline + timedelta(days=1)) == []
    assert trigger.tick(deadline + timedelta(days=1)) == []


def test_no_vois_waits_and_says_so(setup: Any, store: Any, small_phantom: dict) -> None:
    settings, node, trigger = setup
    _receive(node, _files(small_phantom, "tp1_004h", "tp2_024h", "tp3_096h", "tp4_168h"))
    d = trigger.tick(_after_quiet())
    assert [x.state for x in d] == ["waiting"]
    assert "no RTSTRUCT or SEG" in d[0].reason
    assert store.list_jobs()[1] == 0


def test_our_own_seg_coming_back_starts_nothing(setup: Any, store: Any, small_phantom: dict, tmp_path: Path) -> None:
    """A SEG that voxeldose wrote (recorded as a job's output series) is not an input when the PACS sends
    it back; the same SEG under another series UID not written by us does start a new version."""
    settings, node, trigger = setup
    _receive(node, _files(small_phantom, *ALL))
    v1 = trigger.tick(_after_quiet())[0]
    assert v1.state == "started"
    [job] = store.claim_queued(1)

    def seg_copy(name: str) -> tuple[Path, str]:
        ds = pydicom.dcmread(_files(small_phantom, "SEG.dcm")[0])
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = tmp_path / name
        ds.save_as(p)
        return p, str(ds.SeriesInstanceUID)

    ours, ours_series = seg_copy("ours.dcm")
    out = tmp_path / "out"
    out.mkdir()
    store.finish(job.id, str(out), job.patient_id, [ours_series])
    _receive(node, [ours])
    assert trigger.tick(_after_quiet()) != [] and store.list_jobs()[1] == 1
    assert [d.state for d in trigger.tick(_after_quiet())] in ([], ["exists"])
    assert store.list_jobs()[1] == 1

    other, _ = seg_copy("other.dcm")
    _receive(node, [other])
    d = trigger.tick(_after_quiet())
    assert [x.state for x in d] == ["started"] and d[0].version == 2


def test_cycle_without_injection_information_is_an_error_visible(
    setup: Any, store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    settings, node, trigger = setup
    files = []
    for f in _files(small_phantom, "tp1_004h/NM"):
        ds = pydicom.dcmread(f)
        del ds.RadiopharmaceuticalInformationSequence
        p = tmp_path / f.name
        ds.save_as(p)
        files.append(p)
    _receive(node, files + _files(small_phantom, "tp1_004h/CT"))
    d = trigger.tick(_after_quiet())
    assert [x.state for x in d] == ["error"]
    assert "Radiopharmaceutical" in d[0].reason
    assert store.trigger_cycles(patient_id=_patient(small_phantom))[0]["state"] == "error"


def test_second_cycle_gets_number_two_and_the_first_cycles_doses(
    setup: Any, store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    """A later injection of the same patient is cycle 2 and carries cycle 1's doses from its result."""
    settings, node, trigger = setup
    _receive(node, _files(small_phantom, *ALL))
    [c1] = [d for d in trigger.tick(_after_quiet()) if d.state == "started"]
    [job1] = store.claim_queued(1)
    _finish_with_summary(store, job1, tmp_path / "out1", _summary_of(small_phantom, number=1))

    _receive(node, _shifted_copy(small_phantom, tmp_path / "c2", timedelta(weeks=8)))
    started = [d for d in trigger.tick(_after_quiet()) if d.state == "started"]
    assert len(started) == 1 and started[0].cycle_key != c1.cycle_key
    job2 = store.get_job(started[0].job_id)
    assert job2.spec["cycle_number"] == 2
    [earlier] = job2.spec["earlier_cycles"]
    assert earlier["number"] == 1 and earlier["kidney_gy"] == 4.2 and earlier["marrow_gy"] == 0.3
    assert earlier["kidney_bed_gy"] == 5.1
    # its kidney dose's uncertainty travels with it, by component (cumulative u, issue 13 part 2)
    assert earlier["kidney_u_components_gy"] == {"calibration": 0.21, "counting": 0.1}


def _summary_of(phantom: dict[str, Any], *, number: int, shift: timedelta = timedelta(0)) -> dict[str, Any]:
    """A result's summary.json (schema-valid, see tests/summaries.py) with made-up doses for its own cycle."""
    inj = datetime.fromisoformat(phantom["truth"]["injection"]["datetime"]) + shift
    mbq = phantom["truth"]["injection"]["activity_bq"] / 1e6
    return cycle_summary(
        number=number,
        injection=inj,
        activity_mbq=mbq,
        kidney_gy=4.2,
        kidney_bed_gy=5.1,
        marrow_gy=0.3,
        kidney_u_components_gy={"calibration": 0.21, "counting": 0.1},
    )


def _finish_with_summary(store: Any, job: Any, out: Path, summary: dict[str, Any]) -> None:
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary))
    store.finish(job.id, str(out), job.patient_id)


def _shifted_copy(phantom: dict[str, Any], folder: Path, shift: timedelta) -> list[Path]:
    """The phantom's images ``shift`` later (a later cycle of the same patient): new study, series, SOP
    instance and frame-of-reference UIDs, every date moved."""
    study = generate_uid()
    series_map: dict[str, str] = {}
    for_map: dict[str, str] = {}
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for f in _files(phantom, *ALL):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_map.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        _shift_dates(ds, shift, for_map)
        p = folder / f"{len(out)}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def test_earlier_cycle_arriving_later_renumbers_with_a_new_version(
    setup: Any, store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    """The PACS routes cycle 2 first, cycle 1 afterwards: cycle 2's first job counted itself as cycle 1 with no
    earlier dose; once cycle 1 is in and measured, cycle 2 gets a new version numbered 2 carrying cycle 1's doses
    (same images, another job description), and its first version is kept."""
    settings, node, trigger = setup
    _receive(node, _shifted_copy(small_phantom, tmp_path / "c2", timedelta(weeks=8)))
    [v1] = trigger.tick(_after_quiet())
    assert v1.state == "started" and v1.spec["cycle_number"] == 1 and v1.spec["earlier_cycles"] == []

    _receive(node, _files(small_phantom, *ALL))  # cycle 1 arrives
    d = {x.cycle_key: x for x in trigger.tick(_after_quiet())}
    first = [x for x in d.values() if x.cycle_key != v1.cycle_key]
    assert [x.state for x in first] == ["started"] and first[0].spec["cycle_number"] == 1
    assert d[v1.cycle_key].state == "waiting" and "earlier cycle 1" in d[v1.cycle_key].reason

    claimed = {j.id: j for j in store.claim_queued(5)}
    _finish_with_summary(store, claimed[first[0].job_id], tmp_path / "out1", _summary_of(small_phantom, number=1))
    later = [x for x in trigger.tick(_after_quiet() + timedelta(seconds=60)) if x.cycle_key == v1.cycle_key]
    assert [x.state for x in later] == ["started"]
    v2 = store.get_job(later[0].job_id)
    assert v2.version == 2 and v2.supersedes == v1.job_id and v2.input_hash == v1.input_hash
    assert v2.spec["cycle_number"] == 2
    [earlier] = v2.spec["earlier_cycles"]
    assert earlier["number"] == 1 and earlier["kidney_gy"] == 4.2
    assert "earlier cycles changed" in later[0].reason
    assert store.get_job(v1.job_id) is not None  # kept
    # nothing changes any more: looked at again, no third version
    again = trigger.evaluate_patient(_patient(small_phantom), _after_quiet() + timedelta(minutes=5))
    assert sorted(x.state for x in again) == ["exists", "exists"]


def test_an_uploaded_earlier_cycle_counts(setup: Any, store: Any, small_phantom: dict, tmp_path: Path) -> None:
    """Cycle 1 measured through an HTTP upload (no images at the node): the node's cycle is number 2 and
    carries cycle 1's doses from that result."""
    settings, node, trigger = setup
    job, _ = store.create_job(
        spec={"inputs": ["x"]},
        input_dir="x",
        input_hash="a" * 64,
        patient_id=_patient(small_phantom),
        idempotency_key=None,
        submitted_by="physicist-1",
        source="upload",
    )
    [claimed] = store.claim_queued(1)
    _finish_with_summary(store, claimed, tmp_path / "up", _summary_of(small_phantom, number=1))
    _receive(node, _shifted_copy(small_phantom, tmp_path / "c2", timedelta(weeks=8)))
    [d] = trigger.tick(_after_quiet())
    assert d.state == "started" and d.spec["cycle_number"] == 2
    assert [(e["number"], e["kidney_gy"], e["marrow_gy"]) for e in d.spec["earlier_cycles"]] == [(1, 4.2, 0.3)]


def test_two_reconstructions_at_one_time_are_an_error_not_a_job(
    setup: Any, store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    """A second SPECT series acquired at the same time (e.g. a non-attenuation-corrected reconstruction) would
    count as an extra time point and make the job fail: the cycle is an error that says why."""
    settings, node, trigger = setup
    nm = _files(small_phantom, "tp2_024h/NM")[0]
    ds = pydicom.dcmread(nm)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = "NAC"
    twin = tmp_path / "nac.dcm"
    ds.save_as(twin)
    _receive(node, _files(small_phantom, "tp1_004h", "tp2_024h", "RTSTRUCT.dcm") + [twin])
    [d] = trigger.tick(_after_quiet())
    assert d.state == "error" and "same time" in d.reason
    assert store.list_jobs()[1] == 0


def test_a_fuzzed_instance_is_an_error_of_its_series_once(
    setup: Any, store: Any, small_phantom: dict, tmp_path: Path, caplog: Any
) -> None:
    """A SPECT whose ImageType is written as an integer (issue 14, defect 8): the cycle is an error naming the
    series and the attribute (not a path on the server), and no round logs a traceback."""
    settings, node, trigger = setup
    nm = _files(small_phantom, "tp1_004h/NM")[0]
    ds = pydicom.dcmread(nm)
    ds.add(DataElement(0x00080008, "US", 7))
    fuzzed = tmp_path / "fuzzed.dcm"
    ds.save_as(fuzzed, enforce_file_format=True)
    caplog.set_level(logging.INFO, logger="service.trigger")
    _receive(node, [fuzzed] + _files(small_phantom, "tp1_004h/CT"))
    [d] = trigger.tick(_after_quiet())
    assert d.state == "error"
    assert f"series {ds.SeriesInstanceUID}" in d.reason and "ImageType (0008,0008)" in d.reason
    assert str(tmp_path) not in d.reason and str(settings.data_dir) not in d.reason
    [row] = store.trigger_cycles(patient_id=_patient(small_phantom))
    assert row["state"] == "error" and row["reason"] == d.reason
    trigger.touch(_patient(small_phantom), utcnow())  # looked at again: the same verdict, still no traceback
    [again] = trigger.tick(_after_quiet())
    assert again.state == "error" and again.reason == d.reason
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_a_mark_made_while_looking_is_not_lost(store: Any) -> None:
    """clear_patient removes a pending mark only if nothing marked the patient after it was read."""
    t0 = utcnow()
    store.touch_patient("P1", t0)
    [(pid, touched)] = store.due_patients(t0 + timedelta(seconds=1))
    store.touch_patient("P1", t0)  # an instance arrives while the trigger looks
    assert store.clear_patient("P1", touched) is False
    assert [p for p, _ in store.due_patients(t0 + timedelta(seconds=1))] == ["P1"]
    [(_, touched2)] = store.due_patients(t0 + timedelta(seconds=1))
    assert store.clear_patient("P1", touched2) is True
    assert store.due_patients(t0 + timedelta(days=1)) == []


def _shift_dates(ds: Any, shift: timedelta, for_map: dict[str, str]) -> None:
    """Move every DA/DT of the data set (and its sequences) by ``shift``; new Frame of Reference UIDs."""
    from datetime import datetime

    def walk(d: Any) -> None:
        for el in d:
            if el.VR == "SQ":
                for item in el.value:
                    walk(item)
            elif el.VR == "DA" and el.value:
                el.value = (datetime.strptime(str(el.value), "%Y%m%d") + shift).strftime("%Y%m%d")
            elif el.VR == "DT" and el.value:
                v = str(el.value)
                t = datetime.strptime(v[:14], "%Y%m%d%H%M%S") + shift
                el.value = t.strftime("%Y%m%d%H%M%S") + v[14:]
            elif el.VR == "UI" and el.keyword in ("FrameOfReferenceUID",) and el.value:
                el.value = for_map.setdefault(str(el.value), generate_uid())

    walk(ds)


def test_cycle_key_is_patient_and_injection() -> None:
    from datetime import datetime

    t = datetime(2026, 1, 1, 9, 30)
    assert cycle_key("P1", t) == cycle_key("P1", t.replace(second=20))  # minutes resolution
    assert cycle_key("P1", t) != cycle_key("P2", t)
    assert cycle_key("P1", t) != cycle_key("P1", t + timedelta(days=56))


# ------------------------------------------------------------------------------ over the network
def _scu_assoc(port: int, files: list[Path]) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    for sop in {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="VOXELDOSE")
    assert assoc.is_established
    return assoc


def _send(assoc: Any, files: list[Path]) -> None:
    for f in files:
        st = assoc.send_c_store(pydicom.dcmread(f))
        assert st.Status == 0, f


def _ready_at(store: Any, pid: str) -> Any:
    from sqlalchemy import select

    from service.models import PendingPatient

    with store.db.read() as s:
        return s.scalars(select(PendingPatient.ready_at).where(PendingPatient.patient_id == pid)).first()


def test_release_waits_for_other_open_associations_of_the_patient(
    make_settings: Any, store: Any, small_phantom: dict
) -> None:
    """Association A (NM + RTSTRUCT) is released while association B is halfway through a CT of the same
    patient: the patient is not looked at before B ends (no job on half a CT); B's release makes it due."""
    settings = make_settings(dicom_port=0, dicom_allowed_aets=["PACS"], dicom_min_free_mb=0, dicom_quiet_period_s=600)
    trigger = Trigger(settings, store)
    node = DicomNode(settings, store, trigger)
    node.start()
    pid = _patient(small_phantom)
    try:
        ct = _files(small_phantom, "tp1_004h/CT")
        b = _scu_assoc(node.port, ct)
        _send(b, ct[: len(ct) // 2])
        a = _scu_assoc(node.port, _files(small_phantom, "tp1_004h/NM", "RTSTRUCT.dcm"))
        _send(a, _files(small_phantom, "tp1_004h/NM", "RTSTRUCT.dcm"))
        a.release()
        time.sleep(0.3)  # the node handles the release in its own thread
        assert _ready_at(store, pid) > utcnow() + timedelta(seconds=300)  # quiet period, not "now"
        _send(b, ct[len(ct) // 2 :])
        b.release()
        wait_for(lambda: _ready_at(store, pid) <= utcnow(), what="the patient to be due after B's release")
    finally:
        node.stop()


def test_aborted_association_leaves_the_quiet_period(make_settings: Any, store: Any, small_phantom: dict) -> None:
    settings = make_settings(dicom_port=0, dicom_allowed_aets=["PACS"], dicom_min_free_mb=0, dicom_quiet_period_s=600)
    node = DicomNode(settings, store, Trigger(settings, store))
    node.start()
    try:
        files = _files(small_phantom, "tp1_004h/NM")
        a = _scu_assoc(node.port, files)
        _send(a, files)
        a.abort()
        time.sleep(0.5)
        assert _ready_at(store, _patient(small_phantom)) > utcnow() + timedelta(seconds=300)
    finally:
        node.stop()


def test_a_release_in_the_middle_of_a_push_is_not_the_end_of_the_study(
    make_settings: Any, store: Any, small_phantom: dict
) -> None:
    """Orthanc releases its association in the middle of a push when it meets a SOP class it had not proposed (a SEG:
    not among DCMTK's common storage classes) and goes on at once in a new one.  Association A carries three time
    points and the RTSTRUCT (a cycle that looks complete) and is released; association B carries the SEG and the
    fourth time point.  The trigger's next round after A's release finds the patient not due (the settle time after a
    release); after B's release: one job, on all four time points."""
    settings = make_settings(
        dicom_port=0,
        dicom_allowed_aets=["PACS"],
        dicom_min_free_mb=0,
        dicom_quiet_period_s=600,
        dicom_release_settle_s=300,
        trigger_min_timepoints=3,
        trigger_spec=SITE_SPEC,
    )
    settings.ensure_dirs()
    trigger = Trigger(settings, store)
    node = DicomNode(settings, store, trigger)
    node.start()
    pid = _patient(small_phantom)
    first = _files(small_phantom, "tp1_004h", "tp2_024h", "tp3_096h", "RTSTRUCT.dcm")
    rest = _files(small_phantom, "SEG.dcm", "tp4_168h")

    def released() -> bool:  # from the quiet period (~600 s ahead) to the settle time (300 s ahead)
        return bool(_ready_at(store, pid) < utcnow() + timedelta(seconds=450))

    try:
        a = _scu_assoc(node.port, first)
        _send(a, first)
        a.release()
        wait_for(released, what="A's release to be handled")
        assert trigger.tick(utcnow()) == []  # the trigger's next round: not due, B may be on its way
        assert store.list_jobs()[1] == 0
        b = _scu_assoc(node.port, rest)
        _send(b, rest)
        b.release()
        wait_for(released, what="B's release to be handled")
        assert trigger.tick(utcnow()) == []
    finally:
        node.stop()
    out = trigger.tick(utcnow() + timedelta(seconds=301))
    assert [(o.state, o.timepoints) for o in out] == [("started", 4)]
    job = store.get_job(out[0].job_id)
    assert job.input_hash == _expected_hash(first + rest) and job.version == 1
    assert store.list_jobs()[1] == 1


class _SenderGoesOnWhileLooking(Trigger):
    """The real trigger, while a PACS is still sending: right after the trigger has read what was received (its
    snapshot), the node stores more instances of the patient (once)."""

    def __init__(self, settings: Any, store: Any, node: DicomNode, more: list[Path]) -> None:
        super().__init__(settings, store)
        self.node, self.more = node, more

    def snapshot(self, patient_id: str, now: datetime) -> Any:
        snap = super().snapshot(patient_id, now)
        more, self.more = self.more, []
        _receive(self.node, more)
        return snap


def test_instances_stored_while_the_trigger_looks_start_nothing(
    make_settings: Any, store: Any, small_phantom: dict
) -> None:
    """The trigger decides on what it read; an instance of the patient stored between its reading and its writing
    (the sender goes on) makes the decision stale: no job on the part it read (three time points and the RTSTRUCT:
    complete as far as it goes), the patient stays pending, and the next round starts one job on all of it."""
    settings = make_settings(
        dicom_quiet_period_s=QUIET_S, trigger_min_timepoints=3, trigger_deadline_h=48.0, trigger_spec=SITE_SPEC
    )
    settings.ensure_dirs()
    first = _files(small_phantom, "tp1_004h", "tp2_024h", "tp3_096h", "RTSTRUCT.dcm")
    rest = _files(small_phantom, "SEG.dcm", "tp4_168h")
    node = DicomNode(settings, store)  # tells no trigger: the test says when to look
    trigger = _SenderGoesOnWhileLooking(settings, store, node, rest[:2])
    node.trigger = trigger
    pid = _patient(small_phantom)
    _receive(node, first)
    assert trigger.tick(utcnow()) == []  # inside the quiet period

    out = trigger.tick(_after_quiet())
    assert [o.state for o in out] == ["stale"], out
    assert store.list_jobs()[1] == 0
    assert not [p for p in settings.incoming_dir.iterdir() if p.name.startswith("node-")]  # no input set left linked
    assert [p for p, _ in store.due_patients(_after_quiet())] == [pid]  # still pending

    _receive(node, rest[2:])
    out = trigger.tick(_after_quiet())
    assert [(o.state, o.timepoints) for o in out] == [("started", 4)]
    assert store.get_job(out[0].job_id).input_hash == _expected_hash(first + rest)
    assert store.list_jobs()[1] == 1


# ------------------------------------------------------------------------------ projections as a time point's SPECT
@pytest.fixture(scope="module")
def osem_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small patient at one time point (24 h) imaged by the projection camera: NM TOMO projections (2 heads ×
    32 views, so that the default 8 OSEM subsets divide them) beside their RECON TOMO, CT, RTSTRUCT."""
    try:
        recon._pytomography()
    except VoxeldoseError:
        pytest.skip("the 'recon' extra is not installed")
    import torch

    torch.set_num_threads(1)
    acquisition = SpectAcquisition(frame_duration_ms=80_000, frames_in_rotation=32, angular_step_deg=5.625)
    d = tmp_path_factory.mktemp("osem")
    settings = PhantomSettings.small(
        camera="osem", hours=(24.0,), acquisition=acquisition, osem_iterations=1, osem_subsets=8
    )
    write_phantom(d, settings)
    return d / "dicom"


def test_projections_received_by_the_node_start_the_job_their_reconstruction_would(
    make_settings: Any, store: Any, osem_dicom: Path
) -> None:
    """A real association brings the projections, CT and RTSTRUCT (no reconstruction): the trigger starts the
    cycle's job on them.  The reconstruction arriving later makes a second version on the reconstruction (the
    projections then set aside) with the same job description: the projections started the job it would."""
    settings = make_settings(
        dicom_port=0,
        dicom_allowed_aets=["PACS"],
        dicom_min_free_mb=0,
        dicom_quiet_period_s=QUIET_S,
        trigger_min_timepoints=1,
        trigger_spec=SITE_SPEC,
    )
    settings.ensure_dirs()
    trigger = Trigger(settings, store)
    node = DicomNode(settings, store, trigger)
    (tp,) = sorted(osem_dicom.glob("tp*"))
    projections, reconstruction = sorted((tp / "NM-PROJ").glob("*.dcm")), sorted((tp / "NM").glob("*.dcm"))
    rest = sorted((tp / "CT").glob("*.dcm")) + [osem_dicom / "RTSTRUCT.dcm"]
    pid = str(pydicom.dcmread(projections[0], stop_before_pixels=True).PatientID)
    node.start()
    try:
        a = _scu_assoc(node.port, projections + rest)
        _send(a, projections + rest)
        a.release()
        wait_for(lambda: _ready_at(store, pid) is not None, what="the received files to be recorded")
        (v1,) = [d for d in trigger.tick(_after_quiet()) if d.state == "started"]
        job1 = store.get_job(v1.job_id)
        assert v1.timepoints == 1 and job1.source == "dicom" and job1.patient_id == pid
        assert job1.input_hash == _expected_hash(projections + rest)  # the projections are the time point's SPECT
        linked = sorted(p for p in Path(job1.input_dir).rglob("*") if p.is_file())
        assert len(linked) == len(projections + rest)
        (tp1,) = load_cycle(scan(Path(job1.input_dir))).timepoints
        assert tp1.needs_reconstruction

        b = _scu_assoc(node.port, reconstruction)
        _send(b, reconstruction)
        b.release()
        v2 = wait_for(
            lambda: [d for d in trigger.tick(_after_quiet()) if d.state == "started"],
            what="the reconstruction to start a second version",
        )[0]
        job2 = store.get_job(v2.job_id)
        assert v2.cycle_key == v1.cycle_key and v2.version == 2 and v2.timepoints == 1
        assert job2.input_hash == _expected_hash(projections + reconstruction + rest)
        (tp2,) = load_cycle(scan(Path(job2.input_dir))).timepoints
        assert not tp2.needs_reconstruction
        assert {k: v for k, v in job1.spec.items() if k != "inputs"} == {
            k: v for k, v in job2.spec.items() if k != "inputs"
        }
    finally:
        node.stop()
