"""kill -9 of ``voxeldose serve`` in the middle of receiving (issue 14, "Also": the kill -9 cases of the campaign).
The kill during a running job is test_e2e.py's ``test_kill9_mid_job_then_restart``; here, at one moment:

- an association of the DICOM node is open, some instances acknowledged (C-STORE Success), more to come;
- a STOW-RS request has sent its first instance, the rest of the body not yet;
- an upload (``POST /v1/jobs``) has sent part of its zip.

The server and everything it started (its Ray) are SIGKILLed, then started again on the same data folder.
Nothing acknowledged is lost (every instance the node answered Success for is indexed, its file whole); nothing
partial is indexed (no instance of the half STOW-RS body, no job for the half upload, no ``.partial`` file).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("ray")
pytest.importorskip("pynetdicom")
httpx = pytest.importorskip("httpx")
import pydicom
import serverproc
import support
from fuzzcorpus import STOW_BOUNDARY, STOW_CONTENT_TYPE, associate
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # a serve with its own Ray: see test_e2e.py

SCU = "FUZZER"
AET = "VOXELDOSE"


def _stalled(first: bytes, rest: bytes, release: threading.Event) -> Iterator[bytes]:
    """A request body that sends ``first``, then waits (for the kill) before the rest."""
    yield first
    release.wait(timeout=support.STATE_WAIT_S)
    yield rest


def _send_stalled(url: str, headers: dict[str, str], first: bytes, rest: bytes, release: threading.Event) -> None:
    try:
        httpx.post(url, content=_stalled(first, rest, release), headers=headers, timeout=support.STATE_WAIT_S)
    except httpx.HTTPError:
        pass  # the server died under it: expected


def _tmp_bytes(incoming: Path, prefix: str) -> int:
    return sum(p.stat().st_size for d in incoming.glob(prefix + "*") for p in d.rglob("*") if p.is_file())


def _copy_as_new_series(path: Path, study: str, series: str) -> bytes:
    """The file's instance in another study and series, with a new SOP instance UID, as PS3.10 bytes."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_kill9_mid_push_and_mid_upload_then_restart(tmp_path: Path, small_phantom: dict) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tokens = {r: serverproc.create_token(data, f"k9-{r}", r) for r in ("submitter", "physicist")}
    server = serverproc.ServerProc(
        data,
        tmp_path / "server.log",
        min_free_disk_mb=64,
        dicom_min_free_mb=0,
        dicom_allowed_aets=json.dumps([SCU]),
        dicom_quiet_period_s=600,
        ray_num_cpus=1,
    )
    server.start()
    release = threading.Event()
    threads: list[threading.Thread] = []
    try:
        dicom = Path(small_phantom["dicom"])
        cts = sorted(dicom.glob("tp1_*/CT/*.dcm"))[:12]
        # 1. an open association: the first 8 CT slices acknowledged, 4 more never sent
        assoc = associate(server.dicom_port, SCU, AET)
        acked = []
        for f in cts[:8]:
            rsp = assoc.send_c_store(pydicom.dcmread(f))
            assert int(rsp.Status) == 0, f
            acked.append(f)
        # 2. STOW-RS: one whole instance of a new series, the second part's bytes held back
        study, series = generate_uid(), generate_uid()
        parts = [_copy_as_new_series(f, study, series) for f in cts[8:10]]
        head = f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        first = head + parts[0] + b"\r\n" + head + parts[1][:1000]
        rest = parts[1][1000:] + f"\r\n--{STOW_BOUNDARY}--\r\n".encode()
        stow_headers = {"Authorization": f"Bearer {tokens['submitter']}", "Content-Type": STOW_CONTENT_TYPE}
        # 3. an upload: half the zip of the phantom
        zipped = serverproc.zip_folder(dicom)
        boundary = "k9-upload-boundary"
        spec = {"calibration": {"cps_per_mbq": small_phantom["truth"]["calibration_cps_per_mbq"]}}
        upload_head = (  # a valid job description first: whole, this upload would be a job
            f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{json.dumps(spec)}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="study.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        upload_headers = {
            "Authorization": f"Bearer {tokens['submitter']}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        }
        half = len(zipped) // 2
        upload_rest = zipped[half:] + f"\r\n--{boundary}--\r\n".encode()
        for url, headers, a, b in (
            (server.base_url + "/dicomweb/studies", stow_headers, first, rest),
            (server.base_url + "/v1/jobs", upload_headers, upload_head + zipped[:half], upload_rest),
        ):
            t = threading.Thread(target=_send_stalled, args=(url, headers, a, b, release), daemon=True)
            t.start()
            threads.append(t)
        incoming = data / "incoming"
        support.wait_for(
            lambda: (
                _tmp_bytes(incoming, ".tmp-stow"),
                _tmp_bytes(incoming, ".tmp") - _tmp_bytes(incoming, ".tmp-stow"),
            ),
            until=lambda got: got[0] >= len(parts[0]) and got[1] >= half // 2,
            what="both bodies halfway in the server's temp folders",
            context=server.log_tail,
        )

        server.kill9()  # the node mid-association, the STOW-RS and the upload mid-body
        release.set()
        for t in threads:
            t.join(timeout=support.STATE_WAIT_S)
        server.start()

        h = {"Authorization": f"Bearer {tokens['physicist']}"}
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            r = c.get("/v1/dicom/series", headers=h)
            assert r.status_code == 200, r.text
            listed = {s["series_instance_uid"]: s["instances"] for s in r.json()}
            ct_series = str(pydicom.dcmread(cts[0], stop_before_pixels=True).SeriesInstanceUID)
            # nothing acknowledged is lost ...
            assert listed.get(ct_series) == len(acked), listed
            # ... nothing of the half STOW-RS request is indexed, and no job came of the half upload
            assert series not in listed, listed
            r = c.get("/v1/jobs", headers=h)
            assert r.status_code == 200 and r.json()["total"] == 0, r.text
        stored = sorted(p for p in (data / "dicom").rglob("*") if p.is_file())
        assert not [p for p in stored if p.name.endswith(".partial") or p.name.startswith(".")], stored
        # the acknowledged files are whole: byte for byte the pixel data sent
        sent = {
            str(pydicom.dcmread(f).SOPInstanceUID): hashlib.sha256(pydicom.dcmread(f).PixelData).hexdigest()
            for f in acked
        }
        kept = {str(ds.SOPInstanceUID): hashlib.sha256(ds.PixelData).hexdigest() for ds in map(pydicom.dcmread, stored)}
        assert kept == sent
        # controls: the same bodies sent whole are stored and queued (so "nothing" above was the kill's doing)
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            r = c.post("/dicomweb/studies", content=first + rest, headers=stow_headers)
            assert r.status_code == 200, r.text
            r = c.post("/v1/jobs", content=upload_head + zipped[:half] + upload_rest, headers=upload_headers)
            assert r.status_code == 202, r.text
    finally:
        release.set()
        server.stop()
