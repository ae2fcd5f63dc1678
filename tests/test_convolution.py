"""FFT convolution and array backend: against direct summation, alignment, energy balance, cache, devices.

Reference values come from definitions (direct summation of D[x] = Σ_s A[s] K[c + x − s]), not from
the code under test.  Tolerances: float64 FFT round-off is ~1e-15 relative to the largest value, so
1e-6 is a loose bound; float32 carries ~6e-8 per operation and an FFT grows it like log N, so 1e-5
relative to the maximum bounds it for these sizes.
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from voxeldose import backend
from voxeldose.convolution import cache_info, clear_cache, convolve, padded_shape
from voxeldose.errors import VoxeldoseError


def direct_convolution(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """D[x] = Σ_s a[s] · k[c + x − s], zero outside the grid: a loop over every source voxel."""
    out = np.zeros(a.shape, dtype=np.float64)
    c = [(m - 1) // 2 for m in k.shape]
    for s in np.ndindex(*a.shape):
        if a[s] == 0:
            continue
        # target x ranges over s - c … s + c, clipped to the grid
        lo = [max(0, s[d] - c[d]) for d in range(3)]
        hi = [min(a.shape[d], s[d] + c[d] + 1) for d in range(3)]
        ks = tuple(slice(lo[d] - s[d] + c[d], hi[d] - s[d] + c[d]) for d in range(3))
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += a[s] * k[ks]
    return out


@pytest.fixture()
def rng():
    return np.random.default_rng(20240531)


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cpu")


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("kshape", [(5, 7, 3), (3, 3, 3), (21, 21, 21), (9, 1, 5)])
def test_matches_direct_summation(rng, kshape):
    a = rng.random((9, 9, 9))
    a[rng.random(a.shape) < 0.3] = 0.0
    k = rng.random(kshape)  # asymmetric: catches a flipped (correlation) or shifted kernel
    ref = direct_convolution(a, k)
    scale = np.abs(ref).max()
    d64 = convolve(a, k, dtype=np.float64)
    d32 = convolve(a, k, dtype=np.float32)
    assert d64.dtype == np.float64 and d32.dtype == np.float32
    assert d64.shape == a.shape
    assert np.abs(d64 - ref).max() <= 1e-6 * scale
    assert np.abs(d32 - ref).max() <= 1e-5 * scale


def test_non_cubic_grid_matches_direct(rng):
    a = rng.random((6, 11, 8))
    k = rng.random((7, 3, 5))
    ref = direct_convolution(a, k)
    assert np.abs(convolve(a, k, dtype=np.float64) - ref).max() <= 1e-6 * np.abs(ref).max()


def test_delta_reproduces_kernel_centred(rng):
    k = rng.random((7, 7, 7))
    a = np.zeros((15, 15, 15))
    a[7, 7, 7] = 1.0
    d = convolve(a, k, dtype=np.float64)
    np.testing.assert_allclose(d[4:11, 4:11, 4:11], k, rtol=1e-10, atol=1e-14)
    assert np.abs(d).sum() == pytest.approx(k.sum(), rel=1e-10)  # nothing anywhere else


def test_same_mode_alignment_off_centre_anisotropic(rng):
    """Anisotropic voxels ⇒ kernels of different extent per axis; source near a corner (clipped)."""
    k = rng.random((3, 5, 9))  # e.g. 6 mm slices, 3.6 mm rows, 2 mm columns
    a = np.zeros((12, 10, 16))
    s = (1, 8, 2)
    a[s] = 2.5
    d = convolve(a, k, dtype=np.float64)
    # kernel centre (1, 2, 4) lands on s; parts beyond the grid are cut, nothing wraps around
    expect = np.zeros_like(a)
    expect[0:3, 6:10, 0:7] = 2.5 * k[0:3, 0:4, 2:9]
    np.testing.assert_allclose(d, expect, rtol=1e-10, atol=1e-12)


def test_no_wraparound_far_edge(rng):
    """A source on the last voxel must not leak to the first (circular-convolution artefact)."""
    k = np.ones((11, 11, 11))
    a = np.zeros((16, 16, 16))
    a[-1, -1, -1] = 1.0
    d = convolve(a, k, dtype=np.float64)
    assert np.abs(d[:10, :, :]).max() < 1e-12
    assert d[-6:, -6:, -6:].min() == pytest.approx(1.0)


def test_uniform_block_energy_balance(rng):
    """At the centre of a uniform block wider than the kernel, D = A · Σ K (every offset contributes)."""
    k = rng.random((9, 7, 11))
    a = np.zeros((30, 30, 30))
    a[5:25, 5:25, 5:25] = 3.0  # the centre's 9×7×11 neighbourhood lies inside
    d32 = convolve(a, k)
    assert d32[15, 15, 15] == pytest.approx(3.0 * k.sum(), rel=1e-5)


def test_out_parameter_and_input_untouched(rng):
    a = rng.random((8, 9, 10)).astype(np.float32)
    a0 = a.copy()
    k = rng.random((3, 5, 3))
    out = np.empty(a.shape, np.float32)
    res = convolve(a, k, out=out)
    assert res is out
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_allclose(out, direct_convolution(a.astype(float), k), rtol=1e-5, atol=1e-5 * out.max())


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_overlap_add_chunks_equal_whole(rng, chunk):
    """The GPU-memory path (slabs along k, overlap-add) gives the same map as one transform."""
    a = rng.random((17, 12, 10))
    k = rng.random((7, 5, 5))
    ref = direct_convolution(a, k)
    d = convolve(a, k, dtype=np.float64, chunk_k=chunk)
    assert np.abs(d - ref).max() <= 1e-6 * np.abs(ref).max()
    out = np.full(a.shape, 99.0)
    convolve(a, k, dtype=np.float64, chunk_k=chunk, out=out)
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()


def test_float32_accuracy_on_dose_like_map():
    """float32 vs float64 on a dose-like map: peaked activity, smooth fast-falling kernel."""
    rng = np.random.default_rng(1)
    n = 64
    z, y, x = np.mgrid[:n, :n, :n]
    a = 1e9 * np.exp(-((x - 30) ** 2 + (y - 34) ** 2 + (z - 31) ** 2) / 60.0)  # an organ
    a += 5e8 * ((x - 45) ** 2 + (y - 20) ** 2 + (z - 40) ** 2 < 16)  # a tumour
    a *= 1 + 0.1 * rng.standard_normal(a.shape)  # SPECT noise
    a = np.clip(a, 0, None)
    r = np.sqrt(np.add.outer(np.add.outer(np.arange(-12, 13) ** 2, np.arange(-12, 13) ** 2), np.arange(-12, 13) ** 2))
    k = 1e-12 * np.exp(-r / 0.6) + 1e-15 * np.exp(-r / 12.0) / np.maximum(r, 0.5) ** 2
    d64 = convolve(a, k, dtype=np.float64)
    d32 = convolve(a, k, dtype=np.float32)
    m = d64.max()
    assert np.abs(d32 - d64).max() <= 1e-5 * m
    hot = d64 >= 0.1 * m
    assert (np.abs(d32 - d64)[hot] / d64[hot]).max() <= 1e-5


# ---------------------------------------------------------------------------- cache


def test_spectrum_cache_hits(rng):
    clear_cache()
    a = rng.random((10, 11, 12))
    k = rng.random((5, 5, 5))
    convolve(a, k)
    assert (cache_info().hits, cache_info().misses) == (0, 1)
    d2 = convolve(2 * a, k)  # same kernel, same grid: no new spectrum
    assert (cache_info().hits, cache_info().misses) == (1, 1)
    np.testing.assert_allclose(d2, 2 * convolve(a, k), rtol=1e-5, atol=1e-6 * d2.max())
    convolve(a, k.copy())  # same content, another object: still a hit
    assert cache_info().misses == 1
    convolve(rng.random((14, 11, 12)), k)  # other padded shape
    convolve(a, k, dtype=np.float64)  # other dtype
    k2 = k.copy()
    k2[2, 2, 2] += 1
    convolve(a, k2)  # other kernel content
    assert cache_info().misses == 4
    clear_cache()
    assert cache_info().currsize == 0


def test_padded_shape_is_fast_and_sufficient():
    from scipy.fft import next_fast_len

    L = padded_shape((256, 256, 256), (51, 51, 51))
    assert L == (next_fast_len(281, real=True),) * 3 == (288, 288, 288)


def test_bad_kernel_shapes(rng):
    with pytest.raises(VoxeldoseError, match="odd"):
        convolve(rng.random((5, 5, 5)), rng.random((4, 5, 5)))
    with pytest.raises(VoxeldoseError, match="3-D"):
        convolve(rng.random((5, 5, 5)), rng.random((5, 5)))


# ---------------------------------------------------------------------------- backend


def test_device_env_cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert backend.get_device() == "cpu"
    assert backend.namespace("cpu") is np


def test_device_env_bad_value(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "tpu")
    with pytest.raises(VoxeldoseError, match=backend.ENV_VAR):
        backend.get_device()


@pytest.fixture()
def no_gpu(monkeypatch):
    """A CuPy that imports but fails at first device use, as on the build machines."""

    class CUDARuntimeError(RuntimeError):
        pass

    def fail(*_a, **_k):
        raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake = types.ModuleType("cupy")
    fake.__version__ = "13.fake"
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=fail))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    backend._reset_probe()
    yield
    backend._reset_probe()


def test_device_gpu_requested_without_gpu_is_clear_error(monkeypatch, no_gpu):
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    with pytest.raises(VoxeldoseError) as ei:
        backend.get_device()
    msg = str(ei.value)
    assert "VOXELDOSE_DEVICE" in msg and "cudaErrorInsufficientDriver" in msg


def test_device_auto_falls_back_with_one_log_line(monkeypatch, caplog, no_gpu):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    with caplog.at_level(logging.INFO, logger="voxeldose.backend"):
        assert backend.get_device() == "cpu"
        assert backend.get_device() == "cpu"
    lines = [r for r in caplog.records if "CPU" in r.getMessage()]
    assert len(lines) == 1 and "cudaErrorInsufficientDriver" in lines[0].getMessage()


def test_device_gpu_on_this_machine(monkeypatch):
    """With the real environment: 'gpu' either works (CuPy + device) or raises the clear error."""
    backend._reset_probe()
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    if backend.gpu_available():
        assert backend.get_device() == "gpu"
    else:
        with pytest.raises(VoxeldoseError, match="VOXELDOSE_DEVICE=gpu"):
            backend.get_device()
    backend._reset_probe()


def test_host_helpers(rng):
    a = rng.random((3, 3, 3))
    assert backend.xp_for(a) is np
    assert backend.to_host(a) is a
    assert backend.to_device(a, "cpu") is a
    assert backend.device_of(a) == "cpu"
    assert backend.free_memory_bytes(np) is None
    fft = backend.fft_module(np)
    assert "workers" in fft.name
    assert fft.irfftn(fft.rfftn(a, s=(4, 4, 4)), s=(4, 4, 4))[:3, :3, :3] == pytest.approx(a)
    with pytest.raises(TypeError):
        backend.xp_for([1, 2, 3])


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_matches_cpu():
    backend._reset_probe()
    if not backend.gpu_available():
        pytest.skip("needs CuPy and a working CUDA device")
    import cupy as cp

    rng = np.random.default_rng(3)
    a = rng.random((40, 48, 56)).astype(np.float32)
    k = rng.random((11, 11, 11))
    ref = convolve(a, k, xp=np)
    got = convolve(cp.asarray(a), k)
    assert isinstance(got, cp.ndarray)
    assert float(np.abs(got.get() - ref).max()) <= 1e-5 * float(ref.max())
    chunked = convolve(cp.asarray(a), k, chunk_k=7)
    assert float(np.abs(chunked.get() - ref).max()) <= 1e-5 * float(ref.max())
