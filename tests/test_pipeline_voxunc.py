"""The voxel dose-uncertainty map in a whole run (issue 13 part 3): the map, its RT Dose (DoseType ERROR), the
per-voxel DVH bands in ``summary.json`` and the report.

Two runs of one small synthetic patient, with and without a camera profile that states a 2 % calibration
uncertainty.  The profile's component is common to every voxel and enters in quadrature, so the two maps must
differ by exactly (0.02·D)² in u²; the RT Dose ERROR must lie on the dose's own grid and Frame of Reference
(PS3.3 C.8.8.3); the band's lower and upper DVHs must enclose the dose's DVH (dose − 2u ≤ dose ≤ dose + 2u voxel by
voxel).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from voxeldose.camera import CameraIdentity, CameraProfile
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs
from voxeldose.result import Result

CAL_REL_U = 0.02


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Result, dict[str, Path]]:
    root = tmp_path_factory.mktemp("voxunc")
    st = PhantomSettings.small(seed=5, repositioning_mm=0.0, repositioning_deg=0.0)
    write_phantom(root, st)
    cam = CameraProfile(
        name="phantom camera (design values)",
        identity=CameraIdentity(manufacturer="voxeldose", model="phantom"),
        nuclide="Lu-177",
        sensitivity_cps_per_mbq=st.calibration_cps_per_mbq,
        sensitivity_u_cps_per_mbq=CAL_REL_U * st.calibration_cps_per_mbq,
        fwhm_mm=st.fwhm_mm,
        measured="2026-01-01",
        source="the phantom camera's design values (test)",
    )
    base = {"inputs": [str(root / "dicom")], "registration": "none"}
    counted = run({**base, "calibration": {"cps_per_mbq": st.calibration_cps_per_mbq}})
    with_cal = run({**base, "camera": cam.model_dump(mode="json", by_alias=True)})
    paths = write_outputs(with_cal, root / "out")
    return counted, with_cal, paths


def test_calibration_adds_in_quadrature_to_the_counting_map(runs: tuple[Result, Result, dict[str, Path]]) -> None:
    counted, with_cal, _ = runs
    u0, u1 = counted.dose_uncertainty, with_cal.dose_uncertainty
    assert u0 is not None and u1 is not None
    assert u0.grid.same_as(counted.dose.grid) and u0.units == "Gy"
    assert np.all(np.isfinite(u0.array)) and float(u0.array.min()) >= 0.0
    d = np.asarray(with_cal.dose.array, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(counted.dose.array), d)  # the same calibration value, the same dose
    hot = d > 0.05 * d.max()
    np.testing.assert_allclose(u1.array[hot] ** 2, u0.array[hot] ** 2 + (CAL_REL_U * d[hot]) ** 2, rtol=1e-9)
    assert float(u0.array[hot].min()) > 0.0  # counting noise reaches every voxel with dose
    assert "Poisson" in (counted.summary.methods.dose_uncertainty or "")
    assert "calibration 2 %" in (with_cal.summary.methods.dose_uncertainty or "")


def test_rtdose_error_has_the_dose_grid(runs: tuple[Result, Result, dict[str, Path]]) -> None:
    _, res, paths = runs
    d = pydicom.dcmread(paths["rtdose"])
    e = pydicom.dcmread(paths["rtdose_uncertainty"])
    assert (d.DoseType, e.DoseType) == ("PHYSICAL", "ERROR")
    assert e.DoseUnits == "GY" and "k=1" in e.SeriesDescription and "Gy" in e.SeriesDescription
    assert "standard uncertainty (k=1)" in e.DoseComment
    assert e.SeriesInstanceUID != d.SeriesInstanceUID and e.StudyInstanceUID == d.StudyInstanceUID
    for tag in (
        "FrameOfReferenceUID",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "GridFrameOffsetVector",
    ):
        assert e[tag].value == d[tag].value, tag
    assert res.dose_uncertainty is not None
    u = np.asarray(res.dose_uncertainty.array, dtype=np.float64)
    back = e.pixel_array.astype(np.float64) * float(e.DoseGridScaling)
    assert np.max(np.abs(back - u)) <= float(e.DoseGridScaling) / 2 * (1 + 1e-9) + 1e-12


def _cumulative(d: np.ndarray, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fraction of the weight w with dose ≥ x (the DVH's definition)."""
    return np.array([w[d >= xi].sum() for xi in x]) / w.sum()


def test_dvh_band_encloses_the_dvh(runs: tuple[Result, Result, dict[str, Path]]) -> None:
    _, res, paths = runs
    summary = json.loads(paths["summary"].read_text())
    d = np.asarray(res.dose.array, dtype=np.float64)
    assert res.dose_uncertainty is not None
    u = np.asarray(res.dose_uncertainty.array, dtype=np.float64)
    for name, voi in res.vois.items():
        band = summary["vois"][name]["dvh_band"]
        assert band["coverage_factor"] == 2.0 and "not a confidence band" in band["definition"]
        x = np.asarray(band["dose_gy"])
        lo, hi = np.asarray(band["volume_fraction_lower"]), np.asarray(band["volume_fraction_upper"])
        w = voi.fraction[voi.fraction > 0]
        dv, uv = d[voi.fraction > 0], u[voi.fraction > 0]
        # the summary tabulates at doses rounded to 1e-6 Gy: a voxel within that of a point may count on either side
        tol = float(w.max() / w.sum()) + 2e-6
        np.testing.assert_allclose(lo, _cumulative(np.maximum(dv - 2 * uv, 0), w, x), atol=tol)
        np.testing.assert_allclose(hi, _cumulative(dv + 2 * uv, w, x), atol=tol)
        nominal = _cumulative(dv, w, x)
        assert np.all(lo <= nominal + tol) and np.all(nominal <= hi + tol), name


def test_report_draws_bands_and_the_uncertainty_panel(runs: tuple[Result, Result, dict[str, Path]]) -> None:
    _, _, paths = runs
    html = paths["report"].read_text()
    assert "per-voxel band" in html and "not a confidence band of the DVH" in html
    assert "standard uncertainty u (k = 1, Gy)" in html
