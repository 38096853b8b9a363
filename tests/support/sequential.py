"""Looking at every data-time step, as the live worker does, for many
simulated experiments at once (issue 27's validation; docs/method.md §8).

Each replicate is a hidden-truth population (``streams.dev.synthetic``); its
metrics are problems of ONE batched kernel call (arrays [problems, chains,
…]); at each look (hourly in simulated time by default) the cells and
arrivals are the snapshot of the units matured / arrived by then, and the
chains continue from the previous look exactly as the live sampler's do
(never restarted because data grew). The decision at each look uses the same
kernel functions as ``streams.sampling.decisions`` (``kernels.decision``):
the primary metric's arms by the confidence sequence at α/K, the other
metrics × arms by e-BH once a primary arm is decided. Today's rule (P(>0)
above 0.95 or below 0.05 with R-hat < 1.01, at any look) is scored on the
same looks: the "before".

Metric kinds (issue 26: ``Setting.kind`` "conversion" or "ratio") go
through the published path instead, since their effect exists only there (a
ratio's is recombined from two problems, ``kernels.ratio``, and its
decision's scale reads ``problems.effect_cells``): at each look every
replicate's snapshot (``streams.dev.synthetic.snapshot``) is advanced by the
sampler's tick (``streams.sampling.advance``: one batched kernel call for all
replicates, windows, records) and ``streams.sampling.decisions.decide`` takes
the look, as a live worker does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from unittest import mock

import numpy as np

from kernels import decision as dk
from kernels.data import make_data
from kernels.diagnostics import split_rhat
from kernels.gibbs import init
from kernels.rng import Rng
from kernels.sampler import run
from schemas.records import ExperimentConfig, MetricSpec
from streams.dev.synthetic import Scenario, population, snapshot
from streams.sampling import decisions
from streams.sampling.advance import TickConfig, advance


@dataclass(frozen=True)
class Setting:
    reps: int = 100
    n_units: int = 20_000
    effect: float = 0.0
    effect_slope: float = 0.0
    days: int = 14
    looks_per_day: int = 24
    window_days: float = 0.0  # a unit's outcome is known this long after its arrival
    metrics: int = 1
    variants: int = 2
    #: "geometric" (the simulator's) or "mixture": a unit's exposure rate is
    #: multiplied by 0.25 or 1.75 (half and half): a mixture of geometrics, a
    #: declining hazard the model's one-p-per-stratum arrivals do not have
    arrivals: str = "geometric"
    #: decaying novelty: a treated unit's effect is novelty·exp(−arrival/novelty_days)
    #: (the feature's novelty wears off in calendar time); the long-run effect is 0
    novelty: float = 0.0
    novelty_days: float = 2.0
    chains: int = 8
    sweeps_per_look: int = 10
    #: draws per chain kept by the published path's tick; a look summarises only its
    #: own sweeps' draws, those made on its data (``StoredChains.fresh_window``)
    window: int = 40
    alpha: float = 0.05
    mde: float | None = None  # None: the pooled outcome sd (the model's prior scale)
    seed: int = 0
    #: look index (from 1) at which a forecast is made (None: none)
    forecast_at: int | None = None
    #: the metric's kind (issue 26): "sum" (the kernel-level loop above) or
    #: "conversion" / "ratio" (the published path: ``_simulate_published``)
    kind: str = "sum"
    base_rate: float = 0.05  # conversion: the control's rate
    ratio_corr: float = 0.5  # ratio: corr(M, D) over the control population
    mde_relative: float | None = None  # the config's ``mde_relative`` (published path)


@dataclass
class Result:
    setting: Setting
    ready_at: np.ndarray  # [R, M, K] first look index (1-based) it became ready, 0 = never
    direction: np.ndarray  # [R, M, K] +1 / -1 sign of the effect it was decided on, 0 = none
    before_at: np.ndarray  # [R, M, K] first look today's rule fired, 0 = never
    sd: np.ndarray  # [L, R, M, K] the adjusted sd at each look (NaN before eligible)
    mean: np.ndarray  # [L, R, M, K]
    truth: np.ndarray  # [R, M, K]
    forecast: dict | None
    seconds: float

    def any_ready(self) -> np.ndarray:
        """[R] the replicate declared any decision."""
        return (self.ready_at > 0).reshape(len(self.ready_at), -1).any(-1)

    def any_before(self) -> np.ndarray:
        return (self.before_at > 0).reshape(len(self.before_at), -1).any(-1)


def _populations(st: Setting, rng: np.random.Generator):
    sc = Scenario(n_units=st.n_units, effect=st.effect, effect_slope=st.effect_slope,
                  variants=tuple(f"v{i}" for i in range(st.variants)),
                  allocation=tuple([1.0 / st.variants] * st.variants))
    out = []
    for _ in range(st.reps):
        pop = population(sc, rng)
        if st.arrivals == "mixture":
            mult = np.where(rng.random(len(pop.p_day)) < 0.5, 0.25, 1.75)
            rate = np.clip(sc.exposure_rate * pop.p_day * mult, 1e-6, 1.0)
            pop.arrival = rng.geometric(rate) - 1 + rng.random(len(rate))
        y = [pop.y]
        for _ in range(st.metrics - 1):  # further metrics: the same units, own noise
            y.append(sc.base0 + sc.base_slope * pop.activity + pop.tau * (pop.variant > 0)
                     + sc.noise_sd * rng.standard_normal(len(pop.y)))
        y = np.stack(y)  # [M, U]
        if st.novelty:
            nov = st.novelty * np.exp(-pop.arrival / st.novelty_days) * (pop.variant > 0)
            y = y + nov[None, :]
        out.append((pop, y))
    return out


def _snapshots(st: Setting, pops) -> dict[str, np.ndarray]:
    """Cumulative cells and arrivals at every look, all replicates:
    n/sy/syy [L, R, M, K1, S], arrived/dsum [L, R, S], activity [L, R, S], D [L]."""
    L = st.days * st.looks_per_day
    R, M, K1 = st.reps, st.metrics, st.variants
    S = len(pops[0][0].scenario.strata_edges) - 1
    n = np.zeros((L + 2, R, K1, S))
    sy = np.zeros((L + 2, R, M, K1, S))
    syy = np.zeros((L + 2, R, M, K1, S))
    arr_day = np.zeros((st.days + 1, R, S))
    dsum_day = np.zeros((st.days + 1, R, S))
    act_s = np.zeros((L + 2, R, S))
    act_n = np.zeros((L + 2, R, S))
    for r, (pop, y) in enumerate(pops):
        s = pop.stratum()
        k = pop.variant
        hm = np.floor((pop.arrival + st.window_days) * st.looks_per_day).astype(int) + 1
        hm = np.minimum(hm, L + 1)  # matured at look h >= hm; L + 1: never within the run
        idx = (hm * K1 + k) * S + s
        n[:, r] += np.bincount(idx, minlength=(L + 2) * K1 * S).reshape(L + 2, K1, S)
        for m in range(M):
            sy[:, r, m] += np.bincount(idx, weights=y[m], minlength=(L + 2) * K1 * S
                                       ).reshape(L + 2, K1, S)
            syy[:, r, m] += np.bincount(idx, weights=y[m] ** 2, minlength=(L + 2) * K1 * S
                                        ).reshape(L + 2, K1, S)
        ha = np.minimum(np.floor(pop.arrival * st.looks_per_day).astype(int) + 1, L + 1)
        ia = ha * S + s
        act_s[:, r] = np.bincount(ia, weights=pop.activity, minlength=(L + 2) * S).reshape(-1, S)
        act_n[:, r] = np.bincount(ia, minlength=(L + 2) * S).reshape(-1, S)
        d = np.minimum(np.floor(pop.arrival).astype(int), st.days)
        arr_day[:, r] = np.bincount(d * S + s, minlength=(st.days + 1) * S).reshape(-1, S)
        dsum_day[:, r] = arr_day[:, r] * np.arange(st.days + 1)[:, None]
    cum = {"n": np.cumsum(n, 0), "sy": np.cumsum(sy, 0), "syy": np.cumsum(syy, 0),
           "act_s": np.cumsum(act_s, 0), "act_n": np.cumsum(act_n, 0),
           "arr": np.concatenate([np.zeros((1, R, S)), np.cumsum(arr_day, 0)]),
           "dsum": np.concatenate([np.zeros((1, R, S)), np.cumsum(dsum_day, 0)]),
           "arr_day": arr_day}
    edges = np.asarray(pops[0][0].scenario.strata_edges, float)
    cum["mid"] = 0.5 * (edges[:-1] + np.minimum(edges[1:], 28))
    return cum


def _data_at(st: Setting, cum, h: int):
    """ModelData of every (replicate, metric) at look h (1-based)."""
    R, M = st.reps, st.metrics
    D = h // st.looks_per_day
    n = np.repeat(cum["n"][h][:, None], M, axis=1)  # [R, M, K1, S]
    an = cum["act_n"][h]
    act = np.where(an > 0, cum["act_s"][h] / np.maximum(an, 1), cum["mid"][None, :])

    def per_problem(x):  # [R, ...] -> [R*M, ...]
        return np.repeat(x, M, axis=0)

    S = n.shape[-1]
    return make_data(n.reshape(R * M, -1, S), cum["sy"][h].reshape(R * M, -1, S),
                     cum["syy"][h].reshape(R * M, -1, S), per_problem(cum["arr"][D]),
                     per_problem(cum["dsum"][D]), D, per_problem(act)), D


def simulate(st: Setting, progress: bool = False) -> Result:
    """Run every look of every replicate; see the module docstring."""
    if st.kind != "sum":
        return _simulate_published(st)
    t0 = time.perf_counter()
    rng = np.random.default_rng(st.seed)
    pops = _populations(st, rng)
    cum = _snapshots(st, pops)
    R, M, K = st.reps, st.metrics, st.variants - 1
    L = st.days * st.looks_per_day
    truth = np.zeros((R, M, K))
    for r, (pop, _) in enumerate(pops):
        truth[r] = pop.true_effect  # the long-run (ship-to) effect; 0 under novelty decay
    if st.novelty:
        truth[:] = 0.0
    krng = Rng(st.seed + 7)
    state = None
    lo = np.full((R, M, K), -np.inf)
    hi = np.full((R, M, K), np.inf)
    lem = np.full((R, M, K), -np.inf)
    rho = np.full((R, M, K), np.nan)
    ready_at = np.zeros((R, M, K), int)
    direction = np.zeros((R, M, K), int)
    before_at = np.zeros((R, M, K), int)
    gate = np.zeros(R, bool)
    sds = np.full((L, R, M, K), np.nan)
    means = np.full((L, R, M, K), np.nan)
    level = np.where(np.arange(M)[None, :, None] == 0, st.alpha / K, st.alpha)
    fc = None
    for h in range(1, L + 1):
        data, D = _data_at(st, cum, h)
        if state is None:
            state = init(data, krng, st.chains)
        state, tr, _ = run(state, data, krng, st.sweeps_per_look)
        eff = tr.adj_effect  # [P, C, T, K]
        # data change at every look: a look summarises its own draws (advance.fresh_window)
        draws = eff
        flat = np.moveaxis(draws, 3, 1).reshape(R, M, K, -1)
        m, s = flat.mean(-1), flat.std(-1, ddof=1)
        p_pos = (flat > 0).mean(-1)
        rhat = split_rhat(np.moveaxis(draws, 3, 1)).reshape(R, M, K)
        nk = cum["n"][h]  # [R, K1, S]
        matured = nk.sum(-1)  # [R, K1]
        ok = (np.minimum(matured[:, :1], matured[:, 1:]) >= 2)[:, None, :] & (s > 0) & (D >= 1)
        ok = np.broadcast_to(ok, (R, M, K))
        # the mixture's scale: fixed at a pair's first eligible look
        first = ok & np.isnan(rho)
        if first.any():
            if st.mde is not None:
                scale = np.full((R, M, K), st.mde)
            else:
                sd_pool = dk.pooled_sd(np.repeat(nk[:, None], M, 1), cum["sy"][h],
                                       cum["syy"][h])  # [R, M]
                scale = np.broadcast_to(sd_pool[..., None], (R, M, K))
            rho = np.where(first, dk.mixing_precision(scale), rho)
        lo2, hi2, lem2, le = dk.look(lo, hi, lem, np.where(ok, m, np.nan), s,
                                     np.where(ok, rho, 1.0), level)
        lo, hi, lem = lo2, hi2, lem2
        sds[h - 1] = np.where(ok, s, np.nan)
        means[h - 1] = np.where(ok, m, np.nan)
        # primary: the running intersection excludes 0
        new = ok[:, 0] & (ready_at[:, 0] == 0) & dk.excludes_zero(lo[:, 0], hi[:, 0])
        ready_at[:, 0][new] = h
        direction[:, 0][new] = np.where(lo[:, 0][new] > 0, 1, np.where(hi[:, 0][new] < 0, -1,
                                                                        np.sign(m[:, 0][new])))
        gate |= (ready_at[:, 0] > 0).any(-1)
        if M > 1:
            rej = dk.ebh(np.where(ok[:, 1:], le[:, 1:], np.nan).reshape(R, -1), st.alpha
                         ).reshape(R, M - 1, K)
            new = rej & gate[:, None, None] & (ready_at[:, 1:] == 0)
            ready_at[:, 1:][new] = h
            direction[:, 1:][new] = np.sign(m[:, 1:][new]).astype(int)
        fired = ok & ((p_pos > 0.95) | (p_pos < 0.05)) & (rhat < 1.01) & (before_at == 0)
        before_at[fired] = h
        if st.forecast_at == h:
            fc = _forecast(st, cum, h, D, data, tr, m, s, rho, level, truth, ready_at)
        if progress and h % st.looks_per_day == 0:
            print(f"day {h // st.looks_per_day}: ready {(ready_at > 0).any((1, 2)).mean():.3f} "
                  f"before {(before_at > 0).any((1, 2)).mean():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return Result(st, ready_at, direction, before_at, sds, means, truth, fc,
                  time.perf_counter() - t0)


def _forecast(st, cum, h, D, data, tr, m, s, rho, level, truth, ready_at) -> dict:
    """P(ready by the end of each later day) for the primary metric's first
    arm of every replicate, forecast at look h with θ = ±mde (else the
    truth): [R, days − D]."""
    R = st.reps
    J = st.days - D
    share = tr.share.mean(axis=(1, 2)).reshape(R, st.metrics, -1)[:, 0]  # [R, S]
    out = np.zeros((R, J))
    sdf = np.zeros((R, J))
    for r in range(R):
        n = cum["n"][h][r][[0, 1]]
        sy, syy = cum["sy"][h][r, 0][[0, 1]], cum["syy"][h][r, 0][[0, 1]]
        pooled = float(dk.pooled_sd(n, sy, syy)) ** 2
        var = np.where(n >= 2, (syy - sy * sy / np.maximum(n, 1)) / np.maximum(n - 1, 1), pooled)
        var = np.where(var > 0, var, pooled)
        arrivals = cum["arr_day"][:D, r].T  # [S, D]
        theta = st.mde if st.mde is not None else truth[r, 0, 0]
        theta = float(np.copysign(abs(theta), m[r, 0, 0]))
        f = dk.forecast(float(m[r, 0, 0]), float(s[r, 0, 0]), n, var, share[r], arrivals, D,
                        np.asarray(data.logit_p0)[r * st.metrics], 0.5, st.window_days, J,
                        float(rho[r, 0, 0]), float(level[0, 0, 0]), theta,
                        looks_per_bucket=st.looks_per_day, seed=r, paths=1000,
                        already=bool(ready_at[r, 0, 0] > 0))
        out[r] = f["p_ready"]
        sdf[r] = f["sd"]
    return {"look": h, "D": D, "p_ready": out, "sd": sdf}


#: the published path's metric of each kind (the names are the config's, any will do)
KIND_METRICS = {
    "conversion": MetricSpec("purchase", kind="conversion"),
    "ratio": MetricSpec("revenue_per_session", kind="ratio", numerator="revenue",
                        denominator="sessions"),
}


def _simulate_published(st: Setting) -> Result:
    """A metric kind's looks through the sampler's tick and ``decide`` (one
    metric, two variants, units known on arrival: ``window_days`` 0). The
    tick keeps ``st.window`` draws per chain, after a warm-up of two looks'
    sweeps (``analyze``'s convention for its looks). The forecast, which
    ``decide`` attaches beside the decision and never reads, is not computed
    (it costs ~18 ms a pair a look; its check is the sum's,
    ``test_power_and_forecast_against_realised``)."""
    if st.metrics != 1 or st.variants != 2 or st.window_days or st.arrivals != "geometric" \
            or st.novelty or st.forecast_at is not None:
        raise ValueError("the published path simulates one metric, two arms, known on arrival")
    t0 = time.perf_counter()
    rng = np.random.default_rng(st.seed)
    sc = Scenario(kind=st.kind, n_units=st.n_units, effect=st.effect,
                  effect_slope=st.effect_slope, base_rate=st.base_rate, ratio_corr=st.ratio_corr)
    pops = [population(sc, rng) for _ in range(st.reps)]
    look_ms = 86_400_000 // st.looks_per_day
    cfgs = [ExperimentConfig(f"e{r}", variants=sc.variants, metrics=(KIND_METRICS[st.kind],),
                             started_at=0, window_seconds=look_ms // 1000, mde=st.mde,
                             mde_relative=st.mde_relative, decision_alpha=st.alpha,
                             look_seconds=look_ms // 1000) for r in range(st.reps)]
    tick = TickConfig(chains=st.chains, sweeps=st.sweeps_per_look, window=st.window,
                      warmup=2 * st.sweeps_per_look, min_draws=max(st.sweeps_per_look // 2, 1),
                      seed=st.seed)
    R, L = st.reps, st.days * st.looks_per_day
    ready_at = np.zeros((R, 1, 1), int)
    direction = np.zeros((R, 1, 1), int)
    before_at = np.zeros((R, 1, 1), int)
    sds = np.full((L, R, 1, 1), np.nan)
    means = np.full((L, R, 1, 1), np.nan)
    truth = np.array([p.true_effect for p in pops]).reshape(R, 1, 1)
    stored: dict = {}
    states: list[dict | None] = [None] * R
    with mock.patch.object(decisions, "forecast_of", lambda *a, **k: None):
        for h in range(1, L + 1):
            # the watermark on the look grid exactly (h / looks_per_day days in ms may round down)
            # seq: the data's version (new at every look), as Redis's dirty_seq is live
            snaps = [replace(snapshot(p, h / st.looks_per_day, c), watermark=h * look_ms,
                             max_ts=h * look_ms, seq=h) for p, c in zip(pops, cfgs, strict=True)]
            recs, stored = advance(snaps, stored, tick, computed_at=h * look_ms)
            by_exp = {r["experiment_id"]: r for r in recs}
            for r in range(R):
                rec = by_exp.get(cfgs[r].experiment_id)
                if rec is None:
                    continue
                looks = (states[r] or {}).get("pairs", {})
                _, states[r], looked = decisions.decide(snaps[r], [rec], states[r])
                dec = rec["decision"]
                if dec["ready"] and not ready_at[r, 0, 0]:
                    ready_at[r, 0, 0] = h
                    direction[r, 0, 0] = 1 if dec["direction"] == "better" else -1
                eff = rec["adjusted"]["effect"]
                if looked and dec["looks"] > sum(p["looks"] for p in looks.values()):
                    means[h - 1, r], sds[h - 1, r] = eff["mean"], eff["sd"]
                p_pos, rhat = rec["adjusted"]["p_positive"], rec["diagnostics"]["rhat"]
                if (not before_at[r, 0, 0] and dec["looks"] and p_pos is not None
                        and rhat is not None and (p_pos > 0.95 or p_pos < 0.05) and rhat < 1.01):
                    before_at[r, 0, 0] = h
    return Result(st, ready_at, direction, before_at, sds, means, truth, None,
                  time.perf_counter() - t0)


def with_(st: Setting, **kw) -> Setting:
    return replace(st, **kw)
