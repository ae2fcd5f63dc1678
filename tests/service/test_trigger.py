"""The job trigger on real received files (DicomNode.receive_file → store → Trigger.tick), on SQLite and
PostgreSQL.  The network side (associations, release) is covered in test_dicom_flow.py.

The expected input sets are computed independently of the trigger: by reading the phantom's folders with
voxeldose.ingest and fingerprinting them, not from what the trigger stored.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from service.dicom_node import STATUS_SUCCESS, DicomNode
from service.models import utcnow
from service.trigger import Trigger, cycle_key
from voxeldose.ingest import load_cycle, scan
from voxeldose.pipeline import input_fingerprint

QUIET_S = 5.0


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
    settings = make_settings(dicom_quiet_period_s=QUIET_S, trigger_min_timepoints=3, trigger_deadline_h=48.0)
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
    hits = [tp for tp in ("tp1_004h", "tp2_024h", "tp3_096h", "tp4_168h")
            if pydicom.dcmread(_files(phantom, f"{tp}/NM")[0], stop_before_pixels=True).FrameOfReferenceUID == rt_for]
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


def test_cycle_without_injection_information_is_an_error_visible(setup: Any, store: Any, small_phantom: dict,
                                                                  tmp_path: Path) -> None:  # fmt: skip
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


def test_second_cycle_gets_number_two_and_the_first_cycles_doses(setup: Any, store: Any, small_phantom: dict,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    """A later injection of the same patient is cycle 2 and carries cycle 1's doses from its result."""
    settings, node, trigger = setup
    _receive(node, _files(small_phantom, *ALL))
    [c1] = [d for d in trigger.tick(_after_quiet()) if d.state == "started"]
    [job1] = store.claim_queued(1)
    out = tmp_path / "out1"
    out.mkdir()
    summary = {"cycle": {"number": 1}, "cumulative": {"cycles": [
        {"number": 1, "date": "2026-01-01", "activity_MBq": 925.0, "kidney_gy": 4.2, "kidney_bed_gy": 5.1,
         "marrow_gy": 0.3}]}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary))
    store.finish(job1.id, str(out), job1.patient_id)

    # cycle 2: the same images shifted by 8 weeks, new UIDs (a new study)
    shift = timedelta(weeks=8)
    study = generate_uid()
    series_map: dict[str, str] = {}
    for_map: dict[str, str] = {}
    files2 = []
    for f in _files(small_phantom, *ALL):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_map.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        _shift_dates(ds, shift, for_map)
        p = tmp_path / "c2" / f"{len(files2)}.dcm"
        p.parent.mkdir(exist_ok=True)
        ds.save_as(p)
        files2.append(p)
    _receive(node, files2)
    started = [d for d in trigger.tick(_after_quiet()) if d.state == "started"]
    assert len(started) == 1 and started[0].cycle_key != c1.cycle_key
    job2 = store.get_job(started[0].job_id)
    assert job2.spec["cycle_number"] == 2
    [earlier] = job2.spec["earlier_cycles"]
    assert earlier["number"] == 1 and earlier["kidney_gy"] == 4.2 and earlier["marrow_gy"] == 0.3
    assert earlier["kidney_bed_gy"] == 5.1


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
