"""Camera profiles in the service core (issue 12): registering a ``camera.json``, and which registered profile a
job's SPECT takes.

A job (an upload, named series, or a cycle the DICOM node's trigger starts) reads the camera identity of its first
SPECT object (:func:`voxeldose.camera.identity_from_dataset`) and picks the **active** profile whose identity
matches (:meth:`voxeldose.camera.CameraIdentity.mismatches` is empty) for the cycle's nuclide; of several, the
newest (the job record says so).  The profile fills the job's ``calibration`` (``cps_per_mbq`` = the profile's
volume sensitivity, ``source`` = ``camera profile <name> (id N)``, which the summary records as
``provenance.calibration.source``) unless the caller — or, for node-started jobs, the site's ``trigger_spec`` —
gave a calibration: an explicit factor always wins.

Messages name the camera (manufacturer, model, serial number), never the patient.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from voxeldose.camera import CameraIdentity, CameraProfile, identity_from_dataset
from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import Cycle, spect_pixel_mode
from voxeldose.nuclides import canonical_name, require_supported
from voxeldose.spec import Calibration

from .errors import ErrorKind, ServiceError
from .models import utcnow
from .store import CameraRecord, Store

log = logging.getLogger("service.cameras")

#: The words a cycle's reason carries while it waits for a camera profile (registering one looks at them again).
WAITING_MARK = "no calibration for camera"


def camera_label(identity: CameraIdentity) -> str:
    """``<manufacturer> <model> <serial>`` (the serial number only when the SPECT states one)."""
    parts = [identity.manufacturer, identity.model]
    if identity.device_serial_number:
        parts.append(identity.device_serial_number)
    return " ".join(parts)


@dataclass(frozen=True)
class CameraMatch:
    """The profile a SPECT's camera takes, and how many active profiles matched (the newest is taken)."""

    record: CameraRecord
    matching: int

    @property
    def source(self) -> str:
        """The calibration's ``source`` in the job (and so in the summary's provenance)."""
        return f"camera profile {self.record.name} (id {self.record.id})"

    def note(self, calibration_taken: bool) -> str:
        """What the job record says about the choice."""
        text = self.source
        if self.matching > 1:
            text += f": the newest of {self.matching} active profiles matching this camera"
        if not calibration_taken:
            text += "; the calibration given with the job was kept"
        return text


@dataclass(frozen=True)
class SpectCamera:
    """What a cycle's SPECT says about its camera: its identity (None when the headers do not name one, with
    ``problem`` saying why), whether a time point holds raw counts (needs a calibration), and the matching profile."""

    identity: CameraIdentity | None
    counts: bool
    match: CameraMatch | None
    problem: str | None = None

    @property
    def label(self) -> str:
        if self.identity is None:
            return f"(not named by the SPECT: {self.problem})"
        return camera_label(self.identity)


def pick_profile(identity: CameraIdentity, nuclide: str, profiles: Sequence[CameraRecord]) -> CameraMatch | None:
    """The newest active profile for this camera identity and nuclide (None when none matches)."""
    key = canonical_name(nuclide)  # "Lu-177", "lu177" and "177Lu" are one nuclide
    found = [
        r
        for r in profiles
        if r.active and canonical_name(r.profile.nuclide) == key and not r.profile.identity.mismatches(identity)
    ]
    if not found:
        return None
    newest = max(found, key=lambda r: (r.created_at, r.id))
    return CameraMatch(newest, len(found))


def spect_camera(cycle: Cycle, profiles: Sequence[CameraRecord]) -> SpectCamera:
    """The camera of ``cycle``'s first SPECT object, whether any SPECT holds counts, and the profile it takes."""
    counts = False
    for tp in cycle.timepoints:
        try:
            counts = counts or spect_pixel_mode(tp.spect.first, tp.spect.instances[0].path) == "counts"
        except VoxeldoseError:
            counts = True  # unsupported units: the run says so; here it cannot count as calibrated
    first = cycle.timepoints[0].spect
    try:
        identity = identity_from_dataset(first.first, first.instances[0].path)
    except VoxeldoseError as err:
        return SpectCamera(None, counts, None, f"{err.reason} ({err.tag})" if err.tag else err.reason)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:  # a damaged sequence, a wrong VR
        log.info("the SPECT's camera headers cannot be read (%s)", type(exc).__name__)
        return SpectCamera(None, counts, None, "its camera headers cannot be read")
    return SpectCamera(identity, counts, pick_profile(identity, cycle.injection.nuclide, profiles))


def calibration_given(fields: Mapping[str, Any]) -> bool:
    """Does a job description (JSON fields) give a calibration of its own: a factor, or an inline camera profile
    (whose sensitivity calibrates the counts)?"""
    cal = fields.get("calibration")
    return (isinstance(cal, Mapping) and cal.get("cps_per_mbq") is not None) or fields.get("camera") is not None


def apply_profile(fields: Mapping[str, Any], match: CameraMatch) -> tuple[dict[str, Any], str]:
    """``fields`` (a job description as JSON) with the profile's calibration — unless it gives one — and the note
    for the job record."""
    out = copy.deepcopy(dict(fields))
    taken = not calibration_given(out)
    if taken:
        cal = dict(out.get("calibration") or {})
        cal.update(cps_per_mbq=match.record.profile.sensitivity_cps_per_mbq, source=match.source)
        out["calibration"] = cal
    if taken or pvc_needs_profile(out):
        # the whole profile too, for partial-volume correction (its sensitivity equals the calibration set above;
        # a different factor given with a pvc is refused by the JobSpec, naming both)
        out["camera"] = match.record.profile.model_dump(mode="json", by_alias=True)
    return out, match.note(taken)


def pvc_needs_profile(fields: Mapping[str, Any]) -> bool:
    """Does a job description (JSON fields) ask for a partial-volume correction without its own camera profile
    (so the registered profile matching its SPECT must give the resolution or recovery curve)?"""
    return fields.get("pvc", "none") not in (None, "none") and fields.get("camera") is None


# ------------------------------------------------------------------------------------- registering
def invalid_profile(detail: str, tag: str | None, expected: str | None = None) -> ServiceError:
    return ServiceError(
        ErrorKind.INVALID,
        "Invalid camera profile",
        detail,
        slug="invalid-camera-profile",
        tag=tag,
        expected=expected,
    )


#: The longest text the store keeps for a profile's name, manufacturer, model and serial number (characters).
MAX_TEXT = 200
#: The longest nuclide name (ICRP-107 names are a few characters).
MAX_NUCLIDE = 32


def _bad_text(data: object, where: str = "") -> str | None:
    """The field of the first text in ``data`` (parsed JSON) that a database cannot keep: a lone surrogate (not
    Unicode) or a NUL character."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return where or "(top level)"
        return (where or "(top level)") if "\x00" in data else None
    items: list[tuple[str, object]] = []
    if isinstance(data, dict):
        items = [(str(k), k) for k in data] + [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(str(n), v) for n, v in enumerate(data)]
    for key, value in items:
        found = _bad_text(value, f"{where}.{key}" if where else key)
        if found is not None:
            return found
    return None


def parse_profile(data: object) -> CameraProfile:
    """A ``camera.json`` (parsed JSON) as a profile a job can use, or a refusal naming the field."""
    bad = _bad_text(data)
    if bad is not None:
        raise invalid_profile("text that is not valid Unicode, or holds a NUL character", bad, "UTF-8 text")
    try:
        profile = CameraProfile.from_data(data)
    except VoxeldoseError as err:
        raise invalid_profile(err.reason, err.tag, err.expected) from None
    ident = profile.identity
    for field, value, limit in (
        ("name", profile.name, MAX_TEXT),
        ("nuclide", profile.nuclide, MAX_NUCLIDE),
        ("identity.manufacturer", ident.manufacturer, MAX_TEXT),
        ("identity.model", ident.model, MAX_TEXT),
        ("identity.device_serial_number", ident.device_serial_number or "", MAX_TEXT),
    ):
        if len(value) > limit:
            raise invalid_profile(f"{field} is longer than {limit} characters", field, f"at most {limit} characters")
    if not profile.name.strip() or not ident.manufacturer.strip() or not ident.model.strip():
        field = (
            "name"
            if not profile.name.strip()
            else "identity.manufacturer"
            if not ident.manufacturer.strip()
            else "identity.model"
        )
        raise invalid_profile(f"{field} is empty", field, "a name")
    try:
        require_supported(profile.nuclide, tag="nuclide")
    except VoxeldoseError as err:
        raise invalid_profile(err.reason, "nuclide", err.expected) from None
    try:  # a job takes its sensitivity as calibration.cps_per_mbq: the bounds of that field apply
        Calibration(cps_per_mbq=profile.sensitivity_cps_per_mbq)
    except ValidationError as exc:
        raise invalid_profile(
            f"not usable as a job's calibration: {exc.errors()[0]['msg']}",
            "sensitivity_cps_per_mbq",
            "the camera's volume sensitivity in cps/MBq, as calibration.cps_per_mbq of a job accepts it",
        ) from None
    return profile


def register_profile(store: Store, data: object, created_by: str | None) -> CameraRecord:
    """Validate and store a profile; the cycles waiting for a camera profile are looked at again."""
    rec = store.add_camera_profile(parse_profile(data), created_by)
    woken = store.wake_waiting_cycles(WAITING_MARK, utcnow())
    if woken:
        log.info("camera profile %d: %d patient(s) waiting for a calibration looked at again", rec.id, woken)
    return rec
