"""The physicist's report: one self-contained HTML file, and a plain-text table for the terminal.

:func:`render_report` writes a single HTML file — inline CSS, figures as base64 PNG (matplotlib,
Agg canvas, no pyplot state), no scripts, no external resources — laid out to print on A4:

1. header: patient, cycle, injection (activity, date/time, nuclide, radiopharmaceutical);
2. warnings, prominently (the summary's warnings, poor registrations, limits reached);
3. dose per VOI: volume, mass, mean / D2 / D50 / D98 / max, Gy/GBq, BED / EQD2, and the fraction
   of the organ-at-risk limit (kidneys 23 Gy, red marrow 2 Gy unless the summary says otherwise),
   flagged amber from 80 % of the limit and red at or over it;
4. cumulative dose across cycles and cycles left;
5. DVHs of all VOIs (one figure);
6. time–activity per VOI: measured points, fitted curve, model, TIA (one figure per VOI);
7. dose colour wash (Gy colour bar) over grey CT, axial and coronal, through the kidneys and
   through each tumour (over the dose alone when there is no CT);
8. provenance: software and data versions, kernel id, methods, input UIDs, calibration.

The summary follows ``voxeldose.summary/1``; any key may be missing.  What is absent is left out
(or shown as "—"), never guessed; a section that cannot be drawn says so in the report instead of
failing the whole file.  All text from the summary is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import Volume, resample

__all__ = ["render_report", "console_table", "DEFAULT_LIMITS_GY", "CLOSE_FRACTION"]

#: Organ-at-risk limits (Gy, cumulative absorbed dose) used when the summary gives none.
DEFAULT_LIMITS_GY: dict[str, float] = {"kidney": 23.0, "marrow": 2.0}
#: A dose at or above this fraction of its limit is flagged "close" (amber); at or above 1, "over".
CLOSE_FRACTION = 0.8

_DASH = "—"


# ------------------------------------------------------------------------------------- helpers
def _e(x: Any) -> str:
    """Escaped text of anything ("—" for None)."""
    return _DASH if x is None else html.escape(str(x), quote=True)


def _f(x: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _num(x: Any, nd: int = 2) -> str:
    """Number with ``nd`` decimals (3 significant digits for small values), "—" when missing."""
    v = _f(x)
    if v is None:
        return _DASH
    if v != 0 and abs(v) < 10 ** (-nd) * 5:
        return f"{v:.3g}"
    return f"{v:,.{nd}f}".replace(",", "\u202f")  # narrow no-break space as thousands separator


def _sci(x: Any) -> str:
    v = _f(x)
    return _DASH if v is None else f"{v:.4g}"


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """``d[k0][k1]...`` for nested mappings; ``default`` when anything is missing."""
    cur = d
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return default
        cur = cur[k]
    return cur


def _first(d: Any, *keys: str) -> Any:
    """The first present, non-None value among ``keys`` (case-insensitive) of mapping ``d``."""
    if not isinstance(d, Mapping):
        return None
    lower = {str(k).lower(): v for k, v in d.items()}
    for k in keys:
        v = lower.get(k.lower())
        if v is not None:
            return v
    return None


def _role(name: str, entry: Mapping[str, Any]) -> str:
    r = str(entry.get("role") or "").lower() if isinstance(entry, Mapping) else ""
    if r:
        return "tumour" if r == "tumor" else r
    low = name.lower()
    if "kidney" in low or "renal" in low:
        return "kidney"
    if "marrow" in low:
        return "marrow"
    if low.startswith(("tumo", "lesion", "gtv", "met")):
        return "tumour"
    return "organ"


def _limits(summary: Mapping[str, Any]) -> dict[str, float]:
    """Limits by role: the summary's (``cumulative.limits``) over the defaults."""
    out = dict(DEFAULT_LIMITS_GY)
    lim = _get(summary, "cumulative", "limits", default={}) or {}
    for role, keys in (
        ("kidney", ("kidney_gy", "kidney_dose_gy", "kidney")),
        ("marrow", ("marrow_gy", "marrow_dose_gy", "marrow")),
    ):
        v = _f(_first(lim, *keys))
        if v is not None and v > 0:
            out[role] = v
    return out


def _flag(value: Any, limit: float | None) -> str:
    """ "" / "close" / "over" for a dose against a limit."""
    v = _f(value)
    if v is None or not limit:
        return ""
    if v >= limit:
        return "over"
    if v >= CLOSE_FRACTION * limit:
        return "close"
    return ""


def _tex_safe(s: str) -> str:
    """Text for matplotlib labels: no mathtext (``$``) surprises."""
    return str(s).replace("$", r"\$")


def _png(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _kv_table(d: Mapping[str, Any], depth: int = 0) -> str:
    """Nested mapping as a two-column table (lists shortened, everything escaped)."""
    rows = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            cell = _kv_table(v, depth + 1) if v and depth < 4 else _e(v if v else "")
        elif isinstance(v, (list, tuple)):
            if v and all(isinstance(x, Mapping) for x in v) and depth < 4:
                cell = "".join(_kv_table(x, depth + 1) for x in v[:20])
            else:
                items = [(_sci(x) if isinstance(x, float) else _e(x)) for x in v[:20]]
                cell = ", ".join(items) + (f" … ({len(v)} values)" if len(v) > 20 else "")
        elif isinstance(v, float):
            cell = _sci(v)
        else:
            cell = _e(v)
        rows.append(f"<tr><th>{_e(k)}</th><td>{cell}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


# ---------------------------------------------------------------------------------- sections
def _header(summary: Mapping[str, Any]) -> str:
    pat = _get(summary, "patient", default={}) or {}
    cyc = _get(summary, "cycle", default={}) or {}
    inj = _get(cyc, "injection", default={}) or {}
    act = _f(_first(inj, "activity_MBq", "activity_mbq"))
    when = inj.get("datetime") if isinstance(inj, Mapping) else None
    try:
        when_txt = datetime.fromisoformat(str(when)).strftime("%Y-%m-%d %H:%M") if when else None
    except ValueError:
        when_txt = str(when)
    created = _get(summary, "provenance", "created_utc")
    items = [
        ("Patient ID", _e(_get(pat, "id"))),
        ("Patient name", _e(str(_get(pat, "name")).replace("^", " ") if _get(pat, "name") else None)),
        ("Cycle", _e(_get(cyc, "number"))),
        ("Injected activity", _DASH if act is None else f"{_num(act, 0)} MBq ({_num(act / 1000, 3)} GBq)"),
        ("Injection", _e(when_txt)),
        ("Nuclide", _e(_get(inj, "nuclide"))),
        ("Radiopharmaceutical", _e(_get(inj, "radiopharmaceutical"))),
    ]
    cells = "".join(f"<div><span class='lbl'>{k}</span><span class='val'>{v}</span></div>" for k, v in items)
    sub = f"<p class='sub'>Report created {_e(created)}</p>" if created else ""
    return f"<header><h1>Absorbed-dose report — molecular radiotherapy</h1>{sub}<div class='hdr'>{cells}</div></header>"


def _warnings(summary: Mapping[str, Any], extra: Iterable[str]) -> str:
    msgs: list[str] = []
    for w in summary.get("warnings") or []:
        msgs.append(_e(w))
    for i, tp in enumerate(summary.get("timepoints") or []):
        reg = _get(tp, "registration") if isinstance(tp, Mapping) else None
        if isinstance(reg, Mapping) and str(reg.get("quality", "")).lower() == "poor":
            hours = _f(tp.get("hours"))
            t = (
                _num(reg.get("translation_mm"), 1)
                if not isinstance(reg.get("translation_mm"), (list, tuple))
                else ", ".join(_num(v, 1) for v in reg["translation_mm"])
            )
            r = ", ".join(_num(v, 1) for v in reg.get("rotation_deg") or []) or _DASH
            msgs.append(
                f"<b>Poor registration</b> of time point {i + 1}"
                + (f" ({_num(hours, 1)} h)" if hours is not None else "")
                + f": {_e(reg.get('message') or 'check the alignment')} "
                + f"<span class='small'>(translation {t} mm; rotation {r}°)</span>"
            )
    msgs.extend(extra)
    if not msgs:
        return "<section class='ok'><p>No warnings.</p></section>"
    lis = "".join(f"<li>{m}</li>" for m in msgs)
    return f"<section class='warn' id='warnings'><h2>⚠ Warnings ({len(msgs)})</h2><ul>{lis}</ul></section>"


def _voi_rows(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    v = summary.get("vois")
    return {str(k): (e if isinstance(e, Mapping) else {}) for k, e in v.items()} if isinstance(v, Mapping) else {}


def _dose_table(summary: Mapping[str, Any], limits: Mapping[str, float], flags_out: list[str]) -> str:
    vois = _voi_rows(summary)
    if not vois:
        return "<section><h2>Absorbed dose per VOI</h2><p>No VOI results in the summary.</p></section>"
    head = (
        "<tr><th>VOI</th><th>Role</th><th>Volume<br>ml</th><th>Mass<br>g</th><th>Mean<br>Gy</th>"
        "<th>D2<br>Gy</th><th>D50<br>Gy</th><th>D98<br>Gy</th><th>Max<br>Gy</th><th>Gy/GBq</th>"
        "<th>TIA<br>MBq·h</th><th>BED<br>Gy</th><th>EQD2<br>Gy</th><th>Limit</th></tr>"
    )
    rows = []
    for name, e in vois.items():
        role = _role(name, e)
        limit = limits.get(role)
        mean = _f(e.get("mean_gy"))
        flag = _flag(mean, limit)
        if limit and mean is not None:
            vs = f"{_num(100 * mean / limit, 0)} % of {_num(limit, 0)} Gy"
            if flag == "over":
                flags_out.append(
                    f"<b>{_e(name)}</b>: mean {_num(mean)} Gy in this cycle reaches the {_num(limit, 0)} Gy limit"
                )
        else:
            vs = ""
        tia = _f(_first(e, "tia_bqs")) or _f(_get(e, "time_activity", "tia_bqs"))
        rows.append(
            f"<tr class='{flag}'><td class='name'>{_e(name)}</td><td>{_e(role)}</td>"
            f"<td>{_num(e.get('volume_ml'), 1)}</td><td>{_num(e.get('mass_g'), 1)}</td>"
            f"<td class='b'>{_num(mean)}</td><td>{_num(_first(e, 'd2_gy'))}</td><td>{_num(_first(e, 'd50_gy'))}</td>"
            f"<td>{_num(_first(e, 'd98_gy'))}</td><td>{_num(e.get('max_gy'))}</td><td>{_num(e.get('gy_per_gbq'), 3)}</td>"
            f"<td>{_DASH if tia is None else _num(tia / 3.6e9, 1)}</td>"
            f"<td>{_num(e.get('bed_gy'))}</td><td>{_num(e.get('eqd2_gy'))}</td><td class='flag'>{vs}</td></tr>"
        )
    note = (
        f"<p class='small'>Limits are cumulative over all cycles (kidneys {_num(limits.get('kidney'), 0)} Gy, "
        f"red marrow {_num(limits.get('marrow'), 0)} Gy); rows turn amber from {int(CLOSE_FRACTION * 100)} % "
        "of the limit within this cycle and red at the limit. Dn: minimum dose to the hottest n % of the VOI. "
        "TIA: time-integrated activity.</p>"
    )
    return f"<section><h2>Absorbed dose per VOI — this cycle</h2><table class='grid'>{head}{''.join(rows)}</table>{note}</section>"


def _cumulative(summary: Mapping[str, Any], limits: Mapping[str, float], flags_out: list[str]) -> str:
    cum = summary.get("cumulative")
    if not isinstance(cum, Mapping):
        return ""
    parts = ["<section><h2>Cumulative dose across cycles</h2>"]
    cycles = cum.get("cycles") or []
    if cycles:
        tot = {"kidney_gy": 0.0, "kidney_bed_gy": 0.0, "marrow_gy": 0.0}
        seen = {k: False for k in tot}
        rows = []
        for c in sorted((c for c in cycles if isinstance(c, Mapping)), key=lambda c: _f(c.get("number")) or 0):
            for k in tot:
                v = _f(c.get(k))
                if v is not None:
                    tot[k] += v
                    seen[k] = True
            rows.append(
                f"<tr><td>{_e(c.get('number'))}</td><td>{_e(c.get('date'))}</td><td>{_num(_first(c, 'activity_MBq'), 0)}</td>"
                f"<td>{_num(c.get('kidney_gy'))}</td><td>{_num(c.get('kidney_bed_gy'))}</td><td>{_num(c.get('marrow_gy'))}</td></tr>"
            )
        kflag = _flag(tot["kidney_gy"] if seen["kidney_gy"] else None, limits.get("kidney"))
        mflag = _flag(tot["marrow_gy"] if seen["marrow_gy"] else None, limits.get("marrow"))
        for flag, organ, key in ((kflag, "kidney", "kidney_gy"), (mflag, "marrow", "marrow_gy")):
            if flag == "over":
                flags_out.append(
                    f"Cumulative {organ} dose {_num(tot[key])} Gy reaches the {_num(limits.get(organ), 0)} Gy limit"
                )
            elif flag == "close":
                flags_out.append(
                    f"Cumulative {organ} dose {_num(tot[key])} Gy is within {int(100 - CLOSE_FRACTION * 100)} % of the {_num(limits.get(organ), 0)} Gy limit"
                )
        bed_lim = _f(_first(cum.get("limits") or {}, "kidney_bed_gy"))
        total = (
            f"<tr class='total'><td colspan='3'>Total</td>"
            f"<td class='{kflag}'>{_num(tot['kidney_gy']) if seen['kidney_gy'] else _DASH}</td>"
            f"<td class='{_flag(tot['kidney_bed_gy'] if seen['kidney_bed_gy'] else None, bed_lim)}'>"
            f"{_num(tot['kidney_bed_gy']) if seen['kidney_bed_gy'] else _DASH}</td>"
            f"<td class='{mflag}'>{_num(tot['marrow_gy']) if seen['marrow_gy'] else _DASH}</td></tr>"
            f"<tr class='limit'><td colspan='3'>Limit</td><td>{_num(limits.get('kidney'), 1)}</td>"
            f"<td>{_num(bed_lim, 1)}</td><td>{_num(limits.get('marrow'), 1)}</td></tr>"
        )
        parts.append(
            "<table class='grid'><tr><th>Cycle</th><th>Date</th><th>Activity MBq</th><th>Kidney Gy</th>"
            f"<th>Kidney BED Gy</th><th>Marrow Gy</th></tr>{''.join(rows)}{total}</table>"
        )
    left = cum.get("cycles_left")
    if isinstance(left, Mapping):
        parts.append(_cycles_left(left))
    for n in cum.get("notes") or []:
        parts.append(f"<p class='small'>{_e(n)}</p>")
    src = _get(cum, "limits", "sources")
    if isinstance(src, Mapping) and src:
        parts.append(
            "<p class='small'>Limit sources: " + "; ".join(f"{_e(k)}: {_e(v)}" for k, v in src.items()) + "</p>"
        )
    parts.append("</section>")
    return "".join(parts)


def _cycles_left(left: Mapping[str, Any]) -> str:
    """Cycles left, in either form: per-limit rows (``limits``) or counts keyed by limit."""
    out = ["<h3>Further cycles</h3>"]
    msg = left.get("message")
    n = left.get("cycles_left")
    binding = left.get("binding_limit") or left.get("binding")
    if msg or n is not None or binding:
        lead = f"<b>{_e(n)}</b> further cycle(s)" if n is not None else ""
        b = f" — binding limit: <b>{_e(binding)}</b>" if binding else ""
        out.append(f"<p class='cycles'>{lead}{b}</p>")
        if msg:
            out.append(f"<p>{_e(msg)}</p>")
    rows = left.get("limits")
    if isinstance(rows, list) and rows:
        body = "".join(
            f"<tr class='{'over' if r.get('exceeded') or r.get('cycles_left') == 0 else ''}'><td>{_e(r.get('limit'))}</td>"
            f"<td>{_num(r.get('limit_gy'), 1)}</td><td>{_num(r.get('current_gy'))}</td>"
            f"<td>{_num(r.get('per_cycle_gy'))}</td><td>{_e(r.get('cycles_left'))}</td><td class='small'>{_e(r.get('message'))}</td></tr>"
            for r in rows
            if isinstance(r, Mapping)
        )
        out.append(
            "<table class='grid'><tr><th>Limit</th><th>Limit Gy</th><th>So far Gy</th><th>Per cycle Gy</th>"
            f"<th>Cycles left</th><th>Note</th></tr>{body}</table>"
        )
    else:
        counts = {
            k: v
            for k, v in left.items()
            if k not in ("message", "binding", "binding_limit", "cycles_left") and not isinstance(v, (Mapping, list))
        }
        if counts:
            body = "".join(f"<tr><td>{_e(k.replace('_', ' '))}</td><td>{_e(v)}</td></tr>" for k, v in counts.items())
            out.append(f"<table class='grid'><tr><th>Limit</th><th>Cycles left</th></tr>{body}</table>")
    for key in ("assumption",):
        if left.get(key):
            out.append(f"<p class='small'>{_e(left[key])}</p>")
    return "".join(out)


def _dvh_from_mask(dose: Volume, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    d = np.asarray(dose.array, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if d.size == 0:
        return None
    x = np.linspace(0.0, float(d.max()) * 1.02 + 1e-12, 200)
    s = np.sort(d)
    y = 1.0 - np.searchsorted(s, x, side="left") / s.size
    return x, y


def _dvh_plot(summary: Mapping[str, Any], dose: Volume | None, vois: Mapping[str, np.ndarray]) -> str:
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    entries = _voi_rows(summary)
    names = list(dict.fromkeys([*entries, *vois]))
    for name in names:
        dvh = _get(entries.get(name, {}), "dvh")
        x = (
            np.asarray(_get(dvh, "dose_gy", default=[]) or [], dtype=float)
            if isinstance(dvh, Mapping)
            else np.array([])
        )
        y = (
            np.asarray(_get(dvh, "volume_fraction", default=[]) or [], dtype=float)
            if isinstance(dvh, Mapping)
            else np.array([])
        )
        if x.size >= 2 and x.size == y.size:
            curves.append((name, x, y))
        elif dose is not None and name in vois and np.shape(vois[name]) == tuple(dose.shape):
            c = _dvh_from_mask(dose, vois[name])
            if c is not None:
                curves.append((name, *c))
    if not curves:
        return ""
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    for name, x, y in curves:
        ax.plot(x, 100 * y, label=_tex_safe(name), lw=1.6)
    ax.set_xlabel("Absorbed dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(curves) > 6 else 1)
    ax.set_title("Cumulative dose–volume histograms")
    return f"<section><h2>Dose–volume histograms</h2><figure>{_png(fig, 'DVH of all VOIs')}</figure></section>"


def _ta_plot(name: str, e: Mapping[str, Any]) -> str:
    ta = e.get("time_activity")
    if not isinstance(ta, Mapping):
        return ""
    t = _first(ta, "times_h")
    a = _first(ta, "activity_mbq")
    if t is None and ta.get("times_s") is not None:
        t = [v / 3600.0 if _f(v) is not None else None for v in ta["times_s"]]
    if a is None and ta.get("activities_bq") is not None:
        a = [v / 1e6 if _f(v) is not None else None for v in ta["activities_bq"]]
    curve = ta.get("curve") if isinstance(ta.get("curve"), Mapping) else {}
    ct, ca = curve.get("times_h"), curve.get("activity_mbq")
    has_pts = isinstance(t, list) and isinstance(a, list) and len(t) == len(a) and len(t) > 0
    has_curve = isinstance(ct, list) and isinstance(ca, list) and len(ct) == len(ca) and len(ct) > 1
    if not (has_pts or has_curve):
        return ""
    model = ta.get("model") or e.get("model")
    tia = _f(ta.get("tia_bqs")) or _f(e.get("tia_bqs"))
    fig = _figure(4.6, 3.0)
    ax = fig.add_subplot()
    if has_curve:
        ax.plot(
            np.asarray(ct, dtype=float),
            np.asarray(ca, dtype=float),
            "-",
            color="#1f5fa0",
            lw=1.5,
            label=_tex_safe(f"fit: {model}" if model else "fit"),
        )
    if has_pts:
        ax.plot(np.asarray(t, dtype=float), np.asarray(a, dtype=float), "o", color="#c0392b", ms=5, label="measured")
    ax.set_xlabel("Time after injection (h)")
    ax.set_ylabel("Activity (MBq)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_tex_safe(name), fontsize=10)
    cap = [
        f"<b>{_e(name)}</b>",
        f"model {_e(model)}" if model else "",
        f"TIA {_num(tia / 3.6e9, 1)} MBq·h ({_sci(tia)} Bq·s)" if tia else "",
    ]
    r2 = _f(ta.get("r2"))
    if r2 is not None:
        cap.append(f"R² {r2:.3f}")
    if ta.get("message"):
        cap.append(_e(ta["message"]))
    return f"<figure class='ta'>{_png(fig, f'time-activity curve {name}')}<figcaption>{' · '.join(c for c in cap if c)}</figcaption></figure>"


def _ta_section(summary: Mapping[str, Any]) -> str:
    figs = [_ta_plot(name, e) for name, e in _voi_rows(summary).items()]
    figs = [f for f in figs if f]
    if not figs:
        return ""
    fit = _get(summary, "methods", "fit")
    note = f"<p class='small'>Fit: {_e(fit)}</p>" if fit else ""
    return f"<section><h2>Time–activity curves</h2>{note}<div class='tagrid'>{''.join(figs)}</div></section>"


def _display_slices(
    vol_arr: np.ndarray, affine: np.ndarray, plane: str, index: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A 2-D slice in radiological display (patient right on the left; superior up) and its extent (mm)."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)  # (di, dj, dk)
    if plane == "axial":
        img = vol_arr[index]  # rows j, cols i
        if affine[0, 0] < 0:
            img = img[:, ::-1]
        if affine[1, 1] < 0:
            img = img[::-1, :]
        extent = (0, img.shape[1] * sp[0], img.shape[0] * sp[1], 0)
    else:  # coronal: rows k (superior up), cols i
        img = vol_arr[:, index, :]
        if affine[0, 0] < 0:
            img = img[:, ::-1]
        if affine[2, 2] > 0:  # k towards +z (superior): put the last slice on top
            img = img[::-1, :]
        extent = (0, img.shape[1] * sp[0], img.shape[0] * sp[2], 0)
    return img, extent


def _overlay_figure(
    title: str,
    dose: Volume,
    ct_arr: np.ndarray | None,
    masks: Mapping[str, np.ndarray],
    centre_kji: tuple[int, int, int],
) -> str:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    d = np.asarray(dose.array, dtype=float)
    k, j, _ = centre_kji
    panels = [("axial", k), ("coronal", j)]
    vmax = 0.0
    for plane, idx in panels:
        img, _ = _display_slices(d, dose.affine, plane, idx)
        vmax = max(vmax, float(np.nanmax(img)) if img.size else 0.0)
    vmax = vmax if vmax > 0 else 1.0
    norm = Normalize(0.0, vmax)
    cmap = colormaps["turbo"]
    fig = _figure(8.0, 3.9)
    axes = fig.subplots(1, 2)
    im = None
    for ax, (plane, idx) in zip(axes, panels):
        dimg, extent = _display_slices(d, dose.affine, plane, idx)
        if ct_arr is not None:
            cimg, _ = _display_slices(ct_arr, dose.affine, plane, idx)
            ax.imshow(cimg, cmap="gray", vmin=-160, vmax=240, extent=extent, interpolation="bilinear")
            wash = np.ma.masked_less(dimg, 0.05 * vmax)
            im = ax.imshow(wash, cmap=cmap, norm=norm, alpha=0.55, extent=extent, interpolation="bilinear")
        else:
            ax.set_facecolor("black")
            im = ax.imshow(dimg, cmap=cmap, norm=norm, extent=extent, interpolation="bilinear")
        for m in masks.values():
            mimg, _ = _display_slices(np.asarray(m, dtype=float), dose.affine, plane, idx)
            if mimg.any():
                ax.contour(mimg, levels=[0.5], colors=["white"], linewidths=0.8, extent=extent, origin="upper")
        ax.set_title(f"{plane} (slice {idx + 1})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
        ax.text(0.97, 0.5, "L", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85)
    cb.set_label("Absorbed dose (Gy)")
    fig.suptitle(_tex_safe(title), fontsize=10)
    return f"<figure>{_png(fig, title)}</figure>"


def _centre(mask: np.ndarray, dose_arr: np.ndarray | None = None) -> tuple[int, int, int] | None:
    idx = np.argwhere(np.asarray(mask, dtype=bool))
    if idx.size == 0:
        return None
    c = np.rint(idx.mean(axis=0)).astype(int)
    if not mask[tuple(c)] and dose_arr is not None:  # non-convex: use the hottest voxel instead
        vals = dose_arr[tuple(idx.T)]
        c = idx[int(np.argmax(vals))]
    return int(c[0]), int(c[1]), int(c[2])


def _overlays(
    summary: Mapping[str, Any], dose: Volume, ct: Volume | None, vois: Mapping[str, np.ndarray], notes: list[str]
) -> str:
    d = np.asarray(dose.array, dtype=float)
    masks = {n: np.asarray(m, dtype=bool) for n, m in vois.items() if np.shape(m) == d.shape}
    for n, m in vois.items():
        if np.shape(m) != d.shape:
            notes.append(f"VOI {_e(n)} mask has shape {_e(np.shape(m))}, not the dose grid's {_e(d.shape)}: not drawn")
    ct_arr = None
    if ct is not None:
        ct_on = ct if ct.grid.same_as(dose.grid) else resample(ct, dose.grid, order=1, fill=-1000.0)
        ct_arr = np.asarray(ct_on.array, dtype=float)
    entries = _voi_rows(summary)
    roles = {n: _role(n, entries.get(n, {})) for n in masks}
    figs = []
    kid = [n for n, r in roles.items() if r == "kidney"]
    if kid:
        union = np.logical_or.reduce([masks[n] for n in kid])
        c = _centre(union, d)
        if c is not None:
            figs.append(_overlay_figure("Kidneys: " + ", ".join(kid), dose, ct_arr, {n: masks[n] for n in kid}, c))
    for n, r in roles.items():
        if r == "tumour":
            c = _centre(masks[n], d)
            if c is not None:
                figs.append(_overlay_figure(f"Tumour: {n}", dose, ct_arr, {n: masks[n]}, c))
    if not figs:  # no kidney or tumour: one view through the dose maximum
        c = np.unravel_index(int(np.argmax(d)), d.shape) if d.size else None
        if c is not None:
            figs.append(_overlay_figure("Through the dose maximum", dose, ct_arr, masks, tuple(int(v) for v in c)))
    base = "grey-scale CT (window −160…240 HU)" if ct_arr is not None else "the dose alone (no CT given)"
    return (
        f"<section class='pb'><h2>Dose distribution</h2><p class='small'>Colour wash of the absorbed dose over {base}; "
        "white lines: VOI outlines; radiological convention (patient right on the left), superior up. "
        "Colour scales are per figure.</p>" + "".join(figs) + "</section>"
    )


def _timepoints(summary: Mapping[str, Any]) -> str:
    tps = [tp for tp in summary.get("timepoints") or [] if isinstance(tp, Mapping)]
    if not tps:
        return ""
    rows = []
    for i, tp in enumerate(tps, start=1):
        reg = tp.get("registration") if isinstance(tp.get("registration"), Mapping) else {}
        q = str(reg.get("quality", "")) if reg else ""
        tr = reg.get("translation_mm") if reg else None
        rot = reg.get("rotation_deg") if reg else None
        rows.append(
            f"<tr class='{'over' if q.lower() == 'poor' else ''}'><td>{i}</td><td>{_num(tp.get('hours'), 1)}</td>"
            f"<td>{_e(tp.get('acquisition_datetime'))}</td><td>{_e(q) if q else _DASH}</td>"
            f"<td>{', '.join(_num(v, 1) for v in tr) if isinstance(tr, (list, tuple)) else _DASH}</td>"
            f"<td>{', '.join(_num(v, 1) for v in rot) if isinstance(rot, (list, tuple)) else _DASH}</td>"
            f"<td class='small'>{_e(reg.get('message')) if reg and reg.get('message') else ''}</td></tr>"
        )
    return (
        "<section><h2>Imaging time points</h2><table class='grid'><tr><th>#</th><th>Hours p.i.</th><th>Acquisition</th>"
        "<th>Registration</th><th>Translation mm</th><th>Rotation °</th><th>Note</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _marrow(summary: Mapping[str, Any]) -> str:
    m = summary.get("marrow")
    if not isinstance(m, Mapping) or not any(v for v in m.values()):
        return ""
    return f"<section><h2>Red marrow</h2>{_kv_table({k: v for k, v in m.items() if v})}</section>"


def _provenance(summary: Mapping[str, Any]) -> str:
    parts = ["<section class='prov pb'><h2>Methods and provenance</h2>"]
    methods = summary.get("methods")
    if isinstance(methods, Mapping) and methods:
        parts.append("<h3>Methods</h3>" + _kv_table(methods))
    elif methods:
        parts.append(f"<p>{_e(methods)}</p>")
    prov = summary.get("provenance")
    if isinstance(prov, Mapping) and prov:
        order = ["software", "kernel_id", "nuclide", "calibration", "inputs", "created_utc"]
        first = {k: prov[k] for k in order if k in prov}
        rest = {k: v for k, v in prov.items() if k not in first and k != "spec"}
        parts.append("<h3>Provenance</h3>" + _kv_table({**first, **rest}))
        if "spec" in prov:
            parts.append(
                "<details><summary>Job specification</summary>" + _kv_table({"spec": prov["spec"]}) + "</details>"
            )
    uids = []
    for i, tp in enumerate(summary.get("timepoints") or [], start=1):
        if isinstance(tp, Mapping):
            for k in ("spect_series_uid", "ct_series_uid"):
                if tp.get(k):
                    uids.append(
                        f"<tr><td>time point {i}</td><td>{_e(k.split('_')[0].upper())}</td><td><code>{_e(tp[k])}</code></td></tr>"
                    )
    if uids:
        parts.append(
            "<h3>Input series</h3><table class='grid'><tr><th></th><th>Series</th><th>Series Instance UID</th></tr>"
            + "".join(uids)
            + "</table>"
        )
    schema = summary.get("schema")
    parts.append(f"<p class='small'>Summary schema: {_e(schema)}</p>" if schema else "")
    parts.append("</section>")
    return "".join(parts)


_CSS = """
:root { --warn:#b00020; --amber:#b36b00; --ink:#1b1b1b; --muted:#666; --line:#ccc; }
* { box-sizing: border-box; }
body { font: 10.5pt/1.4 "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--ink); margin: 1.5em auto; max-width: 60em; padding: 0 1em; }
h1 { font-size: 17pt; margin: 0 0 .2em; } h2 { font-size: 13pt; border-bottom: 2px solid #333; margin-top: 1.4em; }
h3 { font-size: 11pt; margin: 1em 0 .3em; }
.sub, .small { color: var(--muted); font-size: 8.5pt; }
.hdr { display: grid; grid-template-columns: repeat(auto-fill, minmax(13em, 1fr)); gap: .2em 1em; border: 1px solid var(--line); padding: .5em .8em; background: #f6f6f6; }
.hdr .lbl { display: block; color: var(--muted); font-size: 8pt; text-transform: uppercase; letter-spacing: .04em; }
.hdr .val { font-weight: bold; }
table { border-collapse: collapse; margin: .4em 0; }
table.grid { width: 100%; font-size: 9pt; }
table.grid th, table.grid td { border: 1px solid var(--line); padding: .2em .4em; text-align: right; vertical-align: top; }
table.grid th { background: #eee; text-align: center; }
table.grid td.name, table.grid td:first-child { text-align: left; }
td.b { font-weight: bold; }
tr.close td, td.close { background: #fff1d6; } tr.close td.flag, td.close { color: var(--amber); font-weight: bold; }
tr.over td, td.over { background: #fde0e0; } tr.over td.flag, td.over { color: var(--warn); font-weight: bold; }
tr.total td { font-weight: bold; border-top: 2px solid #333; } tr.limit td { color: var(--muted); }
table.kv { font-size: 8.5pt; width: 100%; } table.kv th { text-align: left; vertical-align: top; padding: .1em .6em .1em 0; color: #333; width: 14em; font-weight: normal; }
table.kv td { padding: .1em 0; word-break: break-word; } table.kv table.kv th { width: 11em; }
section.warn { border: 3px solid var(--warn); background: #fff5f5; padding: .3em 1em .6em; margin: 1em 0; }
section.warn h2 { color: var(--warn); border: none; margin: .3em 0; } section.warn li { margin: .25em 0; }
section.ok { color: var(--muted); }
p.cycles { font-size: 12pt; }
figure { margin: .6em 0; text-align: center; page-break-inside: avoid; break-inside: avoid; }
figure img { max-width: 100%; height: auto; }
figcaption { font-size: 8.5pt; color: #333; }
.tagrid { display: grid; grid-template-columns: repeat(auto-fill, minmax(22em, 1fr)); gap: .5em; }
code { font-size: 8pt; } details summary { cursor: pointer; color: var(--muted); font-size: 9pt; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { margin: 0; max-width: none; font-size: 9.5pt; }
  section, table, figure { page-break-inside: avoid; break-inside: avoid; }
  section.pb { page-break-before: always; break-before: page; }
  section.warn { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  tr.close td, tr.over td, td.close, td.over, .hdr { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  details { display: block; } details > * { display: block; }
}
"""


def _safe(fn: Callable[[], str], title: str, errors: list[str]) -> str:
    """Run a section renderer; a failure becomes a visible note, not a missing report."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the rest of the report must still be written
        errors.append(f"The section “{_e(title)}” could not be drawn ({_e(type(exc).__name__)}: {_e(exc)}).")
        return f"<section><h2>{_e(title)}</h2><p class='small'>Not available — see warnings.</p></section>"


def render_report(
    summary: Mapping[str, Any],
    *,
    dose: Volume,
    ct: Volume | None,
    vois: Mapping[str, np.ndarray],
    path: str | Path,
) -> Path:
    """Write the HTML report of one cycle to ``path`` and return it.

    ``summary`` is a ``voxeldose.summary/1`` dict (keys may be missing); ``dose`` the absorbed-dose
    map (Gy); ``ct`` the CT (HU) on any grid of the same Frame of Reference (resampled onto the
    dose grid for display), or None; ``vois`` boolean masks on the dose grid, by VOI name (the
    names of ``summary["vois"]``; their role decides which overlays are drawn).
    """
    summary = summary if isinstance(summary, Mapping) else {}
    path = Path(path)
    limits = _limits(summary)
    errors: list[str] = []
    flags: list[str] = []
    notes: list[str] = []
    body_parts = [
        _safe(lambda: _dose_table(summary, limits, flags), "Absorbed dose per VOI", errors),
        _safe(lambda: _cumulative(summary, limits, flags), "Cumulative dose across cycles", errors),
        _safe(lambda: _marrow(summary), "Red marrow", errors),
        _safe(lambda: _timepoints(summary), "Imaging time points", errors),
        _safe(lambda: _dvh_plot(summary, dose, vois), "Dose–volume histograms", errors),
        _safe(lambda: _ta_section(summary), "Time–activity curves", errors),
        _safe(lambda: _overlays(summary, dose, ct, vois, notes), "Dose distribution", errors),
        _safe(lambda: _provenance(summary), "Methods and provenance", errors),
    ]
    header = _safe(lambda: _header(summary), "Header", errors)
    warnings = _warnings(summary, [*flags, *notes, *errors])
    pid = _get(summary, "patient", "id")
    cyc = _get(summary, "cycle", "number")
    title = "Dose report" + (f" {pid}" if pid else "") + (f" cycle {cyc}" if cyc is not None else "")
    doc = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"{header}{warnings}{''.join(body_parts)}"
        "<footer class='small'><p>voxeldose — research software; results must be reviewed by a qualified "
        "medical physicist before clinical use.</p></footer></body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------- console table
def console_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table for the terminal: VOI, mean Gy, Gy/GBq, D2, BED, and against the limit."""
    summary = summary if isinstance(summary, Mapping) else {}
    limits = _limits(summary)
    head = ["VOI", "role", "mean Gy", "Gy/GBq", "D2 Gy", "BED Gy", "vs limit"]
    rows: list[list[str]] = []

    def n(x: Any, nd: int = 2) -> str:
        v = _f(x)
        return "-" if v is None else f"{v:.{nd}f}"

    for name, e in _voi_rows(summary).items():
        role = _role(name, e)
        lim = limits.get(role)
        mean = _f(e.get("mean_gy"))
        if lim and mean is not None:
            flag = {"over": "  OVER", "close": "  CLOSE"}.get(_flag(mean, lim), "")
            vs = f"{100 * mean / lim:.0f}% of {lim:g} Gy{flag}"
        else:
            vs = ""
        rows.append([name, role, n(mean), n(e.get("gy_per_gbq"), 3), n(_first(e, "d2_gy")), n(e.get("bed_gy")), vs])
    if not rows:
        return "no VOI results"
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {2, 3, 4, 5}

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    left = _get(summary, "cumulative", "cycles_left")
    if isinstance(left, Mapping) and left.get("message"):
        out.append("")
        out.append(f"cycles left: {left['message']}")
    return "\n".join(out)
