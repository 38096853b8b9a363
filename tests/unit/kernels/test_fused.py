"""The fused kernels (``kernels/cuda/sweep.cu``, ``kernels/fused.py``) checked without a GPU.

* The same source compiled as plain C (``cc -O2 -shared -fPIC -x c``, FMA
  contraction off, as NVRTC gets ``--fmad=false``) and loaded with ctypes; each
  kernel, called through ``kernels.fused`` (the very argument preparation the
  GPU path uses), against the NumPy block it replaces, on random inputs over
  several orders of magnitude with padded strata, strata without data, a
  current ω² outside the grid, S = 1 … 17 (numpy's pairwise sum for S ≥ 8),
  arrival grids without data, flat (zero-mass) cells and uniforms exactly on
  CDF values. The discrete choices (cell, accept) must agree everywhere and
  the values to 1e-13 relative, most of them bit for bit: the arithmetic is
  the NumPy code's, operation for operation, and only numpy's SIMD
  log/exp/log1p/expm1 round differently from libm's (about half of log1p's
  results differ in the last bit on an AVX-512 machine).
* Whole sweeps on the CPU with the fused kernels (the C build standing in for
  the GPU) and without, same Philox stream: the same chains to ~1e-12.
* The CUDA side compiled to PTX with NVRTC (``libnvrtc`` from the
  ``nvidia-cuda-nvrtc-cu12`` wheel of the dev extra, or the system's): the
  device code's syntax and types are checked with no GPU. Skips, saying why,
  without a C compiler or without libnvrtc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kernels import fused, gibbs, grids
from kernels.arrival import draw_logit_p
from tests.support.kernel_helpers import ListRng, omega_inputs, random_data, rel
from tests.support.paths import REPO

RTOL = 1e-13  # measured: ≤ 4e-15 (ω), ≤ 2e-16 (arrival)


# ------------------------------------------------------------------ the C build

def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build_c(out_dir: Path, omega_grid: int = grids.OMEGA_GRID) -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH: the fused kernels' C build is "
                    "not checked")
    so = out_dir / f"sweep_g{omega_grid}.so"
    cmd = [cc, "-O2", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-Wall", "-Werror",
           *fused.defines(omega_grid), "-x", "c", str(fused.SOURCE_PATH), "-o", str(so), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    return ctypes.CDLL(str(so))


def c_launcher(lib: ctypes.CDLL):
    """A ``kernels.fused`` launcher running the C build on numpy arrays."""

    def conv(a):
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous
            return ctypes.c_void_p(a.ctypes.data)
        if isinstance(a, np.floating):
            return ctypes.c_double(float(a))
        if isinstance(a, np.integer):
            return ctypes.c_longlong(int(a))
        raise TypeError(type(a))

    def launch(name: str, n: int, args: tuple) -> None:
        getattr(lib, name)(*(conv(a) for a in args))

    return launch


@pytest.fixture(scope="module")
def clib(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("fused"))


# ------------------------------------------------------------------ block 2: ω

OMEGA_CASES = [(40, 4, 2, 1), (30, 4, 2, 3), (25, 3, 3, 7), (20, 4, 2, 8), (15, 2, 3, 9),
               (10, 2, 2, 17)]


@pytest.mark.parametrize(("P", "C", "K1", "S"), OMEGA_CASES,
                         ids=[f"P{P}-C{C}-K{K1 - 1}-S{S}" for P, C, K1, S in OMEGA_CASES])
def test_omega_kernel_equals_numpy_block(clib, P, C, K1, S):
    data = random_data(100 + S, P, K1, S)
    c, resid, v, omega2, u_x, u_acc = omega_inputs(data, C, seed=S)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = gibbs._draw_omega2(omega2, resid, v, c["has"], c, ListRng(u_x, u_acc))
    got = fused.omega_step(resid, v, c["has"], omega2, u_x, u_acc, c["omega_grid_om2"],
                           c["omega_grid_prior"], c["omega_u0"], c["omega_log_A"],
                           c["omega_nu"], c["omega_step"], launch=c_launcher(clib))
    assert got.shape == want.shape and np.isfinite(got).all()
    # the same accept decisions, the same proposals up to the last bits of log/exp
    np.testing.assert_array_equal(got == omega2, want == omega2)
    assert 0.3 < (want != omega2).mean()  # both branches exercised
    assert rel(got, want).max() <= RTOL, rel(got, want).max()
    assert (got == want).mean() > 0.8  # measured 0.90-0.98


def test_omega_kernel_without_data_is_the_prior_table(clib):
    """A row with no observed stratum: the table is the prior (plus a constant)."""
    data = random_data(7, 12, 2, 4)
    c, resid, v, omega2, u_x, u_acc = omega_inputs(data, 3, seed=1)
    has = np.zeros_like(c["has"])
    with np.errstate(divide="ignore", invalid="ignore"):
        want = gibbs._draw_omega2(omega2, resid, v, has, c, ListRng(u_x, u_acc))
    got = fused.omega_step(resid, v, has, omega2, u_x, u_acc, c["omega_grid_om2"],
                           c["omega_grid_prior"], c["omega_u0"], c["omega_log_A"],
                           c["omega_nu"], c["omega_step"], launch=c_launcher(clib))
    np.testing.assert_array_equal(got == omega2, want == omega2)
    assert rel(got, want).max() <= RTOL


def test_omega_kernel_other_grid_size(tmp_path, monkeypatch):
    """LS_OMEGA_G follows kernels.grids.OMEGA_GRID (a compile-time size)."""
    monkeypatch.setattr(grids, "OMEGA_GRID", 32)
    data = random_data(8, 10, 2, 5)
    data.cache.clear()
    monkeypatch.setattr(grids, "OMEGA_GRID", 32)
    c, resid, v, omega2, u_x, u_acc = omega_inputs(data, 2, seed=2)
    assert c["omega_grid_om2"].shape[0] == 32
    lib = build_c(tmp_path, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = gibbs._draw_omega2(omega2, resid, v, c["has"], c, ListRng(u_x, u_acc))
    got = fused.omega_step(resid, v, c["has"], omega2, u_x, u_acc, c["omega_grid_om2"],
                           c["omega_grid_prior"], c["omega_u0"], c["omega_log_A"],
                           c["omega_nu"], c["omega_step"], launch=c_launcher(lib))
    np.testing.assert_array_equal(got == omega2, want == omega2)
    assert rel(got, want).max() <= RTOL


# ------------------------------------------------------------------ block 5: arrival

@pytest.mark.parametrize(("P", "C", "S"), [(30, 8, 1), (20, 5, 7), (10, 3, 12)])
def test_arrival_kernel_equals_numpy_block(clib, P, C, S):
    data = random_data(200 + S, P, 2, S)
    grid = data.grid
    rng = np.random.default_rng(S)
    u = rng.random((P, C, S))
    # edges: 0, just below 1, and uniforms exactly on CDF values (searchsorted's ties,
    # including the flat zero-mass cells at the ends of a row)
    u[:, 0, :] = 0.0
    u[:, -1, :] = 1.0 - 2**-53
    if C > 3:
        pick = rng.integers(0, grid.cdf.shape[-1], (P, S))
        u[:, 1, :] = np.take_along_axis(grid.cdf, pick[..., None], -1)[..., 0]
        u[:, 2, :] = grid.cdf[:, :, 1]
    u = np.minimum(u, 1.0 - 2**-53)
    want = draw_logit_p(grid, ListRng(u), C)
    got = fused.arrival_draw(u, grid.cdf, grid.x, grid.logw, launch=c_launcher(clib))
    assert np.isfinite(got).all()
    assert rel(got, want).max() <= RTOL, rel(got, want).max()
    # bit for bit but where log1p/expm1 inside a cell round differently (measured ≥ 0.997)
    assert (got == want).mean() > 0.95


# ------------------------------------------------------------------ whole sweeps

def test_sweeps_fused_equal_unfused_on_cpu(clib, monkeypatch):
    """The dispatch in gibbs/arrival: the C build in place of the GPU, the same
    Philox stream; init + 5 sweeps give the same chains."""
    from kernels.philox import keys_for
    from kernels.rng import Rng
    from kernels.sampler import run

    data = random_data(5, 9, 3, 6)
    P = data.shape[0]

    def chains(fuse: bool):
        monkeypatch.setattr(fused, "enabled", lambda xp: fuse)
        monkeypatch.setattr(fused, "cupy_launcher", lambda G: c_launcher(clib))
        rng = Rng(4, kind="philox", keys=keys_for(4, range(P)))
        state = gibbs.init(data, rng, 4)
        state, _, _ = run(state, data, rng, 5)
        return state

    a, b = chains(False), chains(True)
    for name, x in a.arrays().items():
        np.testing.assert_allclose(getattr(b, name), x, rtol=1e-9, atol=1e-12, err_msg=name)


def test_fused_is_off_on_numpy_and_by_env(monkeypatch):
    assert not fused.enabled(np)
    sentinel = object()
    monkeypatch.setenv("LIFTSTREAM_FUSED", "0")
    assert not fused.enabled(sentinel)
    monkeypatch.setenv("LIFTSTREAM_FUSED", "1")
    assert fused.enabled(sentinel)


def test_source_is_packaged():
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "cuda/*.cu" in cfg["tool"]["setuptools"]["package-data"]["kernels"]
    assert fused.SOURCE_PATH.is_file()


# ------------------------------------------------------------------ NVRTC → PTX

def _libnvrtc() -> tuple[ctypes.CDLL | None, str]:
    tried = []
    cands = []
    if os.environ.get("LIBNVRTC"):
        cands.append(os.environ["LIBNVRTC"])
    try:
        import nvidia.cuda_nvrtc as w  # the nvidia-cuda-nvrtc-cu12 wheel

        for d in w.__path__:
            cands += sorted(str(p) for p in (Path(d) / "lib").glob("libnvrtc.so*"))
    except ImportError:
        tried.append("no nvidia-cuda-nvrtc-cu12 wheel")
    found = ctypes.util.find_library("nvrtc")
    if found:
        cands.append(found)
    for c in cands:
        try:
            return ctypes.CDLL(c), c
        except OSError as e:
            tried.append(f"{c}: {e}")
    return None, "; ".join(tried) or "libnvrtc not found"


def nvrtc_ptx(src: str, options: tuple[str, ...]) -> tuple[int, str, str]:
    """(nvrtcResult, log, ptx) of compiling ``src``."""
    lib, why = _libnvrtc()
    if lib is None:
        pytest.skip(f"NVRTC not available ({why}): install the dev extra "
                    "(nvidia-cuda-nvrtc-cu12) to check the CUDA source compiles")
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"sweep.cu", 0, None, None)
    assert rc == 0, rc
    opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), ptx.decode(errors="replace")


@pytest.mark.parametrize("omega_grid", [grids.OMEGA_GRID, 32])
def test_cuda_source_compiles_with_nvrtc(omega_grid):
    """The options kernels.fused gives cupy, for the H200 (compute_90): no error,
    no warning, both kernels in the PTX with the launch's argument lists."""
    opts = (*fused.NVRTC_OPTIONS, *fused.defines(omega_grid), "--gpu-architecture=compute_90")
    rc, log, ptx = nvrtc_ptx(fused.source(), opts)
    assert rc == 0, log
    assert "warning" not in log.lower(), log
    for name in fused.KERNELS:
        assert f".entry {name}(" in ptx, name
    # 17 parameters for the ω step, 9 for the arrival draw (fused.omega_step/arrival_draw)
    body = ptx.split(".entry ls_omega_step(")[1].split(")")[0]
    assert body.count(".param") == 17
    body = ptx.split(".entry ls_arrival_draw(")[1].split(")")[0]
    assert body.count(".param") == 9


def test_nvrtc_reports_errors():
    """The check above can fail: a type error in device code is an NVRTC error."""
    rc, log, _ = nvrtc_ptx(fused.source() + "\nstatic __device__ int oops(double *p) "
                           "{ return p->x; }\n", (*fused.NVRTC_OPTIONS, *fused.defines(16)))
    assert rc != 0 and "error" in log


def test_bandwidth_model_follows_the_code():
    """tests/gpu/bandwidth.py: the grid sizes are the kernels', and fusing the
    ω step and the arrival draw cuts those blocks' bytes (≥ 3× together)."""
    from kernels.grids import ARRIVAL_GRID_POINTS as GRID_POINTS
    from tests.gpu import bandwidth as bw

    assert (bw.ARRIVAL_GRID, bw.OMEGA_GRID) == (GRID_POINTS, grids.OMEGA_GRID)
    b = bw.sweep_bytes(10_000, 8, 2, 8)
    assert b["minimal"] < b["fused"] < b["unfused"]
    assert b["omega_fused"] + b["arrival_fused"] < (b["omega_unfused"] + b["arrival_unfused"]) / 3


def test_device_check_plumbing_on_cpu(tmp_path):
    """What ``tests/gpu/device_check.sh`` runs after the GPU tests, on the CPU:
    the script parses (``bash -n``), ``bench sampler --json`` writes what
    ``tests/gpu/bandwidth.py`` reads, and the table's ratios come from the
    runs (a run against itself: 1.0). So a GPU session's minutes are not
    spent on a script error."""
    import json
    import subprocess
    import sys

    from tests.gpu import bandwidth as bw

    script = REPO / "tests" / "gpu" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "sampler", "--problems", "3",
         "--chains", "2", "--strata", "8", "--sweeps", "10", "--numpyro", "no",
         "--device", "cpu", "--json"], capture_output=True, text=True, timeout=300,
        cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("gpu_3.json", "gpu0_3.json", "cpu_3.json"):
        (tmp_path / name).write_text(out.stdout)
    assert bw.main([str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "table.json").read_text())
    assert (r["P"], r["C"], r["S"]) == (3, 2, 8)
    assert r["ratio_sweeps"] == r["ratio_fused"] == 1.0
    assert r["gpu_sweeps_per_s"] > 0 and r["bytes_fused"] < r["bytes_unfused"]
