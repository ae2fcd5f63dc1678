"""DICOMweb STOW-RS (PS3.18 §10.5): ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``.

Instances sent here land in the same store as the DICOM node's (:meth:`service.dicom_node.DicomNode.receive_file`
does the checking, the atomic write, duplicate/conflict handling and indexing), so they trigger jobs like
C-STOREd data.

1. Auth (``submitter`` or above), then the media type: ``multipart/related; type="application/dicom"`` (415
   otherwise) and an ``Accept`` that allows ``application/dicom+json`` (406 otherwise).
2. Free disk ≥ ``min_free_disk_mb`` with room for the body twice (temp copy + stored copy; else 507), a declared
   ``Content-Length`` ≤ ``max_upload_mb`` (else 413).
3. The body is parsed as it arrives (python-multipart); each part is written straight to a file in
   ``data_dir/incoming/.tmp-stow-<uuid>/``; more than ``max_upload_mb`` received → 413 and nothing is stored.
   A body that is not well-formed multipart, or has no part, → 400.
4. Only after the whole body arrived, each part in order: SOP class and transfer syntax must be ones the DICOM
   node accepts (else Failure Reason 0x0122 / 0xC122), on ``/studies/{study}`` the StudyInstanceUID must be
   ``{study}`` (else 0xA901), then ``node.receive_file(part, calling_ae="STOW-RS")``.
5. The temp folder is removed (always), then ``node.released(patient_ids)`` (when the node has it) for the
   patients of the stored instances (duplicates and conflicts included) — as an association release does.

Response (PS3.18 §10.5.3, Annex I): ``application/dicom+json`` Store Instances Response Module.  Retrieve URL
(0008,1190) is present and empty (Type 2; this service has no WADO-RS).  ReferencedSOPSequence (0008,1199):
stored instances, duplicates included.  FailedSOPSequence (0008,1198): refused ones, FailureReason (0008,1197) =
the DIMSE status (0xC000 → 49152); an unparseable part has no UIDs, only the FailureReason.  A SOPInstanceUID
received before with other content is kept as a conflict copy (as the DICOM node does) and referenced with
WarningReason (0008,1196) = 0xB00E (45070, implementation-specific "SOP Instance already exists with other
content": none of B000/B006/B007 of Table I.2-1 fits).  HTTP status: 200 all stored without warning, 202 some
stored with failures or warnings, 409 none stored (Table 10.5.3-1).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydicom import dcmread
from python_multipart.multipart import parse_options_header

from .. import intake
from ..auth import Principal
from ..config import Settings
from ..dicom_node import STATUS_SUCCESS, STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, DicomNode, valid_uid
from .deps import get_settings, require
from .multipart import stream_multipart
from .problems import ProblemError, responses

log = logging.getLogger("service.dicomweb")

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
CALLING_AE = "STOW-RS"  # instances.calling_ae is 16 characters: no room for the token name (it is logged instead)
MAX_PARTS = intake.MAX_FILES

# Failure Reason (0008,1197) values not produced by DicomNode.receive_file (PS3.18 Table I.2-2)
FAIL_PROCESSING = 0x0110  # general processing failure (an unexpected error storing this instance)
FAIL_SOP_CLASS = 0x0122  # Referenced SOP Class not supported
FAIL_TRANSFER_SYNTAX = 0xC122  # Referenced Transfer Syntax not supported
FAIL_CANNOT_UNDERSTAND = 0xC000  # not application/dicom
FAIL_STUDY_MISMATCH = 0xA901  # implementation-specific: StudyInstanceUID is not the {study} of the URL
# Warning Reason (0008,1196), implementation-specific: same SOPInstanceUID as a stored instance, other bytes;
# kept next to the first copy as a conflict (the first copy stays the one used).
WARN_CONFLICT = 0xB00E


# ------------------------------------------------------------------------------------- media types
def _params(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; k=v; k="v"`` → (lower-case media type, {lower-case key: value})."""
    mtype, opts = parse_options_header(value or "")
    return mtype.decode("latin-1"), {
        k.decode("latin-1").strip().lower(): v.decode("latin-1").strip() for k, v in opts.items()
    }


def _check_media_types(request: Request) -> bytes:
    """The multipart boundary; 415 / 406 / 400 when the request is not a STOW-RS request we answer."""
    mtype, params = _params(request.headers.get("content-type", ""))
    part_type = params.get("type", DICOM).lower()
    if mtype != "multipart/related" or part_type != DICOM:
        raise ProblemError(
            415,
            "Unsupported media type",
            f'send Content-Type: multipart/related; type="{DICOM}"; boundary=… (one PS3.10 instance a part); '
            f"got {mtype or 'none'}" + (f' with type="{part_type}"' if mtype == "multipart/related" else ""),
            slug="unsupported-media-type",
            expected=f'multipart/related; type="{DICOM}"',
        )
    if not _accepts_dicom_json(request.headers.get("accept", "")):
        raise ProblemError(
            406,
            "Not acceptable",
            f"the response is {DICOM_JSON} only; send Accept: {DICOM_JSON}",
            slug="not-acceptable",
            expected=DICOM_JSON,
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise ProblemError(400, "Bad request", "multipart/related without a boundary parameter", slug="bad-request")
    return boundary.encode("latin-1")


def _accepts_dicom_json(accept: str) -> bool:
    if not accept.strip():
        return True
    for item in accept.split(","):
        mtype, params = _params(item)
        if params.get("q") in ("0", "0.0", "0.00", "0.000"):
            continue
        if mtype in (DICOM_JSON, "application/json", "application/*", "*/*"):
            return True
    return False


# ------------------------------------------------------------------------------- multipart stream
@dataclass
class _Part:
    path: Path
    content_type: str = ""
    size: int = 0


@dataclass
class _Sink:
    """python-multipart callbacks: every part goes straight to a file of its own under ``tmp``."""

    tmp: Path
    parts: list[_Part] = field(default_factory=list)
    ended: bool = False
    _hname: bytes = b""
    _hvalue: bytes = b""
    _fh: IO[bytes] | None = None

    def on_part_begin(self) -> None:
        self.close()
        if len(self.parts) >= MAX_PARTS:
            raise ProblemError(
                413, "Upload too large", f"more than {MAX_PARTS} parts in one request", slug="upload-too-large"
            )
        part = _Part(self.tmp / f"part-{len(self.parts) + 1:06d}.dcm")
        self._fh = open(part.path, "xb")  # noqa: SIM115 - closed in on_part_end / close()
        self.parts.append(part)

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.strip().lower() == b"content-type" and self.parts:
            self.parts[-1].content_type = self._hvalue.decode("latin-1").strip()
        self._hname, self._hvalue = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is not None:
            self._fh.write(data[start:end])
            self.parts[-1].size += end - start

    def on_part_end(self) -> None:
        self.close()

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def _receive(request: Request, settings: Settings, boundary: bytes, tmp: Path) -> list[_Part]:
    """Stream the body into ``tmp`` (the caller creates and removes it); ProblemError on a bad body."""
    sink = _Sink(tmp)
    await stream_multipart(
        request,
        settings,
        boundary,
        sink,
        body="the request body",
        kind="multipart/related",
    )
    if not sink.ended:
        raise ProblemError(
            400, "Bad request", "the multipart/related body ends before its closing boundary", slug="bad-request"
        )
    if not sink.parts:
        raise ProblemError(400, "Bad request", "the multipart/related body holds no instance", slug="bad-request")
    return sink.parts


# ------------------------------------------------------------------------------------ storing
@dataclass
class _Result:
    sop_class: str | None
    sop_instance: str | None
    failure: int | None = None  # FailureReason when refused
    warning: int | None = None  # WarningReason when stored with a warning
    patient_id: str | None = None


def _peek(path: Path) -> tuple[str | None, str | None, str | None, str | None]:
    """(SOPClassUID, SOPInstanceUID, StudyInstanceUID, TransferSyntaxUID) from the file's header, each None when
    missing or not a valid UID; all None when the file is not PS3.10."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        values = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
        values.append(ds.file_meta.get("TransferSyntaxUID"))
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        return None, None, None, None
    out: list[str | None] = []
    for v in values:
        try:
            out.append(valid_uid(v))
        except Exception:  # noqa: BLE001
            out.append(None)
    return out[0], out[1], out[2], out[3]


def _store_one(node: DicomNode, part: _Part, study: str | None) -> _Result:
    """Check one part as an association's C-STORE would be checked (SOP class, transfer syntax), then store it."""
    ptype, _ = _params(part.content_type)
    sop_class, sop_instance, study_uid, ts = _peek(part.path)
    res = _Result(sop_class, sop_instance)
    if ptype and ptype != DICOM:
        res.failure = FAIL_CANNOT_UNDERSTAND
    elif sop_class is not None and sop_class not in STORAGE_SOP_CLASSES:
        res.failure = FAIL_SOP_CLASS
    elif sop_class is not None and ts is not None and ts not in TRANSFER_SYNTAXES:
        res.failure = FAIL_TRANSFER_SYNTAX
    elif study is not None and sop_class is not None and study_uid != study:
        res.failure = FAIL_STUDY_MISMATCH
    if res.failure is not None:
        return res
    try:
        outcome = node.receive_file(part.path, calling_ae=CALLING_AE)  # marked (quiet period); released() at the end
    except Exception:  # never let a bug look like success
        log.exception("STOW-RS: storing an instance failed unexpectedly")
        res.failure = FAIL_PROCESSING
        return res
    if outcome.status != STATUS_SUCCESS:
        res.failure = int(outcome.status)
        return res
    if outcome.result in ("conflict", "conflict-duplicate"):
        res.warning = WARN_CONFLICT
    res.patient_id = outcome.patient_id
    return res


def _store_all(node: DicomNode, parts: list[_Part], study: str | None) -> list[_Result]:
    return [_store_one(node, p, study) for p in parts]


# ----------------------------------------------------------------------------------- response
def _ui(v: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [v]}


def _ref(r: _Result) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if r.sop_class:
        item["00081150"] = _ui(r.sop_class)
    if r.sop_instance:
        item["00081155"] = _ui(r.sop_instance)
    return item


def response_module(results: list[_Result]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) as DICOM JSON (PS3.18 Annex F)."""
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}  # Retrieve URL, Type 2: no WADO-RS here, so empty
    failed = [{**_ref(r), "00081197": {"vr": "US", "Value": [r.failure]}} for r in results if r.failure is not None]
    stored = []
    for r in results:
        if r.failure is None:
            item = {**_ref(r), "00081190": {"vr": "UR"}}
            if r.warning is not None:
                item["00081196"] = {"vr": "US", "Value": [r.warning]}
            stored.append(item)
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    return dict(sorted(body.items()))  # DICOM JSON: attributes in tag order


def http_status(results: list[_Result]) -> int:
    stored = [r for r in results if r.failure is None]
    if not stored:
        return 409
    if len(stored) < len(results) or any(r.warning is not None for r in stored):
        return 202
    return 200


# -------------------------------------------------------------------------------------- routes
_DICOM_JSON_RESPONSE = {"content": {DICOM_JSON: {"schema": {"type": "object", "additionalProperties": True}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "every instance stored (duplicates included); Store Instances Response Module",
        **_DICOM_JSON_RESPONSE,
    },
    202: {
        "description": "some instances stored, others failed (FailedSOPSequence) or were stored with a warning "
        "(WarningReason)",
        **_DICOM_JSON_RESPONSE,
    },
    409: {"description": "no instance stored: FailedSOPSequence says why for each", **_DICOM_JSON_RESPONSE},
    **responses(400, 401, 403, 406, 413, 415, 507),
}
_DESCRIPTION = (
    "DICOMweb Store Transaction (STOW-RS, PS3.18 §10.5).  **Request body** (raw, not a form, so not described "
    'as an OpenAPI request body): `Content-Type: multipart/related; type="application/dicom"; boundary=…`, '
    "each part `Content-Type: application/dicom` holding one PS3.10 file (CT, NM, RT Structure Set, Segmentation "
    "or RT Dose; Explicit or Implicit VR Little Endian).  `Accept`, when sent, must allow `application/dicom+json`.  Instances go to the same store as "
    "the DICOM node's and trigger jobs like C-STOREd data.  Nothing is stored until the whole body has arrived "
    "(more than `max_upload_mb` → 413).  The answer is an `application/dicom+json` Store Instances Response "
    "Module: ReferencedSOPSequence (0008,1199) for stored instances (a resend of the same bytes too), "
    "FailedSOPSequence (0008,1198) with FailureReason (0008,1197) = the DIMSE status (0xC000 = 49152 unreadable "
    "or truncated, 0xA700 disk full, 0xA701 database, 0x0122 SOP class, 0xC122 transfer syntax, 0xA901 study "
    "mismatch); an instance whose SOPInstanceUID was received before with other content is kept as a conflict "
    "copy and referenced with WarningReason (0008,1196) 0xB00E = 45070.  **200** all stored, **202** some failed "
    "or have warnings, **409** none stored."
)


async def _stow(request: Request, who: Principal, study: str | None) -> Response:
    settings = get_settings(request)
    node: DicomNode = request.app.state.dicom_node
    boundary = _check_media_types(request)
    if study is not None and valid_uid(study) != study:
        raise ProblemError(
            400,
            "Bad request",
            "the study in the URL is not a valid UID (digits and dots, at most 64 characters)",
            slug="bad-request",
        )
    intake.check_free_disk(settings)
    # room for the temp copy and the stored copy
    intake.check_declared_size(settings, request.headers.get("content-length"), "the request body", copies=2)
    tmp = intake.new_temp_dir(settings, "stow-")
    try:
        parts = await _receive(request, settings, boundary, tmp)
        results = await run_in_threadpool(_store_all, node, parts, study)
    finally:
        await run_in_threadpool(shutil.rmtree, tmp, True)
    patients = {r.patient_id for r in results if r.failure is None and r.patient_id}
    if patients:
        try:
            await run_in_threadpool(node.released, patients)
        except Exception:  # the instances are stored; the trigger's failure is logged
            log.exception("STOW-RS: node.released failed")
    status = http_status(results)
    failed = sum(r.failure is not None for r in results)
    log.info(
        "STOW-RS by %s: %d parts, %d stored, %d failed, %d warnings → %d",
        who.name,
        len(results),
        len(results) - failed,
        failed,
        sum(r.warning is not None for r in results),
        status,
    )
    return Response(json.dumps(response_module(results)), status_code=status, media_type=DICOM_JSON)


@router.post(
    "/studies",
    summary="Store instances (DICOMweb STOW-RS)",
    description=_DESCRIPTION,
    responses=_RESPONSES,
    response_class=Response,
)
async def store_instances(request: Request, who: Principal = Depends(require("submitter"))) -> Response:
    return await _stow(request, who, None)


@router.post(
    "/studies/{study}",
    summary="Store instances of one study (DICOMweb STOW-RS)",
    description=_DESCRIPTION + "  Here every instance's StudyInstanceUID must be `{study}`; others fail (0xA901).",
    responses=_RESPONSES,
    response_class=Response,
)
async def store_study_instances(
    request: Request,
    study: str = PathParam(description="StudyInstanceUID every instance must have", max_length=64),
    who: Principal = Depends(require("submitter")),
) -> Response:
    return await _stow(request, who, study)
