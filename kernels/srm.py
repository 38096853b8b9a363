"""Anytime-valid sample-ratio-mismatch (SRM) test (Lindon & Malek 2022).

Why a sequential test
---------------------
An SRM check runs after every sampler tick, i.e. hundreds of times per
experiment. A fixed-n chi-square test peeked at that often rejects a true
allocation far more often than its nominal level (the tests measure it: about
10x at alpha = 0.01 over 200 looks). An alarm that is wrong that often is
ignored, so the check must control the false-alarm probability *over the whole
monitoring period*, whenever and however often anyone looks.

The e-process
-------------
Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data"
(NeurIPS 2022), test ``H0: each unit's variant ~ Categorical(theta0)`` (theta0 =
the configured allocation) against the mixture alternative
``theta ~ Dirichlet(a * theta0)``. After n units with counts x (sum n), the
Bayes factor of the unit *sequence* (the multinomial coefficient cancels) is
the Dirichlet-multinomial marginal over the null likelihood::

    BF_n = Gamma(a) / Gamma(a + n) * prod_i Gamma(a*theta0_i + x_i) / Gamma(a*theta0_i)
           / prod_i theta0_i ** x_i

computed here in closed form with log-gamma sums (``math.lgamma``; no scipy in
``kernels``). Under H0, ``BF_n`` is a non-negative martingale with ``BF_0 = 1``
(a likelihood ratio of a mixture against the truth), so Ville's inequality gives
``P(sup_n BF_n >= 1/alpha) <= alpha``: rejecting the first time the e-value
reaches ``1/alpha`` is valid under continuous monitoring, optional stopping and
continuation. ``BF_n`` depends on the sequence only through the counts, so
looking at aggregate counts at arbitrary times (every tick) looks at a
sub-sequence of the unit-level martingale and stays valid. The sequential
p-value is ``p_n = min(1, 1 / max_{t <= n} BF_t)``; it can only decrease, which
is why callers keep the running maximum of ``log BF`` (the *state*) across calls
and pass it back in.

Prior concentration ``a``
-------------------------
``a`` is the prior's pseudo-sample size: ``Var(theta_i) = theta0_i (1 -
theta0_i) / (a + 1)``, i.e. the prior spread of each share is the binomial sd of
a pilot of ``a + 1`` units. For a one-dimensional normal mixture with prior
variance tau^2 against per-unit variance sigma^2 the rejection boundary at n is
``z^2 = (1 + 1/(n r)) (log(1 + n r) + 2 log(1/alpha))`` with ``r = tau^2 /
sigma^2``; minimising it at the sample size n* where a deviation delta becomes
detectable gives ``n* r ~ 15-20 ~ z^2`` and so ``r ~ delta^2 / sigma^2``: the
best prior sd equals the deviation one wants to catch. For shares, ``r = 1/(a +
1)``, hence ``a + 1 ~ theta0 (1 - theta0) / delta^2``. The deviations worth
tuning for are the ones that are both actionable (above the practical floor,
0.5-1 percentage point at 50/50) and slow to detect (detection time grows as
1/delta^2; gross mismatches are caught in a few hundred units whatever ``a``
is). ``a = 1000`` (prior sd 1.6 pp at 50/50) is within about 5% of the best
possible ``a`` for deviations of 0.25-2 pp and still catches a 10 pp mismatch
within ~800 units. Expected-count detection times at alpha = 0.001, 50/50
(units until ``log BF >= log 1000`` at the mean counts):

=====  ========  =======  ======  ======  =====
a      0.5 pp    1 pp     2 pp    5 pp    10 pp
=====  ========  =======  ======  ======  =====
1      269k      63k      15k     2.2k    510
100    217k      51k      12k     1.8k    470
1000   192k      45k      11k     2.2k    820
10000  178k      47k      16k     4.6k    2.1k
=====  ========  =======  ======  ======  =====

(Lindon's reference implementation, ``savvi``, defaults to ``a = 100``, i.e.
tuned to ~5 pp mismatches; we can afford a tighter prior because the practical
floor below discards small deviations anyway, so power is only wanted just
above it.)

Practical floor
---------------
With millions of units the e-value eventually detects mismatches nobody needs
to act on (a 50.2/49.8 split). An alarm therefore also needs the observed
share of some variant to deviate from its allocation by more than ``floor``
*relative to the allocation*: ``max_i |x_i / n / theta0_i - 1| > floor``
(default 0.01, i.e. 1% of the arm; 0.5 percentage point at 50/50). Relative,
not absolute, because SRM's usual cause is units lost from one arm, and what
matters is the fraction of that arm lost: a 1% holdback arm that receives 0.5%
has lost half its units (relative 50%, absolute only 0.5 pp), while a 90% arm
at 90.5% is harmless (relative 0.6%). The floor only removes alarms, so the
false-alarm guarantee above still holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_CONCENTRATION",
    "DEFAULT_FLOOR",
    "SRMResult",
    "log_bayes_factor",
    "log_bayes_factor_batch",
    "max_relative_deviation",
    "srm_test",
]

DEFAULT_ALPHA = 0.001
DEFAULT_CONCENTRATION = 1000.0
DEFAULT_FLOOR = 0.01  # relative deviation of a variant's share from its allocation


def _normalise(allocation: Sequence[float] | None, k: int) -> list[float]:
    """The null shares as floats summing to 1 (equal when ``allocation`` is None)."""
    if allocation is None:
        return [1.0 / k] * k
    if len(allocation) != k:
        raise ValueError(f"allocation has {len(allocation)} entries for {k} counts")
    theta = [float(t) for t in allocation]
    if any(not (t > 0.0) or not math.isfinite(t) for t in theta):
        raise ValueError("allocation entries must be positive and finite")
    s = sum(theta)
    return [t / s for t in theta]


def log_bayes_factor(
    counts: Sequence[int],
    allocation: Sequence[float] | None = None,
    concentration: float = DEFAULT_CONCENTRATION,
) -> float:
    """log BF_n of Dirichlet(a * theta0)-multinomial against Multinomial(theta0).

    ``counts[i]`` units in variant i so far; ``allocation`` the null shares
    (equal if None). Closed form: lgamma sums, O(K). Returns 0.0 (BF = 1) for
    no units, as the martingale starts at 1.
    """
    if not (concentration > 0.0) or not math.isfinite(concentration):
        raise ValueError("concentration must be positive and finite")
    x = [int(c) for c in counts]
    if any(c < 0 for c in x):
        raise ValueError("counts must be non-negative")
    theta = _normalise(allocation, len(x))
    n = sum(x)
    if n == 0:
        return 0.0
    a = float(concentration)
    out = math.lgamma(a) - math.lgamma(a + n)
    for xi, ti in zip(x, theta, strict=True):
        if xi:
            at = a * ti
            out += math.lgamma(at + xi) - math.lgamma(at) - xi * math.log(ti)
    return out


_lgamma_ufunc = np.frompyfunc(math.lgamma, 1, 1)


def _lgamma(x: np.ndarray) -> np.ndarray:
    """Elementwise log-gamma on numpy arrays (numpy has none; scipy is not allowed here)."""
    return np.asarray(_lgamma_ufunc(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def log_bayes_factor_batch(
    counts: np.ndarray,
    allocation: np.ndarray | None = None,
    concentration: float = DEFAULT_CONCENTRATION,
) -> np.ndarray:
    """``log_bayes_factor`` over a batch: counts ``[..., K]`` -> ``[...]``.

    ``allocation`` broadcasts against ``counts`` (``[K]`` or ``[..., K]``,
    normalised along the last axis; equal shares if None). For many experiments
    per tick or for simulation studies; the arithmetic is the scalar version's.
    """
    x = np.asarray(counts, dtype=np.float64)
    if np.any(x < 0):
        raise ValueError("counts must be non-negative")
    k = x.shape[-1]
    theta = (np.full(k, 1.0 / k) if allocation is None
             else np.asarray(allocation, dtype=np.float64))
    if np.any(~(theta > 0)) or not np.all(np.isfinite(theta)):
        raise ValueError("allocation entries must be positive and finite")
    theta = theta / theta.sum(axis=-1, keepdims=True)
    theta = np.broadcast_to(theta, x.shape)
    a = float(concentration)
    n = x.sum(axis=-1)
    at = a * theta
    per = _lgamma(at + x) - _lgamma(at) - x * np.log(theta)
    return math.lgamma(a) - _lgamma(a + n) + per.sum(axis=-1)


def max_relative_deviation(
    counts: Sequence[int], allocation: Sequence[float] | None = None
) -> float:
    """``max_i |share_i / theta0_i - 1|`` (0.0 with no units): the practical size."""
    n = sum(int(c) for c in counts)
    if n == 0:
        return 0.0
    theta = _normalise(allocation, len(counts))
    return max(abs(int(c) / n / t - 1.0) for c, t in zip(counts, theta, strict=True))


@dataclass(frozen=True, slots=True)
class SRMResult:
    """One look at the counts. ``log_bf_max`` is the state to pass to the next look."""

    n: int
    log_bf: float  # log e-value now
    log_bf_max: float  # running max over all looks so far (state)
    p_value: float  # anytime-valid p-value min(1, 1 / max BF)
    observed: tuple[float, ...]  # observed shares
    expected: tuple[float, ...]  # allocation (normalised)
    max_rel_deviation: float  # max_i |observed_i / expected_i - 1|
    max_abs_deviation: float  # max_i |observed_i - expected_i|
    significant: bool  # log_bf_max >= log(1 / alpha)
    practical: bool  # max_rel_deviation > floor
    alarm: bool  # significant and practical


def srm_test(
    counts: Sequence[int],
    allocation: Sequence[float] | None = None,
    log_bf_max: float = 0.0,
    *,
    alpha: float = DEFAULT_ALPHA,
    floor: float = DEFAULT_FLOOR,
    concentration: float = DEFAULT_CONCENTRATION,
) -> SRMResult:
    """Sequential SRM check of the current per-variant ``counts``.

    ``log_bf_max`` is the running maximum returned by the previous look at
    the same experiment (0.0, i.e. BF_0 = 1, before the first). It must be
    reset by the caller when the allocation or the variant list changes: the
    martingale is defined for one null. ``floor`` is relative (see module
    docstring); ``floor=0`` gives the pure test.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    theta = _normalise(allocation, len(counts))
    lbf = log_bayes_factor(counts, theta, concentration)
    lmax = max(float(log_bf_max), lbf)
    n = sum(int(c) for c in counts)
    obs = tuple(int(c) / n for c in counts) if n else tuple(0.0 for _ in counts)
    rel = max_relative_deviation(counts, theta)
    absdev = max((abs(o - t) for o, t in zip(obs, theta, strict=True)), default=0.0) if n else 0.0
    significant = lmax >= math.log(1.0 / alpha)
    practical = n > 0 and rel > floor
    return SRMResult(
        n=n,
        log_bf=lbf,
        log_bf_max=lmax,
        p_value=min(1.0, math.exp(-lmax)),
        observed=obs,
        expected=tuple(theta),
        max_rel_deviation=rel,
        max_abs_deviation=absdev,
        significant=significant,
        practical=practical,
        alarm=significant and practical,
    )
