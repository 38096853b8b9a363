"""CUPED inside the adjusted model (issue 18): the covariate block against
unit-level closed forms, simulation-based calibration of the slopes, and
coverage / width / bias on synthetic experiments with a known effect and a
pre-experiment covariate of known correlation ρ.

Run ``python -m tests.statistical.test_cuped`` to print the coverage/width table.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import covariate
from kernels.data import fixed_hyper, make_data
from kernels.gibbs import init, sweep
from kernels.rng import Rng
from streams.dev.synthetic import Scenario, cell_stats, population
from tests.support.calibration import ACTIVITY, assert_uniform
from tests.support.kernel_helpers import FixedNormals, sample

COV = ("nx", "sx", "sxx", "sxy", "sy_x")


def _units(rng, K1, S, n_max=30, p_missing=0.3):
    """Unit-level data per cell: y, x (NaN = missing), and the cells' sums."""
    cells = {}
    sums = {k: np.zeros((1, K1, S)) for k in ("n", "sy", "syy", *COV)}
    for k in range(K1):
        for s in range(S):
            m = int(rng.integers(0, n_max))
            x = rng.normal(3.0, 2.0, m)
            x[rng.random(m) < p_missing] = np.nan
            y = 1.0 + 0.7 * np.nan_to_num(x, nan=4.0) + rng.normal(0, 1, m)
            cells[k, s] = (y, x)
            h = np.isfinite(x)
            for key, val in (("n", m), ("sy", y.sum()), ("syy", (y * y).sum()),
                             ("nx", h.sum()), ("sx", x[h].sum()), ("sxx", (x[h] ** 2).sum()),
                             ("sxy", (x[h] * y[h]).sum()), ("sy_x", y[h].sum())):
                sums[key][0, k, s] = val
    return cells, sums


def _w(cells, K1, s):
    """The stratum's regressors per unit, from the units themselves."""
    xs = np.concatenate([cells[k, s][1] for k in range(K1)])
    h = np.isfinite(xs)
    xbar = xs[h].mean() if h.any() else 0.0
    hbar = h.mean() if len(h) else 0.0

    def w(x):
        hh = np.isfinite(x)
        return np.stack([np.where(hh, np.nan_to_num(x) - xbar, 0.0), hh - hbar], -1)

    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjusted_cells_equal_the_units_adjusted_outcomes(seed):
    """Given γ, ``covariate.adjusted`` (from cell sums) is the mean and within-
    cell sum of squares of y − γ·w computed unit by unit, missing x included."""
    rng = np.random.default_rng(seed)
    K1, S, C = 3, 4, 2
    cells, sm = _units(rng, K1, S)
    n = sm["n"]
    m = {k: v[:, None] for k, v in covariate.moments(
        n, sm["sy"], sm["syy"], covariate.CovStats(**{k: sm[k] for k in COV}), np).items()}
    ybar = np.where(n > 0, sm["sy"] / np.maximum(n, 1), 0.0)[:, None]
    ss = np.maximum(sm["syy"] - sm["sy"] * ybar[:, 0], 0.0)[:, None]
    gamma = rng.normal(0, 1, (1, C, S, 2))
    yb, ssa = covariate.adjusted(m, ybar, ss, gamma, np)
    for s in range(S):
        w = _w(cells, K1, s)
        for k in range(K1):
            y, x = cells[k, s]
            for c in range(C):
                if len(y) == 0:
                    assert yb[0, c, k, s] == 0 and ssa[0, c, k, s] == 0
                    continue
                ya = y - w(x) @ gamma[0, c, s]
                np.testing.assert_allclose(yb[0, c, k, s], ya.mean(), rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(ssa[0, c, k, s], ((ya - ya.mean()) ** 2).sum(),
                                           rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_slope_block_is_the_conjugate_regression(seed):
    """γ_s | μ, σ² is the Gaussian regression of y − μ_ks on w with weights
    1/σ²_ks and the normal prior: mean and covariance against the dense
    normal equations built from the units, strata with no x, all x and an
    empty cell included."""
    rng = np.random.default_rng(seed)
    K1, S, C = 2, 4, 3
    cells, sm = _units(rng, K1, S)
    # stratum 1: no unit has x; stratum 2: every unit has x
    for k in range(K1):
        y, x = cells[k, 1]
        cells[k, 1] = (y, np.full_like(x, np.nan))
        y, x = cells[k, 2]
        cells[k, 2] = (y, np.where(np.isfinite(x), x, 1.5))
    cells[0, 3] = (np.zeros(0), np.zeros(0))
    sums = {key: np.zeros((1, K1, S)) for key in ("n", "sy", "syy", *COV)}
    for (k, s), (y, x) in cells.items():
        h = np.isfinite(x)
        for key, val in (("n", len(y)), ("sy", y.sum()), ("syy", (y * y).sum()),
                         ("nx", h.sum()), ("sx", x[h].sum()), ("sxx", (x[h] ** 2).sum()),
                         ("sxy", (x[h] * y[h]).sum()), ("sy_x", y[h].sum())):
            sums[key][0, k, s] = val
    m = {k: v[:, None] for k, v in covariate.moments(
        sums["n"], sums["sy"], sums["syy"], covariate.CovStats(**{k: sums[k] for k in COV}),
        np).items()}
    mu = rng.normal(2, 1, (1, C, K1, S))
    sigma2 = np.exp(rng.normal(0, 0.5, (1, C, K1, S)))
    prior_sd = np.array([1.5, 0.8])
    prec = (1 / prior_sd**2)[None, None, None, :]

    def draw(eps):
        return covariate.draw_gamma(m, mu, sigma2, prec, FixedNormals(eps))

    mean = draw(np.zeros((1, C, S, 2)))
    root = np.stack([draw(np.eye(2)[i] + np.zeros((1, C, S, 2))) - mean for i in range(2)], -1)
    cov = root @ np.swapaxes(root, -1, -2)
    for s in range(S):
        w = _w(cells, K1, s)
        for c in range(C):
            Q, lin = np.diag(1 / prior_sd**2), np.zeros(2)
            for k in range(K1):
                y, x = cells[k, s]
                W = w(x)
                Q = Q + W.T @ W / sigma2[0, c, k, s]
                lin = lin + W.T @ (y - mu[0, c, k, s]) / sigma2[0, c, k, s]
            ref = np.linalg.inv(Q)
            np.testing.assert_allclose(mean[0, c, s], ref @ lin, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(cov[0, c, s], ref, rtol=1e-8, atol=1e-12)


def test_one_stratum_agrees_with_the_closed_form_regression():
    """One stratum, large cells: the posterior of the effect is the weighted
    least-squares (ANCOVA with per-arm variances) estimate and its standard
    error, to within Monte Carlo error; and the slope is the pooled within-
    arm regression slope."""
    rng = np.random.default_rng(7)
    n_arm = 4000
    xs, ys, arms = [], [], []
    for k, (mu, sd) in enumerate(((5.0, 2.0), (5.3, 2.5))):
        x = rng.normal(10, 3, n_arm)
        y = mu + 0.5 * (x - 10) + sd * rng.normal(size=n_arm)
        x[rng.random(n_arm) < 0.2] = np.nan
        xs.append(x)
        ys.append(y)
        arms.append(np.full(n_arm, k))
    x, y, arm = np.concatenate(xs), np.concatenate(ys), np.concatenate(arms)
    h = np.isfinite(x)
    sums = {key: np.zeros((1, 2, 1)) for key in ("n", "sy", "syy", *COV)}
    for k in range(2):
        a, hk = arm == k, (arm == k) & h
        for key, val in (("n", a.sum()), ("sy", y[a].sum()), ("syy", (y[a] ** 2).sum()),
                         ("nx", hk.sum()), ("sx", x[hk].sum()), ("sxx", (x[hk] ** 2).sum()),
                         ("sxy", (x[hk] * y[hk]).sum()), ("sy_x", y[hk].sum())):
            sums[key][0, k, 0] = val
    data = make_data(sums["n"], sums["sy"], sums["syy"], [[2 * n_arm]], [[0.0]], 1, [[10.0]],
                     cov={k: sums[k] for k in COV})
    _, tr = sample(data, seed=3, chains=4, warmup=300, draws=1500)
    eff = tr.adj_effect[0, :, :, 0].ravel()
    slope = tr.slope[0].ravel()
    # the closed form: WLS of y on [control, treatment, w1, w2], weights 1/σ²_arm
    w1 = np.where(h, np.nan_to_num(x) - x[h].mean(), 0.0)
    w2 = h - h.mean()
    X = np.stack([arm == 0, arm == 1, w1, w2], -1).astype(float)
    beta = np.linalg.lstsq(X, y, rcond=None)[0]
    for _ in range(3):  # iterate the per-arm residual variances
        r = y - X @ beta
        s2 = np.array([r[arm == k].var() for k in range(2)])[arm]
        Xw = X / s2[:, None]
        beta = np.linalg.solve(X.T @ Xw, Xw.T @ y)
    covb = np.linalg.inv(X.T @ (X / s2[:, None]))
    want, want_sd = beta[1] - beta[0], np.sqrt(covb[0, 0] + covb[1, 1] - 2 * covb[0, 1])
    assert abs(eff.mean() - want) < 0.1 * want_sd, (eff.mean(), want, want_sd)
    assert abs(eff.std() / want_sd - 1) < 0.08, (eff.std(), want_sd)
    assert abs(slope.mean() - beta[2]) < 4 * np.sqrt(covb[2, 2]), (slope.mean(), beta[2])
    assert abs(slope.std() / np.sqrt(covb[2, 2]) - 1) < 0.15


def test_no_covariate_leaves_the_sampler_unchanged():
    """A batch without a covariate (``cov`` None) draws exactly what the model
    drew before the covariate existed: block 6 is skipped, γ stays 0, and a
    batch whose problems have only zero covariate sums gives the same
    posterior within Monte Carlo error."""
    pop = population(Scenario(n_units=5000), np.random.default_rng(1))
    cs = cell_stats(pop, 7.0)
    args = [cs[k][None] for k in ("n", "sy", "syy", "arrived", "dsum")] + [cs["D"],
                                                                          cs["activity"][None]]
    plain = make_data(*args)
    zero = make_data(*args, cov={k: np.zeros_like(cs["n"])[None] for k in COV})
    st_p, tr_p = sample(plain, seed=1, chains=4, warmup=100, draws=400)
    st_z, tr_z = sample(zero, seed=1, chains=4, warmup=100, draws=400)
    assert not st_p.gamma.any()
    assert np.all(tr_p.slope == 0)
    a, b = tr_p.adj_effect.ravel(), tr_z.adj_effect.ravel()
    assert abs(a.mean() - b.mean()) < 0.15 * a.std()
    assert abs(a.std() / b.std() - 1) < 0.15


# ---------------------------------------------------------------- SBC


def simulate_sbc(reps: int, rng: np.random.Generator):
    """Small problems drawn from the model's prior (``fixed_hyper``: the same
    laws as tests/statistical/test_sbc.py, plus γ_s ~ N(0, 1) each) with a covariate
    x ~ N(0, 1.5²), 30% missing; y from the model given the sample's own
    centres (the model conditions on the covariates)."""
    K1, S = 2, len(ACTIVITY)
    nu, A = 3.0, 0.5
    xi = 1.0 / rng.gamma(0.5, 1.0 / (1.0 / A**2), reps)
    omega2 = (nu / xi) / rng.gamma(nu / 2, 1.0, reps)
    theta, beta = rng.normal(0, 1, reps), rng.normal(0, 1, reps)
    logp = np.log(ACTIVITY / 28)
    z = logp - logp.mean()
    tau = theta[:, None] + beta[:, None] * z + np.sqrt(omega2)[:, None] * rng.normal(
        size=(reps, S))
    mu0 = rng.normal(0, 2, (reps, S))
    gamma = rng.normal(0, 1, (reps, S, 2))
    sigma2 = 1.0 / rng.gamma(1.0, 1.0, (reps, K1, S))
    n = rng.integers(0, 10, (reps, K1, S)).astype(float)
    sums = {k: np.zeros((reps, K1, S)) for k in ("sy", "syy", *COV)}
    mean = np.stack([mu0, mu0 + tau], axis=1)
    for r in range(reps):
        for s in range(S):
            xs = [rng.normal(0, 1.5, int(n[r, k, s])) for k in range(K1)]
            for x in xs:
                x[rng.random(len(x)) < 0.3] = np.nan
            allx = np.concatenate(xs)
            h = np.isfinite(allx)
            xbar = allx[h].mean() if h.any() else 0.0
            hbar = h.mean() if len(h) else 0.0
            for k in range(K1):
                x = xs[k]
                hk = np.isfinite(x)
                w = np.stack([np.where(hk, np.nan_to_num(x) - xbar, 0.0), hk - hbar], -1)
                y = mean[r, k, s] + w @ gamma[r, s] + np.sqrt(sigma2[r, k, s]) * rng.normal(
                    size=len(x))
                for key, val in (("sy", y.sum()), ("syy", (y * y).sum()), ("nx", hk.sum()),
                                 ("sx", x[hk].sum()), ("sxx", (x[hk] ** 2).sum()),
                                 ("sxy", (x[hk] * y[hk]).sum()), ("sy_x", y[hk].sum())):
                    sums[key][r, k, s] = val
    data = make_data(n, sums["sy"], sums["syy"], np.full((reps, S), 15.0), np.zeros((reps, S)),
                     1, np.tile(ACTIVITY, (reps, 1)), hyper=fixed_hyper(reps),
                     cov={k: sums[k] for k in COV})
    return data, {"g1_0": gamma[:, 0, 0], "g1_3": gamma[:, 3, 0], "g2_1": gamma[:, 1, 1],
                  "tau_2": tau[:, 2], "log_sigma2_t0": np.log(sigma2[:, 1, 0])}


def test_sbc_slopes():
    """Simulation-based calibration with a covariate: the ranks of the true
    slopes γ (covariate and missingness), an effect and a variance among the
    posterior draws are uniform (Talts et al. 2018)."""
    reps, chains, warmup, kept, thin = 300, 4, 150, 50, 6
    data, truth = simulate_sbc(reps, np.random.default_rng(2026))
    rng = Rng(11)
    state = init(data, rng, chains)
    for _ in range(warmup):
        state, _ = sweep(state, data, rng)
    draws: dict[str, list] = {k: [] for k in truth}
    for i in range(kept * thin):
        state, _ = sweep(state, data, rng)
        if (i + 1) % thin == 0:
            draws["g1_0"].append(state.gamma[:, :, 0, 0])
            draws["g1_3"].append(state.gamma[:, :, 3, 0])
            draws["g2_1"].append(state.gamma[:, :, 1, 1])
            draws["tau_2"].append(state.tau[:, :, 0, 2])
            draws["log_sigma2_t0"].append(np.log(state.sigma2[:, :, 1, 0]))
    ranks = {k: (np.stack(v, -1).reshape(reps, -1) < truth[k][:, None]).sum(1)
             for k, v in draws.items()}
    assert_uniform(ranks, chains * kept)


# ---------------------------------------------------------------- coverage


def _pair_data(pops, day):
    """The replicates twice in one batch: with their covariate, then without."""
    st = [cell_stats(p, day) for p in pops]

    def stack(k):
        return np.stack([s[k] for s in st])

    base = [np.concatenate([stack(k)] * 2) for k in ("n", "sy", "syy", "arrived", "dsum", "D",
                                                     "activity")]
    cov = {k: np.concatenate([stack(k), np.zeros_like(stack(k))]) for k in COV}
    return make_data(*base, cov=cov)


def coverage_table(reps: int, seed: int, rhos=(0.0, 0.5, 0.8), days=(3, 14), missing=0.1,
                   **scenario) -> list[dict]:
    """Per ρ and day: coverage, bias, mean posterior sd and mean interval width
    of the adjusted and naive effects, with and without the covariate (same
    data, same batch), against each replicate's true population effect."""
    rows = []
    for rho in rhos:
        rng = np.random.default_rng([seed, int(rho * 100)])
        pops = [population(Scenario(n_units=20_000, covariate_rho=rho,
                                    covariate_missing=missing, **scenario), rng)
                for _ in range(reps)]
        truth = np.array([p.true_effect for p in pops])
        for day in days:
            _, tr = sample(_pair_data(pops, day), seed=seed + day, chains=4, warmup=200,
                           draws=400)
            row = {"rho": rho, "day": day, "missing": missing}
            for name, x in (("adjusted", tr.adj_effect), ("naive", tr.naive_effect)):
                d = x[:, :, :, 0].reshape(2 * reps, -1)
                lo, hi = np.quantile(d, [0.025, 0.975], axis=1)
                for part, sl in (("with", slice(0, reps)), ("without", slice(reps, None))):
                    row[f"{name}_{part}"] = {
                        "coverage": float(((lo[sl] <= truth) & (truth <= hi[sl])).mean()),
                        "bias": float((d[sl].mean(1) - truth).mean()),
                        "sd": float(d[sl].std(1).mean()),
                        "width": float((hi[sl] - lo[sl]).mean()),
                    }
                row[f"{name}_ratio"] = row[f"{name}_with"]["width"] / row[f"{name}_without"][
                    "width"]
            rows.append(row)
    return rows


def expected_ratio(rho: float, missing: float) -> float:
    """Width with ÷ without: only the units with x lose the share ρ² of their
    residual variance, so √(1 − (1 − missing) ρ²); √(1 − ρ²) without missing."""
    return float(np.sqrt(1 - (1 - missing) * rho * rho))


def check_coverage(rows, lo_cov, hi_cov, pooled=(0.93, 0.97), day1_hi=0.99):
    """Per cell: coverage in [lo_cov, hi_cov]. Day 1 may over-cover up to
    ``day1_hi``: with one completed bucket the arrival block's posterior is
    its prior (docs/architecture.md#the-model), an honest, wide interval with or without the
    covariate, so there the covariate must only leave calibration as it was
    (within 0.02 of the same data's coverage without it)."""
    covs = []
    for r in rows:
        a, wo = r["adjusted_with"], r["adjusted_without"]
        if r["day"] <= 1:
            assert lo_cov <= a["coverage"] <= day1_hi, r
            assert abs(a["coverage"] - wo["coverage"]) <= 0.02, r
        else:
            assert lo_cov <= a["coverage"] <= hi_cov, r
        covs.append(a["coverage"])
        for name in ("adjusted", "naive"):  # the covariate adds no bias
            w, wo = r[f"{name}_with"], r[f"{name}_without"]
            assert abs(w["bias"] - wo["bias"]) <= w["sd"] / 4, (name, r)
        # mixed data: the naive block's width follows the covariate's reach
        want = expected_ratio(r["rho"], r["missing"])
        assert abs(r["naive_ratio"] / want - 1) <= 0.10, r
    assert pooled[0] <= np.mean(covs) <= pooled[1], covs


def test_coverage_with_covariate_200_replicates():
    """Heterogeneous effects (heavy users first), 10% of units without x:
    coverage of the population effect, no added bias, and the width ratio
    mixed data should give."""
    rows = coverage_table(reps=200, seed=1)
    print_table(rows)
    check_coverage(rows, 0.90, 0.99)


def test_width_ratio_is_sqrt_one_minus_rho_squared():
    """Every unit with x and one effect in every stratum: the 95% interval
    narrows by √(1−ρ²), adjusted and naive alike (within 10%)."""
    rows = coverage_table(reps=100, seed=3, missing=0.0, effect_slope=0.0)
    print_table(rows)
    for r in rows:
        want = expected_ratio(r["rho"], 0.0)
        for name in ("adjusted", "naive"):
            assert abs(r[f"{name}_ratio"] / want - 1) <= 0.10, (name, r)


def test_null_effect_independent_covariate_adds_no_bias():
    """Treatment changes nothing and x is independent of the outcome: the
    estimate with the covariate is centred on 0 (|bias| ≤ ¼ of the sd)."""
    rows = coverage_table(reps=100, seed=4, rhos=(0.0,), effect=0.0, effect_slope=0.0)
    for r in rows:
        for name in ("adjusted", "naive"):
            w = r[f"{name}_with"]
            assert abs(w["bias"]) <= w["sd"] / 4, (name, r)


@pytest.mark.slow
def test_coverage_with_covariate_1000_replicates():
    """Tighter: 1000 replicates, four days; each cell's coverage in 93–97%."""
    rows = coverage_table(reps=1000, seed=2, days=(1, 3, 7, 14))
    print_table(rows)
    check_coverage(rows, 0.93, 0.97)


def print_table(rows) -> None:
    print("\n rho day | adjusted cover (w/o)  bias    width  ratio | naive cover  bias    width"
          "  ratio | target")
    for r in rows:
        a, n = r["adjusted_with"], r["naive_with"]
        print(f"{r['rho']:>4} {r['day']:>3} | {a['coverage']:>14.3f} "
              f"({r['adjusted_without']['coverage']:.3f}) {a['bias']:+.4f} "
              f"{a['width']:.4f} {r['adjusted_ratio']:.3f} | {n['coverage']:>11.3f} "
              f"{n['bias']:+.4f} {n['width']:.4f} {r['naive_ratio']:.3f} | "
              f"{expected_ratio(r['rho'], r['missing']):.3f}")


if __name__ == "__main__":
    print_table(coverage_table(reps=200, seed=1, days=(1, 3, 7, 14)))
    print_table(coverage_table(reps=200, seed=3, days=(1, 3, 7, 14), missing=0.0,
                               effect_slope=0.0))


def test_bench_covariate_reports_both_timings():
    """``liftstream bench covariate`` times the same batch with and without the
    block (a ratio in one process; no threshold: speed is not a test)."""
    from streams.bench.covariate import run

    res = run(problems=4, chains=2, sweeps=2, repeats=1, rho=0.5, missing=0.1, device="cpu")
    ms = res["ms_per_sweep"]
    assert ms["without"] > 0 and ms["with"] > 0
    assert res["ratio_with"] == ms["with"] / ms["without"]
    assert res["ratio_with_and_shadow"] == pytest.approx(1 + res["ratio_with"], rel=1e-12)


# ---------------------------------------------------------------- records


def test_tick_publishes_variance_reduction_from_its_shadow():
    """Through the sampler's tick (``streams.sampling.advance``) on state folded from
    events with ``pre``: the metric's chains and its covariate-free shadow
    (``value#nocov``) both continue, only the metric's records are published,
    and ``variance_reduction`` reports the share with x, the slope, and the sd
    ratio measured against the shadow: near √(1 − (1−q)ρ²), far below 1."""
    from jsonschema import Draft202012Validator

    from schemas.codec import dumps
    from schemas.contracts import load_schema
    from schemas.validate import parse_event
    from streams.dev.simulate import make_traffic
    from streams.sampling.advance import TickConfig, advance
    from streams.sampling.problems import SHADOW_SUFFIX
    from streams.state.semantics import Reducer

    rho, q = 0.8, 0.2
    cfg, evs, truth = make_traffic(12_000, 8, "cup", 5, 86_400, 1_767_225_600_000,
                                   covariate_rho=rho, covariate_missing=q)
    assert any("pre" in e for e in evs) and any(
        "pre" not in e for e in evs if e["type"] == "exposure")
    red = Reducer([cfg]).apply_all(parse_event(dumps(e), now_ms=2**53 - 1) for e in evs)
    snaps = list(red.snapshots().values())
    tc = TickConfig(chains=4, sweeps=150, window=400, warmup=100, min_draws=20)
    stored: dict = {}
    for tick in range(4):
        recs, stored = advance(snaps, stored, tc, computed_at=1_767_225_600_000 + tick)
    assert set(stored) == {("cup", "value"), ("cup", "value" + SHADOW_SUFFIX)}
    assert {int(s.state["iteration"]) for s in stored.values()} == {600}
    (rec,) = recs
    assert rec["metric"] == "value"
    Draft202012Validator(load_schema("estimate")).validate(rec)
    vr = rec["variance_reduction"]
    assert vr["used"] is True
    assert abs(vr["share_with_covariate"] - (1 - q)) < 0.03, vr
    # x and Y share base0 + base_slope·a: the within-stratum slope is ≈ ρ
    assert abs(vr["slope"]["mean"] - rho) < 0.1, vr
    want = expected_ratio(rho, q)
    assert abs(vr["sd_ratio"]["naive"] / want - 1) < 0.2, (vr, want)
    assert vr["sd_ratio"]["adjusted"] < 0.9, vr
    lo, hi = rec["adjusted"]["effect"]["lo"], rec["adjusted"]["effect"]["hi"]
    assert lo < truth["effect"] < hi, (rec["adjusted"], truth)


def test_covariates_off_ignores_pre():
    """``covariates: "off"``: the same events give no covariate problem, no
    shadow, and ``variance_reduction.used`` false (the state still keeps x)."""
    from dataclasses import replace

    from schemas.codec import dumps
    from schemas.validate import parse_event
    from streams.dev.simulate import make_traffic
    from streams.sampling.problems import build_batch
    from streams.state.semantics import Reducer

    cfg, evs, _ = make_traffic(3000, 8, "off", 6, 86_400, 1_767_225_600_000,
                               covariate_rho=0.8)
    for c, n_problems in ((cfg, 2), (replace(cfg, covariates="off"), 1)):
        red = Reducer([c]).apply_all(parse_event(dumps(e), now_ms=2**53 - 1) for e in evs)
        snap = red.snapshots()["off"]
        assert sum(x[3] for row in snap.cells["value"] for x in row) > 0  # x kept either way
        data, problems = build_batch([snap])
        assert len(problems) == n_problems
        assert (data.cov is None) == (n_problems == 1)
