"""Fixtures and import paths of the operations tests (docker/, docs/operations.md, service/logs.py, the stack
smoke test).  ``serverproc`` (tests/service) starts ``voxeldose serve`` the way the service tests do."""

from __future__ import annotations

import sys
from pathlib import Path

_SERVICE_TESTS = str(Path(__file__).resolve().parents[1] / "service")
if _SERVICE_TESTS not in sys.path:
    sys.path.insert(0, _SERVICE_TESTS)
