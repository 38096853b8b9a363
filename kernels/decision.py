"""Always-valid decisions on an asymptotically Gaussian estimate (issue 27).

Pure array code (NumPy; every function broadcasts over leading axes, so a
batch of problems × arms is one call). docs/method.md §8 has the argument.

An estimate with mean m and sd s is read as information I = 1/s² and score
S = I·m, the sufficient statistics of a Gaussian experiment on the effect θ.
Mixing the likelihood ratio exp(θS − θ²I/2) over θ ~ N(0, 1/ρ) gives the
normal-mixture e-value against θ = 0 (Robbins 1970; Howard et al. 2021,
two-sided):

    E = sqrt(ρ / (I + ρ)) · exp(S² / (2 (I + ρ))),

and inverting it at every θ₀ the confidence sequence

    θ ∈ m ± sqrt((I + ρ) · log((I + ρ) / (ρ α²))) / I,

which excludes 0 exactly when E ≥ 1/α. Where S is a Gaussian random walk in
I, E is a nonnegative martingale under θ = 0 and Ville's inequality makes
P(sup_t E_t ≥ 1/α) ≤ α: looking at every step costs nothing. The adjusted
effect is not exactly such a walk (the arrival model re-weights strata), so
the guarantee is measured (tests/statistical/test_sequential.py).
"""

from __future__ import annotations

import numpy as np

from kernels import arrival


def log_evalue(m, s, rho):
    """log E of the normal mixture against θ = 0 for estimates (m, s), mixing
    precision ρ (arrays broadcast). s must be > 0."""
    m, s, rho = np.asarray(m, float), np.asarray(s, float), np.asarray(rho, float)
    info = 1.0 / (s * s)
    score = info * m
    return 0.5 * np.log(rho / (info + rho)) + score * score / (2.0 * (info + rho))


def half_width(s, rho, alpha):
    """Half-width of the normal-mixture confidence sequence at sd s, level α."""
    s, rho, alpha = np.asarray(s, float), np.asarray(rho, float), np.asarray(alpha, float)
    info = 1.0 / (s * s)
    return np.sqrt((info + rho) * np.log((info + rho) / (rho * alpha * alpha))) / info


def mixing_precision(scale):
    """ρ = 1/scale²: the mixture is N(0, scale²) over the effect, so the
    sequence is tightest for effects of about that size (docs/method.md §8)."""
    scale = np.asarray(scale, float)
    return 1.0 / (scale * scale)


def pooled_sd(n, sy, syy):
    """The pooled sd of the outcome over cells [..., K1, S] (the scale of the
    model's prior on θ); 1 where undefined (as ``kernels.data._hyper``)."""
    n, sy, syy = (np.asarray(x, float) for x in (n, sy, syy))
    N = n.sum(axis=(-2, -1))
    m = np.where(N > 0, sy.sum(axis=(-2, -1)) / np.maximum(N, 1), 0.0)
    var = np.where(N > 1, syy.sum(axis=(-2, -1)) / np.maximum(N, 1) - m * m, 1.0)
    return np.sqrt(np.where(var > 1e-12 * (1 + m * m), var, 1.0))


def look(lo, hi, log_e_max, m, s, rho, alpha):
    """One look: the running intersection of the confidence sequence and the
    running max of the e-value, updated with the estimate (m, s).

    Args (arrays broadcast): the running ``lo``, ``hi`` (−inf/+inf before the
    first look), ``log_e_max`` (−inf before), the look's mean ``m`` and sd
    ``s`` (a look with s not finite or ≤ 0 changes nothing), ρ, α.
    Returns: (lo, hi, log_e_max, log_e) after the look; log_e is the look's own
    (NaN where it was skipped).
    """
    m, s = np.asarray(m, float), np.asarray(s, float)
    ok = np.isfinite(m) & np.isfinite(s) & (s > 0)
    s_ok = np.where(ok, s, 1.0)
    h = half_width(s_ok, rho, alpha)
    le = np.where(ok, log_evalue(np.where(ok, m, 0.0), s_ok, rho), np.nan)
    lo = np.where(ok, np.maximum(lo, m - h), lo)
    hi = np.where(ok, np.minimum(hi, m + h), hi)
    log_e_max = np.where(ok, np.maximum(log_e_max, le), log_e_max)
    return lo, hi, log_e_max, le


def excludes_zero(lo, hi):
    """The running interval excludes 0 (an empty intersection, lo > hi, also
    does: some look's sequence excluded 0 on its way there)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return (lo > 0) | (hi < 0) | (lo > hi)


def ebh(log_e, alpha):
    """e-BH (Wang & Ramdas 2022) over the last axis: which hypotheses are
    rejected at level α given log e-values (NaN = no evidence, e = 1 is not
    assumed: a NaN is never rejected but counts in m). Valid under any
    dependence; under the global null P(any rejection) ≤ α at every look, and
    — since any rejection means the mean e-value reached 1/α — ever, by
    Ville's inequality on the mean of the e-processes."""
    log_e = np.asarray(log_e, float)
    mcount = log_e.shape[-1]
    x = np.where(np.isfinite(log_e), log_e, -np.inf)
    order = np.argsort(-x, axis=-1)
    srt = np.take_along_axis(x, order, axis=-1)
    k = np.arange(1, mcount + 1)
    ok = srt >= np.log(mcount / (alpha * k))
    khat = np.where(ok.any(-1), mcount - np.argmax(ok[..., ::-1], axis=-1), 0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(k - 1, order.shape).copy(), axis=-1)
    return rank < khat[..., None]


def p_best(effects, direction=1.0, valid=None):
    """P(each variant is best) from draws of the treatments' effects against
    control. ``effects`` [..., K, N] (N draws); ``direction`` +1 when higher is
    better, −1 when lower is (broadcast over the leading axes); ``valid``
    [..., K] false for padded arms (never best). Returns [..., K + 1]:
    control first (effect 0 in every draw), then the arms."""
    eff = np.asarray(effects, float)
    d = np.asarray(direction, float)[..., None, None]
    full = np.concatenate([np.zeros_like(eff[..., :1, :]), eff], axis=-2) * d
    if valid is not None:
        ok = np.concatenate([np.ones_like(np.asarray(valid, bool)[..., :1]),
                             np.asarray(valid, bool)], axis=-1)
        full = np.where(ok[..., None], full, -np.inf)
    best = np.argmax(full, axis=-2)  # [..., N]
    K1 = full.shape[-2]
    return np.stack([(best == k).mean(-1) for k in range(K1)], axis=-1)


# ------------------------------------------------------------------ forecast


def sampling_variance(n, var, share):
    """V = Σ_s π_s² Σ_arm σ²_arm,s / n_arm,s over the pair (control, arm):
    ``n``, ``var`` [..., 2, S], ``share`` [..., S]. Cells with no unit
    contribute σ²/1 (they will be filled; keeps V finite)."""
    n, var, share = (np.asarray(x, float) for x in (n, var, share))
    return (share**2 * (var / np.maximum(n, 1.0)).sum(-2)).sum(-1)


def forecast_sd(s_now, n_now, n_future, var, share):
    """The adjusted effect's sd at future cell sizes ``n_future`` [..., J, 2, S]
    from the current sd ``s_now`` [...] and sizes ``n_now`` [..., 2, S]: the
    current sd scaled by the ratio of the stratified sampling variances. This
    keeps the part of the variance the shares add (the population not seen
    yet) in proportion; it shrinks as the arrivals it stands for are seen."""
    v0 = sampling_variance(n_now, var, share)[..., None]
    vj = sampling_variance(n_future, var[..., None, :, :], share[..., None, :])
    return np.asarray(s_now, float)[..., None] * np.sqrt(vj / np.maximum(v0, 1e-300))


def p_ready(m_now, s_now, s_future, rho, alpha, theta=None, paths: int = 4000,
            seed: int = 0, already=False):
    """P(the confidence sequence excludes 0 at some look j) for the looks'
    sds ``s_future`` [J] (decreasing), given the estimate (m_now, s_now) now.

    The score is a Gaussian random walk in the information: S_j = S_now +
    θ (I_j − I_now) + W(I_j − I_now). θ = ``theta`` when given (the minimal
    effect of interest, signed), else drawn per path from the posterior
    N(m_now, s_now²) (predictive probability). Returns [J] cumulative
    probabilities (1 when ``already`` ready)."""
    s_future = np.asarray(s_future, float)
    J = len(s_future)
    if already:
        return np.ones(J)
    rng = np.random.default_rng(seed)
    i_now = 1.0 / s_now**2
    i_f = np.maximum(1.0 / s_future**2, i_now)
    th = (np.full(paths, float(theta)) if theta is not None
          else m_now + s_now * rng.standard_normal(paths))
    dI = np.diff(np.concatenate([[i_now], i_f]))
    steps = th[:, None] * dI[None, :] + np.sqrt(dI)[None, :] * rng.standard_normal((paths, J))
    score = i_now * m_now + np.cumsum(steps, axis=1)
    bound = np.sqrt((i_f + rho) * np.log((i_f + rho) / (rho * alpha * alpha)))
    hit = np.abs(score) >= bound[None, :]
    return np.maximum.accumulate(hit, axis=1).mean(0)


def time_to_width(s_future, rho, alpha, width):
    """Index of the first look whose confidence-sequence half-width is ≤
    ``width`` (None if none)."""
    hw = half_width(np.asarray(s_future, float), rho, alpha)
    idx = np.flatnonzero(hw <= width)
    return int(idx[0]) if idx.size else None


def projected_matured(n_pair, arrivals, D: int, logit_p0, p_sd, lag_buckets: float,
                      J: int, stop_bucket: int | None = None):
    """Expected matured units of the pair (control, arm) per stratum at the
    ends of the next ``J`` buckets: [J, 2, S].

    From the arrival model: p_s at its posterior mode given the completed
    buckets (``kernels.arrival.find_mode``), the stratum's expected size
    N_s = n_s / (1 − (1 − p_s)^D), so arrivals by bucket D + j are
    n_s + (N_s − n_s)(1 − (1 − p_s)^j) (none after ``stop_bucket``, an
    end_at). A unit matures ``lag_buckets`` (window + lateness) after it
    arrives; the pair gets the share of each stratum's arrivals it has now
    (split between its arms likewise). Never below today's counts."""
    n_pair = np.asarray(n_pair, float)  # [2, S]
    a = np.asarray(arrivals, float)  # [S, D] arrivals per completed bucket
    S = n_pair.shape[-1]
    n = a.sum(-1) if D > 0 else np.zeros(S)
    T = (a * np.arange(a.shape[-1])).sum(-1) if D > 0 else np.zeros(S)
    Dv = np.full(S, float(D))
    x, _ = arrival.find_mode(n, T, Dv, np.asarray(logit_p0, float), np.full(S, float(p_sd)))
    p = 1.0 / (1.0 + np.exp(-x))
    q = -np.expm1(max(D, 1) * np.log1p(-p))
    remaining = np.where(n > 0, n / np.maximum(q, 1e-12) - n, 0.0)
    cum_seen = np.concatenate([np.zeros((S, 1)), np.cumsum(a, -1)], -1) if D > 0 \
        else np.zeros((S, 1))

    def arrived_by(t: float) -> np.ndarray:
        """Expected arrivals in entry buckets < t (t may be fractional)."""
        if t <= D:
            i = int(np.clip(np.floor(t), 0, D))
            frac = t - i if i < D else 0.0
            nxt = cum_seen[:, min(i + 1, D)]
            return cum_seen[:, i] + frac * (nxt - cum_seen[:, i])
        ahead = t - D if stop_bucket is None else min(t, stop_bucket) - D
        return n + remaining * -np.expm1(max(ahead, 0.0) * np.log1p(-p))

    total_now = arrived_by(D - lag_buckets) if D - lag_buckets > 0 else np.zeros(S)
    pair_now = n_pair.sum(0)
    frac_pair = np.where(total_now > 0, np.minimum(pair_now / np.maximum(total_now, 1e-12), 1.0),
                         0.5)
    split = np.where(pair_now > 0, n_pair / np.maximum(pair_now, 1e-12), 0.5)  # [2, S]
    out = np.empty((J, 2, S))
    for j in range(1, J + 1):
        grow = frac_pair * arrived_by(D + j - lag_buckets)
        out[j - 1] = np.maximum(n_pair, split * grow[None, :])
    return out


def forecast(m_now: float, s_now: float, n_pair, var, share, arrivals, D: int, logit_p0,
             p_sd: float, lag_buckets: float, J: int, rho: float, alpha: float,
             theta: float | None, looks_per_bucket: int = 24, stop_bucket: int | None = None,
             already: bool = False, seed: int = 0, paths: int = 4000) -> dict:
    """The decision's forecast for one (metric, arm): the adjusted sd at the
    end of each of the next ``J`` buckets (``projected_matured`` →
    ``forecast_sd``), and P(ready by then) (``p_ready``, with
    ``looks_per_bucket`` looks per bucket, the sd interpolated in
    information between bucket ends). Returns ``{"sd": [J], "p_ready": [J]}``."""
    n_pair = np.asarray(n_pair, float)
    nf = projected_matured(n_pair, arrivals, D, logit_p0, p_sd, lag_buckets, J, stop_bucket)
    sd = forecast_sd(s_now, n_pair, nf, np.asarray(var, float), np.asarray(share, float))
    sd = np.minimum.accumulate(np.minimum(sd, s_now))
    L = max(int(looks_per_bucket), 1)
    info = np.concatenate([[1.0 / s_now**2], 1.0 / sd**2])
    fine = np.concatenate([info[j] + (info[j + 1] - info[j]) * np.arange(1, L + 1) / L
                           for j in range(J)])
    pr = p_ready(m_now, s_now, 1.0 / np.sqrt(fine), rho, alpha, theta=theta, seed=seed,
                 already=already, paths=paths)
    return {"sd": sd, "p_ready": pr[L - 1::L]}
