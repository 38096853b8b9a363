"""Convergence diagnostics for the published estimates (docs/architecture.md#the-model, #chains).

Every estimate record carries split R-hat, bulk ESS and tail ESS computed on the
sampler's window of recent draws. They must mean exactly what the literature
(Vehtari, Gelman, Simpson, Carpenter, Bürkner 2021, "Rank-normalization,
folding, and localization") and the reference implementation (ArviZ) mean, so
that a reader can compare our numbers with any other tool; the tests check this
module against ``arviz.rhat(method="rank")`` and ``arviz.ess(method="bulk" |
"tail")``, and every step below mirrors ArviZ's arithmetic, including its edge
cases.

The code is pure array code on ``xp`` (numpy or cupy, taken from the input),
float64, batched over leading dimensions: input ``[..., chains, draws]``,
output ``[...]``. A sampler holds thousands of problems, so there is no Python
loop over problems or chains; the only Python loops are over a handful of
polynomial coefficients and ``log2(draws)`` scan steps. No scipy: the rank ties,
normal quantile function and erfc are implemented here so that the GPU path
needs nothing beyond cupy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kernels.backend import array_module

Array = Any  # numpy.ndarray or cupy.ndarray

__all__ = [
    "array_module",
    "erfc",
    "ess_bulk",
    "ess_tail",
    "ndtri",
    "rank_diagnostics",
    "split_rhat",
]

# ArviZ's shape rules (``not_valid``): fewer than 4 draws is never valid; R-hat
# also needs two chains (ESS accepts one, because it splits chains anyway).
_MIN_DRAWS = 4
_MIN_CHAINS_RHAT = 2
# Blom's fractional offset for the rank -> normal-score transform (ArviZ's c=3/8).
_BLOM_C = 3.0 / 8.0
# Tail ESS is the min over the ESS of these two quantile indicators (ArviZ's default).
_TAIL_PROBS = (0.05, 0.95)
# ArviZ treats data whose range is below this as constant, and reports ess = size.
_RESOLUTION = float(np.finfo(float).resolution)


# --------------------------------------------------------------------------------------
# Special functions (no scipy): erfc and the inverse normal CDF.
# --------------------------------------------------------------------------------------

# W. J. Cody (1969), "Rational Chebyshev approximations for the error function",
# Math. Comp. 23, 631-637; coefficients from netlib specfun CALERF. Relative
# accuracy ~1e-16 on every interval, which is what the quantile refinement
# below needs in the far tail.
_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
          2.84423683343917062e03)
_ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
          2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
          2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
          1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
          3.43936767414372164e03, 1.23033935480374942e03)
_ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
          1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_ERF_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1,
          6.05183413124413191e-2, 2.33520497626869185e-3)
_ONE_OVER_SQRT_PI = 5.6418958354775628695e-1


def _exp_neg_sq(y: Array, xp: Any) -> Array:
    """exp(-y²) without the cancellation of forming y² directly.

    Cody's trick: split y = ysq + (y - ysq) with ysq = trunc(16 y)/16, so the
    big part of the exponent is exact and the rounding error of y² does not get
    amplified by exp (it would cost ~y² ulps, 1e-15 relative at y = 4).
    """
    ysq = xp.trunc(16.0 * y) / 16.0
    delta = (y - ysq) * (y + ysq)
    return xp.exp(-ysq * ysq) * xp.exp(-delta)


def erfc(x: Array) -> Array:
    """Complementary error function, elementwise, Cody's rational approximations.

    numpy has no erf/erfc, and the normal-quantile refinement needs erfc with
    full relative precision far into the tail (1 - erf would cancel), so this
    is the netlib CALERF algorithm, evaluated branch-free for arrays.
    """
    xp = array_module(x)
    x = xp.asarray(x, dtype=xp.float64)
    y = xp.abs(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # |x| <= 0.46875: 1 - erf(x) from a rational in x².
        ysq = xp.where(y > 1.11e-16, y * y, 0.0)
        num = _ERF_A[4] * ysq
        den = ysq
        for i in range(3):
            num = (num + _ERF_A[i]) * ysq
            den = (den + _ERF_B[i]) * ysq
        small = 1.0 - x * (num + _ERF_A[3]) / (den + _ERF_B[3])

        # 0.46875 < |y| <= 4: exp(-y²) R(y).
        num = _ERF_C[8] * y
        den = y
        for i in range(7):
            num = (num + _ERF_C[i]) * y
            den = (den + _ERF_D[i]) * y
        mid = _exp_neg_sq(y, xp) * (num + _ERF_C[7]) / (den + _ERF_D[7])

        # |y| > 4: asymptotic form exp(-y²)/y (1/sqrt(pi) + R(1/y²)/y²).
        inv = 1.0 / (y * y)
        num = _ERF_P[5] * inv
        den = inv
        for i in range(4):
            num = (num + _ERF_P[i]) * inv
            den = (den + _ERF_Q[i]) * inv
        big = inv * (num + _ERF_P[4]) / (den + _ERF_Q[4])
        big = _exp_neg_sq(y, xp) * ((_ONE_OVER_SQRT_PI - big) / y)
        big = xp.where(y < 26.543, big, 0.0)  # underflow beyond Cody's xbig

        upper = xp.where(y <= 4.0, mid, big)  # erfc(|x|) for |x| > 0.46875
        upper = xp.where(x < 0.0, 2.0 - upper, upper)
        return xp.where(y <= 0.46875, small, upper)


# P. J. Acklam's rational approximation of the normal quantile (relative error
# < 1.15e-9), used as the starting point of one Halley step.
_ACK_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
          1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_ACK_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
          6.680131188771972e01, -1.328068155288572e01)
_ACK_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
          -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_ACK_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
          3.754408661907416e00)
_ACK_P_LOW = 0.02425
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SQRT_2 = math.sqrt(2.0)


def _horner(coefs: tuple[float, ...], t: Array) -> Array:
    acc = coefs[0] * t + coefs[1]
    for c in coefs[2:]:
        acc = acc * t + c
    return acc


def ndtri(p: Array) -> Array:
    """Standard normal quantile Φ⁻¹(p), elementwise, for p in (0, 1).

    Acklam's approximation (1e-9) refined by one Halley step on Φ(x) - p, which
    triples the number of correct digits, so the result is limited only by the
    ~1e-16 accuracy of erfc: it agrees with ``scipy.special.ndtri`` to ~1e-15
    relative. The work is done on the lower half, q = min(p, 1 - p) (1 - p is
    exact for p >= 1/2), where Φ(x) = erfc(-x/√2)/2 has full relative
    precision; the upper half follows by symmetry.
    """
    xp = array_module(p)
    p = xp.asarray(p, dtype=xp.float64)
    q = xp.minimum(p, 1.0 - p)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Tail region, in t = sqrt(-2 log q).
        t = xp.sqrt(-2.0 * xp.log(xp.where(q < _ACK_P_LOW, q, _ACK_P_LOW)))
        x_tail = _horner(_ACK_C, t) / (_horner(_ACK_D, t) * t + 1.0)
        # Central region, in r = q - 1/2.
        r = q - 0.5
        s = r * r
        x_mid = _horner(_ACK_A, s) * r / (_horner(_ACK_B, s) * s + 1.0)
        x = xp.where(q < _ACK_P_LOW, x_tail, x_mid)
        # One Halley step: e = Φ(x) - q, u = e / φ(x).
        e = 0.5 * erfc(-x / _SQRT_2) - q
        u = e * _SQRT_2PI * xp.exp(0.5 * x * x)
        x = x - u / (1.0 + 0.5 * x * u)
    return xp.where(p > 0.5, -x, x)


# --------------------------------------------------------------------------------------
# Building blocks, all on flattened batches: [B, chains, draws] -> [B].
# --------------------------------------------------------------------------------------


def _as_batch(x: Array) -> tuple[Any, Array, tuple[int, ...]]:
    """(xp, x as float64 [B, chains, draws], the leading shape)."""
    xp = array_module(x)
    x = xp.asarray(x, dtype=xp.float64)
    if x.ndim < 2:
        raise ValueError(f"expected [..., chains, draws], got shape {x.shape}")
    lead = tuple(x.shape[:-2])
    return xp, x.reshape((-1,) + tuple(x.shape[-2:])), lead


def _split_chains(x: Array, xp: Any) -> Array:
    """Each chain's first and last halves as two chains (odd draws drop the middle one).

    Splitting makes R-hat and ESS see within-chain drift (a trend shows up as
    two halves with different means), as in ArviZ's ``_split_chains``.
    """
    n = x.shape[-1]
    half = n // 2
    return xp.concatenate([x[..., :half], x[..., n - half:]], axis=-2)


def _sorted_and_average_ranks(flat: Array, xp: Any) -> tuple[Array, Array]:
    """Per row of ``flat`` [B, M]: (sorted values, 1-based ranks with ties averaged).

    Equivalent to ``scipy.stats.rankdata(row, method="average")``. Ties matter:
    rounded or discrete draws (and indicator-like quantities) are common, and
    ArviZ gives tied values the mean of their positions. Batched without a
    scan: group ids come from a cumsum over "value changed", and each group's
    mean position from one weighted bincount over (row, group).
    """
    b, m = flat.shape
    order = xp.argsort(flat, axis=-1)
    srt = xp.take_along_axis(flat, order, axis=-1)
    starts = xp.ones((b, m), dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    group = xp.cumsum(starts, axis=-1) - 1  # 0-based group within its row
    gid = (group + xp.arange(b)[:, None] * m).ravel()
    pos = xp.broadcast_to(xp.arange(1, m + 1, dtype=xp.float64), (b, m)).ravel()
    pos_sum = xp.bincount(gid, weights=pos, minlength=b * m)
    count = xp.bincount(gid, minlength=b * m)
    # Sums and counts are exact integers in float64, so the mean is exact too.
    avg_sorted = (pos_sum[gid] / count[gid]).reshape(b, m)
    ranks = xp.empty((b, m), dtype=xp.float64)
    ranks[xp.arange(b)[:, None], order] = avg_sorted
    return srt, ranks


def _z_scale(y: Array, xp: Any) -> tuple[Array, Array]:
    """Rank-normalise ``y`` [B, C, N] over all its chains: (z-scores, sorted values).

    z = Φ⁻¹((rank - 3/8) / (size - 3/4 + 1)), Blom's normal scores, exactly
    ArviZ's ``_z_scale`` + ``_backtransform_ranks``. Rank-normalising makes
    R-hat and ESS well defined for heavy tails and invariant to monotone
    transforms of the parameter.
    """
    b, c, n = y.shape
    size = c * n
    srt, ranks = _sorted_and_average_ranks(y.reshape(b, size), xp)
    # Average ranks are multiples of 1/2 in [1, size], so the normal scores come
    # from a table of 2·size - 1 values shared by the whole batch: ndtri is the
    # costly step, and a table lookup gives bit-identical results.
    grid = xp.arange(2 * size - 1, dtype=xp.float64) / 2.0 + 1.0
    table = ndtri((grid - _BLOM_C) / (size - 2 * _BLOM_C + 1))
    z = table[(2.0 * ranks - 2.0).astype(xp.int64)]
    return z.reshape(b, c, n), srt


def _median_from_sorted(srt: Array) -> Array:
    """Row medians of sorted rows (np.median's (a + b)/2 for even length)."""
    m = srt.shape[-1]
    if m % 2:
        return srt[:, m // 2]
    return (srt[:, m // 2 - 1] + srt[:, m // 2]) / 2.0


def _rhat(y: Array, xp: Any) -> Array:
    """Classic (Gelman-Rubin, BDA3) potential scale reduction of [B, C, N] -> [B].

    sqrt((B/W + N - 1)/N) with B = N·var(chain means), W = mean chain variance,
    both with ddof=1, as ArviZ's ``_rhat``.
    """
    n = y.shape[-1]
    chain_mean = y.mean(axis=-1)
    chain_var = y.var(axis=-1, ddof=1)
    between = n * chain_mean.var(axis=-1, ddof=1)
    within = chain_var.mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.sqrt((between / within + n - 1) / n)


def _next_fast_len(n: int) -> int:
    """Smallest 5-smooth integer >= n (scipy.fftpack.next_fast_len), as ArviZ pads."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


def _cummin(a: Array, xp: Any) -> Array:
    """Running minimum along the last axis (Hillis-Steele scan, log2 steps).

    ``xp.minimum.accumulate`` is not available on every cupy version; min is
    exact, so the scan gives the same bits.
    """
    k = a.shape[-1]
    shift = 1
    while shift < k:
        shifted = xp.concatenate([a[..., :shift], a[..., :-shift]], axis=-1)
        a = xp.minimum(a, shifted)
        shift *= 2
    return a


def _ess(y: Array, xp: Any) -> Array:
    """Multi-chain ESS of [B, C, N] -> [B], ArviZ's ``_ess`` (Geyer, as in Stan).

    Autocovariances by FFT; the combined autocorrelation
    rho_t = 1 - (W - mean_c acov_t) / var_plus; Geyer's initial positive
    sequence truncates at the first pair (rho_2k + rho_2k+1) that is not
    positive, and the initial monotone sequence replaces the pair sums by their
    running minimum. ArviZ's loops are reproduced in closed form:
      * pair sums P_k = rho_2k + rho_2k+1, k = 0..kcap, kcap = (N - 3)//2 (the
        loop's ``t < N - 3`` bound);
      * L = number of pairs k < kcap before the first P_k <= 0 (the pairs the
        positive-sequence loop walks past);
      * tau = -1 + 2 Σ_{k<L} cummin(P)_k + last, where last = rho_2L when that
        pair was kept (P_L >= 0) or rho_2L > 0 (ArviZ's "improve estimation"),
        else 0;
      * ess = size / max(tau, 1/log10(size)).
    Constant input (range below float resolution) gives ess = size, like ArviZ.
    """
    b, c, n = y.shape
    size = c * n
    with np.errstate(divide="ignore", invalid="ignore"):
        centred = y - y.mean(axis=-1, keepdims=True)
        m = _next_fast_len(2 * n)
        f = xp.fft.rfft(centred, n=m, axis=-1)
        acov = xp.fft.irfft(f.real * f.real + f.imag * f.imag, n=m, axis=-1)[..., :n] / n
        chain_mean = y.mean(axis=-1)
        mean_acov = acov.mean(axis=-2)  # [B, N]
        mean_var = mean_acov[:, 0] * n / (n - 1.0)
        var_plus = mean_var * (n - 1.0) / n
        if c > 1:
            var_plus = var_plus + chain_mean.var(axis=-1, ddof=1)
        rho = 1.0 - (mean_var[:, None] - mean_acov) / var_plus[:, None]
        rho[:, 0] = 1.0

        kcap = max((n - 3) // 2, 0)
        pairs = rho[:, 0 : 2 * kcap + 2 : 2] + rho[:, 1 : 2 * kcap + 2 : 2]  # [B, kcap+1]
        walked = pairs[:, :kcap]
        alive = xp.cumsum(~(walked > 0.0), axis=-1) == 0
        n_pairs = alive.sum(axis=-1)  # L
        kept = xp.where(xp.arange(kcap)[None, :] < n_pairs[:, None], _cummin(walked, xp), 0.0)
        last_even = xp.take_along_axis(rho, (2 * n_pairs)[:, None], axis=-1)[:, 0]
        last_pair = xp.take_along_axis(pairs, n_pairs[:, None], axis=-1)[:, 0]
        last = xp.where((last_pair >= 0.0) | (last_even > 0.0), last_even, 0.0)
        tau = -1.0 + 2.0 * kept.sum(axis=-1) + last
        tau = xp.maximum(tau, 1.0 / math.log10(size))
        ess = size / tau
        ess = xp.where(xp.isnan(rho).any(axis=-1), xp.nan, ess)

        flat = y.reshape(b, size)
        constant = (flat.max(axis=-1) - flat.min(axis=-1)) < _RESOLUTION
        return xp.where(constant, float(size), ess)


def _invalid(x: Array, xp: Any, min_chains: int) -> Array:
    """[B] mask of problems ArviZ refuses (returns nan): NaN draws or too short."""
    bad = xp.isnan(x).any(axis=(-2, -1))
    if x.shape[-1] < _MIN_DRAWS or x.shape[-2] < min_chains:
        bad = xp.ones_like(bad)
    return bad


def _type7_quantile(srt: Array, prob: float) -> Array:
    """Row quantile of sorted rows, R type 7, with scipy ``mquantiles``' arithmetic.

    ArviZ's tail ESS thresholds draws at this value; reproducing the exact
    floating-point expression keeps draws equal to the threshold on the same
    side of it.
    """
    size = srt.shape[-1]
    aleph = size * prob + (1.0 + prob * (1.0 - 1.0 - 1.0))
    k = int(math.floor(min(max(aleph, 1.0), size - 1.0)))
    gamma = min(max(aleph - k, 0.0), 1.0)
    return (1.0 - gamma) * srt[:, k - 1] + gamma * srt[:, k]


def _rhat_from(split: Array, z_bulk: Array, srt_split: Array, xp: Any) -> Array:
    med = _median_from_sorted(srt_split)
    folded = xp.abs(split - med[:, None, None])
    z_tail, _ = _z_scale(folded, xp)
    return xp.maximum(_rhat(z_bulk, xp), _rhat(z_tail, xp))


def _ess_tail_from(x: Array, srt_full: Array, xp: Any) -> Array:
    out = None
    for prob in _TAIL_PROBS:
        q = _type7_quantile(srt_full, prob)
        indicator = (x <= q[:, None, None]).astype(xp.float64)
        e = _ess(_split_chains(indicator, xp), xp)
        out = e if out is None else xp.minimum(out, e)
    return out


def _finish(values: Array, bad: Array, lead: tuple[int, ...], xp: Any) -> Array:
    return xp.where(bad, xp.nan, values).reshape(lead)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def split_rhat(x: Array) -> Array:
    """Rank-normalised split R-hat of ``x`` [..., chains, draws] -> [...].

    max(R-hat of the rank-normalised split chains, R-hat of the rank-normalised
    folded split chains |x - median|): the bulk version catches chains at
    different locations, the folded one chains with different scales (Vehtari
    et al. 2021). Equals ``arviz.rhat(x, method="rank")``. NaN when a problem
    has NaN draws, fewer than 2 chains or fewer than 4 draws; NaN for constant
    draws (0/0, as ArviZ).
    """
    xp, xb, lead = _as_batch(x)
    bad = _invalid(xb, xp, _MIN_CHAINS_RHAT)
    if xb.shape[-1] < _MIN_DRAWS or xb.shape[-2] < _MIN_CHAINS_RHAT:
        return xp.full(lead, xp.nan)
    split = _split_chains(xb, xp)
    z_bulk, srt = _z_scale(split, xp)
    return _finish(_rhat_from(split, z_bulk, srt, xp), bad, lead, xp)


def ess_bulk(x: Array) -> Array:
    """Bulk effective sample size of ``x`` [..., chains, draws] -> [...].

    ESS of the rank-normalised split chains: how many independent draws the
    centre of the posterior is worth, robust to heavy tails. Equals
    ``arviz.ess(x, method="bulk")``; NaN for NaN draws or fewer than 4 draws.
    """
    xp, xb, lead = _as_batch(x)
    if xb.shape[-1] < _MIN_DRAWS:
        return xp.full(lead, xp.nan)
    bad = _invalid(xb, xp, 1)
    z_bulk, _ = _z_scale(_split_chains(xb, xp), xp)
    return _finish(_ess(z_bulk, xp), bad, lead, xp)


def ess_tail(x: Array) -> Array:
    """Tail effective sample size of ``x`` [..., chains, draws] -> [...].

    min of the ESS of the indicators x <= q_5% and x <= q_95% (split chains):
    how well the 95% interval ends are estimated, which is what the published
    ``lo``/``hi`` depend on. Equals ``arviz.ess(x, method="tail")``.
    """
    xp, xb, lead = _as_batch(x)
    if xb.shape[-1] < _MIN_DRAWS:
        return xp.full(lead, xp.nan)
    bad = _invalid(xb, xp, 1)
    srt_full = xp.sort(xb.reshape(xb.shape[0], -1), axis=-1)
    return _finish(_ess_tail_from(xb, srt_full, xp), bad, lead, xp)


def rank_diagnostics(x: Array) -> tuple[Array, Array, Array]:
    """(split_rhat, ess_bulk, ess_tail) of ``x`` [..., chains, draws], sharing work.

    The sampler publishes all three each tick; computing them together sorts
    the draws once for the bulk ranks, the median and (for an even number of
    draws) the tail quantiles. Same values as the three separate functions.
    """
    xp, xb, lead = _as_batch(x)
    chains, draws = xb.shape[-2:]
    if draws < _MIN_DRAWS:
        nan = xp.full(lead, xp.nan)
        return nan, nan.copy(), nan.copy()
    split = _split_chains(xb, xp)
    z_bulk, srt = _z_scale(split, xp)
    bad = _invalid(xb, xp, 1)
    if chains >= _MIN_CHAINS_RHAT:
        rhat = _finish(_rhat_from(split, z_bulk, srt, xp), bad, lead, xp)
    else:
        rhat = xp.full(lead, xp.nan)
    bulk = _finish(_ess(z_bulk, xp), bad, lead, xp)
    # With an even number of draws the split chains hold every draw, so their
    # sorted values are the full sample's.
    srt_full = srt if draws % 2 == 0 else xp.sort(xb.reshape(xb.shape[0], -1), axis=-1)
    tail = _finish(_ess_tail_from(xb, srt_full, xp), bad, lead, xp)
    return rhat, bulk, tail
