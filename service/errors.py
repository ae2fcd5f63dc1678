"""Domain errors of the service core: what went wrong, in words a person can act on, without any HTTP status.

The core (intake, trigger, DICOM node, sender) raises :class:`ServiceError`; the web layer maps its
:class:`ErrorKind` to an HTTP status and renders it as ``application/problem+json`` (API) or as an HTML page
(:mod:`service.web.problems`).  Messages never carry patient data.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorKind(StrEnum):
    """What kind of refusal an error is (the web layer's status follows from it)."""

    BAD_REQUEST = "bad-request"  # the request itself cannot be read
    FORBIDDEN = "forbidden"  # the caller may not do this
    NOT_FOUND = "not-found"  # what was named does not exist
    CONFLICT = "conflict"  # the request contradicts the state of what it names
    TOO_LARGE = "too-large"  # over a configured size limit
    UNSUPPORTED_MEDIA = "unsupported-media"  # a body format the service does not read
    INVALID = "invalid"  # readable, but not usable (bad files, bad job description)
    NO_STORAGE = "no-storage"  # not enough free disk space


class ServiceError(Exception):
    """A refusal by the service core.

    ``kind``: what kind of refusal; ``title``: the short name of this problem ("Upload too large");
    ``detail``: what went wrong here; ``slug``: the stable name of the problem type (clients match on it);
    ``extra``: further fields for the client (e.g. ``expected``), None values dropped."""

    def __init__(
        self, kind: ErrorKind, title: str, detail: str, *, slug: str, **extra: str | int | float | bool | None
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.title = title
        self.detail = detail
        self.slug = slug
        self.extra: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}


class IntakeError(ServiceError):
    """An upload, a named series set or a job description that the intake refuses."""
