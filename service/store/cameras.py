"""The camera profiles table: ``camera.json`` profiles registered by physicists (issue 12).

A profile is stored as its validated JSON (:class:`voxeldose.camera.CameraProfile`) with who registered it and
when.  Profiles are never deleted: retiring one (``active`` false) takes it out of matching while the jobs that
used it still name it (``jobs.camera_profile_id``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from voxeldose.camera import CameraProfile

from ..models import CameraProfileRow, utcnow
from .db import Database, affected

log = logging.getLogger("service.store")


@dataclass(frozen=True)
class CameraRecord:
    """One registered camera profile (detached from any session)."""

    id: int
    profile: CameraProfile
    created_by: str | None
    created_at: datetime
    active: bool
    retired_by: str | None
    retired_at: datetime | None

    @property
    def name(self) -> str:
        return self.profile.name


def _record(r: CameraProfileRow) -> CameraRecord:
    return CameraRecord(
        id=int(r.id),
        profile=CameraProfile.model_validate(r.profile),
        created_by=r.created_by,
        created_at=r.created_at,
        active=bool(r.active),
        retired_by=r.retired_by,
        retired_at=r.retired_at,
    )


class CameraTable:
    """Register, list, read and retire camera profiles."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add_camera_profile(self, profile: CameraProfile, created_by: str | None) -> CameraRecord:
        """Store a (validated) profile as a new active row."""
        ident = profile.identity
        with self.db.write() as s:
            row = CameraProfileRow(
                name=profile.name,
                nuclide=profile.nuclide,
                manufacturer=ident.manufacturer,
                model=ident.model,
                device_serial_number=ident.device_serial_number,
                profile=profile.model_dump(mode="json", by_alias=True),
                created_by=created_by,
                created_at=utcnow(),
                active=True,
            )
            s.add(row)
            s.flush()
            rec = _record(row)
        log.info("camera profile %d registered", rec.id)
        return rec

    def get_camera_profile(self, profile_id: int) -> CameraRecord | None:
        with self.db.read() as s:
            row = s.get(CameraProfileRow, profile_id)
            return None if row is None else _record(row)

    def list_camera_profiles(self, *, active_only: bool = False) -> list[CameraRecord]:
        """Profiles, newest first (``active_only``: those not retired)."""
        q = select(CameraProfileRow).order_by(CameraProfileRow.created_at.desc(), CameraProfileRow.id.desc())
        if active_only:
            q = q.where(CameraProfileRow.active.is_(True))
        with self.db.read() as s:
            return [_record(r) for r in s.scalars(q).all()]

    def active_camera_profiles(self) -> list[CameraRecord]:
        """The profiles matching may pick, newest first."""
        return self.list_camera_profiles(active_only=True)

    def retire_camera_profile(self, profile_id: int, retired_by: str | None) -> tuple[CameraRecord, bool] | None:
        """Take a profile out of matching (kept for the jobs that used it): ``(profile, changed)``; None when
        there is no such profile.  Retiring a retired profile changes nothing."""
        with self.db.write() as s:
            n = affected(
                s.execute(
                    update(CameraProfileRow)
                    .where(CameraProfileRow.id == profile_id, CameraProfileRow.active.is_(True))
                    .values(active=False, retired_by=retired_by, retired_at=utcnow())
                )
            )
            row = s.get(CameraProfileRow, profile_id)
            rec = None if row is None else _record(row)
        if rec is None:
            return None
        if n:
            log.info("camera profile %d retired", profile_id)
        return rec, bool(n)
