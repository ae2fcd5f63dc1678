"""DICOM ingest: classification, geometry, pixel meaning, times, injection, grouping, errors."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from dicom_factory import ct_series, nm_tomo, timepoint
from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import group_cycles, load_cycle, read_ct, read_spect, scan

INJ = datetime(2026, 1, 5, 9, 30)


def test_two_timepoints_grouped_into_one_cycle(tmp_path):
    timepoint(tmp_path / "a", 24.0)
    timepoint(tmp_path / "b", 4.0, seed=1)
    cycle = load_cycle(tmp_path)
    assert [round(tp.hours_after_injection, 6) for tp in cycle.timepoints] == [4.0, 24.0]
    assert cycle.injection.activity_bq == pytest.approx(7.4e9)  # 7400 MBq in the NM object
    assert cycle.injection.nuclide == "Lu-177"
    assert cycle.injection.start == INJ
    assert "RadiopharmaceuticalStartDateTime" in cycle.injection.start_source
    assert all(tp.ct is not None for tp in cycle.timepoints)
    assert "AcquisitionDate" in cycle.timepoints[0].acquisition_source


def test_nm_geometry_and_counts(tmp_path):
    counts = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    nm_tomo(tmp_path / "nm.dcm", counts, ipp=(-100, -80, -50), spacing=(4.0, 3.0), slice_spacing=5.0)
    series = scan(tmp_path).by_kind("spect")[0]
    img = read_spect(series)
    # voxel (i=2, j=1, k=2): x = -100 + 2*3.0 (column spacing), y = -80 + 1*4.0 (row spacing), z = -50 + 2*5
    assert np.allclose(img.volume.index_to_world([2, 1, 2]), [-94.0, -76.0, -40.0])
    assert np.array_equal(img.volume.array, counts)
    assert img.pixel_mode == "counts" and img.volume.units == "counts"
    assert img.acquisition_duration_s == pytest.approx(40.0 * 60)
    assert img.total_counts == counts.sum()


def test_nm_negative_spacing_means_slices_against_normal(tmp_path):
    nm_tomo(tmp_path / "nm.dcm", np.ones((3, 2, 2)), ipp=(0, 0, 0), slice_spacing=-4.0)
    img = read_spect(scan(tmp_path).by_kind("spect")[0])
    assert np.allclose(img.volume.index_to_world([0, 0, 2]), [0, 0, -8.0])


def test_rwvm_and_units_bqml(tmp_path):
    raw = np.full((2, 3, 3), 1000)
    nm_tomo(tmp_path / "a" / "nm.dcm", raw, rwvm_slope=2.5)
    nm_tomo(tmp_path / "b" / "nm.dcm", raw, units="BQML", rescale_slope=0.5)
    a = read_spect(scan(tmp_path / "a").by_kind("spect")[0])
    b = read_spect(scan(tmp_path / "b").by_kind("spect")[0])
    assert a.pixel_mode == "bqml-rwvm" and np.allclose(a.volume.array, 2500.0) and a.volume.units == "Bq/ml"
    assert b.pixel_mode == "bqml-units" and np.allclose(b.volume.array, 500.0)


def test_ct_sorted_along_normal_with_hu(tmp_path):
    hu = np.stack([np.full((4, 5), v, dtype=np.int16) for v in (-1000, 0, 40, 1000)])
    ct_series(tmp_path, hu, ipp0=(0, 0, 100), slice_vector=(0, 0, -2.5))  # towards the feet
    vol = read_ct(scan(tmp_path).by_kind("ct")[0])
    # sorted by position along +z: the last-written slice (z = 92.5) comes first
    assert np.allclose(vol.index_to_world([0, 0, 0]), [0, 0, 92.5])
    assert np.allclose(vol.array[:, 0, 0], [1000, 40, 0, -1000])
    assert vol.units == "HU"


def test_inconsistent_ct_spacing_is_an_error(tmp_path):
    hu = np.zeros((4, 4, 4), dtype=np.int16)
    ct_series(tmp_path / "CT", hu, z_positions=[0.0, 2.5, 5.0, 10.0])
    nm_tomo(tmp_path / "NM" / "nm.dcm", np.ones((2, 2, 2)), for_uid=scan(tmp_path / "CT").by_kind("ct")[0].frame_of_reference_uid)
    with pytest.raises(VoxeldoseError, match=r"inconsistent slice spacing.*ImagePositionPatient \(0020,0032\)"):
        load_cycle(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"with_orientation": False}, r"missing orientation.*ImageOrientationPatient \(0020,0037\)"),
        ({"injection_time_only": True}, r"only the time of injection.*RadiopharmaceuticalStartTime \(0018,1072\)"),
        ({"activity_mbq": None}, r"injected activity is missing.*RadionuclideTotalDose \(0018,1074\)"),
        ({"activity_mbq": 7.4e9}, r"not a plausible therapeutic activity.*wrong units"),
        ({"nuclide_meaning": "^90^Yttrium"}, r"unsupported nuclide '\^90\^Yttrium'"),
        ({"nuclide_meaning": None}, r"radionuclide is not given"),
        ({"acquisition": None}, r"acquisition time is missing.*AcquisitionDateTime \(0008,002A\)"),
    ],
)
def test_missing_or_wrong_header_is_a_clear_error(tmp_path, kwargs, pattern):
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)), **kwargs)
    with pytest.raises(VoxeldoseError, match=pattern) as info:
        load_cycle(tmp_path)
    assert str(tmp_path / "nm.dcm") in str(info.value)


def test_caller_overrides_are_recorded(tmp_path):
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)), injection_time_only=True, activity_mbq=None)
    c = load_cycle(tmp_path, injection_start=INJ, activity_bq=7.2e9)
    assert c.injection.start_source == "caller" and c.injection.activity_source == "caller"
    assert c.timepoints[0].hours_after_injection == pytest.approx(24.5)


def test_acquisition_datetime_preferred(tmp_path):
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)), acquisition=datetime(2026, 1, 9, 9, 30), acquisition_as_datetime=True)
    tp = load_cycle(tmp_path).timepoints[0]
    assert tp.hours_after_injection == pytest.approx(96.0)
    assert tp.acquisition_source.startswith("AcquisitionDateTime")


def test_mixed_patients_is_an_error(tmp_path):
    timepoint(tmp_path / "a", 4.0, patient_id="P1")
    timepoint(tmp_path / "b", 24.0, patient_id="P2")
    with pytest.raises(VoxeldoseError, match=r"mixed patients.*'P1'.*'P2'"):
        load_cycle(tmp_path)


def test_duplicates_are_read_once(tmp_path):
    timepoint(tmp_path / "a", 4.0)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    index = scan(tmp_path)
    assert sum(len(s.instances) for s in index.series.values()) == 1 + 12
    assert any("duplicate SOPInstanceUID" in p.message and p.severity == "info" for p in index.problems)
    assert len(load_cycle(index).timepoints) == 1


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    nm_tomo(tmp_path / "good.dcm", np.ones((4, 8, 8)))
    data = (tmp_path / "good.dcm").read_bytes()
    files = {
        "truncated": tmp_path / "truncated.dcm",
        "random": tmp_path / "random.dcm",
        "text": tmp_path / "notes.txt",
    }
    files["truncated"].write_bytes(data[: len(data) - 100])
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["text"].write_text("this is not DICOM\n")
    return files


@pytest.mark.parametrize(("which", "pattern"), [
    ("truncated", r"truncated.*PixelData \(7FE0,0010\)"),
    ("random", r"not a DICOM file"),
    ("text", r"not a DICOM file"),
])
def test_broken_files_named_explicitly_are_errors(tmp_path, which, pattern):
    path = _broken_files(tmp_path)[which]
    with pytest.raises(VoxeldoseError, match=pattern) as info:
        load_cycle([path])
    assert str(path) in str(info.value)


def test_non_dicom_in_a_folder_is_skipped_with_a_note(tmp_path):
    timepoint(tmp_path / "tp", 4.0)
    (tmp_path / "README.txt").write_text("notes")
    index = scan(tmp_path)
    assert any(p.severity == "info" and "non-DICOM" in p.message for p in index.problems)
    assert len(load_cycle(index).timepoints) == 1


def test_spect_without_ct_is_a_warning_not_an_error(tmp_path):
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)))
    cycles, problems = group_cycles(scan(tmp_path))
    assert cycles[0].timepoints[0].ct is None
    assert any(p.severity == "warning" and "no CT" in p.message for p in problems)


def test_per_slice_nm_storage(tmp_path):
    """Vendors' per-slice storage: one single-frame NM object per slice, position per slice."""
    import pydicom

    counts = np.arange(4 * 3 * 2).reshape(4, 3, 2)
    series_uid, for_uid = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    for k in [2, 0, 3, 1]:  # written out of order
        ds = nm_tomo(tmp_path / f"s{k}.dcm", counts[k : k + 1], series_uid=series_uid, for_uid=for_uid,
                     study_uid="1.2.826.0.1.3680043.8.498.3", ipp=(0.0, 0.0, 10.0 + 3.0 * k), slice_spacing=3.0)
        ds = pydicom.dcmread(tmp_path / f"s{k}.dcm")
        ds.ImagePositionPatient = ds.DetectorInformationSequence[0].ImagePositionPatient
        ds.ImageOrientationPatient = ds.DetectorInformationSequence[0].ImageOrientationPatient
        ds.save_as(tmp_path / f"s{k}.dcm")
    img = read_spect(scan(tmp_path).by_kind("spect")[0])
    assert np.array_equal(img.volume.array, counts)
    assert np.allclose(img.volume.index_to_world([0, 0, 3]), [0, 0, 19.0])
