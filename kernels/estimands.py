"""What each posterior draw says about the questions people ask (docs/architecture.md#the-model).

Per draw: population shares π_s (N_s / Σ N_s, or the configured target
shares), the adjusted effect Σ_s π_s τ_ks and lift (÷ Σ_s π_s μ_0s), and the
naive effect: the same τ_ks weighted by the matured units' shares, which is
what a dashboard's difference in means over matured units estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kernels.backend import Array, array_module
from kernels.data import ModelData
from kernels.gibbs import State


@dataclass
class Draws:
    """Estimands; one draw per chain is [P, C, …], a trace is [P, C, T, …]."""

    adj_effect: Array  # [P, C, K]
    adj_lift: Array  # [P, C, K]
    naive_effect: Array  # [P, C, K]
    naive_lift: Array  # [P, C, K]
    tau: Array  # [P, C, K, S]
    share: Array  # [P, C, S] population shares used by the adjusted estimate
    #: [P, C] the covariate's slope γ_1 averaged over strata, weighted by the
    #: matured units with a covariate (0 without one; ``kernels.covariate``)
    slope: Array
    #: [P, C, S] the control mean μ_0s of each stratum: a ratio metric's two
    #: problems (numerator linearized, denominator) are recombined from their
    #: per-stratum means after sampling (``kernels.ratio``)
    mu0: Array

    def arrays(self) -> dict[str, Array]:
        """The fields by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def matured_weights(data: ModelData) -> Array:
    """[P, K, S] share of stratum s among matured units of control and arm k."""
    xp = data.xp
    pair = data.n[:, :1, :] + data.n[:, 1:, :]
    tot = pair.sum(-1, keepdims=True)
    even = data.smask / xp.maximum(data.smask.sum(-1, keepdims=True), 1)
    return xp.where(tot > 0, pair / xp.maximum(tot, 1.0), even[:, None, :])


def _derived(data: ModelData) -> dict:
    """The data-only parts of the estimands, once per ModelData (``data.cache``)."""
    c = data.cache.get("estimands")
    if c is None:
        xp = data.xp
        tgt = xp.where(xp.isfinite(data.target) & data.smask, data.target, 0.0)
        tgt = tgt / xp.maximum(tgt.sum(-1, keepdims=True), 1e-300)
        w = matured_weights(data)
        c = {
            "smask": data.smask[:, None, :],  # [P,1,S]
            "target": tgt[:, None, :],
            "has_target": xp.isfinite(data.target).any(-1)[:, None, None],  # [P,1,1]
            "adjustable": data.adjustable[:, None, None],
            "fallback": w[:, None, 0, :],  # [P,1,S]
            "matured": w[:, None],  # [P,1,K,S]
            "slope_w": _slope_weights(data),  # [P,1,S]
        }
        data.cache["estimands"] = c
    return c


def population_shares(state: State, data: ModelData) -> Array:
    """[P, C, S]: target shares where configured, else N_s / Σ N_s; for problems
    that cannot be adjusted (``data.adjustable`` false) the matured shares of
    the first arm pair, so adjusted equals naive there."""
    xp = data.xp
    c = _derived(data)
    pop = xp.where(c["smask"], state.pop, 0.0)
    tot = pop.sum(-1, keepdims=True)
    est = pop / xp.where(tot > 0, tot, 1.0)
    shares = xp.where(c["has_target"], c["target"], est)
    ok = c["adjustable"] & (c["has_target"] | (tot > 0))
    return xp.where(ok, shares, c["fallback"])


def estimands(state: State, data: ModelData) -> Draws:
    """The estimands of one draw of every chain: effects and lifts adjusted to
    the population shares (``population_shares``) and naive (matured weights).

    Args: ``state``: the chains [P, C, …]; ``data``: their batch.
    Returns: ``Draws`` [P, C, …].
    """
    xp = data.xp
    c = _derived(data)
    pi = population_shares(state, data)  # [P,C,S]
    w = c["matured"]  # [P,1,K,S]
    # where adjustment is unavailable, each arm uses its own pair's matured weights
    pik = xp.where(c["adjustable"][..., None], pi[:, :, None, :], w)  # [P,C,K,S]
    mu0 = state.mu0[:, :, None, :]
    adj = (pik * state.tau).sum(-1)
    adj_base = (pik * mu0).sum(-1)
    naive = (w * state.tau).sum(-1)
    naive_base = (w * mu0).sum(-1)
    return Draws(
        adj_effect=adj,
        adj_lift=adj / adj_base,
        naive_effect=naive,
        naive_lift=naive / naive_base,
        tau=state.tau,
        share=pi,
        slope=(c["slope_w"] * state.gamma[..., 0]).sum(-1),
        mu0=state.mu0,
    )


def _slope_weights(data: ModelData) -> Array:
    """[P, 1, S]: each stratum's share of the matured units with a covariate."""
    xp = data.xp
    if data.cov is None:
        return xp.zeros(data.smask.shape)[:, None]
    nx = data.cov.nx.sum(axis=1)
    return (nx / xp.maximum(nx.sum(-1, keepdims=True), 1.0))[:, None]


def stack(draws: list[Draws]) -> Draws:
    """Trace [P, C, T, …] from a non-empty list of per-sweep draws [P, C, …]."""
    xp = array_module(draws[0].adj_effect)
    return Draws(**{k: xp.stack([getattr(d, k) for d in draws], axis=2)
                    for k in draws[0].arrays()})
