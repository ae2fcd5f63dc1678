"""``/v1/jobs``: submit, list, read, cancel, and fetch a finished job's results."""

from __future__ import annotations

import inspect
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError

from .. import uploads
from ..models import utcnow
from .deps import Principal, get_store, may_read, principal, require
from .problems import PROBLEM_JSON, ProblemError, responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobLinks(BaseModel):
    self: str
    cancel: str
    summary: str | None = Field(None, description="present once the job succeeded")
    rtdose: str | None = None
    report: str | None = None
    page: str = Field(description="the job's web page")


class Delivery(BaseModel):
    """Sending the results (RT Dose, SEG, SR) to a DICOM destination."""

    destination: str = Field(description="AE@host:port")
    state: Literal["pending", "sent", "failed"] = Field(description="pending (retrying), sent, or failed (gave up)")
    attempts: int
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    sent_at: datetime | None = None


class Job(BaseModel):
    """A dosimetry job.  Timestamps are UTC (ISO 8601)."""

    id: str = Field(description="uuid4 hex")
    state: JobState
    stage: str | None = Field(None, description="current pipeline stage (ingest, quantify, register, …, done)")
    progress: float = Field(ge=0, le=1)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(ge=0, description="runs started (a lost worker's job is retried)")
    error: str | None = Field(None, description="why the job failed, for a physicist")
    patient_id: str | None = None
    idempotency_key: str | None = None
    input_hash: str = Field(description="SHA-256 over the sorted SOPInstanceUIDs of the input set")
    spec: dict[str, Any] = Field(description="the job description (JobSpec) without its input paths")
    submitted_by: str | None = Field(None, description="name of the token that submitted it")
    cancel_requested: bool
    has_result: bool = Field(description="summary, RT Dose and report are available")
    source: str | None = Field(
        None, description="upload (HTTP files), api (series named), dicom (started by the DICOM node)"
    )
    version: int | None = Field(None, description="jobs the DICOM node started: 1, 2, … per therapy cycle")
    supersedes: str | None = Field(None, description="the job of the previous version of this cycle")
    deliveries: list[Delivery] = Field(default_factory=list, description="results sent to the PACS (DICOM C-STORE)")
    links: JobLinks


class JobList(BaseModel):
    items: list[Job]
    total: int = Field(description="jobs matching the filter (all pages)")
    limit: int
    offset: int


class SeriesRequest(BaseModel):
    """Name series already received by the service (the DICOM node) instead of uploading files."""

    series_instance_uids: list[str] = Field(min_length=1)
    spec: dict[str, Any] = Field(default_factory=dict, description="JobSpec fields except inputs")


def job_out(rec: Any, deliveries: list[dict] | None = None) -> Job:
    base = f"/v1/jobs/{rec.id}"
    done = rec.state == "succeeded" and rec.result_dir is not None
    spec = {k: v for k, v in (rec.spec or {}).items() if k != "inputs"}
    return Job(
        id=rec.id,
        state=rec.state,
        stage=rec.stage,
        progress=min(1.0, max(0.0, rec.progress or 0.0)),
        created_at=rec.created_at,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        attempts=rec.attempts,
        error=rec.error,
        patient_id=rec.patient_id,
        idempotency_key=rec.idempotency_key,
        input_hash=rec.input_hash,
        spec=spec,
        submitted_by=rec.submitted_by,
        cancel_requested=rec.cancel_requested,
        has_result=done,
        source=getattr(rec, "source", None),
        version=getattr(rec, "version", None),
        supersedes=getattr(rec, "supersedes", None),
        deliveries=[Delivery.model_validate(d) for d in deliveries or []],
        links=JobLinks(
            self=base,
            cancel=f"{base}/cancel",
            page=f"/jobs/{rec.id}",
            summary=f"{base}/summary" if done else None,
            rtdose=f"{base}/rtdose" if done else None,
            report=f"{base}/report" if done else None,
        ),
    )


def not_found(job_id: str) -> ProblemError:
    return ProblemError(404, "Not found", f"no job {job_id}", slug="not-found")


def readable_job(store: Any, job_id: str, who: Principal) -> Any:
    """The job, or 404 — also for a submitter asking for someone else's job (its existence is not revealed)."""
    rec = store.get_job(job_id)
    if rec is None or not may_read(who, rec):
        raise not_found(job_id)
    return rec


def list_visible(
    store: Any, who: Principal, *, state: str | None, patient_id: str | None, limit: int, offset: int
) -> tuple[list[Any], int]:
    """Jobs the caller may see: all for physicists/admins, their own for submitters."""
    if who.at_least("physicist"):
        return store.list_jobs(state=state, patient_id=patient_id, limit=limit, offset=offset)
    if "submitted_by" in inspect.signature(store.list_jobs).parameters:
        return store.list_jobs(state=state, patient_id=patient_id, limit=limit, offset=offset, submitted_by=who.name)
    # the store cannot filter by submitter: page through and filter here
    own: list[Any] = []
    page, start = 500, 0
    while True:
        rows, total = store.list_jobs(state=state, patient_id=patient_id, limit=page, offset=start)
        own += [r for r in rows if r.submitted_by == who.name]
        start += page
        if start >= total or not rows:
            break
    return own[offset : offset + limit], len(own)


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "DICOM files (SPECT, CT, RTSTRUCT/SEG of one cycle), or one .zip",
                    },
                    "spec": {
                        "type": "string",
                        "description": 'JSON object of JobSpec fields except "inputs", '
                        'e.g. {"calibration": {"cps_per_mbq": 5.67}, "fit": {"model": "auto"}}',
                    },
                },
            },
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/SeriesRequest"}},
    },
}


@router.post(
    "",
    status_code=202,
    response_model=Job,
    summary="Submit a job (upload DICOM files or one .zip)",
    description=(
        "Multipart upload: `files` (DICOM files of one therapy cycle, or a single .zip) and optional `spec` "
        "(JSON of JobSpec fields except `inputs`).  The files are checked (DICOM, one patient, one injection, at "
        "least one reconstructed SPECT, a calibration for count images) before the job is queued.  "
        "Answers **202** with `Location` for a new job.  The same `Idempotency-Key`, or the same input set with "
        "the same spec as a queued/running/succeeded job, answers **200** with that existing job (same id, "
        "same `Location`; the duplicate upload is discarded).  Instead of files, a JSON body may name "
        "`series_instance_uids` already received by the DICOM node or STOW-RS (404 for a series not received), "
        "with the same checks."
    ),
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        200: {"model": Job, "description": "the existing job (idempotent repeat)"},
        **responses(400, 401, 403, 404, 413, 415, 422, 507),
    },
)
async def submit_job(
    request: Request,
    response: Response,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255),
    who: Principal = Depends(require("submitter")),
) -> Job:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = SeriesRequest.model_validate_json(await request.body())
        except ValidationError:
            raise  # → 422 with the field errors
        except (ValueError, TypeError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ProblemError(400, "Bad request", "the body is not valid JSON", slug="bad-request") from None
        rec, created = await accept_series(request, body, who, idempotency_key)
    else:
        rec, created = await accept_upload(request, who, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{rec.id}"
    return job_out(rec)


async def accept_series(
    request: Request, body: SeriesRequest, who: Principal, idempotency_key: str | None
) -> tuple[Any, bool]:
    """Validate and queue a job on series already received by the DICOM node or STOW-RS."""
    settings = request.app.state.settings
    store = request.app.state.store
    if "inputs" in body.spec:
        raise uploads.invalid(
            "'spec' must not name 'inputs': the series named are the inputs",
            slug="invalid-spec",
            title="Invalid job description",
        )
    uploads.check_free_disk(settings)
    received = await run_in_threadpool(uploads.receive_series, store, body.series_instance_uids, settings)
    return await _commit(request, received, dict(body.spec), who, idempotency_key, source="api")


async def accept_upload(request: Request, who: Principal, idempotency_key: str | None) -> tuple[Any, bool]:
    """Receive, validate and queue a multipart upload (used by the API and the upload page)."""
    settings = request.app.state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ProblemError(
            415,
            "Unsupported media type",
            "send multipart/form-data (field 'files', optional 'spec') or application/json",
            slug="unsupported-media-type",
        )
    uploads.check_free_disk(settings)
    length = request.headers.get("content-length")
    if length and length.isdigit():
        if int(length) > int(settings.max_upload_mb) * uploads.MB:
            raise uploads.too_large(settings, "the upload")
        uploads.check_free_disk(settings, extra_bytes=int(length))
    received = await uploads.receive_multipart(request, settings)
    try:
        fields = uploads.parse_spec_fields(received.spec_text)
    except BaseException:
        shutil.rmtree(received.tmp, ignore_errors=True)
        raise
    return await _commit(request, received, fields, who, idempotency_key, source="upload")


async def _commit(
    request: Request, received: Any, fields: dict[str, Any], who: Principal, idempotency_key: str | None, *, source: str
) -> tuple[Any, bool]:
    settings = request.app.state.settings
    store = request.app.state.store
    try:
        accepted = await run_in_threadpool(uploads.validate_and_commit, received, fields, settings)
    except BaseException:
        shutil.rmtree(received.tmp, ignore_errors=True)  # never accepted: leave nothing behind
        raise
    try:
        rec, created = await run_in_threadpool(
            lambda: store.create_job(
                spec=accepted.spec,
                input_dir=str(accepted.input_dir),
                input_hash=accepted.input_hash,
                patient_id=accepted.patient_id,
                idempotency_key=idempotency_key,
                submitted_by=who.name,
                source=source,
            )
        )
    except BaseException:
        shutil.rmtree(accepted.input_dir, ignore_errors=True)  # no job refers to it
        raise
    if not created:
        if Path(rec.input_dir) != accepted.input_dir:
            shutil.rmtree(accepted.input_dir, ignore_errors=True)  # a duplicate of the existing job's input
        if not may_read(who, rec):
            raise ProblemError(
                409, "Conflict", "this Idempotency-Key or input set belongs to another submitter's job", slug="conflict"
            )
    return rec, created


@router.get("", response_model=JobList, summary="List jobs (newest first)", responses=responses(401, 403, 422))
def list_jobs(
    state: JobState | None = Query(None),
    patient_id: str | None = Query(None, max_length=64),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10_000_000),
    who: Principal = Depends(principal),
    store: Any = Depends(get_store),
) -> JobList:
    rows, total = list_visible(store, who, state=state, patient_id=patient_id, limit=limit, offset=offset)
    return JobList(items=[job_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=Job, summary="One job", responses=responses(401, 404))
def get_job(job_id: str, who: Principal = Depends(principal), store: Any = Depends(get_store)) -> Job:
    rec = readable_job(store, job_id, who)
    return job_out(rec, store.job_deliveries(rec.id))


@router.post(
    "/{job_id}/send",
    response_model=Job,
    summary="Send the results to the PACS again",
    description="Queues the job's results (RT Dose, SEG, SR) for the configured DICOM destination: a job never "
    "sent there (e.g. uploaded, or older than `dicom_send_max_age_h`) gets a delivery, failed deliveries go back "
    "to pending; the sender's next round sends them.  409 when there is nothing to send.  Physicist or admin.",
    responses=responses(401, 403, 404, 409),
)
def resend_job(
    request: Request, job_id: str, who: Principal = Depends(require("physicist")), store: Any = Depends(get_store)
) -> Job:
    rec = readable_job(store, job_id, who)
    now = utcnow()
    dest = request.app.state.settings.dicom_destination
    queued = 0
    if dest and rec.state == "succeeded" and rec.result_dir:
        queued = int(store.add_delivery(job_id, dest, now))  # a job never sent (older, or uploaded): send it now
    if not queued and not store.retry_delivery(job_id, now):
        why = (
            "no DICOM destination is configured"
            if not dest
            else "it has no failed delivery and was sent"
            if rec.state == "succeeded"
            else f"it is {rec.state}"
        )
        raise ProblemError(409, "Nothing to send", f"job {job_id}: nothing to send ({why})", slug="nothing-to-send")
    return job_out(rec, store.job_deliveries(rec.id))


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one is stopped by the dispatcher "
    "(`cancel_requested` true until then); a finished job is returned unchanged.  Physicist or admin.",
    responses=responses(401, 403, 404),
)
def cancel_job(job_id: str, who: Principal = Depends(require("physicist")), store: Any = Depends(get_store)) -> Job:
    rec = store.request_cancel(job_id)
    if rec is None:
        raise not_found(job_id)
    return job_out(rec)


def _result_file(store: Any, job_id: str, who: Principal, name: str) -> Path:
    rec = readable_job(store, job_id, who)
    if rec.state != "succeeded" or not rec.result_dir:
        detail = f"job not finished: job {job_id} is {rec.state}"
        if rec.state in ("failed", "cancelled"):
            detail += " and has no results" + (f" ({rec.error})" if rec.error else "")
        raise ProblemError(409, "Job not finished", detail, slug="job-not-finished", state=rec.state)
    path = Path(rec.result_dir) / name
    if not path.is_file():
        raise ProblemError(404, "Not found", f"job {job_id} has no {name}", slug="not-found")
    return path


@router.get(
    "/{job_id}/summary",
    summary="The job's summary.json (schema voxeldose.summary/1, see README)",
    response_model=dict[str, Any],
    responses=responses(401, 404, 409),
)
def get_summary(job_id: str, who: Principal = Depends(principal), store: Any = Depends(get_store)) -> Response:
    path = _result_file(store, job_id, who, "summary.json")
    return Response(path.read_bytes(), media_type="application/json")


@router.get(
    "/{job_id}/rtdose",
    summary="The RT Dose object (DICOM, Gy)",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}}},
            "description": "RT Dose",
        },
        **responses(401, 404, 409),
    },
)
def get_rtdose(job_id: str, who: Principal = Depends(principal), store: Any = Depends(get_store)) -> FileResponse:
    path = _result_file(store, job_id, who, "rtdose.dcm")
    return FileResponse(path, media_type="application/dicom", filename=f"rtdose-{job_id}.dcm")


@router.get(
    "/{job_id}/report",
    summary="The self-contained HTML report",
    response_class=FileResponse,
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "report"},
        **responses(401, 404, 409),
    },
)
def get_report(job_id: str, who: Principal = Depends(principal), store: Any = Depends(get_store)) -> FileResponse:
    path = _result_file(store, job_id, who, "report.html")
    resp = FileResponse(path, media_type="text/html; charset=utf-8")
    # the report is ours, self-contained: no scripts from elsewhere, framed only by our own pages
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; frame-ancestors 'self'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def load_summary(rec: Any) -> dict[str, Any] | None:
    """The job's summary.json, or None (see :meth:`service.store.JobRecord.summary`)."""
    return rec.summary()
    p = Path(rec.result_dir) / "summary.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


_ = PROBLEM_JSON
