"""``/v1/jobs``: submit, list, read, cancel, and fetch a finished job's results."""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from voxeldose.errors import VoxeldoseError
from voxeldose.viewer import write_viewer_volumes

from .. import approval, intake
from ..auth import Principal
from ..models import utcnow
from ..store import Store
from ..store.approvals import MAX_REASON
from .deps import get_settings, get_store, principal, require
from .problems import ProblemError, responses
from .submit import SeriesRequest, accept_series, accept_upload, media_type
from .views import MAX_LIMIT, MAX_OFFSET, Job, JobList, JobState, job_out, list_visible, not_found, readable_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

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
        "Answers **202** with `Location` for a new job.  The same `Idempotency-Key` (keys are per token name) "
        "with the same request — the same files (by content, in any order and under any names) and the same "
        "`spec` JSON, or the same JSON body — answers **200** with the job that key created (same id, same "
        "`Location`; the repeat's files are discarded); the same key with another request is **422** "
        "(`idempotency-key-reused`).  The same input set with the same spec as a queued/running/succeeded job "
        "answers **200** with that job — for a submitter only among its own jobs.  Instead of files, a JSON body "
        "may name `series_instance_uids` already received by the DICOM node or STOW-RS (physicist or admin: 403 "
        "for a submitter, whatever it names; 404 for a series not received), with the same checks."
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
    if media_type(request) == "application/json":
        if not who.at_least("physicist"):  # before the body is read: the answer says nothing about the series
            raise ProblemError(
                403,
                "Forbidden",
                f"the role {who.role!r} may not start jobs on series the DICOM node received; it needs 'physicist' "
                "or above (upload the files instead)",
                slug="forbidden",
            )
        raw = await request.body()
        intake.check_nesting(raw.decode("utf-8", "replace"), "the request body")
        try:
            body = SeriesRequest.model_validate_json(raw)
        except ValidationError:
            raise  # → 422 with the field errors
        except (ValueError, TypeError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ProblemError(400, "Bad request", "the body is not valid JSON", slug="bad-request") from None
        rec, created = await accept_series(request, body, raw, who, idempotency_key)
    else:
        rec, created = await accept_upload(request, who, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{rec.id}"
    return job_out(rec)


@router.get("", response_model=JobList, summary="List jobs (newest first)", responses=responses(401, 403, 422))
def list_jobs(
    state: JobState | None = Query(None),
    patient_id: str | None = Query(None, max_length=64),
    limit: int = Query(50, ge=1, le=MAX_LIMIT),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    who: Principal = Depends(principal),
    store: Store = Depends(get_store),
) -> JobList:
    rows, total = list_visible(store, who, state=state, patient_id=patient_id, limit=limit, offset=offset)
    return JobList(items=[job_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=Job, summary="One job", responses=responses(401, 404))
def get_job(job_id: str, who: Principal = Depends(principal), store: Store = Depends(get_store)) -> Job:
    rec = readable_job(store, job_id, who)
    return job_out(rec, store.job_deliveries(rec.id), store.review_history(rec.id))


class ReviewRequest(BaseModel):
    """A physicist's decision on a job's result."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approved", "rejected", "revoked"] = Field(
        description="approved; rejected (reason required); revoked (back to unreviewed, reason required)"
    )
    reason: str | None = Field(None, max_length=MAX_REASON, description="why (required unless approving)")


class AuditEventOut(BaseModel):
    """One entry of the audit trail."""

    id: int
    at: datetime
    actor: str = Field(description="name of the token")
    actor_role: str | None = None
    action: str = Field(description="e.g. job.approved, job.rejected, job.revoked")
    job_id: str | None = None
    detail: dict[str, Any] | None = None


@router.post(
    "/{job_id}/review",
    response_model=Job,
    summary="Approve or reject a job's result (physicist)",
    description="Records a physicist's decision on the job's result, with who and when, in the job's review "
    "history and the audit trail.  `approved`: the sender then sends the approved SR (VERIFIED, FINAL, with the "
    "Verifying Observer Sequence) and RT Dose.  `rejected` and `revoked` need a `reason`; `revoked` takes the "
    "job back to unreviewed.  409 when the job has no result or the decision equals its state.  A submitter: 403.",
    responses=responses(400, 401, 403, 404, 409, 422),
)
def review_job(
    request: Request,
    job_id: str,
    body: ReviewRequest,
    who: Principal = Depends(require(approval.REVIEWER_ROLE)),
    store: Store = Depends(get_store),
) -> Job:
    readable_job(store, job_id, who)
    approval.decide(get_settings(request), store, job_id, who, body.decision, body.reason)
    rec = readable_job(store, job_id, who)
    return job_out(rec, store.job_deliveries(rec.id), store.review_history(rec.id))


@router.get(
    "/{job_id}/audit",
    response_model=list[AuditEventOut],
    summary="The job's audit trail, newest first (physicist)",
    responses=responses(401, 403, 404),
)
def job_audit(
    job_id: str, who: Principal = Depends(require(approval.REVIEWER_ROLE)), store: Store = Depends(get_store)
) -> list[AuditEventOut]:
    readable_job(store, job_id, who)
    return [AuditEventOut.model_validate(e, from_attributes=True) for e in store.audit_events(job_id=job_id)]


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
    request: Request, job_id: str, who: Principal = Depends(require("physicist")), store: Store = Depends(get_store)
) -> Job:
    rec = readable_job(store, job_id, who)
    now = utcnow()
    dest = get_settings(request).dicom_destination
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
def cancel_job(job_id: str, who: Principal = Depends(require("physicist")), store: Store = Depends(get_store)) -> Job:
    rec = store.request_cancel(job_id)
    if rec is None:
        raise not_found(job_id)
    return job_out(rec)


def _result_file(store: Store, job_id: str, who: Principal, name: str) -> Path:
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
    summary="The job's summary.json (schema voxeldose.summary/3, docs/summary.schema.json)",
    response_model=dict[str, Any],
    responses=responses(401, 404, 409),
)
def get_summary(job_id: str, who: Principal = Depends(principal), store: Store = Depends(get_store)) -> Response:
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
def get_rtdose(job_id: str, who: Principal = Depends(principal), store: Store = Depends(get_store)) -> FileResponse:
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
def get_report(job_id: str, who: Principal = Depends(principal), store: Store = Depends(get_store)) -> FileResponse:
    path = _result_file(store, job_id, who, "report.html")
    resp = FileResponse(path, media_type="text/html; charset=utf-8")
    # the report is ours, self-contained: no scripts from elsewhere, framed only by our own pages
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; frame-ancestors 'self'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


# ------------------------------------------------------------------------------------------ viewer
class ViewerVolume(BaseModel):
    url: str = Field(description="NIfTI-1 (.nii.gz) on the dose grid")


class ViewerManifest(BaseModel):
    """What the job page's slice viewer loads (:mod:`voxeldose.viewer`): CT, dose and VOI labels on one grid."""

    volumes: dict[str, ViewerVolume] = Field(description="ct (HU), dose (Gy), vois (label map); those available")
    labels: dict[int, str] = Field(description="VOI name of each label value of the vois volume")
    dose_max_gy: float


def _viewer_dir(store: Store, job_id: str, who: Principal) -> tuple[Path, ViewerManifest]:
    """The job's viewer volumes, written on the first request (into ``<result dir>/viewer``)."""
    result = _result_file(store, job_id, who, "rtdose.dcm").parent
    rec = readable_job(store, job_id, who)
    out = result / "viewer"
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        tmp = result / f"viewer.tmp-{uuid.uuid4().hex[:8]}"
        try:
            made = write_viewer_volumes(result, Path(rec.input_dir), tmp)
        except VoxeldoseError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ProblemError(
                409, "No viewer volumes", f"job {job_id}: {err.reason}", slug="no-viewer-volumes"
            ) from None
        base = f"/v1/jobs/{job_id}/viewer"
        manifest = ViewerManifest(
            volumes={name: ViewerVolume(url=f"{base}/{name}.nii.gz") for name in made.files},
            labels=made.labels,
            dose_max_gy=made.dose_max_gy,
        )
        (tmp / "manifest.json").write_text(manifest.model_dump_json())
        try:
            os.replace(tmp, out)  # another request may have written it first: then keep that one
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, ViewerManifest.model_validate_json(manifest_path.read_text())


@router.get(
    "/{job_id}/viewer",
    response_model=ViewerManifest,
    summary="The slice viewer's volumes (CT, dose, VOI labels as NIfTI on the dose grid)",
    responses=responses(401, 404, 409),
)
def get_viewer(job_id: str, who: Principal = Depends(principal), store: Store = Depends(get_store)) -> ViewerManifest:
    return _viewer_dir(store, job_id, who)[1]


@router.get(
    "/{job_id}/viewer/{name}.nii.gz",
    summary="One viewer volume (NIfTI-1, gzip)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
        **responses(401, 404, 409),
    },
)
def get_viewer_volume(
    job_id: str,
    name: Literal["ct", "dose", "vois"],
    who: Principal = Depends(principal),
    store: Store = Depends(get_store),
) -> FileResponse:
    folder, manifest = _viewer_dir(store, job_id, who)
    if name not in manifest.volumes:
        raise ProblemError(404, "Not found", f"job {job_id} has no {name} volume", slug="not-found")
    return FileResponse(folder / f"{name}.nii.gz", media_type="application/gzip")
