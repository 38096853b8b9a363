"""Synthetic experiments with a known population effect (pure NumPy, no I/O).

The one generator used by the statistical tests, ``liftstream simulate`` and
the demo, so all three mean the same thing by "the truth".

A population of units, each with pre-experiment activity a (active days of the
last 28) and per-day visit probability p = max(a, 0.5)/28. A unit is first
exposed on the first day a visit exposes it (geometric in exposure_rate · p,
so the model's activity-based arrival prior is deliberately off): heavy users
first. Its outcome in its metric window is

    Y = base0 + base_slope · a + τ(a) · treated + noise,
    τ(a) = effect + effect_slope · (log p − mean log p over the population),

so the population (ship-to) effect is ``effect`` up to finite-population noise,
and early adopters, with high log p, see a different effect when
``effect_slope`` ≠ 0. ``true_effect`` is the exact finite-population mean of τ.

Metric kinds (issue 26; ``Scenario.kind``, ``revenue_sigma``, ``cap_upper``):
conversion, a ratio of two per-unit totals, lognormal revenue with a point
mass at 0 (capped or not). The arrivals are the same; the effect is a
*relative* lift ℓ = effect + effect_slope · (log p − mean log p), as in the
visits model, and the truth is the population estimand of the kind, computed
from every unit's expected outcome under each arm (``kind_truth``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_EDGES = (0, 1, 2, 4, 8, 15, 22, 29)


@dataclass(frozen=True)
class Scenario:
    n_units: int = 20_000
    activity_beta: tuple[float, float] = (0.5, 1.2)  # a/28 ~ Beta: many light users
    # not every visit exposes the unit: its daily exposure probability is
    # exposure_rate · p, so the arrival prior (which assumes p) is off by this factor
    exposure_rate: float = 0.7
    #: None: arrivals as above (one fixed exposure rate, the same in every replicate).
    #: A number d: each population draws, per stratum s, an offset δ_s ~ N(0, d²) and its
    #: units' daily exposure probability is expit(logit p̂ + δ_s), p̂ = the model's prior
    #: centre (``kernels.data.per_bucket_prob`` of the unit's activity, one-day buckets;
    #: ``exposure_rate`` unused): the arrival process drawn from the model's own prior
    #: (d = ``prior_sd_logit_p``), so replicates carry the share uncertainty the prior
    #: states (docs/method.md, "Metric kinds: validation")
    arrival_logit_sd: float | None = None
    base0: float = 1.0
    base_slope: float = 0.15
    noise_sd: float = 2.0
    effect: float = 0.10  # population-average effect τ̄
    effect_slope: float = 0.12  # per unit of log p: heavier users benefit more
    variants: tuple[str, ...] = ("control", "treatment")
    allocation: tuple[float, ...] = (0.5, 0.5)
    strata_edges: tuple[float, ...] = DEFAULT_EDGES
    #: CUPED (issue 18): None = units carry no pre-experiment value. Else each
    #: unit has x = base0 + base_slope · a + noise_sd · (ρ ε + √(1−ρ²) η): the
    #: same metric over an equally long pre-period, whose noise correlates ρ
    #: with the in-experiment noise ε (so corr(x, Y) = ρ within a cell)
    covariate_rho: float | None = None
    covariate_missing: float = 0.0  # share of units without x (new users)
    #: Novelty (issue 19): None = the outcome model above. A number X = the
    #: *visits* model: the unit's exposure is a visit (age < 1 h), and on each
    #: later day k = 1 … window_days−1 it visits with probability p (at age
    #: k + U(0, 1) days). Each visit's metric is Poisson with mean
    #: g · (1 + treated · (ℓ + X · [k = 0])), g = base0 + base_slope · a and
    #: ℓ = effect + effect_slope · (log p − mean log p) a *relative* lift: X is
    #: an extra lift on the first day only (X > 0 novelty, < 0 primacy, 0 none)
    novelty: float | None = None
    window_days: int = 7  # the metric window of the visits model, in days
    #: Metric kinds (issue 26), the outcome per unit and arm k (ℓ the relative lift above,
    #: w = exp(activity_gain · (log p − mean log p)) / its mean: heavy users do more):
    #: "conversion": Y ~ Bernoulli(q_k), q_0 = base_rate · w, q_1 = q_0 (1 + ℓ);
    #: "ratio": D (sessions) ~ Poisson(λ (1 + den_effect · k)), λ = 1 + (window_days − 1) p;
    #:   the numerator M = base0 (1 + ℓ k) D + η, η normal with variance ∝ λ, scaled so that
    #:   corr(M, D) over the control population is ratio_corr;
    #: "sum" with ``revenue_sigma``: Y = B · exp(μ + σ ε), B ~ Bernoulli(1 − zero_share),
    #:   E[Y | control] = base0 · w, the lift scales the lognormal (μ + log(1 + ℓ) treated).
    kind: str = "sum"
    base_rate: float = 0.05
    activity_gain: float = 0.3
    ratio_corr: float = 0.5
    den_effect: float = 0.02
    revenue_sigma: float | None = None
    zero_share: float = 0.7
    #: winsorize each unit's window total (revenue; a ratio's numerator) at this upper
    #: cap: the cells' y is the capped total, the truth the capped population effect
    cap_upper: float | None = None


@dataclass
class Population:
    activity: np.ndarray  # [M] active days 0..28
    p_day: np.ndarray  # [M] per-day visit probability
    arrival: np.ndarray  # [M] first exposure time in days (float; day = floor)
    variant: np.ndarray  # [M] variant index, 0 = control
    tau: np.ndarray  # [M] the unit's own effect
    y: np.ndarray  # [M] outcome in the unit's metric window
    scenario: Scenario = field(repr=False)
    #: [M] pre-experiment value of the metric, NaN where the unit has none;
    #: None when the scenario has no covariate
    x: np.ndarray | None = None
    #: visits model only: [M, window_days] each day's metric (0 without a
    #: visit) and its age in days; [M] the unit's expected control outcome
    visits: np.ndarray | None = None
    visit_age: np.ndarray | None = None
    baseline: np.ndarray | None = None
    #: ratio: [M] the denominator's window total D (``y`` is the numerator M), and
    #: its expectation under control and the treatment's change of it per unit
    den: np.ndarray | None = None
    den_baseline: np.ndarray | None = None
    den_tau: np.ndarray | None = None
    #: capped (``Scenario.cap_upper``): [M] E[min(y, cap) | control] and the
    #: treatment's change of it per unit (``y`` stays the uncapped total)
    capped_baseline: np.ndarray | None = None
    capped_tau: np.ndarray | None = None
    #: [M] ``kernels.tail.tail_bucket`` of each unit's total (``snapshot`` fills it once)
    tail_buckets: np.ndarray | None = field(default=None, repr=False)

    @property
    def true_effect(self) -> float:
        """Population effect: the mean of τ over *all* units, arrived or not
        (a ratio: R_t − R_c of the population's expected totals)."""
        if self.den is not None:
            rc, rt = self.true_ratios
            return rt - rc
        return float(self.tau.mean())

    @property
    def true_baseline(self) -> float:
        if self.den is not None:
            return self.true_ratios[0]
        if self.baseline is not None:
            return float(self.baseline.mean())
        s = self.scenario
        return float(np.mean(s.base0 + s.base_slope * self.activity))

    @property
    def true_ratios(self) -> tuple[float, float]:
        """Ratio: (R_c, R_t), R_k = E_pop[M | k] / E_pop[D | k] over every unit."""
        m0, d0 = self.baseline.sum(), self.den_baseline.sum()
        return float(m0 / d0), float((m0 + self.tau.sum()) / (d0 + self.den_tau.sum()))

    @property
    def outcome(self) -> np.ndarray:
        """[M] the per-unit outcome the cells hold (contract: y): the total,
        winsorized at the scenario's cap when there is one."""
        cap = self.scenario.cap_upper
        return self.y if cap is None else np.minimum(self.y, cap)

    @property
    def true_lift(self) -> float:
        return self.true_effect / self.true_baseline

    def stratum(self, edges=None) -> np.ndarray:
        e = np.asarray(edges or self.scenario.strata_edges, float)
        return np.clip(np.searchsorted(e, self.activity, side="right") - 1, 0, len(e) - 2)


def _units(sc: Scenario, rng: np.random.Generator):
    """The units every model shares: activity a, per-day visit probability p,
    first exposure (heavy users first) and variant; drawn in this order."""
    M = sc.n_units
    a = np.round(28 * rng.beta(*sc.activity_beta, size=M))
    p = np.maximum(a, 0.5) / 28.0
    if sc.arrival_logit_sd is None:
        day = rng.geometric(sc.exposure_rate * p) - 1  # first exposure day: 0, 1, 2, …
    else:
        day = _prior_drawn_days(sc, a, rng)
    arrival = day + rng.random(M)
    variant = rng.choice(len(sc.variants), size=M, p=np.asarray(sc.allocation))
    return a, p, arrival, variant


def _prior_drawn_days(sc: Scenario, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """First exposure days whose per-stratum logit offset from the arrival prior's
    centre is drawn from N(0, ``arrival_logit_sd``²) (``Scenario.arrival_logit_sd``)."""
    from kernels.data import per_bucket_prob  # noqa: PLC0415 - only this option needs it

    e = np.asarray(sc.strata_edges, float)
    s = np.clip(np.searchsorted(e, a, side="right") - 1, 0, len(e) - 2)
    delta = sc.arrival_logit_sd * rng.standard_normal(len(e) - 1)
    p0 = per_bucket_prob(a, 1.0)
    q = 1.0 / (1.0 + np.exp(-(np.log(p0) - np.log1p(-p0) + delta[s])))
    return rng.geometric(q) - 1


def population(sc: Scenario, rng: np.random.Generator) -> Population:
    if sc.novelty is not None:
        return _visits_population(sc, rng)
    if sc.kind != "sum" or sc.revenue_sigma is not None:
        return _kind_population(sc, rng)
    M = sc.n_units
    a, p, arrival, variant = _units(sc, rng)
    logp = np.log(p)
    tau = sc.effect + sc.effect_slope * (logp - logp.mean())
    treated = variant > 0
    eps = rng.standard_normal(M)
    y = sc.base0 + sc.base_slope * a + tau * treated + sc.noise_sd * eps
    x = None
    if sc.covariate_rho is not None:  # drawn last: scenarios without it keep their draws
        r = float(sc.covariate_rho)
        x = sc.base0 + sc.base_slope * a + sc.noise_sd * (
            r * eps + np.sqrt(1.0 - r * r) * rng.standard_normal(M))
        if sc.covariate_missing > 0:
            x = np.where(rng.random(M) < sc.covariate_missing, np.nan, x)
    return Population(a, p, arrival, variant, tau, y, sc, x)


def _visits_population(sc: Scenario, rng: np.random.Generator) -> Population:
    """The visits model (``Scenario.novelty``): see the Scenario's comment."""
    M, Wd = sc.n_units, int(sc.window_days)
    a, p, arrival, variant = _units(sc, rng)
    logp = np.log(p)
    lift = sc.effect + sc.effect_slope * (logp - logp.mean())
    treated = (variant > 0).astype(float)
    g = sc.base0 + sc.base_slope * a
    visit = np.ones((M, Wd), bool)
    visit[:, 1:] = rng.random((M, Wd - 1)) < p[:, None]
    age = np.arange(Wd)[None, :] + rng.random((M, Wd))
    age[:, 0] = rng.random(M) / 24.0  # the exposure visit: within its first hour
    first = np.zeros(Wd)
    first[0] = 1.0
    rate = g[:, None] * (1.0 + treated[:, None] * (lift[:, None] + sc.novelty * first[None, :]))
    visits = np.where(visit, rng.poisson(rate), 0).astype(float)
    n_exp = 1.0 + p * (Wd - 1)  # expected visits in the window
    baseline = g * n_exp
    tau = g * (lift * n_exp + sc.novelty)  # E[Y | treated] − E[Y | control]
    return Population(a, p, arrival, variant, tau, visits.sum(1), sc, None,
                      visits=visits, visit_age=age, baseline=baseline)


def _ndtr(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF (no scipy in the runtime dependencies)."""
    return 0.5 * np.vectorize(math.erfc, otypes=[float])(-np.asarray(x, float) / math.sqrt(2.0))


def _capped_lognormal_mean(mu: np.ndarray, sigma: float, cap: float) -> np.ndarray:
    """E[min(X, cap)] for X = exp(μ + σ ε): the mean below the cap plus the cap
    times the mass above it."""
    lc = math.log(cap)
    return (np.exp(mu + 0.5 * sigma**2) * _ndtr((lc - mu - sigma**2) / sigma)
            + cap * (1.0 - _ndtr((lc - mu) / sigma)))


def _kind_population(sc: Scenario, rng: np.random.Generator) -> Population:
    """Conversion, ratio and lognormal revenue (``Scenario.kind``; see its comment).
    ``baseline``/``tau`` are each unit's expected outcome under control and the
    treatment's change of it, so the truths are exact population expectations."""
    if sc.kind not in ("sum", "conversion", "ratio"):
        raise ValueError(f"unknown kind {sc.kind!r}")
    if sc.cap_upper is not None and sc.revenue_sigma is None:
        raise ValueError("cap_upper: only the revenue model has a capped truth")
    M = sc.n_units
    a, p, arrival, variant = _units(sc, rng)
    logp = np.log(p)
    dev = logp - logp.mean()
    lift = sc.effect + sc.effect_slope * dev
    treated = variant > 0
    w = np.exp(sc.activity_gain * dev)
    w /= w.mean()
    out: dict = {}
    if sc.kind == "conversion":
        q0 = np.clip(sc.base_rate * w, 0.0, 1.0)
        q1 = np.clip(q0 * (1.0 + lift), 0.0, 1.0)
        y = (rng.random(M) < np.where(treated, q1, q0)).astype(float)
        base, tau = q0, q1 - q0
    elif sc.kind == "ratio":
        lam = 1.0 + (sc.window_days - 1) * p
        den = rng.poisson(lam * np.where(treated, 1.0 + sc.den_effect, 1.0)).astype(float)
        r = sc.base0 * np.where(treated, 1.0 + lift, 1.0)
        # corr(M, D) = ρ over the control population: Var D = E λ + Var λ (Poisson
        # mixture), M = r D + η with Var η = r² Var D (1/ρ² − 1), η's variance ∝ λ
        var_d = lam.mean() + lam.var()
        s_eta = sc.base0 * math.sqrt(var_d * (1.0 / sc.ratio_corr**2 - 1.0))
        y = r * den + s_eta * np.sqrt(lam / lam.mean()) * rng.standard_normal(M)
        base = sc.base0 * lam
        tau = sc.base0 * lam * ((1.0 + lift) * (1.0 + sc.den_effect) - 1.0)
        out.update(den=den, den_baseline=lam, den_tau=lam * sc.den_effect)
    else:  # lognormal revenue with a point mass at 0
        sig = float(sc.revenue_sigma)
        buys = rng.random(M) >= sc.zero_share
        mu0 = np.log(sc.base0 * w / (1.0 - sc.zero_share)) - 0.5 * sig**2
        mu = mu0 + np.where(treated, np.log1p(lift), 0.0)
        y = np.where(buys, np.exp(mu + sig * rng.standard_normal(M)), 0.0)
        base = sc.base0 * w
        tau = base * lift
        if sc.cap_upper is not None:
            c0 = _capped_lognormal_mean(mu0, sig, sc.cap_upper)
            c1 = _capped_lognormal_mean(mu0 + np.log1p(lift), sig, sc.cap_upper)
            out.update(capped_baseline=(1.0 - sc.zero_share) * c0,
                       capped_tau=(1.0 - sc.zero_share) * (c1 - c0))
    return Population(a, p, arrival, variant, tau, y, sc, None, baseline=base, **out)


def kind_truth(pop: Population) -> dict:
    """What a kind's estimate should cover: ``effect`` and ``lift`` of its
    outcome over the whole population (a capped total: the capped one, with
    the raw total's under ``uncapped``; a ratio: R_t − R_c and R_t/R_c − 1,
    with ``ratios`` = (R_c, R_t))."""
    sc = pop.scenario
    out = {"kind": sc.kind, "effect": pop.true_effect, "lift": pop.true_lift}
    if pop.den is not None:
        out["ratios"] = pop.true_ratios
    if pop.capped_tau is not None:
        eff = float(pop.capped_tau.mean())
        out["uncapped"] = {"effect": out["effect"], "lift": out["lift"]}
        out.update(effect=eff, lift=eff / float(pop.capped_baseline.mean()))
    return out


def age_truth(pop: Population, edges_days: tuple[int, ...]) -> list[dict]:
    """Visits model: the population's lift and effect in each exposure-age
    bin [edges[b], edges[b+1]) days (integer edges; the last is the window):
    Σ_u E[y_b | treated] − E[y_b | control] over Σ_u E[y_b | control], every
    unit of the population, arrived or not."""
    sc = pop.scenario
    Wd = int(sc.window_days)
    g = sc.base0 + sc.base_slope * pop.activity
    logp = np.log(pop.p_day)
    lift = sc.effect + sc.effect_slope * (logp - logp.mean())
    out = []
    for lo, hi in zip(edges_days[:-1], edges_days[1:], strict=True):
        days = [k for k in range(Wd) if lo <= k < hi]
        pk = np.array([[1.0 if k == 0 else float(q) for k in days] for q in pop.p_day])
        base = g * pk.sum(1)
        nov = np.array([sc.novelty if k == 0 else 0.0 for k in days])
        eff = g * (lift * pk.sum(1) + pk @ nov)
        out.append({"from_s": int(lo * 86_400), "to_s": int(hi * 86_400),
                    "effect": float(eff.mean()), "lift": float(eff.sum() / base.sum())})
    return out


def bin_outcomes(pop: Population, edges_days: tuple[int, ...]) -> np.ndarray:
    """Visits model: [M, B] each unit's metric total in each age bin."""
    e = np.asarray(edges_days, float)
    b = np.clip(np.searchsorted(e, pop.visit_age, side="right") - 1, 0, len(e) - 2)
    out = np.zeros((len(pop.y), len(e) - 1))
    for j in range(len(e) - 1):
        out[:, j] = np.where(b == j, pop.visits, 0.0).sum(1)
    return out


def age_cell_stats(pop: Population, day: float, edges_days: tuple[int, ...],
                   fine_edges) -> dict[str, np.ndarray]:
    """Visits model: the exposure-age cells of the units matured at ``day``
    (arrival + window <= day) by variant and fine stratum (the last = none):
    n [K1, F+1], sy and syy [K1, F+1, B], s0L [K1, F+1] (Σ y_0 · y_{B−1}),
    what ``ExperimentSnapshot.age_cells`` holds."""
    sc = pop.scenario
    K1, B = len(sc.variants), len(edges_days) - 1
    fe = np.asarray(fine_edges, float)
    F = len(fe) - 1
    f = np.clip(np.searchsorted(fe, pop.activity, side="right") - 1, 0, F - 1)
    yb = bin_outcomes(pop, edges_days)
    m = pop.arrival + sc.window_days < day
    cell = pop.variant[m] * (F + 1) + f[m]  # flat (variant, fine stratum)
    C = K1 * (F + 1)

    def tot(w):
        return np.bincount(cell, weights=w, minlength=C).reshape(K1, F + 1)

    y = yb[m]
    return {"n": tot(None).astype(float),
            "sy": np.stack([tot(y[:, b]) for b in range(B)], -1),
            "syy": np.stack([tot(y[:, b] ** 2) for b in range(B)], -1),
            "s0L": tot(y[:, 0] * y[:, -1])}


def cell_stats(pop: Population, day: float, bucket_days: float = 1.0, y: np.ndarray | None = None,
               window_days: float = 0.0) -> dict[str, np.ndarray]:
    """Sufficient statistics at time ``day``: cells [K1, S] of the outcome
    ``y`` (default the unit's outcome, ``Population.outcome``) over the units
    matured by then (arrival + ``window_days`` < day; the default zero-length
    window: every unit that arrived), arrivals by stratum, D. A capped total
    adds ``st``, ``stt`` (the uncapped totals); a ratio ``sd``, ``sdd``,
    ``smd`` (its denominator D, with M = y): what ``ExperimentSnapshot.extra_cells``
    holds (``snapshot_cells`` lays them out)."""
    sc = pop.scenario
    K1 = len(sc.variants)
    S = len(sc.strata_edges) - 1
    s = pop.stratum()
    D = int(np.floor(day / bucket_days))
    arrived = pop.arrival < day
    y = pop.outcome if y is None else y
    m = pop.arrival + window_days < day
    at = (pop.variant[m], s[m])

    def tot(w) -> np.ndarray:
        a = np.zeros((K1, S))
        np.add.at(a, at, w)
        return a

    n, sy, syy = tot(1.0), tot(y[m]), tot(y[m] ** 2)
    bucket = np.floor(pop.arrival / bucket_days)
    done = pop.arrival < D * bucket_days
    arr = np.bincount(s[done], minlength=S).astype(float)
    dsum = np.bincount(s[done], weights=bucket[done], minlength=S)
    act_sum = np.bincount(s[arrived], weights=pop.activity[arrived], minlength=S)
    act_n = np.bincount(s[arrived], minlength=S)
    edges = np.asarray(sc.strata_edges, float)
    mid = 0.5 * (edges[:-1] + np.minimum(edges[1:], 28))
    activity = np.where(act_n > 0, act_sum / np.maximum(act_n, 1), mid)
    out = {"n": n, "sy": sy, "syy": syy, "arrived": arr, "dsum": dsum, "D": D,
           "activity": activity}
    if sc.cap_upper is not None:
        out.update(st=tot(pop.y[m]), stt=tot(pop.y[m] ** 2))
    if pop.den is not None:
        dm = pop.den[m]
        out.update(sd=tot(dm), sdd=tot(dm**2), smd=tot(y[m] * dm))
    if pop.x is not None:  # the covariate's cell statistics (kernels.data.CovStats)
        has = arrived & np.isfinite(pop.x)
        at = (pop.variant[has], s[has])
        xv, yv = pop.x[has], pop.y[has]
        for name, w in (("nx", np.ones_like(xv)), ("sx", xv), ("sxx", xv * xv),
                        ("sxy", xv * yv), ("sy_x", yv)):
            a = np.zeros((K1, S))
            np.add.at(a, at, w)
            out[name] = a
    return out


#: ``cell_stats``' extra sums in ``ExperimentSnapshot.extra_cells``' tuple order
EXTRA_CELLS = {"capped": ("st", "stt"), "ratio": ("sd", "sdd", "smd")}


def snapshot_cells(stats: dict[str, np.ndarray], n_strata_total: int | None = None
                   ) -> tuple[list[list[tuple]], list[list[tuple]] | None]:
    """``cell_stats`` in the snapshot's layout (docs: issue 26 contract):
    ``cells[vi][s]`` = (n, Σy, Σy², n_x, Σx, Σx², Σxy, Σy_x) and the metric's
    ``extra_cells[vi][s]`` (None when it needs none), strata padded with empty
    cells up to ``n_strata_total`` (the snapshot's "unknown activity" stratum)."""
    K1, S = stats["n"].shape
    St = S if n_strata_total is None else n_strata_total
    cov = ("nx", "sx", "sxx", "sxy", "sy_x")
    extra_keys = (EXTRA_CELLS["ratio"] if "sd" in stats else ()) + (
        EXTRA_CELLS["capped"] if "st" in stats else ())

    def get(k: str, v: int, s: int) -> float:
        return float(stats[k][v, s]) if k in stats and s < S else 0.0

    cells = [[(int(get("n", v, s)), get("sy", v, s), get("syy", v, s), int(get("nx", v, s)),
               *(get(k, v, s) for k in cov[1:])) for s in range(St)] for v in range(K1)]
    extra = [[tuple(get(k, v, s) for k in extra_keys) for s in range(St)]
             for v in range(K1)] if extra_keys else None
    return cells, extra


def snapshot(pop: Population, day: float, config, matured_days: float = 0.0):
    """The ``ExperimentSnapshot`` a worker would hold at ``day`` for ``config``
    (its ``started_at`` = day 0, daily buckets; every metric of ``config``
    reads this population's outcome, so give it one metric): cells and
    ``extra_cells`` from ``cell_stats``, arrivals by entry day, ``tails`` of
    the matured units' uncapped totals for a ``sum`` metric. Lets the
    statistical tests run the published path (``streams.sampling.analyze.estimate``)
    on populations of any size without folding their events."""
    from kernels.tail import tail_bucket  # noqa: PLC0415 - only this builder needs them
    from streams.state.semantics import ExperimentSnapshot  # noqa: PLC0415

    sc = pop.scenario
    S = len(sc.strata_edges) - 1
    st = cell_stats(pop, day, window_days=matured_days)
    cells, extra = snapshot_cells(st, S + 1)
    s = pop.stratum()
    D = int(st["D"])
    arrived = pop.arrival < day
    arrivals = tuple(
        {int(d): int(c) for d, c in zip(*np.unique(np.floor(pop.arrival[arrived & (s == k)]),
                                                   return_counts=True), strict=True)}
        for k in range(S)) + ({},)
    act_sum = np.bincount(s[arrived], weights=pop.activity[arrived], minlength=S)
    act_n = np.bincount(s[arrived], minlength=S)
    matured = pop.arrival + matured_days < day
    tails = {}
    if any(m.kind == "sum" for m in config.metrics):
        if pop.tail_buckets is None:  # a unit's bucket does not change with the day
            pop.tail_buckets = np.array([tail_bucket(float(t)) for t in pop.y], np.int64)
        tail = [{int(b): int(c) for b, c in zip(*np.unique(
            pop.tail_buckets[matured & (pop.variant == v)], return_counts=True), strict=True)}
            for v in range(len(sc.variants))]
        tails = {m.name: tail for m in config.metrics if m.kind == "sum"}
    day_ms = 86_400_000
    return ExperimentSnapshot(
        experiment_id=config.experiment_id, config=config, variants=tuple(sc.variants),
        n_strata_total=S + 1, started_at=0, max_ts=int(day * day_ms),
        watermark=int(day * day_ms), D=D, arrivals=arrivals,
        activity_sum=tuple(float(a) for a in act_sum) + (0.0,),
        activity_n=tuple(int(a) for a in act_n) + (0,),
        exposed={v: int((arrived & (pop.variant == i)).sum()) for i, v in enumerate(sc.variants)},
        matured={v: int((matured & (pop.variant == i)).sum()) for i, v in enumerate(sc.variants)},
        cells={m.name: cells for m in config.metrics},
        counters={},
        extra_cells={m.name: extra for m in config.metrics if extra is not None},
        tails=tails)


def events(pop: Population, experiment_id: str, started_at: int, window_ms: int,
           until_day: float, rng: np.random.Generator, metric: str = "value",
           day_ms: int = 86_400_000, max_parts: int = 3, den_metric: str = "sessions"
           ) -> list[dict]:
    """The population as an event stream (docs/architecture.md#contracts), sorted by event time.

    Every unit that arrives before ``until_day`` gets an exposure at its
    arrival and its outcome Y split into 1..``max_parts`` metric events spread
    over its window (the visits model: one metric event per visit, at its
    age; a ratio's numerator M as ``metric`` and one ``den_metric`` event of
    1 per session of its denominator D; a conversion's 0/1 and revenue's raw
    total as any Y); events after ``until_day`` are not emitted.
    """
    sc = pop.scenario
    end = started_at + int(until_day * day_ms)
    idx = np.flatnonzero(pop.arrival < until_day)
    t_exp = started_at + (pop.arrival[idx] * day_ms).astype(np.int64)
    out: list[tuple[int, dict]] = []
    for j, i in enumerate(idx):
        uid = f"u{i}"
        te = int(t_exp[j])
        exp = {"type": "exposure", "event_id": f"{experiment_id}-x{i}",
               "experiment_id": experiment_id, "unit_id": uid,
               "variant": sc.variants[pop.variant[i]], "ts": te,
               "pre_activity": float(pop.activity[i])}
        if pop.x is not None and np.isfinite(pop.x[i]):
            exp["pre"] = {metric: float(pop.x[i])}
        out.append((te, exp))
        if pop.visits is not None:  # the visits model: one metric event per visit
            for k in np.flatnonzero(pop.visits[i] > 0):
                ts = te + int(pop.visit_age[i, k] * day_ms)
                if ts < end and ts < te + window_ms:
                    out.append((ts, {"type": "metric", "event_id": f"{experiment_id}-m{i}-{k}",
                                     "experiment_id": experiment_id, "unit_id": uid,
                                     "metric": metric, "value": float(pop.visits[i, k]),
                                     "ts": ts}))
            continue
        parts = int(rng.integers(1, max_parts + 1))
        w = rng.dirichlet(np.ones(parts))
        when = np.sort(te + (rng.random(parts) * window_ms).astype(np.int64))
        for q in range(parts):
            ts = int(when[q])
            if ts < end:
                out.append((ts, {"type": "metric", "event_id": f"{experiment_id}-m{i}-{q}",
                                 "experiment_id": experiment_id, "unit_id": uid,
                                 "metric": metric, "value": float(pop.y[i] * w[q]), "ts": ts}))
        if pop.den is not None:  # a ratio's denominator: one event of 1 per session
            for q, ts in enumerate(np.sort(te + (rng.random(int(pop.den[i])) * window_ms
                                                 ).astype(np.int64))):
                if ts < end:
                    out.append((int(ts), {
                        "type": "metric", "event_id": f"{experiment_id}-d{i}-{q}",
                        "experiment_id": experiment_id, "unit_id": uid,
                        "metric": den_metric, "value": 1.0, "ts": int(ts)}))
    out.sort(key=lambda t: t[0])
    return [e for _, e in out]


def truth(pop: Population) -> dict:
    """The ground truth a simulator writes next to its events."""
    s = pop.stratum()
    shares = np.bincount(s, minlength=len(pop.scenario.strata_edges) - 1) / len(s)
    return {"effect": pop.true_effect, "lift": pop.true_lift, "baseline": pop.true_baseline,
            "population_shares": shares.tolist(), "n_units": int(len(s))}
