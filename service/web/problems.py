"""Errors as RFC 9457 ``application/problem+json``: ``{type, title, status, detail, instance}``.

Every error the API answers goes through here: our own :class:`ProblemError`, the core's domain errors
(:class:`service.errors.ServiceError`, whose kind names the status: :data:`STATUS_OF`), HTTP errors raised by the
framework (404 for an unknown route, 405), request validation (422 with a readable ``detail``),
:class:`voxeldose.errors.VoxeldoseError` (422 with the physicist's message), and anything unexpected (500
with a reference id, never a traceback).  A browser asking for a page gets the same error as an HTML page
(:func:`service.web.html.error_page`).  Logs name the route template and the exception type only — no
request values, so no patient data.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxeldose.errors import VoxeldoseError
from voxeldose.spec import printable

from ..errors import ErrorKind, ServiceError
from .html import error_page

log = logging.getLogger("service.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:voxeldose:problem:"


class Problem(BaseModel):
    """An error, as RFC 9457 problem details."""

    type: str = Field(description="a URN naming the kind of problem, e.g. urn:voxeldose:problem:invalid-input")
    title: str = Field(description="short summary of the kind of problem")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong here, for a person")
    instance: str = Field(description="the request path")
    errors: list[dict[str, Any]] | None = Field(None, description="field errors of a request that did not validate")
    tag: str | None = Field(None, description="DICOM attribute or job field the problem is about")
    expected: str | None = None
    found: str | None = None
    checks: dict[str, bool] | None = Field(None, description="readiness checks (only on /readyz)")


#: The HTTP status of each kind of domain error.
STATUS_OF: dict[ErrorKind, int] = {
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.INVALID: 422,
    ErrorKind.NO_STORAGE: 507,
}


class ProblemError(Exception):
    """Raise anywhere in a route to answer with a problem."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = {k: v for k, v in extra.items() if v is not None}

    @classmethod
    def of(cls, err: ServiceError) -> ProblemError:
        """The problem a domain error is."""
        return cls(STATUS_OF[err.kind], err.title, err.detail, slug=err.slug, **err.extra)


def problem_response(
    request: Request,
    status: int,
    title: str,
    detail: str,
    *,
    slug: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {
        "type": TYPE_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the problems a route may answer."""
    words = {
        400: "Bad request",
        401: "No or unknown token",
        403: "The token's role may not do this",
        404: "Not found",
        409: "Conflict (e.g. the job has not finished)",
        413: "Upload too large",
        415: "Unsupported media type",
        422: "The input or job description is not usable",
        501: "Not implemented yet",
        503: "Not ready",
        507: "Not enough free disk space",
    }
    return {c: {"model": Problem, "description": words.get(c, "Error"), "content": {PROBLEM_JSON: {}}} for c in codes}


responses = _responses


def readable_validation(errors: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """One line a person can read, plus the field errors in a JSON-safe form (text UTF-8 can encode: a
    lone surrogate in a field name is escaped, or the answer itself would fail)."""
    items = []
    for e in errors:
        loc = [printable(p) for p in e.get("loc", ()) if p not in ("body",)]
        items.append({"loc": loc, "msg": printable(e.get("msg", "")), "type": str(e.get("type", ""))})
    text = "; ".join(f"{'.'.join(i['loc']) or 'request'}: {i['msg']}" for i in items)
    return text or "the request is not valid", items


def _route_of(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not the JSON API)."""
    path = request.url.path
    if path.startswith("/v1/") or path in ("/metrics", "/healthz", "/readyz", "/openapi.json"):
        return False
    return "text/html" in request.headers.get("accept", "")


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    def render(
        request: Request,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> HTMLResponse | JSONResponse:
        if wants_html(request) and status != 401:
            return error_page(request, status, title, detail, headers=headers)
        return problem_response(request, status, title, detail, slug=slug, headers=headers, **extra)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> HTMLResponse | JSONResponse:
        return render(request, exc.status, exc.title, exc.detail, slug=exc.slug, headers=exc.headers, **exc.extra)

    @app.exception_handler(ServiceError)
    async def _domain(request: Request, exc: ServiceError) -> HTMLResponse | JSONResponse:
        status = STATUS_OF[exc.kind]
        return render(request, status, exc.title, exc.detail, slug=exc.slug, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> HTMLResponse | JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        detail = exc.detail if isinstance(exc.detail, str) else phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.url.path}"
        return render(
            request,
            exc.status_code,
            phrase,
            detail,
            slug=phrase.lower().replace(" ", "-"),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> HTMLResponse | JSONResponse:
        text, items = readable_validation(list(exc.errors()))
        return render(request, 422, "Invalid request", text, slug="invalid-request", errors=items)

    @app.exception_handler(ValidationError)
    async def _pyd_validation(request: Request, exc: ValidationError) -> HTMLResponse | JSONResponse:
        text, items = readable_validation(list(exc.errors()))
        return render(request, 422, "Invalid job description", text, slug="invalid-spec", errors=items)

    @app.exception_handler(VoxeldoseError)
    async def _voxeldose(request: Request, exc: VoxeldoseError) -> HTMLResponse | JSONResponse:
        d = exc.to_dict()
        return render(
            request,
            422,
            "Input not usable",
            d["message"] or str(exc),
            slug="invalid-input",
            tag=d.get("tag"),
            expected=d.get("expected"),
            found=d.get("found"),
        )


class CatchAllMiddleware:
    """Outermost guard: an unexpected exception becomes a 500 problem (never a traceback, and not re-raised
    to the server, whose log line would carry the exception message)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            ref = uuid.uuid4().hex[:12]
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            # stack frames and the exception type only: the message may carry patient data
            frames = "\n".join(
                f"  {f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-8:]
            )
            log.error(
                "unexpected %s (ref %s) on %s %s\n%s", type(exc).__name__, ref, scope.get("method"), route, frames
            )
            if started:
                return
            request = Request(scope)
            resp = problem_response(
                request,
                500,
                "Internal error",
                f"the service failed unexpectedly; the operator can find reference {ref} in its log",
                slug="internal-error",
            )
            await resp(scope, receive, send)
