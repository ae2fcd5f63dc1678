"""Quantification: reconstructed SPECT values → activity concentration (Bq/ml) at acquisition start.

Counts (MIRD Pamphlet 26, Ljungberg et al. 2016, J Nucl Med 57:151, eq. for the volume sensitivity):

    A_voxel [Bq] = C_voxel / (S [cps/MBq] · T_acq [s] · f_decay) · 10⁶,
    f_decay = (1 − e^{−λ T_acq}) / (λ T_acq)

where ``S`` is the camera's volume sensitivity (reconstructed counts per second per MBq, measured with
a phantom), ``T_acq`` the acquisition duration (ActualFrameDuration × NumberOfFramesInRotation) and
``f_decay`` the mean fraction of the start activity present during the acquisition (physical decay
during the scan).  The result refers to the acquisition start time.  Concentration = A / voxel volume.

Already-quantitative series (Real World Value Mapping in Bq/ml, or Units BQML) are used as they are:
their values are taken as the concentration at acquisition start.  If the series says it was
decay-corrected to the administration (DecayCorrection (0054,1102) = ADMIN, a PET attribute some vendors
write in NM), the values are decayed forward to the acquisition start; any other DecayCorrection value
except START/NONE is an error.  What was done is recorded in :class:`Quantification`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np

from .dicomutil import tag_label
from .errors import VoxeldoseError
from .geometry import Volume
from .ingest import SpectImage


@dataclass(frozen=True)
class Quantification:
    """How one SPECT was turned into Bq/ml (kept in the provenance)."""

    series_instance_uid: str
    pixel_mode: str
    calibration_cps_per_mbq: float | None
    calibration_source: str | None
    acquisition_duration_s: float | None
    decay_during_acquisition_factor: float | None
    decay_correction: str
    total_activity_mbq: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def decay_during_acquisition(decay_constant_per_s: float, duration_s: float) -> float:
    """``(1 − e^{−λT}) / (λT)``: mean fraction of the start activity present during a scan of length T."""
    x = decay_constant_per_s * duration_s
    return 1.0 if x == 0 else -math.expm1(-x) / x


def to_bq_per_ml(
    image: SpectImage,
    *,
    decay_constant_per_s: float,
    calibration_cps_per_mbq: float | None = None,
    calibration_source: str | None = None,
    acquisition_start: datetime | None = None,
    injection_start: datetime | None = None,
    decay_correction: str | None = None,
) -> tuple[Volume, Quantification]:
    """Activity concentration (Bq/ml, float32) at acquisition start, and the record of how.

    A counts series without ``calibration_cps_per_mbq`` is an error that says how to supply one.
    """
    vol = image.volume
    suid = str(vol.meta.get("series_instance_uid", "?"))
    if image.pixel_mode == "counts":
        if calibration_cps_per_mbq is None:
            raise VoxeldoseError(
                f"SPECT series {suid} holds raw counts and no calibration factor was given",
                tag="calibration_cps_per_mbq",
                expected="the camera's volume sensitivity in cps/MBq (voxeldose run --calibration CPS_PER_MBQ, "
                "or calibration.cps_per_mbq in the job)",
            )
        if not (calibration_cps_per_mbq > 0 and math.isfinite(calibration_cps_per_mbq)):
            raise VoxeldoseError(
                "the calibration factor must be a positive number",
                tag="calibration_cps_per_mbq",
                expected="cps/MBq > 0",
                found=calibration_cps_per_mbq,
            )
        if not image.acquisition_duration_s:
            raise VoxeldoseError(
                f"SPECT series {suid} holds counts but its acquisition duration is unknown",
                tag=f"{tag_label('RotationInformationSequence')} > {tag_label('ActualFrameDuration')}, {tag_label('NumberOfFramesInRotation')}",
                expected="the time per projection (ms) and the number of projections",
            )
        t = image.acquisition_duration_s
        f = decay_during_acquisition(decay_constant_per_s, t)
        bq_per_voxel = vol.array / (calibration_cps_per_mbq * t * f) * 1e6
        conc = (bq_per_voxel / vol.voxel_volume_ml).astype(np.float32)
        q = Quantification(
            suid,
            "counts",
            float(calibration_cps_per_mbq),
            calibration_source,
            t,
            f,
            "decay during acquisition corrected; activity at acquisition start",
            float(bq_per_voxel.sum()) / 1e6,
        )
        return vol.with_array(conc, "Bq/ml"), q

    dc = (decay_correction or "").upper()
    if dc in ("", "START", "NONE"):
        conc = np.asarray(vol.array, dtype=np.float32)
        note = "values used as the concentration at acquisition start" + (f" (DecayCorrection {dc})" if dc else "")
    elif dc == "ADMIN":
        if acquisition_start is None or injection_start is None:
            raise VoxeldoseError(
                "decay-corrected-to-administration values need both times", tag=tag_label("DecayCorrection")
            )
        dt = (acquisition_start - injection_start).total_seconds()
        conc = (np.asarray(vol.array, dtype=np.float64) * math.exp(-decay_constant_per_s * dt)).astype(np.float32)
        note = "values were decay-corrected to the administration; decayed forward to acquisition start"
    else:
        raise VoxeldoseError(
            f"SPECT series {suid}: unsupported decay correction {dc!r}",
            tag=tag_label("DecayCorrection"),
            expected="START, NONE or ADMIN",
            found=dc,
        )
    q = Quantification(
        suid,
        image.pixel_mode,
        None,
        None,
        image.acquisition_duration_s,
        None,
        note,
        float(conc.sum(dtype=np.float64)) * vol.voxel_volume_ml / 1e6,
    )
    return vol.with_array(conc, "Bq/ml"), q
