"""The job store on SQLite (and PostgreSQL when VOXELDOSE_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the service extra is not installed (pip install -e '.[service,test]')")

from service.auth import hash_token, role_at_least
from service.store import JOB_STATES, Store
from service.web.views import job_out

SPEC = {"inputs": ["/data/incoming/u1"], "calibration": {"cps_per_mbq": 12.5}}


def _hash(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def new_job(store: Store, n: int | str = 1, **kw):
    args = dict(
        spec=SPEC,
        input_dir=f"/data/incoming/u{n}",
        input_hash=_hash(n),
        patient_id="P1",
        idempotency_key=None,
        submitted_by="alice",
    )
    args.update(kw)
    return store.create_job(**args)


# ------------------------------------------------------------------ schema
def _alembic_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from service.store import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_migrate_on_empty_database_and_again(store: Store) -> None:
    from sqlalchemy import inspect, text

    names = set(inspect(store.engine).get_table_names())
    assert {"jobs", "tokens", "alembic_version"} <= names
    store.migrate()  # idempotent
    with store.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == _alembic_head()
    assert store.ping()
    if store.dialect == "sqlite":
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_models_match_the_migrations(store: Store) -> None:
    """The ORM models and the migration scripts describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.models import Base

    with store.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []


def test_migration_0004_keeps_the_keys_of_earlier_jobs(database_url: str) -> None:
    """Upgrading a database with keyed jobs: each key stays bound to its job (fingerprint unknown, so a repeat is
    still answered with it), and two submitters may then use the same key."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from service.store import MIGRATIONS_DIR

    st = Store(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with st.db.begin_writing() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.execute(
            text(
                "INSERT INTO jobs (id, state, progress, created_at, attempts, idempotency_key, input_hash, spec_hash,"
                " input_dir, spec, submitted_by, cancel_requested) VALUES ('a' || :n, 'queued', 0, :t, 0, 'k-old',"
                " :h, :h, '/data/incoming/u1', '{}', 'alice', false)"
            ),
            {"n": "1" * 31, "t": datetime.now(UTC), "h": _hash(1)},
        )
    st.migrate()
    try:
        use = st.key_use("alice", "k-old")
        assert use is not None and use.job.id == "a" + "1" * 31 and use.same_request(_hash("any request"))
        b, created = new_job(st, 2, idempotency_key="k-old", submitted_by="bob", request_fingerprint=_hash("b"))
        assert created and b.id != use.job.id
    finally:
        st.dispose()


# ------------------------------------------------------------------ create, dedup
def test_create_and_get(store: Store) -> None:
    job, created = new_job(store)
    assert created and job.state == "queued" and job.attempts == 0 and job.progress == 0.0
    assert len(job.id) == 32 and job.created_at.tzinfo is not None
    assert job.created_at.utcoffset().total_seconds() == 0
    got = store.get_job(job.id)
    assert got == job
    assert store.get_job("nope") is None
    pub = job_out(job).model_dump(mode="json")  # the public form of a job (API and pages)
    assert "input_dir" not in pub and "result_dir" not in pub and "inputs" not in pub["spec"]
    assert pub["spec"]["calibration"] == {"cps_per_mbq": 12.5}
    assert "/data" not in repr(pub)


def test_idempotency_key_returns_the_same_job(store: Store) -> None:
    a, created_a = new_job(store, 1, idempotency_key="k-1")
    b, created_b = new_job(store, 2, idempotency_key="k-1")  # other files, same key: the first job
    assert created_a and not created_b and a.id == b.id
    c, created_c = new_job(store, 3, idempotency_key="k-2")
    assert created_c and c.id != a.id


def test_an_idempotency_key_belongs_to_its_submitter_and_its_request(store: Store) -> None:
    """Issue 14: the same key with another request fingerprint is refused (the IETF draft's 422), the same key
    and fingerprint is the first job; another submitter's key is a key of its own (a new job)."""
    from service.errors import ErrorKind
    from service.store import IdempotencyKeyReused

    a, created = new_job(store, 1, idempotency_key="k-1", request_fingerprint=_hash("request-a"))
    assert created and store.key_use("alice", "k-1").job == a
    again, created = new_job(store, 1, idempotency_key="k-1", request_fingerprint=_hash("request-a"))
    assert not created and again.id == a.id
    with pytest.raises(IdempotencyKeyReused) as err:
        new_job(store, 2, idempotency_key="k-1", request_fingerprint=_hash("request-b"))
    assert err.value.kind is ErrorKind.INVALID and "k-1" in err.value.detail and a.id in err.value.detail
    assert store.list_jobs()[1] == 1  # nothing created
    # bob's k-1 is not alice's: his own job (a submitter's input set is reused only among its own jobs)
    b, created = new_job(
        store, 1, idempotency_key="k-1", submitted_by="bob", request_fingerprint=_hash("b"), dedup_within="bob"
    )
    assert created and b.id != a.id and b.submitted_by == "bob"
    assert store.key_use("bob", "k-1").job == b and store.key_use("carol", "k-1") is None
    # a key whose request got an existing job (the same input set) is bound to that job and that request too
    c, created = new_job(store, 1, idempotency_key="k-2", request_fingerprint=_hash("request-c"), dedup_within="alice")
    assert not created and c.id == a.id
    with pytest.raises(IdempotencyKeyReused):
        new_job(store, 3, idempotency_key="k-2", request_fingerprint=_hash("request-d"))


def _race(url: str, key: str, fingerprints: tuple[str, str]) -> list[object]:
    """Two stores (as two processes) create a job with ``key`` at once, each on an input set of its own; what
    each call ended with (``(job, created)`` or the exception)."""
    stores = [Store(url) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def worker(k: int) -> None:
        barrier.wait()
        try:
            results[k] = new_job(stores[k], f"{key}-{k}", idempotency_key=key, request_fingerprint=fingerprints[k])
        except BaseException as exc:  # noqa: BLE001 - what the request ends with is the result
            results[k] = exc

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.dispose()
    return results


def test_concurrent_requests_with_one_key_make_one_job(store: Store) -> None:
    """Two processes racing with the same key (other input sets, so nothing else serialises them): one job; the
    same request gets it, another request is refused — never a second job or an IntegrityError."""
    from service.store import IdempotencyKeyReused

    same = _race(store.url, "race-1", (_hash("same"), _hash("same")))
    assert all(isinstance(r, tuple) for r in same), same
    assert sorted(created for _, created in same) == [False, True] and same[0][0].id == same[1][0].id
    other = _race(store.url, "race-2", (_hash("one"), _hash("other")))
    jobs = [r for r in other if isinstance(r, tuple)]
    refused = [r for r in other if isinstance(r, IdempotencyKeyReused)]
    assert len(jobs) == 1 and jobs[0][1] and len(refused) == 1, other
    assert store.list_jobs()[1] == 2


def test_dedup_within_one_submitter(store: Store) -> None:
    """``dedup_within``: the same input set and spec is reused only among that submitter's jobs."""
    a, _ = new_job(store, 1)
    b, created = new_job(store, 1, submitted_by="bob", dedup_within="bob")
    assert created and b.id != a.id
    c, created = new_job(store, 1, submitted_by="bob", dedup_within="bob")
    assert not created and c.id == b.id
    d, created = new_job(store, 1, submitted_by="physicist-1")  # no restriction: the newest such job
    assert not created and d.id == b.id


def test_same_input_set_and_spec_is_not_queued_twice(store: Store) -> None:
    a, _ = new_job(store, 1)
    # another upload of the same files: inputs point elsewhere, the spec is otherwise the same
    b, created = new_job(store, 1, input_dir="/data/incoming/u9", spec={**SPEC, "inputs": ["/data/incoming/u9"]})
    assert not created and b.id == a.id
    # a different spec on the same input set is a new job
    c, created = new_job(store, 1, spec={**SPEC, "dose": {"method": "led"}})
    assert created and c.id != a.id
    # once the first job failed, the same input set may run again
    store.claim_queued(10)
    store.fail(a.id, "bad")
    d, created = new_job(store, 1)
    assert created and d.id not in (a.id, c.id)


def test_list_jobs_filters_newest_first(store: Store) -> None:
    ids = [new_job(store, n, patient_id="P1" if n % 2 else "P2")[0].id for n in range(5)]
    jobs, total = store.list_jobs()
    assert total == 5 and [j.id for j in jobs] == ids[::-1]
    jobs, total = store.list_jobs(patient_id="P2", limit=1, offset=1)
    assert total == 3 and [j.id for j in jobs] == [ids[2]]
    store.claim_queued(2)
    assert store.list_jobs(state="running")[1] == 2
    assert store.counts_by_state() == {"queued": 3, "running": 2, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert set(store.counts_by_state()) == set(JOB_STATES)


# ------------------------------------------------------------------ claim
def test_claim_oldest_first_counts_attempts(store: Store) -> None:
    a, _ = new_job(store, 1)
    b, _ = new_job(store, 2)
    got = store.claim_queued(1)
    assert [j.id for j in got] == [a.id]
    assert got[0].state == "running" and got[0].attempts == 1 and got[0].started_at is not None
    assert [j.id for j in store.claim_queued(5)] == [b.id]
    assert store.claim_queued(5) == [] and store.claim_queued(0) == []


def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    n_jobs = 40
    ids = {new_job(store, n)[0].id for n in range(n_jobs)}
    stores = [Store(store.url) for _ in range(2)]  # two engines, as two processes would have
    claimed: list[list[str]] = [[], []]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait()
            while True:
                got = stores[k].claim_queued(3)
                if not got:
                    return
                claimed[k] += [j.id for j in got]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.dispose()
    assert not errors
    all_claimed = claimed[0] + claimed[1]
    assert len(all_claimed) == len(set(all_claimed)) == n_jobs
    assert set(all_claimed) == ids
    assert all(j.attempts == 1 for j in store.list_jobs(limit=100)[0])


# ------------------------------------------------------------------ progress and outcomes
def test_progress_finish(store: Store) -> None:
    job, _ = new_job(store, patient_id=None)
    store.set_progress(job.id, "ingest", 0.5)  # not running yet: ignored
    assert store.get_job(job.id).stage is None
    store.claim_queued(1)
    store.set_progress(job.id, "dose", 0.7)
    j = store.get_job(job.id)
    assert (j.stage, j.progress) == ("dose", 0.7)
    store.set_progress(job.id, "dose", 7)
    assert store.get_job(job.id).progress == 1.0
    store.finish(job.id, "/data/jobs/x/out", "VD-1")
    j = store.get_job(job.id)
    assert j.state == "succeeded" and j.result_dir == "/data/jobs/x/out" and j.patient_id == "VD-1"
    assert j.stage == "done" and j.progress == 1.0 and j.finished_at.tzinfo is not None
    assert job_out(j).has_result is True
    store.fail(job.id, "too late")  # terminal states stay
    assert store.get_job(job.id).state == "succeeded"
    assert [r.id for r in store.patient_jobs("VD-1")] == [job.id]


def test_fail_keeps_the_message(store: Store) -> None:
    job, _ = new_job(store)
    store.claim_queued(1)
    store.fail(job.id, "x.dcm: no SPECT series (tag Modality; expected NM)")
    j = store.get_job(job.id)
    assert j.state == "failed" and j.error.startswith("x.dcm: no SPECT") and j.finished_at is not None
    assert store.patient_jobs("P1") == []


def test_requeue_until_max_attempts(store: Store) -> None:
    job, _ = new_job(store)
    for attempt in (1, 2):
        (j,) = store.claim_queued(1)
        assert j.attempts == attempt
        store.set_progress(job.id, "register", 0.4)
        store.requeue(job.id, "worker lost: WorkerCrashedError")
        j = store.get_job(job.id)
        assert j.state == "queued" and j.attempts == attempt and j.stage is None and j.progress == 0.0
    store.claim_queued(1)
    store.requeue(job.id, "worker lost: WorkerCrashedError")  # third run lost: max_attempts=3
    j = store.get_job(job.id)
    assert j.state == "failed" and j.attempts == 3 and "3 times" in j.error and "WorkerCrashedError" in j.error


def test_requeue_without_counting_the_attempt(store: Store) -> None:
    job, _ = new_job(store)
    store.claim_queued(1)
    store.requeue(job.id, "the service was stopped", count_attempt=False)
    j = store.get_job(job.id)
    assert j.state == "queued" and j.attempts == 0
    store.requeue(job.id, "not running")  # only running jobs are requeued
    assert store.get_job(job.id).state == "queued"


# ------------------------------------------------------------------ cancel
def test_cancel_queued_is_immediate(store: Store) -> None:
    job, _ = new_job(store)
    j = store.request_cancel(job.id)
    assert j.state == "cancelled" and j.finished_at is not None
    assert store.claim_queued(5) == []
    assert store.request_cancel("missing") is None


def test_cancel_running_is_a_request(store: Store) -> None:
    job, _ = new_job(store)
    other, _ = new_job(store, 2)
    store.claim_queued(5)
    j = store.request_cancel(job.id)
    assert j.state == "running" and j.cancel_requested
    assert store.cancel_requested_ids([job.id, other.id]) == {job.id}
    assert store.cancel_requested_ids([]) == set()
    store.mark_cancelled(job.id)
    j = store.get_job(job.id)
    assert j.state == "cancelled" and j.finished_at is not None
    # a lost worker of a job someone wanted cancelled: cancelled, not retried
    store.request_cancel(other.id)
    store.requeue(other.id, "worker lost")
    assert store.get_job(other.id).state == "cancelled"


def test_cancel_finished_changes_nothing(store: Store) -> None:
    job, _ = new_job(store)
    store.claim_queued(1)
    store.finish(job.id, "/r", None)
    j = store.request_cancel(job.id)
    assert j.state == "succeeded" and not j.cancel_requested


# ------------------------------------------------------------------ restart
def test_recover_after_restart(store: Store) -> None:
    running, _ = new_job(store, 1)
    exhausted, _ = new_job(store, 2)
    queued, _ = new_job(store, 3)
    # `exhausted` has used its attempts: 3 claims, 2 requeues
    store.claim_queued(2)
    for _ in range(2):
        store.requeue(exhausted.id, "lost")
        store.requeue(running.id, "lost", count_attempt=False)
        store.claim_queued(2)
    assert store.get_job(exhausted.id).attempts == 3 and store.get_job(running.id).attempts == 1
    assert store.recover_after_restart() == 1
    assert store.get_job(running.id).state == "queued"
    e = store.get_job(exhausted.id)
    assert e.state == "failed" and "service stopped" in e.error
    assert store.get_job(queued.id).state == "queued"
    assert store.recover_after_restart() == 0


# ------------------------------------------------------------------ tokens
def test_tokens_are_stored_hashed(store: Store) -> None:
    from sqlalchemy import text

    plain = store.create_token("alice", "physicist")
    assert len(plain) >= 40
    with store.engine.connect() as c:
        rows = c.execute(text("SELECT name, role, token_hash FROM tokens")).all()
    assert rows == [("alice", "physicist", hash_token(plain))]
    assert plain not in repr(rows)
    assert store.verify_token(plain) == ("alice", "physicist")
    assert store.verify_token(plain + "x") is None and store.verify_token("") is None
    listed = store.list_tokens()
    assert len(listed) == 1 and listed[0]["active"] and listed[0]["last_used_at"] is not None
    assert "token_hash" not in listed[0]


def test_token_revoke_and_names(store: Store) -> None:
    plain = store.create_token("robot", "submitter")
    with pytest.raises(ValueError, match="exists"):
        store.create_token("robot", "admin")
    with pytest.raises(ValueError, match="role"):
        store.create_token("bob", "root")
    assert store.revoke_token("robot") is True
    assert store.verify_token(plain) is None
    assert store.revoke_token("robot") is False
    again = store.create_token("robot", "admin")  # the name is free again
    assert store.verify_token(again) == ("robot", "admin")
    assert [t["active"] for t in store.list_tokens()] == [False, True]


def test_roles_are_ordered() -> None:
    assert role_at_least("admin", "physicist") and role_at_least("physicist", "submitter")
    assert not role_at_least("submitter", "physicist") and not role_at_least("nobody", "submitter")
    with pytest.raises(ValueError):
        role_at_least("admin", "root")


# ------------------------------------------------------------------ settings and commands
def test_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.config import Settings

    monkeypatch.setenv("VOXELDOSE_JOBS_IN_FLIGHT", "5")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    s = Settings(data_dir=tmp_path / "d")
    assert s.database_url == f"sqlite:///{tmp_path / 'd' / 'voxeldose.db'}"
    assert s.jobs_in_flight == 5 and s.ray_address == "ray://head:10001"
    assert s.job_out_dir("abc") == tmp_path / "d" / "jobs" / "abc" / "out"
    assert Settings(auth_disabled=True, host="::1").auth_disabled
    with pytest.raises(ValidationError, match="loopback"):
        Settings(auth_disabled=True, host="0.0.0.0")


def test_token_command_through_the_voxeldose_plugin_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from voxeldose.cli import main

    d = str(tmp_path / "d")
    assert main(["token", "--data-dir", d, "create", "--name", "ci", "--role", "admin"]) == 0
    plain = capsys.readouterr().out.strip()
    st = Store(f"sqlite:///{tmp_path / 'd' / 'voxeldose.db'}")
    assert st.verify_token(plain) == ("ci", "admin")
    assert main(["token", "--data-dir", d, "list"]) == 0
    out = capsys.readouterr().out
    assert "ci" in out and "admin" in out and plain not in out
    assert main(["token", "--data-dir", d, "revoke", "--name", "ci"]) == 0
    assert main(["token", "--data-dir", d, "revoke", "--name", "ci"]) == 1
    assert st.verify_token(plain) is None
    st.dispose()
    with pytest.raises(SystemExit):
        main(["--help"])
    helptext = capsys.readouterr().out
    assert "serve" in helptext and "token" in helptext


def test_timestamps_are_utc(store: Store) -> None:
    job, _ = new_job(store)
    store.claim_queued(1)
    j = store.get_job(job.id)
    for t in (j.created_at, j.started_at):
        assert t.tzinfo is not None and t.astimezone(UTC) == t and t.utcoffset().total_seconds() == 0
