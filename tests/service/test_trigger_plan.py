"""The trigger's rule alone: :func:`service.trigger.plan` on hand-built snapshots (no database, no files).

The snapshots say what a patient's received files and the store hold; each test states the rule's answer
from the rule as documented (README, service/trigger.py), not from the code's output.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from service.cameras import CameraMatch, SpectCamera
from service.store import CameraRecord, spec_hash
from service.trigger import (
    CycleFacts,
    EarlierCycle,
    JobFacts,
    PatientSnapshot,
    RecheckAt,
    RecordCycle,
    Retire,
    Rules,
    StartJob,
    cycle_key,
    plan,
)
from voxeldose.camera import CameraIdentity, CameraProfile
from voxeldose.spec import JobSpec

PID = "VD-TEST-1"
NOW = datetime(2026, 5, 4, 12, 0)
INJ = datetime(2026, 5, 1, 9, 30)
RULES = Rules(min_timepoints=3, deadline_h=48.0, spec={})


def cycle(
    *,
    timepoints: int = 4,
    with_ct: int | None = None,
    vois: bool = True,
    injection: datetime = INJ,
    first_seen_at: datetime | None = None,
    input_hash: str = "a" * 64,
    errors: tuple[str, ...] = (),
    jobs: tuple[JobFacts, ...] = (),
    same_input_jobs: tuple[JobFacts, ...] = (),
) -> CycleFacts:
    return CycleFacts(
        key=cycle_key(PID, injection),
        injection=injection,
        activity_mbq=7400.0,
        timepoints=timepoints,
        timepoints_with_ct=timepoints if with_ct is None else with_ct,
        has_vois=vois,
        paths=tuple(f"/received/{i}.dcm" for i in range(timepoints * 2 + vois)),
        input_hash=input_hash,
        errors=errors,
        first_seen_at=first_seen_at,
        jobs=jobs,
        same_input_jobs=same_input_jobs,
    )


def snapshot(*cycles: CycleFacts, now: datetime = NOW, results: tuple[EarlierCycle, ...] = ()) -> PatientSnapshot:
    return PatientSnapshot(PID, now, RULES, cycles=cycles, results=results)


def only(decisions: list, kind: type) -> list:
    return [d for d in decisions if isinstance(d, kind)]


def test_three_time_points_with_ct_and_vois_start_version_one() -> None:
    c = cycle(timepoints=3)
    decisions = plan(snapshot(c))
    [start] = only(decisions, StartJob)
    assert start.key == c.key and start.version == 1 and start.supersedes is None
    assert start.how == "complete" and start.timepoints == 3 and start.missing == ()
    assert start.paths == c.paths and start.input_hash == c.input_hash
    assert start.spec["patient_id"] == PID and start.spec["cycle_number"] == 1 and start.spec["earlier_cycles"] == []
    assert start.spec.get("fit", {}).get("model") != "stp"
    assert only(decisions, RecordCycle) == []
    assert decisions[-1] == Retire(frozenset({c.key}))


def test_two_time_points_wait_and_say_why() -> None:
    c = cycle(timepoints=2, first_seen_at=NOW - timedelta(hours=1))
    decisions = plan(snapshot(c))
    assert only(decisions, StartJob) == []
    [wait] = only(decisions, RecordCycle)
    assert wait.state == "waiting" and "2 of 3 SPECT time points" in wait.reason
    assert wait.deadline_after == timedelta(hours=48)  # the clock runs from the first series


def test_a_time_point_without_its_ct_does_not_count() -> None:
    [wait] = only(plan(snapshot(cycle(timepoints=3, with_ct=2))), RecordCycle)
    assert wait.state == "waiting" and "2 of 3 SPECT time points" in wait.reason


def test_past_the_deadline_one_time_point_starts_a_single_time_point_job() -> None:
    c = cycle(timepoints=1, first_seen_at=NOW - timedelta(hours=48, seconds=1))
    [start] = only(plan(snapshot(c)), StartJob)
    assert start.spec["fit"]["model"] == "stp"
    assert start.how == "deadline of 48 h reached"
    assert start.missing == ("1 of 3 SPECT time points with their CT",)


def test_before_the_deadline_one_time_point_waits() -> None:
    c = cycle(timepoints=1, first_seen_at=NOW - timedelta(hours=47))
    [wait] = only(plan(snapshot(c)), RecordCycle)
    assert wait.state == "waiting" and "1 of 3" in wait.reason


def test_past_the_deadline_without_vois_waits_for_data_not_the_clock() -> None:
    c = cycle(timepoints=4, vois=False, first_seen_at=NOW - timedelta(days=3))
    [wait] = only(plan(snapshot(c)), RecordCycle)
    assert wait.state == "waiting" and "no RTSTRUCT or SEG" in wait.reason and "has passed" in wait.reason
    assert wait.deadline_after is None  # the deadline is cleared: only new data starts it


def test_the_same_input_set_and_description_never_start_a_second_job() -> None:
    # the job description the rule would build for this cycle, as the earlier job recorded it
    described = {"patient_id": PID, "cycle_number": 1, "earlier_cycles": [], "inputs": ["/incoming/node-x"]}
    old = JobFacts("job1", "failed", 1, "a" * 64, spec_hash(described))
    c = cycle(jobs=(old,), same_input_jobs=(old,))
    decisions = plan(snapshot(c))
    assert only(decisions, StartJob) == []
    [rec] = only(decisions, RecordCycle)
    assert rec.state == "started" and rec.existing == old and "already has job job1 (failed)" in rec.reason


def test_the_same_images_with_another_description_are_a_new_version() -> None:
    other = {"patient_id": PID, "cycle_number": 2, "earlier_cycles": [], "inputs": ["/incoming/node-x"]}
    old = JobFacts("job1", "succeeded", 1, "a" * 64, spec_hash(other))
    [start] = only(plan(snapshot(cycle(jobs=(old,), same_input_jobs=(old,)))), StartJob)
    assert start.version == 2 and start.supersedes == "job1" and start.same_images


def test_a_changed_input_set_starts_version_n_plus_one_superseding_the_last() -> None:
    v1 = JobFacts("job1", "succeeded", 1, "a" * 64, "x")
    v2 = JobFacts("job2", "succeeded", 2, "b" * 64, "y")
    c = cycle(input_hash="c" * 64, jobs=(v1, v2), same_input_jobs=())
    [start] = only(plan(snapshot(c)), StartJob)
    assert start.version == 3 and start.supersedes == "job2" and start.input_hash == "c" * 64
    assert not start.same_images


def test_an_ingest_error_on_the_cycles_files_is_an_error_not_a_job() -> None:
    c = cycle(errors=("two SPECT reconstructions at the same time",))
    decisions = plan(snapshot(c))
    assert only(decisions, StartJob) == []
    [err] = only(decisions, RecordCycle)
    assert err.state == "error" and err.reason == "cannot start: two SPECT reconstructions at the same time"


def test_files_that_form_no_cycle_are_one_error_row() -> None:
    snap = PatientSnapshot(PID, NOW, RULES, form_error="no reconstructed SPECT with injection information received")
    err, retire = plan(snap)
    assert isinstance(err, RecordCycle) and err.state == "error" and err.key == cycle_key(PID, None)
    assert err.reason.startswith("cannot form a therapy cycle: no reconstructed SPECT")
    assert retire == Retire(frozenset({err.key}))


def test_unreadable_files_of_no_cycle_are_shown_beside_the_cycles() -> None:
    """A file that cannot be read, of a series in none of the cycles (issue 14, defect 8): an error row for the
    patient with the reason, kept by the Retire; the readable cycle is decided as usual."""
    c = cycle(timepoints=3)
    why = "series 1.2.3: header attribute of the wrong type (tag ImageType (0008,0008); expected VR CS)"
    decisions = plan(PatientSnapshot(PID, NOW, RULES, cycles=(c,), unreadable=(why,)))
    [err] = only(decisions, RecordCycle)
    assert err.key == cycle_key(PID, None) and err.state == "error" and err.reason == f"cannot use: {why}"
    assert [s.key for s in only(decisions, StartJob)] == [c.key]
    assert decisions[-1] == Retire(frozenset({c.key, err.key}))


def test_nothing_received_decides_nothing() -> None:
    assert plan(PatientSnapshot(PID, NOW, RULES, received=False)) == []


def test_a_second_cycle_waits_while_the_first_one_is_started_in_the_same_round() -> None:
    first = cycle(injection=INJ - timedelta(weeks=8), input_hash="1" * 64)
    second = cycle(injection=INJ, input_hash="2" * 64)
    decisions = plan(snapshot(second, first))  # order of the snapshot does not matter: by injection
    [start] = only(decisions, StartJob)
    assert start.key == first.key and start.spec["cycle_number"] == 1
    [wait] = only(decisions, RecordCycle)
    assert wait.key == second.key and "earlier cycle 1" in wait.reason
    assert only(decisions, RecheckAt) == [RecheckAt(NOW + timedelta(seconds=30))]


def test_an_earlier_result_numbers_the_cycle_and_passes_its_doses() -> None:
    earlier = EarlierCycle(
        injection=INJ - timedelta(weeks=6),
        activity_mbq=7300.0,
        own_row={"kidney_gy": 3.1, "marrow_gy": 0.2, "activity_mbq": 7350.0},
    )
    [start] = only(plan(snapshot(cycle(), results=(earlier,))), StartJob)
    assert start.spec["cycle_number"] == 2
    [entry] = start.spec["earlier_cycles"]
    assert entry["number"] == 1 and entry["date"] == (INJ - timedelta(weeks=6)).date().isoformat()
    # the measured cycle's own row wins over the injection's activity
    assert entry["activity_mbq"] == 7350.0 and entry["kidney_gy"] == 3.1 and entry["marrow_gy"] == 0.2
    assert "kidney_u_components_gy" not in entry  # an older result: its uncertainty is not stated, never invented


def test_an_earlier_result_passes_its_kidney_uncertainty_by_component() -> None:
    earlier = EarlierCycle(
        injection=INJ - timedelta(weeks=6),
        activity_mbq=7300.0,
        own_row={"kidney_gy": 3.1, "activity_mbq": 7350.0},
        kidney_u_components_gy={"calibration": 0.15, "counting": 0.05},
    )
    [start] = only(plan(snapshot(cycle(), results=(earlier,))), StartJob)
    [entry] = start.spec["earlier_cycles"]
    assert entry["kidney_u_components_gy"] == {"calibration": 0.15, "counting": 0.05}
    JobSpec.model_validate({**start.spec, "inputs": ["x"]})  # the job description stays valid with it


# ------------------------------------------------------------------------- calibration (issue 12)
SIEMENS = CameraIdentity(manufacturer="SIEMENS NM", model="Symbia T16", device_serial_number="1234")


def _profile_match(n: int = 7) -> CameraMatch:
    prof = CameraProfile(
        name="SPECT 2",
        identity=SIEMENS,
        nuclide="Lu-177",
        sensitivity_cps_per_mbq=9.4,
        sensitivity_u_cps_per_mbq=0.1,
        measured="2026-11-30",
        source="cylinder",
    )
    return CameraMatch(CameraRecord(n, prof, "phys", datetime(2026, 12, 1, tzinfo=UTC), True, None, None), 1)


def with_camera(c: CycleFacts, *, counts: bool = True, match: CameraMatch | None = None) -> CycleFacts:
    return replace(c, camera=SpectCamera(SIEMENS, counts, match))


def test_counts_without_calibration_or_profile_wait_naming_the_camera() -> None:
    c = with_camera(cycle(first_seen_at=NOW - timedelta(hours=1)))
    decisions = plan(snapshot(c))
    assert only(decisions, StartJob) == []
    [rec] = only(decisions, RecordCycle)
    assert rec.state == "waiting" and rec.reason.startswith(
        "waiting: no calibration for camera SIEMENS NM Symbia T16 1234"
    )
    assert rec.deadline_after == timedelta(hours=48)


def test_counts_without_calibration_at_the_deadline_are_an_error_not_a_job() -> None:
    c = with_camera(cycle(first_seen_at=NOW - timedelta(hours=49)))
    decisions = plan(snapshot(c))
    assert only(decisions, StartJob) == []
    [rec] = only(decisions, RecordCycle)
    assert rec.state == "error" and "no calibration for camera SIEMENS NM Symbia T16 1234" in rec.reason


def test_a_matching_profile_calibrates_and_a_site_calibration_wins() -> None:
    c = with_camera(cycle(), match=_profile_match(7))
    [start] = only(plan(snapshot(c)), StartJob)
    assert start.spec["calibration"] == {"cps_per_mbq": 9.4, "source": "camera profile SPECT 2 (id 7)"}
    assert start.camera is not None and start.camera.record.id == 7
    site = Rules(min_timepoints=3, deadline_h=48.0, spec={"calibration": {"cps_per_mbq": 5.0}})
    [start] = only(plan(PatientSnapshot(PID, NOW, site, cycles=(c,))), StartJob)
    assert start.spec["calibration"] == {"cps_per_mbq": 5.0}
    # a site calibration also starts a counts SPECT without a profile; images in Bq/ml need none
    [start] = only(plan(PatientSnapshot(PID, NOW, site, cycles=(with_camera(cycle()),))), StartJob)
    assert start.spec["calibration"] == {"cps_per_mbq": 5.0}
    assert only(plan(snapshot(with_camera(cycle(), counts=False))), StartJob) != []
