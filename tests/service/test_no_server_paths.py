"""Issue 14: what the API tells people about bad input names series and files, never a path on the server.

Cycles are built from several kinds of bad input received through the real DICOM node (``receive_file``) into a
data folder whose name has a space and a non-ASCII letter, the trigger decides on them, and every reason — in the
store and in ``GET /v1/dicom/cycles`` — is checked for the data folder and for any absolute path.  Job errors and
delivery errors go through the same store columns; upload refusals through the intake.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from firststage import run_first_stage
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid
from sqlalchemy import text

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from service.app import create_app
from service.dicom_node import STATUS_SUCCESS, DicomNode
from service.models import utcnow
from service.trigger import Trigger

QUIET_S = 5.0

#: An absolute path as a reader would spot one: a "/" at the start of the text or after a blank, quote, bracket,
#: "=" or ",", followed by a name (independent of the service's own pattern).
ABSOLUTE = re.compile(r"(?:^|[\s'\"(\[=,])/[^\s/]")


def _no_server_path(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text, text
        assert root.name not in text, text  # not even the data folder's own name
    assert not ABSOLUTE.search(text), text


@pytest.fixture
def node_env(make_settings: Callable[..., Any], store: Any, tmp_path: Path) -> Iterator[tuple[Any, DicomNode, Trigger]]:
    settings = make_settings(
        data_dir=tmp_path / "data folder é", dicom_quiet_period_s=QUIET_S, trigger_min_timepoints=3
    )
    settings.ensure_dirs()
    trigger = Trigger(settings, store)
    yield settings, DicomNode(settings, store, trigger), trigger


def _copy(
    files: list[Path], folder: Path, patient_id: str, mutate: Callable[[Any, int], None] | None = None
) -> list[Path]:
    """The files as another patient (new study, series and SOP instance UIDs), each changed by ``mutate(ds, n)``."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series: dict[str, str] = {}
    out = []
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if mutate is not None:
            mutate(ds, n)
        p = folder / f"{n}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def _tp(phantom: dict[str, Any], name: str) -> tuple[list[Path], list[Path]]:
    root = Path(phantom["dicom"]) / name
    return sorted((root / "NM").glob("*.dcm")), sorted((root / "CT").glob("*.dcm"))


def test_cycle_reasons_name_series_never_server_paths(
    node_env: Any, store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    settings, node, trigger = node_env
    nm1, ct1 = _tp(small_phantom, "tp1_004h")
    nm2, ct2 = _tp(small_phantom, "tp2_024h")
    src = tmp_path / "sent"

    def image_type_as_integer(ds: Any, n: int) -> None:
        if ds.Modality == "NM":
            ds.add(DataElement(0x00080008, "US", 7))

    def no_injection(ds: Any, n: int) -> None:
        if ds.Modality == "NM" and "RadiopharmaceuticalInformationSequence" in ds:
            del ds.RadiopharmaceuticalInformationSequence

    def five_position_values(ds: Any, n: int) -> None:
        if ds.Modality == "CT" and n == len(nm1) + 3:
            ds.ImagePositionPatient = [0.0, 0.0, 0.0, 1.0, 2.0]

    nac = generate_uid()

    def second_reconstruction(ds: Any, n: int) -> None:
        if ds.Modality == "NM" and n >= len(nm1) + len(ct1):
            ds.SeriesInstanceUID = nac
            ds.SeriesDescription = "NAC"

    cases = {
        "P-IMAGETYPE": _copy(nm1 + ct1, src / "a", "P-IMAGETYPE", image_type_as_integer),
        "P-NOINJECTION": _copy(nm1 + ct1, src / "b", "P-NOINJECTION", no_injection),
        "P-POSITION": _copy(nm1 + ct1, src / "c", "P-POSITION", five_position_values),
        "P-TWORECON": _copy(nm1 + ct1 + nm1, src / "d", "P-TWORECON", second_reconstruction),
        "P-CTONLY": _copy(ct1 + ct2, src / "e", "P-CTONLY"),
        "P-LATE": _copy(nm1 + ct1 + nm2 + ct2, src / "f", "P-LATE"),  # fine, but waiting for more
    }
    for files in cases.values():
        for f in files:
            assert node.receive_file(f, calling_ae="PACS").status == STATUS_SUCCESS, f
    outcomes = trigger.tick(utcnow() + timedelta(seconds=QUIET_S + 2))
    assert {o.state for o in outcomes} >= {"error", "waiting"}

    rows = store.trigger_cycles()
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    assert set(by_patient) == set(cases)
    for pid in ("P-IMAGETYPE", "P-NOINJECTION", "P-TWORECON", "P-CTONLY"):
        assert any(r["state"] == "error" for r in by_patient[pid]), (pid, by_patient[pid])
    # the reasons say which series: the fuzzed SPECT is named by its SeriesInstanceUID
    fuzzed_series = str(pydicom.dcmread(cases["P-IMAGETYPE"][0], stop_before_pixels=True).SeriesInstanceUID)
    assert any(f"series {fuzzed_series}" in (r["reason"] or "") for r in by_patient["P-IMAGETYPE"])
    for r in rows:
        _no_server_path(r["reason"] or "", settings.data_dir, tmp_path)
    for o in outcomes:
        _no_server_path(o.reason, settings.data_dir, tmp_path)

    # and through the API, as a physicist reads them
    token = store.create_token("physicist-1", "physicist")
    with TestClient(create_app(settings, store)) as client:
        r = client.get("/v1/dicom/cycles", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and len(r.json()) == len(rows)
        for cycle in r.json():
            _no_server_path(cycle["reason"] or "", settings.data_dir, tmp_path)
        # a reason stored by an older version, path and all, is shown without it
        old = f"cannot read {settings.data_dir / 'dicom' / '1.2' / '3.4' / '5.6.dcm'}: truncated"
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE trigger_cycles SET reason = :r WHERE patient_id = 'P-CTONLY'"), {"r": old})
        r = client.get("/v1/dicom/cycles?patient_id=P-CTONLY", headers={"Authorization": f"Bearer {token}"})
        [cycle] = r.json()
        assert cycle["reason"].endswith("5.6.dcm: truncated")
        _no_server_path(cycle["reason"], settings.data_dir, tmp_path)


def test_job_and_delivery_errors_keep_no_server_path(store: Any, tmp_path: Path) -> None:
    """Whatever a worker or the sender reports (an OSError names the file it could not open), the job's
    ``error`` and a delivery's ``last_error`` reach the API without the server's folders."""
    data = tmp_path / "srv data" / "voxeldose"
    job, _ = store.create_job(
        spec={"inputs": [str(data / "incoming" / "u1")]},
        input_dir=str(data / "incoming" / "u1"),
        input_hash="a" * 64,
        patient_id="P1",
        idempotency_key=None,
        submitted_by="alice",
    )
    store.claim_queued(1)
    missing = data / "kernels" / "lu177-soft-tissue.npz"
    store.fail(job.id, f"dose kernel unreadable: [Errno 2] No such file or directory: '{missing}'")
    error = store.get_job(job.id).error
    assert "lu177-soft-tissue.npz" in error
    _no_server_path(error, data)

    store.add_delivery(job.id, "PACS@127.0.0.1:104", utcnow())
    [d] = store.job_deliveries(job.id)
    rtdose = data / "jobs" / job.id / "out" / "rtdose.dcm"
    store.delivery_attempted(
        d["id"],
        ok=False,
        error=f"FileNotFoundError: [Errno 2] No such file or directory: '{rtdose}'",
        now=utcnow(),
        next_attempt_at=None,
    )
    [d] = store.job_deliveries(job.id)
    assert "rtdose.dcm" in d["last_error"]
    _no_server_path(d["last_error"], data)


def test_upload_refusals_name_files_as_uploaded(tmp_path: Path, store: Any, small_phantom: dict) -> None:
    """An upload refused for its files names them as the client sent them (relative), never the temp folder."""
    from service.config import Settings

    settings = Settings(data_dir=tmp_path / "data folder é", min_free_disk_mb=0, database_url=store.url)
    token = store.create_token("submitter-1", "submitter")
    nm, ct = _tp(small_phantom, "tp1_004h")
    bad_ip = pydicom.dcmread(ct[2])
    bad_ip.ImagePositionPatient = [0.0, 1.0]
    no_inj = pydicom.dcmread(nm[0])
    del no_inj.RadiopharmaceuticalInformationSequence
    cases = {"bad-position": (nm, ct[:2] + [bad_ip] + ct[3:]), "no-injection": ([no_inj], ct)}
    with TestClient(create_app(settings, store)) as client:
        for name, (nms, cts) in cases.items():
            parts = []
            for n, item in enumerate(list(nms) + list(cts)):
                if isinstance(item, Path):
                    raw = item.read_bytes()
                else:
                    p = tmp_path / f"{name}-{n}.dcm"
                    item.save_as(p, enforce_file_format=True)
                    raw = p.read_bytes()
                parts.append(("files", (f"{name}/f{n}.dcm", raw, "application/dicom")))
            spec = {"calibration": {"cps_per_mbq": small_phantom["truth"]["calibration_cps_per_mbq"]}}
            r = client.post(
                "/v1/jobs",
                files=parts,
                data={"spec": json.dumps(spec)},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 202, (name, r.text)  # refused by the job's first stage (issue 15)
            job = run_first_stage(store, r.json()["id"])
            assert job.state == "failed" and job.error is not None
            assert f"{name}/f" in job.error, job.error  # the file as uploaded
            body = client.get(f"/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {token}"}).json()
            assert body["error"] == job.error
            _no_server_path(job.error, settings.data_dir, tmp_path)
