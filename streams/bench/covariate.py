"""``liftstream bench covariate``: what the CUPED block costs per sweep.

One process, one batch shape, the same synthetic populations (with a
pre-experiment covariate of correlation ``rho``) sampled twice: once as if
nobody had a covariate (the block skipped), once with it. Reported as a
ratio, best of ``repeats`` timings each, plus the cost of a covariate metric
with its covariate-free shadow (``streams.sampling.problems.SHADOW_SUFFIX``), which
the streaming sampler runs beside it to measure ``variance_reduction``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from kernels.backend import get_xp
from kernels.data import make_data
from kernels.gibbs import init, sweep
from kernels.rng import Rng
from streams.dev.synthetic import Scenario, cell_stats, population

COV = ("nx", "sx", "sxx", "sxy", "sy_x")


def _ms_per_sweep(data, chains: int, sweeps: int, repeats: int, xp) -> float:
    rng = Rng(1, xp=xp)
    state, _ = sweep(init(data, rng, chains), data, rng)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(sweeps):
            state, _ = sweep(state, data, rng)
        if xp is not np:
            xp.cuda.Stream.null.synchronize()
        best = min(best, (time.perf_counter() - t0) / sweeps)
    return best * 1e3


def run(problems: int, chains: int, sweeps: int, repeats: int, rho: float, missing: float,
        device: str = "auto") -> dict[str, Any]:
    xp = get_xp(device)
    rng = np.random.default_rng(0)
    sc = Scenario(n_units=5000, covariate_rho=rho, covariate_missing=missing)
    stats = [cell_stats(population(sc, rng), 7.0) for _ in range(problems)]

    def stack(k: str) -> np.ndarray:
        return np.stack([s[k] for s in stats])

    base = [stack(k) for k in ("n", "sy", "syy", "arrived", "dsum", "D", "activity")]
    plain = make_data(*base, xp=xp)
    with_cov = make_data(*base, cov={k: stack(k) for k in COV}, xp=xp)
    a = _ms_per_sweep(plain, chains, sweeps, repeats, xp)
    b = _ms_per_sweep(with_cov, chains, sweeps, repeats, xp)
    K1, S = plain.shape[1:]
    return {"problems": problems, "chains": chains, "variants": K1, "strata": S,
            "device": "gpu" if xp is not np else "cpu",
            "ms_per_sweep": {"without": a, "with": b},
            "ratio_with": b / a, "ratio_with_and_shadow": (a + b) / a}


def main(args: Any) -> int:
    res = run(args.problems, args.chains, args.sweeps, args.repeats, args.rho, args.missing,
              args.device)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        ms = res["ms_per_sweep"]
        print(f"{res['problems']} problems × {res['chains']} chains × {res['variants']} variants"
              f" × {res['strata']} strata ({res['device']}): {ms['without']:.2f} ms/sweep "
              f"without a covariate, {ms['with']:.2f} with (×{res['ratio_with']:.2f}); "
              f"with its shadow ×{res['ratio_with_and_shadow']:.2f}")
    return 0
