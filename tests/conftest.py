"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
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
