"""Helpers shared by the test modules (import with ``from support import …``; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


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
