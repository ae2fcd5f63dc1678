"""Shared fixtures."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    CHROMIUM_FLAGS,
    DVH_REQUIREMENTS,
    DVH_VENV,
    KERNEL_CACHE_ENV,
    REPO,
    REQUIRE_BROWSER_ENV,
    STATE_WAIT_S,
    _dvh_python_ok,
    find_browser,
    session_kernel_cache,
    wait_scale,
)


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin has set up the base temp directory
def pytest_configure(config: pytest.Config) -> None:
    """Kernels built by the tests go to a temporary cache, never to the user's ``~/.cache/voxeldose/kernels``.

    Set in ``os.environ`` before any test module is imported, so the library, ``voxeldose serve``, the CLI and Ray
    workers started by the tests inherit it.  pytest-xdist workers share one cache beside their base temp folders
    (kernels are built once per run, not once per worker); the controller and each worker compute the same path.
    """
    factory: pytest.TempPathFactory = config._tmp_path_factory  # type: ignore[attr-defined]  # pytest's own, no API
    worker = hasattr(config, "workerinput")  # set by pytest-xdist on its workers
    os.environ[KERNEL_CACHE_ENV] = str(session_kernel_cache(factory.getbasetemp(), xdist_worker=worker))


@pytest.fixture(scope="session")
def dciodvfy_exe() -> str:
    """Path of dicom3tools' dciodvfy; skipped where absent, a failure where CI requires it."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("VOXELDOSE_REQUIRE_DCIODVFY"):
            pytest.fail(
                "dciodvfy is required (VOXELDOSE_REQUIRE_DCIODVFY is set) but not on PATH: apt-get install dicom3tools"
            )
        pytest.skip("dciodvfy (Debian package dicom3tools) is not on PATH")
    return exe


@pytest.fixture(scope="session")
def dvh_python() -> Path:
    """Python of ``.venv-dvh`` (pydicom 2.4.5 + dicompyler-core), created on first use and cached.

    Skipped when it cannot be installed (no network), unless VOXELDOSE_REQUIRE_DVH is set.
    """
    py = DVH_VENV / "bin" / "python"
    key = hashlib.sha1(str(REPO).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"voxeldose-venv-dvh-{key}.lock"
    with open(lock_path, "w") as lock:  # pytest-xdist workers: one creates, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _dvh_python_ok(py):
                t0 = time.monotonic()
                cmds = [
                    [sys.executable, "-m", "venv", "--clear", str(DVH_VENV)],
                    [
                        str(DVH_VENV / "bin" / "pip"),
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        *DVH_REQUIREMENTS,
                    ],
                ]
                for cmd in cmds:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                    if res.returncode != 0:
                        msg = f"cannot create {DVH_VENV} ({' '.join(cmd[:4])} ...):\n{res.stdout}\n{res.stderr}"
                        if os.environ.get("VOXELDOSE_REQUIRE_DVH"):
                            pytest.fail(msg)
                        pytest.skip(msg)
                if not _dvh_python_ok(py):
                    msg = f"{DVH_VENV} was created but dicompyler-core does not import"
                    if os.environ.get("VOXELDOSE_REQUIRE_DVH"):
                        pytest.fail(msg)
                    pytest.skip(msg)
                print(f"created {DVH_VENV} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return py


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium driven by Selenium (browser console logged); skipped where a part is missing, a
    failure where ``VOXELDOSE_REQUIRE_BROWSER`` is set (CI)."""
    chrome, chromedriver, missing = find_browser()
    if missing or chrome is None or chromedriver is None:
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(f"{REQUIRE_BROWSER_ENV} is set but the browser test cannot run: missing {missing}")
        pytest.skip(f"browser test needs {missing} (set {REQUIRE_BROWSER_ENV}=1 to make this a failure)")
    # selenium is an optional test dependency: imported here, after the check above
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(STATE_WAIT_S * wait_scale())
    try:
        yield drv
    finally:
        drv.quit()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``VOXELDOSE_TEST_WAIT_SCALE`` also scales pytest-timeout's per-test limit (a test waits longer, so it may
    take longer), for every test that does not set its own."""
    scale = wait_scale()
    if scale == 1.0 or not config.pluginmanager.hasplugin("timeout"):
        return
    base = config.getoption("timeout", None) or config.getini("timeout")
    if not base:
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(float(base) * scale))
