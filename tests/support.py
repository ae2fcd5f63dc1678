"""Helpers shared by the test modules (import with ``from support import …``; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from voxeldose.phantom import PhantomSettings
from voxeldose.scanner import SpectAcquisition

T = TypeVar("T")

#: Multiplies every wait limit of the suite (default 1): raise it on a machine slower or busier than the limits assume.
WAIT_SCALE_ENV = "VOXELDOSE_TEST_WAIT_SCALE"
#: Wait limits in seconds, sized for a 2-core machine at load 10 (a limit is a bound on failure, never a speed test):
#: a pipeline job on the small phantom, start to finish (≈20 s on an idle 2-core machine).
JOB_WAIT_S = 600.0
#: a change of state that needs no pipeline run: a thread or a Ray worker starting, an association handled, a process
#: killed (well under a second on an idle machine; a Ray worker takes seconds to start).
STATE_WAIT_S = 120.0


def wait_scale() -> float:
    """The factor of ``VOXELDOSE_TEST_WAIT_SCALE`` (a positive number; 1 when unset)."""
    raw = os.environ.get(WAIT_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"{WAIT_SCALE_ENV}={raw!r}: expected a positive number") from None
    if not scale > 0:
        raise ValueError(f"{WAIT_SCALE_ENV}={raw!r}: expected a positive number")
    return scale


def wait_for(
    probe: Callable[[], T],
    *,
    until: Callable[[T], object] = bool,
    timeout_s: float = STATE_WAIT_S,
    interval_s: float = 0.1,
    what: str,
    context: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe()`` until ``until(value)`` holds and return that value; the state is awaited, not a moment.

    ``timeout_s`` (seconds, multiplied by :func:`wait_scale`) only bounds a failure: past it, an AssertionError says
    ``what`` was awaited, the last value seen and ``context()`` (e.g. a server's log tail).  The probe runs at least
    once, and once more at the deadline, so a slow machine that reaches the state late still passes.
    """
    limit_s = timeout_s * wait_scale()
    deadline = time.monotonic() + limit_s
    while True:
        value = probe()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"timed out after {limit_s:g} s waiting for {what}; last seen: {value!r}{extra}")
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


#: The kernel cache variable of voxeldose.kernels.cache_dir; the suite points it at a temporary folder (conftest.py).
KERNEL_CACHE_ENV = "VOXELDOSE_KERNEL_CACHE"


def session_kernel_cache(basetemp: Path, *, xdist_worker: bool) -> Path:
    """The run's kernel cache: beside the xdist workers' base temp folders (shared by them), else inside ``basetemp``.

    A pytest-xdist worker's base temp is ``<run's base temp>/<worker id>``; its parent is the run's, one per run.
    """
    run_dir = basetemp.parent if xdist_worker else basetemp
    cache = run_dir / "kernel-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


#: Set in CI: a browser test that cannot run (no selenium, chromium or chromedriver) fails instead of skipping.
REQUIRE_BROWSER_ENV = "VOXELDOSE_REQUIRE_BROWSER"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Flags of a headless Chromium run by the tests (no network of its own, no sandbox: containers).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1600",
)


def find_browser() -> tuple[str | None, str | None, str | None]:
    """(chromium binary, chromedriver, what is missing or None); ``VOXELDOSE_CHROMIUM``/``_CHROMEDRIVER`` win."""
    missing = []
    try:
        import selenium  # noqa: F401  # only probed: an optional test dependency
    except ImportError:
        missing.append("the Python package selenium (pip install selenium)")
    chrome = os.environ.get("VOXELDOSE_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    driver = os.environ.get("VOXELDOSE_CHROMEDRIVER") or shutil.which("chromedriver")
    if chrome is None:
        missing.append("chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    return chrome, driver, ", ".join(missing) or None


def browser_or_skip() -> tuple[str, str]:
    """Chromium and chromedriver for a browser test: skip when missing, fail instead when
    :data:`REQUIRE_BROWSER_ENV` is set (CI).  Call it before starting any server."""
    chrome, driver, missing = find_browser()
    if missing or chrome is None or driver is None:
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(f"{REQUIRE_BROWSER_ENV} is set but the browser test cannot run: missing {missing}")
        pytest.skip(f"browser test needs {missing} (set {REQUIRE_BROWSER_ENV}=1 to make this a failure)")
    return chrome, driver


def stored_files(node: Any) -> list[Path]:
    """Every file under a DICOM node's store (``data_dir/dicom``), sorted."""
    root = node.settings.dicom_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def dciodvfy_errors(exe: str, path: Path) -> list[str]:
    """Lines of dciodvfy's report on ``path`` that are errors."""
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error") or " Error " in line]
    if res.returncode < 0:  # the validator crashed (e.g. an assertion on 32-bit pixel data): not a pass
        errors.append(f"dciodvfy crashed with signal {-res.returncode}: {(res.stderr or res.stdout)[-200:]}")
    return errors


REPO = Path(__file__).resolve().parents[1]
DVH_VENV = REPO / ".venv-dvh"


#: The recipe (also for CI): python3 -m venv .venv-dvh && .venv-dvh/bin/pip install <these>.
#: scikit-image is dicompyler-core's optional dependency for in-plane interpolation.
DVH_REQUIREMENTS = ["pydicom==2.4.5", "dicompyler-core==0.5.6", "scikit-image==0.26.0"]


def _dvh_python_ok(py: Path) -> bool:
    if not py.exists():
        return False
    probe = "import pydicom, skimage, dicompylercore.dvhcalc; assert pydicom.__version__ == '2.4.5'"
    return subprocess.run([str(py), "-c", probe], capture_output=True, timeout=120).returncode == 0


def dicompyler(py: Path, rs: Path, rd: Path, interpolation_mm: float | None = 1.2) -> dict[str, dict]:
    """Run tests/dvh_crosscheck.py under ``py`` (the .venv-dvh interpreter): {roi: {mean_gy, volume_cc, ...}}.

    ``interpolation_mm`` must be the dose pixel spacing divided by a power of two (dicompyler's rule);
    ``None`` samples the dose at the dose-grid voxel centres inside the contours (dicompyler's default)."""
    extra = [] if interpolation_mm is None else ["--interpolation-mm", repr(interpolation_mm)]
    res = subprocess.run(
        [str(py), str(REPO / "tests" / "dvh_crosscheck.py"), str(rs), str(rd), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def tiny_osem_settings(**overrides: Any) -> PhantomSettings:
    """The small patient imaged by the projection camera on a coarse grid, for tests of seconds: 32 × 32 × 24
    SPECT voxels of 10.8 mm, 24 views (12 per head, 15° apart, 100 s each), OSEM 2 iterations × 4 subsets."""
    base: dict[str, Any] = {
        "camera": "osem",
        "spect_matrix": 32,
        "spect_slices": 24,
        "spect_voxel_mm": 10.8,
        "acquisition": SpectAcquisition(frame_duration_ms=100_000, frames_in_rotation=12, angular_step_deg=15.0),
        "osem_iterations": 2,
        "osem_subsets": 4,
    }
    return PhantomSettings.small(**{**base, **overrides})
