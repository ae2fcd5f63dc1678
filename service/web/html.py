"""The HTML side of the web layer: Jinja2 templates (autoescaped), their filters, and the error page.

The pages (:mod:`service.web.pages`) and the error handlers (:mod:`service.web.problems`, for a browser asking
for a page) both render through :func:`render`.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..auth import Principal

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
#: Files served under ``/static/`` (our scripts, and vendored libraries under ``vendor/``: no internet needed).
STATIC = Path(__file__).resolve().parent.parent / "static"
env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _fmt_dt(d: datetime | None) -> str:
    return "—" if d is None else d.strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "—"
    return f"{f:.{digits}f}"


env.filters["dt"] = _fmt_dt
env.filters["num"] = _num
env.filters["urlpart"] = lambda s: quote(str(s), safe="")


#: The job page runs scripts, ours only: the slice viewer from ``/static/`` (WebGL; NiiVue may start workers from
#: blob: URLs to decompress volumes).  No inline script, no other origin.
SCRIPT_HEADERS = {
    **SECURITY_HEADERS,
    "Content-Security-Policy": SECURITY_HEADERS["Content-Security-Policy"].replace(
        "script-src 'none'", "script-src 'self'; worker-src 'self' blob:; connect-src 'self'"
    ),
}


def render(
    name: str, request: Request, who: Principal | None, status: int = 200, *, scripts: bool = False, **ctx: Any
) -> HTMLResponse:
    """The template ``name`` as a page, with the security headers every page carries (``scripts``: the page
    loads scripts from ``/static/``)."""
    html = env.get_template(name).render(request=request, who=who, **ctx)
    return HTMLResponse(html, status_code=status, headers=SCRIPT_HEADERS if scripts else SECURITY_HEADERS)


def error_page(
    request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """An error as a page (for a browser; API clients get problem+json)."""
    resp = render("error.html", request, None, status=status, title=title, detail=detail, status_code=status)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp
