"""Camera profiles in the service (issue 12 part 3): the store (SQLite and PostgreSQL), matching a SPECT's camera,
the DICOM node's trigger waiting for and then using a profile, and the /cameras page.

The phantom's SPECT holds raw counts and names its camera ``voxeldose`` / ``voxeldose`` with a Lu-177 photopeak
window of 187.5–229.2 keV (voxeldose.dicomutil, voxeldose.phantom); the expected identity below is written from
those headers, not from what the service stored.  The HTTP API end to end (real ``voxeldose serve``, pynetdicom
push, summaries) is in test_cameras_e2e.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from firststage import run_first_stage

pytest.importorskip("sqlalchemy")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from service.app import create_app
from service.cameras import pick_profile, register_profile
from service.config import Settings
from service.dicom_node import STATUS_SUCCESS, DicomNode
from service.errors import ServiceError
from service.models import utcnow
from service.store import CameraRecord, Store
from service.trigger import Trigger
from voxeldose.camera import CameraIdentity, CameraProfile
from voxeldose.phantom import DEFAULT_ACQUISITION, PhantomSettings, camera_headers

QUIET_S = 5.0
#: The phantom SPECT's camera as its headers state it.
#: The camera the small synthetic patient's SPECT names (voxeldose.phantom.camera_headers), as a profile states it.
_HEADERS = camera_headers(PhantomSettings.small())
PHANTOM_CAMERA = {
    "manufacturer": _HEADERS.manufacturer,
    "model": _HEADERS.model,
    "device_serial_number": _HEADERS.device_serial_number,
    "collimator": _HEADERS.collimator,
    "reconstruction": _HEADERS.reconstruction,
    "energy_window_kev": list(DEFAULT_ACQUISITION.energy_window_keV),
}
#: How the service names that camera in its messages: manufacturer, model and serial number.
PHANTOM_LABEL = f"{_HEADERS.manufacturer} {_HEADERS.model} {_HEADERS.device_serial_number}"
EVIL = '<script>alert("x")</script>&'


def profile_data(name: str = "SPECT 1", sensitivity: float = 5.67, **identity: Any) -> dict[str, Any]:
    """A camera.json as ``voxeldose calibrate`` writes it (schema voxeldose.camera/1)."""
    return {
        "schema": "voxeldose.camera/1",
        "name": name,
        "identity": {**PHANTOM_CAMERA, **identity},
        "nuclide": "Lu-177",
        "sensitivity_cps_per_mbq": sensitivity,
        "sensitivity_u_cps_per_mbq": 0.05,
        "fwhm_mm": 11.0,
        "measured": "2026-11-30",
        "source": "cylinder phantom, 200 MBq at 2026-11-30T09:00",
    }


def profile(name: str = "SPECT 1", **kw: Any) -> CameraProfile:
    return CameraProfile.model_validate(profile_data(name, **kw))


# ------------------------------------------------------------------------------------------ store
def test_profiles_are_listed_newest_first_and_retired_not_deleted(store: Store) -> None:
    a = store.add_camera_profile(profile("A"), "phys-1")
    b = store.add_camera_profile(profile("B", device_serial_number="2"), "phys-1")
    assert a.active and a.created_by == "phys-1" and a.created_at.tzinfo is not None
    assert [r.id for r in store.list_camera_profiles()] == [b.id, a.id]
    got = store.get_camera_profile(a.id)
    assert got is not None and got.profile == profile("A")

    out = store.retire_camera_profile(a.id, "phys-2")
    assert out is not None
    rec, changed = out
    assert changed and not rec.active and rec.retired_by == "phys-2" and rec.retired_at is not None
    again = store.retire_camera_profile(a.id, "phys-3")
    assert again is not None and again[1] is False and again[0].retired_by == "phys-2"
    assert store.retire_camera_profile(10_000, "phys-2") is None
    # retired: out of matching, still there for the jobs that used it
    assert [r.id for r in store.active_camera_profiles()] == [b.id]
    assert {r.id for r in store.list_camera_profiles()} == {a.id, b.id}


def test_a_job_keeps_the_profile_it_took(store: Store) -> None:
    p = store.add_camera_profile(profile(), "phys-1")
    job, created = store.create_job(
        spec={"inputs": ["/data/incoming/u1"], "calibration": {"cps_per_mbq": 5.67}},
        input_dir="/data/incoming/u1",
        input_hash="a" * 64,
        patient_id="P1",
        idempotency_key=None,
        submitted_by="alice",
        camera_profile_id=p.id,
        camera_match=f"camera profile SPECT 1 (id {p.id})",
    )
    assert created
    got = store.get_job(job.id)
    assert (
        got is not None and got.camera_profile_id == p.id and got.camera_match == f"camera profile SPECT 1 (id {p.id})"
    )


# ----------------------------------------------------------------------------------------- matching
def _record(n: int, prof: CameraProfile, *, active: bool = True, minutes: int = 0) -> CameraRecord:
    created = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    return CameraRecord(n, prof, "phys-1", created, active, None, None)


SPECT = CameraIdentity(
    manufacturer="SIEMENS NM", model="Symbia Intevo 16", device_serial_number="1234", energy_window_kev=(187.2, 228.8)
)


def test_matching_takes_the_newest_active_profile_of_the_camera_and_nuclide() -> None:
    ident: dict[str, Any] = {
        "manufacturer": "Siemens NM",
        "model": "symbia intevo 16",
        "device_serial_number": None,  # not recorded by the profile: any serial number matches
        "collimator": None,
        "reconstruction": None,
        "energy_window_kev": [187.0, 229.0],
    }
    old = _record(1, profile("old", **ident), minutes=0)
    new = _record(2, profile("new", **ident), minutes=5)
    retired = _record(3, profile("retired", **ident), active=False, minutes=10)
    other_serial = _record(4, profile("other", **{**ident, "device_serial_number": "999"}), minutes=20)
    other_window = _record(5, profile("window", **{**ident, "energy_window_kev": [100.0, 120.0]}), minutes=20)
    found = pick_profile(SPECT, "Lu-177", [old, retired, new, other_serial, other_window])
    assert found is not None and found.record.id == 2 and found.matching == 2
    assert found.source == "camera profile new (id 2)"
    assert "newest of 2" in found.note(True)
    assert pick_profile(SPECT, "177Lu", [old]) is not None  # one nuclide, however it is written
    assert pick_profile(SPECT, "Y-90", [old, new]) is None
    assert pick_profile(SPECT, "Lu-177", [retired, other_serial, other_window]) is None


# ------------------------------------------------------------------------------------------ trigger
def _phantom_files(phantom: dict[str, Any]) -> list[Path]:
    return sorted(Path(phantom["dicom"]).rglob("*.dcm"))


def _patient(phantom: dict[str, Any]) -> str:
    return str(pydicom.dcmread(Path(phantom["dicom"]) / "RTSTRUCT.dcm", stop_before_pixels=True).PatientID)


def _node(make_settings: Any, store: Store, **kw: Any) -> tuple[Settings, DicomNode, Trigger]:
    settings = make_settings(dicom_quiet_period_s=QUIET_S, trigger_min_timepoints=3, trigger_deadline_h=48.0, **kw)
    settings.ensure_dirs()
    trigger = Trigger(settings, store)
    return settings, DicomNode(settings, store, trigger), trigger


def _receive(node: DicomNode, files: list[Path]) -> None:
    for f in files:
        assert node.receive_file(f, calling_ae="PACS").status == STATUS_SUCCESS, f


def test_counts_without_a_profile_wait_then_start_when_one_is_registered(
    make_settings: Any, store: Store, small_phantom: dict
) -> None:
    settings, node, trigger = _node(make_settings, store)
    pid = _patient(small_phantom)
    _receive(node, _phantom_files(small_phantom))
    [out] = trigger.tick(utcnow() + timedelta(seconds=QUIET_S + 2))
    assert out.state == "waiting"
    assert out.reason.startswith(f"waiting: no calibration for camera {PHANTOM_LABEL}"), out.reason
    assert pid not in out.reason
    assert store.list_jobs()[1] == 0

    # another camera's profile changes nothing; registering it looks at the waiting cycle again
    register_profile(store, profile_data("Symbia", manufacturer="SIEMENS NM", model="Symbia T16"), "phys-1")
    assert [o.state for o in trigger.tick(utcnow())] == ["waiting"]
    assert store.list_jobs()[1] == 0

    # two matching profiles: the newest is taken, and the job record says so
    register_profile(store, profile_data("first", sensitivity=4.0), "phys-1")
    newest = register_profile(store, profile_data("second", sensitivity=5.67), "phys-1")
    [started] = trigger.tick(utcnow())
    assert started.state == "started"
    job = store.get_job(started.job_id)
    assert job is not None and job.source == "dicom"
    assert job.spec["calibration"] == {"cps_per_mbq": 5.67, "source": f"camera profile second (id {newest.id})"}
    assert job.camera_profile_id == newest.id
    assert job.camera_match is not None and "newest of 2" in job.camera_match
    row = store.get_trigger_cycle(started.cycle_key)
    assert row is not None and row["state"] == "started" and f"camera profile second (id {newest.id})" in row["reason"]


def test_at_the_deadline_an_uncalibrated_cycle_is_an_error_until_a_profile_arrives(
    make_settings: Any, store: Store, small_phantom: dict
) -> None:
    settings, node, trigger = _node(make_settings, store)
    _receive(node, _phantom_files(small_phantom))
    first = utcnow() + timedelta(seconds=QUIET_S + 2)
    assert [o.state for o in trigger.tick(first)] == ["waiting"]
    later = first + timedelta(hours=49)  # past the 48 h deadline after the cycle was first seen
    [out] = trigger.tick(later)
    assert out.state == "error"
    assert "raw counts" in out.reason and f"no calibration for camera {PHANTOM_LABEL}" in out.reason
    row = store.get_trigger_cycle(out.cycle_key)  # as GET /v1/dicom/cycles shows it
    assert row is not None and row["state"] == "error" and "POST to the API's v1/cameras" in (row["reason"] or "")
    assert store.list_jobs()[1] == 0
    register_profile(store, profile_data(), "phys-1")
    [started] = trigger.tick(later)
    assert started.state == "started"


def test_a_site_calibration_is_kept_and_the_profile_still_named(
    make_settings: Any, store: Store, small_phantom: dict
) -> None:
    site = {"calibration": {"cps_per_mbq": 6.0, "source": "site setting"}}
    settings, node, trigger = _node(make_settings, store, trigger_spec=site)
    p = register_profile(store, profile_data(), "phys-1")
    _receive(node, _phantom_files(small_phantom))
    [started] = trigger.tick(utcnow() + timedelta(seconds=QUIET_S + 2))
    assert started.state == "started"
    job = store.get_job(started.job_id)
    assert job is not None and job.spec["calibration"] == site["calibration"]
    assert job.camera_profile_id == p.id and "kept" in (job.camera_match or "")


@pytest.mark.parametrize(
    "site",
    [{"pvc": "gtm"}, {"pvc": "gtm", "calibration": {"cps_per_mbq": 5.67, "source": "site setting"}}],
    ids=["pvc", "pvc-and-site-calibration"],
)
def test_a_site_pvc_waits_for_the_cameras_profile_and_takes_its_resolution(
    make_settings: Any, store: Store, small_phantom: dict, site: dict[str, Any]
) -> None:
    """trigger_spec {"pvc": "gtm"} is a valid site setting (the profile comes per job); a cycle waits for its
    camera's profile even where the site gives the sensitivity, and its job carries the profile (FWHM for gtm)."""
    settings, node, trigger = _node(make_settings, store, trigger_spec=site)
    _receive(node, _phantom_files(small_phantom))
    [out] = trigger.tick(utcnow() + timedelta(seconds=QUIET_S + 2))
    assert out.state == "waiting" and f"no calibration for camera {PHANTOM_LABEL}" in out.reason, out.reason
    assert store.list_jobs()[1] == 0
    p = register_profile(store, profile_data("Phantom SPECT"), "phys-1")
    [started] = trigger.tick(utcnow())
    assert started.state == "started", started.reason
    job = store.get_job(started.job_id)
    assert job is not None and job.spec["pvc"] == "gtm" and job.camera_profile_id == p.id
    assert job.spec["camera"]["name"] == "Phantom SPECT" and job.spec["camera"]["fwhm_mm"] == 11.0
    assert job.spec["calibration"]["cps_per_mbq"] == 5.67


def test_a_site_pvc_setting_is_checked(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, trigger_spec={"pvc": "rbv"}).trigger_spec == {"pvc": "rbv"}
    with pytest.raises(ValueError, match="pvc 'xx' is not one of none, rc, gtm, rbv"):
        Settings(data_dir=tmp_path, trigger_spec={"pvc": "xx"})


def test_an_invalid_profile_is_refused_naming_the_field(store: Store) -> None:
    with pytest.raises(ServiceError) as e:
        register_profile(store, profile_data(sensitivity=-1.0), "phys-1")
    assert e.value.extra["tag"] == "sensitivity_cps_per_mbq"
    with pytest.raises(ServiceError) as e:  # valid as a profile, not as a job's calibration (at most 100 cps/MBq)
        register_profile(store, profile_data(sensitivity=1000.0), "phys-1")
    assert e.value.extra["tag"] == "sensitivity_cps_per_mbq"
    bad = profile_data()
    del bad["identity"]["model"]
    with pytest.raises(ServiceError) as e:
        register_profile(store, bad, "phys-1")
    assert e.value.extra["tag"] == "identity.model"
    # what a database cannot keep, or keeps cut: a clear refusal naming the field, never a server error
    for bad, tag in (
        (profile_data(name="SPECT\x00 1"), "name"),
        (profile_data(model="Symbia \ud800"), "identity.model"),
        (profile_data(model="x" * 201), "identity.model"),
        (profile_data(name="  "), "name"),
        ({**profile_data(), "nuclide": "L" * 33}, "nuclide"),
        ({**profile_data(), "nuclide": "Y-90"}, "nuclide"),  # no job could use it: voxeldose doses Lu-177
    ):
        with pytest.raises(ServiceError) as e:
            register_profile(store, bad, "phys-1")
        assert e.value.extra["tag"] == tag, (tag, e.value.detail)
    assert store.list_camera_profiles() == []


# --------------------------------------------------------------------------------------------- page
@pytest.fixture
def site(tmp_path: Path) -> Any:
    settings = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0)
    store = Store(settings.database_url)
    store.migrate()
    tokens = {r: store.create_token(f"{r}-1", r) for r in ("submitter", "physicist")}
    client = TestClient(create_app(settings, store), follow_redirects=False)
    yield store, tokens, client
    client.close()
    store.dispose()


def _login(client: TestClient, token: str) -> None:
    client.cookies.clear()
    assert client.post("/login", data={"token": token, "next": "/"}).status_code == 303


def test_cameras_page_lists_uploads_and_retires(site: Any) -> None:
    store, tokens, client = site
    _login(client, tokens["physicist"])
    page = client.get("/cameras")
    assert page.status_code == 200 and 'id="no-cameras"' in page.text and 'id="camera-form"' in page.text

    body = json.dumps(profile_data(EVIL)).encode()
    r = client.post("/cameras", files={"profile": ("camera.json", body, "application/json")})
    assert r.status_code == 303, r.text
    page = client.get(r.headers["location"])
    assert 'class="camera-row"' in page.text and _HEADERS.model in page.text
    assert EVIL not in page.text and "&lt;script&gt;" in page.text  # autoescaped
    [rec] = store.list_camera_profiles()
    assert rec.created_by == "physicist-1"

    bad = json.dumps(profile_data(sensitivity=-1.0)).encode()
    r = client.post("/cameras", files={"profile": ("camera.json", bad, "application/json")})
    assert r.status_code == 422 and "sensitivity_cps_per_mbq" in r.text and 'id="camera-error"' in r.text
    r = client.post("/cameras", files={"profile": ("camera.json", b"{not json", "application/json")})
    assert r.status_code == 400 and 'id="camera-error"' in r.text
    assert len(store.list_camera_profiles()) == 1

    assert client.post(f"/cameras/{rec.id}/retire").status_code == 303
    assert f'data-camera-id="{rec.id}" data-active="false"' in client.get("/cameras").text

    # a submitter sees the list, without the form, and may not change it
    _login(client, tokens["submitter"])
    page = client.get("/cameras")
    assert page.status_code == 200 and 'class="camera-row"' in page.text and 'id="camera-form"' not in page.text
    r = client.post("/cameras", files={"profile": ("camera.json", body, "application/json")})
    assert r.status_code == 403
    assert len(store.list_camera_profiles()) == 1


def test_an_upload_takes_the_profile_unless_it_gives_a_calibration(site: Any, small_phantom: dict) -> None:
    store, tokens, client = site
    root = Path(small_phantom["dicom"])
    files = [
        ("files", (str(p.relative_to(root)), p.read_bytes(), "application/dicom")) for p in sorted(root.rglob("*.dcm"))
    ]
    h = {"Authorization": f"Bearer {tokens['submitter']}"}
    r = client.post("/v1/jobs", files=files, headers=h)
    assert r.status_code == 202, r.text  # answered at once: the files are checked by the job's first stage
    failed = run_first_stage(store, r.json()["id"])
    assert failed.state == "failed" and failed.error is not None and "calibration.cps_per_mbq" in failed.error
    assert f"camera profile registered for camera {PHANTOM_LABEL} and Lu-177" in failed.error
    assert "POST to the API's v1/cameras" in failed.error

    p = register_profile(store, profile_data("P", sensitivity=5.67), "phys-1")
    r = client.post("/v1/jobs", files=files, headers=h)
    assert r.status_code == 202, r.text
    assert run_first_stage(store, r.json()["id"]).state == "queued"
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["spec"]["calibration"] == {"cps_per_mbq": 5.67, "source": f"camera profile P (id {p.id})"}
    assert job["camera_profile_id"] == p.id
    page = client.get(f"/jobs/{job['id']}", headers=h).text  # the job's page names the profile too
    assert f'<dd id="camera-match">camera profile P (id {p.id})</dd>' in page

    given = {"calibration": {"cps_per_mbq": 6.0}}
    r = client.post("/v1/jobs", files=files, data={"spec": json.dumps(given)}, headers=h)
    assert r.status_code == 202, r.text
    assert run_first_stage(store, r.json()["id"]).state == "queued"
    job = client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json()
    assert job["spec"]["calibration"] == {"cps_per_mbq": 6.0, "source": None}
    assert job["camera_profile_id"] == p.id and "kept" in job["camera_match"]


def test_a_spect_that_does_not_name_its_camera_waits_saying_so(
    make_settings: Any, store: Store, small_phantom: dict, tmp_path: Path
) -> None:
    """No Manufacturer (0008,0070) in the SPECT: no profile can match; the reason says what the headers lack."""
    settings, node, trigger = _node(make_settings, store)
    register_profile(store, profile_data(), "phys-1")
    root = Path(small_phantom["dicom"])
    files = []
    for f in _phantom_files(small_phantom):
        ds = pydicom.dcmread(f)
        if ds.Modality == "NM":
            del ds.Manufacturer
        out = tmp_path / "copy" / f.relative_to(root)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    _receive(node, files)
    [out] = trigger.tick(utcnow() + timedelta(seconds=QUIET_S + 2))
    assert out.state == "waiting" and "no calibration for camera (not named by the SPECT" in out.reason, out.reason
    assert "(0008,0070)" in out.reason
    assert store.list_jobs()[1] == 0
