"""Issue 14: no patient data outside the data folder — in the service log, in Ray's logs, in the system temp folder.

``test_patient_data_stays_in_the_data_folder`` runs a real ``voxeldose serve`` (its DICOM node, its own local Ray
with ``RAY_TMPDIR`` on a fresh folder so that its session can be read whole) with a patient whose name, ID, birth
date and accession number occur nowhere else, and feeds it what made the service quote them (issue 14 defect 2):

- over DICOM, an instance whose SOP Instance UID length runs into the patient module (pydicom quotes the UID value,
  name and ID included, and the node refuses it), and a whole instance of the patient (stored);
- over HTTP, the small phantom as that patient with a malformed birth date (``YYYY-MM-DD`` in a DA), run as a job
  in a Ray worker (which copies the birth date into the RT Dose: pydicom warns there).

Then it scans the service log, every file of Ray's session and every file of the system temp folder changed since
the test began (the test's own folder aside: the source files and the data folder live there): none may hold any of
those values.  Runtime ≈ 40–90 s on 2 cores (a server and Ray start, one pipeline run).

``test_an_interrupted_upload_is_removed_at_the_next_start_not_a_live_ones`` checks the start-up clean-up of
``data_dir/incoming/.tmp-*`` (issue 14, "Also").
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("ray")
pytest.importorskip("pynetdicom")
httpx = pytest.importorskip("httpx")

import serverproc
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

SCU = "PRIVSCU"
AET = "VOXELDOSE"


class Patient:
    """A patient whose identifying values occur in no other test (random, per run)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8].upper()
        rnd = random.Random(tag)
        self.family, self.given = f"QUILLBY{tag}", "OTTILIE"
        self.name = f"{self.family}^{self.given}"
        self.patient_id = f"PRV-{tag}"
        self.accession = f"ACC{tag}"
        y, m, d = rnd.randint(1930, 1969), rnd.randint(1, 12), rnd.randint(10, 28)
        self.birth_da = f"{y}{m:02d}{d:02d}"  # as DICOM writes a date
        self.birth_bad = f"{y}-{m:02d}-{d:02d}"  # as it must not be written (pydicom warns, quoting it)

    def needles(self) -> dict[str, bytes]:
        """What must not be found outside the data folder, as bytes (DICOM text is ASCII here)."""
        values = {
            "family name": self.family,
            "patient id": self.patient_id,
            "accession number": self.accession,
            "birth date": self.birth_da,
            "birth date (malformed)": self.birth_bad,
        }
        return {k: v.encode() for k, v in values.items()}

    def stamp(self, ds: Dataset, *, malformed_birth_date: bool) -> None:
        ds.PatientName, ds.PatientID, ds.AccessionNumber = self.name, self.patient_id, self.accession
        ds.PatientBirthDate = self.birth_bad if malformed_birth_date else self.birth_da


def _uid_running_into_the_patient_module(path: Path, patient: Patient) -> Path:
    """A CT instance whose SOP Instance UID's length field covers the elements up to the birth date (issue 14)."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.Modality = "CT"
    patient.stamp(ds, malformed_birth_date=False)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x08\x00\x18\x00UI", 132)  # (0008,0018) in the data set, after the file meta
    end = raw.index(patient.birth_da.encode()) + len(patient.birth_da)
    struct.pack_into("<H", raw, at + 6, end - (at + 8))
    path.write_bytes(bytes(raw))
    return path


def _c_store(port: int, path: Path) -> int | None:
    """Send one file as it is (pynetdicom SCU, chunked) and return the status."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(rsp.Status) if "Status" in rsp else None


def _c_store_cut_short(port: int, path: Path, fragments: int = 4) -> None:
    """Start sending ``path`` (the command and ``fragments`` P-DATA of the data set), then A-ABORT: what a peer killed
    mid-push leaves behind."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import P_DATA

    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = 10  # s: send_c_store waits this long for the response that never comes
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    real_send, sent = assoc.dul.send_pdu, [0]

    def send_some(primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            sent[0] += 1
            if sent[0] > fragments:
                if sent[0] == fragments + 1:
                    threading.Timer(1.0, assoc.abort).start()  # the node has the fragments by then (loopback)
                return
        real_send(primitive)

    assoc.dul.send_pdu = send_some
    assoc.send_c_store(path)  # returns once aborted (no response comes)


def _files(root: Path, *, since: float | None = None, skip: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Regular files under ``root`` (changed since ``since``, epoch s; not under ``skip``), unreadable ones aside."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not any((here / d) == s for s in skip)]
        for name in filenames:
            p = here / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if not p.is_file() or p.is_symlink() or (since is not None and st.st_mtime < since):
                continue
            if since is not None and st.st_size > 64 * 2**20:  # another process's bulk data, not a log or our file
                continue
            yield p


def _findings(paths: Iterator[Path], needles: dict[str, bytes]) -> list[str]:
    found = []
    for p in paths:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        found += [f"{what} in {p}" for what, needle in needles.items() if needle in data]
    return found


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A fresh, short folder for ``RAY_TMPDIR`` (Ray's socket paths must stay under 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vxp-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the malformed birth date, written on purpose
def test_patient_data_stays_in_the_data_folder(
    tmp_path: Path, small_phantom: dict[str, Any], ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = Patient()
    needles = patient.needles()
    since = time.time() - 1.0
    # the patient's files: the small phantom, restamped, with the malformed birth date
    src = tmp_path / "upload"
    for f in sorted(p for p in small_phantom["dicom"].rglob("*") if p.is_file()):
        ds = dcmread(f)
        patient.stamp(ds, malformed_birth_date=True)
        out = src / f.relative_to(small_phantom["dicom"])
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    whole = tmp_path / "whole.dcm"
    first_ct = dcmread(sorted(small_phantom["dicom"].glob("*/CT/*"))[0])
    patient.stamp(first_ct, malformed_birth_date=False)
    first_ct.save_as(whole)
    big = tmp_path / "big.dcm"  # ≈ 30 PDUs: a push cut short leaves part of it
    first_ct.SOPInstanceUID = first_ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    first_ct.Rows = first_ct.Columns = 512
    first_ct.PixelData = bytes(512 * 512 * 2)
    first_ct.save_as(big)
    uid_run = _uid_running_into_the_patient_module(tmp_path / "uid-run.dcm", patient)

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = serverproc.create_token(data_dir, "privacy-physicist", "physicist")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # inherited by the server: its Ray session is ours to read
    server = serverproc.ServerProc(
        data_dir, tmp_path / "server.log", dicom_allowed_aets=f'["{SCU}"]', min_free_disk_mb=64, dicom_min_free_mb=64
    )
    server.start()
    try:
        assert server.dicom_port
        assert _c_store(server.dicom_port, uid_run) == 0xC000  # pydicom quotes the UID value, the node refuses it
        assert _c_store(server.dicom_port, whole) == 0x0000
        _c_store_cut_short(server.dicom_port, big)
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            spec = {"calibration": {"cps_per_mbq": small_phantom["truth"]["calibration_cps_per_mbq"]}}
            r = serverproc.submit(c, token, serverproc.zip_folder(src), spec)
            assert r.status_code == 202, r.text
            serverproc.wait_for(c, token, r.json()["id"], ["succeeded", "failed"], server=server)
    finally:
        server.stop()

    log_text = (tmp_path / "server.log").read_text(errors="replace")
    ray_files = list(_files(ray_tmp))
    worker_logs = [p for p in ray_files if p.name.startswith("worker-") and p.suffix in (".err", ".out")]
    # the scan is not empty: the node's parse and the job's worker did warn (without the values)
    assert "Invalid value for VR UI" in log_text, server.log_tail()
    assert worker_logs, sorted(str(p) for p in ray_files)[:50]
    assert any(b"Invalid value for VR DA" in p.read_bytes() for p in worker_logs)

    problems = _findings(iter([tmp_path / "server.log"]), needles)
    problems += _findings(iter(ray_files), needles)
    problems += _findings(_files(Path(tempfile.gettempdir()), since=since, skip=(tmp_path,)), needles)
    assert problems == [], "\n".join(problems)


_UPLOADER = """
import sys, time
from pathlib import Path
from service.config import Settings
from service.intake import new_temp_dir
tmp = new_temp_dir(Settings(data_dir=Path(sys.argv[1])))
(tmp / "part.dcm").write_bytes(b"half an upload")
print(tmp, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_an_interrupted_upload_is_removed_at_the_next_start_not_a_live_ones(
    make_settings: Any, store: Any, tmp_path: Path
) -> None:
    """Issue 14, "Also": the temp folder of an upload whose process died goes at the next start, however recent; the
    one of an upload in progress in another live process on the same data folder stays."""
    from service.app import create_app

    settings = make_settings()
    settings.ensure_dirs()
    cmd = [sys.executable, "-c", _UPLOADER, str(settings.data_dir)]
    dead = Path(subprocess.run([*cmd, "0"], capture_output=True, text=True, timeout=120, check=True).stdout.strip())
    live = subprocess.Popen([*cmd, "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None
        busy = Path(live.stdout.readline().strip())
        assert dead.parent == busy.parent == settings.incoming_dir and dead.is_dir() and busy.is_dir()
        create_app(settings, store)  # a service starting on the data folder
        assert not dead.exists()
        assert (busy / "part.dcm").read_bytes() == b"half an upload"
        live.kill()  # the second process dies mid-upload too
        live.wait(timeout=60)
        create_app(settings, store)
        assert not busy.exists()
        assert list(settings.incoming_dir.iterdir()) == []
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
