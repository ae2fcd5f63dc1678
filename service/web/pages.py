"""Server-rendered web pages (Jinja2, autoescaped; no front-end build, no external assets).

``/login`` (a token entered once → HttpOnly cookie ``vd_token``), ``/`` (job list), ``/cameras`` (camera profiles;
physicists register and retire them), ``/jobs/{id}`` (state,
progress, error; for a finished job the dose table with limits, Gy/GBq, cycles left, the DVH plot and the
full report in a frame), ``/patients/{id}`` (cycles, cumulative dose vs limits, cycles left), ``/submit``
(upload form).  Pages of running jobs refresh themselves.  Stable hooks for browser tests:
``#job-list a.job-link``, ``#camera-list tr.camera-row``, ``#dose-table``, ``#dvh-plot``, ``#cycles-table``, ``#cycles-left``,
``#review-state``, ``#review-form`` (``#review-approve``/``-reject``/``-revoke``, ``#review-reason``), ``#viewer-canvas``,
``#viewer-status[data-state]``.  A finished job's page runs one script of ours (``/static/viewer.js``, the slice
viewer over the vendored NiiVue); every other page runs none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from markupsafe import Markup, escape
from pydantic import ValidationError

from voxeldose.errors import VoxeldoseError
from voxeldose.summary import CyclesLeft, Summary, VoiMetrics

from .. import approval, cameras
from ..auth import Principal
from ..errors import ServiceError
from ..store.approvals import MAX_REASON
from .cameras import MAX_PROFILE_BYTES, camera_out, parse_body
from .deps import COOKIE, get_settings, get_store, may_read, optional_principal
from .html import render
from .problems import ProblemError, readable_validation
from .submit import accept_upload
from .views import MAX_LIMIT, MAX_OFFSET, job_out, job_summary, list_visible, patient_cycles

router = APIRouter(include_in_schema=False)

COOKIE_MAX_AGE = 12 * 3600
#: Jobs per page of the job list.
PAGE_LIMIT = min(50, MAX_LIMIT)
ACTIVE = ("queued", "running")


async def page_principal(request: Request) -> Principal | None:
    """The caller of a page, or None (no token, or an unknown/revoked one) — pages then offer the login."""
    try:
        return await optional_principal(request)
    except ProblemError as exc:
        if exc.status == 401:
            return None
        raise


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    resp = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    if request.cookies.get(COOKIE):
        resp.delete_cookie(COOKIE, path="/")
    return resp


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


# ---------------------------------------------------------------------------------------- login
@router.get("/login")
async def login_form(
    request: Request, next: str = "/", who: Principal | None = Depends(page_principal)
) -> HTMLResponse:
    return render("login.html", request, who, next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request, token: str = Form(..., max_length=512), next: str = Form("/")) -> Response:
    store = get_store(request)
    found = await run_in_threadpool(store.verify_token, token.strip())
    if not found:
        return render(
            "login.html", request, None, status=401, next=_safe_next(next), error="This token is unknown or revoked."
        )
    resp = RedirectResponse(_safe_next(next), status_code=303)
    resp.set_cookie(
        COOKIE,
        token.strip(),
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return resp


@router.post("/logout")
async def logout() -> Response:
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# ------------------------------------------------------------------------------------- job list
@router.get("/")
def job_list(
    request: Request,
    state: str | None = Query(None),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    who: Principal | None = Depends(page_principal),
) -> Response:
    if who is None:
        return _login_redirect(request)
    if state not in (None, "", "queued", "running", "succeeded", "failed", "cancelled"):
        state = None
    limit = PAGE_LIMIT
    rows, total = list_visible(
        get_store(request), who, state=state or None, patient_id=None, limit=limit, offset=offset
    )
    jobs = [job_out(r) for r in rows]
    return render(
        "jobs.html",
        request,
        who,
        jobs=jobs,
        total=total,
        state=state or "",
        offset=offset,
        limit=limit,
        refresh=any(j.state in ACTIVE for j in jobs),
    )


# ------------------------------------------------------------------------------------ job page
def _dose_rows(vois: Mapping[str, VoiMetrics]) -> list[dict[str, Any]]:
    """The dose table: one row per VOI, kidneys first, then marrow, tumours, organs, body."""
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "role": v.role,
            "volume_ml": v.volume_ml,
            "mass_g": v.mass_g,
            "mean_gy": v.mean_gy,
            "D2_gy": v.D2_gy,
            "D50_gy": v.D50_gy,
            "D98_gy": v.D98_gy,
            "gy_per_gbq": v.gy_per_gbq,
            "bed_gy": v.bed_gy,
            # expanded uncertainty U = k·u of the mean (k = 2); None: no budget or no stated u
            "mean_U_gy": _expanded(v),
        }
        for name, v in vois.items()
    ]
    order = {"kidney": 0, "marrow": 1, "tumour": 2, "organ": 3, "body": 4}
    rows.sort(key=lambda r: (order.get(str(r["role"]), 9), r["name"]))
    return rows


def _expanded(v: VoiMetrics) -> float | None:
    """U = k·u of a VOI's mean dose (Gy), or None without a stated u."""
    b = v.uncertainty
    return None if b is None or b.mean_gy.u is None else b.coverage_factor * b.mean_gy.u


def _limit_rows(left: CyclesLeft | None) -> list[dict[str, Any]]:
    """The limits table: each limit's row with the share of it already used (%, None when undefined)."""
    rows = []
    for x in left.limits if left is not None else []:
        pct = 100.0 * x.current_gy / x.limit_gy if x.limit_gy else None
        rows.append({**x.model_dump(), "percent": pct})
    return rows


#: 20 distinguishable colours (matplotlib's tab10 then its lighter tab20 partners): a study has 13+ VOIs.
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
    "#aec7e8",
    "#ff9896",
    "#98df8a",
    "#c5b0d5",
    "#ffbb78",
    "#c49c94",
    "#f7b6d2",
    "#9edae5",
    "#c7c7c7",
    "#dbdb8d",
]


def dvh_svg(vois: Mapping[str, VoiMetrics], width: int = 640, height: int = 360) -> Markup:
    """Cumulative DVHs of the VOIs (``vois`` of a summary; no body outline) as inline SVG; names escaped."""
    curves = []
    for name, v in vois.items():
        if v.role == "body":
            continue
        d, f = v.dvh.dose_gy, v.dvh.volume_fraction
        pts = [(float(a), float(b)) for a, b in zip(d, f) if _finite(a) and _finite(b)]
        if pts:
            curves.append((name, pts))
    if not curves:
        return Markup('<p id="dvh-plot" class="muted">No DVH in this result.</p>')
    dmax = max(p[0] for _, pts in curves for p in pts) or 1.0
    dmax = _nice(dmax)
    left, right, top, bottom = 56, 150, 12, 40
    pw, ph = width - left - right, height - top - bottom

    def x(d: float) -> float:
        return left + pw * d / dmax

    def y(f: float) -> float:
        return top + ph * (1.0 - f)

    out = [
        f'<svg id="dvh-plot" class="dvh" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg"><title>Cumulative dose-volume histograms</title>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>',
    ]
    for i in range(6):
        dv = dmax * i / 5
        out.append(
            f'<line x1="{x(dv):.1f}" y1="{top}" x2="{x(dv):.1f}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{x(dv):.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{dv:g}</text>'
        )
        fv = i / 5
        out.append(
            f'<line x1="{left}" y1="{y(fv):.1f}" x2="{left + pw}" y2="{y(fv):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y(fv) + 4:.1f}" font-size="11" text-anchor="end">{fv * 100:.0f}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" font-size="12" text-anchor="middle">Absorbed dose (Gy)</text>'
        f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2})">Volume (%)</text>'
    )
    for i, (name, pts) in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        step = max(1, len(pts) // 400)
        poly = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts[::step] + [pts[-1]])
        out.append(
            f'<polyline class="dvh-curve" data-voi="{escape(name)}" fill="none" stroke="{color}" '
            f'stroke-width="1.5" points="{poly}"/>'
        )
        ly = top + 14 + 16 * i
        out.append(
            f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 28}" y2="{ly - 4}" stroke="{color}" '
            f'stroke-width="2"/><text x="{left + pw + 32}" y="{ly}" font-size="11">{escape(name)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _nice(v: float) -> float:
    exp = 10.0 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return m * exp
    return 10 * exp


def summary_context(summary: Summary) -> dict[str, Any]:
    """What the job page shows of a job's summary (the typed :class:`voxeldose.summary.Summary`)."""
    cum = summary.cumulative
    return {
        "dose_rows": _dose_rows(summary.vois),
        "limit_rows": _limit_rows(cum.cycles_left),
        "cycles_left": cum.cycles_left,
        "totals": cum.total,
        "cycles": cum.cycles,
        "dvh": dvh_svg(summary.vois),
        "warnings": list(summary.warnings),
        "patient": summary.patient,
        "cycle": summary.cycle,
        "marrow": summary.marrow,
        "methods": summary.methods,
        "cum_u": cum.uncertainty,
        "cycles_left_upper": None if cum.cycles_left is None else cum.cycles_left.upper_95,
    }


def _job_page(
    request: Request, who: Principal, job_id: str, *, status: int = 200, review_error: str | None = None
) -> HTMLResponse:
    store = get_store(request)
    rec = store.get_job(job_id)
    if rec is None or not may_read(who, rec):
        raise ProblemError(404, "Not found", f"no job {job_id}", slug="not-found")
    job = job_out(rec, store.job_deliveries(rec.id), store.review_history(rec.id))
    summary = job_summary(rec)
    ctx: dict[str, Any] = {
        "job": job,
        "summary": summary,
        "refresh": job.state in ACTIVE,
        "may_review": who.at_least(approval.REVIEWER_ROLE) and job.has_result,
        "review_error": review_error,
    }
    if summary is not None:
        ctx.update(summary_context(summary))
    return render("job.html", request, who, status=status, scripts=job.has_result, **ctx)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, who: Principal | None = Depends(page_principal)) -> Response:
    if who is None:
        return _login_redirect(request)
    return _job_page(request, who, job_id)


@router.post("/jobs/{job_id}/review")
def job_review(
    request: Request,
    job_id: str,
    decision: str = Form(..., max_length=16),
    reason: str = Form("", max_length=MAX_REASON),
    who: Principal | None = Depends(page_principal),
) -> Response:
    """The review form of the job page: approve, reject (reason), revoke (reason); physicists and admins."""
    if who is None:
        return _login_redirect(request)
    if not who.at_least(approval.REVIEWER_ROLE):
        raise ProblemError(
            403, "Forbidden", f"the role {who.role!r} may not approve or reject results", slug="forbidden"
        )
    try:
        approval.decide(get_settings(request), get_store(request), job_id, who, decision, reason)
    except ServiceError as exc:
        problem = ProblemError.of(exc)
        if problem.status in (403, 404):
            raise problem from None
        return _job_page(request, who, job_id, status=problem.status, review_error=problem.detail)
    return RedirectResponse(f"/jobs/{quote(job_id, safe='')}#review", status_code=303)


@router.post("/jobs/{job_id}/cancel")
def job_cancel(request: Request, job_id: str, who: Principal | None = Depends(page_principal)) -> Response:
    if who is None:
        return _login_redirect(request)
    if not who.at_least("physicist"):
        raise ProblemError(403, "Forbidden", "only a physicist or an admin may cancel a job", slug="forbidden")
    if get_store(request).request_cancel(job_id) is None:
        raise ProblemError(404, "Not found", f"no job {job_id}", slug="not-found")
    return RedirectResponse(f"/jobs/{quote(job_id, safe='')}", status_code=303)


# -------------------------------------------------------------------------------- patient page
@router.get("/patients/{patient_id:path}")  # ':path': a patient ID may contain '/' (sent as %2F)
def patient_page(request: Request, patient_id: str, who: Principal | None = Depends(page_principal)) -> Response:
    if who is None:
        return _login_redirect(request)
    if not who.at_least("physicist"):
        raise ProblemError(
            403, "Forbidden", "only a physicist or an admin may open a patient's cycles", slug="forbidden"
        )
    data = patient_cycles(get_store(request), patient_id)
    limits = []
    for lim in data.limits:
        pct = None
        if lim.current_gy is not None and lim.limit_gy:
            pct = 100.0 * lim.current_gy / lim.limit_gy
        limits.append({**lim.model_dump(), "percent": pct})
    return render("patient.html", request, who, p=data, limits=limits)


# ------------------------------------------------------------------------------------- upload
@router.get("/submit")
async def submit_form(request: Request, who: Principal | None = Depends(page_principal)) -> Response:
    if who is None:
        return _login_redirect(request)
    return render("submit.html", request, who, error=None)


@router.post("/submit")
async def submit(request: Request, who: Principal | None = Depends(page_principal)) -> Response:
    if who is None:
        return _login_redirect(request)
    try:
        rec, _created = await accept_upload(request, who, None)
    except ProblemError as exc:  # shown on the form
        return render("submit.html", request, who, status=exc.status, error=exc.detail)
    except ServiceError as exc:
        return render("submit.html", request, who, status=ProblemError.of(exc).status, error=exc.detail)
    except VoxeldoseError as exc:
        return render("submit.html", request, who, status=422, error=str(exc))
    except ValidationError as exc:  # an invalid job description
        return render("submit.html", request, who, status=422, error=readable_validation(exc.errors())[0])
    return RedirectResponse(f"/jobs/{rec.id}", status_code=303)


# ------------------------------------------------------------------------------------ cameras
def _cameras_page(
    request: Request, who: Principal, *, status: int = 200, error: str | None = None, message: str | None = None
) -> HTMLResponse:
    profiles = [camera_out(r) for r in get_store(request).list_camera_profiles()]
    can_edit = who.at_least("physicist")
    return render(
        "cameras.html", request, who, status=status, profiles=profiles, can_edit=can_edit, error=error, message=message
    )


def _may_edit_cameras(who: Principal) -> None:
    if not who.at_least("physicist"):
        raise ProblemError(
            403, "Forbidden", f"the role {who.role!r} may not change camera profiles; it needs 'physicist' or above"
        )


@router.get("/cameras")
def cameras_page(
    request: Request,
    registered: int | None = Query(None, ge=1, le=2**31 - 1),
    who: Principal | None = Depends(page_principal),
) -> Response:
    if who is None:
        return _login_redirect(request)
    return _cameras_page(request, who, message=f"Camera profile {registered} registered." if registered else None)


@router.post("/cameras")
async def camera_upload(request: Request, who: Principal | None = Depends(page_principal)) -> Response:
    if who is None:
        return _login_redirect(request)
    _may_edit_cameras(who)
    try:
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("profile")
        if upload is None or isinstance(upload, str):
            raise ProblemError(400, "Bad request", "choose a camera.json file to register", slug="bad-request")
        raw = await upload.read(MAX_PROFILE_BYTES + 1)
        await form.close()
        data = parse_body(raw)
        rec = await run_in_threadpool(cameras.register_profile, get_store(request), data, who.name)
    except (ProblemError, ServiceError) as exc:  # shown on the page; an invalid profile names the field at fault
        problem = exc if isinstance(exc, ProblemError) else ProblemError.of(exc)
        tag = problem.extra.get("tag")
        text = f"{problem.detail} (field {tag})" if tag else problem.detail
        return await run_in_threadpool(lambda: _cameras_page(request, who, status=problem.status, error=text))
    return RedirectResponse(f"/cameras?registered={rec.id}", status_code=303)


@router.post("/cameras/{profile_id}/retire")
def camera_retire(
    request: Request,
    profile_id: int = Path(ge=1, le=2**31 - 1),
    who: Principal | None = Depends(page_principal),
) -> Response:
    if who is None:
        return _login_redirect(request)
    _may_edit_cameras(who)
    if get_store(request).retire_camera_profile(profile_id, who.name) is None:
        raise ProblemError(404, "Not found", f"no camera profile {profile_id}", slug="not-found")
    return RedirectResponse("/cameras", status_code=303)
