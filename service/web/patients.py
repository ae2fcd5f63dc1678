"""``/v1/patients/{patient_id}/cycles``: a patient's therapy cycles, cumulative dose and cycles left."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from ..auth import Principal
from ..store import Store
from .deps import get_store, require
from .problems import responses
from .views import PatientCycles, patient_cycles

router = APIRouter(prefix="/v1/patients", tags=["patients"])


@router.get(
    # ':path' because a patient ID may contain '/' (sent as %2F, which the server decodes before routing);
    # the route's '/cycles' suffix still ends the match, so "A/B" is read from /v1/patients/A%2FB/cycles.
    "/{patient_id:path}/cycles",
    response_model=PatientCycles,
    summary="A patient's cycles, cumulative dose and BED, and cycles left",
    description="From the patient's succeeded jobs (oldest first): each cycle's injected activity, kidney and "
    "marrow dose and kidney BED (the `cumulative.cycles` rows of the summaries), the totals and the cycles "
    "left from the newest job.  Physicist or admin.",
    responses=responses(401, 403, 404),
)
def get_cycles(
    patient_id: str = PathParam(max_length=64),
    who: Principal = Depends(require("physicist")),
    store: Store = Depends(get_store),
) -> PatientCycles:
    return patient_cycles(store, patient_id)
