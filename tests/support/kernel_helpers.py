"""Small builders shared by the kernel tests (no assertions here)."""

from __future__ import annotations

import numpy as np

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
