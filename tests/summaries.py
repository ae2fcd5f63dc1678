"""Hand-made, schema-valid ``summary.json`` documents for tests that need a finished job's result without running
the pipeline (the trigger's earlier cycles, the patient pages).  Validated by :class:`voxeldose.summary.Summary`
when built, so a test can never lean on a summary the service would refuse."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from voxeldose.summary import SCHEMA_VERSION, Summary


def cycle_summary(
    *,
    number: int,
    injection: datetime,
    activity_mbq: float,
    kidney_gy: float | None,
    kidney_bed_gy: float | None,
    marrow_gy: float | None,
    patient_id: str = "VXD-TEST",
    kidney_u_components_gy: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A valid summary of cycle ``number`` with these (made-up) doses as its own cumulative row; no VOIs."""
    doc: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "patient": {"id": patient_id, "name": "TEST^PATIENT"},
        "cycle": {
            "number": number,
            "injection": {
                "datetime": injection.isoformat(),
                "datetime_source": "caller",
                "activity_MBq": activity_mbq,
                "activity_source": "caller",
                "nuclide": "Lu-177",
                "nuclide_source": "caller",
                "radiopharmaceutical": None,
                "radiopharmaceutical_source": None,
            },
        },
        "reference_timepoint": 0,
        "timepoints": [],
        "methods": {
            "quantification": "bqml-units",
            "fit": "auto",
            "voxel_tia": "voxel-wise exponential",
            "dose": "dvk",
            "medium": "soft-tissue",
            "kernel_id": None,
            "kernel_density_g_cm3": None,
            "dose_grid": "reference SPECT grid, CT frame of reference",
            "voi_source": "RTSTRUCT 1.2.3",
        },
        "vois": {},
        "marrow": {"image_based": None, "blood_based": None},
        "cumulative": {
            "cycles": [
                {
                    "number": number,
                    "date": injection.date().isoformat(),
                    "activity_MBq": activity_mbq,
                    "kidney_gy": kidney_gy,
                    "kidney_bed_gy": kidney_bed_gy,
                    "marrow_gy": marrow_gy,
                }
            ],
            "total": {
                "dose_gy": {k: v for k, v in (("kidney", kidney_gy), ("marrow", marrow_gy)) if v is not None},
                "bed_gy": {} if kidney_bed_gy is None else {"kidney": kidney_bed_gy},
                "activity_MBq": activity_mbq,
            },
            "limits": {
                "kidney_gy": 23.0,
                "kidney_bed_gy": 28.0,
                "kidney_risk_factors": True,
                "marrow_gy": 2.0,
                "sources": {},
            },
            "planned_activity_MBq": 7400.0,
            "cycles_left": None,
            "notes": [],
            "kidney_figure": "the higher of the kidneys' mean absorbed doses",
            "estimated_earlier_cycles": [],
        },
        "warnings": [],
        "provenance": {
            "software": {"voxeldose": "test"},
            "kernel_id": None,
            "nuclide": {"name": "Lu-177", "half_life_s": 574300.8, "data": "ICRP-107 (icrp107-database)"},
            "calibration": {"cps_per_mbq": None, "source": None, "applied": False},
            "inputs": {"series": [], "sop_instances": 0, "sop_instance_uids_sha256": "0" * 64},
            "spec": {"inputs": ["."]},
            "created_utc": "2026-01-01T00:00:00+00:00",
            "timings_s": {},
            "total_s": 0.0,
        },
    }
    if kidney_u_components_gy is not None and kidney_gy is not None:  # with the kidney dose's u (schema /3)
        u = sum(x * x for x in kidney_u_components_gy.values()) ** 0.5
        doc["cumulative"]["cycles"][0]["kidney_u"] = {
            "u_gy": u,
            "components_gy": kidney_u_components_gy,
            "source": "this cycle's EANM budget (stated components)",
        }
        doc["cumulative"]["uncertainty"] = {
            "method": "first-order propagation",
            "correlation_model": "one cycle",
            "coverage_factor": 2.0,
            "dose_gy": {
                "kidney": {"value": kidney_gy, "u": u, "lower_95": kidney_gy - 2 * u, "upper_95": kidney_gy + 2 * u}
            },
            "bed_gy": {},
            "not_stated": {},
        }
    Summary.model_validate(doc)  # a test must never lean on a summary the service would refuse
    return doc
