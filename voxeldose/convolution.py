"""FFT convolution of a 3-D map with a dose-voxel kernel, for NumPy and CuPy alike.

``convolve(tia, kernel)`` returns ``D[x] = Σ_s tia[s] · K[c + x - s]`` on the grid of ``tia``
("same" mode: ``c`` is the centre voxel of the odd-shaped kernel, so a source at voxel ``s``
puts the kernel's centre on ``s``).  Outside the grid the map is zero: nothing wraps around.

How (and why it is fast):

* **Minimal padding.**  With the kernel stored *wrapped* (its centre at index 0, negative offsets at
  the end of the padded array), a circular convolution of length ``L`` is exact on the grid's own
  ``n`` voxels as soon as ``L ≥ n + h`` (``h`` = kernel half-width): contributions that wrap land in
  ``[n, L)``, which we discard.  That is ``h`` voxels less per axis than the full linear size
  ``n + 2h`` that :func:`scipy.signal.fftconvolve` pads to.  ``L`` is then rounded up to a fast FFT
  length (:func:`scipy.fft.next_fast_len`, real transforms: 2ᵃ3ᵇ5ᶜ).
* **Real transforms in float32** (``rfftn``/``irfftn``, complex64 spectra), multi-threaded pocketfft
  on the CPU, cuFFT on the GPU.  Accuracy of float32 (measured, see ``benchmarks/RESULTS-dose.md``
  and ``tests/test_convolution.py``): the max |D₃₂ − D₆₄| is ~1e-7…1e-6 of max D — round-off of an FFT
  convolution is relative to the *largest* values, so voxels far below the maximum (≲1e-4 of it)
  carry larger relative errors; dosimetry never reads them.  Pass ``dtype=numpy.float64`` for a
  double-precision result.
* **Cached kernel spectra.**  The kernel's FFT depends on (kernel data, padded shape, device, dtype)
  only; it is kept in a small LRU (:func:`cache_info`, :func:`clear_cache`), so a second dose map with
  the same kernel and grid costs one forward and one inverse transform.
* **Overlap-add along k** when the padded grid does not fit in GPU memory: the map is cut into slabs
  of ``C`` slices, each slab is convolved on a grid padded to ``C + 2h`` slices and its result added
  into the output, ``h`` slices beyond the slab on each side.  The slab size follows the free device
  memory (or ``chunk_k=`` — the CPU tests use it to exercise exactly this path).  If even one slice
  per slab does not fit, or CuPy runs out of memory, the convolution falls back to the CPU with one
  log line and the result is returned on the GPU as asked.

The code path is the same for NumPy and CuPy; only :mod:`voxeldose.backend` knows which is which.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeAlias, cast

import numpy as np
from numpy.typing import DTypeLike, NDArray

from . import backend
from .backend import Array
from .errors import VoxeldoseError

__all__ = ["CacheInfo", "cache_info", "clear_cache", "convolve", "kernel_key", "padded_shape"]

log = logging.getLogger(__name__)

#: Kernel spectra kept (LRU).  One 256³ grid with a 51³ kernel: 288×288×145 complex64 ≈ 96 MB;
#: a 512×512×320 CT grid: ≈ 0.6 GB (GPU memory!), hence a small number.
CACHE_MAXSIZE = 4

#: Device-memory estimate for one slab, in units of the complex spectrum's size: the spectrum of the
#: map, the cached kernel spectrum, the padded real input, the real output and cuFFT's work area.
_MEMORY_FACTOR = 5.0
#: Fraction of the free device memory a convolution may plan to use.
_MEMORY_SHARE = 0.7


#: Key of a cached kernel spectrum: (kernel content hash, padded shape, device tag, dtype string).
_SpectrumKey: TypeAlias = tuple[str, tuple[int, int, int], str, str]


class KernelLike(Protocol):
    """What :func:`convolve` needs of a kernel object: a :class:`~voxeldose.kernels.DoseKernel` qualifies."""

    @property
    def array(self) -> Array:
        """The kernel ``[k, j, i]``, odd size along every axis, Gy per Bq·s."""
        ...


@dataclass(frozen=True)
class CacheInfo:
    """Counters of the kernel-spectrum cache (as :func:`functools.lru_cache`'s ``cache_info``)."""

    hits: int
    misses: int
    currsize: int
    maxsize: int


class _SpectrumCache:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[_SpectrumKey, Array] = OrderedDict()

    def get(self, key: _SpectrumKey, build: Callable[[], Array]) -> Array:
        if key in self._data:
            self.hits += 1
            self._data.move_to_end(key)
            return self._data[key]
        self.misses += 1
        value = build()
        if self.maxsize > 0:
            self._data[key] = value
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        self._data.clear()
        self.hits = self.misses = 0


_cache = _SpectrumCache(CACHE_MAXSIZE)


def cache_info() -> CacheInfo:
    """Hits, misses and size of the kernel-spectrum cache."""
    return CacheInfo(_cache.hits, _cache.misses, len(_cache._data), _cache.maxsize)


def clear_cache() -> None:
    """Empty the kernel-spectrum cache and reset its counters (frees GPU memory it held)."""
    _cache.clear()


def kernel_key(kernel: Array) -> str:
    """Content hash of a kernel array (shape, dtype and values): the cache key for its spectra.

    A :class:`~voxeldose.kernels.DoseKernel`'s ``id`` is not used on purpose: hashing ~1 MB costs a
    millisecond and stays right even if someone edits an array in place.
    """
    a = np.ascontiguousarray(backend.to_host(kernel))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _kernel_array(kernel: KernelLike | Array) -> Array:
    arr: Array = getattr(kernel, "array", kernel)  # a DoseKernel or a bare array
    if getattr(arr, "ndim", None) != 3:
        raise VoxeldoseError(
            "the dose kernel must be a 3-D array [k, j, i]",
            tag="kernel",
            expected="a 3-D array with odd size along every axis",
            found=f"ndim={getattr(arr, 'ndim', None)}",
        )
    if any(m % 2 == 0 for m in arr.shape):
        raise VoxeldoseError(
            "the dose kernel must have an odd size along every axis (its centre is the source voxel)",
            tag="kernel",
            expected="odd shape",
            found=tuple(arr.shape),
        )
    return arr


def _fast(fft: backend.FFT, n: int) -> int:
    return int(fft.next_fast_len(int(n), real=True))


def padded_shape(
    shape: tuple[int, int, int], kernel_shape: tuple[int, int, int], *, xp: ModuleType = np
) -> tuple[int, int, int]:
    """Padded FFT grid that :func:`convolve` uses for a map of ``shape`` (no chunking)."""
    fft = backend.fft_module(xp)
    half = [min((m - 1) // 2, n - 1) for m, n in zip(kernel_shape, shape)]
    return cast("tuple[int, int, int]", tuple(_fast(fft, n + h) for n, h in zip(shape, half)))  # 3 axes


def _device_tag(xp: ModuleType) -> str:
    if xp is np:
        return "cpu"
    return f"gpu:{xp.cuda.Device().id}"  # GPU only


def _wrapped_spectrum(
    xp: ModuleType, fft: backend.FFT, k_host: NDArray[Any], L: tuple[int, int, int], dtype: np.dtype[Any]
) -> Array:
    """rFFT of the kernel placed with its centre at index 0 of an ``L`` grid (negative offsets wrap)."""
    k = xp.asarray(k_host, dtype=dtype)
    idx = [xp.asarray((np.arange(m) - (m - 1) // 2) % n) for m, n in zip(k.shape, L)]
    wrapped = xp.zeros(L, dtype=dtype)
    wrapped[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]] = k
    return fft.rfftn(wrapped, s=L, axes=(0, 1, 2), overwrite_x=True)


def _plan_chunk(
    xp: ModuleType,
    fft: backend.FFT,
    shape: tuple[int, ...],
    half: tuple[int, ...],
    complex_itemsize: int,
    chunk_k: int | None,
) -> int | None:
    """Slices per slab: ``nk`` (no chunking), fewer, or ``None`` (does not fit: use the CPU)."""
    nk, nj, ni = shape
    if chunk_k is not None:
        return max(1, min(int(chunk_k), nk))
    free = backend.free_memory_bytes(xp)
    if free is None:  # host memory: no chunking
        return nk
    lj, li = _fast(fft, nj + half[1]), _fast(fft, ni + half[2])
    slice_bytes = lj * (li // 2 + 1) * complex_itemsize * _MEMORY_FACTOR
    budget = free * _MEMORY_SHARE
    if _fast(fft, nk + half[0]) * slice_bytes <= budget:
        return nk
    c = int(budget // slice_bytes) - 2 * half[0]
    while c >= 1 and _fast(fft, c + 2 * half[0]) * slice_bytes > budget:
        c -= 1
    return c if c >= 1 else None


def convolve(
    tia: Array,
    kernel: KernelLike | Array,
    *,
    xp: ModuleType | None = None,
    dtype: DTypeLike = np.float32,
    out: Array | None = None,
    chunk_k: int | None = None,
) -> Array:
    """Convolve a 3-D map with an odd-shaped kernel, "same" mode, zero outside the grid.

    Parameters
    ----------
    tia:
        The map ``[k, j, i]`` (NumPy or CuPy), e.g. time-integrated activity in Bq·s per voxel.
    kernel:
        A :class:`~voxeldose.kernels.DoseKernel` (its ``array`` is used) or a 3-D array with odd
        shape; its centre voxel is the source voxel.  The kernel may be larger than the map.
    xp:
        Array module to compute with (``numpy`` or ``cupy``); default: the one ``tia`` lives in.
        ``tia`` is moved there if it lives elsewhere; the result stays in ``xp``.
    dtype:
        Working precision: ``float32`` (default; complex64 spectra) or ``float64``.
    out:
        Optional array of ``tia``'s shape in ``xp`` to write the result into.
    chunk_k:
        Force overlap-add slabs of this many slices along ``k`` (default: only when the padded grid
        does not fit in GPU memory).

    Returns
    -------
    The convolution, same shape as ``tia``, dtype ``dtype`` (or ``out``'s), in ``xp``.
    """
    xp = backend.xp_for(tia) if xp is None else xp
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    k_arr = _kernel_array(kernel)
    if getattr(tia, "ndim", None) != 3:
        raise VoxeldoseError(
            "the map to convolve must be 3-D [k, j, i]", tag="tia", found=f"ndim={getattr(tia, 'ndim', None)}"
        )
    shape = tuple(int(n) for n in tia.shape)
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")

    # Offsets beyond n-1 voxels never connect two voxels of the grid: crop such kernels.
    half = tuple(min((m - 1) // 2, n - 1) for m, n in zip(k_arr.shape, shape))
    k_host = backend.to_host(k_arr)
    c = [(m - 1) // 2 for m in k_host.shape]
    k_host = k_host[tuple(slice(ci - h, ci + h + 1) for ci, h in zip(c, half))]
    key = kernel_key(k_host)

    fft = backend.fft_module(xp)
    complex_itemsize = 8 if dtype == np.float32 else 16
    chunk = _plan_chunk(xp, fft, shape, half, complex_itemsize, chunk_k)
    if chunk is None:
        log.warning(
            "voxeldose: a %s map with a %s kernel does not fit in GPU memory even in one-slice slabs; "
            "convolving on the CPU",
            shape,
            tuple(k_arr.shape),
        )
        return _on_cpu_then_back(xp, tia, k_host, dtype, out)
    try:
        return _convolve(xp, fft, xp.asarray(tia), k_host, key, shape, half, dtype, out, chunk)
    except Exception as exc:
        out_of_memory = "OutOfMemory" in type(exc).__name__ or "ALLOC_FAILED" in str(exc)  # CuPy, cuFFT
        if xp is np or not out_of_memory:
            raise
        log.warning("voxeldose: GPU out of memory (%s); convolving on the CPU", exc)  # GPU only
        return _on_cpu_then_back(xp, tia, k_host, dtype, out)


def _on_cpu_then_back(
    xp: ModuleType, tia: Array, k_host: NDArray[Any], dtype: np.dtype[Any], out: Array | None
) -> Array:
    res = convolve(backend.to_host(tia), k_host, xp=np, dtype=dtype)
    if out is not None:
        out[...] = xp.asarray(res)
        return out
    return xp.asarray(res)


def _convolve(
    xp: ModuleType,
    fft: backend.FFT,
    tia: Array,
    k_host: NDArray[Any],
    key: str,
    shape: tuple[int, ...],
    half: tuple[int, ...],
    dtype: np.dtype[Any],
    out: Array | None,
    chunk: int,
) -> Array:
    nk, nj, ni = shape
    hk, hj, hi = half
    a = tia if tia.dtype == dtype else tia.astype(dtype)
    lj, li = _fast(fft, nj + hj), _fast(fft, ni + hi)
    if chunk >= nk:
        lk = _fast(fft, nk + hk)
    else:
        lk = _fast(fft, chunk + 2 * hk)
    L = (lk, lj, li)
    spec = _cache.get(
        (key, L, _device_tag(xp), dtype.str),
        lambda: _wrapped_spectrum(xp, fft, k_host, L, dtype),
    )
    if chunk >= nk:
        f = fft.rfftn(a, s=L, axes=(0, 1, 2), overwrite_x=False)
        f *= spec
        if fft.prune_inverse:
            # Inverse axis by axis, keeping only the rows of the grid after each pass: the padding
            # rows are never transformed back (−30 % time for the inverse with pocketfft).
            f = fft.ifft(f, axis=0, overwrite_x=True)[:nk]
            f = fft.ifft(f, axis=1, overwrite_x=True)[:, :nj]
            r = fft.irfft(f, n=li, axis=2)
        else:
            r = fft.irfftn(f, s=L, axes=(0, 1, 2), overwrite_x=True)
        del f
        if out is None:
            return xp.ascontiguousarray(r[:nk, :nj, :ni])
        out[...] = r[:nk, :nj, :ni]
        return out

    # Overlap-add along k.  A slab [k0, k1) sits at 0…C-1 of the padded grid; its contributions
    # reach k0-h … k1+h-1, stored at L-h … L-1 (wrapped) and 0 … C+h-1: no overlap since L ≥ C+2h.
    if out is None:
        out = xp.zeros(shape, dtype=dtype)
    else:
        out[...] = 0
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        lo, hi_ = max(0, k0 - hk), min(nk, k1 + hk)
        f = fft.rfftn(a[k0:k1], s=L, axes=(0, 1, 2), overwrite_x=False)
        f *= spec
        r = fft.irfftn(f, s=L, axes=(0, 1, 2), overwrite_x=True)
        del f
        out[k0:hi_] += r[: hi_ - k0, :nj, :ni]
        if lo < k0:
            out[lo:k0] += r[lk - (k0 - lo) :, :nj, :ni]
        del r
    return out
