"""Cumulative absorbed dose and BED over therapy cycles, and how many cycles are left.

Standard [177Lu]Lu-DOTATATE PRRT is 4 × 7.4 GBq; dosimetry-guided PRRT continues (or stops) cycles
by the cumulative kidney and marrow doses.  This module sums what each cycle delivered
(:func:`cumulative`) and works out how many further cycles at a planned activity fit under each limit
(:func:`cycles_left`); :func:`cumulative_summary` makes the ``cumulative`` part of ``summary.json`` of a run.

Summing across cycles
---------------------
Absorbed doses add.  BEDs add too: cycles are weeks apart, far longer than repair half-times of
hours, so no sublethal damage from one cycle interacts with the next and the total BED is the sum of
the per-cycle BEDs (Dale 1986, Br J Radiol 59:1111–1115: the extrapolated response dose — the BED —
"is an additive quantity"; the way kidney BED is totalled over PRRT cycles in Bodei et al. 2008).

Per-cycle BED
-------------
``BED_c = d_c + G_c·d_c²/(α/β)`` with ``G_c`` the Lea–Catcheside factor of that cycle's kinetics
(:func:`voxeldose.metrics.lea_catcheside_g`).  ``G`` depends only on the *shape* of the time–activity
curve (and the repair half-time), not on the dose; the BED is quadratic in the dose.  For future
cycles :func:`cycles_left` assumes the kinetics (``G``) and the dose per GBq of the last measured
cycle(s) repeat.

Limits (:class:`Limits`, all configurable)
------------------------------------------
* kidneys, absorbed dose 23 Gy — the limit of dosimetry-guided PRRT (Garske-Román et al. 2018,
  "Prospective observational study of [177Lu]Lu-DOTATATE therapy in patients with advanced metastatic
  neuroendocrine tumours: the impact of individual dosimetry", Eur J Nucl Med Mol Imaging,
  doi:10.1007/s00259-018-4106-2; also the phase II trial of Sundlöv et al. 2022, Eur J Nucl Med Mol
  Imaging 49(11)); taken from the external-beam tolerance dose (5 % late nephropathy at 23 Gy,
  discussed for PRRT by Konijnenberg 2003, Cancer Biother Radiopharm 18(4):619–625).
* kidneys, BED 28 Gy for patients with risk factors (mainly hypertension, diabetes) and 40 Gy
  without (Bodei et al. 2008, Eur J Nucl Med Mol Imaging 35(10):1847–1856).  Default: with risk
  factors (the conservative choice); set ``kidney_risk_factors=False`` to use 40 Gy.
* red marrow, absorbed dose 2 Gy — the classical limit, used with the 23 Gy kidney limit in
  dosimetry-based PRRT (e.g. Menda et al. 2018, J Nucl Med 59(11):1692; Garske-Román et al. 2018).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import VoxeldoseError
from .metrics import RADIOBIOLOGY_DEFAULTS, bed
from .spec import JobSpec
from .summary import (
    Cumulative,
    CycleRow,
    CyclesLeft,
    EstimatedCycle,
    LimitsUsed,
    Marrow,
    Totals,
    VoiMetrics,
)

__all__ = ["KIDNEY_FIGURE", "CycleDose", "Limits", "cumulative", "cumulative_summary", "cycles_left"]

#: Rounding guard for "how many whole cycles fit": a dose that lands on the limit to 1e-9 relative
#: counts as fitting (23.0 Gy after n cycles is within a 23 Gy limit).
_EPS = 1e-9


@dataclass(frozen=True)
class CycleDose:
    """What one therapy cycle delivered.

    ``dose_gy`` maps a role or VOI name (e.g. ``"kidney"``, ``"marrow"``, ``"tumour_1"``) to the mean
    absorbed dose (Gy); ``g_factor`` and ``bed_gy`` map names to that cycle's Lea–Catcheside factor
    and BED (Gy), where known.
    """

    cycle: int
    date: _dt.date | str | None
    activity_bq: float
    dose_gy: Mapping[str, float]
    g_factor: Mapping[str, float] = field(default_factory=dict)
    bed_gy: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.activity_bq > 0 and math.isfinite(self.activity_bq)):
            raise VoxeldoseError(
                f"cycle {self.cycle}: the administered activity must be > 0 Bq",
                tag="activity_bq",
                found=self.activity_bq,
            )
        for name, d in self.dose_gy.items():
            if not (d >= 0 and math.isfinite(d)):
                raise VoxeldoseError(
                    f"cycle {self.cycle}: absorbed dose of {name!r} must be ≥ 0 Gy", tag="dose_gy", found=d
                )
        for name, g in self.g_factor.items():
            if not 0 <= g <= 1:
                raise VoxeldoseError(
                    f"cycle {self.cycle}: G factor of {name!r} must lie in [0, 1]", tag="g_factor", found=g
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cycle": self.cycle,
            "date": self.date.isoformat() if isinstance(self.date, _dt.date) else self.date,
            "activity_bq": self.activity_bq,
            "dose_gy": dict(self.dose_gy),
            "g_factor": dict(self.g_factor),
            "bed_gy": dict(self.bed_gy),
        }


def _alpha_beta_default(name: str) -> float | None:
    key = name.strip().lower().split("_")[0].rstrip("s")
    key = {"tumor": "tumour"}.get(key, key)
    rb = RADIOBIOLOGY_DEFAULTS.get(key)
    return rb.alpha_beta_gy if rb else None


def cumulative(cycles: Sequence[CycleDose], *, alpha_beta_gy: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Sum absorbed doses and BEDs over ``cycles``.

    A cycle's BED for a VOI is taken from ``bed_gy``; where missing but ``g_factor`` is known it is
    computed as ``d + G·d²/(α/β)`` with ``alpha_beta_gy[name]`` (default: the role's default α/β,
    e.g. 2.6 Gy for ``"kidney"``).  The cumulative BED of a VOI is reported only when every cycle
    that gave it a dose has a BED; otherwise ``notes`` says which cycle lacks it.
    """
    if not cycles:
        raise VoxeldoseError("no therapy cycles given", tag="cycles", expected="at least one cycle")
    numbers = [c.cycle for c in cycles]
    if len(set(numbers)) != len(numbers):
        raise VoxeldoseError("the same cycle number appears twice", tag="cycle", found=sorted(numbers))
    ordered = sorted(cycles, key=lambda c: c.cycle)
    ab = dict(alpha_beta_gy or {})
    dose: dict[str, float] = {}
    beds: dict[str, float] = {}
    missing_bed: dict[str, list[int]] = {}
    per_cycle: list[dict[str, Any]] = []
    for c in ordered:
        row = c.to_dict()
        row_bed: dict[str, float] = {}
        for name, d in c.dose_gy.items():
            dose[name] = dose.get(name, 0.0) + float(d)
            b = c.bed_gy.get(name)
            if b is None and name in c.g_factor:
                a = ab.get(name, _alpha_beta_default(name))
                if a is not None:
                    b = bed(float(d), float(c.g_factor[name]), float(a))
            if b is None:
                missing_bed.setdefault(name, []).append(c.cycle)
            else:
                row_bed[name] = float(b)
                beds[name] = beds.get(name, 0.0) + float(b)
        row["bed_gy"] = row_bed
        per_cycle.append(row)
    notes = []
    for name, missing in missing_bed.items():
        if name in beds:
            notes.append(
                f"cumulative BED of {name!r} not reported: no BED (nor G factor and α/β) for cycle(s) {missing}"
            )
            del beds[name]
    return {
        "n_cycles": len(ordered),
        "cycles": [c.cycle for c in ordered],
        "activity_bq_total": float(sum(c.activity_bq for c in ordered)),
        "dose_gy": dose,
        "bed_gy": beds,
        "per_cycle": per_cycle,
        "bed_summation": "BED summed over cycles (additive for fractions separated by ≫ repair half-time)",
        "notes": notes,
    }


@dataclass(frozen=True)
class Limits:
    """Cumulative limits used for cycle planning (Gy), with their sources.  All configurable."""

    kidney_dose_gy: float = 23.0
    kidney_bed_gy_with_risk_factors: float = 28.0
    kidney_bed_gy_without_risk_factors: float = 40.0
    kidney_risk_factors: bool = True
    marrow_dose_gy: float = 2.0
    #: names of the dose entries that are the kidneys and the red marrow
    kidney_key: str = "kidney"
    marrow_key: str = "marrow"
    sources: Mapping[str, str] = field(
        default_factory=lambda: {
            "kidney_dose_gy": "Garske-Román et al. 2018, Eur J Nucl Med Mol Imaging, doi:10.1007/s00259-018-4106-2",
            "kidney_bed_gy": "Bodei et al. 2008, Eur J Nucl Med Mol Imaging 35(10):1847–1856 "
            "(28 Gy with risk factors, 40 Gy without)",
            "marrow_dose_gy": "classical 2 Gy red-marrow limit (e.g. Menda et al. 2018, J Nucl Med 59(11):1692)",
        }
    )

    @property
    def kidney_bed_gy(self) -> float:
        return (
            self.kidney_bed_gy_with_risk_factors
            if self.kidney_risk_factors
            else self.kidney_bed_gy_without_risk_factors
        )


def _one_limit(
    *, name: str, quantity: str, limit_gy: float, current_gy: float, per_cycle_gy: float, source: str
) -> dict[str, Any]:
    if not (limit_gy > 0 and math.isfinite(limit_gy)):
        raise VoxeldoseError(f"the {name} limit must be a positive number of Gy", tag=name, found=limit_gy)
    if not (current_gy >= 0 and math.isfinite(current_gy)):
        raise VoxeldoseError(f"the cumulative {quantity} for {name} must be ≥ 0 Gy", tag=name, found=current_gy)
    if not (per_cycle_gy >= 0 and math.isfinite(per_cycle_gy)):
        raise VoxeldoseError(f"the per-cycle {quantity} for {name} must be ≥ 0 Gy", tag=name, found=per_cycle_gy)
    row: dict[str, Any] = {
        "limit": name,
        "quantity": quantity,
        "limit_gy": limit_gy,
        "source": source,
        "current_gy": current_gy,
        "per_cycle_gy": per_cycle_gy,
    }
    if current_gy >= limit_gy * (1 - _EPS):
        row.update(
            cycles_left=0,
            after_cycles_gy=current_gy,
            after_next_cycle_gy=current_gy + per_cycle_gy,
            exceeded=current_gy > limit_gy * (1 + _EPS),
            message=f"{name}: cumulative {quantity} {current_gy:.2f} Gy already "
            f"{'exceeds' if current_gy > limit_gy * (1 + _EPS) else 'reaches'} the "
            f"{limit_gy:g} Gy limit — no further cycle",
        )
        return row
    if per_cycle_gy == 0:
        row.update(
            cycles_left=None,
            after_cycles_gy=current_gy,
            after_next_cycle_gy=current_gy,
            exceeded=False,
            message=f"{name}: no {quantity} per cycle — this limit sets no bound",
        )
        return row
    n = math.floor((limit_gy - current_gy) / per_cycle_gy + _EPS)
    row.update(
        cycles_left=n,
        after_cycles_gy=current_gy + n * per_cycle_gy,
        after_next_cycle_gy=current_gy + (n + 1) * per_cycle_gy,
        exceeded=False,
        message=f"{name}: {n} more cycle(s) at {per_cycle_gy:.2f} Gy each reach "
        f"{current_gy + n * per_cycle_gy:.2f} of {limit_gy:g} Gy",
    )
    return row


def cycles_left(
    *,
    cumulative_dose_gy: Mapping[str, float],
    cumulative_bed_gy: Mapping[str, float] | None = None,
    dose_per_gbq: Mapping[str, float],
    g_factor: Mapping[str, float] | None = None,
    alpha_beta_gy: Mapping[str, float] | None = None,
    activity_per_cycle_bq: float,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """How many further cycles of ``activity_per_cycle_bq`` fit under each limit.

    Inputs are keyed by role (``limits.kidney_key``, ``limits.marrow_key``).  Per further cycle the
    absorbed dose is ``d = dose_per_gbq · A/1e9`` and, for the kidneys, the BED is
    ``d + G·d²/(α/β)`` with ``g_factor["kidney"]`` and ``alpha_beta_gy["kidney"]`` (default 2.6 Gy).
    For each limit: ``n = floor((limit − current) / per_cycle)``, 0 when the limit is already reached
    or exceeded (the message says so).  The kidney BED limit is checked only when the cumulative
    kidney BED and G are given.  The binding limit is the one with the fewest cycles left.
    """
    lim = limits or Limits()
    if not (activity_per_cycle_bq > 0 and math.isfinite(activity_per_cycle_bq)):
        raise VoxeldoseError(
            "the planned activity per cycle must be > 0 Bq", tag="activity_per_cycle_bq", found=activity_per_cycle_bq
        )
    gbq = activity_per_cycle_bq / 1e9
    bed_cum = dict(cumulative_bed_gy or {})
    gf = dict(g_factor or {})
    ab = dict(alpha_beta_gy or {})
    k, m = lim.kidney_key, lim.marrow_key
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def per_cycle(name: str) -> float:
        if name not in dose_per_gbq:
            raise VoxeldoseError(
                f"no absorbed dose per GBq for {name!r}",
                tag="dose_per_gbq",
                expected=f"a value for {name!r}",
                found=sorted(dose_per_gbq),
            )
        return float(dose_per_gbq[name]) * gbq

    if k in cumulative_dose_gy:
        d_k = per_cycle(k)
        rows.append(
            _one_limit(
                name="kidney absorbed dose",
                quantity="absorbed dose",
                limit_gy=lim.kidney_dose_gy,
                current_gy=float(cumulative_dose_gy[k]),
                per_cycle_gy=d_k,
                source=lim.sources.get("kidney_dose_gy", ""),
            )
        )
        if k in bed_cum and k in gf:
            a = float(ab.get(k, RADIOBIOLOGY_DEFAULTS["kidney"].alpha_beta_gy))
            b_k = bed(d_k, float(gf[k]), a)
            rf = "with" if lim.kidney_risk_factors else "without"
            row = _one_limit(
                name=f"kidney BED ({rf} risk factors)",
                quantity="BED",
                limit_gy=lim.kidney_bed_gy,
                current_gy=float(bed_cum[k]),
                per_cycle_gy=b_k,
                source=lim.sources.get("kidney_bed_gy", ""),
            )
            row.update(g_factor=float(gf[k]), alpha_beta_gy=a)
            rows.append(row)
        else:
            notes.append("kidney BED limit not checked: cumulative kidney BED and the G factor are needed")
    else:
        notes.append("no kidney dose given: kidney limits not checked")
    if m in cumulative_dose_gy:
        rows.append(
            _one_limit(
                name="red marrow absorbed dose",
                quantity="absorbed dose",
                limit_gy=lim.marrow_dose_gy,
                current_gy=float(cumulative_dose_gy[m]),
                per_cycle_gy=per_cycle(m),
                source=lim.sources.get("marrow_dose_gy", ""),
            )
        )
    else:
        notes.append("no red-marrow dose given: marrow limit not checked")
    if not rows:
        raise VoxeldoseError(
            "no organ at risk to plan cycles for",
            tag="cumulative_dose_gy",
            expected=f"doses for {k!r} and/or {m!r}",
            found=sorted(cumulative_dose_gy),
        )
    bounded = [r for r in rows if r["cycles_left"] is not None]
    if bounded:
        binding = min(bounded, key=lambda r: r["cycles_left"])
        n_left: int | None = binding["cycles_left"]
        if n_left == 0:
            message = f"no further cycle at {gbq:g} GBq: {binding['message']}"
        else:
            message = (
                f"{n_left} further cycle(s) at {gbq:g} GBq; binding limit: {binding['limit']} ({binding['message']})"
            )
        binding_name: str | None = binding["limit"]
    else:
        n_left, binding_name = None, None
        message = "no limit bounds the number of cycles (zero dose per cycle)"
    return {
        "cycles_left": n_left,
        "binding_limit": binding_name,
        "activity_per_cycle_bq": float(activity_per_cycle_bq),
        "limits": rows,
        "message": message,
        "assumption": "future cycles repeat the measured dose per GBq and kinetics (G factor)",
        "notes": notes,
    }


# ============================================================================================ the run's table
#: What the kidney figure of the cumulative table is.
KIDNEY_FIGURE = "the higher of the kidneys' mean absorbed doses"


def _this_cycle(vois: Mapping[str, VoiMetrics], marrow: Marrow) -> tuple[dict[str, float], ...]:
    """This cycle's organ figures by role: (dose Gy, G factor, BED Gy, α/β Gy)."""
    kidneys = sorted((e for e in vois.values() if e.role == "kidney"), key=lambda e: e.mean_gy, reverse=True)
    dose: dict[str, float] = {}
    g: dict[str, float] = {}
    bed_gy: dict[str, float] = {}
    ab: dict[str, float] = {}
    if kidneys:
        k = kidneys[0]
        dose["kidney"] = float(k.mean_gy)
        if k.g_factor is not None and k.bed_gy is not None and k.alpha_beta_gy is not None:
            g["kidney"] = float(k.g_factor)
            bed_gy["kidney"] = float(k.bed_gy)
            ab["kidney"] = float(k.alpha_beta_gy)
    m = marrow.blood_based or marrow.image_based
    if m is not None:
        dose["marrow"] = float(m.red_marrow_gy)
    return dose, g, bed_gy, ab


def _earlier_rows(
    spec: JobSpec, dose: Mapping[str, float], g: Mapping[str, float], activity_bq: float, warnings: list[str]
) -> tuple[list[CycleDose], list[EstimatedCycle]]:
    """The job's earlier cycles; an organ dose they lack is estimated from this cycle's dose per GBq."""
    rows: list[CycleDose] = []
    estimated: list[EstimatedCycle] = []
    for c in spec.earlier_cycles:
        d = {k: v for k, v in (("kidney", c.kidney_gy), ("marrow", c.marrow_gy)) if v is not None}
        b = {"kidney": c.kidney_bed_gy} if c.kidney_bed_gy is not None else {}
        gg: dict[str, float] = {}
        for organ in ("kidney", "marrow"):
            if organ not in d and organ in dose:
                d[organ] = dose[organ] / activity_bq * c.activity_mbq * 1e6
                estimated.append(EstimatedCycle(cycle=c.number, organ=organ, dose_gy=d[organ]))
                warnings.append(
                    f"cycle {c.number} has no {organ} dosimetry: estimated as {d[organ]:.2f} Gy from this "
                    f"cycle's {dose[organ] / (activity_bq / 1e9):.3f} Gy/GBq × {c.activity_mbq:.0f} MBq"
                )
        if "kidney" in d and "kidney" not in b and "kidney" in g:
            gg["kidney"] = g["kidney"]
            warnings.append(
                f"cycle {c.number} has no kidney BED: computed from its dose with this cycle's kinetics "
                f"(G = {g['kidney']:.3f})"
            )
        rows.append(
            CycleDose(cycle=c.number, date=c.date, activity_bq=c.activity_mbq * 1e6, dose_gy=d, bed_gy=b, g_factor=gg)
        )
    return rows, estimated


def cumulative_summary(
    vois: Mapping[str, VoiMetrics],
    marrow: Marrow,
    spec: JobSpec,
    *,
    injection_date: _dt.date,
    activity_bq: float,
    warnings: list[str],
) -> Cumulative:
    """The ``cumulative`` part of ``summary.json``: this cycle with the job's earlier cycles, totals,
    limits and cycles left.

    The kidney figure is the higher of the kidneys' mean doses (the limiting kidney; conservative); the
    marrow figure is the blood-based dose when blood samples were given, else the image-based one.  An
    earlier cycle without dosimetry is estimated from this cycle's dose per GBq and that cycle's
    activity (appended to ``warnings``), never counted as 0 Gy.  ``activity_bq`` is this cycle's
    administered activity (Bq).
    """
    if spec.cycle_number in {c.number for c in spec.earlier_cycles}:
        raise VoxeldoseError(f"cycle {spec.cycle_number} is both this cycle and an earlier one", tag="earlier_cycles")
    dose, g, bed_gy, ab = _this_cycle(vois, marrow)
    this = CycleDose(
        cycle=spec.cycle_number, date=injection_date, activity_bq=activity_bq, dose_gy=dose, g_factor=g, bed_gy=bed_gy
    )
    earlier, estimated = _earlier_rows(spec, dose, g, activity_bq, warnings)
    cum = cumulative([this, *earlier], alpha_beta_gy=ab)
    lim = spec.limits
    limits = Limits(
        kidney_dose_gy=lim.kidney_gy,
        kidney_bed_gy_with_risk_factors=lim.kidney_bed_gy_with_risk_factors,
        kidney_bed_gy_without_risk_factors=lim.kidney_bed_gy_without_risk_factors,
        kidney_risk_factors=lim.kidney_risk_factors,
        marrow_dose_gy=lim.marrow_gy,
    )
    left: CyclesLeft | None = None
    notes = list(cum["notes"])
    if dose:
        left = CyclesLeft.model_validate(
            cycles_left(
                cumulative_dose_gy=cum["dose_gy"],
                cumulative_bed_gy=cum["bed_gy"],
                dose_per_gbq={k: v / (activity_bq / 1e9) for k, v in dose.items()},
                g_factor=g,
                alpha_beta_gy=ab,
                activity_per_cycle_bq=lim.planned_activity_mbq * 1e6,
                limits=limits,
            )
        )
    else:
        notes.append("no kidney or marrow VOI: cycles left not computed")
    return Cumulative(
        cycles=[_row(r) for r in cum["per_cycle"]],
        total=Totals(dose_gy=cum["dose_gy"], bed_gy=cum["bed_gy"], activity_MBq=cum["activity_bq_total"] / 1e6),
        limits=LimitsUsed(
            kidney_gy=limits.kidney_dose_gy,
            kidney_bed_gy=limits.kidney_bed_gy,
            kidney_risk_factors=limits.kidney_risk_factors,
            marrow_gy=limits.marrow_dose_gy,
            sources=dict(limits.sources),
        ),
        planned_activity_MBq=lim.planned_activity_mbq,
        cycles_left=left,
        notes=notes,
        kidney_figure=KIDNEY_FIGURE,
        estimated_earlier_cycles=estimated,
    )


def _row(r: Mapping[str, Any]) -> CycleRow:
    """One row of :func:`cumulative`'s ``per_cycle`` as the summary's cycle table has it (MBq, Gy)."""
    dose, bed_gy = r["dose_gy"], r["bed_gy"]
    return CycleRow(
        number=r["cycle"],
        date=r["date"],
        activity_MBq=r["activity_bq"] / 1e6,
        kidney_gy=dose.get("kidney"),
        kidney_bed_gy=bed_gy.get("kidney"),
        marrow_gy=dose.get("marrow"),
    )
