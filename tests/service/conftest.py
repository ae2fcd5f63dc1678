"""Fixtures of the service tests.

- ``ray_cluster``: one real local Ray per test session (``num_cpus=2``, no dashboard), started
  through the service's own :func:`service.dispatcher.init_ray`.
- ``store``: a migrated :class:`service.store.Store` on SQLite in ``tmp_path``, and the same tests
  again on PostgreSQL when ``VOXELDOSE_TEST_POSTGRES_URL`` is set (each test in a schema of its
  own, dropped afterwards); ``bash tests/service/postgres.sh`` starts one and prints the URL.
- ``make_settings``: :class:`service.config.Settings` on a data folder in ``tmp_path``.
- ``small_phantom``: the small synthetic patient, written once per session.
- ``start_node``: ``start(**settings)`` → a listening :class:`service.dicom_node.DicomNode` on a free port
  (calling AE titles allowed: the test module's ``NODE_ALLOWED_AETS``), stopped after the test.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sqlalchemy", reason="the service extra is not installed (pip install -e '.[service,test]')")
pytest.importorskip("alembic")
pytest.importorskip("pydantic_settings")

PG_ENV = "VOXELDOSE_TEST_POSTGRES_URL"


def _pg_url_with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite file, or a new schema in the PostgreSQL of ``VOXELDOSE_TEST_POSTGRES_URL``."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'voxeldose.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (bash tests/service/postgres.sh starts a local PostgreSQL)")
    from sqlalchemy import create_engine, text

    from service.store import normalise_url

    base = normalise_url(base)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _pg_url_with_schema(base, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(database_url: str) -> Iterator[Any]:
    from service.store import Store

    st = Store(database_url, max_attempts=3)
    st.migrate()
    yield st
    st.dispose()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Any]:
    from service.config import Settings

    def make(**overrides: Any) -> Any:
        base: dict[str, Any] = dict(data_dir=tmp_path / "data", dispatch_interval_s=0.05, ray_num_cpus=2)
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One local Ray for the whole session (≈3 s to start)."""
    ray = pytest.importorskip("ray")
    from service.config import Settings
    from service.dispatcher import init_ray

    settings = Settings(data_dir=tmp_path_factory.mktemp("ray-data"), ray_num_cpus=2)
    started = init_ray(settings, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``{"dir", "dicom", "truth"}`` of the small synthetic patient (≈1.5 s to write)."""
    from voxeldose.phantom import PhantomSettings, write_phantom

    d = tmp_path_factory.mktemp("phantom")
    write_phantom(d, PhantomSettings.small())
    truth = json.loads((d / "truth" / "truth.json").read_text())
    return {"dir": d, "dicom": d / "dicom", "truth": truth}


@pytest.fixture
def start_node(
    request: pytest.FixtureRequest, make_settings: Callable[..., Any], store: Any
) -> Iterator[Callable[..., Any]]:
    from service.dicom_node import DicomNode

    allowed = list(getattr(request.module, "NODE_ALLOWED_AETS", []))
    nodes: list[Any] = []

    def start(**overrides: Any) -> Any:
        kw: dict[str, Any] = dict(dicom_host="127.0.0.1", dicom_port=0, dicom_allowed_aets=allowed, dicom_min_free_mb=0)
        kw.update(overrides)
        node = DicomNode(make_settings(**kw), store)
        node.start()
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        n.stop()
