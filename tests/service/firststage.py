"""An upload job's first stage (issue 15) run as the worker runs it, without Ray or a dispatcher: for the tests
of the web layer, whose jobs otherwise stay queued."""

from __future__ import annotations

from service.store import JobRecord, Store
from service.worker import JobOutcome, intake_stage


def run_first_stage(store: Store, job_id: str) -> JobRecord:
    """Claim the job, run :func:`service.worker.intake_stage` on it and record the outcome as the dispatcher does:
    a failure fails the job; else it goes back to queued (the rest of the job is not run).  Other jobs claimed on
    the way go back to queued untouched."""
    claimed = store.claim_queued(100)
    for j in claimed:
        if j.id != job_id:
            store.requeue(j.id, "test", count_attempt=False)
    (job,) = [j for j in claimed if j.id == job_id]
    out = intake_stage(job_id, job.spec, store)
    if isinstance(out, JobOutcome):
        assert out.error is not None and not out.internal, out
        store.fail(job_id, out.error)
    else:
        store.requeue(job_id, "test", count_attempt=False)
    rec = store.get_job(job_id)
    assert rec is not None
    return rec
