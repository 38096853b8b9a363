"""kernels.decision (issue 27): the normal-mixture sequence, e-BH, P(best), forecast."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import integrate, stats

from kernels import decision as dk


def test_evalue_is_the_normal_mixture_of_likelihood_ratios():
    """E = ∫ exp(θS − θ²I/2) N(θ; 0, 1/ρ) dθ, by quadrature."""
    for m, s, rho in ((0.1, 0.05, 4.0), (-0.3, 0.2, 0.25), (0.0, 1.0, 1.0)):
        info = 1 / s**2

        def f(t, m=m, info=info, rho=rho):
            return np.exp(t * info * m - t * t * info / 2) * stats.norm.pdf(t, 0, rho**-0.5)

        want = integrate.quad(f, -50, 50, points=[m], limit=400)[0]
        assert np.exp(dk.log_evalue(m, s, rho)) == pytest.approx(want, rel=1e-7)


def test_sequence_excludes_zero_exactly_when_evalue_crosses():
    rng = np.random.default_rng(0)
    m = rng.normal(0, 1, 5000)
    s = np.exp(rng.uniform(-3, 1, 5000))
    rho, alpha = np.exp(rng.uniform(-3, 3, 5000)), 0.05
    h = dk.half_width(s, rho, alpha)
    excl = np.abs(m) > h
    crossed = dk.log_evalue(m, s, rho) > np.log(1 / alpha)
    assert (excl == crossed).all()


def test_running_intersection_only_narrows_and_sticks():
    lo, hi, lem = -np.inf, np.inf, -np.inf
    out = []
    for m, s in ((0.5, 0.3), (0.1, 0.2), (np.nan, 0.1), (0.0, 0.1), (0.3, -1.0)):
        lo, hi, lem, _ = dk.look(lo, hi, lem, m, s, 1.0, 0.05)
        out.append((float(lo), float(hi)))
    assert all(a[0] <= b[0] and a[1] >= b[1] for a, b in itertools.pairwise(out))
    assert out[2] == out[1] and out[4] == out[3]  # NaN mean / bad sd: no look
    assert dk.excludes_zero(0.1, 0.5) and dk.excludes_zero(-0.5, -0.1)
    assert dk.excludes_zero(0.2, 0.1) and not dk.excludes_zero(-0.1, 0.1)


def test_gaussian_random_walk_crosses_at_most_alpha():
    """Where the estimate really is a Gaussian random walk (m_t = S_t / I_t),
    looking at every step keeps P(ever excluding 0) ≤ α; the per-look z-test
    does not (Armitage): the bound the streaming decision is built on."""
    rng = np.random.default_rng(1)
    R, T = 4000, 300
    incr = rng.standard_normal((R, T))  # unit information per step
    S = np.cumsum(incr, 1)
    info = np.arange(1, T + 1)
    m, s = S / info, 1 / np.sqrt(info)
    ever = (dk.log_evalue(m, s, 1.0 / 4) >= np.log(20)).any(1).mean()
    naive = (np.abs(m / s) > 1.96).any(1).mean()
    assert ever <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / R)
    assert naive > 0.3


def test_ebh_matches_its_definition():
    rng = np.random.default_rng(2)
    for _ in range(300):
        k = int(rng.integers(1, 9))
        le = rng.normal(1.0, 2.0, k)
        le[rng.random(k) < 0.2] = np.nan
        alpha = 0.05
        got = dk.ebh(le, alpha)
        e = np.where(np.isfinite(le), np.exp(le), 0.0)
        srt = np.sort(e)[::-1]
        khat = max([j for j in range(1, k + 1) if srt[j - 1] >= k / (alpha * j)], default=0)
        want = np.zeros(k, bool)
        if khat:
            want[np.argsort(-e, kind="stable")[:khat]] = True
        assert got.sum() == khat and (got == want).all() or (
            got.sum() == khat and set(e[got]) == set(e[want]))


def test_p_best_counts_the_winner_of_each_draw():
    eff = np.array([[[1.0, -1.0, 2.0, 0.5], [0.5, -2.0, 1.0, 1.0]]])  # [1, K=2, N=4]
    got = dk.p_best(eff)[0]
    assert got.tolist() == [0.25, 0.5, 0.25]  # control best in draw 2 (both arms < 0)
    assert dk.p_best(eff, -1.0)[0].tolist() == [0.75, 0.0, 0.25]  # lower is better
    assert dk.p_best(eff, 1.0, valid=np.array([[True, False]]))[0].tolist() == [0.25, 0.75, 0.0]


def test_forecast_sd_falls_with_arrivals_and_p_ready_rises():
    n = np.array([[400.0, 300.0, 50.0], [410.0, 290.0, 60.0]])
    var = np.full((2, 3), 4.0)
    share = np.array([0.2, 0.3, 0.5])
    arrivals = np.array([[600.0, 300.0], [500.0, 250.0], [100.0, 80.0]])  # [S, D=2]
    fc = dk.forecast(0.05, 0.1, n, var, share, arrivals, 2, np.full(3, -1.0), 0.5, 0.0, 14,
                     rho=100.0, alpha=0.05, theta=0.1)
    assert (np.diff(fc["sd"]) <= 1e-12).all() and fc["sd"][-1] < 0.1
    assert (np.diff(fc["p_ready"]) >= 0).all() and 0 <= fc["p_ready"][0] <= fc["p_ready"][-1] <= 1
    done = dk.forecast(0.05, 0.1, n, var, share, arrivals, 2, np.full(3, -1.0), 0.5, 0.0, 3,
                       rho=100.0, alpha=0.05, theta=0.1, already=True)
    assert done["p_ready"].tolist() == [1.0, 1.0, 1.0]
