"""From experiment snapshots to the kernels' batched arrays, and back.

One *problem* is one (experiment, metric). ``build_batch`` pads every problem
of a set of snapshots into one ``kernels.data.ModelData`` (control first, then
the treatments in config order; the activity strata, then the "unknown
activity" stratum when any unit lacks ``pre_activity``). ``records`` turns the
kernels' numeric summaries into estimate records (docs/architecture.md#the-model,
``schemas/estimate.schema.json``), each with its experiment's ``data_quality``
(``streams.state.data_quality``). ``analyze`` and the streaming sampler both
go through here, so they publish the same thing for the same state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import novelty as novelty_kernel
from kernels import ratio as ratio_kernel
from kernels.batching import stack_draws
from kernels.data import ModelData, make_data
from kernels.summary import interval as summary_interval
from kernels.summary import summarize
from kernels.tail import merge as merge_tails
from kernels.tail import tail_summary
from streams.state.data_quality import data_quality
from streams.state.semantics import ExperimentSnapshot, age_edges_ms, age_tracking, fine_parent

SCHEMA_VERSION = 1


#: The chains of a metric's model *without* its covariate are stored under
#: ``<metric>#nocov`` ('#' is not allowed in a metric name): they measure what
#: the covariate bought (``variance_reduction.sd_ratio``), and are never published.
SHADOW_SUFFIX = "#nocov"

#: The chains of a metric's model of its totals in exposure-age bin b (issue
#: 19) are stored under ``<metric>#age<b>``; they give ``by_exposure_age``
#: and are never published on their own.
AGE_SUFFIX = "#age"

#: A capped metric's model of its *uncapped* window totals (issue 26) is
#: stored under ``<metric>#uncapped``: it gives the estimate's ``uncapped``
#: block and is never published on its own.
UNCAPPED_SUFFIX = "#uncapped"

#: A ratio metric's denominator model (issue 26, ``kernels.ratio``) is stored
#: under ``<metric>#den``; the ratio's own chains (``<metric>``) model the
#: linearized numerator L = M − R̂·D. Never published on its own.
DEN_SUFFIX = "#den"

#: the names of the extra problems' parts (``Problem.part``) and their suffixes
PART_SUFFIX = {"uncapped": UNCAPPED_SUFFIX, "den": DEN_SUFFIX}


@dataclass(frozen=True)
class Problem:
    """Where a problem's rows live in the batch and what they mean."""

    experiment_id: str
    metric: str
    direction: int  # +1 higher is better, -1 lower is better
    order: tuple[int, ...]  # snapshot variant index for batch row 0 (control), 1, …
    strata: tuple[int, ...]  # snapshot stratum index for batch column 0, 1, …
    covariate: bool = False  # the model adjusts for the metric's pre-experiment value
    #: the same data without the covariate, run beside a problem that has one
    shadow: bool = False
    #: the model of the units' totals in this exposure-age bin (issue 19)
    age_bin: int | None = None
    #: the metric's kind (``MetricSpec.kind``: "sum", "conversion", "ratio")
    kind: str = "sum"
    #: an extra problem of the metric (issue 26): "uncapped" (a capped metric's
    #: uncapped totals) or "den" (a ratio's denominator); None for the metric's own
    part: str | None = None
    #: a ratio's linearization constant R̂ (the matured units' pooled ΣM/ΣD)
    #: for the problems that model L = M − R̂·D (the ratio's own and its uncapped one)
    rhat: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(experiment_id, chain name): the name its chains are stored under."""
        if self.age_bin is not None:
            return self.experiment_id, f"{self.metric}{AGE_SUFFIX}{self.age_bin}"
        if self.part is not None:
            return self.experiment_id, self.metric + PART_SUFFIX[self.part]
        return self.experiment_id, self.metric + (SHADOW_SUFFIX if self.shadow else "")

    @property
    def published(self) -> bool:
        """Its rows become estimate records (shadows, age bins and the kinds'
        extra problems only feed them)."""
        return not self.shadow and self.age_bin is None and self.part is None

    @property
    def linearized(self) -> bool:
        """It models a ratio's linearized numerator (recombined with ``#den``)."""
        return self.kind == "ratio" and self.part != "den"


def chain_names(cfg) -> list[str]:
    """Every chain name an experiment may have: its metrics, and their
    covariate-free shadows unless covariates are off."""
    names = list(cfg.metric_names)
    if _covariates_on(cfg):
        names += [m + SHADOW_SUFFIX for m in cfg.metric_names]
    if age_tracking(cfg):
        B = len(age_edges_ms(cfg)) - 1
        names += [f"{m.name}{AGE_SUFFIX}{b}" for m in cfg.metrics if _kind(m) == "sum"
                  for b in range(B)]
    names += [m.name + UNCAPPED_SUFFIX for m in cfg.metrics if is_capped(m)]
    names += [m.name + DEN_SUFFIX for m in cfg.metrics if _kind(m) == "ratio"]
    return names


def _kind(spec) -> str:
    return getattr(spec, "kind", "sum") or "sum"


def is_capped(spec) -> bool:
    """The metric winsorizes its window totals (a sum's, or a ratio's numerator)."""
    bounds = (getattr(spec, "cap_lower", None), getattr(spec, "cap_upper", None))
    return _kind(spec) in ("sum", "ratio") and any(b is not None for b in bounds)


def _spec(cfg, metric: str):
    return next(m for m in cfg.metrics if m.name == metric)


def pooled_ratio(snap: ExperimentSnapshot, metric: str, uncapped: bool = False) -> float:
    """R̂ = ΣM / ΣD over every matured unit of the ratio metric (all arms and
    strata; ΣM of the uncapped numerator totals with ``uncapped``); 0 when ΣD = 0."""
    extra = snap.extra_cells.get(metric) or []
    sm = sd = 0.0
    for v, row in enumerate(snap.cells[metric]):
        for s, c in enumerate(row):
            e = extra[v][s] if extra else (0.0, 0.0, 0.0)
            sm += e[3] if uncapped else c[1]
            sd += e[0]
    return sm / sd if sd else 0.0


def _covariates_on(cfg) -> bool:
    return cfg.covariates != "off"


def _cell(c) -> tuple:
    """A cell as the 8 sums (n, Σy, Σy², n_x, Σx, Σx², Σxy, Σy over units with x)."""
    return tuple(c) if len(c) >= 8 else (*c[:3], 0, 0.0, 0.0, 0.0, 0.0)


def uses_covariate(snap: ExperimentSnapshot, metric: str) -> bool:
    """The covariate enters the metric's model: covariates not off, the metric
    is not a ratio (its cells do not carry the denominator's covariate sums
    that L = M − R̂·D would need), and some matured unit has a
    pre-experiment value of the metric."""
    if _kind(_spec(snap.config, metric)) == "ratio":
        return False
    return _covariates_on(snap.config) and any(
        _cell(c)[3] > 0 for row in snap.cells[metric] for c in row)


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
    out = []
    for m in cfg.metrics:
        d = -1 if m.direction == "decrease" else 1
        kind = _kind(m)
        base = dict(experiment_id=snap.experiment_id, metric=m.name, direction=d, order=order,
                    strata=strata, kind=kind)
        if kind == "ratio":
            out.append(Problem(**base, rhat=pooled_ratio(snap, m.name)))
            out.append(Problem(**base, part="den"))
            if is_capped(m):
                out.append(Problem(**base, part="uncapped",
                                   rhat=pooled_ratio(snap, m.name, uncapped=True)))
            continue
        if uses_covariate(snap, m.name):
            out.append(Problem(**base, covariate=True))
            out.append(Problem(**base, shadow=True))
        else:
            out.append(Problem(**base))
        if is_capped(m):
            out.append(Problem(**base, part="uncapped"))
        if kind == "sum" and snap.age_cells.get(m.name):
            B = len(age_edges_ms(cfg)) - 1
            out += [Problem(**base, age_bin=b) for b in range(B)]
    return out


def problem_cells(snap: ExperimentSnapshot, prob: Problem) -> list[list[tuple]]:
    """[variant][stratum] 8-sum cells of the outcome the problem models:
    the snapshot's cells for a sum or a conversion (and a capped sum: its
    capped totals); a capped metric's ``uncapped`` part: (n, Σt, Σt²) of its
    uncapped totals; a ratio: L = M − R̂·D (``kernels.ratio.linearized_cell``),
    its ``den`` part: (n, ΣD, ΣD²). Exposure-age bins are not here
    (``age_cells_by_stratum``)."""
    cells = snap.cells[prob.metric]
    extra = snap.extra_cells.get(prob.metric)
    zeros = (0, 0.0, 0.0, 0.0, 0.0)
    if prob.kind == "ratio":
        out = []
        for v, row in enumerate(cells):
            r = []
            for s, c in enumerate(row):
                e = extra[v][s] if extra else (0.0,) * 6
                if prob.part == "den":
                    r.append((c[0], e[0], e[1], *zeros))
                elif prob.part == "uncapped":  # (ΣD, ΣD², ΣtD) with t the uncapped M
                    r.append(ratio_kernel.linearized_cell((c[0], e[3], e[4]), (e[0], e[1], e[5]),
                                                          prob.rhat or 0.0))
                else:
                    r.append(ratio_kernel.linearized_cell(c, e, prob.rhat or 0.0))
            out.append(r)
        return out
    if prob.part == "uncapped":
        if not extra:  # no uncapped sums kept (yet): the cells are all there is
            return [[(c[0], c[1], c[2], *zeros) for c in row] for row in cells]
        return [[(c[0], e[0], e[1], *zeros) for c, e in zip(row, erow, strict=True)]
                for row, erow in zip(cells, extra, strict=True)]
    return cells


def effect_cells(snap: ExperimentSnapshot, metric: str) -> list[list[tuple]]:
    """[variant][stratum] (n, Σy, Σy²) of a per-unit outcome whose mean
    difference is, to first order, the metric's effect (for the decisions'
    scale and forecast): the modelled cells for a sum or a conversion; for a
    ratio L / D̄ (L = M − R̂·D, D̄ the pooled mean of D), since
    R̂_k − R_k ≈ L̄_k / D̄ (the delta method)."""
    spec = _spec(snap.config, metric)
    if _kind(spec) != "ratio":
        return [[tuple(c[:3]) for c in row] for row in snap.cells[metric]]
    prob = Problem(snap.experiment_id, metric, 1, (), (), kind="ratio",
                   rhat=pooled_ratio(snap, metric))
    cells = problem_cells(snap, prob)
    extra = snap.extra_cells.get(metric) or []
    n = sum(c[0] for row in cells for c in row)
    sd = sum(e[0] for row in extra for e in row)
    dbar = sd / n if n and sd else 1.0
    return [[(c[0], c[1] / dbar, c[2] / (dbar * dbar)) for c in row] for row in cells]


def window_of(prob: Problem, fresh: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a problem keeps of its draws [C, T, …] (``kernels.batching.unpad_draws``):
    the per-stratum control means ``mu0`` only for a ratio's problems (they
    are recombined, ``kernels.ratio``), and for the linearized ones the R̂
    each draw was made with (``rhat`` [C, T])."""
    out = dict(fresh)
    if prob.kind != "ratio":
        out.pop("mu0", None)
    if prob.linearized:
        out["rhat"] = np.full(fresh["adj_effect"].shape[:2], float(prob.rhat or 0.0))
    return out


def matured_pair_weights(snap: ExperimentSnapshot, prob: Problem) -> np.ndarray:
    """[K, S] each (control, treatment k) pair's matured shares of the
    problem's strata (``kernels.estimands.matured_weights``, from the snapshot)."""
    cells = snap.cells[prob.metric]
    n = np.array([[cells[v][s][0] for s in prob.strata] for v in prob.order], float)
    pair = n[:1] + n[1:]
    tot = pair.sum(-1, keepdims=True)
    return np.where(tot > 0, pair / np.maximum(tot, 1.0), 1.0 / len(prob.strata))


def summarize_windows(problems: list[Problem], windows: list[dict | None], adjustable,
                      snaps: list[ExperimentSnapshot], iterations, computed_at: int,
                      min_draws: int = 1) -> list[dict]:
    """Estimate records from each problem's window of draws [C, T, …] (None:
    none yet): a ratio's problem is first recombined with its ``#den``
    (``kernels.ratio.ratio_window``); problems whose windows share a shape
    are summarised in one batch (``kernels.summary.summarize``); then
    ``records``. The streaming sampler and ``analyze`` both come here."""
    snap_of = {s.experiment_id: s for s in snaps}
    index = {p.key: i for i, p in enumerate(problems)}
    adjustable = np.asarray(adjustable, bool)
    wins: list[dict | None] = list(windows)
    for i, p in enumerate(problems):
        if not p.linearized or windows[i] is None:
            continue
        j = index.get((p.experiment_id, p.metric + DEN_SUFFIX))
        if j is None or windows[j] is None:
            wins[i] = None
            continue
        wins[i] = ratio_kernel.ratio_window(windows[i], windows[j],
                                            matured_pair_weights(snap_of[p.experiment_id], p),
                                            bool(adjustable[i]))
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(wins):
        if w is not None and w["tau"].shape[1] >= max(min_draws, 1):
            groups.setdefault(w["tau"].shape, []).append(i)
    rows: list[list[dict] | None] = [None] * len(problems)
    for shape, idx in groups.items():
        trace = stack_draws([wins[i] for i in idx])
        summary = summarize(trace, adjustable=adjustable[idx],
                            smask=np.ones((len(idx), shape[-1]), bool),
                            direction=[problems[i].direction for i in idx])
        for i, r in zip(idx, summary, strict=True):
            rows[i] = r
            if problems[i].linearized:
                _attach_ratios(r, wins[i])
    return records(rows, problems, snap_of, iterations, computed_at)


def _attach_ratios(rows: list[dict], win: dict[str, np.ndarray]) -> None:
    """Each treatment's row gets the pair's arm ratios (adjusted and naive
    per-draw intervals) under ``ratio_arms``."""
    def iv(name: str, k: int) -> dict:
        x = summary_interval(np.moveaxis(win[name], 2, 0)[k])
        return {key: _num(x[key]) for key in ("mean", "sd", "lo", "hi")}

    for k, row in enumerate(rows):
        row["ratio_arms"] = {"control": iv("ratio_control", k), "arm": iv("ratio_arm", k)}


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def age_cells_by_stratum(snap: ExperimentSnapshot, metric: str) -> list[list[list[tuple]]]:
    """[variant][activity stratum][bin] = (n, Σy_b, Σy_b²): the exposure-age
    cells summed over the fine strata of each activity stratum."""
    fine = snap.age_cells[metric]
    parent = fine_parent(snap.config)
    B = (len(fine[0][0]) - 2) // 2
    out = [[[[0, 0.0, 0.0] for _ in range(B)] for _ in range(snap.n_strata_total)]
           for _ in fine]
    for v, row in enumerate(fine):
        for f, c in enumerate(row):
            for b in range(B):
                acc = out[v][parent[f]][b]
                acc[0] += c[0]
                acc[1] += c[1 + 2 * b]
                acc[2] += c[2 + 2 * b]
    return [[[tuple(x) for x in s] for s in v] for v in out]


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
    any_cov = any(p.covariate for _, p in items)
    cov = {k: np.zeros((P, K1, S)) for k in ("nx", "sx", "sxx", "sxy", "sy_x")}
    age_by = {}
    for i, (snap, prob) in enumerate(items):
        cells = problem_cells(snap, prob)
        if prob.age_bin is not None:
            k = (snap.experiment_id, prob.metric)
            if k not in age_by:
                age_by[k] = age_cells_by_stratum(snap, prob.metric)
            cells = [[s[prob.age_bin] for s in v] for v in age_by[k]]
        for r, v in enumerate(prob.order):
            kmask[i, r] = True
            for c, s in enumerate(prob.strata):
                cell = _cell(cells[v][s])
                n[i, r, c], sy[i, r, c], syy[i, r, c] = cell[:3]
                if prob.covariate:
                    for j, k in enumerate(("nx", "sx", "sxx", "sxy", "sy_x")):
                        cov[k][i, r, c] = cell[3 + j]
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
                     smask=smask, kmask=kmask, target=target, cov=cov if any_cov else None,
                     xp=xp)
    return data, [p for _, p in items]


def records(summary: list[list[dict]], problems: list[Problem],
            snaps: dict[str, ExperimentSnapshot], iteration, computed_at: int) -> list[dict]:
    """Estimate records, one per problem × treatment, from ``kernels.summary``
    (summary rows may be None for problems with too few draws yet). Shadow
    problems give their posterior sd to ``variance_reduction`` and are not
    published."""
    out = []
    shadow_rows = {(p.experiment_id, p.metric): rows
                   for p, rows in zip(problems, summary, strict=True)
                   if p.shadow and rows is not None}
    age_rows: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for p, rows in zip(problems, summary, strict=True):
        if p.age_bin is not None and rows is not None:
            age_rows.setdefault((p.experiment_id, p.metric), {})[p.age_bin] = rows
    uncapped_rows = {(p.experiment_id, p.metric): rows
                     for p, rows in zip(problems, summary, strict=True)
                     if p.part == "uncapped" and rows is not None}
    for i, (prob, rows) in enumerate(zip(problems, summary, strict=True)):
        if not prob.published or rows is None:
            continue
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
                # K > 1 treatments: P(each variant is the best), from the adjusted draws
                "p_best": ({snap.variants[v]: row["p_best"][r] for r, v in enumerate(prob.order)}
                           if len(prob.order) > 2 and "p_best" in row else None),
                "naive": row["naive"],
                "strata": strata,
                "variance_reduction": _variance_reduction(
                    prob, row, k, cells, pair, shadow_rows.get((prob.experiment_id, prob.metric))),
                **_exposure_age(snap, prob, row, k, pair,
                                age_rows.get((prob.experiment_id, prob.metric))),
                **_kind_fields(snap, prob, row, k, pair,
                               uncapped_rows.get((prob.experiment_id, prob.metric))),
                "units": {"exposed": dict(snap.exposed), "matured": dict(snap.matured)},
                "diagnostics": {**row["diagnostics"], "iteration": int(it)},
                "watermark": {"event_time": snap.watermark, "completed_buckets": snap.D},
                "computed_at": computed_at,
                "data_quality": data_quality(snap),  # per experiment, in each of its records
            })
    return out


def _kind_fields(snap: ExperimentSnapshot, prob: Problem, row: dict, k: int,
                 pair: tuple[int, int], uncapped: list[dict] | None) -> dict:
    """What the metric's kind adds to a record (issue 26): ``kind``; ``cap``
    and ``uncapped`` (the uncapped totals' adjusted effect, from the
    ``#uncapped`` chains; null until they have draws) for a capped metric;
    ``tail`` for a sum; ``ratio`` (the pooled R̂ and each arm's ratio) for
    a ratio. Null where they do not apply."""
    spec = _spec(snap.config, prob.metric)
    capped = is_capped(spec)
    out: dict = {"kind": prob.kind, "cap": None, "uncapped": None, "tail": None, "ratio": None}
    if capped:
        out["cap"] = {"lower": spec.cap_lower, "upper": spec.cap_upper}
        if uncapped is not None:
            u = uncapped[k]
            out["uncapped"] = {"effect": _interval(u["adjusted"]["effect"]),
                               "lift": _interval(u["adjusted"]["lift"]),
                               "p_positive": u["adjusted"]["p_positive"],
                               "naive": {"effect": _interval(u["naive"]["effect"]),
                                         "lift": _interval(u["naive"]["lift"])}}
    if prob.kind == "sum":
        out["tail"] = tail_of(snap, prob.metric, pair, capped)
    if prob.kind == "ratio":
        names = (snap.variants[pair[0]], snap.variants[pair[1]])
        arms = row.get("ratio_arms") or {}
        out["ratio"] = {
            "pooled": prob.rhat,
            "adjusted": {names[0]: arms.get("control"), names[1]: arms.get("arm")},
            "naive": {names[i]: naive_ratio(snap, prob.metric, v) for i, v in enumerate(pair)},
        }
    return out


def naive_ratio(snap: ExperimentSnapshot, metric: str, v: int) -> float | None:
    """The matured units' ΣM / ΣD of variant index ``v`` (all strata); None without ΣD."""
    extra = snap.extra_cells.get(metric)
    if not extra:
        return None
    sm = sum(c[1] for c in snap.cells[metric][v])
    sd = sum(e[0] for e in extra[v])
    return sm / sd if sd else None


def tail_of(snap: ExperimentSnapshot, metric: str, pair: tuple[int, int], capped: bool
            ) -> dict | None:
    """``tail`` of a sum metric's record: the sketch of the matured units'
    uncapped window totals (``snapshot.tails``, ``kernels.tail``) of the
    pair's two arms together (``pooled``) and of each (``by_variant``); None
    when the state keeps no sketch of the metric."""
    sketches = snap.tails.get(metric)
    if not sketches:
        return None
    extra = snap.extra_cells.get(metric)

    def sum_y2(v: int) -> float:
        if capped and extra:
            return float(sum(e[1] for e in extra[v]))
        return float(sum(c[2] for c in snap.cells[metric][v]))

    by = {snap.variants[v]: tail_summary(sketches[v], sum_y2(v)) for v in pair}
    pooled = tail_summary(merge_tails(*(sketches[v] for v in pair)),
                          sum(sum_y2(v) for v in pair))
    return {"pooled": pooled, "by_variant": by}


def _variance_reduction(prob: Problem, row: dict, k: int, cells, pair: tuple[int, int],
                        shadow: list[dict] | None) -> dict:
    """What the covariate did for one treatment's estimate: whether it was
    used, the share of the pair's matured units that have it, the fitted
    slope, and the ratio of the effect's posterior sd with it to the sd of
    the same data's model without it (the shadow chains; measured, not the
    √(1−ρ²) it should come near). Ratios are null until the shadow has draws."""
    tot = [_cell(cells[v][s]) for v in pair for s in prob.strata]
    n = sum(c[0] for c in tot)
    nx = sum(c[3] for c in tot)
    out: dict = {"used": prob.covariate,
                 "share_with_covariate": nx / n if n else None,
                 "slope": row["slope"] if prob.covariate else None,
                 "sd_ratio": {"adjusted": None, "naive": None}}
    if prob.covariate and shadow is not None:
        for block in ("adjusted", "naive"):
            a, b = row[block]["effect"]["sd"], shadow[k][block]["effect"]["sd"]
            out["sd_ratio"][block] = a / b if a is not None and b else None
    return out


def _exposure_age(snap: ExperimentSnapshot, prob: Problem, row: dict, k: int,
                  pair: tuple[int, int], age: dict[int, list[dict]] | None) -> dict:
    """``by_exposure_age`` and ``novelty`` of one treatment (issue 19; both
    null when the experiment keeps no exposure-age bins).

    Per bin: the adjusted effect and lift of the bin's own model (the
    ``#age<b>`` chains: within-stratum, weighted by population shares),
    null until those chains have draws. ``novelty``: the first bin's lift
    minus the last's within fine strata (``kernels.novelty``): ``contrast``
    and ``p_positive`` weight strata by their information (the test),
    ``difference`` by population shares (the size)."""
    if not age_tracking(snap.config) or prob.metric not in snap.age_cells:
        return {"by_exposure_age": None, "novelty": None}
    edges = age_edges_ms(snap.config)
    bins = []
    for b in range(len(edges) - 1):
        r = age[b][k] if age is not None and b in age else None
        adj = r["adjusted"] if r is not None else None
        bins.append({"from_s": edges[b] // 1000, "to_s": edges[b + 1] // 1000,
                     "lift": _interval(adj["lift"]) if adj else None,
                     "effect": _interval(adj["effect"]) if adj else None})
    return {"by_exposure_age": bins, "novelty": novelty_of(snap, prob, row, pair)}


def _interval(x: dict) -> dict:
    return {"mean": x["mean"], "sd": x.get("sd"), "lo": x["lo"], "hi": x["hi"]}


def novelty_of(snap: ExperimentSnapshot, prob: Problem, row: dict, pair: tuple[int, int]) -> dict:
    """The novelty contrast of the (control, treatment) ``pair`` from the
    snapshot's fine-stratum age cells; population shares from the main
    model's ``row`` (its strata's posterior mean shares)."""
    fine = snap.age_cells[prob.metric]
    cells = [fine[v] for v in pair]  # [2][F+1] tuples
    B = (len(cells[0][0]) - 2) // 2
    n = np.array([[c[0] for c in arm] for arm in cells], float)
    sy = np.array([[[c[1 + 2 * b] for b in range(B)] for c in arm] for arm in cells])
    syy = np.array([[[c[2 + 2 * b] for b in range(B)] for c in arm] for arm in cells])
    s0L = np.array([[c[-1] for c in arm] for arm in cells], float)
    delta, var, ok = novelty_kernel.per_stratum(n, sy, syy, s0L)
    test = novelty_kernel.combine(delta[0], var[0], ok[0])
    pi = np.zeros(snap.n_strata_total)
    for c, s in enumerate(prob.strata):
        sh = row["strata"][c]["share_population"]
        pi[s] = sh["mean"] if sh and sh.get("mean") is not None else 0.0
    w = novelty_kernel.population_weights(n, fine_parent(snap.config), pi)
    size = novelty_kernel.combine(delta[0], var[0], ok[0], weights=w)

    def num(x) -> float | None:
        x = float(x)
        return x if np.isfinite(x) else None

    def block(c: dict) -> dict:
        return {k: num(c[k]) for k in ("mean", "sd", "lo", "hi")}

    return {"difference": block(size), "p_positive": num(test["p_positive"]),
            "contrast": {**block(test), "strata_used": int(test["strata_used"])},
            "strata": int(len(n[0]))}
