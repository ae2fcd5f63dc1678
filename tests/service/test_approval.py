"""The physicist's review in the core and the store (service.approval, service.store.approvals) and what the
sender sends because of it, against dcmtk's storescp, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from test_sender import StoreSCP, _succeeded_job, peer, result_dir  # noqa: F401 - fixtures used by name

from service import approval
from service.auth import Principal
from service.errors import ErrorKind, ServiceError
from service.models import utcnow
from service.sender import Sender
from service.store import MIGRATIONS_DIR, Store

PHYSICIST = Principal("phys-a", "physicist", "header")
SUBMITTER = Principal("sub-a", "submitter", "header")


def _queued_job(store: Any) -> str:
    job, _ = store.create_job(
        spec={"inputs": ["x"]},
        input_dir="x",
        input_hash=hashlib.sha256(b"a queued job").hexdigest(),  # hex: PostgreSQL locks on its prefix
        patient_id="P",
        idempotency_key=None,
        submitted_by=None,
    )
    return str(job.id)


def _refused(kind: ErrorKind, slug: str, fn: Any, *args: Any) -> None:
    with pytest.raises(ServiceError) as exc:
        fn(*args)
    assert (exc.value.kind, exc.value.slug) == (kind, slug), exc.value.detail


def test_review_rules_history_and_audit(make_settings: Any, store: Any, result_dir: Path) -> None:  # noqa: F811
    settings = make_settings(review_organisation="NM Physics, Example")
    job_id = _succeeded_job(store, result_dir)
    decide = approval.decide
    # a submitter may not review
    _refused(ErrorKind.FORBIDDEN, "forbidden", decide, settings, store, job_id, SUBMITTER, "approved", None)
    # rejecting or revoking needs a reason; revoking needs a decision to revoke
    _refused(ErrorKind.BAD_REQUEST, "reason-required", decide, settings, store, job_id, PHYSICIST, "rejected", " ")
    _refused(ErrorKind.CONFLICT, "already-decided", decide, settings, store, job_id, PHYSICIST, "revoked", "x")
    _refused(ErrorKind.BAD_REQUEST, "bad-request", decide, settings, store, job_id, PHYSICIST, "signed", None)
    _refused(ErrorKind.NOT_FOUND, "not-found", decide, settings, store, "0" * 32, PHYSICIST, "approved", None)
    # only a succeeded job's result is reviewed
    queued = _queued_job(store)
    _refused(ErrorKind.CONFLICT, "not-reviewable", decide, settings, store, queued, PHYSICIST, "approved", None)
    assert store.review_state(job_id) is None and store.audit_events(job_id=job_id) == []

    t0 = utcnow()
    a = decide(settings, store, job_id, PHYSICIST, "approved", None)
    assert (a.decision, a.state, a.by_name, a.by_role, a.organisation) == (
        "approved",
        "approved",
        "phys-a",
        "physicist",
        "NM Physics, Example",
    )
    assert a.at >= t0 - timedelta(seconds=1)
    # approving twice is one approval
    _refused(ErrorKind.CONFLICT, "already-decided", decide, settings, store, job_id, PHYSICIST, "approved", None)
    # the approved copies exist (the fixture's result has an RT Dose, no SR)
    copy = pydicom.dcmread(approval.approved_dir(store.get_job(job_id), a.id) / "rtdose.dcm")
    assert copy.DoseComment.startswith("APPROVED") and "phys-a" in copy.DoseComment

    r = decide(settings, store, job_id, Principal("admin-b", "admin", "header"), "rejected", "kidney VOI misplaced")
    assert r.state == "rejected" and r.reason == "kidney VOI misplaced"
    v = decide(settings, store, job_id, PHYSICIST, "revoked", "contours redone")
    assert v.state == "unreviewed" and store.review_state(job_id).state == "unreviewed"

    assert [h.decision for h in store.review_history(job_id)] == ["approved", "rejected", "revoked"]
    events = store.audit_events(job_id=job_id)  # newest first
    assert [(e.action, e.actor, e.actor_role) for e in events] == [
        ("job.revoked", "phys-a", "physicist"),
        ("job.rejected", "admin-b", "admin"),
        ("job.approved", "phys-a", "physicist"),
    ]
    assert events[1].detail["reason"] == "kidney VOI misplaced"
    assert events[2].detail["from"] == "unreviewed" and events[2].detail["to"] == "approved"
    assert events[2].detail["files"] == ["rtdose.dcm"]
    assert all(e.at >= t0 - timedelta(seconds=1) for e in events)


def _sender_settings(make_settings: Any, port: int, **kw: Any) -> Any:
    return make_settings(
        dicom_destination_ae_title="PACS",
        dicom_destination_host="127.0.0.1",
        dicom_destination_port=port,
        dicom_send_timeout_s=60.0,
        **kw,
    )


def _dose_comments(peer: StoreSCP) -> list[str]:  # noqa: F811
    return sorted(str(ds.get("DoseComment", "")) for ds in peer.received().values() if ds.Modality == "RTDOSE")


def test_approval_after_sending_sends_the_approved_copies(
    make_settings: Any,
    store: Any,
    result_dir: Path,  # noqa: F811
    peer: StoreSCP,  # noqa: F811
) -> None:
    settings = _sender_settings(make_settings, peer.port)
    assert settings.dicom_send_unapproved is True  # the default
    sender = Sender(settings, store)
    peer.start()
    job_id = _succeeded_job(store, result_dir)
    now = utcnow()
    assert sender.tick(now) == 1  # the preliminary results
    assert _dose_comments(peer) == [""]  # the fixture's RT Dose: no approval statement
    assert sender.tick(now + timedelta(seconds=5)) == 0  # nothing new

    a = approval.decide(settings, store, job_id, PHYSICIST, "approved", "checked")
    assert sender.tick(utcnow()) == 1
    kinds = {d["kind"]: d["state"] for d in store.job_deliveries(job_id)}
    assert kinds == {"results": "sent", f"approval-{a.id}": "sent"}
    comments = _dose_comments(peer)
    assert len(comments) == 2 and comments[1].startswith("APPROVED") and "phys-a" in comments[1]
    assert sender.tick(utcnow() + timedelta(seconds=5)) == 0  # sent once


def test_unapproved_results_are_not_sent_when_so_configured(
    make_settings: Any,
    store: Any,
    result_dir: Path,  # noqa: F811
    peer: StoreSCP,  # noqa: F811
) -> None:
    settings = _sender_settings(make_settings, peer.port, dicom_send_unapproved=False)
    sender = Sender(settings, store)
    peer.start()
    job_id = _succeeded_job(store, result_dir)
    assert sender.tick(utcnow()) == 0
    assert store.job_deliveries(job_id) == [] and peer.received() == {}
    rejected = approval.decide(settings, store, job_id, PHYSICIST, "rejected", "wrong calibration")
    assert rejected.state == "rejected" and sender.tick(utcnow()) == 0  # a rejected result is not sent
    a = approval.decide(settings, store, job_id, PHYSICIST, "approved", None)
    assert sender.tick(utcnow()) == 1
    [d] = store.job_deliveries(job_id)
    assert d["kind"] == f"approval-{a.id}" and d["state"] == "sent"
    received = peer.received()
    assert {ds.Modality for ds in received.values()} == {"RTDOSE", "SEG"}  # the SEG goes with the approved copies
    [comment] = _dose_comments(peer)
    assert comment.startswith("APPROVED")


def test_migration_0007_keeps_deliveries_as_results(database_url: str) -> None:
    """Upgrading a database with a sent delivery: it becomes kind "results", and an approval delivery of the same
    job and destination can then be added beside it."""
    st = Store(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with st.db.begin_writing() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        conn.execute(
            text(
                "INSERT INTO deliveries (job_id, destination, state, attempts, created_at) "
                "VALUES (:j, 'PACS@h:104', 'sent', 1, :t)"
            ),
            {"j": "j" * 32, "t": datetime.now(UTC)},
        )
    st.migrate()
    try:
        [d] = st.job_deliveries("j" * 32)
        assert d["kind"] == "results" and d["state"] == "sent"
        assert st.add_delivery("j" * 32, "PACS@h:104", utcnow(), kind="approval-1") is True
        assert st.add_delivery("j" * 32, "PACS@h:104", utcnow(), kind="approval-1") is False
        assert st.add_delivery("j" * 32, "PACS@h:104", utcnow()) is False
    finally:
        st.dispose()


def test_approval_delivery_without_its_copies_sends_nothing(
    make_settings: Any,
    store: Any,
    result_dir: Path,  # noqa: F811
    peer: StoreSCP,  # noqa: F811
) -> None:
    """The approved copies gone (a result folder restored from an old backup): the SEG is not sent alone."""
    settings = _sender_settings(make_settings, peer.port, dicom_send_unapproved=False)
    peer.start()
    job_id = _succeeded_job(store, result_dir)
    a = approval.decide(settings, store, job_id, PHYSICIST, "approved", None)
    for f in approval.approved_dir(store.get_job(job_id), a.id).iterdir():
        f.unlink()
    assert Sender(settings, store).tick(utcnow()) == 0
    [d] = store.job_deliveries(job_id)
    assert d["state"] == "failed" and "no result files" in (d["last_error"] or "")
    assert peer.received() == {}
