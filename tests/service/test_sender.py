"""Results back to the PACS: the sender against dcmtk's storescp as the real peer (down, then up),
with retries and back-off recorded on the job's delivery, on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from support import wait_for

from service.models import utcnow
from service.sender import Destination, Sender, SendError, send_files
from voxeldose import dicom_writers as dw
from voxeldose.geometry import Volume
from voxeldose.outputs import patient_study_from

STORESCP = shutil.which("storescp")
pytestmark = pytest.mark.skipif(STORESCP is None, reason="dcmtk's storescp is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StoreSCP:
    """dcmtk storescp on loopback, writing what it receives into ``folder``."""

    def __init__(self, folder: Path, port: int, aet: str = "PACS") -> None:
        self.folder, self.port, self.aet = folder, port, aet
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [STORESCP, "--aetitle", self.aet, "--output-directory", str(self.folder), "--accept-all", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, interval_s=0.05, what=f"storescp to listen on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def received(self) -> dict[str, pydicom.Dataset]:
        out = {}
        for p in self.folder.iterdir():
            if p.is_file():
                ds = pydicom.dcmread(p)
                out[str(ds.SOPInstanceUID)] = ds
        return out


@pytest.fixture
def result_dir(tmp_path: Path, small_phantom: dict[str, Any]) -> Path:
    """A job's result folder with a real RT Dose (written by voxeldose) and the phantom's SEG."""
    out = tmp_path / "result"
    out.mkdir()
    seg = Path(small_phantom["dicom"]) / "SEG.dcm"
    shutil.copy(seg, out / "seg.dcm")
    header = pydicom.dcmread(seg, stop_before_pixels=True)
    affine = np.diag([4.8, 4.8, 4.8, 1.0])
    dose = np.linspace(0.0, 2.0, 6 * 7 * 8).reshape(6, 7, 8)
    series = dw.SeriesInfo(
        generate_uid(), 9001, "voxeldose absorbed dose", str(header.FrameOfReferenceUID), datetime.now()
    )
    dw.write_rtdose(
        out / "rtdose.dcm",
        Volume(dose, affine, str(header.FrameOfReferenceUID), "Gy"),
        ctx=patient_study_from(header),
        series=series,
        bits_allocated=16,
    )
    return out


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", _free_port())
    yield scp
    scp.stop()


def test_send_files_to_storescp(result_dir: Path, peer: StoreSCP) -> None:
    peer.start()
    files = [result_dir / "rtdose.dcm", result_dir / "seg.dcm"]
    statuses = send_files(files, Destination("PACS", "127.0.0.1", peer.port), calling_ae="VOXELDOSE", timeout_s=60)
    assert statuses == [0, 0]
    got = peer.received()
    for f in files:
        sent = pydicom.dcmread(f)
        assert str(sent.SOPInstanceUID) in got
        back = got[str(sent.SOPInstanceUID)]
        assert back.SOPClassUID == sent.SOPClassUID and back.PixelData == sent.PixelData


def test_send_files_to_nobody_raises(result_dir: Path) -> None:
    with pytest.raises(SendError, match="not established|cannot reach"):
        send_files(
            [result_dir / "rtdose.dcm"],
            Destination("PACS", "127.0.0.1", _free_port()),
            calling_ae="VOXELDOSE",
            timeout_s=60,  # refused at once: the limit only bounds a failure
        )


def _succeeded_job(store: Any, result_dir: Path, source: str = "dicom") -> str:
    job, _ = store.create_job(
        spec={"inputs": ["x"]},
        input_dir="x",
        input_hash=uuid.uuid4().hex * 2,
        patient_id="P",
        idempotency_key=None,
        submitted_by="dicom:VOXELDOSE",
        source=source,
    )
    [claimed] = store.claim_queued(1)
    assert claimed.id == job.id
    store.finish(job.id, str(result_dir), "P")
    return job.id


def test_pacs_down_then_up_retries_with_backoff(
    make_settings: Any, store: Any, result_dir: Path, peer: StoreSCP
) -> None:
    settings = make_settings(
        dicom_destination_ae_title="PACS",
        dicom_destination_host="127.0.0.1",
        dicom_destination_port=peer.port,
        dicom_send_retry_s=30.0,
        dicom_send_max_attempts=3,
        dicom_send_timeout_s=60.0,  # the default: a bound on a failure, ample on a busy machine
    )
    sender = Sender(settings, store)
    job_id = _succeeded_job(store, result_dir)
    upload_job = _succeeded_job(store, result_dir, source="upload")  # not sent: only node jobs by default

    t0 = utcnow()
    assert sender.tick(t0) == 0  # the PACS is down
    [d] = store.job_deliveries(job_id)
    assert d["state"] == "pending" and d["attempts"] == 1 and d["destination"] == f"PACS@127.0.0.1:{peer.port}"
    assert "not established" in d["last_error"] or "cannot reach" in d["last_error"]
    # 30 s after the end of the attempt (the attempt itself takes a moment)
    assert timedelta(seconds=30) <= datetime.fromisoformat(d["next_attempt_at"]) - t0 < timedelta(seconds=35)
    assert store.job_deliveries(upload_job) == []

    assert sender.tick(t0 + timedelta(seconds=29)) == 0  # not due yet: no attempt
    assert store.job_deliveries(job_id)[0]["attempts"] == 1
    t1 = t0 + timedelta(seconds=31)
    assert sender.tick(t1) == 0  # still down: second failure, the delay doubles
    d = store.job_deliveries(job_id)[0]
    assert d["attempts"] == 2 and datetime.fromisoformat(d["next_attempt_at"]) - t1 == timedelta(seconds=60)

    peer.start()
    assert sender.tick(t1 + timedelta(seconds=61)) == 1
    d = store.job_deliveries(job_id)[0]
    assert d["state"] == "sent" and d["attempts"] == 3 and d["last_error"] is None
    got = peer.received()
    for name in ("rtdose.dcm", "seg.dcm"):
        assert str(pydicom.dcmread(result_dir / name, stop_before_pixels=True).SOPInstanceUID) in got
    # sent once: later rounds send nothing more
    assert sender.tick(t1 + timedelta(hours=2)) == 0


def test_gives_up_after_max_attempts_and_can_be_retried(
    make_settings: Any, store: Any, result_dir: Path, peer: StoreSCP
) -> None:
    settings = make_settings(
        dicom_destination_ae_title="PACS",
        dicom_destination_host="127.0.0.1",
        dicom_destination_port=peer.port,
        dicom_send_retry_s=1.0,
        dicom_send_max_attempts=2,
        dicom_send_timeout_s=60.0,  # the default: a bound on a failure, ample on a busy machine
    )
    sender = Sender(settings, store)
    job_id = _succeeded_job(store, result_dir)
    t = utcnow()
    sender.tick(t)
    sender.tick(t + timedelta(seconds=2))
    d = store.job_deliveries(job_id)[0]
    assert d["state"] == "failed" and d["attempts"] == 2 and d["next_attempt_at"] is None
    assert sender.tick(t + timedelta(days=1)) == 0  # given up: no more attempts
    assert store.job_deliveries(job_id)[0]["attempts"] == 2
    # an operator's retry (POST /v1/jobs/{id}/send) once the PACS is back
    peer.start()
    assert store.retry_delivery(job_id, t + timedelta(days=1)) == 1
    assert sender.tick(t + timedelta(days=1)) == 1
    assert store.job_deliveries(job_id)[0]["state"] == "sent"


def test_no_destination_sends_nothing(make_settings: Any, store: Any, result_dir: Path) -> None:
    sender = Sender(make_settings(), store)
    job_id = _succeeded_job(store, result_dir)
    assert sender.destination is None and sender.tick(utcnow()) == 0
    assert store.job_deliveries(job_id) == []


def test_retry_delay_doubles_and_is_capped(make_settings: Any, store: Any) -> None:
    sender = Sender(make_settings(dicom_send_retry_s=30.0), store)
    assert [sender.retry_delay_s(n) for n in (1, 2, 3, 4)] == [30.0, 60.0, 120.0, 240.0]
    assert sender.retry_delay_s(20) == 3600.0


def test_old_destination_and_old_jobs_do_not_block_or_flood(
    make_settings: Any, store: Any, result_dir: Path, peer: StoreSCP
) -> None:
    """Deliveries left for a destination no longer configured never crowd out the current one; a job finished
    longer ago than dicom_send_max_age_h is not sent by itself (the operator's /send still can)."""
    settings = make_settings(
        dicom_destination_ae_title="PACS",
        dicom_destination_host="127.0.0.1",
        dicom_destination_port=peer.port,
        dicom_send_timeout_s=60.0,  # the default: a bound on a failure, ample on a busy machine
        dicom_send_max_age_h=72.0,
    )
    sender = Sender(settings, store)
    now = utcnow()
    old = "OLDPACS@10.0.0.9:104"
    for _ in range(12):  # queued for the old PACS address, all due (jobs not sent by default: uploads)
        store.add_delivery(_succeeded_job(store, result_dir, source="upload"), old, now)
    job_id = _succeeded_job(store, result_dir)
    peer.start()
    assert sender.tick(now) == 1
    assert [d["state"] for d in store.job_deliveries(job_id)] == ["sent"]
    # the old address's deliveries are left as they were: pending, never attempted
    left = store.due_deliveries(now, old, limit=100)
    assert len(left) == 12 and all(d["attempts"] == 0 for d in left)

    late = _succeeded_job(store, result_dir)
    assert sender.tick(now + timedelta(hours=100)) == 0  # finished > 72 h before this round: not queued
    assert [d for d in store.job_deliveries(late) if d["destination"].startswith("PACS@")] == []
