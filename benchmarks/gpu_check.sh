#!/usr/bin/env bash
# GPU check for the voxeldose dose convolution: CuPy vs NumPy side by side.
#
#   bash benchmarks/gpu_check.sh               # on a machine with an NVIDIA GPU (< 5 minutes)
#   bash benchmarks/gpu_check.sh --cpu-only    # dry run of everything but CuPy (small sizes, any machine)
#   bash benchmarks/gpu_check.sh --wheelhouse DIR   # offline: install cupy-cuda12x from wheels in DIR
#
# Cases: a 256³ map and a CT-size 512×512×320 map, both with a 51³ kernel (float32, the production
# path); the overlap-add (chunked) path at CT size; the float64 electron convolutions of the
# density-corrected model at 256³.  For each: NumPy time (scipy.fft, all cores), CuPy time on the
# device (warm: plan and kernel spectrum cached; synchronised), CuPy end-to-end time including
# host→device→host copies, speed-up, and max |D_gpu − D_cpu| / max D_cpu (must be ≤ 1e-5).
# Then one SPECT reconstruction (voxeldose.recon, PyTomography; the `recon` extra) on torch's CUDA device
# (VOXELDOSE_DEVICE=gpu) against the same on the CPU: a 64³ grid at 7.2 mm, 120 views, attenuation +
# collimator response, OSEM 4 × 8; agreement ≤ 1e-3 of the image's maximum (float32 OSEM on two devices)
# and total counts within 1e-4.  Skipped (said in the summary, not a failure) when torch/PyTomography are
# not installed.
# Ends with a summary block; exit status 0 when every case agrees, 1 when one does not, 2/3 when the
# environment is not usable (no Python with NumPy+SciPy / no working CuPy).
#
# Python: the repository's .venv if it works, else python3.  CuPy: used if it imports and runs a
# kernel; else `pip install cupy-cuda12x` (quietly; into .venv, or into a fresh
# --system-site-packages venv for a system Python).  The package is used from this source tree via
# PYTHONPATH (no install needed: it imports numpy and scipy only on this path).
set -euo pipefail

CPU_ONLY=0
WHEELHOUSE=""
PY_TIMEOUT="${GPU_CHECK_TIMEOUT:-270}"   # seconds for the Python part (the whole script < 5 min)

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-only) CPU_ONLY=1; shift ;;
    --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a directory}"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }
START=$SECONDS

pick_python() {
  local p
  for p in "$REPO/.venv/bin/python" python3 python; do
    if command -v "$p" >/dev/null 2>&1 && timeout 60 "$p" -c "import numpy, scipy" >/dev/null 2>&1; then
      echo "$p"; return 0
    fi
  done
  return 1
}

cupy_works() {
  timeout 120 "$1" -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0; \
import cupyx.scipy.fft; float((cupy.arange(8, dtype=cupy.float32) + 1).sum())" >/dev/null 2>&1
}

fail_env() {
  echo "==================== voxeldose GPU check: summary ===================="
  echo "RESULT: NOT RUN — $1"
  echo "======================================================================="
  exit "$2"
}

PY="$(pick_python)" || fail_env "no Python with numpy and scipy found (.venv/bin/python, python3)" 2
log "python: $PY ($("$PY" -c 'import sys, numpy, scipy; print(sys.version.split()[0], "numpy", numpy.__version__, "scipy", scipy.__version__)'))"

if [[ $CPU_ONLY -eq 0 ]]; then
  if ! cupy_works "$PY"; then
    log "CuPy missing or not working with $PY: installing cupy-cuda12x (quietly)"
    PIP_ARGS=(-q --disable-pip-version-check)
    [[ -n "$WHEELHOUSE" ]] && PIP_ARGS+=(--no-index --find-links "$WHEELHOUSE")
    if ! timeout 150 "$PY" -m pip install "${PIP_ARGS[@]}" cupy-cuda12x >/dev/null 2>&1; then
      VENV="${TMPDIR:-/tmp}/voxeldose-gpu-venv"
      log "pip into $PY failed (externally managed or offline?): trying a venv at $VENV"
      if timeout 60 "$PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1 \
        && timeout 100 "$VENV/bin/python" -m pip install "${PIP_ARGS[@]}" cupy-cuda12x numpy scipy >/dev/null 2>&1; then
        PY="$VENV/bin/python"
      fi
    fi
    cupy_works "$PY" || fail_env "CuPy does not work here (pip install cupy-cuda12x failed or no CUDA device/driver; \
offline machines: --wheelhouse DIR)" 3
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
  fi
fi
# keep the whole script under 5 minutes even when the install took a while
REMAIN=$((290 - (SECONDS - START)))
(( REMAIN < PY_TIMEOUT )) && PY_TIMEOUT=$REMAIN
(( PY_TIMEOUT < 30 )) && fail_env "setup used $((SECONDS - START)) s, too little time left for the comparison" 3
log "setup took $((SECONDS - START)) s; running the comparison (limit ${PY_TIMEOUT} s)"

set +e
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" timeout "$PY_TIMEOUT" "$PY" - "$CPU_ONLY" <<'PYEOF'
import os
import statistics
import sys
import time

import numpy as np

cpu_only = sys.argv[1] == "1"
os.environ["VOXELDOSE_DEVICE"] = "cpu" if cpu_only else "gpu"

from voxeldose import backend  # noqa: E402
from voxeldose.convolution import clear_cache, convolve, padded_shape  # noqa: E402
from voxeldose.dose import density_corrected_dose  # noqa: E402

TOL = 1e-5
if cpu_only:
    xg = np
    device = f"CPU only (dry run): {os.cpu_count()} cores"
    sizes = [("64^3", (64, 64, 64)), ("CT-like 96x96x60", (60, 96, 96))]
    ksize = 21
else:
    import cupy as cp

    xg = cp
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    device = (f"{name}, {props['totalGlobalMem'] / 2**30:.0f} GiB; CuPy {cp.__version__}, "
              f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}; host {os.cpu_count()} cores")
    sizes = [("256^3", (256, 256, 256)), ("CT 512x512x320", (320, 512, 512))]
    ksize = 51


def sync():
    if xg is not np:
        xg.cuda.Device().synchronize()


def dose_like(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.random(shape, dtype=np.float32) ** 6) * 1e8
    k, j, i = (np.arange(n, dtype=np.float32) - n / 2 for n in shape)
    r2 = k[:, None, None] ** 2 + j[None, :, None] ** 2 + (i[None, None, :] - shape[2] / 6) ** 2
    a += 4e10 * (r2 < (min(shape) / 10) ** 2)
    return a


def kernel(m, voxel=4.8):
    h = (m - 1) // 2
    c = np.arange(-h, h + 1) * voxel
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return 1e-11 * np.exp(-r / 0.7) + 4e-15 * np.exp(-r / 60.0) / np.maximum(r, 2.4) ** 2


def best(fn, n):
    ts = []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


rows = []


def compare(label, cpu_fn, dev_fn, e2e_fn, reps_cpu, reps_dev):
    t_cpu = best(cpu_fn, reps_cpu)
    ref = cpu_fn()
    got = dev_fn()  # warm-up (plans, spectra) and the result to compare
    t_dev = best(dev_fn, reps_dev)
    t_e2e = best(e2e_fn, reps_dev)
    got_h = backend.to_host(got).astype(np.float64)
    diff = float(np.abs(got_h - ref).max() / np.abs(ref).max())
    rows.append((label, t_cpu, t_dev, t_e2e, t_cpu / t_dev, t_cpu / t_e2e, diff, diff <= TOL))
    print(f"  {label}: cpu {t_cpu:.3f} s, device {t_dev:.3f} s, end-to-end {t_e2e:.3f} s, "
          f"max rel diff {diff:.2e}", flush=True)


k = kernel(ksize)
for label, shape in sizes:
    print(f"case {label}, kernel {ksize}^3, padded {padded_shape(shape, k.shape)}", flush=True)
    a = dose_like(shape)
    ag = xg.asarray(a)
    if cpu_only:  # the "device" is NumPy float64: exercises the whole comparison machinery
        dev = lambda: convolve(ag, k, xp=np, dtype=np.float64)  # noqa: E731
    else:
        dev = lambda: convolve(ag, k)  # noqa: E731
    e2e = lambda: backend.to_host(convolve(xg.asarray(a), k))  # noqa: E731
    compare(f"{label} float32", lambda: convolve(a, k, xp=np), dev, e2e, 2, 5)
    if shape[0] >= 60:
        ck = max(8, shape[0] // 5)
        compare(f"{label} chunked k={ck}", lambda: convolve(a, k, xp=np),
                lambda: convolve(ag, k, chunk_k=ck), lambda: backend.to_host(convolve(xg.asarray(a), k, chunk_k=ck)), 1, 3)
    del a, ag
    clear_cache()
    if not cpu_only:
        xg.get_default_memory_pool().free_all_blocks()

# density-corrected electron path (two float64 convolutions with a short electron kernel)
label, shape = sizes[0]
a = dose_like(shape, seed=1)
rho = np.where(a > 1e7, 1.05, 0.0012).astype(np.float32)
rho[: shape[0] // 2] = 1.0
c = (ksize - 1) // 2
ke = np.zeros_like(k)
ke[c - 3 : c + 4, c - 3 : c + 4, c - 3 : c + 4] = k[c - 3 : c + 4, c - 3 : c + 4, c - 3 : c + 4]
ag, rg = xg.asarray(a), xg.asarray(rho)
if cpu_only:
    dev = lambda: density_corrected_dose(a.astype(np.float64), rho, ke, None, 1.0, xp=np)[0]  # noqa: E731
else:
    dev = lambda: density_corrected_dose(ag, rg, ke, None, 1.0)[0]  # noqa: E731
compare(f"{label} density-corrected electrons (f64)",
        lambda: density_corrected_dose(a, rho, ke, None, 1.0, xp=np)[0], dev,
        lambda: backend.to_host(density_corrected_dose(xg.asarray(a), xg.asarray(rho), ke, None, 1.0)[0]), 1, 3)

# SPECT reconstruction on torch's device (PyTomography) vs the CPU
RECON_TOL = 1e-3
recon_note = ""
try:
    from voxeldose import recon as vrecon

    vrecon._pytomography()
except Exception as exc:  # noqa: BLE001 - VoxeldoseError when the recon extra is missing
    recon_note = f"reconstruction: NOT RUN ({type(exc).__name__}; pip install 'voxeldose[recon]')"
else:
    import torch

    n, views, (iters, subs) = (24, 24, (1, 4)) if cpu_only else (64, 120, (4, 8))
    vox = 7.2
    c = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * vox
    kk, jj, ii = np.meshgrid(c, c, c, indexing="ij")
    body = (ii**2 + jj**2) < (0.4 * n * vox) ** 2
    act = np.where(body, 1e4, 0.0).astype(np.float32)
    act[(ii - 0.1 * n * vox) ** 2 + jj**2 + kk**2 < (0.12 * n * vox) ** 2] = 1e5  # a hot sphere
    mu = np.where(body, vrecon.mu_per_cm("Water, Liquid"), 0.0).astype(np.float32)
    cam = vrecon.Camera(vrecon.collimator("SY-ME"), sensitivity_cps_per_mbq=5.67)
    orbit = vrecon.Orbit.circular(views, 0.5 * n * vox + 30.0, 20.0)
    os.environ["VOXELDOSE_DEVICE"] = "cpu"
    g = np.random.default_rng(0).poisson(vrecon.project(act, mu, (vox,) * 3, orbit, cam)).astype(np.float32)

    def osem(where):
        os.environ["VOXELDOSE_DEVICE"] = where
        t = time.perf_counter()
        img = vrecon.reconstruct_osem(g, mu, (vox,) * 3, orbit, cam, iters, subs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return img, time.perf_counter() - t

    ref, t_cpu = osem("cpu")
    osem("cpu" if cpu_only else "gpu")  # warm-up (CUDA context, kernels)
    got, t_dev = osem("cpu" if cpu_only else "gpu")
    diff = float(np.abs(got - ref).max() / np.abs(ref).max())
    dtot = abs(float(got.sum()) / float(ref.sum()) - 1.0)
    good = diff <= RECON_TOL and dtot <= 1e-4
    label = f"recon {n}^3 {views} views OSEM {iters}x{subs}"
    rows.append((label, t_cpu, t_dev, t_dev, t_cpu / t_dev, t_cpu / t_dev, diff, good))
    recon_note = (f"reconstruction: torch {torch.__version__} on {vrecon.torch_device()}; rel diff vs CPU "
                  f"{diff:.2e} (<= {RECON_TOL:g}), total counts {dtot:.1e} (<= 1e-4); e2e = device time")
    print(f"  {label}: cpu {t_cpu:.3f} s, device {t_dev:.3f} s, max rel diff {diff:.2e}", flush=True)
    os.environ["VOXELDOSE_DEVICE"] = "cpu" if cpu_only else "gpu"

ok = all(r[-1] for r in rows)
print()
print("==================== voxeldose GPU check: summary ====================")
print(f"device : {device}")
print(f"check  : dose cases max |D_dev - D_cpu| / max D_cpu <= {TOL:g}")
print(f"{'case':44s} {'cpu s':>7s} {'dev s':>7s} {'e2e s':>7s} {'x dev':>6s} {'x e2e':>6s} {'rel diff':>9s}  ok")
for label, tc, td, te, sd, se, d, good in rows:
    print(f"{label:44s} {tc:7.3f} {td:7.3f} {te:7.3f} {sd:6.1f} {se:6.1f} {d:9.2e}  {'yes' if good else 'NO'}")
print(recon_note)
print(f"RESULT: {'PASS' if ok else 'FAIL'}{' (CPU-only dry run)' if cpu_only else ''}")
print("=======================================================================")
sys.exit(0 if ok else 1)
PYEOF
rc=$?
set -e
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  fail_env "the comparison ran past ${PY_TIMEOUT} s and was stopped" 1
fi
log "total $((SECONDS - START)) s, exit status $rc"
exit $rc
