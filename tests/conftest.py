"""Shared fixtures."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def dciodvfy_exe() -> str:
    """Path of dicom3tools' dciodvfy; skipped where absent, a failure where CI requires it."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("VOXELDOSE_REQUIRE_DCIODVFY"):
            pytest.fail("dciodvfy is required (VOXELDOSE_REQUIRE_DCIODVFY is set) but not on PATH: apt-get install dicom3tools")
        pytest.skip("dciodvfy (Debian package dicom3tools) is not on PATH")
    return exe


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
                    [str(DVH_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", *DVH_REQUIREMENTS],
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


def dicompyler(py: Path, rs: Path, rd: Path, interpolation_mm: float | None = 1.2) -> dict[str, dict]:
    """Run tests/dvh_crosscheck.py under ``py`` (the .venv-dvh interpreter): {roi: {mean_gy, volume_cc, ...}}.

    ``interpolation_mm`` must be the dose pixel spacing divided by a power of two (dicompyler's rule);
    ``None`` samples the dose at the dose-grid voxel centres inside the contours (dicompyler's default)."""
    extra = [] if interpolation_mm is None else ["--interpolation-mm", repr(interpolation_mm)]
    res = subprocess.run(
        [str(py), str(REPO / "tests" / "dvh_crosscheck.py"), str(rs), str(rd), *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


