"""The job description: a validated, JSON-serialisable spec that fully determines a dosimetry run.

The CLI builds one from its options, the HTTP API receives one, the Ray workers get one; all call
:func:`voxeldose.pipeline.run` with it, so the same spec gives the same numbers everywhere.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from itertools import accumulate
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from . import metrics as _metrics
from .camera import CameraProfile
from .errors import VoxeldoseError

#: What a caller must give instead of a date and time with a UTC offset.
NAIVE_DATETIME_MESSAGE = "give the local date and time without a UTC offset, as DICOM stores it"

#: How deeply a job description may nest ``[`` and ``{`` (a JobSpec itself nests 3 levels:
#: ``{"earlier_cycles": [{"vois": {…}}]}``).  Deeper text is refused before it is parsed, so a
#: ``[[[[…]]]]`` bomb never reaches a recursive parser.
MAX_JSON_DEPTH = 32

#: Calibration factors above this are refused (cps/MBq).  Published Lu-177 SPECT volume sensitivities
#: lie between about 5 and 20 cps/MBq (e.g. 5.67 cps/MBq at 208 keV with a medium-energy collimator,
#: Santoro et al. 2018, EJNMMI Res 8:103; MIRD 26, Ljungberg et al. 2016, J Nucl Med 57:151).  A
#: collimated camera cannot do much better: a parallel-hole collimator passes ~1e-4 of the photons per
#: head (Cherry, Sorenson & Phelps, Physics in Nuclear Medicine, ch. 14) and Lu-177 emits ~0.17
#: photons per decay in its 113 and 208 keV peaks (ICRP 107), so two heads with a perfect crystal give
#: ~35 cps/MBq.  100 cps/MBq is out of reach; a larger factor is a unit error (counts per MBq of a whole
#: acquisition, counts per GBq).
MAX_CPS_PER_MBQ = 100.0

#: The largest activity of one cycle, MBq.  Lu-177 PRRT and PSMA therapy give 7.4 GBq per cycle
#: (NETTER-1, Strosberg et al. 2017, NEJM 376:125; VISION, Sartor et al. 2021, NEJM 385:1091);
#: dosimetry-guided escalation goes to about 11–15 GBq (Sundlöv et al. 2017, EJNMMI 44:1480).  More is
#: a unit error (kBq, Bq) or a typing error.
MAX_ACTIVITY_MBQ = 15_000.0

#: The largest dose kernel, voxels per side.  Twice the automatic maximum (``voxeldose.dose.MAX_KERNEL_SIZE``
#: = 101, i.e. ±24 cm at 4.8 mm voxels, beyond which Lu-177's photons deposit almost nothing): a 201³
#: float64 kernel is 65 MB, and the FFT convolution pads a 128³ map to (128 + 200)³ complex values,
#: 0.56 GB per array, a few arrays per convolution — the most a worker may be asked for.
MAX_KERNEL_SIZE = 201

#: Mean absorbed doses of one cycle above these are not a result but an input error (Gy).  Lu-177
#: PRRT/PSMA gives kidneys ~0.3–0.9 Gy/GBq (Sandström et al. 2013, J Nucl Med 54:33; Violet et al.
#: 2019, J Nucl Med 60:517), i.e. ≤ ~14 Gy for the largest cycle (:data:`MAX_ACTIVITY_MBQ`); tumours
#: reach a few Gy/GBq, rarely 30 Gy/GBq in small lesions (≤ ~450 Gy).  100 Gy to a kidney and 1000 Gy to
#: any VOI in one cycle are beyond any therapy: a wrong calibration, activity or injection time.
MAX_KIDNEY_GY_PER_CYCLE = 100.0
MAX_VOI_GY_PER_CYCLE = 1000.0

#: The longest time from the injection to a scan, days.  Lu-177's half-life is 6.65 d: after 60 d less
#: than 0.2 % (2^(−60/6.65)) of the activity is left, too little to image; post-therapy scans are taken
#: within about 1–7 d (EANM/MIRD guideline, Sjögreen Gleisner et al. 2022, EJNMMI 49:1778).
MAX_SCAN_DAYS_AFTER_INJECTION = 60.0

#: The highest cycle number a job may give (also the bound on a reference time point's index): PRRT is 4
#: cycles, retreatment adds a few; a larger number is a typing error (and would overflow a database integer).
MAX_CYCLE_NUMBER = 100

UTF8_EXPECTED = "text encodable as UTF-8, without lone surrogates such as \\ud800"


def _utf8(value: str) -> str:
    """Refuse text that cannot be stored or sent: a lone surrogate (from a JSON ``\\ud800`` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{UTF8_EXPECTED} (character {exc.start} is one)") from None
    return value


#: A string of the job description: any text that UTF-8 can encode.
Text = Annotated[str, AfterValidator(_utf8)]

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply ``text`` (JSON) nests ``[`` and ``{`` outside strings, without parsing it (no recursion)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def check_json_depth(text: str, what: str = "the job description") -> None:
    """Raise ValueError when ``text`` nests deeper than :data:`MAX_JSON_DEPTH` (before ``json.loads``,
    which would recurse once per level)."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(
            f"{what} is nested too deeply: more than {MAX_JSON_DEPTH} levels of [ ] or {{ }} "
            "(a job description has at most 3)"
        )


def printable(value: Any) -> str:
    """``value`` as text that UTF-8 can encode (a lone surrogate becomes ``\\ud800``), for messages."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


FitModel = Literal["auto", "monoexp", "biexp", "triexp", "trapezoid", "stp"]
DoseMethod = Literal["dvk", "dvk-density", "led"]
Role = Literal["kidney", "marrow", "tumour", "organ", "body"]
PvcMethod = Literal["none", "rc", "gtm", "rbv"]


class _Model(BaseModel):
    """Strict: a number must be a JSON number (``true`` or ``"5.67"`` is not silently 5.67 or 1.0; an integer
    is a valid float), finite (no Infinity or NaN), and text must be encodable (:data:`Text`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Calibration(_Model):
    """Camera volume sensitivity for count-valued SPECT (MIRD 26): above 0, at most 100 cps/MBq (the bound
    and its reason: ``MAX_CPS_PER_MBQ``)."""

    cps_per_mbq: float | None = Field(
        None, gt=0, le=MAX_CPS_PER_MBQ, description="reconstructed counts per second per MBq"
    )
    source: Text | None = Field(None, description="where the factor comes from (phantom measurement, date)")


class InjectionOverride(_Model):
    """Values that replace (or supply) the DICOM Radiopharmaceutical Information; recorded as 'caller'."""

    datetime: _dt.datetime | None = Field(
        None,
        strict=False,  # ISO text, as JSON carries it
        description="injection date and time, local, without a UTC offset (as DICOM stores it)",
    )
    activity_mbq: float | None = Field(None, gt=0, le=MAX_ACTIVITY_MBQ, description="injected activity, MBq")
    nuclide: Text | None = None

    @field_validator("datetime")
    @classmethod
    def _naive(cls, v: _dt.datetime | None) -> _dt.datetime | None:
        # DICOM times are naive local times; an offset cannot be reconciled with them without the
        # site's time zone (and subtracting aware from naive datetimes fails later).
        if v is not None and v.tzinfo is not None and v.utcoffset() is not None:
            raise ValueError(NAIVE_DATETIME_MESSAGE)
        return v


class PriorExponential(_Model):
    """One term c·e^{−k t} of an earlier cycle's fitted time-activity curve."""

    coefficient: float = Field(description="c, any unit (only the curve's shape counts); negative for an uptake term")
    rate_per_s: float = Field(gt=0, description="k, 1/s (effective: biological and physical)")


class PriorVoi(_Model):
    """One VOI's kinetics from an earlier cycle: the exponential terms of its full fit, or one effective
    half-life (a mono-exponential); exactly one of the two."""

    exponentials: list[PriorExponential] = Field(default_factory=list, max_length=8)
    effective_half_life_h: float | None = Field(None, gt=0, description="T_eff, h (instead of exponentials)")
    model: Text | None = Field(None, description="the earlier fit's model (monoexp, biexp, …), for the record")

    @model_validator(mode="after")
    def _one_shape(self) -> PriorVoi:
        if bool(self.exponentials) == (self.effective_half_life_h is not None):
            raise ValueError("give either exponentials or effective_half_life_h (exactly one)")
        return self

    def terms(self) -> tuple[tuple[float, float], ...]:
        """The curve as ``((c_i, k_i), …)``, k in 1/s (:func:`voxeldose.timeactivity.stp_prior`)."""
        if self.effective_half_life_h is not None:
            return ((1.0, math.log(2) / (self.effective_half_life_h * 3600.0)),)
        return tuple((e.coefficient, e.rate_per_s) for e in self.exponentials)


class PriorKinetics(_Model):
    """The patient's own kinetics from an earlier cycle's full result (stp_method 'prior'), per VOI name.

    Build it from that cycle's ``summary.json`` with :func:`voxeldose.prior.prior_from_summary`.  A VOI of
    this cycle without an entry here falls back to Hänscheid 2018, with a warning; none matching is an error."""

    source: Text = Field(description="the earlier result, e.g. 'cycle 1, job <id>, voxeldose <version>'")
    cycle_number: int | None = Field(None, ge=1, le=MAX_CYCLE_NUMBER, description="the earlier cycle's number")
    job_id: Text | None = None
    software_version: Text | None = Field(None, description="voxeldose version that made the earlier result")
    vois: dict[Text, PriorVoi] = Field(min_length=1, description="VOI name → its earlier kinetics")


class FitSpec(_Model):
    model: FitModel = Field("auto", description="VOI time-activity model; 'stp' = single time point")
    voxel_method: Literal["exponential", "hybrid", "monoexp"] = Field(
        "exponential",
        description="voxel TIA: exponential interpolation between scans (default), trapezoid (hybrid), or one mono-exponential",
    )
    stp_method: Literal["hanscheid", "madsen", "prior"] = Field(
        "hanscheid",
        description="single time point: Hänscheid 2018, Madsen 2018 (population T_eff), or 'prior' (the patient's "
        "own kinetics from an earlier cycle: fit.prior)",
    )
    stp_effective_half_life_h: dict[Text, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Madsen 2018: population effective half-life, h, under the key 'default' (applied to every voxel)",
    )
    prior: PriorKinetics | None = Field(None, description="stp_method 'prior': the earlier cycle's kinetics per VOI")

    @model_validator(mode="after")
    def _prior_given(self) -> FitSpec:
        if self.stp_method == "prior" and self.prior is None:
            raise ValueError("stp_method 'prior' needs fit.prior (the earlier cycle's kinetics per VOI)")
        return self


class DoseSpec(_Model):
    method: DoseMethod = "dvk"
    medium: Literal["water", "soft-tissue", "cortical-bone", "lung"] = "soft-tissue"
    kernel_size: int | None = Field(
        None, ge=3, le=MAX_KERNEL_SIZE, description="odd kernel size in voxels (default: automatic)"
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int | None) -> int | None:
        if v is not None and v % 2 == 0:
            raise ValueError("an odd number of voxels (the kernel is centred on a voxel)")
        return v


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
    planned_activity_mbq: float = Field(
        7400.0, gt=0, le=MAX_ACTIVITY_MBQ, description="activity of each further cycle, MBq"
    )


class EarlierCycle(_Model):
    """A previous cycle of the same patient, from an earlier result.  Its doses are of that one cycle, Gy:
    at least 0, a kidney at most 100, any VOI at most 1000 (``MAX_KIDNEY_GY_PER_CYCLE``,
    ``MAX_VOI_GY_PER_CYCLE``)."""

    number: int = Field(ge=1, le=MAX_CYCLE_NUMBER)
    date: Text | None = Field(None, description="injection date, ISO 8601 (YYYY-MM-DD)")
    activity_mbq: float = Field(gt=0, le=MAX_ACTIVITY_MBQ)
    kidney_gy: float | None = Field(None, ge=0, le=MAX_KIDNEY_GY_PER_CYCLE)
    kidney_bed_gy: float | None = Field(None, ge=0)
    marrow_gy: float | None = Field(None, ge=0, le=MAX_VOI_GY_PER_CYCLE)
    vois: dict[Text, Annotated[float, Field(ge=0, le=MAX_VOI_GY_PER_CYCLE)]] = Field(
        default_factory=dict, description="mean absorbed dose per VOI, Gy"
    )
    kidney_u_components_gy: dict[Text, Annotated[float, Field(ge=0, le=MAX_KIDNEY_GY_PER_CYCLE)]] | None = Field(
        None,
        description="standard uncertainty of kidney_gy by EANM budget component (e.g. calibration, counting), Gy; "
        "absent: not stated (an older result)",
    )

    @field_validator("date")
    @classmethod
    def _iso_date(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                _dt.date.fromisoformat(v[:10] if len(v) > 10 and v[10] in "T " else v)
            except ValueError:
                raise ValueError("a date as YYYY-MM-DD") from None
        return v


class BloodSample(_Model):
    hours_after_injection: float = Field(gt=0)
    bq_per_ml: float = Field(ge=0)


class MarrowSpec(_Model):
    recovery_coefficient: float = Field(1.0, gt=0, le=1.0, description="image-based L2-L4 partial-volume recovery")
    blood_samples: list[BloodSample] = Field(default_factory=list)
    rmblr: float = Field(1.0, gt=0, description="red-marrow-to-blood activity concentration ratio")


class ReconstructionSpec(_Model):
    """OSEM settings for time points reconstructed from their projections (:mod:`voxeldose.projections`).

    The default, 4 iterations × 8 subsets, is ``voxeldose recon``'s (a vendor-like few iterations: resolution is
    not fully recovered, the total activity is, see :mod:`voxeldose.recon`); the subsets must divide the views.
    """

    iterations: int = Field(4, ge=1, le=100, description="OSEM iterations")
    subsets: int = Field(8, ge=1, le=360, description="OSEM subsets (must divide the number of views)")


class JobSpec(_Model):
    """Everything a run needs besides the DICOM files themselves."""

    inputs: list[Text] = Field(min_length=1, description="DICOM folders or files")
    patient_id: Text | None = None
    cycle_number: int = Field(1, ge=1, le=MAX_CYCLE_NUMBER)
    reference_timepoint: int | None = Field(
        None, ge=0, le=MAX_CYCLE_NUMBER, description="index in time order; default: the time point the VOIs are on"
    )
    registration: Literal["rigid", "none"] = "rigid"
    calibration: Calibration = Calibration()
    injection: InjectionOverride = InjectionOverride()
    fit: FitSpec = FitSpec()
    dose: DoseSpec = DoseSpec()
    roles: dict[Text, Role] = Field(default_factory=dict, description="VOI name → role; default from the name")
    radiobiology: dict[Text, Radiobiology] = Field(default_factory=dict, description="per role or VOI name")
    limits: Limits = Limits()
    earlier_cycles: list[EarlierCycle] = Field(default_factory=list)
    marrow: MarrowSpec = MarrowSpec()
    voi_source: Literal["auto", "rtstruct", "seg"] = "auto"
    reconstruct: bool = Field(
        False,
        description="reconstruct every time point that has projections, even where a reconstruction was given "
        "(default: only time points with projections and no reconstruction)",
    )
    reconstruction: ReconstructionSpec = ReconstructionSpec()
    camera: CameraProfile | None = Field(
        None,
        description="the camera's profile (voxeldose calibrate): its sensitivity calibrates a counts SPECT, its "
        "FWHM and recovery curve feed the partial-volume correction",
    )
    pvc: PvcMethod = Field(
        "none",
        description="partial-volume correction (voxeldose.pvc): rc (recovery curve), gtm (Rousset 1998) or rbv "
        "(Thomas 2011, a corrected activity map); needs the camera profile",
    )

    @field_validator("camera")
    @classmethod
    def _one_calibration(cls, cam: CameraProfile | None, info: ValidationInfo) -> CameraProfile | None:
        calibration = info.data.get("calibration")
        given = calibration.cps_per_mbq if isinstance(calibration, Calibration) else None
        if cam is not None and given is not None and not math.isclose(given, cam.sensitivity_cps_per_mbq, rel_tol=1e-9):
            # the same value twice (a service that copies the profile's sensitivity into the calibration) is no conflict
            raise ValueError(
                "give the calibration either as calibration.cps_per_mbq or by the camera profile, not both "
                f"({given} cps/MBq and {cam.sensitivity_cps_per_mbq} cps/MBq of {cam.name!r})"
            )
        if cam is not None and not cam.sensitivity_cps_per_mbq <= MAX_CPS_PER_MBQ:
            raise ValueError(
                f"a camera sensitivity of at most {MAX_CPS_PER_MBQ:g} cps/MBq; {cam.sensitivity_cps_per_mbq} "
                "is beyond any collimated camera (a unit error)"
            )
        return cam

    @field_validator("pvc")
    @classmethod
    def _pvc_has_its_profile(cls, method: str, info: ValidationInfo) -> str:
        if method == "none":
            return method
        cam = info.data.get("camera")
        if not isinstance(cam, CameraProfile):
            raise ValueError(f"pvc {method!r} needs the camera profile (camera: the camera.json of the SPECT camera)")
        if method == "rc" and cam.recovery_fit is None:
            raise ValueError(f"pvc 'rc' needs a recovery curve, and camera profile {cam.name!r} has no recovery_fit")
        if method in ("gtm", "rbv") and cam.fwhm_mm is None:
            raise ValueError(
                f"pvc {method!r} needs the camera's resolution, and camera profile {cam.name!r} has no fwhm_mm"
            )
        return method

    @property
    def cps_per_mbq(self) -> float | None:
        """The calibration that applies: ``calibration.cps_per_mbq``, else the camera profile's sensitivity."""
        if self.calibration.cps_per_mbq is not None:
            return self.calibration.cps_per_mbq
        return None if self.camera is None else self.camera.sensitivity_cps_per_mbq

    @property
    def calibration_source(self) -> str | None:
        """Where :attr:`cps_per_mbq` comes from."""
        if self.calibration.cps_per_mbq is not None or self.camera is None:
            return self.calibration.source
        cam = self.camera
        return (
            f"camera profile {cam.name!r} ({cam.sensitivity_cps_per_mbq:g} ± {cam.sensitivity_u_cps_per_mbq:g} "
            f"cps/MBq, measured {cam.measured})"
        )

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
