"""(a) One stratum, large n: the effect's posterior is the conjugate answer.

With n units per arm the priors are negligible and σ²'s posterior concentrates
at the within-cell variance, so the effect is N(ȳ₁ − ȳ₀, s₁²/n₁ + s₀²/n₀) up
to O(1/n). Tolerances are Monte Carlo errors of the posterior mean and sd.
"""

import numpy as np
import pytest

from kernels.data import make_data
from tests.support.kernel_helpers import FixedNormals, one_stratum_conjugate, sample


@pytest.mark.parametrize("n_units", [2_000, 10_000_000])
def test_one_stratum_matches_conjugate(n_units):
    data, want_mean, want_sd = one_stratum_conjugate(n_units)
    _, tr = sample(data, seed=11, chains=4, warmup=200, draws=1500)
    eff = tr.adj_effect[0, :, :, 0].ravel()
    mcse = want_sd / np.sqrt(len(eff) / 5)  # generous: ESS ≥ draws/5
    assert abs(eff.mean() - want_mean) < 4 * mcse
    assert eff.std() == pytest.approx(want_sd, rel=0.08)
    # naive equals adjusted with one stratum
    np.testing.assert_allclose(tr.naive_effect, tr.adj_effect)
    assert not bool(data.adjustable[0])


@pytest.mark.parametrize("K", [1, 2, 3])
def test_theta_beta_block_is_the_dense_marginal(K):
    """Block 3 draws (θ, β) | σ², ω with μ_0 and τ integrated out through a
    Sherman–Morrison form per stratum; its mean and covariance must equal the
    (θ, β) block of the dense joint Gaussian of (μ_0, θ, β), including empty
    cells, an empty control cell and a padded stratum."""
    from kernels import gibbs

    rng = np.random.default_rng(K)
    P, C, S = 2, 3, 5
    n = rng.integers(0, 5, (P, K + 1, S)).astype(float)
    n[0, 0, 0] = 0
    n[1, 1, :2] = 0
    sy = n * rng.normal(0, 1, n.shape)
    syy = sy**2 / np.maximum(n, 1) + n
    smask = np.ones((P, S), bool)
    smask[1, -1] = False
    data = make_data(n, sy, syy, np.full((P, S), 10.0), np.zeros((P, S)), 2,
                     rng.uniform(1, 20, (P, S)), smask=smask)
    c = gibbs._derived(data)
    h = data.hyper
    sigma2 = np.exp(rng.normal(0, 1, (P, C, K + 1, S)))
    omega2 = np.exp(rng.normal(0, 1, (P, C, K)))
    d = data.n[:, None] / sigma2
    ybar = c["ybar"]
    v = sigma2[:, :, 1:] * c["inv_n_t"] + (1 - c["hasf"])
    w = c["hasf"] / (omega2[..., None] + v)
    prec0 = c["inv_v0"] + d[:, :, 0]
    h0 = c["m_v0"] + ybar[:, :, 0] * d[:, :, 0]
    W = w.sum(2)
    gam = 1 / (prec0 + W)
    e = c["ybar_t"] - (h0 / prec0)[:, :, None]

    def draw(eps):  # eps [P, C, 2K] ordered (θ_1..θ_K, β_1..β_K), as the kernel uses them
        return np.concatenate(gibbs._draw_theta_beta(w, e, prec0, W, gam, c, FixedNormals(
            np.stack([eps[..., :K], eps[..., K:]], axis=2))), -1)

    m = 2 * K
    mean = draw(np.zeros((P, C, m)))
    root = np.stack([draw(np.eye(m)[i] + np.zeros((P, C, m))) - mean for i in range(m)], -1)
    cov = root @ np.swapaxes(root, -1, -2)
    z = data.z
    for p in range(P):
        for ch in range(C):
            N = S + m  # dense joint of (μ_0, θ, β), τ integrated out
            Q, lin = np.zeros((N, N)), np.zeros(N)
            for s in range(S):
                Q[s, s] += 1 / h.mu0_sd[p] ** 2 + d[p, ch, 0, s]
                lin[s] += h.m[p] / h.mu0_sd[p] ** 2 + d[p, ch, 0, s] * ybar[p, 0, 0, s]
                for k in range(K):
                    if data.n[p, k + 1, s] > 0 and smask[p, s]:
                        a = np.zeros(N)
                        a[[s, S + k, S + K + k]] = 1.0, 1.0, z[p, s]
                        Q += w[p, ch, k, s] * np.outer(a, a)
                        lin += w[p, ch, k, s] * ybar[p, 0, k + 1, s] * a
            Q[S:S + K, S:S + K] += np.eye(K) / h.theta_sd[p] ** 2
            Q[S + K:, S + K:] += np.eye(K) / h.beta_sd[p] ** 2
            cov_ref = np.linalg.inv(Q)
            np.testing.assert_allclose(mean[p, ch], (cov_ref @ lin)[S:], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(cov[p, ch], cov_ref[S:, S:], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("G", [4, 16])
def test_omega_step_leaves_its_conditional_invariant(G, monkeypatch):
    """Block 2 (ω | rest, an independence MH step with a tabulated, log-linearly
    interpolated proposal) must leave p(ω | resid, v) invariant for any grid
    size: chains started from exact draws of the conditional (fine-grid inverse
    CDF here) are still distributed as it after one step (KS test). A 4-point
    grid makes the proposal poor, so a wrong MH ratio would show."""
    from scipy import stats

    from kernels import gibbs, grids
    from kernels.rng import Rng

    monkeypatch.setattr(grids, "OMEGA_GRID", G)
    data = make_data(np.full((1, 2, 4), 5.0), np.zeros((1, 2, 4)), np.full((1, 2, 4), 20.0),
                     np.full((1, 4), 10.0), np.zeros((1, 4)), 2, np.ones((1, 4)) * 5)
    c = gibbs._derived(data)
    C = 40_000
    resid = np.broadcast_to(np.array([0.9, -0.4, 1.6, 7.0]), (1, C, 1, 4))
    v = np.broadcast_to(np.array([0.3, 0.05, 0.8, 1.0]), (1, C, 1, 4))
    has = np.broadcast_to(np.array([True, True, True, False]), (1, C, 1, 4))
    lo = float(c["omega_u0"][0, 0, 0])
    u = np.linspace(lo, lo + c["omega_step"] * (G - 1), 200_001)
    lp = gibbs._log_post_omega(u, resid[0, 0, 0], v[0, 0, 0], has[0, 0, 0], c["omega_nu"],
                               float(c["omega_log_A"][0, 0, 0]))
    dens = np.exp(lp - lp.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(u))])
    cdf /= cdf[-1]
    rng = np.random.default_rng(5)
    start = np.interp(rng.random(C), cdf, u)
    out = gibbs._draw_omega2(np.exp(2 * start).reshape(1, C, 1), resid, v, has, c, Rng(6))
    moved = np.mean(out.ravel() != np.exp(2 * start))
    assert moved > (0.1 if G == 4 else 0.8)
    ks = stats.kstest(0.5 * np.log(out.ravel()), lambda x: np.interp(x, u, cdf))
    assert ks.pvalue > 1e-3, (G, moved, ks)
