"""Per-VOI dose metrics, dose–volume histograms, radiobiology (G, BED, EQD2) and red-marrow dose.

Everything here works on plain arrays (NumPy; CuPy arrays are copied to the host once, at entry —
a VOI's voxels are few) and returns JSON-ready values.  Units: Gy, ml, g, Bq, Bq·s, s.

Definitions (the numbers a physicist reads in the report)
----------------------------------------------------------

**Weights.**  A voxel ``i`` of a VOI carries the VOI's occupancy ``w_i ∈ [0, 1]``
(:attr:`voxeldose.voi.VOI.fraction`); it stands for ``w_i · V_vox`` ml of the VOI.

**Cumulative DVH.**  ``V(D) = Σ_{d_i ≥ D} w_i / Σ w_i`` — the fraction of the VOI's volume that
receives an absorbed dose of at least ``D``.  It is computed exactly from the voxels (no binning);
:class:`DVH` also tabulates it on bin edges ``0, Δ, 2Δ, …, ≥ max`` for plotting.

**D_x (x in per cent).**  The minimum absorbed dose to the hottest ``x`` % of the volume: the dose
``D_x`` such that ``x`` % of the VOI's volume receives ``≥ D_x``.  Voxels are sorted by dose
(hottest first); each voxel's volume is spread evenly around its dose, so the cumulative volume
fraction at voxel ``k`` is taken at the middle of its share, ``c_k = (Σ_{j<k} w_j + w_k/2) / W``, and
``D_x`` is linearly interpolated in ``(c_k, d_k)`` (held at the maximum dose for ``x`` below the first
midpoint and at the minimum beyond the last).  This is the volume-weighted upper ``x`` % quantile
with the midpoint ("Hazen") rule: it is exact for a linear dose ramp over equal voxels (``D50`` is
the median), equals the dose of a uniform VOI for every ``x``, is non-increasing in ``x``, and stays
within ``[min, max]``.  ``D2`` is the near-maximum, ``D98`` the near-minimum, ``D50`` the median.

**D_cc (cc in ml).**  The same with an absolute volume: the minimum dose to the hottest ``cc`` ml;
``None`` where the VOI is smaller than ``cc`` ml.

**Mean absorbed dose.**  Absorbed dose is energy per mass, so the VOI mean is
``D̄ = Σ w_i ρ_i D_i / Σ w_i ρ_i`` (energy imparted to the VOI divided by its mass) when a density
map is given, and the volume-weighted ``Σ w_i D_i / Σ w_i`` otherwise (identical for a uniform
density).  The report says which weighting was used.  The DVH is always by volume (convention).

**Min/max.**  Over the voxels mostly inside the VOI (``w ≥ 0.5``, the VOI's binary mask), so that
edge voxels a contour barely touches do not set them; when no voxel reaches 0.5 (a VOI smaller than a
voxel) they are taken over every voxel with ``w > 0`` and the report says so.

Radiobiology (:func:`lea_catcheside_g`, :func:`bed`, :func:`eqd2`)
------------------------------------------------------------------

Linear–quadratic BED for a protracted, time-varying dose rate ``R(t)``:
``BED = D + G·D²/(α/β)`` with the Lea–Catcheside dose-protraction factor

    ``G = (2/D²) ∫₀^∞ R(t) ∫₀^t R(t′) e^{−μ(t−t′)} dt′ dt``,  ``μ = ln 2 / T_rep``,  ``D = ∫₀^∞ R dt``

(Dale 1985, Br J Radiol 58(690):515–528).  Under the self-dose assumption the dose rate is
proportional to the VOI's activity, so for a fitted time–activity curve ``A(t) = Σ c_i e^{−k_i t}``
(effective rates, i.e. the fit to activity that is *not* decay corrected) ``R(t) = s·A(t)`` and ``s``
cancels.  The inner integral of one term is ``c_j (e^{−k_j t} − e^{−μ t}) / (μ − k_j)``; integrating
against ``c_i e^{−k_i t}`` gives ``c_i c_j / ((k_i + k_j)(k_i + μ))`` (the ``μ − k_j`` cancels, so the
result holds for ``k_j = μ`` too), hence the closed form

    ``G = (2/D²) Σ_i Σ_j c_i c_j / ((k_i + k_j)(k_i + μ))``,  ``D = Σ_i c_i / k_i``.

For one exponential this is Dale's ``G = λ/(λ + μ)``.  It holds for any sum of exponentials, e.g. a
bi-exponential with an uptake phase ``A(t) = c (e^{−k₁ t} − e^{−k₂ t})`` (negative coefficient on the
faster rate) — the case Baechler et al. 2008 treat in the MIRD schema (Med Phys 35(3):1123–1134,
doi:10.1118/1.2836421, for multiple exponentially clearing source organs).  tests/test_metrics.py
checks it against ``scipy.integrate.dblquad``.

``EQD2 = BED / (1 + 2/(α/β))`` — the dose in 2 Gy fractions with the same BED.

Defaults (:data:`RADIOBIOLOGY_DEFAULTS`, configurable per VOI): kidney α/β = 2.6 Gy,
``T_rep`` = 2.8 h (the values used for kidney BED in PRRT since Barone et al. 2005,
J Nucl Med 46(Suppl 1):99S–106S, and in Bodei et al. 2008, Eur J Nucl Med Mol Imaging
35(10):1847–1856); tumour α/β = 10 Gy, ``T_rep`` = 1.5 h (the customary tumour values — a convention, not a
measurement for neuroendocrine tumours).

Red marrow (:func:`marrow_image_based`, :func:`marrow_blood_based`)
------------------------------------------------------------------
See the functions' docstrings: image-based from a L2–L4 vertebral-body VOI, and blood-based after
the EANM bone-marrow dosimetry guideline (Hindorf et al. 2010, Eur J Nucl Med Mol Imaging
37(6):1238–1250).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import VoxeldoseError
from .nuclides import J_PER_MEV, electron_energy_per_decay_MeV

#: The trapezoidal rule: ``numpy.trapezoid`` (NumPy ≥ 2), ``numpy.trapz`` before (looked up by name, since
#: the type stubs of the installed NumPy know only one of them).
_trapezoid: Callable[..., Any] = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # noqa: B009 - see above

__all__ = [
    "DVH",
    "HOUR_S",
    "RADIOBIOLOGY_DEFAULTS",
    "Radiobiology",
    "bed",
    "bed_from_exponentials",
    "blood_time_integrated_concentration",
    "dvh",
    "eqd2",
    "lea_catcheside_g",
    "marrow_blood_based",
    "marrow_image_based",
    "radiobiology_for",
    "voi_metrics",
    "with_physical_decay",
]

HOUR_S = 3600.0


def _host(a: Any) -> np.ndarray:
    """NumPy float64 copy of a NumPy/CuPy array or scalar (metrics run on the host)."""
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def _fmt(x: float) -> str:
    """'2' for 2.0, '2.5' for 2.5 — for metric names such as D2_gy, D0.5cc_gy."""
    return f"{x:g}"


# =============================================================================================
# DVH
# =============================================================================================
@dataclass(frozen=True)
class DVH:
    """A cumulative dose–volume histogram of one VOI (see the module docstring for the definitions).

    ``dose_gy`` are bin edges from 0 to (at least) the maximum dose; ``volume_fraction[k]`` is the
    fraction of the VOI's volume receiving ``≥ dose_gy[k]``; ``volume_ml[k]`` the same in ml.  The
    metric methods (:meth:`D`, :meth:`D_cc`, :meth:`V`) use the exact per-voxel data, not the bins.
    """

    dose_gy: np.ndarray
    volume_fraction: np.ndarray
    total_volume_ml: float
    bin_gy: float
    # exact per-voxel data, sorted by dose, descending (hottest first)
    _dose_desc: np.ndarray = field(repr=False)
    _weight_desc: np.ndarray = field(repr=False)

    @property
    def volume_ml(self) -> np.ndarray:
        return self.volume_fraction * self.total_volume_ml

    @property
    def max_gy(self) -> float:
        return float(self._dose_desc[0])

    @property
    def min_gy(self) -> float:
        return float(self._dose_desc[-1])

    def _dose_at_fraction(self, f: float) -> float:
        w = self._weight_desc
        total = float(w.sum())
        mid = (np.cumsum(w) - 0.5 * w) / total
        return float(np.interp(f, mid, self._dose_desc))

    def D(self, percent: float) -> float:
        """Minimum dose (Gy) to the hottest ``percent`` % of the volume (0 ≤ percent ≤ 100)."""
        p = float(percent)
        if not 0.0 <= p <= 100.0:
            raise VoxeldoseError("a D_x metric needs x between 0 and 100 per cent", tag="D_x", found=percent)
        return self._dose_at_fraction(p / 100.0)

    def D_cc(self, cc: float) -> float | None:
        """Minimum dose (Gy) to the hottest ``cc`` ml; ``None`` if the VOI is smaller than ``cc`` ml."""
        c = float(cc)
        if c < 0:
            raise VoxeldoseError("a D_cc metric needs a volume ≥ 0 ml", tag="D_cc", found=cc)
        if c > self.total_volume_ml * (1 + 1e-12):
            return None
        return self._dose_at_fraction(c / self.total_volume_ml)

    def V(self, gy: float) -> float:
        """Fraction (0–1) of the volume receiving an absorbed dose ≥ ``gy``."""
        d = self._dose_desc
        # doses are descending: count of d >= gy is the insertion point in the ascending reversal
        n = d.size - int(np.searchsorted(d[::-1], float(gy), side="left"))
        return float(self._weight_desc[:n].sum() / self._weight_desc.sum())

    def to_dict(self, max_points: int = 200) -> dict[str, Any]:
        """Compact JSON form: at most ``max_points`` (dose, volume) points, chosen evenly along the
        curve's length in normalised (dose/max, fraction) coordinates, so steep falls keep their
        points and flat stretches are thinned; the first and last bins are always kept."""
        x, y = self.dose_gy, self.volume_fraction
        n = x.size
        if max_points < 2:
            raise VoxeldoseError("a DVH needs at least two points", tag="max_points", found=max_points)
        if n > max_points:
            xs = x / x[-1] if x[-1] > 0 else x
            seg = np.hypot(np.diff(xs), np.diff(y))
            s = np.concatenate([[0.0], np.cumsum(seg)])
            targets = np.linspace(0.0, s[-1], max_points)
            idx = np.unique(np.concatenate([[0, n - 1], np.searchsorted(s, targets, side="left").clip(0, n - 1)]))
            x, y = x[idx], y[idx]
        return {
            "dose_gy": [round(float(v), 6) for v in x],
            "volume_fraction": [round(float(v), 6) for v in y],
            "total_volume_ml": float(self.total_volume_ml),
            "bin_gy": float(self.bin_gy),
            "downsampled": bool(n > max_points),
            "definition": "cumulative: fraction of the VOI volume receiving >= dose_gy",
        }


def _nice_bin(max_gy: float, target_bins: int = 500) -> float:
    """A 1-2-5 × 10^n bin width giving about ``target_bins`` bins up to ``max_gy``."""
    if max_gy <= 0:
        return 0.01
    raw = max_gy / target_bins
    e = math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * 10**e >= raw:
            return float(m * 10**e)
    return 10.0 ** (e + 1)  # pragma: no cover - loop always returns


def dvh(dose: Any, weights: Any, *, voxel_ml: float, bin_gy: float | None = None) -> DVH:
    """Cumulative DVH of a dose map (Gy) over a VOI given by fractional voxel ``weights`` (occupancy).

    ``dose`` and ``weights`` have the same shape (or ``weights`` broadcasts to it).  Voxels with zero
    weight are ignored; negative doses (FFT round-off) count as 0 Gy.  ``bin_gy`` is the tabulation
    step (default: a 1-2-5 step giving about 500 bins).
    """
    d = _host(dose)
    w = _host(weights)
    try:
        d, w = np.broadcast_arrays(d, w)
    except ValueError:
        raise VoxeldoseError(
            "the dose map and the VOI occupancy are on different grids",
            tag="VOI fraction",
            expected=f"shape {d.shape}",
            found=w.shape,
        ) from None
    if voxel_ml <= 0 or not math.isfinite(voxel_ml):
        raise VoxeldoseError("the voxel volume must be a positive number of ml", tag="voxel_ml", found=voxel_ml)
    if np.any(w < 0) or np.any(w > 1 + 1e-6) or not np.all(np.isfinite(w)):
        raise VoxeldoseError(
            "VOI occupancy must lie in [0, 1]",
            tag="VOI fraction",
            expected="values in [0, 1]",
            found=(float(np.nanmin(w)), float(np.nanmax(w))),
        )
    sel = w > 0
    if not np.any(sel):
        raise VoxeldoseError(
            "the VOI is empty on the dose grid (no voxel has a non-zero occupancy)",
            tag="VOI fraction",
            expected="a VOI overlapping the dose map",
        )
    dv, wv = d[sel], w[sel]
    if not np.all(np.isfinite(dv)):
        raise VoxeldoseError("the dose map has non-finite values inside the VOI", tag="dose", expected="finite Gy")
    dv = np.maximum(dv, 0.0)
    order = np.argsort(dv, kind="stable")[::-1]
    d_desc, w_desc = dv[order], wv[order]
    total_w = float(w_desc.sum())
    max_gy = float(d_desc[0])
    if bin_gy is None:
        bin_gy = _nice_bin(max_gy)
    if not (bin_gy > 0 and math.isfinite(bin_gy)):
        raise VoxeldoseError("the DVH bin width must be a positive number of Gy", tag="bin_gy", found=bin_gy)
    n_bins = math.floor(max_gy / bin_gy) + 2  # last edge strictly above max → volume 0 there
    if n_bins > 1_000_000:
        raise VoxeldoseError(
            "the DVH bin width is too small for this dose range",
            tag="bin_gy",
            expected=f"≥ {max_gy / 1e6:.3g} Gy",
            found=bin_gy,
        )
    edges = np.arange(n_bins, dtype=np.float64) * bin_gy
    # fraction with dose >= edge: cumulative weights of the ascending doses from the top
    d_asc, w_asc = d_desc[::-1], w_desc[::-1]
    tail = np.concatenate([np.cumsum(w_asc[::-1])[::-1], [0.0]])  # tail[k] = Σ_{j≥k} w_asc[j]
    vf = tail[np.searchsorted(d_asc, edges, side="left")] / total_w
    return DVH(edges, vf, total_w * voxel_ml, float(bin_gy), d_desc, w_desc)


# =============================================================================================
# VOI metrics
# =============================================================================================
def voi_metrics(
    dose: Any,
    voi_fraction: Any,
    *,
    voxel_ml: float,
    density_g_per_ml: Any = None,
    injected_activity_bq: float,
    dose_cc: Iterable[float] = (2.0,),
    v_gy: Iterable[float] = (),
    d_percent: Iterable[float] = (2, 50, 98),
    bin_gy: float | None = None,
    dvh_max_points: int = 200,
) -> dict[str, Any]:
    """Absorbed-dose metrics of one VOI as a JSON-ready dict (definitions in the module docstring).

    ``density_g_per_ml`` is a density map on the dose grid (g/ml = g/cm³), or one number for the whole
    VOI, or ``None`` (then ``mass_g`` is ``null`` and the mean is volume-weighted — said in
    ``mean_weighting`` and ``notes``).  Keys: ``volume_ml``, ``mass_g``, ``mean_gy``,
    ``mean_weighting``, ``min_gy``, ``max_gy``, ``min_max_over``, ``D{x}_gy``, ``D{cc}cc_gy``,
    ``V{g}Gy_fraction``, ``gy_per_gbq`` (mean dose per injected GBq), ``injected_activity_bq``,
    ``dvh`` and ``notes``.
    """
    if not (injected_activity_bq > 0 and math.isfinite(injected_activity_bq)):
        raise VoxeldoseError(
            "the injected activity must be a positive number of Bq",
            tag="RadionuclideTotalDose (0018,1074)",
            found=injected_activity_bq,
        )
    h = dvh(dose, voi_fraction, voxel_ml=voxel_ml, bin_gy=bin_gy)
    d = _host(dose)
    w = np.broadcast_to(_host(voi_fraction), d.shape)
    sel = w > 0
    dv, wv = np.maximum(d[sel], 0.0), w[sel]
    notes: list[str] = []

    if density_g_per_ml is None:
        mass_g = None
        mean_gy = float(np.sum(wv * dv) / np.sum(wv))
        weighting = "volume"
        notes.append(
            "no density map: mass not computed; mean dose is volume-weighted "
            "(equal to the mass-weighted mean for a uniform density)"
        )
    else:
        rho = np.broadcast_to(_host(density_g_per_ml), d.shape)[sel]
        if np.any(~np.isfinite(rho)) or np.any(rho <= 0):
            raise VoxeldoseError(
                "the density map must be positive inside the VOI", tag="density_g_per_ml", expected="g/ml > 0"
            )
        m = wv * rho * voxel_ml
        mass_g = float(m.sum())
        mean_gy = float(np.sum(m * dv) / mass_g)
        weighting = "mass"

    inside = wv >= 0.5
    if np.any(inside):
        min_gy, max_gy, over = float(dv[inside].min()), float(dv[inside].max()), "fraction>=0.5"
    else:
        min_gy, max_gy, over = float(dv.min()), float(dv.max()), "fraction>0"
        notes.append("no voxel is at least half inside the VOI: min/max taken over every voxel it touches")

    out: dict[str, Any] = {
        "volume_ml": h.total_volume_ml,
        "mass_g": mass_g,
        "mean_gy": mean_gy,
        "mean_weighting": weighting,
        "min_gy": min_gy,
        "max_gy": max_gy,
        "min_max_over": over,
    }
    for p in d_percent:
        out[f"D{_fmt(float(p))}_gy"] = h.D(float(p))
    for cc in dose_cc:
        val = h.D_cc(float(cc))
        out[f"D{_fmt(float(cc))}cc_gy"] = val
        if val is None:
            notes.append(f"D{_fmt(float(cc))}cc not defined: the VOI ({h.total_volume_ml:.3g} ml) is smaller")
    for g in v_gy:
        out[f"V{_fmt(float(g))}Gy_fraction"] = h.V(float(g))
    out["injected_activity_bq"] = float(injected_activity_bq)
    out["gy_per_gbq"] = mean_gy / (injected_activity_bq / 1e9)
    out["dvh"] = h.to_dict(max_points=dvh_max_points)
    out["notes"] = notes
    return out


# =============================================================================================
# Radiobiology
# =============================================================================================
@dataclass(frozen=True)
class Radiobiology:
    """Linear–quadratic parameters of one tissue: α/β (Gy) and the repair half-time (s)."""

    alpha_beta_gy: float
    repair_half_time_s: float
    source: str = ""

    @property
    def repair_rate_per_s(self) -> float:
        """μ = ln 2 / T_rep, s⁻¹."""
        return math.log(2.0) / self.repair_half_time_s


#: Defaults per VOI role; override per VOI with :func:`radiobiology_for`.  The one source of these
#: numbers: :data:`voxeldose.spec.DEFAULT_RADIOBIOLOGY` (the job spec's defaults) and
#: :mod:`voxeldose.cycles` are built from it.
RADIOBIOLOGY_DEFAULTS: dict[str, Radiobiology] = {
    "kidney": Radiobiology(
        2.6,
        2.8 * HOUR_S,
        "kidney α/β 2.6 Gy, T_rep 2.8 h as used for PRRT kidney BED by Barone et al. 2005 "
        "(J Nucl Med 46 Suppl 1:99S) and Bodei et al. 2008 (Eur J Nucl Med Mol Imaging 35:1847)",
    ),
    "tumour": Radiobiology(10.0, 1.5 * HOUR_S, "customary tumour values α/β 10 Gy, T_rep 1.5 h (convention)"),
}


def radiobiology_for(
    role: str, *, alpha_beta_gy: float | None = None, repair_half_time_s: float | None = None
) -> Radiobiology:
    """The default parameters for ``role`` ('kidney', 'tumour'; 'kidneys'/'tumor' accepted), with
    optional per-VOI overrides.  An unknown role needs both values given."""
    key = role.strip().lower().rstrip("s")
    key = {"tumor": "tumour", "kidney_left": "kidney", "kidney_right": "kidney"}.get(key, key)
    base = RADIOBIOLOGY_DEFAULTS.get(key)
    if base is None and (alpha_beta_gy is None or repair_half_time_s is None):
        raise VoxeldoseError(
            f"no default radiobiological parameters for VOI role {role!r}",
            tag="role",
            expected=f"one of {sorted(RADIOBIOLOGY_DEFAULTS)} or both alpha_beta_gy and repair_half_time_s",
        )
    ab = alpha_beta_gy if alpha_beta_gy is not None else base.alpha_beta_gy  # type: ignore[union-attr]
    tr = repair_half_time_s if repair_half_time_s is not None else base.repair_half_time_s  # type: ignore[union-attr]
    if not ab > 0:
        raise VoxeldoseError("α/β must be positive", tag="alpha_beta_gy", found=ab)
    if not (tr > 0 and math.isfinite(tr)):
        raise VoxeldoseError(
            "the repair half-time must be a positive number of seconds", tag="repair_half_time_s", found=tr
        )
    src = base.source if base is not None and alpha_beta_gy is None and repair_half_time_s is None else "user-supplied"
    return Radiobiology(float(ab), float(tr), src)


def _check_exponentials(exponentials: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray([(float(c), float(k)) for c, k in exponentials], dtype=np.float64)
    except (TypeError, ValueError):
        raise VoxeldoseError(
            "a time–activity curve must be a list of (coefficient, rate_per_s) pairs",
            tag="exponentials",
            found=exponentials,
        ) from None
    if arr.size == 0:
        raise VoxeldoseError("the time–activity curve has no exponential term", tag="exponentials")
    c, k = arr[:, 0], arr[:, 1]
    if not np.all(np.isfinite(arr)):
        raise VoxeldoseError(
            "the time–activity curve has non-finite parameters", tag="exponentials", found=exponentials
        )
    if np.any(k <= 0):
        raise VoxeldoseError(
            "every exponential of the time–activity curve must decay (rate > 0): otherwise the dose is infinite",
            tag="exponentials",
            expected="effective rates k_i > 0 s⁻¹",
            found=exponentials,
        )
    scale = float(np.abs(c).sum())
    if c.sum() < -1e-9 * scale or c[np.argmin(k)] <= 0 or (c / k).sum() <= 0:
        raise VoxeldoseError(
            "the time–activity curve is negative at some time (a negative activity has no dose rate)",
            tag="exponentials",
            expected="A(0) ≥ 0 and a positive slowest term",
            found=exponentials,
        )
    return c, k


def lea_catcheside_g(exponentials: Sequence[tuple[float, float]], repair_half_time_s: float) -> float:
    """Lea–Catcheside factor ``G`` for a dose rate ∝ ``A(t) = Σ c_i e^{−k_i t}`` (closed form, see the
    module docstring): ``G = (2/D²) Σ_ij c_i c_j / ((k_i + k_j)(k_i + μ))``, ``D = Σ c_i/k_i``,
    ``μ = ln2/T_rep``.  ``exponentials`` are ``(coefficient, rate_per_s)`` pairs with *effective* rates
    (biological + physical; see :func:`with_physical_decay`); the coefficients' unit cancels.
    0 < G ≤ 1; G → 1 for an instantaneous dose, G → 0 for a slow one."""
    c, k = _check_exponentials(exponentials)
    if not (repair_half_time_s > 0 and math.isfinite(repair_half_time_s)):
        raise VoxeldoseError(
            "the repair half-time must be a positive number of seconds",
            tag="repair_half_time_s",
            found=repair_half_time_s,
        )
    mu = math.log(2.0) / repair_half_time_s
    total = float(np.sum(c / k))
    num = float(np.sum(np.outer(c, c) / ((k[:, None] + k[None, :]) * (k[:, None] + mu))))
    return 2.0 * num / total**2


def with_physical_decay(
    exponentials: Sequence[tuple[float, float]], decay_constant_per_s: float
) -> list[tuple[float, float]]:
    """Biological rates → effective rates: ``k_eff = k_bio + λ_phys`` (for a decay-corrected fit)."""
    return [(float(c), float(k) + decay_constant_per_s) for c, k in exponentials]


def bed(dose_gy: Any, g: Any, alpha_beta_gy: float) -> Any:
    """Biologically effective dose ``BED = D + G·D²/(α/β)`` (Gy).  Works on scalars and arrays (e.g. a
    dose map with one VOI's G).  ``alpha_beta_gy = inf`` gives ``BED = D``."""
    if not alpha_beta_gy > 0:
        raise VoxeldoseError("α/β must be positive", tag="alpha_beta_gy", found=alpha_beta_gy)
    d = np.asarray(dose_gy, dtype=np.float64)
    gg = np.asarray(g, dtype=np.float64)
    if np.any(gg < 0) or np.any(gg > 1 + 1e-12):
        raise VoxeldoseError("the Lea–Catcheside factor G must lie in [0, 1]", tag="g_factor", found=g)
    out = d + gg * d * d / alpha_beta_gy
    return float(out) if out.ndim == 0 else out


def eqd2(bed_gy: Any, alpha_beta_gy: float) -> Any:
    """Equivalent dose in 2 Gy fractions: ``EQD2 = BED / (1 + 2/(α/β))`` (Gy)."""
    if not alpha_beta_gy > 0:
        raise VoxeldoseError("α/β must be positive", tag="alpha_beta_gy", found=alpha_beta_gy)
    out = np.asarray(bed_gy, dtype=np.float64) / (1.0 + 2.0 / alpha_beta_gy)
    return float(out) if out.ndim == 0 else out


def bed_from_exponentials(
    dose_gy: Any, exponentials: Sequence[tuple[float, float]], *, params: Radiobiology
) -> dict[str, Any]:
    """BED and EQD2 of a VOI dose delivered with the kinetics ``exponentials`` (one cycle)."""
    g = lea_catcheside_g(exponentials, params.repair_half_time_s)
    b = bed(dose_gy, g, params.alpha_beta_gy)
    return {
        "dose_gy": dose_gy if np.ndim(dose_gy) else float(dose_gy),
        "g_factor": g,
        "bed_gy": b,
        "eqd2_gy": eqd2(b, params.alpha_beta_gy),
        "alpha_beta_gy": params.alpha_beta_gy,
        "repair_half_time_s": params.repair_half_time_s,
        "radiobiology_source": params.source,
    }


# =============================================================================================
# Red marrow
# =============================================================================================
def marrow_image_based(mean_dose_l2l4_gy: float, *, recovery_coefficient: float = 1.0) -> dict[str, Any]:
    """Red-marrow absorbed dose from the mean absorbed dose in a L2–L4 vertebral-body VOI.

    ``D_RM = D̄(L2–L4) / RC``.  The vertebral bodies hold red marrow, and their activity concentration
    is taken as that of the whole red marrow (the VOI's dose stands for the red marrow everywhere).  A
    vertebral body is small against the SPECT resolution, so its measured concentration is lowered by
    the partial-volume effect (spill-out; spill-in from kidneys and tumours acts the other way): the
    recovery coefficient ``RC`` — measured for the site's camera and reconstruction with a phantom of
    vertebra-sized inserts — corrects for it.  Example: a L2–L4-sized 80 ml insert gave RC = 0.78 in
    "Implementation of patient dosimetry in the clinical practice after targeted radiotherapy using
    [177Lu-[DOTA0, Tyr3]-octreotate" (EJNMMI Research 2018, doi:10.1186/s13550-018-0459-4).
    Image-based marrow doses run higher than blood-based ones and depend on method and skeletal
    metastases (Hagmarker et al. 2019, J Nucl Med 60(10):1406–1413); vertebrae with metastases must
    be left out of the VOI.  ``RC = 1`` means no correction.
    """
    if not (recovery_coefficient > 0 and math.isfinite(recovery_coefficient)):
        raise VoxeldoseError(
            "the recovery coefficient must be a positive number",
            tag="recovery_coefficient",
            expected="0 < RC ≤ 1 (typically)",
            found=recovery_coefficient,
        )
    if not (mean_dose_l2l4_gy >= 0 and math.isfinite(mean_dose_l2l4_gy)):
        raise VoxeldoseError(
            "the L2–L4 mean absorbed dose must be a number ≥ 0 Gy", tag="mean_dose_l2l4_gy", found=mean_dose_l2l4_gy
        )
    notes = ["L2–L4 vertebral-body dose taken to stand for the whole red marrow"]
    if recovery_coefficient == 1.0:
        notes.append("no partial-volume (recovery) correction applied")
    return {
        "red_marrow_gy": float(mean_dose_l2l4_gy) / float(recovery_coefficient),
        "method": "image-based (L2–L4 vertebral bodies)",
        "mean_dose_l2l4_gy": float(mean_dose_l2l4_gy),
        "recovery_coefficient": float(recovery_coefficient),
        "notes": notes,
    }


def _lu177_defaults() -> tuple[float, float]:
    from . import nuclides

    n = nuclides.load("Lu-177")
    return n.decay_constant_per_s, electron_energy_per_decay_MeV(n)


def _fit_exponentials(t: np.ndarray, c: np.ndarray, n_terms: int) -> list[tuple[float, float]]:
    """Least-squares sum of ``n_terms`` decaying exponentials (relative residuals)."""
    from scipy.optimize import curve_fit

    # start: log-linear fit to the last points (slow phase), the rest to the residual
    k_slow = max(-np.polyfit(t[-2:], np.log(c[-2:]), 1)[0], 1e-9)
    c_slow = float(np.exp(np.polyfit(t[-2:], np.log(c[-2:]), 1)[1]))
    if n_terms == 1:
        p0 = [c[0] * math.exp(k_slow * t[0]), k_slow]

        def f(tt: np.ndarray, a: float, k: float) -> np.ndarray:
            return a * np.exp(-k * tt)
    else:
        resid = np.clip(c[:2] - c_slow * np.exp(-k_slow * t[:2]), c[:2] * 1e-3, None)
        k_fast = max(-np.polyfit(t[:2], np.log(resid), 1)[0], 5 * k_slow) if t[1] > t[0] else 10 * k_slow
        c_fast = float(resid[0] * math.exp(k_fast * t[0]))
        p0 = [c_fast, k_fast, c_slow, k_slow]

        def f(tt: np.ndarray, a1: float, k1: float, a2: float, k2: float) -> np.ndarray:  # type: ignore[misc]
            return a1 * np.exp(-k1 * tt) + a2 * np.exp(-k2 * tt)

    try:
        popt, _ = curve_fit(f, t, c, p0=p0, sigma=c, maxfev=20000, bounds=(0.0, np.inf))
    except (RuntimeError, ValueError) as exc:
        raise VoxeldoseError(
            f"the blood time–activity fit did not converge ({exc})",
            tag="blood_samples",
            expected=f"{n_terms}-exponential clearance",
        ) from None
    pairs = [(float(popt[2 * i]), float(popt[2 * i + 1])) for i in range(n_terms)]
    return [(a, k) for a, k in pairs if a > 0 and k > 0]


def blood_time_integrated_concentration(
    samples: Sequence[tuple[float, float]],
    *,
    model: str = "mono",
    decay_constant_per_s: float,
) -> dict[str, Any]:
    """Time-integrated activity concentration of blood, ∫₀^∞ C(t) dt (Bq·s/ml), from samples
    ``(time_s after injection, Bq/ml at that time, not decay corrected)``.

    ``model``: ``'mono'`` (C₀e^{−kt}, least squares with relative weights; ≥ 2 samples),
    ``'bi'`` (two exponentials; ≥ 4 samples) — integrated analytically as Σ a/k — or ``'trapezoid'``
    (≥ 2 samples): the area under the samples, before the first sample the curve of the first two
    extrapolated exponentially back to t = 0 (held constant if it rises), after the last the last
    two samples' exponential, but never slower than physical decay (``decay_constant_per_s``).
    A small self-contained helper (voxeldose.timeactivity handles image-based curves).
    """
    if len(samples) < 2:
        raise VoxeldoseError(
            "blood-based marrow dosimetry needs at least two blood samples", tag="blood_samples", found=len(samples)
        )
    arr = np.asarray(sorted((float(t), float(c)) for t, c in samples), dtype=np.float64)
    t, c = arr[:, 0], arr[:, 1]
    if np.any(t < 0) or np.any(np.diff(t) <= 0) or np.any(c <= 0) or not np.all(np.isfinite(arr)):
        raise VoxeldoseError(
            "blood samples must have distinct times ≥ 0 s and concentrations > 0 Bq/ml",
            tag="blood_samples",
            found=samples,
        )
    lam = float(decay_constant_per_s)
    if model == "mono" or model == "bi":
        n_terms = 1 if model == "mono" else 2
        if len(t) < 2 * n_terms:
            raise VoxeldoseError(
                f"a {model}-exponential blood fit needs at least {2 * n_terms} samples",
                tag="blood_samples",
                found=len(t),
            )
        if n_terms == 1 and len(t) == 2:
            k = -math.log(c[1] / c[0]) / (t[1] - t[0])
            terms = [(c[0] * math.exp(k * t[0]), k)]
        else:
            terms = _fit_exponentials(t, c, n_terms)
        if not terms or any(k < lam * (1 - 1e-6) for _, k in terms):
            raise VoxeldoseError(
                "the fitted blood clearance is slower than physical decay (or rising): check the samples",
                tag="blood_samples",
                expected=f"effective rates ≥ λ_phys = {lam:.3g} s⁻¹",
                found=terms,
            )
        tia = float(sum(a / k for a, k in terms))
        return {"tia_bq_s_per_ml": tia, "model": model, "exponentials": terms}
    if model == "trapezoid":
        area = float(_trapezoid(c, t))
        k0 = -math.log(c[1] / c[0]) / (t[1] - t[0])
        head = (c[0] * (math.exp(k0 * t[0]) - 1.0) / k0) if k0 > 0 else c[0] * t[0]
        k_end = -math.log(c[-1] / c[-2]) / (t[-1] - t[-2])
        k_end = max(k_end, lam)
        tail = c[-1] / k_end
        return {
            "tia_bq_s_per_ml": head + area + tail,
            "model": model,
            "head_bq_s_per_ml": head,
            "tail_bq_s_per_ml": tail,
            "tail_rate_per_s": k_end,
        }
    raise VoxeldoseError(
        "unknown blood time–activity model", tag="model", expected="'mono', 'bi' or 'trapezoid'", found=model
    )


def marrow_blood_based(
    blood_samples: Sequence[tuple[float, float]],
    *,
    rmblr: float = 1.0,
    model: str = "mono",
    patient_mass_kg: float | None = None,
    red_marrow_mass_g: float = 1170.0,
    reference_body_mass_kg: float = 73.0,
    decay_constant_per_s: float | None = None,
    electron_energy_per_decay_mev: float | None = None,
    electron_absorbed_fraction: float = 1.0,
    cross_dose_gy: float = 0.0,
) -> dict[str, Any]:
    """Red-marrow absorbed dose, blood-based method (EANM guideline, Hindorf et al. 2010,
    Eur J Nucl Med Mol Imaging 37(6):1238–1250), self-dose plus a given cross-dose.

    1. Blood: ``Ã_blood`` (Bq·s/ml) = ∫ C_blood dt from the samples
       (:func:`blood_time_integrated_concentration`, ``model``).
    2. Marrow: ``[Ã_RM] = RMBLR · [Ã_blood]`` (per g of marrow, taking 1 ml ≈ 1 g) and
       ``Ã_RM = [Ã_RM] · m_RM``.  For [177Lu]Lu-DOTATATE the marrow concentration equals the blood
       concentration, RMBLR = 1 (Forrer et al., "Bone marrow dosimetry in peptide receptor radionuclide
       therapy with [177Lu-DOTA0,Tyr3]octreotate", Eur J Nucl Med Mol Imaging 2009).  ``m_RM`` is the
       reference red-marrow mass (default 1170 g, ICRP 89 adult male active marrow; scaled by
       ``patient_mass_kg / reference_body_mass_kg`` when the patient's mass is given, as the guideline
       does).
    3. Self-dose: ``D_self = Ã_RM · E_e · φ / m_RM`` with ``E_e`` the electron energy per decay
       (ICRP-107, Lu-177: 0.1479 MeV) and ``φ`` the electron absorbed fraction in marrow.  ``φ = 1``
       is an approximation: the mean β range of Lu-177 (~0.2–0.3 mm) is comparable to trabecular
       marrow cavities, so some energy goes into bone; photons are neglected in the self-dose.  Note
       that ``m_RM`` cancels: ``D_self = RMBLR · Ã_blood · E_e · φ`` — the mass only matters for the
       reported ``Ã_RM`` and for cross-dose S-values.
    4. Cross-dose from the remainder of the body, organs and tumours — significant for this
       peptide (Forrer et al. 2009) — is computed in the guideline with S-values (remainder-of-body
       ← marrow) that voxeldose does not ship: give it as ``cross_dose_gy`` (e.g. from OLINDA/EXM or
       IDAC-Dose with the whole-body TIA).  It defaults to 0, and the result says so.
    """
    lam_default, e_default = _lu177_defaults()
    lam = lam_default if decay_constant_per_s is None else float(decay_constant_per_s)
    e_mev = e_default if electron_energy_per_decay_mev is None else float(electron_energy_per_decay_mev)
    for name, val, ok in (
        ("rmblr", rmblr, rmblr > 0),
        ("red_marrow_mass_g", red_marrow_mass_g, red_marrow_mass_g > 0),
        ("electron_absorbed_fraction", electron_absorbed_fraction, 0 < electron_absorbed_fraction <= 1),
        ("cross_dose_gy", cross_dose_gy, cross_dose_gy >= 0),
        ("decay_constant_per_s", lam, lam > 0),
        ("patient_mass_kg", patient_mass_kg, patient_mass_kg is None or patient_mass_kg > 0),
    ):
        if not ok:
            raise VoxeldoseError(f"invalid {name}", tag=name, found=val)
    blood = blood_time_integrated_concentration(blood_samples, model=model, decay_constant_per_s=lam)
    m_rm = red_marrow_mass_g * (patient_mass_kg / reference_body_mass_kg if patient_mass_kg else 1.0)
    conc_rm = rmblr * blood["tia_bq_s_per_ml"]  # Bq·s per g of marrow (1 ml ≈ 1 g)
    tia_rm = conc_rm * m_rm
    self_gy = tia_rm * e_mev * J_PER_MEV * electron_absorbed_fraction / (m_rm * 1e-3)
    notes = []
    if cross_dose_gy == 0.0:
        notes.append(
            "cross-dose from the remainder of the body, organs and tumours not included "
            "(give cross_dose_gy): the result is the marrow self-dose only"
        )
    if electron_absorbed_fraction == 1.0:
        notes.append("electron absorbed fraction in marrow taken as 1 (approximation)")
    return {
        "red_marrow_gy": self_gy + cross_dose_gy,
        "self_dose_gy": self_gy,
        "cross_dose_gy": float(cross_dose_gy),
        "method": "blood-based (EANM 2010)",
        "blood_tia_bq_s_per_ml": blood["tia_bq_s_per_ml"],
        "blood_model": blood["model"],
        "rmblr": float(rmblr),
        "red_marrow_mass_g": m_rm,
        "red_marrow_tia_bq_s": tia_rm,
        "electron_energy_per_decay_mev": e_mev,
        "electron_absorbed_fraction": float(electron_absorbed_fraction),
        "notes": notes,
    }
