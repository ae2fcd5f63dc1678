"""DICOM ingest: classification, geometry, pixel meaning, times, injection, grouping, errors."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import ct_series, nm_tomo, timepoint
from pydicom.dataelem import DataElement

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


def test_ct_slice_of_another_size_is_an_error_naming_the_sizes(tmp_path):
    hu = np.zeros((4, 4, 5), dtype=np.int16)
    ct_series(tmp_path, hu, ipp0=(0, 0, 0), slice_vector=(0, 0, 2.5))
    odd = sorted(tmp_path.rglob("*.dcm"))[2]
    ds = pydicom.dcmread(odd)
    ds.Rows, ds.Columns = 3, 3
    ds.PixelData = np.zeros((3, 3), dtype=np.int16).tobytes()
    ds.save_as(odd)
    with pytest.raises(VoxeldoseError, match=r"CT slices have different sizes") as err:
        read_ct(scan(tmp_path).by_kind("ct")[0])
    assert "(3, 3)" in str(err.value) and "(4, 5)" in str(err.value)
    assert "Rows (0028,0010)" in str(err.value)


def test_inconsistent_ct_spacing_is_an_error(tmp_path):
    hu = np.zeros((4, 4, 4), dtype=np.int16)
    ct_series(tmp_path / "CT", hu, z_positions=[0.0, 2.5, 5.0, 10.0])
    nm_tomo(
        tmp_path / "NM" / "nm.dcm",
        np.ones((2, 2, 2)),
        for_uid=scan(tmp_path / "CT").by_kind("ct")[0].frame_of_reference_uid,
    )
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
    nm_tomo(
        tmp_path / "nm.dcm", np.ones((2, 2, 2)), acquisition=datetime(2026, 1, 9, 9, 30), acquisition_as_datetime=True
    )
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


@pytest.mark.parametrize(
    ("which", "pattern"),
    [
        ("truncated", r"truncated.*PixelData \(7FE0,0010\)"),
        ("random", r"not a DICOM file"),
        ("text", r"not a DICOM file"),
    ],
)
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
        ds = nm_tomo(
            tmp_path / f"s{k}.dcm",
            counts[k : k + 1],
            series_uid=series_uid,
            for_uid=for_uid,
            study_uid="1.2.826.0.1.3680043.8.498.3",
            ipp=(0.0, 0.0, 10.0 + 3.0 * k),
            slice_spacing=3.0,
        )
        ds = pydicom.dcmread(tmp_path / f"s{k}.dcm")
        ds.ImagePositionPatient = ds.DetectorInformationSequence[0].ImagePositionPatient
        ds.ImageOrientationPatient = ds.DetectorInformationSequence[0].ImageOrientationPatient
        ds.save_as(tmp_path / f"s{k}.dcm")
    img = read_spect(scan(tmp_path).by_kind("spect")[0])
    assert np.array_equal(img.volume.array, counts)
    assert np.allclose(img.volume.index_to_world([0, 0, 3]), [0, 0, 19.0])


# ------------------------------------------------------------------------------ SliceVector
def test_slice_vector_puts_each_frame_at_its_slice_number(tmp_path):
    """PS3.3 C.8.4.8.1: frame f holds slice SliceVector[f].  Frames are written rotated (frame 0 is slice 2,
    ..., frame 3 is slice 1); each frame is filled with 10 × its slice number, so slice s (0-based) of the
    volume must hold 10·(s + 1) and lie at z = −50 + 5·s mm."""
    sv = [2, 3, 4, 1]
    frames = np.stack([np.full((2, 3), 10 * n) for n in sv])
    nm_tomo(tmp_path / "nm.dcm", frames, ipp=(0.0, 0.0, -50.0), slice_spacing=5.0, slice_vector=sv)
    img = read_spect(scan(tmp_path).by_kind("spect")[0])
    for s in range(4):
        assert np.all(img.volume.array[s] == 10 * (s + 1)), s
        assert np.allclose(img.volume.index_to_world([0, 0, s]), [0.0, 0.0, -50.0 + 5.0 * s])


@pytest.mark.parametrize("sv", [[1, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 5]])
def test_slice_vector_not_a_permutation_is_an_error(tmp_path, sv):
    nm_tomo(tmp_path / "nm.dcm", np.ones((4, 2, 2)), slice_vector=sv)
    with pytest.raises(VoxeldoseError, match=r"SliceVector is not a permutation.*SliceVector \(0054,0080\)") as info:
        load_cycle(tmp_path)
    assert str(tmp_path / "nm.dcm") in str(info.value)


# ------------------------------------------------------------------------------ RT Dose frames
def _rtdose(path: Path, offsets, *, ipp=(-100.0, -80.0, -40.0), iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)) -> None:
    from dicom_factory import _base, _pixels
    from pydicom.uid import RTDoseStorage, generate_uid

    n = len(offsets)
    ds = _base(str(RTDoseStorage), "P1", generate_uid(), generate_uid(), generate_uid(), "RTDOSE")
    ds.ImagePositionPatient = list(ipp)
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = [2.0, 2.0]
    ds.NumberOfFrames = n
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = [float(v) for v in offsets]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = 0.01
    _pixels(ds, np.stack([np.full((3, 4), 100 * (k + 1)) for k in range(n)]).astype(np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("offsets", "z_expected"),
    [
        # PS3.3 C.8.8.3.2 a) relative: first 0, frame k at IPP_z + offset_k
        ([0.0, 3.0, 6.0, 9.0], [-40.0, -37.0, -34.0, -31.0]),
        # b) absolute: the z coordinates themselves, the first equal to IPP_z
        ([-40.0, -37.0, -34.0, -31.0], [-40.0, -37.0, -34.0, -31.0]),
        # absolute, frames towards the feet
        ([-40.0, -43.0, -46.0], [-40.0, -43.0, -46.0]),
        # relative, frames towards the feet
        ([0.0, -3.0, -6.0], [-40.0, -43.0, -46.0]),
    ],
)
def test_rtdose_grid_frame_offsets_relative_and_absolute(tmp_path, offsets, z_expected):
    from voxeldose.ingest import read_rtdose

    _rtdose(tmp_path / "rd.dcm", offsets)
    vol = read_rtdose(scan(tmp_path).by_kind("rtdose")[0])
    for k, z in enumerate(z_expected):
        # voxel (i=1, j=2, k): x = −100 + 1·2, y = −80 + 2·2, z from the offsets; stored 100·(k+1) × 0.01 Gy
        assert np.allclose(vol.index_to_world([1, 2, k]), [-98.0, -76.0, z]), (k, vol.index_to_world([1, 2, k]))
        assert np.allclose(vol.array[k], k + 1.0)


def test_rtdose_offsets_neither_relative_nor_absolute_is_an_error(tmp_path):
    from voxeldose.ingest import read_rtdose

    _rtdose(tmp_path / "rd.dcm", [5.0, 8.0, 11.0])  # IPP z = −40: neither 0 nor −40
    with pytest.raises(VoxeldoseError, match=r"GridFrameOffsetVector \(3004,000C\)") as info:
        read_rtdose(scan(tmp_path).by_kind("rtdose")[0])
    assert str(tmp_path / "rd.dcm") in str(info.value)


# ------------------------------------------------------------------------------ time zones
def _set_times(
    path: Path, *, injection_dt: str | None = None, acquisition_dt: str | None = None, tz: str | None = None
) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    if injection_dt is not None:
        ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = injection_dt
    if acquisition_dt is not None:
        ds.AcquisitionDateTime = acquisition_dt
    if tz is not None:
        ds.TimezoneOffsetFromUTC = tz
    ds.save_as(path)


def test_timezone_offset_from_utc_is_recorded_and_times_stay_local(tmp_path):
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)))  # injection 2026-01-05 09:30, acquisition 2026-01-06 10:00
    _set_times(tmp_path / "nm.dcm", tz="+0100")
    c = load_cycle(tmp_path)
    assert c.injection.start == INJ and c.injection.start.tzinfo is None
    assert c.injection.utc_offset == "+0100" and "TimezoneOffsetFromUTC (0008,0201)" in c.injection.utc_offset_source
    tp = c.timepoints[0]
    assert tp.utc_offset == "+0100" and tp.acquisition.tzinfo is None
    assert tp.hours_after_injection == pytest.approx(24.5)
    assert c.summary()["injection"]["utc_offset"] == "+0100"


def test_explicit_dt_offsets_are_recorded_not_applied(tmp_path):
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)))
    # both in CET (+0100): 09:30 → next day 10:00 is 24.5 h whatever the zone
    _set_times(tmp_path / "nm.dcm", injection_dt="20260105093000+0100", acquisition_dt="20260106100000.000000+0100")
    c = load_cycle(tmp_path)
    assert c.injection.start == INJ and c.injection.utc_offset == "+0100"
    assert "RadiopharmaceuticalStartDateTime (0018,1078)" in c.injection.utc_offset_source
    assert c.timepoints[0].utc_offset == "+0100"
    assert c.timepoints[0].hours_after_injection == pytest.approx(24.5)


@pytest.mark.parametrize("tz", [None, "+0100"])
def test_injection_and_acquisition_in_different_offsets_is_an_error(tmp_path, tz):
    """Injection 2026-03-27 09:30 CET (+0100), scan 2026-03-30 10:00 CEST (+0200), across the EU daylight-saving
    change of 29 March 2026: 71.5 h elapsed, but the local times differ by 72.5 h.  An explicit DT offset
    overrides TimezoneOffsetFromUTC (PS3.3 C.12.1.1.8)."""
    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)))
    _set_times(tmp_path / "nm.dcm", injection_dt="20260327093000+0100", acquisition_dt="20260330100000+0200", tz=tz)
    with pytest.raises(
        VoxeldoseError, match=r"different UTC offsets.*\+0100.*\+0200.*AcquisitionDateTime \(0008,002A\)"
    ):
        load_cycle(tmp_path)


def test_time_points_in_different_offsets_is_an_error(tmp_path):
    timepoint(tmp_path / "a", 4.0)
    timepoint(tmp_path / "b", 24.0, seed=1)
    _set_times(tmp_path / "a" / "NM" / "spect.dcm", tz="+0100")
    _set_times(tmp_path / "b" / "NM" / "spect.dcm", tz="+0200")
    with pytest.raises(VoxeldoseError, match=r"different UTC offsets.*TimezoneOffsetFromUTC \(0008,0201\)"):
        load_cycle(tmp_path, injection_start=INJ)  # the caller's injection has no offset; the scans still differ


AWARE = datetime.fromisoformat("2026-01-05T09:30+01:00")


def test_tz_aware_caller_injection_is_rejected(tmp_path):
    import pydicom

    from voxeldose.ingest import injection_from_header

    nm_tomo(tmp_path / "nm.dcm", np.ones((2, 2, 2)))
    with pytest.raises(VoxeldoseError, match="without a UTC offset, as DICOM stores it"):
        load_cycle(tmp_path, injection_start=AWARE)
    with pytest.raises(VoxeldoseError, match="without a UTC offset, as DICOM stores it"):
        injection_from_header(pydicom.dcmread(tmp_path / "nm.dcm"), tmp_path / "nm.dcm", start=AWARE)
    uid = scan(tmp_path).by_kind("spect")[0].series_instance_uid
    with pytest.raises(VoxeldoseError, match="without a UTC offset, as DICOM stores it"):
        load_cycle(tmp_path, acquisition_times={uid: datetime.fromisoformat("2026-01-06T10:00+01:00")})
    # the same instant without the offset is what DICOM holds: accepted
    assert load_cycle(tmp_path, injection_start=AWARE.replace(tzinfo=None)).injection.start == INJ


def test_spec_injection_datetime_must_be_naive():
    from pydantic import ValidationError

    from voxeldose.spec import InjectionOverride, JobSpec

    with pytest.raises(ValidationError, match="without a UTC offset, as DICOM stores it"):
        InjectionOverride(datetime="2026-01-05T09:30+01:00")
    with pytest.raises(ValidationError, match="without a UTC offset, as DICOM stores it"):
        JobSpec.model_validate({"inputs": ["x"], "injection": {"datetime": "2026-01-05T09:30:00Z"}})
    assert InjectionOverride(datetime="2026-01-05T09:30").datetime == INJ


# ------------------------------------------------------------------ fuzzed headers (issue 14, defect 8)
def _with_image_type(tmp_path: Path, name: str, vr: str, value: object) -> Path:
    """A SPECT file whose ImageType (0008,0008) is written with ``vr`` (explicit VR, so the VR is in the file)."""
    nm_tomo(tmp_path / "good.dcm", np.ones((4, 8, 8)))
    ds = pydicom.dcmread(tmp_path / "good.dcm")
    ds.add(DataElement(0x00080008, vr, value))
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_integer_image_type_is_a_problem_of_the_file(tmp_path):
    path = _with_image_type(tmp_path, "int.dcm", "US", 7)
    index = scan([path])  # no TypeError
    [problem] = index.errors
    assert problem.path == str(path) and problem.tag == "ImageType (0008,0008)"
    assert "expected VR CS" in problem.message and "found 'VR US'" in problem.message
    assert not index.series
    with pytest.raises(VoxeldoseError, match=r"ImageType \(0008,0008\)"):
        load_cycle([path])


def test_a_value_of_the_wrong_length_is_a_problem_of_the_file(tmp_path):
    # FD values are 8 bytes: write a 4-byte FL value, then relabel its VR as FD in the file
    path = _with_image_type(tmp_path, "badlen.dcm", "FL", 1.0)
    raw = path.read_bytes()
    at = raw.index(b"\x08\x00\x08\x00FL")
    path.write_bytes(raw[: at + 4] + b"FD" + raw[at + 6 :])
    index = scan([path])  # no ValueError (pydicom's BytesLengthException)
    [problem] = index.errors
    assert problem.path == str(path) and problem.tag == "ImageType (0008,0008)"
    assert "expected a valid FD value" in problem.message and "4 bytes" in problem.message
    # a second, readable file beside it is still indexed
    good = tmp_path / "good.dcm"
    index = scan([good, path])
    assert [s.kind for s in index.series.values()] == ["spect"] and len(index.errors) == 1
