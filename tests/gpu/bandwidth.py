"""Bytes a Gibbs sweep touches (``kernels/gibbs.py``), and the device check's table.

``sweep_bytes(P, C, K1, S)`` estimates the DRAM traffic of one sweep from the
array sizes, float64, in two models:

* ``minimal``: what any implementation must move -- the chain state read
  (mu0, tau, theta, beta, omega2) and written (all eight arrays), the data
  read once (n, sy, syy, z, smask, arrived, dsum, hyper), and the arrival
  block's inverse-CDF look-ups (binary search over the flat CDF, then four
  gathers, each a 32-byte sector on a GPU). A fully fused sweep with a
  counter-based RNG reaches this.
* ``as_written``: adds what the array-at-a-time code materialises: every
  random draw's Philox block (one fused kernel writing four words) and its
  conversion to a double (~RNG_BYTES_PER_DRAW), the ω grid's [P, C, K, G, S]
  temporaries (about six arrays written and read: om2+v, log, square/ratio,
  where, sum input) and ~40 elementwise [P, C, K1, S] temporaries (two reads,
  one write each). A rough upper figure, for orientation only.

Bandwidth fraction = bytes per sweep / seconds per sweep / 4.8 TB/s (H200).

``python -m tests.gpu.bandwidth DIR`` reads the ``bench sampler --json``
outputs ``DIR/{gpu,cpu}_P.json`` written by ``device_check.sh`` and prints
the table.
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
    from kernels.arrival import GRID_POINTS as ARRIVAL_GRID
    from kernels.gibbs import OMEGA_GRID
except ImportError:  # pragma: no cover - run from elsewhere
    ARRIVAL_GRID, OMEGA_GRID = 1024, 32
# Philox draw as written: the fused block writes 4 uint64 words and they are
# read back; to_double / Box–Muller make ~8 more [elements] float64 passes
RNG_BYTES_PER_DRAW = 4 * 2 * F8 + 8 * 3 * F8


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
    depth = math.ceil(math.log2(max(P * S * G, 2)))
    omega_depth = math.ceil(math.log2(max(pck * Gw, 2)))
    arrival = pcs * (depth + 4) * SECTOR  # searchsorted + take_along_axis ×4
    omega_cdf = pck * (omega_depth + 3) * SECTOR  # its own inverse CDF + log_q gathers
    minimal = state_read + state_write + data_read + arrival + omega_cdf
    draws = cell + 4 * pck + pcs * 5 + pcks  # σ² gamma, ω/θβ normals+uniforms, μ0, arrival, τ
    rng = draws * RNG_BYTES_PER_DRAW
    omega_tmp = pck * Gw * S * 6 * 2 * F8 + pck * Gw * 8 * 2 * F8
    elementwise = cell * 40 * 3 * F8
    return {"state": state_read + state_write, "data": data_read,
            "gathers": arrival + omega_cdf, "minimal": minimal,
            "as_written": minimal + rng + omega_tmp + elementwise}


def row(gpu: dict, cpu: dict | None) -> dict:
    c, g = gpu["config"], gpu["liftstream"]
    b = sweep_bytes(c["problems"], c["chains"], c["treatments"] + 1, c["strata"])
    per_sweep_s = g["sample_s"] / g["sweeps"]
    out = {"P": c["problems"], "C": c["chains"], "S": c["strata"],
           "gpu_sweeps_per_s": g["sweeps_per_s"], "gpu_ess_per_s": g["ess_per_s_median"],
           "bytes_min": b["minimal"], "bytes_as_written": b["as_written"],
           "bw_frac_min": b["minimal"] / per_sweep_s / H200_BYTES_PER_S,
           "bw_frac_as_written": b["as_written"] / per_sweep_s / H200_BYTES_PER_S,
           "cpu_sweeps_per_s": None, "cpu_ess_per_s": None,
           "ratio_sweeps": None, "ratio_ess": None}
    if cpu:
        k = cpu["liftstream"]
        out.update(cpu_sweeps_per_s=k["sweeps_per_s"], cpu_ess_per_s=k["ess_per_s_median"],
                   ratio_sweeps=g["sweeps_per_s"] / k["sweeps_per_s"],
                   ratio_ess=(g["ess_per_s_median"] / k["ess_per_s_median"]
                              if k["ess_per_s_median"] else None))
    return out


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict], device: str = "") -> str:
    head = (f"{'P':>7} {'GPU sw/s':>9} {'GPU ESS/s':>10} {'CPU sw/s':>9} {'CPU ESS/s':>10} "
            f"{'×sweeps':>8} {'×ESS':>7} {'MB/sweep':>9} {'BW min':>7} {'BW est':>7}")
    lines = [f"liftstream sampler on {device or 'GPU'}: C=8 chains, S=8 strata, "
             "bandwidth as a fraction of 4.8 TB/s (min: state+data+gathers; est: + "
             "materialised temporaries and RNG draws)", head]
    for r in rows:
        lines.append(
            f"{r['P']:>7} {r['gpu_sweeps_per_s']:>9.1f} {r['gpu_ess_per_s']:>10.1f} "
            f"{_f(r['cpu_sweeps_per_s'], '9.1f'):>9} {_f(r['cpu_ess_per_s'], '10.1f'):>10} "
            f"{_f(r['ratio_sweeps'], '8.1f'):>8} {_f(r['ratio_ess'], '7.1f'):>7} "
            f"{r['bytes_min'] / 1e6:>9.1f} {r['bw_frac_min']:>7.2%} "
            f"{r['bw_frac_as_written']:>7.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    d = Path((argv or sys.argv[1:] or ["."])[0])
    rows, device = [], ""
    for f in sorted(d.glob("gpu_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        gpu = json.loads(f.read_text())
        device = gpu["machine"]["device"]
        cf = d / f"cpu_{f.stem.split('_')[1]}.json"
        rows.append(row(gpu, json.loads(cf.read_text()) if cf.exists() else None))
    print(table(rows, device))
    (d / "table.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
