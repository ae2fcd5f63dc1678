"""Array backend: NumPy on the CPU, CuPy on a CUDA GPU — chosen in one place.

Every numeric stage works in the namespace of its input array (:func:`xp_for`) and asks this
module for the matching FFT functions (:func:`fft_module`).  Host↔device copies happen only at stage
boundaries, through :func:`to_device` and :func:`to_host`.  The GPU-only code is the few lines below
that import CuPy; everything numeric elsewhere is written once for both namespaces.

Device choice (:func:`get_device`):

* ``VOXELDOSE_DEVICE=cpu``  — always NumPy.
* ``VOXELDOSE_DEVICE=gpu``  — CuPy on a working CUDA device, else :class:`VoxeldoseError` naming
  the variable (a job that asked for a GPU must not silently take 50× longer).
* ``VOXELDOSE_DEVICE=auto`` (default, also when unset) — CuPy if it imports *and* a device
  answers a first tiny computation, else NumPy with one ``logging`` line saying why.

CuPy can import fine and still fail at first device use (on the build machines:
``CUDARuntimeError: cudaErrorInsufficientDriver``), so the probe runs a real kernel, once per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, TypeAlias, cast

import numpy as np
from numpy.typing import NDArray

from .errors import VoxeldoseError

__all__ = [
    "ENV_VAR",
    "FFT",
    "Array",
    "device_of",
    "fft_module",
    "free_memory_bytes",
    "get_device",
    "gpu_available",
    "namespace",
    "to_device",
    "to_host",
    "xp_for",
]

log = logging.getLogger(__name__)

Array: TypeAlias = Any
"""A NumPy or a CuPy array (``numpy.ndarray`` or ``cupy.ndarray``), as the numeric stages take and return.

Deliberately ``Any``, and defined once, here: CuPy ships no type information, and the array-API protocol
that both libraries satisfy cannot be written down for both with the stubs available, so a precise union
or Protocol would reject every CuPy call.  The name records the intent (an array of either backend);
host-only code uses :data:`numpy.typing.NDArray` instead.
"""

#: Environment variable that overrides the device choice: ``cpu``, ``gpu`` or ``auto``.
ENV_VAR = "VOXELDOSE_DEVICE"

_probe: tuple[ModuleType | None, str] | None = None  # (cupy or None, reason) — probed once
_fallback_logged = False


def _probe_cupy() -> tuple[ModuleType | None, str]:
    """Import CuPy and run one tiny computation on the device; remember the outcome."""
    global _probe
    if _probe is None:
        try:
            import cupy

            n = cupy.cuda.runtime.getDeviceCount()
            if n < 1:
                raise RuntimeError("no CUDA device found")
            float((cupy.arange(4, dtype=cupy.float32) * 2).sum())  # first real device use
            _probe = (cupy, f"CuPy {cupy.__version__}, {n} CUDA device(s)")
        except Exception as exc:  # noqa: BLE001  ImportError, CUDARuntimeError (cudaErrorInsufficientDriver), ...
            _probe = (None, f"{type(exc).__name__}: {exc}".strip())
    return _probe


def _reset_probe() -> None:
    """Forget the probe result (tests)."""
    global _probe, _fallback_logged
    _probe = None
    _fallback_logged = False


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device runs a kernel."""
    return _probe_cupy()[0] is not None


def get_device() -> str:
    """``"gpu"`` or ``"cpu"``, from ``VOXELDOSE_DEVICE`` (``auto`` when unset); see module docstring."""
    global _fallback_logged
    want = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if want == "cpu":
        return "cpu"
    if want not in ("gpu", "auto"):
        raise VoxeldoseError(
            f"environment variable {ENV_VAR} has an unknown value",
            tag=ENV_VAR,
            expected="'cpu', 'gpu' or 'auto'",
            found=want,
        )
    cupy, reason = _probe_cupy()
    if cupy is not None:
        return "gpu"
    if want == "gpu":
        raise VoxeldoseError(
            f"{ENV_VAR}=gpu asks for the GPU, but no usable CUDA device was found ({reason}); "
            f"unset {ENV_VAR} or set it to 'auto' or 'cpu' to compute on the CPU",
            tag=ENV_VAR,
            expected="CuPy (pip install cupy-cuda12x) and a working CUDA device and driver",
            found="gpu",
        )
    if not _fallback_logged:
        log.info("voxeldose: computing on the CPU (NumPy); GPU not used: %s", reason)
        _fallback_logged = True
    return "cpu"


def namespace(device: str) -> ModuleType:
    """The array module for ``device``: :mod:`numpy` for ``"cpu"``, :mod:`cupy` for ``"gpu"``."""
    if device == "cpu":
        return np
    if device == "gpu":
        cupy, reason = _probe_cupy()
        if cupy is None:
            raise VoxeldoseError(f"the GPU is not usable ({reason})", tag=ENV_VAR, expected="a working CUDA device")
        return cupy
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def _is_cupy(array: object) -> bool:
    return type(array).__module__.split(".", 1)[0] == "cupy"


def xp_for(array: Array) -> ModuleType:
    """The (unwrapped) array module of ``array``: :mod:`numpy` or :mod:`cupy`.

    Uses :func:`array_api_compat.array_namespace` to reject non-arrays and unsupported libraries,
    but returns the library itself, because the FFT and ``ndimage`` helpers we need live there.
    """
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return np
    if _is_cupy(array):
        import cupy

        return cast(ModuleType, cupy)  # CuPy has no type information: its module is Any to mypy
    from array_api_compat import array_namespace

    array_namespace(array)  # raises TypeError for things that are not arrays at all
    raise TypeError(f"voxeldose computes with NumPy or CuPy arrays, got {type(array).__name__}")


def device_of(array: Array) -> str:
    """``"gpu"`` for CuPy arrays, ``"cpu"`` for everything else."""
    return "gpu" if _is_cupy(array) else "cpu"


def to_device(arr: Array, device: str) -> Array:
    """``arr`` on ``device`` (no copy when it is already there)."""
    if device == "cpu":
        return to_host(arr)
    xp = namespace(device)
    return xp.asarray(arr)


def to_host(arr: Array) -> NDArray[Any]:
    """``arr`` as a NumPy array (copies from the GPU when needed)."""
    if _is_cupy(arr):
        return cast("NDArray[Any]", arr.get())  # cupy.ndarray.get() returns a numpy.ndarray
    return np.asarray(arr)


@dataclass(frozen=True)
class FFT:
    """The FFT functions of one backend, called the same way for NumPy and CuPy.

    ``rfftn(x, s=..., axes=..., overwrite_x=...)``, ``irfftn(...)``, the 1-D ``ifft``/``irfft``
    (``n=``, ``axis=``, ``overwrite_x=``) and ``next_fast_len(n, real=True)``.  ``prune_inverse``
    says whether an inverse transform that only needs part of the output should be done axis by axis,
    dropping unneeded rows after each 1-D pass (faster with pocketfft; cuFFT's 3-D plans are faster
    whole).
    """

    name: str
    rfftn: Callable[..., Array]
    irfftn: Callable[..., Array]
    ifft: Callable[..., Array]
    irfft: Callable[..., Array]
    next_fast_len: Callable[..., int]
    prune_inverse: bool = False


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


def fft_module(xp: ModuleType) -> FFT:
    """FFT functions for array module ``xp``.

    NumPy: :mod:`scipy.fft` (pocketfft) with ``workers=os.cpu_count()`` (multi-threaded, keeps
    float32 as complex64).  CuPy: :mod:`cupyx.scipy.fft` (cuFFT); CuPy keeps cuFFT plans in its
    per-device plan cache (``cupy.fft.config.get_plan_cache()``), which we make sure is enabled, so the
    repeated transforms of one padded shape reuse their plan.
    """
    if xp is np:
        import scipy.fft as sfft

        w = _workers()
        return FFT(
            f"scipy.fft(workers={w})",
            partial(sfft.rfftn, workers=w),
            partial(sfft.irfftn, workers=w),
            partial(sfft.ifft, workers=w),
            partial(sfft.irfft, workers=w),
            sfft.next_fast_len,
            prune_inverse=True,
        )
    import cupyx.scipy.fft as cfft

    cache = xp.fft.config.get_plan_cache()
    if cache.get_size() < 4:
        cache.set_size(16)
    return FFT("cupyx.scipy.fft", cfft.rfftn, cfft.irfftn, cfft.ifft, cfft.irfft, cfft.next_fast_len)


def free_memory_bytes(xp: ModuleType) -> int | None:
    """Bytes the next allocation can use on the device of ``xp``; ``None`` for NumPy (host memory).

    For CuPy: free device memory plus what CuPy's memory pool holds but does not use.
    """
    if xp is np:
        return None
    free, _total = xp.cuda.runtime.memGetInfo()  # GPU only
    pool = xp.get_default_memory_pool()
    return int(free + pool.free_bytes())
