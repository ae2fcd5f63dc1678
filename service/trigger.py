"""The job trigger: turns what the DICOM node (or STOW-RS) received into dosimetry jobs, with nobody clicking.

When is a patient's data looked at?  Every stored instance marks its patient *pending* until
``dicom_quiet_period_s`` after the last instance; an association release (or the end of a STOW-RS request)
makes the patients it carried due at once.  The pending mark is a database row, so nothing is lost when
the service restarts between receiving and looking.

What is looked at?  All instances received for the patient (first copies; never a series voxeldose
wrote itself, e.g. our SEG coming back from the PACS), read with :func:`voxeldose.ingest.scan` and
grouped by :func:`voxeldose.ingest.group_cycles` into therapy cycles (one patient, one injection), each
with its SPECT time points, their CTs (same Frame of Reference) and the VOI series (RTSTRUCT/SEG).

When does a cycle start a job?  (the rule, in the order it is checked)

1. *complete*: at least ``trigger_min_timepoints`` SPECT time points that each have their CT, and VOIs
   on one of them → a job with the site's ``trigger_spec``;
2. *deadline*: otherwise, once ``trigger_deadline_h`` hours have passed since the cycle's first series
   arrived, with what exists, provided there are VOIs and at least one SPECT time point; with a single
   time point the job uses the single-time-point method (``fit.model = "stp"``);
3. otherwise the cycle waits; why is recorded (``GET /v1/dicom/cycles``).

The input set of a job is exactly the cycle's series at that moment (hard links in
``incoming/node-…``, so later arrivals never change it), fingerprinted by
:func:`voxeldose.pipeline.input_fingerprint`.  **The same input set never starts two jobs** (whatever
the state of the first).  A *different* input set for a cycle that already has a job — a late time
point, a corrected RTSTRUCT — starts a new *version* of the job (``version`` 2, 3, …, ``supersedes``
the previous one), and the earlier version and its results are kept.

Cycle numbers count the patient's cycles received here, by injection date (a site whose first cycles
predate voxeldose submits those through the API, or sends their images too).  Earlier cycles' doses come
from their newest succeeded job; an earlier cycle without one is passed with its activity only, and the
pipeline estimates its dose from this cycle's dose per GBq (and says so in the job's warnings).  While an
earlier cycle's job is still queued or running, the later cycle waits for it.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import group_cycles, scan
from voxeldose.pipeline import input_fingerprint

from .config import Settings
from .intake import TMP_PREFIX, link_files
from .models import utcnow
from .store import ACTIVE_STATES, Store, spec_hash

log = logging.getLogger("service.trigger")

#: How long a cycle waits before it is looked at again when an earlier cycle's job is still running.
RECHECK_S = 30.0
#: A received cycle and a job's result whose injections are closer than this are the same therapy cycle
#: (cycles are weeks apart; an hour absorbs injection times typed differently in two places).
SAME_CYCLE_S = 3600.0


@dataclass
class Decision:
    """What the trigger decided for one cycle (for tests and logs)."""

    cycle_key: str
    state: str  # "started" | "exists" | "waiting" | "error"
    reason: str
    job_id: str | None = None
    version: int | None = None
    timepoints: int = 0
    input_hash: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)


def cycle_key(patient_id: str, injection: datetime | None) -> str:
    """The identity of a therapy cycle: SHA-256 of the patient ID and the injection date-time."""
    when = injection.isoformat(timespec="minutes") if injection is not None else "?"
    return hashlib.sha256(f"{patient_id}\x00{when}".encode()).hexdigest()


def link_inputs(paths: Iterable[Path], root: Path, name: str) -> Path:
    """Freeze an input set: :func:`service.intake.link_files` into a temporary folder, renamed to ``root/name``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        link_files([Path(p) for p in paths], tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def earlier_cycle_entry(
    number: int, injection: datetime, activity_mbq: float, summary: dict[str, Any] | None
) -> dict[str, Any]:
    """An ``earlier_cycles`` item of the job spec: the doses of that cycle's newest result (its ``summary``),
    when there is one."""
    entry: dict[str, Any] = {"number": number, "date": injection.date().isoformat(), "activity_mbq": activity_mbq}
    if summary is None:
        return entry
    own = (summary.get("cycle") or {}).get("number")
    for row in (summary.get("cumulative") or {}).get("cycles") or []:
        if row.get("number") == own:
            for key in ("kidney_gy", "kidney_bed_gy", "marrow_gy"):
                if row.get(key) is not None:
                    entry[key] = float(row[key])
            if row.get("activity_MBq"):
                entry["activity_mbq"] = float(row["activity_MBq"])
    return entry


class Trigger:
    """Looks at pending patients and starts jobs (see the module docstring).  ``tick(now)`` does one
    round; :class:`Automation` runs it in a thread."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    # -------------------------------------------------------------- marks (called by the receivers)
    def touch(self, patient_id: str | None, now: datetime | None = None) -> None:
        """An instance of this patient was stored: look after the quiet period."""
        if not patient_id:
            return
        now = now or utcnow()
        self.store.touch_patient(patient_id, now + timedelta(seconds=self.settings.dicom_quiet_period_s))

    def released(self, patient_ids: Iterable[str | None], now: datetime | None = None) -> None:
        """An association (or STOW-RS request) carrying these patients ended: look at them now."""
        now = now or utcnow()
        for pid in {p for p in patient_ids if p}:
            self.store.touch_patient(pid, now)

    # -------------------------------------------------------------- one round
    def tick(self, now: datetime | None = None) -> list[Decision]:
        now = now or utcnow()
        out: list[Decision] = []
        due = {pid: touched for pid, touched in self.store.due_patients(now)}
        for pid in self.store.deadline_patients(now):
            due.setdefault(pid, None)
        for pid, touched in due.items():
            try:
                out += self.evaluate_patient(pid, now)
            except Exception:
                log.exception("trigger: evaluating a patient failed")
                if touched is not None:  # look again later rather than spin on it
                    self.store.touch_patient(pid, now + timedelta(seconds=RECHECK_S * 10))
                continue
            if touched is not None:
                self.store.clear_patient(pid, touched)
        return out

    def evaluate_patient(self, patient_id: str, now: datetime) -> list[Decision]:
        """Group the patient's received series into cycles and apply the rule to each."""
        instances = self.store.patient_instances(patient_id)
        ours = self.store.output_series_among(sorted({i.series_instance_uid for i in instances}))
        paths = [Path(i.path) for i in instances if i.series_instance_uid not in ours and Path(i.path).exists()]
        if not paths:
            return []
        index = scan(paths)
        try:
            cycles, problems = group_cycles(index)
        except VoxeldoseError as err:
            return [self._record_error(patient_id, str(err), now)]
        errors = [p for p in list(index.errors) + problems if p.severity == "error"]
        if not cycles:
            why = (
                "; ".join(p.message for p in errors[:3]) or "no reconstructed SPECT with injection information received"
            )
            return [self._record_error(patient_id, why, now)]

        ordered = sorted(cycles, key=lambda c: c.injection.start)
        history = self._results_by_injection(patient_id)
        numbers = self._cycle_numbers([c.injection.start for c in ordered] + [t for t, _ in history])
        decisions = []
        for c in ordered:
            key = cycle_key(patient_id, c.injection.start)
            n_tp = sum(1 for tp in c.timepoints if tp.ct is not None)
            has_vois = bool(c.vois)
            row = self.store.get_trigger_cycle(key)
            first_seen = datetime.fromisoformat(row["first_seen_at"]) if row else now
            deadline_h = self.settings.trigger_deadline_h
            deadline_after = timedelta(hours=deadline_h) if deadline_h else None
            past_deadline = deadline_after is not None and now >= first_seen + deadline_after
            base = dict(
                cycle_key=key, patient_id=patient_id, injection=c.injection.start.isoformat(), timepoints=n_tp, now=now
            )
            series = [s for tp in c.timepoints for s in (tp.spect, tp.ct) if s is not None] + list(c.vois)
            files = {str(p) for s in series for p in s.paths}
            bad = [p for p in errors if p.path and (p.path in files or any(f in p.path for f in files))]
            if bad:  # e.g. two SPECT reconstructions at one time: a job would fail; say why instead
                reason = "cannot start: " + "; ".join(p.message for p in bad[:3])
                self.store.upsert_trigger_cycle(
                    **base, state="error", reason=reason[:4000], job_id=None, deadline_after=None
                )
                decisions.append(Decision(key, "error", reason, timepoints=n_tp))
                continue
            complete = n_tp >= self.settings.trigger_min_timepoints and has_vois
            missing = []
            if n_tp < self.settings.trigger_min_timepoints:
                missing.append(f"{n_tp} of {self.settings.trigger_min_timepoints} SPECT time points with their CT")
            if not has_vois:
                missing.append("no RTSTRUCT or SEG on a time point's frame of reference")
            if not complete and not (past_deadline and has_vois and c.timepoints):
                reason = "waiting: " + "; ".join(missing)
                if past_deadline:  # the deadline could not start it either: wait for data, not for the clock
                    reason += f" (the deadline of {deadline_h:g} h has passed; a job starts when VOIs arrive)"
                    deadline_after = None
                elif deadline_after is not None:
                    reason += f" (deadline {deadline_h:g} h after the first series)"
                self.store.upsert_trigger_cycle(
                    **base, state="waiting", reason=reason, job_id=None, deadline_after=deadline_after
                )
                decisions.append(Decision(key, "waiting", reason, timepoints=n_tp))
                continue
            earlier, busy = self._earlier_cycles(patient_id, ordered, history, c, numbers)
            if busy:
                reason = f"waiting for the job of earlier cycle {busy} to finish"
                self.store.upsert_trigger_cycle(
                    **base, state="waiting", reason=reason, job_id=None, deadline_after=None
                )
                self.store.touch_patient(patient_id, now + timedelta(seconds=RECHECK_S))
                decisions.append(Decision(key, "waiting", reason, timepoints=n_tp))
                continue
            spec = copy.deepcopy(self.settings.trigger_spec)
            if not complete and len(c.timepoints) == 1:
                spec.setdefault("fit", {})["model"] = "stp"
            spec.update(
                patient_id=patient_id, cycle_number=numbers[_slot(numbers, c.injection.start)], earlier_cycles=earlier
            )
            fp = input_fingerprint(c)
            digest = fp["sop_instance_uids_sha256"]
            wanted = spec_hash({**spec, "inputs": ["."]})
            same = [j for j in self.store.jobs_for_input(digest) if spec_hash(j.spec) == wanted]
            if same:  # this input set with this job description: never a second job, whatever the first became
                j = same[-1]
                reason = f"this input set already has job {j.id} ({j.state})"
                self.store.upsert_trigger_cycle(
                    **base, state="started", reason=reason, job_id=None, deadline_after=None
                )
                decisions.append(
                    Decision(key, "exists", reason, job_id=j.id, version=j.version, timepoints=n_tp, input_hash=digest)
                )
                continue
            previous = self.store.cycle_jobs(key)
            version = (max((j.version or 0) for j in previous) + 1) if previous else 1
            name = f"node-{digest[:12]}-{uuid.uuid4().hex[:8]}"
            input_dir = link_inputs([p for s in series for p in s.paths], self.settings.incoming_dir, name)
            spec["inputs"] = [str(input_dir)]
            job, created = self.store.create_job(
                spec=spec,
                input_dir=str(input_dir),
                input_hash=digest,
                patient_id=patient_id,
                idempotency_key=None,
                submitted_by=f"dicom:{self.settings.dicom_ae_title}",
                source="dicom",
                cycle_key=key,
                version=version,
                supersedes=previous[-1].id if previous else None,
            )
            if not created:  # another process won the race for the same input set
                shutil.rmtree(input_dir, ignore_errors=True)
            how = "complete" if complete else f"deadline of {deadline_h:g} h reached"
            reason = f"job {job.id} version {job.version or version} started ({how}; {n_tp} time point(s))"
            if previous and previous[-1].input_hash == digest:
                reason += "; same images, but the earlier cycles changed (cycle number or their doses)"
            if missing and not complete:
                reason += "; missing: " + "; ".join(missing)
            self.store.upsert_trigger_cycle(**base, state="started", reason=reason, job_id=job.id, deadline_after=None)
            log.info(
                "trigger: job %s version %s queued for a cycle with %d time point(s) (%s)",
                job.id,
                job.version,
                n_tp,
                how,
            )
            decisions.append(
                Decision(
                    key,
                    "started",
                    reason,
                    job_id=job.id,
                    version=job.version,
                    timepoints=n_tp,
                    input_hash=digest,
                    spec=spec,
                )
            )
        # rows of cycles no longer formed (e.g. an error before the SPECT arrived, a changed injection time)
        self.store.retire_trigger_cycles(patient_id, {d.cycle_key for d in decisions})
        return decisions

    # -------------------------------------------------------------- helpers
    def _record_error(self, patient_id: str, why: str, now: datetime) -> Decision:
        key = cycle_key(patient_id, None)
        reason = f"cannot form a therapy cycle: {why}"
        self.store.upsert_trigger_cycle(
            cycle_key=key,
            patient_id=patient_id,
            injection=None,
            state="error",
            reason=reason[:4000],
            timepoints=0,
            job_id=None,
            deadline_after=None,
            now=now,
        )
        self.store.retire_trigger_cycles(patient_id, {key})
        log.warning("trigger: a patient's data cannot form a therapy cycle (see GET /v1/dicom/cycles)")
        return Decision(key, "error", reason)

    def _results_by_injection(self, patient_id: str) -> list[tuple[datetime, dict[str, Any]]]:
        """The summaries of the patient's succeeded jobs of any origin (node, upload, API), by the injection
        they name: ``(injection, newest summary)`` per injection, oldest first (each file read once)."""
        out: dict[datetime, dict[str, Any]] = {}
        for job in self.store.patient_jobs(patient_id):  # oldest first
            s = job.summary()
            when = ((s or {}).get("cycle") or {}).get("injection", {}).get("datetime")
            if not when:
                continue
            try:
                t = datetime.fromisoformat(when)
            except ValueError:
                continue
            slot = next((k for k in out if abs((k - t).total_seconds()) <= SAME_CYCLE_S), t)
            out[slot] = s  # a later job for the same injection replaces the earlier one
        return sorted(out.items(), key=lambda kv: kv[0])

    @staticmethod
    def _cycle_numbers(injections: list[datetime]) -> dict[datetime, int]:
        """Cycle numbers (1, 2, …) by injection date over every cycle known for the patient (received
        here, or measured by a job of any origin); injections within an hour are one cycle."""
        merged: list[datetime] = []
        for t in sorted(injections):
            if not merged or (t - merged[-1]).total_seconds() > SAME_CYCLE_S:
                merged.append(t)
        return {t: n for n, t in enumerate(merged, start=1)}

    def _earlier_cycles(
        self,
        patient_id: str,
        ordered: list[Any],
        history: list[tuple[datetime, dict[str, Any]]],
        this: Any,
        numbers: dict[datetime, int],
    ) -> tuple[list[dict[str, Any]], int | None]:
        """``earlier_cycles`` for the job of ``this`` cycle — every cycle injected before it, received here
        or known from a result — and the number of an earlier cycle whose job is still queued or running
        (then wait)."""
        limit = this.injection.start - timedelta(seconds=SAME_CYCLE_S)
        out: list[dict[str, Any]] = []
        for when, n in sorted(numbers.items(), key=lambda kv: kv[1]):
            if when >= limit:
                continue
            received = next(
                (c for c in ordered if abs((c.injection.start - when).total_seconds()) <= SAME_CYCLE_S), None
            )
            result = next((r for t, r in history if abs((t - when).total_seconds()) <= SAME_CYCLE_S), None)
            activity: float | None = None
            if received is not None:
                jobs = self.store.cycle_jobs(cycle_key(patient_id, received.injection.start))
                if any(j.state in ACTIVE_STATES for j in jobs):
                    return [], n
                activity = received.injection.activity_bq / 1e6
                when = received.injection.start
            if activity is None and result is not None:
                activity = (result.get("cycle") or {}).get("injection", {}).get("activity_MBq")
            if activity is None:
                continue
            out.append(earlier_cycle_entry(n, when, float(activity), result))
        return out, None


def _slot(numbers: dict[datetime, int], t: datetime) -> datetime:
    """The key of ``numbers`` for injection ``t`` (the same cycle within an hour)."""
    return min(numbers, key=lambda k: abs((k - t).total_seconds()))
