"""(a) One stratum, large n: the effect's posterior is the conjugate answer.

With n units per arm the priors are negligible and σ²'s posterior concentrates
at the within-cell variance, so the effect is N(ȳ₁ − ȳ₀, s₁²/n₁ + s₀²/n₀) up
to O(1/n). Tolerances are Monte Carlo errors of the posterior mean and sd.
"""

import numpy as np
import pytest

from kernels.data import make_data
from tests.kernel_helpers import sample


@pytest.mark.parametrize("n_units", [2_000, 10_000_000])
def test_one_stratum_matches_conjugate(n_units):
    rng = np.random.default_rng(3)
    means, sds = np.array([5.0, 5.3]), np.array([2.0, 2.5])
    n = np.full((1, 2, 1), float(n_units))
    # exact sufficient statistics of a normal sample, without generating n_units values
    xbar = means + sds / np.sqrt(n_units) * rng.standard_normal(2)
    ss = sds**2 * rng.chisquare(n_units - 1, size=2)
    sy = (xbar * n_units).reshape(1, 2, 1)
    syy = (ss + n_units * xbar**2).reshape(1, 2, 1)
    data = make_data(n, sy, syy, arrived=[[n_units]], dsum=[[0.0]], D=1, activity_days=[[10.0]])
    _, tr = sample(data, seed=11, chains=4, warmup=200, draws=1500)
    eff = tr.adj_effect[0, :, :, 0].ravel()
    s2 = ss / (n_units - 1)
    want_mean = xbar[1] - xbar[0]
    want_sd = np.sqrt(s2[1] / n_units + s2[0] / n_units)
    mcse = want_sd / np.sqrt(len(eff) / 5)  # generous: ESS ≥ draws/5
    assert abs(eff.mean() - want_mean) < 4 * mcse
    assert eff.std() == pytest.approx(want_sd, rel=0.08)
    # naive equals adjusted with one stratum
    np.testing.assert_allclose(tr.naive_effect, tr.adj_effect)
    assert not bool(data.adjustable[0])
