"""Submitting a job over HTTP: a multipart upload (the API and the upload page) or named series (the API).

The web side of the intake: read the request (:mod:`service.web.multipart`), hand the files to the core, queue
the job in the store, and leave nothing behind when anything is refused.  An upload is answered as soon as its
files are on disk (fsync) and hashed (:func:`service.intake.persist_upload`): unpacking and the DICOM checks are
its job's first stage (:func:`service.intake.check_stage`, issue 15).  Named series are checked before the
answer (:func:`service.intake.validate_and_commit`, in a thread).
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
from ..store import IdempotencyKeyReused, JobRecord, KeyUse
from .deps import get_settings, get_store
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
    request: Request, body: SeriesRequest, raw: bytes, who: Principal, idempotency_key: str | None
) -> tuple[JobRecord, bool]:
    """Validate and queue a job on series already received by the DICOM node or STOW-RS (``raw``: the request
    body as sent, for its fingerprint).  Physicists and admins only: the caller checks the role first."""
    settings = get_settings(request)
    if "inputs" in body.spec:
        raise intake.invalid_spec("'spec' must not name 'inputs': the series named are the inputs")
    fingerprint = intake.series_fingerprint(raw) if idempotency_key is not None else None
    intake.check_free_disk(settings)
    received = await run_in_threadpool(intake.receive_series, get_store(request), body.series_instance_uids, settings)
    return await _commit(request, received, dict(body.spec), who, idempotency_key, fingerprint, source="api")


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
        digests = await run_in_threadpool(intake.file_digests, received.files)
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = intake.fingerprint_of(digests, fields)
    except BaseException:
        shutil.rmtree(received.tmp, ignore_errors=True)
        raise
    return await _persist(request, received, fields, digests, who, idempotency_key, fingerprint)


async def _persist(
    request: Request,
    received: intake.Received,
    fields: dict[str, Any],
    digests: list[str],
    who: Principal,
    idempotency_key: str | None,
    fingerprint: str | None,
) -> tuple[JobRecord, bool]:
    """Queue an upload's job once its files are safe on disk; its first stage checks them.  The rules of
    :func:`_commit`, with "the same input set" meaning the same files (by their bytes) here: the job's first stage
    applies the rule to the DICOM instances (:meth:`service.store.JobTable.intake_done`)."""
    settings = get_settings(request)
    store = get_store(request)
    dedup_within = None if who.at_least("physicist") else who.name
    try:
        if idempotency_key is not None:
            earlier = await run_in_threadpool(store.key_use, who.name, idempotency_key)
            if earlier is not None:
                if not earlier.same_request(fingerprint):
                    raise IdempotencyKeyReused(idempotency_key, earlier.job.id)
                shutil.rmtree(received.tmp, ignore_errors=True)  # a repeat: its files are the earlier job's
                return earlier.job, False
        saved = await run_in_threadpool(
            lambda: intake.persist_upload(received, fields, digests, settings, dedup_within=dedup_within)
        )
    except BaseException:
        shutil.rmtree(received.tmp, ignore_errors=True)  # never accepted: leave nothing behind
        raise
    try:
        rec, created = await run_in_threadpool(
            lambda: store.create_job(
                spec=saved.spec,
                input_dir=str(saved.input_dir),
                input_hash=saved.upload_hash,
                patient_id=None,
                idempotency_key=idempotency_key,
                submitted_by=who.name,
                source="upload",
                request_fingerprint=fingerprint,
                dedup_within=dedup_within,
                intake=saved.intake,
                upload_hash=saved.upload_hash,
            )
        )
    except BaseException:
        shutil.rmtree(saved.input_dir, ignore_errors=True)  # no job refers to it
        raise
    if not created and Path(rec.input_dir) != saved.input_dir:
        shutil.rmtree(saved.input_dir, ignore_errors=True)  # the same files as the existing job's input
    return rec, created


async def _commit(
    request: Request,
    received: intake.Received,
    fields: dict[str, Any],
    who: Principal,
    idempotency_key: str | None,
    fingerprint: str | None,
    *,
    source: str,
) -> tuple[JobRecord, bool]:
    """Queue the job, or answer with the caller's earlier one.

    - An ``Idempotency-Key`` belongs to its submitter (token name): the same key with the same request
      (``fingerprint``: :func:`service.intake.upload_fingerprint`, :func:`service.intake.series_fingerprint`)
      is the job the key got, at once (nothing is checked again, the repeat's files are dropped); with another
      request it is refused (422, :class:`~service.store.IdempotencyKeyReused`).  Another submitter's key is
      never looked at.
    - The same input set with the same job description as a queued, running or succeeded job is that job — for a
      submitter only among its own jobs: a submitter never learns whether someone else's job exists (its repeat of
      another's upload is a job of its own, answered exactly as a first upload is).
    """
    settings = get_settings(request)
    store = get_store(request)
    earlier: KeyUse | None = None
    try:
        if idempotency_key is not None:
            earlier = await run_in_threadpool(store.key_use, who.name, idempotency_key)
            if earlier is not None and not earlier.same_request(fingerprint):
                raise IdempotencyKeyReused(idempotency_key, earlier.job.id)
        if earlier is None:
            profiles = await run_in_threadpool(store.active_camera_profiles)
            accepted = await run_in_threadpool(intake.validate_and_commit, received, fields, settings, profiles)
    except BaseException:
        shutil.rmtree(received.tmp, ignore_errors=True)  # never accepted: leave nothing behind
        raise
    if earlier is not None:
        shutil.rmtree(received.tmp, ignore_errors=True)  # a repeat: its files are the earlier job's
        return earlier.job, False
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
                request_fingerprint=fingerprint,
                dedup_within=None if who.at_least("physicist") else who.name,
                camera_profile_id=accepted.camera_profile_id,
                camera_match=accepted.camera_match,
            )
        )
    except BaseException:
        shutil.rmtree(accepted.input_dir, ignore_errors=True)  # no job refers to it
        raise
    if not created and Path(rec.input_dir) != accepted.input_dir:
        shutil.rmtree(accepted.input_dir, ignore_errors=True)  # a duplicate of the existing job's input
    return rec, created
