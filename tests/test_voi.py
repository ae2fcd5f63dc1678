"""VOI rasterisation against analytic volumes (the rule is in voxeldose/voi.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from voxeldose.errors import VoxeldoseError
from voxeldose.geometry import Grid
from voxeldose.phantom import PhantomSettings, write_phantom
from voxeldose.pipeline import run
from voxeldose.voi import rasterise_rtstruct, read_structure_set


def _circle(center, radius, z, n=128):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t), np.full(n, z)], axis=-1)


def _rtstruct(rois: dict[str, list[np.ndarray]]) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    for number, (name, contours) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber = number
        r.ROIName = name
        ds.StructureSetROISequence.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence()
        for c in contours:
            item = Dataset()
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(c)
            item.ContourData = [f"{v:.3f}" for v in c.ravel()]
            rc.ContourSequence.append(item)
        ds.ROIContourSequence.append(rc)
    return ds


def _sphere_contours(center, radius, slice_mm):
    """Circles of a sphere cut by CT planes every ``slice_mm`` (planes at multiples of slice_mm)."""
    zs = (
        np.arange(math.floor((center[2] - radius) / slice_mm), math.ceil((center[2] + radius) / slice_mm) + 1)
        * slice_mm
    )
    out = []
    for z in zs:
        h = z - center[2]
        if abs(h) < radius:
            out.append(_circle(center, math.sqrt(radius**2 - h**2), z))
    return out


@pytest.mark.parametrize("center", [(0.0, 0.0, 0.0), (1.3, -2.1, 0.7), (7.9, 3.3, -11.2)])
def test_sphere_15mm_at_4p8mm_within_2_percent(center):
    r = 15.0
    grid = Grid.axial((21, 21, 21), (4.8, 4.8, 4.8), origin_mm=(-48.0, -48.0, -48.0))
    vois = rasterise_rtstruct(_rtstruct({"Tumor_1": _sphere_contours(center, r, 2.0)}), grid)
    analytic_ml = 4.0 / 3.0 * math.pi * r**3 / 1000.0
    assert vois["Tumor_1"].volume_ml == pytest.approx(analytic_ml, rel=0.02)
    # the binary mask is a coarser estimate; it must still be in the right place
    com = np.argwhere(vois["Tumor_1"].mask).mean(axis=0)[::-1] * 4.8 - 48.0
    assert np.allclose(com, center, atol=2.4)


def test_ring_with_hole_is_even_odd():
    """An annulus drawn as outer + inner contour: the hole is excluded (area π(R²−r²))."""
    contours = []
    for z in np.arange(-20, 21, 2.0):
        contours += [_circle((0, 0), 30.0, z), _circle((0, 0), 15.0, z)]
    grid = Grid.axial((15, 40, 40), (2.0, 2.0, 3.0), origin_mm=(-39.0, -39.0, -21.0))
    voi = rasterise_rtstruct(_rtstruct({"Ring": contours}), grid)["Ring"]
    expected = math.pi * (30.0**2 - 15.0**2) * 42.0 / 1000.0  # 21 planes × 2 mm slab
    assert voi.volume_ml == pytest.approx(expected, rel=0.01)
    assert voi.fraction[7, 20, 20] == 0.0  # the centre of the hole


def test_missing_roi_is_a_clear_error():
    grid = Grid.axial((5, 5, 5), (4.0, 4.0, 4.0))
    with pytest.raises(VoxeldoseError, match="not found in the structure set"):
        rasterise_rtstruct(_rtstruct({"Liver": _sphere_contours((0, 0, 0), 5.0, 2.0)}), grid, names=["Kidney_L"])


def test_oblique_grid_uses_the_general_path_and_agrees():
    """A grid tilted 20° about x is not parallel to the axial contours: the point-sampling path runs and
    gives the sphere's analytic volume within 2 %, like the scanline path on the axial grid."""
    from voxeldose.geometry import affine_from_dicom

    r = 15.0
    th = math.radians(20)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, math.cos(th), math.sin(th)])
    normal = np.cross(row, col)
    origin = -10 * 4.8 * (row + col + normal)
    grid = Grid((21, 21, 21), affine_from_dicom(origin, [*row, *col], [4.8, 4.8], 4.8 * normal))
    ds = _rtstruct({"Tumor_1": _sphere_contours((1.3, -2.1, 0.7), r, 2.0)})
    voi = rasterise_rtstruct(ds, grid)["Tumor_1"]
    assert voi.volume_ml == pytest.approx(4.0 / 3.0 * math.pi * r**3 / 1000.0, rel=0.02)
    axial = rasterise_rtstruct(ds, Grid.axial((21, 21, 21), (4.8, 4.8, 4.8), origin_mm=(-48.0, -48.0, -48.0)))[
        "Tumor_1"
    ]
    assert voi.volume_ml == pytest.approx(axial.volume_ml, rel=0.01)


def test_single_plane_roi_takes_the_given_slab():
    """An ROI drawn on one CT slice stands for that slice's thickness when the caller gives it."""
    contours = [_circle((0.0, 0.0), 20.0, 0.0)]
    grid = Grid.axial((9, 30, 30), (2.0, 2.0, 1.0), origin_mm=(-29.0, -29.0, -4.0))
    with pytest.raises(VoxeldoseError, match="single plane"):
        rasterise_rtstruct(_rtstruct({"Lesion": contours}), grid)
    voi = rasterise_rtstruct(_rtstruct({"Lesion": contours}), grid, default_slab_mm=3.0)["Lesion"]
    assert voi.volume_ml == pytest.approx(math.pi * 20.0**2 * 3.0 / 1000.0, rel=0.01)


# ------------------------------------------------------------ incomplete structure sets (issue 14, defect 9)
@pytest.mark.parametrize(
    ("damage", "tag"),
    [
        (lambda ds: delattr(ds.ROIContourSequence[0].ContourSequence[1], "ContourData"), "ContourData (3006,0050)"),
        (lambda ds: delattr(ds.ROIContourSequence[0], "ReferencedROINumber"), "ReferencedROINumber (3006,0084)"),
        (lambda ds: delattr(ds.StructureSetROISequence[0], "ROIName"), "StructureSetROISequence (3006,0020)"),
        (lambda ds: setattr(ds.ROIContourSequence[0].ContourSequence[0], "ContourData", ["1", "2"]), "ContourData"),
    ],
)
def test_an_incomplete_structure_set_names_file_and_tag(damage, tag):
    ds = _rtstruct({"S": [_circle((0, 0), 10, z) for z in (0.0, 4.0, 8.0)]})
    ds.filename = "/data/RTSTRUCT.dcm"
    damage(ds)
    with pytest.raises(VoxeldoseError) as info:
        read_structure_set(ds, ds.filename)
    assert info.value.path == "/data/RTSTRUCT.dcm" and info.value.tag.startswith(tag)
    grid = Grid.axial((5, 5, 5), (4.0, 4.0, 4.0))
    with pytest.raises(VoxeldoseError, match="RTSTRUCT.dcm"):  # the rasterising fails the same way, not AttributeError
        rasterise_rtstruct(ds, grid)


def test_pipeline_names_a_truncated_rtstruct(tmp_path):
    """The pipeline run on a folder whose RT Structure Set was cut short stops with a VoxeldoseError naming the
    file (the service shows that message, not "internal error")."""
    write_phantom(tmp_path, PhantomSettings.small())
    rt = tmp_path / "dicom" / "RTSTRUCT.dcm"
    rt.write_bytes(rt.read_bytes()[:-1000])
    with pytest.raises(VoxeldoseError, match=r"RTSTRUCT\.dcm.*truncated"):
        run({"inputs": [str(tmp_path / "dicom")], "calibration": {"cps_per_mbq": 5.67}})
