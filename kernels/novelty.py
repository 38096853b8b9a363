"""The novelty contrast: first-bin lift minus last-bin lift, within fine strata.

Pure array code over the exposure-age cells (issue 19,
``streams.state.semantics.ExperimentSnapshot.age_cells``). A unit's later days are
mostly heavy users' activity, so a lift by days since exposure pooled over
units falls even when no unit's response changes with time. Inside a fine
stratum (one exact pre_activity value) the units are alike, so there the
lift of the first bin minus the lift of the last is the novelty itself:

    δ_f = ȳ_T,0 / ȳ_C,0 − ȳ_T,L / ȳ_C,L        (bin 0 first, L last)

(each ratio with its first-order bias removed, ×(1 − V(ȳ_C)/ȳ_C²)) with its
variance by the delta method from the cells' sums (the two bins of
one arm are correlated through the unit: Σ y_0·y_L gives their covariance;
the arms are independent). Two combinations over fine strata:

* ``precision``: δ̂ = Σ w_f δ_f / Σ w_f with w_f = 1 / Var δ_f — the test
  (``p_positive`` = Φ(δ̂ / sd), a flat-prior normal posterior). Light strata
  have almost no activity after the first day, so their δ_f are mostly
  noise: weighting by information keeps them from drowning the signal.
* ``population``: Σ π_f δ_f with π_f the population shares (the size to
  report beside it): π_f = π_s · n_f / n_s inside each activity stratum s.

A fine stratum takes part only when both arms have ``min_n`` matured units
and the control mean of both bins is positive and known to ``max_rel_se``
(the delta method needs a denominator well away from 0); the shares of the
others are left out and the rest renormalised (``strata_used`` says how many).
"""

from __future__ import annotations

import math

import numpy as np

#: fewest matured units per arm in a fine stratum for it to take part
MIN_N = 30
#: largest relative standard error of a control bin mean for it to take part
MAX_REL_SE = 0.25
Z95 = 1.959963984540054


def per_stratum(n, sy, syy, s0L, min_n: int = MIN_N, max_rel_se: float = MAX_REL_SE):
    """δ_f, Var δ_f and usability per treatment and fine stratum.

    ``n`` [..., K1, F], ``sy``/``syy`` [..., K1, F, B], ``s0L`` [..., K1, F]
    (arm 0 = control). Returns (delta, var, ok), each [..., K, F] for the
    K = K1 − 1 treatments; ``delta``/``var`` are 0 where ``ok`` is false.
    """
    n = np.asarray(n, float)
    sy = np.asarray(sy, float)
    syy = np.asarray(syy, float)
    s0L = np.asarray(s0L, float)
    nn = np.maximum(n, 2.0)
    m0 = sy[..., 0] / nn  # [..., K1, F] bin-0 means
    mL = sy[..., -1] / nn
    corr = nn / (nn - 1.0)
    # variances and covariance of the arm's bin means (sample moments / n)
    v0 = np.maximum(syy[..., 0] / nn - m0 * m0, 0.0) * corr / nn
    vL = np.maximum(syy[..., -1] / nn - mL * mL, 0.0) * corr / nn
    c0L = (s0L / nn - m0 * mL) * corr / nn
    c = (slice(None),) * (n.ndim - 2)
    ctl = c + (slice(0, 1),)
    trt = c + (slice(1, None),)
    a0, aL, b0, bL = m0[ctl], mL[ctl], m0[trt], mL[trt]
    with np.errstate(divide="ignore", invalid="ignore"):
        # each ratio with its first-order bias removed: E[b/a] ≈ (b/a)(1 + V_a/a²)
        # for independent arms; it matters in light strata (V_a/a² up to MAX_REL_SE²)
        delta = b0 / a0 * (1.0 - v0[ctl] / a0**2) - bL / aL * (1.0 - vL[ctl] / aL**2)
        var = (v0[trt] / a0**2 + vL[trt] / aL**2 - 2.0 * c0L[trt] / (a0 * aL)
               + b0**2 * v0[ctl] / a0**4 + bL**2 * vL[ctl] / aL**4
               - 2.0 * b0 * bL * c0L[ctl] / (a0**2 * aL**2))
        # the gate on both arms pooled, so that whether a stratum takes part
        # does not depend on which arm happened to be high (that biases δ)
        n2 = n[ctl] + n[trt]
        p0 = (sy[ctl][..., 0] + sy[trt][..., 0]) / n2
        pL = (sy[ctl][..., -1] + sy[trt][..., -1]) / n2
        q0 = np.maximum((syy[ctl][..., 0] + syy[trt][..., 0]) / n2 - p0 * p0, 0.0) / n2
        qL = np.maximum((syy[ctl][..., -1] + syy[trt][..., -1]) / n2 - pL * pL, 0.0) / n2
        # the pooled mean's relative se, scaled to one arm's (half the units)
        ok = ((n[ctl] >= min_n) & (n[trt] >= min_n) & (a0 > 0) & (aL > 0)
              & (np.sqrt(2.0 * q0) < max_rel_se * p0) & (np.sqrt(2.0 * qL) < max_rel_se * pL)
              & np.isfinite(delta) & np.isfinite(var) & (var > 0))
    return np.where(ok, delta, 0.0), np.where(ok, var, 0.0), ok


def combine(delta, var, ok, weights=None) -> dict:
    """Combine per-stratum contrasts over the last axis: precision weights
    (``weights`` None) or the given population shares, renormalised over the
    usable strata. Arrays of [...]: mean, sd, lo, hi, p_positive, strata_used
    (NaN where no stratum is usable)."""
    okf = ok.astype(float)
    if weights is None:
        w = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
        tot = w.sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (w * delta).sum(-1) / tot
            sd = 1.0 / np.sqrt(tot)
    else:
        w = np.asarray(weights, float) * okf
        tot = w.sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = w / tot[..., None]
            mean = (w * delta).sum(-1)
            sd = np.sqrt((w * w * var).sum(-1))
    used = okf.sum(-1)
    bad = (used == 0) | ~(tot > 0)
    mean = np.where(bad, np.nan, mean)
    sd = np.where(bad, np.nan, sd)
    z = mean / sd
    p = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    return {"mean": mean, "sd": sd, "lo": mean - Z95 * sd, "hi": mean + Z95 * sd,
            "p_positive": p, "strata_used": used}


def _erf(x):
    """Elementwise erf on arrays (NaN stays NaN), without SciPy."""
    x = np.asarray(x, float)
    return np.vectorize(lambda v: math.erf(v) if math.isfinite(v) else
                        (math.copysign(1.0, v) if not math.isnan(v) else math.nan),
                        otypes=[float])(x)


def population_weights(n, parent, pi) -> np.ndarray:
    """π_f = π_s · n_f / n_s: the activity stratum's population share split by
    its fine strata's matured units (both arms). ``n`` [..., K1, F], ``parent``
    [F] the activity stratum of each fine stratum, ``pi`` [..., S+1]."""
    n = np.asarray(n, float).sum(-2)  # [..., F]
    parent = np.asarray(parent)
    pi = np.asarray(pi, float)
    S1 = pi.shape[-1]
    ns = np.zeros(n.shape[:-1] + (S1,))
    for f, s in enumerate(parent):
        ns[..., s] += n[..., f]
    return np.where(ns[..., parent] > 0, pi[..., parent] * n / np.maximum(ns[..., parent], 1.0),
                    0.0)
