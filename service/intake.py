"""The intake (service core): an upload or a set of received series becomes an input set, or is refused.

1. Before a body is read: free disk ≥ ``min_free_disk_mb`` and a declared size ≤ ``max_upload_mb``
   (:func:`check_free_disk`, :func:`check_declared_size`).  The web layer streams the files themselves into a
   temporary folder under ``data_dir/incoming/`` (:func:`new_temp_dir`; :mod:`service.web.multipart`), or
   :func:`receive_series` hard-links series already received there.
2. One ``.zip`` alone is unpacked in place: members with absolute paths, ``..``, drive letters or links are
   refused; more than ``max_upload_mb`` uncompressed in total (declared or actually read) is too large.
3. The job description (``spec``) is validated, then the files: :func:`voxeldose.ingest.scan` and
   :func:`voxeldose.ingest.load_cycle` (one patient, one injection, at least one SPECT; counts need a
   calibration), each RTSTRUCT's ROI and contour sequences read whole (:func:`voxeldose.voi.read_structure_set`) — a :class:`~voxeldose.errors.VoxeldoseError` passes through with its message.
4. Only then is the temp folder renamed (atomic, same file system) to ``incoming/<upload-id>/``.
   A rejected upload leaves nothing behind; an accepted one is never deleted by the service.

That is the order for jobs on received series.  An upload (issue 15) is renamed right after step 1 and the checks
that need no file (:func:`persist_upload`: fsync, hash, rename; the 202 follows); steps 2-3 run in place as its
job's first stage (:func:`check_stage` in the worker), whose refusal is the job's error — and the upload stays.

Refusals are :class:`~service.errors.IntakeError` (the web layer turns them into problems: too large → 413,
no disk → 507, unusable → 422, series not received → 404).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import uuid
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import scan, spect_pixel_mode
from voxeldose.pipeline import input_fingerprint, load_spec_cycle, scan_time_problems
from voxeldose.spec import JobSpec, check_json_depth
from voxeldose.voi import read_structure_set

from . import scratch
from .cameras import apply_profile, spect_camera
from .config import Settings
from .errors import ErrorKind, IntakeError
from .store import CameraRecord, InstanceRecord, JobRecord, without_paths

MB = 1024 * 1024
TMP_PREFIX = ".tmp-"
MAX_FILES = 100_000
MAX_SPEC_BYTES = 1 * MB
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


# ------------------------------------------------------------------------------------------ limits
def incoming_dir(settings: Settings) -> Path:
    """Where uploads and received series become input sets (``data_dir/incoming``)."""
    return Path(settings.data_dir) / "incoming"


def free_mb(path: Path) -> float:
    """Free space (MB) on the file system holding ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / MB


def no_storage(detail: str) -> IntakeError:
    return IntakeError(ErrorKind.NO_STORAGE, "Insufficient storage", detail, slug="insufficient-storage")


def check_free_disk(settings: Settings, extra_bytes: int = 0) -> None:
    """Refuse when fewer than ``min_free_disk_mb`` would be left after ``extra_bytes`` more."""
    need = float(settings.min_free_disk_mb)
    free = free_mb(incoming_dir(settings)) - extra_bytes / MB
    if free < need:
        raise no_storage(
            f"not enough free disk space for this upload: {max(free, 0):.0f} MB would be left, the service keeps "
            f"at least {need:.0f} MB free (min_free_disk_mb)"
        )


def check_declared_size(settings: Settings, content_length: str | None, what: str, *, copies: int = 1) -> None:
    """A declared body size (``Content-Length``, bytes) within ``max_upload_mb``, with room on disk for
    ``copies`` copies of it; an absent or unreadable declaration is checked while the body arrives."""
    if content_length and content_length.isdigit():
        if int(content_length) > int(settings.max_upload_mb) * MB:
            raise too_large(settings, what)
        check_free_disk(settings, extra_bytes=copies * int(content_length))


def too_large(settings: Settings, what: str) -> IntakeError:
    return IntakeError(
        ErrorKind.TOO_LARGE,
        "Upload too large",
        f"{what} is larger than the limit of {settings.max_upload_mb} MB (max_upload_mb)",
        slug="upload-too-large",
    )


def invalid(detail: str, *, slug: str = "invalid-upload", title: str = "Upload not usable") -> IntakeError:
    return IntakeError(ErrorKind.INVALID, title, detail, slug=slug)


def invalid_spec(detail: str) -> IntakeError:
    return invalid(detail, slug="invalid-spec", title="Invalid job description")


def new_temp_dir(settings: Settings, tag: str = "") -> Path:
    """A new, empty temporary folder ``incoming/.tmp-<tag><hex>.owner-<token>`` owned by this process
    (:mod:`service.scratch`: removed at the next start once this process is gone; the caller removes it)."""
    root = incoming_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / scratch.owned_name(Path(settings.data_dir), f"{TMP_PREFIX}{tag}")
    tmp.mkdir()
    return tmp


#: A temporary folder of ``incoming/`` whose name carries no owner (the trigger's, or one of an older version) is
#: removed at start only when untouched this long (s): it may belong to a live process
STALE_UNOWNED_S = 3600.0


def remove_stale_temp(settings: Settings) -> int:
    """At start: remove the temporary folders of uploads (and STOW-RS requests) that a process which is gone never
    finished — never accepted, so safe to remove — at once, however recent; those of a live process (a second
    ``voxeldose serve`` on the same data folder) stay (:mod:`service.scratch`).  A temporary folder without an owner
    in its name goes after :data:`STALE_UNOWNED_S`.  Returns how many were removed."""
    return scratch.remove_orphans(
        incoming_dir(settings), Path(settings.data_dir), TMP_PREFIX, unowned_older_than_s=STALE_UNOWNED_S
    )


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


def unique_path(root: Path, rel: PurePosixPath) -> Path:
    """``root/rel``, or ``root/<stem>~N<suffix>`` when that exists already."""
    target = root / rel
    n = 1
    while target.exists():
        n += 1
        target = root / rel.with_name(f"{rel.stem}~{n}{rel.suffix}")
    return target


@dataclass
class Received:
    """What a request brought: files written under ``tmp``, the ``spec`` text, the bytes received."""

    tmp: Path
    files: list[Path] = field(default_factory=list)
    spec_text: str | None = None
    bytes: int = 0


# ------------------------------------------------------------------------------------------- zip
def _is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def extract_zip(zpath: Path, dest: Path, settings: Settings) -> None:
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
            target = unique_path(dest, safe_relpath(m.filename))
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
            except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
                raise invalid(f"{name}: member {m.filename!r} cannot be unpacked ({exc})") from None
    zpath.unlink()


# ------------------------------------------------------------------------ request fingerprints
def canonical_json(value: Any) -> str:
    """``value`` as one JSON text: object keys sorted, no insignificant whitespace, every non-ASCII character
    escaped.  Two request bodies are "the same JSON" when their canonical texts are equal: key order, spacing and
    escapes do not count; values do, as Python's ``json`` reads them (``1`` and ``1.0`` differ, ``5.670`` and
    ``5.67`` do not; of a repeated key the last counts)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def upload_fingerprint(files: Sequence[Path], fields: Mapping[str, Any]) -> str:
    """The fingerprint of a multipart upload, for ``Idempotency-Key`` (hex SHA-256): the SHA-256 of each file's
    bytes as received (a .zip as the archive, not its members), as a sorted list — file names and order do not
    count — and the ``spec`` field's JSON (:func:`canonical_json`; no ``spec`` is ``{}``)."""
    return fingerprint_of(file_digests(files), fields)


def fingerprint_of(digests: Sequence[str], fields: Mapping[str, Any]) -> str:
    """:func:`upload_fingerprint` from the files' digests (:func:`file_digests`)."""
    return hashlib.sha256(canonical_json({"upload": sorted(digests), "spec": dict(fields)}).encode()).hexdigest()


def series_fingerprint(raw: bytes) -> str:
    """The fingerprint of a JSON request naming received series, for ``Idempotency-Key`` (hex SHA-256): the whole
    body as :func:`canonical_json` (the order of ``series_instance_uids`` counts, as the body says it)."""
    try:
        text = canonical_json({"series": json.loads(raw)})
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise IntakeError(
            ErrorKind.BAD_REQUEST, "Bad request", f"the body cannot be read as JSON ({exc})", slug="bad-request"
        ) from None
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------- validation
@dataclass
class Accepted:
    upload_id: str
    input_dir: Path
    input_hash: str
    patient_id: str
    spec: dict[str, Any]
    instances: int
    camera_profile_id: int | None = None  # the camera profile the job took (issue 12)
    camera_match: str | None = None  # which, and how it was chosen


def check_nesting(text: str, what: str) -> None:
    """Refuse JSON ``text`` nested deeper than :data:`voxeldose.spec.MAX_JSON_DEPTH` (422), before any parser
    recurses into it (``json.loads`` would raise RecursionError at ~1000 levels)."""
    try:
        check_json_depth(text, what)
    except ValueError as exc:
        raise invalid_spec(str(exc)) from None


def parse_spec_fields(text: str | None) -> dict[str, Any]:
    """The ``spec`` field: a JSON object of JobSpec fields other than ``inputs``."""
    if text is None or not text.strip():
        return {}
    check_nesting(text, "the 'spec' field")
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_spec(
            f"the 'spec' field is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise invalid_spec(f"the 'spec' field cannot be read: {exc}") from None
    if not isinstance(fields, dict):
        raise invalid_spec("the 'spec' field must be a JSON object of job fields (calibration, fit, dose, limits, …)")
    if "inputs" in fields:
        raise invalid_spec("the 'spec' field must not name 'inputs': the uploaded files are the inputs")
    return fields


def build_spec(fields: dict[str, Any], input_dir: Path) -> JobSpec:
    """Raises pydantic.ValidationError (→ 422 with the field errors)."""
    return JobSpec.model_validate({**fields, "inputs": [str(input_dir)]})


def _relativise(err: VoxeldoseError, tmp: Path) -> VoxeldoseError:
    """The message names the uploaded file, not the server's temp folder (and no other absolute path either:
    :func:`service.store.without_paths`), in every part of it: path, reason, expected and found."""
    prefix = str(tmp) + os.sep

    def clean(text: str) -> str:
        return without_paths(text.replace(prefix, "").replace(str(tmp), "."))

    if err.path:
        err.path = clean(err.path)
    err.reason = clean(err.reason)
    if err.expected:
        err.expected = clean(err.expected)
    if err.found is not None and clean(str(err.found)) != str(err.found):
        err.found = clean(str(err.found))
    err.args = (err._compose(),)
    return err


def validate_and_commit(
    received: Received, fields: dict[str, Any], settings: Settings, profiles: Sequence[CameraRecord] = ()
) -> Accepted:
    """Check the files (blocking: call in a thread); on success rename the temp folder to
    ``incoming/<upload-id>/``.  Raises IntakeError / VoxeldoseError / pydantic's ValidationError otherwise —
    the caller then removes ``received.tmp``.  (Jobs on received series; an upload is checked by its job's first
    stage instead: :func:`persist_upload`, :func:`check_stage`.)

    ``profiles``: the registered camera profiles; the one matching the first SPECT's camera fills the job's
    calibration unless ``fields`` gives one (:func:`service.cameras.apply_profile`)."""
    upload_id = uuid.uuid4().hex
    final = incoming_dir(settings) / upload_id
    build_spec(fields, final)
    if not received.files:
        raise invalid("no files received: send DICOM files (or one .zip) in the form field 'files'", slug="no-files")
    accepted = check_files(received.tmp, received.files, fields, final, settings, profiles)
    os.rename(received.tmp, final)  # atomic on one file system: the upload now exists, whole
    return accepted


def check_files(
    root: Path,
    files: Sequence[Path] | None,
    fields: dict[str, Any],
    final: Path,
    settings: Settings,
    profiles: Sequence[CameraRecord] = (),
) -> Accepted:
    """Unpack a lone .zip in ``root`` and check the files under it (steps 2-3 of the module doc); the job's
    inputs will be ``final``.  Raises IntakeError / VoxeldoseError (its paths relative to ``root``) / pydantic's
    ValidationError.  ``files`` None: the files under ``root`` (a .zip unpacked already)."""
    spec = build_spec(fields, final)
    zips = [f for f in files if _is_zip(f)] if files is not None else []
    scan_arg: Path | list[Path]
    if files is None:
        scan_arg = root
    elif zips:
        if len(files) > 1:
            raise invalid(f"{zips[0].name}: send a .zip alone, not together with other files")
        extract_zip(zips[0], root, settings)
        scan_arg = root  # folder: non-DICOM extras (README, …) are skipped
    else:
        scan_arg = list(files)  # files named explicitly: each must be DICOM
    try:
        index = scan(scan_arg)
        for rtstruct in index.by_kind("rtstruct"):  # read its ROI and contour sequences whole: a clear error
            for inst in rtstruct.instances:  # now, not an internal error later
                read_structure_set(inst.header, str(inst.path))
        cycle = load_spec_cycle(spec, index)
        late = scan_time_problems(cycle)
        if late:
            raise late[0]
        camera = spect_camera(cycle, profiles)
        note = None
        if camera.match is not None:
            fields, note = apply_profile(fields, camera.match)
            spec = build_spec(fields, final)
        if spec.cps_per_mbq is None:  # neither calibration.cps_per_mbq nor a camera profile
            for tp in cycle.timepoints:
                if spect_pixel_mode(tp.spect.first, tp.spect.instances[0].path) == "counts":
                    raise VoxeldoseError(
                        f"SPECT series {tp.spect.description or tp.spect.series_instance_uid} holds raw counts and no "
                        "calibration factor was given",
                        path=tp.spect.instances[0].path,
                        tag="calibration.cps_per_mbq",
                        expected="the camera's volume sensitivity in cps/MBq in the job: "
                        '{"calibration": {"cps_per_mbq": …}}, or a camera profile registered for camera '
                        f"{camera.label} and {cycle.injection.nuclide} (the Cameras page, or POST to the API's v1/cameras)",
                    )
    except VoxeldoseError as err:
        raise _relativise(err, root) from None
    fingerprint = input_fingerprint(cycle)  # the digest the pipeline records in provenance.inputs
    digest, n = fingerprint["sop_instance_uids_sha256"], fingerprint["sop_instances"]
    match = camera.match
    return Accepted(
        final.name,
        final,
        digest,
        cycle.patient_id,
        spec.model_dump(mode="json"),
        n,
        camera_profile_id=match.record.id if match is not None else None,
        camera_match=note,
    )


# ------------------------------------------------------------------ uploads answered at once (issue 15)
@dataclass
class Persisted:
    """An upload safely on disk under ``incoming/<upload_id>/``, its files not checked yet."""

    upload_id: str
    input_dir: Path
    upload_hash: str  # SHA-256 of the sorted file digests (:func:`files_digest`)
    spec: dict[str, Any]  # the job description as validated (inputs: input_dir)
    intake: dict[str, Any]  # what the first stage needs (:func:`check_stage`)


def file_digests(files: Sequence[Path]) -> list[str]:
    """The SHA-256 (hex) of each file's bytes, sorted (file names and order do not count)."""
    return sorted(_sha256_file(f) for f in files)


def files_digest(digests: Sequence[str]) -> str:
    """One SHA-256 (hex) over an upload's sorted file digests: the same files, the same value."""
    return hashlib.sha256(canonical_json({"upload": sorted(digests)}).encode()).hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def persist_upload(
    received: Received, fields: dict[str, Any], digests: Sequence[str], settings: Settings, *, dedup_within: str | None
) -> Persisted:
    """What can be checked without unpacking (a file at all; a .zip alone; the job description), then the files
    flushed to disk (fsync) and the temp folder renamed to ``incoming/<upload-id>/`` — the upload is then safe
    and is never deleted by the service, whatever its files turn out to be.  Blocking: call in a thread.
    Raises IntakeError / pydantic's ValidationError (the caller removes ``received.tmp``).

    ``digests``: :func:`file_digests` of ``received.files``; ``dedup_within``: the submitter whose jobs alone
    count for "the same input set" (None: anyone's)."""
    upload_id = uuid.uuid4().hex
    final = incoming_dir(settings) / upload_id
    spec = build_spec(fields, final)
    files = received.files
    if not files:
        raise invalid("no files received: send DICOM files (or one .zip) in the form field 'files'", slug="no-files")
    zips = [f for f in files if _is_zip(f)]
    if zips and len(files) > 1:
        raise invalid(f"{zips[0].name}: send a .zip alone, not together with other files")
    dirs = {received.tmp}
    for f in files:
        _fsync_path(f)
        dirs.add(f.parent)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_path(d)
    os.rename(received.tmp, final)  # atomic on one file system: the upload now exists, whole
    _fsync_path(final.parent)
    intake = {
        "fields": fields,
        "files": [str(f.relative_to(received.tmp)) for f in files],
        "dedup_within": dedup_within,
        "max_upload_mb": int(settings.max_upload_mb),
        "min_free_disk_mb": int(settings.min_free_disk_mb),
    }
    return Persisted(upload_id, final, files_digest(digests), spec.model_dump(mode="json"), intake)


class IntakeStore(Protocol):
    """The part of the store :func:`check_stage` uses."""

    def active_camera_profiles(self) -> list[CameraRecord]: ...

    def intake_done(
        self,
        job_id: str,
        *,
        spec: dict[str, Any],
        input_hash: str,
        patient_id: str,
        camera_profile_id: int | None,
        camera_match: str | None,
    ) -> JobRecord | None: ...


def check_stage(store: IntakeStore, job: JobRecord) -> dict[str, Any]:
    """The first stage of an upload's job (in the worker): unpack and check the files in place, exactly as an
    upload was checked before its 202 (:func:`check_files`), record the input set in the job
    (:meth:`service.store.JobTable.intake_done`) and return the job description to run.  A job whose files were
    checked already (``job.intake`` None) returns its spec unchanged.

    Raises VoxeldoseError / IntakeError (the job's error: their message is today's 422 detail) or
    :class:`DuplicateInput` when a job of the same input set and description exists."""
    info = job.intake
    if info is None:
        return dict(job.spec)
    root = Path(job.input_dir)
    settings = Settings(
        data_dir=root.parent.parent,
        max_upload_mb=int(info["max_upload_mb"]),
        min_free_disk_mb=int(info["min_free_disk_mb"]),
    )
    files: list[Path] | None = [root / name for name in info["files"]]
    if files is not None and not all(f.exists() for f in files):  # a .zip an earlier attempt unpacked: the folder
        files = None
    accepted = check_files(root, files, dict(info["fields"]), root, settings, store.active_camera_profiles())
    other = store.intake_done(
        job.id,
        spec=accepted.spec,
        input_hash=accepted.input_hash,
        patient_id=accepted.patient_id,
        camera_profile_id=accepted.camera_profile_id,
        camera_match=accepted.camera_match,
    )
    if other is not None:
        raise DuplicateInput(other.id)
    return accepted.spec


class DuplicateInput(Exception):
    """The upload's instances and job description are those of an earlier job (:meth:`JobTable.intake_done`)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"the same input set (the same DICOM instances) and job description as job {job_id}, submitted "
            "earlier: that job is this upload's result"
        )
        self.job_id = job_id


class InstanceSource(Protocol):
    """The part of the store :func:`receive_series` reads."""

    def instances_of_series(self, series_instance_uids: list[str]) -> list[InstanceRecord]: ...


def receive_series(store: InstanceSource, series_instance_uids: Sequence[str], settings: Settings) -> Received:
    """The instances of series already received (DICOM node, STOW-RS) as an upload: hard links of the
    stored files in a temporary folder under ``incoming/`` (the stored files are never moved).  A
    series not received is refused (not found), naming it."""
    uids = list(dict.fromkeys(u.strip() for u in series_instance_uids if u and u.strip()))
    instances = store.instances_of_series(uids)
    found = {i.series_instance_uid for i in instances}
    missing = [u for u in uids if u not in found]
    if missing:
        raise IntakeError(
            ErrorKind.NOT_FOUND,
            "Series not received",
            f"no instances received for series {', '.join(missing[:5])}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""),
            slug="series-not-found",
        )
    tmp = new_temp_dir(settings)
    try:
        files = link_files([Path(i.path) for i in instances], tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Received(tmp=tmp, files=files, spec_text=None, bytes=sum(i.size for i in instances))


def link_files(paths: list[Path], folder: Path) -> list[Path]:
    """Hard links (copies across file systems) of received files in ``folder/<series>/<name>``, the layout
    of the DICOM store (``dicom/<study>/<series>/<SOP>.dcm``).  The received files are never moved or changed."""
    out: list[Path] = []
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
