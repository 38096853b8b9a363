"""Edge cases the kernels must survive: empty and one-unit cells, D = 0 and
D = 1, 10⁷ units per cell, several treatments, problems of different sizes
padded into one batch, and the numeric summary record."""

import numpy as np
import pytest

from kernels.data import make_data
from kernels.summary import summarize
from streams.dev.synthetic import Scenario, population
from tests.support.kernel_helpers import data_from_populations, sample


def finite_state(state):
    for k, v in state.arrays().items():
        assert np.all(np.isfinite(v)), k


def test_empty_and_one_unit_cells_and_d0():
    n = np.array([[[0, 1, 5], [1, 0, 5]], [[0, 0, 0], [0, 0, 0]]], float)
    sy = n * 2.0
    syy = n * 5.0
    data = make_data(n, sy, syy, arrived=[[0, 3, 10], [0, 0, 0]], dsum=[[0, 1, 4], [0, 0, 0]],
                     D=[2, 0], activity_days=[[1, 5, 20], [1, 5, 20]])
    state, tr = sample(data, seed=1, warmup=50, draws=100)
    finite_state(state)
    assert np.all(np.isfinite(tr.adj_effect))
    # problem 1 has no data at all: D = 0, nothing to adjust with
    assert bool(data.adjustable[0]) and not bool(data.adjustable[1])
    np.testing.assert_allclose(tr.adj_effect[1], tr.naive_effect[1])
    # the stratum with no arrivals has no population mass
    assert np.all(tr.share[0, :, :, 0] == 0)


def test_d1_shares_follow_prior_and_ten_million_units():
    n = np.full((1, 2, 2), 1e7)
    sy = n * np.array([1.0, 1.01])[None, :, None]
    syy = n * 2.0 + sy**2 / n
    data = make_data(n, sy, syy, arrived=[[4e7, 1e6]], dsum=[[0, 0]], D=1,
                     activity_days=[[20.0, 1.0]])
    state, tr = sample(data, seed=2, warmup=50, draws=200)
    finite_state(state)
    eff = tr.adj_effect[0, :, :, 0]
    assert np.all(np.isfinite(eff))
    # the light stratum is under-represented in arrivals; adjustment must up-weight it
    share_light = tr.share[0, :, :, 1].mean()
    assert share_light > 1e6 / 4.1e7 * 2


def test_three_treatments():
    rng = np.random.default_rng(4)
    sc = Scenario(n_units=30_000, variants=("c", "a", "b", "d"), allocation=(0.25,) * 4)
    pops = [population(sc, rng)]
    data = data_from_populations(pops, 7)
    _, tr = sample(data, seed=3, warmup=200, draws=400)
    assert tr.adj_effect.shape[-1] == 3
    truth = pops[0].true_effect
    for k in range(3):
        d = tr.adj_effect[0, :, :, k].ravel()
        lo, hi = np.quantile(d, [0.001, 0.999])
        assert lo < truth < hi


def test_padding_does_not_change_the_posterior():
    """A 2-stratum, 1-treatment problem alone and padded next to a larger one."""
    rng = np.random.default_rng(9)
    n_small = np.array([[300.0, 200.0], [310.0, 190.0]])
    mu = np.array([[1.0, 2.0], [1.2, 2.5]])
    sy_small = n_small * mu + np.sqrt(n_small) * rng.normal(size=(2, 2))
    syy_small = sy_small**2 / n_small + (n_small - 1) * 1.0
    alone = make_data(n_small[None], sy_small[None], syy_small[None], [[500.0, 100.0]],
                      [[300.0, 150.0]], 3, [[20.0, 2.0]])
    n_pad = np.zeros((2, 3, 4))
    sy_pad = np.zeros((2, 3, 4))
    syy_pad = np.zeros((2, 3, 4))
    n_pad[0, :2, :2], sy_pad[0, :2, :2], syy_pad[0, :2, :2] = n_small, sy_small, syy_small
    n_pad[1] = 100.0
    sy_pad[1] = 150.0
    syy_pad[1] = 400.0
    smask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    kmask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    padded = make_data(n_pad, sy_pad, syy_pad, [[500.0, 100.0, 0, 0], [50.0] * 4],
                       [[300.0, 150.0, 0, 0], [20.0] * 4], [3, 3],
                       [[20.0, 2.0, 1.0, 1.0], [1.0, 4.0, 10.0, 25.0]],
                       smask=smask, kmask=kmask)
    _, ta = sample(alone, seed=5, chains=4, warmup=300, draws=2000)
    _, tp = sample(padded, seed=6, chains=4, warmup=300, draws=2000)
    a = ta.adj_effect[0, :, :, 0].ravel()
    p = tp.adj_effect[0, :, :, 0].ravel()
    se = np.hypot(a.std(), p.std()) / np.sqrt(len(a) / 10)
    assert abs(a.mean() - p.mean()) < 4 * se
    assert p.std() == pytest.approx(a.std(), rel=0.1)
    np.testing.assert_allclose(tp.share[0, :, :, 2:], 0.0)


def test_summary_has_every_numeric_field():
    rng = np.random.default_rng(1)
    pops = [population(Scenario(n_units=5000), rng) for _ in range(2)]
    data = data_from_populations(pops, 5)
    _, tr = sample(data, seed=8, chains=4, warmup=100, draws=200)
    out = summarize(tr, data, direction=[1, -1])
    assert len(out) == 2 and len(out[0]) == 1
    rec = out[0][0]
    assert rec["adjustment"] == "stratified"
    for part in ("adjusted", "naive"):
        for est in ("effect", "lift"):
            iv = rec[part][est]
            assert iv["lo"] <= iv["mean"] <= iv["hi"] and iv["sd"] > 0
        assert 0 <= rec[part]["p_positive"] <= 1
    assert rec["adjusted"]["expected_loss"] >= 0
    assert len(rec["strata"]) == 7
    shares = [s["share_population"]["mean"] for s in rec["strata"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    d = rec["diagnostics"]
    assert d["chains"] == 4 and d["draws"] == 800
    assert 0.99 < d["rhat"] < 1.1 and d["ess_bulk"] > 100 and d["ess_tail"] > 100
    # expected loss flips with the metric's direction
    eff = tr.adj_effect[1, :, :, 0].ravel()
    assert out[1][0]["adjusted"]["expected_loss"] == pytest.approx(np.maximum(0, eff).mean())


def test_thirty_strata_and_two_treatments_finite_and_sane():
    rng = np.random.default_rng(12)
    P, K1, S = 3, 3, 30
    n = rng.integers(0, 50, (P, K1, S)).astype(float)
    y = rng.normal(5, 1, (P, K1, S))
    sy = n * y
    syy = n * (y**2 + 1.0)
    arrived = n.sum(1) + rng.integers(0, 20, (P, S))
    act = np.tile(np.linspace(0.5, 28, S), (P, 1))
    data = make_data(n, sy, syy, arrived, arrived * 1.5, 4, act)
    state, tr = sample(data, seed=4, warmup=100, draws=200)
    finite_state(state)
    np.testing.assert_allclose(tr.share.sum(-1), 1.0)
    assert np.all(np.abs(tr.adj_effect.mean(axis=(1, 2))) < 2.0)
