"""Posterior summaries of a trace: the numeric part of the estimate record.

``summarize`` turns a trace [P, C, T, …] into, per problem and treatment, a
dict with every numeric field of the estimate record (docs/architecture.md#contracts); the streaming
layer adds names, ids, units and timestamps. Intervals are central 95%.
"""

from __future__ import annotations

import warnings

import numpy as np

from kernels.backend import to_numpy
from kernels.data import ModelData
from kernels.decision import p_best
from kernels.diagnostics import ess_bulk, ess_tail, split_rhat
from kernels.estimands import Draws

LO, HI = 0.025, 0.975


def _interval(x: np.ndarray) -> dict[str, np.ndarray]:
    """x [..., C, T] → mean, sd, lo, hi over the last two axes."""
    flat = x.reshape(x.shape[:-2] + (-1,))
    q = np.quantile(flat, [LO, HI], axis=-1)
    return {"mean": flat.mean(-1), "sd": flat.std(-1, ddof=1) if flat.shape[-1] > 1
            else np.zeros(flat.shape[:-1]), "lo": q[0], "hi": q[1]}


def interval(x: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd and central 95% interval over the last two axes [..., C, T]
    (draws of chains), as every interval of the estimate record is made."""
    return _interval(x)


def _baseline(eff: np.ndarray, lift: np.ndarray) -> dict[str, np.ndarray]:
    """The lift's denominator (the control mean the effect is divided by) per
    draw, recovered as effect / lift, summarised like ``_interval``. A lift is
    only meaningful where this interval excludes 0 (the dashboard shows "—"
    otherwise). Draws where it cannot be recovered (a lift of 0 or not finite)
    are left out; with none left the entries are NaN (null in the record)."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN
        base = np.where(np.isfinite(lift) & (lift != 0), eff / lift, np.nan)
        flat = base.reshape(base.shape[:-2] + (-1,))
        q = np.nanquantile(flat, [LO, HI], axis=-1)
        return {"mean": np.nanmean(flat, -1), "sd": np.nanstd(flat, -1, ddof=1),
                "lo": q[0], "hi": q[1]}


def _f(x) -> float | None:
    v = float(x)
    return v if np.isfinite(v) else None


def summarize(trace: Draws, data: ModelData | None = None, direction=None, *,
              adjustable=None, smask=None) -> list[list[dict]]:
    """Per problem p, per treatment k: the estimate's numeric fields.

    ``adjustable`` [P] and ``smask`` [P, S] come from ``data`` unless given
    (the streaming sampler summarises stored windows without a ModelData).

    ``direction`` [P]: +1 when higher is better (default), -1 when lower is;
    expected loss is E[max(0, -direction · effect)], the effect given up, in the
    metric's units, by shipping the treatment if it is in fact worse.
    """
    tr = {k: to_numpy(v) for k, v in trace.arrays().items()}
    P, C, T, K = tr["adj_effect"].shape
    S = tr["share"].shape[-1]
    sign = np.ones(P) if direction is None else np.asarray(direction, float)
    # put the chain/draw axes last
    eff = np.moveaxis(tr["adj_effect"], 3, 1)  # [P,K,C,T]
    lift = np.moveaxis(tr["adj_lift"], 3, 1)
    neff = np.moveaxis(tr["naive_effect"], 3, 1)
    nlift = np.moveaxis(tr["naive_lift"], 3, 1)
    tau = np.moveaxis(tr["tau"], (3, 4), (1, 2))  # [P,K,S,C,T]
    share = np.moveaxis(tr["share"], 3, 1)  # [P,S,C,T]
    islope = _interval(tr["slope"])  # [P]

    ie, il, ine, inl = _interval(eff), _interval(lift), _interval(neff), _interval(nlift)
    ib, inb = _baseline(eff, lift), _baseline(neff, nlift)
    itau, ish = _interval(tau), _interval(share)
    flat = eff.reshape(P, K, -1)
    nflat = neff.reshape(P, K, -1)
    p_pos = (flat > 0).mean(-1)
    np_pos = (nflat > 0).mean(-1)
    loss = np.maximum(0.0, -sign[:, None, None] * flat).mean(-1)
    arms = None if data is None else to_numpy(data.kmask)[:, 1:]  # padded arms are never best
    best = p_best(flat, sign, valid=arms)  # [P, K+1]: control, then the arms
    rhat = split_rhat(eff)
    essb = ess_bulk(eff)
    esst = ess_tail(eff)

    adjustable = to_numpy(data.adjustable if adjustable is None else adjustable)
    smask = to_numpy(data.smask if smask is None else smask)
    out: list[list[dict]] = []
    for p in range(P):
        row = []
        for k in range(K):
            def iv(d, p=p, k=k):
                return {key: _f(d[key][p, k]) for key in ("mean", "sd", "lo", "hi")}

            strata = [
                {
                    "stratum": s,
                    "share_population": {key: _f(ish[key][p, s]) for key in ("mean", "lo", "hi")},
                    "effect": {key: _f(itau[key][p, k, s]) for key in ("mean", "lo", "hi")},
                }
                for s in range(S)
                if smask[p, s]
            ]
            row.append({
                "adjustment": "stratified" if adjustable[p] else "unavailable",
                "adjusted": {"effect": iv(ie), "lift": iv(il), "baseline": iv(ib),
                             "p_positive": _f(p_pos[p, k]), "expected_loss": _f(loss[p, k])},
                "p_best": [_f(x) for x in best[p]],
                "naive": {"effect": iv(ine), "lift": iv(inl), "baseline": iv(inb),
                          "p_positive": _f(np_pos[p, k])},
                "strata": strata,
                "slope": {key: _f(islope[key][p]) for key in ("mean", "sd", "lo", "hi")},
                "diagnostics": {"rhat": _f(rhat[p, k]), "ess_bulk": _f(essb[p, k]),
                                "ess_tail": _f(esst[p, k]), "chains": C, "draws": C * T},
            })
        out.append(row)
    return out
