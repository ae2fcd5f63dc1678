"""The PACS round trip with real peers only: Orthanc (Debian package, on loopback) plays the PACS.

Orthanc pushes the synthetic patient's studies to a real ``voxeldose serve`` (its DICOM node) with its REST
API; the job starts by itself (association release → trigger), runs on the service's local Ray, and the RT
Dose, SEG and SR arrive back in Orthanc (C-STORE to the configured destination).  What Orthanc holds is read
back through its REST API and compared with the job's ``summary.json``; the same study pushed again starts
no second job.

The site asks for partial-volume correction (``trigger_spec`` ``{"pvc": "gtm"}``) and gives no calibration: a
physicist has registered the camera's profile (``POST /v1/cameras``; the identity of the phantom SPECT's headers,
the phantom's stated sensitivity and resolution), which the PACS-triggered job takes by itself; the SR in Orthanc
names that profile and states the corrected and uncorrected kidney doses (issue 12).

Orthanc sends the patient in more than one association: it releases the first in the middle of the push to
negotiate the SEG's SOP class (not among DCMTK's common storage classes) and goes on in a new one; one job, on
the complete study, is what a PACS administrator expects (service.trigger: the settle time after a release).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from orthanc import Orthanc, require_orthanc, start_orthanc
from serverproc import ServerProc, auth, create_token, free_port
from support import JOB_WAIT_S, STATE_WAIT_S, wait_for
from test_cameras import profile_data

from voxeldose.sr import measurement_key, sr_measurements, sr_pvc

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

CPS_PER_MBQ = 5.67  # the phantom's camera calibration (truth.json "calibration_cps_per_mbq")
PROFILE = "Phantom SPECT"  # the camera profile the physicist registers
KIDNEYS = ("Kidney_L", "Kidney_R")


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory: pytest.TempPathFactory, small_phantom: dict[str, Any]) -> Iterator[dict[str, Any]]:
    require_orthanc()
    root = tmp_path_factory.mktemp("roundtrip")
    truth = small_phantom["truth"]
    assert truth["calibration_cps_per_mbq"] == CPS_PER_MBQ
    pacs = start_orthanc(root / "orthanc", aet="ORTHANC")
    server = None
    try:
        dicom_port = free_port()
        server = ServerProc(
            root / "data",
            root / "serve.log",
            dicom_port=dicom_port,
            dicom_allowed_aets='["ORTHANC"]',
            dicom_quiet_period_s=30,
            trigger_interval_s=0.5,
            dicom_destination_ae_title="ORTHANC",
            dicom_destination_host="127.0.0.1",
            dicom_destination_port=pacs.dicom_port,
            dicom_send_retry_s=2,
            trigger_spec=json.dumps({"pvc": "gtm"}),  # no calibration: the camera's profile gives it
            ray_num_cpus=2,
        )
        tokens = {"physicist": create_token(server.data_dir, "physicist-rt", "physicist")}
        server.start()
        assert server.dicom_port == dicom_port
        with httpx.Client(base_url=server.base_url, timeout=60, headers=auth(tokens["physicist"])) as c:
            r = c.post("/v1/cameras", json=profile_data(PROFILE, sensitivity=CPS_PER_MBQ))
            assert r.status_code == 201, r.text
            camera = r.json()
        pacs.put_modality("voxeldose", "VOXELDOSE", "127.0.0.1", dicom_port)
        files = sorted(Path(small_phantom["dicom"]).rglob("*.dcm"))
        ids = pacs.upload_many(files)
        assert len(set(ids)) == len(files)
        studies = sorted(pacs.get("/studies"))  # this Orthanc holds only the phantom
        yield {
            "pacs": pacs,
            "server": server,
            "tokens": tokens,
            "files": files,
            "studies": studies,
            "truth": truth,
            "camera": camera,
        }
    finally:
        if server is not None:
            server.stop()
        pacs.stop()


def _client(rt: dict[str, Any]) -> httpx.Client:
    return httpx.Client(base_url=rt["server"].base_url, timeout=60, headers=auth(rt["tokens"]["physicist"]))


def _wait(pred: Any, timeout: float, what: str, server: ServerProc) -> Any:
    return wait_for(pred, timeout_s=timeout, interval_s=0.5, what=what, context=server.log_tail)


def test_orthanc_push_runs_a_job_and_results_arrive_back(
    roundtrip: dict[str, Any], dciodvfy_exe: str, tmp_path: Path
) -> None:
    pacs: Orthanc = roundtrip["pacs"]
    server: ServerProc = roundtrip["server"]
    n_files = len(roundtrip["files"])
    # Orthanc pushes the whole patient (one study per time point) to voxeldose
    answer = pacs.push("voxeldose", roundtrip["studies"])
    assert answer["InstancesCount"] == n_files and answer["FailedInstancesCount"] == 0

    with _client(roundtrip) as c:
        # released association → the trigger looks at once (the 30 s quiet period is not waited for)
        jobs = _wait(lambda: c.get("/v1/jobs").json()["items"], STATE_WAIT_S, "the job to start by itself", server)
        assert len(jobs) == 1
        job = jobs[0]
        assert job["source"] == "dicom" and job["version"] == 1 and job["spec"]["cycle_number"] == 1
        # the camera's registered profile, taken by itself: its calibration and (for the site's gtm) its resolution
        camera = roundtrip["camera"]
        source = f"camera profile {PROFILE} (id {camera['id']})"
        assert job["spec"]["calibration"] == {"cps_per_mbq": CPS_PER_MBQ, "source": source}
        assert job["camera_profile_id"] == camera["id"] and job["spec"]["pvc"] == "gtm"

        def finished() -> dict | None:
            j = c.get(f"/v1/jobs/{job['id']}").json()
            assert j["state"] not in ("failed", "cancelled"), j
            return j if j["state"] == "succeeded" else None

        job = _wait(finished, JOB_WAIT_S, "the job to succeed", server)
        sent = _wait(
            lambda: [d for d in c.get(f"/v1/jobs/{job['id']}").json()["deliveries"] if d["state"] == "sent"],
            STATE_WAIT_S,
            "the results to be sent",
            server,
        )
        assert sent[0]["destination"] == f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
        summary = c.get(f"/v1/jobs/{job['id']}/summary").json()
        rtdose_local = pydicom.dcmread(io.BytesIO(c.get(f"/v1/jobs/{job['id']}/rtdose").content))
        cycles = c.get("/v1/dicom/cycles").json()
        assert [x["state"] for x in cycles] == ["started"] and cycles[0]["job_id"] == job["id"]
        assert cycles[0]["timepoints"] == len(roundtrip["truth"]["timepoints"])  # the whole study, in one job
        page = c.get(f"/jobs/{job['id']}").text  # the physicist's job page says where the results went
        assert f"Sent to ORTHANC@127.0.0.1:{pacs.dicom_port}" in page and "delivery-sent" in page
        assert "the DICOM node · version 1" in page
        metrics = c.get("/metrics").text
        assert 'voxeldose_deliveries{state="sent"} 1.0' in metrics
        assert 'voxeldose_dicom_cycles{state="started"} 1.0' in metrics
        assert f"voxeldose_dicom_instances {float(n_files)}" in metrics

    # what arrived in Orthanc, read through its REST API
    def one(modality: str) -> pydicom.Dataset:
        series = [
            s
            for s in pacs.find("Series", {"Modality": modality})
            if s["MainDicomTags"].get("SeriesDescription", "").startswith("voxeldose")
        ]
        assert len(series) == 1, (modality, series)
        [inst] = series[0]["Instances"]
        return pydicom.dcmread(io.BytesIO(pacs.instance_file(inst)))

    rtdose, seg, sr = one("RTDOSE"), one("SEG"), one("SR")
    # as the PACS holds them: valid IODs (dicom3tools)
    from support import dciodvfy_errors

    for name, ds in (("rtdose", rtdose), ("seg", seg), ("sr", sr)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(dciodvfy_exe, path) == [], name
    assert rtdose.SOPInstanceUID == rtdose_local.SOPInstanceUID and rtdose.DoseUnits == "GY"
    assert rtdose.PixelData == rtdose_local.PixelData
    # every result joins the patient's reference study, and the SEG's segments are the VOIs of the summary
    ct_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in roundtrip["files"]}
    for ds in (rtdose, seg, sr):
        assert ds.StudyInstanceUID in ct_uids and ds.PatientID == rtdose_local.PatientID
    labels = {str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert labels <= set(summary["vois"]) and len(labels) >= len(summary["vois"]) - 1

    measured = sr_measurements(sr)
    assert set(measured) == labels
    key = measurement_key("mean_gy")
    for name in labels:
        want = summary["vois"][name]["mean_gy"]
        got = measured[name][key]
        # DS in the SR holds ≥ 6 significant digits (16 characters); FD is exact
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), name

    # partial-volume correction as the PACS holds it: the SR names the camera profile and states, for each
    # kidney, the corrected mean (the summary's) beside the uncorrected one; spill-out recovered, so corrected > not
    pvc = summary["methods"]["pvc"]
    assert pvc["method"] == "gtm" and pvc["camera_profile"] == PROFILE, pvc
    stated = sr_pvc(sr)
    mean = measurement_key("mean_gy")[1:]
    for kidney in KIDNEYS:
        voi = summary["vois"][kidney]
        assert stated[kidney]["evaluation"] == "PVC-GTM", kidney
        assert f"camera profile: {PROFILE}" in stated[kidney]["parameters"], stated[kidney]
        corrected = {(c, d): v for c, d, v in stated[kidney]["methods"]["PVC-GTM"]}
        uncorrected = {(c, d): v for c, d, v in stated[kidney]["methods"]["PVC-NONE"]}
        assert corrected[mean] == pytest.approx(voi["pvc"]["corrected_mean_gy"], rel=1e-5), kidney
        assert corrected[mean] == pytest.approx(voi["mean_gy"], rel=1e-5), kidney
        assert uncorrected[mean] == pytest.approx(voi["pvc"]["uncorrected_mean_gy"], rel=1e-5), kidney
        assert corrected[mean] > uncorrected[mean], kidney


def test_the_same_study_pushed_again_starts_no_second_job(roundtrip: dict[str, Any]) -> None:
    pacs: Orthanc = roundtrip["pacs"]
    server: ServerProc = roundtrip["server"]
    with _client(roundtrip) as c:
        before = c.get("/v1/dicom/cycles").json()
        assert len(before) == 1, "runs after the first round-trip test"
        answer = pacs.push("voxeldose", roundtrip["studies"])
        assert answer["FailedInstancesCount"] == 0
        # the trigger looked again (release) and found the job of this input set
        _wait(
            lambda: [x for x in c.get("/v1/dicom/cycles").json() if x["evaluated_at"] > before[0]["evaluated_at"]],
            STATE_WAIT_S,
            "the trigger to look again",
            server,
        )
        cycles = c.get("/v1/dicom/cycles").json()
        assert "already has job" in cycles[0]["reason"]
        assert c.get("/v1/jobs").json()["total"] == 1
        # the study now also holds our RT Dose, SEG and SR: received once each, stored, never taken as input
        series = c.get("/v1/dicom/series").json()
        assert sum(s["instances"] for s in series) == len(roundtrip["files"]) + 3  # stored once, no copies
        assert sorted(s["modality"] for s in series if s["instances"] == 1 and s["modality"] in ("RTDOSE", "SR")) == [
            "RTDOSE",
            "SR",
        ]
        assert all(s["conflicts"] == 0 for s in series)
        [job] = c.get("/v1/jobs").json()["items"]
        assert job["version"] == 1 and job["state"] == "succeeded"


def test_an_unknown_calling_ae_is_refused(roundtrip: dict[str, Any]) -> None:
    """Orthanc with a calling AE that voxeldose does not list: the association is refused, nothing stored."""
    from orthanc import OrthancError

    pacs: Orthanc = roundtrip["pacs"]
    server: ServerProc = roundtrip["server"]
    pacs.put_modality("voxeldose-other", "VOXELDOSE", "127.0.0.1", server.dicom_port, LocalAet="STRANGER")
    with _client(roundtrip) as c:
        n = sum(s["instances"] for s in c.get("/v1/dicom/series").json())
        with pytest.raises(OrthancError):
            pacs.push("voxeldose-other", roundtrip["studies"][:1])
        assert sum(s["instances"] for s in c.get("/v1/dicom/series").json()) == n


def _another_patient(files: list[Path], folder: Path, patient_id: str) -> dict[str, list[Path]]:
    """The phantom as another patient: new PatientID and new study/series/SOP/frame-of-reference UIDs,
    by time point (the RTSTRUCT and SEG go with the first, as in the phantom)."""
    from pydicom.uid import generate_uid

    maps: dict[str, str] = {}

    def new(uid: Any) -> str:
        return maps.setdefault(str(uid), generate_uid())

    def walk(ds: Any) -> None:
        for el in ds:
            if el.VR == "SQ":
                for item in el.value:
                    walk(item)
            elif (
                el.VR == "UI"
                and el.value
                and el.keyword
                not in (
                    "SOPClassUID",
                    "ReferencedSOPClassUID",
                    "TransferSyntaxUID",
                    "MediaStorageSOPClassUID",
                    "ImplementationClassUID",
                    "CodingSchemeUID",
                )
            ):
                el.value = new(el.value) if not isinstance(el.value, list) else [new(v) for v in el.value]

    out: dict[str, list[Path]] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID = patient_id
        walk(ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = folder / f"{len(list(folder.iterdir()))}.dcm"
        ds.save_as(p)
        tp = next((part for part in f.parts if part.startswith("tp")), "tp1_004h")
        out.setdefault(tp, []).append(p)
    return out


def test_a_study_pushed_in_two_halves_starts_one_job_after_the_second(
    roundtrip: dict[str, Any], tmp_path: Path
) -> None:
    """Two time points first (the rule asks for three): the cycle waits and says why; the other two later:
    one job, on all four."""
    pacs: Orthanc = roundtrip["pacs"]
    server: ServerProc = roundtrip["server"]
    by_tp = _another_patient(roundtrip["files"], tmp_path / "p2", "VXD-HALVES")

    def studies_of(tps: list[str]) -> list[str]:
        ids = [pacs.upload(p) for tp in tps for p in by_tp[tp]]
        return sorted({pacs.get(f"/instances/{i}/study")["ID"] for i in ids})

    with _client(roundtrip) as c:
        pacs.push("voxeldose", studies_of(["tp1_004h", "tp2_024h"]))
        waiting = wait_for(  # looked at with both time points of the first half indexed
            lambda: c.get("/v1/dicom/cycles", params={"patient_id": "VXD-HALVES"}).json(),
            until=lambda rows: any(x["timepoints"] == 2 for x in rows),
            timeout_s=STATE_WAIT_S,
            interval_s=0.5,
            what="the first half (2 time points) to be looked at",
            context=server.log_tail,
        )
        assert [x["state"] for x in waiting] == ["waiting"] and "2 of 3 SPECT time points" in waiting[0]["reason"]
        assert c.get("/v1/jobs", params={"patient_id": "VXD-HALVES"}).json()["total"] == 0

        pacs.push("voxeldose", studies_of(["tp3_096h", "tp4_168h"]))
        # the trigger commits the job before it records the cycle's state: wait for the cycle's state, then the jobs
        [cycle] = _wait(
            lambda: [
                x
                for x in c.get("/v1/dicom/cycles", params={"patient_id": "VXD-HALVES"}).json()
                if x["state"] == "started" and x["timepoints"] == 4
            ],
            STATE_WAIT_S,
            "the cycle to start with all 4 time points after the second half",
            server,
        )
        jobs = c.get("/v1/jobs", params={"patient_id": "VXD-HALVES"}).json()["items"]
        assert len(jobs) == 1 and jobs[0]["version"] == 1
        assert len(c.get("/v1/dicom/cycles", params={"patient_id": "VXD-HALVES"}).json()) == 1
        assert cycle["job_id"] == jobs[0]["id"]
