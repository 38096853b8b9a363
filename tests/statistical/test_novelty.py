"""Novelty and primacy by exposure age (issue 19), checked against the truth.

The populations are ``streams.dev.synthetic``'s visits model: heavy users arrive
first, visit on later days, and respond *worse* (``effect_slope`` < 0), so a
lift by days since exposure pooled over units falls even with no novelty.
``X`` is the extra lift on a unit's first day since exposure (0: none).

* the novelty contrast (``kernels.novelty``, within fine strata, precision
  weighted) is unbiased for X, its sd is calibrated, the ``novelty_effect``
  rule fires in <= 1% of runs without novelty and >= 90% with X = 0.04 at
  the documented sample size, where the pooled contrast would alarm;
* each age bin's adjusted lift (its own stratified model, the ``#age<b>``
  problems) covers the population's lift in that bin.

``python -m tests.statistical.test_novelty`` prints the tables.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import novelty
from kernels.data import make_data
from schemas.records import ExperimentConfig
from streams.alerts.rules import DEFAULT_THRESHOLDS
from streams.dev.synthetic import (
    Scenario,
    age_cell_stats,
    age_truth,
    bin_outcomes,
    cell_stats,
    population,
)
from streams.state.semantics import fine_edges, fine_parent
from tests.support.kernel_helpers import sample

EDGES_DAYS = (0, 1, 3, 7)  # the default bins with a 7-day window
DAY = 14  # the look: units exposed in the first week have matured
#: the documented sample size of the power / false-alarm claim
N_UNITS = 120_000
HEAVY_WORSE = -0.12  # effect_slope: heavy users respond worse


def scenario(n_units: int, X: float) -> Scenario:
    return Scenario(n_units=n_units, novelty=X, effect=0.10, effect_slope=HEAVY_WORSE)


def fires(p, m) -> np.ndarray:
    """The novelty_effect rule on (p_positive, contrast mean), default levels."""
    t, margin = DEFAULT_THRESHOLDS["novelty_prob"], DEFAULT_THRESHOLDS["novelty_margin"]
    p, m = np.asarray(p), np.asarray(m)
    return ((p > t) | (p < 1 - t)) & (np.abs(m) > margin)


def contrast_runs(n_units: int, X: float, reps: int, seed: int, day: float = DAY) -> dict:
    """Per replicate: our contrast (mean, sd, p), the pooled one, the truth."""
    cfg = ExperimentConfig("nov")
    fe, parent = fine_edges(cfg), fine_parent(cfg)
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("mean", "sd", "p", "used", "pop_mean", "pop_sd",
                           "pooled_mean", "pooled_p")}
    for _ in range(reps):
        pop = population(scenario(n_units, X), rng)
        st = age_cell_stats(pop, day, EDGES_DAYS, fe)
        d, v, ok = novelty.per_stratum(st["n"], st["sy"], st["syy"], st["s0L"])
        c = novelty.combine(d[0], v[0], ok[0])
        s = pop.stratum()
        pi = np.append(np.bincount(s, minlength=len(cfg.strata_edges) - 1) / len(s), 0.0)
        size = novelty.combine(d[0], v[0], ok[0], novelty.population_weights(st["n"], parent, pi))
        # the pooled contrast: every unit in one stratum (what a naive chart does)
        pd, pv, pok = novelty.per_stratum(*(st[k].sum(1, keepdims=True)
                                            for k in ("n", "sy", "syy", "s0L")))
        pooled = novelty.combine(pd[0], pv[0], pok[0])
        for k, x in (("mean", c["mean"]), ("sd", c["sd"]), ("p", c["p_positive"]),
                     ("used", c["strata_used"]), ("pop_mean", size["mean"]),
                     ("pop_sd", size["sd"]), ("pooled_mean", pooled["mean"]),
                     ("pooled_p", pooled["p_positive"])):
            out[k].append(float(x))
    return {k: np.array(v) for k, v in out.items()}


def test_contrast_is_unbiased_and_calibrated():
    """60,000 units (about 35,000 matured), 200 replicates each: no novelty,
    and X = 0.10. (At 20,000 units the reported sd can be ~10% short:
    coverage 0.905-0.955 over three seeds; docs/method.md.)"""
    for X, seed in ((0.0, 11), (0.10, 12)):
        r = contrast_runs(60_000, X, reps=200, seed=seed)
        se = r["mean"].std() / np.sqrt(len(r["mean"]))
        assert abs(r["mean"].mean() - X) < 4 * se + 0.002, (X, r["mean"].mean())
        # the reported sd is the sd of the estimate across replicates
        assert 0.85 < r["sd"].mean() / r["mean"].std() < 1.15, (r["sd"].mean(), r["mean"].std())
        cover = np.mean(np.abs(r["mean"] - X) <= 1.96 * r["sd"])
        assert 0.92 <= cover <= 0.98, cover
        # the population-weighted size is unbiased too, with a wider sd
        assert abs(r["pop_mean"].mean() - X) < 4 * r["pop_mean"].std() / np.sqrt(200) + 0.003
        assert r["pop_sd"].mean() > r["sd"].mean()


def test_alarm_rates_at_the_documented_sample_size_and_the_pooled_ratio_alarms():
    """120,000 units at day 14 (about 70,000 matured), 200 replicates each."""
    null = contrast_runs(N_UNITS, 0.0, reps=200, seed=21)
    alt = contrast_runs(N_UNITS, 0.04, reps=200, seed=22)
    false_alarms = fires(null["p"], null["mean"]).mean()
    power = fires(alt["p"], alt["mean"]).mean()
    pooled_alarms = fires(null["pooled_p"], null["pooled_mean"]).mean()
    print(f"\nfalse alarms {false_alarms:.3f}, power at X=0.04 {power:.3f}, "
          f"pooled false alarms {pooled_alarms:.3f}, pooled mean {null['pooled_mean'].mean():+.4f}")
    assert false_alarms <= 0.01
    assert power >= 0.90
    # with no novelty at all the pooled first-minus-last lift is far from 0 …
    assert null["pooled_mean"].mean() > 0.02
    # … and would alarm in most runs, where ours does not
    assert pooled_alarms >= 0.5


def bin_coverage(n_units: int, X: float, reps: int, seed: int, day: float = DAY) -> dict:
    """Each age bin's adjusted lift (its own stratified model) against the
    population's lift in that bin; all replicates × bins in one batch."""
    rng = np.random.default_rng(seed)
    pops = [population(scenario(n_units, X), rng) for _ in range(reps)]
    B = len(EDGES_DAYS) - 1
    truth = np.array([[t["lift"] for t in age_truth(p, EDGES_DAYS)] for p in pops])
    st = []
    for p in pops:
        yb = bin_outcomes(p, EDGES_DAYS)
        st += [cell_stats(p, day, y=yb[:, b], window_days=EDGES_DAYS[-1]) for b in range(B)]

    def stack(k):
        return np.stack([s[k] for s in st])

    data = make_data(stack("n"), stack("sy"), stack("syy"), stack("arrived"), stack("dsum"),
                     stack("D"), stack("activity"))
    _, tr = sample(data, seed=seed, chains=4, warmup=200, draws=400)
    d = tr.adj_lift[:, :, :, 0].reshape(reps, B, -1)
    lo, hi = np.quantile(d, [0.025, 0.975], axis=2)
    return {"coverage": ((lo <= truth) & (truth <= hi)).mean(0),
            "bias": (d.mean(2) - truth).mean(0), "width": (hi - lo).mean(0),
            "truth": truth.mean(0)}


@pytest.mark.parametrize("X,seed", [pytest.param(0.0, 31, marks=pytest.mark.slow), (0.10, 32)])
def test_each_bin_covers_the_population_lift_200_replicates(X, seed):
    """With 200 replicates a 95% interval's observed coverage has sd 0.015:
    0.92-0.98 is its ±2 sd band. The 93-97% claim is the slow 1000 run's
    (which also covers X = 0; 200 replicates of it run with -m slow)."""
    r = bin_coverage(20_000, X, reps=200, seed=seed)
    print(f"\nX={X}: coverage {r['coverage']}, bias {r['bias']}, truth {r['truth']}")
    assert ((0.92 <= r["coverage"]) & (r["coverage"] <= 0.98)).all(), r
    # the bins differ in truth (heavy users respond worse, and carry the later
    # days): the model follows the truth, not the pooled ratio
    assert (np.abs(r["bias"]) < 0.25 * r["width"] / 3.92).all(), r


@pytest.mark.slow
@pytest.mark.parametrize("X,seed", [(0.0, 41), (0.10, 42)])
def test_each_bin_covers_the_population_lift_1000_replicates(X, seed):
    """93-97% for the later bins; the first bin (one visit a unit) may
    over-cover up to 0.98: measured 0.963 (X = 0) and 0.972 (X = 0.10), with
    bias < 0.0001, i.e. its interval is a little wide, not off-centre."""
    r = bin_coverage(20_000, X, reps=1000, seed=seed)
    print(f"\nX={X}: coverage {r['coverage']}, bias {r['bias']}, truth {r['truth']}")
    assert ((0.93 <= r["coverage"][1:]) & (r["coverage"][1:] <= 0.97)).all(), r
    assert 0.93 <= r["coverage"][0] <= 0.98, r
    assert (np.abs(r["bias"]) < 0.25 * r["width"] / 3.92).all(), r


def test_delta_method_variance_of_one_stratum():
    """One fine stratum with exact Poisson data: the delta-method sd of δ
    equals the sd of δ over 4000 replicates (within 6%)."""
    rng = np.random.default_rng(5)
    n, reps = 400, 4000
    d = np.empty(reps)
    s = np.empty(reps)
    for i in range(reps):
        # per unit: y0 ~ Poisson(3 g), yL ~ Poisson(2 g) with a shared unit level g
        g = rng.gamma(4.0, 0.25, size=(2, n))
        lift0, liftL = np.array([1.0, 1.15]), np.array([1.0, 1.05])
        y0 = rng.poisson(3.0 * g * lift0[:, None])
        yL = rng.poisson(2.0 * g * liftL[:, None])
        cells = (np.full((2, 1), float(n)), np.stack([y0.sum(1), yL.sum(1)], -1)[:, None, :],
                 np.stack([(y0**2).sum(1), (yL**2).sum(1)], -1)[:, None, :],
                 (y0 * yL).sum(1)[:, None])
        dd, vv, ok = novelty.per_stratum(*cells)
        assert ok.all()
        d[i], s[i] = dd[0, 0], np.sqrt(vv[0, 0])
    assert abs(d.mean() - 0.10) < 4 * d.std() / np.sqrt(reps) + 0.002
    assert 0.94 < s.mean() / d.std() < 1.06, (s.mean(), d.std())


def test_strata_without_information_take_no_part():
    n = np.array([[100.0, 5.0], [100.0, 200.0]])  # the second stratum: 5 control units
    sy = np.array([[[300.0, 50.0], [15.0, 0.0]], [[330.0, 55.0], [600.0, 0.0]]])
    syy = sy * 3
    s0L = np.zeros((2, 2))
    d, v, ok = novelty.per_stratum(n, sy, syy, s0L)
    assert ok.tolist() == [[True, False]]  # too few units; and a zero control mean
    c = novelty.combine(d[0], v[0], ok[0])
    # control bin means 3 and 0.5 with variances 0 and 1.25 (Σy² = 3 Σy)
    v0, vL = (9.0 - 9.0) / 99, (1.5 - 0.25) / 99
    want = 3.3 / 3.0 * (1 - v0 / 9.0) - 0.55 / 0.5 * (1 - vL / 0.25)
    assert c["strata_used"] == 1 and c["mean"] == pytest.approx(want)
    none = novelty.combine(d[0], v[0], np.zeros_like(ok[0]))
    assert np.isnan(none["mean"]) and none["strata_used"] == 0


if __name__ == "__main__":
    for X in (0.0, 0.04, 0.10):
        r = contrast_runs(N_UNITS, X, reps=200, seed=21)
        pooled = fires(r["pooled_p"], r["pooled_mean"]).mean()
        print(f"X={X}: contrast {r['mean'].mean():+.4f} (sd {r['mean'].std():.4f}, reported "
              f"{r['sd'].mean():.4f}), alarms {fires(r['p'], r['mean']).mean():.3f}; pooled "
              f"{r['pooled_mean'].mean():+.4f}, alarms {pooled:.3f}")
    for X in (0.0, 0.10):
        print(X, bin_coverage(20_000, X, reps=200, seed=31))
