"""The server-rendered pages: login → cookie, job list, job page (dose table, DVH, report frame), patient page.
Real Store on SQLite; content from the pipeline's real result for the small phantom."""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from firststage import run_first_stage
from summaries import cycle_summary

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.store import Store
from service.web.views import MAX_OFFSET
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs

EVIL = '<script>alert("x")</script>&'


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> Path:
    """A real result folder for the small phantom (≈ 10 s, once per module)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom(root, PhantomSettings.small())
    truth = json.loads((root / "truth" / "truth.json").read_text())
    out = root / "result"
    spec = {"inputs": [str(root / "dicom")], "calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}}
    write_outputs(run(spec), out)
    return out


@pytest.fixture
def site(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", min_free_disk_mb=0)
    store = Store(settings.database_url)
    store.migrate()
    tokens = {r: store.create_token(f"{r}-1", r) for r in ("submitter", "physicist")}
    client = TestClient(create_app(settings, store), follow_redirects=False)
    yield settings, store, tokens, client
    client.close()
    store.dispose()


def login(client: TestClient, token: str) -> None:
    r = client.post("/login", data={"token": token, "next": "/"})
    assert r.status_code == 303


def new_job(store: Store, settings: Settings, *, patient_id: str, n: int = 1, by: str = "physicist-1") -> str:
    d = settings.data_dir / "incoming" / f"upload{n}"
    d.mkdir(parents=True, exist_ok=True)
    rec, created = store.create_job(
        spec={"inputs": [str(d)], "cycle_number": n},
        input_dir=str(d),
        input_hash=f"{n:064x}",
        patient_id=patient_id,
        idempotency_key=None,
        submitted_by=by,
    )
    assert created
    return rec.id


def finish(store: Store, settings: Settings, job_id: str, result: Path) -> None:
    assert [j.id for j in store.claim_queued(1)] == [job_id]
    out = settings.data_dir / "jobs" / job_id / "out"
    shutil.copytree(result, out)
    store.finish(job_id, str(out), None)


def test_login_sets_an_httponly_cookie(site) -> None:
    settings, store, tokens, client = site
    r = client.get("/")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    r = client.get("/login")
    assert r.status_code == 200 and 'id="login-form"' in r.text and 'name="token"' in r.text
    r = client.post("/login", data={"token": "wrong", "next": "/"})
    assert r.status_code == 401 and 'id="login-error"' in r.text and "vd_token" not in r.headers.get("set-cookie", "")
    r = client.post("/login", data={"token": tokens["physicist"], "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert (
        cookie.startswith("vd_token=")
        and "HttpOnly" in cookie
        and "SameSite=strict" in cookie.replace("Strict", "strict")
    )
    r = client.get("/")
    assert r.status_code == 200 and "physicist-1" in r.text
    # the API accepts the same cookie
    assert client.get("/v1/jobs").status_code == 200
    # a state-changing request from another site with the cookie is refused
    job = new_job(store, settings, patient_id="P1")
    r = client.post(f"/v1/jobs/{job}/cancel", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert client.post(f"/v1/jobs/{job}/cancel", headers={"Origin": "http://testserver"}).status_code == 200
    r = client.post("/logout")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert r.headers["set-cookie"].startswith("vd_token=") and "Max-Age=0" in r.headers["set-cookie"]
    assert client.get("/").status_code == 303


def test_job_list_escapes_and_links(site) -> None:
    settings, store, tokens, client = site
    ids = [new_job(store, settings, patient_id=EVIL, n=1), new_job(store, settings, patient_id="P-2", n=2)]
    login(client, tokens["physicist"])
    r = client.get("/")
    assert r.status_code == 200
    html = r.text
    assert EVIL not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in html
    links = re.findall(r'<a class="job-link" href="/jobs/([0-9a-f]+)"', html)
    assert sorted(links) == sorted(ids)
    assert 'id="job-list"' in html and '<meta http-equiv="refresh"' in html  # queued jobs: the list refreshes
    assert "/patients/%3Cscript%3E" in html  # the patient link is URL-encoded
    r = client.get("/?state=succeeded")
    assert "No jobs in state succeeded" in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'self'")


def test_submitter_sees_only_own_jobs(site) -> None:
    settings, store, tokens, client = site
    mine = new_job(store, settings, patient_id="P1", n=1, by="submitter-1")
    other = new_job(store, settings, patient_id="P2", n=2, by="physicist-1")
    login(client, tokens["submitter"])
    html = client.get("/").text
    assert mine in html and other not in html
    assert client.get(f"/jobs/{other}").status_code == 404
    assert client.get(f"/jobs/{mine}").status_code == 200
    assert client.get("/patients/P1").status_code == 403


def test_job_page_of_a_finished_job(site, result: Path) -> None:
    settings, store, tokens, client = site
    job = new_job(store, settings, patient_id="VD-PHANTOM-LU177")
    finish(store, settings, job, result)
    login(client, tokens["physicist"])
    r = client.get(f"/jobs/{job}")
    assert r.status_code == 200
    html = r.text
    summary = json.loads((result / "summary.json").read_text())
    assert 'id="dose-table"' in html and 'id="dvh-plot"' in html and 'id="limits-table"' in html
    assert html.count('class="dvh-curve"') == sum(1 for v in summary["vois"].values() if v["role"] != "body")
    kid = summary["vois"]["Kidney_L"]
    row = re.search(r'<tr data-voi="Kidney_L">(.*?)</tr>', html, re.DOTALL).group(1)
    assert f"{kid['mean_gy']:.2f}" in row and f"{kid['gy_per_gbq']:.3f}" in row
    left = summary["cumulative"]["cycles_left"]
    assert re.search(rf'id="cycles-left">{left["cycles_left"]} further cycle', html)
    assert f'<iframe id="report-frame" src="/v1/jobs/{job}/report"' in html
    assert '<meta http-equiv="refresh"' not in html  # finished: no refresh
    assert "state-succeeded" in html
    # the frame's source answers to the cookie
    r = client.get(f"/v1/jobs/{job}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_job_page_of_queued_and_failed_jobs(site) -> None:
    settings, store, tokens, client = site
    login(client, tokens["physicist"])
    queued = new_job(store, settings, patient_id="P1", n=1)
    html = client.get(f"/jobs/{queued}").text
    assert '<meta http-equiv="refresh" content="5">' in html and 'id="cancel-form"' in html
    assert 'id="dose-table"' not in html
    failed = new_job(store, settings, patient_id="P1", n=2)
    store.fail(failed, f"SPECT.dcm: bad {EVIL}")
    html = client.get(f"/jobs/{failed}").text
    assert 'id="job-error"' in html and EVIL not in html and "&lt;script&gt;" in html
    r = client.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 303 and store.get_job(queued).state == "cancelled"
    r = client.get("/jobs/unknown-id", headers={"Accept": "text/html"})
    assert r.status_code == 404 and 'id="error-detail"' in r.text and r.headers["content-type"].startswith("text/html")


def test_patient_page(site, result: Path) -> None:
    settings, store, tokens, client = site
    pid = "VD-PHANTOM-LU177"
    job = new_job(store, settings, patient_id=pid)
    finish(store, settings, job, result)
    login(client, tokens["physicist"])
    r = client.get(f"/patients/{pid}")
    assert r.status_code == 200
    html = r.text
    summary = json.loads((result / "summary.json").read_text())
    c1 = summary["cumulative"]["cycles"][0]
    assert 'id="cycles-table"' in html and 'data-cycle="1"' in html and f"{c1['kidney_gy']:.2f}" in html
    assert f'href="/jobs/{job}"' in html and 'id="limits-table"' in html
    assert re.search(rf'id="cycles-left">{summary["cumulative"]["cycles_left"]["cycles_left"]} further', html)
    assert client.get("/patients/nobody").status_code == 404


def test_patient_page_says_not_stated_for_a_cycle_without_uncertainty(site, tmp_path: Path) -> None:
    """Issue 13 part 2: cycle 1 from an older result (no uncertainty) reads "not stated", never a number; cycle 2
    shows kidney ± U with U = 2u = 2·√(0.3² + 0.4²) = 1.00 Gy."""
    settings, store, tokens, client = site
    pid = "VD-UNC"
    t1 = datetime(2026, 1, 5, 10, 0)
    docs = [
        cycle_summary(
            number=1, injection=t1, activity_mbq=7400, kidney_gy=4.0, kidney_bed_gy=None, marrow_gy=None, patient_id=pid
        ),
        cycle_summary(
            number=2,
            injection=t1 + timedelta(weeks=8),
            activity_mbq=7400,
            kidney_gy=5.0,
            kidney_bed_gy=None,
            marrow_gy=None,
            patient_id=pid,
            kidney_u_components_gy={"calibration": 0.3, "counting": 0.4},
        ),
    ]
    jobs = []
    for n, doc in enumerate(docs, start=1):
        folder = tmp_path / f"r{n}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(doc))
        jobs.append(new_job(store, settings, patient_id=pid, n=n))
        finish(store, settings, jobs[-1], folder)
    login(client, tokens["physicist"])
    r = client.get(f"/patients/{pid}")
    assert r.status_code == 200, r.text
    cells = re.findall(r'<td class="num kidney">(.*?)</td>', r.text, flags=re.S)
    text = [re.sub(r"<[^>]+>", "", c).strip() for c in cells]
    assert text[:2] == ["4.00 ± not stated", "5.00 ± 1.00"], text
    body = client.get(f"/v1/patients/{pid}/cycles")  # the API behind the same page
    assert body.status_code == 200, body.text
    rows = {c["number"]: c for c in body.json()["cycles"]}
    assert rows[1]["kidney_u_gy"] is None and rows[2]["kidney_u_gy"] == pytest.approx(0.5)
    # the job page of cycle 2: its cycles table and the cumulative total ± U
    html = client.get(f"/jobs/{jobs[1]}").text
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r'<td class="num kidney">(.*?)</td>', html, re.S)]
    assert cells == ["5.00 ± 1.00", "5.00 ± 1.00"], cells  # the cycle's row and the total
    assert 'id="cumulative-u-note"' in html and "k = 2" in html


def test_patient_page_of_an_id_with_reserved_characters(site, result: Path) -> None:
    settings, store, tokens, client = site
    # '/', '?', '#', '%' and a space travel as one path segment; the '%' is not followed by hex digits
    # because Starlette's TestClient unquotes the path twice (a real server decodes it once)
    pid = "A/B?c#d% e f"
    job = new_job(store, settings, patient_id=pid)
    finish(store, settings, job, result)
    login(client, tokens["physicist"])
    href = "/patients/" + quote(pid, safe="")
    assert href == "/patients/A%2FB%3Fc%23d%25%20e%20f"
    for page in ("/", f"/jobs/{job}"):  # the links the pages generate carry the quoted ID
        assert f'href="{href}"' in client.get(page).text
    r = client.get(href)
    assert r.status_code == 200, r.text
    assert '<span id="patient-id">A/B?c#d% e f</span>' in r.text and f'href="/jobs/{job}"' in r.text
    assert client.get("/patients/" + quote("A/B", safe="")).status_code == 404


def test_job_list_page_bounds_the_offset(site) -> None:
    settings, store, tokens, client = site
    new_job(store, settings, patient_id="P1")
    login(client, tokens["physicist"])
    for offset in (2**63, MAX_OFFSET + 1, -1):
        r = client.get(f"/?offset={offset}", headers={"Accept": "text/html"})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("text/html") and "Traceback" not in r.text
    r = client.get(f"/?offset={MAX_OFFSET}")
    assert r.status_code == 200 and 'class="job-link"' not in r.text


def test_upload_page(site, result: Path) -> None:
    _settings, store, tokens, client = site
    login(client, tokens["submitter"])
    r = client.get("/submit")
    assert r.status_code == 200 and 'enctype="multipart/form-data"' in r.text
    # answered at once (issue 15): the files are checked by the job's first stage, whose error the job page shows
    r = client.post("/submit", files=[("files", ("junk.dcm", b"junk" * 100, "application/dicom"))])
    assert r.status_code == 303, r.text
    junk = run_first_stage(store, r.headers["location"].rsplit("/", 1)[1])
    assert junk.state == "failed" and "junk.dcm: not a DICOM file" in (junk.error or "")
    assert "junk.dcm: not a DICOM file" in client.get(r.headers["location"]).text
    # a job description that is not valid is refused before anything is kept
    r = client.post(
        "/submit", files=[("files", ("junk.dcm", b"junk" * 100, "application/dicom"))], data={"spec": "{not json"}
    )
    assert r.status_code == 422 and 'id="submit-error"' in r.text and "not valid JSON" in r.text
    dicom = result.parent / "dicom"
    files = [
        ("files", (str(p.relative_to(dicom)), p.read_bytes(), "application/dicom"))
        for p in sorted(dicom.rglob("*.dcm"))
    ]
    r = client.post("/submit", files=files, data={"spec": json.dumps({"calibration": {"cps_per_mbq": 5.67}})})
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert store.get_job(job_id).submitted_by == "submitter-1"
    assert "queued" in client.get(r.headers["location"]).text
