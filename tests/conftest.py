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
from pathlib import Path

import pytest
from support import DVH_REQUIREMENTS, DVH_VENV, KERNEL_CACHE_ENV, REPO, _dvh_python_ok, session_kernel_cache


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
