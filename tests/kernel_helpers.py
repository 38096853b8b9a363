"""Small builders shared by the kernel tests (no assertions here)."""

from __future__ import annotations

import numpy as np

from kernels.backend import Rng
from kernels.data import make_data
from kernels.gibbs import init
from kernels.sampler import run
from streams.synthetic import Population, cell_stats


def data_from_populations(pops: list[Population], day: float, **kw):
    st = [cell_stats(p, day) for p in pops]

    def stack(k):
        return np.stack([s[k] for s in st])

    return make_data(stack("n"), stack("sy"), stack("syy"), stack("arrived"), stack("dsum"),
                     stack("D"), stack("activity"), **kw)


def sample(data, seed: int, chains: int = 4, warmup: int = 300, draws: int = 500, thin: int = 1):
    rng = Rng(seed)
    state = init(data, rng, chains)
    state, _ = run(state, data, rng, warmup, thin=warmup)
    return run(state, data, rng, draws, thin=thin)
