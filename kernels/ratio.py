"""A ratio metric's estimands from its two linear problems (issue 26).

The estimand per arm k is the population ratio R_k = E_pop[M | k] / E_pop[D | k]
(strata weighted by the population shares π_s, as every adjusted estimate is).
With R̂ the pooled ratio ΣM/ΣD of the matured units (a constant per snapshot),
the linearized outcome L = M − R̂·D has, in every cell, the mean
μ^L_ks = μ^M_ks − R̂ μ^D_ks, so with μ^·_k = Σ_s π_s μ^·_ks

    R_k = μ^M_k / μ^D_k = R̂ + μ^L_k / μ^D_k                       (an identity)

The stratified model runs unchanged on L (problem ``<m>``) and on D
(``<m>#den``); each draw of both gives R_k. The M–D correlation is in the
variance of L (ΣL² = ΣM² − 2R̂ΣMD + R̂²ΣD²), which is where the delta method
has it: to first order R̂_k − R_k = L̄_k / D̄_k. What is approximate: the two
problems' posteriors are sampled independently, so the covariance of the cell
means of L and D is left out; it enters R_k only multiplied by μ^L_k / μ^D_k,
i.e. by R_k − R̂ (half the effect, about), a second-order term.

Both problems keep their per-stratum means in their draw windows (``mu0`` and
``tau``); the ratio uses the numerator problem's population shares for both
means (the same π in numerator and denominator, as the estimand has), and
the R̂ each draw was made with (``rhat``, per draw: R̂ moves as data comes in,
and a window holds draws made on older snapshots).

Pure numpy on host windows [C, T, …] (``kernels.batching.unpad_draws``).
"""

from __future__ import annotations

import numpy as np


def arm_means(win: dict[str, np.ndarray]) -> np.ndarray:
    """[C, T, K+1, S]: each arm's per-stratum mean μ_0s + τ_ks (arm 0 = control)."""
    mu0 = win["mu0"][:, :, None, :]
    return np.concatenate([mu0, mu0 + win["tau"]], axis=2)


def _pair_ratios(num: np.ndarray, den: np.ndarray, weights: np.ndarray, rhat: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(R_0, R_k) [C, T, K] per treatment k's pair, weighting strata by
    ``weights`` [C|1, T|1, K, S] (the pair's own weights for the control too)."""
    r0 = rhat[..., None] + ((weights * num[:, :, :1]).sum(-1)
                            / (weights * den[:, :, :1]).sum(-1))
    rk = rhat[..., None] + (weights * num[:, :, 1:]).sum(-1) / (weights * den[:, :, 1:]).sum(-1)
    return r0, rk


def ratio_window(lin: dict[str, np.ndarray], den: dict[str, np.ndarray], matured: np.ndarray,
                 adjustable: bool) -> dict[str, np.ndarray]:
    """The ratio metric's draw window, in the layout of any problem's
    (``kernels.estimands.Draws`` by name, [C, T, …]), plus each pair's arm
    ratios ``ratio_control`` / ``ratio_arm`` [C, T, K] (adjusted) and
    ``naive_ratio_control`` / ``naive_ratio_arm``.

    ``lin``: the window of the linearized numerator problem (with ``rhat``
    [C, T]), ``den``: the denominator problem's; paired draw by draw (the last
    common T draws of each chain). ``matured`` [K, S]: each pair's matured
    shares of the strata (the naive weights, ``kernels.estimands.matured_weights``).
    ``adjustable``: the arrival model identifies population shares; if not, the
    adjusted ratio uses the pair's matured shares, as every kind does.
    """
    T = min(lin["tau"].shape[1], den["tau"].shape[1])
    lin = {k: v[:, v.shape[1] - T:] for k, v in lin.items()}
    den = {k: v[:, v.shape[1] - T:] for k, v in den.items()}
    num_m, den_m = arm_means(lin), arm_means(den)  # [C, T, K1, S]
    rhat = lin["rhat"]
    K = lin["tau"].shape[2]
    w = np.broadcast_to(matured[None, None], (1, 1) + matured.shape)
    pi = lin["share"][:, :, None, :] if adjustable else w
    pi = np.broadcast_to(pi, num_m.shape[:2] + (K, num_m.shape[-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        r0, rk = _pair_ratios(num_m, den_m, pi, rhat)
        n0, nk = _pair_ratios(num_m, den_m, w, rhat)
        per_stratum = num_m / den_m  # [C, T, K1, S]: R_ks − R̂
        return {
            "adj_effect": rk - r0, "adj_lift": rk / r0 - 1.0,
            "naive_effect": nk - n0, "naive_lift": nk / n0 - 1.0,
            "tau": per_stratum[:, :, 1:] - per_stratum[:, :, :1],
            "share": lin["share"], "slope": lin.get("slope", np.zeros(rhat.shape)),
            "mu0": rhat[..., None] + per_stratum[:, :, 0],
            "ratio_control": r0, "ratio_arm": rk,
            "naive_ratio_control": n0, "naive_ratio_arm": nk,
        }


def linearized_cell(cell_m: tuple, extra: tuple, rhat: float) -> tuple:
    """The 8-sum cell of L = M − R̂·D from the numerator's cell (n, ΣM, ΣM², …)
    and the ratio's extra sums (ΣD, ΣD², ΣMD, …): ΣL = ΣM − R̂ΣD,
    ΣL² = ΣM² − 2R̂ΣMD + R̂²ΣD² (no covariate: zeros)."""
    n, sm, smm = cell_m[0], cell_m[1], cell_m[2]
    sd, sdd, smd = extra[0], extra[1], extra[2]
    sll = smm - 2.0 * rhat * smd + rhat * rhat * sdd
    return (n, sm - rhat * sd, max(sll, 0.0), 0, 0.0, 0.0, 0.0, 0.0)


def linearized_cov(cov: tuple, rhat: float) -> tuple:
    """The covariate sums ``(n_x, Σx, Σx², Σx·y, Σy over units with x)`` of
    L = M − R̂·D on its covariate x_L = x_M − R̂·x_D (CUPED for a ratio),
    from the ratio's 12 sums over the units with both pre values ``cov`` =
    (n, Σx_M, Σx_D, Σx_M², Σx_D², Σx_M·x_D, Σx_M·M, Σx_M·D, Σx_D·M, Σx_D·D,
    ΣM, ΣD) (``streams.state.semantics.RATIO_COV_SUMS``): each is linear or
    quadratic in R̂, so one state serves every snapshot's R̂."""
    n, sxm, sxd, sxmm, sxdd, sxmd, sxm_m, sxm_d, sxd_m, sxd_d, sm, sd = cov
    r = rhat
    sxx = sxmm - 2.0 * r * sxmd + r * r * sxdd
    return (n, sxm - r * sxd, max(sxx, 0.0), sxm_m - r * sxm_d - r * sxd_m + r * r * sxd_d,
            sm - r * sd)


def den_cov(cov: tuple) -> tuple:
    """The covariate sums of the denominator D on x_D, over the same units
    (both pre values) as ``linearized_cov``."""
    n, _, sxd, _, sxdd, _, _, _, _, sxd_d, _, sd = cov
    return (n, sxd, sxdd, sxd_d, sd)
