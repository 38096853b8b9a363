"""The model's Gibbs sweep, batched over [problems, chains, …] (DESIGN §6).

BlackJAX-style: ``init(data, rng, n_chains) -> State`` and
``sweep(state, data, rng) -> State``; pure array code on numpy or cupy.

Effect block, per problem, treatments k = 1..K, strata s = 1..S:
    Y | k, s ~ N(μ_0s + τ_ks, σ²_ks)            (τ_0s = 0)
    τ_ks ~ N(θ_k + β_k z_s, ω_k²)
    μ_0s ~ N(m, (2s)²),  σ²_ks ~ IG(1, s²),  θ_k, β_k ~ N(0, s²),
    ω_k ~ half-t_3(0, s/2) via ω² | ξ ~ IG(ν/2, ν/ξ), ξ ~ IG(1/2, 1/A²)
with m, s the pooled outcome mean and sd (``kernels.data.Hyper``).

Blocks, all exact conditional draws:
 1. σ²_ks | μ            inverse gamma
 2. (μ_0s, τ_·s) | σ², θ, β, ω   jointly per stratum: μ_0s from its marginal with
    τ integrated out, then τ_ks | μ_0s. This is an exact draw from the
    (K+1)-dim Gaussian; one-at-a-time updates would mix badly because μ_0 and
    τ are strongly negatively correlated when the control cell is small.
 3. (θ_k, β_k) | τ, ω     2-dim Gaussian regression of τ_k· on z
 4. ω_k² | τ, θ, β, ξ     inverse gamma;  ξ_k | ω_k² inverse gamma
 5. (p_s, N_s) | arrivals  exact independent draws (``kernels.arrival``)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kernels import arrival
from kernels.backend import Array, Rng
from kernels.data import ModelData


@dataclass
class State:
    """Chain state, arrays shaped [P, C, …]; ``iteration`` is [P] (sweeps done)."""

    mu0: Array  # [P, C, S]
    tau: Array  # [P, C, K, S]   treatments only
    sigma2: Array  # [P, C, K1, S]
    theta: Array  # [P, C, K]
    beta: Array  # [P, C, K]
    omega2: Array  # [P, C, K]
    xi: Array  # [P, C, K]   half-t auxiliary
    logit_p: Array  # [P, C, S]
    pop: Array  # [P, C, S]   N_s
    iteration: Array  # [P]

    def arrays(self) -> dict[str, Array]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def init(data: ModelData, rng: Rng, n_chains: int) -> State:
    """Over-dispersed starting points around the pooled scale, so that
    split R-hat can detect chains that have not yet forgotten where they began."""
    xp = data.xp
    P, K1, S = data.shape
    K = K1 - 1
    C = n_chains
    h = data.hyper
    m, s = h.m[:, None, None], h.s[:, None, None]
    ybar = xp.where(data.n > 0, data.sy / xp.maximum(data.n, 1), h.m[:, None, None])
    mu0 = ybar[:, None, 0, :] + s * rng.normal((P, C, S))
    tau = ybar[:, None, 1:, :] - ybar[:, None, :1, :] + s[..., None] * 0.1 * rng.normal(
        (P, C, K, S)
    )
    sigma2 = (s[..., None] ** 2) * xp.exp(0.5 * rng.normal((P, C, K1, S)))
    theta = s * 0.1 * rng.normal((P, C, K))
    beta = s * 0.1 * rng.normal((P, C, K))
    omega2 = (h.omega_scale[:, None, None] ** 2) * xp.exp(rng.normal((P, C, K)))
    xi = h.omega_scale[:, None, None] ** 2 + 0.0 * omega2
    logit_p = arrival.draw_logit_p(data.grid, rng, C)
    pop = arrival.draw_population(logit_p, data.arrived, data.D, rng)
    del m
    return State(mu0, tau, sigma2, theta, beta, omega2, xi, logit_p, pop,
                 xp.zeros((P,), dtype=xp.int64))


def sweep(state: State, data: ModelData, rng: Rng) -> State:
    """One Gibbs sweep over every block, for all problems and chains at once."""
    xp = data.xp
    h = data.hyper
    P, K1, S = data.shape
    C = state.mu0.shape[1]
    K = K1 - 1
    n = data.n[:, None]  # [P,1,K1,S]
    sy = data.sy[:, None]
    syy = data.syy[:, None]

    # 1. σ²_ks | μ_ks
    mu = xp.concatenate([state.mu0[:, :, None, :], state.mu0[:, :, None, :] + state.tau], axis=2)
    ss_within = xp.maximum(syy - sy * sy / xp.maximum(n, 1.0), 0.0)
    ss_mean = (sy - n * mu) ** 2 / xp.maximum(n, 1.0)
    a = h.sig_a[:, None, None, None] + 0.5 * n
    b = h.sig_b[:, None, None, None] + 0.5 * (ss_within + ss_mean)
    sigma2 = rng.inv_gamma(a + 0.0 * mu, b + 0.0 * mu)

    # 2. (μ_0s, τ_·s) jointly: μ_0s from its marginal, then τ_ks | μ_0s
    prec_cell = n / sigma2  # [P,C,K1,S]  d_k
    obs_cell = sy / sigma2  # d_k · ȳ_k
    g = state.theta[..., None] + state.beta[..., None] * data.z[:, None, None, :]  # [P,C,K,S]
    om2 = state.omega2[..., None]  # [P,C,K,1]
    d_t, o_t = prec_cell[:, :, 1:], obs_cell[:, :, 1:]
    c_t = d_t / (1.0 + d_t * om2)  # precision of ȳ_k about μ0 + g_k, τ integrated out
    # c_t (ȳ_k - g_k) written without dividing by n (n may be 0)
    cy_t = (o_t - d_t * g) / (1.0 + d_t * om2)
    v0 = (h.mu0_sd**2)[:, None, None]
    prec_mu = 1.0 / v0 + prec_cell[:, :, 0] + c_t.sum(axis=2)
    mean_mu = (h.m[:, None, None] / v0 + obs_cell[:, :, 0] + cy_t.sum(axis=2)) / prec_mu
    mu0 = mean_mu + rng.normal((P, C, S)) / xp.sqrt(prec_mu)
    prec_tau = 1.0 / om2 + d_t
    mean_tau = (g / om2 + o_t - d_t * mu0[:, :, None, :]) / prec_tau
    tau = mean_tau + rng.normal((P, C, K, S)) / xp.sqrt(prec_tau)

    # 3. (θ_k, β_k) | τ, ω²: Bayesian regression of τ_k· on z over real strata
    sm = data.smask[:, None, None, :].astype(float)
    z = data.z[:, None, None, :]
    w = sm / om2  # [P,C,K,S]
    A11 = 1.0 / (h.theta_sd**2)[:, None, None] + w.sum(-1)
    A12 = (w * z).sum(-1)
    A22 = 1.0 / (h.beta_sd**2)[:, None, None] + (w * z * z).sum(-1)
    b1 = (w * tau).sum(-1)
    b2 = (w * z * tau).sum(-1)
    det = A11 * A22 - A12 * A12
    S11, S12, S22 = A22 / det, -A12 / det, A11 / det  # covariance = A⁻¹
    m1 = S11 * b1 + S12 * b2
    m2 = S12 * b1 + S22 * b2
    l11 = xp.sqrt(S11)
    l21 = S12 / l11
    l22 = xp.sqrt(xp.maximum(S22 - l21 * l21, 0.0))
    e = rng.normal((2, P, C, K))
    theta = m1 + l11 * e[0]
    beta = m2 + l21 * e[0] + l22 * e[1]

    # 4. ω² | τ, θ, β, ξ and ξ | ω² (half-t via inverse-gamma auxiliary)
    nu = h.omega_nu
    resid = tau - theta[..., None] - beta[..., None] * z
    n_s = data.smask.sum(-1)[:, None, None].astype(float)
    omega2 = rng.inv_gamma(0.5 * (nu + n_s) + 0.0 * theta,
                           nu / state.xi + 0.5 * (sm * resid * resid).sum(-1))
    A2 = (h.omega_scale**2)[:, None, None]
    xi = rng.inv_gamma(0.5 * (nu + 1.0) + 0.0 * omega2, nu / omega2 + 1.0 / A2)

    # 5. arrival block: exact independent draws
    logit_p = arrival.draw_logit_p(data.grid, rng, C)
    pop = arrival.draw_population(logit_p, data.arrived, data.D, rng)

    return State(mu0, tau, sigma2, theta, beta, omega2, xi, logit_p, pop, state.iteration + 1)
