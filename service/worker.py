"""The Ray task: one job = :func:`voxeldose.pipeline.run` + :func:`voxeldose.pipeline.write_outputs`.

:func:`run_job` is a plain function (tests call it directly); :func:`remote_run_job` wraps it in
``ray.remote`` on first use, so importing this module needs neither Ray running nor Ray installed.

It reports progress into the job store (opened here from the database URL: in-process SQLite for
the embedded service, PostgreSQL for a cluster), writes the outputs into a temporary folder beside
``out_dir`` and renames it into place, and *returns* the outcome of the dosimetry — bad input
(:class:`~voxeldose.errors.VoxeldoseError`) and bugs alike — as a small dict; the dispatcher records
it.  Only the loss of the worker itself (crash, kill, node death) surfaces as a Ray exception, which
the dispatcher retries.  Nothing under the job's inputs is ever touched.  Logs carry the job id only.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydicom import dcmread

from voxeldose.errors import VoxeldoseError
from voxeldose.outputs import write_pacs_objects
from voxeldose.pipeline import STAGES, Result, run, write_outputs

from .errors import IntakeError
from .intake import DuplicateInput, check_stage
from .logs import setup_worker_logging
from .store import Store, without_paths

log = logging.getLogger("service.worker")

INTERNAL_ERROR = "internal error while computing the dose (job {job_id}); the service log has the details"

_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()
_remote: Any = None


def _store(database_url: str) -> Store:
    """One Store (engine, pool) per worker process and database."""
    with _stores_lock:
        st = _stores.get(database_url)
        if st is None:
            st = _stores[database_url] = Store(database_url)
        return st


def _stage_offsets() -> dict[str, tuple[float, float]]:
    total = sum(w for _, w in STAGES) or 1.0
    out, acc = {}, 0.0
    for name, w in STAGES:
        out[name] = (acc / total, w / total)
        acc += w
    return out


def progress_writer(job_id: str, store: Store, *, min_interval_s: float = 0.5) -> Callable[[str, float], None]:
    """A ``progress(stage, fraction_of_stage)`` callback that writes the overall progress to the
    store: at every new stage, and within a stage at most every ``min_interval_s``."""
    offsets = _stage_offsets()
    last_stage: list[str | None] = [None]  # the stage and time (monotonic s) of the last write
    last_t = [0.0]

    def progress(stage: str, frac: float) -> None:
        now = time.monotonic()
        if stage == last_stage[0] and now - last_t[0] < min_interval_s:
            return
        overall: float | None
        if stage == "done":
            overall = 1.0
        elif stage in offsets:
            start, width = offsets[stage]
            overall = min(1.0, start + width * max(0.0, min(1.0, float(frac))))
        else:  # a stage this service does not know: keep the last overall value
            overall = None
        try:
            if overall is None:
                job = store.get_job(job_id)
                overall = job.progress if job is not None else 0.0
            store.set_progress(job_id, stage, overall)
        except Exception:
            log.warning("job %s: could not record progress", job_id, exc_info=True)
        last_stage[0], last_t[0] = stage, now

    return progress


def _strip_roots(message: str, roots: list[str]) -> str:
    """A message for the API: file names relative to the job's inputs, not server paths."""
    for r in sorted(roots, key=len, reverse=True):
        if r and r != os.sep:
            message = message.replace(r.rstrip(os.sep) + os.sep, "").replace(r, ".")
    return message


def write_atomically(result: Result, out_dir: Path) -> Path:
    """``write_outputs`` (RT Dose, summary, report) and the PACS objects (SEG, SR) into
    ``out_dir.tmp-…``, then rename to ``out_dir`` (an older ``out_dir`` from an attempt whose worker
    died after writing is replaced).  The SEG and SR need the reference CT's slices: when they cannot
    be written the job still succeeds, with a warning."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:  # first, so that a warning about them reaches summary.json and the report
            write_pacs_objects(result, tmp)
        except Exception as err:
            why = str(err) if isinstance(err, VoxeldoseError) else f"internal error ({type(err).__name__})"
            why = without_paths(why)  # summary.json is served by the API: no server paths (issue 14)
            result.summary.warnings.append(f"no SEG/SR for the PACS: {why}")
            log.warning("SEG/SR not written: %s", type(err).__name__, exc_info=not isinstance(err, VoxeldoseError))
            for name in ("seg.dcm", "sr.dcm"):
                (tmp / name).unlink(missing_ok=True)
        write_outputs(result, tmp)
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass(frozen=True)
class JobOutcome:
    """What a Ray task reports back to the dispatcher: the result folder on success, or the failure (not retried).

    ``error`` is the message a physicist reads (bad input, with the server's paths stripped), or the internal-error
    line with the job id when ``internal`` (the traceback is in the worker's log only)."""

    result_dir: str | None = None
    patient_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    output_series: list[str] = field(default_factory=list)  # SeriesInstanceUIDs the job wrote
    error: str | None = None
    internal: bool = False


def run_job(job_id: str, spec: dict[str, Any], out_dir: str, database_url: str) -> JobOutcome:
    """Run one job; a failure is returned as a :class:`JobOutcome` with ``error`` (never raised)."""
    store = _store(database_url)
    roots = [str(Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent) for p in spec.get("inputs", [])]
    t0 = time.monotonic()
    log.info("job %s: started in pid %d", job_id, os.getpid())
    progress = progress_writer(job_id, store)
    checked = intake_stage(job_id, spec, store, progress)
    if isinstance(checked, JobOutcome):
        return checked
    spec = checked
    try:
        result = run(spec, progress=progress)
        out = write_atomically(result, Path(out_dir))
    except VoxeldoseError as err:
        log.info("job %s: bad input (%.1f s)", job_id, time.monotonic() - t0)
        return JobOutcome(error=_strip_roots(str(err), roots))
    except Exception:
        log.exception("job %s: internal error", job_id)
        return JobOutcome(error=INTERNAL_ERROR.format(job_id=job_id), internal=True)
    patient = result.summary.patient.id
    log.info("job %s: done in %.1f s", job_id, time.monotonic() - t0)
    return JobOutcome(
        result_dir=str(out), patient_id=patient, warnings=list(result.warnings), output_series=output_series(out)
    )


def intake_stage(
    job_id: str, spec: dict[str, Any], store: Store, progress: Callable[[str, float], None] | None = None
) -> dict[str, Any] | JobOutcome:
    """The job's first stage: an upload's files unpacked and checked in place (:func:`service.intake.check_stage`,
    issue 15) — the job description to run, or the failure (with the message a 422 at upload gave before).
    Jobs whose input was checked before they were queued pass through with ``spec``."""
    t0 = time.monotonic()
    roots = [str(Path(p).resolve()) for p in spec.get("inputs", [])]
    try:
        job = store.get_job(job_id)
        if job is None or job.intake is None:
            return spec
        if progress is not None:
            progress("intake", 0.0)
        checked = check_stage(store, job)
    except (IntakeError, DuplicateInput, VoxeldoseError) as err:
        log.info("job %s: upload not usable (%.1f s)", job_id, time.monotonic() - t0)
        return JobOutcome(error=_strip_roots(err.detail if isinstance(err, IntakeError) else str(err), roots))
    except ValidationError as err:  # the description with a camera profile's calibration (checked at submission)
        fields = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        return JobOutcome(error=f"invalid job description: {fields}")
    except Exception:
        log.exception("job %s: internal error while checking the upload", job_id)
        return JobOutcome(error=INTERNAL_ERROR.format(job_id=job_id), internal=True)
    log.info("job %s: upload checked (%.1f s)", job_id, time.monotonic() - t0)
    return checked


def output_series(out_dir: Path) -> list[str]:
    """SeriesInstanceUIDs of the DICOM files a job wrote (the service never takes them as input)."""
    uids = []
    for p in sorted(Path(out_dir).glob("*.dcm")):
        try:
            uids.append(str(dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID))
        except Exception:  # noqa: BLE001
            log.warning("could not read the SeriesInstanceUID of an output file")
    return uids


def run_job_in_worker(job_id: str, spec: dict[str, Any], out_dir: str, database_url: str) -> JobOutcome:
    """:func:`run_job` in a Ray worker process: first the worker's logging (:func:`service.logs.setup_worker_logging`:
    the service's handler and filter on stderr, warnings through logging), so that no warning or log line of
    pydicom quotes patient data into Ray's ``worker-*.err`` files or the driver's output."""
    setup_worker_logging()
    return run_job(job_id, spec, out_dir, database_url)


def remote_run_job() -> Any:
    """``ray.remote(run_job_in_worker)``, created on first use.  No Ray retries: the dispatcher retries
    lost workers itself, counting attempts in the database."""
    global _remote
    if _remote is None:
        import ray  # here, not at the top: importing this module needs neither Ray running nor installed

        _remote = ray.remote(max_retries=0)(run_job_in_worker)
    return _remote
