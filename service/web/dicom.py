"""``/v1/dicom``: what the DICOM node received and what its trigger decided (physicist or admin)."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from ..auth import Principal
from ..store import Store, message_without_paths
from .deps import get_settings, get_store, require
from .problems import responses

router = APIRouter(prefix="/v1/dicom", tags=["dicom"])


class TriggerCycle(BaseModel):
    """One therapy cycle (patient + injection) as the trigger sees it."""

    cycle_key: str = Field(description="SHA-256 of patient ID and injection date-time")
    patient_id: str
    injection: str | None = Field(None, description="injection date-time, local, as in DICOM (ISO 8601)")
    state: Literal["waiting", "started", "error"]
    reason: str | None = Field(None, description="why it waits, which job it started, or why it cannot form a cycle")
    timepoints: int = Field(description="SPECT time points with their CT")
    job_id: str | None = Field(None, description="the newest job it started")
    first_seen_at: datetime
    evaluated_at: datetime
    deadline_at: datetime | None = Field(None, description="when a waiting cycle starts with what exists")


class ReceivedSeries(BaseModel):
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None = None
    modality: str | None = None
    instances: int
    conflicts: int = Field(description="instances received again with different content (kept, flagged)")
    first_received_at: datetime | None = None
    last_received_at: datetime | None = None


@router.get(
    "/cycles",
    response_model=list[TriggerCycle],
    summary="Therapy cycles received through the DICOM node, and the trigger's decision",
    responses=responses(401, 403, 422),
)
def list_cycles(
    request: Request,
    patient_id: str | None = Query(None, max_length=64),
    state: Literal["waiting", "started", "error"] | None = Query(None),
    who: Principal = Depends(require("physicist")),
    store: Store = Depends(get_store),
) -> list[TriggerCycle]:
    rows = store.trigger_cycles(patient_id=patient_id)
    data_dir = str(get_settings(request).data_dir)
    return [
        TriggerCycle.model_validate({**r, "reason": _shown(r["reason"], data_dir)})
        for r in rows
        if state is None or r["state"] == state
    ]


def _shown(reason: str | None, data_dir: str) -> str | None:
    """A cycle's reason as shown: also one stored by an older version names no server path (the data folder
    first, whatever its name holds, then any absolute path: :func:`service.store.message_without_paths`)."""
    if reason is None:
        return None
    return message_without_paths(reason.replace(data_dir + os.sep, "").replace(data_dir, "the data folder"))


@router.get(
    "/series",
    response_model=list[ReceivedSeries],
    summary="Series received (DICOM node, STOW-RS), oldest first",
    responses=responses(401, 403, 422),
)
def list_series(
    patient_id: str | None = Query(None, max_length=64),
    study_instance_uid: str | None = Query(None, max_length=64),
    who: Principal = Depends(require("physicist")),
    store: Store = Depends(get_store),
) -> list[ReceivedSeries]:
    rows = store.series_summary(study_instance_uid=study_instance_uid, patient_id=patient_id)
    return [ReceivedSeries.model_validate(r) for r in rows]
