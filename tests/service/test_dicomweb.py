"""DICOMweb STOW-RS (``POST /dicomweb/studies[/{study}]``) against the real Store on SQLite and a real, not
started, DicomNode: instances of the small phantom sent as multipart/related land in ``data_dir/dicom`` and the
``instances`` table exactly as C-STOREd ones do.  In-process ASGI (TestClient, as the upload tests of
test_api.py), plus one request over real HTTP through uvicorn with a chunked body."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pynetdicom")
pytest.importorskip("python_multipart")
import dicom_factory
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
)
from support import wait_for

from service.app import create_app
from service.config import Settings
from service.dicom_node import DicomNode
from service.store import Store

PROBLEM = "application/problem+json"
DICOM_JSON = "application/dicom+json"
BOUNDARY = "vd-stow-0123456789abcdef"
CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
# tags of the Store Instances Response Module (PS3.18 Annex I)
RETRIEVE_URL, FAILED, REFERENCED = "00081190", "00081198", "00081199"
SOP_CLASS, SOP_INSTANCE, FAILURE, WARNING = "00081150", "00081155", "00081197", "00081196"


# ---------------------------------------------------------------------------------------- helpers
def related(parts: list[bytes], *, boundary: str = BOUNDARY, part_type: str = "application/dicom") -> bytes:
    """A multipart/related body, one part per item (PS3.18 §8.6.1.2)."""
    out = io.BytesIO()
    for p in parts:
        out.write(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(p)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


class Env:
    def __init__(self, tmp_path: Path, node_class: type = DicomNode, **overrides: Any) -> None:
        kw: dict[str, Any] = {"min_free_disk_mb": 0, "dicom_min_free_mb": 0, **overrides}
        self.settings = Settings(data_dir=tmp_path / "data", **kw)
        self.store = Store(self.settings.database_url)
        self.store.migrate()
        self.tokens = {r: self.store.create_token(f"{r}-1", r) for r in ("submitter", "physicist")}
        self.node = node_class(self.settings, self.store)
        self.app = create_app(self.settings, self.store, node=self.node)
        self.client = TestClient(self.app)

    def h(self, role: str = "submitter", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}", "Content-Type": CTYPE, **extra}

    def stow(self, body: Any, *, path: str = "/dicomweb/studies", role: str = "submitter", **headers: str):
        return self.client.post(path, content=body, headers=self.h(role, **headers))

    def temp_left(self) -> list[str]:
        incoming = self.settings.data_dir / "incoming"
        return sorted(p.name for p in incoming.iterdir() if p.name.startswith(".tmp")) if incoming.exists() else []

    def stored_files(self) -> list[Path]:
        root = self.settings.dicom_dir
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def close(self) -> None:
        self.client.close()
        self.store.dispose()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def study(small_phantom: dict[str, Any]) -> dict[str, Any]:
    """The first time point of the small phantom: its CT slices, its NM (SPECT) and the RTSTRUCT — one study —
    plus the NM of the second time point (another study)."""
    dicom = Path(small_phantom["dicom"])
    tp1, tp2 = min(dicom.glob("tp1_*")), min(dicom.glob("tp2_*"))
    files = sorted(tp1.rglob("*.dcm")) + [dicom / "RTSTRUCT.dcm"]
    headers = {f: dcmread(f, stop_before_pixels=True) for f in files}
    study_uids = {str(ds.StudyInstanceUID) for ds in headers.values()}
    assert len(study_uids) == 1, "time point 1 and the RTSTRUCT are one study"
    modalities = Counter(str(ds.Modality) for ds in headers.values())
    assert modalities["CT"] >= 10 and modalities["NM"] == 1 and modalities["RTSTRUCT"] == 1, modalities
    other = next(f for f in sorted(tp2.rglob("*.dcm")) if dcmread(f, stop_before_pixels=True).Modality == "NM")
    return {
        "files": files,
        "bytes": [f.read_bytes() for f in files],
        "sops": {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in headers.values()},
        "series": Counter(str(ds.SeriesInstanceUID) for ds in headers.values()),
        "headers": headers,
        "study_uid": study_uids.pop(),
        "patient_id": str(next(iter(headers.values())).PatientID),
        "ct": [f for f in files if headers[f].Modality == "CT"],
        "other_study_nm": other,
    }


def referenced(body: dict) -> list[dict]:
    return body.get(REFERENCED, {}).get("Value", [])


def failed(body: dict) -> list[dict]:
    return body.get(FAILED, {}).get("Value", [])


def uid_of(item: dict, tag: str = SOP_INSTANCE) -> str | None:
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def assert_module(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(DICOM_JSON)
    body = r.json()
    assert body[RETRIEVE_URL] == {"vr": "UR"}  # Type 2, empty: no WADO-RS here
    for item in referenced(body):
        assert item[SOP_CLASS]["vr"] == "UI" and item[SOP_INSTANCE]["vr"] == "UI"
    for item in failed(body):
        assert item[FAILURE]["vr"] == "US" and len(item[FAILURE]["Value"]) == 1
    return body


def assert_problem(r, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status
    for n in needles:
        assert n.lower() in body["detail"].lower(), body["detail"]
    return body


def truncated(data: bytes, cut: int = 1000) -> bytes:
    return data[:-cut]


def secondary_capture() -> bytes:
    """A valid PS3.10 instance of a SOP class the DICOM node does not accept."""
    buf = io.BytesIO()
    dicom_factory.secondary_capture("SC-1", 4).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflated(path: Path) -> bytes:
    """The same CT slice in Deflated Explicit VR Little Endian (a transfer syntax the node does not accept)."""
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- storing
def test_study_is_stored_like_c_store(env: Env, study: dict) -> None:
    body = assert_module(env.stow(related(study["bytes"])), 200)  # a submitter token
    assert FAILED not in body
    refs = referenced(body)
    assert sorted(uid_of(i) for i in refs) == sorted(study["sops"])  # exactly the sent instances, once each
    assert all(uid_of(i, SOP_CLASS) == study["sops"][uid_of(i)] for i in refs)
    assert not any(WARNING in i for i in refs)
    # the store indexes them per series, as the DICOM node does
    summary = env.store.series_summary(study_instance_uid=study["study_uid"])
    assert {s["series_instance_uid"]: s["instances"] for s in summary} == dict(study["series"])
    assert {s["patient_id"] for s in summary} == {study["patient_id"]}
    assert env.store.count_instances() == len(study["files"])
    # files whole under data_dir/dicom/<Study>/<Series>/<SOP>.dcm; calling AE recorded as STOW-RS
    for f, data in zip(study["files"], study["bytes"], strict=True):
        ds = study["headers"][f]
        rec = env.store.get_instance(str(ds.SOPInstanceUID))
        expected = (
            env.settings.dicom_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        )
        assert Path(rec.path) == expected and expected.read_bytes() == data
        assert rec.sha256 == hashlib.sha256(data).hexdigest() and rec.calling_ae == "STOW-RS"
    assert len(env.stored_files()) == len(study["files"])
    assert env.temp_left() == []

    # the same body again: stored already, same answer, no second copy
    again = assert_module(env.stow(related(study["bytes"])), 200)
    assert sorted(uid_of(i) for i in referenced(again)) == sorted(study["sops"])
    assert env.store.count_instances() == len(study["files"])
    assert len(env.stored_files()) == len(study["files"])
    assert all(s["conflicts"] == 0 for s in env.store.series_summary())
    assert env.temp_left() == []


def test_bad_parts_fail_and_good_ones_are_stored(env: Env, study: dict) -> None:
    ct = study["ct"]
    cut = study["headers"][ct[0]]
    noise = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    good = [ct[1].read_bytes(), ct[2].read_bytes()]
    body = assert_module(env.stow(related([good[0], truncated(ct[0].read_bytes()), noise, good[1]])), 202)
    assert sorted(uid_of(i) for i in referenced(body)) == sorted(
        str(study["headers"][f].SOPInstanceUID) for f in ct[1:3]
    )
    bad = failed(body)
    assert len(bad) == 2
    assert all(i[FAILURE]["Value"] == [0xC000] == [49152] for i in bad)
    # the truncated slice is named (its header is readable); the random bytes have no UIDs
    named = [i for i in bad if SOP_INSTANCE in i]
    assert [uid_of(i) for i in named] == [str(cut.SOPInstanceUID)]
    assert uid_of(named[0], SOP_CLASS) == str(cut.SOPClassUID)
    assert [set(i) for i in bad if i not in named] == [{FAILURE}]
    assert env.store.count_instances() == 2 and env.store.get_instance(str(cut.SOPInstanceUID)) is None
    assert len(env.stored_files()) == 2
    assert env.temp_left() == []


def test_only_bad_parts_is_409(env: Env, study: dict) -> None:
    body = assert_module(env.stow(related([truncated(study["ct"][0].read_bytes()), b"not DICOM at all", b""])), 409)
    assert REFERENCED not in body and len(failed(body)) == 3
    assert env.store.count_instances() == 0 and env.stored_files() == [] and env.temp_left() == []


def test_unsupported_sop_class_and_transfer_syntax(env: Env, study: dict) -> None:
    sc = secondary_capture()
    body = assert_module(env.stow(related([sc, deflated(study["ct"][0])])), 409)
    reasons = {uid_of(i): i[FAILURE]["Value"][0] for i in failed(body)}
    assert reasons == {
        str(dcmread(io.BytesIO(sc)).SOPInstanceUID): 0x0122,
        str(study["headers"][study["ct"][0]].SOPInstanceUID): 0xC122,
    }
    assert env.store.count_instances() == 0


def test_changed_content_is_kept_as_conflict_with_a_warning(env: Env, study: dict) -> None:
    f = study["ct"][0]
    assert_module(env.stow(related([f.read_bytes()])), 200)
    ds = dcmread(f)
    ds.SeriesDescription = "re-sent with other content"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body = assert_module(env.stow(related([buf.getvalue(), study["ct"][1].read_bytes()])), 202)
    refs = {uid_of(i): i for i in referenced(body)}
    assert set(refs) == {str(ds.SOPInstanceUID), str(study["headers"][study["ct"][1]].SOPInstanceUID)}
    assert refs[str(ds.SOPInstanceUID)][WARNING] == {"vr": "US", "Value": [0xB00E]}
    assert WARNING not in refs[str(study["headers"][study["ct"][1]].SOPInstanceUID)]
    assert FAILED not in body
    assert env.store.get_instance(str(ds.SOPInstanceUID)).flagged_conflict
    assert len(env.store.instance_conflicts(str(ds.SOPInstanceUID))) == 1
    assert env.store.count_instances() == 2


def test_study_route_refuses_instances_of_another_study(env: Env, study: dict) -> None:
    url = f"/dicomweb/studies/{study['study_uid']}"
    ct = study["ct"][0]
    other = study["other_study_nm"]
    body = assert_module(env.stow(related([ct.read_bytes(), other.read_bytes()]), path=url), 202)
    assert [uid_of(i) for i in referenced(body)] == [str(study["headers"][ct].SOPInstanceUID)]
    assert [(uid_of(i), i[FAILURE]["Value"]) for i in failed(body)] == [
        (str(dcmread(other, stop_before_pixels=True).SOPInstanceUID), [0xA901])
    ]
    assert env.store.count_instances() == 1
    assert_module(env.stow(related([other.read_bytes()]), path=url), 409)
    assert_module(env.stow(related([study["ct"][1].read_bytes()]), path=url), 200)
    assert_problem(env.stow(related([ct.read_bytes()]), path="/dicomweb/studies/1.2.x"), 400, "not a valid UID")
    assert env.temp_left() == []


# ----------------------------------------------------------------------------------- the request
def test_media_types_and_malformed_bodies(env: Env, study: dict) -> None:
    one = study["ct"][0].read_bytes()
    # a form upload is not STOW-RS
    r = env.client.post(
        "/dicomweb/studies",
        files=[("file", ("a.dcm", one, "application/dicom"))],
        headers={"Authorization": f"Bearer {env.tokens['submitter']}"},
    )
    body = assert_problem(r, 415, 'type="application/dicom"')
    assert body["expected"] == 'multipart/related; type="application/dicom"'
    assert_problem(env.stow(one, **{"Content-Type": "application/dicom"}), 415)
    assert_problem(
        env.stow(related([one]), **{"Content-Type": CTYPE.replace("application/dicom", "application/dicom+json")}),
        415,
        "application/dicom+json",
    )
    assert_problem(
        env.stow(related([one]), **{"Content-Type": 'multipart/related; type="application/dicom"'}), 400, "boundary"
    )
    assert_problem(env.stow(related([one]), Accept="application/dicom+xml"), 406, "application/dicom+json")
    assert env.store.count_instances() == 0
    # type unquoted, parameters in another order and case, Accept allowing DICOM JSON
    ok = env.stow(
        related([one]),
        Accept="application/dicom+json, */*;q=0.1",
        **{"Content-Type": f"Multipart/Related; Boundary={BOUNDARY}; Type=application/dicom"},
    )
    assert_module(ok, 200)
    # malformed: no closing boundary, garbage, no part at all, a part of another media type
    complete = related([one])
    assert_problem(env.stow(complete[: len(complete) // 2]), 400, "closing boundary")
    assert_problem(env.stow(b"this is not multipart at all"), 400)
    assert_problem(env.stow(f"--{BOUNDARY}--\r\n".encode()), 400, "no instance")
    body = assert_module(env.stow(related([b'{"00100020": {"vr": "LO"}}'], part_type="application/dicom+json")), 409)
    assert failed(body)[0][FAILURE]["Value"] == [0xC000]
    assert env.store.count_instances() == 1 and env.temp_left() == []


def test_auth(env: Env, study: dict) -> None:
    data = related([study["ct"][0].read_bytes()])
    r = env.client.post("/dicomweb/studies", content=data, headers={"Content-Type": CTYPE})
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = env.client.post(
        "/dicomweb/studies", content=data, headers={"Content-Type": CTYPE, "Authorization": "Bearer nope"}
    )
    assert_problem(r, 401, "unknown")
    assert env.store.count_instances() == 0 and env.temp_left() == []
    assert_module(env.stow(data, role="physicist"), 200)


def test_body_over_max_upload_mb_is_413_and_stores_nothing(tmp_path: Path, study: dict) -> None:
    env = Env(tmp_path, max_upload_mb=1)
    try:
        data = related(study["bytes"])
        assert len(data) > 1024 * 1024
        assert_problem(env.stow(data), 413, "max_upload_mb")  # declared Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
            for i in range(0, len(data), 65536):
                yield data[i : i + 65536]

        r = env.stow(chunks())
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_problem(r, 413, "max_upload_mb")
        assert env.store.count_instances() == 0 and env.stored_files() == [] and env.temp_left() == []
    finally:
        env.close()


def test_insufficient_disk_is_507(tmp_path: Path, study: dict) -> None:
    env = Env(tmp_path, min_free_disk_mb=10**12)
    try:
        assert_problem(env.stow(related([study["ct"][0].read_bytes()])), 507, "min_free_disk_mb")
        assert env.store.count_instances() == 0 and env.temp_left() == []
    finally:
        env.close()


# ------------------------------------------------------------------------------- release, OpenAPI
class RecordingNode(DicomNode):
    """A real DicomNode that also records the patients it was told are complete (``released``: being added to
    DicomNode by another change; when it is there, the real one runs too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.releases: list[set[str]] = []

    def released(self, patient_ids: Any) -> Any:
        self.releases.append(set(patient_ids))
        real = getattr(super(), "released", None)
        return real(patient_ids) if real is not None else None


def test_patients_are_released_after_the_request(tmp_path: Path, study: dict) -> None:
    env = Env(tmp_path, node_class=RecordingNode)
    try:
        assert env.app.state.dicom_node is env.node
        assert_module(env.stow(related(study["bytes"][:3] + [b"junk"])), 202)
        assert env.node.releases == [{study["patient_id"]}]
        assert_module(env.stow(related(study["bytes"][:3])), 200)  # duplicates: data complete again
        assert env.node.releases == [{study["patient_id"]}] * 2
        assert_module(env.stow(related([b"junk"])), 409)  # nothing stored: no release
        assert len(env.node.releases) == 2
    finally:
        env.close()


def test_create_app_makes_a_node_when_none_is_given(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0)
    store = Store(settings.database_url)
    store.migrate()
    try:
        app = create_app(settings, store)
        assert isinstance(app.state.dicom_node, DicomNode) and app.state.dicom_node.store is store
        assert app.state.dicom_node._server is None  # not listening: STOW-RS needs no network
    finally:
        store.dispose()


def test_openapi(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    for p in ("/dicomweb/studies", "/dicomweb/studies/{study}"):
        op = paths[p]["post"]
        assert "STOW-RS" in op["summary"]
        assert 'multipart/related; type="application/dicom"' in op["description"]
        assert {"200", "202", "409", "401", "413", "415"} <= set(op["responses"])
        assert DICOM_JSON in op["responses"]["200"]["content"]


# ------------------------------------------------------------------------------ real HTTP (uvicorn)
@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` on a free loopback port, uvicorn in a thread of this process."""
    uvicorn = pytest.importorskip("uvicorn")
    import serverproc

    port = serverproc.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), interval_s=0.02, what="uvicorn to start")
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_over_real_http_with_a_chunked_body(env: Env, study: dict) -> None:
    import httpx

    data = related(study["bytes"])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 100_003):  # boundaries fall inside parts and inside delimiters
            yield data[i : i + 100_003]

    with serving(env.app) as base, httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/dicomweb/studies", content=chunks(), headers=env.h())
        assert r.request.headers.get("transfer-encoding") == "chunked"
        body = assert_module(r, 200)
        assert sorted(uid_of(i) for i in referenced(body)) == sorted(study["sops"])
        assert_problem(c.post("/dicomweb/studies", content=data, headers={"Content-Type": CTYPE}), 401)
    assert env.store.count_instances() == len(study["files"]) and env.temp_left() == []
    assert os.path.isdir(env.settings.dicom_dir / study["study_uid"])
