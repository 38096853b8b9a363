"""The units' routing index, kept per source partition in time buckets (issue 25).

What it records: per (unit, experiment), the position ``<topic>|<partition>|<offset>``
of the unit's first exposure to the experiment (``store.route_rows`` routes
metrics without experiment_id by it and releases held metrics with it).

Why per partition: a unit's events all lie in one source partition (Kafka
key = unit id, the ``key_mismatch`` dead letter) and only that partition's
owner writes its units' entries, so the entries of one partition can share
keys (one hash tag ``{x:<src>}``, one Redis Cluster slot). Before issue 25
each unit had its own key (``keys.unit_index_key``) and every exposure cost
an HSETNX and a PEXPIRE on it: ~2 µs of Redis CPU per exposure, a third of
the worker's Redis budget in ``liftstream bench ingest``.

Layout: hash ``keys.index_bucket_key(src, ttl, start)``, field ``<unit>``
-> ``<experiment> <position>`` pairs, space-separated (``pack``), for the
exposures recorded while wall time was in ``[start, start + width)``
(``bucket_width(ttl)``, a quarter of the TTL). Why a field per unit and not
per (unit, experiment): a metric without experiment_id looks its unit up in
every live bucket, one field each whatever the number of running
experiments (a field per pair made it units x experiments x buckets fields,
~6 us/event of Redis CPU more than a key per unit at 50 experiments). The
owner, the partition's writer (but for a stale owner finishing a batch
after a rebalance, and a delete), merges: it reads the current bucket's
fields of the batch's exposed units with the batch's first reads
(``add_current_read``, ``store.partition_start``), WATCHing the bucket there,
and sends in MULTI/EXEC on the same connection (``record``, ``Watch``: the
index writes are not fenced, and a stale owner's merge must not overwrite
the new owner's) one HSET of the fields that gain an experiment (an
experiment already in the field keeps its position: the first one recorded
in the bucket wins; a replay writes nothing) and ONE PEXPIREAT
``start + width + ttl`` for the bucket. So an entry lives at least
``ttl`` after the unit's last exposure to the experiment (each exposure
writes the field into the current bucket), as the per-unit PEXPIRE
guaranteed, and at most ``width`` longer. The TTL is in the key name: a
bucket's expiry never moves earlier (another TTL is another bucket).

``keys.index_buckets_key(src)`` lists the live buckets (name -> expiry) so
a reader knows which to read (``IndexView``); the ingestor reads it with the
batch's first reads (``store.partition_start``). A reader merges a field's
values over the buckets keeping the earliest position: the first recorded
exposure wins for as long as it lives (``ttl`` after it), as before.

Migration: its field ``legacy`` says until when (ms) the per-unit keys that
versions before issue 25 wrote are read as well (merged the same way). It is
set once per partition, by the first batch of this version: now + ttl if the
partition already had a clock (state of an older version: its keys expire
within ``ttl`` of its last write, the TTL it gave them), else 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from redis.exceptions import WatchError

from streams.state.keys import HASHTABLE_PAD, index_bucket_key, index_buckets_key, unit_index_key
from streams.state.wire import Reads, packs, send_raw

#: a bucket spans this fraction of the TTL: entries outlive it by at most that
BUCKETS_PER_TTL = 4
#: the narrowest bucket (ms)
MIN_WIDTH_MS = 1_000
#: field of ``index_buckets_key``: until when per-unit keys are read
LEGACY = "legacy"


#: the field every bucket is created with (no unit id holds ``#``): a
#: hashtable from its first HSET, as the sighting buckets
#: (``keys.HASHTABLE_PAD``, measured there). Why: a bucket grows to
#: thousands of units, and until ``hash-max-ziplist-entries`` (512) every
#: HSET and HMGET field scans the ziplist: in the in-process loop with
#: metrics without experiment_id, HSET and HMGET of the index cost ~2.5
#: us/event of Redis CPU more than without the pad
PAD = HASHTABLE_PAD


def bucket_width(ttl_ms: int) -> int:
    """A bucket's span (ms) for TTL ``ttl_ms``: readers read every live bucket
    (~``BUCKETS_PER_TTL`` + 1), an entry lives up to this much past ``ttl``."""
    return max(int(ttl_ms) // BUCKETS_PER_TTL, MIN_WIDTH_MS)


class IndexView(NamedTuple):
    """What a batch knows of its partition's index before it writes:
    ``buckets`` the live bucket names -> expiry (ms, 0: none), ``expired``
    the registered names past their expiry (pruned by the next write),
    ``legacy`` whether per-unit keys are read, ``legacy_set`` whether the
    partition's ``legacy`` field was written, ``prior`` whether the
    partition had a clock (state written before), ``watch`` the connection
    WATCHing the current bucket since the batch's first reads, with the
    exposed units' fields it read there (``Watch``; None: none)."""

    buckets: dict[str, int]
    expired: tuple[str, ...]
    legacy: bool
    legacy_set: bool
    prior: bool
    watch: Watch | None = None


def view_of(raw: dict | None, clock: Any, now_ms: int, watch: Watch | None = None
            ) -> IndexView:
    """The ``IndexView`` from HGETALL ``index_buckets_key`` and the partition
    clock (HGET, None: the partition has none); ``watch``: ``Watch``."""
    live: dict[str, int] = {}
    expired: list[str] = []
    legacy_until: int | None = None
    for k, v in (raw or {}).items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        at = int(v)
        if name == LEGACY:
            legacy_until = at
        elif at and at <= now_ms:
            expired.append(name)
        else:
            live[name] = at
    legacy = clock is not None if legacy_until is None else legacy_until > now_ms
    return IndexView(live, tuple(expired), legacy, legacy_until is not None, clock is not None,
                     watch)


def _str(v: Any) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


#: merges of one batch into the current bucket before ``IndexContention``
MAX_ATTEMPTS = 8


class IndexContention(WatchError):
    """The current bucket changed under each of ``MAX_ATTEMPTS`` merges of a
    batch (other writers of the partition's index: a stale owner and the
    new one, a delete): none of the batch's index writes was applied."""


class Watch:
    """A pooled connection (``wire.packs`` clients) that WATCHes the current
    bucket from the batch's first reads (``add_current_read``) to the
    MULTI/EXEC of its merge (``record``), and the exposed units' fields read
    there. Why: the merge is a read-modify-write of a field per unit, and
    the index writes are not fenced: a stale owner still finishing a batch
    and the new owner may both merge one unit's field, and the later HSET,
    computed from its older read, dropped the other's experiment (the
    additive HSETNX per (unit, experiment) of older layouts could not).
    WATCH makes the later EXEC fail instead; ``record`` reads and merges
    again. Riding on the first reads, it costs no round trip of its own.
    ``release`` UNWATCHes (when no EXEC did) and hands the connection back."""

    def __init__(self, r: Any) -> None:
        self.r = r
        self.conn: Any = r.connection_pool.get_connection()
        self.watching = False
        #: the bucket read and its fields of the units read (``read``)
        self.name: str | None = None
        self.fields: dict[str, str | None] = {}

    def read(self, name: str, units: Sequence[str], reply: Sequence[Any]) -> None:
        """Keep ``add_current_read``'s reply (HMGET of ``units`` in ``name``)."""
        self.watching = True
        self.name = name
        self.fields = {u: _str(v) for u, v in zip(units, reply, strict=True)}

    def prior(self, name: str, units: Sequence[str]) -> dict[str, str | None] | None:
        """``units``' fields of bucket ``name`` read under this WATCH (None:
        another bucket, units not read, or no WATCH held)."""
        if self.watching and self.name == name and all(u in self.fields for u in units):
            return self.fields
        return None

    def release(self) -> None:
        """UNWATCH when still WATCHing, and hand the connection back (once)."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.watching:
                self.watching = False
                send_raw(conn, [("UNWATCH",)])  # disconnects it on failure
        finally:
            self.r.connection_pool.release(conn)


def add_current_read(p: Any, topic: str, partition: int, ttl_ms: int, now_ms: int,
                     units: Sequence[str]) -> str | None:
    """Queue WATCH of the bucket current at ``now_ms`` and the read of
    ``units``' fields there (HMGET), what ``record`` merges into; returns
    its name (None: no units, nothing queued). Two replies: ``Watch.read``
    takes the second."""
    if not units:
        return None
    name, _ = current_bucket(ttl_ms, now_ms)
    key = _bucket_key(topic, partition, name)
    p.add("WATCH", key)
    p.add("HMGET", key, *units)
    return name


def pack(entries: dict[str, str]) -> str:
    """A bucket field's value: ``<experiment> <position>`` pairs (neither
    holds a space: ``schemas.validate.ID_PATTERN``, Kafka topic names)."""
    return " ".join(f"{e} {mk}" for e, mk in entries.items())


def unpack(value: str | None) -> dict[str, str]:
    """``pack``'s inverse (None, a missing field: no entry)."""
    if not value:
        return {}
    xs = value.split(" ")
    return dict(zip(xs[::2], xs[1::2], strict=True))


def add_view_reads(p: Any, topic: str, partition: int) -> None:
    """Queue the two reads ``view_of`` takes on the pipeline ``p``
    (``wire.Reads``)."""
    from streams.state.keys import PARTITION_CLOCKS, source

    p.add("HGETALL", index_buckets_key(topic, partition))
    p.add("HGET", PARTITION_CLOCKS, source(topic, partition))


def read_view(r: Any, topic: str, partition: int, now_ms: int) -> IndexView:
    """``IndexView`` in its own round trip (callers without ``partition_start``)."""
    p = Reads(r)
    add_view_reads(p, topic, partition)
    raw, clock = p.execute()
    return view_of(raw, clock, now_ms)


def current_bucket(ttl_ms: int, now_ms: int) -> tuple[str, int]:
    """(name, expiry ms) of the bucket an exposure at wall time ``now_ms`` is
    recorded in; expiry 0 (none) for a TTL of 0 (no experiment with a window)."""
    w = bucket_width(ttl_ms)
    start = int(now_ms) - int(now_ms) % w
    return f"{int(ttl_ms)}:{start}", (start + w + int(ttl_ms) if ttl_ms > 0 else 0)


def _bucket_key(topic: str, partition: int, name: str) -> str:
    ttl, _, start = name.partition(":")
    return index_bucket_key(topic, partition, int(ttl), int(start))


def add_writes(p: Any, topic: str, partition: int, exposing: dict[tuple[str, str], str],
               ttl_ms: int, now_ms: int, view: IndexView, prior: dict[str, str | None]
               ) -> str:
    """Queue the writes recording ``exposing`` ((unit, experiment) -> position)
    in the current bucket: one HSET of the units' fields (``prior``: their
    values there, read under WATCH: ``record``) that gain an experiment (one already in
    the field keeps its position; a replay writes nothing), one PEXPIREAT
    for the bucket, its registry entry when new, expired registry entries'
    removal and the partition's ``legacy`` field when unset (``view``).
    Returns the bucket's name."""
    name, at = current_bucket(ttl_ms, now_ms)
    key = _bucket_key(topic, partition, name)
    merged: dict[str, dict[str, str]] = {}
    for (u, e), mk in exposing.items():
        got = merged.get(u)
        if got is None:
            got = merged[u] = unpack(prior.get(u))
        got.setdefault(e, mk)
    changed: list[str] = []
    for u, d in merged.items():
        v = pack(d)
        if v != (prior.get(u) or ""):
            changed += [u, v]
    new = view.buckets.get(name) != at
    if new:  # created a hashtable (``PAD``) by its first HSET
        changed[:0] = PAD
    if changed:
        p.add("HSET", key, *changed)
    reg = index_buckets_key(topic, partition)
    if at:
        p.add("PEXPIREAT", key, at)
    if new:
        p.add("HSET", reg, name, at)
    if view.expired:
        p.add("HDEL", reg, *view.expired)
    if not view.legacy_set:
        p.add("HSETNX", reg, LEGACY, int(now_ms) + int(ttl_ms) if view.prior else 0)
    return name


def record(r: Any, topic: str, partition: int, exposing: dict[tuple[str, str], str],
           ttl_ms: int, now_ms: int, view: IndexView, reads: Callable[[Any], None]
           ) -> tuple[str, list]:
    """Merge ``exposing`` into the current bucket (``add_writes``) in a
    MULTI/EXEC under WATCH of the bucket, so a writer that merged the same
    fields since this one read them is never overwritten (``Watch``): a
    refused EXEC reads the fields again and merges again, at most
    ``MAX_ATTEMPTS`` times (then ``IndexContention``). ``reads`` queues the
    batch's reads on the pipeline after the writes (on a ``wire.packs``
    client in the same round trip, on ``view.watch``'s connection: its
    WATCH and field reads rode on the batch's first reads). Returns the
    bucket's name and the replies of ``reads``."""
    name, _ = current_bucket(ttl_ms, now_ms)
    key = _bucket_key(topic, partition, name)
    units = list(dict.fromkeys(u for u, _ in exposing))
    if not packs(r):
        return name, _record_pipeline(r, key, topic, partition, exposing, ttl_ms, now_ms, view,
                                      units, reads)
    w = view.watch if view.watch is not None and view.watch.conn is not None else Watch(r)
    try:
        prior = w.prior(name, units)
        for _ in range(MAX_ATTEMPTS):
            if prior is None:  # (re)read under WATCH: a refused EXEC, another bucket
                got = send_raw(w.conn, [("WATCH", key), ("HMGET", key, *units)])
                if isinstance(got[1], Exception):
                    raise got[1]
                w.read(name, units, got[1])
                prior = w.fields
            p = Reads(r, w.conn).add("MULTI")
            add_writes(p, topic, partition, exposing, ttl_ms, now_ms, view, prior)
            n = len(p)
            p.add("EXEC")
            reads(p)
            w.watching = False  # the EXEC ends the WATCH, applied or refused
            got = p.execute()
            if got[n] is not None:
                return name, got[n + 1:]
            prior = None
        raise IndexContention(f"routing index {key}: changed under {MAX_ATTEMPTS} merges")
    finally:
        w.release()


class _Queued:
    """``add`` onto a redis-py pipeline (``add_writes``'s interface)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def add(self, *args: Any) -> _Queued:
        self.pipe.execute_command(*args)
        return self


def _node_of(r: Any, key: str) -> Any:
    """The client to WATCH ``key`` on: on a Redis Cluster the node of its slot
    (a cluster client's pipeline has no WATCH), else ``r``."""
    from redis.cluster import RedisCluster

    return r.get_redis_connection(r.get_node_from_key(key)) if isinstance(r, RedisCluster) else r


def _record_pipeline(r: Any, key: str, topic: str, partition: int,
                     exposing: dict[tuple[str, str], str], ttl_ms: int, now_ms: int,
                     view: IndexView, units: list[str], reads: Callable[[Any], None]) -> list:
    """``record`` through redis-py (a Redis Cluster, a client that decodes):
    WATCH, HMGET, MULTI/EXEC on the node of the bucket's slot (the bucket
    and the registry share it, ``{x:<src>}``), then ``reads`` in a round
    trip of their own (their keys lie in many slots)."""
    with _node_of(r, key).pipeline(transaction=True) as pipe:
        for _ in range(MAX_ATTEMPTS):
            try:
                pipe.watch(key)
                got = pipe.hmget(key, units)
                pipe.multi()
                add_writes(_Queued(pipe), topic, partition, exposing, ttl_ms, now_ms, view,
                           {u: _str(v) for u, v in zip(units, got, strict=True)})
                pipe.execute()
                break
            except WatchError:
                continue
        else:
            raise IndexContention(f"routing index {key}: changed under {MAX_ATTEMPTS} merges")
    p = Reads(r)
    reads(p)
    return p.execute()


def _rank(marker: str) -> int:
    """A position's order for ``first``: its offset; one without a position
    (``*``) counts as the earliest, as ``store._before`` counts it."""
    try:
        return int(marker.rsplit("|", 1)[1])
    except (IndexError, ValueError):
        return -1


def first(a: str | None, b: str) -> str:
    """The earlier of two recorded positions of one (unit, experiment)."""
    return b if a is None or _rank(b) < _rank(a) else a


def add_lookups(p: Any, topic: str, partition: int, view: IndexView, extra: Iterable[str],
                units: Sequence[str], eids: Sequence[str]) -> int:
    """Queue the reads of the entries of ``units`` (``eids``: for ``merge``):
    one HMGET of the units' fields per live bucket (``view`` and the
    ``extra`` names just written), and per unit HGETALL of its pre-issue-25
    key while ``view.legacy``. Returns the number of commands queued
    (``merge`` reads their replies)."""
    n = 0
    if units:
        for name in dict.fromkeys([*view.buckets, *extra]):
            p.add("HMGET", _bucket_key(topic, partition, name), *units)
            n += 1
    if view.legacy:
        for u in units:
            p.add("HGETALL", unit_index_key(u))
            n += 1
    return n


def merge(replies: Sequence[Any], units: Sequence[str], eids: Sequence[str],
          legacy: bool) -> dict[str, dict[str, str]]:
    """Per unit, experiment of ``eids`` -> its earliest recorded position,
    from the replies of ``add_lookups`` (same arguments); every experiment
    of a pre-issue-25 key while ``legacy``."""
    out: dict[str, dict[str, str]] = {u: {} for u in units}
    nb = len(replies) - (len(units) if legacy else 0)
    want = set(eids)
    for got in replies[:nb]:
        for u, v in zip(units, got, strict=True):
            if v is None:
                continue
            idx = out[u]
            for e, mk in unpack(_str(v)).items():
                if e in want:
                    idx[e] = first(idx.get(e), mk)
    if legacy:
        for u, old in zip(units, replies[nb:], strict=True):
            idx = out[u]
            for k, v in old.items():
                e = k.decode() if isinstance(k, bytes) else k
                idx[e] = first(idx.get(e), v.decode() if isinstance(v, bytes) else v)
    return out


def read_index(r: Any, topic: str, partition: int, units: Sequence[str], eids: Sequence[str],
               now_ms: int | None = None) -> dict[str, dict[str, str]]:
    """Per unit, experiment -> earliest recorded position, over ``eids``
    (and every experiment of a pre-issue-25 key while those are read): two
    round trips, for callers off the batch path (hold expiry, tests)."""
    import time

    now = int(time.time() * 1000) if now_ms is None else now_ms
    view = read_view(r, topic, partition, now)
    p = Reads(r)
    add_lookups(p, topic, partition, view, (), units, eids)
    return merge(p.execute(), units, eids, view.legacy)


def index_pttl(r: Any, topic: str, partition: int, unit: str, eid: str) -> int:
    """How long (ms) the entry of (``unit``, ``eid``) lives yet: the longest
    PTTL of the live buckets holding it (-1: one without expiry, -2: none)."""
    view = read_view(r, topic, partition, 0)
    best = -2
    for name in view.buckets:
        key = _bucket_key(topic, partition, name)
        if eid in unpack(_str(r.hget(key, unit))):
            t = r.pttl(key)
            if t == -1:
                return -1
            best = max(best, t)
    return best


def drop_experiment(r: Any, key: str, experiment_id: str, batch: int = 1000) -> None:
    """Remove ``experiment_id``'s entries from the bucket ``key`` (a delete,
    ``registry.delete_state``): its fields rewritten without it, those left
    empty deleted. The fields naming it are found by a scan, then rewritten
    ``batch`` at a time by ``_drop_from``: read again and written under WATCH
    of the bucket, because a field is a read-modify-write and the partition's
    owner may merge another experiment into it meanwhile (a write computed
    from the scan's values lost that entry)."""
    named = [u for f, v in r.hscan_iter(key, count=batch)
             if (u := _str(f)) != PAD[0] and experiment_id in unpack(_str(v))]
    for i in range(0, len(named), batch):
        _drop_from(r, key, experiment_id, named[i:i + batch])


def _drop_from(r: Any, key: str, experiment_id: str, units: list[str]) -> None:
    """``drop_experiment`` for the fields ``units`` of ``key``: WATCH, read,
    MULTI/EXEC; a refused EXEC (the bucket changed) reads again, at most
    ``MAX_ATTEMPTS`` times, then ``IndexContention`` (nothing written)."""
    node = _node_of(r, key)
    for _ in range(MAX_ATTEMPTS):
        with node.pipeline(transaction=True) as p:
            try:
                p.watch(key)
                hset: list[str] = []
                hdel: list[str] = []
                for u, v in zip(units, p.hmget(key, units), strict=True):
                    d = unpack(_str(v))
                    if d.pop(experiment_id, None) is None:
                        continue
                    if d:
                        hset += [u, pack(d)]
                    else:
                        hdel.append(u)
                p.multi()
                if hset:
                    p.execute_command("HSET", key, *hset)
                if hdel:
                    p.hdel(key, *hdel)
                p.execute()
                return
            except WatchError:
                continue
    raise IndexContention(f"{key}: changed under each of {MAX_ATTEMPTS} rewrites "
                          f"dropping experiment {experiment_id!r}")


def is_bucket(key: bytes) -> bool:
    """Whether ``key`` is a bucket of ``index_bucket_key`` (not the registry)."""
    return key.startswith(b"lr:{x:") and not key.endswith(b"}:buckets")
