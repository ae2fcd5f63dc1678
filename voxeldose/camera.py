"""Camera profiles: what a phantom calibration tells about one SPECT/CT camera (``camera.json``).

A profile holds, for one camera identity (the DICOM headers' Manufacturer, model, serial number, collimator,
photopeak window and reconstruction) and one nuclide:

* the **volume sensitivity** ``S`` (reconstructed counts per second per MBq, MIRD Pamphlet 26, Ljungberg et al.
  2016, J Nucl Med 57:151) with its standard uncertainty, from a uniform cylinder of known activity;
* the **recovery coefficients** (mean reconstructed / true concentration) of the NEMA IEC body phantom's spheres
  against sphere volume, the fitted curve :class:`RecoveryFit` with its parameter covariance, and the residuals;
* the **effective resolution** (FWHM, mm) that explains the spheres' recovery, for model-based partial-volume
  correction (geometric transfer matrix, Rousset et al. 1998, J Nucl Med 39:904; region-based voxel-wise
  correction, Thomas et al. 2011, Eur J Nucl Med Mol Imaging 38:1104).

Uncertainties are standard uncertainties (k = 1, GUM JCGM 100:2008).  The JSON is written and read by
:meth:`CameraProfile.save` and :meth:`CameraProfile.load`; schema ``voxeldose.camera/1``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom.dataset import Dataset

from .dicomutil import tag_label
from .errors import VoxeldoseError

#: The ``schema`` value of every camera profile this version writes.
CAMERA_SCHEMA_VERSION: Final = "voxeldose.camera/1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _norm(text: str | None) -> str:
    return " ".join((text or "").split()).casefold()


class CameraIdentity(_Model):
    """A camera as its SPECT headers name it.

    ``manufacturer`` (0008,0070), ``model`` ManufacturerModelName (0008,1090), ``device_serial_number``
    (0018,1000), ``collimator`` CollimatorGridName (0018,1180) in the Detector Information Sequence,
    ``energy_window_kev`` the photopeak window's lower and upper limits (0054,0014)/(0054,0015), keV, and
    ``reconstruction`` a short statement of the reconstruction (algorithm, iterations × subsets, corrections), as
    the series states it.
    """

    manufacturer: str
    model: str
    device_serial_number: str | None = None
    collimator: str | None = None
    energy_window_kev: tuple[float, float] | None = None
    reconstruction: str | None = None

    def mismatches(self, other: CameraIdentity, window_tolerance_kev: float = 1.0) -> list[str]:
        """Names of the fields in which ``other`` (a SPECT's identity) differs from this one (a profile's).

        Text compares case- and whitespace-insensitively; a field that either side does not record is not a
        mismatch (the caller decides whether an unrecorded serial number or collimator is acceptable); window
        limits compare within ``window_tolerance_kev``.
        """
        out: list[str] = []
        for name in ("manufacturer", "model", "device_serial_number", "collimator", "reconstruction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and _norm(mine) != _norm(theirs):
                out.append(name)
        mine_w, theirs_w = self.energy_window_kev, other.energy_window_kev
        if (
            mine_w is not None
            and theirs_w is not None
            and any(abs(a - b) > window_tolerance_kev for a, b in zip(mine_w, theirs_w))
        ):
            out.append("energy_window_kev")
        return out


class RecoveryPoint(_Model):
    """One measured recovery coefficient: a sphere (or other insert) of ``volume_ml``, its mean reconstructed
    over true concentration ``rc`` and that ratio's standard uncertainty ``rc_u`` (counting noise and the
    phantom's activity)."""

    label: str
    volume_ml: float = Field(gt=0)
    rc: float = Field(ge=0)
    rc_u: float = Field(ge=0)


class RecoveryFit(_Model):
    """Recovery against volume, ``RC(V) = rc_max / (1 + (v_half_ml / V)^slope)``: a sigmoid in log-volume that
    rises from 0 for objects much smaller than the resolution to ``rc_max`` for large ones (the shape of the
    recovery curves of NEMA IEC phantom studies, e.g. Tran-Gia & Lassmann 2018, J Nucl Med 59:1708).

    ``covariance`` is the fit's parameter covariance, rows and columns in the order (rc_max, v_half_ml, slope);
    ``residuals`` are measured − fitted RC of each point, in the order of :attr:`CameraProfile.recovery`.
    """

    model: Literal["rc_max/(1+(v_half_ml/V)^slope)"] = "rc_max/(1+(v_half_ml/V)^slope)"
    rc_max: float = Field(gt=0)
    v_half_ml: float = Field(gt=0)
    slope: float = Field(gt=0)
    covariance: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]
    residuals: list[float]

    def rc(self, volume_ml: float) -> float:
        """The fitted recovery coefficient of an object of ``volume_ml`` (> 0)."""
        if not volume_ml > 0:
            raise VoxeldoseError("a recovery coefficient needs a volume above 0 ml", tag="volume_ml", found=volume_ml)
        return float(self.rc_max / (1.0 + (self.v_half_ml / volume_ml) ** self.slope))

    def rc_u(self, volume_ml: float) -> float:
        """Standard uncertainty of :meth:`rc` at ``volume_ml`` from the parameter covariance (first-order
        propagation, GUM JCGM 100:2008 eq. 13)."""
        v = volume_ml
        x = (self.v_half_ml / v) ** self.slope
        d = 1.0 + x
        grad = (
            1.0 / d,
            -self.rc_max * self.slope * x / (self.v_half_ml * d * d),
            -self.rc_max * x * math.log(self.v_half_ml / v) / (d * d),
        )
        var = sum(grad[i] * self.covariance[i][j] * grad[j] for i in range(3) for j in range(3))
        return math.sqrt(max(var, 0.0))


class CameraProfile(_Model):
    """Everything ``voxeldose calibrate`` measured for one camera and nuclide (see the module docstring)."""

    schema_: Literal["voxeldose.camera/1"] = Field(CAMERA_SCHEMA_VERSION, alias="schema")
    name: str = Field(description="a label for people, e.g. 'SPECT 2 (ME collimator)'")
    identity: CameraIdentity
    nuclide: str = Field(description="ICRP-107 name, e.g. Lu-177")
    sensitivity_cps_per_mbq: float = Field(gt=0, description="volume sensitivity, reconstructed cps per MBq")
    sensitivity_u_cps_per_mbq: float = Field(ge=0, description="its standard uncertainty")
    fwhm_mm: float | None = Field(None, gt=0, description="effective resolution that explains the spheres, mm")
    fwhm_u_mm: float | None = Field(None, ge=0)
    recovery: list[RecoveryPoint] = Field(default_factory=list)
    recovery_fit: RecoveryFit | None = None
    measured: str = Field(description="date of the phantom scans, ISO 8601")
    source: str = Field(description="what was scanned and how (phantom, activity and its reference time)")

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_by_name=True)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.model_dump_json(by_alias=True, indent=2) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> CameraProfile:
        """Read and validate a ``camera.json``; a clear :class:`VoxeldoseError` naming the file and field."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VoxeldoseError(
                f"cannot read the camera profile: {exc.__class__.__name__}", path=p, expected="a camera.json"
            ) from None
        return cls.from_data(data, p)

    @classmethod
    def from_data(cls, data: object, path: str | Path | None = None) -> CameraProfile:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise VoxeldoseError(
                f"not a valid camera profile: {err['msg']}",
                path=path,
                tag=field,
                expected=CAMERA_SCHEMA_VERSION,
            ) from None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = " ".join(str(value).split()) if value is not None else ""
    return text or None


def identity_from_dataset(ds: Dataset, path: str | Path | None = None) -> CameraIdentity:
    """The camera identity a SPECT (NM) object's headers state (see :class:`CameraIdentity` for the tags).

    Manufacturer and ManufacturerModelName are required (a camera cannot be recognised without them); the
    serial number, the collimator (first item of the Detector Information Sequence), the photopeak window
    (first item of the Energy Window Information Sequence) and ReconstructionMethod (0054,1103) are taken
    when present.  A window whose limits are not numbers with 0 < lower < upper is an error.
    """
    manufacturer, model = _text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")
    for keyword, value in (("Manufacturer", manufacturer), ("ManufacturerModelName", model)):
        if value is None:
            raise VoxeldoseError(
                "the SPECT does not say which camera made it", path=path, tag=tag_label(keyword), expected="a value"
            )
    assert manufacturer is not None and model is not None
    collimator = None
    detectors = ds.get("DetectorInformationSequence") or []
    if len(detectors):
        collimator = _text(detectors[0], "CollimatorGridName")
    window: tuple[float, float] | None = None
    windows = ds.get("EnergyWindowInformationSequence") or []
    ranges = (windows[0].get("EnergyWindowRangeSequence") or []) if len(windows) else []
    if len(ranges):
        lo, hi = ranges[0].get("EnergyWindowLowerLimit"), ranges[0].get("EnergyWindowUpperLimit")
        try:
            window = (float(lo), float(hi))
        except (TypeError, ValueError):
            window = None
        if window is None or not 0 < window[0] < window[1]:
            raise VoxeldoseError(
                "the photopeak window's limits are not usable",
                path=path,
                tag=f"{tag_label('EnergyWindowLowerLimit')} / {tag_label('EnergyWindowUpperLimit')}",
                expected="numbers in keV with 0 < lower < upper",
                found=(lo, hi),
            )
    return CameraIdentity(
        manufacturer=manufacturer,
        model=model,
        device_serial_number=_text(ds, "DeviceSerialNumber"),
        collimator=collimator,
        energy_window_kev=window,
        reconstruction=_text(ds, "ReconstructionMethod"),
    )
