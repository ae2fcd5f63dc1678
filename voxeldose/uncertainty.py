"""Per-VOI uncertainty budget of activity, TIA, mean absorbed dose, BED and EQD2 (first-order propagation).

The propagation follows the EANM guidance: Gear JI, Cox MG, Gustafsson J, et al., "EANM practical guidance on
uncertainty analysis for molecular radiotherapy absorbed dose calculations", Eur J Nucl Med Mol Imaging
2018;45:2456–2474, and the GUM (JCGM 100:2008, "Evaluation of measurement data — Guide to the expression of
uncertainty in measurement"): every input gets a standard uncertainty u, outputs get u from the law of
propagation of uncertainty (GUM eq. 10/13, sensitivity coefficients and covariances), and the expanded
uncertainty is U = k·u with k = 2, read as a ≈ 95 % interval on the assumption that the output is close to
normally distributed (GUM 6.2–6.3).

Components (each named in the budget, with its relative standard uncertainty or ``None`` = not stated):

``calibration``  the camera's volume sensitivity: ``sensitivity_u_cps_per_mbq / sensitivity_cps_per_mbq`` of the
                 job's camera profile.  Without a profile the job's calibration factor has no stated
                 uncertainty, and none is invented: the component is ``None`` ("not stated") and the
                 combined value is then a lower bound (said in ``notes``).
``counting``     Poisson noise of the VOI's counts at each scan, N = A·S·T (activity in MBq, sensitivity S in
                 cps/MBq, acquisition duration T in s), u(A)/A = 1/√N.  A *lower bound*: OSEM's noise is
                 correlated between voxels and grows with iterations, so a VOI's reconstructed activity scatters
                 more than the Poisson counts it holds.
``recovery``     the partial-volume correction: for ``rc`` the recovery fit's ``rc_u(V)/rc(V)`` at the VOI's volume
                 (:meth:`voxeldose.camera.RecoveryFit.rc_u`); for ``gtm``/``rbv`` the corrected activity's
                 response to the profile's FWHM uncertainty, the correction rerun at FWHM ± u on the reference scan
                 (``voxeldose.pipeline._fwhm_sensitivity``; ``None`` when the profile states no u(FWHM)); without a
                 correction the recovery is not part of the measurement model (``None``, "not applied").
``scan time``    the time of each scan after injection, u(t) = :data:`DEFAULT_SCAN_TIME_U_S` (voxeldose's stated
                 default, not a published value; Gear et al. 2018 treat each measurement time as an input with
                 its own uncertainty), carried to the activity as |dA/dt|·u(t) on the fitted curve.
``time–activity fit``  the residual scatter the stated inputs do not explain: when the fit has residual degrees of
                 freedom (n > k) and its reduced χ² with the stated per-scan uncertainties exceeds 1, the
                 propagated TIA variance is scaled by χ²_ν (a Birge-ratio scaling; the excess is this component).
``delineation``  the VOI's outline ±1 voxel layer (the approach of Gear et al. 2018), the ±1 layer read as the
                 limits of a rectangular distribution (GUM 4.3.7).  In a run: the mean dose over the VOI grown
                 and shrunk by one layer (:func:`delineation_dose_relative_u`; it sees the dose gradient at the
                 border).  Without a dose map: the volume change over the surface of the sphere of equal volume,
                 u(V) = S·d/√3, through the mass, D = E/m (:func:`delineation_relative_u`; pessimistic for a
                 uniformly loaded organ, whose mean dose hardly depends on its outline).
``dose factor``  the kernel's energy deposition data: not stated (``None``).

Time–activity propagation.  Counting noise and scan time are independent between scans; they reach the TIA
through the fit: the estimator's sensitivity ∂TIA/∂A_i = gᵀ (JᵀMJ)⁻¹ JᵀM (J = ∂A(t_i)/∂p in the natural
parameters — amplitudes and rates —, M the fit's weights 1/A_i², g = ∂TIA/∂p; the Gauss–Newton linearisation,
exact for a fit through its points), so u²(TIA) = sᵀ Σ s with the full covariance of the parameters,
correlations included.  Calibration and recovery are common to every scan (fully correlated): they scale every
activity by the same factor, hence the TIA and the dose by that factor, and enter as relative components
directly.  The mean dose takes the TIA's relative uncertainty (self-dose, dose ∝ TIA / mass) and the delineation's.
Rate constraints (λ ≥ λ_phys) are ignored by the linearisation: at the bound it overstates the TIA's spread.

BED = D + G D²/(α/β) with G held fixed: u(BED) = (1 + 2 G D/(α/β)) u(D); EQD2 = BED/(1 + 2/(α/β)) has the same
relative uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .errors import VoxeldoseError
from .timeactivity import MODELS, FitResult

__all__ = [
    "COVERAGE_FACTOR",
    "DEFAULT_SCAN_TIME_U_S",
    "BudgetComponent",
    "Estimate",
    "VoiBudget",
    "counting_relative_u",
    "delineation_dose_relative_u",
    "delineation_relative_u",
    "fit_parameter_covariance",
    "scan_time_activity_u",
    "tia_sensitivities",
    "tia_variance",
    "voi_budget",
]

#: Coverage factor of the expanded uncertainty (≈ 95 % for a normal distribution, GUM 6.3.3).
COVERAGE_FACTOR = 2.0
#: Standard uncertainty of a scan's time after injection, s (voxeldose's stated default: 5 min).
DEFAULT_SCAN_TIME_U_S = 300.0


@dataclass(frozen=True)
class Estimate:
    """A value with its standard uncertainty ``u`` (same unit) and the expanded interval value ± k·u."""

    value: float
    u: float | None
    k: float = COVERAGE_FACTOR

    @property
    def relative_u(self) -> float | None:
        return None if self.u is None or self.value == 0 else self.u / abs(self.value)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The ≈ 95 % interval (value − k·u, value + k·u), or ``None`` without a stated u."""
        return None if self.u is None else (self.value - self.k * self.u, self.value + self.k * self.u)


@dataclass(frozen=True)
class BudgetComponent:
    """One named input of the budget: its relative standard uncertainty contributed to the mean dose
    (``None``: not stated or not evaluated, said in ``how``) and what it is."""

    name: str
    relative_u: float | None
    how: str


@dataclass(frozen=True)
class VoiBudget:
    """One VOI's uncertainty budget: the activity at each scan, the TIA, the mean dose (and BED, EQD2)."""

    components: tuple[BudgetComponent, ...]
    activities_bq: tuple[Estimate, ...]
    tia_bqs: Estimate
    mean_gy: Estimate
    bed_gy: Estimate | None = None
    eqd2_gy: Estimate | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def component(self, name: str) -> BudgetComponent:
        return next(c for c in self.components if c.name == name)


# ---------------------------------------------------------------------------------------------- inputs
def counting_relative_u(
    activities_bq: Sequence[float] | NDArray[np.float64], cps_per_mbq: float, durations_s: Sequence[float]
) -> NDArray[np.float64]:
    """Relative Poisson uncertainty 1/√N of a VOI's counts N = A[MBq]·S[cps/MBq]·T[s] at each scan.

    A lower bound for an OSEM image (its noise is correlated and amplified by the iterations).  A scan whose VOI
    holds no counts gets ``inf``.
    """
    a = np.asarray(activities_bq, dtype=np.float64)
    t = np.asarray(durations_s, dtype=np.float64)
    if not (math.isfinite(cps_per_mbq) and cps_per_mbq > 0):
        raise VoxeldoseError("the counting noise needs the camera's sensitivity", tag="cps_per_mbq", found=cps_per_mbq)
    if t.shape != a.shape or np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise VoxeldoseError(
            "the counting noise needs one positive acquisition duration per scan",
            tag="acquisition_duration_s",
            expected=f"{a.size} durations > 0 s",
            found=t.tolist(),
        )
    n = a / 1e6 * cps_per_mbq * t
    with np.errstate(divide="ignore"):
        out: NDArray[np.float64] = np.where(n > 0, 1.0 / np.sqrt(np.maximum(n, 1e-300)), np.inf)
    return out


def delineation_relative_u(volume_ml: float, voxel_size_mm: Sequence[float]) -> float:
    """u(V)/V for a ±1 voxel-layer uncertainty of the VOI's outline (rectangular, u = S·d/√3; GUM 4.3.7).

    S is the surface of the sphere of the VOI's volume (the smallest surface for that volume, so a lower
    bound for an irregular organ), d the arithmetic mean voxel size.
    """
    if not (math.isfinite(volume_ml) and volume_ml > 0):
        raise VoxeldoseError("the VOI volume must be positive", tag="volume_ml", found=volume_ml)
    d_mm = float(np.mean(np.asarray(voxel_size_mm, dtype=np.float64)))
    v_mm3 = volume_ml * 1000.0
    s_mm2 = float((36.0 * math.pi * v_mm3 * v_mm3) ** (1.0 / 3.0))
    return s_mm2 * d_mm / math.sqrt(3.0) / v_mm3


def delineation_dose_relative_u(
    dose_gy: NDArray[np.float64], fraction: NDArray[np.float64], density: NDArray[np.float64] | None = None
) -> float | None:
    """Relative u of a VOI's mean dose from its outline: the mean dose (mass-weighted with ``density``) over the VOI
    (voxels with fraction ≥ ½) grown by one voxel layer, D₊, and shrunk by one, D₋, the ±1 layer read as the
    limits of a rectangular distribution: u = |D₊ − D₋| / (2√3) / D (GUM 4.3.7).  Unlike the mass model it sees
    the dose gradient at the border (a uniform organ's mean dose hardly changes with its outline; a blurred
    one's does).  A VOI too thin to shrink uses the unshrunk VOI for D₋; ``None`` for a VOI without a voxel at
    least half inside (too small for the grid: the caller falls back to :func:`delineation_relative_u`).
    """
    full = np.asarray(fraction) >= 0.5
    if not full.any():
        return None
    # the VOI's bounding box with a 2-voxel margin (clipped at the array): the same result, a fraction of the work
    idx = np.nonzero(full)
    box = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in idx)
    mask = full[box]
    w = np.ones(mask.shape) if density is None else np.asarray(density, dtype=np.float64)[box]
    d = np.asarray(dose_gy, dtype=np.float64)[box]

    def mean(m: NDArray[np.bool_]) -> float:
        return float((d * w)[m].sum() / w[m].sum())

    grown = ndimage.binary_dilation(mask)
    shrunk = ndimage.binary_erosion(mask)
    d0 = mean(mask)
    if d0 <= 0:
        return 0.0
    d_minus = mean(shrunk) if shrunk.any() else d0
    return abs(mean(grown) - d_minus) / (2.0 * math.sqrt(3.0)) / d0


def scan_time_activity_u(fit: FitResult, u_t_s: float = DEFAULT_SCAN_TIME_U_S) -> NDArray[np.float64]:
    """The activity uncertainty (Bq) a scan-time uncertainty ``u_t_s`` causes: |dA/dt|(t_i)·u(t) on the fitted
    curve (central difference over ±u(t))."""
    t = np.asarray(fit.times_s, dtype=np.float64)
    if u_t_s <= 0:
        return np.zeros_like(t)
    h = min(float(u_t_s), 0.5 * float(t[0]))
    slope = (np.asarray(fit.activity(t + h)) - np.asarray(fit.activity(t - h))) / (2.0 * h)
    out: NDArray[np.float64] = np.abs(slope) * float(u_t_s)
    return out


# ---------------------------------------------------------------------------------------------- the fit
def _natural(fit: FitResult) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(p, J, g) of an exponential fit: p = (amplitudes, rates), J = ∂A(t_i)/∂p, g = ∂TIA/∂p."""
    model = MODELS[fit.model]
    names = model.param_names
    p = np.array([fit.params[n] for n in names], dtype=np.float64)
    amps, rates = p[: model.n_amp], p[model.n_amp :]
    t = np.asarray(fit.times_s, dtype=np.float64)
    J = np.zeros((t.size, model.k))
    g = np.zeros(model.k)
    for a, s, f in model.components:
        ls, es = rates[s], np.exp(-rates[s] * t)
        ia, js = a, model.n_amp + s
        if f is None:
            J[:, ia] += es
            J[:, js] += -amps[a] * t * es
            g[ia] += 1.0 / ls
            g[js] += -amps[a] / ls**2
        else:
            lf, ef, jf = rates[f], np.exp(-rates[f] * t), model.n_amp + f
            J[:, ia] += es - ef
            J[:, js] += -amps[a] * t * es
            J[:, jf] += amps[a] * t * ef
            g[ia] += 1.0 / ls - 1.0 / lf
            g[js] += -amps[a] / ls**2
            g[jf] += amps[a] / lf**2
    return p, J, g


def _fit_weights(fit: FitResult) -> NDArray[np.float64]:
    a = np.asarray(fit.activities_bq, dtype=np.float64)
    w: NDArray[np.float64] = 1.0 / np.maximum(a, 1e-3 * float(a.max()))  # as timeactivity.fit_voi weights
    return w


def _parameter_sensitivity(fit: FitResult) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(∂p/∂A, g): the linearised response of the fitted natural parameters to the measured activities."""
    p, J, g = _natural(fit)
    # columns scaled to ∂A/∂ln p (amplitudes ~1e8 Bq and rates ~1e-6 s⁻¹ would make JᵀMJ singular to round-off)
    scale = np.where(p != 0, np.abs(p), 1.0)
    m = _fit_weights(fit) ** 2
    js = J * scale
    jtm = js.T * m
    sp: NDArray[np.float64] = scale[:, None] * (np.linalg.pinv(jtm @ js) @ jtm)
    return sp, g


def tia_sensitivities(fit: FitResult) -> NDArray[np.float64]:
    """∂TIA/∂A_i (s) of the fit as an estimator of the TIA from the measured activities A_i.

    Exponential models: gᵀ (JᵀMJ)⁻¹ JᵀM (module docstring).  Trapezoid: its linear coefficients (t_1/2 for the
    uptake triangle, half of each neighbouring interval, and 1/λ_phys for the last point's tail).
    """
    t = np.asarray(fit.times_s, dtype=np.float64)
    if fit.model == "trapezoid":
        s = np.zeros(t.size)
        s[0] += 0.5 * t[0]
        dt = np.diff(t)
        s[:-1] += 0.5 * dt
        s[1:] += 0.5 * dt
        s[-1] += 1.0 / fit.decay_constant_per_s
        return s
    if fit.model not in MODELS:
        raise VoxeldoseError("no TIA sensitivity for this time–activity model", tag="model", found=fit.model)
    sp, g = _parameter_sensitivity(fit)
    out: NDArray[np.float64] = g @ sp
    return out


def fit_parameter_covariance(fit: FitResult, activity_cov_bq2: NDArray[np.float64]) -> NDArray[np.float64]:
    """Covariance of the fitted natural parameters (amplitudes in Bq, rates in s⁻¹, in the order of
    ``MODELS[fit.model].param_names``) for a covariance ``activity_cov_bq2`` (n × n, Bq²) of the measured
    activities: (∂p/∂A) Σ (∂p/∂A)ᵀ — correlations between parameters included."""
    sp, _ = _parameter_sensitivity(fit)
    out: NDArray[np.float64] = sp @ activity_cov_bq2 @ sp.T
    return out


def tia_variance(fit: FitResult, activity_cov_bq2: NDArray[np.float64]) -> float:
    """u²(TIA) (Bq²·s²) = sᵀ Σ s for a covariance ``activity_cov_bq2`` of the measured activities."""
    s = tia_sensitivities(fit)
    return float(s @ np.asarray(activity_cov_bq2, dtype=np.float64) @ s)


def _reduced_chi2(fit: FitResult, u_a: NDArray[np.float64]) -> float | None:
    """χ²/ν of the fit's residuals with the per-scan uncertainties ``u_a`` (Bq); ``None`` without degrees of
    freedom or for the trapezoid (it passes through its points)."""
    if fit.model not in MODELS:
        return None
    nu = fit.n_points - MODELS[fit.model].k
    if nu <= 0 or not np.all(u_a > 0):
        return None
    r = np.asarray(fit.residuals, dtype=np.float64) / u_a
    return float(r @ r) / nu


# ---------------------------------------------------------------------------------------------- budget
def _rss(values: Sequence[float | None]) -> float:
    return math.sqrt(sum(v * v for v in values if v is not None))


def voi_budget(
    fit: FitResult,
    *,
    mean_gy: float,
    volume_ml: float,
    voxel_size_mm: Sequence[float],
    counting_rel_u: Sequence[float] | NDArray[np.float64] | None,
    calibration_rel_u: float | None,
    recovery_rel_u: float | None,
    recovery_how: str = "no partial-volume correction: not part of the measurement model",
    scan_time_u_s: float = DEFAULT_SCAN_TIME_U_S,
    bed_gy: float | None = None,
    g_factor: float | None = None,
    alpha_beta_gy: float | None = None,
    delineation_rel_u: float | None = None,
) -> VoiBudget:
    """The EANM budget of one VOI (module docstring): activity at each scan, TIA, mean dose, BED and EQD2.

    ``counting_rel_u``: 1/√N per scan (:func:`counting_relative_u`), ``None`` when the counts are unknown; ``calibration_rel_u`` and
    ``recovery_rel_u``: relative standard uncertainties common to every scan, ``None`` when not stated;
    ``delineation_rel_u``: the VOI's own ±1-layer dose change (:func:`delineation_dose_relative_u`), else the
    mass model of :func:`delineation_relative_u`.
    """
    a = np.asarray(fit.activities_bq, dtype=np.float64)
    counted = counting_rel_u is not None
    cu = np.asarray(counting_rel_u if counted else np.full(a.shape, np.nan), dtype=np.float64)
    if cu.shape != a.shape:
        raise VoxeldoseError(
            "one counting uncertainty per scan is needed",
            tag="counting_rel_u",
            expected=f"{a.size} values",
            found=cu.size,
        )
    tia = float(fit.tia_bqs)
    s = tia_sensitivities(fit)
    u_count = np.where(np.isfinite(cu), cu * a, 0.0)
    u_time = scan_time_activity_u(fit, scan_time_u_s)
    var_count = float(s @ (s * u_count**2))
    var_time = float(s @ (s * u_time**2))
    chi2 = _reduced_chi2(fit, np.sqrt(u_count**2 + u_time**2))
    var_fit = (chi2 - 1.0) * (var_count + var_time) if chi2 is not None and chi2 > 1.0 else 0.0

    def rel(var: float) -> float:
        return math.sqrt(var) / tia if tia > 0 else 0.0

    if delineation_rel_u is None:
        vol_u = delineation_relative_u(volume_ml, voxel_size_mm)
        vol_how = "±1 voxel layer over the equal-volume sphere (rectangular, u = S·d/√3) through the mass, D = E/m"
    else:
        vol_u = delineation_rel_u
        vol_how = "mean dose over the VOI grown and shrunk by one voxel layer (rectangular, u = |D₊ − D₋|/(2√3))"

    if fit.model in MODELS:
        nu = fit.n_points - MODELS[fit.model].k
        fit_how = (
            f"{fit.model} fit: no residual degrees of freedom (n = k), the scatter beyond the stated inputs is not "
            "estimable"
            if nu <= 0
            else (
                f"{fit.model} fit, reduced χ² {chi2:.3g} with the stated per-scan uncertainties"
                + (": propagated TIA variance scaled by it (Birge ratio)" if var_fit > 0 else ": no excess scatter")
                if chi2 is not None
                else f"{fit.model} fit"
            )
        )
    else:
        fit_how = f"{fit.model}: passes through its points; its model error (uptake before the first scan, tail) is not evaluated"
    components = (
        BudgetComponent(
            "calibration",
            calibration_rel_u,
            "camera profile's volume sensitivity uncertainty"
            if calibration_rel_u is not None
            else "not stated: the job's calibration factor has no stated uncertainty (no camera profile)",
        ),
        BudgetComponent(
            "counting",
            rel(var_count) if counted else None,
            "Poisson 1/√N of the VOI's counts at each scan through the fit (a lower bound for OSEM's correlated noise)"
            if counted
            else "not evaluated: the counts behind the image are unknown (no calibration or acquisition duration)",
        ),
        BudgetComponent("recovery", recovery_rel_u, recovery_how),
        BudgetComponent(
            "scan time", rel(var_time), f"u(t) = {scan_time_u_s / 60:g} min per scan (voxeldose default), |dA/dt|·u(t)"
        ),
        BudgetComponent("time–activity fit", rel(var_fit), fit_how),
        BudgetComponent(
            "delineation",
            vol_u,
            vol_how,
        ),
        BudgetComponent(
            "dose factor", None, "not stated: the kernel's energy-deposition data carry no stated uncertainty"
        ),
    )
    notes = [
        f"{c.name} not included ({c.how}): the combined uncertainty is a lower bound"
        for c in components
        if c.relative_u is None and c.name in ("calibration", "counting", "dose factor")
    ]
    common = [calibration_rel_u, recovery_rel_u]
    acts = tuple(
        Estimate(float(ai), float(ai) * _rss([*common, float(ci) if math.isfinite(ci) else None]))
        for ai, ci in zip(a, cu)
    )
    tia_rel = _rss([*common, rel(var_count), rel(var_time), rel(var_fit)])
    dose_rel = _rss([tia_rel, vol_u])
    dose = Estimate(mean_gy, abs(mean_gy) * dose_rel)
    bed = eqd2 = None
    if bed_gy is not None and g_factor is not None and alpha_beta_gy is not None and alpha_beta_gy > 0:
        u_bed = (1.0 + 2.0 * g_factor * mean_gy / alpha_beta_gy) * abs(mean_gy) * dose_rel
        bed = Estimate(bed_gy, u_bed)
        f = 1.0 + 2.0 / alpha_beta_gy
        eqd2 = Estimate(bed_gy / f, u_bed / f)
    return VoiBudget(components, acts, Estimate(tia, tia * tia_rel), dose, bed, eqd2, tuple(notes))
