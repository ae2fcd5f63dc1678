"""The DICOM node (Storage SCP) against real peers: dcmtk's echoscu/storescu and pynetdicom's SCU."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")

from dicom_factory import secondary_capture
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import STATE_WAIT_S, stored_files, wait_for, wait_scale

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None,
    reason="dcmtk (echoscu, storescu) not installed",
)

SCU = "TESTSCU"
NODE_ALLOWED_AETS = [SCU]  # for the start_node fixture (conftest.py)
AET = "VOXELDOSE"


def echoscu(node: Any, calling: str = SCU, called: str = AET) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", called, "-to", "10", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def storescu(node: Any, *paths: Path, calling: str = SCU) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "storescu",
            "-aet",
            calling,
            "-aec",
            AET,
            "-to",
            "30",
            "-R",
            "+sd",
            "+r",
            "127.0.0.1",
            str(node.port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def pynet_store(node: Any, path: Path, sop_class: str, *, chunked: bool) -> int | None:
    """Send one file with pynetdicom's SCU; ``chunked`` sends the file's bytes as they are."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=SCU)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AET)
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(rsp.Status) if "Status" in rsp else None


def _a_ct_file(small_phantom: dict) -> Path:
    return sorted(small_phantom["dicom"].glob("*/CT/*"))[0]


# ------------------------------------------------------------------ association
@needs_dcmtk
def test_echo_succeeds_for_an_allowed_calling_ae(start_node: Callable[..., Any]) -> None:
    node = start_node()
    r = echoscu(node)
    assert r.returncode == 0, r.stderr


@needs_dcmtk
def test_unknown_calling_or_called_ae_is_rejected(start_node: Callable[..., Any]) -> None:
    node = start_node()
    r = echoscu(node, calling="INTRUDER")
    assert r.returncode != 0
    assert "reject" in (r.stdout + r.stderr).lower()
    assert echoscu(node, called="SOMEONEELSE").returncode != 0


@needs_dcmtk
def test_empty_allow_list_refuses_everyone_unless_allow_any(start_node: Callable[..., Any]) -> None:
    assert echoscu(start_node(dicom_allowed_aets=[])).returncode != 0
    assert echoscu(start_node(dicom_allowed_aets=[], dicom_allow_any=True), calling="ANYONE").returncode == 0


@needs_dcmtk
def test_host_allow_list(start_node: Callable[..., Any]) -> None:
    assert echoscu(start_node(dicom_allowed_hosts=["10.0.0.0/8"])).returncode != 0
    assert echoscu(start_node(dicom_allowed_hosts=["127.0.0.1"])).returncode == 0


def test_settings_defaults_are_safe(make_settings: Callable[..., Any]) -> None:
    s = make_settings()
    assert (s.dicom_ae_title, s.dicom_port, s.dicom_allowed_aets, s.dicom_allow_any) == (AET, 11112, [], False)
    assert s.dicom_host == "127.0.0.1" and s.dicom_min_free_mb > 0
    with pytest.raises(ValueError):
        make_settings(dicom_allowed_hosts=["not-an-address"])


# ------------------------------------------------------------------ storing
@needs_dcmtk
def test_store_a_study_dedup_and_conflict(
    start_node: Callable[..., Any], store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    from voxeldose.ingest import load_cycle, scan

    node = start_node()
    sent = sorted(p for p in small_phantom["dicom"].rglob("*") if p.is_file())
    r = storescu(node, small_phantom["dicom"])
    assert r.returncode == 0, r.stderr[-2000:]
    files = stored_files(node)
    assert len(files) == len(sent) == store.count_instances()
    assert all(f.suffix == ".dcm" and not f.name.startswith(".") for f in files)
    # layout <Study>/<Series>/<SOP>.dcm, valid Part 10 files
    ds = dcmread(files[0])
    assert files[0].relative_to(node.settings.dicom_dir).parts == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        f"{ds.SOPInstanceUID}.dcm",
    )
    assert files[0].read_bytes()[128:132] == b"DICM"
    rec = store.get_instance(ds.SOPInstanceUID)
    assert rec is not None and rec.calling_ae == SCU and rec.path == str(files[0]) and not rec.flagged_conflict
    assert rec.size == files[0].stat().st_size and len(rec.sha256) == 64
    index = scan(node.settings.dicom_dir)
    assert index.problems == [] and index.files_read == len(sent)
    cycle = load_cycle(node.settings.dicom_dir)
    assert len(cycle.timepoints) == 4
    summary = store.series_summary()
    assert sum(s["instances"] for s in summary) == len(sent)
    assert {s["modality"] for s in summary} >= {"CT", "NM"}
    assert all(s["conflicts"] == 0 for s in summary)

    # the same study again: no second copy
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    assert storescu(node, small_phantom["dicom"]).returncode == 0
    assert stored_files(node) == files and store.count_instances() == len(sent)
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes

    # a changed instance with the same SOPInstanceUID: kept next to the first, flagged
    ct = next(f for f in sent if dcmread(f, stop_before_pixels=True).Modality == "CT")
    changed = dcmread(ct)
    changed.SeriesDescription = "changed on the way"
    mod = tmp_path / "changed" / "x.dcm"
    mod.parent.mkdir()
    changed.save_as(mod, enforce_file_format=True)
    assert storescu(node, mod.parent).returncode == 0
    rec = store.get_instance(changed.SOPInstanceUID)
    assert rec.flagged_conflict
    conflicts = store.instance_conflicts(changed.SOPInstanceUID)
    assert len(conflicts) == 1
    cpath = Path(conflicts[0]["path"])
    assert (
        cpath.parent == Path(rec.path).parent
        and cpath.name == f"{changed.SOPInstanceUID}.conflict-{conflicts[0]['sha256'][:8]}.dcm"
    )
    assert dcmread(cpath).SeriesDescription == "changed on the way"
    assert dcmread(rec.path).get("SeriesDescription") != "changed on the way"
    assert len(stored_files(node)) == len(sent) + 1
    # the same changed copy again: nothing new
    assert storescu(node, mod.parent).returncode == 0
    assert len(stored_files(node)) == len(sent) + 1 and len(store.instance_conflicts(changed.SOPInstanceUID)) == 1
    assert sum(s["conflicts"] for s in store.series_summary()) == 1


@needs_dcmtk
def test_unsupported_sop_class_is_refused_at_association(
    start_node: Callable[..., Any], store: Any, tmp_path: Path
) -> None:
    node = start_node()
    sc = tmp_path / "sc" / "sc.dcm"
    sc.parent.mkdir()
    secondary_capture().save_as(sc, enforce_file_format=True)
    r = storescu(node, sc.parent)
    assert r.returncode != 0
    assert "presentation context" in (r.stdout + r.stderr).lower()
    assert stored_files(node) == [] and store.count_instances() == 0


def test_garbage_and_truncated_data_sets_get_c000(
    start_node: Callable[..., Any], store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    from pynetdicom.sop_class import CTImageStorage

    node = start_node()
    ct = _a_ct_file(small_phantom)
    ds = dcmread(ct)
    # valid file meta, then bytes that are no data set
    garbage = tmp_path / "garbage.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    probe = Dataset()
    probe.file_meta = meta
    probe.save_as(garbage, enforce_file_format=True)
    with garbage.open("ab") as f:
        f.write(b"\xff\xff\xff\xff" + os.urandom(3000))
    assert pynet_store(node, garbage, CTImageStorage, chunked=True) == 0xC000
    # a CT whose pixel data was cut short
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(ct.read_bytes()[:-2000])
    assert pynet_store(node, trunc, CTImageStorage, chunked=True) == 0xC000
    # the whole CT then succeeds (the node is still fine)
    assert pynet_store(node, ct, CTImageStorage, chunked=True) == 0x0000
    assert [p.name for p in stored_files(node)] == [f"{ds.SOPInstanceUID}.dcm"]
    assert store.count_instances() == 1


def test_unsafe_uids_never_become_paths(
    start_node: Callable[..., Any], store: Any, small_phantom: dict, tmp_path: Path
) -> None:
    node = start_node()
    ds = dcmread(_a_ct_file(small_phantom))
    ds.StudyInstanceUID = "../../escape"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    out = node.receive_file(bad, calling_ae=SCU)
    assert out.status == 0xC000 and out.result == "refused"
    assert stored_files(node) == [] and not (tmp_path / "escape").exists() and store.count_instances() == 0


def test_low_disk_gives_a700_and_no_file(start_node: Callable[..., Any], store: Any, small_phantom: dict) -> None:
    from pynetdicom.sop_class import CTImageStorage

    node = start_node(dicom_min_free_mb=10**9)
    assert pynet_store(node, _a_ct_file(small_phantom), CTImageStorage, chunked=False) == 0xA700
    assert stored_files(node) == [] and store.count_instances() == 0


def test_leftover_partials_are_removed_at_start(make_settings: Callable[..., Any], store: Any) -> None:
    from service.dicom_node import DicomNode

    s = make_settings(dicom_port=0, dicom_allowed_aets=[SCU])
    d = s.dicom_dir / "1.2" / "1.2.3"
    d.mkdir(parents=True)
    (d / ".1.2.3.4.abcd.partial").write_bytes(b"half")
    node = DicomNode(s, store)
    node.start()
    try:
        assert not list(d.iterdir())
    finally:
        node.stop()


# ------------------------------------------------------------------ the command
@needs_dcmtk
def test_voxeldose_dicom_node_command(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).with_name("voxeldose")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "voxeldose"]
    env = {k: v for k, v in os.environ.items() if k == "VOXELDOSE_KERNEL_CACHE" or not k.startswith("VOXELDOSE_")}
    proc = subprocess.Popen(
        [*cmd, "dicom-node", "--port", str(port), "--allow-aet", SCU, "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + STATE_WAIT_S * wait_scale()
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            r = subprocess.run(
                ["echoscu", "-aet", SCU, "-aec", AET, "127.0.0.1", str(port)], capture_output=True, timeout=30
            )
            if r.returncode == 0:
                ok = True
                break
            time.sleep(0.3)
        assert ok, proc.stdout.read() if proc.poll() is not None else "no echo"
        assert (tmp_path / "data" / "voxeldose.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ received data stays in the data folder (issue 14)
def _ct_with_patient(path: Path, patient_name: str, rows: int = 512) -> Path:
    """A CT instance with ``patient_name`` and ``rows`` × ``rows`` 16-bit pixels (512: 512 KB, ≈32 PDUs)."""
    import numpy as np
    from pydicom.uid import CTImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CT", patient_name, "TMPCHECK-ID"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.zeros((rows, rows), dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _system_temp_files_with(marker: bytes, since: float) -> list[Path]:
    """Files directly in the system temp folder, changed since ``since`` (epoch s), whose bytes hold ``marker``
    (files over 64 MB, other processes' business, aside)."""
    found = []
    for p in Path(tempfile.gettempdir()).iterdir():
        try:
            if not p.is_file() or p.is_symlink():
                continue
            st = p.stat()
            if st.st_mtime >= since - 1 and st.st_size <= 64 * 2**20 and marker in p.read_bytes():
                found.append(p)
        except OSError:
            pass
    return found


def test_a_received_instance_is_written_only_in_the_data_folder_and_an_aborted_one_is_deleted(
    start_node: Callable[..., Any], store: Any, tmp_path: Path
) -> None:
    """Issue 14 defect 3: pynetdicom's receive file of a C-STORE is in the node's scratch folder under the data
    folder, never in the system temp folder; a transfer cut off by an A-ABORT leaves nothing (the connection's end
    deletes it), and the node still stores the next instance."""
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import P_DATA
    from pynetdicom.sop_class import CTImageStorage

    node = start_node()
    marker = f"TMPCHECK^{uuid.uuid4().hex[:12].upper()}"
    src = _ct_with_patient(tmp_path / "big.dcm", marker)
    since = time.time()
    scratch_root = node.settings.data_dir / "tmp"

    def receive_files() -> list[Path]:
        return sorted(p for p in scratch_root.rglob("*") if p.is_file()) if scratch_root.exists() else []

    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.dimse_timeout = STATE_WAIT_S * wait_scale()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AET)
    assert assoc.is_established
    # the peer sends the command and the first fragments of the data set, then nothing more
    real_send, sent = assoc.dul.send_pdu, [0]

    def send_some(primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            sent[0] += 1
            if sent[0] > 4:
                return
        real_send(primitive)

    assoc.dul.send_pdu = send_some
    sender = threading.Thread(target=assoc.send_c_store, args=(src,), daemon=True)
    sender.start()
    try:
        in_data, in_tmp = wait_for(
            lambda: (
                [p for p in receive_files() if marker.encode() in p.read_bytes()],
                _system_temp_files_with(marker.encode(), since),
            ),
            until=lambda found: found[0] or found[1],
            what="the receive file of the instance being sent",
        )
        assert in_tmp == []
        assert len(in_data) == 1 and in_data[0].stat().st_size < src.stat().st_size  # the one, cut short
    finally:
        assoc.abort()  # (the sender's thread waits out its DIMSE timeout for a response; a daemon, not awaited)
    wait_for(receive_files, until=lambda files: files == [], what="the aborted transfer's file to be deleted")
    assert stored_files(node) == [] and store.count_instances() == 0

    whole = _ct_with_patient(tmp_path / "whole.dcm", marker, rows=64)
    assert pynet_store(node, whole, CTImageStorage, chunked=True) == 0x0000
    assert store.count_instances() == 1 and receive_files() == []
    assert _system_temp_files_with(marker.encode(), since) == []
    node.stop()
    assert not scratch_root.exists() or list(scratch_root.iterdir()) == []  # the node's scratch folder is gone


_SCRATCH_OWNER = """
import sys, time
from pathlib import Path
from service import scratch
data = Path(sys.argv[1])
name = scratch.owned_name(data, "c-store.")
(data / "tmp" / name).mkdir(parents=True)
(data / "tmp" / name / "tmp1234.dcm").write_bytes(b"half an instance")
print(name, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_receive_files_of_a_dead_node_are_removed_at_start_those_of_a_live_one_kept(
    make_settings: Callable[..., Any], store: Any
) -> None:
    """Issue 14: after a ``kill -9`` mid-push the receive files are removed when a node next starts on the data
    folder; a node process still alive on it (its scratch folder owned by a live process) keeps its own."""
    from service.dicom_node import DicomNode

    s = make_settings(dicom_port=0, dicom_allowed_aets=[SCU], dicom_host="127.0.0.1")
    s.ensure_dirs()
    cmd = [sys.executable, "-c", _SCRATCH_OWNER, str(s.data_dir)]
    dead = subprocess.run([*cmd, "0"], capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    live = subprocess.Popen([*cmd, "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None
        live_name = live.stdout.readline().strip()
        assert (s.data_dir / "tmp" / dead).is_dir() and (s.data_dir / "tmp" / live_name).is_dir()
        node = DicomNode(s, store)
        node.start()
        try:
            assert not (s.data_dir / "tmp" / dead).exists()
            assert (s.data_dir / "tmp" / live_name / "tmp1234.dcm").exists()
        finally:
            node.stop()
        live.send_signal(signal.SIGKILL)  # as a power cut would
        live.wait(timeout=60)
        node = DicomNode(s, store)
        node.start()
        try:
            assert not (s.data_dir / "tmp" / live_name).exists()
        finally:
            node.stop()
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
