"""Dose-voxel kernels (DVK): the tables and kernels on disk, the nuclide's point kernels, assembly and cache.

A kernel ``K[k, j, i]`` is the mean absorbed dose (Gy) in the target voxel at offset ``(i, j, k)`` per
decay (Bq·s) uniformly distributed in the source voxel at the centre, in an infinite homogeneous
medium.  The physics (electron and photon Monte Carlo, voxel averaging) is in
:mod:`voxeldose.kernelphysics`; details and validation in ``docs/kernels.md``.  This module:

* finds the electron and photon tables in the shipped ``kernels/tables`` (``VOXELDOSE_KERNEL_DIR``),
  else in the cache (``VOXELDOSE_KERNEL_CACHE``, default ``~/.cache/voxeldose/kernels``), else
  builds and caches them (:func:`electron_table`, :func:`photon_table`);
* turns them into the nuclide's radial energy-deposition distributions (:func:`electron_radial_cdf`,
  :func:`photon_radial_cdf`) and assembles a kernel (:func:`build_kernel`);
* names kernels by a hash of their parameters (:func:`kernel_id`), saves and loads them
  (:func:`save_kernel`, :func:`load_kernel`), finds or builds them (:func:`get_kernel`), and serves the
  ``voxeldose kernel`` command (:func:`kernel_command`) and the rebuild of the shipped files
  (``python -m voxeldose.kernels rebuild``).

Kernel (Gy per Bq·s) = absorbed fraction × energy per decay (J) / (ρ · V) with ρ·V in kg.

Units: energies MeV, mass thickness g/cm², lengths mm (kernel geometry), density g/cm³.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, cast

import numpy as np

from . import nuclides as _nuc
from .errors import VoxeldoseError
from .kernelphysics import (
    ALPHA_MAX_ENERGY_MEV,
    ALPHA_MAX_ESCAPE_FRACTION,
    DEFAULT_SAMPLES,
    J_PER_MEV,
    KERNEL_SAMPLING_SEED,
    MEDIA,
    METHOD_VERSION,
    NEAR_FIELD,
    alpha_escape_bound,
    alpha_range_bound_mm,
    build_electron_table,
    build_photon_table,
    csda_range_g_cm2,
    data_versions,
    electron_components,
    get_medium,
    needs_extended_electron_table,
    voxelise,
)

# =================================================================================================
# Tables on disk (shipped in kernels/tables, else cached)
# =================================================================================================


def shipped_dir() -> Path:
    """The repository's ``kernels/`` folder (override with ``VOXELDOSE_KERNEL_DIR``)."""
    env = os.environ.get("VOXELDOSE_KERNEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "kernels"


def cache_dir() -> Path:
    """Kernel cache (``VOXELDOSE_KERNEL_CACHE``, default ``~/.cache/voxeldose/kernels``)."""
    env = os.environ.get("VOXELDOSE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "voxeldose" / "kernels"


def _save_npz(path: Path, arrays: dict[str, Any], provenance: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    payload: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez_compressed(tmp, **payload, provenance=np.array(json.dumps(provenance)))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "provenance"}
        prov = json.loads(str(z["provenance"]))
    return arrays, prov


def _table_provenance_common() -> dict[str, Any]:
    return {
        "method_version": METHOD_VERSION,
        "data_versions": data_versions(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def _find_table(name: str) -> Path | None:
    for d in (shipped_dir() / "tables", cache_dir() / "tables"):
        p = d / name
        if p.exists():
            return p
    return None


def electron_table_name(medium: str, extended: bool = False) -> str:
    """File name of the electron table: ``electron_<composition>_v1.npz`` (≤ 1 MeV, no density effect) or
    ``electron_<composition>_3MeV_v1.npz`` (extended, ≤ 3 MeV, with the density effect)."""
    return f"electron_{get_medium(medium).table_key}{'_3MeV' if extended else ''}_v{METHOD_VERSION}.npz"


@cache
def electron_table(medium: str, extended: bool = False) -> dict[str, Any]:
    """The monoenergetic electron table for the medium's composition (shipped, cached or built); ``extended``:
    the 1 keV – 3 MeV table with the density effect (:data:`~voxeldose.kernelphysics.ELECTRON_TABLE_HE_ENERGIES_MEV`)."""
    med = get_medium(medium)
    name = electron_table_name(med.name, extended)
    p = _find_table(name)
    if p is None:
        t = build_electron_table(med.name, extended=extended)
        prov = {**_table_provenance_common(), **t.pop("provenance")}
        p = cache_dir() / "tables" / name
        _save_npz(p, t, prov)
    arrays, prov = _load_npz(p)
    return {**arrays, "provenance": prov}


@cache
def photon_table(nuclide: str, medium: str) -> dict[str, Any]:
    """The photon radial table for nuclide and medium composition (shipped, cached or built)."""
    med = get_medium(medium)
    name = f"photon_{_nuc.canonical_name(nuclide)}_{med.table_key}_v{METHOD_VERSION}.npz"
    p = _find_table(name)
    if p is None:
        t = build_photon_table(nuclide, med.name)
        prov = {**_table_provenance_common(), **t.pop("provenance")}
        p = cache_dir() / "tables" / name
        _save_npz(p, t, prov)
    arrays, prov = _load_npz(p)
    return {**arrays, "provenance": prov}


# =================================================================================================
# Nuclide electron point kernel (radial energy-deposition CDF)
# =================================================================================================


def electron_radial_cdf(nuclide: str, medium: str) -> tuple[np.ndarray, np.ndarray]:
    """(ρr edges g/cm², cumulative fraction of electron energy deposited within ρr) for the nuclide.

    Each source energy E uses the scaled table interpolated linearly in ln E between grid energies
    (on the cumulative distribution in x = r/R(E)), then mapped to r = x R(E).  Nuclides with electrons
    above 1 MeV use the extended table (and ranges with the density effect); all others the 1 MeV table.
    """
    extended = needs_extended_electron_table(nuclide)
    tab = electron_table(medium, extended)
    e_grid = tab["energies_MeV"]
    cdf_x = np.concatenate([np.zeros((e_grid.size, 1)), np.cumsum(tab["scaled_fraction"], axis=1)], axis=1)
    cdf_x /= cdf_x[:, -1:]
    x_edges = np.linspace(0.0, 1.0, cdf_x.shape[1])
    e, w = electron_components(nuclide)
    r_e = csda_range_g_cm2(e, medium, density_effect=extended)
    r_edges = np.linspace(0.0, float(r_e.max()) * 1.0001, 4001)
    cdf = np.zeros_like(r_edges)
    le = np.log(e_grid)
    for ei, wi, ri in zip(e, w, r_e):
        f = np.interp(math.log(ei), le, np.arange(le.size))
        i0 = min(int(f), le.size - 2)
        a = f - i0
        c = (1.0 - a) * cdf_x[i0] + a * cdf_x[i0 + 1]
        cdf += wi * np.interp(r_edges / ri, x_edges, c, right=1.0)
    return r_edges, cdf / w.sum()


def photon_radial_cdf(nuclide: str, medium: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(ρr edges, cumulative fraction of *total* photon energy per decay deposited within ρr, fraction
    escaping beyond the tally, total photon energy per decay MeV).  Lines < 1 keV are deposited at r = 0."""
    nuc = _nuc.load(nuclide)
    e_total = _nuc.photon_energy_per_decay_MeV(nuc)
    tab = photon_table(nuclide, medium)
    e_tr = float(tab["transported_energy_MeV"])
    local = (e_total - e_tr) / e_total
    frac = tab["fraction"] * e_tr / e_total
    cdf = local + np.concatenate([[0.0], np.cumsum(frac)])
    return tab["edges_g_cm2"], cdf, float(tab["escaped_fraction"]) * e_tr / e_total, e_total


# =================================================================================================
# The kernel
# =================================================================================================

#: ICRP-107 radiation types the kernels do not model (a kernel for a nuclide emitting them is refused):
#: positrons (their spectrum shares 'b-spectra' with β⁻ and needs annihilation in flight), neutrons, fission.
UNHANDLED_KINDS: tuple[str, ...] = ("beta+", "neutron", "fission")


@dataclass(frozen=True)
class DoseKernel:
    """A dose-voxel kernel in Gy per (Bq·s), array ``[k, j, i]`` with odd shape, source voxel at the centre.

    ``electron`` + ``photon`` (+ ``alpha``, when the nuclide emits α particles) = ``array``.  ``voxel_mm`` is
    ``(di, dj, dk)``.  ``alpha`` holds the α and recoil-nucleus energy, deposited in the source voxel.
    """

    array: np.ndarray
    electron: np.ndarray
    photon: np.ndarray
    nuclide: str
    voxel_mm: tuple[float, float, float]
    medium: str
    density_g_cm3: float
    energy_balance: dict[str, float]  # emitted/absorbed energies per decay, MeV, and fractions
    provenance: dict[str, Any] = field(default_factory=dict)
    alpha: np.ndarray | None = None

    @property
    def id(self) -> str:
        """Stable identifier of the kernel (hash of its parameters and data versions)."""
        size = tuple(int(s) for s in self.array.shape[::-1])
        return kernel_id(
            self.nuclide,
            self.voxel_mm,
            self.medium,
            size,
            self.density_g_cm3,
            self.provenance.get("data_versions"),
            self.provenance.get("n_samples", DEFAULT_SAMPLES),
        )

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.voxel_mm))


def _norm_voxel(voxel_mm: float | Sequence[float]) -> tuple[float, float, float]:
    """``(di, dj, dk)`` mm rounded to 1 nm from one number or three; ``VoxeldoseError`` otherwise."""
    # np.isscalar (not isinstance) so that NumPy scalars count as one number and arrays as three
    v: tuple[float, ...] = (
        (float(cast(float, voxel_mm)),) * 3
        if np.isscalar(voxel_mm)
        else tuple(float(x) for x in cast(Sequence[float], voxel_mm))
    )
    if len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v):
        raise VoxeldoseError(
            "kernel voxel size must be one positive number or three (di, dj, dk) in mm", found=voxel_mm
        )
    return cast(tuple[float, float, float], tuple(round(x, 6) for x in v))


def _norm_size(size: int | Sequence[int]) -> tuple[int, int, int]:
    """``(ni, nj, nk)`` voxels, each odd, from one number or three; ``VoxeldoseError`` otherwise."""
    s: tuple[int, ...] = (
        (int(cast(int, size)),) * 3 if np.isscalar(size) else tuple(int(x) for x in cast(Sequence[int], size))
    )
    if len(s) != 3 or not all(x >= 1 and x % 2 == 1 for x in s):
        raise VoxeldoseError(
            "kernel size must be odd (one number or (ni, nj, nk)), so that the source voxel is central", found=size
        )
    return s


def kernel_id(
    nuclide: str,
    voxel_mm: Sequence[float],
    medium: str,
    size: Sequence[int],
    density_g_cm3: float,
    versions: dict[str, str] | None = None,
    n_samples: int = DEFAULT_SAMPLES,
) -> str:
    """Hash (16 hex) of the kernel's parameters, method version and physics-data versions."""
    versions = data_versions() if versions is None else versions
    key = {
        "nuclide": _nuc.canonical_name(nuclide),
        "voxel_mm": [round(float(x), 6) for x in voxel_mm],
        "medium": get_medium(medium).name,
        "size": [int(x) for x in size],
        "density_g_cm3": round(float(density_g_cm3), 6),
        "method_version": METHOD_VERSION,
        "icrp107-database": versions.get("icrp107-database"),
        "xraylib": versions.get("xraylib"),
        "n_samples": int(n_samples),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_kernel(
    nuclide: str = "Lu-177",
    voxel_mm: float | Sequence[float] = 4.8,
    medium: str = "soft-tissue",
    size: int | Sequence[int] = 51,
    *,
    density_g_cm3: float | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    seed: int = KERNEL_SAMPLING_SEED,
) -> DoseKernel:
    """Build a kernel from the electron and photon tables (no cache look-up)."""
    t0 = time.perf_counter()
    nuc = _nuc.load(nuclide)
    unhandled = [k for k in UNHANDLED_KINDS if any(y > 0 for _, y in nuc.emissions.get(k, ()))]
    if unhandled:
        raise VoxeldoseError(
            f"no dose kernel for {nuc.name}: it emits {', '.join(unhandled)}, which the kernel physics does not model",
            expected="a β⁻, conversion/Auger-electron, photon or α emitter, e.g. "
            + ", ".join(_nuc.KERNEL_NUCLIDES[:4]),
            found=nuc.name,
        )
    med = get_medium(medium)
    rho = med.density_g_cm3 if density_g_cm3 is None else float(density_g_cm3)
    if not (rho > 0):
        raise VoxeldoseError("density must be positive (g/cm³)", found=density_g_cm3)
    vox = _norm_voxel(voxel_mm)
    shape = _norm_size(size)
    vol_mm3 = vox[0] * vox[1] * vox[2]
    mass_kg = rho * vol_mm3 * 1e-6  # g/cm³ · mm³ = 1e-3 g = 1e-6 kg
    rng = np.random.default_rng(seed)
    to_mm = 10.0 / rho  # g/cm² → mm

    e_el = _nuc.electron_energy_per_decay_MeV(nuc)
    e_ph = _nuc.photon_energy_per_decay_MeV(nuc)
    if e_el > 0:
        re, ce = electron_radial_cdf(nuc.name, med.name)
        # sample every voxel an electron can reach: |offset| ≤ 1/2 + R_max/d (Lu-177 ≥ 0.6 mm voxels: 3)
        near_el = max(NEAR_FIELD, int(float(re[-1]) * to_mm / min(vox)) + 1)
        f_el = voxelise(re * to_mm, ce, vox, shape, n_samples=n_samples, rng=rng, far_field=False, near_field=near_el)
    else:
        re, ce, f_el = np.zeros(2), np.zeros(2), np.zeros(shape[::-1])
    if e_ph > 0:
        rp, cp, esc_tally, _ = photon_radial_cdf(nuc.name, med.name)
        f_ph = voxelise(rp * to_mm, cp, vox, shape, n_samples=n_samples, rng=rng, far_field=True)
    else:
        f_ph, esc_tally = np.zeros(shape[::-1]), 0.0
    k_el = f_el * e_el * J_PER_MEV / mass_kg
    k_ph = f_ph * e_ph * J_PER_MEV / mass_kg
    c = tuple(s // 2 for s in shape[::-1])
    e_al = _nuc.alpha_energy_per_decay_MeV(nuc)
    k_al: np.ndarray | None = None
    alpha_balance: dict[str, float] = {}
    if e_al > 0:
        e_max = max(e for e, y in nuc.emissions.get("alpha", ()) if y > 0)
        r_al = alpha_range_bound_mm(med.name, rho)
        esc = alpha_escape_bound(r_al, vox)
        if e_max > ALPHA_MAX_ENERGY_MEV or esc > ALPHA_MAX_ESCAPE_FRACTION:
            raise VoxeldoseError(
                f"{nuc.name}: α particles (up to {e_max:.3f} MeV, range ≤ {r_al:.3f} mm in {med.name} at "
                f"ρ = {rho:g} g/cm³) would leave up to {100 * esc:.1f} % of their energy outside a "
                f"{' × '.join(f'{v:g}' for v in vox)} mm voxel; local deposition needs ≤ "
                f"{100 * ALPHA_MAX_ESCAPE_FRACTION:g} %",
                expected=f"α energies ≤ {ALPHA_MAX_ENERGY_MEV:g} MeV and larger voxels",
                found=vox,
            )
        k_al = np.zeros(shape[::-1])
        k_al[c] = e_al * J_PER_MEV / mass_kg
        alpha_balance = {
            "alpha_emitted_MeV": e_al,
            "alpha_absorbed_in_kernel_MeV": e_al,
            "alpha_max_energy_MeV": e_max,
            "alpha_range_bound_mm": r_al,
            "alpha_escape_bound_fraction": esc,
        }
    self_el = float(f_el[c])
    self_ph = float(f_ph[c])
    # mean energy-deposition radius of the electrons (mm), for the escape check
    mean_r_el = float(np.sum(0.5 * (re[1:] + re[:-1]) * np.diff(ce)) * to_mm) if e_el > 0 else 0.0
    balance = {
        "electron_emitted_MeV": e_el,
        "photon_emitted_MeV": e_ph,
        "electron_absorbed_in_kernel_MeV": float(f_el.sum() * e_el),
        "photon_absorbed_in_kernel_MeV": float(f_ph.sum() * e_ph),
        "electron_absorbed_fraction_in_kernel": float(f_el.sum()),
        "photon_absorbed_fraction_in_kernel": float(f_ph.sum()),
        "photon_escaped_beyond_tally_fraction": esc_tally,
        "electron_self_voxel_fraction": self_el,
        "photon_self_voxel_fraction": self_ph,
        "electron_self_voxel_rel_uncertainty": math.sqrt(max(self_el * (1 - self_el), 0.0) / n_samples) / self_el
        if self_el > 0
        else float("nan"),
        "photon_self_voxel_rel_uncertainty": math.sqrt(max(self_ph * (1 - self_ph), 0.0) / n_samples) / self_ph
        if self_ph > 0
        else float("nan"),
        "electron_escape_from_source_voxel_fraction": 1.0 - self_el,
        "electron_mean_deposition_radius_mm": mean_r_el,
        "electron_max_csda_range_mm": float(re[-1] * to_mm) if e_el > 0 else 0.0,
        "local_deposition_limit_Gy_per_Bqs": e_el * J_PER_MEV / mass_kg,
        "self_voxel_Gy_per_Bqs": float(k_el[c] + k_ph[c] + (k_al[c] if k_al is not None else 0.0)),
        **alpha_balance,
    }
    versions = data_versions()
    prov = {
        "kernel_id": kernel_id(nuc.name, vox, med.name, shape, rho, versions, n_samples),
        "units": "Gy per (Bq s) (= Gy per decay); array [k, j, i], source voxel at the centre",
        "nuclide": nuc.name,
        "voxel_mm": list(vox),
        "size": list(shape),
        "medium": med.name,
        "medium_composition": med.nist_name,
        "density_g_cm3": rho,
        "mean_excitation_eV": med.mean_excitation_eV,
        "method_version": METHOD_VERSION,
        "method": "electron: condensed-history MC radial table (Bethe CSDA + modified Wentzel MS), ICRP-107 "
        "beta spectrum + IE + Auger; photon: photon MC with xraylib cross sections; voxel averaging by "
        f"point sampling (Chebyshev offset <= {NEAR_FIELD}, electrons: to their range) and tent Gauss "
        "quadrature beyond"
        + ("; alpha + recoil: deposited in the source voxel (range check)" if k_al is not None else ""),
        "n_samples": n_samples,
        "seed": seed,
        "data_versions": versions,
        "electron_table": electron_table(med.name, needs_extended_electron_table(nuc.name))["provenance"]
        if e_el > 0
        else None,
        "photon_table": photon_table(nuc.name, med.name)["provenance"] if e_ph > 0 else None,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    total = k_el + k_ph if k_al is None else k_el + k_ph + k_al
    return DoseKernel(total, k_el, k_ph, nuc.name, vox, med.name, rho, balance, prov, k_al)


def _kernel_filename(k_id: str, nuclide: str, medium: str, vox: Sequence[float], shape: Sequence[int]) -> str:
    v = "x".join(f"{x:g}" for x in vox)
    return f"{_nuc.canonical_name(nuclide)}_{medium}_{v}mm_{shape[0]}_{k_id}.npz"


def save_kernel(kernel: DoseKernel, folder: Path) -> Path:
    """Write ``kernel`` as compressed .npz (+ provenance .json) into ``folder``; returns the .npz path."""
    shape = kernel.array.shape[::-1]
    p = Path(folder) / _kernel_filename(kernel.id, kernel.nuclide, kernel.medium, kernel.voxel_mm, shape)
    prov = {
        **kernel.provenance,
        "energy_balance": kernel.energy_balance,
        "storage": "octant [k>=0, j>=0, i>=0], float32; mirrored on load",
    }
    c = tuple(n // 2 for n in kernel.array.shape)
    octant = (slice(c[0], None), slice(c[1], None), slice(c[2], None))
    arrays = {
        "electron_octant": kernel.electron[octant].astype(np.float32),
        "photon_octant": kernel.photon[octant].astype(np.float32),
    }
    if kernel.alpha is not None:
        arrays["alpha_octant"] = kernel.alpha[octant].astype(np.float32)
    _save_npz(p, arrays, prov)
    return p


def _unfold(octant: np.ndarray) -> np.ndarray:
    """Mirror an octant ``[k>=0, j>=0, i>=0]`` into the full symmetric kernel."""
    a = octant.astype(np.float64)
    a = np.concatenate([a[::-1, :, :][:-1], a], axis=0)
    a = np.concatenate([a[:, ::-1, :][:, :-1], a], axis=1)
    return np.concatenate([a[:, :, ::-1][:, :, :-1], a], axis=2)


def load_kernel(path: Path) -> DoseKernel:
    """Read a kernel written by :func:`save_kernel`."""
    arrays, prov = _load_npz(Path(path))
    bal = prov.pop("energy_balance", {})
    el, ph = _unfold(arrays["electron_octant"]), _unfold(arrays["photon_octant"])
    al = _unfold(arrays["alpha_octant"]) if "alpha_octant" in arrays else None
    return DoseKernel(
        el + ph if al is None else el + ph + al,
        el,
        ph,
        prov["nuclide"],
        tuple(prov["voxel_mm"]),
        prov["medium"],
        float(prov["density_g_cm3"]),
        bal,
        prov,
        al,
    )


def get_kernel(
    nuclide: str = "Lu-177",
    voxel_mm: float | Sequence[float] = 4.8,
    medium: str = "soft-tissue",
    size: int | Sequence[int] = 51,
    *,
    density_g_cm3: float | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    use_cache: bool = True,
) -> DoseKernel:
    """The kernel for this nuclide, voxel size (mm; one value or (di, dj, dk)), medium and size (odd, voxels).

    Looks for a kernel with the same id (parameters + method + data versions) in the shipped
    ``kernels/`` folder, then in the cache (:func:`cache_dir`); otherwise builds it (a few seconds
    with the shipped electron/photon tables) and stores it in the cache.
    """
    med = get_medium(medium)
    rho = med.density_g_cm3 if density_g_cm3 is None else float(density_g_cm3)
    vox = _norm_voxel(voxel_mm)
    shape = _norm_size(size)
    canon = _nuc.canonical_name(nuclide)
    k_id = kernel_id(canon, vox, med.name, shape, rho, None, n_samples)
    name = _kernel_filename(k_id, canon, med.name, vox, shape)
    if use_cache:
        for d in (shipped_dir(), cache_dir()):
            p = d / name
            if p.exists():
                try:
                    return load_kernel(p)
                except Exception:  # noqa: BLE001 - a corrupt cache entry (any reader error) is rebuilt
                    pass
    k = build_kernel(canon, vox, med.name, shape, density_g_cm3=rho, n_samples=n_samples)
    if use_cache:
        try:
            save_kernel(k, cache_dir())
        except OSError:  # read-only home: still return the kernel
            pass
    return k


# =================================================================================================
# Decay chains (α emitters) and RBE-weighted dose
# =================================================================================================

#: Default relative biological effectiveness of α particles, for deterministic effects: 5 (MIRD Pamphlet No. 22,
#: Sgouros, Roeske, McDevitt et al. 2010, J Nucl Med 51:311).  It multiplies only the α (+ recoil) component,
#: and only in the separately reported RBE-weighted dose, Gy (RBE); absorbed dose in Gy never includes it.
DEFAULT_ALPHA_RBE = 5.0


@dataclass(frozen=True)
class ChainKernel:
    """Kernels of a decay chain at the parent's site, Gy per (Bq·s) of the *parent*.

    ``kernels[m]`` is member m's own kernel (per decay of m); ``weights[m]`` its decays per parent decay at
    the site (:func:`voxeldose.nuclides.decay_chain`); ``assumption`` says how they were obtained.
    """

    parent: str
    members: tuple[_nuc.ChainMember, ...]
    kernels: dict[str, DoseKernel]
    assumption: str

    @property
    def weights(self) -> dict[str, float]:
        """Decays of each member per decay of the parent, at the parent's site."""
        return {m.name: m.decays_per_parent_decay for m in self.members}

    def per_emitter(self) -> dict[str, np.ndarray]:
        """Absorbed dose kernel of each emitter of the chain, Gy per parent decay (they sum to :meth:`absorbed`)."""
        return {n: w * self.kernels[n].array for n, w in self.weights.items()}

    def by_radiation(self) -> dict[str, np.ndarray]:
        """Absorbed dose kernel by radiation type ('alpha' incl. recoil, 'electron', 'photon'), Gy per parent decay."""
        shape = next(iter(self.kernels.values())).array.shape
        parts = {key: np.zeros(shape) for key in ("alpha", "electron", "photon")}
        for n, w in self.weights.items():
            k = self.kernels[n]
            parts["electron"] += w * k.electron
            parts["photon"] += w * k.photon
            if k.alpha is not None:
                parts["alpha"] += w * k.alpha
        return parts

    def absorbed(self) -> np.ndarray:
        """Absorbed dose kernel of the chain, Gy per parent decay (no RBE)."""
        return cast(np.ndarray, sum(self.per_emitter().values()))

    def rbe_weighted(self, alpha_rbe: float = DEFAULT_ALPHA_RBE) -> np.ndarray:
        """RBE-weighted dose kernel, Gy (RBE) per parent decay: ``alpha_rbe`` × α part + electron + photon parts
        (RBE 1 for electrons and photons, MIRD Pamphlet 22)."""
        if not (math.isfinite(alpha_rbe) and alpha_rbe > 0):
            raise VoxeldoseError("the α RBE must be a positive number", found=alpha_rbe)
        p = self.by_radiation()
        out: np.ndarray = alpha_rbe * p["alpha"] + p["electron"] + p["photon"]
        return out


def chain_kernel(
    parent: str,
    voxel_mm: float | Sequence[float] = 4.8,
    medium: str = "soft-tissue",
    size: int | Sequence[int] = 51,
    *,
    release: dict[str, float] | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    use_cache: bool = True,
) -> ChainKernel:
    """Kernels of the parent and its progeny (:func:`get_kernel` each), weighted by their decays per parent decay.

    Assumption (stated in :attr:`ChainKernel.assumption`): every daughter decays at the parent's site in
    secular equilibrium with it, except for the ``release`` fractions (a daughter that leaves the site before
    it decays, with its progeny; e.g. ``{"Bi-213": 0.3}``), whose decays are not counted here.
    """
    members = _nuc.decay_chain(parent, release=release)
    kernels = {
        m.name: get_kernel(m.name, voxel_mm, medium, size, n_samples=n_samples, use_cache=use_cache)
        for m in members
        if m.decays_per_parent_decay > 0
    }
    members = tuple(m for m in members if m.name in kernels)
    rel = ", ".join(f"{_nuc.canonical_name(k)} {100 * v:g} % released" for k, v in (release or {}).items())
    assumption = (
        f"{members[0].name} chain: progeny decay at the parent's site in secular equilibrium"
        + (f" except {rel} (with its progeny)" if rel else "")
        + "; decays per parent decay: "
        + ", ".join(f"{m.name} {m.decays_per_parent_decay:.4g}" for m in members)
    )
    return ChainKernel(members[0].name, members, kernels, assumption)


def energy_balance_text(kernel: DoseKernel) -> str:
    """Human-readable energy balance and self-voxel figures of a kernel."""
    b = kernel.energy_balance
    vx = " × ".join(f"{v:g}" for v in kernel.voxel_mm)
    n = kernel.array.shape
    lines = [
        f"{kernel.nuclide} dose-voxel kernel, {kernel.medium} (ρ = {kernel.density_g_cm3:g} g/cm³), voxel {vx} mm, "
        f"{n[2]}×{n[1]}×{n[0]} voxels, id {kernel.id}",
        f"  electrons: emitted {b['electron_emitted_MeV'] * 1e3:.2f} keV/decay, absorbed in kernel "
        f"{b['electron_absorbed_in_kernel_MeV'] * 1e3:.2f} keV ({100 * b['electron_absorbed_fraction_in_kernel']:.2f} %)",
        f"  photons:   emitted {b['photon_emitted_MeV'] * 1e3:.2f} keV/decay, absorbed in kernel "
        f"{b['photon_absorbed_in_kernel_MeV'] * 1e3:.2f} keV ({100 * b['photon_absorbed_fraction_in_kernel']:.2f} %)",
        f"  source voxel: electron absorbed fraction {b['electron_self_voxel_fraction']:.4f} "
        f"(± {100 * b['electron_self_voxel_rel_uncertainty']:.3f} % sampling), escaping {100 * b['electron_escape_from_source_voxel_fraction']:.2f} %; "
        f"photon {b['photon_self_voxel_fraction']:.4f}",
        f"  source voxel dose {b['self_voxel_Gy_per_Bqs']:.4e} Gy/(Bq·s); local-deposition limit "
        f"{b['local_deposition_limit_Gy_per_Bqs']:.4e} Gy/(Bq·s)",
        f"  electron mean deposition radius {b['electron_mean_deposition_radius_mm']:.3f} mm, max CSDA range "
        f"{b['electron_max_csda_range_mm']:.3f} mm",
    ]
    if "alpha_emitted_MeV" in b:
        lines.append(
            f"  alphas (+ recoil): {b['alpha_emitted_MeV'] * 1e3:.1f} keV/decay deposited in the source voxel; "
            f"range ≤ {b['alpha_range_bound_mm'] * 1e3:.0f} µm, escape ≤ {100 * b['alpha_escape_bound_fraction']:.1f} %"
        )
    return "\n".join(lines)


def kernel_command(
    nuclide: str = "Lu-177",
    voxel_mm: float | Sequence[float] = 4.8,
    medium: str = "soft-tissue",
    size: int | Sequence[int] = 51,
    out_path: str | os.PathLike[str] | None = None,
) -> str:
    """Build (or fetch) a kernel, write it as .npy (Gy/(Bq·s), ``[k, j, i]``, source voxel at the centre)
    plus a ``.json`` with provenance and energy balance next to it, and return the energy-balance text."""
    k = get_kernel(nuclide, voxel_mm, medium, size)
    text = energy_balance_text(k)
    if out_path is not None:
        p = Path(out_path)
        if p.suffix != ".npy":
            p = p.with_suffix(".npy")
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, k.array)
        p.with_suffix(".json").write_text(
            json.dumps({**k.provenance, "energy_balance": k.energy_balance}, indent=2, sort_keys=True) + "\n"
        )
        text += f"\n  written: {p}"
    return text


#: Kernels shipped in ``kernels/`` (common SPECT voxel sizes, mm).
SHIPPED_VOXELS_MM: tuple[float, ...] = (4.42, 4.7952, 4.8)
SHIPPED_MEDIA: tuple[str, ...] = ("soft-tissue", "water")
#: Nuclides besides Lu-177 whose soft-tissue photon tables are shipped (the Lanconelli validation nuclides and
#: the α chains' members used by tests; the others build on first use).
SHIPPED_PHOTON_NUCLIDES: tuple[str, ...] = (
    "I-131",
    "Y-90",
    "Ac-225",
    "Fr-221",
    "At-217",
    "Bi-213",
    "Po-213",
    "Pb-212",
    "Bi-212",
    "Tl-208",
)


def rebuild_shipped(tables: bool = True, kernels: bool = True) -> list[Path]:
    """Regenerate ``kernels/tables`` and the shipped kernels (``python -m voxeldose.kernels rebuild``)."""
    out: list[Path] = []
    d = shipped_dir()
    if tables:
        for m in MEDIA:
            med = get_medium(m)
            t = build_electron_table(m)
            prov = {**_table_provenance_common(), **t.pop("provenance")}
            p = d / "tables" / f"electron_{med.table_key}_v{METHOD_VERSION}.npz"
            _save_npz(p, t, prov)
            out.append(p)
            t = build_photon_table("Lu-177", m)
            prov = {**_table_provenance_common(), **t.pop("provenance")}
            p = d / "tables" / f"photon_Lu-177_{med.table_key}_v{METHOD_VERSION}.npz"
            _save_npz(p, t, prov)
            out.append(p)
        for m in SHIPPED_MEDIA:  # extended electron tables (Y-90 and the α chains' β emitters)
            t = build_electron_table(m, extended=True)
            prov = {**_table_provenance_common(), **t.pop("provenance")}
            p = d / "tables" / electron_table_name(m, extended=True)
            _save_npz(p, t, prov)
            out.append(p)
        for nuc in SHIPPED_PHOTON_NUCLIDES:  # photon tables of the validation nuclides, soft tissue
            med = get_medium("soft-tissue")
            t = build_photon_table(nuc, med.name)
            prov = {**_table_provenance_common(), **t.pop("provenance")}
            p = d / "tables" / f"photon_{nuc}_{med.table_key}_v{METHOD_VERSION}.npz"
            _save_npz(p, t, prov)
            out.append(p)
        electron_table.cache_clear()
        photon_table.cache_clear()
    if kernels:
        for m in SHIPPED_MEDIA:
            for v in SHIPPED_VOXELS_MM:
                out.append(save_kernel(build_kernel("Lu-177", v, m, 51), d))
    return out


if __name__ == "__main__":  # pragma: no cover
    what = sys.argv[1] if len(sys.argv) > 1 else "rebuild"
    if what == "rebuild":
        for p in rebuild_shipped():
            print(p)
    elif what == "tables":
        for p in rebuild_shipped(kernels=False):
            print(p)
    elif what == "kernels":
        for p in rebuild_shipped(tables=False):
            print(p)
    else:
        raise SystemExit("usage: python -m voxeldose.kernels [rebuild|tables|kernels]")
