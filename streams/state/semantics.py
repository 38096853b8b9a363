"""The event semantics of liftstream, as one pure-Python reference reducer.

This module is the *definition* of what an event does to an experiment's state
(docs/architecture.md#contracts, #state). Two things use it:

* the offline ``liftstream analyze`` tool, which folds a file of events with it;
* the ingest worker that owns a source partition (DESIGN §3 "Where the rules
  run", issue 25): ``streams.state.partition_store.apply_rows_owned`` runs
  ``ExperimentState`` on what a call needs, read from Redis, and commits what
  it changed in one fenced MULTI/EXEC; the tests check that the state
  committed to Redis, read back, equals this module folding the same calls,
  bit for bit.

So it is deliberately plain: no I/O, no numpy. The float aggregates are kept
per source partition (``Shard``) and added in sorted source order, in memory
and by Redis's readers alike, so the read model does not depend on how the
partitions interleaved.

**Order independence** (docs/architecture.md#state). Everything an event's fate depends on is
a function of its own *source partition* (``"<topic>|<partition>"``; a unit's
events share one, key = unit_id), never of how partitions interleave:

* the partition clock ``clk_p`` = max event ts seen on p (every valid event of
  p counts, whichever experiment it is for; dead letters such as events of an
  unregistered experiment do not), or the wall clock once p is
  caught up and idle (``Reducer.advance``). Each call gets the clock after
  each of its events (``clk``) and after the whole source batch (``clk_end``);
* a unit *matures* once ``close = exposure_ts + W <= clk_p - L`` and is *final*
  once ``close + H <= clk_p - L`` (H = ``correction_seconds``).

So the state after a set of events equals the fold over the time-sorted
events, whatever the partition interleaving, as long as each partition's own
disorder stays within the bounds (L, H, the hold bounds): counts exactly,
float sums up to rounding.

Rules, per experiment ``e`` (times in ms; T = clk - L of the event's source):

1. Dedupe: an ``event_id`` already sighted in ``e`` *on the same partition*
   with sighting clock ``>= clk - DD`` is a ``duplicate``; otherwise its
   sighting is recorded with the partition clock ``clk`` after it (not the
   event's own ts: an event far behind its partition clock, a late correction
   or a backfill, would otherwise be forgotten at once and a re-send of it
   counted twice; issue 24, defect 1). So a re-send within DD of partition
   time after the first copy is a duplicate, however old the event. (A
   re-send keeps its key, so its partition; per-partition sightings make
   dedupe independent of other partitions' clocks.)
2. Exposure: variant not in the config -> ``unknown_variant``; ``close + H
   <= T`` -> ``too_old``, decided before anything else, dedupe included (no
   state, no sighting; ingest dead-letters it ``exposure_too_old``, so the
   dead-letter topic and ``data_quality`` agree: issue 24); unit known ->
   ``repeat_exposure`` / ``conflict``; ``ts >= end_at`` (config) -> ``after_end``
   (no state: the experiment stopped; not recorded in the routing index
   either); else the unit is created (variant, stratum,
   entry bucket, exposure ts, zero totals, pre-experiment values) ->
   ``exposures``, pending on its source partition, and the metrics held for
   it are released (rule 4).
3. Metric: name not in the config -> ``unknown_metric``; no unit yet -> held
   (rule 4); ``ts < exposure_ts`` -> ``pre_exposure``; ``ts >= close`` ->
   ``outside_window``; ``close + H <= T`` -> ``late`` (dropped); else it is
   added to the unit's total and, if the unit is already folded (whatever T
   says: T is the clock of the partition the metric came through, which may
   not be its unit's; issue 24, defect 2), to its cell as ``Σy += v, Σy² +=
   (t+v)² - t²`` (t = the total before, n unchanged) and, if the unit has a
   pre value x of the metric, ``Σxy += x·v, Σy_x += v`` -> ``corrected``; a
   unit not folded yet is folded later with the total: ``corrected`` if
   ``close <= T``, else ``metric_applied``. An event (exposure or metric)
   that reaches the record of a unit created on another source also counts
   ``cross_partition`` (``EVENT_NOTES``: besides its outcome).
4. Holds: a metric whose unit has no state is ``held`` (at most ``hold_max``
   per unit, beyond that ``expired``). The unit's exposure releases them, in
   arrival order, through rule 3 (``held`` -1, their category +1). A unit's
   held metrics expire together (``held`` -n, ``expired`` +n) once the newest
   is older than ``clk - hold_seconds`` of its partition, at the end of a call.
   Metrics *without* experiment_id that find no exposed experiment are held
   per unit by the ``Reducer`` (not an experiment) and released to every
   experiment whose first exposure of the unit arrives within the hold bound.
5. Maturation: at the end of each call, the source partition's pending units
   with ``close <= clk_end - L`` are folded into their cells in (close_ts,
   unit_id bytes) order (Redis ZSET order), at most ``fold_limit`` a call (the
   rest at the next call: one script call does bounded work). ``matured`` in
   the unit state means folded. Folding a unit adds, per metric with y = its
   total, ``n += 1, Σy += y, Σy² += y·y`` and, if it has a pre value x of the
   metric, ``nx += 1, Σx += x, Σx² += x·x, Σxy += x·y, Σy_x += y`` (in this
   order; the cell is ``(n, Σy, Σy², nx, Σx, Σx², Σxy, Σy_x)``).
   Metric kinds (issue 26; ``metric_plans``, ``outcome``): the units keep
   totals per *event metric* (``config.event_metrics``) and y in a config
   metric's cell is its per-unit outcome: a sum's total (winsorized when
   capped), a conversion's ``1.0 if t > threshold else 0.0``, a ratio's
   numerator total (capped when capped); x is the pre value of the metric's
   name (a ratio: its numerator); the cell appends the metric's extra values
   (``ExperimentSnapshot.extra_cells``). A correction of a folded unit adds,
   per config metric whose outcome reads the corrected total, its
   contribution after minus its contribution before (n unchanged; nothing
   if it did not change: a conversion that stays, a total beyond its cap);
   a plain (uncapped) sum keeps rule 3's formulas. Sum metrics also count
   the folded units' uncapped totals in the tail sketch (``tails``:
   ``kernels.tail.tail_bucket``, integer counts per source shard, added
   up by readers); a correction moves the unit from its old bucket to its
   new one. A ratio's extra values end with its covariate sums over the
   units with both pre values (``RATIO_COV_SUMS``). Exposure-age cells are
   kept for every kind (``age_cell_width``, ``age_contribution``: a
   conversion's y_b = 1 if its bin total > threshold, a ratio's M_b and D_b
   sums).
6. Retirement (bounded state, docs/architecture.md#state): a folded unit stays pending, with
   score ``close + H``; once ``close + H <= clk_end - L`` (it is final: any
   metric now would be ``late``) its record is dropped and its id added to
   the experiment's retired-unit filter (``streams.state.retired_filter``), in the
   same ZSET pass as rule 5 (one entry is folded, retired, or both, in (score,
   unit_id bytes) order; ``fold_limit`` entries a call). The routing index
   keeps the unit here (Redis lets it expire: ``state.index_ttl_ms``). Later
   events of a retired
   unit (and, with probability ≤ ``false_positive_rate``, of a new unit the
   filter mistakes for one) are not applied: an exposure counts ``retired``
   (a repeat exposure whose variant can no longer be checked); a metric
   counts ``outside_window`` if ts > T - H (then ts >= close for sure) and
   ``late`` otherwise (it may have been in the window: counted lost).

Exposure age (novelty, issue 19), only when ``age_tracking(config)`` (B =
``len(age_edges_ms) - 1`` >= 2 bins; otherwise nothing below exists): a unit
also keeps, per metric, its totals by exposure age, ``t_b`` for the metrics
with ``age = ts - exposure_ts`` in bin b (``age_bin_of``), and its fine
stratum f (``stratum_of(pre_activity, fine_edges)``). Rule 3 adds v to t_b
besides the total; a correction of a folded unit also adds to the age cell
of (metric, variant, f): ``Σy_b += v``, ``Σy_b² += (t_b+v)² - t_b²`` and
``Σy_0·y_{B-1} += v·t_{B-1}`` if b = 0, ``+= t_0·v`` if b = B-1 (in this
order, t_b the bin total before). Rule 5 adds, per metric, ``n += 1``, then
for b = 0..B-1 ``Σy_b += y_b, Σy_b² += y_b·y_b``, then ``Σy_0·y_{B-1} +=
y_0·y_{B-1}`` (``ExperimentSnapshot.age_cells``). That is a sum metric's
cell; a conversion's and a ratio's (issue 26) add ``age_contribution``
(fold: n += 1, then its values; correction: after minus before). The totals
and every other cell are unchanged by it, bit for bit.

Pre-experiment values (CUPED covariates, issue 18): an exposure's ``pre``
maps metric names to the unit's value of the metric over a pre-experiment
period. The unit keeps, per config metric, the value its *creating* exposure
carried (``UnitState.pre``, None where it had none); later exposures change
nothing, and names that are not metrics of the config are ignored (a metric
appended to the config later has no pre value for the units created
before). The state records them whatever ``config.covariates`` says: only
the model reads that setting.

Entry buckets are counted on a grid anchored at ``config.started_at`` when the
experiment has one when its first unit is created, else at the epoch, so a
bucket never depends on which unit arrived first. Without a configured start
``started_at`` is the start of the earliest entry bucket (min over units, an
order-independent value).

Resolutions of points the contract left open:

* An exposure with a variant not in the config is ``unknown_variant`` even if
  the unit is already known; it creates no state.
* ``pre_activity`` below the first edge falls in stratum 0; a config with
  fewer than two edges has no activity strata (single stratum 0 = index S).
* Routing of metrics without ``experiment_id``: to every experiment for which
  an exposure of the unit with a variant of that experiment's config arrived
  earlier on the stream; if there is none, the Reducer holds it (rule 4). A
  metric without experiment_id that overtook some but not all of its unit's
  exposures counts only for those that arrived before it (a stated bound).
* After maturation a unit keeps its totals (they are its final Y) until its
  correction horizon passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Final

from kernels.tail import tail_bucket
from schemas.records import (
    DEFAULT_EXPOSURE_AGE_BINS,
    Event,
    ExperimentConfig,
    Exposure,
    Metric,
)
from streams.state.retired_filter import RetiredFilter

#: Per-experiment counters, one per outcome category of an event (and the
#: ``EVENT_NOTES``, counted on top of an outcome).
COUNTERS: tuple[str, ...] = (
    "exposures",
    "before_start",
    "repeat_exposure",
    "conflict",
    "unknown_variant",
    "too_old",
    "after_end",
    "unknown_metric",
    "pre_exposure",
    "outside_window",
    "metric_applied",
    "corrected",
    "held",
    "expired",
    "late",
    "retired",
    "duplicate",
    "cross_partition",
)

#: Counters that note something about an event *besides* its outcome (it is
#: also counted in one of the others), so they are not part of ``events``:
#: ``cross_partition``, an event that reached a unit's record through a
#: partition other than the one whose exposure created the unit (issue 24,
#: defect 2; the order-independence bound assumes key = unit_id).
EVENT_NOTES: tuple[str, ...] = ("cross_partition",)

#: Counters whose events were not applied and are lost to the estimate (the
#: ``data_loss`` alert's numerator): past the correction horizon, held too
#: long, exposures too old to store. Dead letters add to it.
DROPPED: tuple[str, ...] = ("late", "expired", "too_old")

#: Counters kept by the Reducer (events that reach no experiment state).
REDUCER_COUNTERS: tuple[str, ...] = ("unknown_experiment", "unrouted", "unrouted_expired")


def config_ms(cfg: ExperimentConfig) -> tuple[int, int, int, int]:
    """(W, B, L, DD) in ms, checked: B > 0 (it is a divisor), the rest >= 0.

    Raises ValueError on a config that would make the semantics undefined;
    schema validation should have rejected it before it got here.
    """
    W = int(cfg.window_seconds) * 1000
    B = int(cfg.bucket_seconds) * 1000
    L = int(cfg.lateness_seconds) * 1000
    DD = int(cfg.dedupe_seconds) * 1000
    if B <= 0 or W < 0 or L < 0 or DD < 0:
        raise ValueError(
            f"experiment {cfg.experiment_id!r}: bucket_seconds must be > 0 and "
            "window/lateness/dedupe seconds >= 0"
        )
    return W, B, L, DD


def horizons_ms(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """(H, Hh, HM): correction horizon and hold horizon in ms, hold count."""
    H = int(cfg.correction_seconds) * 1000
    Hh = int(cfg.hold_seconds) * 1000
    HM = int(cfg.hold_max)
    if H < 0 or Hh < 0 or HM < 0:
        raise ValueError(f"experiment {cfg.experiment_id!r}: correction/hold bounds must be >= 0")
    return H, Hh, HM


#: Units folded (and held units expired) per call at most (rule 5).
FOLD_LIMIT = 10_000

#: The source of events applied without one (a single partition).
DEFAULT_SOURCE = "-|0"


def n_activity_strata(cfg: ExperimentConfig) -> int:
    """S: strata defined by the edges (the "unknown activity" stratum has index S)."""
    return max(len(cfg.strata_edges) - 1, 0)


def stratum_of(pre_activity: float | None, edges: tuple[float, ...]) -> int:
    """Index i with edges[i] <= x < edges[i+1]; x >= last edge -> S-1;
    x below the first edge -> 0; None (or no activity strata) -> S."""
    S = len(edges) - 1
    if S <= 0:
        return 0
    if pre_activity is None:
        return S
    x = float(pre_activity)
    i = S - 1  # the last edge at or below x (a NaN is below every edge: 0)
    while i > 0 and not x >= float(edges[i]):
        i -= 1
    return i


#: At most this many fine (novelty) strata; beyond, the fine strata are the
#: activity strata themselves (``fine_edges``).
MAX_FINE_STRATA = 64


def age_edges_ms(cfg: ExperimentConfig) -> tuple[int, ...]:
    """Edges (ms since the unit's exposure) of its exposure-age bins (issue
    19): the configured edges (default ``DEFAULT_EXPOSURE_AGE_BINS``) below
    the window W, then W. ``len - 1`` bins; a metric at age t falls in the
    last bin whose lower edge is <= t (every applied metric has 0 <= t < W).
    One bin (a window of at most the first edge) means age tracking is off:
    see ``age_tracking``."""
    W = int(cfg.window_seconds) * 1000
    bins = DEFAULT_EXPOSURE_AGE_BINS if cfg.exposure_age_bins is None else cfg.exposure_age_bins
    inner = sorted({int(e) * 1000 for e in bins if 0 < int(e) * 1000 < W})
    return (0, *inner, W)


def age_tracking(cfg: ExperimentConfig) -> bool:
    """Units keep totals by exposure age (two bins or more)."""
    return len(age_edges_ms(cfg)) >= 3


def age_bin_of(age_ms: int, edges: tuple[int, ...]) -> int:
    """Index b with edges[b] <= age < edges[b+1] (0 below the first edge,
    the last bin at or beyond the window: neither happens to an applied
    metric)."""
    for b in range(len(edges) - 2, 0, -1):
        if age_ms >= edges[b]:
            return b
    return 0


def fine_edges(cfg: ExperimentConfig) -> tuple[float, ...]:
    """Edges of the *fine* strata the novelty contrast is computed within
    (issue 19): the activity strata's edges together with every integer
    between the first and the last edge (pre_activity is a count of active
    days: one fine stratum per exact value), so each fine stratum lies in
    one activity stratum. More than ``MAX_FINE_STRATA`` of them, or fewer
    than two activity edges: the activity strata's edges."""
    edges = tuple(float(e) for e in cfg.strata_edges)
    if len(edges) < 2:
        return edges
    lo, hi = edges[0], edges[-1]
    ints = range(math.ceil(lo), math.floor(hi) + 1)
    if len(ints) > MAX_FINE_STRATA + 1:
        return edges
    out = tuple(sorted(set(edges) | {float(i) for i in ints}))
    return out if len(out) - 1 <= MAX_FINE_STRATA else edges


def fine_parent(cfg: ExperimentConfig) -> tuple[int, ...]:
    """For each fine stratum f = 0..F (F: unknown activity), the activity
    stratum it lies in (F maps to S, the unknown stratum)."""
    fe = fine_edges(cfg)
    edges = tuple(float(e) for e in cfg.strata_edges)
    F = max(len(fe) - 1, 0)
    out = [stratum_of(fe[f], edges) for f in range(F)]
    return (*out, n_activity_strata(cfg))


def bucket_of(ts: int, anchor: int, B: int) -> int:
    """Entry bucket on the grid anchored at ``anchor``: floor((ts - anchor) / B),
    never negative when the anchor is a configured start (ts before it).

    Integer floor division (all operands are < 2**53).
    """
    return max(0, (ts - anchor) // B) if anchor else ts // B


def completed_buckets(watermark: int | None, started_at: int | None, B: int,
                      end_at: int | None = None) -> int:
    """D = max(0, floor((min(watermark, end_at) - started_at) / B)); 0 before
    any data. A stopped experiment takes no new units from ``end_at`` on, so
    the buckets after it (and the one it cuts) are no evidence of the
    arrival rate: they are left out of the arrival model."""
    if watermark is None or started_at is None:
        return 0
    if end_at is not None and end_at < watermark:
        watermark = end_at
    return max(0, (watermark - started_at) // B)


_INF: Final = math.inf


def _finite(x: float, what: str) -> float:
    """float(x), rejecting NaN/inf: they would poison sums and have no
    portable text form; schemas.validate dead-letters them before."""
    v = float(x)
    if not -_INF < v < _INF:  # ``math.isfinite``, without a module attribute read a call
        raise ValueError(f"non-finite {what}: {x!r}")
    return v


#: ``MetricPlan.code``: how a unit's outcome of a config metric is made of its totals
PLAIN_SUM, CAPPED_SUM, CONVERSION, RATIO = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class MetricPlan:
    """How one config metric's cell follows a unit's event-metric totals
    (issue 26; precomputed per config by ``metric_plans``). ``e``: the event
    metric index of y and of x (a sum's or conversion's name, a ratio's
    numerator), ``d``: a ratio's denominator (-1 otherwise); ``lo``/``hi``:
    the cap (-inf/inf where none); ``n_extra``: the values appended to the
    8-value cell (``ExperimentSnapshot.extra_cells``); ``tails``: a sum
    metric, whose uncapped totals are counted in the tail sketch (every
    kind keeps exposure-age cells: ``age_cell_width``)."""

    name: str
    code: int
    e: int
    d: int = -1
    lo: float = -math.inf
    hi: float = math.inf
    threshold: float = 0.0
    capped: bool = False
    n_extra: int = 0
    tails: bool = False


def metric_plans(cfg: ExperimentConfig) -> tuple[MetricPlan, ...]:
    """One ``MetricPlan`` per config metric, in config order."""
    ev = {m: i for i, m in enumerate(cfg.event_metrics)}
    out = []
    for m in cfg.metrics:
        lo = -math.inf if m.cap_lower is None else float(m.cap_lower)
        hi = math.inf if m.cap_upper is None else float(m.cap_upper)
        if m.kind == "conversion":
            out.append(MetricPlan(m.name, CONVERSION, ev[m.name],
                                  threshold=float(m.threshold)))
        elif m.kind == "ratio":
            num, den = m.event_names
            out.append(MetricPlan(m.name, RATIO, ev[num], ev[den], lo, hi,
                                  capped=m.capped,
                                  n_extra=(6 if m.capped else 3) + RATIO_COV_SUMS))
        elif m.capped:
            out.append(MetricPlan(m.name, CAPPED_SUM, ev[m.name], -1, lo, hi, capped=True,
                                  n_extra=2, tails=True))
        else:
            out.append(MetricPlan(m.name, PLAIN_SUM, ev[m.name], tails=True))
    return tuple(out)


#: A ratio's covariate sums (CUPED for a ratio, issue 26), appended to its
#: extra values, over the units with BOTH pre values x_M (numerator) and x_D
#: (denominator): ``(n, Σx_M, Σx_D, Σx_M², Σx_D², Σx_M·x_D, Σx_M·M, Σx_M·D,
#: Σx_D·M, Σx_D·D, ΣM, ΣD)`` (M the cell's y, i.e. capped when capped). From
#: them the covariate cells of L = M − R̂·D on x_L = x_M − R̂·x_D and of D on
#: x_D follow for any R̂ (``streams.sampling.problems``).
RATIO_COV_SUMS = 12
_NO_RATIO_COV = (0.0,) * RATIO_COV_SUMS


def outcome(p: MetricPlan, totals: list[float], pre: list[float | None] | None = None
            ) -> tuple[float, tuple[float, ...]]:
    """(y, extra) of a unit with event-metric ``totals`` (and pre values
    ``pre``, by event metric) for metric ``p``: y the cell's outcome (sum:
    the total, capped; conversion: 1.0 if the total > threshold else 0.0;
    ratio: the numerator's total M, capped) and the values its cell appends
    (capped sum: t, t²; ratio: D, D², M·D, when capped t, t², t·D with t the
    uncapped numerator, then the ``RATIO_COV_SUMS`` terms of a unit with
    both pre values, zeros otherwise)."""
    t = totals[p.e]
    code = p.code
    if code == PLAIN_SUM:
        return t, ()
    if code == CONVERSION:
        return (1.0 if t > p.threshold else 0.0), ()
    y = p.lo if t < p.lo else (p.hi if t > p.hi else t)
    if code == CAPPED_SUM:
        return y, (t, t * t)
    D = totals[p.d]
    base = (D, D * D, y * D) if not p.capped else (D, D * D, y * D, t, t * t, t * D)
    xm = None if pre is None else pre[p.e]
    xd = None if pre is None else pre[p.d]
    if xm is None or xd is None:
        return y, base + _NO_RATIO_COV
    return y, base + (1.0, xm, xd, xm * xm, xd * xd, xm * xd, xm * y, xm * D, xd * y, xd * D,
                      y, D)


def age_cell_width(p: MetricPlan, nb: int) -> int:
    """How many sums follow n in metric ``p``'s exposure-age cell with ``nb``
    bins: a sum's or conversion's Σy_b, Σy_b² per bin and Σy_0·y_{B-1}
    (2 nb + 1); a ratio's ΣM_b, ΣM_b², ΣD_b, ΣD_b², ΣM_b·D_b per bin (5 nb;
    L_b = M_b − R̂·D_b's cells follow for any R̂)."""
    return 5 * nb if p.code == RATIO else 2 * nb + 1


def age_contribution(p: MetricPlan, age: list[list[float]]) -> list[float]:
    """A unit's addition to metric ``p``'s age cell after its n (conversion
    and ratio; a sum adds its bin totals inline, ``ExperimentState._fold_unit``):
    a conversion's y_b = 1.0 if the unit's total in bin b > threshold (y_b,
    y_b² per bin, then y_0·y_{B-1}); a ratio's (M_b, M_b², D_b, D_b², M_b·D_b)
    per bin, M_b and D_b the numerator's and denominator's bin totals (not
    capped: a cap is on the window total)."""
    if p.code == RATIO:
        out: list[float] = []
        for mb, db in zip(age[p.e], age[p.d], strict=True):
            out += (mb, mb * mb, db, db * db, mb * db)
        return out
    ys = [1.0 if tb > p.threshold else 0.0 for tb in age[p.e]]
    out = []
    for yb in ys:
        out += (yb, yb * yb)
    out.append(ys[0] * ys[-1])
    return out


@dataclass(init=False, slots=True)
class UnitState:
    """One unit in one experiment. ``totals``, ``pre`` and ``age`` follow
    ``config.event_metrics`` (issue 26: the event metrics, not the config
    metrics; for sum-only configs the same); ``bucket`` is on the experiment's anchor grid
    (see ``bucket_of``); ``matured`` means folded into the cells; ``pre``:
    the pre-experiment value of each metric (None: none), fixed at the
    unit's creation. With ``age_tracking(config)`` (issue 19): ``fine``,
    its fine stratum (``fine_edges``; F = unknown activity), and ``age[k][b]``,
    metric k's total over the metrics at exposure age in bin b
    (``age_edges_ms``); otherwise ``fine`` 0 and ``age`` empty. ``totals``
    are kept as they are either way (Σ_b age[k][b] = totals[k] up to
    rounding). ``dirty``: the rules changed the unit since it was created
    or loaded (created, a total moved, folded): what the partition owner's
    commit writes (``partition_store``) instead of re-encoding every unit
    to compare; not part of the state (no ``==``, no ``repr``).

    The ``__init__`` is written out (``init=False``): the one the dataclass
    generates is interpreted Python even in the compiled build, ~9k
    instructions a unit, and a unit is built per exposure and per record
    the owner decodes."""

    variant: str
    stratum: int
    bucket: int
    exposure_ts: int
    totals: list[float]
    matured: bool = False
    pre: list[float | None] = field(default_factory=list)
    fine: int = 0
    age: list[list[float]] = field(default_factory=list)
    dirty: bool = field(default=False, compare=False, repr=False)

    def __init__(self, variant: str, stratum: int, bucket: int, exposure_ts: int,
                 totals: list[float], matured: bool = False,
                 pre: list[float | None] | None = None, fine: int = 0,
                 age: list[list[float]] | None = None, dirty: bool = False) -> None:
        self.variant = variant
        self.stratum = stratum
        self.bucket = bucket
        self.exposure_ts = exposure_ts
        self.totals = totals
        self.matured = matured
        self.pre = [] if pre is None else pre
        self.fine = fine
        self.age = [] if age is None else age
        self.dirty = dirty


def pack_dirty_units(units: dict[str, UnitState], vix: dict[str, int],
                     packs: dict[int, Callable[..., bytes]],
                     other: Callable[[UnitState], bytes]) -> dict[str, bytes]:
    """``streams.state.unit_records.encode_units``' loop (the owner's commit, ~one record an
    event): each dirty unit of ``units``, in their order, as its ``units`` hash value. The
    common record (no exposure age, no pre value, a variant of ``vix``: the variant's index,
    a number of totals ``packs`` has: ``Struct.pack`` of ``"<BHHBdd{M}d"``) is packed here,
    every other one by ``other``. Why here and not in ``unit_records``: mypyc compiles each
    module apart, so ``unit_records`` read a ``UnitState`` attribute with a generic
    ``getattr`` (~190 instructions, nine a unit) where this module reads the field itself;
    and ``pack`` is called with a fixed number of arguments for 1-3 totals, no star-args
    tuple (callgrind, 10k bench events: 5.9k -> 3.1k instructions a record, ~3.8k -> 2.0k an
    event; of the 3.1k, 1.6k are ``Struct.pack`` itself)."""
    out: dict[str, bytes] = {}
    for uid, u in units.items():
        if not u.dirty:
            continue
        pre = u.pre
        tot = u.totals
        n = len(tot)
        vi = vix.get(u.variant, -1)
        pack = packs.get(n)
        if u.age or vi < 0 or pack is None or pre.count(None) != len(pre):
            out[uid] = other(u)
            continue
        # version 1, byte for byte ("d" packs an int as float() would)
        m = 1 if u.matured else 0
        if n == 1:
            out[uid] = pack(1, vi, u.stratum, m, u.bucket, u.exposure_ts, tot[0])
        elif n == 2:
            out[uid] = pack(1, vi, u.stratum, m, u.bucket, u.exposure_ts, tot[0], tot[1])
        elif n == 3:
            out[uid] = pack(1, vi, u.stratum, m, u.bucket, u.exposure_ts, tot[0], tot[1],
                            tot[2])
        else:
            out[uid] = pack(1, vi, u.stratum, m, u.bucket, u.exposure_ts, *tot)
    return out


@dataclass(frozen=True)
class ExperimentSnapshot:
    """Everything the sampler and ``analyze`` need about one experiment.

    Produced identically by ``ExperimentState.snapshot()`` and
    ``streams.state.store.read_snapshot``. ``arrivals[s]`` maps every entry bucket
    (relative to ``started_at``) to its count; the model uses d < D.
    ``cells[metric][variant_index][stratum] = (n, sum_y, sum_y2, nx, sum_x,
    sum_x2, sum_xy, sum_y_x)`` over matured units: y = a unit's total, x its
    pre-experiment value of the metric, the last five over the units with an
    x (module docstring, rule 5), for every config metric: y its per-unit
    outcome (issue 26: ``outcome``; a capped sum's winsorized total, a
    conversion's 0/1, a ratio's numerator total), x the pre value of its
    ``name`` (a ratio: of its numerator). ``extra_cells[metric]`` (only for
    the metrics that need it; same layout, n shared with ``cells``): capped
    sum ``(Σt, Σt²)`` of the uncapped totals; ratio ``(ΣD, ΣD², ΣMD)``, with
    a capped numerator ``(ΣD, ΣD², ΣMD, Σt, Σt², ΣtD)``, either followed by
    the 12 covariate sums over its units with both pre values
    ``(n, Σx_M, Σx_D, Σx_M², Σx_D², Σx_M·x_D, Σx_M·M, Σx_M·D, Σx_D·M, Σx_D·D,
    ΣM, ΣD)`` (``RATIO_COV_SUMS``). ``tails[metric][vi]``
    (every sum metric) = ``{bucket: count}`` of the folded units' uncapped
    totals by ``kernels.tail.tail_bucket`` (non-zero counts, bucket order).
    ``watermark`` = completeness clock - L
    (docs/architecture.md#state). ``seq`` is
    Redis's ``dirty_seq`` at read time (None from the reducer) and does not
    take part in equality.
    """

    experiment_id: str
    config: ExperimentConfig
    variants: tuple[str, ...]
    n_strata_total: int
    started_at: int | None
    max_ts: int | None
    watermark: int | None
    D: int
    arrivals: tuple[dict[int, int], ...]
    activity_sum: tuple[float, ...]
    activity_n: tuple[int, ...]
    exposed: dict[str, int]
    matured: dict[str, int]
    cells: dict[str, list[list[tuple[int, float, float, int, float, float, float, float]]]]
    counters: dict[str, int]
    seq: int | None = field(default=None, compare=False)
    #: units retired (rule 6): their records dropped, their ids in the filter
    retired_units: int = 0
    #: dead letters attributed to this experiment, by reason (the ingest counts
    #: them in ``lr:{e:<id>}:meta`` ``dl:<reason>``; the reducer has none)
    dead_letters: dict[str, int] = field(default_factory=dict, compare=False)
    #: exposure-age cells (issue 19), empty unless ``age_tracking(config)``:
    #: ``age_cells[metric][variant_index][fine_stratum] = (n, Σy_0, Σy_0²,
    #: Σy_1, Σy_1², …, Σy_{B-1}, Σy_{B-1}², Σy_0·y_{B-1})`` over matured
    #: units, y_b = the unit's total in age bin b (``age_edges_ms``), fine
    #: strata by ``fine_edges`` (index F = unknown activity); every config
    #: metric: a conversion's y_b = 1.0 if that total > threshold, a ratio's
    #: cell ``(n, ΣM_0, ΣM_0², ΣD_0, ΣD_0², ΣM_0·D_0, …)`` (``age_cell_width``)
    age_cells: dict[str, list[list[tuple[float, ...]]]] = field(default_factory=dict)
    #: issue 26 (see above): the values appended to a metric's cells
    extra_cells: dict[str, list[list[tuple[float, ...]]]] = field(default_factory=dict)
    #: issue 26: the tail sketch's counts of every sum metric, per variant
    tails: dict[str, list[dict[int, int]]] = field(default_factory=dict)


def started_and_arrivals(anchor: int | None, arrivals: list[dict[int, int]], B: int
                         ) -> tuple[int | None, tuple[dict[int, int], ...]]:
    """(started_at, arrivals relative to it) from anchor-grid arrivals: a
    configured anchor is the start; the epoch anchor (0) starts at the
    earliest bucket that has a unit."""
    if anchor is None:
        return None, tuple({} for _ in arrivals)
    if anchor:
        return anchor, tuple(dict(sorted(a.items())) for a in arrivals)
    lo = min((b for a in arrivals for b in a), default=0)
    return lo * B, tuple({b - lo: n for b, n in sorted(a.items())} for a in arrivals)


def watermark_of(completeness: int | None, max_ts: int | None, L: int) -> int | None:
    """What an estimate reflects: the completeness clock, but no later than
    the experiment's own latest event, minus L. The cap keeps an idle
    advance (wall clock) from adding empty entry buckets to D after the
    experiment's traffic ended: D counts the buckets its arrivals were
    observed over."""
    if completeness is None:
        return None
    c = completeness if max_ts is None else min(completeness, max_ts)
    return c - L


#: One event in a call: (event, its partition clock after it, released?).
#: ``released`` marks a metric the Reducer held without experiment_id and now
#: hands to the experiment right after the exposure that released it.
Item = tuple[Event, int, bool]

#: One event in a call as the rules read it: a *clocked row*
#: ``(offset, kind, event_id, experiment_id, unit_id, name, ts, num, pre, clk)``,
#: the form ingest carries events in (``schemas.validate.parse_event_row``
#: plus the partition clock after the event, ``streams.state.store.clocked``):
#: kind ``"x"`` an exposure (name = variant, num = pre_activity, pre = its
#: ``pre`` or None), ``"m"`` a metric (name = metric, num = value), ``"h"`` a
#: metric released to the experiment (``Item``'s ``released``); ts and clk
#: are ints. ``ExperimentState.apply_rows`` takes them as they are: the
#: partition's owner builds no ``Event`` per event (a frozen dataclass and
#: its conversion cost ~1.5 µs an event, a tenth of the owner's client CPU).
Row = tuple


def item_row(item: Item) -> Row:
    """An ``Item`` as the rules' row (``Row``; offset None): ``apply_call``'s
    events take the same path as the owner's rows."""
    ev, clk, released = item
    if isinstance(ev, Exposure):
        return (None, "x", ev.event_id, ev.experiment_id, ev.unit_id, ev.variant,
                int(ev.ts), ev.pre_activity, ev.pre, int(clk))
    if isinstance(ev, Metric):
        return (None, "h" if released else "m", ev.event_id, ev.experiment_id, ev.unit_id,
                ev.metric, int(ev.ts), ev.value, None, int(clk))
    raise TypeError(f"not an event: {type(ev).__name__}")

#: The shard of the float aggregates of a state that does not split them by
#: source (``ExperimentState(sharded=False)``): Redis's ``cells`` and ``meta``
#: written before issue 25 (the Lua path): the base an older state becomes.
BASE_SHARD = ""


@dataclass(slots=True)
class Shard:
    """One source partition's share of an experiment's float aggregates
    (issue 25, DESIGN §3): the cells and age cells it folded and corrected,
    its ``act_sum`` per stratum and its max event ts. Sparse, like the
    ``keys.shard_key`` hash its owner writes: a cell exists once the source
    touched it. Integer aggregates (counts, arrivals, counters) are plain
    increments and stay experiment-wide. ``ExperimentState.snapshot`` adds
    the shards in sorted source order (``combine_cells``), the order
    ``streams.state.store.read_snapshot`` adds Redis's shards in, so the
    read model does not depend on how partitions interleaved."""

    cells: dict[tuple[str, int, int], list] = field(default_factory=dict)
    age_cells: dict[tuple[str, int, int], list] = field(default_factory=dict)
    activity_sum: dict[int, float] = field(default_factory=dict)
    max_ts: int | None = None
    #: the tail sketch's counts this source moved (issue 26): (sum metric,
    #: variant index) -> {bucket: count}; integers (a correction through
    #: this source of a unit folded elsewhere makes one negative), so the
    #: shards add up exactly in any order
    tails: dict[tuple[str, int], dict[int, int]] = field(default_factory=dict)
    #: what the rules changed since the owner last wrote the shard (its
    #: commit writes these fields alone, ``partition_store``): cell and age
    #: cell keys, (metric, variant index, bucket) of tails, act_sum strata;
    #: bookkeeping, not state (no ``==``, no ``repr``)
    touched_cells: set[tuple[str, int, int]] = field(default_factory=set, compare=False,
                                                     repr=False)
    touched_age: set[tuple[str, int, int]] = field(default_factory=set, compare=False,
                                                   repr=False)
    touched_tails: set[tuple[str, int, int]] = field(default_factory=set, compare=False,
                                                     repr=False)
    touched_act: set[int] = field(default_factory=set, compare=False, repr=False)

    def untouch(self) -> None:
        """Forget what changed: the owner committed it."""
        self.touched_cells.clear()
        self.touched_age.clear()
        self.touched_tails.clear()
        self.touched_act.clear()


def combine_cells(acc: list | None, add: list) -> list:
    """``acc + add`` element-wise (a copy of ``add`` when ``acc`` is None:
    a value with no second shard keeps its bits). Counts are ints, sums
    IEEE doubles added as ``acc + add``; ``store.combine_text_cells`` is
    the same on Redis's text form."""
    if acc is None:
        return list(add)
    return [a + b for a, b in zip(acc, add, strict=True)]



class ConfigPlan:
    """What an ``ExperimentState`` derives from its config alone (bounds in
    ms, strata and age edges, metric plans, index maps), computed once per
    config by ``config_plan``: the partition's owner builds a state per
    call (issue 25), and deriving these again was ~90k instructions a call.
    Shared by every state of the config, so read-only: nothing changes a
    plan's tuples and dicts after it is built."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.W, self.B, self.L, self.DD = config_ms(config)
        self.E = config.end_at
        self.H, self.Hh, self.HM = horizons_ms(config)
        self.edges = tuple(float(e) for e in config.strata_edges)
        self.S = n_activity_strata(config)
        self.variants = tuple(config.variants)
        self.vindex = {v: i for i, v in enumerate(self.variants)}
        self.metrics = config.metric_names
        self.event_metrics = config.event_metrics
        self.metric_index = {m: i for i, m in enumerate(self.event_metrics)}
        self.plans = metric_plans(config)
        self.by_event: tuple[tuple[MetricPlan, ...], ...] = tuple(
            tuple(p for p in self.plans if i in (p.e, p.d))
            for i in range(len(self.event_metrics)))
        self.cell_len = {p.name: 8 + p.n_extra for p in self.plans}
        self.sum_metrics = tuple(p.name for p in self.plans if p.tails)
        #: a new unit's totals and "no pre values", copied (``list(...)``)
        self.zeros: tuple[float, ...] = (0.0,) * len(self.event_metrics)
        self.nones: tuple[float | None, ...] = (None,) * len(self.event_metrics)
        self.age_on = age_tracking(config)
        self.age_edges = age_edges_ms(config)
        self.NB = len(self.age_edges) - 1
        self.fine_edges = fine_edges(config)
        self.F = max(len(self.fine_edges) - 1, 0)
        self.age_len = {p.name: age_cell_width(p, self.NB) for p in self.plans}


#: experiment_id -> (the config, its ``repr``, its plan): ``config_plan``'s
#: cache, cleared when it holds ``_PLANS_MAX`` experiments
_PLANS: dict[str, tuple[ExperimentConfig, str, ConfigPlan]] = {}
_PLANS_MAX = 256


def config_plan(config: ExperimentConfig) -> ConfigPlan:
    """The ``ConfigPlan`` of ``config``, cached per experiment. A cached
    plan is used for the very config object it was built from (a frozen
    value: the registry hands the owner the same object until it reads the
    config again) or for one whose ``repr`` is the same (every field, with
    its type: 0.0 and -0.0, 1 and 1.0 differ there, though ``==`` calls
    them equal); any other config of the experiment builds a new plan, so a
    changed config never runs on a stale one."""
    eid = config.experiment_id
    hit = _PLANS.get(eid)
    if hit is not None and hit[0] is config:
        return hit[2]
    key = repr(config)
    if hit is not None and hit[1] == key:
        _PLANS[eid] = (config, key, hit[2])  # this object from now on
        return hit[2]
    plan = ConfigPlan(config)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[eid] = (config, key, plan)
    return plan


class ExperimentState:
    """The state of one experiment, advanced one call at a time.

    ``apply_batch`` is one call of the partition's owner: events of one
    source partition (already routed to this experiment), each with its
    partition clock, then maturation and hold expiry at ``clk_end``.
    """

    def __init__(self, config: ExperimentConfig, fold_limit: int = FOLD_LIMIT,
                 sharded: bool = True) -> None:
        self.config = config
        #: float aggregates per source (``Shard``), or in one (``BASE_SHARD``)
        #: the way the state before issue 25 kept them
        self.sharded = sharded
        self.shards: dict[str, Shard] = {}
        # what depends on the config alone, computed once per config
        # (``config_plan``: the owner builds a state per call)
        cp = config_plan(config)
        self.W, self.B, self.L, self.DD = cp.W, cp.B, cp.L, cp.DD
        self.E = cp.E  # exposures at or after it: after_end
        self.H, self.Hh, self.HM = cp.H, cp.Hh, cp.HM
        self.fold_limit = fold_limit
        self.edges = cp.edges
        self.S = cp.S
        self.variants = cp.variants
        #: the config metrics (cells, one per metric) and the event metrics
        #: (unit totals, what a metric event names; issue 26)
        self.metrics = cp.metrics
        self.event_metrics = cp.event_metrics
        self._metric_index = cp.metric_index
        self.plans = cp.plans
        #: per event metric index: the plans whose outcome reads its total
        self._by_event = cp.by_event
        self._cell_len = cp.cell_len
        self._sum_metrics = cp.sum_metrics
        self._zeros = cp.zeros
        self._nones = cp.nones
        self.units: dict[str, UnitState] = {}
        #: per unit with a record: the source whose exposure created it (in
        #: Redis: the source whose pending zset holds the unit)
        self.unit_source: dict[str, str] = {}
        #: per source: heap of (close_ts, unit_id utf-8 bytes, unit_id)
        self._pending: dict[str, list[tuple[int, bytes, str]]] = {}
        #: per unit: held (metric index, ts, value) in arrival order; per source:
        #: unit -> newest held ts (the expiry order)
        self.held: dict[str, list[tuple[int, int, float]]] = {}
        self._held_q: dict[str, dict[str, int]] = {}
        #: per source: event_id -> partition clock at its last counted sighting
        self._seen: dict[str, dict[str, int]] = {}
        self._seen_prune_at = 4096
        #: per source partition, the last clock a call brought
        self.clk: dict[str, int] = {}
        self.anchor: int | None = None  # fixed by the first unit creation
        n_tot = self.S + 1
        self.arrivals: list[dict[int, int]] = [{} for _ in range(n_tot)]
        self.activity_n: list[int] = [0] * n_tot
        self.exposed: dict[str, int] = {v: 0 for v in self.variants}
        self.matured: dict[str, int] = {v: 0 for v in self.variants}
        self._vindex = cp.vindex
        #: exposure age (issue 19): bins, fine strata, age cells
        #: age_cells[m][v][f] = [n, Σy_0, Σy_0², ..., Σy_{B-1}, Σy_{B-1}², Σy_0·y_{B-1}]
        self.age_on = cp.age_on
        self.age_edges = cp.age_edges
        self.NB = cp.NB
        self.fine_edges = cp.fine_edges
        self.F = cp.F
        #: sums after n in each metric's age cell (``age_cell_width``: every kind)
        self._age_len = cp.age_len
        self.counters: dict[str, int] = {}
        #: rule 6: units whose record was dropped
        self.retired = RetiredFilter()

    # -- shards --------------------------------------------------------------

    def _shard(self, source: str) -> Shard:
        """The shard the call of ``source`` writes its float aggregates to."""
        key = source if self.sharded else BASE_SHARD
        sh = self.shards.get(key)
        if sh is None:
            sh = self.shards[key] = Shard()
        return sh

    def _cell(self, source: str, m: str, vi: int, s: int) -> list:
        """Cell (m, variant index, stratum) of ``source``'s shard, created at
        zero: the 8 values, then the metric's extra ones (issue 26)."""
        sh = self._shard(source)
        key = (m, vi, s)
        sh.touched_cells.add(key)  # every caller changes it
        c = sh.cells.get(key)
        if c is None:
            c = sh.cells[key] = [0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0] + [0.0] * (
                self._cell_len[m] - 8)
        return c

    def _tail_move(self, source: str, m: str, vi: int, old: int | None, new: int | None
                   ) -> None:
        """Move one unit's count in the tail sketch of (m, vi) from bucket
        ``old`` to ``new`` (None: none), as integer counts of ``source``'s shard."""
        sh = self._shard(source)
        d = sh.tails.get((m, vi))
        if d is None:
            d = sh.tails[(m, vi)] = {}
        if old is not None:
            d[old] = d.get(old, 0) - 1
            sh.touched_tails.add((m, vi, old))
        if new is not None:
            d[new] = d.get(new, 0) + 1
            sh.touched_tails.add((m, vi, new))

    def _age_cell(self, source: str, m: str, vi: int, f: int) -> list:
        """Age cell (m, variant index, fine stratum) of ``source``'s shard."""
        sh = self._shard(source)
        key = (m, vi, f)
        sh.touched_age.add(key)  # every caller changes it
        a = sh.age_cells.get(key)
        if a is None:
            a = sh.age_cells[key] = [0] + [0.0] * self._age_len[m]
        return a

    def _combined(self, which: str) -> dict[tuple[str, int, int], list]:
        """The shards' ``cells`` or ``age_cells`` added in sorted source order."""
        out: dict[tuple[str, int, int], list] = {}
        for src in sorted(self.shards):
            for k, c in getattr(self.shards[src], which).items():
                out[k] = combine_cells(out.get(k), c)
        return out

    @property
    def max_ts(self) -> int | None:
        """The experiment's latest event ts (max over the shards)."""
        return max((sh.max_ts for sh in self.shards.values() if sh.max_ts is not None),
                   default=None)

    @property
    def activity_sum(self) -> list[float]:
        """Σ pre_activity per stratum, the shards added in source order."""
        acc: dict[int, float] = {}
        for src in sorted(self.shards):
            for s, x in self.shards[src].activity_sum.items():
                acc[s] = x if s not in acc else acc[s] + x
        return [acc.get(s, 0.0) for s in range(self.S + 1)]

    @property
    def cells(self) -> dict[str, list[list[list]]]:
        """cells[m][v][s] = [n, sy, syy, nx, sx, sxx, sxy, sy_x, *extra], the
        shards added (extra: the metric's values of ``extra_cells``, issue 26)."""
        got = self._combined("cells")
        return {m: [[got.get((m, vi, s), [0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0] + [0.0] * (
                    self._cell_len[m] - 8)) for s in range(self.S + 1)]
                    for vi in range(len(self.variants))]
                for m in self.metrics}

    def tail_counts(self) -> dict[str, list[dict[int, int]]]:
        """The tail sketch per sum metric and variant index: the non-zero
        counts in bucket order (``ExperimentSnapshot.tails``)."""
        acc: dict[tuple[str, int], dict[int, int]] = {}
        for sh in self.shards.values():  # integer counts: any order adds up the same
            for k, d in sh.tails.items():
                a = acc.setdefault(k, {})
                for b, n in d.items():
                    a[b] = a.get(b, 0) + n
        out = {}
        for m in self._sum_metrics:
            out[m] = [dict(sorted((b, n) for b, n in acc.get((m, vi), {}).items() if n))
                      for vi in range(len(self.variants))]
        return out

    @property
    def age_cells(self) -> dict[str, list[list[list]]]:
        """age_cells[m][v][f] = [n, Σy_0, Σy_0², ..., Σy_0·y_{B-1}], the shards added
        (empty unless the config tracks exposure age)."""
        if not self.age_on:
            return {}
        got = self._combined("age_cells")
        return {m: [[got.get((m, vi, f), [0] + [0.0] * self._age_len[m])
                     for f in range(self.F + 1)]
                    for vi in range(len(self.variants))]
                for m in self.metrics}

    # -- one call ------------------------------------------------------------

    def apply_batch(self, source: str, items: Iterable[Item], clk_end: int) -> list[str]:
        """Apply ``items`` from ``source`` in order, then mature and expire
        holds at ``clk_end`` (>= every item's clock); categories in order
        (released metrics included, after their exposure)."""
        return self.apply_call(source, items, clk_end)[0]

    def apply_call(self, source: str, items: Iterable[Item], clk_end: int
                   ) -> tuple[list[str], bool]:
        """``apply_batch`` and whether settling left work for the next call
        (more than ``fold_limit`` due): ``apply_rows`` of the items' rows."""
        return self.apply_rows(source, map(item_row, items), clk_end)

    def apply_rows(self, source: str, rows: Iterable[Row], clk_end: int
                   ) -> tuple[list[str], bool]:
        """One call of the partition's owner
        (``streams.state.partition_store.apply_rows_owned``) on its clocked
        rows (``Row``): rules 1-4 per event in order, then settling at
        ``clk_end``. Returns the categories in order and whether settling
        left work for the next call (more than ``fold_limit`` due).

        Rules 1 and 2's first tests and rule 3's common path are written out
        here, with the state's dicts and constants read once per call, not
        per event: this loop runs for every event the worker applies, and
        the method calls and attribute reads it saves were ~1 µs an event.
        The rest of an event's fate is ``_exposure`` and ``_metric``."""
        out: list[str] = []
        append = out.append
        counters = self.counters
        vindex, metric_index = self._vindex, self._metric_index
        units, unit_source, retired = self.units, self.unit_source, self.retired
        W, H, L, DD = self.W, self.H, self.L, self.DD
        seen = self._seen.get(source)
        sh: Shard | None = None
        inf = math.inf
        cat: str | None
        # a row's ts and clk are ints, its kind a str (``Row``): declared, the
        # compiled build compares them as machine ints and C strings, not objects
        ts: int
        clk: int
        kind: str
        for _, kind, event_id, _, uid, name, ts, num, pre, clk in rows:
            if kind == "x" and name in vindex and ts + W + H <= clk - L:
                cat = "too_old"  # rule 2, before anything else: ingest dead-letters it
            else:
                if seen is None:
                    seen = self._seen[source] = {}
                prev = seen.get(event_id)
                if prev is not None and prev >= clk - DD:
                    cat = "duplicate"
                else:
                    seen[event_id] = clk  # rule 1: the sighting lives on partition time
                    if sh is None:
                        sh = self._shard(source)
                    if sh.max_ts is None or ts > sh.max_ts:
                        sh.max_ts = ts
                    T = clk - L
                    if kind == "x":
                        cat = self._exposure(uid, name, ts, num, pre, T, source)
                    else:
                        mi = metric_index.get(name)
                        if mi is None:
                            cat = "unknown_metric"
                        else:
                            v = float(num)  # ``_finite``, inline
                            if not -inf < v < inf:
                                raise ValueError(f"non-finite metric value: {num!r}")
                            u = units.get(uid)
                            if u is None:
                                if uid in retired:  # rule 6: its close + H <= T
                                    cat = "outside_window" if ts > T - H else "late"
                                else:
                                    cat = self._hold(uid, mi, ts, v, source)
                            else:
                                if unit_source[uid] != source:  # ``_note_source``
                                    counters["cross_partition"] = counters.get(
                                        "cross_partition", 0) + 1
                                cat = self._metric(u, mi, ts, v, T, source)
            if cat is not None:
                counters[cat] = counters.get(cat, 0) + 1
                append(cat)
        return out, self.settle(source, clk_end)

    def apply(self, event: Event, source: str = DEFAULT_SOURCE) -> str:
        """One event alone from ``source`` (a call of one): its category."""
        prev = self.clk.get(source)
        clk = int(event.ts) if prev is None or int(event.ts) > prev else prev
        cats = self.apply_batch(source, [(event, clk, False)], clk)
        return cats[0] if cats else "exposures"

    def settle(self, source: str, clk_end: int) -> bool:
        """Rule 5 and hold expiry on ``source`` at ``clk_end`` (also a call of
        its own: a quiet experiment, an idle partition). True if work is
        left for the next call (more than ``fold_limit`` due)."""
        prev = self.clk.get(source)
        if prev is None or clk_end > prev:
            self.clk[source] = clk_end
        clk = self.clk[source]
        more = self._fold(source, clk - self.L)
        more = self._expire(source, clk - self.Hh) or more
        seen = self._seen.get(source)
        if seen is not None and len(seen) > self._seen_prune_at:
            # sightings below clk - DD can never mark a duplicate again (clk
            # only grows): forgetting them changes no outcome (Redis: every call
            # that moves the clock)
            cut = clk - self.DD
            self._seen[source] = {k: t for k, t in seen.items() if t >= cut}
            self._seen_prune_at = max(4096, 2 * len(self._seen[source]))
        return more

    def _count(self, cat: str, n: int = 1) -> None:
        self.counters[cat] = self.counters.get(cat, 0) + n

    def _exposure(self, uid: str, variant: str, ts: int, pre_activity: float | None,
                  pre: dict[str, float] | None, T: int, source: str) -> str | None:
        """Rule 2 after too_old and dedupe (``apply_rows``): the exposure's
        category, or None when it created the unit (counted here, before the
        metrics it released)."""
        if variant not in self._vindex:
            return "unknown_variant"
        u = self.units.get(uid)
        if u is not None:
            self._note_source(uid, source)
            return "repeat_exposure" if u.variant == variant else "conflict"
        if uid in self.retired:
            return "retired"
        close = ts + self.W
        E = self.E
        if E is not None and ts >= E:
            return "after_end"
        x = None if pre_activity is None else _finite(pre_activity, "pre_activity")
        anchor = self.anchor
        if anchor is None:
            start = self.config.started_at
            anchor = self.anchor = start if start is not None else 0
        s = stratum_of(x, self.edges)
        b = bucket_of(ts, anchor, self.B)
        evm = self.event_metrics
        xs: list[float | None] = (
            [None if (v := pre.get(m)) is None else _finite(v, "pre value") for m in evm]
            if pre else list(self._nones))
        u = UnitState(variant, s, b, ts, list(self._zeros), False, xs, 0, None, True)
        if self.age_on:
            u.fine = stratum_of(x, self.fine_edges)
            u.age = [[0.0] * self.NB for _ in evm]
        self.units[uid] = u
        self.unit_source[uid] = source
        arr = self.arrivals[s]
        arr[b] = arr.get(b, 0) + 1
        if x is not None:
            sh = self._shard(source)
            sh.activity_sum[s] = sh.activity_sum.get(s, 0.0) + x
            sh.touched_act.add(s)
            self.activity_n[s] += 1
        self.exposed[variant] += 1
        heappush(self._pending.setdefault(source, []), (close, uid.encode("utf-8"), uid))
        # before the configured start: applied to entry bucket 0 (bucket_of), counted apart
        cat = "before_start" if ts < anchor else "exposures"
        counters = self.counters
        counters[cat] = counters.get(cat, 0) + 1
        held = self.held.pop(uid, None)
        if held is not None:
            self._held_q.get(source, {}).pop(uid, None)
            self._count("held", -len(held))
            for mi, mts, v in held:
                self._count(self._metric(u, mi, mts, v, T, source))
        return None  # counted above, before the released metrics

    def _metric(self, u: UnitState, mi: int, ts: int, v: float, T: int, source: str) -> str:
        close = u.exposure_ts + self.W
        if ts < u.exposure_ts:
            return "pre_exposure"
        if ts >= close:
            return "outside_window"
        if close + self.H <= T:
            return "late"
        t = u.totals[mi]
        u.totals[mi] = t + v
        u.dirty = True
        if u.age:
            ya = u.age[mi]
            ab = age_bin_of(ts - u.exposure_ts, self.age_edges)
            tb = ya[ab]
            ya[ab] = tb + v
        if not u.matured:
            # folded later, with the total: in time (close > T), or already
            # due on its own partition (close <= T) and counted a correction
            return "metric_applied" if close > T else "corrected"
        # folded: the metric corrects its cells whatever T says (T is the clock of
        # the partition it came through, maybe not its unit's: defect 2)
        # into the shard of the source it came through (its owner commits it)
        vi = self._vindex[u.variant]
        for p in self._by_event[mi]:
            if p.code == PLAIN_SUM:
                c = self._cell(source, p.name, vi, u.stratum)
                c[1] = c[1] + v
                c[2] = c[2] + ((t + v) * (t + v) - t * t)
                x = u.pre[mi]
                if x is not None:
                    c[6] = c[6] + x * v
                    c[7] = c[7] + v
            else:
                self._correct(p, u, mi, t, source, vi)
            if p.tails:
                b0, b1 = tail_bucket(t), tail_bucket(t + v)
                if b0 != b1:
                    self._tail_move(source, p.name, vi, b0, b1)
                if u.age:
                    a = self._age_cell(source, p.name, vi, u.fine)
                    a[1 + 2 * ab] = a[1 + 2 * ab] + v
                    a[2 + 2 * ab] = a[2 + 2 * ab] + ((tb + v) * (tb + v) - tb * tb)
                    last = self.NB - 1
                    if ab == 0:
                        a[-1] = a[-1] + v * ya[last]
                    elif ab == last:
                        a[-1] = a[-1] + ya[0] * v
            elif u.age:
                self._age_correct(p, u, mi, ab, tb, source, vi)
        return "corrected"

    def _age_correct(self, p: MetricPlan, u: UnitState, mi: int, ab: int, tb: float,
                     source: str, vi: int) -> None:
        """A folded unit's total of event metric ``mi`` in age bin ``ab`` went
        from ``tb`` to its current value: a conversion's or ratio's age cell
        gets the unit's contribution after minus before (``age_contribution``;
        n stays; nothing if unchanged, e.g. a conversion bin that stays)."""
        ya = u.age[mi]
        now = ya[ab]
        ya[ab] = tb
        before = age_contribution(p, u.age)
        ya[ab] = now
        after = age_contribution(p, u.age)
        if before == after:
            return
        a = self._age_cell(source, p.name, vi, u.fine)
        for j, (x0, x1) in enumerate(zip(before, after, strict=True)):
            if x0 != x1:
                a[1 + j] = a[1 + j] + (x1 - x0)

    def _correct(self, p: MetricPlan, u: UnitState, mi: int, t: float, source: str,
                 vi: int) -> None:
        """A folded unit's event-metric total ``mi`` went from ``t`` to its
        current value: metric ``p``'s cell gets the unit's contribution after
        minus its contribution before (``outcome``; n and the x sums stay):
        a conversion flips either way, a capped total moves inside the cap,
        a ratio's D sums follow. Nothing changes, nothing is written."""
        tot = u.totals
        now = tot[mi]
        tot[mi] = t
        y0, ex0 = outcome(p, tot, u.pre)
        tot[mi] = now
        y1, ex1 = outcome(p, tot, u.pre)
        if y0 == y1 and ex0 == ex1:
            return
        c = self._cell(source, p.name, vi, u.stratum)
        dy = y1 - y0
        c[1] = c[1] + dy
        c[2] = c[2] + (y1 * y1 - y0 * y0)
        x = u.pre[p.e]
        if x is not None:
            c[6] = c[6] + x * dy
            c[7] = c[7] + dy
        for j in range(len(ex1)):
            c[8 + j] = c[8 + j] + (ex1[j] - ex0[j])

    def _note_source(self, uid: str, source: str) -> None:
        """Count ``cross_partition`` when an event reaches the record of a
        unit created on another source (``EVENT_NOTES``): its events are not
        all on one partition, so T differs between them (the rules hold
        whatever T, but data_quality shows the key = unit_id bound broken)."""
        if self.unit_source[uid] != source:
            self._count("cross_partition")

    def _hold(self, uid: str, mi: int, ts: int, v: float, source: str) -> str:
        lst = self.held.get(uid)
        if lst is None:
            lst = self.held[uid] = []
        if len(lst) >= self.HM:
            if not lst:
                del self.held[uid]
            return "expired"
        lst.append((mi, ts, v))
        q = self._held_q.setdefault(source, {})
        if uid not in q or ts > q[uid]:
            q[uid] = ts
        return "held"

    def _fold(self, source: str, T: int) -> bool:
        """Rules 5 and 6 in one pass over the pending entries with score <= T:
        fold the unit if it is not yet, then retire it if final, else keep it
        pending at score close + H."""
        pend = self._pending.get(source)
        n = 0
        final = self.W + self.H
        while pend and pend[0][0] <= T:
            if n >= self.fold_limit:
                return True
            _, ub, uid = heappop(pend)
            n += 1
            u = self.units.get(uid)
            if u is None:
                continue
            if not u.matured:
                self._fold_unit(u, source)
            fin = u.exposure_ts + final
            if fin <= T:
                del self.units[uid]
                del self.unit_source[uid]
                self.retired.add(uid)
            else:
                heappush(pend, (fin, ub, uid))
        return False

    def _fold_unit(self, u: UnitState, source: str) -> None:
        """Rule 5 for one unit: per config metric its outcome (``outcome``)
        into its cell, then the metric's extra values; a sum metric's
        uncapped total into the tail sketch and its age bins into the age cell."""
        vi = self._vindex[u.variant]
        tot = u.totals
        sh = self._shard(source)
        tails, touched_tails = sh.tails, sh.touched_tails
        for p in self.plans:
            ei = p.e
            ex: tuple[float, ...]
            if p.code == PLAIN_SUM:
                y, ex = tot[ei], ()
            else:
                y, ex = outcome(p, tot, u.pre)
            m = p.name
            c = self._cell(source, m, vi, u.stratum)
            c[0] += 1
            c[1] = c[1] + y
            c[2] = c[2] + y * y
            x = u.pre[ei]
            if x is not None:
                c[3] += 1
                c[4] = c[4] + x
                c[5] = c[5] + x * x
                c[6] = c[6] + x * y
                c[7] = c[7] + y
            for j in range(len(ex)):
                c[8 + j] = c[8 + j] + ex[j]
            if not p.tails:
                if u.age:  # a conversion's or ratio's age cell (``age_contribution``)
                    a = self._age_cell(source, m, vi, u.fine)
                    a[0] += 1
                    for j, x in enumerate(age_contribution(p, u.age)):
                        a[1 + j] = a[1 + j] + x
                continue
            d = tails.get((m, vi))  # the tail sketch, inline: once per unit and sum metric
            if d is None:
                d = tails[(m, vi)] = {}
            b = tail_bucket(tot[ei])
            d[b] = d.get(b, 0) + 1
            touched_tails.add((m, vi, b))
            if u.age:
                ya = u.age[ei]
                a = self._age_cell(source, m, vi, u.fine)
                a[0] += 1
                for b in range(self.NB):
                    yb = ya[b]
                    a[1 + 2 * b] = a[1 + 2 * b] + yb
                    a[2 + 2 * b] = a[2 + 2 * b] + yb * yb
                a[-1] = a[-1] + ya[0] * ya[-1]
        self.matured[u.variant] += 1
        u.matured = True
        u.dirty = True

    def _expire(self, source: str, cut: int) -> bool:
        """Drop the held metrics of units whose newest held ts < cut, in
        (newest ts, unit_id bytes) order, at most ``fold_limit`` units."""
        q = self._held_q.get(source)
        if not q:
            return False
        due = sorted((t, u.encode("utf-8"), u) for u, t in q.items() if t < cut)
        for _t, _, uid in due[: self.fold_limit]:
            del q[uid]
            n = len(self.held.pop(uid, ()))  # none: released by an exposure elsewhere
            self._count("held", -n)
            self._count("expired", n)
        return len(due) > self.fold_limit

    # -- views ------------------------------------------------------------

    def pending_units(self, source: str = DEFAULT_SOURCE) -> list[tuple[str, int]]:
        """Pending (unit_id, close_ts) of ``source`` in Redis ZSET order."""
        return [(uid, c) for c, _, uid in sorted(self._pending.get(source, []))]

    def completeness(self) -> int | None:
        """The experiment's own completeness clock: min over the partitions
        it has seen (``Reducer`` and the live worker know better)."""
        return min(self.clk.values()) if self.clk else None

    def snapshot(self, completeness: int | None = None) -> ExperimentSnapshot:
        """An immutable copy of the state the sampler and analyze consume;
        ``completeness``: the clock the data is complete up to (default:
        ``self.completeness()``); the watermark is it minus L."""
        c = self.completeness() if completeness is None else completeness
        wm = watermark_of(c, self.max_ts, self.L)
        started, arrivals = started_and_arrivals(self.anchor, self.arrivals, self.B)
        if started is None:
            started = self.config.started_at
        counters = {k: 0 for k in COUNTERS}
        counters.update(self.counters)
        cells = self.cells
        return ExperimentSnapshot(
            experiment_id=self.config.experiment_id,
            config=self.config,
            variants=self.variants,
            n_strata_total=self.S + 1,
            started_at=started,
            max_ts=self.max_ts,
            watermark=wm,
            D=completed_buckets(wm, started, self.B, self.config.end_at),
            arrivals=arrivals,
            activity_sum=tuple(self.activity_sum),
            activity_n=tuple(self.activity_n),
            exposed=dict(self.exposed),
            matured=dict(self.matured),
            cells={
                m: [[tuple(c[:8]) for c in row] for row in rows]
                for m, rows in cells.items()
            },
            extra_cells={
                p.name: [[tuple(c[8:]) for c in row] for row in cells[p.name]]
                for p in self.plans if p.n_extra
            },
            tails=self.tail_counts(),
            counters=counters,
            retired_units=self.retired.n,
            age_cells={
                m: [[tuple(c) for c in row] for row in rows]
                for m, rows in self.age_cells.items()
            },
        )


class Reducer:
    """All experiments, the partition clocks, the unit -> experiments routing
    index and the holds of metrics without experiment_id.

    ``apply_batch`` is one ``Ingestor.process`` call: events of one source
    partition, in order. It moves the partition clock over every event,
    routes exactly as ``streams.state.store.route_rows`` does and applies each
    experiment's events in one ``ExperimentState.apply_batch`` call.
    """

    def __init__(self, configs: Iterable[ExperimentConfig], fold_limit: int = FOLD_LIMIT,
                 hold_seconds: int = 86_400, hold_max: int = 64, sharded: bool = True) -> None:
        self.configs: dict[str, ExperimentConfig] = {c.experiment_id: c for c in configs}
        self.states: dict[str, ExperimentState] = {
            e: ExperimentState(c, fold_limit, sharded) for e, c in self.configs.items()
        }
        self.index: dict[str, set[str]] = {}
        self.clocks: dict[str, int] = {}
        #: unit -> held metrics without experiment_id: (source, ts, event);
        #: per source, unit -> newest held ts (the expiry order)
        self.unit_held: dict[str, list[tuple[str, int, Metric]]] = {}
        self._unit_held_q: dict[str, dict[str, int]] = {}
        self.hold_ms = int(hold_seconds) * 1000
        self.hold_max = int(hold_max)
        self.counters: dict[str, int] = {k: 0 for k in REDUCER_COUNTERS}

    def apply_batch(self, source: str, events: Iterable[Event]) -> dict[str, list[str]]:
        """Apply one source batch; categories per experiment."""
        clk = self.clocks.get(source)
        per: dict[str, list[Item]] = {}
        for ev in events:
            if ev.experiment_id is not None and ev.experiment_id not in self.configs:
                self.counters["unknown_experiment"] += 1  # dead-lettered: moves no clock
                continue
            ts = int(ev.ts)
            clk = ts if clk is None or ts > clk else clk
            for e, item in self._route(ev, clk, source):
                per.setdefault(e, []).append(item)
        if clk is None:
            return {}
        self.clocks[source] = clk
        out = {e: self.states[e].apply_batch(source, items, clk)
               for e, items in sorted(per.items())}
        self._expire_unit_holds(source, clk)
        return out


    def _route(self, ev: Event, clk: int, source: str) -> list[tuple[str, Item]]:
        if isinstance(ev, Exposure):
            cfg = self.configs[ev.experiment_id]
            out: list[tuple[str, Item]] = [(ev.experiment_id, (ev, clk, False))]
            if ev.variant in cfg.variants and not self._too_old(ev, clk) \
                    and (cfg.end_at is None or int(ev.ts) < cfg.end_at):
                seen = self.index.setdefault(ev.unit_id, set())
                if ev.experiment_id not in seen:
                    seen.add(ev.experiment_id)
                    for _, _, m in self.unit_held.get(ev.unit_id, ()):
                        out.append((ev.experiment_id, (m, clk, True)))
            return out
        if ev.experiment_id is not None:
            return [(ev.experiment_id, (ev, clk, False))]
        targets = sorted(self.index.get(ev.unit_id, ()))
        if not targets:
            held = self.unit_held.setdefault(ev.unit_id, [])
            if len(held) >= self.hold_max:
                self.counters["unrouted_expired"] += 1
            else:
                held.append((source, int(ev.ts), ev))
                q = self._unit_held_q.setdefault(source, {})
                q[ev.unit_id] = max(q.get(ev.unit_id, int(ev.ts)), int(ev.ts))
                self.counters["unrouted"] += 1
        return [(e, (ev, clk, False)) for e in targets]

    def _too_old(self, ev: Exposure, clk: int) -> bool:
        """Rule 2's too_old, decided before routing (streams.ingest.ingestor does the
        same): such an exposure is not recorded in the routing index."""
        st = self.states[ev.experiment_id]
        return int(ev.ts) + st.W + st.H <= clk - st.L

    def _expire_unit_holds(self, source: str, clk: int) -> None:
        """Drop unit-level holds of ``source`` whose newest held ts is older
        than clk - hold; those never released count ``unrouted_expired``."""
        q = self._unit_held_q.get(source)
        if not q:
            return
        cut = clk - self.hold_ms
        for uid in [u for u, t in q.items() if t < cut]:
            del q[uid]
            lst = self.unit_held.pop(uid, [])
            if uid not in self.index:
                self.counters["unrouted_expired"] += len(lst)

    def advance(self, source: str, clock_ms: int) -> None:
        """The partition is caught up and idle: its clock moves to
        ``clock_ms`` (wall clock) if that is later, and every experiment
        matures and expires holds on it, until no work is left."""
        clk = max(self.clocks.get(source, clock_ms), clock_ms)
        self.clocks[source] = clk
        for st in self.states.values():
            while st.settle(source, clk):
                pass
        self._expire_unit_holds(source, clk)

    def apply(self, event: Event, source: str = DEFAULT_SOURCE) -> list[tuple[str, str]]:
        """A batch of one event; [(experiment_id, category), ...]."""
        return [(e, c) for e, cats in self.apply_batch(source, [event]).items() for c in cats]

    def apply_all(self, events: Iterable[Event], source: str = DEFAULT_SOURCE,
                  batch: int = 1) -> Reducer:
        """Apply events that all came from ``source``, ``batch`` at a time."""
        buf: list[Event] = []
        for ev in events:
            buf.append(ev)
            if len(buf) >= batch:
                self.apply_batch(source, buf)
                buf = []
        if buf:
            self.apply_batch(source, buf)
        return self

    def completeness(self) -> int | None:
        """Min over the partitions seen of their clock (every one is caught up
        at the end of a file: the rule of docs/architecture.md#state with no backlog anywhere)."""
        return min(self.clocks.values()) if self.clocks else None

    def snapshots(self, completeness: int | None = None) -> dict[str, ExperimentSnapshot]:
        c = self.completeness() if completeness is None else completeness
        return {e: s.snapshot(c) for e, s in sorted(self.states.items())}
