"""The job description: a validated, JSON-serialisable spec that fully determines a dosimetry run.

The CLI builds one from its options, the HTTP API receives one, the Ray workers get one; all call
:func:`voxeldose.pipeline.run` with it, so the same spec gives the same numbers everywhere.
"""

from __future__ import annotations

import datetime as _dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import metrics as _metrics
from .errors import VoxeldoseError

#: What a caller must give instead of a date and time with a UTC offset.
NAIVE_DATETIME_MESSAGE = "give the local date and time without a UTC offset, as DICOM stores it"

FitModel = Literal["auto", "monoexp", "biexp", "triexp", "trapezoid", "stp"]
DoseMethod = Literal["dvk", "dvk-density", "led"]
Role = Literal["kidney", "marrow", "tumour", "organ", "body"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Calibration(_Model):
    """Camera volume sensitivity for count-valued SPECT (MIRD 26)."""

    cps_per_mbq: float | None = Field(None, gt=0, description="reconstructed counts per second per MBq")
    source: str | None = Field(None, description="where the factor comes from (phantom measurement, date)")


class InjectionOverride(_Model):
    """Values that replace (or supply) the DICOM Radiopharmaceutical Information; recorded as 'caller'."""

    datetime: _dt.datetime | None = Field(
        None, description="injection date and time, local, without a UTC offset (as DICOM stores it)"
    )
    activity_mbq: float | None = Field(None, gt=0)
    nuclide: str | None = None

    @field_validator("datetime")
    @classmethod
    def _naive(cls, v: _dt.datetime | None) -> _dt.datetime | None:
        # DICOM times are naive local times; an offset cannot be reconciled with them without the
        # site's time zone (and subtracting aware from naive datetimes fails later).
        if v is not None and v.tzinfo is not None and v.utcoffset() is not None:
            raise ValueError(NAIVE_DATETIME_MESSAGE)
        return v


class FitSpec(_Model):
    model: FitModel = Field("auto", description="VOI time-activity model; 'stp' = single time point")
    voxel_method: Literal["exponential", "hybrid", "monoexp"] = Field(
        "exponential",
        description="voxel TIA: exponential interpolation between scans (default), trapezoid (hybrid), or one mono-exponential",
    )
    stp_method: Literal["hanscheid", "madsen"] = "hanscheid"
    stp_effective_half_life_h: dict[str, float] = Field(
        default_factory=dict,
        description="Madsen 2018: population effective half-life, h, under the key 'default' (applied to every voxel)",
    )


class DoseSpec(_Model):
    method: DoseMethod = "dvk"
    medium: Literal["water", "soft-tissue", "cortical-bone", "lung"] = "soft-tissue"
    kernel_size: int | None = Field(None, ge=3, description="odd kernel size in voxels (default: automatic)")


class Radiobiology(_Model):
    alpha_beta_gy: float = Field(gt=0)
    repair_half_time_h: float = Field(gt=0)


class Limits(_Model):
    """Cumulative limits for cycle planning (configurable).  Kidney 23 Gy absorbed dose (Garske-Román et al.
    2018); kidney BED 28 Gy with risk factors, 40 Gy without (Bodei et al. 2008) — the cautious 28 Gy unless
    ``kidney_risk_factors`` is false; red marrow 2 Gy.  See :class:`voxeldose.cycles.Limits`."""

    kidney_gy: float = Field(23.0, gt=0)
    kidney_bed_gy_with_risk_factors: float = Field(28.0, gt=0)
    kidney_bed_gy_without_risk_factors: float = Field(40.0, gt=0)
    kidney_risk_factors: bool = True
    marrow_gy: float = Field(2.0, gt=0)
    planned_activity_mbq: float = Field(7400.0, gt=0, description="activity of each further cycle, MBq")


class EarlierCycle(_Model):
    """A previous cycle of the same patient, from an earlier result."""

    number: int = Field(ge=1)
    date: str | None = None
    activity_mbq: float = Field(gt=0)
    kidney_gy: float | None = None
    kidney_bed_gy: float | None = None
    marrow_gy: float | None = None
    vois: dict[str, float] = Field(default_factory=dict, description="mean absorbed dose per VOI, Gy")


class BloodSample(_Model):
    hours_after_injection: float = Field(gt=0)
    bq_per_ml: float = Field(ge=0)


class MarrowSpec(_Model):
    recovery_coefficient: float = Field(1.0, gt=0, le=1.0, description="image-based L2-L4 partial-volume recovery")
    blood_samples: list[BloodSample] = Field(default_factory=list)
    rmblr: float = Field(1.0, gt=0, description="red-marrow-to-blood activity concentration ratio")


class JobSpec(_Model):
    """Everything a run needs besides the DICOM files themselves."""

    inputs: list[str] = Field(min_length=1, description="DICOM folders or files")
    patient_id: str | None = None
    cycle_number: int = Field(1, ge=1)
    reference_timepoint: int | None = Field(
        None, ge=0, description="index in time order; default: the time point the VOIs are on"
    )
    registration: Literal["rigid", "none"] = "rigid"
    calibration: Calibration = Calibration()
    injection: InjectionOverride = InjectionOverride()
    fit: FitSpec = FitSpec()
    dose: DoseSpec = DoseSpec()
    roles: dict[str, Role] = Field(default_factory=dict, description="VOI name → role; default from the name")
    radiobiology: dict[str, Radiobiology] = Field(default_factory=dict, description="per role or VOI name")
    limits: Limits = Limits()
    earlier_cycles: list[EarlierCycle] = Field(default_factory=list)
    marrow: MarrowSpec = MarrowSpec()
    voi_source: Literal["auto", "rtstruct", "seg"] = "auto"

    @field_validator("earlier_cycles")
    @classmethod
    def _distinct_numbers(cls, v: list[EarlierCycle]) -> list[EarlierCycle]:
        numbers = [c.number for c in v]
        if len(numbers) != len(set(numbers)):
            raise ValueError("earlier cycles must have distinct numbers")
        return v


#: Default radiobiology per role, built from :data:`voxeldose.metrics.RADIOBIOLOGY_DEFAULTS` (the one
#: source of the numbers and their citations: kidney α/β 2.6 Gy, repair half-time 2.8 h, Barone et al.
#: 2005; tumour α/β 10 Gy, 1.5 h by convention).
DEFAULT_RADIOBIOLOGY: dict[str, Radiobiology] = {
    role: Radiobiology(alpha_beta_gy=rb.alpha_beta_gy, repair_half_time_h=rb.repair_half_time_s / _metrics.HOUR_S)
    for role, rb in _metrics.RADIOBIOLOGY_DEFAULTS.items()
}


def role_of(name: str, spec: JobSpec) -> Role:
    """The role of a VOI: from ``spec.roles``, else from its name."""
    if name in spec.roles:
        return spec.roles[name]
    n = name.lower()
    if "kidney" in n or n.startswith(("kid", "niere", "rein")):
        return "kidney"
    if "marrow" in n or "l2l4" in n or "l2-l4" in n:
        return "marrow"
    if n.startswith(("tum", "les", "gtv", "met", "node", "ln")):
        return "tumour"
    if n in ("body", "external", "outline", "skin"):
        return "body"
    return "organ"


def radiobiology_for(name: str, role: str, spec: JobSpec) -> Radiobiology | None:
    """The radiobiology of a VOI: ``spec.radiobiology`` by VOI name, then by role, else the role's default
    (:func:`voxeldose.metrics.radiobiology_for`); None for a role without defaults (no BED then)."""
    given = spec.radiobiology.get(name) or spec.radiobiology.get(role)
    if given is not None:
        return given
    try:
        rb = _metrics.radiobiology_for(role)
    except VoxeldoseError:
        return None
    return Radiobiology(alpha_beta_gy=rb.alpha_beta_gy, repair_half_time_h=rb.repair_half_time_s / _metrics.HOUR_S)
