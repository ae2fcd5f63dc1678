"""SEG of the VOIs on the reference CT and the TID 1500 dose SR (voxeldose.sr, outputs.write_pacs_objects)."""

from __future__ import annotations

import json

import highdicom as hd
import pydicom
import pytest
from support import dciodvfy_errors

from voxeldose.ingest import scan
from voxeldose.outputs import write_pacs_objects
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run
from voxeldose.sr import (
    MEASUREMENTS,
    SR_SERIES_DESCRIPTION,
    measurement_key,
    sr_measurements,
    sr_uncertainty,
)
from voxeldose.voi import read_seg


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sr")
    write_phantom(tmp, PhantomSettings.small())
    truth = json.loads((tmp / "truth" / "truth.json").read_text())
    result = run({"inputs": [str(tmp / "dicom")], "calibration": {"cps_per_mbq": truth["calibration_cps_per_mbq"]}})
    paths = write_pacs_objects(result, tmp / "out")
    return result, paths


def test_files_written(pacs) -> None:
    _, paths = pacs
    assert set(paths) == {"seg", "sr"}
    assert paths["seg"].name == "seg.dcm" and paths["sr"].name == "sr.dcm"
    assert not list(paths["seg"].parent.glob(".*.tmp"))


@pytest.mark.parametrize("which", ["seg", "sr"])
def test_dciodvfy_clean(pacs, dciodvfy_exe: str, which: str) -> None:
    _, paths = pacs
    assert dciodvfy_errors(dciodvfy_exe, paths[which]) == []


def test_seg_references_ct_and_joins_its_study(pacs) -> None:
    result, paths = pacs
    seg = pydicom.dcmread(paths["seg"])
    ct = result.reference.ct
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == ct.study_instance_uid
    assert seg.PatientID == ct.patient_id
    assert seg.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert [str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence] == [ct.series_instance_uid]
    ct_sops = {inst.sop_instance_uid for inst in ct.instances}
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= ct_sops and referenced
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert str(src.ReferencedSOPInstanceUID) in ct_sops


def test_seg_volumes_match_run(pacs) -> None:
    result, paths = pacs
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(paths["seg"]))
    labels = [str(seg.get_segment_description(n).SegmentLabel) for n in seg.segment_numbers]
    assert set(labels) == set(result.vois)
    series = next(s for s in scan([paths["seg"]]).by_kind("seg"))
    back = read_seg(series, result.dose.grid)
    checked = 0
    for name, voi in result.vois.items():
        if voi.volume_ml < 5.0:
            continue
        assert back[name].volume_ml == pytest.approx(voi.volume_ml, rel=0.03), name
        checked += 1
    assert checked >= 5


def test_sr_values_equal_summary(pacs) -> None:
    result, paths = pacs
    sr = pydicom.dcmread(paths["sr"])
    summary = json.loads(result.summary.to_json())  # as summary.json has it
    got = sr_measurements(sr)
    assert set(got) == set(summary["vois"])  # every VOI has a group
    for name, entry in summary["vois"].items():
        for key in MEASUREMENTS:
            if entry.get(key) is None:
                assert measurement_key(key) not in got[name], (name, key)
                continue
            assert got[name][measurement_key(key)] == pytest.approx(float(entry[key]), rel=1e-12), (name, key)
        for key in ("mean_gy", "volume_ml", "gy_per_gbq"):
            assert measurement_key(key) in got[name], (name, key)
    kidney = next(n for n, e in result.summary.vois.items() if e.role == "kidney")
    assert measurement_key("bed_gy") in got[kidney] and measurement_key("eqd2_gy") in got[kidney]


def test_sr_structure_and_references(pacs) -> None:
    result, paths = pacs
    sr = pydicom.dcmread(paths["sr"])
    seg = pydicom.dcmread(paths["seg"])
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == result.reference.ct.study_instance_uid
    assert sr.PatientID == seg.PatientID
    # TID 1500 root
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodingSchemeDesignator, title.CodeValue) == ("DCM", "126000")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # evidence: the SEG
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ev.SeriesInstanceUID == seg.SeriesInstanceUID
    assert ev.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    # each group references its segment in the SEG by number and label
    parsed = hd.sr.srread(paths["sr"])
    groups = parsed.content.get_volumetric_roi_measurement_groups()
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    assert len(groups) == len(result.summary.vois)
    ct_series = result.reference.ct.series_instance_uid
    for g in groups:
        ref = g.referenced_segment
        assert ref is not None, g.tracking_identifier
        item = ref[0].ReferencedSOPSequence[0]  # the IMAGE item "Referenced Segment"
        assert item.ReferencedSOPClassUID == seg.SOPClassUID
        assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(item.ReferencedSegmentNumber) == numbers[g.tracking_identifier]
        assert ref.source_series_for_segmentation.value == ct_series
    # device observer and version
    flat = json.dumps(sr.to_json_dict())
    assert "voxeldose" in flat and result.summary.provenance.software["voxeldose"] in flat


def test_vois_on_ct_fallback_resamples_dose_grid_vois(pacs) -> None:
    """Without the VOI series (voi_source unknown) each dose-grid VOI is resampled onto the CT
    (nearest neighbour of its occupancy, >= 0.5): coarse (7.2 mm voxels), so 15 % for VOIs >= 5 ml."""
    import dataclasses

    from voxeldose.sr import vois_on_ct

    result, _ = pacs
    methods = result.summary.methods.model_copy(update={"voi_source": ""})
    masks = vois_on_ct(dataclasses.replace(result, summary=result.summary.model_copy(update={"methods": methods})))
    ct_ml = result.ct.grid.voxel_volume_ml
    big = [n for n, v in result.vois.items() if v.volume_ml >= 5.0]
    assert set(big) <= set(masks) <= set(result.vois)
    for name in big:
        assert masks[name].shape == result.ct.shape
        assert float(masks[name].sum()) * ct_ml == pytest.approx(result.vois[name].volume_ml, rel=0.15), name


def test_sr_attaches_the_measurement_uncertainty_to_each_dose(pacs) -> None:
    """Issue 13 part 4: every dose with a stated u (mean, BED, EQD2) carries TID 310 measurement uncertainty — CID 225
    SCT 371886008 / 371885007 ± U = k·u in Gy — and u; read back with pydicom and with highdicom."""
    result, paths = pacs
    sr = pydicom.dcmread(paths["sr"])
    got = sr_uncertainty(sr)
    checked = 0
    for name, entry in result.summary.vois.items():
        budget = entry.uncertainty
        if budget is None or budget.mean_gy.u is None:
            assert name not in got or measurement_key("mean_gy") not in got[name], name  # never invented
            continue
        k = budget.coverage_factor
        assert k == 2.0
        for key in ("mean_gy", "bed_gy", "eqd2_gy"):
            vu = getattr(budget, key)
            if vu is None or vu.u is None:
                continue
            props = got[name][measurement_key(key)]
            assert props["upper"] == pytest.approx(2.0 * vu.u, rel=1e-9), (name, key)
            assert props["lower"] == pytest.approx(2.0 * vu.u, rel=1e-9), (name, key)
            assert props["u"] == pytest.approx(vu.u, rel=1e-9), (name, key)
            checked += 1
        # no uncertainty on the doses without a model (max, D-values)
        assert measurement_key("max_gy") not in got[name] and measurement_key("D2_gy") not in got[name]
    kidneys = [n for n, e in result.summary.vois.items() if e.role == "kidney"]
    assert kidneys and all(measurement_key("mean_gy") in got[n] for n in kidneys)
    assert checked >= len(kidneys) * 3  # each kidney's mean, BED and EQD2
    # highdicom reads the same items as the mean dose's properties, in Gy
    parsed = hd.sr.srread(paths["sr"])
    group = next(
        g for g in parsed.content.get_volumetric_roi_measurement_groups() if g.tracking_identifier == kidneys[0]
    )
    mean = next(
        m
        for m in group.get_measurements(name=hd.sr.CodedConcept("128513", "DCM", "Absorbed Dose"))
        if m.derivation is not None and m.derivation.value == "373098007"
    )
    upper = [p for p in mean[0].ContentSequence if p.ConceptNameCodeSequence[0].CodeValue == "371886008"]
    assert len(upper) == 1 and upper[0].RelationshipType == "HAS PROPERTIES"
    assert upper[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "Gy"
    u_mean = result.summary.vois[kidneys[0]].uncertainty.mean_gy.u
    assert float(upper[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(2.0 * u_mean, rel=1e-6)
