"""A headless Chromium (Selenium + chromedriver) goes from the login form to the job list to a finished job and
sees its DVH plot, on the real ``voxeldose serve`` of ``serverproc`` (shared with test_e2e.py).

Needs Debian ``chromium`` + ``chromium-driver`` and PyPI ``selenium``.  Skipped when they are missing, unless
``VOXELDOSE_REQUIRE_BROWSER`` is set (CI): then missing parts fail the test.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("ray")

import serverproc
from support import STATE_WAIT_S, browser_or_skip, wait_scale

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver (skip, or fail in CI, when missing) — checked before any server starts."""
    return browser_or_skip()


@pytest.fixture(scope="session")
def e2e(browser_paths, tmp_path_factory, request, small_phantom) -> serverproc.E2EEnv:
    # browser_paths first: no server is started for a test that is skipped
    return serverproc.shared_env(tmp_path_factory, request, small_phantom)


@pytest.fixture
def driver(browser_paths, chromium):
    """The suite's headless Chromium (tests/conftest.py)."""
    return chromium


def test_login_job_list_to_dvh_plot(e2e, driver, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    job = e2e.finished_job()
    base = e2e.server.base_url
    wait = WebDriverWait(driver, STATE_WAIT_S * wait_scale())

    # not logged in: the job list sends the browser to the login form
    driver.get(base + "/")
    wait.until(EC.presence_of_element_located((By.ID, "login-form")))
    assert "/login" in driver.current_url

    token_box = driver.find_element(By.ID, "token")
    token_box.send_keys(e2e.tokens["physicist"])
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.ID, "job-list")))
    cookie = driver.get_cookie("vd_token")
    assert cookie is not None and cookie.get("httpOnly") is True

    driver.get(base + "/")
    link_css = f'#job-list tr[data-job-id="{job["id"]}"] a.job-link'
    # the list refreshes itself while other jobs run: retry a click that lands on a replaced page
    for _ in range(5):
        try:
            wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, link_css))).click()
            break
        except StaleElementReferenceException:
            time.sleep(0.5)
    else:
        pytest.fail("could not click the job link")
    wait.until(EC.url_contains(f"/jobs/{job['id']}"))
    plot = wait.until(EC.visibility_of_element_located((By.ID, "dvh-plot")))

    assert driver.find_element(By.ID, "job-state").text == "succeeded"
    assert plot.tag_name.lower() == "svg"
    curves = plot.find_elements(By.CSS_SELECTOR, "polyline.dvh-curve")
    assert len(curves) >= 2
    names = {c.get_attribute("data-voi") for c in curves}
    assert {"Kidney_L", "Kidney_R"} <= names, names
    assert all(len((c.get_attribute("points") or "").split()) >= 2 for c in curves)
    size = plot.size
    assert size["width"] > 100 and size["height"] > 100, size
    assert "Kidney_L" in driver.find_element(By.ID, "dose-table").text

    # the plot is below the tables: bring it into the viewport for the screenshots
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", plot)
    wait.until(
        lambda d: d.execute_script(
            "const r = arguments[0].getBoundingClientRect();return r.top >= 0 && r.bottom <= window.innerHeight;", plot
        )
    )
    shot = tmp_path / "job-page.png"
    plot.screenshot(str(tmp_path / "dvh-plot.png"))
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert (tmp_path / "dvh-plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
