"""Radionuclide data from ICRP Publication 107 (Eckerman & Endo 2008), via PyPI ``icrp107-database``.

ICRP-107 is the reference for half-lives and emissions used in dosimetry (MIRD, OLINDA).  The
package ships one JSON file per nuclide with ``half_life``, ``time_unit`` and ``emissions`` as
(energy MeV, yield per decay) pairs by radiation type.  :data:`SUPPORTED` lists the nuclides a *job* accepts
(Lu-177: imaging and pipeline are validated for it only); :data:`KERNEL_NUCLIDES` those with dose kernels
(Lu-177, Tb-161, Y-90, I-131 and the Ac-225 and Pb-212 chains).  Energy per decay by radiation type, decay
modes (branching from the emission yields) and decay chains are derived from the same records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from .errors import VoxeldoseError

#: Nuclides voxeldose can compute dose for (kernels validated).
SUPPORTED: tuple[str, ...] = ("Lu-177",)

#: Joules per MeV: 10⁶ × the elementary charge e = 1.602176634e-19 C, exact since the 2019 SI
#: redefinition (CODATA 2018 recommended values, Tiesinga et al. 2021, Rev Mod Phys 93:025010).  The one
#: definition in voxeldose: dose, metrics, kernels and the phantom import it from here.
J_PER_MEV = 1.602176634e-13

_TIME_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "y": 365.25 * 86400.0}
"""ICRP-107 time units in seconds (ICRP-107 uses the Julian year, 365.25 d)."""


@dataclass(frozen=True)
class Nuclide:
    """One nuclide's ICRP-107 record.

    ``emissions[kind]`` is a tuple of ``(energy_MeV, yield_per_decay)`` pairs; for ``"b-spectra"``
    the pairs are the β spectrum (energy MeV, probability density per MeV per decay).
    """

    name: str
    half_life_s: float
    emissions: dict[str, tuple[tuple[float, float], ...]]

    @property
    def decay_constant_per_s(self) -> float:
        """λ = ln 2 / T½, s⁻¹."""
        return math.log(2.0) / self.half_life_s


def canonical_name(name: str) -> str:
    """Normalise 'Lu177', 'lu-177', '177Lu', '^177^Lutetium' to ICRP-107's 'Lu-177'."""
    s = name.strip().replace("^", "").replace(" ", "")
    low = s.lower()
    for full, sym in (("lutetium", "lu"), ("yttrium", "y"), ("iodine", "i"), ("actinium", "ac")):
        low = low.replace(full, sym)
    digits = "".join(c for c in low if c.isdigit())
    letters = "".join(c for c in low if c.isalpha())
    meta = ""
    if letters.endswith("m") and letters not in ("m",) and len(letters) > 1 and letters[:-1] in ("lu", "tc", "in"):
        letters, meta = letters[:-1], "m"
    if not digits or not letters:
        return name.strip()
    return f"{letters.capitalize()}-{digits}{meta}"


@cache
def load(name: str) -> Nuclide:
    """Load a nuclide's ICRP-107 record (any spelling :func:`canonical_name` accepts)."""
    canon = canonical_name(name)
    try:
        text = resources.files("icrp107_database").joinpath("icrp107", f"{canon}.json").read_text()
    except FileNotFoundError:
        raise VoxeldoseError(
            f"radionuclide {name!r} is not in the ICRP-107 database", expected="a nuclide such as 'Lu-177'"
        ) from None
    data = json.loads(text)
    if isinstance(data, str):  # the package stores each record as a JSON-encoded string
        data = json.loads(data)
    unit = data["time_unit"]
    emissions = {kind: tuple((float(e), float(y)) for e, y in pairs) for kind, pairs in data["emissions"].items()}
    return Nuclide(canon, float(data["half_life"]) * _TIME_UNIT_S[unit], emissions)


def require_supported(name: str, *, path: str | None = None, tag: str | None = None) -> Nuclide:
    """Return the nuclide if voxeldose supports it, else raise 'unsupported nuclide'."""
    canon = canonical_name(name)
    if canon not in SUPPORTED:
        raise VoxeldoseError(
            f"unsupported nuclide {name!r}", path=path, tag=tag, expected=" or ".join(SUPPORTED), found=name
        )
    return load(canon)


# ---------------------------------------------------------------------------------------------
# Emission accessors for dose kernels (additive; the functions above are unchanged).
#
# ICRP-107 lists, per decay: the β⁻ branches as (mean energy MeV, yield), the β spectrum
# ('b-spectra') as (energy MeV, probability density per MeV per decay), discrete electrons
# ('IE' internal-conversion, 'auger') and photons ('gamma', 'X', 'annihilation') as (MeV, yield).
# ---------------------------------------------------------------------------------------------

#: ICRP-107 radiation types that are electrons with discrete energies.
DISCRETE_ELECTRON_KINDS: tuple[str, ...] = ("IE", "auger")
#: ICRP-107 radiation types that are photons.
PHOTON_KINDS: tuple[str, ...] = ("gamma", "X", "annihilation")


def _as_nuclide(nuclide: Nuclide | str) -> Nuclide:
    return nuclide if isinstance(nuclide, Nuclide) else load(nuclide)


def mean_energy_per_decay_MeV(nuclide: Nuclide | str, kinds: tuple[str, ...]) -> float:
    """Σ energy × yield over the listed ICRP-107 radiation types, MeV per decay.

    For ``'beta-'``/``'beta+'`` the ICRP-107 energy is the branch's *mean* β energy, so the sum is the
    mean β energy per decay (Lu-177: 0.1333 MeV).
    """
    nuc = _as_nuclide(nuclide)
    return float(sum(e * y for k in kinds for e, y in nuc.emissions.get(k, ())))


#: ICRP-107 radiation types whose energy :func:`electron_energy_per_decay_MeV` sums: β⁻/β⁺ branches
#: (mean energies × yields), internal-conversion and Auger electrons.  ``b-spectra`` (the β spectrum as a
#: density per MeV) is not a list of lines and is not summed.
ELECTRON_KINDS: tuple[str, ...] = ("beta-", "beta+") + DISCRETE_ELECTRON_KINDS


def electron_energy_per_decay_MeV(nuclide: Nuclide | str) -> float:
    """Mean kinetic energy emitted as electrons per decay, MeV: ICRP-107 β⁻ (and β⁺) mean energies ×
    yields + internal-conversion + Auger electrons (Lu-177: 0.1479 MeV).

    The single definition used by the dose engine, the kernels, the marrow metrics and the phantom
    truth.  ``nuclide`` is a :class:`Nuclide` or any name :func:`canonical_name` accepts.
    """
    return mean_energy_per_decay_MeV(nuclide, ELECTRON_KINDS)


def photon_energy_per_decay_MeV(nuclide: Nuclide | str) -> float:
    """Mean energy emitted as photons per decay, MeV: ICRP-107 γ + X-rays + annihilation photons
    (Lu-177: 0.0351 MeV).  ``nuclide`` is a :class:`Nuclide` or a name."""
    return mean_energy_per_decay_MeV(nuclide, PHOTON_KINDS)


def photon_lines(nuclide: Nuclide, min_energy_MeV: float = 0.0) -> tuple[tuple[float, float], ...]:
    """All photon lines (energy MeV, yield per decay) with energy ≥ ``min_energy_MeV``, sorted by energy."""
    lines = [(e, y) for k in PHOTON_KINDS for e, y in nuclide.emissions.get(k, ()) if e >= min_energy_MeV and y > 0]
    return tuple(sorted(lines))


def discrete_electron_lines(nuclide: Nuclide) -> tuple[tuple[float, float], ...]:
    """Conversion and Auger electron lines (kinetic energy MeV, yield per decay), sorted by energy."""
    lines = [(e, y) for k in DISCRETE_ELECTRON_KINDS for e, y in nuclide.emissions.get(k, ()) if y > 0]
    return tuple(sorted(lines))


def beta_spectrum(nuclide: Nuclide) -> tuple[tuple[float, float], ...]:
    """The ICRP-107 β⁻ spectrum as (energy MeV, probability density per MeV per decay) pairs ('b-spectra').

    Empty for nuclides without β⁻ decay.  The tabulated density integrates (trapezoid) to the total β
    yield within the table's discretisation (Lu-177: 1.0017 vs 1.0000); use
    :func:`mean_energy_per_decay_MeV` with ``('beta-',)`` for the exact mean β energy per decay.
    """
    return tuple(nuclide.emissions.get("b-spectra", ()))


# ---------------------------------------------------------------------------------------------
# Beyond Lu-177 (issue 16): the nuclides with dose kernels, α energies, energy per decay by radiation
# type, decay modes and chains — all from the ICRP-107 records; nothing here makes a nuclide
# acceptable in a job (that is :data:`SUPPORTED`).
# ---------------------------------------------------------------------------------------------

#: Nuclides for which voxeldose builds dose kernels (``voxeldose kernel --nuclide …``): the therapy nuclides of
#: issue 16 and the members of the Ac-225 and Pb-212 chains.  Jobs still accept only :data:`SUPPORTED`.
KERNEL_NUCLIDES: tuple[str, ...] = (
    "Lu-177",
    "Tb-161",
    "Y-90",
    "I-131",
    "Ac-225",
    "Fr-221",
    "At-217",
    "Bi-213",
    "Po-213",
    "Tl-209",
    "Pb-209",
    "Pb-212",
    "Bi-212",
    "Po-212",
    "Tl-208",
)

#: ICRP-107 radiation types of heavy charged particles: α particles and the recoiling daughter nucleus.
ALPHA_KINDS: tuple[str, ...] = ("alpha", "alpha recoil")

#: Every ICRP-107 radiation type that is a list of (energy, yield) lines (all but the 'b-spectra' density).
LINE_KINDS: tuple[str, ...] = (
    "alpha",
    "alpha recoil",
    "beta-",
    "beta+",
    "IE",
    "auger",
    "gamma",
    "X",
    "annihilation",
    "neutron",
    "fission",
    "betaD",
)


def alpha_energy_per_decay_MeV(nuclide: Nuclide | str) -> float:
    """Kinetic energy of α particles and recoil nuclei per decay, MeV (ICRP-107 'alpha' + 'alpha recoil')."""
    return mean_energy_per_decay_MeV(nuclide, ALPHA_KINDS)


def energy_per_decay_by_type_MeV(nuclide: Nuclide | str) -> dict[str, float]:
    """Energy emitted per decay, MeV, for every ICRP-107 radiation type that the nuclide emits, plus the groups
    ``'electron'`` (β mean energies + IE + Auger), ``'photon'`` (γ + X + annihilation), ``'alpha'`` (α + recoil)
    under the keys ``'total electron'``, ``'total photon'``, ``'total alpha'`` and their sum ``'total'``."""
    nuc = _as_nuclide(nuclide)
    out = {k: mean_energy_per_decay_MeV(nuc, (k,)) for k in LINE_KINDS if nuc.emissions.get(k)}
    groups = {
        "total electron": electron_energy_per_decay_MeV(nuc),
        "total photon": photon_energy_per_decay_MeV(nuc),
        "total alpha": alpha_energy_per_decay_MeV(nuc),
    }
    return {**out, **groups, "total": sum(groups.values())}


def beta_spectrum_mean_energy_MeV(nuclide: Nuclide | str) -> float:
    """∫ E p(E) dE of the ICRP-107 β spectrum ('b-spectra', trapezoid), MeV per decay: an independent
    representation of the mean β energy that ICRP-107 also lists per branch (``'beta-'``)."""
    spec = beta_spectrum(_as_nuclide(nuclide))
    total = 0.0
    for (e0, p0), (e1, p1) in zip(spec[:-1], spec[1:]):
        total += 0.5 * (e0 * p0 + e1 * p1) * (e1 - e0)
    return total


@dataclass(frozen=True)
class DecayMode:
    """One decay mode: ``mode`` ('alpha' or 'beta-'), its branching fraction (per decay) and the daughter's
    ICRP-107 name, or ``None`` when the daughter is stable (not in ICRP-107)."""

    mode: str
    fraction: float
    daughter: str | None


def _z_and_a(name: str) -> tuple[int, int]:
    """(Z, A) of an ICRP-107 name such as 'Bi-213' (a metastable 'm' suffix is ignored)."""
    import xraylib  # element symbols ↔ Z; imported only when chains are computed (loads data tables)

    sym, rest = name.split("-")
    return int(xraylib.SymbolToAtomicNumber(sym)), int(rest.rstrip("m"))


def _nuclide_name(z: int, a: int) -> str:
    import xraylib  # element symbols ↔ Z; imported only when chains are computed (loads data tables)

    return f"{xraylib.AtomicNumberToSymbol(z)}-{a}"


def _in_icrp107(name: str) -> bool:
    return resources.files("icrp107_database").joinpath("icrp107", f"{name}.json").is_file()


def decay_modes(nuclide: Nuclide | str) -> tuple[DecayMode, ...]:
    """The nuclide's α and β⁻ decay modes with branching fractions from its ICRP-107 emissions.

    Every α decay emits exactly one α particle and every β⁻ decay one β⁻ particle, so the branching fraction
    of α (β⁻) decay is the sum of the α (β⁻) yields per decay (Bi-212: 0.3594 α, 0.6406 β⁻; Bi-213: 0.0209 α,
    0.9791 β⁻).  Daughter: (Z − 2, A − 4) for α, (Z + 1, A) for β⁻, in its ground state (ICRP-107 lists no
    metastable daughter for these chains); ``None`` if not in ICRP-107 (stable: Pb-208, Bi-209 …).
    Decays without listed particles (e.g. At-217's 0.012 % β⁻) are not returned.
    """
    nuc = _as_nuclide(nuclide)
    z, a = _z_and_a(nuc.name)
    out = []
    for mode, dz, da in (("alpha", -2, -4), ("beta-", 1, 0)):
        frac = sum(y for _, y in nuc.emissions.get(mode, ()))
        if frac > 0:
            d = _nuclide_name(z + dz, a + da)
            out.append(DecayMode(mode, frac, d if _in_icrp107(d) else None))
    return tuple(out)


@dataclass(frozen=True)
class ChainMember:
    """A member of a decay chain: its name, half-life (s) and the number of its decays per decay of the chain's
    parent at secular equilibrium (the product of the branching fractions on the way down)."""

    name: str
    half_life_s: float
    decays_per_parent_decay: float


def _chain_order(name: str) -> tuple[int, int]:
    """Sort key that puts a parent before its α/β⁻ daughters: mass number descending, then Z ascending."""
    z, a = _z_and_a(name)
    return (-a, z)


def decay_chain(
    parent: str, min_fraction: float = 1e-3, *, release: Mapping[str, float] | None = None
) -> tuple[ChainMember, ...]:
    """The parent and its radioactive progeny (ICRP-107), with decays per parent decay, parent first.

    A daughter fed with less than ``min_fraction`` decays per parent decay is dropped (default 0.1 %: e.g.
    At-217 → Rn-217 would be 0.012 %, and is not listed anyway, see :func:`decay_modes`).  Members reached
    by two paths (Pb-209 from Po-213 and from Tl-209) add up.  The counts are those of secular equilibrium;
    for a daughter not much shorter-lived than its parent (Bi-212, 1.01 h, after Pb-212, 10.64 h) the
    transient-equilibrium activity ratio λ_d/(λ_d − λ_p) = 1.10 is larger — the caller states the assumption.

    ``release`` maps a daughter to the fraction of its atoms, formed at the parent's site, that leave it before
    they decay (e.g. Bi-213 after the recoil of Fr-221/At-217 α decays frees it from the chelator): the
    counts are then the decays *at the parent's site*; that daughter's and its progeny's counts shrink by
    (1 − fraction), and the released atoms decay elsewhere (not counted).
    """
    root = _as_nuclide(parent)
    release = {canonical_name(k): float(v) for k, v in (release or {}).items()}
    for name, frac in release.items():
        if not (0.0 <= frac <= 1.0):
            raise VoxeldoseError(f"release fraction of {name} must lie in [0, 1]", found=frac)
    counts: dict[str, float] = {root.name: 1.0}
    pending = [root.name]
    while pending:
        # expand in chain order, so that every member's count is complete before its daughters get theirs
        pending.sort(key=_chain_order)
        name = pending.pop(0)
        for m in decay_modes(name):
            if m.daughter is None:
                continue
            add = counts[name] * m.fraction * (1.0 - release.get(m.daughter, 0.0))
            if m.daughter in counts:
                counts[m.daughter] += add
            elif counts[name] * m.fraction >= min_fraction:
                counts[m.daughter] = add
                pending.append(m.daughter)
    unknown = sorted(set(release) - (set(counts) - {root.name}))
    if unknown:
        raise VoxeldoseError(
            f"release fraction given for {', '.join(unknown)}, not a daughter in the {root.name} chain",
            expected=", ".join(n for n in counts if n != root.name) or "no daughters",
            found=unknown,
        )
    return tuple(ChainMember(n, load(n).half_life_s, counts[n]) for n in sorted(counts, key=_chain_order))
