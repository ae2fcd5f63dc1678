"""The HTTP API against the real Store on SQLite (tmp_path) with no dispatcher: jobs stay queued unless a test
moves them on through the store, as the dispatcher would."""

from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import zipfile
from pathlib import Path
from urllib.parse import quote

import pydicom
import pytest
from firststage import run_first_stage

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.store import JobRecord, Store
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs

PROBLEM = "application/problem+json"


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    """The small synthetic patient, and one real pipeline result for it (≈ 10 s, once per module)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root, PhantomSettings.small())
    truth = json.loads((root / "truth" / "truth.json").read_text())
    spec = {"calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}}
    out = root / "result"
    write_outputs(run({"inputs": [str(root / "dicom")], **spec}), out)
    dicom = root / "dicom"
    files = sorted(dicom.rglob("*.dcm"))
    return {
        "root": root,
        "dicom": dicom,
        "files": files,
        "spec": spec,
        "result": out,
        "patient_id": PhantomSettings.small().patient_id,
    }


class Env:
    def __init__(self, tmp_path: Path, **overrides) -> None:
        self.settings = Settings(data_dir=tmp_path / "data", **{"min_free_disk_mb": 0, **overrides})
        self.store = Store(self.settings.database_url)
        self.store.migrate()
        self.tokens = {r: self.store.create_token(f"{r}-1", r) for r in ("submitter", "physicist", "admin")}
        self.tokens["submitter2"] = self.store.create_token("submitter-2", "submitter")
        self.app = create_app(self.settings, self.store)
        self.client = TestClient(self.app)

    def h(self, role: str = "physicist", **extra) -> dict:
        return {"Authorization": f"Bearer {self.tokens[role]}", **extra}

    @property
    def incoming(self) -> Path:
        return self.settings.data_dir / "incoming"

    def incoming_entries(self) -> list[str]:
        return sorted(p.name for p in self.incoming.iterdir()) if self.incoming.exists() else []


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    yield e
    e.client.close()
    e.store.dispose()


def multipart(files: list[Path], root: Path, spec: dict | None = None):
    parts = [("files", (str(p.relative_to(root)), p.read_bytes(), "application/dicom")) for p in files]
    data = {"spec": json.dumps(spec)} if spec is not None else None
    return parts, data


def submit(env: Env, phantom: dict, role: str = "submitter", spec: dict | None = None, **headers):
    files, data = multipart(phantom["files"], phantom["dicom"], phantom["spec"] if spec is None else spec)
    return env.client.post("/v1/jobs", files=files, data=data, headers=env.h(role, **headers))


def assert_problem(r, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    assert body["status"] == status
    assert "Traceback" not in r.text
    for n in needles:
        assert n.lower() in body["detail"].lower(), body["detail"]
    return body


def finish_job(env: Env, job_id: str, result: Path) -> Path:
    """Move a queued job to succeeded with a copy of a real result folder, through the store as the dispatcher
    does (claim → the first stage → finish)."""
    assert first_stage(env, job_id).state == "queued"
    claimed = env.store.claim_queued(10)
    assert job_id in [j.id for j in claimed]
    out = env.settings.data_dir / "jobs" / job_id / "out"
    shutil.copytree(result, out)
    env.store.finish(job_id, str(out), None)
    for j in claimed:  # the others go back
        if j.id != job_id:
            env.store.requeue(j.id, "test", count_attempt=False)
    return out


def first_stage(env: Env, job_id: str) -> JobRecord:
    """The job's first stage (issue 15: an upload's files unpacked and checked) as the worker runs it, its outcome
    recorded as the dispatcher records it (:func:`firststage.run_first_stage`)."""
    return run_first_stage(env.store, job_id)


def assert_fails_at_first_stage(env: Env, r, *needles: str) -> str:
    """An upload answered 202 at once whose first stage fails with a message naming ``needles`` (today's 422
    detail) — no server path in it, and the upload kept under the data folder."""
    assert r.status_code == 202, r.text
    job = first_stage(env, r.json()["id"])
    assert job.state == "failed" and job.error is not None
    for n in needles:
        assert n.lower() in job.error.lower(), job.error
    assert str(env.settings.data_dir) not in job.error and "Traceback" not in job.error
    assert Path(job.input_dir).is_dir() and any(Path(job.input_dir).iterdir())  # nothing received is lost
    got = env.client.get(f"/v1/jobs/{job.id}", headers=env.h("admin")).json()
    assert got["state"] == "failed" and got["error"] == job.error
    return job.error


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- submission
def test_upload_is_queued_with_location(env: Env, phantom: dict) -> None:
    r = submit(env, phantom)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued"
    assert job["submitted_by"] == "submitter-1"
    assert job["spec"]["calibration"]["cps_per_mbq"] == phantom["spec"]["calibration"]["cps_per_mbq"]
    assert "inputs" not in job["spec"] and "input_dir" not in job
    assert len(job["input_hash"]) == 64
    # the files landed whole in incoming/<upload-id>/, no temp folder left
    entries = env.incoming_entries()
    assert len(entries) == 1 and not entries[0].startswith(".tmp")
    rec = env.store.get_job(job["id"])
    assert Path(rec.input_dir) == env.incoming / entries[0]
    assert len(list(Path(rec.input_dir).rglob("*.dcm"))) == len(phantom["files"])
    r = env.client.get(r.headers["location"], headers=env.h("submitter"))
    assert r.status_code == 200 and r.json()["state"] == "queued"
    # the first stage reads the files: the patient, and the input hash the pipeline records in provenance
    assert first_stage(env, job["id"]).state == "queued"
    job = env.client.get(f"/v1/jobs/{job['id']}", headers=env.h("submitter")).json()
    assert job["patient_id"] == phantom["patient_id"]
    summary = json.loads((phantom["result"] / "summary.json").read_text())
    assert job["input_hash"] == summary["provenance"]["inputs"]["sop_instance_uids_sha256"]


def test_idempotency_key_returns_the_same_job(env: Env, phantom: dict) -> None:
    """The same key with the same request (the same files, in another order and under other names, and the same
    spec JSON however spelled) is the first job: 200, same id and Location, the repeat's files not kept."""
    r1 = submit(env, phantom, **{"Idempotency-Key": "k-123"})
    assert r1.status_code == 202
    files = [
        ("files", (f"renamed-{n}.dcm", p.read_bytes(), "application/dicom"))
        for n, p in enumerate(reversed(phantom["files"]))
    ]
    spec_text = json.dumps(phantom["spec"], indent=3)  # the same JSON, spelled differently
    r2 = env.client.post(
        "/v1/jobs", files=files, data={"spec": spec_text}, headers=env.h("submitter", **{"Idempotency-Key": "k-123"})
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["id"] == r1.json()["id"] and r2.headers["location"] == r1.headers["location"]
    assert len(env.incoming_entries()) == 1  # the repeat's files were not kept
    assert env.store.list_jobs()[1] == 1


def test_idempotency_key_with_another_request_is_a_422(env: Env, phantom: dict) -> None:
    """Issue 14: a key reused with another body is refused as the IETF draft "The Idempotency-Key HTTP Header
    Field" says (422, problem+json naming the conflict), not answered with the first job."""
    r1 = submit(env, phantom, **{"Idempotency-Key": "k-123"})
    assert r1.status_code == 202
    first = r1.json()["id"]
    other_spec = {**phantom["spec"], "fit": {"model": "monoexp"}}  # another spec
    body = assert_problem(submit(env, phantom, spec=other_spec, **{"Idempotency-Key": "k-123"}), 422, "k-123", first)
    assert body["type"].endswith("idempotency-key-reused") and body["job_id"] == first
    files, data = multipart(phantom["files"][1:], phantom["dicom"], phantom["spec"])  # other files, same spec
    r = env.client.post("/v1/jobs", files=files, data=data, headers=env.h("submitter", **{"Idempotency-Key": "k-123"}))
    assert_problem(r, 422, "k-123")
    assert env.store.list_jobs()[1] == 1 and len(env.incoming_entries()) == 1  # nothing created, nothing left
    # the first request again still gets its job
    again = submit(env, phantom, **{"Idempotency-Key": "k-123"})
    assert again.status_code == 200 and again.json()["id"] == first


def _received_series(env: Env, phantom: dict) -> list[str]:
    """Receive the phantom through the app's DICOM node; its SeriesInstanceUIDs."""
    from service.dicom_node import STATUS_SUCCESS

    node = env.app.state.dicom_node
    for f in phantom["files"]:
        assert node.receive_file(f, calling_ae="PACS").status == STATUS_SUCCESS
    return sorted({str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in phantom["files"]})


def test_idempotency_key_on_named_series_compares_canonical_json(env: Env, phantom: dict) -> None:
    series = _received_series(env, phantom)
    key = {"Idempotency-Key": "series-1"}
    body = {"series_instance_uids": series, "spec": phantom["spec"]}
    r1 = env.client.post("/v1/jobs", json=body, headers=env.h(**key))
    assert r1.status_code == 202, r1.text
    # the same JSON with the members in another order and other spacing: the same request
    same = json.dumps({"spec": phantom["spec"], "series_instance_uids": series}, indent=2).encode()
    r2 = env.client.post("/v1/jobs", content=same, headers=env.h(**key, **{"Content-Type": "application/json"}))
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]
    # another spec under the same key: refused, nothing created
    other = {"series_instance_uids": series, "spec": {**phantom["spec"], "fit": {"model": "monoexp"}}}
    assert_problem(env.client.post("/v1/jobs", json=other, headers=env.h(**key)), 422, "series-1")
    assert env.store.list_jobs()[1] == 1
    # the same key on an upload is another request too
    assert_problem(submit(env, phantom, "physicist", **key), 422, "series-1")


def test_another_submitters_key_or_input_set_is_never_revealed(env: Env, phantom: dict) -> None:
    """Issue 14: a submitter reusing another submitter's Idempotency-Key, or uploading another submitter's input
    set, is answered as if nobody had: a job of its own, 202, like a key nobody used — never the other's job, a
    409, or any hint that it exists."""
    mine = submit(env, phantom, "submitter", **{"Idempotency-Key": "shared-key"})
    assert mine.status_code == 202
    reused = submit(env, phantom, "submitter2", **{"Idempotency-Key": "shared-key"})  # submitter-1's key and files
    other_spec = {**phantom["spec"], "fit": {"model": "monoexp"}}
    fresh = submit(env, phantom, "submitter2", spec=other_spec, **{"Idempotency-Key": "fresh-key"})  # nobody's key
    for r in (reused, fresh):
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["submitted_by"] == "submitter-2" and job["id"] != mine.json()["id"]
        assert set(job) == set(mine.json()) and r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert reused.json()["id"] != fresh.json()["id"]
    # the same input set without a key: each submitter's own job
    assert submit(env, phantom, "submitter2").json()["id"] == reused.json()["id"]
    assert submit(env, phantom, "submitter").json()["id"] == mine.json()["id"]
    # a physicist reads every job: its repeat of the input set is an existing job
    r = submit(env, phantom, "physicist")
    assert r.status_code == 200 and r.json()["id"] in (mine.json()["id"], reused.json()["id"])
    assert env.store.list_jobs()[1] == 3


def test_same_upload_twice_is_the_same_job(env: Env, phantom: dict) -> None:
    r1, r2 = submit(env, phantom), submit(env, phantom)
    assert (r1.status_code, r2.status_code) == (202, 200)
    assert r1.json()["id"] == r2.json()["id"]
    assert len(env.incoming_entries()) == 1
    # a different spec on the same files is a different job
    r3 = submit(env, phantom, spec={**phantom["spec"], "dose": {"method": "led"}})
    assert r3.status_code == 202 and r3.json()["id"] != r1.json()["id"]


def test_same_instances_in_other_bytes_are_the_same_input_set_at_the_first_stage(env: Env, phantom: dict) -> None:
    """Issue 15: an upload is answered before its files are read, so "the same input set" (the same DICOM
    instances, whatever the bytes: a .zip or loose files) is applied by the job's first stage — within a
    submitter's own jobs; a physicist's upload against anyone's."""
    z = zip_bytes({str(p.relative_to(phantom["root"])): p.read_bytes() for p in phantom["files"]})
    zipped = env.client.post(
        "/v1/jobs",
        files=[("files", ("study.zip", z, "application/zip"))],
        data={"spec": json.dumps(phantom["spec"])},
        headers=env.h("submitter"),
    )
    assert zipped.status_code == 202, zipped.text
    assert first_stage(env, zipped.json()["id"]).state == "queued"
    loose = submit(env, phantom, "submitter")  # other bytes: a job of its own at once
    assert loose.status_code == 202 and loose.json()["id"] != zipped.json()["id"]
    assert_fails_at_first_stage(env, loose, "same input set", zipped.json()["id"])
    other = submit(env, phantom, "submitter2")  # another submitter: never told of the first job
    assert other.status_code == 202 and first_stage(env, other.json()["id"]).state == "queued"
    # a physicist's upload of the same instances (in another archive) is anyone's earlier job: the oldest
    z2 = zip_bytes({f"x/{n}.dcm": p.read_bytes() for n, p in enumerate(phantom["files"])} | {"README.txt": b"x"})
    r = env.client.post(
        "/v1/jobs",
        files=[("files", ("again.zip", z2, "application/zip"))],
        data={"spec": json.dumps(phantom["spec"])},
        headers=env.h("physicist"),
    )
    assert_fails_at_first_stage(env, r, "same input set", zipped.json()["id"])


def test_zip_upload(env: Env, phantom: dict) -> None:
    z = zip_bytes(
        {str(p.relative_to(phantom["root"])): p.read_bytes() for p in phantom["files"]} | {"README.txt": b"notes"}
    )
    r = env.client.post(
        "/v1/jobs",
        files=[("files", ("study.zip", z, "application/zip"))],
        data={"spec": json.dumps(phantom["spec"])},
        headers=env.h(),
    )
    assert r.status_code == 202, r.text
    (entry,) = env.incoming_entries()
    assert (env.incoming / entry / "study.zip").is_file()  # on disk as sent; unpacked by the job's first stage
    assert first_stage(env, r.json()["id"]).state == "queued"
    assert not (env.incoming / entry / "study.zip").exists()
    assert len(list((env.incoming / entry).rglob("*.dcm"))) == len(phantom["files"])


@pytest.mark.parametrize("evil", ["../evil.dcm", "/etc/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"])
def test_zip_with_unsafe_member_is_refused(env: Env, phantom: dict, evil: str) -> None:
    z = zip_bytes({str(phantom["files"][0].relative_to(phantom["root"])): phantom["files"][0].read_bytes(), evil: b"x"})
    r = env.client.post("/v1/jobs", files=[("files", ("s.zip", z, "application/zip"))], headers=env.h())
    assert_fails_at_first_stage(env, r, "unsafe member path")
    assert (
        not (env.settings.data_dir / "evil.dcm").exists() and not (env.settings.data_dir.parent / "evil.dcm").exists()
    )


def test_zip_bomb_is_refused_by_uncompressed_size(tmp_path: Path) -> None:
    env = Env(tmp_path, max_upload_mb=1)
    z = zip_bytes({"a.dcm": b"\0" * (3 * 1024 * 1024)})  # 3 MB of zeros compress to a few kB
    assert len(z) < 100_000
    r = env.client.post("/v1/jobs", files=[("files", ("bomb.zip", z, "application/zip"))], headers=env.h())
    assert_fails_at_first_stage(env, r, "bomb.zip would expand to", "max_upload_mb")
    (entry,) = env.incoming_entries()
    assert sum(f.stat().st_size for f in (env.incoming / entry).rglob("*") if f.is_file()) < 1024 * 1024


def test_truncated_zip(env: Env, phantom: dict) -> None:
    z = zip_bytes({p.name: p.read_bytes() for p in phantom["files"][:3]})
    r = env.client.post("/v1/jobs", files=[("files", ("s.zip", z[: len(z) // 2], "application/zip"))], headers=env.h())
    assert_fails_at_first_stage(env, r, "s.zip", "not a readable zip archive")


def test_random_bytes_are_refused_with_a_message(env: Env) -> None:
    r = env.client.post(
        "/v1/jobs", files=[("files", ("scan.dcm", b"\x13\x37" * 500, "application/dicom"))], headers=env.h("submitter")
    )
    assert_fails_at_first_stage(env, r, "scan.dcm", "not a DICOM file")  # the upload's file, not a server path


def _upload_with_rtstruct(env: Env, phantom: dict, rtstruct: bytes):
    parts = []
    for p in phantom["files"]:
        rel = str(p.relative_to(phantom["dicom"]))
        parts.append(("files", (rel, rtstruct if rel == "RTSTRUCT.dcm" else p.read_bytes(), "application/dicom")))
    return env.client.post("/v1/jobs", files=parts, data={"spec": json.dumps(phantom["spec"])}, headers=env.h())


@pytest.mark.parametrize("cut", [10, 1000])
def test_truncated_rtstruct_fails_the_first_stage(env: Env, phantom: dict, cut: int) -> None:
    """Issue 14, defect 9: a structure set cut short (its last contours or observations missing) was accepted and
    the job failed later as an internal error."""
    data = (phantom["dicom"] / "RTSTRUCT.dcm").read_bytes()
    assert_fails_at_first_stage(env, _upload_with_rtstruct(env, phantom, data[:-cut]), "RTSTRUCT.dcm", "truncated")


def test_rtstruct_contour_without_data_fails_the_first_stage(env: Env, phantom: dict) -> None:
    ds = pydicom.dcmread(phantom["dicom"] / "RTSTRUCT.dcm")
    del ds.ROIContourSequence[-1].ContourSequence[-1].ContourData  # a whole file, but an incomplete item
    buf = io.BytesIO()
    ds.save_as(buf)
    r = _upload_with_rtstruct(env, phantom, buf.getvalue())
    assert_fails_at_first_stage(env, r, "RTSTRUCT.dcm", "ContourData (3006,0050)")


def test_mixed_patients_are_refused(env: Env, phantom: dict) -> None:
    parts = []
    for p in phantom["files"]:
        rel = str(p.relative_to(phantom["dicom"]))
        data = p.read_bytes()
        if rel.startswith("tp4_168h/"):
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.PatientID = "SOMEONE-ELSE"
            buf = io.BytesIO()
            ds.save_as(buf)
            data = buf.getvalue()
        parts.append(("files", (rel, data, "application/dicom")))
    r = env.client.post("/v1/jobs", files=parts, data={"spec": json.dumps(phantom["spec"])}, headers=env.h())
    assert_fails_at_first_stage(env, r, "mixed patients", "SOMEONE-ELSE")


def test_no_spect_is_refused(env: Env, phantom: dict) -> None:
    cts = [p for p in phantom["files"] if "/CT/" in str(p)][:20]
    files, data = multipart(cts, phantom["dicom"], phantom["spec"])
    r = env.client.post("/v1/jobs", files=files, data=data, headers=env.h())
    assert_fails_at_first_stage(env, r, "no reconstructed SPECT")


def test_counts_without_calibration_fail_the_first_stage(env: Env, phantom: dict) -> None:
    assert_fails_at_first_stage(env, submit(env, phantom, spec={}), "raw counts", "calibration.cps_per_mbq")


def test_a_camera_profile_calibrates_an_upload(env: Env, phantom: dict) -> None:
    """A job with the camera's profile and no calibration.cps_per_mbq (issue 12): the profile's sensitivity
    calibrates the counts, so the upload is queued, with its partial-volume correction."""
    camera = {
        "schema": "voxeldose.camera/1",
        "name": "SPECT 1",
        "identity": {"manufacturer": "voxeldose", "model": "phantom"},
        "nuclide": "Lu-177",
        "sensitivity_cps_per_mbq": phantom["spec"]["calibration"]["cps_per_mbq"],
        "sensitivity_u_cps_per_mbq": 0.1,
        "fwhm_mm": 11.0,
        "measured": "2026-01-01",
        "source": "test",
    }
    r = submit(env, phantom, spec={"camera": camera, "pvc": "gtm"})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["pvc"] == "gtm" and r.json()["spec"]["camera"]["name"] == "SPECT 1"


def test_invalid_spec_is_a_readable_422(env: Env, phantom: dict) -> None:
    body = assert_problem(submit(env, phantom, spec={"dose": {"method": "magic"}, "bogus": 1}), 422)
    assert "dose.method" in body["detail"] and "bogus" in body["detail"]
    assert body["title"] == "Invalid job description"
    files, _ = multipart(phantom["files"][:1], phantom["dicom"])
    r = env.client.post("/v1/jobs", files=files, data={"spec": "{not json"}, headers=env.h())
    assert_problem(r, 422, "not valid JSON")
    r = env.client.post("/v1/jobs", files=files, data={"spec": json.dumps({"inputs": ["/etc"]})}, headers=env.h())
    assert_problem(r, 422, "must not name 'inputs'")
    # a number Python's json will not convert (more than 4300 digits): a 422 too, not a 500
    huge = '{"dose": {"kernel_size": 1' + "0" * 5000 + "}}"
    for key in (None, "huge-1"):  # with a key the body is fingerprinted as well
        headers = env.h() if key is None else env.h(**{"Idempotency-Key": key})
        assert_problem(env.client.post("/v1/jobs", files=files, data={"spec": huge}, headers=headers), 422, "spec")
        body = b'{"series_instance_uids": ["1.2.3"], "spec": ' + huge.encode() + b"}"
        headers["Content-Type"] = "application/json"
        assert env.client.post("/v1/jobs", content=body, headers=headers).status_code in (400, 422)
    assert env.incoming_entries() == []


def assert_no_job(env: Env) -> None:
    """Nothing entered the store or the incoming folder, and the job list still answers."""
    r = env.client.get("/v1/jobs", headers=env.h("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["total"] == 0 and r.json()["items"] == []
    assert env.incoming_entries() == []


def post_spec_text(env: Env, phantom: dict, spec_text: str):
    """An upload of the phantom with the ``spec`` field sent as this exact text."""
    files, _ = multipart(phantom["files"], phantom["dicom"])
    return env.client.post("/v1/jobs", files=files, data={"spec": spec_text}, headers=env.h("submitter"))


@pytest.mark.parametrize(
    ("spec_text", "field"),
    [
        ('{"calibration": {"cps_per_mbq": 5.67, "source": "\\ud800"}}', "calibration.source"),
        (
            '{"calibration": {"cps_per_mbq": 5.67}, '
            '"earlier_cycles": [{"number": 1, "activity_mbq": 7400, "date": "\\ud800"}]}',
            "earlier_cycles.0.date",
        ),
        ('{"calibration": {"cps_per_mbq": 5.67}, "roles": {"\\udfffkidney": "kidney"}}', "roles."),
    ],
)
def test_a_lone_surrogate_in_the_spec_is_a_422_and_stores_nothing(
    env: Env, phantom: dict, spec_text: str, field: str
) -> None:
    """Issue 14 defect 1: such a job was created, and every job list then answered 500."""
    body = assert_problem(post_spec_text(env, phantom, spec_text), 422, field, "UTF-8")
    assert body["title"] == "Invalid job description"
    assert_no_job(env)
    # the JSON body of a job on received series (physicists and admins): its parser refuses the escape itself
    r = env.client.post(
        "/v1/jobs",
        content=b'{"series_instance_uids": ["1.2.3"], "spec": ' + spec_text.encode() + b"}",
        headers=env.h("physicist", **{"Content-Type": "application/json"}),
    )
    assert_problem(r, 422)
    assert_no_job(env)


def test_deeply_nested_spec_is_a_422_on_every_path(env: Env, phantom: dict) -> None:
    """Issue 14 defect 4: 100 000 nested brackets made json.loads raise RecursionError (500)."""
    bomb = "[" * 100_000 + "]" * 100_000
    assert_problem(post_spec_text(env, phantom, bomb), 422, "nested too deeply")
    assert_problem(post_spec_text(env, phantom, '{"calibration": ' + bomb + "}"), 422, "nested too deeply")
    assert_no_job(env)
    body = '{"series_instance_uids": ["1.2.3"], "spec": {"calibration": ' + bomb + "}}"
    r = env.client.post("/v1/jobs", content=body, headers=env.h("physicist", **{"Content-Type": "application/json"}))
    assert_problem(r, 422, "nested too deeply")
    assert_no_job(env)
    # the upload page
    r = env.client.post("/login", data={"token": env.tokens["submitter"], "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    files, _ = multipart(phantom["files"], phantom["dicom"])
    r = env.client.post("/submit", files=files, data={"spec": bomb})
    assert r.status_code == 422 and "nested too deeply" in r.text
    assert_no_job(env)


@pytest.mark.parametrize(
    ("spec_text", "needles"),
    [
        # true was stored as 1.0 cps/MBq: a kidney dose 5.7 times too high
        ('{"calibration": {"cps_per_mbq": true}}', ("calibration.cps_per_mbq", "valid number")),
        ('{"calibration": {"cps_per_mbq": "5.67"}}', ("calibration.cps_per_mbq", "valid number")),
        ('{"calibration": {"cps_per_mbq": Infinity}}', ("calibration.cps_per_mbq", "finite")),
        ('{"calibration": {"cps_per_mbq": NaN}}', ("calibration.cps_per_mbq", "finite")),
        ('{"calibration": {"cps_per_mbq": 5.67}, "dose": {"kernel_size": 1000001}}', ("dose.kernel_size",)),
        ('{"calibration": {"cps_per_mbq": 5.67}, "injection": {"activity_mbq": 7400000}}', ("activity_mbq",)),
    ],
)
def test_values_that_would_give_a_wrong_dose_are_refused_at_submission(
    env: Env, phantom: dict, spec_text: str, needles: tuple[str, ...]
) -> None:
    """Issue 14 defect 6: these passed validation and gave a wrong dose marked succeeded (or an internal error)."""
    assert_problem(post_spec_text(env, phantom, spec_text), 422, *needles)
    assert_no_job(env)


def test_an_injection_years_before_the_scans_fails_the_first_stage(env: Env, phantom: dict) -> None:
    """Injection 0001-01-01: scans 17.7 million hours later, a kidney of 367 607 Gy marked succeeded.  Lu-177
    (T½ 6.65 d) leaves < 0.2 % after 60 days: no scan is that late."""
    spec = {**phantom["spec"], "injection": {"datetime": "0001-01-01T00:00:00"}}
    assert_fails_at_first_stage(
        env, submit(env, phantom, spec=spec), "days after the injection", "injection.datetime", "60 days"
    )


def test_upload_over_max_upload_mb_is_413(tmp_path: Path, phantom: dict) -> None:
    env = Env(tmp_path, max_upload_mb=1)
    assert_problem(submit(env, phantom), 413, "max_upload_mb")
    # without Content-Length (chunked): the limit holds while streaming
    files, data = multipart(phantom["files"], phantom["dicom"], phantom["spec"])
    import httpx

    req = httpx.Request("POST", "http://x/v1/jobs", files=files, data=data)
    body = req.read()
    ctype = req.headers["content-type"]

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = env.client.post("/v1/jobs", content=chunks(), headers=env.h(**{"Content-Type": ctype}))
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_problem(r, 413, "max_upload_mb")
    assert env.incoming_entries() == []


def test_insufficient_disk_is_507(tmp_path: Path, phantom: dict) -> None:
    env = Env(tmp_path, min_free_disk_mb=10**12)
    assert_problem(submit(env, phantom), 507, "min_free_disk_mb")
    assert env.incoming_entries() == []


def test_json_body_naming_received_series(env: Env, phantom: dict) -> None:
    """A job on series the DICOM node received: the same checks and the same input fingerprint as an upload."""
    from voxeldose.ingest import load_cycle, scan
    from voxeldose.pipeline import input_fingerprint

    series = _received_series(env, phantom)
    body = {"series_instance_uids": series, "spec": phantom["spec"]}
    r = env.client.post("/v1/jobs", json=body, headers=env.h("physicist"))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["source"] == "api" and job["state"] == "queued"
    expected = input_fingerprint(load_cycle(scan(phantom["dicom"])))["sop_instance_uids_sha256"]
    assert job["input_hash"] == expected
    rec = env.store.get_job(job["id"])
    assert len([p for p in Path(rec.input_dir).rglob("*.dcm")]) == len(phantom["files"])
    # the same series again: the existing job
    again = env.client.post("/v1/jobs", json=body, headers=env.h("admin"))
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    # a series never received: 404 naming it; nothing left behind in incoming/
    before = env.incoming_entries()
    assert_problem(
        env.client.post("/v1/jobs", json={"series_instance_uids": ["1.2.3.999"]}, headers=env.h()), 404, "1.2.3.999"
    )
    assert env.incoming_entries() == before
    # count images without a calibration: the same refusal as for an upload
    r = env.client.post("/v1/jobs", json={"series_instance_uids": series}, headers=env.h())
    assert_problem(r, 422, "cps_per_mbq")
    assert env.incoming_entries() == before
    assert_problem(env.client.post("/v1/jobs", json={"spec": {}}, headers=env.h()), 422, "series_instance_uids")
    assert_problem(
        env.client.post(
            "/v1/jobs", json={"series_instance_uids": series, "spec": {"inputs": ["/etc"]}}, headers=env.h()
        ),
        422,
        "inputs",
    )
    r = env.client.post("/v1/jobs", content=b"hello", headers=env.h(**{"Content-Type": "text/plain"}))
    assert_problem(r, 415)


def test_a_submitter_may_not_start_jobs_on_received_series(env: Env, phantom: dict) -> None:
    """Issue 14: series the DICOM node received are for physicists and admins.  A submitter is refused alike
    for a series that exists and for one that does not (same status, same body): nothing about the series shows."""
    series = _received_series(env, phantom)
    answers = [
        env.client.post("/v1/jobs", json={"series_instance_uids": uids, "spec": phantom["spec"]}, headers=env.h(role))
        for uids in (series, ["1.2.3.999"], [series[0]])
        for role in ("submitter", "submitter2")
    ]
    bodies = [assert_problem(r, 403, "physicist") for r in answers]
    assert all(b == bodies[0] for b in bodies), bodies
    assert not any(u in json.dumps(bodies[0]) for u in series)
    assert env.store.list_jobs()[1] == 0 and env.incoming_entries() == []
    # the physicist is told which series it named does not exist
    r = env.client.post("/v1/jobs", json={"series_instance_uids": ["1.2.3.999"]}, headers=env.h("physicist"))
    assert_problem(r, 404, "1.2.3.999")


# ------------------------------------------------------------------------------------- auth & roles
def test_auth_and_roles(env: Env, phantom: dict) -> None:
    r = env.client.get("/v1/jobs")
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = env.client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert_problem(r, 401, "unknown")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert_problem(env.client.get("/v1/jobs", headers={"Authorization": "Basic eDp5"}), 401)
    # uploads need a token before a byte is stored
    files, data = multipart(phantom["files"][:2], phantom["dicom"], phantom["spec"])
    assert_problem(env.client.post("/v1/jobs", files=files, data=data), 401)
    assert env.incoming_entries() == []

    job = submit(env, phantom, "submitter").json()
    # submitters read their own jobs, not others'; they cannot cancel or open patients
    assert env.client.get(f"/v1/jobs/{job['id']}", headers=env.h("submitter")).status_code == 200
    assert_problem(env.client.get(f"/v1/jobs/{job['id']}", headers=env.h("submitter2")), 404)
    assert env.client.get("/v1/jobs", headers=env.h("submitter2")).json()["total"] == 0
    assert env.client.get("/v1/jobs", headers=env.h("submitter")).json()["total"] == 1
    assert_problem(env.client.post(f"/v1/jobs/{job['id']}/cancel", headers=env.h("submitter")), 403, "physicist")
    assert_problem(env.client.get(f"/v1/patients/{job['patient_id']}/cycles", headers=env.h("submitter")), 403)
    # physicists and admins read everything
    for role in ("physicist", "admin"):
        assert env.client.get(f"/v1/jobs/{job['id']}", headers=env.h(role)).status_code == 200
        assert env.client.get("/v1/jobs", headers=env.h(role)).json()["total"] == 1
    # a revoked token is refused
    env.store.revoke_token("submitter-1")
    assert_problem(env.client.get("/v1/jobs", headers=env.h("submitter")), 401)


def test_problem_shape_for_unknown_things(env: Env) -> None:
    body = assert_problem(env.client.get("/v1/jobs/0123abc", headers=env.h()), 404, "no job 0123abc")
    assert body["instance"] == "/v1/jobs/0123abc" and body["type"].startswith("urn:voxeldose:problem:")
    assert_problem(env.client.get("/v1/nothing-here", headers=env.h()), 404)
    assert_problem(env.client.delete("/v1/jobs", headers=env.h()), 405)
    body = assert_problem(env.client.get("/v1/jobs?limit=0&state=bogus", headers=env.h()), 422)
    assert "limit" in body["detail"] and "state" in body["detail"]


def test_unexpected_errors_are_500_problems_without_details(env: Env, caplog, monkeypatch) -> None:
    def boom(job_id):
        raise RuntimeError("secret PATIENT^NAME in a message")

    monkeypatch.setattr(env.store, "get_job", boom)
    with caplog.at_level(logging.DEBUG):
        r = env.client.get("/v1/jobs/abc", headers=env.h())
    assert_problem(r, 500, "reference")
    assert "PATIENT" not in r.text
    assert "PATIENT" not in caplog.text and "RuntimeError" in caplog.text


# ------------------------------------------------------------------------------------------- jobs
def test_list_filters_and_pages(env: Env, phantom: dict) -> None:
    ids = [submit(env, phantom, spec={**phantom["spec"], "cycle_number": n}).json()["id"] for n in (1, 2, 3)]
    for job_id in ids:  # the first stage reads the patient from the files
        assert first_stage(env, job_id).patient_id == phantom["patient_id"]
    env.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=env.h())
    r = env.client.get("/v1/jobs", params={"limit": 2}, headers=env.h()).json()
    assert r["total"] == 3 and [j["id"] for j in r["items"]] == ids[::-1][:2]
    r = env.client.get("/v1/jobs", params={"limit": 2, "offset": 2}, headers=env.h()).json()
    assert [j["id"] for j in r["items"]] == [ids[0]]
    r = env.client.get("/v1/jobs", params={"state": "queued"}, headers=env.h()).json()
    assert r["total"] == 2 and {j["state"] for j in r["items"]} == {"queued"}
    r = env.client.get("/v1/jobs", params={"patient_id": phantom["patient_id"]}, headers=env.h()).json()
    assert r["total"] == 3
    assert env.client.get("/v1/jobs", params={"patient_id": "nobody"}, headers=env.h()).json()["total"] == 0


def test_cancel_a_queued_job(env: Env, phantom: dict) -> None:
    job = submit(env, phantom).json()
    r = env.client.post(f"/v1/jobs/{job['id']}/cancel", headers=env.h("physicist"))
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert env.store.get_job(job["id"]).state == "cancelled"
    assert Path(env.store.get_job(job["id"]).input_dir).is_dir()  # inputs are never deleted
    assert_problem(env.client.post("/v1/jobs/nope/cancel", headers=env.h()), 404)
    assert_problem(env.client.get(f"/v1/jobs/{job['id']}/summary", headers=env.h()), 409, "not finished", "cancelled")


def test_results_of_a_finished_job(env: Env, phantom: dict) -> None:
    job = submit(env, phantom, "submitter").json()
    for what in ("summary", "rtdose", "report"):
        body = assert_problem(env.client.get(f"/v1/jobs/{job['id']}/{what}", headers=env.h()), 409, "job not finished")
        assert body["title"] == "Job not finished"
    finish_job(env, job["id"], phantom["result"])
    j = env.client.get(f"/v1/jobs/{job['id']}", headers=env.h("submitter")).json()
    assert j["state"] == "succeeded" and j["has_result"] and j["links"]["summary"] == f"/v1/jobs/{job['id']}/summary"
    r = env.client.get(f"/v1/jobs/{job['id']}/summary", headers=env.h("submitter"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads((phantom["result"] / "summary.json").read_text())
    r = env.client.get(f"/v1/jobs/{job['id']}/rtdose", headers=env.h())
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert r.headers["content-disposition"].startswith("attachment")
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.Modality == "RTDOSE" and ds.DoseUnits == "GY"
    r = env.client.get(f"/v1/jobs/{job['id']}/report", headers=env.h())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "<html" in r.text.lower()
    assert_problem(env.client.get(f"/v1/jobs/{job['id']}/summary", headers=env.h("submitter2")), 404)


def test_patient_cycles(env: Env, phantom: dict) -> None:
    pid = phantom["patient_id"]
    assert_problem(env.client.get(f"/v1/patients/{pid}/cycles", headers=env.h()), 404)
    j1 = submit(env, phantom).json()
    finish_job(env, j1["id"], phantom["result"])
    # a second cycle: the same measured result relabelled as cycle 2 with cycle 1 as an earlier cycle
    s1 = json.loads((phantom["result"] / "summary.json").read_text())
    row1 = s1["cumulative"]["cycles"][0]
    j2 = submit(env, phantom, spec={**phantom["spec"], "cycle_number": 2}).json()
    out2 = finish_job(env, j2["id"], phantom["result"])
    s2 = json.loads((out2 / "summary.json").read_text())
    s2["cycle"]["number"] = 2
    row2 = {**row1, "number": 2, "date": "2026-03-02"}
    s2["cumulative"]["cycles"] = [row1, row2]
    s2["cumulative"]["total"]["dose_gy"]["kidney"] = 2 * row1["kidney_gy"]
    s2["cumulative"]["cycles_left"]["cycles_left"] = 4
    (out2 / "summary.json").write_text(json.dumps(s2))

    r = env.client.get(f"/v1/patients/{pid}/cycles", headers=env.h())
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["number"] for c in body["cycles"]] == [1, 2]
    assert [c["job_id"] for c in body["cycles"]] == [j1["id"], j2["id"]]
    c1 = body["cycles"][0]
    assert c1["activity_mbq"] == row1["activity_MBq"] and c1["kidney_gy"] == row1["kidney_gy"]
    assert c1["kidney_bed_gy"] == row1["kidney_bed_gy"] and c1["marrow_gy"] == row1["marrow_gy"]
    assert c1["gy_per_gbq"]["kidney"] == pytest.approx(row1["kidney_gy"] / (row1["activity_MBq"] / 1000))
    assert body["cumulative"]["kidney_gy"] == pytest.approx(2 * row1["kidney_gy"])
    assert body["cycles_left"] == 4 and body["newest_job_id"] == j2["id"]
    assert body["binding_limit"] == s1["cumulative"]["cycles_left"]["binding_limit"]
    assert {lim["limit"] for lim in body["limits"]} >= {"kidney absorbed dose", "red marrow absorbed dose"}


#: A patient ID with every character a URL path treats specially (issue 14, defect 7).
RESERVED_PID = "A/B?c#d% e f"  # a '%' not followed by hex digits: Starlette's TestClient unquotes twice


def test_patient_cycles_of_an_id_with_reserved_characters(env: Env, phantom: dict) -> None:
    d = env.incoming / "upload-reserved"
    d.mkdir(parents=True)
    rec, created = env.store.create_job(
        spec={"inputs": [str(d)], **phantom["spec"]},
        input_dir=str(d),
        input_hash="f" * 64,
        patient_id=RESERVED_PID,
        idempotency_key=None,
        submitted_by="submitter-1",
    )
    assert created
    finish_job(env, rec.id, phantom["result"])
    r = env.client.get(f"/v1/patients/{quote(RESERVED_PID, safe='')}/cycles", headers=env.h())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["patient_id"] == RESERVED_PID and [c["job_id"] for c in body["cycles"]] == [rec.id]
    # the prefix alone is another patient, not this one
    assert_problem(env.client.get(f"/v1/patients/{quote('A/B', safe='')}/cycles", headers=env.h()), 404)
    # the job list finds the job by the same ID as a query parameter
    listed = env.client.get("/v1/jobs", params={"patient_id": RESERVED_PID}, headers=env.h()).json()
    assert [j["id"] for j in listed["items"]] == [rec.id]


def test_job_list_bounds_offset_and_limit(env: Env) -> None:
    for params in ({"offset": 2**63}, {"offset": 10_000_001}, {"limit": 501}, {"limit": 0}):
        assert_problem(env.client.get("/v1/jobs", params=params, headers=env.h()), 422)
    assert env.client.get("/v1/jobs", params={"offset": 10_000_000}, headers=env.h()).status_code == 200


# ----------------------------------------------------------------------------- health & metrics
def test_health_and_readiness(env: Env, monkeypatch) -> None:
    assert env.client.get("/healthz").json() == {"status": "ok"}
    r = env.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": True, "ray": True, "disk": True}
    monkeypatch.setattr(env.store, "ping", lambda: False)
    body = assert_problem(env.client.get("/readyz"), 503, "database")
    assert body["checks"]["database"] is False and body["checks"]["disk"] is True


def test_readiness_reports_disk_and_ray(tmp_path: Path) -> None:
    env = Env(tmp_path, min_free_disk_mb=10**12)
    body = assert_problem(env.client.get("/readyz"), 503, "free disk")
    assert body["checks"] == {"database": True, "ray": True, "disk": False}

    class DeadRay:
        def ray_ok(self) -> bool:
            return False

        def device(self) -> str:
            return "gpu"

    app = create_app(Settings(data_dir=tmp_path / "data", min_free_disk_mb=0), env.store, DeadRay())
    body = assert_problem(TestClient(app).get("/readyz"), 503, "Ray")
    assert body["checks"]["ray"] is False
    text = TestClient(app).get("/metrics").text
    assert 'voxeldose_worker_device_info{device="gpu"} 1.0' in text and "voxeldose_ray_up 0.0" in text


def test_metrics(env: Env, phantom: dict) -> None:
    job = submit(env, phantom).json()
    submit(env, phantom, spec={**phantom["spec"], "cycle_number": 2})
    env.client.get("/v1/jobs/nope", headers=env.h())
    r = env.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'voxeldose_jobs{state="queued"} 2.0' in text
    assert 'voxeldose_jobs{state="succeeded"} 0.0' in text
    assert "voxeldose_queue_depth 2.0" in text
    assert 'voxeldose_worker_device_info{device="none"} 1.0' in text
    assert 'voxeldose_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text  # the template, not the id
    assert phantom["patient_id"] not in text
    finish_job(env, job["id"], phantom["result"])
    text = env.client.get("/metrics").text
    assert 'voxeldose_jobs{state="succeeded"} 1.0' in text
    assert 'voxeldose_job_duration_seconds_count{state="succeeded"} 1.0' in text
    text = env.client.get("/metrics").text  # observed once only
    assert 'voxeldose_job_duration_seconds_count{state="succeeded"} 1.0' in text


def test_openapi_and_docs(env: Env) -> None:
    spec = env.client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/summary",
        "/v1/jobs/{job_id}/rtdose",
        "/v1/jobs/{job_id}/report",
        "/v1/patients/{patient_id}/cycles",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert p in paths, p
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/json" in body
    assert "202" in paths["/v1/jobs"]["post"]["responses"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert not any(p.startswith(("/jobs", "/login", "/patients")) for p in paths)  # pages stay out of the API
    assert env.client.get("/docs").status_code == 200


# ------------------------------------------------------------------------------------ schemathesis
#: Examples per operation and generation mode, per role: the privileged roles reach the code behind the
#: authorisation, so they get the most; anonymous requests end at 401 after the parameters are validated.
#: (benchmarks/bench_campaign.py runs more.)  The HTML pages, which are not in the OpenAPI: test_campaign.py.
SCHEMATHESIS_EXAMPLES = {"anonymous": 5, "submitter": 8, "physicist": 10, "admin": 15}


@pytest.mark.parametrize("role", list(SCHEMATHESIS_EXAMPLES))
def test_schemathesis_no_server_errors(env: Env, phantom: dict, role: str) -> None:
    """Property-based requests from /openapi.json (in-process ASGI) with each role's token, and with none:
    never a 5xx (issue 14, "Done when")."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    job = submit(env, phantom).json()
    finish_job(env, job["id"], phantom["result"])
    schema = schemathesis.openapi.from_asgi("/openapi.json", env.app)
    headers = {} if role == "anonymous" else env.h(role)
    ran: list[str] = []
    statuses: set[int] = set()

    def run_operation(op, mt: str | None, mode) -> None:
        kwargs = {"media_type": mt} if mt else {}

        @given(case=op.as_strategy(generation_mode=mode, **kwargs))
        @settings(
            max_examples=SCHEMATHESIS_EXAMPLES[role],
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case) -> None:
            if "job_id" in (case.path_parameters or {}) and len(ran) % 2:
                case.path_parameters["job_id"] = job["id"]  # also exercise a real, finished job
            if role == "anonymous" and case.headers:
                case.headers.pop("Authorization", None)  # the schema's security scheme: no token at all
            ran.append(op.label)
            resp = case.call(headers=headers)
            statuses.add(resp.status_code)
            if mt == "application/json" and resp.status_code == 501:
                return  # documented: series by UID need the DICOM node's store
            case.validate_response(resp, checks=[not_a_server_error], headers=headers)

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # no parameters to get wrong (e.g. /healthz)

    for result in schema.get_all_operations():
        op = result.ok()
        media = [None]
        if op.method.upper() == "POST" and op.path == "/v1/jobs":
            media = ["multipart/form-data", "application/json"]
        for mt, mode in itertools.product(media, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
            run_operation(op, mt, mode)
    assert len(set(ran)) >= 9, sorted(set(ran))
    assert not [s for s in statuses if s >= 500], statuses
    if role == "anonymous":
        assert 401 in statuses  # the requests really went without a token
    else:
        assert statuses & {200, 202}  # and with one, some got through the authorisation
    assert not [p for p in env.incoming.iterdir() if p.name.startswith(".tmp")]


def test_send_queues_a_job_for_the_pacs(tmp_path: Path) -> None:
    """POST /v1/jobs/{id}/send: a succeeded job gets a delivery to the configured destination (shown on the
    job); again while it is pending: 409; without a destination: 409 saying so; submitters may not."""
    env = Env(
        tmp_path / "a",
        dicom_destination_ae_title="PACS",
        dicom_destination_host="127.0.0.1",
        dicom_destination_port=104,
    )
    try:
        job, _ = env.store.create_job(
            spec={"inputs": ["x"]},
            input_dir="x",
            input_hash="b" * 64,
            patient_id="P",
            idempotency_key=None,
            submitted_by="physicist-1",
            source="upload",
        )
        env.store.claim_queued(1)
        out = tmp_path / "out"
        out.mkdir()
        env.store.finish(job.id, str(out), "P")
        assert_problem(env.client.post(f"/v1/jobs/{job.id}/send", headers=env.h("submitter")), 403)
        r = env.client.post(f"/v1/jobs/{job.id}/send", headers=env.h())
        assert r.status_code == 200, r.text
        [d] = r.json()["deliveries"]
        assert d["destination"] == "PACS@127.0.0.1:104" and d["state"] == "pending" and d["attempts"] == 0
        assert env.client.get(f"/v1/jobs/{job.id}", headers=env.h()).json()["deliveries"] == [d]
        assert_problem(env.client.post(f"/v1/jobs/{job.id}/send", headers=env.h()), 409, "nothing to send")
    finally:
        env.client.close()
        env.store.dispose()
    env2 = Env(tmp_path / "b")
    try:
        job, _ = env2.store.create_job(
            spec={"inputs": ["x"]},
            input_dir="x",
            input_hash="c" * 64,
            patient_id="P",
            idempotency_key=None,
            submitted_by="physicist-1",
        )
        assert_problem(env2.client.post(f"/v1/jobs/{job.id}/send", headers=env2.h()), 409, "no DICOM destination")
    finally:
        env2.client.close()
        env2.store.dispose()
