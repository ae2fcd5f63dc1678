"""The job trigger: turns what the DICOM node (or STOW-RS) received into dosimetry jobs, with nobody clicking.

When is a patient's data looked at?  Every stored instance marks its patient *pending* until
``dicom_quiet_period_s`` after the last instance; an association release (or the end of a STOW-RS request)
makes the patients it carried due ``dicom_release_settle_s`` (seconds) later.  A release is no proof that the
study is complete: Orthanc, for one, releases its association in the middle of a push whenever it meets a SOP
class it had not proposed (a SEG) and opens a new one at once — whose first instance marks the patient pending
again before the settle time is over.  The pending mark is a database row, so nothing is lost when the service
restarts between receiving and looking.

Decisions are made on what was received, never on a study still arriving: :meth:`Trigger.snapshot` notes a
digest of the patient's received instances (:attr:`PatientSnapshot.received_digest`) and :meth:`Trigger.apply`
compares it with the store's in the transaction that would write the decisions; when an instance of the patient
was stored meanwhile it writes nothing (outcome ``stale``) and the patient stays pending: it is looked at again
once the new instances' quiet period (or their association's release) says they are complete.

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

A SPECT of raw counts needs a calibration: the site's (``calibration`` in ``trigger_spec``) or the registered
camera profile matching its camera (:mod:`service.cameras`, which also fills the job's calibration when
``trigger_spec`` has none).  Without either the cycle is not complete: it waits ("no calibration for camera
<manufacturer> <model> <serial>"), and at the deadline it is an error saying so rather than a job that would
fail; registering a matching profile looks at those cycles again, and they start.

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

How the code is cut: :meth:`Trigger.snapshot` reads what the store and the received files say about one
patient into a frozen :class:`PatientSnapshot`; :func:`plan` — pure, no database, no files — applies the rule
and returns typed decisions (:class:`StartJob`, :class:`RecordCycle`, :class:`RecheckAt`, :class:`Retire`);
:meth:`Trigger.apply` hard-links the inputs of the jobs to start, then writes every decision in ONE store
transaction.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import Cycle, group_cycles, scan
from voxeldose.pipeline import input_fingerprint
from voxeldose.summary import Summary

from . import scratch
from .cameras import (
    WAITING_MARK,
    CameraMatch,
    SpectCamera,
    apply_profile,
    calibration_given,
    pvc_needs_profile,
    spect_camera,
)
from .config import Settings
from .intake import TMP_PREFIX, link_files
from .models import utcnow
from .store import (
    ACTIVE_STATES,
    CameraRecord,
    CycleUpdate,
    JobRecord,
    NewJob,
    Store,
    TriggerWrites,
    instances_digest,
    spec_hash,
    without_paths,
)

log = logging.getLogger("service.trigger")

#: How long a cycle waits before it is looked at again when an earlier cycle's job is still running.
RECHECK_S = 30.0
#: A received cycle and a job's result whose injections are closer than this are the same therapy cycle
#: (cycles are weeks apart; an hour absorbs injection times typed differently in two places).
SAME_CYCLE_S = 3600.0
#: The longest reason stored for an error (the column is text; the message is for a person).
MAX_REASON = 4000


@dataclass
class Outcome:
    """What the trigger did for one cycle, once its decisions were applied (for tests, logs and ``tick``'s
    callers): ``started`` a job, found one that ``exists`` for the input set, ``waiting``, or ``error``; ``stale``:
    nothing written, instances of the patient arrived while the trigger looked (it looks again when they are due)."""

    cycle_key: str
    state: str  # "started" | "exists" | "waiting" | "error" | "stale"
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


def name_series(text: str, series_of: Mapping[str, str]) -> str:
    """``text`` (a reason for ``GET /v1/dicom/cycles``) with each received file's path (the keys of
    ``series_of``, file path → SeriesInstanceUID) replaced by ``series <UID>``: reasons name series, never
    paths on the server (issue 14); any other absolute path left becomes its last component
    (:func:`service.store.without_paths`)."""
    for path in sorted((p for p in series_of if p and p in text), key=len, reverse=True):
        text = text.replace(path, f"series {series_of[path]}")
    return without_paths(text)


def link_inputs(paths: Iterable[Path], root: Path, name: str, data_dir: Path) -> Path:
    """Freeze an input set: :func:`service.intake.link_files` into a temporary folder owned by this process
    (:mod:`service.scratch`: removed at the next start if this process dies first), renamed to ``root/name``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / scratch.owned_name(data_dir, f"{TMP_PREFIX}{name}")
    tmp.mkdir()
    try:
        link_files([Path(p) for p in paths], tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ earlier results
@dataclass(frozen=True)
class EarlierCycle:
    """What a succeeded job's summary.json says about the cycle it measured."""

    injection: datetime  # the injection it names
    activity_mbq: float | None  # the injected activity it names (MBq)
    own_row: Mapping[str, float]  # its own row of the cumulative table: kidney_gy, kidney_bed_gy, marrow_gy, activity
    # the kidney dose's standard uncertainty by budget component (Gy); None: not stated (an older summary)
    kidney_u_components_gy: Mapping[str, float] | None = None


def _earlier_cycle_facts(summary: Summary | None) -> EarlierCycle | None:
    """What the trigger takes from an earlier job's summary (the typed :class:`voxeldose.summary.Summary`):
    the injection (None when it cannot be read as a date and time), its activity, and the doses of the cycle it
    measured — its own row of the cumulative table."""
    if summary is None:
        return None
    injection = summary.cycle.injection
    try:
        t = datetime.fromisoformat(injection.datetime)
    except ValueError:
        return None
    own: dict[str, float] = {}
    kidney_u: dict[str, float] | None = None
    for row in summary.cumulative.cycles:
        if row.number == summary.cycle.number:
            if row.kidney_u is not None and row.kidney_u.u_gy is not None:
                kidney_u = dict(row.kidney_u.components_gy)
            for key, value in (
                ("kidney_gy", row.kidney_gy),
                ("kidney_bed_gy", row.kidney_bed_gy),
                ("marrow_gy", row.marrow_gy),
            ):
                if value is not None:
                    own[key] = float(value)
            if row.activity_MBq:
                own["activity_mbq"] = float(row.activity_MBq)
    return EarlierCycle(injection=t, activity_mbq=injection.activity_MBq, own_row=own, kidney_u_components_gy=kidney_u)


def earlier_cycle_entry(
    number: int, injection: datetime, activity_mbq: float, result: EarlierCycle | None
) -> dict[str, Any]:
    """An ``earlier_cycles`` item of the job spec: the doses of that cycle's newest result, when there is one."""
    entry: dict[str, Any] = {"number": number, "date": injection.date().isoformat(), "activity_mbq": activity_mbq}
    if result is not None:
        entry.update(result.own_row)
        if result.kidney_u_components_gy is not None and "kidney_gy" in result.own_row:
            entry["kidney_u_components_gy"] = dict(result.kidney_u_components_gy)
    return entry


# ------------------------------------------------------------------------------------- snapshot
@dataclass(frozen=True)
class JobFacts:
    """A job as the rule needs it."""

    id: str
    state: str
    version: int | None
    input_hash: str
    spec_hash: str  # of its job description (:func:`service.store.spec_hash`)

    @classmethod
    def of(cls, job: JobRecord) -> JobFacts:
        return cls(job.id, job.state, job.version, job.input_hash, spec_hash(job.spec))


@dataclass(frozen=True)
class CycleFacts:
    """One therapy cycle formed from the received files, with what the store knows of it."""

    key: str
    injection: datetime  # start of the injection (local time, as in DICOM)
    activity_mbq: float  # injected activity (MBq)
    timepoints: int  # SPECT time points
    timepoints_with_ct: int  # SPECT time points that have their CT
    has_vois: bool  # an RTSTRUCT or SEG on a time point's frame of reference
    paths: tuple[str, ...]  # the files of its series (SPECT, CT, VOIs): the input set
    input_hash: str  # :func:`voxeldose.pipeline.input_fingerprint` of the input set
    errors: tuple[str, ...] = ()  # ingest errors on its files (a job would fail)
    first_seen_at: datetime | None = None  # when the trigger first saw it (None: now)
    jobs: tuple[JobFacts, ...] = ()  # its node-started jobs, oldest version first
    same_input_jobs: tuple[JobFacts, ...] = ()  # every job ever created for this input set, oldest first
    camera: SpectCamera | None = None  # its SPECT's camera and the profile it takes (None: not looked at)
    nuclide: str = "Lu-177"  # the injected nuclide (ICRP-107 name)


@dataclass(frozen=True)
class Rules:
    """The site's trigger settings."""

    min_timepoints: int
    deadline_h: float | None  # None or 0: no deadline
    spec: Mapping[str, Any]  # the site's job description (``trigger_spec``)

    @classmethod
    def of(cls, settings: Settings) -> Rules:
        return cls(settings.trigger_min_timepoints, settings.trigger_deadline_h, settings.trigger_spec)


@dataclass(frozen=True)
class PatientSnapshot:
    """What the store and the received files say about one patient at ``now``: the input of :func:`plan`."""

    patient_id: str
    now: datetime
    rules: Rules
    received: bool = True  # False: no usable file received (nothing to decide)
    form_error: str | None = None  # why the files form no therapy cycle at all
    unreadable: tuple[
        str, ...
    ] = ()  # files unread or set aside by ingest, of no cycle's series or study (why, by series)
    cycles: tuple[CycleFacts, ...] = ()
    results: tuple[EarlierCycle, ...] = ()  # the patient's succeeded jobs of any origin, oldest first
    #: :func:`service.store.instances_digest` of every instance received for the patient when the snapshot was taken
    #: (None: unknown; :meth:`Trigger.apply` then cannot check that nothing arrived meanwhile)
    received_digest: str | None = None


# ------------------------------------------------------------------------------------ decisions
@dataclass(frozen=True)
class RecordCycle:
    """Record the rule's verdict on a cycle: ``waiting`` (with the deadline, or none), ``error``, or ``started``
    because its input set has a job already (``existing``)."""

    key: str
    injection: datetime | None
    state: str  # "waiting" | "error" | "started"
    reason: str
    timepoints: int
    deadline_after: timedelta | None = None  # None clears the deadline
    existing: JobFacts | None = None  # the job this input set already has


@dataclass(frozen=True)
class StartJob:
    """Start version ``version`` of a cycle's job on its input set (superseding the previous version)."""

    key: str
    injection: datetime
    version: int
    spec: Mapping[str, Any]  # the job description without ``inputs`` (set to the linked folder when applied)
    paths: tuple[str, ...]
    input_hash: str
    supersedes: str | None
    timepoints: int
    how: str  # "complete", or the deadline reached
    missing: tuple[str, ...] = ()  # what the cycle lacks (a deadline start)
    same_images: bool = False  # the previous version had the same input set (the earlier cycles changed)
    camera: CameraMatch | None = None  # the camera profile the job takes
    camera_note: str | None = None  # which, and how it was chosen (the job record's ``camera_match``)

    def reason(self, job: JobRecord) -> str:
        text = (
            f"job {job.id} version {job.version or self.version} started ({self.how}; {self.timepoints} time point(s))"
        )
        if self.camera_note:
            text += f"; {self.camera_note}"
        if self.same_images:
            text += "; same images, but the earlier cycles changed (cycle number or their doses)"
        if self.missing:
            text += "; missing: " + "; ".join(self.missing)
        return text


@dataclass(frozen=True)
class RecheckAt:
    """Look at the patient again at ``at`` (an earlier cycle's job is still running)."""

    at: datetime


@dataclass(frozen=True)
class Retire:
    """Remove the patient's waiting/error rows of cycles no longer formed (all but ``keep``)."""

    keep: frozenset[str]


Decision = RecordCycle | StartJob | RecheckAt | Retire


# ----------------------------------------------------------------------------------------- plan
def _cycle_numbers(injections: Iterable[datetime]) -> dict[datetime, int]:
    """Cycle numbers (1, 2, …) by injection date over every cycle known for the patient (received
    here, or measured by a job of any origin); injections within an hour are one cycle."""
    merged: list[datetime] = []
    for t in sorted(injections):
        if not merged or (t - merged[-1]).total_seconds() > SAME_CYCLE_S:
            merged.append(t)
    return {t: n for n, t in enumerate(merged, start=1)}


def _slot(numbers: Mapping[datetime, int], t: datetime) -> datetime:
    """The key of ``numbers`` for injection ``t`` (the same cycle within an hour)."""
    return min(numbers, key=lambda k: abs((k - t).total_seconds()))


def _by_injection(results: Sequence[EarlierCycle]) -> list[tuple[datetime, EarlierCycle]]:
    """``(injection, newest result)`` per injection, oldest first (a later job for the same injection replaces
    the earlier one)."""
    out: dict[datetime, EarlierCycle] = {}
    for r in results:  # oldest first
        slot = next((k for k in out if abs((k - r.injection).total_seconds()) <= SAME_CYCLE_S), r.injection)
        out[slot] = r
    return sorted(out.items(), key=lambda kv: kv[0])


def _earlier_cycles(
    ordered: Sequence[CycleFacts],
    history: Sequence[tuple[datetime, EarlierCycle]],
    this: CycleFacts,
    numbers: Mapping[datetime, int],
    starting: set[str],
) -> tuple[list[dict[str, Any]], int | None]:
    """``earlier_cycles`` for the job of ``this`` cycle — every cycle injected before it, received here
    or known from a result — and the number of an earlier cycle whose job is still queued or running, or is
    being started in this round (then wait)."""
    limit = this.injection - timedelta(seconds=SAME_CYCLE_S)
    out: list[dict[str, Any]] = []
    for when, n in sorted(numbers.items(), key=lambda kv: kv[1]):
        if when >= limit:
            continue
        received = next((c for c in ordered if abs((c.injection - when).total_seconds()) <= SAME_CYCLE_S), None)
        result = next((r for t, r in history if abs((t - when).total_seconds()) <= SAME_CYCLE_S), None)
        activity: float | None = None
        if received is not None:
            if received.key in starting or any(j.state in ACTIVE_STATES for j in received.jobs):
                return [], n
            activity = received.activity_mbq
            when = received.injection
        if activity is None and result is not None:
            activity = result.activity_mbq
        if activity is None:
            continue
        out.append(earlier_cycle_entry(n, when, float(activity), result))
    return out, None


def plan(snap: PatientSnapshot) -> list[Decision]:
    """The rule (see the module docstring) applied to one patient: what to record and which jobs to start.
    Pure: reads nothing but ``snap``."""
    if not snap.received:
        return []
    pid, now, rules = snap.patient_id, snap.now, snap.rules
    if snap.form_error is not None:
        key = cycle_key(pid, None)
        reason = f"cannot form a therapy cycle: {snap.form_error}"
        return [RecordCycle(key, None, "error", reason, 0), Retire(frozenset({key}))]
    kept: set[str] = set()
    out: list[Decision] = []
    if snap.unreadable:  # shown with the patient's cycles rather than dropped (their series may be a cycle's)
        key = cycle_key(pid, None)
        out.append(RecordCycle(key, None, "error", "cannot use: " + "; ".join(snap.unreadable[:3]), 0))
        kept.add(key)
    ordered = sorted(snap.cycles, key=lambda c: c.injection)
    history = _by_injection(snap.results)
    numbers = _cycle_numbers([c.injection for c in ordered] + [t for t, _ in history])
    deadline_h = rules.deadline_h
    starting: set[str] = set()
    for c in ordered:
        n_tp = c.timepoints_with_ct
        first_seen = c.first_seen_at or now
        deadline_after = timedelta(hours=deadline_h) if deadline_h else None
        past_deadline = deadline_after is not None and now >= first_seen + deadline_after
        if c.errors:  # e.g. two SPECT reconstructions at one time: a job would fail; say why instead
            reason = "cannot start: " + "; ".join(c.errors[:3])
            out.append(RecordCycle(c.key, c.injection, "error", reason, n_tp))
            continue
        # raw counts need a calibration: the site's (trigger_spec) or a registered camera profile's
        cam = c.camera
        # a partial-volume correction in trigger_spec needs the camera's profile (its resolution) whatever the pixels
        uncalibrated = (
            cam.label
            if cam is not None
            and cam.match is None
            and ((cam.counts and not calibration_given(rules.spec)) or pvc_needs_profile(rules.spec))
            else None
        )  # the camera that has no calibration
        if uncalibrated is not None and past_deadline and c.has_vois and c.timepoints:
            reason = (
                f"cannot start: the SPECT holds raw counts and no calibration factor was given: {WAITING_MARK} "
                f"{uncalibrated} and {c.nuclide} by the deadline of {deadline_h:g} h (register the camera's profile on the "
                "Cameras page or with POST to the API's v1/cameras, and the cycle starts; or set "
                "calibration.cps_per_mbq in trigger_spec)"
            )
            out.append(RecordCycle(c.key, c.injection, "error", reason, n_tp))
            continue
        complete = n_tp >= rules.min_timepoints and c.has_vois and uncalibrated is None
        missing: list[str] = []
        if n_tp < rules.min_timepoints:
            missing.append(f"{n_tp} of {rules.min_timepoints} SPECT time points with their CT")
        if not c.has_vois:
            missing.append("no RTSTRUCT or SEG on a time point's frame of reference")
        if uncalibrated is not None:
            missing.append(f"{WAITING_MARK} {uncalibrated}")
        if not complete and not (past_deadline and c.has_vois and c.timepoints):
            reason = "waiting: " + "; ".join(missing)
            if past_deadline:  # the deadline could not start it either: wait for data, not for the clock
                reason += f" (the deadline of {deadline_h:g} h has passed; a job starts when VOIs arrive)"
                deadline_after = None
            elif deadline_after is not None:
                reason += f" (deadline {deadline_h:g} h after the first series)"
            out.append(RecordCycle(c.key, c.injection, "waiting", reason, n_tp, deadline_after=deadline_after))
            continue
        earlier, busy = _earlier_cycles(ordered, history, c, numbers, starting)
        if busy:
            reason = f"waiting for the job of earlier cycle {busy} to finish"
            out.append(RecordCycle(c.key, c.injection, "waiting", reason, n_tp))
            out.append(RecheckAt(now + timedelta(seconds=RECHECK_S)))
            continue
        spec = copy.deepcopy(dict(rules.spec))
        note = None
        if cam is not None and cam.match is not None:
            spec, note = apply_profile(spec, cam.match)
        if not complete and c.timepoints == 1:
            spec.setdefault("fit", {})["model"] = "stp"
        spec.update(patient_id=pid, cycle_number=numbers[_slot(numbers, c.injection)], earlier_cycles=earlier)
        wanted = spec_hash({**spec, "inputs": ["."]})
        same = [j for j in c.same_input_jobs if j.spec_hash == wanted]
        if same:  # this input set with this job description: never a second job, whatever the first became
            j = same[-1]
            reason = f"this input set already has job {j.id} ({j.state})"
            out.append(RecordCycle(c.key, c.injection, "started", reason, n_tp, existing=j))
            continue
        previous = c.jobs
        out.append(
            StartJob(
                key=c.key,
                injection=c.injection,
                version=(max((j.version or 0) for j in previous) + 1) if previous else 1,
                spec=spec,
                paths=c.paths,
                input_hash=c.input_hash,
                supersedes=previous[-1].id if previous else None,
                timepoints=n_tp,
                how="complete" if complete else f"deadline of {deadline_h:g} h reached",
                missing=tuple(missing) if not complete else (),
                same_images=bool(previous) and previous[-1].input_hash == c.input_hash,
                camera=cam.match if cam is not None else None,
                camera_note=note,
            )
        )
        starting.add(c.key)
    # rows of cycles no longer formed (e.g. an error before the SPECT arrived, a changed injection time)
    out.append(Retire(frozenset({c.key for c in ordered} | kept)))
    return out


# -------------------------------------------------------------------------------------- trigger
class Trigger:
    """Looks at pending patients and starts jobs (see the module docstring).  ``tick(now)`` does one
    round; :class:`service.node_runtime.Automation` runs it in a thread."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._failing: set[str] = set()  # patients whose last evaluation raised (their traceback is logged once)

    # -------------------------------------------------------------- marks (called by the receivers)
    def touch(self, patient_id: str | None, now: datetime | None = None) -> None:
        """An instance of this patient was stored: look after the quiet period."""
        if not patient_id:
            return
        now = now or utcnow()
        self.store.touch_patient(patient_id, now + timedelta(seconds=self.settings.dicom_quiet_period_s))

    def released(self, patient_ids: Iterable[str | None], now: datetime | None = None) -> None:
        """An association (or STOW-RS request) carrying these patients ended: look at them
        ``dicom_release_settle_s`` from now (an instance of theirs arriving meanwhile restarts the quiet period)."""
        now = now or utcnow()
        ready = now + timedelta(seconds=self.settings.dicom_release_settle_s)
        for pid in {p for p in patient_ids if p}:
            self.store.touch_patient(pid, ready)

    # -------------------------------------------------------------- one round
    def tick(self, now: datetime | None = None) -> list[Outcome]:
        now = now or utcnow()
        out: list[Outcome] = []
        due: dict[str, datetime | None] = {pid: touched for pid, touched in self.store.due_patients(now)}
        for pid in self.store.deadline_patients(now):
            due.setdefault(pid, None)
        for pid, touched in due.items():
            try:
                outcomes = self.evaluate_patient(pid, now)
            except Exception as exc:
                if pid in self._failing:  # the traceback was logged the first time: one line per later round
                    log.warning("trigger: evaluating a patient failed again (%s)", type(exc).__name__)
                else:
                    log.exception("trigger: evaluating a patient failed")
                    self._failing.add(pid)
                if touched is not None:  # look again later rather than spin on it
                    self.store.touch_patient(pid, now + timedelta(seconds=RECHECK_S * 10))
                continue
            self._failing.discard(pid)
            out += outcomes
            # stale: instances arrived while looking; the patient stays pending (their marks say when to look again)
            if touched is not None and not any(o.state == "stale" for o in outcomes):
                self.store.clear_patient(pid, touched)
        return out

    def evaluate_patient(self, patient_id: str, now: datetime) -> list[Outcome]:
        """Snapshot the patient, plan, apply (nothing, when instances arrived meanwhile: ``stale``)."""
        snap = self.snapshot(patient_id, now)
        return self.apply(patient_id, now, plan(snap), received_digest=snap.received_digest)

    # -------------------------------------------------------------- reading
    def snapshot(self, patient_id: str, now: datetime) -> PatientSnapshot:
        """What the store and the received files say about one patient (reads only)."""
        rules = Rules.of(self.settings)
        instances = self.store.patient_instances(patient_id)
        digest = instances_digest(i.sop_instance_uid for i in instances)
        ours = self.store.output_series_among(sorted({i.series_instance_uid for i in instances}))
        paths = [Path(i.path) for i in instances if i.series_instance_uid not in ours and Path(i.path).exists()]
        if not paths:
            return PatientSnapshot(patient_id, now, rules, received=False, received_digest=digest)
        series_of = {str(Path(i.path)): i.series_instance_uid for i in instances}
        study_of = {str(Path(i.path)): i.study_instance_uid for i in instances}
        index = scan(paths)  # a file that cannot be read is a problem of that file, never an exception
        try:
            cycles, problems = group_cycles(index)
        except VoxeldoseError as err:
            return PatientSnapshot(
                patient_id, now, rules, form_error=name_series(str(err), series_of), received_digest=digest
            )
        errors = [p for p in list(index.errors) + problems if p.severity == "error"]
        if not cycles:
            why = (
                "; ".join(name_series(p.message, series_of) for p in errors[:3])
                or "no reconstructed SPECT with injection information received"
            )
            return PatientSnapshot(patient_id, now, rules, form_error=why, received_digest=digest)
        facts = []
        attached: set[int] = set()
        profiles = self.store.active_camera_profiles()
        for c in cycles:
            series = [s for tp in c.timepoints for s in (tp.spect, tp.ct) if s is not None] + list(c.vois)
            files = {str(p) for s in series for p in s.paths}
            uids = {s.series_instance_uid for s in series}
            studies = {s.study_instance_uid for s in series}
            bad = []
            for n, p in enumerate(errors):
                of_file = p.path and (p.path in files or any(f in p.path for f in files))
                # also an unreadable file of one of its series, or a file of one of its studies that ingest set
                # aside (a CT slice with a broken geometry would otherwise leave its time point without a CT)
                if of_file or series_of.get(p.path or "") in uids or study_of.get(p.path or "") in studies:
                    bad.append(name_series(p.message, series_of))
                    attached.add(n)
            facts.append(self._cycle_facts(patient_id, c, [str(p) for s in series for p in s.paths], bad, profiles))
        unreadable = tuple(name_series(p.message, series_of) for n, p in enumerate(errors) if n not in attached)
        results = [_earlier_cycle_facts(job.summary()) for job in self.store.patient_jobs(patient_id)]
        return PatientSnapshot(
            patient_id,
            now,
            rules,
            cycles=tuple(facts),
            results=tuple(r for r in results if r is not None),
            unreadable=unreadable,
            received_digest=digest,
        )

    def _cycle_facts(
        self, patient_id: str, c: Cycle, paths: list[str], errors: list[str], profiles: Sequence[CameraRecord]
    ) -> CycleFacts:
        key = cycle_key(patient_id, c.injection.start)
        row = self.store.get_trigger_cycle(key)
        digest = input_fingerprint(c)["sop_instance_uids_sha256"]
        return CycleFacts(
            key=key,
            injection=c.injection.start,
            activity_mbq=c.injection.activity_bq / 1e6,
            timepoints=len(c.timepoints),
            timepoints_with_ct=sum(1 for tp in c.timepoints if tp.ct is not None),
            has_vois=bool(c.vois),
            paths=tuple(paths),
            input_hash=digest,
            errors=tuple(errors),
            first_seen_at=datetime.fromisoformat(row["first_seen_at"]) if row and row["first_seen_at"] else None,
            jobs=tuple(JobFacts.of(j) for j in self.store.cycle_jobs(key)),
            same_input_jobs=tuple(JobFacts.of(j) for j in self.store.jobs_for_input(digest)),
            camera=spect_camera(c, profiles),
            nuclide=c.injection.nuclide,
        )

    # -------------------------------------------------------------- writing
    def apply(
        self, patient_id: str, now: datetime, decisions: Sequence[Decision], *, received_digest: str | None = None
    ) -> list[Outcome]:
        """Hard-link the input sets of the jobs to start, then write every decision in one store transaction
        (a failure leaves the store as it was and removes the links).  ``received_digest``: the patient's received
        instances the decisions were made on (:attr:`PatientSnapshot.received_digest`); when the store holds others
        by the time of writing, nothing is written and the outcome is ``stale`` (the links are removed)."""
        if not decisions:
            return []
        linked: dict[str, Path] = {}
        stale = False
        try:
            for d in decisions:
                if isinstance(d, StartJob):
                    name = f"node-{d.input_hash[:12]}-{uuid.uuid4().hex[:8]}"
                    linked[d.key] = link_inputs(
                        [Path(p) for p in d.paths], self.settings.incoming_dir, name, Path(self.settings.data_dir)
                    )
            with self.store.trigger_writes() as tx:
                # in the writing transaction: on SQLite the database lock is held, nothing can be stored in between;
                # on PostgreSQL an instance committed between this read and the commit (milliseconds) is not seen
                stale = received_digest is not None and tx.received_digest(patient_id) != received_digest
                out = (
                    []
                    if stale
                    else [o for d in decisions if (o := self._write(tx, patient_id, now, d, linked)) is not None]
                )
        except BaseException:
            for folder in linked.values():
                shutil.rmtree(folder, ignore_errors=True)
            raise
        if stale:
            for folder in linked.values():
                shutil.rmtree(folder, ignore_errors=True)
            log.info("trigger: instances of a patient arrived while looking; looked at again when they are complete")
            reason = "instances of the patient arrived while the trigger looked: looked at again when they are complete"
            return [Outcome(cycle_key(patient_id, None), "stale", reason)]
        for o in out:
            if o.state == "started":
                log.info("trigger: job %s version %s queued (%d time point(s))", o.job_id, o.version, o.timepoints)
            elif o.state == "error" and o.cycle_key == cycle_key(patient_id, None):
                log.warning("trigger: a patient's data cannot form a therapy cycle (see GET /v1/dicom/cycles)")
        return out

    def _write(
        self, tx: TriggerWrites, patient_id: str, now: datetime, d: Decision, linked: dict[str, Path]
    ) -> Outcome | None:
        if isinstance(d, RecheckAt):
            tx.touch_patient(patient_id, d.at)
            return None
        if isinstance(d, Retire):
            tx.retire_cycles(patient_id, set(d.keep))
            return None
        injection = d.injection.isoformat() if d.injection is not None else None
        if isinstance(d, RecordCycle):
            reason = d.reason[:MAX_REASON] if d.state == "error" else d.reason
            tx.upsert_cycle(
                CycleUpdate(d.key, patient_id, injection, d.state, reason, d.timepoints, None, d.deadline_after, now)
            )
            if d.existing is not None:
                e = d.existing
                return Outcome(d.key, "exists", d.reason, e.id, e.version, d.timepoints, e.input_hash)
            return Outcome(d.key, d.state, d.reason, timepoints=d.timepoints)
        input_dir = linked[d.key]
        spec = {**d.spec, "inputs": [str(input_dir)]}
        job, created = tx.create_job(
            NewJob(
                spec=spec,
                input_dir=str(input_dir),
                input_hash=d.input_hash,
                patient_id=patient_id,
                submitted_by=f"dicom:{self.settings.dicom_ae_title}",
                source="dicom",
                cycle_key=d.key,
                version=d.version,
                supersedes=d.supersedes,
                camera_profile_id=d.camera.record.id if d.camera is not None else None,
                camera_match=d.camera_note,
            )
        )
        if not created:  # another process won the race for the same input set
            shutil.rmtree(input_dir, ignore_errors=True)
        reason = d.reason(job)
        tx.upsert_cycle(CycleUpdate(d.key, patient_id, injection, "started", reason, d.timepoints, job.id, None, now))
        return Outcome(d.key, "started", reason, job.id, job.version, d.timepoints, d.input_hash, spec)
