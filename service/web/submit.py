"""Submitting a job over HTTP: a multipart upload (the API and the upload page) or named series (the API).

The web side of the intake: read the request (:mod:`service.web.multipart`), hand the files to the core
(:func:`service.intake.validate_and_commit`, in a thread), queue the job in the store, and leave nothing
behind when anything is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .. import intake
from ..auth import Principal
from ..store import JobRecord
from .deps import get_settings, get_store, may_read
from .multipart import receive_multipart
from .problems import ProblemError


class SeriesRequest(BaseModel):
    """Name series already received by the service (the DICOM node) instead of uploading files."""

    series_instance_uids: list[str] = Field(min_length=1)
    spec: dict[str, Any] = Field(default_factory=dict, description="JobSpec fields except inputs")


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def accept_series(
    request: Request, body: SeriesRequest, who: Principal, idempotency_key: str | None
) -> tuple[JobRecord, bool]:
    """Validate and queue a job on series already received by the DICOM node or STOW-RS."""
    settings = get_settings(request)
    if "inputs" in body.spec:
        raise intake.invalid_spec("'spec' must not name 'inputs': the series named are the inputs")
    intake.check_free_disk(settings)
    received = await run_in_threadpool(intake.receive_series, get_store(request), body.series_instance_uids, settings)
    return await _commit(request, received, dict(body.spec), who, idempotency_key, source="api")


async def accept_upload(request: Request, who: Principal, idempotency_key: str | None) -> tuple[JobRecord, bool]:
    """Receive, validate and queue a multipart upload (used by the API and the upload page)."""
    settings = get_settings(request)
    if media_type(request) != "multipart/form-data":
        raise ProblemError(
            415,
            "Unsupported media type",
            "send multipart/form-data (field 'files', optional 'spec') or application/json",
            slug="unsupported-media-type",
        )
    intake.check_free_disk(settings)
    intake.check_declared_size(settings, request.headers.get("content-length"), "the upload")
    received = await receive_multipart(request, settings)
    try:
        fields = intake.parse_spec_fields(received.spec_text)
    except BaseException:
        shutil.rmtree(received.tmp, ignore_errors=True)
        raise
    return await _commit(request, received, fields, who, idempotency_key, source="upload")


async def _commit(
    request: Request,
    received: intake.Received,
    fields: dict[str, Any],
    who: Principal,
    idempotency_key: str | None,
    *,
    source: str,
) -> tuple[JobRecord, bool]:
    settings = get_settings(request)
    store = get_store(request)
    try:
        accepted = await run_in_threadpool(intake.validate_and_commit, received, fields, settings)
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
