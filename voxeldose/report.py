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

The summary is a :class:`~voxeldose.summary.Summary` (``voxeldose.summary/3``): every part is read as
an attribute of the model.  What the model leaves optional and absent (a VOI without a fit, no cycles
left, a number that could not be computed) is left out (or shown as "—"), never guessed; a section that
cannot be drawn says so in the report instead of failing the whole file.  All text from the summary is
escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from .geometry import Volume, resample
from .summary import CyclesLeft, Registration, Summary, TimeActivity, ValueU, VoiMetrics

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


def _role(name: str, entry: VoiMetrics | None) -> str:
    """The VOI's role from the summary; for a mask without a summary entry, guessed from its name."""
    if entry is not None:
        return entry.role
    low = name.lower()
    if "kidney" in low or "renal" in low:
        return "kidney"
    if "marrow" in low:
        return "marrow"
    if low.startswith(("tumo", "lesion", "gtv", "met")):
        return "tumour"
    return "organ"


def _limits(summary: Summary) -> dict[str, float]:
    """Limits by role (Gy): the summary's (``cumulative.limits``) over the defaults."""
    out = dict(DEFAULT_LIMITS_GY)
    lim = summary.cumulative.limits
    for role, v in (("kidney", _f(lim.kidney_gy)), ("marrow", _f(lim.marrow_gy))):
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


def _png(fig: Figure, alt: str) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure(w: float, h: float) -> Figure:
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
def _header(summary: Summary) -> str:
    pat, cyc = summary.patient, summary.cycle
    inj = cyc.injection
    act = _f(inj.activity_MBq)
    try:
        when_txt = datetime.fromisoformat(inj.datetime).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        when_txt = inj.datetime
    created = summary.provenance.created_utc
    items = [
        ("Patient ID", _e(pat.id)),
        ("Patient name", _e(pat.name.replace("^", " ") if pat.name else None)),
        ("Cycle", _e(cyc.number)),
        ("Injected activity", _DASH if act is None else f"{_num(act, 0)} MBq ({_num(act / 1000, 3)} GBq)"),
        ("Injection", _e(when_txt)),
        ("Nuclide", _e(inj.nuclide)),
        ("Radiopharmaceutical", _e(inj.radiopharmaceutical)),
    ]
    cells = "".join(f"<div><span class='lbl'>{k}</span><span class='val'>{v}</span></div>" for k, v in items)
    sub = f"<p class='sub'>Report created {_e(created)}</p>" if created else ""
    return f"<header><h1>Absorbed-dose report — molecular radiotherapy</h1>{sub}<div class='hdr'>{cells}</div></header>"


def _angles(values: Sequence[float] | None) -> str:
    return ", ".join(_num(v, 1) for v in values) if values else _DASH


def _warnings(summary: Summary, extra: Iterable[str]) -> str:
    msgs = [_e(w) for w in summary.warnings]
    for i, tp in enumerate(summary.timepoints):
        reg = tp.registration
        if reg.quality == "poor":
            hours = _f(tp.hours)
            msgs.append(
                f"<b>Poor registration</b> of time point {i + 1}"
                + (f" ({_num(hours, 1)} h)" if hours is not None else "")
                + f": {_e(reg.message or 'check the alignment')} "
                + f"<span class='small'>(translation {_angles(reg.translation_mm)} mm; "
                f"rotation {_angles(reg.rotation_deg)}°)</span>"
            )
    msgs.extend(extra)
    if not msgs:
        return "<section class='ok'><p>No warnings.</p></section>"
    lis = "".join(f"<li>{m}</li>" for m in msgs)
    return f"<section class='warn' id='warnings'><h2>⚠ Warnings ({len(msgs)})</h2><ul>{lis}</ul></section>"


def _tia_bqs(e: VoiMetrics) -> float | None:
    """The VOI fit's TIA (Bq·s): the entry's, else its time-activity record's."""
    return _f(e.tia_bqs) or (_f(e.time_activity.tia_bqs) if e.time_activity is not None else None)


def _dose_table(summary: Summary, limits: Mapping[str, float], flags_out: list[str]) -> str:
    if not summary.vois:
        return "<section><h2>Absorbed dose per VOI</h2><p>No VOI results in the summary.</p></section>"
    pvc = summary.methods.pvc
    pvc_on = pvc.method != "none"
    mean_head = f"Mean<br>Gy ({_e(pvc.method)})</th><th>Uncorrected<br>mean Gy" if pvc_on else "Mean<br>Gy"
    head = (
        f"<tr><th>VOI</th><th>Role</th><th>Volume<br>ml</th><th>Mass<br>g</th><th>{mean_head}</th>"
        "<th>D2<br>Gy</th><th>D50<br>Gy</th><th>D98<br>Gy</th><th>Max<br>Gy</th><th>Gy/GBq</th>"
        "<th>TIA<br>MBq·h</th><th>BED<br>Gy</th><th>EQD2<br>Gy</th><th>Limit</th></tr>"
    )
    rows = []
    for name, e in summary.vois.items():
        role = e.role
        limit = limits.get(role)
        mean = _f(e.mean_gy)
        flag = _flag(mean, limit)
        if limit and mean is not None:
            vs = f"{_num(100 * mean / limit, 0)} % of {_num(limit, 0)} Gy"
            if flag == "over":
                flags_out.append(
                    f"<b>{_e(name)}</b>: mean {_num(mean)} Gy in this cycle reaches the {_num(limit, 0)} Gy limit"
                )
        else:
            vs = ""
        tia = _tia_bqs(e)
        uncorrected = ""
        if pvc_on:
            uncorrected = f"<td>{_DASH if e.pvc is None else _num(e.pvc.uncorrected_mean_gy)}</td>"
        rows.append(
            f"<tr class='{flag}'><td class='name'>{_e(name)}</td><td>{_e(role)}</td>"
            f"<td>{_num(e.volume_ml, 1)}</td><td>{_num(e.mass_g, 1)}</td>"
            f"<td class='b'>{_num(mean)}</td>{uncorrected}<td>{_num(e.D2_gy)}</td><td>{_num(e.D50_gy)}</td>"
            f"<td>{_num(e.D98_gy)}</td><td>{_num(e.max_gy)}</td><td>{_num(e.gy_per_gbq, 3)}</td>"
            f"<td>{_DASH if tia is None else _num(tia / 3.6e9, 1)}</td>"
            f"<td>{_num(e.bed_gy)}</td><td>{_num(e.eqd2_gy)}</td><td class='flag'>{vs}</td></tr>"
        )
    note = (
        f"<p class='small'>Limits are cumulative over all cycles (kidneys {_num(limits.get('kidney'), 0)} Gy, "
        f"red marrow {_num(limits.get('marrow'), 0)} Gy); rows turn amber from {int(CLOSE_FRACTION * 100)} % "
        "of the limit within this cycle and red at the limit. Dn: minimum dose to the hottest n % of the VOI. "
        "TIA: time-integrated activity.</p>"
    )
    if pvc_on:
        camera = f" with camera profile {_e(pvc.camera_profile)}" if pvc.camera_profile else ""
        note += (
            f"<p class='small' id='pvc'>Mean: partial-volume corrected ({_e(pvc.method)}{camera}): "
            f"{_e(pvc.description)}. {_e(pvc.dose_correction or '')}. Limits, BED and cycles use the corrected "
            "mean.</p>"
        )
    return f"<section><h2>Absorbed dose per VOI — this cycle</h2><table class='grid'>{head}{''.join(rows)}</table>{note}</section>"


def _cumulative(summary: Summary, limits: Mapping[str, float], flags_out: list[str]) -> str:
    cum = summary.cumulative
    parts = ["<section><h2>Cumulative dose across cycles</h2>"]
    if cum.cycles:
        tot = {"kidney": 0.0, "kidney_bed": 0.0, "marrow": 0.0}
        seen = {k: False for k in tot}
        rows = []
        for c in sorted(cum.cycles, key=lambda c: c.number):
            for k, v in (("kidney", _f(c.kidney_gy)), ("kidney_bed", _f(c.kidney_bed_gy)), ("marrow", _f(c.marrow_gy))):
                if v is not None:
                    tot[k] += v
                    seen[k] = True
            rows.append(
                f"<tr><td>{_e(c.number)}</td><td>{_e(c.date)}</td><td>{_num(c.activity_MBq, 0)}</td>"
                f"<td>{_num(c.kidney_gy)}</td><td>{_num(c.kidney_bed_gy)}</td><td>{_num(c.marrow_gy)}</td></tr>"
            )
        kflag = _flag(tot["kidney"] if seen["kidney"] else None, limits.get("kidney"))
        mflag = _flag(tot["marrow"] if seen["marrow"] else None, limits.get("marrow"))
        for flag, organ in ((kflag, "kidney"), (mflag, "marrow")):
            if flag == "over":
                flags_out.append(
                    f"Cumulative {organ} dose {_num(tot[organ])} Gy reaches the {_num(limits.get(organ), 0)} Gy limit"
                )
            elif flag == "close":
                flags_out.append(
                    f"Cumulative {organ} dose {_num(tot[organ])} Gy is within {int(100 - CLOSE_FRACTION * 100)} % of the {_num(limits.get(organ), 0)} Gy limit"
                )
        bed_lim = _f(cum.limits.kidney_bed_gy)
        total = (
            f"<tr class='total'><td colspan='3'>Total</td>"
            f"<td class='{kflag}'>{_num(tot['kidney']) if seen['kidney'] else _DASH}</td>"
            f"<td class='{_flag(tot['kidney_bed'] if seen['kidney_bed'] else None, bed_lim)}'>"
            f"{_num(tot['kidney_bed']) if seen['kidney_bed'] else _DASH}</td>"
            f"<td class='{mflag}'>{_num(tot['marrow']) if seen['marrow'] else _DASH}</td></tr>"
            f"<tr class='limit'><td colspan='3'>Limit</td><td>{_num(limits.get('kidney'), 1)}</td>"
            f"<td>{_num(bed_lim, 1)}</td><td>{_num(limits.get('marrow'), 1)}</td></tr>"
        )
        parts.append(
            "<table class='grid'><tr><th>Cycle</th><th>Date</th><th>Activity MBq</th><th>Kidney Gy</th>"
            f"<th>Kidney BED Gy</th><th>Marrow Gy</th></tr>{''.join(rows)}{total}</table>"
        )
    if cum.cycles_left is not None:
        parts.append(_cycles_left(cum.cycles_left))
    for n in cum.notes:
        parts.append(f"<p class='small'>{_e(n)}</p>")
    src = cum.limits.sources
    if src:
        parts.append(
            "<p class='small'>Limit sources: " + "; ".join(f"{_e(k)}: {_e(v)}" for k, v in src.items()) + "</p>"
        )
    parts.append("</section>")
    return "".join(parts)


def _cycles_left(left: CyclesLeft) -> str:
    """Further cycles: the count, the binding limit and one row per limit."""
    out = ["<h3>Further cycles</h3>"]
    n, binding = left.cycles_left, left.binding_limit
    lead = f"<b>{_e(n)}</b> further cycle(s)" if n is not None else ""
    b = f" — binding limit: <b>{_e(binding)}</b>" if binding else ""
    out.append(f"<p class='cycles'>{lead}{b}</p>")
    if left.message:
        out.append(f"<p>{_e(left.message)}</p>")
    if left.limits:
        body = "".join(
            f"<tr class='{'over' if r.exceeded or r.cycles_left == 0 else ''}'><td>{_e(r.limit)}</td>"
            f"<td>{_num(r.limit_gy, 1)}</td><td>{_num(r.current_gy)}</td>"
            f"<td>{_num(r.per_cycle_gy)}</td><td>{_e(r.cycles_left)}</td><td class='small'>{_e(r.message)}</td></tr>"
            for r in left.limits
        )
        out.append(
            "<table class='grid'><tr><th>Limit</th><th>Limit Gy</th><th>So far Gy</th><th>Per cycle Gy</th>"
            f"<th>Cycles left</th><th>Note</th></tr>{body}</table>"
        )
    if left.assumption:
        out.append(f"<p class='small'>{_e(left.assumption)}</p>")
    return "".join(out)


def _dvh_from_mask(dose: Volume, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    d = np.asarray(dose.array, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if d.size == 0:
        return None
    x = np.linspace(0.0, float(d.max()) * 1.02 + 1e-12, 200)
    s = np.sort(d)
    y = 1.0 - np.searchsorted(s, x, side="left") / s.size
    return x, y


def _dvh_plot(summary: Summary, dose: Volume | None, vois: Mapping[str, np.ndarray]) -> str:
    curves: list[tuple[str, np.ndarray, np.ndarray]] = []
    entries = summary.vois
    for name in dict.fromkeys([*entries, *vois]):
        e = entries.get(name)
        x = np.asarray(e.dvh.dose_gy if e is not None else [], dtype=float)
        y = np.asarray(e.dvh.volume_fraction if e is not None else [], dtype=float)
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
    banded = False
    for name, x, y in curves:
        (line,) = ax.plot(x, 100 * y, label=_tex_safe(name), lw=1.6)
        e = entries.get(name)
        band = e.dvh_band if e is not None else None
        if band is not None and len(band.dose_gy) >= 2:
            bx = np.asarray(band.dose_gy, dtype=float)
            lo = 100 * np.asarray(band.volume_fraction_lower, dtype=float)
            hi = 100 * np.asarray(band.volume_fraction_upper, dtype=float)
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
            banded = True
    ax.set_xlabel("Absorbed dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(curves) > 6 else 1)
    ax.set_title("Cumulative dose–volume histograms")
    note = ""
    if banded:
        k = next(e.dvh_band.coverage_factor for e in entries.values() if e.dvh_band is not None)
        note = (
            f"<p class='small'>Shaded: per-voxel band, the DVHs of the dose map with every voxel at its dose − {k:g}u "
            f"and + {k:g}u (u: the voxel's standard uncertainty). It is not a confidence band of the DVH: voxel "
            "errors are partly independent, so the DVH itself varies less than the band.</p>"
        )
    return f"<section><h2>Dose–volume histograms</h2><figure>{_png(fig, 'DVH of all VOIs')}</figure>{note}</section>"


def _measured_points(ta: TimeActivity) -> tuple[list[float | None] | None, list[float | None] | None]:
    """The measured (hours, MBq) of a time-activity record: as given, or from its seconds and Bq."""
    t: list[float | None] | None = list(ta.times_h) if ta.times_h is not None else None
    a: list[float | None] | None = list(ta.activity_mbq) if ta.activity_mbq is not None else None
    if t is None and ta.times_s is not None:
        t = [v / 3600.0 if _f(v) is not None else None for v in ta.times_s]
    if a is None and ta.activities_bq is not None:
        a = [v / 1e6 if _f(v) is not None else None for v in ta.activities_bq]
    return t, a


def _ta_plot(name: str, e: VoiMetrics) -> str:
    ta = e.time_activity
    if ta is None:
        return ""
    t, a = _measured_points(ta)
    ct = ta.curve.times_h if ta.curve is not None else None
    ca = ta.curve.activity_mbq if ta.curve is not None else None
    has_pts = t is not None and a is not None and len(t) == len(a) and len(t) > 0
    has_curve = ct is not None and ca is not None and len(ct) == len(ca) and len(ct) > 1
    if not (has_pts or has_curve):
        return ""
    model = ta.model
    tia = _tia_bqs(e)
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
    r2 = _f(ta.r2)
    if r2 is not None:
        cap.append(f"R² {r2:.3f}")
    if ta.message:
        cap.append(_e(ta.message))
    return f"<figure class='ta'>{_png(fig, f'time-activity curve {name}')}<figcaption>{' · '.join(c for c in cap if c)}</figcaption></figure>"


def _ta_section(summary: Summary) -> str:
    figs = [_ta_plot(name, e) for name, e in summary.vois.items()]
    figs = [f for f in figs if f]
    if not figs:
        return ""
    fit = summary.methods.fit
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
    uncertainty: Volume | None = None,
) -> str:
    k, j, _ = centre_kji
    panels = [("axial", k), ("coronal", j)]
    rows: list[tuple[np.ndarray, str, str]] = [(np.asarray(dose.array, dtype=float), "turbo", "Absorbed dose (Gy)")]
    if uncertainty is not None and tuple(uncertainty.shape) == tuple(dose.shape):
        rows.append((np.asarray(uncertainty.array, dtype=float), "magma", "Dose uncertainty u, k = 1 (Gy)"))
    fig = _figure(8.0, 3.9 * len(rows))
    grid = fig.subplots(len(rows), 2, squeeze=False)
    for axes, (d, cmap_name, label) in zip(grid, rows):
        _overlay_row(fig, list(axes), d, dose.affine, ct_arr, masks, panels, colormaps[cmap_name], label)
    fig.suptitle(_tex_safe(title), fontsize=10)
    return f"<figure>{_png(fig, title)}</figure>"


def _overlay_row(
    fig: Figure,
    axes: list[Axes],
    d: np.ndarray,
    affine: np.ndarray,
    ct_arr: np.ndarray | None,
    masks: Mapping[str, np.ndarray],
    panels: list[tuple[str, int]],
    cmap: Colormap,
    label: str,
) -> None:
    """One row of an overlay figure: the map ``d`` on the axial and coronal slices, one colour bar."""
    vmax = 0.0
    for plane, idx in panels:
        img, _ = _display_slices(d, affine, plane, idx)
        vmax = max(vmax, float(np.nanmax(img)) if img.size else 0.0)
    vmax = vmax if vmax > 0 else 1.0
    norm = Normalize(0.0, vmax)
    im = None
    for ax, (plane, idx) in zip(axes, panels):
        dimg, extent = _display_slices(d, affine, plane, idx)
        if ct_arr is not None:
            cimg, _ = _display_slices(ct_arr, affine, plane, idx)
            ax.imshow(cimg, cmap="gray", vmin=-160, vmax=240, extent=extent, interpolation="bilinear")
            wash = np.ma.masked_less(dimg, 0.05 * vmax)
            im = ax.imshow(wash, cmap=cmap, norm=norm, alpha=0.55, extent=extent, interpolation="bilinear")
        else:
            ax.set_facecolor("black")
            im = ax.imshow(dimg, cmap=cmap, norm=norm, extent=extent, interpolation="bilinear")
        for m in masks.values():
            mimg, _ = _display_slices(np.asarray(m, dtype=float), affine, plane, idx)
            if mimg.any():
                ax.contour(mimg, levels=[0.5], colors=["white"], linewidths=0.8, extent=extent, origin="upper")
        ax.set_title(f"{plane} (slice {idx + 1})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
        ax.text(0.97, 0.5, "L", transform=ax.transAxes, color="yellow", fontsize=9, va="center")
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.85)
        cb.set_label(label)


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
    summary: Summary,
    dose: Volume,
    ct: Volume | None,
    vois: Mapping[str, np.ndarray],
    notes: list[str],
    uncertainty: Volume | None = None,
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
    roles = {n: _role(n, summary.vois.get(n)) for n in masks}
    figs = []
    kid = [n for n, r in roles.items() if r == "kidney"]
    if kid:
        union = np.logical_or.reduce([masks[n] for n in kid])
        c = _centre(union, d)
        if c is not None:
            figs.append(
                _overlay_figure("Kidneys: " + ", ".join(kid), dose, ct_arr, {n: masks[n] for n in kid}, c, uncertainty)
            )
    for n, r in roles.items():
        if r == "tumour":
            c = _centre(masks[n], d)
            if c is not None:
                figs.append(_overlay_figure(f"Tumour: {n}", dose, ct_arr, {n: masks[n]}, c, uncertainty))
    if not figs and d.size:  # no kidney or tumour: one view through the dose maximum
        k, j, i = (int(v) for v in np.unravel_index(int(np.argmax(d)), d.shape))
        figs.append(_overlay_figure("Through the dose maximum", dose, ct_arr, masks, (k, j, i), uncertainty))
    base = "grey-scale CT (window −160…240 HU)" if ct_arr is not None else "the dose alone (no CT given)"
    return (
        f"<section class='pb'><h2>Dose distribution</h2><p class='small'>Colour wash of the absorbed dose over {base}; "
        "white lines: VOI outlines; radiological convention (patient right on the left), superior up. "
        "Colour scales are per figure."
        + (
            " Second row: the voxel dose's standard uncertainty u (k = 1, Gy): "
            + _e(summary.methods.dose_uncertainty or "")
            if uncertainty is not None
            else ""
        )
        + "</p>"
        + "".join(figs)
        + "</section>"
    )


def _registration_row(i: int, hours: float, acquired: str, reg: Registration) -> str:
    return (
        f"<tr class='{'over' if reg.quality == 'poor' else ''}'><td>{i}</td><td>{_num(hours, 1)}</td>"
        f"<td>{_e(acquired)}</td><td>{_e(reg.quality)}</td>"
        f"<td>{_angles(reg.translation_mm)}</td><td>{_angles(reg.rotation_deg)}</td>"
        f"<td class='small'>{_e(reg.message) if reg.message else ''}</td></tr>"
    )


def _timepoints(summary: Summary) -> str:
    if not summary.timepoints:
        return ""
    rows = [
        _registration_row(i, tp.hours, tp.acquisition_datetime, tp.registration)
        for i, tp in enumerate(summary.timepoints, start=1)
    ]
    return (
        "<section><h2>Imaging time points</h2><table class='grid'><tr><th>#</th><th>Hours p.i.</th><th>Acquisition</th>"
        "<th>Registration</th><th>Translation mm</th><th>Rotation °</th><th>Note</th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _marrow(summary: Summary) -> str:
    m = summary.marrow
    shown = {
        label: part.model_dump()
        for label, part in (("image_based", m.image_based), ("blood_based", m.blood_based))
        if part is not None
    }
    return f"<section><h2>Red marrow</h2>{_kv_table(shown)}</section>" if shown else ""


def _provenance(summary: Summary) -> str:
    parts = ["<section class='prov pb'><h2>Methods and provenance</h2>"]
    parts.append("<h3>Methods</h3>" + _kv_table(summary.methods.model_dump()))
    p = summary.provenance
    shown: dict[str, Any] = {
        "software": p.software,
        "kernel_id": p.kernel_id,
        "nuclide": p.nuclide.model_dump(),
        "calibration": p.calibration.model_dump(),
        "inputs": p.inputs.model_dump(),
        "created_utc": p.created_utc,
        "timings_s": p.timings_s,
        "total_s": p.total_s,
    }
    parts.append("<h3>Provenance</h3>" + _kv_table(shown))
    parts.append(
        "<details><summary>Job specification</summary>"
        + _kv_table({"spec": p.spec.model_dump(mode="json")})
        + "</details>"
    )
    uids = []
    for i, tp in enumerate(summary.timepoints, start=1):
        for kind, uid in (("SPECT", tp.spect_series_uid), ("CT", tp.ct_series_uid)):
            if uid:
                uids.append(f"<tr><td>time point {i}</td><td>{kind}</td><td><code>{_e(uid)}</code></td></tr>")
    if uids:
        parts.append(
            "<h3>Input series</h3><table class='grid'><tr><th></th><th>Series</th><th>Series Instance UID</th></tr>"
            + "".join(uids)
            + "</table>"
        )
    parts.append(f"<p class='small'>Summary schema: {_e(summary.schema_)}</p>")
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


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{100 * x:.1f} %"


def _pm(v: ValueU | None, k: float, nd: int = 2, scale: float = 1.0) -> str:
    """``value ± U`` with U = k·u (``value ± not stated`` without a u)."""
    if v is None:
        return _DASH
    u = "not stated" if v.u is None else _num(k * v.u / scale, nd)
    return f"{_num(v.value / scale, nd)} ± {u}"


def _uncertainty(summary: Summary) -> str:
    """Each kidney's and tumour's mean dose as ``mean ± U (k = 2)`` with its EANM budget (Gear et al. 2018)."""
    shown = {n: e for n, e in summary.vois.items() if e.uncertainty is not None and e.role in ("kidney", "tumour")}
    if not shown:
        return ""
    parts = ["<section id='uncertainty'><h2>Uncertainty of the kidney and tumour doses (EANM)</h2>"]
    method = ""
    for name, e in shown.items():
        u = e.uncertainty
        assert u is not None  # filtered above
        method = u.method
        k = u.coverage_factor
        iv = u.mean_gy
        interval = "" if iv.lower_95 is None else f" (95 % interval {_num(iv.lower_95)}–{_num(iv.upper_95)} Gy)"
        rows = "".join(
            f"<tr><td>{_e(c.name)}</td><td>{_pct(c.relative_u)}</td><td class='small'>{_e(c.how)}</td></tr>"
            for c in u.components
        )
        bed = f"; BED {_pm(u.bed_gy, k)} Gy" if u.bed_gy is not None else ""
        notes = "".join(f"<li>{_e(n)}</li>" for n in u.notes)
        parts.append(
            f"<h3>{_e(name)}: mean {_pm(iv, k)} Gy (k = {k:g}){interval}</h3>"
            f"<p>TIA {_pm(u.tia_bqs, k, 1, 3.6e9)} MBq·h{bed}; combined relative standard uncertainty of the "
            f"mean dose {_pct(iv.u / abs(iv.value) if iv.u is not None and iv.value else None)}.</p>"
            "<table class='grid'><tr><th>Component</th><th>Relative u</th><th>How</th></tr>"
            f"{rows}</table>" + (f"<ul class='small'>{notes}</ul>" if notes else "")
        )
    parts.append(
        f"<p class='small'>{_e(method)}: standard uncertainties combined "
        "by root-sum-square (independent components), U = k·u.</p></section>"
    )
    return "".join(parts)


def _organ_of(limit: str | None) -> str:
    return "" if limit is None else ("red marrow" if limit.startswith("red marrow") else "kidney")


def _cumulative_uncertainty(summary: Summary) -> str:
    """The cumulative kidney and marrow doses as ``value ± U (k = 2)`` per cycle and in total, and the cycles left at
    the 95 % upper bound, saying which organ and which bound binds (issue 13 part 2)."""
    cum = summary.cumulative
    cu = cum.uncertainty
    if cu is None:
        return ""
    k = cu.coverage_factor

    def pm(value: float | None, u: float | None) -> str:
        if value is None:
            return _DASH
        return f"{_num(value)} ± {'not stated' if u is None else _num(k * u)}"

    rows = "".join(
        f"<tr><td>{_e(c.number)}</td>"
        f"<td>{pm(_f(c.kidney_gy), None if c.kidney_u is None else c.kidney_u.u_gy)}</td>"
        f"<td>{pm(_f(c.marrow_gy), None if c.marrow_u is None else c.marrow_u.u_gy)}</td>"
        f"<td class='small'>{_e(c.kidney_u.source if c.kidney_u is not None else '')}</td></tr>"
        for c in sorted(cum.cycles, key=lambda c: c.number)
    )
    totals = []
    for label, vu in (
        ("kidney absorbed dose", cu.dose_gy.get("kidney")),
        ("kidney BED", cu.bed_gy.get("kidney")),
        ("red-marrow absorbed dose", cu.dose_gy.get("marrow")),
    ):
        if vu is None:
            continue
        iv = "" if vu.lower_95 is None else f" (95 % interval {_num(vu.lower_95)}–{_num(vu.upper_95)} Gy)"
        totals.append(f"<li>cumulative {label}: <b>{_pm(vu, k)} Gy</b> (k = {k:g}){iv}</li>")
    parts = [
        "<section id='cumulative-uncertainty'><h2>Cumulative dose with its uncertainty</h2>",
        "<table class='grid'><tr><th>Cycle</th><th>Kidney Gy ± U</th><th>Marrow Gy ± U</th><th>Kidney u from</th></tr>"
        f"{rows}</table>",
        f"<ul>{''.join(totals)}</ul>",
    ]
    parts += [f"<p class='small'>{_e(n)}</p>" for n in cu.notes]
    left = cum.cycles_left
    if left is not None and left.upper_95 is not None:
        up = left.upper_95
        n_up = "not computed" if up.cycles_left is None else f"<b>{_e(up.cycles_left)}</b> further cycle(s)"
        parts.append(
            "<h3>Further cycles at the 95 % upper bound</h3>"
            f"<p class='cycles' id='cycles-left-upper'>{n_up}"
            + (
                f" — binding: <b>{_e(_organ_of(up.binding_limit))}</b>, {_e(up.binding_limit)}"
                if up.binding_limit
                else ""
            )
            + "</p>"
            f"<p>At the central estimate {_e(left.cycles_left)} further cycle(s), bound by "
            f"{_e(_organ_of(left.binding_limit))} ({_e(left.binding_limit)}); at the 95 % upper bound "
            f"{_e(up.cycles_left)}, bound by {_e(_organ_of(up.binding_limit))} ({_e(up.binding_limit)}).  The "
            f"{'upper' if (up.cycles_left or 0) < (left.cycles_left or 0) else 'central'} figure is the one that "
            "limits the plan.</p>"
        )
        if up.limits:
            body = "".join(
                f"<tr class='{'over' if r.exceeded or r.cycles_left == 0 else ''}'><td>{_e(r.limit)}</td>"
                f"<td>{_num(r.limit_gy, 1)}</td><td>{_num(r.current_gy)}</td><td>{_num(r.per_cycle_gy)}</td>"
                f"<td>{_e(r.cycles_left)}</td></tr>"
                for r in up.limits
            )
            parts.append(
                "<table class='grid'><tr><th>Limit</th><th>Limit Gy</th><th>So far, upper Gy</th>"
                f"<th>Per cycle, upper Gy</th><th>Cycles left</th></tr>{body}</table>"
            )
        parts += [f"<p class='small'>{_e(n)}</p>" for n in up.notes]
        parts.append(f"<p class='small'>{_e(up.assumption)}</p>")
    parts.append(f"<p class='small'>{_e(cu.method)}: {_e(cu.correlation_model)}</p></section>")
    return "".join(parts)


def render_report(
    summary: Summary,
    *,
    dose: Volume,
    ct: Volume | None,
    vois: Mapping[str, np.ndarray],
    path: str | Path,
    dose_uncertainty: Volume | None = None,
) -> Path:
    """Write the HTML report of one cycle to ``path`` and return it.

    ``summary`` is the run's :class:`~voxeldose.summary.Summary`; ``dose`` the absorbed-dose map (Gy);
    ``ct`` the CT (HU) on any grid of the same Frame of Reference (resampled onto the dose grid for
    display), or None; ``vois`` boolean masks on the dose grid, by VOI name (the names of
    ``summary.vois``; their role decides which overlays are drawn); ``dose_uncertainty`` the voxel dose's
    standard uncertainty (Gy, on the dose grid), drawn as a second row of every overlay when given.
    """
    path = Path(path)
    limits = _limits(summary)
    errors: list[str] = []
    flags: list[str] = []
    notes: list[str] = []
    body_parts = [
        _safe(lambda: _dose_table(summary, limits, flags), "Absorbed dose per VOI", errors),
        _safe(lambda: _uncertainty(summary), "Uncertainty", errors),
        _safe(lambda: _cumulative(summary, limits, flags), "Cumulative dose across cycles", errors),
        _safe(lambda: _cumulative_uncertainty(summary), "Cumulative dose with its uncertainty", errors),
        _safe(lambda: _marrow(summary), "Red marrow", errors),
        _safe(lambda: _timepoints(summary), "Imaging time points", errors),
        _safe(lambda: _dvh_plot(summary, dose, vois), "Dose–volume histograms", errors),
        _safe(lambda: _ta_section(summary), "Time–activity curves", errors),
        _safe(lambda: _overlays(summary, dose, ct, vois, notes, dose_uncertainty), "Dose distribution", errors),
        _safe(lambda: _provenance(summary), "Methods and provenance", errors),
    ]
    header = _safe(lambda: _header(summary), "Header", errors)
    warnings = _warnings(summary, [*flags, *notes, *errors])
    pid = summary.patient.id
    title = "Dose report" + (f" {pid}" if pid else "") + f" cycle {summary.cycle.number}"
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
def console_table(summary: Summary) -> str:
    """A plain-text table for the terminal: VOI, mean Gy, Gy/GBq, D2, BED, and against the limit."""
    limits = _limits(summary)
    pvc_on = summary.methods.pvc.method != "none"
    head = ["VOI", "role", "mean Gy", "Gy/GBq", "D2 Gy", "BED Gy", "vs limit"]
    if pvc_on:
        head[2] = f"mean Gy ({summary.methods.pvc.method})"
        head.insert(3, "uncorr. Gy")
    rows: list[list[str]] = []

    def n(x: Any, nd: int = 2) -> str:
        v = _f(x)
        return "-" if v is None else f"{v:.{nd}f}"

    for name, e in summary.vois.items():
        role = e.role
        lim = limits.get(role)
        mean = _f(e.mean_gy)
        if lim and mean is not None:
            flag = {"over": "  OVER", "close": "  CLOSE"}.get(_flag(mean, lim), "")
            vs = f"{100 * mean / lim:.0f}% of {lim:g} Gy{flag}"
        else:
            vs = ""
        row = [name, role, n(mean), n(e.gy_per_gbq, 3), n(e.D2_gy), n(e.bed_gy), vs]
        if pvc_on:
            row.insert(3, "-" if e.pvc is None else n(e.pvc.uncorrected_mean_gy))
        rows.append(row)
    if not rows:
        return "no VOI results"
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {2, 3, 4, 5, 6} if pvc_on else {2, 3, 4, 5}

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    left = summary.cumulative.cycles_left
    if left is not None and left.message:
        out.append("")
        out.append(f"cycles left: {left.message}")
        if left.upper_95 is not None:
            out.append(f"cycles left {left.upper_95.message}")
    return "\n".join(out)
