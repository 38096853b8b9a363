"""Platform prior fitted by (exact) asynchronous Gibbs (issue 7, docs/architecture.md#the-model;
docs/method.md §7).

Ground truth for (λ, ψ²) is the quadrature posterior (φ integrated out), so each
sampler is judged on its own against the exact answer, with tolerances of a few
Monte Carlo standard errors from ``ess_bulk`` (plus 1 % of a posterior sd for
quadrature error).
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import platform as kp

DATA = kp.synthetic(200, seed=0)
EXACT = kp.exact_hyper_posterior(DATA.z)


def _agree(draws: kp.Draws, z_tol: float = 4.5) -> None:
    for name, x in (("lambda", draws.lam), ("psi2", draws.psi2)):
        m, se = kp.mcse_mean(x)
        tol = z_tol * se + 0.01 * EXACT[name]["sd"]
        assert abs(m - EXACT[name]["mean"]) < tol, (name, m, EXACT[name], se)


@pytest.fixture(scope="module")
def sync() -> kp.Draws:
    return kp.sync_gibbs(DATA.z, 2000, 4, seed=1)


def test_correction_ratio_is_one_without_staleness() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    la = kp.correction_log_ratio(a, b, DATA.z[:50], (0.2, 0.7), (0.2, 0.7))
    np.testing.assert_allclose(la, 0.0, atol=1e-12)


def test_sync_matches_exact(sync: kp.Draws) -> None:
    _agree(sync)


def test_sync_and_exact_async_agree_on_theta(sync: kp.Draws) -> None:
    """(i) vs (ii) on a sample of φ_e, with the MCSEs of both."""
    a = kp.async_gibbs(DATA.z, 2000, 4, seed=2, staleness=0, correct=True)
    _agree(a)
    for e in range(0, 200, 25):
        m1, s1 = kp.mcse_mean(sync.phi[:, :, e])
        m2, s2 = kp.mcse_mean(a.phi[:, :, e])
        assert abs(m1 - m2) < 4.5 * np.hypot(s1, s2), (e, m1, m2, s1, s2)


@pytest.mark.parametrize("staleness", [4, 16])
def test_exact_async_agrees_at_high_staleness(staleness: int) -> None:
    """(ii) with proposals under the pilot chain's stale values: exact at any
    staleness (kernels.platform docstring)."""
    d = kp.async_gibbs(DATA.z, 2000, 4, seed=3, staleness=staleness, correct=True)
    _agree(d)
    assert 0.5 < d.acceptance < 1.0, d.acceptance


def test_own_stale_proposals_are_biased() -> None:
    """The finding behind the pilot: proposing under the chain's *own* values of
    k updates ago, which were drawn given the experiment's current value,
    biases ψ² low even with the MH correction (≈ 20 MCSE at 32 chains)."""
    d = kp.async_gibbs(DATA.z, 2000, 16, seed=3, staleness=16, correct=True, proposal="own")
    m, se = kp.mcse_mean(d.psi2)
    assert m < EXACT["psi2"]["mean"] - 4 * se, (m, se, EXACT["psi2"])


def test_shrunk_effects_equal_the_sampled_mixture() -> None:
    """The Rao–Blackwellised shrunk summary against 400k draws from the same
    mixture of normal conditionals."""
    rng = np.random.default_rng(7)
    lam, psi2 = rng.normal(0.25, 0.1, 50), rng.gamma(8.0, 0.07, 50)
    ybar, sd = np.array([0.02, -0.004, 0.0]), np.array([0.01, 0.002, 0.05])
    got = kp.shrunk_effects(ybar, sd, lam, psi2)
    for e in range(3):
        j = rng.integers(0, lam.size, 400_000)
        m, v = kp.theta_conditional(ybar[e] / sd[e], lam[j], psi2[j])
        x = sd[e] * (m + np.sqrt(v) * rng.standard_normal(j.size))
        eff = got[e]["effect"]
        se = x.std() / np.sqrt(x.size)
        assert abs(eff["mean"] - x.mean()) < 5 * se
        assert abs(eff["sd"] / x.std() - 1) < 0.01
        lo, hi = np.quantile(x, [0.025, 0.975])
        assert abs(eff["lo"] - lo) < 0.02 * x.std() and abs(eff["hi"] - hi) < 0.02 * x.std()
        assert abs(got[e]["p_positive"] - (x > 0).mean()) < 0.005


def test_shrunk_effects_match_sync_gibbs(sync: kp.Draws) -> None:
    """The shrunk summary from (λ, ψ²) draws equals the posterior of θ_e that
    the joint sampler's own φ draws give (within MCSE)."""
    eff = kp.shrunk_effects(DATA.ybar, DATA.sd, sync.lam.ravel(), sync.psi2.ravel())
    for e in range(0, 200, 20):
        m, se = kp.mcse_mean(sync.phi[:, :, e] * DATA.sd[e])
        assert abs(eff[e]["effect"]["mean"] - m) < 4.5 * se + 1e-12, (e, eff[e], m, se)


def test_uncorrected_async_drifts_at_high_staleness() -> None:
    """(iii): mixing θ_e drawn under different stale (λ, ψ²) understates the
    posterior spread of ψ² (≈ 0.13 vs 0.151 at k = 16 in our runs)."""
    a = kp.async_gibbs(DATA.z, 2000, 4, seed=4, staleness=16, correct=False)
    assert a.psi2.std() < 0.93 * EXACT["psi2"]["sd"]


def test_shrinkage_helps_and_covers(sync: kp.Draws) -> None:
    rep = kp.shrinkage_report(sync, DATA)
    assert rep["mse_shrunk"] < 0.7 * rep["mse_flat"], rep
    assert 0.9 <= rep["coverage_shrunk"] <= 0.99, rep


@pytest.mark.integration
def test_redis_workers_agree_and_keep_sums_consistent(redis_url: str) -> None:
    """(ii) on a real redis-server: 4 worker threads through ``async_step``
    with injected staleness; chain and pilot keep their sums equal to their
    members."""
    import redis

    from streams.bench.platform import run_async
    from streams.sampling.platform_prior import ParameterServer

    d = run_async(redis_url, DATA.z, n_sweeps=300, n_workers=4, batch=50, staleness=4,
                  correct=True, seed=5, metric="t")
    assert d.lam.shape[1] >= 100
    _agree(d, z_tol=5.0)
    assert 0.5 < d.acceptance < 1.0
    r = redis.Redis.from_url(redis_url)
    for chain in (0, "0p"):
        ps = ParameterServer(r, "t", chain)
        vals = np.array([float(v) for v in r.hvals(ps.contrib)])
        n, s1, s2 = (float(x) for x in r.hmget(ps.hyper, "n", "s1", "s2"))
        assert vals.size == n == 200
        np.testing.assert_allclose([s1, s2], [vals.sum(), (vals * vals).sum()],
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.integration
def test_streaming_platform_prior_shrinks_records(redis_url: str) -> None:
    """``PlatformPrior.apply`` — what the sampler service runs after each tick —
    on the records of 200 experiments: members join, (λ, ψ²) reach the exact
    posterior, the records carry the shrunk effect, whose error against the
    true effects is below the flat one's."""
    import redis

    from streams.sampling.platform_prior import PlatformConfig, PlatformPrior

    r = redis.Redis.from_url(redis_url)
    prior = PlatformPrior(r, PlatformConfig(chains=4, history=64, seed=11))

    def records() -> list[dict]:
        return [{"experiment_id": f"x{e}", "variant": "b", "metric": "stream",
                 "adjusted": {"effect": {"mean": float(DATA.ybar[e]), "sd": float(DATA.sd[e])}}}
                for e in range(200)]

    lam, psi2 = [], []
    for t in range(400):
        recs = prior.apply(records(), lambda eid: eid != "x199")  # one opted out
        if t >= 100:
            chains = [prior.servers("stream", c)[0] for c in range(4)]
            cur = [ch.read_current([])[:2] for ch in chains]
            lam.append([c[0] for c in cur])
            psi2.append([c[1] for c in cur])
    assert "platform" not in recs[199]
    p = recs[0]["platform"]
    assert p["experiments"] == 199 and p["chains"] == 4 and p["draws"] == 256
    assert 0.5 < p["acceptance"] <= 1.0
    exact = kp.exact_hyper_posterior(DATA.z[:199])
    for name, x in (("lambda", np.array(lam).T), ("psi2", np.array(psi2).T)):
        m, se = kp.mcse_mean(x)
        assert abs(m - exact[name]["mean"]) < 5 * se + 0.01 * exact[name]["sd"], (name, m, se)
    shrunk = np.array([rec["platform"]["effect"]["mean"] for rec in recs[:199]])
    theta = DATA.theta[:199]
    assert np.mean((shrunk - theta) ** 2) < 0.7 * np.mean((DATA.ybar[:199] - theta) ** 2)
    lo = np.array([rec["platform"]["effect"]["lo"] for rec in recs[:199]])
    hi = np.array([rec["platform"]["effect"]["hi"] for rec in recs[:199]])
    assert 0.9 <= np.mean((lo <= theta) & (theta <= hi)) <= 0.99
