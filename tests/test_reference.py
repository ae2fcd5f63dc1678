"""The phantom's reference dose: the pipeline's kernel on the exact TIA (truth/reference_dose_gy.npy)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
from scipy.signal import fftconvolve

from voxeldose.dose import default_kernel_size
from voxeldose.kernels import get_kernel
from voxeldose.phantom import VOI_NAMES, PhantomSettings, labels_on, spect_grid, write_phantom
from voxeldose.reference import REFERENCE_DOSE_FILE, voi_mean_doses


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reference")
    write_phantom(root, PhantomSettings.small(poisson_noise=False))
    return root, json.loads((root / "truth" / "truth.json").read_text())


def test_reference_dose_is_the_kernel_convolved_with_the_exact_tia(small) -> None:
    """An independent convolution (scipy's fftconvolve in float64) of the truth TIA with the kernel the pipeline
    picks for that grid gives the written map (float32 rounding and FFT noise: 1e-4 of the maximum)."""
    root, truth = small
    tia = np.load(root / "truth" / "tia_bqs.npy")
    got = np.load(root / "truth" / REFERENCE_DOSE_FILE)
    sp = (truth["settings"]["spect_voxel_mm"],) * 3
    k = get_kernel("Lu-177", sp, "soft-tissue", default_kernel_size(sp, tia.shape))
    want = fftconvolve(tia, k.array, mode="same")
    assert got.shape == tia.shape
    assert np.abs(got - want).max() <= 1e-4 * want.max()
    assert truth["reference_dose"]["file"] == REFERENCE_DOSE_FILE


def test_reference_voi_means_are_occupancy_weighted(small) -> None:
    """Body (every label) is the volume-weighted mean of its parts, with the truth's own supersampled volumes;
    each large organ's mean is within 10 % of the mean over the voxels whose centre lies in it (they differ by the
    edge voxels only, which count by their occupancy)."""
    root, truth = small
    means = truth["reference_dose"]["voi_mean_gy"]
    vols = {n: truth["voi"][n]["volume_ml"] for n in VOI_NAMES.values()}
    body = sum(means[n] * vols[n] for n in vols) / sum(vols.values())
    assert means["Body"] == pytest.approx(body, rel=1e-9)
    dose = np.load(root / "truth" / REFERENCE_DOSE_FILE)
    labels = np.load(root / "truth" / "labels_spect.npy")
    for lab, name in VOI_NAMES.items():
        if name in ("Liver", "Kidney_L", "Kidney_R"):  # large organs: few edge voxels
            centre = float(dose[labels == lab].mean())
            assert means[name] == pytest.approx(centre, rel=0.1), name


def test_voi_mean_doses_of_a_uniform_map_are_that_value() -> None:
    st = PhantomSettings.small()
    grid = spect_grid(st)
    means = voi_mean_doses(np.full(grid.shape, 2.5), grid, partial(labels_on, settings=st), VOI_NAMES, supersample=2)
    assert set(means) == {*VOI_NAMES.values(), "Body"}
    assert all(v == pytest.approx(2.5, rel=1e-12) for v in means.values())
