"""Nuclide data beyond Lu-177 (issue 16 part 1): half-lives, decay modes, chains and energy per decay from ICRP-107.

Reference values and where they come from:
- Half-lives: ICRP Publication 107 (Eckerman & Endo 2008, Ann. ICRP 38(3)), as tabulated there (they follow
  ENSDF): Lu-177 6.647 d, Tb-161 6.906 d, Y-90 64.10 h, I-131 8.021 d, Ac-225 10.0 d, Fr-221 4.9 min,
  At-217 32.3 ms, Bi-213 45.59 min, Po-213 4.2 µs, Tl-209 2.161 min, Pb-209 3.253 h, Pb-212 10.64 h,
  Bi-212 60.55 min, Po-212 0.299 µs, Tl-208 3.053 min.
- Lu-177 energy per decay: ICRP-107 (147.9 keV electrons, 35.1 keV photons; also tests/test_kernels.py).
- ICRP-107 gives each β emitter's mean energy twice: per branch ('beta-': mean energy × yield) and as the
  spectrum ('b-spectra', a density per MeV).  Their agreement within 1 % is the energy-per-decay check.
- α decay kinematics (momentum conservation): the recoil nucleus gets E_R = E_α m_α / m_d, with
  m_α/m_d ≈ 4.0026 / (A − 4) (atomic masses ≈ A u to 0.1 %).
- Ac-225 decays to stable Bi-209 with four α particles per decay along either branch (Bi-213 → Po-213 → Pb-209
  or Bi-213 → Tl-209 → Pb-209); Pb-212 with one (Bi-212 → Po-212 or Bi-212 → Tl-208) — the chains of issue 16.
"""

from __future__ import annotations

import pytest

from voxeldose import nuclides as N
from voxeldose.errors import VoxeldoseError

MIN, H, D = 60.0, 3600.0, 86400.0

ICRP107_HALF_LIVES_S = {
    "Lu-177": 6.647 * D,
    "Tb-161": 6.906 * D,
    "Y-90": 64.10 * H,
    "I-131": 8.021 * D,
    "Ac-225": 10.0 * D,
    "Fr-221": 4.9 * MIN,
    "At-217": 32.3e-3,
    "Bi-213": 45.59 * MIN,
    "Po-213": 4.2e-6,
    "Tl-209": 2.161 * MIN,
    "Pb-209": 3.253 * H,
    "Pb-212": 10.64 * H,
    "Bi-212": 60.55 * MIN,
    "Po-212": 0.299e-6,
    "Tl-208": 3.053 * MIN,
}


def test_every_kernel_nuclide_loads_with_its_icrp107_half_life():
    assert set(N.KERNEL_NUCLIDES) == set(ICRP107_HALF_LIVES_S)
    for name, t_half in ICRP107_HALF_LIVES_S.items():
        nuc = N.load(name)
        assert nuc.name == name
        # rounding of the quoted values (3–4 significant figures)
        assert nuc.half_life_s == pytest.approx(t_half, rel=3e-3), name


@pytest.mark.parametrize(
    "spelling,canon",
    [
        ("Y90", "Y-90"),
        ("90Y", "Y-90"),
        ("yttrium-90", "Y-90"),
        ("Tb161", "Tb-161"),
        ("^225^Ac", "Ac-225"),
        ("pb-212", "Pb-212"),
        ("I131", "I-131"),
        ("213Bi", "Bi-213"),
    ],
)
def test_canonical_names_of_the_new_nuclides(spelling, canon):
    assert N.canonical_name(spelling) == canon


def test_jobs_still_accept_only_supported_nuclides():
    # issue 16 parts 5-6 (imaging, pipeline) are not done: Y-90 has kernels but a job with it is a clear error
    assert N.SUPPORTED == ("Lu-177",)
    with pytest.raises(VoxeldoseError, match="unsupported nuclide 'Y-90'"):
        N.require_supported("Y-90", tag="nuclide")


@pytest.mark.parametrize("name", [n for n in ICRP107_HALF_LIVES_S if N.load(n).emissions.get("b-spectra")])
def test_beta_energy_per_decay_lines_agree_with_spectrum_within_1_percent(name):
    by_type = N.energy_per_decay_by_type_MeV(name)
    assert N.beta_spectrum_mean_energy_MeV(name) == pytest.approx(by_type["beta-"], rel=0.01)


def test_energy_per_decay_by_type_adds_up_and_lu177_matches_icrp107():
    lu = N.energy_per_decay_by_type_MeV("Lu-177")
    assert lu["total electron"] == pytest.approx(0.1479, rel=2e-3)
    assert lu["total photon"] == pytest.approx(0.0351, rel=3e-3)
    assert lu["total alpha"] == 0.0
    for name in ICRP107_HALF_LIVES_S:
        b = N.energy_per_decay_by_type_MeV(name)
        electron = sum(b.get(k, 0.0) for k in ("beta-", "beta+", "IE", "auger"))
        photon = sum(b.get(k, 0.0) for k in ("gamma", "X", "annihilation"))
        alpha = sum(b.get(k, 0.0) for k in ("alpha", "alpha recoil"))
        assert b["total electron"] == pytest.approx(electron, rel=1e-12)
        assert b["total photon"] == pytest.approx(photon, rel=1e-12)
        assert b["total alpha"] == pytest.approx(alpha, rel=1e-12)
        assert b["total"] == pytest.approx(electron + photon + alpha, rel=1e-12)


@pytest.mark.parametrize("name", ["Ac-225", "Fr-221", "At-217", "Bi-213", "Po-213", "Bi-212", "Po-212"])
def test_alpha_recoil_energy_follows_momentum_conservation(name):
    b = N.energy_per_decay_by_type_MeV(name)
    a = int(name.split("-")[1])
    # E_R / E_α = m_α / m_d; masses ≈ A u within 0.1 %
    assert b["alpha recoil"] / b["alpha"] == pytest.approx(4.0026 / (a - 4), rel=5e-3)


def test_decay_modes_branchings_sum_to_one():
    for name in ICRP107_HALF_LIVES_S:
        total = sum(m.fraction for m in N.decay_modes(name))
        # At-217 has a 0.012 % β⁻ branch without listed particles
        assert total == pytest.approx(1.0, abs=2e-4), name
    modes = {m.mode: m for m in N.decay_modes("Bi-212")}
    assert modes["alpha"].daughter == "Tl-208" and modes["beta-"].daughter == "Po-212"
    assert modes["alpha"].fraction == pytest.approx(0.3594, abs=5e-4)  # ICRP-107 / ENSDF: 35.94 % α
    assert N.decay_modes("Lu-177") == (N.DecayMode("beta-", pytest.approx(1.0), None),)


def test_ac225_and_pb212_chains_and_alphas_per_decay():
    ac = N.decay_chain("Ac-225")
    assert [m.name for m in ac][:4] == ["Ac-225", "Fr-221", "At-217", "Bi-213"]
    assert {m.name for m in ac} == {"Ac-225", "Fr-221", "At-217", "Bi-213", "Po-213", "Tl-209", "Pb-209"}
    counts = {m.name: m.decays_per_parent_decay for m in ac}
    # ICRP-107 yields are rounded: Bi-213 α + β⁻ = 0.9999997
    assert counts["Po-213"] + counts["Tl-209"] == pytest.approx(counts["Bi-213"], rel=1e-5)
    assert counts["Pb-209"] == pytest.approx(counts["Bi-213"], rel=1e-5)  # both branches end in Pb-209
    alphas = sum(counts[n] * sum(y for _, y in N.load(n).emissions.get("alpha", ())) for n in counts)
    assert alphas == pytest.approx(4.0, abs=1e-3)  # 0.012 % At-217 β⁻ branch leaves Bi-213 slightly short

    pb = N.decay_chain("Pb-212")
    assert [m.name for m in pb] == ["Pb-212", "Bi-212", "Po-212", "Tl-208"]
    c = {m.name: m.decays_per_parent_decay for m in pb}
    assert c["Po-212"] + c["Tl-208"] == pytest.approx(1.0, abs=1e-5)  # rounded ICRP-107 yields
    alphas = sum(c[n] * sum(y for _, y in N.load(n).emissions.get("alpha", ())) for n in c)
    assert alphas == pytest.approx(1.0, abs=1e-5)
    assert [m.name for m in N.decay_chain("Y-90")] == ["Y-90"]


def test_release_fraction_removes_the_daughter_and_its_progeny_from_the_site():
    full = {m.name: m.decays_per_parent_decay for m in N.decay_chain("Ac-225")}
    site = {m.name: m.decays_per_parent_decay for m in N.decay_chain("Ac-225", release={"Bi213": 0.3})}
    for n in ("Ac-225", "Fr-221", "At-217"):
        assert site[n] == full[n]
    for n in ("Bi-213", "Po-213", "Tl-209", "Pb-209"):
        assert site[n] == pytest.approx(0.7 * full[n], rel=1e-12)
    with pytest.raises(VoxeldoseError, match="not a daughter"):
        N.decay_chain("Ac-225", release={"Bi-212": 0.1})
    with pytest.raises(VoxeldoseError, match="release fraction"):
        N.decay_chain("Ac-225", release={"Bi-213": 1.5})
