"""kernels.srm: the anytime-valid sample-ratio-mismatch test (Lindon & Malek 2022).

What must hold for the alert to be trusted:

- validity under peeking: with a true allocation and a look after every 100
  units up to 20k, the e-process alarms in at most ~alpha of experiments,
  while a chi-square test peeked at the same times alarms far above its
  nominal level (the reason this module exists);
- power where it matters and silence where it does not: a 51/49 split is
  caught within 100k units, a 50.2/49.8 split at 10M units is *significant*
  but not alarmed, because of the practical floor;
- the closed form is the Dirichlet-multinomial marginal over the null
  likelihood (against scipy and numerical integration), and it is a
  martingale under H0 (exact one-step check), which is what Ville needs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats

from kernels.srm import (
    DEFAULT_CONCENTRATION,
    log_bayes_factor,
    log_bayes_factor_batch,
    max_relative_deviation,
    srm_test,
)

# --------------------------------------------------------------------------- (a) validity


def _peeking_study(alloc: tuple[float, ...], alpha: float, seed: int,
                   experiments: int = 300, looks: int = 200, batch: int = 100
                   ) -> tuple[float, float, float]:
    """False-alarm rates under H0 over ``looks`` looks every ``batch`` units.

    Returns (anytime-valid e-process, chi-square peeked at every look, chi-square
    at the last look only). The floor is off: this measures the test itself.
    """
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(batch, alloc, size=(experiments, looks)).cumsum(axis=1)
    lbf = log_bayes_factor_batch(counts, np.asarray(alloc))
    e_rate = float((lbf.max(axis=1) >= math.log(1 / alpha)).mean())
    expected = counts.sum(-1, keepdims=True) * np.asarray(alloc)
    stat = ((counts - expected) ** 2 / expected).sum(-1)
    p = scipy.stats.chi2.sf(stat, len(alloc) - 1)
    peek_rate = float((p.min(axis=1) < alpha).mean())
    final_rate = float((p[:, -1] < alpha).mean())
    return e_rate, peek_rate, final_rate


@pytest.mark.parametrize("alloc", [(0.5, 0.5), (0.2, 0.3, 0.5)])
def test_false_alarm_rate_under_continuous_monitoring(alloc):
    # 300 experiments, a look after every 100 units up to 20k units, alpha 0.01.
    e_rate, peek_rate, final_rate = _peeking_study(alloc, alpha=0.01, seed=20240601)
    print(f"\nalloc={alloc}: anytime-valid {e_rate:.4f}, chi2 peeked {peek_rate:.4f}, "
          f"chi2 last look {final_rate:.4f}")
    assert e_rate <= 0.01
    # the naive test is fine at one look but peeking inflates it far beyond alpha
    assert peek_rate > 5 * 0.01
    assert peek_rate > 5 * max(e_rate, 1 / 300)


def test_srm_test_running_max_matches_batch():
    """srm_test fed look by look keeps the same running max as the batched study."""
    rng = np.random.default_rng(3)
    counts = rng.multinomial(100, (0.5, 0.5), size=50).cumsum(axis=0)
    state = 0.0
    seen = []
    for c in counts:
        res = srm_test(c.tolist(), None, state, alpha=0.01, floor=0.0)
        state = res.log_bf_max
        seen.append(res.log_bf)
    assert state == pytest.approx(max(0.0, max(seen)))
    batch = log_bayes_factor_batch(counts)
    np.testing.assert_allclose(batch, seen, rtol=1e-12, atol=1e-9)
    # p-value is min(1, 1 / max BF) and can only go down
    assert res.p_value == pytest.approx(min(1.0, math.exp(-state)))


@pytest.mark.slow
def test_false_alarm_rate_large():
    """10k experiments for a precise rate (not in the default suite)."""
    e_rate, peek_rate, _ = _peeking_study((0.5, 0.5), alpha=0.01, seed=1, experiments=10_000)
    assert e_rate <= 0.01
    assert peek_rate > 0.08


# --------------------------------------------------------------------------- (b) power and floor


def test_power_51_49_within_100k_units():
    # expected counts: crosses at alpha 0.001 well before 100k, and the floor is passed
    res = srm_test([51_000, 49_000], (0.5, 0.5))
    assert res.alarm and res.significant and res.practical
    # simulated: 200 experiments, a look every 1000 units, alarmed by 100k
    rng = np.random.default_rng(11)
    counts = rng.multinomial(1000, (0.51, 0.49), size=(200, 100)).cumsum(axis=1)
    lbf = np.maximum.accumulate(log_bayes_factor_batch(counts), axis=1)
    rel = np.abs(counts[..., 0] / counts.sum(-1) / 0.5 - 1.0)
    alarm = (lbf >= math.log(1000)) & (rel > 0.01)
    power = float(alarm[:, -1].mean())
    first = (alarm.argmax(axis=1) + 1) * 1000
    print(f"\n51/49: power at 100k units {power:.3f}, median units to alarm "
          f"{np.median(first[alarm.any(axis=1)]):.0f}")
    assert power >= 0.95
    # the running-max API agrees on one path
    state = 0.0
    for c in counts[0]:
        r = srm_test(c.tolist(), None, state)
        state = r.log_bf_max
    assert r.alarm == bool(alarm[0, -1])


def test_tiny_mismatch_at_10m_units_is_significant_but_not_alarmed():
    rng = np.random.default_rng(5)
    for _ in range(5):
        counts = rng.multinomial(10_000_000, (0.502, 0.498)).tolist()
        res = srm_test(counts)
        assert res.significant  # the statistics see it ...
        assert not res.practical and not res.alarm  # ... but 0.4% of an arm is not worth a page
        assert res.max_rel_deviation < 0.006
    # sequential looks every 100k units: never alarmed
    counts = rng.multinomial(100_000, (0.502, 0.498), size=100).cumsum(axis=0)
    state = 0.0
    for c in counts:
        r = srm_test(c.tolist(), None, state)
        state = r.log_bf_max
        assert not r.alarm or c.sum() < 1_000_000  # early noise may pass the floor
    assert not r.alarm and r.significant


def test_floor_is_relative_so_small_arms_are_protected():
    # a 5% arm that gets 4%: 1 pp absolute, 20% of the arm relative -> alarmed
    res = srm_test([96_000, 4_000], (0.95, 0.05))
    assert res.alarm and res.max_rel_deviation == pytest.approx(0.2)
    assert res.max_abs_deviation == pytest.approx(0.01)
    assert max_relative_deviation([0, 0]) == 0.0


def test_no_units_and_validation():
    res = srm_test([0, 0])
    assert res.log_bf == 0.0 and res.p_value == 1.0 and not res.alarm
    with pytest.raises(ValueError):
        log_bayes_factor([1, 2], (0.5, 0.5, 0.0))
    with pytest.raises(ValueError):
        log_bayes_factor([1, -2])
    with pytest.raises(ValueError):
        srm_test([1, 2], alpha=0.0)


# --------------------------------------------------------------------------- (c) closed form


@pytest.mark.parametrize("counts,alloc,a", [
    ([3, 7], (0.5, 0.5), 1.0),
    ([40, 60], (0.3, 0.7), 100.0),
    ([510, 490], (0.5, 0.5), DEFAULT_CONCENTRATION),
    ([5, 0, 12], (0.2, 0.3, 0.5), 2.5),
    ([1200, 3100, 5200], (0.1, 0.3, 0.6), 1000.0),
])
def test_closed_form_is_dirichlet_multinomial_marginal(counts, alloc, a):
    x = np.asarray(counts)
    theta = np.asarray(alloc)
    n = int(x.sum())
    # Dirichlet-multinomial pmf over the multinomial pmf: the coefficients cancel
    ref = (scipy.stats.dirichlet_multinomial.logpmf(x, a * theta, n)
           - scipy.stats.multinomial.logpmf(x, n, theta))
    assert log_bayes_factor(counts, alloc, a) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert float(log_bayes_factor_batch(x, theta, a)) == pytest.approx(ref, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("x1,x2,alloc,a", [(3, 7, 0.5, 1.0), (40, 25, 0.4, 10.0),
                                             (260, 240, 0.5, 1000.0)])
def test_closed_form_against_numerical_integration(x1, x2, alloc, a):
    """Two arms: integrate the Beta(a th, a (1-th)) mixture of Bernoulli likelihoods."""
    alpha1, alpha2 = a * alloc, a * (1 - alloc)
    log_norm = scipy.special.betaln(alpha1, alpha2)
    null = x1 * math.log(alloc) + x2 * math.log(1 - alloc)

    def integrand(p: float) -> float:  # mixture likelihood / null likelihood
        return math.exp((alpha1 - 1 + x1) * math.log(p) + (alpha2 - 1 + x2) * math.log1p(-p)
                        - log_norm - null)

    mode = (alpha1 + x1 - 1) / (alpha1 + alpha2 + x1 + x2 - 2)
    val, err = scipy.integrate.quad(integrand, 0.0, 1.0, points=[mode], limit=500,
                                    epsabs=0, epsrel=1e-11)
    assert log_bayes_factor([x1, x2], (alloc, 1 - alloc), a) == pytest.approx(
        math.log(val), rel=1e-7, abs=1e-7)


def test_martingale_under_null():
    """E[BF_{n+1} | counts] = BF_n under H0 (exact): Ville's inequality applies."""
    theta = (0.2, 0.3, 0.5)
    rng = np.random.default_rng(9)
    for _ in range(20):
        x = rng.integers(0, 50, size=3).tolist()
        now = log_bayes_factor(x, theta, 7.0)
        nxt = [log_bayes_factor([c + (i == j) for j, c in enumerate(x)], theta, 7.0)
               for i in range(3)]
        assert sum(t * math.exp(v - now) for t, v in zip(theta, nxt, strict=True)) == \
            pytest.approx(1.0, rel=1e-10)


def test_large_counts_are_finite_and_batched():
    x = np.array([[5_010_000, 4_990_000], [5_000_000, 5_000_000]])
    out = log_bayes_factor_batch(x)
    assert np.all(np.isfinite(out))
    assert out[1] < 0 < out[0]  # exact null split: evidence for H0 (BF < 1)
    assert out[0] == pytest.approx(log_bayes_factor(x[0].tolist()), rel=1e-12)
