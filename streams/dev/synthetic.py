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
"""

from __future__ import annotations

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

    @property
    def true_effect(self) -> float:
        """Population effect: the mean of τ over *all* units, arrived or not."""
        return float(self.tau.mean())

    @property
    def true_baseline(self) -> float:
        if self.baseline is not None:
            return float(self.baseline.mean())
        s = self.scenario
        return float(np.mean(s.base0 + s.base_slope * self.activity))

    @property
    def true_lift(self) -> float:
        return self.true_effect / self.true_baseline

    def stratum(self, edges=None) -> np.ndarray:
        e = np.asarray(edges or self.scenario.strata_edges, float)
        return np.clip(np.searchsorted(e, self.activity, side="right") - 1, 0, len(e) - 2)


def population(sc: Scenario, rng: np.random.Generator) -> Population:
    if sc.novelty is not None:
        return _visits_population(sc, rng)
    M = sc.n_units
    a = np.round(28 * rng.beta(*sc.activity_beta, size=M))
    p = np.maximum(a, 0.5) / 28.0
    day = rng.geometric(sc.exposure_rate * p) - 1  # first exposure day: 0, 1, 2, …
    arrival = day + rng.random(M)
    variant = rng.choice(len(sc.variants), size=M, p=np.asarray(sc.allocation))
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
    a = np.round(28 * rng.beta(*sc.activity_beta, size=M))
    p = np.maximum(a, 0.5) / 28.0
    day = rng.geometric(sc.exposure_rate * p) - 1
    arrival = day + rng.random(M)
    variant = rng.choice(len(sc.variants), size=M, p=np.asarray(sc.allocation))
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
    ``y`` (default the unit's Y) over the units matured by then (arrival +
    ``window_days`` < day; the default zero-length window: every unit that
    arrived), arrivals by stratum, D."""
    sc = pop.scenario
    K1 = len(sc.variants)
    S = len(sc.strata_edges) - 1
    s = pop.stratum()
    D = int(np.floor(day / bucket_days))
    arrived = pop.arrival < day
    y = pop.y if y is None else y
    m = pop.arrival + window_days < day
    n = np.zeros((K1, S))
    sy = np.zeros((K1, S))
    syy = np.zeros((K1, S))
    np.add.at(n, (pop.variant[m], s[m]), 1.0)
    np.add.at(sy, (pop.variant[m], s[m]), y[m])
    np.add.at(syy, (pop.variant[m], s[m]), y[m] ** 2)
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


def events(pop: Population, experiment_id: str, started_at: int, window_ms: int,
           until_day: float, rng: np.random.Generator, metric: str = "value",
           day_ms: int = 86_400_000, max_parts: int = 3) -> list[dict]:
    """The population as an event stream (docs/architecture.md#contracts), sorted by event time.

    Every unit that arrives before ``until_day`` gets an exposure at its
    arrival and its outcome Y split into 1..``max_parts`` metric events spread
    over its window (the visits model: one metric event per visit, at its
    age); events after ``until_day`` are not emitted.
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
    out.sort(key=lambda t: t[0])
    return [e for _, e in out]


def truth(pop: Population) -> dict:
    """The ground truth a simulator writes next to its events."""
    s = pop.stratum()
    shares = np.bincount(s, minlength=len(pop.scenario.strata_edges) - 1) / len(s)
    return {"effect": pop.true_effect, "lift": pop.true_lift, "baseline": pop.true_baseline,
            "population_shares": shares.tolist(), "n_units": int(len(s))}
