#!/usr/bin/env bash
# GPU device check (issue 6): one NVIDIA H200, a driver and Python, nothing else.
#
#   bash tests/gpu/device_check.sh            # from the repository root; < 8 minutes
#
# 1. a fresh venv ($VENV, default /tmp/liftstream-gpu-venv) with the project
#    (--no-deps) and only what the GPU tests and `bench sampler` import:
#    numpy, scipy, orjson, tqdm, pytest, pytest-timeout, cupy-cuda12x, and
#    NVRTC + the CUDA runtime from their wheels (nvidia-cuda-nvrtc-cu12,
#    nvidia-cuda-runtime-cu12: with a driver and no CUDA toolkit CuPy cannot
#    compile any kernel without them; their lib folders go on LD_LIBRARY_PATH).
#    Offline machine: put the wheels in tests/gpu/wheels/ beforehand, e.g.
#      pip download -d tests/gpu/wheels --only-binary=:all: --python-version 3.11 \
#          --platform manylinux2014_x86_64 cupy-cuda12x numpy scipy orjson tqdm \
#          pytest pytest-timeout nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
#    and they are installed from there with --no-index; without that folder,
#    from PyPI (`pip install cupy-cuda12x`).
# 2. `pytest -m gpu` (tests/gpu/test_gpu.py): closed form, arrival KS, CPU-vs-GPU,
#    Philox on cupy vs numpy (words bit for bit, draws, whole sweeps), chunk
#    invariance, the fused kernels (kernels/cuda/sweep.cu) on the device vs
#    the NumPy blocks and sweeps with LIFTSTREAM_FUSED=1 vs 0; then
#    tests/unit/kernels/test_fused.py (the same source as C, if a C compiler is there, and
#    through NVRTC; ~5 s) and tests/unit/kernels/test_philox.py (the RNG's CPU tests, ~20 s).
# 3. `liftstream bench sampler --device gpu` for P = 100, 1000, 10000, 100000
#    problems × 8 chains × 8 strata (--numpyro no; the GPU uses Philox and
#    advances problems in chunks that fit half the free GPU memory) with the
#    fused kernels, the same with LIFTSTREAM_FUSED=0 (the array code on cupy)
#    for P ≤ $GPU0_MAX_P, and `--device cpu` for P ≤ 1000; JSON in $OUT
#    (default ./gpu-check-out), then the table (tests/gpu/bandwidth.py):
#    sweeps/s fused and unfused, ESS/s, GPU/CPU ratios, bytes per sweep of
#    each path and the fraction of 4.8 TB/s.
#    A bench run starts only while the whole script is within $BUDGET_S
#    (default 450 s) and is cut at what is left, so the script stays < 8 min.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-$REPO/gpu-check-out}"
VENV="${VENV:-/tmp/liftstream-gpu-venv}"
PY="${PYTHON:-python3}"
GPU_P="${GPU_P:-100 1000 10000 100000}"
CPU_MAX_P="${CPU_MAX_P:-1000}"
GPU0_MAX_P="${GPU0_MAX_P:-10000}"  # unfused GPU runs (LIFTSTREAM_FUSED=0) up to this P
SWEEPS="${SWEEPS:-200}"          # timed sweeps (warm-up: half as many)
BUDGET_S="${BUDGET_S:-450}"      # wall-clock budget of the whole script
mkdir -p "$OUT"
cd "$REPO"
t0=$(date +%s)
say() { echo "[device_check +$(( $(date +%s) - t0 ))s] $*"; }
# seconds a step may take: min(cap, what is left of BUDGET_S); 0 = skip it
left() { local l=$(( BUDGET_S - ($(date +%s) - t0) )); [ "$l" -lt 20 ] && l=0; [ "$l" -gt "$1" ] && l=$1; echo "$l"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

say "venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || { echo "python venv failed"; exit 3; }
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
DEPS=(numpy scipy orjson tqdm pytest pytest-timeout nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12)
if compgen -G "$HERE/wheels/*.whl" > /dev/null; then
  say "installing from $HERE/wheels (no index)"
  "${PIP[@]}" --no-index --find-links "$HERE/wheels" "${DEPS[@]}" cupy-cuda12x || exit 3
  "${PIP[@]}" --no-index --find-links "$HERE/wheels" --no-deps --no-build-isolation -e "$REPO" \
    || "${PIP[@]}" --no-index --find-links "$HERE/wheels" --no-deps -e "$REPO" || exit 3
else
  say "installing from PyPI"
  "${PIP[@]}" "${DEPS[@]}" cupy-cuda12x || exit 3
  "${PIP[@]}" --no-deps -e "$REPO" || exit 3
fi
export PATH="$VENV/bin:$PATH"
# the NVRTC / runtime wheels' libraries, for CuPy (and tests/unit/kernels/test_fused.py's NVRTC check)
NVLIB="$(python - <<'PY'
import glob, os, site
print(":".join(sorted(d for p in site.getsitepackages() for d in glob.glob(os.path.join(p, "nvidia", "*", "lib")))))
PY
)"
[ -n "$NVLIB" ] && export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

say "CuPy"
python - <<'PY' | tee "$OUT/cupy.txt"
import cupy
from kernels.backend import cupy_or_none
print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
assert cupy_or_none() is not None, "kernels.backend.cupy_or_none() found no GPU"
print("ok", float(cupy.arange(10.0).sum()))
PY
[ "${PIPESTATUS[0]}" = 0 ] || { echo "CuPy does not work here"; exit 4; }

say "pytest -m gpu"
T=$(left 200); [ "$T" = 0 ] && T=1
timeout "$T" python -m pytest -m gpu -p no:cacheprovider -q -rs tests/gpu/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.txt"
PYTEST_RC=${PIPESTATUS[0]}
say "pytest tests/unit/kernels/test_fused.py (C build, NVRTC)"
T=$(left 60); [ "$T" = 0 ] && T=1
timeout "$T" python -m pytest -p no:cacheprovider -q -rs tests/unit/kernels/test_fused.py 2>&1 \
  | tail -8 | tee "$OUT/pytest_fused.txt"
[ "${PIPESTATUS[0]}" = 0 ] || [ "$PYTEST_RC" != 0 ] || PYTEST_RC=1
say "pytest tests/unit/kernels/test_philox.py (CPU)"
T=$(left 60); [ "$T" = 0 ] && T=1
timeout "$T" python -m pytest -p no:cacheprovider -q tests/unit/kernels/test_philox.py 2>&1 \
  | tail -3 | tee "$OUT/pytest_philox.txt"
[ "${PIPESTATUS[0]}" = 0 ] || [ "$PYTEST_RC" != 0 ] || PYTEST_RC=1

for P in $GPU_P; do
  T=$(left 240)
  if [ "$T" = 0 ]; then say "out of time: skipping P=$P and larger"; break; fi
  say "bench sampler --device gpu P=$P (limit ${T}s)"
  timeout "$T" liftstream bench sampler --problems "$P" --chains 8 --strata 8 \
    --sweeps "$SWEEPS" --numpyro no --device gpu --json > "$OUT/gpu_$P.json" \
    2> "$OUT/gpu_$P.err" || { say "gpu P=$P failed"; tail -5 "$OUT/gpu_$P.err"; rm -f "$OUT/gpu_$P.json"; }
  T=$(left 150)
  if [ "$P" -le "$GPU0_MAX_P" ] && [ "$T" != 0 ]; then
    say "bench sampler --device gpu P=$P, LIFTSTREAM_FUSED=0 (limit ${T}s)"
    LIFTSTREAM_FUSED=0 timeout "$T" liftstream bench sampler --problems "$P" --chains 8 \
      --strata 8 --sweeps "$SWEEPS" --numpyro no --device gpu --json > "$OUT/gpu0_$P.json" \
      2> "$OUT/gpu0_$P.err" || { say "gpu unfused P=$P failed"; tail -5 "$OUT/gpu0_$P.err"; rm -f "$OUT/gpu0_$P.json"; }
  fi
  T=$(left 180)
  if [ "$P" -le "$CPU_MAX_P" ] && [ "$T" != 0 ]; then
    say "bench sampler --device cpu P=$P (limit ${T}s)"
    timeout "$T" liftstream bench sampler --problems "$P" --chains 8 --strata 8 \
      --sweeps "$SWEEPS" --numpyro no --device cpu --json > "$OUT/cpu_$P.json" \
      2> "$OUT/cpu_$P.err" || { say "cpu P=$P failed"; rm -f "$OUT/cpu_$P.json"; }
  fi
done

say "table"
python -m tests.gpu.bandwidth "$OUT" | tee "$OUT/table.txt"
say "done: pytest -m gpu exit $PYTEST_RC; results in $OUT"
exit "$PYTEST_RC"
