"""Speed and float32 accuracy of the dose convolution (CPU; the GPU version is benchmarks/gpu_check.sh).

    .venv/bin/python benchmarks/bench_dose.py                 # 256³ map, 51³ kernel
    .venv/bin/python benchmarks/bench_dose.py --n 128 --repeat 3

Times, on the same float input (a dose-like map: organs, a tumour, SPECT noise) and kernel
(steep electron core + long photon tail):

  (a) scipy.signal.fftconvolve(tia64, kernel64, mode="same")      — the textbook call, float64
  (b) voxeldose.convolution.convolve(tia32, kernel)  float32     — first call (spectrum computed)
                                                                   and warm call (spectrum cached)
  (c) scipy.fft.rfftn + irfftn of the padded grid, float32, same workers — the floor for (b)

and the full absorbed_dose(method="dvk" / "dvk-density") on that map.  Targets: (b warm) ≥ 3× faster
than (a) and ≤ 1.3× (c).  Accuracy: float32 vs float64 result, max |Δ| / max D, and the largest
relative error over voxels ≥ 10 % and ≥ 1 % of max D.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scipy.fft as sfft
import scipy.signal

from voxeldose.convolution import clear_cache, convolve, padded_shape


def dose_like_map(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.arange(n, dtype=np.float32) - n / 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    s = n / 256.0
    body = ((x / (110 * s)) ** 2 + (y / (80 * s)) ** 2 + (z / (120 * s)) ** 2 < 1).astype(np.float32)
    a = 2e8 * body
    for cx, cy, cz, r, act in [
        (-45, 10, 0, 18, 4e10),
        (45, 10, 5, 18, 4e10),
        (20, -20, 30, 35, 8e9),
        (-10, 25, -40, 8, 1e11),
    ]:
        a += act * (((x - cx * s) ** 2 + (y - cy * s) ** 2 + (z - cz * s) ** 2) < (r * s) ** 2)
    a *= 1 + 0.15 * rng.standard_normal(a.shape, dtype=np.float32)
    return np.clip(a, 0, None).astype(np.float32)


def dvk_like_kernel(m: int, voxel_mm: float = 4.8) -> np.ndarray:
    h = (m - 1) // 2
    c = np.arange(-h, h + 1) * voxel_mm
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    k = 1e-11 * np.exp(-r / 0.7) + 4e-15 * np.exp(-r / 60.0) / np.maximum(r, 2.4) ** 2
    return k


def timeit(fn, repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls (this VM is noisy: we report median and minimum)."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: nproc={os.cpu_count()}, CPU {model}, numpy {np.__version__}, scipy {__import__('scipy').__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="map size per axis (default 256)")
    ap.add_argument("--kernel", type=int, default=51, help="kernel size per axis (default 51)")
    ap.add_argument("--repeat", type=int, default=7, help="timed repetitions of the warm calls")
    ap.add_argument("--skip-fftconvolve", action="store_true")
    ap.add_argument("--skip-dose", action="store_true", help="skip absorbed_dose timings")
    args = ap.parse_args()

    os.environ.setdefault("VOXELDOSE_DEVICE", "cpu")
    n, m = args.n, args.kernel
    workers = os.cpu_count() or 1
    print(f"# {machine()}")
    print(f"# date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; map {n}³, kernel {m}³, scipy.fft workers={workers}")
    tia32 = dose_like_map(n)
    k64 = dvk_like_kernel(m)
    L = padded_shape(tia32.shape, k64.shape)
    print(
        f"# padded grid (ours) {L}; fftconvolve pads to {n + m - 1} → {sfft.next_fast_len(n + m - 1, real=True)} per axis"
    )

    res: dict[str, float] = {}
    tia64 = tia32.astype(np.float64)
    ref64 = None if args.skip_fftconvolve else scipy.signal.fftconvolve(tia64, k64, mode="same")
    clear_cache()
    t0 = time.perf_counter()
    d32 = convolve(tia32, k64)
    res["b_first"] = time.perf_counter() - t0
    out = np.empty_like(tia32)

    def bare():
        f = sfft.rfftn(tia32, s=L, workers=workers)
        sfft.irfftn(f, s=L, workers=workers, overwrite_x=True)

    # Interleaved rounds (a, b, b-out, c, ...): load from other processes on a shared VM hits all alike.
    cases = {"b_warm": lambda: convolve(tia32, k64), "b_warm_out": lambda: convolve(tia32, k64, out=out), "c": bare}
    if ref64 is not None:
        cases["a"] = lambda: scipy.signal.fftconvolve(tia64, k64, mode="same")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            times[name] += timeit(fn, 1)
    for name, ts in times.items():
        res[name], res[name + "_min"] = statistics.median(ts), min(ts)

    print("\n## timings (s): median [min]")
    if "a" in res:
        print(f"(a) scipy.signal.fftconvolve float64, mode='same' : {res['a']:.3f} [{res['a_min']:.3f}]")
    print(f"(b) convolve float32, first call (spectrum)       : {res['b_first']:.3f}")
    print(f"(b) convolve float32, warm (cached spectrum)      : {res['b_warm']:.3f} [{res['b_warm_min']:.3f}]")
    print(f"(b) convolve float32, warm, out= preallocated     : {res['b_warm_out']:.3f} [{res['b_warm_out_min']:.3f}]")
    print(f"(c) bare rfftn+irfftn of padded grid, float32     : {res['c']:.3f} [{res['c_min']:.3f}]")
    if "a" in res:
        print(
            f"speed-up (a)/(b warm) = {res['a'] / res['b_warm']:.2f}× median, "
            f"{res['a_min'] / res['b_warm_min']:.2f}× min   (target ≥ 3)"
        )
    print(
        f"overhead (b warm)/(c)  = {res['b_warm'] / res['c']:.2f}× median, "
        f"{res['b_warm_min'] / res['c_min']:.2f}× min   (target ≤ 1.3)"
    )

    print("\n## float32 accuracy (vs float64)")
    d64 = convolve(tia32, k64, dtype=np.float64)
    for name, ref in [("convolve float64", d64)] + ([("fftconvolve float64", ref64)] if ref64 is not None else []):
        mx = ref.max()
        diff = np.abs(d32 - ref)
        line = f"vs {name}: max|Δ|/maxD = {diff.max() / mx:.2e}"
        for frac in (0.1, 0.01):
            hot = ref >= frac * mx
            line += f"; max rel err over D ≥ {frac:g}·maxD = {(diff[hot] / ref[hot]).max():.2e}"
        print(line)
    if "a" in res:
        print(f"float64 ours vs fftconvolve: max|Δ|/maxD = {np.abs(d64 - ref64).max() / ref64.max():.2e}")
    del d64

    if not args.skip_dose:
        from voxeldose.dose import absorbed_dose
        from voxeldose.geometry import Grid, Volume
        from voxeldose.kernels import DoseKernel

        c = (m - 1) // 2
        ke = np.zeros_like(k64)
        ke[c - 2 : c + 3, c - 2 : c + 3, c - 2 : c + 3] = k64[c - 2 : c + 3, c - 2 : c + 3, c - 2 : c + 3]
        kern = DoseKernel(k64, ke, k64 - ke, "Lu-177", (4.8,) * 3, "water", 1.0, {})
        aff = Grid.axial(tia32.shape, (4.8,) * 3).affine
        tia = Volume(tia32, aff, "1", "Bq.s")
        rho = np.where(tia32 > 0, 1.0, 0.0012).astype(np.float32)
        dens = Volume(rho, aff, "1", "g/cm3")
        print("\n## absorbed_dose, hand-made 5³-electron + photon kernel (median, s)")
        for method, kw in [("dvk", {}), ("dvk-density", {"density": dens}), ("led", {"density": dens})]:
            absorbed_dose(tia, method=method, kernel=kern, **kw)
            t = statistics.median(
                timeit(
                    lambda method=method, kw=kw: absorbed_dose(tia, method=method, kernel=kern, **kw),
                    max(1, args.repeat // 2),
                )
            )
            print(f"absorbed_dose(method={method!r}) : {t:.3f}")


if __name__ == "__main__":
    main()
