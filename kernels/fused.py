"""Fused CUDA kernels for the sweep's hot blocks (issue 6), from ``kernels/cuda/sweep.cu``.

On cupy the array code of two blocks is many small kernels with large
temporaries: block 2 (ω, ``kernels.gibbs._draw_omega2``: an [S, G, rows]
proposal table, its masses, cumulative sums, gathers and the MH step) and the
arrival draw (``kernels.arrival.draw_logit_p``: searchsorted, six gathers, the
log-linear inverse CDF). Each is one kernel here, one thread per row, its
table in registers: the block reads its inputs once and writes its output
once.

The random numbers are inputs, drawn by ``kernels.rng.Rng`` at the same
draw sites and in the same order as the array code, so the fused and the
array paths consume identical draws (with Philox: identical on either device)
and differ only in the last bits of log/exp (the accept and the cell choices
then agree except at exact ties). The NumPy path is the reference and the CPU
path; the fused kernels run when the arrays are cupy arrays and
``LIFTSTREAM_FUSED`` is not ``0``.

The same source compiles as plain C (``tests/unit/kernels/test_fused.py`` builds it with
``cc`` and checks every kernel against the NumPy blocks on the CPU, and
compiles the CUDA side to PTX with NVRTC). ``launch`` lets a caller run a
kernel through another backend (the tests' ctypes build) with exactly the
argument preparation used on the GPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kernels import grids
from kernels.backend import Array, array_module

SOURCE_PATH = Path(__file__).parent / "cuda" / "sweep.cu"
# FMA contraction off: the device code then rounds like the NumPy code, operation
# for operation (the tests' C build uses -ffp-contract=off for the same reason)
NVRTC_OPTIONS = ("--fmad=false",)
THREADS = 128
MAX_BLOCKS = 1 << 20  # the kernels are grid-stride loops
KERNELS = ("ls_omega_step", "ls_arrival_draw")

Launch = Callable[[str, int, tuple], None]


def source() -> str:
    """The CUDA/C source of the fused kernels (``kernels/cuda/sweep.cu``)."""
    return SOURCE_PATH.read_text()


def defines(omega_grid: int) -> tuple[str, ...]:
    """Compile-time sizes: the ω grid's points (a per-thread table in registers)."""
    return (f"-DLS_OMEGA_G={int(omega_grid)}",)


def enabled(xp) -> bool:
    """Use the fused kernels? On cupy unless ``LIFTSTREAM_FUSED=0``; never on numpy."""
    return xp is not np and os.environ.get("LIFTSTREAM_FUSED", "1") != "0"


@functools.cache
def _module(omega_grid: int):
    import cupy

    return cupy.RawModule(code=source(), options=NVRTC_OPTIONS + defines(omega_grid))


@functools.cache
def cupy_launcher(omega_grid: int) -> Launch:
    """Launch on the current CUDA device: one thread per row, THREADS a block."""
    mod = _module(omega_grid)
    funcs = {name: mod.get_function(name) for name in KERNELS}

    def launch(name: str, n: int, args: tuple) -> None:
        if n == 0:
            return
        blocks = max(1, min((n + THREADS - 1) // THREADS, MAX_BLOCKS))
        funcs[name]((blocks,), (THREADS,), args)

    return launch


def _f64(xp, a: Array) -> Array:
    return xp.ascontiguousarray(a, dtype=xp.float64)


def omega_step(resid: Array, v: Array, has: Array, omega2: Array, u_x: Array, u_acc: Array,
               grid_om2: Array, grid_prior: Array, u0: Array, log_A: Array, nu: float,
               step: float, launch: Launch | None = None) -> Array:
    """Block 2 of ``kernels.gibbs`` in one kernel: new ω² [P, C, K].

    resid, v [P, C, K, S]; has [P, 1|-, K, S] bool; omega2, u_x, u_acc [P, C, K];
    grid_om2, grid_prior [G, P, …]; u0, log_A [P, …]; nu, step scalars."""
    xp = array_module(resid)
    P, C, K, S = resid.shape
    G = grid_om2.shape[0]
    out = xp.empty((P, C, K), dtype=xp.float64)
    args = (_f64(xp, resid), _f64(xp, v),
            xp.ascontiguousarray(xp.broadcast_to(has, (P, 1, K, S)), dtype=xp.uint8),
            _f64(xp, omega2), _f64(xp, u_x), _f64(xp, u_acc),
            _f64(xp, grid_om2.reshape(G, P)), _f64(xp, grid_prior.reshape(G, P)),
            _f64(xp, u0.reshape(P)), _f64(xp, log_A.reshape(P)),
            np.float64(nu), np.float64(step),
            np.int64(P), np.int64(C), np.int64(K), np.int64(S), out)
    (launch or cupy_launcher(G))("ls_omega_step", P * C * K, args)
    return out


def arrival_draw(u: Array, cdf: Array, x: Array, logw: Array,
                 launch: Launch | None = None) -> Array:
    """``kernels.arrival.draw_logit_p`` in one kernel, from the uniforms u [P, C, S]
    and the grid's cdf, x, logw [P, S, G]: logit p [P, C, S]."""
    xp = array_module(u)
    P, C, S = u.shape
    G = cdf.shape[-1]
    out = xp.empty((P, C, S), dtype=xp.float64)
    args = (_f64(xp, u), _f64(xp, cdf), _f64(xp, x), _f64(xp, logw),
            np.int64(P), np.int64(C), np.int64(S), np.int64(G), out)
    (launch or cupy_launcher(grids.OMEGA_GRID))("ls_arrival_draw", P * C * S, args)
    return out
