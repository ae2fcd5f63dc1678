"""Camera profiles end to end on a real ``voxeldose serve`` (uvicorn, SQLite, local Ray, its DICOM node) with
real peers: an HTTP client and a pynetdicom storage SCU.

The site has no calibration setting.  The phantom's counts SPECT pushed to the node waits for a calibration of
its camera (the synthetic patient's camera_headers: manufacturer, model and serial number); a physicist registers the camera's
profile, the cycle starts by itself and its summary names the profile (``provenance.calibration``); an upload
without a calibration takes the same profile.  The sensitivity registered is the phantom's stated camera
calibration (truth.json), so the jobs are the phantom's calibrated runs.  The site's ``trigger_spec`` asks for
partial-volume correction (``{"pvc": "gtm"}``): the node's job takes the matched profile's resolution too, and its
summary and DICOM SR state the correction with the corrected and uncorrected mean doses (issue 12).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from serverproc import ServerProc, auth, create_token, free_port
from support import JOB_WAIT_S, STATE_WAIT_S, wait_for
from test_cameras import PHANTOM_LABEL, profile_data

from voxeldose.sr import sr_measurements, sr_pvc

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProc, dict[str, str]]]:
    root = tmp_path_factory.mktemp("cameras-e2e")
    srv = ServerProc(
        root / "data",
        root / "serve.log",
        dicom_port=free_port(),
        dicom_allowed_aets='["PACS"]',
        dicom_quiet_period_s=30,
        trigger_interval_s=0.5,
        trigger_spec='{"pvc": "gtm"}',
        ray_num_cpus=2,
    )
    tokens = {r: create_token(srv.data_dir, f"{r}-cam", r) for r in ("submitter", "physicist")}
    srv.start()
    try:
        yield srv, tokens
    finally:
        srv.stop()


def _push(port: int, files: list[Path]) -> None:
    """C-STORE every file in one association, then release it (the trigger looks at once)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    for sop in {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}:
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="VOXELDOSE")
    assert assoc.is_established
    try:
        for f in files:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0, f
    finally:
        assoc.release()


def test_a_registered_profile_calibrates_node_and_upload_jobs(
    server: tuple[ServerProc, dict[str, str]], small_phantom: dict[str, Any]
) -> None:
    srv, tokens = server
    cps = small_phantom["truth"]["calibration_cps_per_mbq"]
    files = sorted(Path(small_phantom["dicom"]).rglob("*.dcm"))
    phys, sub = auth(tokens["physicist"]), auth(tokens["submitter"])
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:

        def wait(probe: Any, what: str, timeout: float = STATE_WAIT_S) -> Any:
            return wait_for(probe, timeout_s=timeout, interval_s=0.5, what=what, context=srv.log_tail)

        # roles and validation: only physicists and admins register; an invalid profile names its field
        body = profile_data("Phantom SPECT", sensitivity=cps)
        assert c.post("/v1/cameras", json=body).status_code == 401
        r = c.post("/v1/cameras", json=body, headers=sub)
        assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
        r = c.post("/v1/cameras", json=profile_data(sensitivity=0.0), headers=phys)
        assert r.status_code == 422 and r.json()["tag"] == "sensitivity_cps_per_mbq", r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        r = c.post("/v1/cameras", content=b"{", headers={**phys, "Content-Type": "application/json"})
        assert r.status_code == 400
        assert c.get("/v1/cameras", headers=sub).json() == []

        # without a profile an upload of counts is refused by its job's first stage (issue 15: answered at once),
        # naming the camera a profile would have to match
        upload = [
            ("files", (str(p.relative_to(small_phantom["dicom"])), p.read_bytes(), "application/dicom")) for p in files
        ]
        r = c.post("/v1/jobs", files=upload, headers=sub)
        assert r.status_code == 202, r.text
        refused = r.json()["id"]

        def failed() -> Any:
            j = c.get(f"/v1/jobs/{refused}", headers=sub).json()
            assert j["state"] in ("queued", "running", "failed"), j
            return j if j["state"] == "failed" else None

        error = wait(failed, "the upload's first stage to refuse it", JOB_WAIT_S)["error"]
        assert "calibration.cps_per_mbq" in error and f"camera profile registered for camera {PHANTOM_LABEL}" in error

        # another camera's profile; then the push: the cycle waits for its own camera's calibration
        other = c.post("/v1/cameras", json=profile_data("Symbia", manufacturer="SIEMENS NM"), headers=phys)
        assert other.status_code == 201, other.text
        assert srv.dicom_port is not None
        _push(srv.dicom_port, files)
        cycles = wait(
            lambda: [x for x in c.get("/v1/dicom/cycles", headers=phys).json() if x["state"] == "waiting"],
            "the cycle to wait for a calibration",
        )
        assert cycles[0]["reason"].startswith(f"waiting: no calibration for camera {PHANTOM_LABEL}"), cycles
        pid = str(pydicom.dcmread(Path(small_phantom["dicom"]) / "RTSTRUCT.dcm", stop_before_pixels=True).PatientID)
        assert pid not in cycles[0]["reason"]
        assert [j["id"] for j in c.get("/v1/jobs", headers=phys).json()["items"]] == [refused]

        # the physicist registers the camera's profile: the cycle starts by itself, calibrated by it
        r = c.post("/v1/cameras", json=body, headers=phys)
        assert r.status_code == 201 and r.headers["location"] == f"/v1/cameras/{r.json()['id']}", r.text
        cam = r.json()
        assert cam["active"] and cam["camera"] == PHANTOM_LABEL and cam["created_by"] == "physicist-cam"
        source = f"camera profile Phantom SPECT (id {cam['id']})"
        jobs = wait(
            lambda: [j for j in c.get("/v1/jobs", headers=phys).json()["items"] if j["source"] == "dicom"],
            "the node's job to start",
        )
        assert len(jobs) == 1 and jobs[0]["source"] == "dicom"
        assert jobs[0]["spec"]["calibration"] == {"cps_per_mbq": cps, "source": source}
        assert jobs[0]["camera_profile_id"] == cam["id"] and jobs[0]["camera_match"] == source

        # an upload without a calibration takes the same profile
        r = c.post("/v1/jobs", files=upload, headers=sub)
        assert r.status_code == 202, r.text

        def checked() -> Any:  # the first stage chose the profile
            j = c.get(f"/v1/jobs/{r.json()['id']}", headers=sub).json()
            assert j["state"] in ("queued", "running"), j
            return j if j["camera_profile_id"] is not None else None

        up = wait(checked, "the upload's first stage to take the profile", JOB_WAIT_S)
        assert up["spec"]["calibration"] == {"cps_per_mbq": cps, "source": source}
        assert up["camera_profile_id"] == cam["id"]
        # (the same pipeline as the node's job: cancelled, to keep the suite's time)
        assert c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=phys).status_code in (200, 202)

        def finished() -> Any:
            j = c.get(f"/v1/jobs/{jobs[0]['id']}", headers=phys).json()
            assert j["state"] not in ("failed", "cancelled"), j
            return j["state"] == "succeeded"

        wait(finished, "the node's job to succeed", JOB_WAIT_S)
        summary = c.get(f"/v1/jobs/{jobs[0]['id']}/summary", headers=phys).json()
        cal = summary["provenance"]["calibration"]
        assert cal == {"cps_per_mbq": cps, "source": source, "applied": True}, cal
        # the site's trigger_spec asked for gtm: corrected with the matched profile, stated in summary and SR
        pvc = summary["methods"]["pvc"]
        assert pvc["method"] == "gtm" and pvc["camera_profile"] == "Phantom SPECT", pvc
        assert pvc["fwhm_mm"] == body["fwhm_mm"], pvc
        sr = pydicom.dcmread(srv.data_dir / "jobs" / jobs[0]["id"] / "out" / "sr.dcm")
        stated, plain = sr_pvc(sr), sr_measurements(sr)
        mean_key = ("128513", "373098007")  # Absorbed Dose (DCM), derivation Mean (SCT)
        for kidney in ("Kidney_L", "Kidney_R"):
            voi = summary["vois"][kidney]
            assert voi["pvc"]["method"] == "gtm"
            assert voi["pvc"]["corrected_mean_gy"] > voi["pvc"]["uncorrected_mean_gy"]  # spill-out recovered
            assert stated[kidney]["evaluation"] == "PVC-GTM"
            corrected = {(c, d): v for c, d, v in stated[kidney]["methods"]["PVC-GTM"]}
            uncorrected = {(c, d): v for c, d, v in stated[kidney]["methods"]["PVC-NONE"]}
            assert corrected[mean_key] == pytest.approx(voi["mean_gy"], rel=1e-9)
            assert uncorrected[mean_key] == pytest.approx(voi["pvc"]["uncorrected_mean_gy"], rel=1e-9)
            assert plain[kidney][("DCM", *mean_key)] == pytest.approx(voi["mean_gy"], rel=1e-9)

        # retiring keeps the profile (the jobs name it); a submitter may not retire
        assert c.post(f"/v1/cameras/{cam['id']}/retire", headers=sub).status_code == 403
        r = c.post(f"/v1/cameras/{cam['id']}/retire", headers=phys)
        assert r.status_code == 200 and r.json()["active"] is False and r.json()["retired_by"] == "physicist-cam"
        listed = c.get("/v1/cameras", headers=sub).json()
        assert {x["id"] for x in listed} == {cam["id"], other.json()["id"]}
        assert [x["id"] for x in c.get("/v1/cameras?active=true", headers=sub).json()] == [other.json()["id"]]
        assert c.get("/v1/cameras/99999", headers=sub).status_code == 404
        assert c.get(f"/v1/jobs/{jobs[0]['id']}", headers=phys).json()["camera_profile_id"] == cam["id"]
