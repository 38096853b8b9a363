"""Bytes a Gibbs sweep touches (``kernels/gibbs.py``), and the device check's table.

``sweep_bytes(P, C, K1, S)`` estimates the DRAM traffic of one sweep from the
array sizes, float64, for the two GPU paths (``kernels/fused.py``):

* ``unfused`` (``LIFTSTREAM_FUSED=0``, the array code on cupy): every array
  operation a kernel that reads its operands and writes its result. The ω
  step builds its [S, G, rows] proposal table (rows = P·C·K, G = 16): ``tot``
  written, ``log`` read and written, the in-place divide and the add each two
  reads and a write, the sum over strata a read -- 9 passes over the table --
  then ~45 passes over the [G, rows] grid (the log-linear masses alone are a
  dozen elementwise ops), ~17 over the [2, rows, S] target and ~40 over
  [rows], and 8 gathers (a 32-byte sector each). The arrival draw: the
  searchsorted over the flattened CDF (log₂(P·S·512) probes, a sector each),
  six gathers and ~71 elementwise passes over [P, C, S] (the cell fraction
  and the log-linear inverse CDF).
* ``fused`` (the default on cupy): the ω step reads resid, v, has, ω², two
  uniforms and the [G, P] tables once and writes ω²; the arrival draw reads a
  uniform, probes its own row (log₂ 512 = 9 sectors) and three sectors for
  the cell's ends (cdf, x, log w at j-1, j), and writes logit p.
* common to both: the chain state read (mu0, tau, theta, beta, omega2) and
  written (all eight arrays), the data read once (n, sy, syy, z, smask,
  arrived, dsum, hyper), every random draw's Philox block and its conversion
  (~RNG_BYTES_PER_DRAW; still array code, the kernels take the draws as
  inputs) and ~40 elementwise [P, C, K1, S] temporaries of the other blocks.
* ``minimal``: state + data + the fused blocks' own reads and writes: what a
  sweep fused end to end, with the RNG inside the kernels, would still move.

Rough figures for orientation (caches absorb part of the gathers and of the
re-read small operands). Bandwidth fraction = bytes per sweep / seconds per
sweep / 4.8 TB/s (H200).

``python -m tests.gpu.bandwidth DIR`` reads the ``bench sampler --json``
outputs ``DIR/{gpu,gpu0,cpu}_P.json`` written by ``device_check.sh`` (gpu:
fused kernels, gpu0: ``LIFTSTREAM_FUSED=0``) and prints the table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

F8 = 8
SECTOR = 32
H200_BYTES_PER_S = 4.8e12
try:  # the sampler's own grid sizes, so the estimate follows the code
    from kernels.grids import ARRIVAL_GRID_POINTS as ARRIVAL_GRID
    from kernels.grids import OMEGA_GRID
except ImportError:  # pragma: no cover - run from elsewhere
    ARRIVAL_GRID, OMEGA_GRID = 512, 16
# Philox draw as written: the fused block writes 4 uint64 words and they are
# read back; to_double / Box–Muller make ~8 more [elements] float64 passes
RNG_BYTES_PER_DRAW = 4 * 2 * F8 + 8 * 3 * F8
# elementwise passes (each ~2 reads + 1 write of 8 bytes → 3·F8) and gathers of
# the array code, counted from kernels/gibbs.py::_draw_omega2 and
# kernels/arrival.py::draw_logit_p (see the module docstring)
OMEGA_TABLE_PASSES = 9  # over [S, G, rows], one F8 each
OMEGA_STRATA_PASSES = 9 + 17 * 2  # [S, rows]: building vT/r²T; [2, rows, S] target
OMEGA_GRID_PASSES = 45  # over [G, rows], ~3·F8 each
OMEGA_ROW_PASSES = 40  # over [rows]
OMEGA_GATHERS = 8
ARRIVAL_PASSES = 71  # over [P, C, S], ~F8 each (reads and writes counted)
ARRIVAL_GATHERS = 6


def omega_bytes(P: int, C: int, K: int, S: int, Gw: int = OMEGA_GRID,
                fused: bool = False) -> float:
    rows = P * C * K
    if fused:  # resid, v, ω², u_x, u_acc read, ω² written; has; the [G, P] tables
        return (2 * rows * S + 4 * rows) * F8 + P * K * S + (2 * Gw + 3) * P * F8
    return (OMEGA_TABLE_PASSES * S * Gw * rows * F8 + OMEGA_STRATA_PASSES * S * rows * F8
            + OMEGA_GRID_PASSES * Gw * rows * 3 * F8 + OMEGA_ROW_PASSES * rows * 3 * F8
            + OMEGA_GATHERS * rows * SECTOR)


def arrival_bytes(P: int, C: int, S: int, G: int = ARRIVAL_GRID, fused: bool = False) -> float:
    pcs = P * C * S
    if fused:  # u read, logit p written; binary search in the row, then the cell's ends
        return 2 * pcs * F8 + (math.ceil(math.log2(max(G, 2))) + 3) * pcs * SECTOR
    depth = math.ceil(math.log2(max(P * S * G, 2)))
    return ARRIVAL_PASSES * pcs * F8 + (depth + ARRIVAL_GATHERS) * pcs * SECTOR


def sweep_bytes(P: int, C: int, K1: int, S: int, G: int = ARRIVAL_GRID,
                Gw: int = OMEGA_GRID) -> dict[str, float]:
    K = K1 - 1
    cell = P * C * K1 * S
    pcs = P * C * S
    pcks = P * C * K * S
    pck = P * C * K
    state_read = (pcs + pcks + 3 * pck) * F8  # mu0, tau, theta, beta, omega2
    state_write = (pcs * 3 + pcks + cell + 3 * pck + P) * F8  # mu0, logit_p, pop, tau, σ², …
    data_read = (3 * P * K1 * S + 4 * P * S) * F8 + P * S + P * 10 * F8  # + smask, D, hyper
    draws = cell + 4 * pck + pcs * 5 + pcks  # σ² gamma, ω/θβ normals+uniforms, μ0, arrival, τ
    rng = draws * RNG_BYTES_PER_DRAW
    elementwise = cell * 40 * 3 * F8  # the other blocks (σ², resid, θβ, μ0, τ, population)
    common = state_read + state_write + data_read + rng + elementwise
    om = {f: omega_bytes(P, C, K, S, Gw, f) for f in (False, True)}
    ar = {f: arrival_bytes(P, C, S, G, f) for f in (False, True)}
    return {"state": state_read + state_write, "data": data_read, "rng": rng,
            "omega_unfused": om[False], "omega_fused": om[True],
            "arrival_unfused": ar[False], "arrival_fused": ar[True],
            "minimal": state_read + state_write + data_read + om[True] + ar[True],
            "unfused": common + om[False] + ar[False],
            "fused": common + om[True] + ar[True]}


def _bench(d: dict) -> tuple[float, float, float]:
    g = d["liftstream"]
    return g["sweeps_per_s"], g["ess_per_s_median"], g["sample_s"] / g["sweeps"]


def row(gpu: dict, cpu: dict | None, gpu0: dict | None = None) -> dict:
    """One P: the fused GPU run, the unfused one (LIFTSTREAM_FUSED=0) and the CPU."""
    c = gpu["config"]
    b = sweep_bytes(c["problems"], c["chains"], c["treatments"] + 1, c["strata"])
    sw, ess, per = _bench(gpu)
    out = {"P": c["problems"], "C": c["chains"], "S": c["strata"],
           "gpu_sweeps_per_s": sw, "gpu_ess_per_s": ess,
           "bytes_min": b["minimal"], "bytes_fused": b["fused"], "bytes_unfused": b["unfused"],
           "bw_frac_min": b["minimal"] / per / H200_BYTES_PER_S,
           "bw_frac_fused": b["fused"] / per / H200_BYTES_PER_S,
           "unfused_sweeps_per_s": None, "bw_frac_unfused": None, "ratio_fused": None,
           "cpu_sweeps_per_s": None, "cpu_ess_per_s": None,
           "ratio_sweeps": None, "ratio_ess": None}
    if gpu0:
        sw0, _, per0 = _bench(gpu0)
        out.update(unfused_sweeps_per_s=sw0, ratio_fused=sw / sw0,
                   bw_frac_unfused=b["unfused"] / per0 / H200_BYTES_PER_S)
    if cpu:
        k = cpu["liftstream"]
        out.update(cpu_sweeps_per_s=k["sweeps_per_s"], cpu_ess_per_s=k["ess_per_s_median"],
                   ratio_sweeps=sw / k["sweeps_per_s"],
                   ratio_ess=(ess / k["ess_per_s_median"] if k["ess_per_s_median"] else None))
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict], device: str = "") -> str:
    head = (f"{'P':>7} {'GPU sw/s':>9} {'unfused':>8} {'×fused':>7} {'GPU ESS/s':>10} "
            f"{'CPU sw/s':>9} {'×sweeps':>8} {'×ESS':>7} {'MB fused':>9} {'MB unf.':>8} "
            f"{'BW fused':>8} {'BW unf.':>8} {'BW min':>7}")
    shape = ", ".join(sorted({f"C={r['C']} chains, S={r['S']} strata" for r in rows}))
    lines = [f"liftstream sampler on {device or 'GPU'}: {shape}; GPU = fused "
             "kernels, unfused = LIFTSTREAM_FUSED=0; bandwidth = estimated bytes per sweep "
             "(tests/gpu/bandwidth.py) / time / 4.8 TB/s", head]
    for r in rows:
        lines.append(
            f"{r['P']:>7} {r['gpu_sweeps_per_s']:>9.1f} {_f(r['unfused_sweeps_per_s'], '8.1f'):>8} "
            f"{_f(r['ratio_fused'], '7.2f'):>7} {r['gpu_ess_per_s']:>10.1f} "
            f"{_f(r['cpu_sweeps_per_s'], '9.1f'):>9} {_f(r['ratio_sweeps'], '8.1f'):>8} "
            f"{_f(r['ratio_ess'], '7.1f'):>7} {r['bytes_fused'] / 1e6:>9.1f} "
            f"{r['bytes_unfused'] / 1e6:>8.1f} {r['bw_frac_fused']:>8.2%} "
            f"{_f(r['bw_frac_unfused'], '8.2%'):>8} {r['bw_frac_min']:>7.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = Path((argv or sys.argv[1:] or ["."])[0])
    rows, device = [], ""

    def load(name: str) -> dict | None:
        f = d / name
        return json.loads(f.read_text()) if f.exists() else None

    for f in sorted(d.glob("gpu_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        gpu = json.loads(f.read_text())
        device = gpu["machine"]["device"]
        P = f.stem.split("_")[1]
        rows.append(row(gpu, load(f"cpu_{P}.json"), load(f"gpu0_{P}.json")))
    print(table(rows, device))
    (d / "table.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
