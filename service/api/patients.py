"""``/v1/patients/{patient_id}/cycles``: a patient's therapy cycles, cumulative dose and cycles left."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from .deps import Principal, get_store, require
from .jobs import load_summary
from .problems import ProblemError, responses

router = APIRouter(prefix="/v1/patients", tags=["patients"])


class CycleRow(BaseModel):
    number: int | None = Field(None, description="therapy cycle number")
    date: str | None = Field(None, description="injection date (YYYY-MM-DD)")
    activity_mbq: float | None = None
    kidney_gy: float | None = None
    kidney_bed_gy: float | None = None
    marrow_gy: float | None = None
    job_id: str | None = Field(
        None, description="the job that measured this cycle (none for cycles only given as earlier cycles in a job)"
    )
    gy_per_gbq: dict[str, float] = Field(default_factory=dict, description="kidney/marrow absorbed dose per GBq")


class Totals(BaseModel):
    kidney_gy: float | None = None
    kidney_bed_gy: float | None = None
    marrow_gy: float | None = None
    activity_mbq: float | None = None


class LimitRow(BaseModel):
    limit: str
    limit_gy: float | None = None
    current_gy: float | None = None
    per_cycle_gy: float | None = None
    cycles_left: int | None = None
    exceeded: bool | None = None
    message: str | None = None
    source: str | None = None


class PatientCycles(BaseModel):
    patient_id: str
    patient_name: str | None = None
    cycles: list[CycleRow] = Field(description="one row per cycle, in cycle order")
    cumulative: Totals = Field(description="totals over all cycles, from the newest job")
    limits: list[LimitRow] = Field(default_factory=list, description="each limit, from the newest job")
    cycles_left: int | None = Field(None, description="further cycles at the planned activity (newest job)")
    binding_limit: str | None = None
    planned_activity_mbq: float | None = None
    message: str | None = None
    newest_job_id: str | None = None


def _f(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def patient_cycles(store: Any, patient_id: str) -> PatientCycles:
    jobs = store.patient_jobs(patient_id)
    if not jobs:
        raise ProblemError(404, "Not found", f"no finished dosimetry for patient {patient_id}", slug="not-found")
    rows: dict[int | None, CycleRow] = {}
    newest: dict[str, Any] | None = None
    newest_job = None
    name = None
    for rec in jobs:  # oldest first: a later job's row for the same cycle number replaces an earlier one
        summary = load_summary(rec)
        if summary is None:
            continue
        newest, newest_job = summary, rec
        name = (summary.get("patient") or {}).get("name") or name
        this_number = (summary.get("cycle") or {}).get("number")
        cum = summary.get("cumulative") or {}
        for c in cum.get("cycles") or []:
            n = c.get("number")
            measured_here = n == this_number
            if n in rows and rows[n].job_id is not None and not measured_here:
                continue  # keep the row of the job that measured that cycle
            row = CycleRow(
                number=n,
                date=c.get("date"),
                activity_mbq=_f(c.get("activity_MBq")),
                kidney_gy=_f(c.get("kidney_gy")),
                kidney_bed_gy=_f(c.get("kidney_bed_gy")),
                marrow_gy=_f(c.get("marrow_gy")),
                job_id=rec.id if measured_here else None,
            )
            if measured_here and row.activity_mbq:
                gbq = row.activity_mbq / 1000.0
                row.gy_per_gbq = {
                    k: v / gbq for k, v in (("kidney", row.kidney_gy), ("marrow", row.marrow_gy)) if v is not None
                }
            rows[n] = row
    if newest is None:
        raise ProblemError(
            404, "Not found", f"the results of patient {patient_id}'s jobs are missing", slug="not-found"
        )
    cum = newest.get("cumulative") or {}
    total = cum.get("total") or {}
    left = cum.get("cycles_left") or {}
    limits = [
        LimitRow(
            limit=str(x.get("limit")),
            limit_gy=_f(x.get("limit_gy")),
            current_gy=_f(x.get("current_gy")),
            per_cycle_gy=_f(x.get("per_cycle_gy")),
            cycles_left=x.get("cycles_left"),
            exceeded=x.get("exceeded"),
            message=x.get("message"),
            source=x.get("source"),
        )
        for x in left.get("limits") or []
        if isinstance(x, dict)
    ]
    return PatientCycles(
        patient_id=patient_id,
        patient_name=name,
        cycles=sorted(rows.values(), key=lambda r: (r.number is None, r.number or 0)),
        cumulative=Totals(
            kidney_gy=_f((total.get("dose_gy") or {}).get("kidney")),
            marrow_gy=_f((total.get("dose_gy") or {}).get("marrow")),
            kidney_bed_gy=_f((total.get("bed_gy") or {}).get("kidney")),
            activity_mbq=_f(total.get("activity_MBq")),
        ),
        limits=limits,
        cycles_left=left.get("cycles_left"),
        binding_limit=left.get("binding_limit"),
        planned_activity_mbq=_f(cum.get("planned_activity_MBq")),
        message=left.get("message"),
        newest_job_id=newest_job.id if newest_job else None,
    )


@router.get(
    "/{patient_id}/cycles",
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
    store: Any = Depends(get_store),
) -> PatientCycles:
    return patient_cycles(store, patient_id)
