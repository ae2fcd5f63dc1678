"""The suite's own guarantees: a temporary kernel cache (never the user's ``~/.cache``) and a wait that polls for
a state, with a limit that only bounds a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import KERNEL_CACHE_ENV, WAIT_SCALE_ENV, wait_for, wait_scale

from voxeldose.kernels import cache_dir, get_kernel

USER_CACHE = Path.home() / ".cache" / "voxeldose"


def _run_dir(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    """The run's base temp folder (a pytest-xdist worker's base temp is one level below it)."""
    base = factory.getbasetemp().resolve()
    return base.parent if hasattr(config, "workerinput") else base


def test_kernel_cache_is_a_temporary_folder_of_this_run(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = os.environ.get(KERNEL_CACHE_ENV)
    assert env, f"{KERNEL_CACHE_ENV} is not set: kernels built by the tests would go to {USER_CACHE}"
    cache = Path(env).resolve()
    assert cache.is_relative_to(_run_dir(pytestconfig, tmp_path_factory)), cache
    assert not cache.is_relative_to(USER_CACHE.resolve())
    assert cache_dir().resolve() == cache
    # processes the tests start (voxeldose serve, the CLI, Ray workers) inherit it
    code = "from voxeldose.kernels import cache_dir; print(cache_dir())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert Path(res.stdout.strip()).resolve() == cache


def test_a_kernel_built_by_a_test_lands_in_the_temporary_cache() -> None:
    # a kernel no other test asks for (an odd density), small enough to build in seconds
    k = get_kernel("Lu-177", 9.6, "soft-tissue", 5, density_g_cm3=1.0371)
    written = sorted(p.name for p in cache_dir().glob(f"*{k.id}*"))
    assert [n for n in written if n.endswith(".npz")], written
    assert not [p for p in USER_CACHE.rglob(f"*{k.id}*")], f"a kernel was written under {USER_CACHE}"


def test_wait_for_returns_the_awaited_value() -> None:
    seen = iter(range(100))
    assert wait_for(lambda: next(seen), until=lambda n: n == 3, interval_s=0, what="three") == 3
    assert wait_for(lambda: "ready", what="a truthy value") == "ready"


def test_wait_for_says_what_it_waited_for_and_what_it_saw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_SCALE_ENV, raising=False)
    with pytest.raises(AssertionError) as err:
        wait_for(
            lambda: {"state": "queued"},
            until=lambda job: job["state"] == "succeeded",
            timeout_s=0.05,
            interval_s=0.01,
            what="the job",
            context=lambda: "log",
        )
    text = str(err.value)
    assert "waiting for the job" in text and "{'state': 'queued'}" in text and text.endswith("\nlog")
    assert "after 0.05 s" in text


def test_wait_scale_multiplies_every_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WAIT_SCALE_ENV, "4")
    assert wait_scale() == 4.0
    with pytest.raises(AssertionError, match=r"after 0\.2 s"):
        wait_for(lambda: False, timeout_s=0.05, interval_s=0.01, what="never")
    for bad in ("0", "-1", "fast"):
        monkeypatch.setenv(WAIT_SCALE_ENV, bad)
        with pytest.raises(ValueError, match=WAIT_SCALE_ENV):
            wait_scale()
