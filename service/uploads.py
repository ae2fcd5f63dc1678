"""Receiving an upload: stream it to disk, unpack a zip safely, validate it, and make it an input set.

1. Before reading the body: free disk ≥ ``min_free_disk_mb`` (else 507) and a declared ``Content-Length``
   ≤ ``max_upload_mb`` (else 413).
2. The multipart body is parsed as it arrives and each file part written straight to
   ``data_dir/incoming/.tmp-<uuid>/`` — nothing is held in memory; more than ``max_upload_mb`` received → 413.
3. One ``.zip`` alone is unpacked in place: members with absolute paths, ``..``, drive letters or links are
   refused (422); more than ``max_upload_mb`` uncompressed in total (declared or actually read) → 413.
4. The job description (``spec``) is validated, then the files: :func:`voxeldose.ingest.scan` and
   :func:`voxeldose.ingest.load_cycle` (one patient, one injection, at least one SPECT; counts need a
   calibration) — any :class:`~voxeldose.errors.VoxeldoseError` is a 422 with its message.
5. Only then is the temp folder renamed (atomic, same file system) to ``incoming/<upload-id>/``.
   A rejected upload leaves nothing behind; an accepted one is never deleted by the service.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import scan, spect_pixel_mode
from voxeldose.pipeline import input_fingerprint, load_spec_cycle
from voxeldose.spec import JobSpec

from .api.problems import ProblemError

MB = 1024 * 1024
TMP_PREFIX = ".tmp-"
MAX_FILES = 100_000
MAX_SPEC_BYTES = 1 * MB
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


# ------------------------------------------------------------------------------------------ limits
def incoming_dir(settings: Any) -> Path:
    return Path(settings.data_dir) / "incoming"


def free_mb(path: Path) -> float:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / MB


def check_free_disk(settings: Any, extra_bytes: int = 0) -> None:
    need = float(settings.min_free_disk_mb)
    free = free_mb(incoming_dir(settings)) - extra_bytes / MB
    if free < need:
        raise ProblemError(
            507,
            "Insufficient storage",
            f"not enough free disk space for this upload: {max(free, 0):.0f} MB would be left, the service keeps "
            f"at least {need:.0f} MB free (min_free_disk_mb)",
            slug="insufficient-storage",
        )


def too_large(settings: Any, what: str) -> ProblemError:
    return ProblemError(
        413,
        "Upload too large",
        f"{what} is larger than the limit of {settings.max_upload_mb} MB (max_upload_mb)",
        slug="upload-too-large",
    )


def invalid(detail: str, *, slug: str = "invalid-upload", title: str = "Upload not usable") -> ProblemError:
    return ProblemError(422, title, detail, slug=slug)


# ------------------------------------------------------------------------------------ file names
def safe_relpath(name: str) -> PurePosixPath:
    """A client's file name (maybe with folders, e.g. from a folder upload) made safe to join: no absolute
    path, no ``..``, no drive letter, only plain characters."""
    parts = []
    for part in re.split(r"[\\/]+", name or ""):
        if part in ("", ".", "..") or re.fullmatch(r"[A-Za-z]:", part):
            continue
        part = _SAFE.sub("_", part)[:120].lstrip(".") or "_"
        parts.append(part)
    parts = parts[-8:] or ["upload"]
    return PurePosixPath(*parts)


def _unique(root: Path, rel: PurePosixPath) -> Path:
    target = root / rel
    n = 1
    while target.exists():
        n += 1
        target = root / rel.with_name(f"{rel.stem}~{n}{rel.suffix}")
    return target


# ------------------------------------------------------------------------------- multipart stream
@dataclass
class Received:
    """What a multipart request brought: files written under ``tmp``, the ``spec`` text."""

    tmp: Path
    files: list[Path] = field(default_factory=list)
    spec_text: str | None = None
    bytes: int = 0


class _MultipartSink:
    """python-multipart callbacks that write file parts straight to disk."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files: list[Path] = []
        self.spec = bytearray()
        self.spec_parts = 0
        self._hname = b""
        self._hvalue = b""
        self._disposition = b""
        self._fh = None
        self._field: str | None = None
        self._filename: str | None = None

    def on_part_begin(self) -> None:
        self._disposition, self._field, self._filename = b"", None, None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.strip().lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        self._field = name.decode("utf-8", "replace") if name is not None else None
        fn = options.get(b"filename")
        self._filename = fn.decode("utf-8", "replace") if fn is not None else None
        if self._field == "files":
            if len(self.files) >= MAX_FILES:
                raise invalid(f"too many files in one upload (at most {MAX_FILES}); send a .zip")
            target = _unique(self.tmp, safe_relpath(self._filename or f"file{len(self.files) + 1}"))
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(target, "wb")  # noqa: SIM115 - closed in on_part_end / close()
            self.files.append(target)
        elif self._field == "spec":
            self.spec_parts += 1

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is not None:
            self._fh.write(data[start:end])
        elif self._field == "spec":
            if len(self.spec) + (end - start) > MAX_SPEC_BYTES:
                raise invalid(
                    "the 'spec' field is larger than 1 MB", slug="invalid-spec", title="Invalid job description"
                )
            self.spec.extend(data[start:end])
        # other fields are ignored

    def on_part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def receive_multipart(request: Request, settings: Any) -> Received:
    """Stream a ``multipart/form-data`` body into a new temp folder under ``incoming/``.

    The caller owns ``Received.tmp`` (and must remove it when the upload is rejected); on an error raised
    here the folder is already removed."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ProblemError(400, "Bad request", "multipart/form-data without a boundary", slug="bad-request")
    root = incoming_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    sink = _MultipartSink(tmp)
    try:
        received = await stream_multipart(
            request,
            settings,
            boundary,
            sink,
            (
                "on_part_begin",
                "on_part_data",
                "on_part_end",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
            ),
            body="the upload",
            kind="multipart",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    spec_text = bytes(sink.spec).decode("utf-8", "replace") if sink.spec_parts else None
    return Received(tmp, sink.files, spec_text, received)


async def stream_multipart(
    request: Request, settings: Any, boundary: bytes, sink: Any, callbacks: tuple[str, ...], *, body: str, kind: str
) -> int:
    """Feed the request body, as it arrives, to a python-multipart parser calling ``sink``'s ``callbacks``;
    returns the bytes received and always closes the sink.  Problems: 413 over ``max_upload_mb`` (naming
    ``body``), 507 when the disk fills, 400 when the ``kind`` body cannot be parsed."""
    import python_multipart

    limit = int(settings.max_upload_mb) * MB
    received = 0
    try:
        parser = python_multipart.MultipartParser(boundary, {k: getattr(sink, k) for k in callbacks})
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large(settings, body)
            if chunk:
                await run_in_threadpool(parser.write, chunk)
        parser.finalize()
    except ProblemError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ProblemError(
                507, "Insufficient storage", f"the disk filled up while receiving {body}", slug="insufficient-storage"
            ) from None
        raise
    except Exception as exc:  # noqa: BLE001 - malformed multipart, client went away
        raise ProblemError(
            400, "Bad request", f"the {kind} body could not be read ({type(exc).__name__})", slug="bad-request"
        ) from None
    finally:
        sink.close()
    return received


# ------------------------------------------------------------------------------------------- zip
def _is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def extract_zip(zpath: Path, dest: Path, settings: Any) -> None:
    """Unpack ``zpath`` under ``dest`` safely; remove the archive afterwards."""
    limit = int(settings.max_upload_mb) * MB
    name = zpath.name
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError):
        raise invalid(f"{name}: not a readable zip archive (truncated or damaged?)") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_FILES:
            raise invalid(f"{name}: {len(members)} members; at most {MAX_FILES} are accepted")
        total = 0
        for m in members:
            raw = m.filename
            parts = re.split(r"[\\/]+", raw)
            if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or ".." in parts or "\x00" in raw:
                raise invalid(
                    f"{name}: unsafe member path {raw!r} (absolute, drive letter or '..'); refused",
                    slug="unsafe-archive",
                )
            mode = (m.external_attr >> 16) & 0o170000
            if mode in (stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                raise invalid(f"{name}: member {raw!r} is a link or device, not a file; refused", slug="unsafe-archive")
            if m.flag_bits & 0x1:
                raise invalid(f"{name}: member {raw!r} is encrypted")
            total += m.file_size
        if total > limit:
            raise too_large(settings, f"{name} would expand to {total / MB:.0f} MB, which")
        check_free_disk(settings, extra_bytes=total)
        written = 0
        for m in members:
            if m.is_dir():
                continue
            target = _unique(dest, safe_relpath(m.filename))
            if not target.resolve().is_relative_to(dest.resolve()):  # belt and braces
                raise invalid(f"{name}: unsafe member path {m.filename!r}; refused", slug="unsafe-archive")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > limit:  # the header lied about the size
                            raise too_large(settings, f"{name} expanded")
                        dst.write(chunk)
            except (zipfile.BadZipFile, EOFError, zlib_error(), NotImplementedError) as exc:
                raise invalid(f"{name}: member {m.filename!r} cannot be unpacked ({exc})") from None
    zpath.unlink()


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


# ------------------------------------------------------------------------------------- validation
@dataclass
class Accepted:
    upload_id: str
    input_dir: Path
    input_hash: str
    patient_id: str
    spec: dict[str, Any]
    instances: int


def parse_spec_fields(text: str | None) -> dict[str, Any]:
    """The ``spec`` field: a JSON object of JobSpec fields other than ``inputs``."""
    if text is None or not text.strip():
        return {}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(
            f"the 'spec' field is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            slug="invalid-spec",
            title="Invalid job description",
        ) from None
    if not isinstance(fields, dict):
        raise invalid(
            "the 'spec' field must be a JSON object of job fields (calibration, fit, dose, limits, …)",
            slug="invalid-spec",
            title="Invalid job description",
        )
    if "inputs" in fields:
        raise invalid(
            "the 'spec' field must not name 'inputs': the uploaded files are the inputs",
            slug="invalid-spec",
            title="Invalid job description",
        )
    return fields


def build_spec(fields: dict[str, Any], input_dir: Path) -> JobSpec:
    """Raises pydantic.ValidationError (→ 422 with the field errors)."""
    return JobSpec.model_validate({**fields, "inputs": [str(input_dir)]})


def _relativise(err: VoxeldoseError, tmp: Path) -> VoxeldoseError:
    """The message names the uploaded file, not the server's temp folder."""
    prefix = str(tmp) + os.sep
    if err.path:
        err.path = err.path.replace(prefix, "")
    err.reason = err.reason.replace(prefix, "")
    err.args = (err._compose(),)
    return err


def validate_and_commit(received: Received, fields: dict[str, Any], settings: Any) -> Accepted:
    """Check the files (blocking: call in a thread); on success rename the temp folder to
    ``incoming/<upload-id>/``.  Raises ProblemError / VoxeldoseError / ValidationError otherwise — the
    caller then removes ``received.tmp``."""
    upload_id = uuid.uuid4().hex
    final = incoming_dir(settings) / upload_id
    spec = build_spec(fields, final)
    files = received.files
    if not files:
        raise invalid("no files received: send DICOM files (or one .zip) in the form field 'files'", slug="no-files")
    zips = [f for f in files if _is_zip(f)]
    if zips:
        if len(files) > 1:
            raise invalid(f"{zips[0].name}: send a .zip alone, not together with other files")
        extract_zip(zips[0], received.tmp, settings)
        scan_arg: Any = received.tmp  # folder: non-DICOM extras (README, …) are skipped
    else:
        scan_arg = files  # files named explicitly: each must be DICOM
    try:
        index = scan(scan_arg)
        cycle = load_spec_cycle(spec, index)
        if spec.calibration.cps_per_mbq is None:
            for tp in cycle.timepoints:
                if spect_pixel_mode(tp.spect.first, tp.spect.instances[0].path) == "counts":
                    raise VoxeldoseError(
                        f"SPECT series {tp.spect.description or tp.spect.series_instance_uid} holds raw counts and no "
                        "calibration factor was given",
                        path=tp.spect.instances[0].path,
                        tag="calibration.cps_per_mbq",
                        expected="the camera's volume sensitivity in cps/MBq in the job: "
                        '{"calibration": {"cps_per_mbq": …}}',
                    )
    except VoxeldoseError as err:
        raise _relativise(err, received.tmp) from None
    fingerprint = input_fingerprint(cycle)  # the digest the pipeline records in provenance.inputs
    digest, n = fingerprint["sop_instance_uids_sha256"], fingerprint["sop_instances"]
    os.rename(received.tmp, final)  # atomic on one file system: the upload now exists, whole
    return Accepted(upload_id, final, digest, cycle.patient_id, spec.model_dump(mode="json"), n)


def receive_series(store: Any, series_instance_uids: list[str], settings: Any) -> Received:
    """The instances of series already received (DICOM node, STOW-RS) as an upload: hard links of the
    stored files in a temporary folder under ``incoming/`` (the stored files are never moved).  A
    series not received is a 404 problem naming it."""
    uids = list(dict.fromkeys(u.strip() for u in series_instance_uids if u and u.strip()))
    instances = store.instances_of_series(uids)
    found = {i.series_instance_uid for i in instances}
    missing = [u for u in uids if u not in found]
    if missing:
        raise ProblemError(
            404,
            "Series not received",
            f"no instances received for series {', '.join(missing[:5])}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""),
            slug="series-not-found",
        )
    root = incoming_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        files = link_files([Path(i.path) for i in instances], tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Received(tmp=tmp, files=files, spec_text=None, bytes=sum(i.size for i in instances))


def link_files(paths: list[Path], folder: Path) -> list[Path]:
    """Hard links (copies across file systems) of received files in ``folder/<series>/<name>``, the layout
    of the DICOM store (``dicom/<study>/<series>/<SOP>.dcm``).  The received files are never moved or changed."""
    out = []
    for n, src in enumerate(sorted(set(paths))):
        sub = folder / src.parent.name
        sub.mkdir(exist_ok=True)
        dst = sub / src.name
        if dst.exists():
            dst = sub / f"{n}-{src.name}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        out.append(dst)
    return out
