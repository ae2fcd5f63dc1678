"""The uncertainty budget in a whole run (issue 13 part 2): ``summary.json`` carries each VOI's budget.

The camera profile states its sensitivity with a 2 % standard uncertainty and a recovery curve with a parameter
covariance, as ``voxeldose calibrate`` would; the budget must carry exactly those (calibration: u(S)/S; recovery:
u(RC)/RC of the profile's curve at the VOI's volume), name every component, and combine the independent ones
by root-sum-square into the mean dose's u and its k = 2 interval (GUM eq. 10, 6.2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from voxeldose.camera import CameraIdentity, CameraProfile, RecoveryFit
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs
from voxeldose.summary import Summary

CAL_REL_U = 0.02
RECOVERY = RecoveryFit(
    rc_max=1.0,
    v_half_ml=0.5,
    slope=1.2,
    covariance=((1e-4, 0.0, 0.0), (0.0, 4e-3, 0.0), (0.0, 0.0, 1e-3)),
    residuals=[],
)
NAMES = {"calibration", "counting", "recovery", "scan time", "time–activity fit", "delineation", "dose factor"}


def _profile(*, stated: bool) -> CameraProfile:
    st = PhantomSettings()
    return CameraProfile(
        name="phantom camera (design values)",
        identity=CameraIdentity(manufacturer="voxeldose", model="phantom"),
        nuclide="Lu-177",
        sensitivity_cps_per_mbq=st.calibration_cps_per_mbq,
        sensitivity_u_cps_per_mbq=CAL_REL_U * st.calibration_cps_per_mbq if stated else 0.0,
        fwhm_mm=st.fwhm_mm,
        recovery_fit=RECOVERY,
        measured="2026-01-01",
        source="the phantom camera's design values (test)",
    )


@pytest.fixture(scope="module")
def dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unc")
    write_phantom(root, PhantomSettings.small(seed=3, repositioning_mm=0.0, repositioning_deg=0.0))
    return root / "dicom"


def test_every_fitted_voi_carries_its_budget(dicom: Path, tmp_path: Path) -> None:
    cam = _profile(stated=True)
    result = run(
        {
            "inputs": [str(dicom)],
            "registration": "none",
            "pvc": "rc",
            "camera": cam.model_dump(mode="json", by_alias=True),
        }
    )
    fitted = {n: v for n, v in result.summary.vois.items() if v.tia_bqs is not None}
    assert fitted
    for name, v in fitted.items():
        u = v.uncertainty
        assert u is not None, name
        comps = {c.name: c for c in u.components}
        assert set(comps) == NAMES
        assert comps["calibration"].relative_u == pytest.approx(CAL_REL_U, rel=1e-9)
        rc = RECOVERY.rc(v.volume_ml)
        assert comps["recovery"].relative_u == pytest.approx(RECOVERY.rc_u(v.volume_ml) / rc, rel=1e-9)
        assert comps["dose factor"].relative_u is None and "not stated" in comps["dose factor"].how
        stated = [c.relative_u for c in u.components if c.relative_u is not None]
        assert u.mean_gy.value == pytest.approx(v.mean_gy)
        assert u.mean_gy.u == pytest.approx(v.mean_gy * math.sqrt(sum(r * r for r in stated)), rel=1e-9)
        assert (u.mean_gy.lower_95, u.mean_gy.upper_95) == pytest.approx(
            (v.mean_gy - 2 * u.mean_gy.u, v.mean_gy + 2 * u.mean_gy.u)
        )
        assert len(u.activity_bq) == len(result.summary.timepoints)
        # the counts behind the image: Poisson noise is stated and small, never zero
        assert comps["counting"].relative_u is not None and 0 < comps["counting"].relative_u < 0.05
    # the block survives summary.json
    write_outputs(result, tmp_path)
    again = Summary.load(tmp_path / "summary.json")
    k = next(iter(fitted))
    assert again.vois[k].uncertainty == result.summary.vois[k].uncertainty
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert raw["vois"][k]["uncertainty"]["coverage_factor"] == 2.0
    # the report: each kidney's mean ± U (k = 2) and its budget, component by component
    html = (tmp_path / "report.html").read_text()
    section = html[html.index("id='uncertainty'") :]
    for name in ("Kidney_L", "Kidney_R"):
        v = result.summary.vois[name]
        assert v.uncertainty is not None and v.uncertainty.mean_gy.u is not None
        assert f"{name}: mean {v.mean_gy:.2f} ± {2 * v.uncertainty.mean_gy.u:.2f} Gy (k = 2)" in section
    for comp in NAMES:
        assert f"<td>{comp}</td>" in section


def test_a_calibration_without_stated_uncertainty_is_not_invented(dicom: Path) -> None:
    result = run(
        {
            "inputs": [str(dicom)],
            "registration": "none",
            "calibration": {"cps_per_mbq": PhantomSettings().calibration_cps_per_mbq},
        }
    )
    for name, v in result.summary.vois.items():
        if v.uncertainty is None:
            continue
        comps = {c.name: c for c in v.uncertainty.components}
        assert comps["calibration"].relative_u is None, name
        assert "not stated" in comps["calibration"].how
        assert comps["recovery"].relative_u is None
        assert any("lower bound" in n for n in v.uncertainty.notes)
