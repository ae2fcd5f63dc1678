"""Radionuclide data from ICRP Publication 107 (Eckerman & Endo 2008), via PyPI ``icrp107-database``.

ICRP-107 is the reference for half-lives and emissions used in dosimetry (MIRD, OLINDA).  The
package ships one JSON file per nuclide with ``half_life``, ``time_unit`` and ``emissions`` as
(energy MeV, yield per decay) pairs by radiation type.  Data, not code: adding Y-90, I-131 or
Ac-225 means adding its name to :data:`SUPPORTED`.
"""

from __future__ import annotations

import json
import math
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
