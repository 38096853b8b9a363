"""The model's data: sufficient statistics of a batch of problems, padded.

One *problem* is one (experiment, metric): K+1 variants (0 = control) and S
strata. Problems of different sizes share one batch by padding to the largest
K+1 and S; ``kmask``/``smask`` say which entries are real. Padded cells have
n = 0, so they add nothing to any likelihood.

Everything here is computed once per data snapshot (not per sweep): the
pooled outcome scale that sets the weakly-informative priors, the centred
stratum activity ``z``, and the arrival block's posterior grids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels import arrival
from kernels.backend import Array, array_module
from kernels.covariate import CovStats


@dataclass
class Hyper:
    """Prior constants of the effect block, per problem (shape [P]).

    All are scaled by the pooled outcome mean ``m`` and sd ``s`` so the model is
    unit-free and every cell, even an empty one, has a proper posterior.
    """

    m: Array  # pooled mean of Y over matured units
    s: Array  # pooled sd of Y (1.0 when undefined)
    mu0_sd: Array  # μ_0s ~ N(m, mu0_sd²): 2 s, wider than any plausible stratum spread
    sig_a: Array  # σ²_ks ~ InvGamma(sig_a, sig_b): a = 1 (two pseudo-observations)
    sig_b: Array  # b = s²: prior mode s²/2, so a one-unit cell is not degenerate
    theta_sd: Array  # θ_k ~ N(0, s²): an effect of one outcome sd is already huge
    beta_sd: Array  # β_k ~ N(0, s²) per unit of centred log activity
    omega_nu: float  # ω_k ~ half-t(ν=3, scale A): heavier tails than normal, finite variance
    omega_scale: Array  # A = s / 2
    #: [P, 2] prior sd of the covariate slopes (kernels.covariate): γ_1 ~ N(0, (3 s / s_x)²),
    #: a slope of three outcome sd per covariate sd, beyond any correlation's reach
    #: (|slope| = |ρ| s / s_x within a cell); γ_2 (the missingness shift) ~ N(0, (2 s)²)
    gamma_sd: Array | None = None


@dataclass
class ModelData:
    """Sufficient statistics of P problems (arrays on the chosen device).

    Shapes: P problems, K1 = K+1 variants (0 = control), S strata.
    """

    n: Array  # [P, K1, S] matured units per cell
    sy: Array  # [P, K1, S] Σ Y
    syy: Array  # [P, K1, S] Σ Y²
    arrived: Array  # [P, S] units first exposed in completed buckets d < D
    dsum: Array  # [P, S] Σ_d d · a_sd over d < D
    D: Array  # [P] completed buckets
    logit_p0: Array  # [P, S] prior centre of logit p_s (per-bucket arrival probability)
    p_sd: Array  # [P] prior sd of logit p_s
    z: Array  # [P, S] centred log activity (regressor of the effect on activity)
    smask: Array  # [P, S] stratum exists
    kmask: Array  # [P, K1] variant exists
    target: Array  # [P, S] target population shares, NaN where not configured
    #: the pre-experiment covariate's sums (kernels.covariate), None when no
    #: problem of the batch uses one (rows of problems that do not are zero)
    cov: CovStats | None = None
    hyper: Hyper = field(init=False)
    grid: object = field(init=False, default=None)  # arrival.ArrivalGrid, set by make_data
    #: data-only arrays the kernels derive once per snapshot (not once per sweep)
    cache: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    @property
    def xp(self):
        """The array module (numpy or cupy) of the arrays."""
        return array_module(self.n)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(P, K1, S): problems, variants (control included), strata."""
        return tuple(self.n.shape)  # type: ignore[return-value]

    @property
    def adjustable(self) -> Array:
        """[P] bool: the arrival block identifies population shares.

        Needs a completed bucket and at least two strata with arrivals; otherwise
        the adjusted estimate falls back to the naive one and says so.
        """
        xp = self.xp
        return (self.D >= 1) & ((self.arrived > 0).sum(axis=1) >= 2) | xp.isfinite(
            self.target
        ).any(axis=1)


def per_bucket_prob(activity_days: np.ndarray, bucket_days: float) -> np.ndarray:
    """Prior arrival probability per bucket from active days in the last 28.

    active/28 is a per-day visit probability; a unit arrives in a bucket of
    ``bucket_days`` days unless it stays away every day: 1 - (1 - a/28)^b.
    Activity is floored at half a day so the never-active stratum (0 days) has
    a small but non-zero rate: it did get exposed, so it does visit.
    """
    per_day = np.clip(np.asarray(activity_days, float), 0.5, 27.5) / 28.0
    return -np.expm1(bucket_days * np.log1p(-per_day))


def make_data(
    n,
    sy,
    syy,
    arrived,
    dsum,
    D,
    activity_days,
    bucket_days=1.0,
    p_sd=0.5,
    smask=None,
    kmask=None,
    target=None,
    hyper: Hyper | None = None,
    cov: dict | None = None,
    xp=np,
) -> ModelData:
    """Build a ModelData from host arrays (padded already), on module ``xp``.

    ``activity_days`` [P, S]: each stratum's mean active days in the 28 days
    before the experiment; sets the arrival prior and the regressor ``z``.
    ``hyper`` overrides the data-scaled priors (simulation-based calibration
    needs priors that do not depend on the data). ``cov``: the covariate's
    cell sums ``nx, sx, sxx, sxy, sy_x`` [P, K1, S] (``CovStats``), or None.
    """
    n = np.asarray(n, float)
    P, K1, S = n.shape
    smask = np.ones((P, S), bool) if smask is None else np.asarray(smask, bool)
    kmask = np.ones((P, K1), bool) if kmask is None else np.asarray(kmask, bool)
    sy = np.asarray(sy, float)
    syy = np.asarray(syy, float)
    n = np.where(kmask[:, :, None] & smask[:, None, :], n, 0.0)
    act = np.broadcast_to(np.asarray(activity_days, float), (P, S))
    bdays = np.broadcast_to(np.asarray(bucket_days, float), (P,))
    p0 = per_bucket_prob(act, bdays[:, None])
    logp_day = np.log(np.clip(act, 0.5, 27.5) / 28.0)
    cnt = np.maximum(smask.sum(1, keepdims=True), 1)
    z = np.where(smask, logp_day - (logp_day * smask).sum(1, keepdims=True) / cnt, 0.0)
    tgt = np.full((P, S), np.nan) if target is None else np.asarray(target, float)

    data = ModelData(
        n=xp.asarray(n),
        sy=xp.asarray(np.where(n > 0, sy, 0.0)),
        syy=xp.asarray(np.where(n > 0, syy, 0.0)),
        arrived=xp.asarray(np.where(smask, np.asarray(arrived, float), 0.0)),
        dsum=xp.asarray(np.where(smask, np.asarray(dsum, float), 0.0)),
        D=xp.asarray(np.broadcast_to(np.asarray(D, float), (P,)).copy()),
        logit_p0=xp.asarray(np.log(p0) - np.log1p(-p0)),
        p_sd=xp.asarray(np.broadcast_to(np.asarray(p_sd, float), (P,)).copy()),
        z=xp.asarray(z),
        smask=xp.asarray(smask),
        kmask=xp.asarray(kmask),
        target=xp.asarray(tgt),
    )
    if cov is not None:
        live = n > 0
        data.cov = CovStats(**{k: xp.asarray(np.where(live, np.asarray(cov[k], float), 0.0))
                               for k in ("nx", "sx", "sxx", "sxy", "sy_x")})
    data.hyper = _hyper(data) if hyper is None else hyper
    if data.hyper.gamma_sd is None:
        data.hyper.gamma_sd = _gamma_sd(data)
    data.grid = arrival.build_grid(data)
    return data


def scaled_hyper(m: Array, s: Array) -> Hyper:
    """The default prior shapes at location m and scale s (arrays [P])."""
    return Hyper(m=m, s=s, mu0_sd=2.0 * s, sig_a=1.0 + 0.0 * s, sig_b=s * s,
                 theta_sd=s, beta_sd=s, omega_nu=3.0, omega_scale=0.5 * s)


def fixed_hyper(P: int, m: float = 0.0, s: float = 1.0, xp=np, gamma_sd=(1.0, 1.0)) -> Hyper:
    """Data-independent priors (for simulation-based calibration).

    Args: ``P`` problems; the location ``m`` and scale ``s`` of every one;
    ``xp`` the array module; ``gamma_sd`` the covariate slopes' prior sd.
    Returns: a ``Hyper`` for ``make_data(..., hyper=...)``.
    """
    h = scaled_hyper(xp.full((P,), float(m)), xp.full((P,), float(s)))
    h.gamma_sd = xp.asarray(np.broadcast_to(np.asarray(gamma_sd, float), (P, 2)).copy())
    return h


def _gamma_sd(d: ModelData) -> Array:
    """[P, 2] the slopes' prior sd (``Hyper.gamma_sd``), scaled by the pooled
    sd of the outcome and of the covariate (1 where it has no spread)."""
    xp = d.xp
    s = d.hyper.s
    if d.cov is None:
        sx = xp.ones_like(s)
    else:
        nx = d.cov.nx.sum(axis=(1, 2))
        mx = d.cov.sx.sum(axis=(1, 2)) / xp.maximum(nx, 1.0)
        vx = xp.where(nx > 1, d.cov.sxx.sum(axis=(1, 2)) / xp.maximum(nx, 1.0) - mx * mx, 1.0)
        sx = xp.sqrt(xp.where(vx > 1e-12 * (1 + mx * mx), vx, 1.0))
    return xp.stack([3.0 * s / sx, 2.0 * s], axis=-1)


def _hyper(d: ModelData) -> Hyper:
    """Priors scaled by the pooled mean and sd of the matured outcomes."""
    xp = d.xp
    N = d.n.sum(axis=(1, 2))
    m = xp.where(N > 0, d.sy.sum(axis=(1, 2)) / xp.maximum(N, 1), 0.0)
    var = xp.where(N > 1, d.syy.sum(axis=(1, 2)) / xp.maximum(N, 1) - m * m, 1.0)
    s = xp.sqrt(xp.where(var > 1e-12 * (1 + m * m), var, 1.0))
    return scaled_hyper(m, s)
