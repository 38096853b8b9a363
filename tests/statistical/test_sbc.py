"""(c) Simulation-based calibration (Talts et al. 2018) of the full model.

Parameters are drawn from the prior (data-independent hyperparameters), data
from the model — small cells, including empty and one-unit ones, and
arrivals whose entry buckets follow the truncated geometric — then the
sampler runs on all replicates at once (one batch, problems = replicates).
If the sampler draws from the right posterior, the rank of each true value
among the posterior draws is uniform; a χ² test on binned ranks checks it.
"""

import numpy as np
import pytest

from kernels.data import fixed_hyper, make_data
from kernels.gibbs import init, sweep
from kernels.rng import Rng
from tests.support.calibration import ACTIVITY, assert_uniform

S = len(ACTIVITY)


def simulate(reps: int, rng: np.random.Generator, K: int = 1):
    """``reps`` data sets with K treatments (K = 1 draws the same numbers as always)."""
    nu, A = 3.0, 0.5
    xi = 1.0 / rng.gamma(0.5, 1.0 / (1.0 / A**2), (reps, K))  # IG(1/2, 1/A²)
    omega2 = (nu / xi) / rng.gamma(nu / 2, 1.0, (reps, K))  # IG(ν/2, ν/ξ)
    theta = rng.normal(0, 1, (reps, K))
    beta = rng.normal(0, 1, (reps, K))
    logp = np.log(ACTIVITY / 28)
    z = logp - logp.mean()
    tau = (theta[..., None] + beta[..., None] * z
           + np.sqrt(omega2)[..., None] * rng.normal(size=(reps, K, S)))
    mu0 = rng.normal(0, 2, (reps, S))
    sigma2 = 1.0 / rng.gamma(1.0, 1.0, (reps, K + 1, S))
    n = rng.integers(0, 12, (reps, K + 1, S)).astype(float)
    mean = np.concatenate([mu0[:, None], mu0[:, None] + tau], axis=1)
    sy = np.zeros_like(n)
    syy = np.zeros_like(n)
    for idx in np.ndindex(n.shape):
        y = mean[idx] + np.sqrt(sigma2[idx]) * rng.normal(size=int(n[idx]))
        sy[idx], syy[idx] = y.sum(), (y * y).sum()
    # arrivals: logit p ~ N(logit p̂, 0.5²), 15 arrivals over D buckets
    p0 = -np.expm1(np.log1p(-ACTIVITY / 28))
    x = np.log(p0) - np.log1p(-p0) + 0.5 * rng.normal(size=(reps, S))
    p = 1 / (1 + np.exp(-x))
    D = rng.integers(1, 6, reps)
    arrived = np.full((reps, S), 15.0)
    dsum = np.zeros((reps, S))
    for r in range(reps):
        d = np.arange(D[r])
        for s in range(S):
            w = p[r, s] * (1 - p[r, s]) ** d
            dsum[r, s] = (rng.multinomial(15, w / w.sum()) * d).sum()
    data = make_data(n, sy, syy, arrived, dsum, D, np.tile(ACTIVITY, (reps, 1)),
                     hyper=fixed_hyper(reps))
    truth = {
        "tau_0": tau[:, 0, 0], "tau_3": tau[:, 0, 3], "mu0_1": mu0[:, 1], "theta": theta[:, 0],
        "beta": beta[:, 0], "log_omega2": np.log(omega2[:, 0]),
        "log_sigma2_t2": np.log(sigma2[:, 1, 2]),
        "logit_p_0": x[:, 0], "logit_p_3": x[:, 3],
    }
    if K > 1:  # the last treatment too: (θ, β) are drawn jointly across treatments
        truth.update({"tau_K0": tau[:, -1, 0], "theta_K": theta[:, -1], "beta_K": beta[:, -1],
                      "log_omega2_K": np.log(omega2[:, -1])})
    return data, truth


def traced(state):
    out = {
        "tau_0": state.tau[:, :, 0, 0], "tau_3": state.tau[:, :, 0, 3],
        "mu0_1": state.mu0[:, :, 1], "theta": state.theta[:, :, 0],
        "beta": state.beta[:, :, 0], "log_omega2": np.log(state.omega2[:, :, 0]),
        "log_sigma2_t2": np.log(state.sigma2[:, :, 1, 2]),
        "logit_p_0": state.logit_p[:, :, 0], "logit_p_3": state.logit_p[:, :, 3],
    }
    if state.tau.shape[2] > 1:
        out.update({"tau_K0": state.tau[:, :, -1, 0], "theta_K": state.theta[:, :, -1],
                    "beta_K": state.beta[:, :, -1], "log_omega2_K": np.log(state.omega2[:, :, -1])})
    return out


def sbc_ranks(reps: int, seed: int, chains=4, warmup=200, kept=50, thin=10, K=1):
    data, truth = simulate(reps, np.random.default_rng(seed), K)
    rng = Rng(seed + 1)
    state = init(data, rng, chains)
    for _ in range(warmup):
        state, _ = sweep(state, data, rng)
    draws = {k: [] for k in truth}
    for i in range(kept * thin):
        state, _ = sweep(state, data, rng)
        if (i + 1) % thin == 0:
            for k, v in traced(state).items():
                draws[k].append(v)
    ranks = {}
    for k in truth:
        d = np.stack(draws[k], axis=-1).reshape(reps, -1)  # [reps, chains·kept]
        ranks[k] = (d < truth[k][:, None]).sum(1)
    return ranks, chains * kept


def test_sbc_small_problems():
    ranks, L = sbc_ranks(reps=300, seed=2024)
    assert_uniform(ranks, L)


def test_sbc_two_treatments():
    """Two treatments share μ_0, so the (θ, β) block integrating μ_0 out couples
    them (the Sherman–Morrison cross terms); with K = 1 those terms vanish."""
    ranks, L = sbc_ranks(reps=300, seed=2025, K=2)
    assert_uniform(ranks, L)


@pytest.mark.slow
def test_sbc_many_problems():
    ranks, L = sbc_ranks(reps=2000, seed=77, kept=100)
    assert_uniform(ranks, L, bins=20)
