"""Authentication and roles.

A request carries ``Authorization: Bearer <token>`` (API clients) or the HttpOnly cookie ``vd_token`` (the web
pages, set by the login form).  The token is checked with ``store.verify_token`` → ``(name, role)``.
No or an unknown token → 401 with ``WWW-Authenticate: Bearer``; a role below the one a route needs → 403.
Roles are ordered ``submitter`` < ``physicist`` < ``admin``.

Cookie-authenticated requests that change something (POST, …) must not come from another site: the cookie is
``SameSite=Strict`` and an ``Origin`` header naming another host is refused (403).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from ..auth import Principal
from ..config import Settings
from ..store import JobRecord, Store
from .problems import ProblemError

COOKIE = "vd_token"

_bearer = HTTPBearer(auto_error=False, description="a token from `voxeldose token create --name N --role R`")
_cookie = APIKeyCookie(name=COOKIE, auto_error=False, description="set by the login form of the web pages")


def get_store(request: Request) -> Store:
    """The app's store (``app.state.store``)."""
    store: Store = request.app.state.store
    return store


def get_settings(request: Request) -> Settings:
    """The app's settings (``app.state.settings``)."""
    settings: Settings = request.app.state.settings
    return settings


def unauthorized(detail: str, *, invalid: bool = False) -> ProblemError:
    challenge = 'Bearer realm="voxeldose"' + (', error="invalid_token"' if invalid else "")
    return ProblemError(401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": challenge})


def _token_from(request: Request) -> tuple[str | None, Literal["header", "cookie", "none"]]:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("the Authorization header must be 'Bearer <token>'")
        return value.strip(), "header"
    cookie = request.cookies.get(COOKIE)
    if cookie:
        return cookie, "cookie"
    return None, "none"


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin != "null"
    return urlsplit(origin).netloc.lower() == (request.headers.get("host") or "").lower()


async def optional_principal(
    request: Request,
    _b: HTTPAuthorizationCredentials | None = Depends(_bearer),
    _c: str | None = Depends(_cookie),
) -> Principal | None:
    """The caller, or None when the request carries no token (an unknown token is still a 401)."""
    if get_settings(request).auth_disabled:
        return Principal("auth-disabled", "admin", "disabled")
    token, via = _token_from(request)
    if token is None or via == "none":
        return None
    store = get_store(request)
    found = await run_in_threadpool(store.verify_token, token)
    if not found:
        raise unauthorized("unknown or revoked token", invalid=True)
    if via == "cookie" and request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin(request):
        raise ProblemError(403, "Forbidden", "cross-site request refused", slug="forbidden")
    name, role = found
    return Principal(str(name), str(role), via)


async def principal(p: Principal | None = Depends(optional_principal)) -> Principal:
    if p is None:
        raise unauthorized("a token is needed: send 'Authorization: Bearer <token>'")
    return p


def require(role: str) -> Callable[[Principal], Awaitable[Principal]]:
    """Dependency: the caller, who must have at least ``role``."""

    async def _dep(p: Principal = Depends(principal)) -> Principal:
        if not p.at_least(role):
            raise ProblemError(
                403, "Forbidden", f"the role {p.role!r} may not do this; it needs {role!r} or above", slug="forbidden"
            )
        return p

    return _dep


def may_read(p: Principal, job: JobRecord) -> bool:
    """Submitters read their own jobs; physicists and admins read all."""
    return p.at_least("physicist") or (job.submitted_by is not None and job.submitted_by == p.name)
