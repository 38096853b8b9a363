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

from kernels.backend import Array
from kernels.rng import Rng


@dataclass
class CovStats:
    """Covariate sums of the matured units with x, per cell [P, K1, S]."""

    nx: Array  # units with x
    sx: Array  # Σ x
    sxx: Array  # Σ x²
    sxy: Array  # Σ x·y
    sy_x: Array  # Σ y over the units with x


def moments(n: Array, sy: Array, syy: Array, cov: CovStats, xp) -> dict[str, Array]:
    """The data-only arrays of the block, each [P, K1, S], with the two
    regressors' components written out (2×2 algebra by hand is several
    times cheaper than broadcasting small matrices):

    ``wb1, wb2`` cell means of w; ``syw1, syw2, s11, s12, s22`` within-cell
    (centred at the cell means) cross products with y and of w; ``sw*``,
    ``swy*``, ``r11, r12, r22`` the raw sums Σ w, Σ w y, Σ w wᵀ the slope's
    conditional needs; ``xbar``, ``hbar`` [P, S] the centres.
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
    r11 = xp.where(nx > 0, xp.maximum(sxx - sx * xcell, 0.0) + nx * (xcell - xbar) ** 2, 0.0)
    r22 = nx * (1.0 - hbar) ** 2 + (n - nx) * hbar**2
    r12 = (1.0 - hbar) * sw1
    swy1 = sxy - xbar * sy_x
    swy2 = sy_x - hbar * sy
    inv_n = xp.where(n > 0, 1.0 / xp.maximum(n, 1.0), 0.0)
    ybar = sy * inv_n
    wb1, wb2 = sw1 * inv_n, sw2 * inv_n
    return {"wb1": wb1, "wb2": wb2,
            "syw1": swy1 - sw1 * ybar, "syw2": swy2 - sw2 * ybar,
            "s11": r11 - sw1 * wb1, "s12": r12 - sw1 * wb2, "s22": r22 - sw2 * wb2,
            "sw1": sw1, "sw2": sw2, "swy1": swy1, "swy2": swy2,
            "r11": r11, "r12": r12, "r22": r22,
            "xbar": xbar[:, 0], "hbar": hbar[:, 0]}


def adjusted(m: dict[str, Array], ybar: Array, ss: Array, gamma: Array, xp
             ) -> tuple[Array, Array]:
    """Cell mean and within-cell sum of squares of Y − γ·w, per chain.

    ``m`` from ``moments`` with a chain axis added ([P, 1, K1, S]); ``ybar``
    and ``ss`` [P, 1, K1, S] of Y itself; ``gamma`` [P, C, S, 2].
    Returns ([P, C, K1, S], [P, C, K1, S])."""
    g1, g2 = gamma[:, :, None, :, 0], gamma[:, :, None, :, 1]  # [P,C,1,S]
    yb = ybar - g1 * m["wb1"] - g2 * m["wb2"]
    ssa = (ss - 2.0 * (g1 * m["syw1"] + g2 * m["syw2"])
           + g1 * g1 * m["s11"] + 2.0 * g1 * g2 * m["s12"] + g2 * g2 * m["s22"])
    return yb, xp.maximum(ssa, 0.0)


def draw_gamma(m: dict[str, Array], mu: Array, sigma2: Array, prior_prec: Array, rng: Rng
               ) -> Array:
    """γ_s | μ, σ² for every problem, chain and stratum: [P, C, S, 2].

    ``mu`` [P, C, K1, S] the cell means μ_ks; ``sigma2`` the same shape;
    ``prior_prec`` [P, 1, 1, 2] the prior precisions (prior mean 0). Per
    stratum, with r_i = y_i − μ_ks:
        precision Λ = diag(prior) + Σ_k Σ_i w_i w_iᵀ / σ²_ks
        Λ · mean   = Σ_k Σ_i w_i r_i / σ²_ks = Σ_k (Σ w y − μ_ks Σ w) / σ²_ks
    drawn as in ``kernels.gibbs._gaussian_draw`` (Λ = L Lᵀ, L y = b,
    Lᵀ γ = y + ε), with the 2×2 Cholesky written out.
    """
    xp = rng.xp
    isig = 1.0 / sigma2  # [P,C,K1,S]
    a11 = (m["r11"] * isig).sum(axis=2) + prior_prec[..., 0]  # [P,C,S]
    a12 = (m["r12"] * isig).sum(axis=2)
    a22 = (m["r22"] * isig).sum(axis=2) + prior_prec[..., 1]
    b1 = ((m["swy1"] - mu * m["sw1"]) * isig).sum(axis=2)
    b2 = ((m["swy2"] - mu * m["sw2"]) * isig).sum(axis=2)
    P, C, S = b1.shape
    eps = rng.normal((P, C, S, 2))
    l11 = xp.sqrt(a11)
    l21 = a12 / l11
    l22 = xp.sqrt(a22 - l21 * l21)
    y1 = b1 / l11
    y2 = (b2 - l21 * y1) / l22
    x2 = (y2 + eps[..., 1]) / l22
    x1 = (y1 + eps[..., 0] - l21 * x2) / l11
    return xp.stack([x1, x2], axis=-1)
