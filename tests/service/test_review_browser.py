"""Issue 17 part 3 as a physicist meets it, on the real ``voxeldose serve`` of ``serverproc`` in a headless
Chromium: the job page's slice viewer shows CT + dose (a screenshot of its canvas is looked at), the physicist
approves the result there (a rejection without a reason is refused), the approval is stored, shown, in the job
JSON and the audit trail; a submitter cannot approve; and the SR sent to a PACS afterwards (dcmtk storescp) is
VERIFIED by that physicist and passes dciodvfy.

Needs Chromium + chromedriver + selenium (skipped without them unless ``VOXELDOSE_REQUIRE_BROWSER`` is set) and
dcmtk's storescp.
"""

from __future__ import annotations

import io
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("ray")

import serverproc
from PIL import Image
from support import STATE_WAIT_S, browser_or_skip, dciodvfy_errors, wait_scale
from test_sender import StoreSCP, _free_port

from service.config import Settings
from service.models import utcnow
from service.sender import Sender
from service.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    return browser_or_skip()


@pytest.fixture(scope="session")
def e2e(browser_paths, tmp_path_factory, request, small_phantom) -> serverproc.E2EEnv:
    return serverproc.shared_env(tmp_path_factory, request, small_phantom)


def _canvas_pixels(png: bytes) -> dict[str, float]:
    """Shares of the canvas screenshot's pixels: not background (black), and in dose colours (red clearly above
    blue: the "warm" colour map; the grey CT has red = green = blue)."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    px = list(img.getdata())
    n = len(px)
    lit = sum(1 for r, g, b in px if r + g + b > 60)
    warm = sum(1 for r, g, b in px if r > 120 and r - b > 80)
    grey = sum(1 for r, g, b in px if r + g + b > 60 and max(r, g, b) - min(r, g, b) < 12)
    return {"lit": lit / n, "warm": warm / n, "grey": grey / n}


def test_physicist_approves_in_the_browser_and_the_sr_sent_says_so(
    e2e, chromium, tmp_path: Path, dciodvfy_exe: str
) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    if shutil.which("storescp") is None:
        pytest.skip("dcmtk's storescp is not installed")
    driver = chromium
    job = e2e.finished_job()
    jid = job["id"]
    base = e2e.server.base_url
    wait = WebDriverWait(driver, STATE_WAIT_S * wait_scale())

    # a submitter may not approve (API and page form alike)
    with e2e.client() as c:
        r = c.post(
            f"/v1/jobs/{jid}/review", json={"decision": "approved"}, headers=serverproc.auth(e2e.tokens["submitter"])
        )
        assert r.status_code == 403, r.text
        r = c.post(
            f"/jobs/{jid}/review",
            data={"decision": "approved"},
            cookies={"vd_token": e2e.tokens["submitter"]},
            headers={"Origin": base},
        )
        assert r.status_code == 403, r.text
        assert c.get(f"/v1/jobs/{jid}", headers=serverproc.auth(e2e.tokens["physicist"])).json()["review"] == {
            "state": "unreviewed",
            "latest": None,
            "history": [],
        }

    # the physicist logs in and opens the job page
    driver.get(f"{base}/login?next=/jobs/{jid}")
    wait.until(EC.presence_of_element_located((By.ID, "login-form")))
    driver.find_element(By.ID, "token").send_keys(e2e.tokens["physicist"])
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.ID, "review")))
    assert driver.find_element(By.ID, "review-state").text == "unreviewed"

    # the slice viewer: CT and dose drawn in the canvas
    wait.until(lambda d: d.find_element(By.ID, "viewer-status").get_attribute("data-state") in ("ready", "error"))
    status = driver.find_element(By.ID, "viewer-status")
    logs = [e["message"] for e in driver.get_log("browser")]
    assert status.get_attribute("data-state") == "ready", (status.text, logs)
    assert "ct" in status.text and "dose" in status.text and "vois" in status.text
    labels = driver.find_element(By.ID, "viewer-labels").text
    assert "Kidney_L" in labels and "Liver" in labels
    canvas = driver.find_element(By.ID, "viewer-canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas)
    assert driver.execute_script("return window.voxeldoseViewer.volumes.map(v => v.name)") == [
        "ct.nii.gz",
        "dose.nii.gz",
        "vois.nii.gz",
    ]

    def looks(script: str, ok: Any, name: str) -> dict[str, float]:
        """Show the layers ``script`` leaves visible (colour bar hidden: it is orange too), then poll the
        canvas's screenshot until ``ok`` holds (NiiVue draws asynchronously); the last screenshot is kept."""
        driver.execute_script(
            "const nv = window.voxeldoseViewer; nv.opts.isColorbar = false;" + script + "nv.drawScene();"
        )
        seen: dict[str, float] = {}

        def drawn(_d: Any) -> bool:
            png = canvas.screenshot_as_png
            (tmp_path / f"viewer-{name}.png").write_bytes(png)
            seen.update(_canvas_pixels(png))
            return bool(ok(seen))

        try:
            WebDriverWait(driver, STATE_WAIT_S * wait_scale(), poll_frequency=1).until(drawn)
        except TimeoutException:
            pytest.fail(f"viewer ({name}): {seen}; screenshot {tmp_path / f'viewer-{name}.png'}")
        return seen

    # all layers: three orthogonal slices of a torso fill a good part of the canvas, in dose colours
    looks("", lambda s: s["lit"] > 0.05 and s["warm"] > 0.005, "all")
    # the CT alone is grey (no dose colours); the dose alone is in dose colours (no grey CT)
    looks("nv.setOpacity(1, 0); nv.setOpacity(2, 0);", lambda s: s["grey"] > 0.05 and s["warm"] < 0.001, "ct")
    looks("nv.setOpacity(0, 0); nv.setOpacity(1, 0.6);", lambda s: s["warm"] > 0.005 and s["grey"] < 0.01, "dose")

    # a rejection needs a reason: refused on the page, nothing stored
    driver.find_element(By.ID, "review-reject").click()
    err = wait.until(EC.visibility_of_element_located((By.ID, "review-error")))
    assert "reason" in err.text
    assert driver.find_element(By.ID, "review-state").text == "unreviewed"

    t0 = utcnow()
    driver.find_element(By.ID, "review-reason").send_keys("VOIs and fit checked")
    driver.find_element(By.ID, "review-approve").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "review-state"), "approved"))
    latest = driver.find_element(By.ID, "review-latest").text
    assert "e2e-physicist" in latest and "physicist" in latest and "VOIs and fit checked" in latest
    assert not driver.find_elements(By.ID, "review-approve")  # approving again is not offered
    driver.save_screenshot(str(tmp_path / "job-approved.png"))

    with e2e.client() as c:
        body = c.get(f"/v1/jobs/{jid}", headers=serverproc.auth(e2e.tokens["physicist"])).json()
        review = body["review"]
        assert review["state"] == "approved"
        assert review["latest"]["by"] == "e2e-physicist" and review["latest"]["role"] == "physicist"
        assert review["latest"]["reason"] == "VOIs and fit checked"
        audit = c.get(f"/v1/jobs/{jid}/audit", headers=serverproc.auth(e2e.tokens["physicist"])).json()
        [event] = [e for e in audit if e["action"] == "job.approved"]
        assert event["actor"] == "e2e-physicist" and event["actor_role"] == "physicist"
        assert event["detail"]["files"] == ["rtdose.dcm", "sr.dcm"]
        assert datetime.fromisoformat(event["at"]) >= t0 - timedelta(seconds=2)
        r = c.get(f"/v1/jobs/{jid}/audit", headers=serverproc.auth(e2e.tokens["submitter"]))
        assert r.status_code == 403

    # what goes to the PACS afterwards: the approved SR (the server's database, a real sender, storescp)
    peer = StoreSCP(tmp_path / "pacs", _free_port()).start()
    try:
        settings = Settings(
            data_dir=e2e.data_dir,
            dicom_destination_ae_title="PACS",
            dicom_destination_host="127.0.0.1",
            dicom_destination_port=peer.port,
            dicom_send_sources=["upload"],
            dicom_send_unapproved=False,  # only approved results: this job's, not the other tests' jobs
        )
        store = Store(str(settings.database_url))
        try:
            assert Sender(settings, store).tick(utcnow()) >= 1
        finally:
            store.dispose()
        received = peer.received()
    finally:
        peer.stop()
    srs = [ds for ds in received.values() if ds.Modality == "SR"]
    [sr] = [ds for ds in srs if ds.PatientID == job["patient_id"]]
    assert sr.VerificationFlag == "VERIFIED" and sr.PreliminaryFlag == "FINAL" and sr.CompletionFlag == "COMPLETE"
    [obs] = sr.VerifyingObserverSequence
    assert str(obs.VerifyingObserverName) == "e2e-physicist"
    assert obs.VerifyingOrganization and obs.VerificationDateTime
    rd = [ds for ds in received.values() if ds.Modality == "RTDOSE" and ds.PatientID == job["patient_id"]]
    assert rd and rd[0].DoseComment.startswith("APPROVED")
    path = tmp_path / "sr-received.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    assert dciodvfy_errors(dciodvfy_exe, path) == []
