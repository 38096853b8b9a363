"""Arrival block: who has not arrived yet (docs/architecture.md#the-model).

Each unit of stratum s is first exposed in bucket d with probability
p (1-p)^d. With N_s integrated out under p(N) ∝ 1/N, the posterior of
x = logit p given n arrivals in D completed buckets with Σ d·a_d = T is

    log π(x) = -(x - m)² / 2σ² + n log p + T log(1-p) - n log(1 - (1-p)^D).

It does not depend on any other parameter of the model, so a draw from it is
an *exact independent* draw: the block cannot mix badly in any regime. We
draw it by inverse CDF of the density interpolated log-linearly between the
points of a grid over x (exact cell masses, then an exact inverse CDF inside
the cell), built once per data snapshot: a few batched Newton steps find the
mode and the curvature; a first grid (mode ± 12 Laplace sd) gives the
posterior mean and sd, and a second grid over mean ± 12 sd (clipped to the
first grid's support widened by the prior sd) is the one sampled from. With
512 points (spacing ~0.05 sd) the sampled density is within ~1e-4 of the
true one in L1 (40× closer than the 1024-point trapezoid with a flat density
per cell that this replaced; the largest CDF error, ~4e-5, is about the same)
in half the memory.
This handles the early small-D, small-p regime, where the truncation term
cancels most of the likelihood and the posterior is skewed and close to the
prior, as well as n = 10⁶, where it is a needle.

Then N_s - n_s | p_s ~ NegativeBinomial(n_s, q_s), q_s = 1 - (1-p_s)^D,
drawn as a Gamma–Poisson mixture (both backends have those).
Strata with n_s = 0 get N_s = 0: with no arrival the 1/N prior leaves N
improper, and a stratum nobody from has been seen contributes no mass.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels import fused, grids
from kernels.backend import Array, array_module
from kernels.rng import Rng

NEWTON_STEPS = 40


def _softplus(xp, x):
    return xp.logaddexp(0.0, x)


def log_density(x: Array, n: Array, T: Array, D: Array, m: Array, sd: Array) -> Array:
    """Unnormalised log posterior of x = logit p (broadcasting arrays)."""
    xp = _xp(x)
    sp = _softplus(xp, x)  # -log(1-p)
    log_p = x - sp
    # log q = log(1 - (1-p)^D) = log(-expm1(-D sp)); n log q is 0 where n = 0
    Dsafe = xp.maximum(D, 1.0)
    log_q = xp.log(-xp.expm1(-Dsafe * sp))
    lik = n * (log_p - log_q) - T * sp
    lik = xp.where(D >= 1, lik, 0.0)
    return -0.5 * ((x - m) / sd) ** 2 + lik


def grad_log_density(x, n, T, D, m, sd):
    """d/dx of ``log_density``, same (broadcasting) arguments; returns an array
    of the broadcast shape."""
    xp = _xp(x)
    p = 1.0 / (1.0 + xp.exp(-x))
    sp = _softplus(xp, x)
    Dsafe = xp.maximum(D, 1.0)
    # d/dx log q = D p (1-p)^D / q = D p / expm1(D sp)
    dlogq = Dsafe * p / xp.expm1(Dsafe * sp)
    g = n * (1.0 - p) - T * p - n * dlogq
    g = xp.where(D >= 1, g, 0.0)
    return -(x - m) / sd**2 + g


_xp = array_module


def loglinear_masses(l0: Array, l1: Array) -> Array:
    """Mass of a cell of the density exp(l) interpolated log-linearly between
    its ends l0, l1 (unit width): ∫₀¹ exp(l0 + Δ t) dt, Δ = l1 − l0, written as
    e^{max(l0, l1)} (1 − e^{−|Δ|})/|Δ| so nothing overflows for l ≤ 0."""
    xp = _xp(l0)
    gap = xp.abs(l1 - l0)
    psi = xp.where(gap > 0, -xp.expm1(-gap) / xp.where(gap > 0, gap, 1.0), 1.0)
    return xp.exp(xp.maximum(l0, l1)) * psi


def loglinear_position(delta: Array, f: Array) -> Array:
    """Inverse CDF inside a cell whose density is ∝ exp(Δ t), t ∈ [0, 1): the
    position t for a uniform f (decreasing side sampled directly, increasing
    side mirrored)."""
    xp = _xp(delta)
    a = xp.abs(delta)
    s = xp.where(a > 0, -xp.log1p(f * xp.expm1(-a)) / xp.where(a > 0, a, 1.0), f)
    return xp.where(delta > 0, 1.0 - s, s)


@dataclass
class ArrivalGrid:
    """Per (problem, stratum) inverse-CDF tables over x = logit p (``build_grid``).

    Fields ``x``, ``cdf``, ``logw`` [P, S, G]; ``__post_init__`` derives the flat
    views that ``draw_logit_p`` gathers from.
    """

    x: Array  # [P, S, G] grid points (equally spaced per row)
    cdf: Array  # [P, S, G] normalised CDF (0 … 1) of the log-linear interpolant
    logw: Array  # [P, S, G] log density at the points, relative to the row's maximum
    flat: Array | None = None  # cdf rows shifted by 2·row, flattened: one sorted array

    def __post_init__(self) -> None:
        # everything a draw needs besides the uniforms, once per grid
        xp = _xp(self.cdf)
        P, S, G = self.cdf.shape
        row = xp.arange(P * S).reshape(P, 1, S)  # row of (p, s), laid out like a [P, C, S] draw
        if self.flat is None:
            self.flat = (self.cdf + 2.0 * row.reshape(P, S, 1)).reshape(-1)
        self.off = 2.0 * row  # [P, 1, S] shift of row (p, s) in ``flat``
        self.first = row * G + 1  # flat index of the row's second point
        self.last = row * G + (G - 1)  # … and of its last
        self.cdf_flat = xp.ascontiguousarray(self.cdf).reshape(-1)
        self.x_flat = xp.ascontiguousarray(self.x).reshape(-1)
        self.logw_flat = xp.ascontiguousarray(self.logw).reshape(-1)


def find_mode(n, T, D, m, sd, steps: int = NEWTON_STEPS):
    """Batched damped Newton on the log posterior; returns (mode, curvature)."""
    xp = _xp(n)
    x = m + 0.0 * n
    def curvature(x):
        h = 1e-4 * xp.maximum(1.0, xp.abs(x))
        up, down = grad_log_density(x + h, n, T, D, m, sd), grad_log_density(x - h, n, T, D, m, sd)
        return (up - down) / (2 * h)

    for _ in range(steps):
        g = grad_log_density(x, n, T, D, m, sd)
        H = curvature(x)
        step = xp.where(H < 0, -g / xp.where(H < 0, H, -1.0), xp.sign(g) * 0.5)
        x = x + xp.clip(step, -2.0, 2.0)
    return x, curvature(x)


def _tabulate(xp, lo, hi, n, T, D, m, sd, G):
    """Grid points, log density (max 0, floored at -10⁴) and the normalised CDF
    of its log-linear interpolant (``loglinear_masses``) over [lo, hi]."""
    u = xp.linspace(0.0, 1.0, G)
    x = lo[..., None] + (hi - lo)[..., None] * u
    lp = log_density(x, n[..., None], T[..., None], D[..., None], m[..., None], sd[..., None])
    lp = xp.maximum(lp - lp.max(axis=-1, keepdims=True), -1e4)
    seg = loglinear_masses(lp[..., :-1], lp[..., 1:])  # × the spacing, the same along a row
    cdf = xp.concatenate([xp.zeros_like(seg[..., :1]), xp.cumsum(seg, axis=-1)], axis=-1)
    total = cdf[..., -1:]
    cdf = cdf / xp.where(total > 0, total, 1.0)
    return x, lp, cdf


def build_grid(data, G: int | None = None) -> ArrivalGrid:
    """The arrival block's inverse-CDF tables for a batch (once per data snapshot).

    Args: ``data``: a ``kernels.data.ModelData`` (its ``arrived``, ``dsum``, ``D``,
    ``logit_p0``, ``p_sd``); ``G``: grid points per row (default
    ``kernels.grids.ARRIVAL_GRID_POINTS``).
    Returns: the ``ArrivalGrid`` [P, S, G] that ``draw_logit_p`` samples from.
    """
    if G is None:
        G = grids.ARRIVAL_GRID_POINTS
    xp = data.xp
    n, T = data.arrived, data.dsum
    D = data.D[:, None] + 0.0 * n
    m = data.logit_p0
    sd = data.p_sd[:, None] + 0.0 * n
    mode, H = find_mode(n, T, D, m, sd)
    lap = 1.0 / xp.sqrt(xp.maximum(-H, 1.0 / sd**2 * 1e-6))
    lap = xp.minimum(lap, sd * 4.0)
    hw = grids.ARRIVAL_GRID_HALF_WIDTH
    lo1, hi1 = mode - hw * lap, mode + hw * lap
    x1, _, cdf1 = _tabulate(xp, lo1, hi1, n, T, D, m, sd, G)
    # moments of the first pass, then a grid centred on them
    mass = xp.diff(cdf1, axis=-1)
    mid = 0.5 * (x1[..., 1:] + x1[..., :-1])
    mean = (mass * mid).sum(-1)
    var = (mass * (mid - mean[..., None]) ** 2).sum(-1)
    gsd = xp.sqrt(xp.maximum(var, (1e-3 * lap) ** 2))
    lo = xp.maximum(mean - hw * gsd, lo1 - sd)
    hi = xp.minimum(mean + hw * gsd, hi1 + sd)
    x, logw, cdf = _tabulate(xp, lo, hi, n, T, D, m, sd, G)
    return ArrivalGrid(x=x, cdf=cdf, logw=logw)


def draw_logit_p(grid: ArrivalGrid, rng: Rng, n_chains: int) -> Array:
    """[P, C, S] draws of logit p_s by inverse CDF: the cell by one searchsorted
    over all rows (flattened, row r shifted by 2r), then the point inside the
    cell by the inverse CDF of the log-linear density there."""
    xp = rng.xp
    P, S, G = grid.cdf.shape
    u = rng.uniform((P, n_chains, S))
    if fused.enabled(xp):  # on cupy: one kernel (kernels/cuda/sweep.cu), the same arithmetic
        return fused.arrival_draw(u, grid.cdf, grid.x, grid.logw)
    idx = xp.searchsorted(grid.flat, (u + grid.off).reshape(-1), side="right").reshape(u.shape)
    j = xp.minimum(xp.maximum(idx, grid.first), grid.last)  # cdf[j-1] <= u < cdf[j], flat
    c0 = xp.take(grid.cdf_flat, j - 1)
    c1 = xp.take(grid.cdf_flat, j)
    x0 = xp.take(grid.x_flat, j - 1)
    x1 = xp.take(grid.x_flat, j)
    frac = xp.where(c1 > c0, (u - c0) / xp.where(c1 > c0, c1 - c0, 1.0), 0.5)
    t = loglinear_position(xp.take(grid.logw_flat, j) - xp.take(grid.logw_flat, j - 1), frac)
    return x0 + t * (x1 - x0)


POISSON_EXACT_MAX = 1e7


def draw_population(logit_p: Array, arrived: Array, D: Array, rng: Rng) -> Array:
    """[P, C, S] draws of N_s given p_s: n_s + NegBin(n_s, q_s), as a Gamma–Poisson
    mixture with rate Gamma(n_s) · (1 − q_s)/q_s; (1 − q)/q = 1/expm1(D·(−log(1−p)))."""
    xp = rng.xp
    n = arrived[:, None, :]
    Dn = D[:, None, None]
    a = xp.maximum(Dn, 1.0) * _softplus(xp, logit_p)  # -log(1-q) = D · (-log(1-p))
    odds_miss = 1.0 / xp.expm1(xp.minimum(a, 700.0))  # below e^-700 λ is 0 for every purpose
    shape = xp.ascontiguousarray(xp.broadcast_to(xp.maximum(n, 1.0), logit_p.shape))
    lam = rng.gamma(shape) * odds_miss
    pois = rng.poisson(xp.minimum(lam, POISSON_EXACT_MAX)).astype(float)
    z = rng.normal(lam.shape)
    extra = xp.where(lam > POISSON_EXACT_MAX, lam + xp.sqrt(lam) * z, pois)
    return xp.where((n > 0) & (Dn >= 1), n + extra, n)
