"""summary.json as a contract: the committed JSON Schema is the one the models generate, every summary the
pipeline writes follows it, and a renamed field is refused by the model and by the schema alike."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from voxeldose.errors import VoxeldoseError
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run, write_outputs
from voxeldose.sr import MEASUREMENTS
from voxeldose.summary import SCHEMA_PATH, SCHEMA_VERSION, Summary, VoiMetrics, json_schema, json_schema_text

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / SCHEMA_PATH


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMMITTED.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _schema_errors(doc: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]


def test_committed_schema_is_the_generated_one() -> None:
    """docs/summary.schema.json is rewritten by ``python -m voxeldose.summary`` after a model change."""
    assert COMMITTED.read_text() == json_schema_text(), "run: python -m voxeldose.summary"
    assert json.loads(COMMITTED.read_text()) == json_schema()
    assert json_schema()["properties"]["schema"]["const"] == SCHEMA_VERSION


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Summary, Path]:
    """The small phantom through the pipeline, with blood samples and earlier cycles (one without
    dosimetry) so that the optional parts — blood-based marrow, estimated cycles — are written too."""
    root = tmp_path_factory.mktemp("summary")
    write_phantom(root, PhantomSettings.small())
    truth = json.loads((root / "truth" / "truth.json").read_text())
    samples = [{"hours_after_injection": h, "bq_per_ml": 500.0 * math.exp(-h / 60)} for h in (4, 24, 96)]
    result = run(
        {
            "inputs": [str(root / "dicom")],
            "calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"], "source": "phantom"},
            "marrow": {"blood_samples": samples},
            "earlier_cycles": [{"number": 1, "activity_mbq": 7400, "kidney_gy": 4.0}],
            "cycle_number": 2,
        }
    )
    paths = write_outputs(result, root / "out")
    return result.summary, paths["summary"]


def test_written_summary_validates_against_the_committed_schema(written: tuple[Summary, Path]) -> None:
    summary, path = written
    doc = json.loads(path.read_text())
    assert _schema_errors(doc) == []
    assert doc["schema"] == SCHEMA_VERSION
    # the optional parts this job asked for are there, and were checked above
    assert doc["marrow"]["blood_based"] is not None and doc["cumulative"]["estimated_earlier_cycles"] == [
        {
            "cycle": 1,
            "organ": "marrow",
            "dose_gy": pytest.approx(summary.cumulative.estimated_earlier_cycles[0].dose_gy),
        }
    ]
    assert "time_activity" in doc["vois"]["Kidney_L"] and "bed_gy" in doc["vois"]["Kidney_L"]


def test_load_round_trip(written: tuple[Summary, Path]) -> None:
    summary, path = written
    text = path.read_text()
    loaded = Summary.load(path)
    assert loaded.to_json() == text == summary.to_json()
    assert Summary.model_validate_json(text).to_json() == text
    # the earlier cycle's measured kidney dose is read as a number, never as "absent"
    assert [c.kidney_gy for c in loaded.cumulative.cycles][0] == 4.0


def test_summaries_written_earlier_in_this_session_validate(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every summary.json that the product wrote in tests of this session (this worker) before this one: the
    pipeline, CLI, demo and SR tests write theirs under the session's temporary root, always beside an RT Dose
    (``write_outputs``); a summary.json without one was made by a test (e.g. deliberately damaged)."""
    root = tmp_path_factory.getbasetemp()
    found = sorted(p for p in root.rglob("summary.json") if (p.parent / "rtdose.dcm").is_file())
    assert found  # at least the one of the fixture above
    for path in found:
        assert _schema_errors(json.loads(path.read_text())) == [], path


def _valid_dict(written: tuple[Summary, Path]) -> dict:
    return json.loads(written[1].read_text())


@pytest.mark.parametrize(
    "where",
    ["vois.Kidney_L.mean_gy", "cumulative.cycles.0.kidney_gy", "cycle.injection.activity_MBq"],
)
def test_a_renamed_field_is_refused(written: tuple[Summary, Path], where: str) -> None:
    """A renamed key (mean_gy → mean_Gy) must fail loudly: a reader such as the trigger would otherwise take
    a measured earlier-cycle kidney dose for a missing one."""
    doc = _valid_dict(written)
    *parents, key = where.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    renamed = key.replace("gy", "Gy") if key.endswith("gy") else key.lower()
    assert renamed != key
    node[renamed] = node.pop(key)
    errors = _schema_errors(doc)
    assert any(renamed in e for e in errors), errors  # additional property
    assert any(f"'{key}' is a required property" in e for e in errors), errors
    with pytest.raises(ValidationError) as err:
        Summary.model_validate(doc)
    kinds = {(e["type"], e["loc"][-1]) for e in err.value.errors()}
    assert ("extra_forbidden", renamed) in kinds and ("missing", key) in kinds


def test_an_unknown_schema_version_is_refused(written: tuple[Summary, Path], tmp_path: Path) -> None:
    doc = _valid_dict(written)
    doc["schema"] = "voxeldose.summary/9"
    assert _schema_errors(doc)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(VoxeldoseError) as err:
        Summary.load(path)
    assert err.value.tag == "schema" and err.value.path == str(path) and "voxeldose.summary/9" in str(err.value)


def _as_schema_1(doc: dict) -> dict:
    """A summary as schema /1 wrote it: no nuclide/radiopharmaceutical sources in the injection."""
    doc["schema"] = "voxeldose.summary/1"
    del doc["cycle"]["injection"]["nuclide_source"]
    del doc["cycle"]["injection"]["radiopharmaceutical_source"]
    return doc


def test_a_schema_1_summary_still_loads(written: tuple[Summary, Path], tmp_path: Path) -> None:
    """Results written before the typed model (schema /1) stay readable after an upgrade: the trigger takes an
    earlier cycle's measured kidney dose from them.  The missing sources say so; the doses are the same."""
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(_as_schema_1(_valid_dict(written))))
    old = Summary.load(path)
    assert old.schema_ == "voxeldose.summary/3"
    assert old.cycle.injection.nuclide_source == "not recorded (voxeldose.summary/1)"
    assert old.cycle.injection.radiopharmaceutical_source == "not recorded (voxeldose.summary/1)"
    assert old.vois == written[0].vois and old.cumulative == written[0].cumulative


def test_a_schema_1_summary_with_a_renamed_field_is_refused(written: tuple[Summary, Path], tmp_path: Path) -> None:
    doc = _as_schema_1(_valid_dict(written))
    doc["vois"]["Kidney_L"]["mean_Gy"] = doc["vois"]["Kidney_L"].pop("mean_gy")
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(VoxeldoseError) as err:
        Summary.load(path)
    assert "Kidney_L" in str(err.value.tag)


def test_non_finite_numbers_are_written_as_null(written: tuple[Summary, Path]) -> None:
    """JSON has no NaN: an undefined number is null, and null loads back (the field is float | None)."""
    broken = copy.deepcopy(written[0])
    broken.vois["Kidney_L"].D2cc_gy = float("nan")
    broken.vois["Kidney_L"].gy_per_gbq = float("inf")
    text = broken.to_json()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text)
    assert doc["vois"]["Kidney_L"]["D2cc_gy"] is None and doc["vois"]["Kidney_L"]["gy_per_gbq"] is None
    assert _schema_errors(doc) == []
    assert Summary.model_validate_json(text).vois["Kidney_L"].D2cc_gy is None


def test_every_sr_measurement_is_a_summary_field() -> None:
    """voxeldose.sr reads the VOI metrics it reports by field name: each name must be a VoiMetrics field."""
    assert set(MEASUREMENTS) <= set(VoiMetrics.model_fields)
