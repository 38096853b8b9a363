"""Per-experiment state in Redis, applied exactly once (docs/architecture.md#state).

Streaming ingest applies each micro-batch of one source partition to each
experiment it touches with ONE call of the partition's owner
(``streams.state.partition_store.apply_rows_owned``, issue 25): the rules of
``streams.state.semantics`` run in the worker, and what they changed is
committed in one fenced MULTI/EXEC, idempotent per source offset (a
differential test proves the committed state equal to the reducer's, float
sums bit for bit). This module routes events to experiments, keeps the
positions and clocks, and reads snapshots back in the reducer's shape.

Key schema: every key is built by ``streams.state.keys`` and documented,
with its type, writer and TTL, in docs/redis-schema.md. Every per-experiment
key carries the hash tag `{e:<id>}`, so one commit touches one Redis
Cluster slot. Floats are stored as `%.17g` text, which round-trips an IEEE
double; integers as decimal text; unit records are binary (1). The numbered
notes below give the value formats.

`<src>` is `<topic>|<partition>`, a source partition.

1. Binary, little-endian. Version 1, a unit without pre-experiment values
   (struct `<BHHBdd` then M doubles): version byte 1, variant index, stratum,
   matured (folded) 0|1, entry bucket (on the anchor grid), exposure ts,
   total_1 ... total_M. Version 2, a unit whose exposure carried a `pre`
   value of at least one config metric (CUPED, issue 18; struct `<BHHBddH`
   then 2m doubles): version byte 2, the same five fields, m (the number of
   metrics when written), total_1 ... total_m, pre_1 ... pre_m (NaN: none
   for that metric). Indices and the order of totals and pre values follow
   the config's `variants` and `event_metrics` (issue 26: the event metrics
   the units keep totals of, a ratio's numerator and denominator included;
   for a config of sum metrics only they are its `metrics`, so records
   written before read as is), which must therefore only ever be
   appended to (a record with fewer totals reads the missing ones as 0, the
   missing pre values as none). A unit's pre values are fixed when it is
   created (its first counted exposure). The earlier text form
   `"<variant_index> <stratum> <bucket> <exposure_ts> <matured 0|1>
   <total_1> ... <total_M>"` (%.17g) is still read, by the script and
   ``read_units``, and rewritten in binary when next written. Version 3, a
   unit of a config that tracks exposure age (issue 19,
   ``streams.state.semantics.age_tracking``; struct `<BHHBdd`, m + p + m·nb
   doubles, `HHBH`): version byte 3, the same five fields, total_1 ...
   total_m, pre_1 ... pre_p (NaN: none), metric 1's nb bin totals, metric
   2's, ..., then m, p (0 or m: whether it has pre values), nb (age bins)
   and its fine stratum (last, so the script unpacks the usual record in
   one call). Configs that track no age write versions 1 and 2 as
   before; a version-1/2 record under a config that does (state from before
   issue 19) keeps its version and enters no age cell.
2. Field names join their parts with `|`: `rev|control|3`, `3|12`,
   `liftstream.events|0`.
3. `max_ts`, `anchor` (the entry-bucket grid's origin; state from before has
   `started_at`, read as the anchor), `clk:<src>` (the last partition clock
   a call brought), `max_ts:<src>` (the latest event ts the source's owner
   applied; older state has one `max_ts`), `own:<src>` (older state only:
   the newest owner epoch that wrote, before the fences of issue 25),
   `exposed:<variant>`, `matured:<variant>`,
   `act_sum:<stratum>` (float), `act_n:<stratum>`, `retired_n` (8), `retired_cap`
   (8), `c:<counter>`
   (``streams.state.semantics.COUNTERS``; `c:after_end` also counts the
   exposures dead-lettered because the experiment is concluded), `dl:<reason>`
   (dead letters of the experiment; both counted exactly once, in the
   experiment's ingest call: ``apply_rows``'s ``dead``).
4. Dedupe per source partition; entries with score < clk - DD are pruned by
   every call: they can never mark a duplicate again.
5. Routing index (``streams.state.unit_index``, issue 25): per source
   partition, time-bucketed hashes, field `<unit>` -> `<experiment>
   <position>` pairs (``unit_index.pack``), the position
   `"<topic>|<partition>|<offset>"` of the unit's first exposure to that
   experiment recorded in the bucket (`*` if the position was not given); a
   reader keeps the earliest over the buckets. Each exposure writes its
   field into the current bucket, which expires ``index_ttl_ms`` of every
   running experiment (2 × the longest W + H + L; ``Ingestor.index_ttl``)
   after its end, so an entry outlives each of its experiments' horizons
   after the unit's last exposure to it (issue 24, defect 4); the TTL is in
   the bucket's name, so no expiry moves earlier. Writers merge a unit's
   field under WATCH of the bucket, in MULTI/EXEC (``unit_index.Watch``,
   ``record``): index writes are not fenced, and a stale owner's merge
   must not drop the new owner's entries. A delete removes the
   experiment's entries (``streams.state.registry.delete_state``). Older
   versions kept a hash per unit (``keys.unit_index_key``), read as a
   fallback for one TTL after the upgrade.
6. JSON `[event_id, metric, ts, value]`; released (as kind `h` rows of the
   exposure's call) to each experiment whose first exposure of the unit
   arrives later, dropped after `hold_seconds` (Ingestor setting).
7. `"n sum_y sum_y2 nx sum_x sum_x2 sum_xy sum_y_x"` over the matured units
   of the cell (``ExperimentSnapshot.cells``): y = a unit's total, x = its
   pre-experiment value of the metric; the last five over the units that
   have an x. Cells written before the covariate sums existed have the first
   three only; the rest read as 0. Issue 26: y is the metric's per-unit
   outcome (``streams.state.semantics.outcome``), and a capped sum or a
   ratio appends its extra values (``ExperimentSnapshot.extra_cells``:
   2 more numbers for a capped sum, 3 or 6 then the 12 covariate sums of
   ``semantics.RATIO_COV_SUMS`` for a ratio) to the same text; sum metrics without a cap
   write the 8 as before.
10. Tail sketch (issue 26): per source, a field `t|<metric>|<variant>` ->
   `"<bucket>:<count> ..."` (``pack_tails``: bucket order, zeros kept) in its
   shard (``keys.shard_key``; ``kernels.tail``'s buckets of the folded units'
   uncapped totals, sum metrics only), absolute values the owner HSETs with
   its cells, the whole (metric, variant) when any of its counts moved.
   Owners before that wrote a field per bucket,
   `t|<metric>|<variant>|<bucket>` -> count; readers read both
   (``tail_counts``), and an owner that loads a shard holding them writes
   them packed and deletes them in its next commit. Readers add the
   sources' counts (integers: exact in any order) to the older
   ``keys.tails_key`` hash (fields `<metric>|<variant>|<bucket>`, HINCRBY'd
   before the counts moved into the shards, never written since); counts at
   0 are skipped by readers.
9. Exposure-age cells (issue 19, only when the config tracks age), in the
   same hash: field `a|<metric>|<variant>|<fine stratum>` (four parts; a
   name has no `|`) -> `"n Σy_0 Σy_0² ... Σy_{B-1} Σy_{B-1}² Σy_0·y_{B-1}"`
   (2B + 2 numbers, ``ExperimentSnapshot.age_cells``) over the matured units
   of that fine stratum: y_b = a unit's total in exposure-age bin b (a
   conversion's: 1 if it is > threshold); a ratio's `"n ΣM_0 ΣM_0² ΣD_0
   ΣD_0² ΣM_0·D_0 ..."` (1 + 5B numbers, ``semantics.age_cell_width``).
8. Rule 6 (``streams.state.semantics``): a folded unit stays in the zset, scored
   close + H, until that passes the partition clock - L; then its record is
   deleted from `units`, its id added to `retired` (a scalable Bloom filter,
   ``streams.state.retired_filter``) and `retired_n` in meta counts it.
   `retired_cap`: the last layer the server's string limit holds, written
   only where it is below ``retired_filter.MAX_LAYER`` (a small
   ``proto-max-bulk-len``); beyond the cap units go into the last layer.

Stratum indices run 0..S-1 for the activity strata and S for "unknown
activity" (S = len(strata_edges) - 1).

Why the routing index stores the first exposure's position rather than being
a plain set: it lives in another slot, so it is written (idempotently, HSETNX,
in a pipeline) *before* the experiment's commit. After a crash between
those two steps, a replay would otherwise see the unit as already exposed and
route a metric that preceded its exposure in the stream to the experiment.
With the position, a metric is routed only to experiments whose first
exposure of the unit came before it, and held metrics are released only by
that exposure, on the first run and on every replay alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from itertools import accumulate, groupby
from operator import add, itemgetter
from typing import Any

import orjson
from redis import exceptions as redis_exceptions
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from schemas.records import Event, ExperimentConfig, Exposure, Metric
from streams.state import keys as rk
from streams.state import unit_index
from streams.state.keys import (
    INGEST_OFFSETS,
    LEGACY_INGEST_KEYS,
    PARTITION_CLOCKS,
    PARTITION_EPOCHS,
    RETENTION_LOST,
    TOPIC_IDS,
    TOPIC_PARTITIONS,
    UNROUTED_LOST,
    completeness_key,
    experiment_keys,
    unit_hold_key,
    unit_hold_queue,
)
from streams.state.pending import PendingIndex, in_order, read_entries
from streams.state.semantics import (
    COUNTERS,
    FOLD_LIMIT,
    ExperimentSnapshot,
    UnitState,
    age_cell_width,
    age_edges_ms,
    age_tracking,
    completed_buckets,
    config_ms,
    fine_edges,
    horizons_ms,
    metric_plans,
    n_activity_strata,
    started_and_arrivals,
    watermark_of,
)
from streams.state.unit_records import (  # noqa: F401 - encode_unit(s): re-exported
    _int,
    _s,
    decode_unit,
    encode_unit,
    encode_units,
)
from streams.state.wire import Reads, packs, send_raw


def offsets_field(topic: str, partition: int) -> str:
    return rk.source(topic, partition)


# ---------------------------------------------------------------- the scripts

_scripts: dict[str | None, Any] = {}

#: an argument or value not read (yet) from Redis
_UNREAD = object()
_TS, _EID = itemgetter(6), itemgetter(3)  # a row's ts and experiment_id

#: an owner call's ``generation`` when the caller read none: no generation
#: is checked (``streams.state.partition_store``: ``Commit``, ``apply_rows_owned``)
UNCHECKED = b"\0unchecked"


def as_bytes(x: bytes | str | None) -> bytes | None:
    """A reply as bytes (a client that decodes replies gives str): how
    generations are compared (``Registry.generation``, the owner's check)."""
    return x.encode() if isinstance(x, str) else x


# ---------------------------------------------------------------- rows
#
# The ingest path carries events as plain tuples ("rows"), not dataclasses:
#   (offset, kind, event_id, experiment_id, unit_id, name, ts, num, pre)
# kind "x" (exposure: name = variant, num = pre_activity or None, pre = the
# CUPED covariates {metric: float} or None) or "m" (metric: name = metric,
# num = value, pre None; experiment_id may be None); ts an int, num a float.
# ``schemas.validate.parse_event_row`` makes them from bytes; ``event_row``
# from an Event. A *clocked* row has the partition clock after the event
# appended (index 9: ``clocked``).


def event_row(offset: int, ev: Event) -> tuple:
    """The row of an Event (``apply_batch``, the tests, the reducer's peers)."""
    if isinstance(ev, Exposure):
        return (int(offset), "x", ev.event_id, ev.experiment_id, ev.unit_id, ev.variant,
                int(ev.ts), None if ev.pre_activity is None else float(ev.pre_activity),
                {k: float(v) for k, v in ev.pre.items()} if ev.pre else None)
    if isinstance(ev, Metric):
        return (int(offset), "m", ev.event_id, ev.experiment_id, ev.unit_id, ev.metric,
                int(ev.ts), float(ev.value), None)
    raise TypeError(f"not an event: {type(ev).__name__}")


def apply_rows(r: Any, cfg: ExperimentConfig, source_topic: str, partition: int,
               rows: Sequence[tuple], clk_end: int, fold_limit: int = FOLD_LIMIT,
               epoch: int | None = None, dead: Sequence[tuple[int, str]] = (),
               generation: bytes | None = UNCHECKED) -> dict[str, Any]:
    """One call of the partition's owner for one experiment (issue 25,
    ``streams.state.partition_store.apply_rows_owned``): clocked ``rows`` of
    one source partition (routed to ``cfg``'s experiment, increasing
    offsets), then maturation and hold expiry at ``clk_end``;
    ``ExperimentState.apply_batch`` run in this process and committed to
    Redis in one fenced MULTI/EXEC.

    Events at or below the offset already stored for (topic, partition) are
    skipped, so a replay after a crash is a no-op. Returns ``applied``,
    ``skipped``, ``offset``, ``max_ts``, ``more`` (1: call again to settle
    the rest), ``dirty_seq`` (None: nothing a reader sees changed) and the
    net change of each counter that moved.

    ``epoch``: the caller's owner epoch of the partition (``claim_partition``);
    ``Fenced`` when a newer owner claimed it (the commit WATCHes the
    experiment's fence of the source), ``LostCommits`` when Redis holds fewer
    of this owner's commits than it made.

    ``dead``: (offset, meta field) of the batch's dead letters attributed to
    the experiment, the field ``dl:<reason>`` or, for a dead letter that
    stands for one of its counters, ``c:<counter>`` (``c:after_end``: an
    exposure to a concluded experiment); each adds 1 to its field in the same
    commit, skipped like the events when its offset was applied before
    (a retried batch counts none twice). Dead letters alone do not settle.

    ``generation``: the experiment's generation ``cfg`` was read with
    (``Registry.generation``; ``UNCHECKED``: none checked):
    ``ExperimentChanged``, nothing written, when Redis holds another (the
    experiment was deleted, or deleted and re-created, since).
    """
    from streams.state.partition_store import apply_rows_owned, owner_for

    owner = owner_for(r, source_topic, partition, epoch)
    return apply_rows_owned(owner, cfg, rows, clk_end, fold_limit, dead, generation)


def settle(r: Any, cfg: ExperimentConfig, source_topic: str, partition: int, clk: int,
           fold_limit: int = FOLD_LIMIT, epoch: int | None = None,
           generation: bytes | None = UNCHECKED) -> bool:
    """Mature and expire holds of one experiment on one source partition at
    ``clk``, in bounded calls until none is left (``ExperimentState.settle``
    until it returns False); True if anything changed. ``generation``: as
    for ``apply_rows``."""
    changed = False
    while True:
        out = apply_rows(r, cfg, source_topic, partition, (), clk, fold_limit, epoch,
                         generation=generation)
        changed = changed or out.get("dirty_seq") is not None
        if not out.get("more"):
            return changed


def due_to_settle(r: Any, cfgs: Iterable[ExperimentConfig], topic: str, partition: int,
                  clk: int) -> list[ExperimentConfig]:
    """The experiments with something for ``settle`` to do on the partition at
    ``clk``: a pending unit whose window closed (score <= clk - L) or a held
    unit past the hold horizon (score < clk - Hh), the scripts' own queries,
    LIMIT 1, in one pipeline. Settling the others would change nothing but
    their stored clock, so a quiet partition's settle costs two native
    commands per experiment instead of a script call each."""
    cfgs = list(cfgs)
    if not cfgs:
        return []
    src = offsets_field(topic, partition)
    pipe = r.pipeline(transaction=False)
    for cfg in cfgs:
        _, _, L, _ = config_ms(cfg)
        Hh = horizons_ms(cfg)[1]
        eid = cfg.experiment_id
        pipe.zrangebyscore(rk.pending_key(eid, src), "-inf", clk - L, start=0, num=1)
        pipe.zrangebyscore(rk.heldq_key(eid, src), "-inf", f"({clk - Hh}", start=0, num=1)
        # the bucket layout's smallest score (``streams.state.pending``)
        pipe.hget(rk.meta_key(eid), rk.pending_index_field(src))
    got = pipe.execute()
    out = []
    for j, cfg in enumerate(cfgs):
        due, held, raw = got[3 * j:3 * j + 3]
        idx = PendingIndex.parse(raw)
        lo = None if idx is None else idx.min
        if due or held or (lo is not None and lo <= clk - config_ms(cfg)[2]):
            out.append(cfg)
    return out


# ---------------------------------------------------------------- Redis faults

#: Redis errors that say the server cannot take the request now, not that the
#: request is wrong: callers retry them with backoff (and report the stall)
#: rather than stop. OOM: ``maxmemory`` reached under ``noeviction`` (a write
#: script is refused before its first write, so nothing is half applied);
#: READONLY: connected to a replica, e.g. right after a failover.
TRANSIENT_REDIS = (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError,
                   redis_exceptions.BusyLoadingError, redis_exceptions.TryAgainError,
                   redis_exceptions.ClusterDownError, redis_exceptions.OutOfMemoryError,
                   redis_exceptions.ReadOnlyError)


class RedisBusy(redis_exceptions.ResponseError):
    """BUSY: another client's script is past ``lua-time-limit``; the server
    answers again once it ends or is killed."""


def transient(e: BaseException) -> BaseException | None:
    """``e`` as an error worth retrying, or None: a ``TRANSIENT_REDIS``, or a
    BUSY reply (which redis-py raises as a plain ResponseError), as RedisBusy."""
    if isinstance(e, TRANSIENT_REDIS):
        return e
    if isinstance(e, redis_exceptions.ResponseError) and str(e).startswith("BUSY"):
        return RedisBusy(str(e))
    return None


def transient_reason(e: BaseException) -> str:
    """A short label for a transient Redis error (metrics, /readyz)."""
    if isinstance(e, redis_exceptions.OutOfMemoryError):
        return "redis_oom"
    if isinstance(e, redis_exceptions.ReadOnlyError):
        return "redis_readonly"
    if isinstance(e, redis_exceptions.BusyLoadingError):
        return "redis_loading"
    if isinstance(e, RedisBusy):
        return "redis_busy"
    return "redis_unavailable"


class EvictingRedis(Exception):
    """Redis may evict keys under memory pressure: it would delete state."""


def _node_infos(r: Any, section: str) -> list[dict]:
    """``INFO <section>`` of the server, or of every primary of a Redis
    Cluster (redis-py keys those replies by node)."""
    if not _is_cluster(r):
        return [r.info(section)]
    from redis.cluster import RedisCluster

    reply = r.info(section, target_nodes=RedisCluster.PRIMARIES)
    if reply and all(isinstance(v, dict) for v in reply.values()):
        return [reply[k] for k in sorted(reply)]
    return [reply]


def check_eviction_policy(r: Any) -> None:
    """Raise ``EvictingRedis`` unless every server's ``maxmemory-policy`` is
    ``noeviction``. An evicting Redis deletes units, sightings, offsets or
    chains to make room, silently: a full Redis must refuse writes (ingest
    waits: ``TRANSIENT_REDIS``) instead. Read from ``INFO memory``, which
    managed services allow where ``CONFIG GET`` is refused."""
    bad = sorted({str(i.get("maxmemory_policy")) for i in _node_infos(r, "memory")}
                 - {"noeviction"})
    if bad:
        raise EvictingRedis(
            f"Redis's maxmemory-policy is {', '.join(bad)}: an evicting Redis deletes "
            "liftstream's state (units, dedupe sightings, applied offsets) under memory "
            "pressure, silently. Set maxmemory-policy to noeviction (redis.conf, "
            "`CONFIG SET maxmemory-policy noeviction`, or the managed service's parameter "
            "group); at maxmemory ingest then waits instead of losing data.")


def redis_identity(r: Any) -> tuple[str, ...]:
    """The server's ``run_id`` and ``master_replid`` (every primary's, on a
    Redis Cluster): a restart changes the first, a failover to a replica the
    second; either may have lost acknowledged writes."""
    out: list[str] = []
    for srv, rep in zip(_node_infos(r, "server"), _node_infos(r, "replication"), strict=True):
        out += [str(srv.get("run_id", "")), str(rep.get("master_replid", ""))]
    return tuple(out)


# ---------------------------------------------------------------- owner epochs

#: ``PARTITION_EPOCHS``, ``INGEST_OFFSETS`` and ``PARTITION_CLOCKS`` share the
#: hash tag ``{ingest}`` (one Redis Cluster slot): ``record_position`` touches
#: all three in one script. Before, they were ``lr:ingest:<name>``
#: (``migrate_ingest_keys``). The names: ``streams.state.keys``.


class TopicMismatch(Exception):
    """The events topic is not the one Redis's applied offsets belong to (it
    was deleted and created again): its offsets would skip new events."""


def check_topic_id(r: Any, topic: str, topic_id: str) -> None:
    """Record ``topic``'s Kafka id on first sight; raise ``TopicMismatch`` if
    Redis holds offsets of another topic by that name."""
    if r.hsetnx(TOPIC_IDS, topic, topic_id):
        return
    known = _s(r.hget(TOPIC_IDS, topic))
    if known != topic_id:
        raise TopicMismatch(
            f"events topic {topic!r} has id {topic_id}, but Redis's applied offsets belong "
            f"to topic id {known}: the topic was deleted and created again, and its new "
            f"events would be skipped as already applied. Run `liftstream admin "
            f"reset-offsets --topic {topic}` to forget the old topic's positions (the "
            "experiments' state stays), or restore the old topic.")


class PartitionCountChanged(TopicMismatch):
    """The events topic's partition count is not the one Redis's state was
    built with: units' keys now pick other partitions."""


def check_partition_count(r: Any, topic: str, partitions: int) -> None:
    """Record ``topic``'s partition count on first sight; raise
    ``PartitionCountChanged`` if Redis's state was built with another."""
    if r.hsetnx(TOPIC_PARTITIONS, topic, int(partitions)):
        return
    known = int(_s(r.hget(TOPIC_PARTITIONS, topic)))
    if known != int(partitions):
        raise PartitionCountChanged(
            f"events topic {topic!r} has {partitions} partitions, but Redis's state was built "
            f"with {known}: a unit's events now go to another partition than its state "
            "belongs to (keys hash differently), so ingest stops here. Let the workers "
            f"drain, then run `liftstream admin accept-partitions --topic {topic} --yes` "
            "to record the new count and restart them; units seen on two partitions are "
            "counted (docs/operations.md, \"Changing the events topic's partitions\").")


def accept_partition_count(r: Any, topic: str, partitions: int) -> int | None:
    """Record ``partitions`` as ``topic``'s partition count (``liftstream
    admin accept-partitions``); returns the count recorded before, if any."""
    old = r.hget(TOPIC_PARTITIONS, topic)
    r.hset(TOPIC_PARTITIONS, topic, int(partitions))
    return None if old is None else int(_s(old))


def reset_topic_offsets(r: Any, topic: str, experiment_ids: Iterable[str]) -> int:
    """Forget every position of ``topic``: its applied offsets, partition
    clocks, owner epochs, completeness, recorded id and partition count, and
    each experiment's per-partition offsets and clocks of it. The experiments' state (units,
    cells, ...) stays. Returns the number of fields removed."""
    prefix = f"{topic}|"
    n = 0
    for h in (INGEST_OFFSETS, PARTITION_CLOCKS, PARTITION_EPOCHS, RETENTION_LOST, UNROUTED_LOST):
        fields = [f for f in (_s(x) for x in r.hkeys(h)) if f.startswith(prefix)]
        if fields:
            n += r.hdel(h, *fields)
    n += (r.hdel(TOPIC_IDS, topic) + r.hdel(TOPIC_PARTITIONS, topic)
          + r.delete(completeness_key(topic)))
    for eid in experiment_ids:
        offs = rk.offsets_key(eid)
        fields = [f for f in (_s(x) for x in r.hkeys(offs)) if f.startswith(prefix)]
        if fields:
            n += r.hdel(offs, *fields)
            n += r.hdel(rk.meta_key(eid),
                        *[f"{k}:{f}" for f in fields for k in ("clk", "own")])
            # the owner epochs start again from 1: so must the fences
            n += r.delete(*[rk.fence_key(eid, f) for f in fields])
    return n


class Fenced(Exception):
    """A state write refused: a newer owner claimed the source partition."""


@contextmanager
def script_errors():
    """A script's error replies as the exceptions callers handle: ``FENCED``
    as ``Fenced``; a command the script ran refused for memory (OOM) or on a
    replica (READONLY) as redis-py's ``OutOfMemoryError`` / ``ReadOnlyError``,
    which ``TRANSIENT_REDIS`` retries. (Redis wraps those in "Error running
    script"; it refuses only a script's *first* write for memory, so such a
    script changed nothing.)"""
    try:
        yield
    except ResponseError as e:
        msg = str(e)
        if msg.startswith("FENCED"):
            raise Fenced(msg) from None
        if "OOM command not allowed" in msg:
            raise redis_exceptions.OutOfMemoryError(msg) from None
        if "READONLY" in msg:
            raise redis_exceptions.ReadOnlyError(msg) from None
        raise


def claim_partition(r: Any, topic: str, partition: int) -> int:
    """A new owner epoch for the partition, higher than every earlier one:
    writes carrying an older epoch are refused from now on (by the scripts,
    once this owner wrote the experiment; by ``record_position`` at once)."""
    return int(r.hincrby(PARTITION_EPOCHS, offsets_field(topic, partition), 1))


# ---------------------------------------------------------------- partition clocks

#: ``PARTITION_CLOCKS``: hash "<topic>|<partition>" -> the partition clock (ms):
#: max event ts seen on it, or the wall clock an idle caught-up partition was
#: advanced to. ``INGEST_OFFSETS``: last offset fully applied (every experiment).
_MIGRATE = """
local n = 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('RENAME', KEYS[i], KEYS[i + 1])
    n = n + 1
  end
end
return n
"""


def migrate_ingest_keys(r: Any) -> int:
    """Rename the pre-cluster ``lr:ingest:{offsets,clocks,epochs}`` of a single
    Redis server to their ``lr:{ingest}:`` names (atomically, once: a new key
    that exists already is left alone); the ingest plane calls it at start.
    Returns how many were renamed. No-op on a Redis Cluster, where the old
    names never worked (``record_position`` would have been CROSSSLOT)."""
    if _is_cluster(r):
        return 0
    return int(r.eval(_MIGRATE, 2 * len(LEGACY_INGEST_KEYS),
                      *[k for pair in LEGACY_INGEST_KEYS for k in pair]))


def partition_clock(r: Any, topic: str, partition: int) -> int | None:
    v = r.hget(PARTITION_CLOCKS, offsets_field(topic, partition))
    return None if v is None else _int(v)


def partition_start(r: Any, topic: str, partition: int, experiments: Iterable[str] = (),
                    exposed: Sequence[str] = (), index_ttl: int | None = None
                    ) -> tuple[int | None, bool, dict[str, bytes | None], unit_index.IndexView]:
    """What a source batch reads of its partition first, in one round trip:
    the partition clock (``partition_clock``), whether its unit-hold
    queue holds any metric (``unit_hold_queue``; Redis deletes an empty
    sorted set) and the generation of each of ``experiments``
    (``keys.generation_key``; None: none, the experiment is deleted): the
    caller compares them with its cached configs' before it routes or
    applies anything (``Ingestor.process``). Only the partition's owner
    writes the hold queue, so the answer holds for the whole batch:
    ``apply_source_batch``'s ``holds``. With ``index_ttl``, also the fields
    of the ``exposed`` units in the routing index's current bucket (the
    writes merge into them, ``unit_index.add_current_read``)."""
    eids = list(experiments)
    now = _now_ms()
    units = list(exposed) if index_ttl is not None else []
    # the packed path WATCHes the current bucket on a connection it holds
    # until the batch's merge (``unit_index.Watch``, ``record``)
    watch = unit_index.Watch(r) if units and packs(r) else None
    p = Reads(r, None if watch is None else watch.conn) \
        .add("HGET", PARTITION_CLOCKS, offsets_field(topic, partition)) \
        .add("EXISTS", unit_hold_queue(topic, partition)) \
        .add("HGETALL", rk.index_buckets_key(topic, partition))
    for eid in eids:
        p.add("GET", rk.generation_key(eid))
    name = None if watch is None else unit_index.add_current_read(
        p, topic, partition, index_ttl or 0, now, units)
    try:
        clk, held, buckets, *gens = p.execute()
    except BaseException:
        if watch is not None:
            watch.watching = name is not None
            watch.release()
        raise
    if watch is not None and name is not None:
        cur = gens.pop()
        gens.pop()  # WATCH's OK
        watch.read(name, units, cur)
    view = unit_index.view_of(buckets, clk, now, watch)
    return ((None if clk is None else _int(clk)), bool(held),
            {e: as_bytes(g) for e, g in zip(eids, gens, strict=True)}, view)


def clocked(rows: Sequence[tuple], clk: int | None) -> tuple[list[tuple], int | None]:
    """Rows with the partition clock after each appended (running max of ts
    from ``clk``; index 9 of a clocked row), and the clock after the last.

    Why no Python loop: the running max is ``accumulate`` (``max`` keeps
    the clock on a tie, as ``ts > clk`` did) and each clocked row is
    ``row + (clock,)`` by ``map`` (``(*row, clk)`` built a list first),
    all in C (with ``route_rows``' and ``Ingestor.process``' paths: 71.0k
    -> 68.0k instr/event on the bench batches)."""
    if not rows:
        return [], clk
    clocks = accumulate(map(_TS, rows), max, initial=rows[0][6] if clk is None else clk)
    next(clocks)  # the clock before the first row
    out = list(map(add, rows, zip(clocks)))
    return out, out[-1][9]


def too_old_margin(cfg: ExperimentConfig) -> int:
    """W + H + L (ms): an exposure at ts is too old once ts + this <= clk."""
    W, _, L, _ = config_ms(cfg)
    return W + horizons_ms(cfg)[0] + L


def too_old(cfg: ExperimentConfig, ts: int, clk: int) -> bool:
    """Rule 2's too_old: the exposure's window closed before the correction
    horizon of its partition clock (``streams.state.semantics``)."""
    return ts + too_old_margin(cfg) <= clk


def clocked_batch(r: Any, known: dict[str, ExperimentConfig], topic: str, partition: int,
                  rows: Sequence[tuple], rejected: list[tuple[int, str]] | None = None,
                  clock: Any = _UNREAD) -> tuple[list[tuple], int | None]:
    """The rows of a source batch that reach the state, clocked from the
    stored partition clock (``clock``, when the caller read it:
    ``partition_start``), and the clock after them. Rows of unregistered
    experiments are dead letters: they move no clock (``rejected`` gets them
    as ``unknown_experiment``)."""
    ids = set(map(_EID, rows))
    ids.discard(None)
    if known.keys() >= ids:  # every row's experiment registered (the usual batch)
        kept = rows
    else:
        kept = []
        for i, row in enumerate(rows):
            if row[3] is not None and row[3] not in known:
                if rejected is not None:
                    rejected.append((i, "unknown_experiment"))
            else:
                kept.append(row)
    return clocked(kept, partition_clock(r, topic, partition) if clock is _UNREAD else clock)


def apply_source_batch(r: Any, known: dict[str, ExperimentConfig], topic: str, partition: int,
                       rows: Sequence[tuple], hold_seconds: int = 86_400, hold_max: int = 64,
                       rejected: list[tuple[int | None, str]] | None = None,
                       fold_limit: int = FOLD_LIMIT,
                       clocked_rows: tuple[list[tuple], int | None] | None = None,
                       epoch: int | None = None,
                       dead: dict[str, list[tuple[int, str]]] | None = None,
                       index_ttl: int | None = None, holds: bool | None = None,
                       generations: dict[str, bytes | None] | None = None,
                       index_view: unit_index.IndexView | None = None,
                       ) -> tuple[dict[str, dict[str, Any]], int | None]:
    """One source batch into Redis: ``Reducer.apply_batch``.

    Moves the partition clock over every row of a registered experiment (or
    without one: dead letters move no clock), routes (``route_rows``), makes
    one ``apply_rows`` call per experiment at the batch's end clock, expires
    unit-level holds, then records the partition's clock and last offset
    (after every experiment applied: a replay starts from a clock that
    belongs to its first offset). Returns per-experiment call results and the
    clock; ``rejected`` gets (row index, reason) of rows reaching no
    experiment (``unknown_experiment``, ``unrouted`` = held without
    experiment, ``unrouted_expired`` = over the hold bound), and (None,
    ``unrouted_expired``) per held metric of a never-exposed unit that the
    batch's clock expired (``expire_unit_holds``). ``clocked_rows``:
    ``clocked_batch``'s result for ``rows``, when the caller already has it;
    ``epoch``: the caller's owner epoch of the partition (``Fenced`` if stale);
    ``dead``: per experiment of ``known``, (offset, meta field) of the batch's
    dead letters attributed to it, counted in its experiment's call (one
    without events where it has none): exactly once, like the events;
    ``index_ttl``: the routing index's TTL (``route_rows``); ``holds``:
    whether the partition's unit-hold queue held any metric before the batch
    (``partition_start``; None: not read). Without any before and none held
    by the batch, no hold can expire: neither ``route_rows`` nor
    ``expire_unit_holds`` asks Redis (a round trip each a batch).
    ``generations``: per experiment of ``known``, the generation its config
    was read with (``apply_rows``; an experiment without one: unchecked).
    ``index_view``: the partition's routing index buckets
    (``partition_start``; None: read by ``route_rows``)."""
    gens = generations or {}
    if clocked_rows is None:
        clocked_rows = clocked_batch(r, known, topic, partition, rows, rejected)
    crows, clk = clocked_rows
    dead = dead or {}
    rejected = [] if rejected is None else rejected
    n0 = len(rejected)
    routed = route_rows(r, crows, known, topic, partition, rejected, hold_max,
                        index_ttl, holds, index_view) if crows else {}
    # metrics over the hold bound, dropped by the routing: kept with the position
    over = sum(1 for _, why in rejected[n0:] if why == "unrouted_expired")
    out = {e: apply_rows(r, known[e], topic, partition, lst, clk, fold_limit, epoch,
                         dead.get(e, ()), gens.get(e, UNCHECKED))
           for e, lst in routed.items()}
    for e in sorted(dead.keys() - routed.keys()):  # dead letters alone: no settling
        out[e] = apply_rows(r, known[e], topic, partition, (), 0 if clk is None else clk,
                            fold_limit, epoch, dead[e], gens.get(e, UNCHECKED))
    if not crows:
        return out, clk
    # (a metric ``route_rows`` rejects as ``unrouted`` is one it held)
    if holds is not False or any(why == "unrouted" for _, why in rejected[n0:]):
        _count_expired(rejected, expire_unit_holds(r, topic, partition,
                                                   clk - int(hold_seconds) * 1000,
                                                   experiments=known))
    record_position(r, topic, partition, max(row[0] for row in rows), clk,  # dead letters too
                    epoch, unrouted_lost=over)
    return out, clk


_RECORD_POSITION = """
local owner = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
if ARGV[4] ~= '' and owner ~= nil and tonumber(ARGV[4]) < owner then
  return redis.error_reply('FENCED ' .. ARGV[1] .. ' is owned by epoch ' .. owner)
end
for i = 1, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[i], ARGV[1]))
  local v = ARGV[i + 1]
  if v ~= '' and (cur == nil or tonumber(v) > cur) then
    redis.call('HSET', KEYS[i], ARGV[1], v)
    if i == 1 and ARGV[5] ~= '0' then redis.call('HINCRBY', KEYS[4], ARGV[1], ARGV[5]) end
  end
end
"""


def record_position(r: Any, topic: str, partition: int, offset: int | None,
                    clock: int | None, epoch: int | None = None,
                    unrouted_lost: int = 0) -> None:
    """The partition's last fully applied offset and its clock, each only ever
    moving forward (a replay of older offsets, a racing idle advance), in one
    atomic step; refused (``Fenced``) when ``epoch`` is older than the
    partition's current owner's. ``unrouted_lost``: the batch's metrics
    dropped unrouted (``UNROUTED_LOST``), added only when the offset moves
    forward, so a retried or replayed batch counts none twice."""
    _call_script(r, None, _RECORD_POSITION,
                 [INGEST_OFFSETS, PARTITION_CLOCKS, PARTITION_EPOCHS, UNROUTED_LOST],
                 [offsets_field(topic, partition), "" if offset is None else int(offset),
                  "" if clock is None else int(clock), "" if epoch is None else int(epoch),
                  int(unrouted_lost)])


def _call_script(r: Any, name: str | None, source: str, keys: list, args: list) -> Any:
    """The reply of script ``source`` (cached in ``_scripts`` under ``name``)
    run on ``keys``/``args``, its errors as ``script_errors`` raises them.
    On the packed path (``wire.packs``) EVALSHA is packed by hiredis and
    sent on a pooled connection, and EVAL follows when Redis lacks the
    script (NOSCRIPT: a restart, a SCRIPT FLUSH; EVAL caches it again);
    elsewhere redis-py's ``Script`` does the same. Why, measured: redis-py's
    ``Script``/``evalsha`` machinery was ~1.6% of the ingest client's CPU
    (py-spy), for one call a batch (``record_position``)."""
    sc = _scripts.get(name)
    if sc is None:
        sc = _scripts[name] = r.register_script(source)
    with script_errors():
        if not packs(r):
            return sc(keys=keys, args=args, client=r)
        pool = r.connection_pool
        conn = pool.get_connection()
        try:
            (got,) = send_raw(conn, [("EVALSHA", sc.sha, len(keys), *keys, *args)])
            if isinstance(got, redis_exceptions.NoScriptError):
                (got,) = send_raw(conn, [("EVAL", source, len(keys), *keys, *args)])
        finally:
            pool.release(conn)
        if isinstance(got, Exception):
            raise got
        return got


_ACCOUNT_GAP = """
local owner = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
if ARGV[4] ~= '' and owner ~= nil and tonumber(ARGV[4]) < owner then
  return redis.error_reply('FENCED ' .. ARGV[1] .. ' is owned by epoch ' .. owner)
end
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or -1
local last = tonumber(ARGV[3]) - 1
if cur ~= tonumber(ARGV[2]) or last <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], last)
redis.call('HINCRBY', KEYS[2], ARGV[1], last - cur)
return last - cur
"""


def account_retention_gap(r: Any, topic: str, partition: int, applied: int, log_start: int,
                          epoch: int | None = None) -> int:
    """The partition's log starts at ``log_start`` but Redis applied only up
    to ``applied`` (-1: nothing): retention deleted the offsets between, never
    applied. Count them in ``RETENTION_LOST`` and move the applied offset to
    ``log_start - 1``, in one atomic step (so a restart does not count them
    again; a no-op when the applied offset is no longer ``applied``). Returns
    the number of offsets lost (0: none, or already counted)."""
    return int(_call_script(r, "gap", _ACCOUNT_GAP,
                            [INGEST_OFFSETS, RETENTION_LOST, PARTITION_EPOCHS],
                            [offsets_field(topic, partition), int(applied), int(log_start),
                             "" if epoch is None else int(epoch)]))


def retention_lost(r: Any, topic: str) -> dict[int, int]:
    """Offsets of ``topic`` deleted by retention before ingest applied them,
    per partition (``account_retention_gap``)."""
    return _per_partition(r, RETENTION_LOST, topic)


def unrouted_lost(r: Any, topic: str) -> dict[int, int]:
    """Metrics without experiment_id of ``topic`` dropped because no exposure
    of their unit routed them (over the hold bound, or expired), per
    partition: no experiment's data_quality can hold them."""
    return _per_partition(r, UNROUTED_LOST, topic)


def ingest_losses(r: Any, topic: str) -> dict[str, dict[int, int]]:
    """What ingest lost of ``topic`` outside any experiment, per partition,
    as Redis has counted it (every worker, every restart): ``retention_lost``
    and ``unrouted_lost``; shown in ``/readyz`` and ``/metrics``. One
    round trip."""
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(RETENTION_LOST)
    pipe.hgetall(UNROUTED_LOST)
    ret, unr = pipe.execute()
    return {"retention_lost": _of_topic(ret, topic), "unrouted_lost": _of_topic(unr, topic)}


def _per_partition(r: Any, key: str, topic: str) -> dict[int, int]:
    return _of_topic(r.hgetall(key), topic)


def _of_topic(h: dict, topic: str) -> dict[int, int]:
    """A ``<src>`` -> count hash's entries of ``topic``, by partition."""
    out = {}
    for k, v in h.items():
        t, _, p = _s(k).rpartition("|")
        if t == topic:
            out[int(p)] = int(v)
    return out


def advance_partition(r: Any, configs: Iterable[ExperimentConfig], topic: str, partition: int,
                      clock_ms: int, hold_seconds: int = 86_400, epoch: int | None = None,
                      rejected: list[tuple[int | None, str]] | None = None) -> int:
    """``Reducer.advance``: an idle, caught-up partition's clock moves to
    ``clock_ms`` if later; every experiment settles on it. Returns the clock;
    ``rejected`` gets (None, ``unrouted_expired``) per held metric of a
    never-exposed unit that expired, as ``apply_source_batch``'s does."""
    record_position(r, topic, partition, None, clock_ms, epoch)
    clk = partition_clock(r, topic, partition)
    configs = list(configs)
    for cfg in configs:
        settle(r, cfg, topic, partition, clk, epoch=epoch)
    _count_expired(rejected, expire_unit_holds(r, topic, partition,
                                               clk - int(hold_seconds) * 1000,
                                               experiments=[c.experiment_id for c in configs]))
    return clk


def _count_expired(rejected: list[tuple[int | None, str]] | None, lost: int) -> None:
    """``lost`` expired held metrics as ``rejected`` entries: no row of the
    batch is theirs (None), their reason is ``unrouted_expired`` (the
    reducer's counter of the same name counts them the same way)."""
    if rejected is not None and lost:
        rejected.extend([(None, "unrouted_expired")] * lost)


def expire_unit_holds(r: Any, topic: str, partition: int, cut: int, limit: int = 10_000,
                      experiments: Iterable[str] = ()) -> int:
    """Drop unit-level holds of the partition whose newest held ts < ``cut``;
    returns how many held metrics of units never exposed were dropped (the
    ``unrouted_expired`` count), which are added to ``UNROUTED_LOST``. A unit
    counts as exposed while the routing index has an entry of it for one of
    ``experiments`` or a registered experiment (``unit_index.read_index``:
    its entries are per experiment)."""
    eids = set(experiments)
    q = unit_hold_queue(topic, partition)
    lost = 0
    while True:
        uids = [_s(u) for u in r.zrangebyscore(q, "-inf", f"({cut}", start=0, num=limit)]
        if not uids:
            return lost
        pipe = r.pipeline(transaction=False)
        for u in uids:
            pipe.hlen(unit_hold_key(u))
        pipe.smembers(rk.EXPERIMENTS_SET)
        *res, registered = pipe.execute()
        index = unit_index.read_index(r, topic, partition, uids,
                                      sorted(eids | {_s(e) for e in registered}))
        n = sum(n for u, n in zip(uids, res, strict=True) if not index[u])
        lost += n
        pipe = r.pipeline(transaction=False)
        for u in uids:
            pipe.delete(unit_hold_key(u))
        pipe.zrem(q, *uids)
        if n:  # counted with the deletes: a retry finds them gone, counts none again
            pipe.hincrby(UNROUTED_LOST, offsets_field(topic, partition), n)
        pipe.execute()
        if len(uids) < limit:
            return lost


def apply_batch(
    r: Any,
    cfg: ExperimentConfig,
    source_topic: str,
    partition: int,
    events_with_offsets: Sequence[tuple[int, Event]],
    clk_end: int | None = None,
) -> dict[str, Any]:
    """``apply_rows`` for Events (tests): clocks from the experiment's own
    events, starting at the partition clock stored for the source."""
    rows = [event_row(off, ev) for off, ev in events_with_offsets]
    crows, clk = clocked(rows, None)
    if clk_end is not None:
        clk = clk_end if clk is None or clk_end > clk else clk
    if clk is None:
        return {"applied": 0, "skipped": 0}
    return apply_rows(r, cfg, source_topic, partition, crows, clk)


# ---------------------------------------------------------------- routing


def _marker(topic: str | None, partition: int | None, offset: int) -> str:
    if topic is None or partition is None:
        return "*"
    return f"{topic}|{int(partition)}|{int(offset)}"


def _before(marker: str, topic: str | None, partition: int | None, offset: int) -> bool:
    """Did the event recorded at position ``marker`` come before ``offset``?

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



def _applied_offset(r: Any, topic: str | None, partition: int | None) -> int | None:
    """The partition's last offset recorded as fully applied
    (``record_position``), or None. A row at or below it belongs to a replay
    of a batch whose holds were written, counted and maybe expired already:
    holding it again would count it ``unrouted_expired`` twice or release it
    after it was counted lost."""
    if topic is None or partition is None:
        return None
    v = r.hget(INGEST_OFFSETS, offsets_field(topic, partition))
    return None if v is None else _int(v)


def route_rows(
    r: Any,
    rows: Sequence[tuple],
    known: dict[str, ExperimentConfig],
    source_topic: str | None = None,
    partition: int | None = None,
    rejected: list[tuple[int, str]] | None = None,
    hold_max: int = 64,
    index_ttl: int | None = None,
    holds: bool | None = None,
    index_view: unit_index.IndexView | None = None,
) -> dict[str, list[tuple]]:
    """Split clocked rows of one source batch by experiment (``Reducer._route``):
    experiment id -> its clocked rows, in order, with released held metrics
    (kind ``h``) right after the exposure that releases them.

    One round trip of plain commands (``_index_round_trip``: idempotent
    writes, then the reads), plus one more when metrics are held, so a crash
    between them or a replay routes the same way:

    * exposures (variant in the config, not ``too_old``) record the unit's
      first exposure position in the partition's routing index
      (``streams.state.unit_index``, merged under WATCH). The exposure
      whose position is the recorded one releases the unit's held metrics
      without experiment_id that arrived before it;
    * metrics without experiment_id go to every experiment whose recorded
      exposure came before them (or an exposure earlier in the batch); with
      none, they are held in ``lr:{u:<unit>}:held`` (at most ``hold_max``),
      unless the partition recorded their offset as applied already (a replay:
      one HGET, only in a batch with such a metric).

    ``index_ttl``: the TTL (ms) every exposure gives its unit's index key,
    the same for every batch while the running experiments are unchanged
    (``Ingestor.index_ttl``); None: ``index_ttl_ms(known)``, right only when
    ``known`` holds every running experiment (tests, the differential run).
    ``holds``: whether the partition's hold queue holds any metric
    (``partition_start``); None: read here when an exposure needs it.
    ``index_view``: the partition's index buckets (``partition_start``);
    None: read here (one more round trip).
    """
    variants_of = {e: c.variants for e, c in known.items()}
    ends = {e: c.end_at for e, c in known.items()}  # exposures from end_at: not routed
    margin: dict[str, int] = {}  # too_old_margin per experiment, once a batch
    metric_units: dict[str, None] = {}  # units of metrics without experiment_id
    exposing: dict[tuple[str, str], int] = {}
    for row in rows:
        if row[1] == "m":
            if row[3] is None:
                metric_units[row[4]] = None
        else:
            vs = variants_of.get(row[3])
            if vs is not None and row[3] not in margin:
                margin[row[3]] = too_old_margin(known[row[3]])
            if (vs is not None and row[5] in vs and (row[4], row[3]) not in exposing
                    and row[6] + margin[row[3]] > row[9]
                    and (ends[row[3]] is None or row[6] < ends[row[3]])):
                exposing[(row[4], row[3])] = row[0]
    # an exposure releases held metrics only if its partition holds any (a
    # unit's events share its partition): else its unit needs no look-up
    held_here = (source_topic is not None and partition is not None and exposing
                 and (r.exists(unit_hold_queue(source_topic, partition)) if holds is None
                      else holds))
    lookup = list(metric_units)
    if held_here:
        lookup += list({u: None for u, _ in exposing if u not in metric_units})
    index: dict[str, dict[str, str]] = {u: {} for u in lookup}
    holds: dict[str, dict[str, bytes]] = {u: {} for u in lookup}
    if lookup or exposing:
        ttl = index_ttl_ms(known) if index_ttl is None else index_ttl
        res = _index_round_trip(r, lookup, exposing, source_topic, partition, ttl,
                                index_view, sorted(known))
        for u, (idx, held) in zip(lookup, res, strict=True):
            index[u] = idx
            holds[u] = {_s(k): v for k, v in held.items()}

    out: dict[str, list[tuple]] = {}
    if not lookup and known.keys() >= set(map(_EID, rows)):
        # Why: no metric without experiment_id and no held metric to release,
        # every row's experiment registered (the usual batch): each row goes
        # to its experiment, in order (a stable sort by experiment, in C; with
        # ``clocked``'s: 71.0k -> 68.0k instr/event on the bench batches)
        for e, grp in groupby(sorted(rows, key=_EID), _EID):
            out[e] = list(grp)
        return out  # in experiment order already
    in_batch: dict[str, set[str]] = {}
    applied: Any = _UNREAD  # the partition's recorded offset, read once if needed
    new_holds: list[tuple[str, str, bytes, int]] = []  # unit, field, value, ts
    for i, row in enumerate(rows):
        exp, uid = row[3], row[4]
        if row[1] == "x":
            if exp not in variants_of:
                if rejected is not None:
                    rejected.append((i, "unknown_experiment"))
                continue
            out.setdefault(exp, []).append(row)
            if exposing.get((uid, exp)) == row[0]:
                in_batch.setdefault(uid, set()).add(exp)
                held = holds.get(uid)  # None: not looked up (its partition holds nothing)
                mk = _marker(source_topic, partition, row[0]) if held else None
                if held and index.get(uid, {}).get(exp, mk) == mk:  # the first exposure: release
                    for f, v in sorted(held.items(), key=_hold_order):
                        if _before(f, source_topic, partition, row[0]):
                            ev_id, metric, ts, value = orjson.loads(v)
                            out[exp].append((row[0], "h", ev_id, exp, uid, metric, ts, value,
                                             None, row[9]))
        elif exp is not None:
            if exp not in known:
                if rejected is not None:
                    rejected.append((i, "unknown_experiment"))
                continue
            out.setdefault(exp, []).append(row)
        else:
            targets = set(in_batch.get(uid, ()))
            for e, mk in index.get(uid, {}).items():
                if e in known and _before(mk, source_topic, partition, row[0]):
                    targets.add(e)
            for e in sorted(targets):
                out.setdefault(e, []).append(row)
            if not targets:
                if applied is _UNREAD:
                    applied = _applied_offset(r, source_topic, partition)
                if applied is not None and row[0] <= applied:
                    continue  # a replay of a recorded row: counted (and maybe expired) then
                f = _marker(source_topic, partition, row[0])
                h = holds.setdefault(uid, {})
                if f not in h and len(h) >= hold_max:
                    why = "unrouted_expired"
                else:
                    why = "unrouted"
                    v = orjson.dumps([row[2], row[5], row[6], row[7]])
                    h[f] = v
                    new_holds.append((uid, f, v, row[6]))
                if rejected is not None:
                    rejected.append((i, why))
    if new_holds and source_topic is not None and partition is not None:  # rare
        q = unit_hold_queue(source_topic, partition)
        pipe = r.pipeline(transaction=False)
        for u, f, v, ts in new_holds:
            pipe.hset(unit_hold_key(u), f, v)
            pipe.zadd(q, {u: ts}, gt=True)
        pipe.execute()
    return dict(sorted(out.items()))


def _is_cluster(r: Any) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis-py always has it
        return False
    return isinstance(r, RedisCluster)


def mget(r: Any, keys: Sequence[str]) -> list:
    """MGET of ``keys``: one command on a single server; on a Redis Cluster,
    whose keys of several experiments lie in several slots, one MGET per slot
    (``mget_nonatomic``, pipelined), values in ``keys`` order."""
    if _is_cluster(r):
        return r.mget_nonatomic(list(keys))
    return r.mget(list(keys))


def index_ttl_ms(known: Iterable[ExperimentConfig] | dict[str, ExperimentConfig]) -> int:
    """How long (wall clock) a unit's routing index outlives its last
    exposure: twice the longest window + correction horizon + lateness of
    the experiments in ``known`` (every running one: ``Ingestor.index_ttl``;
    a TTL computed from a batch's experiments alone would put a unit's
    exposure to a shorter experiment into a bucket that a longer one's
    metrics outlive, issue 24 defect 4), so the index is bounded by the units
    active in that time (docs/architecture.md#state) while a unit's metrics,
    which come within its window, always find it. The reference Reducer never forgets (it runs
    over event time): only metrics without experiment_id that arrive more
    than this after the unit's last exposure count differently
    (``unrouted`` here, ``retired``/``outside_window`` there)."""
    longest = 0
    for c in (known.values() if isinstance(known, dict) else known):
        W, _, L, _ = config_ms(c)
        longest = max(longest, W + horizons_ms(c)[0] + L)
    return 2 * longest


def _now_ms() -> int:
    """Wall clock (ms): the routing index's buckets and TTLs run on it."""
    return int(time.time() * 1000)


def _index_round_trip(r: Any, units: list[str], exposing: dict[tuple[str, str], int],
                      topic: str | None, partition: int | None, ttl_ms: int = 0,
                      view: unit_index.IndexView | None = None, eids: Sequence[str] = ()
                      ) -> list[tuple[dict[str, str], dict]]:
    """Record the exposures' positions, then read the index and the held
    metrics of ``units``, in one round trip of plain commands (no script):
    in MULTI/EXEC under WATCH of the partition's current index bucket
    (``unit_index.record``: a merge another writer overtook is refused and
    done again), one HSET of the exposed units' fields there that gain an
    experiment (merged into their values there, which ``partition_start``
    read: the first position wins; a replay writes nothing new), one
    PEXPIREAT for the bucket (``unit_index.add_writes``),
    then per live bucket one HMGET of ``units``' fields (``eids``: the
    experiments kept) and per unit HGETALL of its held metrics. Writes
    before reads, so the reads show this batch's exposures, on the first run
    and on a replay alike. ``view``: the partition's buckets
    (``partition_start``, which WATCHed the current bucket and read the
    exposed units' fields there on a packed client); None: read first, in a
    round trip of its own, as the exposed units' fields (under WATCH) when
    ``view`` holds no ``Watch`` of the current bucket. On a redis-py client
    the reads follow the EXEC in a round trip of their own.

    Why buckets and not a key per unit (before issue 25): the partition's
    owner writes its units' entries (a stale owner's merge is refused by the
    WATCH, not fenced), so they can share keys;
    a batch then pays one PEXPIREAT per bucket instead of one per exposed
    unit and Redis creates no key per unit (docs/performance.md).

    The commands go through the owner's read pipeline
    (``streams.state.wire.Reads``): packed by hiredis and sent at once on a
    plain client, a redis-py pipeline elsewhere (a Redis Cluster: a
    partition's buckets share a slot, the held metrics lie in many). Returns
    per unit (experiment -> earliest position, held) as dicts."""
    t, part = ("", 0) if topic is None or partition is None else (topic, int(partition))
    now = _now_ms()
    if view is None:
        view = unit_index.read_view(r, t, part, now)
    prefix = None if topic is None or partition is None else f"{t}|{part}|"
    n_index = 0

    def reads(p: Any) -> None:
        nonlocal n_index
        n_index = unit_index.add_lookups(p, t, part, view, written, units, eids)
        for u in units:
            p.add("HGETALL", unit_hold_key(u))

    written: tuple[str, ...] = ()
    if exposing:
        marks = {k: "*" if prefix is None else f"{prefix}{off}" for k, off in exposing.items()}
        written = (unit_index.current_bucket(ttl_ms, now)[0],)
        _, got = unit_index.record(r, t, part, marks, ttl_ms, now, view, reads)
    else:
        p = Reads(r)
        reads(p)
        got = p.execute()
    index = unit_index.merge(got[:n_index], units, eids, view.legacy)
    return [(index[u], held) for u, held in zip(units, got[n_index:], strict=True)]


def _hold_order(item: tuple[str, bytes]) -> tuple[str, int]:
    """Held metrics in stream order: by source, then offset."""
    src, _, off = item[0].rpartition("|")
    try:
        return src, int(off)
    except ValueError:
        return src, -1


# ---------------------------------------------------------------- reading


def read_completeness(r: Any, topic: str) -> int | None:
    """The completeness clock the ingest worker published for ``topic``."""
    v = r.get(completeness_key(topic))
    return None if v is None else _int(v)


def read_snapshot(r: Any, cfg: ExperimentConfig, completeness: int | None = None
                  ) -> ExperimentSnapshot:
    """The experiment's snapshot, read atomically (MULTI/EXEC, one round trip),
    in exactly the shape and values of ``ExperimentState.snapshot()``.

    The watermark is ``completeness`` (the ingest worker publishes it:
    ``read_completeness``), capped by the experiment's latest event, minus L;
    by default, like the reducer's, the lowest partition clock the experiment
    has seen."""
    meta, cells_raw, arr_raw, seq_raw, tails_raw = _read_sharded(r, cfg.experiment_id)

    _, B, L, _ = config_ms(cfg)
    S = n_activity_strata(cfg)
    n_tot = S + 1
    variants = tuple(cfg.variants)
    vindex = {v: i for i, v in enumerate(variants)}
    metrics = cfg.metric_names
    n_extra = {p.name: p.n_extra for p in metric_plans(cfg)}
    sums = [p.name for p in metric_plans(cfg) if p.tails]

    max_ts = _int(meta["max_ts"]) if "max_ts" in meta else None
    if completeness is None:
        clocks = [_int(v) for f, v in meta.items() if f.startswith("clk:")]
        completeness = min(clocks) if clocks else None
    wm = watermark_of(completeness, max_ts, L)

    arrivals: list[dict[int, int]] = [{} for _ in range(n_tot)]
    for f, v in arr_raw.items():
        s, b = _s(f).split("|")
        si = int(s)
        if 0 <= si < n_tot:
            arrivals[si][int(b)] = int(v)
    anchor = meta.get("anchor", meta.get("started_at"))  # started_at: state from before
    started, arr = started_and_arrivals(None if anchor is None else _int(anchor), arrivals, B)
    if started is None:
        started = cfg.started_at

    zero = (0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
    cells = {m: [[zero for _ in range(n_tot)] for _ in variants] for m in metrics}
    extra_cells = {m: [[(0.0,) * k for _ in range(n_tot)] for _ in variants]
                   for m, k in n_extra.items() if k}
    age_cells: dict[str, list[list[tuple]]] = {}
    if age_tracking(cfg):
        nb = len(age_edges_ms(cfg)) - 1
        n_fine = max(len(fine_edges(cfg)) - 1, 0) + 1
        widths = {p.name: age_cell_width(p, nb) for p in metric_plans(cfg)}
        age_cells = {m: [[(0, *([0.0] * k)) for _ in range(n_fine)] for _ in variants]
                     for m, k in widths.items()}
    for f, v in cells_raw.items():
        parts = f.split("|")
        if len(parts) == 4:  # a|metric|variant|fine: an age cell (names have no "|")
            _, m, var, s = parts
            si = int(s)
            if m in age_cells and var in vindex and 0 <= si < n_fine:
                age_cells[m][vindex[var]][si] = _age_cell(v, widths[m])
            continue
        m, var, s = parts
        si = int(s)
        if m in cells and var in vindex and 0 <= si < n_tot:
            cells[m][vindex[var]][si] = _cell(v)
            if m in extra_cells:
                extra_cells[m][vindex[var]][si] = _extra(v, n_extra[m])

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
        D=completed_buckets(wm, started, B, cfg.end_at),
        arrivals=arr,
        activity_sum=tuple(float(meta.get(f"act_sum:{s}", 0.0)) for s in range(n_tot)),  # summed
        activity_n=tuple(int(meta.get(f"act_n:{s}", 0)) for s in range(n_tot)),
        exposed={v: int(meta.get(f"exposed:{v}", 0)) for v in variants},
        matured={v: int(meta.get(f"matured:{v}", 0)) for v in variants},
        cells=cells,
        counters=counters,
        seq=None if seq_raw is None else int(seq_raw),
        dead_letters={f[3:]: int(v) for f, v in meta.items() if f.startswith("dl:")},
        retired_units=int(meta.get("retired_n", 0)),
        age_cells=age_cells,
        extra_cells=extra_cells,
        tails=_tails(tails_raw, sums, vindex),
    )


def _tails(raw: dict, sums: list[str], vindex: dict[str, int]) -> dict[str, list[dict[int, int]]]:
    """``ExperimentSnapshot.tails`` from the tails hash (note 10): per sum
    metric and variant index the non-zero counts in bucket order."""
    acc: dict[str, list[dict[int, int]]] = {m: [{} for _ in vindex] for m in sums}
    for f, v in raw.items():
        m, var, b = _s(f).split("|")
        n = _int(v)
        if n and m in acc and var in vindex:
            acc[m][vindex[var]][int(b)] = n
    return {m: [dict(sorted(d.items())) for d in rows] for m, rows in acc.items()}


#: meta fields of the sources: ``max_ts:<src>`` (their max is the max_ts);
#: shard fields added into meta: ``act_sum:<stratum>`` (every other shard
#: field is a cell)
_SHARD_META_MAX = "max_ts:"
_SHARD_META_SUM = "act_sum:"
#: shard fields of the tail sketch: ``t|<metric>|<variant>`` -> packed counts
#: (``pack_tails``), or, as owners before the packing wrote them,
#: ``t|<metric>|<variant>|<bucket>`` -> count (note 10)
_SHARD_TAIL = "t|"


def pack_tails(counts: dict[int, int]) -> str:
    """One (metric, variant)'s tail counts of a shard as its packed field's
    value: ``<bucket>:<count>`` in bucket order, space-separated, zeros kept
    (note 10). Why packed: one field per bucket made the owner's HSET set
    ~140 fields a batch, and Redis pays per field (a linear scan each while
    the shard is a small-hash ziplist), ~0.4 us/event of its CPU."""
    return " ".join([f"{b}:{n}" for b, n in sorted(counts.items())])


def tail_counts(field: str, value: str) -> list[tuple[str, str, int, int]]:
    """The (metric, variant, bucket, count) of a shard's ``t|`` field,
    either layout (note 10): the packed one (three parts) or the older
    field per bucket (four)."""
    parts = field.split("|")
    if len(parts) == 4:
        return [(parts[1], parts[2], int(parts[3]), int(value))]
    out = []
    for x in value.split():
        b, n = x.split(":")
        out.append((parts[1], parts[2], int(b), int(n)))
    return out


def _read_sharded(r: Any, experiment_id: str
                  ) -> tuple[dict[str, str], dict[str, str], dict, Any, dict]:
    """(meta, cells, arrivals, dirty_seq, tails) of the experiment read atomically,
    the sources' shards (issue 25, ``keys.shard_key``) folded in: the base
    (``cells`` and ``meta``: what the state before issue 25 wrote) first,
    then each shard in sorted source order, so every reader sums the floats
    in one order, whatever order the owners committed in. Cells and
    ``act_sum`` are added (``combine_text_cells``); ``max_ts`` is the max of
    meta's ``max_ts`` (older state) and its ``max_ts:<src>`` (``read_max_ts``).

    One MULTI/EXEC reads the base and the shard set; where the set names
    shards the base did not read, it is read again with them (a second
    round trip; again if the set grew in between: a new source's first
    commit). State without shards (older state) costs one
    round trip, as before."""
    k = experiment_keys(experiment_id)
    sk = rk.shards_key(experiment_id)
    srcs: list[str] = []
    while True:
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(k.meta)
        pipe.hgetall(k.cells)
        pipe.hgetall(k.arrivals)
        pipe.get(k.dirty_seq)
        pipe.smembers(sk)
        pipe.hgetall(rk.tails_key(experiment_id))
        for src in srcs:
            pipe.hgetall(rk.shard_key(experiment_id, src))
        meta_raw, cells_raw, arr_raw, seq_raw, now_raw, tails_raw, *shards = pipe.execute()
        now = sorted(_s(x) for x in now_raw)
        if now == srcs:
            break
        srcs = now
    meta = {_s(a): _s(b) for a, b in meta_raw.items()}
    top = read_max_ts(meta)
    if top is not None:
        meta["max_ts"] = str(top)
    cells = {_s(a): _s(b) for a, b in cells_raw.items()}
    # the tail counts: the tails hash (state from before they moved into the
    # shards), then each shard's ``t|`` fields: integers, added exactly
    tails = {_s(a): _int(b) for a, b in tails_raw.items()}
    for raw in shards:
        for a, b in raw.items():
            f, v = _s(a), _s(b)
            if f.startswith(_SHARD_TAIL):
                for m, var, b, n in tail_counts(f, v):
                    t = f"{m}|{var}|{b}"
                    tails[t] = tails.get(t, 0) + n
            elif f.startswith(_SHARD_META_SUM):
                meta[f] = v if f not in meta else repr(float(meta[f]) + float(v))
            else:
                cells[f] = v if f not in cells else combine_text_cells(
                    cells[f], v, _AGE_INTS if f.count("|") == 3 else _CELL_INTS)
    return meta, cells, arr_raw, seq_raw, tails


def read_max_ts(meta: dict[str, str]) -> int | None:
    """The experiment's latest event ts from its decoded meta hash: the max
    of ``max_ts`` (older state) and every source's ``max_ts:<src>``."""
    vals = [_int(v) for f, v in meta.items()
            if f == "max_ts" or f.startswith(_SHARD_META_MAX)]
    return max(vals) if vals else None


#: positions of the integer counts in a cell (n, nx) and an age cell (n)
_CELL_INTS = frozenset((0, 3))
_AGE_INTS = frozenset((0,))


def combine_text_cells(a: str, b: str, ints: frozenset[int] = _CELL_INTS) -> str:
    """Two cell values of note 7 / 9 (text) added element-wise: the counts
    at ``ints`` as integers, the sums as IEEE doubles a + b (``%.17g``
    round-trips them, like ``repr``); a shorter cell (three numbers, from before the
    covariate sums) reads its missing ones as 0."""
    fa, fb = a.split(" "), b.split(" ")
    n = max(len(fa), len(fb))
    fa += ["0"] * (n - len(fa))
    fb += ["0"] * (n - len(fb))
    return " ".join(str(_int(x) + _int(y)) if i in ints else repr(float(x) + float(y))
                    for i, (x, y) in enumerate(zip(fa, fb, strict=True)))


def _age_cell(text: str, k: int) -> tuple:
    """An age cell (note 9): ``n`` then ``k`` sums (``semantics.age_cell_width``:
    2 nb + 1 for a sum or conversion, 5 nb for a ratio; missing ones read 0)."""
    f = text.split(" ")
    sums = [float(x) for x in f[1:k + 1]]
    return (_int(f[0]), *sums, *([0.0] * (k - len(sums))))


def _extra(text: str, k: int) -> tuple:
    """The ``k`` extra values a metric appends to its cell (note 7, issue
    26), zeros where the text has fewer."""
    f = text.split(" ")[8:8 + k]
    return (*map(float, f), *([0.0] * (k - len(f))))


def _cell(text: str) -> tuple:
    """A ``cells`` hash value (note 7): 8 numbers, or 3 (written before the
    covariate sums existed: those read as zeros)."""
    f = text.split(" ")
    n, sy, syy = _int(f[0]), float(f[1]), float(f[2])
    if len(f) < 8:
        return (n, sy, syy, 0, 0.0, 0.0, 0.0, 0.0)
    return (n, sy, syy, _int(f[3]), float(f[4]), float(f[5]), float(f[6]), float(f[7]))


def read_counters(r: Any, experiment_id: str) -> dict[str, int]:
    """The experiment's event counters (``c:<name>`` in its meta hash, note 3):
    every event applied to it increments exactly one of them."""
    out = {}
    for k, v in r.hgetall(rk.meta_key(experiment_id)).items():
        k = _s(k)
        if k.startswith("c:"):
            out[k[2:]] = int(v)
    return out


def read_units(r: Any, cfg: ExperimentConfig) -> dict[str, UnitState]:
    """All unit states of an experiment (debugging and tests; HGETALL)."""
    raw = r.execute_command("HGETALL", rk.units_key(cfg.experiment_id),
                            **{NEVER_DECODE: True})  # binary values, whatever the client
    if isinstance(raw, list):
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    return {_s(u): decode_unit(v, cfg) for u, v in raw.items()}


def read_pending(r: Any, experiment_id: str, source: str) -> list[tuple[str, int]]:
    """Pending (unit_id, close_ts) of source partition ``source``
    (``"<topic>|<partition>"``), in maturation order, in either layout
    (``streams.state.pending``)."""
    idx = PendingIndex.parse(r.hget(rk.meta_key(experiment_id), rk.pending_index_field(source)))
    return in_order(read_entries(r, experiment_id, source, idx))


def applied_offset(r: Any, experiment_id: str, topic: str, partition: int) -> int | None:
    """Last source offset applied to the experiment from (topic, partition)."""
    v = r.hget(rk.offsets_key(experiment_id), offsets_field(topic, partition))
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
        pipe.hgetall(rk.offsets_key(e))
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
