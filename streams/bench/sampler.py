"""``liftstream bench sampler``: how fast the batched Gibbs sampler is, and
how that compares with a general-purpose sampler on the same model.

Why these numbers: the streaming sampler advances every chain of every live
problem once per tick, so its throughput is *sweeps of all P×C chains per
second*; what a reader gets out of a tick is effective draws of the estimand
they read, so its efficiency is *bulk ESS per second of the adjusted effect*
(docs/architecture.md#the-model), computed with ``kernels.diagnostics.ess_bulk`` over the timed
draws only. The same estimand and the same ESS code are applied to the NumPyro
NUTS baseline (``streams.bench.numpyro``), and the two samplers' posterior
means are checked against each other, so a speed-up cannot come from sampling
a different posterior.

Problems: P synthetic experiments (``streams.dev.synthetic``: one treatment,
S activity strata, 20k units, day 7). Simulating 10,000 populations would
take longer than the benchmark, so a few populations are simulated and the
rest are perturbed copies of their sufficient statistics (cell sizes
rescaled, outcomes shifted and scaled affinely), which keeps every problem a
valid data set of the same shape with different posteriors.

Memory: on a GPU the problems are advanced in chunks sized to a fraction of
the device's free memory (``chunk_problems``): at P = 100,000 the arrival
grids alone are ~3.3 GB each ([P, S, 512] float64) and building them peaks
near 40 GB. Each chunk
is its own batch (data, grids, chains); timings and ESS are summed/pooled
over chunks. With the Philox RNG (the GPU default) every problem is keyed by
its index in the whole benchmark, so its draws do not depend on the chunking.
On the CPU everything runs as one batch, as before.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import fused
from kernels.backend import get_xp, to_numpy
from kernels.data import ModelData, make_data
from kernels.diagnostics import ess_bulk, ndtri, split_rhat
from kernels.gibbs import init
from kernels.grids import ARRIVAL_GRID_POINTS, OMEGA_GRID
from kernels.philox import keys_for
from kernels.rng import Rng, default_rng_kind
from kernels.sampler import run
from streams.dev.synthetic import DEFAULT_EDGES, Scenario, cell_stats, population

NUMPYRO_AUTO_MAX_PROBLEMS = 1000  # NUTS on 2 CPU cores: P = 10,000 would take hours
UNITS = 20_000
DAY = 7.0
BASE_POPULATIONS = 8  # simulated populations; the other problems perturb these
CHUNK = 50  # sweeps per ``run`` call: bounds the trace's memory at P = 10,000
AGREE_ALPHA = 1e-3  # family-wise false-alarm rate of the agreement check
GPU_MEMORY_FRACTION = 0.5  # of the device's free memory, for one chunk of problems


class BenchUnavailable(RuntimeError):
    """What was asked for cannot run here (no GPU, no NumPyro): exit 2, no traceback."""


# ------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------


def strata_edges(S: int) -> tuple[float, ...]:
    """Activity edges (days of the last 28) for S strata: the default 7, else
    integer edges spaced quadratically (more resolution among light users, who
    are most of the population and arrive last)."""
    if S == len(DEFAULT_EDGES) - 1:
        return DEFAULT_EDGES
    if not 1 <= S <= 29:
        raise ValueError(f"--strata {S}: need 1 ≤ S ≤ 29 (activity is 0..28 days)")
    e = np.round(29.0 * (np.arange(S + 1) / S) ** 2).astype(int)
    for i in range(1, S + 1):  # strictly increasing, room left for the rest
        e[i] = max(e[i], e[i - 1] + 1)
    for i in range(S - 1, -1, -1):
        e[i] = min(e[i], e[i + 1] - 1)
    e[-1] = 29
    return tuple(float(v) for v in e)


def synthetic_problems(P: int, S: int, seed: int = 0, units: int = UNITS,
                       day: float = DAY) -> dict[str, np.ndarray]:
    """Host sufficient statistics of P problems (the inputs of ``make_data``).

    Problems 0..B-1 are simulated populations (different effects and seeds);
    problem j ≥ B perturbs population j mod B: every count is scaled by f
    (cells keep their mean and variance) and outcomes by y → a + b·y, exact on
    the sufficient statistics (n, Σy, Σy²).
    """
    edges = strata_edges(S)
    B = min(P, BASE_POPULATIONS)
    base = []
    for b in range(B):
        sc = Scenario(n_units=units, strata_edges=edges, effect=0.05 + 0.05 * (b % 3),
                      effect_slope=0.06 * (b % 4))
        base.append(cell_stats(population(sc, np.random.default_rng([seed, b])), day))

    def tile(k: str) -> np.ndarray:
        arr = np.stack([np.asarray(st[k], float) for st in base])
        return arr[np.arange(P) % B]

    n0, sy0, syy0 = tile("n"), tile("sy"), tile("syy")
    arr0, dsum0 = tile("arrived"), tile("dsum")
    rng = np.random.default_rng([seed, 10_000])
    f = np.exp(rng.uniform(-0.5, 0.5, P))
    a = rng.normal(0.0, 0.5, P)
    scale = np.exp(rng.uniform(-0.3, 0.3, P))
    f[:B], a[:B], scale[:B] = 1.0, 0.0, 1.0

    n1 = np.round(n0 * f[:, None, None])
    r = np.where(n0 > 0, n1 / np.maximum(n0, 1.0), 0.0)
    sy1, syy1 = sy0 * r, syy0 * r
    a3, b3 = a[:, None, None], scale[:, None, None]
    arr1 = np.round(arr0 * f[:, None])
    return {
        "n": n1,
        "sy": n1 * a3 + b3 * sy1,
        "syy": n1 * a3 * a3 + 2.0 * a3 * b3 * sy1 + b3 * b3 * syy1,
        "arrived": arr1,
        "dsum": dsum0 * np.where(arr0 > 0, arr1 / np.maximum(arr0, 1.0), 0.0),
        "D": tile("D"),
        "activity": tile("activity"),
    }


#: ``--kind``: the metric kinds (issue 26) and how many problems one metric of each is
KIND_PROBLEMS = {"sum": 1, "conversion": 1, "capped": 2, "ratio": 2}


def kind_problems(stats: dict[str, np.ndarray], kind: str, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """The problems of P metrics of ``kind`` from P sum problems' statistics
    (``synthetic_problems``), as ``streams.sampling.problems`` makes them:
    a conversion's cells hold 0/1 outcomes (rates 2-32% by the cell's rank of
    mean); a capped sum is two problems, the capped totals (half the
    within-cell variance) and the uncapped ones (``#uncapped``); a ratio is
    two, the linearized numerator L = M − R̂·D (the sums centred) and the
    denominator D (Poisson sessions, mean 1 + activity/4: ``#den``). The
    sampler's cost per problem does not depend on the kind; its cost per
    metric does, by the problems it takes."""
    if kind == "sum":
        return stats
    n, sy, syy = stats["n"], stats["sy"], stats["syy"]
    safe = np.maximum(n, 1.0)
    mean = np.where(n > 0, sy / safe, 0.0)
    if kind == "conversion":
        lo = mean.min(axis=(1, 2), keepdims=True)
        hi = mean.max(axis=(1, 2), keepdims=True)
        p = 0.02 + 0.30 * (mean - lo) / np.maximum(hi - lo, 1e-12)
        return {**stats, "sy": n * p, "syy": n * p}
    within = np.maximum(syy - sy * sy / safe, 0.0)
    if kind == "capped":
        capped = {**stats, "syy": sy * sy / safe + 0.5 * within}
        return {k: np.concatenate([capped[k], stats[k]]) for k in stats}
    if kind != "ratio":
        raise ValueError(f"--kind {kind!r}: one of {sorted(KIND_PROBLEMS)}")
    grand = sy.sum(axis=(1, 2), keepdims=True) / np.maximum(n.sum(axis=(1, 2), keepdims=True), 1)
    lin = {**stats, "sy": sy - n * grand, "syy": within + (sy - n * grand) ** 2 / safe}
    mu_d = 1.0 + stats["activity"][:, None, :] / 4.0
    den = {**stats, "sy": n * mu_d, "syy": n * (mu_d + mu_d * mu_d)}
    return {k: np.concatenate([lin[k], den[k]]) for k in stats}


def model_data(stats: dict[str, np.ndarray], xp: Any = np) -> ModelData:
    return make_data(stats["n"], stats["sy"], stats["syy"], stats["arrived"], stats["dsum"],
                     stats["D"], stats["activity"], xp=xp)


# ------------------------------------------------------------------------------------
# liftstream
# ------------------------------------------------------------------------------------


@dataclass
class GibbsResult:
    """Timings and the adjusted effect of the first treatment over the timed
    sweeps, [P, C, T] on the host; per-problem bulk ESS and split R-hat."""

    stats: dict[str, Any]
    adj_effect: np.ndarray
    ess: np.ndarray | None = None
    rhat: np.ndarray | None = None


def problem_bytes(chains: int, K1: int, S: int, sweeps: int, G: int = ARRIVAL_GRID_POINTS,
                  fused_kernels: bool = False) -> int:
    """Peak device bytes one problem needs, roughly (float64).

    Calibrated with tracemalloc on numpy (C = 8, K1 = 2, S = 8, G = 512, Philox,
    200 problems): ``make_data`` peaks at 395 kB per problem, 12 [S, G] arrays
    alive while the grids are built, and keeps 4 of them (cdf, x, log w and the
    shifted flat CDF: 132 kB); a sweep adds 33 kB above the state: the ω step's
    [S, G_ω, C, K] table (3 arrays: 24 kB) on top of ~12 [C, K1, S] arrays
    alive, and the population draw's Philox gamma/Poisson words (~44 [C, S]
    arrays: 22 kB). With the fused kernels (``fused_kernels``; measured the same way
    with the C build of ``kernels/cuda/sweep.cu`` standing in for the GPU) the
    ω step allocates nothing but its uniforms (0.8 kB), so the population draw
    sets the sweep's peak. Plus the trace of one ``run`` call (64 kB at
    CHUNK = 50) and the timed draws; doubled for the memory pool's rounding
    and fragmentation.
    """
    K = K1 - 1
    grid = S * G * 8
    build = 12 * grid
    omega_table = 0 if fused_kernels else 3 * chains * K * OMEGA_GRID * S
    sweep = 4 * grid + 8 * (max(omega_table, 44 * chains * S) + 12 * chains * K1 * S)
    trace = 8 * chains * (CHUNK * (4 * K + K * S + S) + sweeps)
    return 2 * (max(build, sweep) + trace)


def chunk_problems(P: int, chains: int, K1: int, S: int, sweeps: int, xp: Any,
                   budget_bytes: float | None = None) -> int:
    """Problems per batch: all of them on the CPU (unless a budget is given),
    else as many as fit in ``budget_bytes`` (default: GPU_MEMORY_FRACTION of
    the device's free memory)."""
    if budget_bytes is None:
        if xp is np:
            return P
        free, _total = xp.cuda.runtime.memGetInfo()
        budget_bytes = GPU_MEMORY_FRACTION * free
    per = problem_bytes(chains, K1, S, sweeps, fused_kernels=fused.enabled(xp))
    return int(max(1, min(P, budget_bytes // per)))


def chunk_bounds(P: int, chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) of each batch of at most ``chunk`` problems."""
    return [(lo, min(P, lo + chunk)) for lo in range(0, P, chunk)]


def _slice_stats(stats: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {k: v[lo:hi] for k, v in stats.items()}


def _free_device_memory(xp: Any) -> None:
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


def _sync(xp: Any) -> None:
    """Wait for the device, so wall-clock times cover the work (no-op on numpy)."""
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def bench_rng(seed: int, xp: Any, kind: str | None = None, lo: int = 0,
              hi: int | None = None, whole: bool = True) -> Rng:
    """The benchmark's RNG for problems lo..hi-1 of the whole run: Philox keyed
    by each problem's global index; PCG64 one stream per batch (``whole``:
    the batch is every problem, seeded as before chunking existed)."""
    kind = kind or default_rng_kind(xp)
    if kind == "philox":
        return Rng([seed, 1], xp=xp, kind=kind, keys=keys_for([seed, 1], range(lo, hi)))
    return Rng([seed, 1] if whole else [seed, 1, lo], xp=xp, kind=kind)


def bench_gibbs(data: ModelData, chains: int, warmup: int, sweeps: int, seed: int = 0,
                progress: Any = None, rng: Rng | None = None) -> GibbsResult:
    """``init``, ``warmup`` untimed-for-ESS sweeps, then ``sweeps`` timed ones
    through ``kernels.sampler.run`` (the streaming sampler's own entry point)."""
    xp = data.xp
    P = data.shape[0]
    rng = rng if rng is not None else bench_rng(seed, xp, hi=P)
    tick = progress.update if progress is not None else None
    t0 = time.perf_counter()
    state = init(data, rng, chains)
    _sync(xp)
    init_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    done = 0
    while done < warmup:
        k = min(CHUNK, warmup - done)
        state, _, _ = run(state, data, rng, k, thin=k, progress=tick)
        done += k
    _sync(xp)
    warm_s = time.perf_counter() - t0

    parts = []
    t0 = time.perf_counter()
    done = 0
    while done < sweeps:
        k = min(CHUNK, sweeps - done)
        state, trace, _ = run(state, data, rng, k, progress=tick)
        parts.append(trace.adj_effect[..., 0])  # [P, C, k], first treatment
        done += k
    adj = xp.concatenate(parts, axis=-1)
    _sync(xp)
    sample_s = time.perf_counter() - t0

    ess = to_numpy(ess_bulk(adj))
    rhat = to_numpy(split_rhat(adj)) if chains >= 2 else np.full(P, np.nan)
    stats = {
        "device": "gpu" if xp is not np else "cpu",
        "rng": getattr(rng, "kind", None),
        "init_s": init_s,
        "warmup_sweeps": warmup,
        "warmup_s": warm_s,
        "sweeps": sweeps,
        "sample_s": sample_s,
        "sweeps_per_s": sweeps / sample_s,
        "chain_sweeps_per_s": P * chains * sweeps / sample_s,
        **_ess_summary(ess, sample_s),
        "rhat_max": _finite_max(rhat),
    }
    return GibbsResult(stats, to_numpy(adj), ess, rhat)


def bench_gibbs_chunked(stats: dict[str, np.ndarray], xp: Any, chains: int, warmup: int,
                        sweeps: int, seed: int = 0, progress: Any = None,
                        chunk: int | None = None, rng_kind: str | None = None) -> GibbsResult:
    """``bench_gibbs`` over problems in batches of ``chunk`` (default: what
    fits, ``chunk_problems``), each built, sampled and freed in turn; times
    are summed, so rates are those of advancing all P problems."""
    P, K1, S = stats["n"].shape
    chunk = chunk or chunk_problems(P, chains, K1, S, sweeps, xp)
    results, data_s = [], 0.0
    for lo, hi in chunk_bounds(P, chunk):
        t0 = time.perf_counter()
        data = model_data(_slice_stats(stats, lo, hi), xp)
        _sync(xp)
        data_s += time.perf_counter() - t0
        rng = bench_rng(seed, xp, rng_kind, lo, hi, whole=(lo == 0 and hi == P))
        g = bench_gibbs(data, chains, warmup, sweeps, seed, progress=progress, rng=rng)
        del data, rng
        _free_device_memory(xp)
        results.append(g)
    if len(results) == 1:
        out = results[0]
    else:
        keys = ("init_s", "warmup_s", "sample_s")
        st = dict(results[0].stats)
        st.update({k: sum(r.stats[k] for r in results) for k in keys})
        ess = np.concatenate([r.ess for r in results])
        rhat = np.concatenate([r.rhat for r in results])
        st.update(sweeps_per_s=sweeps / st["sample_s"],
                  chain_sweeps_per_s=P * chains * sweeps / st["sample_s"],
                  **_ess_summary(ess, st["sample_s"]), rhat_max=_finite_max(rhat))
        out = GibbsResult(st, np.concatenate([r.adj_effect for r in results]), ess, rhat)
    out.stats["make_data_s"] = data_s
    out.stats["chunk_problems"] = chunk
    out.stats["chunks"] = len(results)
    return out


def _finite_max(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    return float(np.nanmax(x)) if np.isfinite(x).any() else None


def _ess_summary(ess: np.ndarray, seconds: float) -> dict[str, Any]:
    """Median and minimum over problems of bulk ESS and of ESS per second."""
    ess = np.asarray(ess, float)
    ok = np.isfinite(ess)
    med = float(np.median(ess[ok])) if ok.any() else math.nan
    lo = float(ess[ok].min()) if ok.any() else math.nan
    return {"ess_bulk_median": med, "ess_bulk_min": lo,
            "ess_per_s_median": med / seconds, "ess_per_s_min": lo / seconds}


# ------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------


def agreement(a: np.ndarray, b: np.ndarray, alpha: float = AGREE_ALPHA) -> dict[str, Any]:
    """Do two samplers' draws [P, C, T] of the same estimand agree?

    Per problem: |mean_a − mean_b| in posterior sds (of ``a``), and as a
    z-score against the Monte Carlo error of the difference,
    sqrt(sd_a²/ESS_a + sd_b²/ESS_b). The check passes when every z is below the
    Bonferroni bound for family-wise rate ``alpha`` over the P problems, so it
    neither cries wolf at P = 10,000 nor lets a real bias through at P = 1.
    """
    P = a.shape[0]
    ma, mb = a.mean(axis=(1, 2)), b.mean(axis=(1, 2))
    sa, sb = a.std(axis=(1, 2)), b.std(axis=(1, 2))
    ea, eb = to_numpy(ess_bulk(a)), to_numpy(ess_bulk(b))
    diff = np.abs(ma - mb)
    mcse = np.sqrt(sa**2 / ea + sb**2 / eb)
    z = diff / np.where(mcse > 0, mcse, np.inf)
    z_crit = float(ndtri(np.asarray(1.0 - alpha / (2.0 * P))))
    ratio = sb / np.where(sa > 0, sa, np.nan)
    return {
        "max_abs_diff_over_sd": float(np.max(diff / np.where(sa > 0, sa, np.inf))),
        "max_z": float(np.max(z)),
        "z_crit": z_crit,
        "sd_ratio_median": float(np.nanmedian(ratio)),
        "sd_ratio_range": [float(np.nanmin(ratio)), float(np.nanmax(ratio))],
        "agree": bool(np.all(z < z_crit)),
    }


def machine_info(xp: Any) -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "device": "cpu",
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if xp is not np:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        name = props["name"]
        info["device"] = name.decode() if isinstance(name, bytes) else str(name)
    return info


# ------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------


def _numpyro_plan(mode: str, P: int) -> tuple[bool, str | None]:
    """(run it?, why not / why it cannot): ``--numpyro auto|yes|no``."""
    from streams.bench.numpyro import import_error

    if mode == "no":
        return False, "--numpyro no"
    err = import_error()
    if err is not None:
        return False, f"numpyro/jax not importable ({err}); pip install 'liftstream[bench]'"
    if mode == "auto" and P > NUMPYRO_AUTO_MAX_PROBLEMS:
        return False, (f"P = {P} > {NUMPYRO_AUTO_MAX_PROBLEMS}: NUTS over all problems would "
                       "take too long on CPU (use --numpyro yes to force)")
    return True, None


def _progress(total: int, desc: str):
    """A tqdm bar on stderr, only when stderr is a terminal (logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="sweep", leave=False)


def _log(msg: str) -> None:
    if sys.stderr.isatty():
        print(msg, file=sys.stderr, flush=True)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_bench(problems: int, chains: int, strata: int, sweeps: int, numpyro: str = "auto",
              device: str = "auto", seed: int = 0, warmup: int | None = None,
              nuts_warmup: int | None = None, nuts_samples: int | None = None,
              rng_kind: str | None = None, chunk: int | None = None,
              kind: str = "sum") -> dict[str, Any]:
    """The whole benchmark as one JSON-able dict (``sampler_main`` prints it).

    ``rng_kind``: pcg|philox (default: pcg on the CPU, philox on a GPU);
    ``chunk``: problems per batch (default: all on the CPU, what fits on a GPU);
    ``kind``: the metrics' kind (``kind_problems``): ``problems`` metrics of
    it, so P × KIND_PROBLEMS[kind] problems; the NumPyro baseline runs for
    ``sum`` only."""
    try:
        xp = get_xp(device)
    except (RuntimeError, ValueError) as e:
        raise BenchUnavailable(str(e)) from e
    warmup = max(sweeps // 2, 10) if warmup is None else warmup
    t0 = time.perf_counter()
    metrics = problems
    stats = kind_problems(synthetic_problems(problems, strata, seed), kind, seed)
    problems = stats["n"].shape[0]
    gen_s = time.perf_counter() - t0

    chunk = chunk or chunk_problems(problems, chains, 2, strata, sweeps, xp)
    n_chunks = len(chunk_bounds(problems, chunk))
    bar = _progress((warmup + sweeps) * n_chunks, "liftstream")
    try:
        g = bench_gibbs_chunked(stats, xp, chains, warmup, sweeps, seed, progress=bar,
                                chunk=chunk, rng_kind=rng_kind)
    finally:
        if bar is not None:
            bar.close()

    out: dict[str, Any] = {
        "machine": machine_info(xp),
        "config": {"problems": problems, "chains": chains, "strata": strata, "sweeps": sweeps,
                   "warmup": warmup, "units": UNITS, "day": DAY, "seed": seed,
                   "treatments": 1, "generate_s": gen_s, "kind": kind, "metrics": metrics},
        "liftstream": g.stats,
        "per_sweep_ms": {"problem": 1e3 * g.stats["sample_s"] / sweeps / problems,
                         "metric": 1e3 * g.stats["sample_s"] / sweeps / metrics,
                         "all": 1e3 * g.stats["sample_s"] / sweeps},
        "numpyro": None,
        "numpyro_skipped": None,
        "agreement": None,
        "ratio_ess_per_s": None,
        "ratio_ess_per_s_min": None,
        "ratio_sweeps_per_s": None,
    }
    if kind == "ratio":
        out["ratio_recombine_ms"] = _ratio_recombine_ms(metrics, chains, strata, seed)
    go, why = _numpyro_plan(numpyro, problems)
    if kind != "sum":
        go, why = False, f"--kind {kind}: the NumPyro baseline models sums only"
    if not go:
        out["numpyro_skipped"] = why
        if numpyro == "yes":
            raise BenchUnavailable(f"--numpyro yes: {why}")
        return out

    from streams.bench.numpyro import run_nuts

    nw = sweeps if nuts_warmup is None else nuts_warmup
    ns = sweeps if nuts_samples is None else nuts_samples
    r = run_nuts(model_data(stats, xp), chains, nw, ns, seed=seed, log=_log)
    ess = ess_bulk(r.adj_effect[..., 0])
    r.stats.update(_ess_summary(ess, r.stats["sample_s"]))
    r.stats["rhat_max"] = _finite_max(split_rhat(r.adj_effect[..., 0])) if chains >= 2 else None
    out["numpyro"] = r.stats
    out["agreement"] = agreement(g.adj_effect, r.adj_effect[..., 0])
    ls, nu = g.stats, r.stats
    out["ratio_ess_per_s"] = _ratio(ls["ess_per_s_median"], nu["ess_per_s_median"])
    out["ratio_ess_per_s_min"] = _ratio(ls["ess_per_s_min"], nu["ess_per_s_min"])
    out["ratio_sweeps_per_s"] = _ratio(ls["sweeps_per_s"], nu["iterations_per_s"])
    return out


def _ratio_recombine_ms(metrics: int, chains: int, strata: int, seed: int,
                        window: int = 200) -> float:
    """Milliseconds to recombine ``metrics`` ratio metrics' two windows of
    ``window`` draws per chain into the ratio's (``kernels.ratio.ratio_window``,
    once per published tick)."""
    from kernels.ratio import ratio_window

    rng = np.random.default_rng(seed)
    C, T, K, S = chains, window, 1, strata

    def win(offset: float) -> dict[str, np.ndarray]:
        return {"mu0": offset + rng.random((C, T, S)), "tau": 0.1 * rng.random((C, T, K, S)),
                "share": np.full((C, T, S), 1.0 / S), "rhat": np.ones((C, T))}

    lin, den = win(0.5), win(2.0)
    w = np.full((K, S), 1.0 / S)
    t0 = time.perf_counter()
    for _ in range(metrics):
        ratio_window(lin, den, w, True)
    return 1e3 * (time.perf_counter() - t0)


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:,.{nd}f}" if abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def format_table(res: dict[str, Any]) -> str:
    """The human table: one row per figure, liftstream | NumPyro | ratio."""
    c, ls, nu = res["config"], res["liftstream"], res["numpyro"] or {}
    lines = [
        f"liftstream bench sampler: P={c['problems']} problems ({c.get('metrics')} "
        f"{c.get('kind', 'sum')} metrics), C={c['chains']} chains, "
        f"S={c['strata']} strata, {c['sweeps']} timed sweeps after {c['warmup']} warm-up "
        f"({res['machine']['device']}, {res['machine']['cpus']} CPUs)",
        f"{'':34}{'liftstream':>14}{'NumPyro NUTS':>14}{'ratio':>10}",
    ]

    def row(label: str, a: Any, b: Any, ratio: Any = None, nd: int = 1) -> None:
        lines.append(f"{label:34}{_fmt(a, nd):>14}{_fmt(b, nd):>14}{_fmt(ratio, 2):>10}")

    row("sweeps (iterations)/s, all chains", ls["sweeps_per_s"], nu.get("iterations_per_s"),
        res["ratio_sweeps_per_s"])
    row("bulk ESS/s adj. effect, median", ls["ess_per_s_median"], nu.get("ess_per_s_median"),
        res["ratio_ess_per_s"])
    row("bulk ESS/s adj. effect, min", ls["ess_per_s_min"], nu.get("ess_per_s_min"),
        res["ratio_ess_per_s_min"])
    row("bulk ESS, median", ls["ess_bulk_median"], nu.get("ess_bulk_median"))
    row("bulk ESS, min", ls["ess_bulk_min"], nu.get("ess_bulk_min"))
    row("split R-hat, max", ls["rhat_max"], nu.get("rhat_max"), nd=3)
    if res.get("per_sweep_ms"):
        ps = res["per_sweep_ms"]
        row("ms a sweep: per problem", ps["problem"], None, nd=4)
        row("ms a sweep: per metric", ps["metric"], None, nd=4)
    if res.get("ratio_recombine_ms") is not None:
        row("ratio recombination, all (ms)", res["ratio_recombine_ms"], None, nd=2)
    row("sampling time (s)", ls["sample_s"], nu.get("sample_s"), nd=2)
    row("warm-up time (s)", ls["warmup_s"], nu.get("warmup_s"), nd=2)
    if nu:
        row("init + compile time (s)", None, nu["init_s"] + nu["compile_s"], nd=2)
        lines.append(
            f"NumPyro: NUTS {nu['parametrisation']}, target_accept={nu['target_accept']}, "
            f"{nu['warmup_iterations']} warm-up + {nu['samples']} samples, "
            f"mean {nu['mean_leapfrog_steps']:.1f} leapfrog steps/iteration, "
            f"{nu['divergences']} divergences")
        ag = res["agreement"]
        lines.append(
            f"agreement: max |Δ mean|/sd = {ag['max_abs_diff_over_sd']:.3f}, max z = "
            f"{ag['max_z']:.2f} (bound {ag['z_crit']:.2f}), sd ratio median "
            f"{ag['sd_ratio_median']:.3f}: {'OK' if ag['agree'] else 'DISAGREE'}")
    else:
        lines.append(f"NumPyro baseline skipped: {res['numpyro_skipped']}")
    return "\n".join(lines)


def sampler_main(args: Any) -> int:
    """``liftstream bench sampler``: 0 when done (and the samplers agree), 1 when
    they disagree, 2 when the requested baseline cannot run."""
    try:
        res = run_bench(args.problems, args.chains, args.strata, args.sweeps,
                        numpyro=args.numpyro, device=args.device,
                        seed=getattr(args, "seed", 0) or 0,
                        warmup=getattr(args, "warmup", None),
                        nuts_warmup=getattr(args, "nuts_warmup", None),
                        nuts_samples=getattr(args, "nuts_samples", None),
                        rng_kind=getattr(args, "rng", None),
                        chunk=getattr(args, "chunk_problems", None),
                        kind=getattr(args, "kind", None) or "sum")
    except BenchUnavailable as e:
        print(f"liftstream bench sampler: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_clean(res), indent=2))
    else:
        print(format_table(res))
    ag = res["agreement"]
    return 1 if ag is not None and not ag["agree"] else 0
