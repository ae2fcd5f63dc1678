"""The dispatcher with a real local Ray (one per session): success on the small phantom, bad
input, worker crashes (retried), timeout and cancel (the worker process is killed), the bound on
jobs in flight, and recovery of jobs a dead service left running.

Tasks other than the real worker are functions of this module, which Ray pickles by value
(``register_pickle_by_value``) because the Ray workers cannot import a test module.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import JOB_WAIT_S, STATE_WAIT_S, wait_for

ray = pytest.importorskip("ray")
from ray import cloudpickle

from service.dispatcher import Dispatcher
from service.store import Store
from service.worker import JobOutcome

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# One Ray per session: under pytest-xdist `--dist loadgroup` keeps these tests on one worker.
pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.xdist_group("ray")]


# ------------------------------------------------------------------ tasks run by Ray workers
def crash_first_time(job_id: str, spec: dict, out_dir: str, database_url: str) -> dict:
    """Dies like a segfaulting / OOM-killed worker on the first attempt, succeeds on the second."""
    marker = Path(spec["marker"])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return JobOutcome(result_dir=out_dir, patient_id="P-CRASH")


def always_crash(job_id: str, spec: dict, out_dir: str, database_url: str) -> dict:
    os._exit(1)


def exit_via_sys_exit(job_id: str, spec: dict, out_dir: str, database_url: str) -> dict:
    sys.exit(3)


def sleep_long(job_id: str, spec: dict, out_dir: str, database_url: str) -> dict:
    Path(spec["pidfile"]).write_text(str(os.getpid()))
    time.sleep(300)  # longer than any wait of the tests: only a kill ends it early
    return JobOutcome(result_dir=out_dir, patient_id=None)


def short_and_logged(job_id: str, spec: dict, out_dir: str, database_url: str) -> dict:
    log = Path(spec["log"])
    t0 = time.time()
    time.sleep(0.4)
    with open(log, "a") as f:
        f.write(f"{job_id} {t0} {time.time()}\n")
    return JobOutcome(result_dir=out_dir, patient_id=None)


def ok_at_once(job_id: str, spec: dict, out_dir: str, database_url: str) -> dict:
    return JobOutcome(result_dir=out_dir, patient_id="P-OK")


# ------------------------------------------------------------------ helpers
def _store(settings: Any) -> Store:
    st = Store(settings.database_url, max_attempts=settings.max_attempts)
    st.migrate()
    return st


def _submit(store: Store, spec: dict, input_dir: Path | str, key: str | None = None) -> str:
    job, created = store.create_job(
        spec=spec,
        input_dir=str(input_dir),
        input_hash=hashlib.sha256(repr(spec).encode()).hexdigest(),
        patient_id=None,
        idempotency_key=key,
        submitted_by="test",
    )
    assert created
    return job.id


def _wait(store: Store, job_id: str, pred: Callable[[Any], bool], timeout: float = STATE_WAIT_S):
    return wait_for(lambda: store.get_job(job_id), until=pred, timeout_s=timeout, interval_s=0.05, what=f"job {job_id}")


def _done(j: Any) -> bool:
    return j.state in ("succeeded", "failed", "cancelled")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _pid_gone(pid: int, timeout: float = STATE_WAIT_S) -> bool:
    """True once the process has ended; an AssertionError (with the pid) when it outlives the wait."""
    return wait_for(lambda: _gone(pid), timeout_s=timeout, what=f"process {pid} to end")


def _wait_file(path: Path, timeout: float = STATE_WAIT_S) -> str:
    def text() -> str:
        return path.read_text() if path.exists() else ""

    return wait_for(text, timeout_s=timeout, interval_s=0.05, what=f"{path} to be written (a Ray worker starting)")


# ------------------------------------------------------------------ the real worker
def test_small_phantom_job_succeeds(make_settings, small_phantom) -> None:
    settings = make_settings()
    store = _store(settings)
    spec = {
        "inputs": [str(small_phantom["dicom"])],
        "calibration": {"cps_per_mbq": small_phantom["truth"]["calibration_cps_per_mbq"]},
    }
    job_id = _submit(store, spec, small_phantom["dicom"])
    d = Dispatcher(store, settings)
    d.start()
    try:
        assert d.ray_ok() and d.device() == "cpu"
        stages = set()

        def job_and_stage() -> Any:
            j = store.get_job(job_id)
            stages.add(j.stage)
            return j

        j = wait_for(job_and_stage, until=_done, timeout_s=JOB_WAIT_S, interval_s=0.05, what=f"job {job_id} to end")
    finally:
        d.stop()
    assert j.state == "succeeded", j.error
    out = Path(j.result_dir)
    assert out == settings.job_out_dir(job_id)
    assert {p.name for p in out.iterdir()} >= {"rtdose.dcm", "summary.json", "report.html"}
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # written atomically
    assert j.patient_id == "VD-PHANTOM-LU177" and j.progress == 1.0 and j.stage == "done" and j.attempts == 1
    assert stages & {"register", "dose", "metrics"}  # progress was reported while it ran
    assert small_phantom["dicom"].is_dir() and any(small_phantom["dicom"].rglob("*.dcm"))


def test_bad_input_fails_with_the_message_and_keeps_the_input(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    store = _store(settings)
    bad = tmp_path / "incoming" / "upload-1"
    bad.mkdir(parents=True)
    (bad / "scan.dcm").write_bytes(os.urandom(4096))
    job_id = _submit(store, {"inputs": [str(bad)]}, bad)
    d = Dispatcher(store, settings)
    d.start()
    try:
        j = _wait(store, job_id, _done, timeout=JOB_WAIT_S)  # the real worker: imports the pipeline
    finally:
        d.stop()
    assert j.state == "failed" and j.attempts == 1
    assert "no DICOM" in j.error and str(tmp_path) not in j.error
    assert (bad / "scan.dcm").exists()
    assert j.result_dir is None and not settings.job_out_dir(job_id).exists()


# ------------------------------------------------------------------ worker loss
def test_crashed_worker_is_retried(make_settings, tmp_path: Path, database_url: str) -> None:
    settings = make_settings(max_attempts=3, database_url=database_url)  # SQLite, and PostgreSQL when set
    store = _store(settings)
    job_id = _submit(store, {"inputs": [], "marker": str(tmp_path / "crashed-once")}, tmp_path)
    d = Dispatcher(store, settings, task=crash_first_time)
    d.start()
    try:
        j = _wait(store, job_id, _done)
    finally:
        d.stop()
    assert (tmp_path / "crashed-once").exists()
    assert j.state == "succeeded" and j.attempts == 2 and j.patient_id == "P-CRASH"


@pytest.mark.parametrize("task", [always_crash, exit_via_sys_exit], ids=["os._exit", "sys.exit"])
def test_worker_lost_every_time_fails_after_max_attempts(make_settings, tmp_path: Path, task) -> None:
    settings = make_settings(max_attempts=2)
    store = _store(settings)
    job_id = _submit(store, {"inputs": []}, tmp_path)
    d = Dispatcher(store, settings, task=task)
    d.start()
    try:
        j = _wait(store, job_id, _done)
    finally:
        d.stop()
    assert j.state == "failed" and j.attempts == 2 and "2 times" in j.error


# ------------------------------------------------------------------ timeout, cancel, stop
def test_timeout_stops_the_worker(make_settings, tmp_path: Path) -> None:
    # The limit runs from submission; on a busy machine a Ray worker can take longer than a short limit to start,
    # and the job would be stopped before its worker ran.  So: no limit in reach until the worker runs the job, then
    # a 1 s limit (the dispatcher reads it each round), which the running job has passed or soon passes.
    settings = make_settings(job_timeout_s=3600.0)
    store = _store(settings)
    pidfile = tmp_path / "pid"
    job_id = _submit(store, {"inputs": [], "pidfile": str(pidfile)}, tmp_path)
    d = Dispatcher(store, settings, task=sleep_long)
    d.start()
    try:
        pid = int(_wait_file(pidfile))
        assert store.get_job(job_id).state == "running" and not _gone(pid)
        settings.job_timeout_s = 1.0
        j = _wait(store, job_id, _done)
        assert j.state == "failed" and "time limit (1 s)" in j.error and j.attempts == 1
        assert d.in_flight() == 0
        assert _pid_gone(pid), "the timed-out worker process is still running"
    finally:
        d.stop()


def test_cancel_running_job_kills_the_worker(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    store = _store(settings)
    pidfile = tmp_path / "pid"
    job_id = _submit(store, {"inputs": [], "pidfile": str(pidfile)}, tmp_path)
    d = Dispatcher(store, settings, task=sleep_long)
    d.start()
    try:
        pid = int(_wait_file(pidfile))
        assert store.request_cancel(job_id).state == "running"
        j = _wait(store, job_id, _done)
        assert j.state == "cancelled"
        assert _pid_gone(pid), "the cancelled worker process is still running"
    finally:
        d.stop()


def test_stop_gives_running_jobs_back(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    store = _store(settings)
    pidfile = tmp_path / "pid"
    job_id = _submit(store, {"inputs": [], "pidfile": str(pidfile)}, tmp_path)
    d = Dispatcher(store, settings, task=sleep_long)
    d.start()
    pid = int(_wait_file(pidfile))
    d.stop()
    j = store.get_job(job_id)
    assert j.state == "queued" and j.attempts == 0
    assert _pid_gone(pid)


# ------------------------------------------------------------------ bound and restart
def test_jobs_in_flight_bound(make_settings, tmp_path: Path) -> None:
    settings = make_settings(jobs_in_flight=1)
    store = _store(settings)
    log = tmp_path / "runs.log"
    ids = [_submit(store, {"inputs": [], "n": n, "log": str(log)}, tmp_path) for n in range(3)]
    d = Dispatcher(store, settings, task=short_and_logged)
    d.start()
    max_running = 0

    def counts() -> dict[str, int]:
        nonlocal max_running
        c = store.counts_by_state()
        max_running = max(max_running, c["running"], d.in_flight())
        return c

    try:
        wait_for(counts, until=lambda c: c["succeeded"] == 3, interval_s=0.02, what="3 jobs to succeed")
    finally:
        d.stop()
    assert [store.get_job(i).state for i in ids] == ["succeeded"] * 3
    assert max_running == 1
    spans = sorted((float(a), float(b)) for _, a, b in (line.split() for line in log.read_text().splitlines()))
    assert all(nxt[0] >= prev[1] for prev, nxt in zip(spans, spans[1:])), spans  # never two at once
    assert [x[1] for x in sorted((store.get_job(i).started_at, i) for i in ids)] == ids  # oldest first


def test_jobs_left_running_by_a_dead_service_complete_after_restart(
    make_settings, tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(database_url=database_url)
    store = _store(settings)
    job_id = _submit(store, {"inputs": []}, tmp_path)
    (claimed,) = store.claim_queued(1)  # the service that claimed it was killed (kill -9): it stays running
    assert claimed.id == job_id and store.get_job(job_id).state == "running"
    d = Dispatcher(store, settings, task=ok_at_once)
    d.start()
    try:
        assert d.recovered == 1
        j = _wait(store, job_id, _done)
    finally:
        d.stop()
    assert j.state == "succeeded" and j.attempts == 2 and j.patient_id == "P-OK"
