"""(b) The arrival block against numerical integration of its density.

For D ∈ {1, 2, 5, 30} and n ∈ {10, 10³, 10⁶} arrivals, the draws of logit p
(inverse CDF on the kernel's grid) are compared by a KS test with the CDF
obtained by adaptive quadrature of the density written here independently
(scipy), and the draws of N are compared with E[N] and sd[N] obtained by
integrating the negative-binomial moments over that density.
"""

import numpy as np
import pytest
from scipy import integrate, special, stats

from kernels.arrival import draw_logit_p, draw_population
from kernels.data import make_data
from kernels.rng import Rng
from tests.support.kernel_helpers import numeric_posterior, truncated_geometric_sum

DS = [1, 2, 5, 30]
NS = [10, 1_000, 1_000_000]
DRAWS = 20_000


CASES = [(D, n) for D in DS for n in NS]


@pytest.fixture(scope="module")
def arrival_draws():
    rng = np.random.default_rng(7)
    p_true, p_prior = 0.05, 0.08  # the prior is off, as it will be in practice
    rows = [(D, n, truncated_geometric_sum(n, p_true, D, rng)) for D, n in CASES]
    P = len(rows)
    arrived = np.array([[r[1]] for r in rows], float)
    dsum = np.array([[r[2]] for r in rows], float)
    Ds = np.array([r[0] for r in rows], float)
    # activity that gives per-bucket prior p_prior: 1-(1-a/28) = p_prior
    act = np.full((P, 1), 28 * p_prior)
    data = make_data(np.zeros((P, 2, 1)), np.zeros((P, 2, 1)), np.zeros((P, 2, 1)),
                     arrived, dsum, Ds, act)
    r = Rng(99)
    x = draw_logit_p(data.grid, r, DRAWS)  # [P, C, 1]
    pop = draw_population(x, data.arrived, data.D, r)
    return rows, data, x[:, :, 0], pop[:, :, 0]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"D{D}-n{n}" for D, n in CASES])
def test_logit_p_matches_quadrature(arrival_draws, i):
    rows, data, x, _ = arrival_draws
    D, n, T = rows[i]
    m, sd = float(data.logit_p0[i, 0]), 0.5
    dens, Z, lo, hi, mode = numeric_posterior(n, T, D, m, sd)
    grid = np.linspace(lo, hi, 200_001)
    cdf_vals = integrate.cumulative_simpson(dens(grid), x=grid, initial=0.0) / Z
    assert cdf_vals[-1] == pytest.approx(1.0, abs=1e-6)  # Simpson and quad agree

    def cdf(v):
        return np.interp(v, grid, cdf_vals)

    ks = stats.kstest(x[i], cdf)
    assert ks.pvalue > 1e-3, (D, n, ks)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"D{D}-n{n}" for D, n in CASES])
def test_population_moments_match_quadrature(arrival_draws, i):
    rows, data, _, pop = arrival_draws
    D, n, T = rows[i]
    m, sd = float(data.logit_p0[i, 0]), 0.5
    dens, Z, lo, hi, mode = numeric_posterior(n, T, D, m, sd)

    def q(x):
        return -np.expm1(D * np.log1p(-special.expit(x)))

    def mean_n(x):  # E[N | p] = n / q
        return n / q(x)

    def second(x):  # E[N² | p] = Var + mean², Var = n (1-q) / q²
        qq = q(x)
        return n * (1 - qq) / qq**2 + (n / qq) ** 2

    EN = integrate.quad(lambda x: mean_n(x) * dens(x), lo, hi, points=[mode], limit=500)[0] / Z
    EN2 = integrate.quad(lambda x: second(x) * dens(x), lo, hi, points=[mode], limit=500)[0] / Z
    sdN = np.sqrt(max(EN2 - EN**2, 0.0))
    draws = pop[i]
    se = sdN / np.sqrt(DRAWS)
    assert abs(draws.mean() - EN) < 5 * se + 1e-9 * EN, (D, n, draws.mean(), EN, sdN)
    assert draws.std() == pytest.approx(sdN, rel=0.05, abs=1e-6 * EN)


def test_d1_posterior_is_the_prior(arrival_draws):
    rows, data, x, _ = arrival_draws
    i = CASES.index((1, 1000))
    m = float(data.logit_p0[i, 0])
    ks = stats.kstest(x[i], stats.norm(m, 0.5).cdf)
    assert ks.pvalue > 1e-3


def sampled_cdf_and_density(grid, i: int, v: np.ndarray):
    """The exact CDF and density the kernel samples row (i, 0) from: cell masses
    from ``grid.cdf``, the log-linear density inside each cell."""
    x, cdf, lw = grid.x[i, 0], grid.cdf[i, 0], grid.logw[i, 0]
    j = np.clip(np.searchsorted(x, v, side="right") - 1, 0, len(x) - 2)
    h = x[j + 1] - x[j]
    t = np.clip((v - x[j]) / h, 0.0, 1.0)
    mass = cdf[j + 1] - cdf[j]
    d = lw[j + 1] - lw[j]
    flat = np.abs(d) < 1e-12
    ds = np.where(flat, 1.0, d)
    within = np.where(flat, t, np.expm1(ds * t) / np.expm1(ds))
    dens = np.where(flat, 1.0, ds * np.exp(ds * t) / np.expm1(ds)) * mass / h
    F = np.where(v < x[0], 0.0, np.where(v > x[-1], 1.0, cdf[j] + mass * within))
    return F, np.where((v >= x[0]) & (v <= x[-1]), dens, 0.0)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"D{D}-n{n}" for D, n in CASES])
def test_sampled_distribution_is_the_density(arrival_draws, i):
    """Finer than a KS test with 20,000 draws can see: the distribution the grid
    defines (log-linear density between its points) is within 10⁻⁴ of the
    quadrature CDF everywhere and within 5·10⁻⁴ of the density in L1 (the
    1024-point trapezoid grid it replaced: 4·10⁻⁵ and 5·10⁻³)."""
    rows, data, _, _ = arrival_draws
    D, n, T = rows[i]
    dens, Z, lo, hi, _mode = numeric_posterior(n, T, D, float(data.logit_p0[i, 0]), 0.5)
    v = np.linspace(lo, hi, 400_001)
    F_true = integrate.cumulative_simpson(dens(v), x=v, initial=0.0) / Z
    F, f = sampled_cdf_and_density(data.grid, i, v)
    assert np.abs(F - F_true).max() < 1e-4, (D, n)
    assert np.trapezoid(np.abs(f - dens(v) / Z), v) < 5e-4, (D, n)
