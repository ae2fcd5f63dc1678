"""The DICOM node: a Storage SCP (C-STORE, C-ECHO) that receives studies safely.

    node = DicomNode(settings, store)   # store migrated
    node.start()                        # non-blocking; listens on settings.dicom_host:dicom_port
    ...
    node.stop()

``voxeldose dicom-node`` runs it alone (:func:`service.cli.dicom_node`).

Who may associate:
- the Called AE title must be ``settings.dicom_ae_title``;
- the Calling AE title must be in ``dicom_allowed_aets``; an **empty list refuses everyone** unless
  ``dicom_allow_any`` is true (safe default: nothing is accepted until someone names the peers);
- when ``dicom_allowed_hosts`` is set, the peer address must be in one of its addresses/networks;
- only the storage SOP classes in :data:`STORAGE_SOP_CLASSES` (+ Verification) are accepted — the inputs
  (CT, NM, RTSTRUCT, SEG, RT Dose) and the Comprehensive 3D SR voxeldose writes, so that a study holding our
  results can be pushed again — with
  Implicit/Explicit VR Little Endian; other presentation contexts are rejected at association.

Each instance is streamed by pynetdicom to a temporary Part 10 file (preamble, file meta built from the
command set and the accepted transfer syntax, then the data set as received) — in the node's scratch folder
``data_dir/tmp/c-store.<hex>.owner-<token>/``, never in the system temp folder (see *Receive files* below) —, parsed with pydicom
(header only), copied into ``data_dir/dicom/<Study>/<Series>/.<SOP>.<rand>.partial`` while hashing,
fsynced, renamed to ``<SOP>.dcm`` and the folder fsynced, then indexed in the ``instances`` table —
all before 0x0000 is returned.  Same SOPInstanceUID and same bytes: success, no second copy.  Same
SOPInstanceUID, different bytes: the new copy is kept next to the first as
``<SOP>.conflict-<sha8>.dcm``, recorded in ``instance_conflicts`` and the instance flagged; success.

Statuses: 0xC000 unparseable data set or a missing/invalid UID (a log line with the SOP class and a
short hash of the bytes, never patient data), 0xA900 data set's SOP class differs from the command's,
0xA700 free disk below ``dicom_min_free_mb`` (or the disk filled while writing; no partial file is
left), 0xA701 the database could not be written (the file may stay; a resend completes the index).

One node per data folder (the duplicate/conflict decision is serialised by a lock in this process).
Setting ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET`` is process-wide: :meth:`DicomNode.start`
turns it on (and pynetdicom's logging of C-FIND/C-MOVE/C-GET identifiers off: they would name patients).

Receive files (issue 14): pynetdicom 3.0 makes the file of a chunked receive with ``tempfile.NamedTemporaryFile``
in ``pynetdicom.dimse_messages`` and has no option for its folder.  Rather than move the whole process's temp
folder (``tempfile.tempdir``, ``TMPDIR``: Ray, uvicorn and every library would follow), :meth:`DicomNode.start`
replaces that one name, in that one module, with :func:`_receive_file`, which makes the same file in the scratch
folder of the node whose association is receiving (found from the DUL thread that calls it).  It refuses to start
when pynetdicom no longer makes the file that way (an upgrade must be looked at, not followed silently).  The
files of an association that ends mid-transfer (abort, dropped connection: pynetdicom deletes only the files it
handed to the C-STORE handler) are deleted when its connection closes; the scratch folders of a node that died
(``kill -9``) are removed at the next start of a node on the same data folder (:mod:`service.scratch`: never
those of a live node); :meth:`DicomNode.stop` removes its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydicom import dcmread
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    NuclearMedicineImageStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom import __version__ as pynetdicom_version
from pynetdicom.events import EventHandlerType

from . import scratch
from .config import Settings
from .models import utcnow
from .store import Store

log = logging.getLogger("service.dicom_node")

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    NuclearMedicineImageStorage,
    RTStructureSetStorage,
    SegmentationStorage,
    RTDoseStorage,
    # voxeldose's own results, when the PACS sends a study back with them: stored, never used as input
    Comprehensive3DSRStorage,
)
TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: The Verification SOP Class (C-ECHO; PS3.4 Annex A.4).
VERIFICATION = UID("1.2.840.10008.1.1")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DB_FAILED = 0xA701
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MB = 1024 * 1024
_COPY_CHUNK = 1024 * 1024


#: Scratch space of the data folder (``data_dir/tmp``) and the prefix of a node's receive folder in it
SCRATCH_DIR = "tmp"
RECEIVE_PREFIX = "c-store."

_receiving: dict[int, DicomNode] = {}  # id(node.ae) → the started nodes of this process
_receiving_lock = threading.Lock()


def _receive_file(*args: Any, **kwargs: Any) -> IO[bytes]:
    """Stands in for ``tempfile.NamedTemporaryFile`` in ``pynetdicom.dimse_messages`` (see the module doc): the
    file of one received C-STORE data set, in the scratch folder of the node whose association is receiving it
    (pynetdicom calls this in that association's DUL thread)."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    with _receiving_lock:
        node = _receiving.get(id(getattr(assoc, "ae", None)))
        if node is None and len(_receiving) == 1:
            node = next(iter(_receiving.values()))
    if node is None:  # pynetdicom aborts the association: nothing is written outside a data folder
        raise OSError("no voxeldose DICOM node is receiving in this process")
    return node._new_receive_file(assoc, *args, **kwargs)


def _redirect_receive_files() -> None:
    """Make pynetdicom create its C-STORE receive files with :func:`_receive_file` (process-wide, like
    ``STORE_RECV_CHUNKED_DATASET``); ``RuntimeError`` when this pynetdicom makes them some other way."""
    current = getattr(dimse_messages, "NamedTemporaryFile", None)
    if current is _receive_file:
        return
    if current is not tempfile.NamedTemporaryFile:
        raise RuntimeError(
            f"pynetdicom {pynetdicom_version} no longer creates its C-STORE receive files with "
            "tempfile.NamedTemporaryFile in pynetdicom.dimse_messages: received instances could land in the "
            "system temp folder; service/dicom_node.py must be adapted to this version"
        )
    dimse_messages.NamedTemporaryFile = _receive_file  # type: ignore[attr-defined,assignment]  # its module global, narrower signature; see the module doc


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE (returned by :meth:`DicomNode.receive_file`, for tests/tools)."""

    status: int
    result: str  # "stored" | "duplicate" | "conflict" | "conflict-duplicate" | "refused"
    path: Path | None = None
    patient_id: str | None = None  # PatientID of the instance (None when refused or absent)


def valid_uid(value: Any) -> str | None:
    """The UID as the node accepts it (digits and dots, at most 64 characters; they become path parts), else None."""
    s = str(value or "").strip().rstrip("\x00")
    return s if s and len(s) <= 64 and _UID_RE.match(s) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pixel_data_complete(fp: Any, size: int, ds: Any, transfer_syntax: UID) -> bool:
    """After a ``stop_before_pixels`` parse ``fp`` sits on the Pixel Data tag (when there is one):
    check that the element's stated length fits in the file and covers Rows × Columns × frames × bits."""
    pos = fp.tell()
    if pos >= size:
        return "Rows" not in ds  # an image without pixel data is truncated
    head = fp.read(12)
    if len(head) < 8:
        return False
    little = transfer_syntax.is_little_endian if transfer_syntax.is_transfer_syntax else True
    order: Literal["little", "big"] = "little" if little else "big"
    group, elem = int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)
    if (group, elem) != (0x7FE0, 0x0010):
        return True  # something else after the header (not pixel data): nothing to check here
    implicit = transfer_syntax.is_implicit_VR if transfer_syntax.is_transfer_syntax else False
    if implicit:
        length, hdr = int.from_bytes(head[4:8], order), 8
    else:
        if len(head) < 12:
            return False
        length, hdr = int.from_bytes(head[8:12], order), 12
    if length == 0xFFFFFFFF:  # encapsulated: not accepted by this node, nothing cheap to check
        return True
    if pos + hdr + length > size:
        return False
    try:
        rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return False
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    return length >= (rows * cols * frames * spp * bits + 7) // 8


class PatientMarks(Protocol):
    """Who the node tells about received patients (:class:`service.trigger.Trigger`)."""

    def touch(self, patient_id: str | None, now: datetime | None = None) -> None: ...

    def released(self, patient_ids: Iterable[str | None], now: datetime | None = None) -> None: ...


class DicomNode:
    """Storage SCP of voxeldose (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store, trigger: PatientMarks | None = None) -> None:
        """``trigger``: a :class:`service.trigger.Trigger` told of every stored instance's patient
        (``touch``) and of the patients of each released association (``released``); None: none told."""
        self.settings = settings
        self.store = store
        self.trigger = trigger
        # association → {patient → monotonic time of its last pending mark}
        self._assoc_patients: dict[int, dict[str, float]] = {}
        self.root = settings.dicom_dir
        self._lock = threading.Lock()
        self._server: Any = None
        self._receive_dir: Path | None = None  # this node's scratch folder for pynetdicom's receive files
        self._receive_files: dict[int, list[Path]] = {}  # id(association) → its receive files
        self._networks = [ipaddress.ip_network(h.strip(), strict=False) for h in settings.dicom_allowed_hosts]
        self._allowed_aets = {a.strip() for a in settings.dicom_allowed_aets}
        self.ae = self._make_ae()

    # ------------------------------------------------------------------ setup
    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.dicom_ae_title)
        ae.require_called_aet = True
        if self._allowed_aets and not self.settings.dicom_allow_any:
            ae.require_calling_aet = sorted(self._allowed_aets)
        ae.maximum_associations = self.settings.dicom_max_associations
        for sop in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION, list(TRANSFER_SYNTAXES))
        return ae

    @property
    def port(self) -> int:
        """The port listened on (the real one when ``dicom_port`` is 0)."""
        if self._server is None:
            return self.settings.dicom_port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (non-blocking: pynetdicom serves each association in a thread of its own)."""
        if self._server is not None:
            return
        _redirect_receive_files()
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_partials()
        data_dir = Path(self.settings.data_dir)
        scratch.remove_orphans(data_dir / SCRATCH_DIR, data_dir, RECEIVE_PREFIX)  # of nodes that died
        self._receive_dir = data_dir / SCRATCH_DIR / scratch.owned_name(data_dir, RECEIVE_PREFIX)
        self._receive_dir.mkdir(parents=True, mode=0o700)
        if not self._allowed_aets and not self.settings.dicom_allow_any:
            log.warning("no calling AE title is allowed (dicom_allowed_aets is empty): every association is refused")
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        with _receiving_lock:
            _receiving[id(self.ae)] = self
        try:
            self._server = self.ae.start_server(
                (self.settings.dicom_host, self.settings.dicom_port), block=False, evt_handlers=handlers
            )
        except BaseException:
            self._stop_receiving()
            raise
        log.info("DICOM node %s listening on %s:%d", self.settings.dicom_ae_title, self.settings.dicom_host, self.port)

    def stop(self) -> None:
        """Stop listening and end the open associations."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        self._stop_receiving()
        log.info("DICOM node stopped")

    def _stop_receiving(self) -> None:
        """Forget this node as a receiver and remove its scratch folder (its associations are closed)."""
        with _receiving_lock:
            if _receiving.get(id(self.ae)) is self:
                del _receiving[id(self.ae)]
        if self._receive_dir is not None:
            shutil.rmtree(self._receive_dir, ignore_errors=True)
            self._receive_dir = None
        with self._lock:
            self._receive_files.clear()

    def _new_receive_file(self, assoc: Any, *args: Any, **kwargs: Any) -> IO[bytes]:
        """``tempfile.NamedTemporaryFile(*args, **kwargs)`` in this node's scratch folder, remembered for
        ``assoc`` (see :func:`_receive_file`)."""
        folder = self._receive_dir
        if folder is None:
            raise OSError("the DICOM node is not receiving")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        kwargs["dir"] = folder
        f = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom owns and closes it
        with self._lock:
            self._receive_files.setdefault(id(assoc), []).append(Path(f.name))
        return f

    def _on_conn_close(self, event: Any) -> None:
        """The connection ended: delete what pynetdicom left of its receive files (a data set cut off by an abort
        or a dropped connection; the complete ones were deleted after the C-STORE handler)."""
        with self._lock:
            left = self._receive_files.pop(id(event.assoc), [])
        for p in left:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass

    def _remove_partials(self) -> None:
        """Temporary files left by a node that died mid-write (never a complete instance)."""
        for p in self.root.rglob(".*.partial"):
            try:
                p.unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------ association
    @staticmethod
    def _on_conn_open(event: Any) -> None:
        """No Nagle on our side: C-STORE responses go out at once (measured: ~25 % more instances/s)."""
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        address = str(assoc.requestor.address)
        primitive = assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "") or assoc.requestor.ae_title or "").strip()
        if self._networks:
            try:
                ip = ipaddress.ip_address(address)
                ok = any(ip in n for n in self._networks)
            except ValueError:
                ok = False
            if not ok:
                log.warning("association from a host not allowed refused (calling AE %r)", calling)
                assoc.acse.send_reject(0x01, 0x01, 0x01)
                assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out first
                return
        if not self.settings.dicom_allow_any and calling not in self._allowed_aets:
            log.warning("association from calling AE %r refused (not in dicom_allowed_aets)", calling)
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ goes out first

    def _on_released(self, event: Any) -> None:
        """The peer released the association: its patients' series may be complete (the trigger looks after
        ``dicom_release_settle_s``, unless an instance of theirs arrives meanwhile) — unless another
        open association is still carrying instances of the same patient (then the quiet period applies)."""
        with self._lock:
            mine = set(self._assoc_patients.pop(id(event.assoc), {}))
            busy = {p for other in self._assoc_patients.values() for p in other}
        for pid in mine & busy:
            self._touch(pid)
        self.released(mine - busy)

    def _on_aborted(self, event: Any) -> None:
        """An aborted association completes nothing: its patients wait for the quiet period from now."""
        with self._lock:
            mine = set(self._assoc_patients.pop(id(event.assoc), {}))
        for pid in mine:
            self._touch(pid)

    def released(self, patient_ids: Iterable[str | None]) -> None:
        """The end of a batch (association release, STOW-RS request): tell the trigger (it looks after
        ``dicom_release_settle_s``: a sender may open another association at once and go on)."""
        pids = {p for p in patient_ids if p}
        if self.trigger is None or not pids:
            return
        try:
            self.trigger.released(pids)
        except Exception:
            log.exception("could not mark the released patients for the trigger")

    def _touch(self, patient_id: str | None, ahead_s: float = 0.0) -> None:
        """Mark the patient pending: the trigger looks ``dicom_quiet_period_s`` (+ ``ahead_s``) from now."""
        if self.trigger is None or not patient_id:
            return
        try:
            self.trigger.touch(patient_id, utcnow() + timedelta(seconds=ahead_s))
        except Exception:
            log.exception("could not mark the patient for the trigger")

    def _touch_in_association(self, assoc: Any, patient_id: str) -> None:
        """Within one association, mark a patient at most once a second, one second ahead, so that the
        quiet period still runs from (at least) the last instance; the release marks it due after the settle time."""
        with self._lock:
            seen = self._assoc_patients.setdefault(id(assoc), {})
        now = time.monotonic()
        if now - seen.get(patient_id, -1e9) < 1.0:
            return
        seen[patient_id] = now
        self._touch(patient_id, ahead_s=1.0)

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        req = event.request
        calling = str(event.assoc.requestor.ae_title).strip() or None
        path = Path(event.dataset_path)
        try:
            outcome = self.receive_file(
                path,
                command_sop_class=str(req.AffectedSOPClassUID or ""),
                command_sop_instance=str(req.AffectedSOPInstanceUID or ""),
                calling_ae=calling,
                mark=False,
            )
            if outcome.patient_id and outcome.status == STATUS_SUCCESS:
                self._touch_in_association(event.assoc, outcome.patient_id)
            return outcome.status
        except Exception:
            log.exception("C-STORE failed unexpectedly")
            return STATUS_OUT_OF_RESOURCES
        finally:
            self._received(event.assoc, path)

    def _received(self, assoc: Any, path: Path) -> None:
        """pynetdicom deletes this receive file after the handler: stop tracking it."""
        with self._lock:
            files = self._receive_files.get(id(assoc))
            if files and path in files:
                files.remove(path)

    # ------------------------------------------------------------------ one instance
    def receive_file(
        self,
        tmp: Path,
        *,
        command_sop_class: str = "",
        command_sop_instance: str = "",
        calling_ae: str | None = None,
        mark: bool = True,
    ) -> StoreOutcome:
        """Check, store and index one received Part 10 file (``tmp`` is left in place; the caller owns it).
        ``mark``: tell the trigger (quiet period from now); the C-STORE handler marks per association."""
        cls_name = UID(command_sop_class).name if command_sop_class else "?"
        try:
            size = tmp.stat().st_size
            header = self._parse(tmp, size, command_sop_class, command_sop_instance)
        except _Refused as r:
            log.warning("C-STORE refused 0x%04X (%s): %s, bytes %s", r.status, cls_name, r.why, self._short_hash(tmp))
            return StoreOutcome(r.status, "refused")
        need = size + self.settings.dicom_min_free_mb * _MB
        self.root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(self.root).free < need:
            log.error(
                "C-STORE refused 0xA700 (%s): free disk below dicom_min_free_mb=%d",
                cls_name,
                self.settings.dicom_min_free_mb,
            )
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "refused")

        folder = self.root / header["study_instance_uid"] / header["series_instance_uid"]
        sop = header["sop_instance_uid"]
        partial: Path | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial, sha, size = self._copy_hashing(tmp, folder, sop)
            with self._lock, self._folder_lock():
                outcome = self._place(partial, folder, header, sha, size, calling_ae)
            partial = None if outcome.result in ("stored", "conflict") else partial
        except OSError as exc:
            log.error("C-STORE refused 0xA700 (%s): cannot write (%s)", cls_name, exc.strerror or type(exc).__name__)
            return StoreOutcome(STATUS_OUT_OF_RESOURCES, "refused")
        finally:
            if partial is not None:
                try:
                    partial.unlink()
                except OSError:
                    pass
        log.info("C-STORE %s (%s) %s, bytes %s", outcome.result, cls_name, calling_ae or "-", sha[:8])
        if mark and outcome.status == STATUS_SUCCESS:
            self._touch(outcome.patient_id)
        return outcome

    def _parse(self, tmp: Path, size: int, sop_class: str, sop_instance: str) -> dict[str, Any]:
        try:
            with tmp.open("rb") as fp:
                ds = dcmread(fp, stop_before_pixels=True)
                ts = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
                whole = _pixel_data_complete(fp, size, ds, ts)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
            raise _Refused(STATUS_CANNOT_UNDERSTAND, f"unparseable data set ({type(exc).__name__})") from None
        if not whole:
            raise _Refused(STATUS_CANNOT_UNDERSTAND, "truncated pixel data")
        out: dict[str, Any] = {}
        for kw, key in (
            ("SOPInstanceUID", "sop_instance_uid"),
            ("SOPClassUID", "sop_class_uid"),
            ("StudyInstanceUID", "study_instance_uid"),
            ("SeriesInstanceUID", "series_instance_uid"),
        ):
            try:
                v = valid_uid(ds.get(kw))
            except Exception:  # noqa: BLE001
                v = None
            if v is None:
                raise _Refused(STATUS_CANNOT_UNDERSTAND, f"{kw} missing or not a valid UID")
            out[key] = v
        if sop_class and out["sop_class_uid"] != sop_class:
            raise _Refused(STATUS_SOP_CLASS_MISMATCH, "SOPClassUID differs from the command's")
        if sop_instance and out["sop_instance_uid"] != sop_instance:
            raise _Refused(STATUS_CANNOT_UNDERSTAND, "SOPInstanceUID differs from the command's")
        try:
            pid = str(ds.get("PatientID", "") or "").strip()[:64] or None
            modality = str(ds.get("Modality", "") or "").strip()[:16] or None
        except Exception:  # noqa: BLE001
            raise _Refused(STATUS_CANNOT_UNDERSTAND, "PatientID/Modality unreadable") from None
        out["patient_id"], out["modality"] = pid, modality
        return out

    @contextmanager
    def _folder_lock(self) -> Iterator[None]:
        """Serialise the new/duplicate/conflict decision across processes too (``voxeldose dicom-node`` and a
        ``serve`` taking STOW-RS on the same data folder): an exclusive ``flock`` on ``data_dir/.dicom.lock``."""
        fd = os.open(self.root.parent / ".dicom.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _short_hash(path: Path) -> str:
        try:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
                    h.update(chunk)
            return h.hexdigest()[:8]
        except OSError:
            return "?"

    @staticmethod
    def _copy_hashing(src: Path, folder: Path, sop: str) -> tuple[Path, str, int]:
        """Copy ``src`` to a hidden temporary file in ``folder`` (fsynced); returns (path, sha256, size)."""
        dst = folder / f".{sop}.{secrets.token_hex(4)}.partial"
        h = hashlib.sha256()
        n = 0
        try:
            with src.open("rb") as fi, dst.open("xb") as fo:
                for chunk in iter(lambda: fi.read(_COPY_CHUNK), b""):
                    h.update(chunk)
                    fo.write(chunk)
                    n += len(chunk)
                fo.flush()
                os.fsync(fo.fileno())
        except BaseException:
            try:
                dst.unlink()
            except OSError:
                pass
            raise
        return dst, h.hexdigest(), n

    def _place(
        self, partial: Path, folder: Path, header: dict[str, Any], sha: str, size: int, calling_ae: str | None
    ) -> StoreOutcome:
        """Under the lock: decide new / duplicate / conflict, rename, fsync the folder, index."""
        sop = header["sop_instance_uid"]
        existing = self.store.get_instance(sop)
        if existing is None:
            final = folder / f"{sop}.dcm"
            os.replace(partial, final)
            _fsync_dir(folder)
            try:
                self.store.record_instance(**header, path=str(final), sha256=sha, size=size, calling_ae=calling_ae)
            except Exception:
                log.exception("C-STORE: the database could not be written")
                return StoreOutcome(STATUS_DB_FAILED, "stored", final, header["patient_id"])
            return StoreOutcome(STATUS_SUCCESS, "stored", final, header["patient_id"])
        if existing.sha256 == sha:
            return StoreOutcome(STATUS_SUCCESS, "duplicate", Path(existing.path), header["patient_id"])
        old_folder = Path(existing.path).parent
        final = old_folder / f"{sop}.conflict-{sha[:8]}.dcm"
        if any(c["sha256"] == sha for c in self.store.instance_conflicts(sop)) and final.exists():
            return StoreOutcome(STATUS_SUCCESS, "conflict-duplicate", final, header["patient_id"])
        old_folder.mkdir(parents=True, exist_ok=True)
        if old_folder != folder:
            shutil.move(str(partial), str(old_folder / partial.name))
            partial = old_folder / partial.name
        os.replace(partial, final)
        _fsync_dir(old_folder)
        try:
            self.store.record_conflict(
                sop_instance_uid=sop, path=str(final), sha256=sha, size=size, calling_ae=calling_ae
            )
        except Exception:
            log.exception("C-STORE: the database could not be written")
            return StoreOutcome(STATUS_DB_FAILED, "conflict", final, header["patient_id"])
        log.warning("C-STORE conflict: an instance arrived again with different content (bytes %s)", sha[:8])
        return StoreOutcome(STATUS_SUCCESS, "conflict", final, header["patient_id"])
