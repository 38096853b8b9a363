"""From experiment snapshots to the kernels' batched arrays, and back.

One *problem* is one (experiment, metric). ``build_batch`` pads every problem
of a set of snapshots into one ``kernels.data.ModelData`` (control first, then
the treatments in config order; the activity strata, then the "unknown
activity" stratum when any unit lacks ``pre_activity``). ``records`` turns the
kernels' numeric summaries into estimate records (DESIGN §6,
``schemas/estimate.schema.json``), each with its experiment's ``data_quality``
(``streams.data_quality``). ``analyze`` and the streaming sampler both
go through here, so they publish the same thing for the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.data import ModelData, make_data
from streams.data_quality import data_quality
from streams.semantics import ExperimentSnapshot

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """Where a problem's rows live in the batch and what they mean."""

    experiment_id: str
    metric: str
    direction: int  # +1 higher is better, -1 lower is better
    order: tuple[int, ...]  # snapshot variant index for batch row 0 (control), 1, …
    strata: tuple[int, ...]  # snapshot stratum index for batch column 0, 1, …


def _strata_in_use(snap: ExperimentSnapshot) -> tuple[int, ...]:
    S = snap.config.n_strata
    unknown = S  # index of the "unknown activity" stratum
    used = list(range(S))
    if unknown < snap.n_strata_total and (
        sum(snap.arrivals[unknown].values()) > 0
        or any(c[unknown][0] > 0 for cells in snap.cells.values() for c in cells)
    ):
        used.append(unknown)
    return tuple(used) if used else (unknown,)


def problems_of(snap: ExperimentSnapshot) -> list[Problem]:
    cfg = snap.config
    order = (snap.variants.index(cfg.control),) + tuple(
        i for i, v in enumerate(snap.variants) if v != cfg.control
    )
    strata = _strata_in_use(snap)
    return [
        Problem(snap.experiment_id, m.name, -1 if m.direction == "decrease" else 1, order, strata)
        for m in cfg.metrics
    ]


def _activity(snap: ExperimentSnapshot, s: int) -> float:
    """Mean pre_activity of the stratum's units; the edges' midpoint before any;
    the experiment's overall mean for the unknown stratum."""
    if snap.activity_n[s] > 0:
        return snap.activity_sum[s] / snap.activity_n[s]
    edges = snap.config.strata_edges
    if s < len(edges) - 1:
        return 0.5 * (edges[s] + min(edges[s + 1], 28.0))
    tot_n = sum(snap.activity_n)
    return sum(snap.activity_sum) / tot_n if tot_n else 14.0


def build_batch(snaps: list[ExperimentSnapshot], xp=np) -> tuple[ModelData, list[Problem]]:
    """All problems of ``snaps``, padded into one ModelData."""
    items = [(snap, prob) for snap in snaps for prob in problems_of(snap)]
    P = len(items)
    K1 = max(len(p.order) for _, p in items)
    S = max(len(p.strata) for _, p in items)
    n = np.zeros((P, K1, S))
    sy = np.zeros((P, K1, S))
    syy = np.zeros((P, K1, S))
    arrived = np.zeros((P, S))
    dsum = np.zeros((P, S))
    act = np.ones((P, S))
    target = np.full((P, S), np.nan)
    smask = np.zeros((P, S), bool)
    kmask = np.zeros((P, K1), bool)
    D = np.zeros(P)
    bucket_days = np.ones(P)
    p_sd = np.full(P, 0.5)
    for i, (snap, prob) in enumerate(items):
        cells = snap.cells[prob.metric]
        for r, v in enumerate(prob.order):
            kmask[i, r] = True
            for c, s in enumerate(prob.strata):
                n[i, r, c], sy[i, r, c], syy[i, r, c] = cells[v][s][:3]
        for c, s in enumerate(prob.strata):
            smask[i, c] = True
            done = [(d, a) for d, a in snap.arrivals[s].items() if d < snap.D]
            arrived[i, c] = sum(a for _, a in done)
            dsum[i, c] = sum(d * a for d, a in done)
            act[i, c] = _activity(snap, s)
            if snap.config.target_shares is not None:
                ts = snap.config.target_shares
                target[i, c] = ts[s] if s < len(ts) else 0.0
        D[i] = snap.D
        bucket_days[i] = snap.config.bucket_seconds / 86_400
        p_sd[i] = snap.config.prior_sd_logit_p
    data = make_data(n, sy, syy, arrived, dsum, D, act, bucket_days=bucket_days, p_sd=p_sd,
                     smask=smask, kmask=kmask, target=target, xp=xp)
    return data, [p for _, p in items]


def records(summary: list[list[dict]], problems: list[Problem],
            snaps: dict[str, ExperimentSnapshot], iteration, computed_at: int) -> list[dict]:
    """Estimate records, one per problem × treatment, from ``kernels.summary``."""
    out = []
    for i, (prob, rows) in enumerate(zip(problems, summary, strict=True)):
        snap = snaps[prob.experiment_id]
        cfg = snap.config
        cells = snap.cells[prob.metric]
        edges = cfg.strata_edges
        for k, row in enumerate(rows[: len(prob.order) - 1]):
            v_idx = prob.order[k + 1]
            pair = (prob.order[0], v_idx)
            matured_s = [sum(cells[v][s][0] for v in pair) for s in prob.strata]
            tot = sum(matured_s)
            strata = []
            for c, s in enumerate(prob.strata):
                st = row["strata"][c]
                strata.append({
                    "stratum": s,
                    "activity": [edges[s], edges[s + 1]] if s < len(edges) - 1 else None,
                    "n_exposed": int(sum(snap.arrivals[s].values())),
                    "n_matured": int(matured_s[c]),
                    "share_observed": matured_s[c] / tot if tot else None,
                    "share_population": st["share_population"],
                    "effect": st["effect"],
                })
            it = iteration[i] if hasattr(iteration, "__len__") else iteration
            out.append({
                "schema_version": SCHEMA_VERSION,
                "experiment_id": prob.experiment_id,
                "metric": prob.metric,
                "variant": snap.variants[v_idx],
                "control": cfg.control,
                "adjustment": row["adjustment"],
                "adjusted": row["adjusted"],
                "naive": row["naive"],
                "strata": strata,
                "units": {"exposed": dict(snap.exposed), "matured": dict(snap.matured)},
                "diagnostics": {**row["diagnostics"], "iteration": int(it)},
                "watermark": {"event_time": snap.watermark, "completed_buckets": snap.D},
                "computed_at": computed_at,
                "data_quality": data_quality(snap),  # per experiment, in each of its records
            })
    return out
