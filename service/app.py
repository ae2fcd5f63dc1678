"""The FastAPI application: ``create_app(settings, store, dispatcher=None, node=None)``.

The composition root of the HTTP process: the web layer's routers (:mod:`service.web`) over the core and the
store.  The app only reads and writes the store and the data directory; the dispatcher (when given) runs jobs
and answers ``ray_ok()``/``device()`` for readiness and metrics.  With ``dispatcher=None`` (an API-only
process, or tests) jobs stay queued until a dispatcher elsewhere claims them.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from . import intake
from .config import Settings
from .dicom_node import DicomNode
from .dispatcher import Dispatcher
from .metrics import Metrics, RequestMetricsMiddleware
from .store import Store
from .trigger import Trigger
from .web import cameras, dicom, dicomweb, health, jobs, pages, patients, problems
from .web.html import STATIC

log = logging.getLogger("service.app")

DESCRIPTION = """
Absorbed-dose maps after ¹⁷⁷Lu therapy.  Submit the DICOM of one therapy cycle (SPECT/CT time points and an
RTSTRUCT or SEG), follow the job, fetch `summary.json`, the RT Dose and the report.

**Authentication**: `Authorization: Bearer <token>` (create one with `voxeldose token create --name N --role R`).
Roles: `submitter` (submit; read own jobs), `physicist` (read all, cancel, patients), `admin` (all).
`/healthz`, `/readyz` and `/metrics` need no token.

**Errors** are `application/problem+json` (RFC 9457): `type`, `title`, `status`, `detail`, `instance`.
"""


def create_app(
    settings: Settings, store: Store, dispatcher: Dispatcher | None = None, node: DicomNode | None = None
) -> FastAPI:
    """``node``: the :class:`service.dicom_node.DicomNode` STOW-RS stores through (None: a new one, not
    started — ``receive_file`` needs no network)."""
    intake.incoming_dir(settings).mkdir(parents=True, exist_ok=True)
    intake.remove_stale_temp(settings)  # uploads a process that is gone never finished
    app = FastAPI(
        title="voxeldose",
        version=_version(),
        description=DESCRIPTION,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    app.state.store = store
    app.state.dispatcher = dispatcher
    app.state.metrics = Metrics(store, dispatcher)
    if node is None:
        node = DicomNode(settings, store, Trigger(settings, store))  # marks patients; serve's trigger starts jobs
    app.state.dicom_node = node
    problems.install(app)
    app.include_router(jobs.router)
    app.include_router(patients.router)
    app.include_router(health.router)
    app.include_router(dicomweb.router)
    app.include_router(dicom.router)
    app.include_router(cameras.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the viewer's scripts (no token needed)
    # outermost last: metrics see the final status, the guard turns anything unexpected into a 500 problem
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(problems.CatchAllMiddleware)
    return app


def _version() -> str:
    """The installed package's version ("0" when running from a tree that is not installed)."""
    try:
        return version("voxeldose")
    except PackageNotFoundError:
        return "0"
