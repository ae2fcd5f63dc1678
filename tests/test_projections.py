"""voxeldose.projections: NM TOMO projections written as a dual-head camera writes them, read back, read by
PyTomography's own reader, checked by dciodvfy, and refused with clear errors when unusable.

Expected values come from the DICOM standard (PS3.3 C.8.4: frame vectors, Start Angle 0° at the patient's back,
counter-clockwise from the feet) and from the set that was written, never from a run of the reader.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from voxeldose import cli, pipeline, recon
from voxeldose.dicomutil import PatientStudy, SeriesInfo
from voxeldose.errors import VoxeldoseError
from voxeldose.ingest import group_cycles, load_cycle, read_spect, scan
from voxeldose.phantom import PhantomManifest, PhantomSettings, write_phantom
from voxeldose.pipeline import blocking_problems, load_spec_cycle
from voxeldose.projections import (
    EnergyWindow,
    ProjectionSet,
    dicom_angle_deg,
    projector_angle_deg,
    read_projections,
    write_projections,
)
from voxeldose.scanner import Injection, SpectAcquisition
from voxeldose.spec import JobSpec
from voxeldose.summary import Summary

FOR_UID = "1.2.826.0.1.3680043.8.498.1001"
ACQ = datetime(2026, 1, 6, 10, 0)
INJ = Injection("Lu-177", 7.4e9, datetime(2026, 1, 5, 9, 30))
CTX = PatientStudy("PRJ1", "TEST^PROJ", "19500101", "O", "1.2.826.0.1.3680043.8.498.1002", ACQ)
SERIES = SeriesInfo("1.2.826.0.1.3680043.8.498.1003", 5, "SPECT 177Lu projections", FOR_UID, ACQ)
N_VIEWS, N_SLICES, N_BINS = 16, 6, 10


def _set(**changes: Any) -> ProjectionSet:
    """Two heads, 8 views each 22.5° apart (CC), a body-contour orbit (a radius per view), Poisson counts."""
    rng = np.random.default_rng(5)
    angles = tuple(22.5 * v for v in range(N_VIEWS))  # projector angles: head 1 0…157.5°, head 2 180…337.5°
    base = ProjectionSet(
        counts=rng.poisson(40.0, (N_VIEWS, N_SLICES, N_BINS)).astype(np.float32),
        angles_deg=angles,
        radius_mm=tuple(200.0 + 3.0 * v for v in range(N_VIEWS)),
        frame_duration_s=25.0,
        bin_mm=7.2,
        slice_mm=7.2,
        window=EnergyWindow("Lu177_208keV", 187.5, 229.2),
        collimator="SY-ME",
        acquisition_start=ACQ,
        frame_of_reference_uid=FOR_UID,
        image_position_mm=(-32.4, -32.4, 18.0),
        injection=INJ,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture()
def written(tmp_path: Path) -> tuple[Path, ProjectionSet]:
    ps = _set()
    path = tmp_path / "proj.dcm"
    write_projections(path, ps, ctx=CTX, series=SERIES, body_part_examined="ABDOMEN")
    return path, ps


def test_round_trip_keeps_counts_orbit_window_and_geometry(written: tuple[Path, ProjectionSet]) -> None:
    path, ps = written
    back = read_projections(path)
    np.testing.assert_array_equal(back.counts, ps.counts)
    assert back.angles_deg == pytest.approx(ps.angles_deg)
    assert back.radius_mm == pytest.approx(ps.radius_mm)
    assert back.frame_duration_s == 25.0
    assert (back.bin_mm, back.slice_mm) == (7.2, 7.2)
    assert back.window == ps.window
    assert back.collimator == "SY-ME"
    assert (back.detectors, back.rotation_direction) == (2, "CC")
    assert back.acquisition_start == ACQ and back.frame_of_reference_uid == FOR_UID
    assert back.injection == INJ
    assert back.identity is not None and back.identity.collimator == "SY-ME"
    assert back.identity.energy_window_kev == (187.5, 229.2)
    # the reconstruction grid: first voxel of the top slice at the stated position, k towards the head
    grid = back.grid()
    assert grid.shape == (N_SLICES, N_BINS, N_BINS)
    np.testing.assert_allclose(grid.index_to_world([0, 0, N_SLICES - 1]), [-32.4, -32.4, 18.0])
    np.testing.assert_allclose(grid.index_to_world([1, 1, 0]), [-32.4 + 7.2, -32.4 + 7.2, 18.0 - 5 * 7.2])


def test_the_header_is_a_dual_head_tomo_acquisition(written: tuple[Path, ProjectionSet]) -> None:
    """PS3.3 C.8.4.8: frames ordered by window, detector, rotation, view, each frame's index in its vector;
    C.8.4.11/12: per head its start angle (DICOM's: projector − 180°) and radii; rows run from head to feet."""
    path, ps = written
    ds = pydicom.dcmread(path)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    assert [pydicom.tag.Tag(t) for t in ds.FrameIncrementPointer] == [
        pydicom.tag.Tag(k) for k in ("EnergyWindowVector", "DetectorVector", "RotationVector", "AngularViewVector")
    ]
    assert list(ds.DetectorVector) == [1] * 8 + [2] * 8
    assert list(ds.AngularViewVector) == list(range(1, 9)) * 2
    assert ds.NumberOfFrames == 16 and ds.NumberOfDetectors == 2 and ds.NumberOfRotations == 1
    rot = ds.RotationInformationSequence[0]
    assert (rot.NumberOfFramesInRotation, float(rot.AngularStep), rot.RotationDirection) == (8, 22.5, "CC")
    assert (float(rot.ScanArc), rot.ActualFrameDuration) == (180.0, 25000)
    heads = ds.DetectorInformationSequence
    assert [float(h.StartAngle) for h in heads] == [180.0, 0.0]  # projector 0° and 180°
    assert [float(r) for r in heads[1].RadialPosition] == [200.0 + 3.0 * v for v in range(8, 16)]
    # the top row of the first frame is the most superior slice of view 0
    np.testing.assert_array_equal(ds.pixel_array[0][0], ps.counts[0][-1])
    assert ds.CountsAccumulated == int(ps.counts.sum())


def test_dicom_angle_zero_is_the_detector_behind_the_patient() -> None:
    """PS3.3 C.8.4.11: 0° is at the patient's back and angles grow towards the patient's left.  A point in front of
    an absorber that fills the patient's back half loses its counts in the view at DICOM 0°, and one in front of an
    absorber in the left half in the view at 90°."""
    n, nz, vox = 16, 4, 10.0
    point = np.zeros((nz, n, n))
    point[2, 6, 6] = 1.0e6  # a voxel centre at x = y = −15 mm: right and anterior of the axis
    orbit = recon.Orbit(tuple(projector_angle_deg(a) for a in (0.0, 90.0, 180.0, 270.0)), (200.0,) * 4, 1.0)
    camera = recon.Camera(recon.collimator("SY-ME"), 1.0)
    try:
        recon._pytomography()
    except VoxeldoseError:
        pytest.skip("the 'recon' extra is not installed")
    import torch

    torch.set_num_threads(1)
    back, left = np.zeros((nz, n, n), np.float32), np.zeros((nz, n, n), np.float32)
    back[:, 9:, :] = 1.0  # y > +5 mm: the patient's back half (LPS +y is posterior)
    left[:, :, 9:] = 1.0  # x > +5 mm: the patient's left half
    for mu, blocked in ((back, 0), (left, 1)):
        totals = recon.project(point, mu, (vox,) * 3, orbit, camera).sum(axis=(1, 2))
        others = np.delete(totals, blocked)
        assert totals[blocked] < 0.01 * others.min()  # ≥ 4 cm at 1/cm: below e^-4 of the free views
        # the free views see the point in air (5 %: the rotated grid's interpolation near its edge)
        np.testing.assert_allclose(others, others.max(), rtol=0.05)


def test_pytomographys_own_reader_reads_the_same_projections(written: tuple[Path, ProjectionSet]) -> None:
    """PyTomography's DICOM reader (validated on cameras' files) gives the same angles, radii and arrays."""
    try:
        recon._pytomography()
    except VoxeldoseError:
        pytest.skip("the 'recon' extra is not installed")
    from pytomography.io.SPECT.dicom import _get_affine_spect_projections, parse_projection_dataset

    path, ps = written
    projections, angles, radii, _ = parse_projection_dataset(pydicom.dcmread(path))
    order = np.argsort(ps.angles_deg)
    np.testing.assert_allclose(angles, np.asarray(ps.angles_deg)[order])
    np.testing.assert_allclose(radii * 10.0, np.asarray(ps.radius_mm)[order])  # cm
    # theirs: [window, time slot, view, bin, slice]
    np.testing.assert_array_equal(projections[0, 0].cpu().numpy(), ps.counts[order].transpose(0, 2, 1))
    np.testing.assert_allclose(_get_affine_spect_projections(str(path)), read_projections(path).grid().affine)


@pytest.mark.dciodvfy
def test_dciodvfy_reports_no_errors(written: tuple[Path, ProjectionSet], dciodvfy_exe: str) -> None:
    path, _ = written
    res = subprocess.run([dciodvfy_exe, str(path)], capture_output=True, text=True, timeout=60)
    text = res.stdout + res.stderr
    assert "NMImage" in text  # it recognised the IOD
    assert not [line for line in text.splitlines() if "Error" in line], text
    warnings = [line for line in text.splitlines() if line.startswith("Warning")]
    assert all("Radiopharmaceutical Start DateTime" in w or "Standard Extended" in w for w in warnings), warnings


def test_the_writer_refuses_what_a_camera_cannot_record() -> None:
    with pytest.raises(ValueError, match="integers"):
        write_projections("/nonexistent/x.dcm", _set(counts=np.full((16, 6, 10), 0.5)), ctx=CTX, series=SERIES)
    with pytest.raises(ValueError, match="y = 0"):  # PyTomography's reader would take it as the grid's centre line
        write_projections("/nonexistent/x.dcm", _set(image_position_mm=(-32.4, 0.0, 18.0)), ctx=CTX, series=SERIES)
    uneven = (0.0, 20.0, *[22.5 * v for v in range(2, 16)])
    with pytest.raises(ValueError, match="apart"):
        write_projections("/nonexistent/x.dcm", _set(angles_deg=uneven), ctx=CTX, series=SERIES)


# --------------------------------------------------------------------------------------------
# Refusals: each names the file and the tag
# --------------------------------------------------------------------------------------------


def _damaged(path: Path, damage: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(path)
    damage(ds)
    out = path.with_name("damaged.dcm")
    ds.save_as(out)
    return out


def _drop_windows(ds: pydicom.Dataset) -> None:
    del ds.EnergyWindowInformationSequence


def _technetium_window(ds: pydicom.Dataset) -> None:
    rng = ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
    rng.EnergyWindowLowerLimit, rng.EnergyWindowUpperLimit = "126", "154"


def _unknown_collimator(ds: pydicom.Dataset) -> None:
    for det in ds.DetectorInformationSequence:
        det.CollimatorGridName = "LEHR"


def _same_start_angles(ds: pydicom.Dataset) -> None:
    ds.DetectorInformationSequence[1].StartAngle = ds.DetectorInformationSequence[0].StartAngle


def _wrong_scan_arc(ds: pydicom.Dataset) -> None:
    ds.RotationInformationSequence[0].ScanArc = "360"


def _drop_frame_duration(ds: pydicom.Dataset) -> None:
    del ds.RotationInformationSequence[0].ActualFrameDuration


def _drop_radial_positions(ds: pydicom.Dataset) -> None:
    for det in ds.DetectorInformationSequence:
        del det.RadialPosition


def _recon_tomo(ds: pydicom.Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]


def _prone(ds: pydicom.Dataset) -> None:
    ds.PatientOrientationCodeSequence[0].PatientOrientationModifierCodeSequence[0].CodeValue = "1240000"  # prone


def _feet_first(ds: pydicom.Dataset) -> None:
    ds.PatientPosition = "FFS"


def _view_out_of_range(ds: pydicom.Dataset) -> None:
    ds.AngularViewVector = [*list(ds.AngularViewVector)[:-1], 9]


@pytest.mark.parametrize(
    ("damage", "message", "tag"),
    [
        (_drop_windows, "no 177Lu photopeak window", "EnergyWindowInformationSequence (0054,0012)"),
        (_technetium_window, "no 177Lu photopeak window", "EnergyWindowInformationSequence (0054,0012)"),
        (_unknown_collimator, "no resolution model for this collimator", "CollimatorGridName (0018,1180)"),
        (_same_start_angles, "inconsistent angles: two views at the same angle", "StartAngle"),
        (_wrong_scan_arc, "inconsistent angles: the scan arc", "ScanArc (0018,1143)"),
        (_view_out_of_range, "inconsistent angles: a frame's detector or view index", "AngularViewVector (0054,0090)"),
        (_drop_frame_duration, "lack ActualFrameDuration", "ActualFrameDuration (0018,1242)"),
        (_drop_radial_positions, "lack RadialPosition", "RadialPosition (0018,1142)"),
        (_recon_tomo, "not SPECT projections", "ImageType (0008,0008)"),
        (_prone, "only head-first supine", "PatientOrientationModifierCodeSequence (0054,0412)"),
        (_feet_first, "only head-first supine", "PatientPosition (0018,5100)"),
    ],
)
def test_unusable_projections_are_refused_naming_file_and_tag(
    written: tuple[Path, ProjectionSet], damage: Callable[[pydicom.Dataset], None], message: str, tag: str
) -> None:
    bad = _damaged(written[0], damage)
    with pytest.raises(VoxeldoseError, match=message) as exc:
        read_projections(bad)
    assert exc.value.path == str(bad)
    assert exc.value.tag is not None and tag in exc.value.tag
    assert "Traceback" not in str(exc.value)


def test_a_collimator_given_by_the_user_replaces_an_unknown_name(written: tuple[Path, ProjectionSet]) -> None:
    bad = _damaged(written[0], _unknown_collimator)
    assert read_projections(bad, collimator="gi-megp").collimator == "GI-MEGP"
    with pytest.raises(VoxeldoseError, match="no resolution model"):
        read_projections(bad, collimator="LEHR")


def test_angle_conventions_are_inverse() -> None:
    for a in (0.0, 3.0, 180.0, 357.0):
        assert projector_angle_deg(dicom_angle_deg(a)) == pytest.approx(a)
    assert dicom_angle_deg(0.0) == 180.0


# --------------------------------------------------------------------------------------------
# The synthetic patient's projection camera and `voxeldose recon`
# --------------------------------------------------------------------------------------------

#: The small patient at one time point, 60 views (30 per head, 6° steps) and OSEM 2 × 6: seconds, not minutes.
OSEM_SMALL = {
    "camera": "osem",
    "hours": (24.0,),
    "acquisition": SpectAcquisition(frame_duration_ms=80_000, frames_in_rotation=30, angular_step_deg=6.0),
    "osem_iterations": 2,
    "osem_subsets": 6,
}


@pytest.fixture(scope="module")
def osem_patient(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    try:
        recon._pytomography()
    except VoxeldoseError:
        pytest.skip("the 'recon' extra is not installed")
    import torch

    torch.set_num_threads(1)
    return write_phantom(tmp_path_factory.mktemp("osem") / "P", PhantomSettings.small(**OSEM_SMALL))


@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_the_osem_camera_writes_its_projections_beside_the_reconstruction(osem_patient: PhantomManifest) -> None:
    (proj_path,) = osem_patient.projection_files
    assert proj_path.parent.parent == osem_patient.nm_files[0].parent.parent  # the same time point's folder
    proj, rec = pydicom.dcmread(proj_path), pydicom.dcmread(osem_patient.nm_files[0])
    assert proj.StudyInstanceUID == rec.StudyInstanceUID and proj.FrameOfReferenceUID == rec.FrameOfReferenceUID
    assert proj.SeriesInstanceUID != rec.SeriesInstanceUID and proj.SeriesNumber != rec.SeriesNumber
    assert "projections" in proj.SeriesDescription
    ps = read_projections(proj_path)
    # a dual-head camera: 2 × 30 views over 360°, 80 s each; the grid the projections define is the SPECT's
    assert (ps.detectors, ps.views, ps.frame_duration_s) == (2, 60, 80.0)
    np.testing.assert_allclose(sorted(ps.angles_deg), [6.0 * v for v in range(60)])
    spect = read_spect(next(s for s in scan(osem_patient.nm_files[0]).series.values() if s.kind == "spect"))
    np.testing.assert_allclose(ps.grid().affine, spect.volume.affine, atol=1e-4)
    # the reconstruction states how it was made
    assert rec.ReconstructionMethod == "OSEM 2i6s AC RR SY-ME"
    assert rec.SeriesDescription.endswith("OSEM 2i6s AC RR SY-ME")


@pytest.mark.dciodvfy
@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_the_osem_patients_projections_and_reconstruction_pass_dciodvfy(
    osem_patient: PhantomManifest, dciodvfy_exe: str
) -> None:
    for path in (*osem_patient.projection_files, *osem_patient.nm_files):
        res = subprocess.run([dciodvfy_exe, str(path)], capture_output=True, text=True, timeout=60)
        text = res.stdout + res.stderr
        assert "NMImage" in text
        assert not [line for line in text.splitlines() if "Error" in line], f"{path}:\n{text}"


@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_voxeldose_recon_on_the_projections_alone_reproduces_the_written_reconstruction(
    osem_patient: PhantomManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The projections and the CT (no reconstruction in the input): the same voxel values, within the uint16
    quantisation of the written counts (±1)."""
    tp = osem_patient.nm_files[0].parent.parent
    out = tmp_path / "R"
    argv = ["recon", str(tp / "NM-PROJ"), str(tp / "CT"), "--out", str(out), "--iterations", "2", "--subsets", "6"]
    assert cli.main(argv) == 0
    assert "OSEM 2i6s AC RR SY-ME" in capsys.readouterr().out
    (written,) = sorted(out.glob("*/SPECT.dcm"))
    mine, theirs = pydicom.dcmread(written), pydicom.dcmread(osem_patient.nm_files[0])
    diff = mine.pixel_array.astype(np.int64) - theirs.pixel_array.astype(np.int64)
    assert np.abs(diff).max() <= 1
    assert theirs.pixel_array.max() > 100  # a real image, not two empty ones
    assert mine.ReconstructionMethod == "OSEM 2i6s AC RR SY-ME" and "OSEM 2i6s AC RR SY-ME" in mine.SeriesDescription
    assert (mine.StudyInstanceUID, mine.FrameOfReferenceUID) == (theirs.StudyInstanceUID, theirs.FrameOfReferenceUID)
    # voxeldose reads it as a reconstructed SPECT with the same geometry
    (series,) = [s for s in scan(written).series.values() if s.kind == "spect"]
    spect = read_spect(series)
    ref = read_spect(next(s for s in scan(osem_patient.nm_files[0]).series.values() if s.kind == "spect"))
    np.testing.assert_allclose(spect.volume.affine, ref.volume.affine, atol=1e-4)
    assert spect.acquisition_duration_s == ref.acquisition_duration_s == 30 * 80.0  # what a calibration needs


@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_voxeldose_recon_refuses_projections_without_their_ct(
    osem_patient: PhantomManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tp = osem_patient.nm_files[0].parent.parent
    assert cli.main(["recon", str(tp / "NM-PROJ"), "--out", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err
    assert "no CT in the projections' Frame of Reference" in err and "FrameOfReferenceUID (0020,0052)" in err
    assert "Traceback" not in err
    assert cli.main(["recon", str(tp / "CT"), "--out", str(tmp_path / "R")]) == 2
    assert "no SPECT projections found" in capsys.readouterr().err
    assert cli.main(["recon", str(tp), "--out", str(tmp_path / "R"), "--collimator", "LEHR"]) == 2
    err = capsys.readouterr().err
    assert "no resolution model for this collimator" in err and "SY-ME" in err
    assert cli.main(["recon", str(tp), "--out", str(tmp_path / "R"), "--subsets", "7"]) == 2
    err = capsys.readouterr().err
    assert "7 OSEM subsets do not divide the 60 views" in err and "PROJECTIONS.dcm" in err and "6, 10" in err
    assert not (tmp_path / "R").exists() or not any((tmp_path / "R").rglob("*.dcm"))


# --------------------------------------------------------------------------------------------
# `voxeldose run` on projections: ingest keeps them, the pipeline reconstructs them, the summary says how
# --------------------------------------------------------------------------------------------


def _without_reconstruction(manifest: PhantomManifest, dest: Path) -> Path:
    """A copy of the patient's DICOM folder with its RECON TOMO removed: projections, CT and structures only."""
    shutil.copytree(manifest.out_dir / "dicom", dest)
    for nm in manifest.nm_files:
        shutil.rmtree(dest / nm.parent.relative_to(manifest.out_dir / "dicom"))
    return dest


@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_ingest_keeps_the_projections_as_the_time_points_spect(osem_patient: PhantomManifest, tmp_path: Path) -> None:
    proj_uid = str(pydicom.dcmread(osem_patient.projection_files[0], stop_before_pixels=True).SeriesInstanceUID)
    # beside a reconstruction of the same session (same frame, same start): the reconstruction is used, and said
    index = scan(osem_patient.out_dir / "dicom")
    assert {s.kind for s in index.series.values() if s.series_instance_uid == proj_uid} == {"projections"}
    assert not [p for p in index.problems if "not a reconstructed SPECT" in p.message]
    (vendor,) = load_cycle(index).timepoints
    assert vendor.spect.kind == "spect" and not vendor.needs_reconstruction
    _, problems = group_cycles(index)
    assert any("reconstruction" in p.message and "is used" in p.message for p in problems)
    # the job asks to reconstruct: the projections replace the reconstruction
    (forced,) = load_cycle(index, reconstruct=True).timepoints
    assert forced.needs_reconstruction and forced.spect.series_instance_uid == proj_uid
    assert forced.ct is not None and forced.ct.series_instance_uid == vendor.ct.series_instance_uid
    # projections alone: they are the time point, to be reconstructed; inspect says so
    alone = _without_reconstruction(osem_patient, tmp_path / "dicom")
    (tp,) = load_cycle(alone).timepoints
    assert tp.needs_reconstruction and tp.spect.series_instance_uid == proj_uid
    assert tp.hours_after_injection == pytest.approx(24.0)
    rep = cli.inspect_report([alone])
    assert rep["cycles"][0]["timepoints"][0]["spect"]["pixel_values"] == "projections (will be reconstructed)"
    # the default 8 subsets do not divide the 60 views: a job option, so information here, naming it
    (sub,) = [p for p in rep["problems"] if p["tag"] == "reconstruction.subsets"]
    assert sub["severity"] == "info" and "8 OSEM subsets do not divide the 60 views" in sub["message"]
    assert rep["ok"]


@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_projections_that_cannot_be_reconstructed_stop_the_job_before_any_pixel_is_read(
    osem_patient: PhantomManifest, tmp_path: Path
) -> None:
    alone = _without_reconstruction(osem_patient, tmp_path / "dicom")
    cps = json.loads(osem_patient.truth_json.read_text())["calibration_cps_per_mbq"]
    spec = JobSpec(inputs=[str(alone)], calibration={"cps_per_mbq": cps}, reconstruction={"subsets": 7})
    (err,) = blocking_problems(load_spec_cycle(spec, scan(alone)), spec)
    assert err.tag == "reconstruction.subsets" and "7 OSEM subsets do not divide the 60 views" in str(err)
    assert err.path is not None and Path(err.path).name == "PROJECTIONS.dcm" and "6, 10" in str(err.expected)
    # no CT: no attenuation map
    for ct in osem_patient.ct_folders:
        shutil.rmtree(alone / ct.relative_to(osem_patient.out_dir / "dicom"))
    spec = JobSpec(inputs=[str(alone)], calibration={"cps_per_mbq": cps}, registration="none")
    problems = blocking_problems(load_spec_cycle(spec, scan(alone)), spec)
    assert problems[0].tag == "FrameOfReferenceUID (0020,0052)" and "no CT" in str(problems[0])
    assert problems[0].path is not None and Path(problems[0].path).name == "PROJECTIONS.dcm"
    with pytest.raises(VoxeldoseError, match="no CT"):
        pipeline.run(spec)


@pytest.mark.xdist_group("osem_patient")  # one worker writes the module-scoped patient once
def test_run_on_projections_alone_gives_the_dose_of_the_run_on_their_written_reconstruction(
    osem_patient: PhantomManifest, tmp_path: Path
) -> None:
    """The phantom's RECON TOMO is this code's reconstruction of these projections (OSEM 2 × 6), written as uint16
    counts; `voxeldose run` on the projections alone reconstructs them in memory in the same way.

    Tolerance: the two SPECTs differ only by the rounding of each voxel's counts, |δC| ≤ 0.5.  At one time point
    the dose is linear in the counts (Hänscheid TIA, kernel convolution), and at 7.2 mm voxels most of a Lu-177
    voxel's dose is its own electrons' (148 of 183 keV per decay, ICRP 107), so the kidney's mean dose moves by
    at most about 0.5 / C̄ of itself, C̄ the kidney's mean counts; twice that covers the photons' cross-fire from
    cooler voxels, whose rounding is bounded by the same 0.5 counts.
    """
    import torch

    torch.set_num_threads(1)
    truth = json.loads(osem_patient.truth_json.read_text())
    alone = _without_reconstruction(osem_patient, tmp_path / "dicom")
    before = sorted(p.relative_to(alone) for p in alone.rglob("*"))
    out = tmp_path / "R"
    argv = ["run", str(alone), "--out", str(out), "--calibration", str(truth["calibration_cps_per_mbq"])]
    assert cli.main([*argv, "--iterations", "2", "--subsets", "6"]) == 0
    assert sorted(p.relative_to(alone) for p in alone.rglob("*")) == before  # nothing written beside the inputs
    mine = Summary.load(out / "summary.json")
    vendor_spec = JobSpec(inputs=[str(osem_patient.out_dir / "dicom")], calibration=mine.provenance.spec.calibration)
    theirs = pipeline.run(vendor_spec).summary

    (tp,) = mine.timepoints
    proj_uid = str(pydicom.dcmread(osem_patient.projection_files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert tp.spect_series_uid == proj_uid and tp.reconstruction is not None
    how = tp.reconstruction
    assert (how.made_by, how.method, how.iterations, how.subsets) == ("voxeldose", "OSEM 2i6s AC RR SY-ME", 2, 6)
    assert how.algorithm is not None and how.algorithm.startswith("OSEM")
    assert how.models is not None and "attenuation from the CT" in how.models
    assert any("SY-ME" in m for m in how.models) and how.projections_series_uid == proj_uid and how.device == "cpu"
    (vendor_tp,) = theirs.timepoints
    assert vendor_tp.reconstruction is not None
    assert (vendor_tp.reconstruction.made_by, vendor_tp.reconstruction.method) == ("vendor", "OSEM 2i6s AC RR SY-ME")
    # the written reconstruction's mean kidney counts decide the tolerance
    spect = read_spect(next(s for s in scan(osem_patient.nm_files[0]).series.values() if s.kind == "spect"))
    labels = np.load(osem_patient.labels_npy)
    assert labels.shape == spect.volume.array.shape
    for name in ("Kidney_L", "Kidney_R"):
        (label,) = [int(k) for k, v in truth["labels"].items() if v == name]
        mean_counts = float(spect.volume.array[labels == label].mean())
        assert mean_counts > 100  # a real image
        rel = 2 * 0.5 / mean_counts
        assert mine.vois[name].mean_gy == pytest.approx(theirs.vois[name].mean_gy, rel=rel), name
    assert tp.quantification.total_activity_mbq == pytest.approx(vendor_tp.quantification.total_activity_mbq, rel=1e-3)
