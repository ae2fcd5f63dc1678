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
    CumulativeUncertainty,
    CycleDoseU,
    CycleRow,
    CyclesLeft,
    EstimatedCycle,
    LimitsUsed,
    Marrow,
    Totals,
    ValueU,
    VoiMetrics,
)
from .uncertainty import COVERAGE_FACTOR

__all__ = [
    "CORRELATED_BETWEEN_CYCLES",
    "KIDNEY_FIGURE",
    "CycleDose",
    "DoseUncertainty",
    "Limits",
    "bed_sensitivity",
    "cumulative",
    "cumulative_summary",
    "cumulative_uncertainty",
    "cycles_left",
    "cycles_left_upper",
]

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
    n_left, binding_name, message = _binding(rows, gbq)
    return {
        "cycles_left": n_left,
        "binding_limit": binding_name,
        "activity_per_cycle_bq": float(activity_per_cycle_bq),
        "limits": rows,
        "message": message,
        "assumption": "future cycles repeat the measured dose per GBq and kinetics (G factor)",
        "notes": notes,
    }


def _binding(rows: Sequence[Mapping[str, Any]], gbq: float) -> tuple[int | None, str | None, str]:
    """(cycles left, binding limit, message): the limit with the fewest cycles left binds."""
    bounded = [r for r in rows if r["cycles_left"] is not None]
    if not bounded:
        return None, None, "no limit bounds the number of cycles (zero dose per cycle)"
    binding = min(bounded, key=lambda r: int(r["cycles_left"]))
    n_left: int = binding["cycles_left"]
    if n_left == 0:
        return n_left, binding["limit"], f"no further cycle at {gbq:g} GBq: {binding['message']}"
    return (
        n_left,
        binding["limit"],
        f"{n_left} further cycle(s) at {gbq:g} GBq; binding limit: {binding['limit']} ({binding['message']})",
    )


# ============================================================================================ uncertainty
#: Budget components (:mod:`voxeldose.uncertainty`) taken as fully correlated between cycles (r = 1): the
#: calibration factor (the same camera and its profile's sensitivity measured once), the recovery curve (the same
#: camera profile's recovery fit) and the dose factor (the same kernel and its energy-deposition data).  Counting
#: noise, scan times and the time–activity fit are new measurements each cycle (r = 0); so is the delineation,
#: since each cycle's job is contoured on its own CT (``same_contours=True`` counts it as correlated).
CORRELATED_BETWEEN_CYCLES: frozenset[str] = frozenset({"calibration", "recovery", "dose factor"})
#: The model in words, as the summary states it.
CORRELATION_MODEL = (
    "components correlated between cycles (r = 1: calibration of the same camera, recovery curve of the same camera "
    "profile, dose factor of the same kernel) summed linearly across cycles; independent ones (r = 0: counting, "
    "scan time, time–activity fit, delineation on each cycle's own contours) in quadrature; different components "
    "independent of each other (GUM JCGM 100:2008 §5.2, eq. 16; Gear et al. 2018, EJNMMI 45:2456).  An earlier "
    "cycle estimated from this cycle's dose per GBq carries this cycle's components, fully correlated with it."
)
#: What the marrow figure's uncertainty is (no model yet: said, never invented).
MARROW_NOT_STATED = "not stated: the red-marrow figure has no uncertainty model in voxeldose yet"


@dataclass(frozen=True)
class DoseUncertainty:
    """One cycle's organ dose uncertainty by budget component: standard uncertainty (Gy, or Gy of BED) each
    stated component contributes, and ``origin``, the cycle whose measurement it comes from (an earlier cycle
    estimated from this cycle's dose per GBq has this cycle's number: its independent components are the same
    random errors as this cycle's)."""

    components_gy: Mapping[str, float]
    origin: int

    @property
    def u_gy(self) -> float:
        """The cycle's own combined standard uncertainty (components independent of each other), Gy."""
        return math.sqrt(sum(u * u for u in self.components_gy.values()))

    def scaled(self, factor: float) -> DoseUncertainty:
        return DoseUncertainty({k: abs(factor) * u for k, u in self.components_gy.items()}, self.origin)


def cumulative_uncertainty(
    parts: Sequence[DoseUncertainty], *, same_contours: bool = False, correlated: frozenset[str] | None = None
) -> float:
    """Standard uncertainty (Gy) of the sum of the cycles' doses, GUM JCGM 100:2008 eq. 16 with r = 1 between the
    cycles' values of a correlated component (and between an independent component's values of the same origin)
    and r = 0 otherwise: u² = Σ_groups (Σ_{i in group} u_i)², a group being one correlated component over all
    cycles, or one independent component of one origin cycle.  Two cycles with a fully correlated a₁, a₂ and an
    independent b₁, b₂ give u² = (a₁ + a₂)² + b₁² + b₂²."""
    corr = set(CORRELATED_BETWEEN_CYCLES if correlated is None else correlated)
    if same_contours:
        corr.add("delineation")
    groups: dict[tuple[str, int], float] = {}
    for p in parts:
        for name, u in p.components_gy.items():
            if not (u >= 0 and math.isfinite(u)):
                raise VoxeldoseError(
                    f"the uncertainty component {name!r} must be a finite number ≥ 0 Gy", tag="components_gy", found=u
                )
            key = (name, 0) if name in corr else (name, p.origin)
            groups[key] = groups.get(key, 0.0) + u
    return math.sqrt(sum(v * v for v in groups.values()))


def bed_sensitivity(dose_gy: float, bed_gy: float) -> float:
    """∂BED/∂d of BED = d + G·d²/(α/β) at fixed G, from the dose and BED alone: 1 + 2·(BED − d)/d."""
    return 1.0 + 2.0 * (bed_gy - dose_gy) / dose_gy if dose_gy > 0 else 1.0


_UPPER_KEYS = (
    ("kidney absorbed dose", "kidney", "dose"),
    ("kidney BED", "kidney", "bed"),
    ("red marrow", "marrow", "dose"),
)


def _limit_key(name: str) -> tuple[str, str]:
    return next((organ, q) for prefix, organ, q in _UPPER_KEYS if name.startswith(prefix))


def cycles_left_upper(
    central: Mapping[str, Any],
    *,
    cumulative_u_gy: Mapping[str, float],
    cumulative_bed_u_gy: Mapping[str, float],
    per_cycle_relative_u: Mapping[str, float],
    k: float = COVERAGE_FACTOR,
    not_stated: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`cycles_left` again at the ≈ 95 % upper bound of each dose: for each limit of ``central`` (its
    result) whose organ has a stated uncertainty, ``n = floor((limit − (C + k·u_C)) / (d + k·u_d))`` with C the
    cumulative dose (or BED) and d the per-cycle dose (or BED) of a future cycle.

    ``cumulative_u_gy``/``cumulative_bed_u_gy``: standard u of the cumulative dose / BED by organ;
    ``per_cycle_relative_u``: the relative standard u of the dose per GBq the future cycles repeat (this
    cycle's).  A future cycle's BED b = d + G·d²/(α/β) gets u_b = (1 + 2·G·d/(α/β))·u_d.  A limit whose organ
    lacks an uncertainty is left out and said in ``notes`` (``not_stated[organ]`` gives the reason)."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    per_dose = {
        _limit_key(r["limit"])[0]: float(r["per_cycle_gy"])
        for r in central["limits"]
        if r["quantity"] == "absorbed dose"
    }
    for r in central["limits"]:
        organ, q = _limit_key(r["limit"])
        u_cum = (cumulative_bed_u_gy if q == "bed" else cumulative_u_gy).get(organ)
        rel = per_cycle_relative_u.get(organ)
        if u_cum is None or rel is None:
            why = (not_stated or {}).get(organ, "no stated uncertainty")
            notes.append(f"{r['limit']}: not checked at the 95 % upper bound ({why})")
            continue
        d = per_dose.get(organ, 0.0)
        u_per = rel * d
        if q == "bed":
            u_per *= 1.0 + 2.0 * float(r.get("g_factor") or 0.0) * d / float(r.get("alpha_beta_gy") or math.inf)
        row = _one_limit(
            name=r["limit"],
            quantity=r["quantity"],
            limit_gy=float(r["limit_gy"]),
            current_gy=float(r["current_gy"]) + k * u_cum,
            per_cycle_gy=float(r["per_cycle_gy"]) + k * u_per,
            source=r["source"],
        )
        for extra in ("g_factor", "alpha_beta_gy"):
            if extra in r:
                row[extra] = r[extra]
        rows.append(row)
    gbq = float(central["activity_per_cycle_bq"]) / 1e9
    if rows:
        n_left, binding_name, message = _binding(rows, gbq)
        message = f"at the 95 % upper bound (k = {k:g}): {message}"
    else:
        n_left, binding_name, message = (
            None,
            None,
            "not computed at the 95 % upper bound: no dose with a stated uncertainty",
        )
    return {
        "cycles_left": n_left,
        "binding_limit": binding_name,
        "activity_per_cycle_bq": float(central["activity_per_cycle_bq"]),
        "limits": rows,
        "message": message,
        "assumption": "cumulative and per-cycle doses (and BEDs) at value + k·u; future cycles repeat this "
        "cycle's dose per GBq and kinetics, with its relative uncertainty",
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
    row_u, cum_u, upper = _uncertainty_of(vois, spec, cum, left, activity_bq)
    if left is not None and upper is not None:
        left = left.model_copy(update={"upper_95": CyclesLeft.model_validate(upper)})
    return Cumulative(
        cycles=[_row(r, row_u.get(r["cycle"], {})) for r in cum["per_cycle"]],
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
        uncertainty=cum_u,
    )


def _row(r: Mapping[str, Any], u: Mapping[str, CycleDoseU]) -> CycleRow:
    """One row of :func:`cumulative`'s ``per_cycle`` as the summary's cycle table has it (MBq, Gy)."""
    dose, bed_gy = r["dose_gy"], r["bed_gy"]
    return CycleRow(
        number=r["cycle"],
        date=r["date"],
        activity_MBq=r["activity_bq"] / 1e6,
        kidney_gy=dose.get("kidney"),
        kidney_bed_gy=bed_gy.get("kidney"),
        marrow_gy=dose.get("marrow"),
        kidney_u=u.get("kidney"),
        marrow_u=u.get("marrow"),
    )


def _this_kidney_u(vois: Mapping[str, VoiMetrics], number: int) -> tuple[DoseUncertainty | None, str]:
    """This cycle's kidney-figure uncertainty (the higher kidney's EANM budget, components in Gy) and its source."""
    kidneys = sorted((e for e in vois.values() if e.role == "kidney"), key=lambda e: e.mean_gy, reverse=True)
    if not kidneys or kidneys[0].uncertainty is None:
        return None, "not stated: this cycle's kidney has no uncertainty budget (no time–activity fit)"
    k = kidneys[0]
    budget = k.uncertainty
    assert budget is not None  # checked above
    comps = {c.name: c.relative_u * abs(k.mean_gy) for c in budget.components if c.relative_u is not None}
    return DoseUncertainty(comps, number), "this cycle's EANM budget (stated components)"


def _uncertainty_of(
    vois: Mapping[str, VoiMetrics],
    spec: JobSpec,
    cum: Mapping[str, Any],
    left: CyclesLeft | None,
    activity_bq: float,
) -> tuple[dict[int, dict[str, CycleDoseU]], CumulativeUncertainty | None, dict[str, Any] | None]:
    """Each cycle's kidney and marrow dose uncertainty, the cumulative ones (:func:`cumulative_uncertainty`) and
    cycles left at the upper bound (:func:`cycles_left_upper`).  An earlier cycle without a stated uncertainty is
    "not stated" (never invented); the cumulative u then covers the stated cycles only (a lower bound, said)."""
    this = spec.cycle_number
    this_u, this_src = _this_kidney_u(vois, this)
    per_cycle = {r["cycle"]: r for r in cum["per_cycle"]}
    parts: dict[int, DoseUncertainty | None] = {}
    rows: dict[int, dict[str, CycleDoseU]] = {}
    for n, r in per_cycle.items():
        out: dict[str, CycleDoseU] = {}
        if "marrow" in r["dose_gy"]:
            out["marrow"] = CycleDoseU(u_gy=None, source=MARROW_NOT_STATED)
        if "kidney" in r["dose_gy"]:
            earlier = next((c for c in spec.earlier_cycles if c.number == n), None)
            part: DoseUncertainty | None
            if earlier is None:
                part, src = this_u, this_src
            elif earlier.kidney_gy is None:  # estimated from this cycle's dose per GBq
                part = None if this_u is None else this_u.scaled(earlier.activity_mbq * 1e6 / activity_bq)
                src = (
                    "estimated like the dose: this cycle's components scaled by the activity ratio, fully correlated "
                    "with this cycle (the assumption that the kinetics repeat has no stated uncertainty)"
                    if part is not None
                    else this_src
                )
            elif earlier.kidney_u_components_gy is not None:
                part, src = DoseUncertainty(dict(earlier.kidney_u_components_gy), n), f"cycle {n}'s own result"
            else:
                part, src = None, f"not stated: cycle {n}'s result has no uncertainty (an older summary)"
            parts[n] = part
            out["kidney"] = CycleDoseU(
                u_gy=None if part is None else part.u_gy,
                components_gy={} if part is None else dict(part.components_gy),
                source=src,
            )
        rows[n] = out
    if not parts and not any("marrow" in r for r in rows.values()):
        return rows, None, None
    k = COVERAGE_FACTOR
    notes: list[str] = []
    not_stated: dict[str, list[int]] = {}
    dose_u: dict[str, ValueU] = {}
    bed_u: dict[str, ValueU] = {}
    cum_u: dict[str, float] = {}
    cum_bed_u: dict[str, float] = {}
    if parts:
        missing = sorted(n for n, p in parts.items() if p is None)
        stated = [p for p in parts.values() if p is not None]
        if missing:
            not_stated["kidney"] = missing
        if stated:
            cum_u["kidney"] = cumulative_uncertainty(stated)
            if missing:
                notes.append(
                    f"kidney: cycle(s) {missing} have no stated uncertainty — the cumulative u covers the other "
                    "cycles only and is a lower bound"
                )
            if "kidney" in cum["bed_gy"]:
                scaled = [
                    p.scaled(bed_sensitivity(per_cycle[n]["dose_gy"]["kidney"], per_cycle[n]["bed_gy"]["kidney"]))
                    for n, p in parts.items()
                    if p is not None
                ]
                cum_bed_u["kidney"] = cumulative_uncertainty(scaled)
        dose_u["kidney"] = _vu(float(cum["dose_gy"]["kidney"]), cum_u.get("kidney"), k)
        if "kidney" in cum["bed_gy"]:
            bed_u["kidney"] = _vu(float(cum["bed_gy"]["kidney"]), cum_bed_u.get("kidney"), k)
    if "marrow" in cum["dose_gy"]:
        not_stated["marrow"] = sorted(n for n, r in rows.items() if "marrow" in r)
        dose_u["marrow"] = _vu(float(cum["dose_gy"]["marrow"]), None, k)
        notes.append(f"red marrow: {MARROW_NOT_STATED}")
    total = CumulativeUncertainty(
        method="first-order propagation of each cycle's EANM budget (GUM JCGM 100:2008 §5.2)",
        correlation_model=CORRELATION_MODEL,
        coverage_factor=k,
        dose_gy=dose_u,
        bed_gy=bed_u,
        not_stated=not_stated,
        notes=notes,
    )
    upper = None
    if left is not None:
        rel: dict[str, float] = {}
        this_dose = per_cycle.get(this, {}).get("dose_gy", {}).get("kidney")
        if this_u is not None and this_dose:
            rel["kidney"] = this_u.u_gy / this_dose
        upper = cycles_left_upper(
            left.model_dump(),
            cumulative_u_gy=cum_u,
            cumulative_bed_u_gy=cum_bed_u,
            per_cycle_relative_u=rel,
            k=k,
            not_stated={"marrow": MARROW_NOT_STATED, "kidney": this_src if this_u is None else "not stated"},
        )
        if "kidney" in not_stated and "kidney" in cum_u:
            upper["notes"].append("the kidney's upper bound uses a lower-bound cumulative u (cycles not stated)")
    return rows, total, upper


def _vu(value: float, u: float | None, k: float) -> ValueU:
    return ValueU(
        value=value, u=u, lower_95=None if u is None else value - k * u, upper_95=None if u is None else value + k * u
    )
