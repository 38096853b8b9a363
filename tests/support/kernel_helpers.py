"""Builders and reference computations shared by the kernel tests (unit,
statistical and GPU): synthetic data, Rng stand-ins, the arrival block's
density by quadrature."""

from __future__ import annotations

import numpy as np
from scipy import integrate, optimize, special, stats

from kernels import gibbs, grids
from kernels.data import make_data
from kernels.gibbs import init
from kernels.rng import Rng
from kernels.sampler import run
from streams.dev.synthetic import Population, cell_stats


class FixedNormals:
    """An Rng stand-in whose normal draws are given (to read a Gaussian draw's
    mean and Cholesky factor off a sampler block)."""

    xp = np

    def __init__(self, eps):
        self.eps = eps

    def normal(self, shape):
        return self.eps.reshape(shape)


def data_from_populations(pops: list[Population], day: float, **kw):
    st = [cell_stats(p, day) for p in pops]

    def stack(k):
        return np.stack([s[k] for s in st])

    return make_data(stack("n"), stack("sy"), stack("syy"), stack("arrived"), stack("dsum"),
                     stack("D"), stack("activity"), **kw)


def sample(data, seed: int, chains: int = 4, warmup: int = 300, draws: int = 500, thin: int = 1):
    rng = Rng(seed)
    state = init(data, rng, chains)
    state, _, _ = run(state, data, rng, warmup, thin=warmup)
    state, trace, _ = run(state, data, rng, draws, thin=thin)
    return state, trace


def one_stratum_conjugate(n_units: int, xp=np):
    """One problem, one stratum, control and treatment with exact normal
    sufficient statistics of ``n_units`` units each (without generating them),
    and the conjugate answer for the effect: (data, mean, sd)."""
    rng = np.random.default_rng(3)
    means, sds = np.array([5.0, 5.3]), np.array([2.0, 2.5])
    n = np.full((1, 2, 1), float(n_units))
    xbar = means + sds / np.sqrt(n_units) * rng.standard_normal(2)
    ss = sds**2 * rng.chisquare(n_units - 1, size=2)
    sy = (xbar * n_units).reshape(1, 2, 1)
    syy = (ss + n_units * xbar**2).reshape(1, 2, 1)
    data = make_data(n, sy, syy, arrived=[[n_units]], dsum=[[0.0]], D=1,
                     activity_days=[[10.0]], xp=xp)
    s2 = ss / (n_units - 1)
    return data, xbar[1] - xbar[0], float(np.sqrt(s2[1] / n_units + s2[0] / n_units))


# ---------------------------------------------- the fused kernels' CPU checks


class ListRng:
    """An Rng stand-in handing out prepared uniforms in order."""

    xp = np

    def __init__(self, *uniforms):
        self._u = list(uniforms)

    def uniform(self, shape):
        u = self._u.pop(0)
        assert u.shape == tuple(shape)
        return u


def random_data(seed: int, P: int, K1: int, S: int):
    """Padded problems over several scales: some strata masked off, some cells
    empty, some problems with no completed bucket (an arrival grid that is the
    prior alone), arrivals from 0 to 10⁶."""
    rng = np.random.default_rng(seed)
    n = np.round(np.exp(rng.uniform(0, 12, (P, K1, S)))) * (rng.random((P, K1, S)) > 0.2)
    scale = np.exp(rng.uniform(-3, 3, (P, 1, 1)))
    mean = rng.normal(0, 2, (P, K1, S)) * scale
    sd = np.exp(rng.uniform(-1, 1, (P, K1, S))) * scale
    sy = n * mean
    syy = (n - 1).clip(0) * sd**2 + n * mean**2
    smask = rng.random((P, S)) > 0.15
    smask[:, 0] = True
    arrived = np.round(np.exp(rng.uniform(0, 14, (P, S)))) * (rng.random((P, S)) > 0.1)
    D = rng.integers(0, 30, P).astype(float)
    dsum = arrived * rng.uniform(0, 1, (P, S)) * np.maximum(D - 1, 0)[:, None]
    act = rng.uniform(0.5, 27.5, (P, S))
    return make_data(n, sy, syy, arrived, dsum, D, act, smask=smask)


def rel(a, b):
    """Elementwise relative difference of ``a`` from ``b``."""
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def omega_inputs(data, C: int, seed: int):
    """Inputs of the ω block for ``data``: derived quantities, residuals, variances,
    current ω² (some off the grid, some 0) and the uniforms it consumes."""
    rng = np.random.default_rng(seed)
    c = gibbs._derived(data)
    P, K1, S = data.shape
    K = K1 - 1
    s = data.hyper.s[:, None, None, None]
    resid = rng.standard_normal((P, C, K, S)) * s * np.exp(rng.uniform(-4, 2, (P, C, K, 1)))
    v = np.where(c["has"], np.exp(rng.uniform(-10, 2, (P, C, K, S))) * s**2, 1.0)
    # current ω²: mostly inside the grid, some below/above it (a foreign start), some 0
    pos = rng.uniform(-2, grids.OMEGA_GRID + 1, (P, C, K))
    omega2 = np.exp(2 * (c["omega_u0"] + c["omega_step"] * pos))
    omega2[rng.random((P, C, K)) < 0.02] = 0.0
    u_x = rng.random((P, C, K))
    u_x.reshape(-1)[:3] = [0.0, 1.0 - 2**-53, 0.5]
    u_acc = rng.random((P, C, K))
    return c, resid, v, omega2, u_x, u_acc


# ------------------------------------------- the arrival block's reference


def truncated_geometric_sum(n, p, D, rng):
    """Σ d over n entry buckets from p(1-p)^d truncated to d < D."""
    d = np.arange(D)
    w = p * (1 - p) ** d
    counts = rng.multinomial(n, w / w.sum())
    return float((counts * d).sum())


def log_post(x, n, T, D, m, sd):
    p = special.expit(x)
    lq = np.log(-np.expm1(D * np.log1p(-p)))
    return stats.norm.logpdf(x, m, sd) + n * np.log(p) + T * np.log1p(-p) - n * lq


def numeric_posterior(n, T, D, m, sd):
    """Normalised density on x with its mode and a support that holds the mass."""
    res = optimize.minimize_scalar(lambda x: -log_post(x, n, T, D, m, sd),
                                   bounds=(m - 20, m + 20), method="bounded",
                                   options={"xatol": 1e-12})
    mode = res.x
    top = log_post(mode, n, T, D, m, sd)
    h = 1e-4
    up, down = log_post(mode + h, n, T, D, m, sd), log_post(mode - h, n, T, D, m, sd)
    curv = -(up - 2 * top + down) / h**2
    w = 1 / np.sqrt(max(curv, 1e-12))
    lo, hi = mode - 40 * w, mode + 40 * w

    def dens(x):
        return np.exp(log_post(x, n, T, D, m, sd) - top)

    Z = integrate.quad(dens, lo, hi, points=[mode], limit=500, epsabs=0, epsrel=1e-10)[0]
    return dens, Z, lo, hi, mode
