"""The attack campaign of issue 14, bounded for CI (the longer run is benchmarks/bench_campaign.py).

- A DICOM mutation corpus (tests/fuzzcorpus.py: every kind of damage once, one fresh patient each) pushed
  through the real DICOM node (pynetdicom associations, C-STORE over loopback) and, for a part, through STOW-RS
  (``POST /dicomweb/studies``); then the trigger looks at every patient: the node answers C-ECHO afterwards, no
  log record carries a traceback, and each bad instance was refused (C-STORE failure status, STOW-RS
  FailedSOPSequence) or its patient's cycle is an error in ``GET /v1/dicom/cycles``.  Good instances (the
  controls, private tags…) are stored and their patient is not an error.
- The HTML pages that are not in the OpenAPI (``/``, ``/jobs/{id}``, ``/patients/{id}``, ``/submit``,
  ``/login``) with Hypothesis-generated query, path and form values, logged in with each role and not: never a
  5xx.  (Schemathesis over the OpenAPI with each role: ``test_schemathesis_no_server_errors`` in test_api.py.)

In-process (the node's own thread and the ASGI app through TestClient), on SQLite in ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from firststage import run_first_stage

pytest.importorskip("fastapi")
pytest.importorskip("pynetdicom")
pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient
from fuzzcorpus import (
    BAD,
    GOOD,
    KINDS,
    ORPHAN,
    STOW_CONTENT_TYPE,
    Mutant,
    c_store,
    corpus,
    echo,
    stow_body,
    stow_stored,
    transfer_syntax_mutant,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.config import Settings
from service.dicom_node import STATUS_SUCCESS, DicomNode
from service.models import utcnow
from service.store import Store
from service.trigger import Trigger

SCU = "FUZZER"
AET = "VOXELDOSE"
#: Cases in CI: every kind of tests/fuzzcorpus.py's KINDS once (one fresh patient each).
CI_CASES = len(KINDS)
#: Every STOW_EVERY-th case goes through STOW-RS (and every case that damages the file meta).
STOW_EVERY = 4


# ---------------------------------------------------------------------------------------- helpers
class Site:
    """Store, trigger, a listening DICOM node and the ASGI app (STOW-RS stores through that node)."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings = Settings(
            data_dir=tmp_path / "data",
            min_free_disk_mb=0,
            dicom_min_free_mb=0,
            dicom_host="127.0.0.1",
            dicom_port=0,
            dicom_allowed_aets=[SCU],
            dicom_quiet_period_s=600,
        )
        self.settings.ensure_dirs()
        self.store = Store(self.settings.database_url)
        self.store.migrate()
        self.trigger = Trigger(self.settings, self.store)
        self.node = DicomNode(self.settings, self.store, self.trigger)
        self.node.start()
        self.app = create_app(self.settings, self.store, node=self.node)
        self.client = TestClient(self.app, follow_redirects=False)
        self.tokens = {r: self.store.create_token(f"{r}-1", r) for r in ("submitter", "physicist", "admin")}

    def h(self, role: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}", **extra}

    def close(self) -> None:
        self.client.close()
        self.node.stop()
        self.store.dispose()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()


def stow_case(client: Any, token: str, m: Mutant) -> tuple[int, set[str]]:
    """Carrier and damaged instance in one STOW-RS request: (HTTP status, SOP instance UIDs referenced)."""
    r = client.post(
        "/dicomweb/studies",
        content=stow_body(m),
        headers={"Authorization": f"Bearer {token}", "Content-Type": STOW_CONTENT_TYPE},
    )
    ctype = r.headers.get("content-type", "")
    return r.status_code, stow_stored(ctype, r.json() if ctype.startswith("application/dicom+json") else None)


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Log records that carry a traceback (exc_info, or a formatted one in the message)."""
    return [f"{r.name}: {r.getMessage()[:300]}" for r in records if r.exc_info or "Traceback" in r.getMessage()]


# ------------------------------------------------------------------------------ the DICOM corpus
def test_dicom_mutation_corpus_through_node_and_stow(
    site: Site, small_phantom: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14 "Done when", bounded: 0 node crashes, 0 trigger tracebacks, every bad instance refused or its
    cycle an error; good ones stored and not an error (the controls keep the verdicts honest)."""
    caplog.set_level(logging.INFO)
    cases = corpus(Path(small_phantom["dicom"]), CI_CASES)
    port = site.node.port
    stored: dict[int, bool] = {}
    routes: dict[int, str] = {}
    for m in cases:
        if m.stow_only or m.index % STOW_EVERY == STOW_EVERY - 1:
            routes[m.index] = "stow"
            status, refs = stow_case(site.client, site.tokens["submitter"], m)
            assert status < 500, (m.label, status)
            assert status in (200, 202, 400, 409), (m.label, status)
            stored[m.index] = m.sop_instance_uid in refs
        else:
            routes[m.index] = "c-store"
            carrier, status = c_store(port, m, tmp_path / "send", scu=SCU, aet=AET)
            assert carrier == STATUS_SUCCESS, (m.label, hex(carrier))
            assert status is not None, f"{m.label}: no C-STORE response"
            stored[m.index] = status == STATUS_SUCCESS
    # the node survived: it still answers C-ECHO and stores a good instance
    assert site.node.listening and echo(port, scu=SCU, aet=AET)

    now = utcnow() + timedelta(hours=1)
    site.trigger.tick(now)
    r = site.client.get("/v1/dicom/cycles", headers=site.h("physicist"))
    assert r.status_code == 200, r.text
    states: dict[str, set[str]] = {}
    for row in r.json():
        states.setdefault(row["patient_id"], set()).add(row["state"])
    series = site.client.get("/v1/dicom/series", headers=site.h("physicist"))
    assert series.status_code == 200, series.text
    listed = {s["series_instance_uid"]: s.get("patient_id") for s in series.json()}

    wrong: dict[str, str] = {}  # "kind on target" → verdict
    for m in cases:
        cycle_states = states.get(m.patient_id, set())
        key = f"{m.kind} on {m.target}"
        verdict = f"{m.label} via {routes[m.index]}: stored={stored[m.index]}, cycles={sorted(cycle_states)}"
        if m.expect == ORPHAN:
            if stored[m.index] and listed.get(m.series_instance_uid) not in (None, ""):
                wrong[key] = verdict + " (no PatientID, yet attributed to a patient)"
        elif m.expect == BAD:
            if stored[m.index] and "error" not in cycle_states:
                wrong[key] = verdict + " (bad: neither refused nor an error)"
        elif m.expect == GOOD and (not stored[m.index] or "error" in cycle_states):
            wrong[key] = verdict + " (good: refused or an error)"
    assert not wrong, "\n".join(wrong.values())

    # looked at again: the same verdicts, still no traceback (an error is shown once, not re-raised each round)
    for m in cases:
        site.trigger.touch(m.patient_id, now)
    site.trigger.tick(now + timedelta(hours=1))
    again = site.client.get("/v1/dicom/cycles", headers=site.h("physicist")).json()
    assert {(c["patient_id"], c["state"]) for c in again} == {(p, s) for p, ss in states.items() for s in ss}
    assert not tracebacks(caplog.records), tracebacks(caplog.records)
    assert echo(port, scu=SCU, aet=AET)


# ------------------------------------------------------------------------------------ the HTML pages
#: Hypothesis examples of the page requests (each one request, role drawn): ≈ 20 ms each in-process.
PAGE_EXAMPLES = 200
ROLES = ("anonymous", "submitter", "physicist", "admin")
#: Text without lone surrogates (an HTTP client cannot send them: a failure of the client, not the server).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
NUMBERISH = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    TEXT,
)


def page_requests(job_ids: list[str]) -> st.SearchStrategy[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx keyword arguments) of the pages that are not in the OpenAPI."""
    ident = st.one_of(st.sampled_from(job_ids), TEXT).map(lambda t: quote(t, safe=""))
    files = st.lists(
        st.tuples(TEXT, st.binary(max_size=2048)).map(lambda f: ("files", (f[0] or "x", f[1], "application/dicom"))),
        max_size=3,
    )
    return st.one_of(
        st.fixed_dictionaries({"state": TEXT, "offset": NUMBERISH}).map(lambda q: ("GET", "/", {"params": q})),
        ident.map(lambda i: ("GET", f"/jobs/{i}", {})),
        ident.map(lambda i: ("POST", f"/jobs/{i}/cancel", {})),
        st.one_of(ident, TEXT.map(lambda t: quote(t, safe="/"))).map(lambda i: ("GET", f"/patients/{i}", {})),
        st.just(("GET", "/submit", {})),
        st.tuples(st.dictionaries(st.sampled_from(["spec", "other", "files"]), TEXT, max_size=3), files).map(
            lambda d: ("POST", "/submit", {"data": d[0], "files": d[1] or None})
        ),
        TEXT.map(lambda n: ("GET", "/login", {"params": {"next": n}})),
        st.fixed_dictionaries({"token": TEXT, "next": TEXT}).map(lambda d: ("POST", "/login", {"data": d})),
        st.just(("POST", "/logout", {})),
        st.fixed_dictionaries({"registered": NUMBERISH}).map(lambda q: ("GET", "/cameras", {"params": q})),
        st.tuples(
            st.dictionaries(st.sampled_from(["profile", "other"]), TEXT, max_size=2), st.binary(max_size=2048)
        ).map(
            lambda d: (
                "POST",
                "/cameras",
                {"data": d[0], "files": {"profile": ("camera.json", d[1], "application/json")}},
            )
        ),
        st.one_of(ident, NUMBERISH.map(lambda t: quote(t, safe=""))).map(
            lambda i: ("POST", f"/cameras/{i}/retire", {})
        ),
    )


def test_html_pages_never_answer_5xx(tmp_path: Path) -> None:
    """Hypothesis-generated query, path and form values on ``/``, ``/jobs/{id}`` (and its cancel form),
    ``/patients/{id}``, ``/submit``, ``/cameras`` (and its upload and retire forms), ``/login`` and ``/logout``, each role logged in (cookie) and nobody: never
    a 5xx, never a traceback in the page."""
    settings_ = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0)
    store = Store(settings_.database_url)
    store.migrate()
    app = create_app(settings_, store)
    clients = {r: TestClient(app, follow_redirects=False) for r in ROLES}
    try:
        for role in ROLES[1:]:
            r = clients[role].post("/login", data={"token": store.create_token(f"{role}-1", role), "next": "/"})
            assert r.status_code == 303, r.text
        job_ids = []
        for n, state in enumerate(("queued", "succeeded", "failed")):
            d = settings_.data_dir / "incoming" / f"u{n}"
            d.mkdir(parents=True)
            rec, _ = store.create_job(
                spec={"inputs": [str(d)]},
                input_dir=str(d),
                input_hash=f"{n:064x}",
                patient_id=f"P/{n}",
                idempotency_key=None,
                submitted_by="submitter-1",
            )
            job_ids.append(rec.id)
            if state != "queued":
                [claimed] = store.claim_queued(1)
                out = settings_.data_dir / "jobs" / claimed.id / "out"
                out.mkdir(parents=True)
                (out / "summary.json").write_text("{not json")  # a damaged result must not break the page
                if state == "succeeded":
                    store.finish(claimed.id, str(out), claimed.patient_id)
                else:
                    store.fail(claimed.id, "a reason")
        seen: dict[int, int] = {}

        @given(role=st.sampled_from(ROLES), req=page_requests(job_ids))
        @settings(max_examples=PAGE_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(role: str, req: tuple[str, str, dict[str, Any]]) -> None:
            method, path, kw = req
            r = clients[role].request(method, path, **kw)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (role, method, path, kw, r.status_code, r.text[:500])
            assert "Traceback" not in r.text, (role, method, path)

        check()
        assert sum(seen.values()) >= PAGE_EXAMPLES and 200 in seen and 303 in seen, seen
    finally:
        for c in clients.values():
            c.close()
        store.dispose()


# ------------------------------------------------------------------------------ found by the campaign
@pytest.mark.parametrize("path", ["/v1/jobs", "/submit"])
def test_an_upload_with_an_unknown_transfer_syntax_is_a_422_naming_the_file(
    tmp_path: Path, small_phantom: dict, path: str
) -> None:
    """A PS3.10 file whose TransferSyntaxUID (0002,0010) is a UID but no transfer syntax (``1.2.3.4``), among
    the phantom's files: the upload answered 500 (pydicom's ValueError from ingest's pixel-length check); now
    422 naming the file and the tag, and no job."""
    dicom = Path(small_phantom["dicom"])
    files = sorted(dicom.rglob("*.dcm"))
    nm = next(f for f in files if f.parent.name == "NM")
    bad = transfer_syntax_mutant(nm, "1.2.3.4")
    settings_ = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0)
    store = Store(settings_.database_url)
    store.migrate()
    client = TestClient(create_app(settings_, store), follow_redirects=False)
    try:
        token = store.create_token("physicist-1", "physicist")
        parts = [
            ("files", (str(f.relative_to(dicom)), bad if f == nm else f.read_bytes(), "application/dicom"))
            for f in files
        ]
        spec = {"calibration": {"cps_per_mbq": small_phantom["truth"]["calibration_cps_per_mbq"]}}
        if path == "/submit":
            assert client.post("/login", data={"token": token, "next": "/"}).status_code == 303
            r = client.post(path, files=parts, data={"spec": json.dumps(spec)})
        else:
            r = client.post(
                path, files=parts, data={"spec": json.dumps(spec)}, headers={"Authorization": f"Bearer {token}"}
            )
        # answered at once (issue 15); the job's first stage refuses the file, naming it and the tag
        assert r.status_code == (303 if path == "/submit" else 202), r.text[:500]
        job_id = r.headers["location"].rsplit("/", 1)[1]
        job = run_first_stage(store, job_id)
        assert job.state == "failed" and job.error is not None
        assert "TransferSyntaxUID (0002,0010)" in job.error and "SPECT.dcm" in job.error, job.error
    finally:
        client.close()
        store.dispose()
