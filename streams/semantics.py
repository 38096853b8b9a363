"""The event semantics of liftstream, as one pure-Python reference reducer.

This module is the *definition* of what an event does to an experiment's state
(DESIGN §4-§5). Two things use it:

* the offline ``liftstream analyze`` tool, which folds a file of events with it;
* the tests, where it is the oracle the Redis/Lua implementation
  (``streams/lua/ingest.lua`` via ``streams.state``) must equal bit for bit.

So it is deliberately plain: no I/O, no numpy, one event at a time, floats
summed in exactly the order the Lua script sums them (IEEE doubles on both
sides, so equal order gives equal bits).

Rules, per experiment ``e`` with config ``c`` (all times in ms: W window,
B bucket, L allowed lateness, DD dedupe horizon, I partition skew bound):

1. Dedupe: an ``event_id`` already sighted in ``e`` whose sighting ts is
   ``>= max_ts - DD`` is a ``duplicate`` and changes nothing else. Otherwise the
   sighting is recorded (a later sighting overwrites an earlier one).
2. Event time, per source partition ``p`` of the event (``"<topic>|<partition>"``,
   the identity of the exactly-once offsets): ``max_ts_p = max(max_ts_p, ts)``,
   ``max_ts = max(max_ts, ts)`` (= max over p; dedupe uses it), and
   ``watermark = max(watermark, min_p max(max_ts_p, max_ts - I) - L)`` over the
   partitions seen so far (by this experiment, non-duplicate events). Since
   ``min_p max(a_p, c) = max(min_p a_p, c)`` this is
   ``max(min_p max_ts_p, max_ts - I) - L``: a partition behind the fastest one
   holds the watermark back by at most I, so its metrics are not ``late``
   merely because another partition ran ahead (backfill, catch-up, a consumer
   reading partitions one after another). With one partition it is exactly
   ``max_ts - L``. The max with the previous value keeps it monotone when a
   new partition first shows up behind the others.
3. Exposure: unknown variant -> ``unknown_variant``; first exposure of a unit
   creates its state (variant, stratum, entry bucket, exposure ts, zero totals)
   -> ``exposures``; later ones -> ``repeat_exposure`` (same variant) or
   ``conflict`` (other variant; the unit stays in its first).
4. Metric: ``unknown_unit``, ``unknown_metric``, ``pre_exposure`` (ts before the
   exposure), ``outside_window`` (ts >= exposure_ts + W), ``late`` (unit already
   matured), else the value is added to the unit's total -> ``metric_applied``.
5. Maturation: after every non-duplicate event, every pending unit whose window
   close ``exposure_ts + W`` is ``<= watermark`` is folded into its cells, in
   (close_ts, unit_id bytes) order (Redis ZSET order).

Resolutions of points the contract left open (the Lua script does the same):

* An exposure with a variant not in the config is ``unknown_variant`` even if
  the unit is already known (checked before repeat/conflict); it creates no
  state and does not fix ``started_at``.
* ``started_at`` (when the config has none) is fixed by the first exposure that
  *creates unit state*; when the config has one, the first unit creation fixes
  that value, so a later config edit cannot re-bucket existing units.
* Maturation is checked after every non-duplicate event, not only when the
  watermark advanced: an exposure whose window already closed before the
  watermark (a very late exposure) matures at once. "When the watermark
  advanced" alone would leave such a unit pending, collecting metrics, until
  some later event moves the watermark; the invariant "no pending unit has
  close_ts <= watermark" is simpler and is what both implementations keep.
* ``pre_activity`` below the first edge falls in stratum 0 (edges are
  ``0, 1, ...`` and validation rejects negative activity, so this is only
  defensive). A config with fewer than two edges has no activity strata:
  every unit goes to the single stratum 0 (= the "unknown" index S = 0).
* Routing of metrics without ``experiment_id``: to every experiment for which
  an exposure of the unit *with a variant of that experiment's config* came
  earlier in the stream (whether or not that exposure created state: it may
  have been a duplicate). Routed metrics for units without state count as
  ``unknown_unit`` there. A metric routed nowhere counts ``unrouted`` on the
  Reducer; an event naming an experiment without config counts
  ``unknown_experiment`` on the Reducer.
* After maturation a unit keeps its totals (they are its final Y), so unit
  state is the same before and after apart from the ``matured`` flag.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.records import Event, ExperimentConfig, Exposure, Metric

#: Per-experiment counters, one per outcome category of an event.
COUNTERS: tuple[str, ...] = (
    "exposures",
    "repeat_exposure",
    "conflict",
    "unknown_variant",
    "too_old",
    "unknown_metric",
    "pre_exposure",
    "outside_window",
    "metric_applied",
    "corrected",
    "held",
    "expired",
    "late",
    "duplicate",
)

#: Counters whose events were not applied and are lost to the estimate (the
#: ``data_loss`` alert's numerator): past the correction horizon, held too
#: long, exposures too old to store. Dead letters add to it.
DROPPED: tuple[str, ...] = ("late", "expired", "too_old")

#: Counters kept by the Reducer (events that reach no experiment state).
REDUCER_COUNTERS: tuple[str, ...] = ("unknown_experiment", "unrouted")


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


def skew_ms(cfg: ExperimentConfig) -> int:
    """I in ms: how far a source partition may lag the fastest and still hold
    the watermark back (``partition_skew_seconds``), checked >= 0."""
    I = int(cfg.partition_skew_seconds) * 1000
    if I < 0:
        raise ValueError(f"experiment {cfg.experiment_id!r}: partition_skew_seconds must be >= 0")
    return I


#: The source of events applied without one (a single partition).
DEFAULT_SOURCE = "-|0"


def n_activity_strata(cfg: ExperimentConfig) -> int:
    """S: strata defined by the edges (the "unknown activity" stratum has index S)."""
    return max(len(cfg.strata_edges) - 1, 0)


def stratum_of(pre_activity: float | None, edges: tuple[float, ...]) -> int:
    """Index i with edges[i] <= x < edges[i+1]; x >= last edge -> S-1;
    x below the first edge -> 0; None (or no activity strata) -> S."""
    S = max(len(edges) - 1, 0)
    if pre_activity is None or S == 0:
        return S
    x = float(pre_activity)
    for i in range(S - 1, -1, -1):
        if x >= float(edges[i]):
            return i
    return 0


def bucket_of(ts: int, started_at: int, B: int) -> int:
    """Entry bucket: floor((ts - started_at) / B), never negative.

    Integer floor division, which the Lua script reproduces exactly with
    integer-valued doubles (all operands are < 2**53).
    """
    return max(0, (ts - started_at) // B)


def completed_buckets(watermark: int | None, started_at: int | None, B: int) -> int:
    """D = max(0, floor((watermark - started_at) / B)); 0 before any data."""
    if watermark is None or started_at is None:
        return 0
    return max(0, (watermark - started_at) // B)


def _finite(x: float, what: str) -> float:
    """float(x), rejecting NaN/inf: they would poison sums and have no
    portable text form; schemas.validate dead-letters them before."""
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"non-finite {what}: {x!r}")
    return v


@dataclass(slots=True)
class UnitState:
    """One unit in one experiment. ``totals`` follows ``config.metrics`` order."""

    variant: str
    stratum: int
    bucket: int
    exposure_ts: int
    totals: list[float]
    matured: bool = False


@dataclass(frozen=True)
class ExperimentSnapshot:
    """Everything the sampler and ``analyze`` need about one experiment.

    Produced identically by ``ExperimentState.snapshot()`` and
    ``streams.state.read_snapshot``. ``arrivals[s]`` maps every entry bucket
    seen so far (also those >= D) to its count; the model uses d < D.
    ``cells[metric][variant_index][stratum] = (n, sum_y, sum_y2)`` over matured
    units. ``seq`` is Redis's ``dirty_seq`` at read time (None from the
    reducer) and does not take part in equality.
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
    cells: dict[str, list[list[tuple[int, float, float]]]]
    counters: dict[str, int]
    seq: int | None = field(default=None, compare=False)
    #: dead letters attributed to this experiment, by reason (the ingest counts
    #: them in ``lr:{e:<id>}:meta`` ``dl:<reason>``; the reducer has none)
    dead_letters: dict[str, int] = field(default_factory=dict, compare=False)


class ExperimentState:
    """The state of one experiment, advanced one event at a time.

    The caller routes (see ``Reducer``); this class applies rules 1-5 to
    whatever it is given.
    """

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.W, self.B, self.L, self.DD = config_ms(config)
        self.I = skew_ms(config)
        self.edges = tuple(float(e) for e in config.strata_edges)
        self.S = n_activity_strata(config)
        self.variants = tuple(config.variants)
        self.metrics = config.metric_names
        self._metric_index = {m: i for i, m in enumerate(self.metrics)}
        self.units: dict[str, UnitState] = {}
        # heap of (close_ts, unit_id utf-8 bytes, unit_id): Redis ZSET order
        self._pending: list[tuple[int, bytes, str]] = []
        self._seen: dict[str, int] = {}
        self._seen_prune_at = 4096
        self.max_ts: int | None = None
        #: per source partition, its max event ts (rule 2)
        self.max_ts_p: dict[str, int] = {}
        self._watermark: int | None = None
        self.started_at: int | None = None  # fixed by the first unit creation
        n_tot = self.S + 1
        self.arrivals: list[dict[int, int]] = [{} for _ in range(n_tot)]
        self.activity_sum: list[float] = [0.0] * n_tot
        self.activity_n: list[int] = [0] * n_tot
        self.exposed: dict[str, int] = {v: 0 for v in self.variants}
        self.matured: dict[str, int] = {v: 0 for v in self.variants}
        # cells[m][v][s] = [n, sy, syy]
        self.cells: dict[str, list[list[list]]] = {
            m: [[[0, 0.0, 0.0] for _ in range(n_tot)] for _ in self.variants]
            for m in self.metrics
        }
        self._vindex = {v: i for i, v in enumerate(self.variants)}
        self.counters: dict[str, int] = {}

    # -- rules -------------------------------------------------------------

    @property
    def watermark(self) -> int | None:
        return self._watermark

    def apply(self, event: Event, source: str = DEFAULT_SOURCE) -> str:
        """Apply one event that came from source partition ``source``
        (``"<topic>|<partition>"``); return its category (the counter it
        incremented)."""
        cat = self._apply(event, source)
        self.counters[cat] = self.counters.get(cat, 0) + 1
        return cat

    def _apply(self, ev: Event, source: str) -> str:
        ts = int(ev.ts)
        # 1. dedupe against the sighting, using max_ts *before* this event
        prev = self._seen.get(ev.event_id)
        if prev is not None and self.max_ts is not None and prev >= self.max_ts - self.DD:
            return "duplicate"
        self._seen[ev.event_id] = ts
        # 2. event time
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts
        mp = self.max_ts_p.get(source)
        if mp is None or ts > mp:
            self.max_ts_p[source] = ts
            cand = max(min(self.max_ts_p.values()), self.max_ts - self.I) - self.L
            if self._watermark is None or cand > self._watermark:
                self._watermark = cand
        wm = self._watermark
        # 3./4.
        if isinstance(ev, Exposure):
            cat = self._exposure(ev, ts)
        elif isinstance(ev, Metric):
            cat = self._metric(ev, ts)
        else:  # pragma: no cover - the Event union has two members
            raise TypeError(f"not an event: {type(ev).__name__}")
        # 5. maturation (cheap heap peek, so done after every non-duplicate event)
        self._mature(wm)
        if len(self._seen) > self._seen_prune_at:
            self._prune_seen()
        return cat

    def _exposure(self, ev: Exposure, ts: int) -> str:
        if ev.variant not in self._vindex:
            return "unknown_variant"
        u = self.units.get(ev.unit_id)
        if u is not None:
            return "repeat_exposure" if u.variant == ev.variant else "conflict"
        x = None if ev.pre_activity is None else _finite(ev.pre_activity, "pre_activity")
        if self.started_at is None:
            self.started_at = self.config.started_at if self.config.started_at is not None else ts
        s = stratum_of(x, self.edges)
        b = bucket_of(ts, self.started_at, self.B)
        self.units[ev.unit_id] = UnitState(ev.variant, s, b, ts, [0.0] * len(self.metrics))
        self.arrivals[s][b] = self.arrivals[s].get(b, 0) + 1
        if x is not None:
            self.activity_sum[s] = self.activity_sum[s] + x
            self.activity_n[s] += 1
        self.exposed[ev.variant] += 1
        heapq.heappush(self._pending, (ts + self.W, ev.unit_id.encode("utf-8"), ev.unit_id))
        return "exposures"

    def _metric(self, ev: Metric, ts: int) -> str:
        u = self.units.get(ev.unit_id)
        if u is None:
            return "unknown_unit"
        mi = self._metric_index.get(ev.metric)
        if mi is None:
            return "unknown_metric"
        if ts < u.exposure_ts:
            return "pre_exposure"
        if ts >= u.exposure_ts + self.W:
            return "outside_window"
        if u.matured:
            return "late"
        u.totals[mi] = u.totals[mi] + _finite(ev.value, "metric value")
        return "metric_applied"

    def _mature(self, wm: int) -> None:
        pend = self._pending
        while pend and pend[0][0] <= wm:
            _, _, uid = heapq.heappop(pend)
            u = self.units[uid]
            vi = self._vindex[u.variant]
            for mi, m in enumerate(self.metrics):
                y = u.totals[mi]
                c = self.cells[m][vi][u.stratum]
                c[0] += 1
                c[1] = c[1] + y
                c[2] = c[2] + y * y
            self.matured[u.variant] += 1
            u.matured = True

    def _prune_seen(self) -> None:
        """Forget sightings that can never again mark a duplicate.

        A sighting counts only while its ts >= max_ts - DD; max_ts never
        decreases, so one below that now is dead forever. Same rule as Lua.
        """
        if self.max_ts is not None:
            cut = self.max_ts - self.DD
            self._seen = {k: t for k, t in self._seen.items() if t >= cut}
        self._seen_prune_at = max(4096, 2 * len(self._seen))

    # -- views ------------------------------------------------------------

    def pending_units(self) -> list[tuple[str, int]]:
        """Pending (unit_id, close_ts) in Redis ZSET order."""
        return [(uid, c) for c, _, uid in sorted(self._pending)]

    def snapshot(self) -> ExperimentSnapshot:
        """An immutable copy of the state the sampler and analyze consume."""
        started = self.started_at if self.started_at is not None else self.config.started_at
        wm = self.watermark
        counters = {k: 0 for k in COUNTERS}
        counters.update(self.counters)
        return ExperimentSnapshot(
            experiment_id=self.config.experiment_id,
            config=self.config,
            variants=self.variants,
            n_strata_total=self.S + 1,
            started_at=started,
            max_ts=self.max_ts,
            watermark=wm,
            D=completed_buckets(wm, started, self.B),
            arrivals=tuple(dict(sorted(a.items())) for a in self.arrivals),
            activity_sum=tuple(self.activity_sum),
            activity_n=tuple(self.activity_n),
            exposed=dict(self.exposed),
            matured=dict(self.matured),
            cells={
                m: [[(c[0], c[1], c[2]) for c in row] for row in rows]
                for m, rows in self.cells.items()
            },
            counters=counters,
        )


class Reducer:
    """All experiments plus the unit -> experiments routing index.

    ``apply`` routes one event exactly as ``streams.state.route_batch`` does and
    applies it to each target experiment's state.
    """

    def __init__(self, configs: Iterable[ExperimentConfig]) -> None:
        self.configs: dict[str, ExperimentConfig] = {c.experiment_id: c for c in configs}
        self.states: dict[str, ExperimentState] = {
            e: ExperimentState(c) for e, c in self.configs.items()
        }
        self.index: dict[str, set[str]] = {}
        self.counters: dict[str, int] = {k: 0 for k in REDUCER_COUNTERS}

    def route(self, ev: Event) -> list[str]:
        """Experiment ids the event goes to (sorted); updates the index for
        exposures. Empty means it reaches none (and is counted)."""
        if isinstance(ev, Exposure):
            cfg = self.configs.get(ev.experiment_id)
            if cfg is None:
                self.counters["unknown_experiment"] += 1
                return []
            if ev.variant in cfg.variants:
                self.index.setdefault(ev.unit_id, set()).add(ev.experiment_id)
            return [ev.experiment_id]
        if ev.experiment_id is not None:
            if ev.experiment_id not in self.configs:
                self.counters["unknown_experiment"] += 1
                return []
            return [ev.experiment_id]
        targets = sorted(self.index.get(ev.unit_id, ()))
        if not targets:
            self.counters["unrouted"] += 1
        return targets

    def apply(self, event: Event, source: str = DEFAULT_SOURCE) -> list[tuple[str, str]]:
        """Route and apply one event from source partition ``source``
        (``"<topic>|<partition>"``); [(experiment_id, category), ...]."""
        return [(e, self.states[e].apply(event, source)) for e in self.route(event)]

    def apply_all(self, events: Iterable[Event], source: str = DEFAULT_SOURCE) -> Reducer:
        """Apply events that all came from ``source``."""
        for ev in events:
            self.apply(ev, source)
        return self

    def apply_sourced(self, events: Iterable[tuple[str, Event]]) -> Reducer:
        """Apply (source, event) pairs, each from its own source partition."""
        for src, ev in events:
            self.apply(ev, src)
        return self

    def snapshots(self) -> dict[str, ExperimentSnapshot]:
        return {e: s.snapshot() for e, s in sorted(self.states.items())}
