"""Partial-volume correction (voxeldose.pvc) on analytic objects.

The test images are made independently of the corrections' own model: the objects are painted on a grid
4× finer than the image, blurred there with the Gaussian PSF, and averaged into the image's voxels (what a
camera of that resolution sees); occupancies are the fine grid averaged the same way.  The GTM models the
blur on the coarse grid instead, so its recovery is approximate: 2 % (the difference between blurring
before and after the voxel average, ~(voxel/FWHM)² / 12 of the PSF's variance).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from voxeldose.camera import RecoveryFit
from voxeldose.errors import VoxeldoseError
from voxeldose.pvc import (
    BACKGROUND,
    Gtm,
    effective_fwhm_mm,
    gtm,
    partition,
    rbv,
    rc,
    resampling_variance_mm2,
    shape_warning,
    size_warning,
    sphere_recovery,
    sphericity,
    voi_shape,
)

FINE = 4  # fine sub-voxels per image voxel edge
VOXEL_MM = 3.0
N = 40  # image voxels per side
FWHM_MM = 10.0


def _fine_coords() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h = VOXEL_MM / FINE
    c = (np.arange(N * FINE) + 0.5) * h - N * VOXEL_MM / 2  # mm, centred
    return np.meshgrid(c, c, c, indexing="ij")  # z, y, x


def _down(fine: np.ndarray) -> np.ndarray:
    return fine.reshape(N, FINE, N, FINE, N, FINE).mean(axis=(1, 3, 5))


def _ellipsoid(z, y, x, centre, axes) -> np.ndarray:
    return (((z - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((x - centre[2]) / axes[2]) ** 2) <= 1


@pytest.fixture(scope="module")
def scene():
    """A 'body' sphere (r 50 mm, 1 unit/ml) holding a hot sphere (r 12 mm, 10/ml) next to a warm one (r 9 mm, 4/ml)."""
    z, y, x = _fine_coords()
    body = _ellipsoid(z, y, x, (0, 0, 0), (50, 50, 50))
    hot = _ellipsoid(z, y, x, (0, 0, -14), (12, 12, 12))
    warm = _ellipsoid(z, y, x, (0, 0, 10), (9, 9, 9))
    truth = np.where(hot, 10.0, np.where(warm, 4.0, np.where(body, 1.0, 0.0)))
    sigma = FWHM_MM / (2 * math.sqrt(2 * math.log(2))) / (VOXEL_MM / FINE)
    image = _down(gaussian_filter(truth, sigma, mode="constant")).astype(np.float32)
    fractions = {
        "Body": _down(body.astype(float)).astype(np.float32),
        "Hot": _down(hot.astype(float)).astype(np.float32),
        "Warm": _down(warm.astype(float)).astype(np.float32),
    }
    true_totals = {n: float((f * _down(truth)).sum()) for n, f in fractions.items()}
    return image, fractions, true_totals, _down(truth).astype(np.float32)


SPACING = (VOXEL_MM,) * 3


def _means(totals: dict[str, float], fractions) -> dict[str, float]:
    return {n: totals[n] / float(fractions[n].sum()) for n in fractions}


def test_sphere_recovery_matches_a_blurred_sphere() -> None:
    """The analytic mean recovery equals that of a finely sampled sphere blurred numerically (0.5 mm grid)."""
    h, r = 0.5, 8.0
    c = (np.arange(96) + 0.5) * h - 24.0
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    inside = z * z + y * y + x * x <= r * r
    blurred = gaussian_filter(inside.astype(float), FWHM_MM / (2 * math.sqrt(2 * math.log(2))) / h, mode="constant")
    numeric = float(blurred[inside].mean())
    volume_ml = inside.sum() * h**3 / 1000.0
    assert sphere_recovery(volume_ml, FWHM_MM) == pytest.approx(numeric, rel=0.01)
    # a large sphere (R ≫ σ) loses through its surface as a flat edge does: σ/√(2π) per unit area, × 3/R
    big_ml, sd = 5000.0, FWHM_MM / (2 * math.sqrt(2 * math.log(2)))
    radius = (3 * big_ml * 1000 / (4 * math.pi)) ** (1 / 3)
    assert sphere_recovery(big_ml, FWHM_MM) == pytest.approx(1 - 3 * sd / (math.sqrt(2 * math.pi) * radius), abs=2e-3)
    assert sphere_recovery(1.0, 0.0) == 1.0


def test_gtm_recovers_the_true_concentrations(scene) -> None:
    image, fractions, true_totals, _ = scene
    res = gtm(image, fractions, FWHM_MM, SPACING)
    observed = _means(res.observed, fractions)
    corrected, true = _means(res.corrected, fractions), _means(true_totals, fractions)
    assert observed["Warm"] < 0.8 * true["Warm"]  # the partial-volume loss is real
    for name in fractions:  # Body overlaps the spheres: its corrected total is that of all its parts
        assert corrected[name] == pytest.approx(true[name], rel=0.02), name
    assert res.factor("Hot") == pytest.approx(res.corrected["Hot"] / res.observed["Hot"])


def test_rbv_gives_a_corrected_map(scene) -> None:
    image, fractions, true_totals, truth = scene
    res = rbv(image, fractions, FWHM_MM, SPACING)
    assert res.image is not None and res.image.shape == image.shape and res.image.dtype == image.dtype
    corrected, true = _means(res.corrected, fractions), _means(true_totals, fractions)
    for name in fractions:
        assert corrected[name] == pytest.approx(true[name], rel=0.02), name
    core = fractions["Hot"] == 1.0  # voxel-wise: the hot sphere's fully occupied voxels are its concentration
    assert np.median(res.image[core]) == pytest.approx(10.0, rel=0.03)
    assert np.median(image[core]) < 9.0


def test_rc_divides_by_the_recovery_of_the_voi_volume(scene) -> None:
    image, fractions, _, _ = scene
    fit = RecoveryFit(rc_max=0.95, v_half_ml=3.0, slope=1.2, covariance=((0,) * 3,) * 3, residuals=[])
    res = rc(image, {"Hot": fractions["Hot"]}, SPACING, fit)
    volume = float(fractions["Hot"].sum()) * VOXEL_MM**3 / 1000.0
    by_hand = 0.95 / (1 + (3.0 / volume) ** 1.2)
    assert res.corrected["Hot"] == pytest.approx(res.observed["Hot"] / by_hand, rel=1e-9)
    assert res.notes == []  # a sphere: no shape warning


@pytest.mark.parametrize("fwhm_mm", [0.0, 0.1, 0.5])
def test_an_unblurred_image_passes_through_unchanged(scene, fwhm_mm: float) -> None:
    """An ideal image (no blur) with FWHM 0, below the zero-blur threshold (0.1 mm), or above it but far below a
    voxel (0.5 mm: the general path, whose sampled Gaussian is the identity) stays within 0.5 %."""
    _, fractions, _, truth = scene
    noisy = (truth * np.random.default_rng(3).uniform(0.9, 1.1, truth.shape)).astype(np.float32)
    for method in (gtm, rbv):
        res = method(noisy, fractions, fwhm_mm, SPACING)
        for name in fractions:
            assert res.corrected[name] == pytest.approx(res.observed[name], rel=0.005), (method.__name__, name)
        if res.image is not None:
            assert np.allclose(res.image, noisy, rtol=0.005, atol=1e-6)
    ideal_fit = RecoveryFit(rc_max=1.0, v_half_ml=1e-6, slope=1.0, covariance=((0,) * 3,) * 3, residuals=[])
    res = rc(noisy, fractions, SPACING, ideal_fit)
    for name in fractions:
        assert res.corrected[name] == pytest.approx(res.observed[name], rel=0.005), name


def test_partition_makes_body_the_remaining_body(scene) -> None:
    _, fractions, _, _ = scene
    w = partition(fractions)
    assert list(w) == ["Warm", "Hot", "Body", BACKGROUND]  # smallest first
    total = sum(w.values())
    assert np.allclose(total, 1.0, atol=1e-6)
    remaining = fractions["Body"] - fractions["Hot"] - fractions["Warm"]
    assert np.allclose(w["Body"], remaining, atol=1e-6)


def test_small_and_elongated_vois_are_warned(scene) -> None:
    _, fractions, _, _ = scene
    small = voi_shape(fractions["Warm"], SPACING)  # 18 mm < 2 × 10 mm
    warning = size_warning("Warm", small, FWHM_MM)
    assert warning is not None and "Warm" in warning and "% low" in warning
    assert size_warning("Body", voi_shape(fractions["Body"], SPACING), FWHM_MM) is None
    z, y, x = _fine_coords()
    rod = _down(_ellipsoid(z, y, x, (0, 0, 0), (12, 12, 48)).astype(float))
    assert sphericity(fractions["Hot"], SPACING) > 0.9
    s = voi_shape(rod, SPACING)
    assert s.sphericity is not None and s.sphericity < 0.8
    assert shape_warning("Rod", s) is not None
    res = rc(
        rod,
        {"Rod": rod},
        SPACING,
        RecoveryFit(rc_max=1, v_half_ml=1, slope=1, covariance=((0,) * 3,) * 3, residuals=[]),
    )
    assert any("sphericity" in n for n in res.notes)


def test_gtm_model_is_reused_across_images(scene) -> None:
    image, fractions, _, _ = scene
    model = Gtm.build(fractions, FWHM_MM, SPACING)
    once = gtm(image, fractions, FWHM_MM, SPACING)
    again = gtm(2 * image, fractions, FWHM_MM, SPACING, model=model)
    for name in fractions:
        assert again.corrected[name] == pytest.approx(2 * once.corrected[name], rel=1e-5)


def test_negative_fwhm_is_refused(scene) -> None:
    image, fractions, _, _ = scene
    with pytest.raises(VoxeldoseError, match="FWHM"):
        gtm(image, fractions, -1.0, SPACING)


def test_resampling_blur_is_the_interpolation_kernels_variance() -> None:
    """Linear interpolation half-way between samples is the kernel (½, ½): variance ¼ voxel²; on a sample, 0;
    over uniformly spread offsets, 1/6 voxel² on average."""
    pts = np.argwhere(np.ones((6, 6, 6)))[:, ::-1].astype(float)
    shift = np.eye(4)
    shift[:3, 3] = (0.5, 0.5, 0.5)
    assert resampling_variance_mm2(shift, pts, (4.0, 4.0, 4.0)) == pytest.approx(0.25 * 16.0)
    assert resampling_variance_mm2(np.eye(4), pts, (4.0, 4.0, 4.0)) == 0.0
    rng = np.random.default_rng(0)
    spread = rng.uniform(0, 50, (20000, 3))
    assert resampling_variance_mm2(np.eye(4), spread, (1.0, 1.0, 1.0)) == pytest.approx(1 / 6, rel=0.02)
    # Gaussian variances add: σ² = (FWHM/2.355)² + variance
    sd = 11.0 / (2 * math.sqrt(2 * math.log(2)))
    assert effective_fwhm_mm(11.0, 4.0) == pytest.approx(2 * math.sqrt(2 * math.log(2)) * math.sqrt(sd**2 + 4.0))
