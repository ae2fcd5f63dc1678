"""``summary.json``: the typed results contract of a run (schema ``voxeldose.summary/3``).

Every reader — the report, the DICOM SR, the RT Dose writer, the console table, the service's trigger,
API and pages — reads attributes of :class:`Summary` (built by :func:`voxeldose.pipeline.run`, or loaded
from disk with :meth:`Summary.load`), never string keys.  Field names are the JSON keys, units in the
names (``_gy`` Gy, ``_MBq``/``_mbq`` MBq, ``_bq`` Bq, ``_bqs`` Bq·s, ``_s`` seconds, ``_h`` hours,
``_ml`` ml, ``_g`` grams).  Numbers that cannot be computed (not finite) are written as ``null``, so
every float that may be undefined is ``float | None``.

A key that is absent (rather than ``null``) in the JSON is a field left unset: for instance a VOI
without a time-activity fit has no ``time_activity`` and no ``tia_bqs``, a VOI without radiobiology no
``bed_gy``.  The JSON Schema generated from these models is committed as ``docs/summary.schema.json``;
rewrite it after a change with ``python -m voxeldose.summary`` (and bump :data:`SCHEMA_VERSION` when
the JSON changes).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from .errors import VoxeldoseError
from .spec import JobSpec

#: The ``schema`` value of every summary this version writes.
SCHEMA_VERSION: Final = "voxeldose.summary/3"
#: Where the committed JSON Schema lives, relative to the repository root.
SCHEMA_PATH = Path("docs") / "summary.schema.json"


class _Part(BaseModel):
    """A part of the summary whose content is ours: unknown keys are errors.

    An optional field the producer did not set (still ``None``) is left out of the JSON rather than
    written as ``null``: optional blocks are absent, as the pipeline has always written them.
    """

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name, info in type(self).model_fields.items():
                if name not in self.model_fields_set and getattr(self, name) is None:
                    data.pop(info.alias or name, None)
        return data


# ------------------------------------------------------------------------------------------ patient, cycle
class Patient(_Part):
    """The patient as the DICOM headers name it."""

    id: str
    name: str


class Injection(_Part):
    """The administration of this cycle, each value with where it came from (a DICOM tag or ``caller``)."""

    datetime: str = Field(description="injection date and time, ISO 8601, local (as DICOM stores it)")
    datetime_source: str
    activity_MBq: float = Field(description="administered activity, MBq")
    activity_source: str
    nuclide: str = Field(description="ICRP-107 name, e.g. Lu-177")
    nuclide_source: str
    radiopharmaceutical: str | None
    radiopharmaceutical_source: str | None = Field(description="null when the headers name no radiopharmaceutical")


class CycleInfo(_Part):
    number: int = Field(description="therapy cycle number, 1 for the first")
    injection: Injection


# ------------------------------------------------------------------------------------------ time points
class Quantification(_Part):
    """How one SPECT became Bq/ml (see :mod:`voxeldose.quantify`)."""

    series_instance_uid: str
    pixel_mode: str
    calibration_cps_per_mbq: float | None
    calibration_source: str | None
    acquisition_duration_s: float | None
    decay_during_acquisition_factor: float | None
    decay_correction: str
    total_activity_mbq: float | None = Field(description="activity in the SPECT field of view, MBq")


class Registration(_Part):
    """Alignment of a time point to the reference: the reference itself, not registered (by the job), or a
    rigid CT-to-CT registration (see :meth:`voxeldose.register.Registration.to_dict`)."""

    reference: bool | None = None
    method: str | None = None
    moving_to_reference_lps_4x4: list[list[float]] | None = None
    moving_to_reference_meaning: str | None = None
    translation_mm: list[float] | None = None
    rotation_deg: list[float] | None = None
    rotation_convention: str | None = None
    rotation_angle_deg: float | None = None
    displacement_at_body_centre_mm: float | None = None
    metric: str | None = None
    similarity_before: float | None = None
    similarity_after: float | None = None
    similarity_poor_below: float | None = None
    overlap_fraction: float | None = None
    quality: Literal["good", "poor", "not registered"]
    message: str
    converged: bool | None = None
    optimizer_stop: str | None = None
    iterations: int | None = None
    runtime_s: float | None = None
    details: dict[str, JsonValue] | None = Field(None, description="the registration's working parameters")


class SpectReconstruction(_Part):
    """How a time point's SPECT was made: reconstructed here from its projections (``made_by`` ``voxeldose``:
    algorithm, iterations, subsets and the models used), or the camera's reconstruction read as given
    (``vendor``, with its ReconstructionMethod (0054,1103) when the header states one)."""

    made_by: Literal["voxeldose", "vendor"]
    method: str | None = Field(
        description="as a reconstruction states itself, e.g. 'OSEM 4i8s AC RR SY-ME'; the vendor's "
        "ReconstructionMethod, or null when its header has none"
    )
    algorithm: str | None = None
    iterations: int | None = None
    subsets: int | None = None
    models: list[str] | None = Field(None, description="the system model: attenuation, resolution recovery, scatter")
    projections_series_uid: str | None = None
    device: str | None = Field(None, description="where it was computed (torch device)")


class TimePoint(_Part):
    hours: float = Field(description="hours after injection")
    acquisition_datetime: str
    acquisition_time_source: str
    spect_series_uid: str
    ct_series_uid: str | None
    quantification: Quantification
    registration: Registration
    reconstruction: SpectReconstruction | None = Field(
        None, description="how the SPECT was made (absent in summaries written before it was recorded)"
    )


class PvcRecord(_Part):
    """The partial-volume correction of the run (see :mod:`voxeldose.pvc`): the method, the camera profile whose
    resolution or recovery curve it used, and how the VOI doses were corrected."""

    method: Literal["none", "rc", "gtm", "rbv"] = "none"
    description: str = "no partial-volume correction"
    camera_profile: str | None = Field(None, description="name of the camera profile used (job's camera.name)")
    fwhm_mm: float | None = Field(None, description="PSF FWHM the correction modelled, mm (gtm, rbv)")
    recovery_curve: str | None = Field(None, description="the recovery fit used (rc)")
    dose_correction: str | None = Field(None, description="how the VOI mean doses were corrected, and the assumption")
    notes: list[str] = Field(default_factory=list)

    @classmethod
    def none(cls) -> PvcRecord:
        return cls()


class SingleTimePoint(_Part):
    """How a single-time-point job got its TIA: the method, the earlier result a 'prior' came from, which method
    each VOI took, and the method's expected error as published (:mod:`voxeldose.timeactivity` docstring)."""

    method: Literal["hanscheid", "madsen", "prior"]
    scan_h: float = Field(description="the one scan's time after injection, h")
    prior_source: str | None = Field(None, description="'prior': the earlier result (cycle, job, version)")
    vois: dict[str, str] = Field(default_factory=dict, description="VOI name → the method its voxels took")
    expected_error: str
    references: list[str]


class Methods(_Part):
    quantification: str
    fit: str
    voxel_tia: str
    dose: str
    medium: str
    kernel_id: str | None
    kernel_density_g_cm3: float | None
    dose_grid: str
    voi_source: str = Field(description="'RTSTRUCT <SeriesInstanceUID>' or 'SEG <SeriesInstanceUID>'")
    pvc: PvcRecord = Field(default_factory=PvcRecord.none, description="partial-volume correction (schema /3)")
    dose_uncertainty: str | None = Field(
        None, description="the voxel dose-uncertainty map: what it holds, or why there is none (issue 13 part 3)"
    )
    single_time_point: SingleTimePoint | None = Field(
        None, description="one time point: the method, a prior's source and the expected error (schema /3)"
    )


# ------------------------------------------------------------------------------------------ VOIs
class Dvh(_Part):
    """Cumulative DVH (at most 200 points)."""

    dose_gy: list[float]
    volume_fraction: list[float]
    total_volume_ml: float
    bin_gy: float
    downsampled: bool
    definition: str


class DvhBand(_Part):
    """Per-voxel DVH band (:mod:`voxeldose.voxeluncertainty`): the DVHs of dose − k·u and dose + k·u."""

    dose_gy: list[float]
    volume_fraction_lower: list[float] = Field(description="cumulative DVH of max(dose − k·u, 0)")
    volume_fraction_upper: list[float] = Field(description="cumulative DVH of dose + k·u")
    coverage_factor: float
    definition: str


class Exponential(_Part):
    coefficient_bq: float | None
    rate_per_s: float | None
    half_life_s: float | None


class Component(_Part):
    amplitude_bq: float | None
    rate_per_s: float | None
    uptake_excess_rate_per_s: float | None


class Candidate(_Part):
    """One model the automatic choice tried."""

    aicc: float | None
    tia_bqs: float | None
    params: dict[str, float | None] | None
    success: bool
    message: str


class Curve(_Part):
    """The fitted curve, sampled for plotting."""

    times_h: list[float]
    activity_mbq: list[float | None]


class TimeActivity(_Part):
    """A VOI's time-activity: a fit (model monoexp, biexp, triexp, trapezoid) or, with one time point, the
    single-time-point record (model ``stp``: ``times_h`` and ``activity_mbq`` only)."""

    model: str
    params: dict[str, float | None] | None = None
    tia_bqs: float | None = None
    exponentials: list[Exponential] | None = None
    piecewise: dict[str, JsonValue] | None = None
    components: list[Component] | None = None
    aicc: float | None = None
    r2: float | None = None
    residuals_bq: list[float | None] | None = None
    n_points: int | None = None
    times_s: list[float] | None = None
    activities_bq: list[float] | None = None
    decay_constant_per_s: float | None = None
    weighting: str | None = None
    candidates: dict[str, Candidate] | None = None
    message: str | None = None
    curve: Curve | None = None
    times_h: list[float] | None = None
    activity_mbq: list[float] | None = None


class VoiPvc(_Part):
    """A VOI's partial-volume correction: its corrected and uncorrected mean dose side by side.  ``mean_gy`` of
    the VOI is the corrected one; ``factor`` = corrected / uncorrected mean dose."""

    method: Literal["rc", "gtm", "rbv"]
    uncorrected_mean_gy: float
    corrected_mean_gy: float
    factor: float
    uncorrected_tia_bqs: float | None = Field(None, description="TIA of the fit to the uncorrected activities, Bq·s")
    corrected_tia_bqs: float | None = Field(None, description="TIA of the fit to the corrected activities, Bq·s")
    activity_factors: list[float] = Field(description="corrected / observed VOI activity at each time point")
    notes: list[str] = Field(default_factory=list)


class UncertaintyComponent(_Part):
    """One named input of a VOI's uncertainty budget (see :mod:`voxeldose.uncertainty`)."""

    name: str
    relative_u: float | None = Field(
        description="relative standard uncertainty it contributes to the mean dose; null: not stated or not evaluated"
    )
    how: str


class ValueU(_Part):
    """A value, its standard uncertainty u and the ≈ 95 % interval value ± k·u (null bounds without a u)."""

    value: float
    u: float | None
    lower_95: float | None
    upper_95: float | None


class VoiUncertainty(_Part):
    """A VOI's EANM uncertainty budget (Gear et al. 2018, EJNMMI 45:2456; GUM JCGM 100:2008): first-order
    propagation, expanded uncertainty U = k·u with k = ``coverage_factor``."""

    method: str
    coverage_factor: float
    components: list[UncertaintyComponent]
    activity_bq: list[ValueU] = Field(description="VOI activity at each time point, Bq")
    tia_bqs: ValueU
    mean_gy: ValueU
    bed_gy: ValueU | None = None
    eqd2_gy: ValueU | None = None
    notes: list[str] = Field(default_factory=list)


class VoiMetrics(_Part):
    """Absorbed-dose metrics of one VOI (definitions in :mod:`voxeldose.metrics`)."""

    role: Literal["kidney", "marrow", "tumour", "organ", "body"]
    source: str
    volume_ml: float
    mass_g: float | None
    mean_gy: float = Field(description="mean absorbed dose (energy / mass), Gy")
    mean_weighting: Literal["volume", "mass"]
    min_gy: float | None
    max_gy: float | None
    min_max_over: str
    D2_gy: float | None
    D50_gy: float | None
    D98_gy: float | None
    D2cc_gy: float | None = Field(description="null when the VOI is smaller than 2 ml")
    injected_activity_bq: float
    gy_per_gbq: float | None
    dvh: Dvh
    notes: list[str]
    mass_source: str | None = None
    voxel_tia_physical_decay_tail_fraction: float | None = None
    tia_bqs: float | None = Field(None, description="TIA of the VOI's time-activity fit, Bq·s")
    time_activity: TimeActivity | None = None
    bed_gy: float | None = None
    eqd2_gy: float | None = None
    g_factor: float | None = None
    alpha_beta_gy: float | None = None
    repair_half_time_h: float | None = None
    bed_kinetics: str | None = None
    tia_voxel_sum_bqs: float | None = Field(None, description="sum of the voxel TIAs in the VOI, Bq·s")
    pvc: VoiPvc | None = Field(None, description="partial-volume correction; absent without one (schema /3)")
    uncertainty: VoiUncertainty | None = Field(None, description="uncertainty budget; absent without a VOI fit")
    dvh_band: DvhBand | None = Field(None, description="per-voxel DVH band; absent without a dose-uncertainty map")


# ------------------------------------------------------------------------------------------ marrow
class MarrowImageBased(_Part):
    voi: str
    red_marrow_gy: float
    method: str
    mean_dose_l2l4_gy: float
    recovery_coefficient: float
    notes: list[str]


class MarrowBloodBased(_Part):
    red_marrow_gy: float
    self_dose_gy: float
    cross_dose_gy: float
    method: str
    blood_tia_bq_s_per_ml: float
    blood_model: str
    rmblr: float
    red_marrow_mass_g: float
    red_marrow_tia_bq_s: float
    electron_energy_per_decay_mev: float
    electron_absorbed_fraction: float
    notes: list[str]


class Marrow(_Part):
    image_based: MarrowImageBased | None
    blood_based: MarrowBloodBased | None


# ------------------------------------------------------------------------------------------ cycles
class CycleDoseU(_Part):
    """The standard uncertainty of one cycle's organ dose, by budget component (see
    :func:`voxeldose.cycles.cumulative_uncertainty`); ``u_gy`` null: not stated (never invented)."""

    u_gy: float | None = Field(description="standard uncertainty of the cycle's dose, Gy; null: not stated")
    components_gy: dict[str, float] = Field(
        default_factory=dict, description="standard uncertainty each stated budget component contributes, Gy"
    )
    source: str = Field(description="where the uncertainty comes from, or why it is not stated")


class CycleRow(_Part):
    """One cycle of the cumulative table (this one and the earlier ones from the job)."""

    number: int
    date: str | None = Field(description="injection date, ISO 8601 (as the job gave it for earlier cycles)")
    activity_MBq: float
    kidney_gy: float | None
    kidney_bed_gy: float | None
    marrow_gy: float | None
    kidney_u: CycleDoseU | None = Field(None, description="uncertainty of kidney_gy (schema /3, additive)")
    marrow_u: CycleDoseU | None = Field(None, description="uncertainty of marrow_gy (schema /3, additive)")


class Totals(_Part):
    dose_gy: dict[str, float] = Field(description="cumulative absorbed dose by organ (kidney, marrow), Gy")
    bed_gy: dict[str, float] = Field(description="cumulative BED by organ, Gy")
    activity_MBq: float


class LimitsUsed(_Part):
    kidney_gy: float
    kidney_bed_gy: float
    kidney_risk_factors: bool
    marrow_gy: float
    sources: dict[str, str]


class LimitRow(_Part):
    """How many further cycles one limit allows (see :func:`voxeldose.cycles.cycles_left`)."""

    limit: str
    quantity: str
    limit_gy: float
    source: str
    current_gy: float
    per_cycle_gy: float
    cycles_left: int | None
    after_cycles_gy: float
    after_next_cycle_gy: float
    exceeded: bool
    message: str
    g_factor: float | None = None
    alpha_beta_gy: float | None = None


class CyclesLeft(_Part):
    cycles_left: int | None
    binding_limit: str | None
    activity_per_cycle_bq: float
    limits: list[LimitRow]
    message: str
    assumption: str
    notes: list[str]
    upper_95: CyclesLeft | None = Field(
        None,
        description="the same planning at the 95 % upper bound of the cumulative and per-cycle doses (value + k·u); "
        "only limits whose organ dose has a stated uncertainty (schema /3, additive)",
    )


class EstimatedCycle(_Part):
    """An earlier cycle's organ dose estimated from this cycle's dose per GBq."""

    cycle: int
    organ: str
    dose_gy: float


class CumulativeUncertainty(_Part):
    """The uncertainty of the cumulative doses (GUM JCGM 100:2008 §5.2; Gear et al. 2018): components correlated
    between cycles summed linearly, independent ones in quadrature (:func:`voxeldose.cycles.cumulative_uncertainty`)."""

    method: str
    correlation_model: str
    coverage_factor: float
    dose_gy: dict[str, ValueU] = Field(description="cumulative absorbed dose by organ; u null: not stated")
    bed_gy: dict[str, ValueU] = Field(description="cumulative BED by organ; u null: not stated")
    not_stated: dict[str, list[int]] = Field(
        description="by organ, the cycles whose dose has no stated uncertainty (the combined u is then a lower bound)"
    )
    notes: list[str] = Field(default_factory=list)


class Cumulative(_Part):
    cycles: list[CycleRow]
    total: Totals
    limits: LimitsUsed
    planned_activity_MBq: float
    cycles_left: CyclesLeft | None
    notes: list[str]
    kidney_figure: str
    estimated_earlier_cycles: list[EstimatedCycle]
    uncertainty: CumulativeUncertainty | None = Field(
        None, description="uncertainty of the cumulative doses (schema /3, additive)"
    )


# ------------------------------------------------------------------------------------------ provenance
class NuclideData(_Part):
    name: str
    half_life_s: float
    data: str


class CalibrationRecord(_Part):
    cps_per_mbq: float | None
    source: str | None
    applied: bool = Field(description="true when a counts SPECT was calibrated with it")


class InputSeries(_Part):
    kind: str
    series_instance_uid: str
    instances: int


class InputSet(_Part):
    """The input set of a cycle (what the service uses to never run the same inputs twice)."""

    series: list[InputSeries]
    sop_instances: int
    sop_instance_uids_sha256: str


class Provenance(_Part):
    software: dict[str, str]
    kernel_id: str | None
    nuclide: NuclideData
    calibration: CalibrationRecord
    inputs: InputSet
    spec: JobSpec
    created_utc: str
    timings_s: dict[str, float]
    total_s: float


# ------------------------------------------------------------------------------------------ summary
class Summary(_Part):
    """The whole ``summary.json``."""

    model_config = ConfigDict(extra="forbid", title="voxeldose summary.json", validate_by_name=True)

    schema_: Literal["voxeldose.summary/3"] = Field(SCHEMA_VERSION, alias="schema")
    patient: Patient
    cycle: CycleInfo
    reference_timepoint: int = Field(description="index of the time point the dose grid is on")
    timepoints: list[TimePoint]
    methods: Methods
    vois: dict[str, VoiMetrics] = Field(description="by ROI name")
    marrow: Marrow
    cumulative: Cumulative
    warnings: list[str]
    provenance: Provenance

    def to_json(self) -> str:
        """Strict JSON text (NaN and infinities → ``null``), indented, as ``summary.json`` holds it."""
        data = _finite(self.model_dump(mode="json", by_alias=True))
        return json.dumps(data, indent=2, allow_nan=False)

    @classmethod
    def load(cls, path: str | Path) -> Summary:
        """Read and validate a ``summary.json``; a file that does not follow the schema is a
        :class:`VoxeldoseError` naming the first field at fault."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise VoxeldoseError(f"cannot read the summary ({exc})", path=path) from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise VoxeldoseError(f"the summary is not JSON ({exc})", path=path, tag="schema") from None
        try:
            return cls.model_validate(upgrade(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise VoxeldoseError(
                f"not a {SCHEMA_VERSION} summary: {first['msg']}",
                path=path,
                tag=".".join(str(x) for x in first["loc"]) or "schema",
                expected=f"JSON following {SCHEMA_PATH.as_posix()}",
                found=None if first.get("type") == "missing" else _short(first.get("input")),
            ) from None


#: Schema versions :func:`upgrade` brings to :data:`SCHEMA_VERSION`.
EARLIER_SCHEMAS: Final = ("voxeldose.summary/1", "voxeldose.summary/2")


def upgrade(data: Any) -> Any:
    """A parsed summary of an earlier schema, brought to :data:`SCHEMA_VERSION` (other input unchanged).

    ``voxeldose.summary/1`` (results written before the typed model) lacks ``cycle.injection.nuclide_source``
    and ``radiopharmaceutical_source``; they are filled with ``"not recorded (voxeldose.summary/1)"`` — never
    guessed — so an earlier cycle's measured doses stay readable after an upgrade of the service.

    ``voxeldose.summary/2`` and earlier had no partial-volume correction: ``methods.pvc`` becomes method
    ``none`` with a note saying the record predates it (``/3``)."""
    if not isinstance(data, dict) or data.get("schema") not in EARLIER_SCHEMAS:
        return data
    out = dict(data, schema=SCHEMA_VERSION)
    methods = out.get("methods")
    if isinstance(methods, dict) and "pvc" not in methods:
        out["methods"] = dict(
            methods, pvc={"method": "none", "notes": [f"written before partial-volume correction ({data['schema']})"]}
        )
    cycle = out.get("cycle")
    if data["schema"] == "voxeldose.summary/1" and isinstance(cycle, dict) and isinstance(cycle.get("injection"), dict):
        inj = dict(cycle["injection"])
        for key in ("nuclide_source", "radiopharmaceutical_source"):
            inj.setdefault(key, f"not recorded ({data['schema']})")
        out["cycle"] = dict(cycle, injection=inj)
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``summary.json``, generated from :class:`Summary`."""
    schema = Summary.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://voxeldose.invalid/{SCHEMA_VERSION}",
        **schema,
    }


def json_schema_text() -> str:
    """:func:`json_schema` as the text committed in ``docs/summary.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m voxeldose.summary [PATH]``: rewrite the committed schema (default docs/summary.schema.json)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else SCHEMA_PATH
    path.write_text(json_schema_text())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
