"""Voxel dose-uncertainty map and per-voxel DVH bands (issue 13 part 3).

The measurement model per voxel ``x``: the absorbed dose is a linear function of the voxels' time-integrated
activities, ``D(x) = Σ_s K(x − s) Ã(s)`` (dose-voxel kernel ``K``, Gy per Bq·s; MIRD Pamphlet 17).  For voxel
TIAs with independent errors the GUM law of propagation (JCGM 100:2008 eq. 10: ``u²(y) = Σ (∂f/∂x_i)² u²(x_i)``
for uncorrelated inputs; applied to dosimetry by Gear et al., "EANM practical guidance on uncertainty analysis
for molecular radiotherapy absorbed dose calculations", EJNMMI 2018;45:2456, sect. "Absorbed dose") gives

    ``Var D(x) = Σ_s K²(x − s) Var Ã(s) = (K² ⊛ Var Ã)(x)``

— the TIA variance map convolved with the *squared* kernel (:func:`dose_variance`).  Components common to every
voxel (the camera's calibration factor, the kernel's energy-deposition data) are fully correlated between
voxels: they scale the whole map, and enter as relative terms in quadrature, ``u²(x) = Var D(x) + r² D²(x)``
(:func:`dose_uncertainty`).

Voxel TIA variance (:func:`voxel_tia_variance`).  The noise model: the counts behind a voxel's activity at scan
``i`` are Poisson, ``N = A·S·T`` (``A`` in MBq, camera sensitivity ``S`` in cps/MBq, acquisition duration ``T``
in s), so ``Var A = A²/N = A·10⁶/(S·T)`` Bq² (:func:`counting_variance`), independent between voxels and scans.
This is a **lower bound** of a reconstructed image's noise: OSEM's noise is correlated between neighbouring
voxels and grows with the iterations, and the registration's resampling correlates neighbours as well; with
positive correlations ``Var D`` is larger than the independent-voxel sum.  Each scan's variance reaches the TIA
through the voxel-wise estimator's sensitivities ``∂Ã/∂A_i`` (:func:`voxel_tia_sensitivities`):
``Var Ã = Σ_i (∂Ã/∂A_i)² Var A_i`` — the first-order (delta-method) propagation, identical to propagating the
covariance of the voxel curve's parameters (its tail rate and amplitude, correlations included) to the TIA,
because the parameters are themselves functions of the same ``A_i``.  Where a voxel's tail rate is within its
noise of the physical decay constant the estimator has a kink (fitted tail above λ, physical decay below); the
map takes the branch of the measured curve, and there the TIA scatters less than the map says (conservative;
``tests/test_voxeluncertainty.py`` compares sampled and propagated std away from it).  The scan-time uncertainty is common to all
voxels of a scan (correlated): it is in the per-VOI budget (:mod:`voxeldose.uncertainty`), not in this map.

Array namespace: every function computes in the namespace of its input arrays (NumPy on the CPU, CuPy on a GPU)
through :mod:`voxeldose.backend` and :func:`voxeldose.convolution.convolve`, one code path for both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import backend, nuclides, timeactivity
from .backend import Array
from .convolution import convolve
from .dose import (
    J_PER_MEV,
    DoseKernelLike,
    default_kernel_size,
    density_on_grid,
    electron_energy_per_decay_MeV,
    kernel_weighted_density,
    medium_density,
    trimmed_electron_kernel,
)
from .errors import VoxeldoseError
from .geometry import Volume

__all__ = [
    "BAND_COVERAGE_FACTOR",
    "BAND_MEANING",
    "DvhBandCurve",
    "counting_variance",
    "dose_uncertainty",
    "dose_variance",
    "dvh_band",
    "voxel_tia_sensitivities",
    "voxel_tia_variance",
]

#: Coverage factor of the per-voxel DVH band (dose ± k·u), ≈ 95 % per voxel for a normal distribution.
BAND_COVERAGE_FACTOR = 2.0
#: What the band is (and is not), for the summary and the report.
BAND_MEANING = (
    "per-voxel band: the DVHs of the dose map with every voxel at its own dose − 2u and dose + 2u (u: the voxel's "
    "standard uncertainty, k = 2); not a confidence band of the DVH — voxel errors are partly independent, so the "
    "DVH itself varies less than this band"
)


def _times(times_s: Sequence[float] | NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    t = np.asarray(backend.to_host(times_s), dtype=np.float64)
    if t.ndim != 1 or t.size < 2 or not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(np.diff(t) <= 0):
        raise VoxeldoseError(
            "the voxel TIA uncertainty needs the scan times",
            tag="times_s",
            expected="at least two strictly increasing times > 0 s after injection",
            found=t.tolist(),
        )
    return t


# ---------------------------------------------------------------------------------------------- activity
def counting_variance(
    stack: Array, cps_per_mbq: float, durations_s: Sequence[float], *, xp: ModuleType | None = None
) -> Array:
    """Poisson variance (Bq², float64) of every voxel's activity ``stack[n_t, k, j, i]`` (Bq per voxel):
    ``Var A = A·10⁶/(S·T_i)`` for the counts ``N = A[MBq]·S·T_i``; voxels with ``A ≤ 0`` get 0 (no counts).
    A lower bound for a reconstructed image (module docstring)."""
    xp = backend.xp_for(stack) if xp is None else xp
    if not (math.isfinite(cps_per_mbq) and cps_per_mbq > 0):
        raise VoxeldoseError("the counting noise needs the camera's sensitivity", tag="cps_per_mbq", found=cps_per_mbq)
    t = np.asarray(durations_s, dtype=np.float64)
    n = int(stack.shape[0])
    if t.shape != (n,) or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise VoxeldoseError(
            "the counting noise needs one positive acquisition duration per scan",
            tag="acquisition_duration_s",
            expected=f"{n} durations > 0 s",
            found=t.tolist(),
        )
    per_bq = xp.asarray(1e6 / (cps_per_mbq * t), dtype=xp.float64).reshape((n,) + (1,) * (stack.ndim - 1))
    return xp.maximum(xp.asarray(stack, dtype=xp.float64), 0.0) * per_bq


# ---------------------------------------------------------------------------------------------- TIA
def _analytic_sensitivities(
    xp: ModuleType, A: Array, t: NDArray[np.float64], lp: float, method: str, floor: float
) -> Array:
    """∂Ã/∂A_i of :func:`voxeldose.timeactivity.voxel_tia` (``hybrid``/``exponential``, 2 tail points), branch
    for branch as it computes Ã: uptake triangle ½A₀t₀; segments trapezoidal (½Δt each end) or exponential,
    ``S = (a₂ − a₁)Δt/r`` with ``r = ln(a₂/a₁)``: ∂S/∂a₁ = Δt(eʳ − 1 − r)/r², ∂S/∂a₂ = Δt(r + e⁻ʳ − 1)/r²
    (``expm1``: no cancellation at small ``r``); tail ``a_n/k``, ``k = ln(a_{n−1}/a_n)/Δt``: ∂/∂a_n = 1/k +
    1/(k²Δt), ∂/∂a_{n−1} = −a_n/(a_{n−1} k² Δt); the physical-decay tail ``a_n/λ``: 1/λ."""
    n = A.shape[0]
    pos = A > 0  # d max(A, 0)/dA
    s = xp.zeros(A.shape, dtype=xp.float64)
    s[0] += 0.5 * float(t[0]) * pos[0]
    for i in range(n - 1):
        dt = float(t[i + 1] - t[i])
        half = 0.5 * dt
        if method == "exponential":
            a1, a2 = A[i], A[i + 1]
            both = (a1 > floor) & (a2 > floor)
            r = xp.log(xp.where(both, a2, 1.0) / xp.where(both, a1, 1.0))
            use = both & (xp.abs(r) > 1e-6)
            rs = xp.where(use, r, 1.0)
            d1 = dt * (xp.expm1(rs) - rs) / (rs * rs)
            d2 = dt * (rs + xp.expm1(-rs)) / (rs * rs)
            s[i] += xp.where(use, d1, half * pos[i])
            s[i + 1] += xp.where(use, d2, half * pos[i + 1])
        else:
            s[i] += half * pos[i]
            s[i + 1] += half * pos[i + 1]
    a_prev, a_last = A[-2], A[-1]
    dt = float(t[-1] - t[-2])
    both = (a_prev > floor) & (a_last > floor)
    k = xp.log(xp.where(both, a_prev, 1.0) / xp.where(both, a_last, 1.0)) / dt
    ok = both & xp.isfinite(k) & (k >= lp)
    ks = xp.where(ok, k, 1.0)
    s[-1] += xp.where(ok, 1.0 / ks + 1.0 / (ks * ks * dt), pos[-1] / lp)
    ratio = xp.where(ok, a_last, 0.0) / xp.where(ok, a_prev, 1.0)
    s[-2] -= ratio / (ks * ks * dt)
    no_data = ~xp.any(A > 0, axis=0)
    return xp.where(no_data, 0.0, s)


def voxel_tia_sensitivities(
    stack: Array,
    times_s: Sequence[float] | NDArray[np.floating[Any]],
    *,
    decay_constant_per_s: float,
    method: str = "exponential",
    tail_points: int = 2,
    min_activity: float = 0.0,
) -> Array:
    """``∂Ã/∂A_i`` (s, float64, shape of ``stack``) of the voxel TIA :func:`voxeldose.timeactivity.voxel_tia`
    computes from ``stack[n_t, k, j, i]`` with the same arguments.

    ``hybrid`` and ``exponential`` with 2 tail points (the pipeline's): analytic, branch for branch
    (:func:`_analytic_sensitivities`).  Otherwise (``monoexp``, more tail points): central differences of
    ``voxel_tia`` itself with a step of 10⁻⁴ of each activity — 2·n_t evaluations, so slower.
    """
    t = _times(times_s)
    xp = backend.xp_for(stack)
    A = xp.asarray(stack, dtype=xp.float64)
    if A.ndim < 1 or A.shape[0] != t.size:
        raise VoxeldoseError(
            "the activity stack must have one image per time point along its first axis",
            tag="stack",
            expected=f"shape ({t.size}, k, j, i)",
            found=tuple(A.shape),
        )
    lp = float(decay_constant_per_s)
    if not (math.isfinite(lp) and lp > 0):
        raise VoxeldoseError("the decay constant must be positive", tag="decay_constant_per_s", found=lp)
    floor = max(float(min_activity), float(np.finfo(np.float64).tiny))
    if method in ("hybrid", "exponential") and tail_points == 2:
        return _analytic_sensitivities(xp, A, t, lp, method, floor)
    out = xp.zeros(A.shape, dtype=xp.float64)
    for i in range(t.size):
        h = 1e-4 * xp.maximum(xp.abs(A[i]), 1e-3 * float(xp.max(xp.abs(A[i]))) + floor)
        plus, minus = A.copy(), A.copy()
        plus[i] += h
        minus[i] -= h
        kw: dict[str, Any] = {
            "decay_constant_per_s": lp,
            "method": method,
            "tail_points": tail_points,
            "min_activity": min_activity,
        }
        tp = timeactivity.voxel_tia(plus, t, **kw).tia
        tm = timeactivity.voxel_tia(minus, t, **kw).tia
        out[i] = (xp.asarray(tp, dtype=xp.float64) - xp.asarray(tm, dtype=xp.float64)) / (2.0 * h)
    return out


def voxel_tia_variance(
    stack: Array,
    times_s: Sequence[float] | NDArray[np.floating[Any]],
    activity_variance: Array,
    *,
    decay_constant_per_s: float,
    method: str = "exponential",
    tail_points: int = 2,
    min_activity: float = 0.0,
) -> Array:
    """``Var Ã = Σ_i (∂Ã/∂A_i)² Var A_i`` (Bq²·s², float64, one map) for activities independent between scans
    with the variance ``activity_variance`` (Bq², shape of ``stack``; e.g. :func:`counting_variance`)."""
    xp = backend.xp_for(stack)
    var = xp.asarray(activity_variance, dtype=xp.float64)
    if tuple(var.shape) != tuple(stack.shape):
        raise VoxeldoseError(
            "one activity variance per voxel and scan is needed",
            tag="activity_variance",
            expected=f"shape {tuple(stack.shape)}",
            found=tuple(var.shape),
        )
    s = voxel_tia_sensitivities(
        stack,
        times_s,
        decay_constant_per_s=decay_constant_per_s,
        method=method,
        tail_points=tail_points,
        min_activity=min_activity,
    )
    return xp.sum(s * s * var, axis=0)


# ---------------------------------------------------------------------------------------------- dose
def dose_variance(
    tia_variance: Volume,
    nuclide: str = "Lu-177",
    method: str = "dvk",
    density: Volume | None = None,
    *,
    medium: str = "soft-tissue",
    kernel: DoseKernelLike | None = None,
    kernel_size: int | None = None,
) -> Volume:
    """Variance (Gy², float64, ``units`` ``"Gy2"``) of the absorbed dose :func:`voxeldose.dose.absorbed_dose`
    computes with the same arguments, for independent voxel TIAs of variance ``tia_variance`` (Bq²·s²).

    ``dvk``: ``K² ⊛ Var Ã``.  ``led``: ``Var Ã · (E_e/m)²``.  ``dvk-density``: its dose is
    ``Σ_s [ρ_k K_e(x−s)/N(s) + K_p(x−s)] Ã(s)``, so ``Var D = ρ_k² K_e² ⊛ (V/N²) + 2ρ_k (K_e K_p) ⊛ (V/N) +
    K_p² ⊛ V`` — the square of each source voxel's coefficient, three convolutions.  The map's array stays in
    the namespace of ``tia_variance.array``; negative FFT round-off is clipped to 0.
    """
    if tia_variance.units != "Bq2.s2":
        raise VoxeldoseError(
            "the TIA variance map has the wrong units",
            tag="tia_variance.units",
            expected="'Bq2.s2'",
            found=tia_variance.units,
        )
    xp = backend.xp_for(tia_variance.array)
    v = xp.asarray(tia_variance.array, dtype=xp.float64)
    nuc = nuclides.require_supported(nuclide, tag="nuclide")
    spacing = tuple(float(s) for s in tia_variance.spacing)
    if method in ("dvk", "dvk-density") and kernel is None:
        from .kernels import get_kernel

        size = kernel_size or default_kernel_size(spacing, tia_variance.shape)
        kernel = get_kernel(nuc.name, voxel_mm=spacing, medium=medium, size=size)
    if method == "dvk":
        assert kernel is not None  # set above
        k = np.asarray(kernel.array, dtype=np.float64)
        var = convolve(v, k * k, xp=xp, dtype=np.float64)
    elif method == "dvk-density":
        assert kernel is not None  # set above
        if density is None:
            raise VoxeldoseError("method 'dvk-density' needs a density map", tag="density")
        rho_k = float(kernel.density_g_cm3)
        rho = density_on_grid(density, tia_variance, fill=rho_k).array
        ke = trimmed_electron_kernel(kernel.electron)
        kp = np.asarray(kernel.photon, dtype=np.float64)
        var = xp.zeros(v.shape, dtype=xp.float64)
        if float(ke.sum()) > 0.0:
            n = kernel_weighted_density(rho, ke, xp=xp)
            var = var + convolve(v / (n * n), (rho_k * rho_k) * ke * ke, xp=xp, dtype=np.float64)
            if float(np.abs(kp).sum()) > 0.0:
                # the cross term on the trimmed electron kernel's support (K_e is ~0 outside it)
                c = [(m - 1) // 2 for m in kp.shape]
                h = [(m - 1) // 2 for m in ke.shape]
                kp_c = kp[tuple(slice(ci - hi, ci + hi + 1) for ci, hi in zip(c, h))]
                var = var + convolve(v / n, (2.0 * rho_k) * ke * kp_c, xp=xp, dtype=np.float64)
        if float(np.abs(kp).sum()) > 0.0:
            var = var + convolve(v, kp * kp, xp=xp, dtype=np.float64)
    elif method == "led":
        e_j = electron_energy_per_decay_MeV(nuc.name) * J_PER_MEV
        rho_k = float(kernel.density_g_cm3) if kernel is not None else medium_density(medium)
        rho = rho_k if density is None else density_on_grid(density, tia_variance, fill=rho_k).array
        mass_kg = xp.asarray(rho, dtype=xp.float64) * (tia_variance.voxel_volume_ml * 1e-3)
        var = v * (e_j / mass_kg) ** 2
    else:
        raise VoxeldoseError(
            "unknown dose method", tag="method", expected="'dvk', 'dvk-density' or 'led'", found=method
        )
    var = xp.maximum(var, 0.0)
    return Volume(var, tia_variance.affine, tia_variance.frame_of_reference_uid, "Gy2", {"method": method})


def dose_uncertainty(dose: Volume, variance: Volume | None, relative_u: Sequence[float | None] = ()) -> Volume:
    """Standard uncertainty (k = 1, Gy, float64) of every voxel's dose: ``u = √(Var D + r² D²)``, ``Var D`` the
    independent-voxel variance (:func:`dose_variance`, ``None``: not evaluated) and ``r`` the root-sum-square of
    the relative components common to all voxels (``relative_u``; ``None`` entries are not stated and skipped)."""
    xp = backend.xp_for(dose.array)
    d = xp.asarray(dose.array, dtype=xp.float64)
    r2 = sum(float(r) ** 2 for r in relative_u if r is not None)
    u2 = r2 * d * d
    if variance is not None:
        if tuple(variance.shape) != tuple(dose.shape) or not variance.grid.same_as(dose.grid):
            raise VoxeldoseError(
                "the dose variance is on another grid than the dose",
                tag="variance",
                expected=f"shape {tuple(dose.shape)}",
                found=tuple(variance.shape),
            )
        u2 = u2 + xp.asarray(variance.array, dtype=xp.float64)
    return Volume(xp.sqrt(u2), dose.affine, dose.frame_of_reference_uid, "Gy", {"coverage_factor": 1.0})


# ---------------------------------------------------------------------------------------------- DVH band
@dataclass(frozen=True)
class DvhBandCurve:
    """Cumulative DVHs of ``dose − k·u`` (``lower``) and ``dose + k·u`` (``upper``) on one dose axis: the
    fraction of the VOI's volume receiving at least ``dose_gy``.  Meaning: :data:`BAND_MEANING`."""

    dose_gy: NDArray[np.float64]
    lower: NDArray[np.float64]
    upper: NDArray[np.float64]
    coverage_factor: float


def _cumulative(d: NDArray[np.float64], w: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    order = np.argsort(d, kind="stable")
    ds, ws = d[order], w[order]
    tail = np.concatenate([np.cumsum(ws[::-1])[::-1], [0.0]])
    out: NDArray[np.float64] = tail[np.searchsorted(ds, x, side="left")] / float(ws.sum())
    return out


def dvh_band(
    dose: Array, u: Array, weights: Array, *, k: float = BAND_COVERAGE_FACTOR, points: int = 200
) -> DvhBandCurve | None:
    """The per-voxel DVH band of one VOI (occupancy ``weights``, same shape as ``dose`` and ``u``; volume-weighted
    as :func:`voxeldose.metrics.dvh`): the DVHs of ``max(dose − k·u, 0)`` and ``dose + k·u`` at ``points`` doses
    from 0 to the largest ``dose + k·u`` in the VOI.  ``None`` for an empty VOI."""
    w = np.asarray(backend.to_host(weights), dtype=np.float64)
    sel = w > 0
    if not sel.any():
        return None
    d = np.asarray(backend.to_host(dose), dtype=np.float64)[sel]
    uu = np.asarray(backend.to_host(u), dtype=np.float64)[sel]
    ws = w[sel]
    lo = np.maximum(d - k * uu, 0.0)
    hi = np.maximum(d + k * uu, 0.0)
    x = np.linspace(0.0, float(hi.max()) * (1.0 + 1e-9) + 1e-12, points)
    return DvhBandCurve(x, _cumulative(lo, ws, x), _cumulative(hi, ws, x), float(k))
