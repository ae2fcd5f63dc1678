"""voxeldose.camera: the camera-profile model (identity matching, the recovery fit and its uncertainty, the file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from voxeldose.camera import CameraIdentity, CameraProfile, RecoveryFit, identity_from_dataset
from voxeldose.errors import VoxeldoseError

IDENTITY = CameraIdentity(
    manufacturer="SIEMENS NM",
    model="Symbia Intevo 16",
    device_serial_number="1234",
    collimator="MELP",
    energy_window_kev=(187.2, 228.8),
    reconstruction="OSEM 4i8s AC RR",
)


def _fit(cov: float = 1e-4) -> RecoveryFit:
    c = tuple(tuple(cov if i == j else 0.0 for j in range(3)) for i in range(3))
    return RecoveryFit(rc_max=0.9, v_half_ml=5.0, slope=1.2, covariance=c, residuals=[])


def test_identity_matches_itself_and_ignores_case_space_and_unrecorded_fields() -> None:
    assert IDENTITY.mismatches(IDENTITY) == []
    other = IDENTITY.model_copy(update={"manufacturer": "siemens  nm", "device_serial_number": None})
    assert IDENTITY.mismatches(other) == []


def test_identity_names_what_differs() -> None:
    other = IDENTITY.model_copy(update={"device_serial_number": "999", "energy_window_kev": (180.0, 228.8)})
    assert IDENTITY.mismatches(other) == ["device_serial_number", "energy_window_kev"]


def test_recovery_fit_limits_and_half_point() -> None:
    """By its definition RC(v_half) = rc_max / 2, RC → rc_max for large volumes and → 0 for small ones."""
    f = _fit()
    assert f.rc(5.0) == pytest.approx(0.45)
    assert f.rc(1e6) == pytest.approx(0.9, rel=1e-4)
    assert f.rc(1e-4) < 1e-4
    with pytest.raises(VoxeldoseError, match="volume"):
        f.rc(0.0)


def test_recovery_uncertainty_agrees_with_sampling_the_parameters() -> None:
    """First-order propagation against Monte Carlo sampling of the parameters (small covariance: linear regime)."""
    f = _fit(cov=1e-4)
    rng = np.random.default_rng(1)
    p = rng.multivariate_normal([0.9, 5.0, 1.2], np.array(f.covariance), size=200_000)
    for v in (1.0, 5.0, 20.0):
        samples = p[:, 0] / (1.0 + (p[:, 1] / v) ** p[:, 2])
        assert f.rc_u(v) == pytest.approx(float(np.std(samples)), rel=0.05)


def test_profile_round_trip_and_clear_errors(tmp_path: Path) -> None:
    prof = CameraProfile(
        name="SPECT 2",
        identity=IDENTITY,
        nuclide="Lu-177",
        sensitivity_cps_per_mbq=9.4,
        sensitivity_u_cps_per_mbq=0.1,
        fwhm_mm=11.0,
        fwhm_u_mm=0.5,
        recovery_fit=_fit(),
        measured="2026-11-30",
        source="test",
    )
    path = prof.save(tmp_path / "camera.json")
    assert json.loads(path.read_text())["schema"] == "voxeldose.camera/1"
    assert CameraProfile.load(path) == prof
    data = json.loads(path.read_text())
    data["sensitivity_cps_per_mbq"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(VoxeldoseError, match="sensitivity_cps_per_mbq") as exc:
        CameraProfile.load(tmp_path / "bad.json")
    assert "bad.json" in str(exc.value)
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(VoxeldoseError, match="cannot read"):
        CameraProfile.load(tmp_path / "notjson.json")


def _nm(**kw: object) -> Dataset:
    ds = Dataset()
    ds.Manufacturer = "SIEMENS NM"
    ds.ManufacturerModelName = "Symbia Intevo 16"
    ds.DeviceSerialNumber = "1234"
    det = Dataset()
    det.CollimatorGridName = "MELP"
    ds.DetectorInformationSequence = Sequence([det])
    rng = Dataset()
    rng.EnergyWindowLowerLimit = "187.2"
    rng.EnergyWindowUpperLimit = "228.8"
    win = Dataset()
    win.EnergyWindowRangeSequence = Sequence([rng])
    ds.EnergyWindowInformationSequence = Sequence([win])
    ds.ReconstructionMethod = "OSEM 4i8s AC RR"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_identity_from_the_headers_a_camera_writes() -> None:
    assert identity_from_dataset(_nm()) == IDENTITY


def test_identity_without_manufacturer_or_with_a_bad_window_is_a_clear_error() -> None:
    with pytest.raises(VoxeldoseError, match=r"ManufacturerModelName \(0008,1090\)") as exc:
        identity_from_dataset(_nm(ManufacturerModelName=""), "spect/1.dcm")
    assert "spect/1.dcm" in str(exc.value)
    ds = _nm()
    ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0].EnergyWindowLowerLimit = "300"
    with pytest.raises(VoxeldoseError, match=r"EnergyWindowLowerLimit \(0054,0014\)"):
        identity_from_dataset(ds)
