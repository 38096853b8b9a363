"""Snapshots of metric-kind experiments built straight from per-unit totals (issue 26).

The model's tests need state with known truth without running the event
fold: ``snapshot_from_units`` computes, from every matured unit's window
totals, the cells the state keeps by the contract (docs/method.md, metric
kinds): the per-kind outcome y in ``cells``, ``extra_cells`` for capped sums
and ratios, ``tails`` for sums. It is a reference for those definitions, not
the state's implementation (``streams.state.semantics``).
"""

from __future__ import annotations

import numpy as np

from kernels.tail import tail_bucket
from schemas.records import ExperimentConfig
from streams.state.semantics import ExperimentSnapshot

T0 = 1_767_225_600_000
DAY = 86_400_000


def _winsorize(t: np.ndarray, spec) -> np.ndarray:
    lo = -np.inf if spec.cap_lower is None else spec.cap_lower
    hi = np.inf if spec.cap_upper is None else spec.cap_upper
    return np.clip(t, lo, hi)


def _capped(spec) -> bool:
    return spec.cap_lower is not None or spec.cap_upper is not None


def snapshot_from_units(cfg: ExperimentConfig, variant: np.ndarray, stratum: np.ndarray,
                        totals: dict[str, np.ndarray], *, entry: np.ndarray | None = None,
                        D: int = 0, activity: np.ndarray | None = None,
                        pre: dict[str, np.ndarray] | None = None) -> ExperimentSnapshot:
    """The snapshot of units that all matured.

    ``variant`` [n] index into ``cfg.variants``; ``stratum`` [n] index (the
    config's strata, then "unknown"); ``totals[event metric]`` [n] window
    totals; ``entry`` [n] entry buckets (default 0) and ``D`` completed
    buckets for the arrival model; ``activity`` [n] pre_activity (the
    stratum's activity); ``pre[metric]`` [n] pre-period values, NaN where
    missing.
    """
    variant = np.asarray(variant, int)
    stratum = np.asarray(stratum, int)
    n_units = len(variant)
    entry = np.zeros(n_units, int) if entry is None else np.asarray(entry, int)
    V, S1 = len(cfg.variants), len(cfg.strata_edges)  # S strata + unknown
    pre = pre or {}
    cells: dict = {}
    extra: dict = {}
    tails: dict = {}

    def sums(vals: list[np.ndarray]) -> list[list[tuple]]:
        return [[tuple(float(x[(variant == v) & (stratum == s)].sum()) for x in vals)
                 for s in range(S1)] for v in range(V)]

    for spec in cfg.metrics:
        if spec.kind == "ratio":
            t, d = totals[spec.numerator], totals[spec.denominator]
            y = _winsorize(t, spec)
            x = pre.get(spec.numerator, np.full(n_units, np.nan))
            ex = [d, d * d, y * d] + ([t, t * t, t * d] if _capped(spec) else [])
            # CUPED for a ratio: the 12 sums over the units with both pre values
            xm = pre.get(spec.numerator, np.full(n_units, np.nan))
            xd = pre.get(spec.denominator, np.full(n_units, np.nan))
            both = np.isfinite(xm) & np.isfinite(xd)
            xm0, xd0 = np.where(both, xm, 0.0), np.where(both, xd, 0.0)
            h = both.astype(float)
            ex += [h, xm0, xd0, xm0 * xm0, xd0 * xd0, xm0 * xd0, xm0 * y, xm0 * d, xd0 * y,
                   xd0 * d, h * y, h * d]
            extra[spec.name] = sums(ex)
        else:
            t = totals[spec.name]
            y = (t > spec.threshold).astype(float) if spec.kind == "conversion" \
                else _winsorize(t, spec)
            x = pre.get(spec.name, np.full(n_units, np.nan))
            if spec.kind == "sum":
                if _capped(spec):
                    extra[spec.name] = sums([t, t * t])
                tails[spec.name] = [_sketch(t[variant == v]) for v in range(V)]
        has = np.isfinite(x)
        x0 = np.where(has, x, 0.0)
        c = sums([np.ones(n_units), y, y * y, has.astype(float), x0, x0 * x0, x0 * y,
                  np.where(has, y, 0.0)])
        cells[spec.name] = [[(int(r[0]), *r[1:3], int(r[3]), *r[4:]) for r in row]
                            for row in c]
    arrivals = tuple({int(d): int(((stratum == s) & (entry == d)).sum())
                      for d in np.unique(entry[stratum == s])} for s in range(S1))
    act = np.zeros(n_units) if activity is None else np.asarray(activity, float)
    known = np.ones(n_units, bool) if activity is not None else np.zeros(n_units, bool)
    by_v = {cfg.variants[v]: int((variant == v).sum()) for v in range(V)}
    return ExperimentSnapshot(
        experiment_id=cfg.experiment_id, config=cfg, variants=tuple(cfg.variants),
        n_strata_total=S1, started_at=T0, max_ts=T0 + (D + 1) * DAY,
        watermark=T0 + D * DAY, D=D, arrivals=arrivals,
        activity_sum=tuple(float(act[(stratum == s) & known].sum()) for s in range(S1)),
        activity_n=tuple(int(((stratum == s) & known).sum()) for s in range(S1)),
        exposed=dict(by_v), matured=dict(by_v), cells=cells, counters={},
        extra_cells=extra, tails=tails)


def _sketch(t: np.ndarray) -> dict[int, int]:
    out: dict[int, int] = {}
    for b in (tail_bucket(float(v)) for v in t):
        out[b] = out.get(b, 0) + 1
    return out
