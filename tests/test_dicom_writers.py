"""Tests of voxeldose.scanner (NM, CT, contours, RTSTRUCT) and voxeldose.dicom_writers.write_seg: round trips,
hand-computed geometry, dciodvfy conformance.

Expected positions are written out from the grid definitions (origin, spacings, direction
cosines), not taken from the writers' output.
"""

from __future__ import annotations

import math
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from voxeldose import dicom_writers as dw
from voxeldose import scanner as sc
from voxeldose.geometry import Volume

FOR_UID = generate_uid()

# Axial grid: Δc (i) = 4 mm, Δr (j) = 3 mm, slices 5 mm, first voxel centre at (-30, -20, -10).
AXIAL = np.array(
    [
        [4.0, 0.0, 0.0, -30.0],
        [0.0, 3.0, 0.0, -20.0],
        [0.0, 0.0, 5.0, -10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
C30, S30 = math.cos(math.radians(30)), math.sin(math.radians(30))
# Oblique, flipped grid: X = (cos30, sin30, 0), Y = (-sin30, cos30, 0), slices go -5 mm along z.
OBLIQUE_FLIPPED = np.array(
    [
        [4.0 * C30, -3.0 * S30, 0.0, 10.0],
        [4.0 * S30, 3.0 * C30, 0.0, 20.0],
        [0.0, 0.0, -5.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (8, 16, 16)  # (k, j, i)


@pytest.fixture()
def ctx() -> sc.PatientStudy:
    return sc.PatientStudy(
        patient_id="VXD-001",
        patient_name="PHANTOM^LU177",
        patient_birth_date="19600101",
        patient_sex="M",
        study_instance_uid=generate_uid(),
        study_datetime=datetime(2024, 3, 1, 9, 0, 0),
        accession_number="ACC1",
        patient_weight_kg=75.5,
        patient_size_m=1.78,
    )


def _series(number: int, desc: str, when: datetime = datetime(2024, 3, 2, 10, 5, 0)) -> sc.SeriesInfo:
    return sc.SeriesInfo(generate_uid(), number, desc, FOR_UID, when)


INJ = sc.Injection("Lu-177", 7.4e9, datetime(2024, 3, 1, 11, 30, 15), "Lu-177-DOTATATE")
ACQ = sc.SpectAcquisition(frame_duration_ms=15000, frames_in_rotation=60, angular_step_deg=3.0)


def _counts(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 5000, SHAPE).astype(float)


def _nm_position(ds: pydicom.Dataset, f: int, r: int, c: int) -> np.ndarray:
    """LPS centre of frame f, row r, column c from the NM attributes only (PS3.3 C.8.4.8 / C.8.4.14)."""
    det = ds.DetectorInformationSequence[0]
    ipp = np.array(det.ImagePositionPatient, dtype=float)
    iop = np.array(det.ImageOrientationPatient, dtype=float)
    x, y = iop[:3], iop[3:]
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + c * dc * x + r * dr * y + f * float(ds.SpacingBetweenSlices) * np.cross(x, y)


# ------------------------------------------------------------------------------------------ NM


def test_nm_counts_axial_round_trip(tmp_path: Path, ctx: sc.PatientStudy) -> None:
    vol = Volume(_counts(), AXIAL, FOR_UID, "counts")
    series = _series(3, "SPECT counts")
    sc.write_nm_tomo(
        tmp_path / "nm.dcm",
        vol,
        ctx=ctx,
        series=series,
        injection=INJ,
        acquisition=ACQ,
        pixel_mode="counts",
    )
    ds = pydicom.dcmread(tmp_path / "nm.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.20"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    assert ds.Modality == "NM"
    assert ds.pixel_array.shape == SHAPE
    np.testing.assert_array_equal(ds.pixel_array, vol.array)
    assert ds.pixel_array.dtype == np.uint16
    assert "RescaleSlope" not in ds and "Units" not in ds and "RealWorldValueMappingSequence" not in ds
    assert ds.FrameIncrementPointer == pydicom.tag.Tag(0x0054, 0x0080)
    assert list(ds.SliceVector) == list(range(1, 9)) and ds.NumberOfSlices == 8
    assert ds.NumberOfFrames == 8
    assert [float(v) for v in ds.PixelSpacing] == [3.0, 4.0]  # [Δr, Δc]
    assert float(ds.SpacingBetweenSlices) == 5.0 and float(ds.SliceThickness) == 5.0
    assert ds.FrameOfReferenceUID == FOR_UID
    # voxel (i=7, j=5, k=3): (-30 + 7*4, -20 + 5*3, -10 + 3*5) = (-2, -5, 5)
    np.testing.assert_allclose(_nm_position(ds, 3, 5, 7), [-2.0, -5.0, 5.0], atol=1e-6)
    np.testing.assert_allclose(_nm_position(ds, 0, 0, 0), [-30.0, -20.0, -10.0], atol=1e-6)
    # dates and times
    assert (ds.AcquisitionDate, ds.AcquisitionTime) == ("20240302", "100500")
    assert ds.AcquisitionDateTime == "20240302100500"
    assert (ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime) == (
        "20240302",
        "100500",
        "20240302",
        "100500",
    )
    assert (ds.StudyDate, ds.StudyTime) == ("20240301", "090000")
    # patient / study / series
    assert str(ds.PatientName) == "PHANTOM^LU177" and ds.PatientID == "VXD-001"
    assert float(ds.PatientWeight) == 75.5 and float(ds.PatientSize) == 1.78
    assert ds.StudyInstanceUID == ctx.study_instance_uid and ds.AccessionNumber == "ACC1"
    assert ds.ReferringPhysicianName == ""
    assert ds.SeriesInstanceUID == series.series_instance_uid and ds.SeriesNumber == 3
    assert ds.Manufacturer == "voxeldose"
    # isotope
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    assert float(rp.RadionuclideTotalDose) == pytest.approx(7400.0)  # 7.4e9 Bq = 7400 MBq
    assert rp.RadiopharmaceuticalStartTime == "113015"
    assert rp.RadiopharmaceuticalStartDateTime == "20240301113015"
    code = rp.RadionuclideCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "447553000",
        "SCT",
        "^177^Lutetium",
    )
    assert rp.RadiopharmaceuticalCodeSequence[0].CodeValue == "781259000"
    win = ds.EnergyWindowInformationSequence[0]
    assert float(win.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit) == 187.5
    assert float(win.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit) == 229.2
    rot = ds.RotationInformationSequence[0]
    assert rot.ActualFrameDuration == 15000 and rot.NumberOfFramesInRotation == 60
    assert float(rot.AngularStep) == 3.0 and float(rot.ScanArc) == 180.0
    assert rot.RotationDirection in ("CW", "CC") and "StartAngle" in rot


def test_nm_oblique_flipped_geometry(tmp_path: Path, ctx: sc.PatientStudy) -> None:
    arr = _counts(1)
    vol = Volume(arr, OBLIQUE_FLIPPED, FOR_UID, "counts")
    sc.write_nm_tomo(
        tmp_path / "nm.dcm",
        vol,
        ctx=ctx,
        series=_series(3, "SPECT"),
        injection=INJ,
        acquisition=ACQ,
        pixel_mode="counts",
    )
    ds = pydicom.dcmread(tmp_path / "nm.dcm")
    n = SHAPE[0]

    def world(i: int, j: int, k: int) -> np.ndarray:  # by hand from the grid definition
        return np.array([10.0 + 4 * i * C30 - 3 * j * S30, 20.0 + 4 * i * S30 + 3 * j * C30, 30.0 - 5.0 * k])

    # NM has no per-frame position: frames must run along +X×Y = +z, i.e. slice k = n-1-f.
    for f, r, c in [(0, 0, 0), (2, 5, 7), (7, 15, 3), (4, 9, 12)]:
        k = n - 1 - f
        np.testing.assert_allclose(_nm_position(ds, f, r, c), world(c, r, k), atol=1e-4)
        assert ds.pixel_array[f, r, c] == arr[k, r, c]
    # first frame at z = 30 - 5*7 = -5
    np.testing.assert_allclose(np.array(ds.DetectorInformationSequence[0].ImagePositionPatient, dtype=float)[2], -5.0)


def test_nm_refuses_sheared_stack(tmp_path: Path, ctx: sc.PatientStudy) -> None:
    sheared = AXIAL.copy()
    sheared[0, 2] = 1.0  # slice vector (1, 0, 5) not along X × Y
    with pytest.raises(ValueError, match="parallel"):
        sc.write_nm_tomo(
            tmp_path / "nm.dcm",
            Volume(_counts(), sheared, FOR_UID),
            ctx=ctx,
            series=_series(3, "x"),
            injection=INJ,
            acquisition=ACQ,
            pixel_mode="counts",
        )


@pytest.mark.parametrize(
    "array, match",
    [
        (np.full(SHAPE, 70000.0), "uint16"),
        (np.full(SHAPE, 1.5), "integer"),
        (np.full(SHAPE, -1.0), "non-negative"),
    ],
)
def test_nm_counts_rejects_bad_counts(tmp_path: Path, ctx: sc.PatientStudy, array: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sc.write_nm_tomo(
            tmp_path / "nm.dcm",
            Volume(array, AXIAL, FOR_UID),
            ctx=ctx,
            series=_series(3, "x"),
            injection=INJ,
            acquisition=ACQ,
            pixel_mode="counts",
        )


@pytest.mark.parametrize("offset", [0.0, -250.0])
def test_nm_bqml_real_world_value_mapping(tmp_path: Path, ctx: sc.PatientStudy, offset: float) -> None:
    rng = np.random.default_rng(2)
    bqml = rng.random(SHAPE) * 12345.6 + offset
    bqml[0, 0, 0] = 12345.6  # the maximum, exactly
    vol = Volume(bqml, AXIAL, FOR_UID, "Bq/ml")
    sc.write_nm_tomo(
        tmp_path / "nm.dcm",
        vol,
        ctx=ctx,
        series=_series(3, "SPECT Bq/ml"),
        injection=INJ,
        acquisition=ACQ,
        pixel_mode="bqml",
    )
    ds = pydicom.dcmread(tmp_path / "nm.dcm")
    assert "RescaleSlope" not in ds and "Units" not in ds
    rwvm = ds.RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("Bq/ml", "UCUM")
    assert rwvm.LUTLabel
    assert rwvm.RealWorldValueFirstValueMapped == 0 and rwvm.RealWorldValueLastValueMapped == 65535
    value = ds.pixel_array.astype(float) * rwvm.RealWorldValueSlope + rwvm.RealWorldValueIntercept
    assert np.max(np.abs(value - bqml)) < 1e-4 * 12345.6


def test_nm_radionuclide_total_dose_is_mbq(tmp_path: Path, ctx: sc.PatientStudy) -> None:
    inj = sc.Injection("Lu-177", 6.85e9, datetime(2024, 2, 28, 23, 59, 59))
    ds = sc.write_nm_tomo(
        tmp_path / "nm.dcm",
        Volume(_counts(), AXIAL, FOR_UID),
        ctx=ctx,
        series=_series(3, "x"),
        injection=inj,
        acquisition=ACQ,
        pixel_mode="counts",
    )
    rp = pydicom.dcmread(tmp_path / "nm.dcm").RadiopharmaceuticalInformationSequence[0]
    assert float(rp.RadionuclideTotalDose) == pytest.approx(6850.0)
    assert rp.RadiopharmaceuticalStartDateTime == "20240228235959"  # the date survives
    assert ds.SOPInstanceUID == pydicom.dcmread(tmp_path / "nm.dcm").SOPInstanceUID


# ------------------------------------------------------------------------------------------ CT


@pytest.mark.parametrize("affine_name", ["axial", "oblique_flipped"])
def test_ct_series_round_trip(tmp_path: Path, ctx: sc.PatientStudy, affine_name: str) -> None:
    affine = AXIAL if affine_name == "axial" else OBLIQUE_FLIPPED
    hu = np.random.default_rng(3).uniform(-1024, 2000, SHAPE)
    series = _series(2, "CT")
    out = sc.write_ct_series(tmp_path / "ct", Volume(hu, affine, FOR_UID, "HU"), ctx=ctx, series=series)
    files = sorted((tmp_path / "ct").glob("CT_*.dcm"))
    assert [f.name for f in files] == [f"CT_{k:04d}.dcm" for k in range(1, 9)]
    assert [d.InstanceNumber for d in out] == list(range(1, 9))
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.SOPInstanceUID == out[k].SOPInstanceUID
        assert ds.SeriesInstanceUID == series.series_instance_uid and ds.FrameOfReferenceUID == FOR_UID
        stored_hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(stored_hu, np.rint(hu[k]))
        assert [float(v) for v in ds.PixelSpacing] == [3.0, 4.0]
        assert float(ds.SliceThickness) == 5.0
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        if affine_name == "axial":
            np.testing.assert_allclose(ipp, [-30.0, -20.0, -10.0 + 5.0 * k], atol=1e-6)
            np.testing.assert_allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-8)
        else:
            np.testing.assert_allclose(ipp, [10.0, 20.0, 30.0 - 5.0 * k], atol=1e-6)
            np.testing.assert_allclose(iop, [C30, S30, 0, -S30, C30, 0], atol=1e-7)
        # voxel (i=5, j=2) of this slice, from the file vs. by hand
        p = ipp + 5 * 4.0 * iop[:3] + 2 * 3.0 * iop[3:]
        if affine_name == "axial":
            expected = [-30.0 + 20.0, -20.0 + 6.0, -10.0 + 5.0 * k]
        else:
            expected = [10 + 20 * C30 - 6 * S30, 20 + 20 * S30 + 6 * C30, 30 - 5.0 * k]
        np.testing.assert_allclose(p, expected, atol=1e-5)


# ------------------------------------------------------------------------------------ contours


def _even_odd(poly_ij: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Even-odd (ray casting) inside test of points (ii, jj) for one polygon in (i, j)."""
    inside = np.zeros(ii.shape, dtype=bool)
    xs, ys = poly_ij[:, 0], poly_ij[:, 1]
    for a in range(len(poly_ij)):
        x1, y1, x2, y2 = xs[a - 1], ys[a - 1], xs[a], ys[a]
        crosses = (y1 > jj) != (y2 > jj)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (jj - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (ii < x_at)
    return inside


def _winding(poly_ij: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """Winding number of points (ii, jj) for one polygon in (i, j)."""
    w = np.zeros(ii.shape, dtype=int)
    xs, ys = poly_ij[:, 0], poly_ij[:, 1]
    for a in range(len(poly_ij)):
        x1, y1, x2, y2 = xs[a - 1], ys[a - 1], xs[a], ys[a]
        side = (x2 - x1) * (jj - y1) - (ii - x1) * (y2 - y1)
        w += ((y1 <= jj) & (y2 > jj) & (side > 0)).astype(int)
        w -= ((y1 > jj) & (y2 <= jj) & (side < 0)).astype(int)
    return w


def _rasterise_axial(contours: list[np.ndarray], shape: tuple[int, int, int], rule: str) -> np.ndarray:
    """Centre-in-polygon rasterisation on the AXIAL grid, mm -> index by hand."""
    out = np.zeros(shape, dtype=bool)
    wind = np.zeros(shape, dtype=int)
    jj, ii = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    for c in contours:
        i = (c[:, 0] + 30.0) / 4.0
        j = (c[:, 1] + 20.0) / 3.0
        kf = (c[:, 2] + 10.0) / 5.0
        k = int(round(kf[0]))
        np.testing.assert_allclose(kf, k, atol=1e-9)  # planar, on slice k
        # every vertex is half-way between two edge-adjacent voxel centres
        frac = np.stack([(2 * i) % 2, (2 * j) % 2], axis=1)
        np.testing.assert_allclose(np.sort(np.round(frac, 9), axis=1), np.tile([0, 1], (len(c), 1)))
        poly = np.column_stack([i, j])
        if rule == "even-odd":
            out[k] ^= _even_odd(poly, ii, jj)
        else:
            wind[k] += _winding(poly, ii, jj)
    return out if rule == "even-odd" else wind != 0


def _sphere_mask() -> np.ndarray:
    k, j, i = np.meshgrid(np.arange(12), np.arange(24), np.arange(24), indexing="ij")
    # centre (i, j, k) = (11.3, 12.6, 5.5) in voxel units, physical radius 25 mm
    return ((i - 11.3) * 4.0) ** 2 + ((j - 12.6) * 3.0) ** 2 + ((k - 5.5) * 5.0) ** 2 <= 25.0**2


def _ring_mask() -> np.ndarray:
    k, j, i = np.meshgrid(np.arange(4), np.arange(24), np.arange(24), indexing="ij")
    r2 = (i - 11.5) ** 2 + (j - 11.5) ** 2
    m = (r2 <= 9.0**2) & (r2 >= 4.5**2) & (k >= 1) & (k <= 2)
    m[1, 1:3, 1:3] = True  # a second component
    m[2, 20, 20] = m[2, 21, 21] = True  # diagonal neighbours (saddle case)
    m[2, 10:13, 10:13] = True  # an island inside the hole
    return m


@pytest.mark.parametrize("make", [_sphere_mask, _ring_mask], ids=["sphere", "ring"])
@pytest.mark.parametrize("rule", ["even-odd", "nonzero"])
def test_contours_from_mask_rasterise_back(make, rule: str) -> None:
    mask = make()
    contours = sc.contours_from_mask(mask, AXIAL)
    assert all(c.ndim == 2 and c.shape[1] == 3 and len(c) >= 4 for c in contours)
    np.testing.assert_array_equal(_rasterise_axial(contours, mask.shape, rule), mask)


def test_contours_ring_topology() -> None:
    mask = _ring_mask()
    contours = sc.contours_from_mask(mask, AXIAL)
    z = [c[0, 2] for c in contours]
    # slice 1 (z = -5): ring outer + hole + small square; slice 2 (z = 0): outer + hole + island
    # + two diagonal single voxels (kept apart)
    assert z.count(-5.0) == 3
    assert z.count(0.0) == 5


def test_contours_oblique_grid() -> None:
    mask = _sphere_mask()[:, :20, :22]
    contours = sc.contours_from_mask(mask, OBLIQUE_FLIPPED)
    inv = np.linalg.inv(OBLIQUE_FLIPPED)
    out = np.zeros(mask.shape, dtype=bool)
    jj, ii = np.meshgrid(np.arange(mask.shape[1]), np.arange(mask.shape[2]), indexing="ij")
    for c in contours:
        ijk = c @ inv[:3, :3].T + inv[:3, 3]
        k = int(round(ijk[0, 2]))
        np.testing.assert_allclose(ijk[:, 2], k, atol=1e-9)
        out[k] ^= _even_odd(ijk[:, :2], ii, jj)
    np.testing.assert_array_equal(out, mask)


# ------------------------------------------------------------------------------------ RTSTRUCT


def _masks() -> dict[str, np.ndarray]:
    k, j, i = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    kidney = ((i - 5) ** 2 + (j - 8) ** 2 <= 9) & (k >= 2) & (k <= 5)
    tumor = (np.abs(i - 11) <= 1) & (np.abs(j - 4) <= 2) & (k >= 1) & (k <= 3)
    return {"Kidney_L": kidney, "Tumor_1": tumor}


@pytest.mark.parametrize("affine_name", ["axial", "oblique_flipped"])
def test_rtstruct_contours_on_ct_planes(tmp_path: Path, ctx: sc.PatientStudy, affine_name: str) -> None:
    affine = AXIAL if affine_name == "axial" else OBLIQUE_FLIPPED
    ct = sc.write_ct_series(tmp_path / "ct", Volume(np.zeros(SHAPE), affine, FOR_UID), ctx=ctx, series=_series(2, "CT"))
    masks = _masks()
    contours = {name: sc.contours_from_mask(m, affine) for name, m in masks.items()}
    rs_series = _series(10, "Contours")
    sc.write_rtstruct(tmp_path / "rs.dcm", contours, ctx=ctx, series=rs_series, referenced_ct=ct)
    ds = pydicom.dcmread(tmp_path / "rs.dcm")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == FOR_UID
    rser = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert rser.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert [c.ReferencedSOPInstanceUID for c in rser.ContourImageSequence] == [c.SOPInstanceUID for c in ct]
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    assert names == {1: "Kidney_L", 2: "Tumor_1"}
    assert all(r.ReferencedFrameOfReferenceUID == FOR_UID for r in ds.StructureSetROISequence)
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert types == {1: "ORGAN", 2: "GTV"}

    # slice k of the CT lies at z = -10 + 5k (axial) or z = 30 - 5k (oblique_flipped), normal ±z
    by_uid = {c.SOPInstanceUID: k for k, c in enumerate(ct)}
    slices_seen: dict[int, set[int]] = {1: set(), 2: set()}
    for roi in ds.ROIContourSequence:
        for item in roi.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            data = np.array(item.ContourData, dtype=float).reshape(-1, 3)
            assert len(data) == item.NumberOfContourPoints
            k = by_uid[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
            z_expected = -10.0 + 5.0 * k if affine_name == "axial" else 30.0 - 5.0 * k
            np.testing.assert_allclose(data[:, 2], z_expected, atol=1e-6)
            slices_seen[roi.ReferencedROINumber].add(k)
            assert all(len(str(v)) <= 16 for v in item.ContourData)  # DS fits 16 chars
    assert slices_seen == {1: {2, 3, 4, 5}, 2: {1, 2, 3}}


def test_rtstruct_rejects_contour_between_slices(tmp_path: Path, ctx: sc.PatientStudy) -> None:
    ct = sc.write_ct_series(tmp_path / "ct", Volume(np.zeros(SHAPE), AXIAL, FOR_UID), ctx=ctx, series=_series(2, "CT"))
    tri = np.array([[0.0, 0.0, -7.5], [4.0, 0.0, -7.5], [0.0, 3.0, -7.5]])  # between z=-10 and -5
    with pytest.raises(ValueError, match="no CT slice"):
        sc.write_rtstruct(tmp_path / "rs.dcm", {"Liver": [tri]}, ctx=ctx, series=_series(10, "x"), referenced_ct=ct)


# ----------------------------------------------------------------------------------------- SEG


def test_seg_round_trip(tmp_path: Path, ctx: sc.PatientStudy) -> None:
    import highdicom as hd

    ct = sc.write_ct_series(tmp_path / "ct", Volume(np.zeros(SHAPE), AXIAL, FOR_UID), ctx=ctx, series=_series(2, "CT"))
    masks = _masks()
    seg_series = _series(11, "Segments")
    dw.write_seg(tmp_path / "seg.dcm", masks, ctx=ctx, series=seg_series, referenced_ct=ct)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.SeriesInstanceUID == seg_series.series_instance_uid
    assert seg.StudyInstanceUID == ctx.study_instance_uid and seg.FrameOfReferenceUID == FOR_UID
    # empty frames omitted: kidney on 4 slices + tumour on 3
    assert int(seg.NumberOfFrames) == 4 + 3
    got = seg.get_pixels_by_source_instance(
        [c.SOPInstanceUID for c in ct], segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    np.testing.assert_array_equal(got[..., 0].astype(bool), masks["Kidney_L"])
    np.testing.assert_array_equal(got[..., 1].astype(bool), masks["Tumor_1"])
    d1, d2 = seg.get_segment_description(1), seg.get_segment_description(2)
    assert d1.segment_label == "Kidney_L" and d2.segment_label == "Tumor_1"
    assert d1.segmented_property_type.value == "64033007"  # SCT Kidney
    assert d2.segmented_property_category.value == "49755003"  # Morphologically abnormal structure
    assert d2.segmented_property_type.value == "108369006"  # SCT Neoplasm
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


# ------------------------------------------------------------------------------------ dciodvfy


@pytest.mark.dciodvfy
def test_dciodvfy_no_errors(tmp_path: Path, ctx: sc.PatientStudy, dciodvfy_exe: str) -> None:
    exe = dciodvfy_exe
    files: list[Path] = []
    for mode, arr, bp in [("counts", _counts(), None), ("bqml", _counts() * 1.7, "ABDOMEN")]:
        p = tmp_path / f"nm_{mode}.dcm"
        sc.write_nm_tomo(
            p,
            Volume(arr, OBLIQUE_FLIPPED, FOR_UID),
            ctx=ctx,
            series=_series(3, "SPECT"),
            injection=INJ,
            acquisition=ACQ,
            pixel_mode=mode,
            body_part_examined=bp,
        )
        files.append(p)
    ct = sc.write_ct_series(
        tmp_path / "ct",
        Volume(np.zeros(SHAPE), AXIAL, FOR_UID),
        ctx=ctx,
        series=_series(2, "CT"),
        body_part_examined="ABDOMEN",
        kvp=120,
    )
    sc.write_ct_series(
        tmp_path / "ct2",
        Volume(np.zeros(SHAPE), OBLIQUE_FLIPPED, FOR_UID),
        ctx=ctx,
        series=_series(4, "CT oblique"),
    )
    files += sorted((tmp_path / "ct").glob("*.dcm"))[:2] + sorted((tmp_path / "ct2").glob("*.dcm"))[:1]
    masks = _masks()
    contours = {n: sc.contours_from_mask(m, AXIAL) for n, m in masks.items()}
    sc.write_rtstruct(tmp_path / "rs.dcm", contours, ctx=ctx, series=_series(10, "RS"), referenced_ct=ct)
    dw.write_seg(tmp_path / "seg.dcm", masks, ctx=ctx, series=_series(11, "SEG"), referenced_ct=ct)
    files += [tmp_path / "rs.dcm", tmp_path / "seg.dcm"]
    report = {}
    for f in files:
        res = subprocess.run([exe, str(f)], capture_output=True, text=True, timeout=60)
        text = res.stdout + res.stderr
        report[f.name] = text
        errors = [line for line in text.splitlines() if "Error" in line]
        assert not errors, f"{f.name}:\n" + "\n".join(errors)
    # the only warnings left with a body part given: RadiopharmaceuticalStartDateTime in NM
    nm_warn = [ln for ln in report["nm_bqml.dcm"].splitlines() if ln.startswith("Warning")]
    assert all("Radiopharmaceutical Start DateTime" in w or "Standard Extended" in w for w in nm_warn)
    assert not [ln for ln in report["rs.dcm"].splitlines() if ln.startswith("Warning")]
