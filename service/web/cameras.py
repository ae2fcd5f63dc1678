"""``/v1/cameras``: camera profiles (``camera.json`` from ``voxeldose calibrate``) — register (physicist or admin),
list, read, retire.  A job takes the active profile matching its SPECT's camera (:mod:`service.cameras`)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .. import cameras, intake
from ..auth import Principal
from ..store import CameraRecord, Store
from .deps import get_store, principal, require
from .problems import ProblemError, responses
from .submit import media_type

router = APIRouter(prefix="/v1/cameras", tags=["cameras"])

#: The largest camera.json accepted (a profile is a few kB).
MAX_PROFILE_BYTES = 256 * 1024


class CameraLinks(BaseModel):
    self: str
    retire: str


class Camera(BaseModel):
    """A registered camera profile.  Timestamps are UTC (ISO 8601)."""

    id: int
    name: str
    camera: str = Field(description="manufacturer, model and serial number, as matched against a SPECT's headers")
    nuclide: str
    sensitivity_cps_per_mbq: float = Field(description="volume sensitivity: a matched job's calibration.cps_per_mbq")
    active: bool = Field(description="false once retired: no longer matched, kept for the jobs that used it")
    created_by: str | None = None
    created_at: datetime
    retired_by: str | None = None
    retired_at: datetime | None = None
    profile: dict[str, Any] = Field(description="the camera.json as registered (schema voxeldose.camera/1)")
    links: CameraLinks


def camera_out(rec: CameraRecord) -> Camera:
    p = rec.profile
    return Camera(
        id=rec.id,
        name=p.name,
        camera=cameras.camera_label(p.identity),
        nuclide=p.nuclide,
        sensitivity_cps_per_mbq=p.sensitivity_cps_per_mbq,
        active=rec.active,
        created_by=rec.created_by,
        created_at=rec.created_at,
        retired_by=rec.retired_by,
        retired_at=rec.retired_at,
        profile=p.model_dump(mode="json", by_alias=True),
        links=CameraLinks(self=f"/v1/cameras/{rec.id}", retire=f"/v1/cameras/{rec.id}/retire"),
    )


def parse_body(raw: bytes) -> object:
    """A camera.json body as JSON (400 when it is not JSON, 413 when far too large for a profile)."""
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProblemError(
            413, "Profile too large", f"a camera.json is at most {MAX_PROFILE_BYTES} bytes", slug="upload-too-large"
        )
    text = raw.decode("utf-8", "replace")
    intake.check_nesting(text, "the camera profile")
    try:
        return json.loads(text)
    except ValueError:
        raise ProblemError(
            400, "Bad request", "the body is not valid JSON (a camera.json)", slug="bad-request"
        ) from None


def _not_found(profile_id: int) -> ProblemError:
    return ProblemError(404, "Not found", f"no camera profile {profile_id}", slug="not-found")


@router.post(
    "",
    status_code=201,
    response_model=Camera,
    summary="Register a camera profile (camera.json)",
    description=(
        "The body is a `camera.json` as `voxeldose calibrate` writes it (schema `voxeldose.camera/1`).  "
        "Physicists and admins only.  An invalid profile is **422** naming the field (`tag`).  Registering "
        "a profile looks again at the DICOM node's cycles waiting for a calibration of their camera."
    ),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}},
    responses=responses(400, 401, 403, 413, 415, 422),
)
async def register_camera(
    request: Request,
    response: Response,
    who: Principal = Depends(require("physicist")),
    store: Store = Depends(get_store),
) -> Camera:
    if media_type(request) != "application/json":
        raise ProblemError(
            415, "Unsupported media type", "send the camera.json as application/json", slug="unsupported-media-type"
        )
    data = parse_body(await request.body())
    rec = await run_in_threadpool(cameras.register_profile, store, data, who.name)
    response.headers["Location"] = f"/v1/cameras/{rec.id}"
    return camera_out(rec)


@router.get("", response_model=list[Camera], summary="Camera profiles, newest first", responses=responses(401, 422))
def list_cameras(
    active: bool | None = Query(None, description="true: only active profiles; false: only retired ones"),
    who: Principal = Depends(principal),
    store: Store = Depends(get_store),
) -> list[Camera]:
    rows = store.list_camera_profiles()
    return [camera_out(r) for r in rows if active is None or r.active == active]


@router.get("/{profile_id}", response_model=Camera, summary="One camera profile", responses=responses(401, 404))
def get_camera(
    profile_id: int = Path(ge=1, le=2**31 - 1), who: Principal = Depends(principal), store: Store = Depends(get_store)
) -> Camera:
    rec = store.get_camera_profile(profile_id)
    if rec is None:
        raise _not_found(profile_id)
    return camera_out(rec)


@router.post(
    "/{profile_id}/retire",
    response_model=Camera,
    summary="Retire a camera profile (no longer matched; kept for the jobs that used it)",
    responses=responses(401, 403, 404),
)
def retire_camera(
    profile_id: int = Path(ge=1, le=2**31 - 1),
    who: Principal = Depends(require("physicist")),
    store: Store = Depends(get_store),
) -> Camera:
    out = store.retire_camera_profile(profile_id, who.name)
    if out is None:
        raise _not_found(profile_id)
    return camera_out(out[0])
