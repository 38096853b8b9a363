"""Per-experiment state in Redis, applied exactly once (DESIGN §5).

Streaming ingest applies each micro-batch of one source partition to each
experiment it touches with ONE call of ``streams/lua/ingest.lua``: one atomic
step, idempotent per source offset, implementing exactly the rules of the
reference reducer ``streams.semantics`` (a differential test proves them
equal, float sums bit for bit). This module builds the script's arguments,
routes events to experiments, and reads snapshots back in the reducer's shape.

Key schema. Every per-experiment key carries the hash tag `{e:<id>}`, so one
Lua call touches one Redis Cluster slot. Floats are stored as `%.17g` text,
which round-trips an IEEE double; integers as decimal text; unit records are
binary (1).

| key | type | contents |
|---|---|---|
| `lr:{e:<id>}:cfg` | string | config JSON (registry; the Lua gets its part as ARGV) |
| `lr:{e:<id>}:units` | hash | unit_id -> packed unit state (1) |
| `lr:{e:<id>}:pending` | zset | unit_id -> window close ts, for units not matured yet |
| `lr:{e:<id>}:cells` | hash | `metric`, `variant`, `stratum` (2) -> `"n sum_y sum_y2"` |
| `lr:{e:<id>}:arrivals` | hash | `stratum`, `bucket` (2) -> units first exposed there |
| `lr:{e:<id>}:meta` | hash | clock, per-variant and per-stratum totals, counters (3) |
| `lr:{e:<id>}:seen` | zset | event_id -> ts of its last counted sighting (4) |
| `lr:{e:<id>}:offsets` | hash | `topic`, `partition` (2) -> last applied source offset |
| `lr:{e:<id>}:dirty_seq` | string | integer, +1 by every batch that applied an event |
| `lr:{u:<unit_id>}:x` | hash | routing index: experiment_id -> first exposure (5) |

1. Binary, little-endian (struct `<BHHBdd` then M doubles): version byte 1,
   variant index, stratum, matured 0|1, entry bucket, exposure ts, total_1 ...
   total_M; indices and total order follow the config's `variants` and
   `metrics`, which must therefore only ever be appended to (a record with
   fewer totals reads the missing ones as 0). The earlier text form
   `"<variant_index> <stratum> <bucket> <exposure_ts> <matured 0|1> <total_1>
   ... <total_M>"` (%.17g) is still read, by the script and ``read_units``,
   and rewritten in binary when the unit is next written.
2. Field names join their parts with `|`: `rev|control|3`, `3|12`,
   `liftstream.events|0`.
3. `max_ts`, `started_at`, `exposed:<variant>`, `matured:<variant>`,
   `act_sum:<stratum>` (float), `act_n:<stratum>`, `c:<counter>` (the
   counters are `streams.semantics.COUNTERS`); the event-time clock:
   `max_ts` (max event ts over all source partitions), `mx:<topic>|<partition>`
   (max event ts from that source partition) and `wm`, the watermark
   `max(wm, max(min_p mx:p, max_ts - I) - L)` (rule 2 of
   ``streams.semantics``). State written before `wm` existed has none; its
   watermark reads as `max_ts - L`, the rule it was made with.
4. Dedupe. Entries with score < max_ts - DD are pruned by every batch: they
   can never mark a duplicate again.
5. Value `"<topic>|<partition>|<offset>"` of the unit's first exposure to that
   experiment (`*` if the position was not given). The field names are the
   set of experiments the unit was exposed in.

Stratum indices run 0..S-1 for the activity strata and S for "unknown
activity" (S = len(strata_edges) - 1). Counters (``c:<name>``) are listed in
``streams.semantics.COUNTERS``.

Why the routing index stores the first exposure's position rather than being
a plain set: it lives in another slot, so it is written (idempotently, HSETNX;
one call of ``streams/lua/route.lua`` per batch, or a pipeline on a Redis
Cluster) *before* the experiment's Lua call. After a crash between those two
steps, a replay would otherwise see the unit as already exposed and route a
metric that preceded its exposure in the stream to the experiment. With the
position, a metric is routed only to experiments whose first exposure of the
unit came before it (same topic and partition; units are keyed to one
partition), on the first run and on every replay alike.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from redis.client import NEVER_DECODE

from schemas.records import Event, ExperimentConfig, Exposure, Metric
from streams.semantics import (
    COUNTERS,
    ExperimentSnapshot,
    UnitState,
    completed_buckets,
    config_ms,
    n_activity_strata,
    skew_ms,
)

LUA_PATH = Path(__file__).with_name("lua") / "ingest.lua"


class ExperimentKeys(NamedTuple):
    """All keys of one experiment, in one hash slot."""

    cfg: str
    units: str
    pending: str
    cells: str
    arrivals: str
    meta: str
    seen: str
    offsets: str
    dirty_seq: str

    def for_lua(self) -> list[str]:
        """KEYS of ingest.lua, in its order."""
        return [self.units, self.pending, self.cells, self.arrivals, self.meta,
                self.seen, self.offsets, self.dirty_seq]


def experiment_key(experiment_id: str, kind: str) -> str:
    """``lr:{e:<id>}:<kind>``."""
    return f"lr:{{e:{experiment_id}}}:{kind}"


def experiment_keys(experiment_id: str) -> ExperimentKeys:
    return ExperimentKeys(*(experiment_key(experiment_id, k) for k in ExperimentKeys._fields))


def unit_index_key(unit_id: str) -> str:
    """``lr:{u:<unit_id>}:x``: which experiments the unit was exposed in."""
    return f"lr:{{u:{unit_id}}}:x"


def offsets_field(topic: str, partition: int) -> str:
    return f"{topic}|{int(partition)}"


# ---------------------------------------------------------------- the scripts

ROUTE_LUA_PATH = Path(__file__).with_name("lua") / "route.lua"

_scripts: dict[Path, Any] = {}


def _script(r: Any, path: Path) -> Any:
    """A registered script (redis-py ``Script``: EVALSHA, and SCRIPT LOAD only
    when the server does not know the sha yet). One object serves every
    client: the sha is the same, each call names its client."""
    sc = _scripts.get(path)
    if sc is None:
        sc = _scripts[path] = r.register_script(path.read_text())
    return sc


def ingest_script(r: Any) -> Any:
    """The registered ingest script (``streams/lua/ingest.lua``)."""
    return _script(r, LUA_PATH)


def _num(x: float, what: str) -> str:
    """A float as text that Lua's tonumber reads back to the same double."""
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"non-finite {what}: {x!r}")
    return repr(v)


def config_argv(cfg: ExperimentConfig, topic: str, partition: int) -> list[str]:
    """The config part of the script's ARGV (see the header of ingest.lua)."""
    W, B, L, DD = config_ms(cfg)
    argv = [offsets_field(topic, partition), str(W), str(B), str(L), str(DD), str(skew_ms(cfg)),
            "" if cfg.started_at is None else str(int(cfg.started_at)),
            str(len(cfg.strata_edges))]
    argv += [_num(e, "strata edge") for e in cfg.strata_edges]
    argv.append(str(len(cfg.variants)))
    argv += list(cfg.variants)
    names = cfg.metric_names
    argv.append(str(len(names)))
    argv += list(names)
    return argv


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _int(x: Any) -> int:
    s = _s(x)
    try:
        return int(s)
    except ValueError:
        return int(float(s))


# ---------------------------------------------------------------- rows
#
# The ingest path carries events as plain tuples ("rows"), not dataclasses:
#   (offset, kind, event_id, experiment_id, unit_id, name, ts, num)
# kind "x" (exposure: name = variant, num = pre_activity or None) or "m"
# (metric: name = metric, num = value; experiment_id may be None); ts an int,
# num a float. ``schemas.validate.parse_event_row`` makes them from bytes;
# ``event_row`` from an Event.


def event_row(offset: int, ev: Event) -> tuple:
    """The row of an Event (the ``route_batch`` / ``apply_batch`` API)."""
    if isinstance(ev, Exposure):
        return (int(offset), "x", ev.event_id, ev.experiment_id, ev.unit_id, ev.variant,
                int(ev.ts), None if ev.pre_activity is None else float(ev.pre_activity))
    if isinstance(ev, Metric):
        return (int(offset), "m", ev.event_id, ev.experiment_id, ev.unit_id, ev.metric,
                int(ev.ts), float(ev.value))
    raise TypeError(f"not an event: {type(ev).__name__}")


_EVENT_HEAD = "cHdddHH"  # one event's head in ingest.lua's first blob
_NAN = math.nan


def _pack_rows(cfg: ExperimentConfig, rows: Sequence[tuple]) -> tuple[bytes, bytes]:
    """The two packed events arguments of ingest.lua (format in its header):
    the heads, with each variant or metric as its 1-based index in the
    config (0: not one of them), and the ids.

    Checks what the script relies on: every row belongs to the experiment and
    numbers are finite (NaN stands for "no pre_activity")."""
    eid = cfg.experiment_id
    variant_no = {v: i + 1 for i, v in enumerate(cfg.variants)}
    metric_no = {m: i + 1 for i, m in enumerate(cfg.metric_names)}
    isfinite = math.isfinite
    head: list = []
    ids: list[bytes] = []
    add_head, add_id = head.extend, ids.append
    for off, kind, ev_id, exp, uid, name, ts, num in rows:
        if kind == "x":
            if exp != eid:
                raise ValueError(f"exposure for {exp!r} in a batch for {eid!r}")
            no = variant_no.get(name, 0)
            if num is None:
                num = _NAN
            elif not isfinite(num):
                raise ValueError(f"non-finite pre_activity: {num!r}")
        else:
            if exp != eid and exp is not None:
                raise ValueError(f"metric for {exp!r} in a batch for {eid!r}")
            no = metric_no.get(name, 0)
            if not isfinite(num):
                raise ValueError(f"non-finite metric value: {num!r}")
        e, u = ev_id.encode(), uid.encode()
        add_head((b"x" if kind == "x" else b"m", no, off, ts, num, len(e), len(u)))
        add_id(e)
        add_id(u)
    try:
        return struct.pack("<" + _EVENT_HEAD * len(rows), *head), b"".join(ids)
    except struct.error as err:  # an id longer than 65535 bytes (validated ids: 128)
        raise ValueError(f"event not packable: {err}") from err


def _lua_result(raw: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in range(0, len(raw), 2):
        k, v = _s(raw[i]), raw[i + 1]
        if k in ("offset", "max_ts", "watermark"):
            sv = _s(v)
            out[k] = _int(sv) if sv else None
        else:
            out[k] = int(v)
    return out


def apply_rows(r: Any, cfg: ExperimentConfig, source_topic: str, partition: int,
               rows: Sequence[tuple]) -> dict[str, Any]:
    """``apply_batch`` on rows (the ingest path; see the rows note above)."""
    if not rows:
        return {"applied": 0, "skipped": 0}
    eid = cfg.experiment_id
    argv = config_argv(cfg, source_topic, partition)
    argv += _pack_rows(cfg, rows)
    raw = ingest_script(r)(keys=experiment_keys(eid).for_lua(), args=argv, client=r)
    return _lua_result(raw)


def apply_batch(
    r: Any,
    cfg: ExperimentConfig,
    source_topic: str,
    partition: int,
    events_with_offsets: Sequence[tuple[int, Event]],
) -> dict[str, Any]:
    """Apply one source partition's batch to one experiment, in one Lua call.

    ``events_with_offsets`` must be the events routed to ``cfg``'s experiment
    (``route_batch``), in source order with increasing offsets. Events at or
    below the offset already stored for (topic, partition) are skipped, so a
    replay after a crash is a no-op. Returns ``applied``, ``skipped``,
    ``offset`` (stored offset after the call), ``max_ts``, ``watermark``,
    ``dirty_seq`` and the count of each event category that occurred.
    """
    return apply_rows(r, cfg, source_topic, partition,
                      [event_row(off, ev) for off, ev in events_with_offsets])


# ---------------------------------------------------------------- routing


def _marker(topic: str | None, partition: int | None, offset: int) -> str:
    if topic is None or partition is None:
        return "*"
    return f"{topic}|{int(partition)}|{int(offset)}"


def _exposed_before(marker: str, topic: str | None, partition: int | None, offset: int) -> bool:
    """Did the exposure recorded by ``marker`` come before ``offset``?

    Comparable only within one (topic, partition); a marker from elsewhere (or
    without a position) was written by an earlier batch, so it counts.
    """
    if topic is None or partition is None:
        return True
    parts = marker.rsplit("|", 2)
    if len(parts) != 3 or parts[0] != topic or parts[1] != str(int(partition)):
        return True
    try:
        return int(parts[2]) < offset
    except ValueError:
        return True


def _is_cluster(r: Any) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis-py always has it
        return False
    return isinstance(r, RedisCluster)


def _index_round_trip(r: Any, lookup: list[str], writes: dict[tuple[str, str], int],
                      topic: str | None, partition: int | None) -> list:
    """Read the index of the ``lookup`` units, then HSETNX the ``writes``
    ((unit, experiment) -> offset of the exposure), in one round trip: one
    call of ``streams/lua/route.lua`` (its KEYS are the unit index keys, so on
    a Redis Cluster, where they lie in many slots, a pipeline instead).
    Returns the HGETALL replies of ``lookup``, as flat [field, value, ...]
    lists or dicts."""
    if _is_cluster(r):
        pipe = r.pipeline(transaction=False)
        for u in lookup:
            pipe.hgetall(unit_index_key(u))
        for (u, e), off in writes.items():
            pipe.hsetnx(unit_index_key(u), e, _marker(topic, partition, off))
        return pipe.execute()[: len(lookup)]
    keys = [f"lr:{{u:{u}}}:x" for u in lookup]
    keys += [f"lr:{{u:{u}}}:x" for u, _ in writes]
    prefix = "" if topic is None or partition is None else f"{topic}|{int(partition)}|"
    blob = "".join([f"{e}\x1f{off}\x1e" for (_, e), off in writes.items()])
    if blob.count("\x1f") != len(writes) or blob.count("\x1e") != len(writes):
        raise ValueError("an experiment id contains a separator character (\\x1e or \\x1f)")
    return _script(r, ROUTE_LUA_PATH)(keys=keys, args=[len(lookup), prefix, blob], client=r)


def route_rows(
    r: Any,
    rows: Sequence[tuple],
    known: dict[str, ExperimentConfig],
    source_topic: str | None = None,
    partition: int | None = None,
    rejected: list[tuple[int, str]] | None = None,
) -> dict[str, list[int]]:
    """``route_batch`` on rows: experiment id -> indices into ``rows`` (in
    order); ``rejected`` gets (index, reason)."""
    lookup: list[str] = []
    lookup_set: set[str] = set()
    writes: dict[tuple[str, str], int] = {}
    variants_of = {e: c.variants for e, c in known.items()}
    for row in rows:
        if row[1] == "m":
            if row[3] is None and row[4] not in lookup_set:
                lookup_set.add(row[4])
                lookup.append(row[4])
        else:
            vs = variants_of.get(row[3])
            if vs is not None and row[5] in vs:
                key = (row[4], row[3])
                if key not in writes:
                    writes[key] = row[0]
    index: dict[str, dict[str, str]] = {}
    if lookup or writes:
        res = _index_round_trip(r, lookup, writes, source_topic, partition)
        for u, h in zip(lookup, res, strict=True):
            if isinstance(h, dict):
                index[u] = {_s(k): _s(v) for k, v in h.items()}
            else:
                index[u] = {_s(h[i]): _s(h[i + 1]) for i in range(0, len(h), 2)}

    out: dict[str, list[int]] = {}
    in_batch: dict[str, set[str]] = {}
    for i, row in enumerate(rows):
        exp = row[3]
        if row[1] == "x":
            vs = variants_of.get(exp)
            if vs is None:
                if rejected is not None:
                    rejected.append((i, "unknown_experiment"))
                continue
            if row[5] in vs:
                in_batch.setdefault(row[4], set()).add(exp)
            lst = out.get(exp)
            if lst is None:
                out[exp] = [i]
            else:
                lst.append(i)
        elif exp is not None:
            if exp not in known:
                if rejected is not None:
                    rejected.append((i, "unknown_experiment"))
                continue
            lst = out.get(exp)
            if lst is None:
                out[exp] = [i]
            else:
                lst.append(i)
        else:
            uid, off = row[4], row[0]
            targets = set(in_batch.get(uid, ()))
            for e, mk in index.get(uid, {}).items():
                if e in known and _exposed_before(mk, source_topic, partition, off):
                    targets.add(e)
            if not targets and rejected is not None:
                rejected.append((i, "unrouted"))
            for e in sorted(targets):
                out.setdefault(e, []).append(i)
    return dict(sorted(out.items()))


def route_batch(
    r: Any,
    batch: Sequence[tuple[int, Event]],
    known: dict[str, ExperimentConfig],
    source_topic: str | None = None,
    partition: int | None = None,
    rejected: list[tuple[int, Event, str]] | None = None,
) -> dict[str, list[tuple[int, Event]]]:
    """Split a batch of one source partition by experiment, in one round trip.

    Exposures go to their experiment (if ``known``) and are recorded in the
    unit's routing index (HSETNX, idempotent) when their variant is one of the
    config's: this must precede the experiment's ``apply_batch``. Metrics with
    an experiment_id go there; without, to every known experiment the unit was
    exposed in before the metric: per the index (first-exposure position
    earlier than the metric's offset, see the module docstring; pass
    ``source_topic`` and ``partition`` for that) or per an exposure earlier in
    this batch. Events reaching no experiment are appended to ``rejected`` as
    (offset, event, "unknown_experiment" | "unrouted").
    """
    rows = [event_row(off, ev) for off, ev in batch]
    rej: list[tuple[int, str]] = []
    routed = route_rows(r, rows, known, source_topic, partition, rej)
    if rejected is not None:
        rejected.extend((batch[i][0], batch[i][1], why) for i, why in rej)
    return {e: [batch[i] for i in idx] for e, idx in routed.items()}


# ---------------------------------------------------------------- reading


def read_snapshot(r: Any, cfg: ExperimentConfig) -> ExperimentSnapshot:
    """The experiment's snapshot, read atomically (MULTI/EXEC, one round trip),
    in exactly the shape and values of ``ExperimentState.snapshot()``."""
    k = experiment_keys(cfg.experiment_id)
    pipe = r.pipeline(transaction=True)
    pipe.hgetall(k.meta)
    pipe.hgetall(k.cells)
    pipe.hgetall(k.arrivals)
    pipe.get(k.dirty_seq)
    meta_raw, cells_raw, arr_raw, seq_raw = pipe.execute()
    meta = {_s(a): _s(b) for a, b in meta_raw.items()}

    _, B, L, _ = config_ms(cfg)
    S = n_activity_strata(cfg)
    n_tot = S + 1
    variants = tuple(cfg.variants)
    vindex = {v: i for i, v in enumerate(variants)}
    metrics = cfg.metric_names

    max_ts = _int(meta["max_ts"]) if "max_ts" in meta else None
    started = _int(meta["started_at"]) if "started_at" in meta else cfg.started_at
    if "wm" in meta:
        wm: int | None = _int(meta["wm"])
    else:  # nothing applied yet, or state from before per-partition watermarks
        wm = None if max_ts is None else max_ts - L

    arrivals: list[dict[int, int]] = [{} for _ in range(n_tot)]
    for f, v in arr_raw.items():
        s, b = _s(f).split("|")
        si = int(s)
        if 0 <= si < n_tot:
            arrivals[si][int(b)] = int(v)

    cells = {m: [[(0, 0.0, 0.0) for _ in range(n_tot)] for _ in variants] for m in metrics}
    for f, v in cells_raw.items():
        m, var, s = _s(f).rsplit("|", 2)
        si = int(s)
        if m in cells and var in vindex and 0 <= si < n_tot:
            n, sy, syy = _s(v).split(" ")
            cells[m][vindex[var]][si] = (_int(n), float(sy), float(syy))

    counters = {c: 0 for c in COUNTERS}
    for f, v in meta.items():
        if f.startswith("c:"):
            counters[f[2:]] = int(v)

    return ExperimentSnapshot(
        experiment_id=cfg.experiment_id,
        config=cfg,
        variants=variants,
        n_strata_total=n_tot,
        started_at=started,
        max_ts=max_ts,
        watermark=wm,
        D=completed_buckets(wm, started, B),
        arrivals=tuple(dict(sorted(a.items())) for a in arrivals),
        activity_sum=tuple(float(meta.get(f"act_sum:{s}", 0.0)) for s in range(n_tot)),
        activity_n=tuple(int(meta.get(f"act_n:{s}", 0)) for s in range(n_tot)),
        exposed={v: int(meta.get(f"exposed:{v}", 0)) for v in variants},
        matured={v: int(meta.get(f"matured:{v}", 0)) for v in variants},
        cells=cells,
        counters=counters,
        seq=None if seq_raw is None else int(seq_raw),
    )


_UNIT_HEAD = struct.Struct("<BHHBdd")


def decode_unit(packed: str | bytes, cfg: ExperimentConfig) -> UnitState:
    """Unpack a ``units`` hash value: binary (format in ingest.lua's header:
    version byte 1, variant index, stratum, matured, bucket, exposure ts,
    totals) or the earlier text form (module docstring, note 1)."""
    if isinstance(packed, bytes) and packed[:1] == b"\x01":
        _, v, s, m, b, ets = _UNIT_HEAD.unpack_from(packed)
        nt = (len(packed) - _UNIT_HEAD.size) // 8
        totals = list(struct.unpack_from(f"<{nt}d", packed, _UNIT_HEAD.size))
        totals += [0.0] * (len(cfg.metrics) - len(totals))
        return UnitState(cfg.variants[v], s, int(b), int(ets), totals[: len(cfg.metrics)],
                         m == 1)
    f = _s(packed).split(" ")
    totals = [float(x) for x in f[5:]]
    totals += [0.0] * (len(cfg.metrics) - len(totals))
    return UnitState(cfg.variants[_int(f[0])], _int(f[1]), _int(f[2]), _int(f[3]),
                     totals, _int(f[4]) == 1)


def read_counters(r: Any, experiment_id: str) -> dict[str, int]:
    """The experiment's event counters (``c:<name>`` in its meta hash, note 3):
    every event applied to it increments exactly one of them."""
    out = {}
    for k, v in r.hgetall(experiment_key(experiment_id, "meta")).items():
        k = _s(k)
        if k.startswith("c:"):
            out[k[2:]] = int(v)
    return out


def read_units(r: Any, cfg: ExperimentConfig) -> dict[str, UnitState]:
    """All unit states of an experiment (debugging and tests; HGETALL)."""
    raw = r.execute_command("HGETALL", experiment_key(cfg.experiment_id, "units"),
                            **{NEVER_DECODE: True})  # binary values, whatever the client
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return {_s(u): decode_unit(v, cfg) for u, v in raw.items()}


def read_pending(r: Any, experiment_id: str) -> list[tuple[str, int]]:
    """Pending (unit_id, close_ts), in maturation order."""
    raw = r.zrange(experiment_key(experiment_id, "pending"), 0, -1, withscores=True)
    return [(_s(u), int(s)) for u, s in raw]


def applied_offset(r: Any, experiment_id: str, topic: str, partition: int) -> int | None:
    """Last source offset applied to the experiment from (topic, partition)."""
    v = r.hget(experiment_key(experiment_id, "offsets"), offsets_field(topic, partition))
    return None if v is None else _int(v)


def min_applied_offsets(r: Any, experiment_ids: Iterable[str], topic: str) -> dict[int, int]:
    """Per partition of ``topic``, the lowest offset applied over the given
    experiments that have one (one pipeline round trip).

    On assignment ingest seeks each partition to ``min(committed, this + 1)``:
    an experiment whose last writes Redis lost (AOF everysec) reports an older
    offset, and the replay refills it while the others skip what they have.
    """
    ids = list(experiment_ids)
    if not ids:
        return {}
    pipe = r.pipeline(transaction=False)
    for e in ids:
        pipe.hgetall(experiment_key(e, "offsets"))
    out: dict[int, int] = {}
    for h in pipe.execute():
        for f, v in h.items():
            t, _, p = _s(f).rpartition("|")
            if t != topic:
                continue
            pi, off = int(p), _int(v)
            if pi not in out or off < out[pi]:
                out[pi] = off
    return out
