"""Geometry against hand-computed DICOM coordinates (PS3.3 C.7.6.2.1.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxeldose.errors import VoxeldoseError
from voxeldose.geometry import Grid, Volume, affine_from_dicom, resample


def test_axial_anisotropic():
    # IPP (-250, -250, 100), rows along +x (L), columns along +y (P), PixelSpacing [row 0.9, col 0.8], slices 2.5 mm
    a = affine_from_dicom([-250, -250, 100], [1, 0, 0, 0, 1, 0], [0.9, 0.8], [0, 0, 2.5])
    g = Grid((10, 20, 30), a)
    # voxel i=3 (column), j=5 (row), k=2 (slice): x = -250 + 3*0.8, y = -250 + 5*0.9, z = 100 + 2*2.5
    assert np.allclose(g.index_to_world([3, 5, 2]), [-247.6, -245.5, 105.0])
    assert np.allclose(g.spacing, [0.8, 0.9, 2.5])
    assert g.voxel_volume_ml == pytest.approx(0.8 * 0.9 * 2.5 / 1000)
    assert np.allclose(g.world_to_index([-247.6, -245.5, 105.0]), [3, 5, 2])


def test_flipped_slice_order():
    # slices go towards the feet (−z) although X × Y = +z
    a = affine_from_dicom([0, 0, 0], [1, 0, 0, 0, 1, 0], [2, 2], [0, 0, -3])
    g = Grid((4, 4, 4), a)
    assert np.allclose(g.index_to_world([1, 1, 3]), [2, 2, -9])
    assert np.linalg.det(g.affine[:3, :3]) < 0


def test_oblique_orientation():
    # rows along (cos30, sin30, 0), columns along (0, 0, -1) (coronal-ish, tilted 30° about z)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    row, col = np.array([c, s, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)  # (-s*1... ) = (s*(-1)-0, 0-(c*(-1)), 0) = (-s, c, 0)
    assert np.allclose(normal, [-s, c, 0])
    a = affine_from_dicom([10, 20, 30], [*row, *col], [1.5, 2.0], 4.0 * normal)
    g = Grid((3, 3, 3), a)
    # i=2 → 2*2.0 along row; j=1 → 1*1.5 along col; k=2 → 2*4.0 along normal
    expected = np.array([10, 20, 30]) + 4.0 * row + 1.5 * col + 8.0 * normal
    assert np.allclose(g.index_to_world([2, 1, 2]), expected)
    assert np.allclose(g.world_to_index(expected), [2, 1, 2])
    assert np.allclose(g.direction.T @ g.direction, np.eye(3))


def test_orientation_errors_are_clear():
    with pytest.raises(VoxeldoseError, match="ImageOrientationPatient"):
        affine_from_dicom([0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 1], [0, 0, 1])
    with pytest.raises(VoxeldoseError, match="six values"):
        affine_from_dicom([0, 0, 0], [1, 0, 0, 0], [1, 1], [0, 0, 1])


def test_resample_identity_and_shift():
    rng = np.random.default_rng(1)
    arr = rng.random((6, 7, 8))
    v = Volume(arr, Grid.axial(arr.shape, (2.0, 3.0, 4.0), (5.0, 6.0, 7.0)).affine, units="Bq/ml")
    same = resample(v, v.grid, order=1)
    assert np.allclose(same.array, arr)
    # target shifted by exactly one voxel along i: sample (i+1)
    target = Grid.axial((6, 7, 7), (2.0, 3.0, 4.0), (7.0, 6.0, 7.0))
    out = resample(v, target, order=0)
    assert np.allclose(out.array, arr[:, :, 1:])
    assert out.units == "Bq/ml"


def test_resample_linear_field_with_rigid_transform():
    """A linear field f(x) = 2x + 3y − z + 1 is reproduced exactly by trilinear interpolation,
    also through a rigid transform and onto an oblique grid."""
    g = Grid.axial((40, 40, 40), (2.0, 2.0, 2.0), (-40, -40, -40))
    xyz = g.world_coordinates()
    f = 2 * xyz[..., 0] + 3 * xyz[..., 1] - xyz[..., 2] + 1
    v = Volume(f, g.affine)
    th = math.radians(10)
    rot = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    t = np.eye(4)
    t[:3, :3] = rot
    t[:3, 3] = [1.5, -2.0, 0.5]  # moving → target
    target = Grid((5, 6, 7), affine_from_dicom([-5, -5, -5], [*rot[:, 0], *rot[:, 1]], [1.7, 1.3], 2.1 * rot[:, 2]))
    out = resample(v, target, order=1, moving_to_target=t)
    # a target point p comes from moving point T⁻¹ p
    p = target.world_coordinates()
    q = (p - t[:3, 3]) @ rot  # rot⁻¹ = rotᵀ, applied to row vectors
    expected = 2 * q[..., 0] + 3 * q[..., 1] - q[..., 2] + 1
    assert np.allclose(out.array, expected, atol=1e-9)
