"""Time–activity curves and time-integrated activity (TIA): VOI fits, voxel-wise TIA, single time point.

Units: time in s, activity in Bq (VOI) or any per-voxel unit (Bq/ml, Bq per voxel); a TIA has the
activity's unit × s (Bq·s for a VOI).  The physical decay constant ``decay_constant_per_s`` is the
nuclide's (``nuclides.load("Lu-177").decay_constant_per_s``).

VOI level — :func:`fit_voi`
===========================

Models (every rate is an *effective* rate, ≥ λ_phys):

``"monoexp"``   A(t) = A0 e^{−λ t},                                   λ ≥ λ_phys               (k = 2)
``"biexp"``     A(t) = A0 (e^{−λ1 t} − e^{−λ2 t}),                    λ2 > λ1 ≥ λ_phys         (k = 3)
               (uptake with rate λ2, washout with rate λ1; A(0) = 0)
``"triexp"``    A(t) = A1 e^{−λ1 t} + A2 e^{−λ2 t} − (A1 + A2) e^{−λ3 t},
               λ_phys ≤ λ1 < λ2 < λ3, A1, A2 ≥ 0 (A(0) = 0; λ3 is the uptake)          (k = 5)
``"trapezoid"`` linear from (0, 0) to the first point, trapezoidal rule between measured points,
               and after the last point a physical-decay tail A_n/λ_phys.

Constraint λ ≥ λ_phys: once the activity in a region decreases it cannot do so more slowly than the
nuclide decays (a negative biological clearance would mean net uptake continuing to infinity).  It is a
physical constraint, not a fit preference; data that still rise at the last time point are described
by the uptake term of the bi-/tri-exponential or fall back to the trapezoid's physical-decay tail.

Parametrisation: amplitudes as ln A, rates as logarithms of their *excess* over the next slower
rate: λ1 = λ_phys + e^{u1}, λ2 = λ1 + e^{u2}, λ3 = λ2 + e^{u3}.  The ordering and the constraint
λ ≥ λ_phys therefore hold by construction; :func:`scipy.optimize.least_squares` (TRF, box bounds on
the log-parameters) does the minimisation.  Starting points are deterministic and derived from the
data (log-linear slope through the last two points and through all points, uptake rates a few times
1/t_first); amplitudes at each start come from a weighted (non-negative) linear least-squares fit at
those rates; the start with the lowest final cost wins.

Weighting: relative residuals r_i = (f(t_i) − A_i)/A_i, i.e. weights 1/A_i — the assumption of a
constant coefficient of variation for every measurement.  This is a documented choice: the dominant
uncertainties of quantitative SPECT VOI activities (calibration, recovery, segmentation) scale with the
activity, and relative weighting keeps the late, small values (which set the tail, and so much of the
TIA) from being ignored next to the early large ones.  A measured zero gets the weight of
10⁻³ × the largest activity.

Trapezoid assumption A(0) = 0: activity in a region is zero at injection and rises linearly to the first
measurement.  For a region whose uptake is fast compared with t_1 this underestimates the first
segment (for A0 e^{−λt}: by A0 (1 − e^{−λt_1})/λ − A_1 t_1/2 ≈ A0 t_1/2); the physical-decay tail
overestimates the rest (by A_n (1/λ_phys − 1/λ_eff)): both are tested against these expressions.

Model choice, ``model="auto"``: every exponential model with k < n − 1 parameters (AICc needs
n > k + 1) is fitted and the one with the lowest corrected Akaike information criterion

    AICc = n ln(RSS/n) + 2k + 2k(k + 1)/(n − k − 1)

wins (RSS = sum of squared relative residuals; k counts the model parameters only).  AICc-based
selection of fit functions for biokinetic data follows Glatting et al. 2007, Med Phys 34:4285,
"Choosing the optimal fit function: comparison of the Akaike information criterion and the F-test"
(the citation as given in the project brief; its text was not available to check here).  RSS/n is
floored at (10⁻⁶)² — a relative residual below one part per million is numerically zero for SPECT data
— so that exact data do not make the choice depend on round-off; then the penalty decides and the
simpler model wins.  The trapezoid is the fallback only when no exponential model is eligible or
none converges; every candidate's AICc, TIA, parameters and status are kept in ``candidates``.
A candidate whose curve rises above 2 × the largest measured activity before the first scan is
excluded as implausible (a fast transient fitted to the first point would put an unmeasured peak —
and possibly most of the TIA — where there are no data); an explicitly requested model is still
returned then, with a warning in ``message``.
With the clinical 3-time-point schedule, no exponential model is eligible under this rule, and
``auto`` gives the trapezoid; ask for ``model="monoexp"``/``"biexp"`` explicitly to fit 2–3 points.

Voxel level — :func:`voxel_tia`
===============================

Vectorised over voxels in the namespace of the input (NumPy or CuPy, :func:`backend.xp_for`).

``method="hybrid"``: trapezoid from (0, 0) through the measured points (negative voxel values count
as 0), plus a tail after the last point, A_n/k, with k the weighted log-linear slope through the last
``tail_points`` points (2 by default: exact through the last two; 3: weighted least squares with
weights ∝ A, the Poisson-like inverse variance of ln A).  Physical-decay fallback, tail A_n/λ_phys,
where the fitted k is < λ_phys (activity rising or flat at the end), not finite, or any tail point is
≤ ``min_activity``.  Flags: 0 = fitted tail, 1 = physical-decay tail, 2 = no positive value at any
time → TIA 0.  ``quality`` is the fraction of each voxel's TIA that lies in the extrapolated tail.

``method="monoexp"``: weighted log-linear fit through all points (weights ∝ A), TIA = A0/k; same
fallback (the hybrid value with a physical-decay tail, flag 1) where k < λ_phys, k not finite or any
point ≤ ``min_activity``.  It integrates A0 e^{−kt} from t = 0 and so ignores the uptake phase.

Known bias: ln of a noisy small activity is biased low (Jensen: E[ln A] < ln E[A]) and has a large
variance, so log-linear rates from low-count voxels scatter widely.  Non-positive values are clipped to
a small positive number before the logarithm only to keep the arithmetic finite — those voxels take
the physical-decay fallback — and ``min_activity`` (e.g. a background level) widens that fallback to
small positive values.

Single time point — :func:`stp_hanscheid`, :func:`stp_madsen`
=============================================================

Hänscheid et al. 2018, J Nucl Med 59(1):75–81, "Dose mapping after endoradiotherapy with
177Lu-DOTATATE/DOTATOC by a single measurement after 4 days": TIA ≈ A(t)·2t/ln 2.  For a
mono-exponential A0 e^{−λt} the ratio estimate/true is (2/ln 2)·x e^{−x} with x = λt; it equals 1 exactly
when x = ln 2 (t = T_eff) and again at x = 2 ln 2 (t = 2 T_eff) — the two real roots of x e^{−x} = ln 2/2 —
and exceeds 1 in between, by at most 2/(e ln 2) − 1 = 6.2 % (at x = 1, t = T_eff/ln 2 ≈ 1.44 T_eff);
outside [T_eff, 2 T_eff] it underestimates, increasingly so.  Designed for t ≈ 96 h, i.e. effective
half-lives of the order of the imaging time.

Madsen et al. 2018, Med Phys 45:2318, "A new and simple method for single time point dosimetry …"
(citation as given in the project brief; not available here to check): TIA = A(t) e^{λ_eff t}/λ_eff with
a population effective half-life.  Exact for a mono-exponential with that half-life.  No default table
of population half-lives ships here (no source could be verified): the caller supplies it.

Single time point with the patient's own earlier kinetics — :func:`stp_prior`
===========================================================================

Later cycles from one scan: the shape of a VOI's time-activity curve from a full (multi-scan) fit of an
earlier cycle, A₁(t) = Σ c_i e^{−k_i t}, scaled to this cycle's one measurement A(t):
TIA = A(t)·∫₀^∞A₁ / A₁(t) = A(t)·(Σ c_i/k_i) / (Σ c_i e^{−k_i t}); for one exponential,
TIA = A(t)·e^{λ t}/λ (Madsen's formula with the patient's own λ instead of a population one).  Exact when
the kinetics repeat between cycles (only the amplitude may change).  Published: "Feasibility and accuracy
of single time point imaging for renal dosimetry following 177Lu-DOTATATE ('Lutate') therapy", EJNMMI Phys
2018, doi:10.1186/s40658-018-0232-9 — the kidney clearance half-life of cycle 1 applied to a single 24 h
scan of cycles 2–4 deviated from the full-imaging dose by 2 % on average (13 % with a 4 h scan; 30 % with a
population half-life at 24 h); "Simplified dosimetry for kidneys and tumors in 177Lu-labeled peptide
receptor radionuclide therapy", EJNMMI Phys 2022, doi:10.1186/s40658-022-00473-z — T_eff of the initial
cycle with one 1 d SPECT/CT: kidney dose ratio to the full-imaging dose median 1.01 (IQR 0.98–1.04);
with a 7 d scan, tumours 1.00 (IQR 0.99–1.01).  PyTheranostics offers the same idea ("biokinetics from
a previous cycle").

References (general practice): Sjögreen Gleisner K et al., "EANM dosimetry committee recommendations for
dosimetry of 177Lu-labelled somatostatin-receptor- and PSMA-targeting ligands", Eur J Nucl Med Mol
Imaging 2022;49(6):1778–1809; MIRD Pamphlet 26 (Ljungberg et al. 2016, joint EANM/MIRD guideline for
quantitative 177Lu SPECT).  An independent comparison of the two STP methods for 177Lu-DOTATATE and
177Lu-PSMA (lognormal effective half-life distributions; best 177Lu-DOTATATE scan time ≈ 72 h) is in
PMC8882881 (J Nucl Med).  These describe the practice; the specific rules above (A(0) = 0, the
physical-decay tail, the 2 × early-peak limit, the RSS floor) are this module's documented choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeAlias, TypedDict, cast, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import OptimizeResult, least_squares, nnls

from . import backend
from .backend import Array
from .errors import VoxeldoseError

__all__ = [
    "AUTO_MODELS",
    "FLAG_FIT",
    "FLAG_NO_DATA",
    "FLAG_PHYSICAL",
    "MODELS",
    "FitResult",
    "VoxelTIA",
    "fit_voi",
    "stp_hanscheid",
    "stp_madsen",
    "stp_prior",
    "stp_prior_factor",
    "voxel_tia",
]

LN2 = math.log(2.0)

#: Flags of :class:`VoxelTIA`: fitted tail / physical-decay tail / no positive data (TIA 0).
FLAG_FIT, FLAG_PHYSICAL, FLAG_NO_DATA = 0, 1, 2

#: Relative residual RMS below which a fit counts as exact in the AICc (see module docstring).
RELATIVE_RESIDUAL_FLOOR = 1e-6
#: A measured zero is weighted as if it were this fraction of the largest activity.
_ZERO_WEIGHT_FRACTION = 1e-3
#: Fastest rate a fit may use: a 1-minute half-life (effectively instantaneous at SPECT sampling).
_MAX_RATE_PER_S = LN2 / 60.0
#: Relative residual RMS at which a fit reproduces the data exactly and the search stops.
_EXACT_RELATIVE_RMS = 1e-11
#: A fitted curve may not rise above this multiple of the largest measured activity before the first
#: scan: an unobserved early peak (a fast transient fitted to the first point) would dominate the TIA
#: with nothing measured to support it.
_MAX_EARLY_PEAK_RATIO = 2.0
#: Evaluation budget of one local fit, per parameter.
_MAX_NFEV_PER_PARAM = 100
#: Slowest excess rate (relative to the next slower rate), as a fraction of λ_phys.
_MIN_EXCESS_FRACTION = 1e-9


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _h(t_s: float) -> str:
    return f"{t_s / 3600.0:.4g} h"


def _check_decay_constant(lam: float) -> float:
    """``lam`` (s⁻¹) as a float, or a :class:`VoxeldoseError` when it is not finite and positive."""
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise VoxeldoseError(
            "the physical decay constant must be a number",
            tag="decay_constant_per_s",
            found=lam,
        ) from None
    if not (math.isfinite(lam) and lam > 0):
        raise VoxeldoseError(
            "the physical decay constant must be finite and positive",
            tag="decay_constant_per_s",
            expected="λ = ln 2 / T½ in s⁻¹ (Lu-177: 1.207e-06)",
            found=lam,
        )
    return lam


def _check_times(times_s: ArrayLike | Array) -> NDArray[np.float64]:
    t = np.asarray(backend.to_host(times_s), dtype=float)
    if t.ndim != 1 or t.size == 0:
        raise VoxeldoseError(
            "time points must be a 1-D list of times after injection",
            tag="times_s",
            found=t.shape,
        )
    if not np.all(np.isfinite(t)):
        raise VoxeldoseError("time points must be finite", tag="times_s", found=[_h(x) for x in t])
    if np.any(t <= 0):
        bad = [_h(x) for x in t if x <= 0]
        raise VoxeldoseError(
            "time points must be after the injection (t > 0)",
            tag="times_s",
            expected="times in s after injection",
            found=bad,
        )
    d = np.diff(t)
    if np.any(d == 0):
        dup = sorted({_h(t[i]) for i in np.nonzero(d == 0)[0]})
        raise VoxeldoseError(
            f"time point(s) {', '.join(dup)} appear more than once; each scan needs its own time",
            tag="times_s",
            expected="strictly increasing times",
            found=[_h(x) for x in t],
        )
    if np.any(d < 0):
        i = int(np.nonzero(d < 0)[0][0])
        raise VoxeldoseError(
            f"time points are not in increasing order: {_h(t[i])} is followed by {_h(t[i + 1])}",
            tag="times_s",
            expected="strictly increasing times",
            found=[_h(x) for x in t],
        )
    return t


def _check_activities(a: ArrayLike | Array, n: int) -> NDArray[np.float64]:
    A = np.asarray(backend.to_host(a), dtype=float)
    if A.shape != (n,):
        raise VoxeldoseError(
            "there must be one activity per time point",
            tag="activities_bq",
            expected=f"{n} values",
            found=A.shape,
        )
    if not np.all(np.isfinite(A)):
        raise VoxeldoseError("activities must be finite", tag="activities_bq", found=A.tolist())
    if np.any(A < 0):
        raise VoxeldoseError("activities must not be negative", tag="activities_bq", found=A.tolist())
    if not np.any(A > 0):
        raise VoxeldoseError(
            "all activities are zero: there is nothing to integrate",
            tag="activities_bq",
            found=A.tolist(),
        )
    return A


def _one_point_error(model: str) -> VoxeldoseError:
    return VoxeldoseError(
        f"model {model!r} cannot be fitted to a single time point; use a single-time-point method "
        "('stp': stp_hanscheid near 96 h, or stp_madsen with a population effective half-life)",
        tag="times_s",
        expected="at least 2 time points",
        found=1,
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

#: A curve as fitted: ``((a, λ, Δ or None), …)`` with A(t) = Σ a e^{−λt}(1 − e^{−Δt}); Bq, s⁻¹, s⁻¹.
_Components: TypeAlias = tuple[tuple[float, float, float | None], ...]


@dataclass(frozen=True)
class _Model:
    """A sum of components, each ``a_j e^{−λ_s t}`` (no uptake) or ``a_j e^{−λ_s t}(1 − e^{−Δ t})``.

    θ = (ln a_1, …, ln a_m, u_1, …, u_r) with λ_1 = λ_phys + e^{u_1}, λ_{i+1} = λ_i + e^{u_{i+1}}.  The
    uptake excess Δ = λ_f − λ_s = Σ_{s < i ≤ f} e^{u_i} is computed from θ directly, and the component
    as −e^{−λ_s t}·expm1(−Δ t), so nearly equal rates do not cancel catastrophically.
    """

    name: str
    n_amp: int
    n_rates: int
    #: (amplitude index, slow-rate index, uptake-rate index or None) per component
    components: tuple[tuple[int, int, int | None], ...]
    param_names: tuple[str, ...]

    @property
    def k(self) -> int:
        return self.n_amp + self.n_rates


MODELS: dict[str, _Model] = {
    "monoexp": _Model("monoexp", 1, 1, ((0, 0, None),), ("A0_bq", "lambda_per_s")),
    "biexp": _Model("biexp", 1, 2, ((0, 0, 1),), ("A0_bq", "lambda1_per_s", "lambda2_per_s")),
    "triexp": _Model(
        "triexp",
        2,
        3,
        ((0, 0, 2), (1, 1, 2)),
        ("A1_bq", "A2_bq", "lambda1_per_s", "lambda2_per_s", "lambda3_per_s"),
    ),
}
#: Models ``"auto"`` may choose among (the trapezoid is its fallback).
AUTO_MODELS: tuple[str, ...] = ("monoexp", "biexp", "triexp")
_ALL_MODELS = (*AUTO_MODELS, "trapezoid", "auto")
#: Points each explicitly requested model needs (the exponentials: as many as parameters).
_MIN_POINTS = {"monoexp": 2, "biexp": 3, "triexp": 5, "trapezoid": 2}


@dataclass(frozen=True)
class _Unpacked:
    amps: NDArray[np.float64]  # a_j
    eu: NDArray[np.float64]  # e^{u_i}
    lam: NDArray[np.float64]  # λ_i

    def excess(self, s: int, f: int) -> float:
        return float(np.sum(self.eu[s + 1 : f + 1]))


def _unpack(model: _Model, th: NDArray[np.float64], lp: float) -> _Unpacked:
    amps = np.exp(th[: model.n_amp])
    eu = np.exp(th[model.n_amp :])
    return _Unpacked(amps, eu, lp + np.cumsum(eu))


def _components(model: _Model, p: _Unpacked) -> _Components:
    """((amplitude, rate, uptake excess Δ or None), …): A(t) = Σ a e^{−λt}(1 − e^{−Δt})."""
    return tuple(
        (float(p.amps[a]), float(p.lam[s]), None if f is None else p.excess(s, f)) for a, s, f in model.components
    )


def _eval_components(comps: _Components, t: Array, xp: ModuleType = np) -> Array:
    """Σ a e^{−λt}(1 − e^{−Δt}) at the times ``t`` (s), in the namespace ``xp`` of ``t``."""
    out = xp.zeros_like(t)
    for a, lam, d in comps:
        g = xp.exp(-lam * t)
        if d is not None:
            g = g * -xp.expm1(-d * t)
        out = out + a * g
    return out


def _tia_components(comps: _Components) -> float:
    """∫₀^∞ Σ a e^{−λt}(1 − e^{−Δt}) dt = Σ a (1/λ − 1/(λ + Δ)) = Σ a Δ / (λ (λ + Δ))."""
    return float(sum(a / lam if d is None else a * d / (lam * (lam + d)) for a, lam, d in comps))


def _exponentials(comps: _Components) -> tuple[tuple[float, float], ...]:
    """The same curve as Σ c_i e^{−k_i t}, coefficients of equal rates merged, slow → fast."""
    by_rate: dict[float, float] = {}
    for a, lam, d in comps:
        by_rate[lam] = by_rate.get(lam, 0.0) + a
        if d is not None:
            by_rate[lam + d] = by_rate.get(lam + d, 0.0) - a
    return tuple(sorted(((c, k) for k, c in by_rate.items()), key=lambda ck: ck[1]))


def _named(model: _Model, p: _Unpacked) -> dict[str, float]:
    vals = [*map(float, p.amps), *map(float, p.lam)]
    out = dict(zip(model.param_names, vals))
    if model.name == "monoexp":
        out["effective_half_life_s"] = LN2 / out["lambda_per_s"]
    elif model.name == "biexp":
        out["washout_half_life_s"] = LN2 / out["lambda1_per_s"]
        out["uptake_half_life_s"] = LN2 / out["lambda2_per_s"]
    return out


def _model_jacobian(model: _Model, th: NDArray[np.float64], t: NDArray[np.float64], lp: float) -> NDArray[np.float64]:
    """∂A(t_i)/∂θ_j for the stable component form."""
    p = _unpack(model, th, lp)
    J = np.zeros((t.size, model.k))
    for a, s, f in model.components:
        es = np.exp(-p.lam[s] * t)
        if f is None:
            g = es
            dg_dlam, dg_dd = -t * g, None
        else:
            d = p.excess(s, f)
            g = es * -np.expm1(-d * t)
            dg_dlam, dg_dd = -t * g, t * np.exp(-(p.lam[s] + d) * t)
        amp = p.amps[a]
        J[:, a] += amp * g  # ∂/∂ ln a
        for m in range(model.n_rates):
            col = model.n_amp + m
            if m <= s:  # λ_s depends on u_m
                J[:, col] += amp * dg_dlam * p.eu[m]
            if f is not None and s < m <= f:  # Δ depends on u_m
                J[:, col] += amp * dg_dd * p.eu[m]
    return J


def _loglin_slope(t: NDArray[np.float64], A: NDArray[np.float64]) -> float | None:
    m = A > 0
    if m.sum() < 2:
        return None
    tt, y, w = t[m], np.log(A[m]), A[m] / A[m].max()
    tm, ym = np.average(tt, weights=w), np.average(y, weights=w)
    den = np.sum(w * (tt - tm) ** 2)
    return float(-np.sum(w * (tt - tm) * (y - ym)) / den) if den > 0 else None


def _start_rates(model: _Model, t: NDArray[np.float64], A: NDArray[np.float64], lp: float) -> list[tuple[float, ...]]:
    """Deterministic starting rates (slow → fast) from the data."""

    def clip(k: float | None) -> float | None:
        if k is None or not math.isfinite(k):
            return None
        return min(max(k, lp * 1.02), _MAX_RATE_PER_S / 10)

    k_tail = clip(_loglin_slope(t[-2:], A[-2:]))
    k_all = clip(_loglin_slope(t, A))
    k_late = clip(_loglin_slope(t[len(t) // 2 :], A[len(t) // 2 :])) if len(t) >= 4 else None
    slow = sorted({k for k in (k_tail, k_all, k_late, lp * 1.05, lp * 2.0) if k is not None})
    fast = [f / t[0] for f in (0.5, 2.0, 8.0)]
    if model.n_rates == 1:
        # clip() of a finite rate is a float, never None
        return [(k,) for k in sorted(set(slow) | {cast(float, clip(3 * (k_all or lp)))})]
    if model.n_rates == 2:
        return [(k1, k2) for k1 in slow for k2 in sorted(set(fast) | {3 * k1}) if k2 > 1.05 * k1]
    out: list[tuple[float, ...]] = []
    for k1 in slow[:3]:
        for k3 in fast[1:]:
            if k3 <= 2 * k1:
                continue
            for frac in (0.3, 0.7):
                k2 = k1 * (k3 / k1) ** frac
                out.append((k1, k2, k3))
    return out


def _theta_from_start(
    model: _Model,
    rates: tuple[float, ...],
    t: NDArray[np.float64],
    A: NDArray[np.float64],
    w: NDArray[np.float64],
    lp: float,
    bounds: tuple[NDArray[np.float64], NDArray[np.float64]],
) -> NDArray[np.float64]:
    """θ at given starting rates, amplitudes from a weighted non-negative linear least-squares fit."""
    us, prev = [], lp
    for r in rates:
        us.append(math.log(max(r - prev, lp * _MIN_EXCESS_FRACTION * 10)))
        prev = r
    u = np.asarray(us)
    p = _unpack(model, np.concatenate([np.zeros(model.n_amp), u]), lp)
    cols = np.zeros((t.size, model.n_amp))
    for a, s_, f in model.components:
        g = np.exp(-p.lam[s_] * t)
        if f is not None:
            g = g * -np.expm1(-p.excess(s_, f) * t)
        cols[:, a] += g
    amps, _ = nnls(cols * w[:, None], A * w)
    amps = np.maximum(amps, float(A.max()) * 1e-6)
    th: NDArray[np.float64] = np.concatenate([np.log(amps), u])
    lo, hi = bounds
    span = hi - lo
    return np.clip(th, lo + 1e-6 * span, hi - 1e-6 * span)


def _bounds(model: _Model, A: NDArray[np.float64], lp: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    la = math.log(float(A.max()))
    n_amp = model.n_amp
    lo = [la - 40.0] * n_amp + [math.log(lp * _MIN_EXCESS_FRACTION)] * model.n_rates
    hi = [la + 40.0] * n_amp + [math.log(_MAX_RATE_PER_S)] * model.n_rates
    return np.asarray(lo), np.asarray(hi)


def _aicc(rss: float, n: int, k: int) -> float | None:
    if n <= k + 1:
        return None
    s2 = max(rss / n, RELATIVE_RESIDUAL_FLOOR**2)
    return n * math.log(s2) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _r2(fit: NDArray[np.float64], A: NDArray[np.float64]) -> float | None:
    ss_tot = float(np.sum((A - A.mean()) ** 2))
    if ss_tot <= 0:
        return None
    return 1.0 - float(np.sum((fit - A) ** 2)) / ss_tot


@dataclass(frozen=True)
class _Candidate:
    model: str
    success: bool
    message: str
    tia_bqs: float | None = None
    aicc: float | None = None
    params: dict[str, float] | None = None
    comps: _Components | None = None
    rss: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "aicc": _json_float(self.aicc),
            "tia_bqs": _json_float(self.tia_bqs),
            "params": None if self.params is None else {k: _json_float(v) for k, v in self.params.items()},
            "success": self.success,
            "message": self.message,
        }


class _ExactFit(Exception):
    """Raised inside the residual function once the data are reproduced to round-off."""


def _fit_exponential(
    model: _Model, t: NDArray[np.float64], A: NDArray[np.float64], w: NDArray[np.float64], lp: float
) -> _Candidate:
    bounds = _bounds(model, A, lp)
    exact_ss = t.size * _EXACT_RELATIVE_RMS**2
    hit: dict[str, NDArray[np.float64]] = {}

    def resid(th: NDArray[np.float64]) -> NDArray[np.float64]:
        r: NDArray[np.float64] = (_eval_components(_components(model, _unpack(model, th, lp)), t) - A) * w
        if float(r @ r) < exact_ss:  # the data are reproduced exactly: nothing left to improve
            hit["x"], hit["fun"] = th.copy(), r
            raise _ExactFit
        return r

    def jac(th: NDArray[np.float64]) -> NDArray[np.float64]:
        return _model_jacobian(model, th, t, lp) * w[:, None]

    early = np.geomspace(t[0] * 1e-3, t[0], 64)
    peak_limit = _MAX_EARLY_PEAK_RATIO * float(A.max())

    def early_peak(x: NDArray[np.float64]) -> float:
        return float(np.max(_eval_components(_components(model, _unpack(model, x, lp)), early)))

    # best = lowest cost among plausible fits (no unmeasured early peak), else lowest cost overall
    best: OptimizeResult | None = None
    best_key: tuple[bool, float] | None = None
    for rates in _start_rates(model, t, A, lp):
        th0 = _theta_from_start(model, rates, t, A, w, lp, bounds)
        try:
            res = least_squares(
                resid,
                th0,
                bounds=bounds,
                method="trf",
                jac=jac,
                ftol=1e-15,
                xtol=1e-15,
                gtol=1e-15,
                max_nfev=_MAX_NFEV_PER_PARAM * model.k,
            )
        except _ExactFit:
            r = hit["fun"]
            res = OptimizeResult(
                x=hit["x"],
                fun=r,
                cost=0.5 * float(r @ r),
                status=5,
                message=f"exact fit (relative residual RMS < {_EXACT_RELATIVE_RMS:g})",
            )
        except (ValueError, FloatingPointError):  # pragma: no cover - defensive
            continue
        if not np.all(np.isfinite(res.fun)):
            continue
        key = (early_peak(res.x) > peak_limit, res.cost)
        if best_key is None or key < best_key:  # best and best_key are None together
            best, best_key = res, key
        if res.status == 5 and not key[0]:
            break  # exact and plausible: nothing better exists
    if best is None or best_key is None:
        return _Candidate(model.name, False, "no start converged to a finite fit")
    p = _unpack(model, best.x, lp)
    comps = _components(model, p)
    tia = _tia_components(comps)
    rss = float(np.sum(best.fun**2))
    # status 0 = evaluation budget used up: still the best curve found, reported as such
    ok = bool(best.status >= 0) and math.isfinite(tia) and tia > 0
    msg = str(best.message) if best.status != 0 else f"best of the starts, evaluation budget used ({best.message})"
    if not ok:
        msg = f"fit rejected: {best.message}; TIA {tia!r}"
    elif best_key[0]:
        ok = False
        msg = (
            f"implausible: the curve peaks at {early_peak(best.x):.4g} Bq before the first scan ({_h(t[0])}), "
            f"> {_MAX_EARLY_PEAK_RATIO:g} × the largest measured activity ({float(A.max()):.4g} Bq)"
        )
    return _Candidate(
        model.name,
        ok,
        msg,
        tia,
        _aicc(rss, len(t), model.k),
        _named(model, p),
        comps,
        rss,
    )


def _trapezoid_parts(t: NDArray[np.float64], A: NDArray[np.float64], lp: float) -> dict[str, float]:
    uptake = 0.5 * A[0] * t[0]
    measured = float(np.sum(0.5 * (A[1:] + A[:-1]) * np.diff(t)))
    tail = A[-1] / lp
    return {
        "tia_uptake_bqs": float(uptake),
        "tia_measured_bqs": measured,
        "tia_tail_bqs": float(tail),
        "tail_rate_per_s": lp,
    }


def _json_float(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """One VOI's time–activity fit.

    ``params`` are named and in SI (Bq, s⁻¹, s).  ``exponentials`` is ``((c_i, k_i), ...)`` with
    A(t) = Σ c_i e^{−k_i t} for the exponential models, ``None`` for the trapezoid, whose curve is in
    ``piecewise`` instead.  ``components`` is the same curve as fitted, ``((a, λ, Δ or None), …)`` with
    A(t) = Σ a e^{−λt}(1 − e^{−Δt}), free of the cancellation the Σ c e^{−kt} form has when rates are
    nearly equal (:meth:`activity` uses it).  ``tia_bqs`` is the analytic integral from 0 to ∞.  ``residuals`` are
    fit − measured in Bq at each time point; ``aicc`` (``None`` where n ≤ k + 1 or for the trapezoid)
    uses relative residuals; ``r2`` is 1 − SS_res/SS_tot on the activities.  ``candidates`` has, for
    each model tried or considered, its ``aicc``, ``tia_bqs``, ``params``, ``success`` and ``message``.
    """

    model: str
    params: dict[str, float]
    tia_bqs: float
    exponentials: tuple[tuple[float, float], ...] | None
    aicc: float | None
    r2: float | None
    residuals: tuple[float, ...]
    n_points: int
    candidates: dict[str, dict[str, Any]]
    message: str
    times_s: tuple[float, ...] = ()
    activities_bq: tuple[float, ...] = ()
    decay_constant_per_s: float = float("nan")
    piecewise: dict[str, Any] | None = None
    components: _Components | None = None
    weighting: str = "relative (1/A): constant coefficient of variation"

    def activity(self, t_s: ArrayLike | Array) -> Array:
        """The fitted curve A(t) at ``t_s`` (scalar or NumPy/CuPy array of times in s)."""
        xp = backend.xp_for(t_s)
        t = xp.asarray(t_s, dtype=float)
        if self.components is not None:
            return _eval_components(self.components, t, xp)
        if self.exponentials is not None:
            return _eval_components(tuple((c, k, None) for c, k in self.exponentials), t, xp)
        piecewise = cast("dict[str, Any]", self.piecewise)  # the trapezoid: no exponentials, a piecewise curve
        knots = xp.asarray(piecewise["knots_s"], dtype=float)
        vals = xp.asarray(piecewise["activities_bq"], dtype=float)
        tail = piecewise["tail"]
        inside = xp.interp(t, knots, vals)
        after = tail["activity_bq"] * xp.exp(-tail["rate_per_s"] * (t - tail["from_s"]))
        return xp.where(t <= tail["from_s"], xp.where(t < 0, 0.0, inside), after)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (non-finite numbers as ``None``)."""
        return {
            "model": self.model,
            "params": {k: _json_float(v) for k, v in self.params.items()},
            "tia_bqs": _json_float(self.tia_bqs),
            "exponentials": None
            if self.exponentials is None
            else [
                {
                    "coefficient_bq": _json_float(c),
                    "rate_per_s": _json_float(k),
                    "half_life_s": _json_float(LN2 / k),
                }
                for c, k in self.exponentials
            ],
            "piecewise": self.piecewise,
            "components": None
            if self.components is None
            else [
                {
                    "amplitude_bq": _json_float(a),
                    "rate_per_s": _json_float(k),
                    "uptake_excess_rate_per_s": _json_float(d),
                }
                for a, k, d in self.components
            ],
            "aicc": _json_float(self.aicc),
            "r2": _json_float(self.r2),
            "residuals_bq": [_json_float(r) for r in self.residuals],
            "n_points": self.n_points,
            "times_s": list(self.times_s),
            "activities_bq": list(self.activities_bq),
            "decay_constant_per_s": _json_float(self.decay_constant_per_s),
            "weighting": self.weighting,
            "candidates": self.candidates,
            "message": self.message,
        }


# ---------------------------------------------------------------------------------------------
# VOI fit
# ---------------------------------------------------------------------------------------------


class _Common(TypedDict):
    """The fields every :class:`FitResult` of one call shares."""

    n_points: int
    times_s: tuple[float, ...]
    activities_bq: tuple[float, ...]
    decay_constant_per_s: float


def fit_voi(
    times_s: Sequence[float] | NDArray[np.floating[Any]],
    activities_bq: Sequence[float] | NDArray[np.floating[Any]],
    *,
    decay_constant_per_s: float,
    model: str = "auto",
) -> FitResult:
    """Fit a VOI time–activity curve and integrate it from 0 to ∞ (see the module docstring).

    ``model``: ``"auto"`` (AICc among the exponentials with k < n − 1, trapezoid as fallback),
    ``"monoexp"`` (≥ 2 points), ``"biexp"`` (≥ 3), ``"triexp"`` (≥ 5) or ``"trapezoid"`` (≥ 2).
    Raises :class:`VoxeldoseError` for unordered/duplicated/non-positive times, negative or
    non-finite activities, too few points (one point: use a single-time-point method).
    """
    lp = _check_decay_constant(decay_constant_per_s)
    if model not in _ALL_MODELS:
        raise VoxeldoseError(
            "unknown time–activity model",
            tag="model",
            expected=" | ".join(_ALL_MODELS),
            found=model,
        )
    t = _check_times(times_s)
    A = _check_activities(activities_bq, t.size)
    n = t.size
    if n == 1:
        raise _one_point_error(model)
    if model != "auto" and n < _MIN_POINTS[model]:
        raise VoxeldoseError(
            f"model {model!r} needs at least {_MIN_POINTS[model]} time points, got {n}",
            tag="model",
            expected=f"≥ {_MIN_POINTS[model]} time points, or a model with fewer parameters",
            found=[_h(x) for x in t],
        )
    w = 1.0 / np.maximum(A, _ZERO_WEIGHT_FRACTION * A.max())

    candidates: dict[str, _Candidate] = {}
    if model == "auto":
        for name in AUTO_MODELS:
            m = MODELS[name]
            if m.k < n - 1:
                candidates[name] = _fit_exponential(m, t, A, w, lp)
            else:
                candidates[name] = _Candidate(
                    name,
                    False,
                    f"not fitted: AICc needs more than k + 1 = {m.k + 1} points, have {n}",
                )
        ok = [c for c in candidates.values() if c.success and c.aicc is not None]
        mono3 = _fit_exponential(MODELS["monoexp"], t, A, w, lp) if (not ok and n == 3) else None
        if ok:
            chosen = min(ok, key=lambda c: (c.aicc, MODELS[c.model].k))
            aicc_chosen = cast(float, chosen.aicc)  # ok holds only candidates with an AICc
            others = ", ".join(
                f"{c.model} ΔAICc={cast(float, c.aicc) - aicc_chosen:+.2f}" for c in ok if c is not chosen
            )
            message = f"auto: {chosen.model} chosen by AICc" + (f" ({others})" if others else "")
        elif mono3 is not None and mono3.success:
            # Three points: no model has a defined AICc (n − k − 1 = 0 for the mono-exponential), but
            # the mono-exponential keeps one residual degree of freedom.  It is preferred to the
            # trapezoid, whose straight segments over the usual 1–3-day gaps overestimate a decaying
            # curve by tens of per cent.
            candidates["monoexp"] = mono3
            chosen = mono3
            message = "auto: three points — monoexp (one residual degree of freedom; AICc undefined, no comparison)"
        else:
            chosen = None
            message = "auto: no exponential model could be fitted; trapezoid with physical-decay tail (fallback)"
    elif model == "trapezoid":
        chosen, message = None, "trapezoid requested"
    else:
        chosen = _fit_exponential(MODELS[model], t, A, w, lp)
        candidates[model] = chosen
        if not chosen.success and not chosen.message.startswith("implausible"):
            raise VoxeldoseError(
                f"the {model} fit did not converge ({chosen.message})",
                tag="model",
                expected="data a " + model + " curve can describe, or model='auto'",
                found=[f"{_h(ti)}: {ai:.4g} Bq" for ti, ai in zip(t, A)],
            )
        message = (
            f"{model} requested: {chosen.message}" if chosen.success else f"{model} requested; WARNING {chosen.message}"
        )

    common: _Common = {
        "n_points": n,
        "times_s": tuple(float(x) for x in t),
        "activities_bq": tuple(float(x) for x in A),
        "decay_constant_per_s": lp,
    }
    if chosen is None:
        parts = _trapezoid_parts(t, A, lp)
        tia = parts["tia_uptake_bqs"] + parts["tia_measured_bqs"] + parts["tia_tail_bqs"]
        trap = _Candidate(
            "trapezoid",
            True,
            "trapezoid from (0, 0), physical-decay tail",
            tia,
            None,
            parts,
        )
        summaries = {k: c.summary() for k, c in candidates.items()}
        summaries["trapezoid"] = trap.summary()
        piecewise = {
            "knots_s": [0.0, *map(float, t)],
            "activities_bq": [0.0, *map(float, A)],
            "interpolation": "linear from A(0) = 0 through the measured points",
            "tail": {
                "from_s": float(t[-1]),
                "activity_bq": float(A[-1]),
                "rate_per_s": lp,
            },
        }
        return FitResult(
            model="trapezoid",
            params=parts,
            tia_bqs=tia,
            exponentials=None,
            aicc=None,
            r2=None,
            residuals=tuple(0.0 for _ in t),
            candidates=summaries,
            message=message,
            piecewise=piecewise,
            **common,
        )
    # a chosen exponential candidate is a finished fit: its components, parameters and TIA are set
    comps = cast(_Components, chosen.comps)
    fit: NDArray[np.float64] = _eval_components(comps, t)
    return FitResult(
        model=chosen.model,
        params=dict(cast("dict[str, float]", chosen.params)),
        tia_bqs=float(cast(float, chosen.tia_bqs)),
        exponentials=_exponentials(comps),
        components=comps,
        aicc=chosen.aicc,
        r2=_r2(fit, A),
        residuals=tuple(float(x) for x in fit - A),
        candidates={k: c.summary() for k, c in candidates.items()},
        message=message,
        **common,
    )


# ---------------------------------------------------------------------------------------------
# Voxel-wise TIA
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoxelTIA:
    """Voxel-wise TIA with its quality maps (arrays in the namespace of the input stack).

    ``tia``: time-integrated activity per voxel (input unit × s).  ``quality``: fraction of each voxel's
    TIA in the extrapolated tail after the last scan (0 where TIA is 0).  ``flags`` (int8):
    :data:`FLAG_FIT` 0 = fitted tail/curve, :data:`FLAG_PHYSICAL` 1 = physical-decay tail,
    :data:`FLAG_NO_DATA` 2 = no positive value at any time point (TIA 0).
    """

    tia: Array
    quality: Array
    flags: Array
    method: str = "hybrid"

    def flag_counts(self) -> dict[str, int]:
        """Number of voxels per flag (host ints), for provenance and reports."""
        xp = backend.xp_for(self.flags)
        return {
            "fit": int(xp.count_nonzero(self.flags == FLAG_FIT)),
            "physical_decay_tail": int(xp.count_nonzero(self.flags == FLAG_PHYSICAL)),
            "no_positive_data": int(xp.count_nonzero(self.flags == FLAG_NO_DATA)),
        }


def _weighted_loglin(xp: ModuleType, A: Array, tb: Array, floor: float) -> tuple[Array, Array, Array]:
    """Per-voxel weighted LS of ln A on t (weights ∝ A): returns (slope k, intercept ln A0, all_positive)."""
    pos = floor < A
    Ac = xp.where(pos, A, floor)  # clip before the log; clipped voxels are discarded by the caller
    y = xp.log(Ac)
    w = Ac
    sw = xp.sum(w, axis=0)
    tm = xp.sum(w * tb, axis=0) / sw
    ym = xp.sum(w * y, axis=0) / sw
    dt = tb - tm
    sxx = xp.sum(w * dt * dt, axis=0)
    k = -xp.sum(w * dt * (y - ym), axis=0) / sxx
    return k, ym + k * tm, xp.all(pos, axis=0)


def voxel_tia(
    stack: Array,
    times_s: Sequence[float] | NDArray[np.floating[Any]],
    *,
    decay_constant_per_s: float,
    method: str = "hybrid",
    tail_points: int = 2,
    min_activity: float = 0.0,
) -> VoxelTIA:
    """Voxel-wise TIA of ``stack[n_t, k, j, i]`` (any activity unit per voxel) at ``times_s``.

    ``method="hybrid"``: trapezoid from (0, 0) through the scans + mono-exponential tail through the
    last ``tail_points`` points; ``method="exponential"``: the same with exponential interpolation
    between scans (exact for mono-exponential segments); ``method="monoexp"``: weighted log-linear fit through all points.
    Physical-decay fallback and flags as in the module docstring.  Computed in the namespace of
    ``stack`` (NumPy or CuPy) in float32 or float64 (its dtype promoted to at least float32), without
    loops over voxels.
    """
    lp = _check_decay_constant(decay_constant_per_s)
    if method not in ("hybrid", "exponential", "monoexp"):
        raise VoxeldoseError(
            "unknown voxel TIA method",
            tag="method",
            expected="'hybrid', 'exponential' or 'monoexp'",
            found=method,
        )
    t_host = _check_times(times_s)
    xp = backend.xp_for(stack)
    shape = tuple(stack.shape)
    n = t_host.size
    if len(shape) < 1 or shape[0] != n:
        raise VoxeldoseError(
            "the activity stack must have one image per time point along its first axis",
            tag="stack",
            expected=f"shape ({n}, k, j, i)",
            found=shape,
        )
    if n == 1:
        raise _one_point_error(method)
    if not (2 <= tail_points <= n):
        raise VoxeldoseError(
            "tail_points must be between 2 and the number of time points",
            tag="tail_points",
            found=tail_points,
        )
    dtype = xp.result_type(stack.dtype, xp.float32)  # float32/float64 kept, float16/ints promoted
    A = xp.asarray(stack, dtype=dtype)
    if not bool(xp.all(xp.isfinite(A))):
        bad = int(xp.count_nonzero(~xp.isfinite(A)))
        raise VoxeldoseError(
            f"the activity stack has {bad} non-finite voxel value(s) (NaN or ±inf)",
            tag="stack",
            expected="finite activities",
        )
    floor = max(float(min_activity), float(np.finfo(np.dtype(str(dtype))).tiny))
    t = xp.asarray(t_host, dtype=dtype)
    tb = t.reshape((n,) + (1,) * (A.ndim - 1))

    Ap = xp.maximum(A, 0)
    dt = (t[1:] - t[:-1]).reshape((n - 1,) + (1,) * (A.ndim - 1))
    if method == "exponential":
        # Piecewise exponential interpolation between consecutive scans: on [t1, t2] the curve
        # A1·(A2/A1)^((t−t1)/Δt) integrates to (A2 − A1)·Δt / ln(A2/A1) — exact wherever the
        # kinetics are mono-exponential between scans (washout after uptake), where the trapezoid
        # overestimates a convex decay (e.g. +7 % over a 72 h gap at T_eff = 52 h).  Segments with a
        # non-positive end or a ratio within 1e-6 of 1 use the trapezoid.  From 0 to the first scan:
        # linear uptake from A(0) = 0, as in the hybrid method.
        a1, a2 = Ap[:-1], Ap[1:]
        both = (a1 > floor) & (a2 > floor)
        r = xp.log(xp.where(both, a2, 1.0) / xp.where(both, a1, 1.0))
        use_exp = both & (xp.abs(r) > 1e-6)
        seg = xp.where(use_exp, (a2 - a1) * dt / xp.where(use_exp, r, 1.0), 0.5 * (a1 + a2) * dt)
        trap = 0.5 * Ap[0] * t[0] + xp.sum(seg, axis=0)
    else:
        trap = 0.5 * Ap[0] * t[0] + xp.sum(0.5 * (Ap[1:] + Ap[:-1]) * dt, axis=0)
    no_data = ~xp.any(A > 0, axis=0)

    k, _, pos = _weighted_loglin(xp, A[-tail_points:], tb[-tail_points:], floor)
    ok = pos & xp.isfinite(k) & (k >= lp)
    a_last = Ap[-1]
    tail = xp.where(ok, a_last / xp.where(ok, k, 1.0), a_last / lp)
    tia = trap + tail
    tail_frac = tail / xp.where(tia > 0, tia, 1.0)

    if method == "monoexp":
        k_all, ln_a0, pos_all = _weighted_loglin(xp, A, tb, floor)
        ok_m = pos_all & xp.isfinite(k_all) & (k_all >= lp)
        k_safe = xp.where(ok_m, k_all, 1.0)
        tia_m = xp.exp(xp.where(ok_m, ln_a0, 0.0)) / k_safe
        frac_m = xp.exp(-k_safe * t[-1])
        phys = a_last / lp
        tia = xp.where(ok_m, tia_m, trap + phys)
        tail_frac = xp.where(ok_m, frac_m, phys / xp.where(trap + phys > 0, trap + phys, 1.0))
        ok = ok_m

    zero = xp.zeros((), dtype=dtype)
    tia = xp.where(no_data, zero, tia).astype(dtype, copy=False)
    tail_frac = xp.where(no_data | ~(tia > 0), zero, tail_frac).astype(dtype, copy=False)
    flags = xp.where(no_data, FLAG_NO_DATA, xp.where(ok, FLAG_FIT, FLAG_PHYSICAL)).astype(xp.int8)
    return VoxelTIA(tia=tia, quality=tail_frac, flags=flags, method=method)


# ---------------------------------------------------------------------------------------------
# Single time point
# ---------------------------------------------------------------------------------------------


def _check_scan_time(t_s: float) -> float:
    try:
        t = float(t_s)
    except (TypeError, ValueError):
        raise VoxeldoseError("the scan time must be one number (s after injection)", tag="t_s", found=t_s) from None
    if not (math.isfinite(t) and t > 0):
        raise VoxeldoseError(
            "the scan time must be finite and after the injection",
            tag="t_s",
            expected="t > 0 s",
            found=t_s,
        )
    return t


@overload
def stp_hanscheid(activity: float, t_s: float) -> float: ...
@overload
def stp_hanscheid(activity: Array, t_s: float) -> Array: ...
def stp_hanscheid(activity: Array | float, t_s: float) -> Array | float:
    """Single-time-point TIA after Hänscheid et al. 2018 (J Nucl Med 59:75): A(t)·2t/ln 2.

    Exact for a mono-exponential whose effective half-life equals t or t/2, at most 6.2 % high for
    T_eff between t/2 and t, and increasingly low outside that range (module docstring).  Intended for a
    scan about 4 days (96 h) after injection.  ``activity``: scalar or NumPy/CuPy array (any unit);
    the result has the same type and unit × s.
    """
    t = _check_scan_time(t_s)
    return activity * (2.0 * t / LN2)


@overload
def stp_madsen(activity: float, t_s: float, effective_half_life_s: float) -> float: ...
@overload
def stp_madsen(activity: Array | float, t_s: float, effective_half_life_s: Array | float) -> Array: ...
def stp_madsen(activity: Array | float, t_s: float, effective_half_life_s: Array | float) -> Array | float:
    """Single-time-point TIA after Madsen et al. 2018 (Med Phys 45:2318): A(t)·e^{λ_eff t}/λ_eff.

    ``effective_half_life_s``: population effective half-life T_eff (scalar, or an array broadcastable to
    ``activity``, e.g. a per-VOI map), λ_eff = ln 2/T_eff.  Exact for a mono-exponential with that T_eff.
    No default population values ship with voxeldose: pass the ones for your radiopharmaceutical,
    organ and protocol.
    """
    t = _check_scan_time(t_s)
    if backend.device_of(effective_half_life_s) == "cpu" and np.ndim(effective_half_life_s) == 0:
        T = float(effective_half_life_s)
        if not (math.isfinite(T) and T > 0):
            raise VoxeldoseError(
                "the population effective half-life must be finite and positive",
                tag="effective_half_life_s",
                expected="T_eff in s",
                found=effective_half_life_s,
            )
        lam = LN2 / T
        return activity * (math.exp(lam * t) / lam)
    xp = backend.xp_for(effective_half_life_s)
    T = effective_half_life_s
    if not bool(xp.all(xp.isfinite(T) & (T > 0))):
        raise VoxeldoseError(
            "every population effective half-life must be finite and positive",
            tag="effective_half_life_s",
            expected="T_eff in s",
        )
    lam = LN2 / T
    return activity * (xp.exp(lam * t) / lam)


def stp_prior_factor(t_s: float, exponentials: Sequence[tuple[float, float]]) -> float:
    """TIA / A(t) of an earlier cycle's fitted curve A₁(t) = Σ c_i e^{−k_i t}: (Σ c_i/k_i) / A₁(t), in s.

    ``exponentials``: ``((c_i, k_i), …)`` with k_i in s⁻¹ (c_i in any unit; only the shape matters — an
    uptake term has a negative c_i).  For one exponential this is e^{λt}/λ.  The curve must be positive at
    ``t_s`` and have a positive integral, every rate positive and finite (module docstring: references).
    """
    t = _check_scan_time(t_s)
    terms = [(float(c), float(k)) for c, k in exponentials]
    if not terms:
        raise VoxeldoseError("the earlier cycle's curve has no exponential terms", tag="exponentials")
    for c, k in terms:
        if not (math.isfinite(c) and math.isfinite(k) and k > 0):
            raise VoxeldoseError(
                "every term of the earlier cycle's curve needs a finite coefficient and a positive finite rate",
                tag="exponentials",
                expected="(coefficient, rate in 1/s > 0)",
                found=(c, k),
            )
    integral = sum(c / k for c, k in terms)
    at_t = sum(c * math.exp(-k * t) for c, k in terms)
    if not (integral > 0 and at_t > 0):
        raise VoxeldoseError(
            f"the earlier cycle's curve is not positive at the scan time {t / 3600:.1f} h (or has no positive "
            "integral): it cannot be scaled to this scan",
            tag="exponentials",
            expected="a curve with A(t) > 0 and a positive integral",
        )
    return integral / at_t


@overload
def stp_prior(activity: float, t_s: float, exponentials: Sequence[tuple[float, float]]) -> float: ...
@overload
def stp_prior(activity: Array, t_s: float, exponentials: Sequence[tuple[float, float]]) -> Array: ...
def stp_prior(activity: Array | float, t_s: float, exponentials: Sequence[tuple[float, float]]) -> Array | float:
    """Single-time-point TIA from the patient's own earlier-cycle curve: A(t)·:func:`stp_prior_factor`.

    ``activity``: this cycle's activity at ``t_s`` (scalar or NumPy/CuPy array, any unit); the result has the
    same type and unit × s.  Exact when the earlier cycle's kinetics repeat (module docstring).
    """
    return activity * stp_prior_factor(t_s, exponentials)
