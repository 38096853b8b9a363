"""Regression adjustment on a pre-experiment covariate (CUPED), inside the
stratified model (issue 18; docs/method.md "Covariate adjustment").

Per problem, stratum s, unit i of cell (k, s), with x_i its pre-experiment
value of the metric when it has one (h_i = 1) and none otherwise (h_i = 0):

    Y_i = μ_ks + γ_1s w_1i + γ_2s w_2i + ε_i,   ε_i ~ N(0, σ²_ks)
    w_1i = h_i (x_i − x̄_s)        the covariate, centred; 0 where missing
    w_2i = h_i − h̄_s              the missingness indicator, centred

x̄_s and h̄_s are pooled over all variants of the stratum (matured units), so
the slopes γ_s are shared by every variant and cannot absorb the treatment
effect, and μ_ks stays the cell's mean at the stratum's average covariate:
τ_ks = μ_ks − μ_0s is the adjusted effect in the stratum. A unit without x is
never treated as x = 0: it gets w_1 = 0 (the stratum mean) and its own mean
shift γ_2s (Zhao & Ding 2022's missingness-indicator method); with no x in
a stratum, or x for every unit, the corresponding w is identically 0 and its
γ is drawn from its prior without touching any outcome.

Prior: γ_1s ~ N(0, gamma_sd[0]²), γ_2s ~ N(0, gamma_sd[1]²) (``Hyper``).

The model's other blocks see only the adjusted cell statistics
(``adjusted``): given γ, the outcomes Y − γ·w of a cell have mean ȳ − γ·w̄
and within-cell sum of squares S_yy − 2 γ·S_yw + γᵀ S_ww γ, all from the
cells' sums (``moments``, once per data snapshot). The slopes are one more
Gibbs block (``draw_gamma``): given μ and σ² the residuals y − μ_ks are a
Gaussian linear regression on w, conjugate with the normal prior.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels.backend import Array, Rng


@dataclass
class CovStats:
    """Covariate sums of the matured units with x, per cell [P, K1, S]."""

    nx: Array  # units with x
    sx: Array  # Σ x
    sxx: Array  # Σ x²
    sxy: Array  # Σ x·y
    sy_x: Array  # Σ y over the units with x


def moments(n: Array, sy: Array, syy: Array, cov: CovStats, xp) -> dict[str, Array]:
    """The data-only arrays of the block, shapes [P, K1, S] (vectors: [..., 2],
    matrices [..., 2, 2]):

    ``wbar`` cell means of w; ``syw`` and ``sww`` within-cell (centred at the
    cell means) cross products with y and of w; ``swy``, ``sww_raw``, ``sw``
    the raw sums Σ w y, Σ w wᵀ, Σ w the slope's conditional needs; ``xbar``,
    ``hbar`` [P, S] the centres.
    """
    nx, sx, sxx, sxy, sy_x = cov.nx, cov.sx, cov.sxx, cov.sxy, cov.sy_x
    nx_s = nx.sum(axis=1)  # [P,S]
    n_s = n.sum(axis=1)
    xbar = xp.where(nx_s > 0, sx.sum(axis=1) / xp.maximum(nx_s, 1.0), 0.0)[:, None]  # [P,1,S]
    hbar = xp.where(n_s > 0, nx_s / xp.maximum(n_s, 1.0), 0.0)[:, None]
    sw1 = sx - nx * xbar
    sw2 = nx - n * hbar
    # Σ w1² about x̄_s, from the cell's own centred sum (less cancellation)
    xcell = sx / xp.maximum(nx, 1.0)
    ssx = xp.where(nx > 0, xp.maximum(sxx - sx * xcell, 0.0) + nx * (xcell - xbar) ** 2, 0.0)
    sw2w2 = nx * (1.0 - hbar) ** 2 + (n - nx) * hbar**2
    sw1w2 = (1.0 - hbar) * sw1
    sw1y = sxy - xbar * sy_x
    sw2y = sy_x - hbar * sy
    sw = xp.stack([sw1, sw2], axis=-1)
    swy = xp.stack([sw1y, sw2y], axis=-1)
    sww_raw = xp.stack([xp.stack([ssx, sw1w2], -1), xp.stack([sw1w2, sw2w2], -1)], -2)
    inv_n = xp.where(n > 0, 1.0 / xp.maximum(n, 1.0), 0.0)
    ybar = sy * inv_n
    wbar = sw * inv_n[..., None]
    syw = swy - sw * ybar[..., None]
    sww = sww_raw - sw[..., :, None] * wbar[..., None, :]
    return {"wbar": wbar, "syw": syw, "sww": sww, "sw": sw, "swy": swy, "sww_raw": sww_raw,
            "xbar": xbar[:, 0], "hbar": hbar[:, 0]}


def adjusted(m: dict[str, Array], ybar: Array, ss: Array, gamma: Array, xp
             ) -> tuple[Array, Array]:
    """Cell mean and within-cell sum of squares of Y − γ·w, per chain.

    ``m`` from ``moments`` with a chain axis added ([P, 1, K1, S, …]); ``ybar``
    and ``ss`` [P, 1, K1, S] of Y itself; ``gamma`` [P, C, S, 2].
    Returns ([P, C, K1, S], [P, C, K1, S])."""
    g = gamma[:, :, None]  # [P,C,1,S,2]
    yb = ybar - (g * m["wbar"]).sum(-1)
    quad = (g[..., :, None] * m["sww"] * g[..., None, :]).sum((-1, -2))
    ssa = ss - 2.0 * (g * m["syw"]).sum(-1) + quad
    return yb, xp.maximum(ssa, 0.0)


def draw_gamma(m: dict[str, Array], mu: Array, sigma2: Array, prior_prec: Array, rng: Rng
               ) -> Array:
    """γ_s | μ, σ² for every problem, chain and stratum: [P, C, S, 2].

    ``mu`` [P, C, K1, S] the cell means μ_ks; ``sigma2`` the same shape;
    ``prior_prec`` [P, 1, 1, 2] the prior precisions (prior mean 0). Per
    stratum, with r_i = y_i − μ_ks:
        precision Λ = diag(prior) + Σ_k Σ_i w_i w_iᵀ / σ²_ks
        Λ · mean   = Σ_k Σ_i w_i r_i / σ²_ks = Σ_k (Σ w y − μ_ks Σ w) / σ²_ks
    """
    from kernels.gibbs import _gaussian_draw

    xp = rng.xp
    isig = 1.0 / sigma2  # [P,C,K1,S]
    A = (m["sww_raw"] * isig[..., None, None]).sum(axis=2)  # [P,C,S,2,2]
    A = A + prior_prec[..., None, :] * xp.eye(2)
    b = ((m["swy"] - mu[..., None] * m["sw"]) * isig[..., None]).sum(axis=2)  # [P,C,S,2]
    P, C, S = b.shape[:3]
    return _gaussian_draw(A, b, rng.normal((P, C, S, 2)))
