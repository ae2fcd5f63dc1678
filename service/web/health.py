"""Health: ``/healthz`` (liveness), ``/readyz`` (database, Ray, free disk), ``/metrics`` (Prometheus).

None of them needs a token: load balancers, orchestrators and Prometheus call them.  They carry no patient data.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .. import intake
from ..metrics import CONTENT_TYPE
from .deps import get_settings, get_store
from .problems import PROBLEM_JSON

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(description="'ok'")


class Ready(BaseModel):
    status: str = Field(description="'ready'")
    checks: dict[str, bool] = Field(description="database, ray, disk")
    device: str | None = Field(None, description="dose device of the workers (cpu/gpu), when a dispatcher runs")
    free_disk_mb: float
    dicom_port: int | None = Field(None, description="port the DICOM node listens on in this process (none: not here)")


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health(status="ok")


def _readiness(request: Request) -> tuple[dict[str, bool], float, str | None]:
    settings, store, dispatcher = get_settings(request), get_store(request), request.app.state.dispatcher
    checks: dict[str, bool] = {}
    try:
        checks["database"] = bool(store.ping())
    except Exception:  # noqa: BLE001
        checks["database"] = False
    device = None
    if dispatcher is None:
        checks["ray"] = True  # no dispatcher in this process (API only): nothing to check
    else:
        try:
            checks["ray"] = bool(dispatcher.ray_ok())
            device = str(dispatcher.device())
        except Exception:  # noqa: BLE001
            checks["ray"] = False
    free = intake.free_mb(intake.incoming_dir(settings))
    checks["disk"] = free >= float(settings.min_free_disk_mb)
    return checks, free, device


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: database, Ray and free disk",
    responses={503: {"description": "a check failed (named in `detail` and `checks`)", "content": {PROBLEM_JSON: {}}}},
)
async def readyz(request: Request) -> Ready | JSONResponse:
    checks, free, device = await run_in_threadpool(_readiness, request)
    node = getattr(request.app.state, "dicom_node", None)
    dicom_port = node.port if node is not None and getattr(node, "listening", False) else None
    if all(checks.values()):
        return Ready(status="ready", checks=checks, device=device, free_disk_mb=round(free, 1), dicom_port=dicom_port)
    failed = [k for k, ok in checks.items() if not ok]
    words = {
        "database": "the database does not answer",
        "ray": "the Ray cluster does not answer",
        "disk": f"free disk {free:.0f} MB is below min_free_disk_mb",
    }
    body = {
        "type": "urn:voxeldose:problem:not-ready",
        "title": "Not ready",
        "status": 503,
        "detail": "not ready: " + "; ".join(words[k] for k in failed),
        "instance": request.url.path,
        "checks": checks,
    }
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}, "description": "metrics"}},
)
async def metrics(request: Request) -> Response:
    data = await run_in_threadpool(request.app.state.metrics.exposition)
    return Response(data, media_type=CONTENT_TYPE)
