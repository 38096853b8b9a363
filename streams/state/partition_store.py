"""The fenced commit of a source partition's owner (issue 25, DESIGN §3
"Where the rules run", §5 exactly-once).

The owner of a source partition runs the event rules in Python
(``streams.state.semantics``) and writes what they changed to Redis with ONE
MULTI/EXEC per experiment and batch: the state changes, the partition's
applied offset (``keys.offsets_key``), the source's commit sequence and
``dirty_seq``. Every key of the transaction is in the experiment's
``{e:<id>}`` slot, so it runs on Redis Cluster and on managed Redis alike.

Why WATCH and not a check inside the transaction: an error reply inside
MULTI aborts none of the queued commands, so a fence check queued with the
writes fences nothing. The commit WATCHes the experiment's fence key of its
source (``keys.fence_key``), reads the epoch and the commit sequence there,
and only then queues the writes; a new owner that raises the epoch in
between (``claim_fence``, before it reads any state) makes the EXEC return
nothing: the zombie's writes are refused as a whole (``Fenced``).

The sequence (``seq``) counts the commits of (experiment, source). The
owner knows how many it made; a Redis whose ``seq`` is behind lost
acknowledged writes (a restart from an older snapshot, a failover to a
lagging replica): the commit refuses (``LostCommits``), and the owner drops
what it cached and seeks back to the offset Redis says was applied.

The commit WATCHes the experiment's lifecycle key (``keys.lifecycle_key``)
with its fence, in the same WATCH, and checks after the WATCH that it is
still what the call read with its batch: a conclusion (which deletes the
units and pending entries) between the owner's reads and its EXEC refuses
the commit (``Concluded``), instead of writing the records it read back
into a concluded experiment. That is not a fence: the retry reads again and
sees the experiment concluded (its exposures are then refused, ``Concluded``,
and dead-lettered ``after_end`` by the caller).

Fences are per (experiment, source), not per experiment: several owners
(one per source partition) commit to one experiment, and one owner's claim
must not abort the others' transactions.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter, lt
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError

from schemas.records import ExperimentConfig
from streams.config.settings import env_default
from streams.state import keys as rk
from streams.state import pending as pq
from streams.state.keys import experiment_keys
from streams.state.retired_filter import BITS, C0, MAX_LAYER, K, RetiredFilter, layer_of, positions
from streams.state.semantics import FOLD_LIMIT, ExperimentState, Shard, UnitState
from streams.state.store import (
    UNCHECKED,
    Fenced,
    as_bytes,
    decode_unit,
    encode_units,
    pack_tails,
    tail_counts,
)
from streams.state.wire import Reads, Recorder, packs, send_raw

try:  # mypyc's class options (mypy's package; the decorator does nothing at runtime)
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - an install without mypy: never compiled
    def mypyc_attr(*_a: Any, **_k: Any) -> Any:  # type: ignore[misc]
        return lambda c: c


class LostCommits(Exception):
    """Redis holds fewer commits of (experiment, source) than the owner made:
    it lost acknowledged writes. The owner must drop its cache and seek back
    to Redis's applied offset (``streams.state.store.applied_offset``)."""

    def __init__(self, experiment_id: str, src: str, expected: int, found: int) -> None:
        super().__init__(f"{experiment_id} {src}: Redis holds commit {found}, "
                         f"the owner made {expected}")
        self.expected = expected
        self.found = found


def _dropped_while_watching(e: WatchError) -> RedisConnectionError | None:
    """redis-py reports a connection lost while a key is WATCHed as a
    ``WatchError`` ("A ConnectionError occurred while watching ..."): that is
    an unknown outcome, not a moved fence. Returned as the transient error it
    is, so the caller's retry re-reads the fence and skips what Redis applied
    (the applied offset is in the same EXEC); None for a real refusal."""
    if "ConnectionError" in str(e) or "occurred while watching" in str(e):
        return RedisConnectionError(str(e))
    return None


def _int_or_zero(x: Any) -> int:
    return 0 if x is None else int(x)


def claim_fence(r: Any, experiment_id: str, src: str, epoch: int) -> int:
    """Raise the fence of (experiment, ``src``) to owner ``epoch`` (from
    ``store.claim_partition``) before reading the experiment's state, so an
    older owner's commit in flight is refused. Returns the commit sequence
    found there (what the new owner continues from). ``Fenced`` if a newer
    owner claimed it already (the fence never goes down)."""
    key = rk.fence_key(experiment_id, src)
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                cur, seq = pipe.hmget(key, "epoch", "seq")
                if _int_or_zero(cur) > epoch:
                    raise Fenced(f"{experiment_id} {src} is owned by epoch {int(cur)}")
                pipe.multi()
                pipe.hset(key, "epoch", epoch)
                pipe.execute()
                return _int_or_zero(seq)
            except WatchError:
                continue


class ExperimentChanged(WatchError):
    """The experiment changed incarnation after the owner read its state: it
    was deleted (``registry.delete_state``; its generation key is gone) and
    perhaps re-created under the same id (a new generation): nothing was
    written, so the old incarnation's records and shard never land in the
    new one. Not a fence (a delete keeps the fences) and no lost commits:
    the caller reads again (its registry too) and applies the batch to what
    is registered now. A ``WatchError``, so a caller that handles a refused
    EXEC by checking its partition's epoch retries it."""

    def __init__(self, experiment_id: str, why: str) -> None:
        super().__init__(f"{experiment_id}: {why}")
        self.experiment_id = experiment_id


class Concluded(ExperimentChanged):
    """The experiment was concluded (its lifecycle key changed) after the
    owner read its state, or is concluded and the batch still brings
    exposures (the caller's view of it was stale): nothing was written. Not
    a fence: the caller reads again (its registry too) and handles the
    events as for a concluded experiment."""


@dataclass
class WriteSet:
    """The Redis commands of one experiment's commit, in order: what the rules
    changed (unit records, pending, sightings, holds, retired bits, the
    source's shard values, integer increments). Each entry is a redis-py
    pipeline method name with its arguments; ``commit`` queues them inside
    MULTI. Every key must be in the experiment's ``{e:<id>}`` slot."""

    ops: list[tuple[str, tuple, dict]] = field(default_factory=list)

    def add(self, method: str, *args: Any, **kwargs: Any) -> WriteSet:
        self.ops.append((method, args, kwargs))
        return self

    def __len__(self) -> int:
        return len(self.ops)


@mypyc_attr(native_class=False)  # a Python class when compiled: tests inject faults into it
class Commit:
    """One fenced commit, in its two steps: ``prepare`` (WATCH the fence and
    the lifecycle key, read epoch, sequence and lifecycle, check them) and
    ``execute`` (MULTI, the writes, the applied offset, the sequence,
    ``dirty_seq``, EXEC). ``commit`` runs both; the steps are separate so a
    test can stop a zombie between them. ``concluded``: whether the call
    read the experiment concluded with its batch (module docstring);
    ``generation``: the experiment's generation the call read with its batch
    (``keys.generation_key``; ``UNCHECKED``: none read), WATCHed too: a
    delete or a re-create since refuses the commit (``ExperimentChanged``)."""

    def __init__(self, r: Any, experiment_id: str, src: str, epoch: int, seq: int,
                 concluded: bool = False, generation: bytes | None = UNCHECKED) -> None:
        self.experiment_id = experiment_id
        self.src = src
        self.epoch = epoch
        self.seq = seq
        self.concluded = concluded
        self.generation = generation
        self.fence = rk.fence_key(experiment_id, src)
        self.lifecycle = rk.lifecycle_key(experiment_id)
        self.gen_key = rk.generation_key(experiment_id)
        self._client = r
        self.pipe = r.pipeline(transaction=True)
        #: ``dirty_seq`` after the EXEC (``execute``)
        self.dirty_seq: int | None = None

    def prepare(self) -> None:
        """WATCH the fence and the lifecycle key, then check them: ``Fenced``
        if a newer owner claimed, ``LostCommits`` if Redis is behind this
        owner's claim or commits (its fence below this owner's epoch: the
        claim itself lost), ``Concluded`` if the lifecycle changed since the
        call read it (the state it read may be deleted)."""
        try:
            self.pipe.watch(self.fence, self.lifecycle, self.gen_key)
            if packs(self._client) and self.pipe.connection is not None:
                # one round trip for the reads, on the WATCHing connection
                got = send_raw(self.pipe.connection, [
                    ("HMGET", self.fence, "epoch", "seq"), ("EXISTS", self.lifecycle),
                    ("GET", self.gen_key)])
                for g in got:
                    if isinstance(g, Exception):
                        raise g
                (cur, seq), ended, gen = got
            else:
                cur, seq = self.pipe.hmget(self.fence, "epoch", "seq")
                ended = self.pipe.exists(self.lifecycle)
                gen = self.pipe.get(self.gen_key)
        except WatchError as e:
            self.pipe.reset()
            raise (_dropped_while_watching(e) or e) from e
        except BaseException:
            self.pipe.reset()
            raise
        try:
            self._check(cur, seq, ended, gen)
        except BaseException:
            self.pipe.reset()
            raise

    def hold(self) -> Any:
        """The packed path's first step (``packs``; instead of ``prepare``):
        take the connection this commit will WATCH and EXEC on, for the
        call's reads too (``streams.state.wire.Reads``'s ``conn``), so the
        WATCH and the fence read ride on the call's first read round trip
        (``queue_watch``) and no round trip of their own. Why, measured: the
        WATCH and the fence reads were two of the ~10 round trips of a
        batch, each tens of µs of redis-py. ``release`` hands it back."""
        self.pipe.connection = self._client.connection_pool.get_connection()
        # (``reset`` UNWATCHes it, or skips a connection that broke)
        self.pipe.watching = True
        return self.pipe.connection

    def queue_watch(self, p: Reads) -> None:
        """WATCH the fence, the lifecycle and the generation key, then read
        the fence's epoch and sequence: first in ``p`` (on ``hold``'s
        connection), so every read queued after them is WATCHed too (the
        generation and lifecycle the call reads with its batch, its state):
        a change of any before the EXEC refuses it. ``watched`` takes the
        two replies off."""
        p.add("WATCH", self.fence, self.lifecycle, self.gen_key)
        p.add("HMGET", self.fence, "epoch", "seq")

    def watched(self, got: list) -> list:
        """``got`` (``p``'s replies) without ``queue_watch``'s, once the
        fence's epoch and sequence are checked (``Fenced``, ``LostCommits``;
        ``prepare``'s checks: the generation and lifecycle are the ones read
        after the WATCH, kept with ``generation``/``concluded``)."""
        self._check_fence(*got[1])
        return got[2:]

    def release(self) -> None:
        """UNWATCH (when no EXEC ended the WATCH) and hand the connection
        back; a no-op after ``execute``."""
        self.pipe.reset()

    def _check(self, cur: Any, seq: Any, ended: Any, gen: Any) -> None:
        """``prepare``'s checks of what it read after its WATCH."""
        if self._regenerated(gen):
            raise ExperimentChanged(self.experiment_id,
                                    "deleted (or re-created) after the owner read its state")
        if bool(ended) != self.concluded:
            raise Concluded(self.experiment_id, "concluded after the owner read its state")
        self._check_fence(cur, seq)

    def _check_fence(self, cur: Any, seq: Any) -> None:
        """``Fenced`` if a newer owner claimed, ``LostCommits`` if Redis is
        behind this owner's claim (``cur``: the fence's epoch) or commits."""
        if _int_or_zero(cur) > self.epoch:
            raise Fenced(f"{self.experiment_id} {self.src} is owned by epoch "
                         f"{_int_or_zero(cur)}, not {self.epoch}")
        if _int_or_zero(cur) < self.epoch or _int_or_zero(seq) != self.seq:
            raise LostCommits(self.experiment_id, self.src, self.seq, _int_or_zero(seq))

    def execute(self, writes: WriteSet, offset: int | None, dirty: bool = True) -> int:
        """Queue the writes, the applied offset (when the batch had one), the
        sequence and, when ``dirty`` (the state changed), ``dirty_seq`` +1;
        EXEC. Returns the new sequence; ``Fenced`` when the EXEC
        was refused (the fence moved after ``prepare``): nothing was written."""
        p = self.pipe
        tail: list[tuple] = []
        if offset is not None:
            tail.append(("HSET", rk.offsets_key(self.experiment_id), self.src, offset))
        tail.append(("HINCRBY", self.fence, "seq", 1))
        if dirty:
            tail.append(("INCR", rk.dirty_seq_key(self.experiment_id)))
        try:
            if packs(self._client) and p.connection is not None:
                res = self._exec_packed(writes, tail)
            else:
                p.multi()
                for method, args, kwargs in writes.ops:
                    getattr(p, method)(*args, **kwargs)
                for c in tail:
                    p.execute_command(*c)
                res = p.execute()
        except WatchError as e:
            dropped = _dropped_while_watching(e)
            if dropped is not None:
                raise dropped from e
            if self._regenerated(self._client.get(self.gen_key)):
                raise ExperimentChanged(self.experiment_id,
                                        "deleted (or re-created) during the commit") from None
            if bool(self._client.exists(self.lifecycle)) != self.concluded:
                raise Concluded(self.experiment_id, "concluded during the commit") from None
            raise Fenced(f"{self.experiment_id} {self.src}: the fence moved during the "
                         "commit (a newer owner claimed)") from None
        finally:
            p.reset()
        if dirty:
            self.dirty_seq = int(res[-1])
        return self.seq + 1

    def _regenerated(self, gen: Any) -> bool:
        """Whether ``gen`` (the generation read now) is not the one the call
        read with its batch (never, when it read none)."""
        return self.generation is not UNCHECKED and gen != self.generation

    def _exec_packed(self, writes: WriteSet, tail: list[tuple]) -> list:
        """MULTI, the writes, ``tail``, EXEC packed by hiredis and sent at once
        on the connection that holds the WATCH (``packs``). An error reply
        while queueing makes Redis abort the EXEC (EXECABORT): raised, nothing
        written. ``WatchError`` when the EXEC was refused (the fence moved)."""
        rec = Recorder()  # type: ignore[abstract]  # (mypy: CoreCommands' abstract members)
        for method, args, kwargs in writes.ops:
            getattr(rec, method)(*args, **kwargs)
        cmds = [("MULTI",), *rec.cmds, *tail, ("EXEC",)]
        got = send_raw(self.pipe.connection, cmds)
        self.pipe.watching = False  # EXEC ended the WATCH either way
        for g in got[:-1]:
            if isinstance(g, Exception):
                raise g
        res = got[-1]
        if isinstance(res, Exception):
            raise res
        if res is None:
            raise WatchError("EXEC refused: a watched key changed")
        for g in res:
            if isinstance(g, Exception):
                raise g
        return res


def commit(r: Any, experiment_id: str, src: str, epoch: int, seq: int, writes: WriteSet,
           offset: int | None) -> int:
    """One experiment's fenced commit of a batch of source ``src`` (module
    docstring); returns the owner's new commit sequence."""
    c = Commit(r, experiment_id, src, epoch, seq)
    c.prepare()
    return c.execute(writes, offset)


def shard_mapping(state: ExperimentState, shard: Shard, touched: bool = False
                  ) -> dict[str, str]:
    """A source's ``Shard`` as the fields of its ``keys.shard_key`` hash
    (store.py notes 3, 7, 9, 10: cells ``<metric>|<variant>|<stratum>``, age
    cells ``a|<metric>|<variant>|<fine>``, tail counts
    ``t|<metric>|<variant>`` (packed: ``store.pack_tails``), ``act_sum:<stratum>`` and
    not ``max_ts``, which goes to meta ``max_ts:<src>`` (an integer the
    overview reads with the rest of meta); floats as ``repr``, which
    round-trips a double): what the owner HSETs, as absolute values.
    ``touched``: only the fields the rules changed since the last commit
    (``Shard.touched_cells`` and the like), not the whole shard."""
    variants = state.variants
    cells, ages, acts = shard.cells, shard.age_cells, shard.activity_sum
    ck = shard.touched_cells if touched else cells.keys()
    ak = shard.touched_age if touched else ages.keys()
    sk = shard.touched_act if touched else acts.keys()
    out = {f"{m}|{variants[vi]}|{s}": " ".join(map(repr, cells[(m, vi, s)]))
           for (m, vi, s) in ck}
    out.update({f"a|{m}|{variants[vi]}|{f}": " ".join(map(repr, ages[(m, vi, f)]))
                for (m, vi, f) in ak})
    out.update({f"act_sum:{s}": repr(acts[s]) for s in sk})
    tails = shard.tails
    tk = {(m, vi) for (m, vi, _) in shard.touched_tails} if touched else tails.keys()
    out.update({f"t|{m}|{variants[vi]}": pack_tails(tails[(m, vi)]) for (m, vi) in tk})
    return out


def put_shard(writes: WriteSet, experiment_id: str, src: str, fields: dict[str, str]) -> WriteSet:
    """Queue the HSET of ``src``'s shard fields and its entry in the shard
    set (``keys.shards_key``: readers find the shards without scanning)."""
    if fields:
        writes.add("hset", rk.shard_key(experiment_id, src), mapping=fields)
        writes.add("sadd", rk.shards_key(experiment_id), src)
    return writes


# ---------------------------------------------------------------- the owner's call

#: a held metric in the experiment's ``held`` hash: (1-based metric index, ts, value)
_HELD = struct.Struct("<Hdd")


class _LoadedRetired(RetiredFilter):
    """The retired-unit filter as one call of the owner sees it: membership
    read from Redis's bitmap beforehand for the units the call may ask about
    (``known``), additions collected as bit positions to SET in the commit
    (``new_bits``). ``n`` starts at Redis's ``retired_n``; the bits of a
    layer not used yet are placed only after ``probe`` said the server's
    string limit holds it (else the layer before is the cap, as
    ``retired_filter.MAX_LAYER`` explains)."""

    n: int  # (declared for mypyc: the base's attributes, set in its ``__init__``)
    max_layer: int

    def __init__(self, n: int, max_layer: int, known: dict[str, bool],
                 probe: Any) -> None:
        super().__init__(max_layer)
        self.n = n
        self.known = known
        self.new_bits: list[int] = []
        self.added = 0
        self.cap_found: int | None = None
        self._fit = layer_of(n - 1, max_layer) if n > 0 else 0
        self._probe = probe

    def __contains__(self, unit_id: str) -> bool:
        return self.known.get(unit_id, False)

    def add(self, unit_id: str) -> None:
        lay = layer_of(self.n, self.max_layer)
        while lay > self._fit:
            if self._probe(lay):
                self._fit = lay
            else:
                self.max_layer = self.cap_found = lay - 1
                lay = layer_of(self.n, self.max_layer)
        self.new_bits.extend(positions(unit_id, lay))
        self.n += 1
        self.added += 1


#: a row's unit_id and event_id (``store`` rows), for ``map``
_UNIT_ID, _EVENT_ID, _OFFSET = itemgetter(4), itemgetter(2), itemgetter(0)
#: a pending heap entry's (score, unit id bytes, unit id) parts
_HEAP_SCORE, _HEAP_UID = itemgetter(0), itemgetter(2)
#: a row's (kind, experiment_id) and its pre values (``_check_rows``)
_KIND_EXP, _PRE = itemgetter(1, 3), itemgetter(8)


def _unskipped(rows: Sequence[tuple], stored: int | None) -> tuple[list[tuple], int]:
    """The rows above the applied offset (as before issue 25: a released
    metric ``h`` goes with the exposure before it) and how many were skipped."""
    offs = list(map(_OFFSET, rows))
    if (not offs or stored is None or offs[0] > stored) and all(map(lt, offs, offs[1:])):
        # the common batch: offsets rising, the first above the applied one:
        # nothing is skipped (the loop below skips nothing then either)
        return list(rows), 0
    out, skipped, hi, last_skipped = [], 0, stored, False
    for row in rows:
        if row[1] == "h":
            skip = last_skipped
        else:
            skip = hi is not None and row[0] <= hi
            last_skipped = skip
        if skip:
            skipped += 1
        else:
            if row[1] != "h":
                hi = row[0]
            out.append(row)
    return out, skipped


#: the units an owner keeps per experiment (``UnitCache``), by default;
#: ``LIFTSTREAM_OWNER_CACHE_UNITS`` overrides it, 0 turns the cache off
OWNER_CACHE_UNITS = 100_000


def owner_cache_units() -> int:
    """The cache bound (units per owner and experiment) from the environment."""
    return max(0, int(env_default("OWNER_CACHE_UNITS", OWNER_CACHE_UNITS)))


class CachedUnit:
    """What Redis holds of one unit of the owner's partition after the
    owner's last commit: its record (decoded and as stored; both None: no
    record), its pending score, its held metrics (raw) and hold-queue score
    (None: none)."""

    __slots__ = ("unit", "rec", "pend", "held", "heldq")

    def __init__(self, unit: UnitState | None, rec: bytes | None, pend: int | None,
                 held: bytes | None, heldq: int | None) -> None:
        self.unit, self.rec, self.pend, self.held, self.heldq = unit, rec, pend, held, heldq


class UnitCache:
    """The owner's units of one experiment (issue 25: only the partition's
    owner writes them, so it may keep them): read-through (a miss is read
    from Redis with the batch), write-through (entries are replaced after the
    commit that wrote them succeeded), an LRU bounded by ``limit`` units;
    and the source's shard (``shard``, written only by the owner too).

    Valid only for the experiment's incarnation it was filled in: ``token``
    is the experiment's generation (``keys.generation_key``: a delete and
    re-create changes it) and whether it is concluded (``keys.lifecycle_key``:
    conclusion deletes the working state behind the owner's back); a call
    that reads another token drops it (``apply_rows_owned``). The owner drops
    it on ``Fenced``, ``LostCommits``, any error during a call (the rules
    mutate cached records and the shard in place, and a failed commit wrote
    nothing; tested: ``test_owner_cache_*``, ``test_owner_shard_cache_*``) and
    with the owner itself (``forget_owner``: a Redis regression, a revoked
    partition)."""

    def __init__(self, token: tuple, limit: int) -> None:
        self.token = token
        self.limit = limit
        self.units: OrderedDict[str, CachedUnit] = OrderedDict()
        #: the source's shard (``keys.shard_key``) as the owner last committed
        #: it (None: read it from Redis): only the owner writes it, and
        #: reading and parsing it whole every call grew with the tail counts
        self.shard: Shard | None = None
        #: the source's dedupe sightings (``SeenBuckets``) as the owner last
        #: committed them, all of them (None: not kept: read the batch's
        #: with HMGET); kept only while there are at most ``4 * limit``
        #: (``sightings_off`` once there were more); ``sightings_prune_at``:
        #: the size that makes the rules prune them next
        #: (``ExperimentState._seen_prune_at``)
        self.sightings: dict[str, int] | None = None
        self.sightings_off = False
        self.sightings_prune_at = 4096
        #: the source's pending entries (``PendingCopy``), all of them, as
        #: the owner last committed them (None: not loaded yet, or not kept:
        #: ``pending_off`` once there were more than ``4 * limit``)
        self.pending: PendingCopy | None = None
        self.pending_off = False

    def get(self, unit_id: str) -> CachedUnit | None:
        e = self.units.get(unit_id)
        if e is not None:
            self.units.move_to_end(unit_id)
        return e

    def put(self, unit_id: str, entry: CachedUnit) -> None:
        self.units[unit_id] = entry
        self.units.move_to_end(unit_id)
        while len(self.units) > self.limit:
            self.units.popitem(last=False)

    def trim(self) -> None:
        """The bound enforced after a batch's entries were put at the end
        (the owner's write-through: one length check a batch, and the same
        units survive as with ``put`` of each: the last ``limit`` used)."""
        units = self.units
        while len(units) > self.limit:
            units.popitem(last=False)


class PartitionOwner:
    """The owner of one source partition: its epoch and, per experiment it
    wrote, its commit sequence (``claim_fence`` on first touch, before any
    read of the experiment). ``epoch`` None: not fenced (tests, tools): the
    commit is a plain MULTI/EXEC."""

    def __init__(self, r: Any, topic: str, partition: int, epoch: int | None) -> None:
        self.r = r
        self.topic = topic
        self.partition = partition
        self.src = rk.source(topic, partition)
        self.epoch = epoch
        self.seqs: dict[str, int] = {}
        #: experiment -> its units as this owner last committed them (only
        #: for a fenced owner: an unfenced one cannot know nobody else wrote)
        self.caches: dict[str, UnitCache] = {}
        self.cache_units = owner_cache_units() if epoch is not None else 0

    def cache_of(self, experiment_id: str, token: tuple) -> UnitCache | None:
        """The experiment's unit cache for the incarnation ``token``
        (``UnitCache``): an empty one when it had another token (or none);
        None when caching is off."""
        if self.cache_units <= 0:
            return None
        c = self.caches.get(experiment_id)
        if c is None or c.token != token:
            c = self.caches[experiment_id] = UnitCache(token, self.cache_units)
        return c

    def drop_cache(self, experiment_id: str) -> None:
        """Forget the cached units of an experiment: Redis is read again."""
        self.caches.pop(experiment_id, None)

    def seq_of(self, experiment_id: str) -> int:
        if experiment_id not in self.seqs:
            self.seqs[experiment_id] = (0 if self.epoch is None else
                                        claim_fence(self.r, experiment_id, self.src, self.epoch))
        return self.seqs[experiment_id]

    def forget(self, experiment_id: str | None = None) -> None:
        """Drop what is known of an experiment (or all): after ``Fenced`` or
        ``LostCommits`` the next call claims and reads again."""
        if experiment_id is None:
            self.seqs.clear()
            self.caches.clear()
        else:
            self.seqs.pop(experiment_id, None)
            self.caches.pop(experiment_id, None)

    def hold(self, experiment_id: str) -> Commit | None:
        """Claim the experiment's fence on first touch (``seq_of``: before
        any read), then, on the packed path of a fenced owner, the call's
        ``Commit`` holding its connection (``Commit.hold``: the WATCH rides
        on the call's first reads); None elsewhere (``commit`` then WATCHes
        at commit time, ``Commit.prepare``). The caller ``release``s it."""
        seq = self.seq_of(experiment_id)
        if self.epoch is None or not packs(self.r):
            return None
        c = Commit(self.r, experiment_id, self.src, self.epoch, seq)
        c.hold()
        return c

    def commit(self, experiment_id: str, writes: WriteSet, offset: int | None,
               dirty: bool = True, concluded: bool = False,
               generation: bytes | None = UNCHECKED, held: Commit | None = None
               ) -> int | None:
        """The fenced commit (``commit``); returns ``dirty_seq`` after it
        (None when ``dirty`` is False: nothing a reader sees changed).
        ``concluded``, ``generation``: what the call read of the experiment's
        lifecycle and incarnation (``Commit``: refused if either changed
        before the EXEC). ``held``: the call's ``hold``, WATCHing since its
        first reads (and its fence checked there, ``Commit.watched``)."""
        if self.epoch is None:
            p = self.r.pipeline(transaction=True)
            for method, args, kwargs in writes.ops:
                getattr(p, method)(*args, **kwargs)
            if offset is not None:
                p.hset(rk.offsets_key(experiment_id), self.src, offset)
            if dirty:
                p.incr(rk.dirty_seq_key(experiment_id))
            res = p.execute()
            return int(res[-1]) if dirty else None
        c = held
        if c is None:
            c = Commit(self.r, experiment_id, self.src, self.epoch, self.seq_of(experiment_id),
                       concluded, generation)
        else:
            c.concluded, c.generation = concluded, generation
        try:
            if held is None:
                c.prepare()
            self.seqs[experiment_id] = c.execute(writes, offset, dirty)
        except BaseException:
            # fenced, lost commits, or an unknown outcome (a connection cut
            # around EXEC): the sequence and the cached units may be stale
            # either way; the retry reads them from Redis again
            self.forget(experiment_id)
            raise
        return c.dirty_seq


#: the owners this process holds: (client, topic, partition) -> owner of the
#: latest epoch seen (a new claim replaces it, so its sequences start again
#: from Redis's)
_OWNERS: dict[tuple[int, str, int], PartitionOwner] = {}


def owner_for(r: Any, topic: str, partition: int, epoch: int | None) -> PartitionOwner:
    """The process's owner of (topic, partition) at ``epoch``: one per claim,
    kept across calls so that its commit sequences catch a Redis that lost
    commits (``LostCommits``). Callers serialise a partition's writes (the
    worker's state lock), as they must for any owner."""
    if epoch is None:
        return PartitionOwner(r, topic, partition, None)
    key = (id(r), topic, int(partition))
    o = _OWNERS.get(key)
    if o is None or o.r is not r or o.epoch != epoch:
        o = _OWNERS[key] = PartitionOwner(r, topic, partition, epoch)
    return o


def forget_owner(r: Any, topic: str, partition: int) -> None:
    """Drop the process's owner of (topic, partition): after a regression or
    a lost partition, the next call claims the fences and reads again."""
    _OWNERS.pop((id(r), topic, int(partition)), None)


def apply_rows_owned(owner: PartitionOwner, cfg: ExperimentConfig, rows: Sequence[tuple],
                     clk_end: int, fold_limit: int = FOLD_LIMIT,
                     dead: Sequence[tuple[int, str]] = (),
                     generation: bytes | None = UNCHECKED) -> dict[str, Any]:
    """``store.apply_rows`` in the partition's owner (issue 25): the rules of
    ``streams.state.semantics`` run here, on a working ``ExperimentState``
    seeded with what the call needs (the batch's unit records, holds and
    sightings, from the owner's ``UnitCache`` or Redis; the due pending and
    hold-queue entries and their records, the retired filter's answer for
    units without a record, the source's shard, from Redis); what they
    changed is committed in ONE fenced MULTI/EXEC with the applied offset
    (``commit``). Same arguments and result as ``apply_rows``; events at or
    below the applied offset are skipped. Any error drops the experiment's
    unit cache: the rules changed cached records in place, and the commit
    (all or nothing) may not have happened.

    ``generation``: the experiment's generation ``cfg`` was read with
    (``Registry.generation``; ``UNCHECKED``: none). The call reads the
    generation with its first reads (WATCHed from there to its EXEC); when
    it is another (the experiment was deleted before the call: none; or
    deleted and re-created: a new one) the call refuses before it runs the
    rules: ``ExperimentChanged``, nothing written, its applied offset not
    moved. Without that check an owner given a config its caller cached
    before a delete would write a new state for the deleted experiment, or
    run the old config's rules on the re-created one."""
    held = None
    try:
        _check_rows(cfg.experiment_id, rows)
        held = owner.hold(cfg.experiment_id)  # the fence first, then the reads
        return _apply_rows_owned(owner, cfg, rows, clk_end, fold_limit, dead, held,
                                 generation)
    except BaseException:
        owner.drop_cache(cfg.experiment_id)
        raise
    finally:
        if held is not None:
            held.release()


def _queue_unit_reads(p: Any, units_k: str, held_k: str, pend_k: str | None, heldq_k: str,
                      uids: list[str]) -> int:
    """Queue what the owner reads of ``uids``: records, pending scores
    (``pend_k`` None: not read, the owner's ``PendingCopy`` has them), held
    metrics, hold-queue scores (``_unit_reads``). Returns how many replies."""
    p.add("HMGET", units_k, *uids)
    if pend_k is not None:
        p.add("ZMSCORE", pend_k, *uids)
    p.add("HMGET", held_k, *uids)
    p.add("ZMSCORE", heldq_k, *uids)
    return 3 if pend_k is None else 4


def _queue_due(p: Reads, pend_k: str | None, heldq_k: str, T: int, cut: int,
               fold_limit: int) -> int:
    """Queue the due work at a clock: pending entries whose window closed
    (score <= ``T``; ``pend_k`` None: not read, the owner's copy has them),
    hold-queue entries past the horizon (< ``cut``), at most ``fold_limit``
    + 1 each ((member, score) pairs). Returns how many replies."""
    if pend_k is not None:
        p.add("ZRANGE", pend_k, "-inf", T, "BYSCORE", "LIMIT", 0, fold_limit + 1,
              "WITHSCORES")
    p.add("ZRANGE", heldq_k, "-inf", f"({cut}", "BYSCORE", "LIMIT", 0, fold_limit + 1,
          "WITHSCORES")
    return 1 if pend_k is None else 2


def _unit_reads(uids: list[str], got: Sequence[Any], cfg: ExperimentConfig
                ) -> dict[str, CachedUnit]:
    """The replies of ``_queue_unit_reads`` as cache entries (three: no
    pending scores, None until the caller sets them)."""
    # (columns converted whole, the entries built by ``map``: the common
    # miss is a new unit, every reply None, each column then kept as it is)
    n = len(uids)
    if len(got) == 3:
        raws, helds, hqs = got
        pends: Sequence[Any] = [None] * n
    else:
        raws, pends, helds, hqs = got
    if len(raws) != n or len(pends) != n or len(helds) != n or len(hqs) != n:
        raise ValueError("_unit_reads: a reply's length is not the unit count")
    units = raws if raws.count(None) == n else [
        None if raw is None else decode_unit(raw, cfg) for raw in raws]
    if pends.count(None) != n:
        pends = [None if pend is None else int(pend) for pend in pends]
    if helds.count(None) != n:
        helds = [held or None for held in helds]
    if hqs.count(None) != n:
        hqs = [None if hq is None else int(hq) for hq in hqs]
    return dict(zip(uids, map(CachedUnit, units, raws, pends, helds, hqs), strict=True))


def _apply_rows_owned(owner: PartitionOwner, cfg: ExperimentConfig, rows: Sequence[tuple],
                      clk_end: int, fold_limit: int, dead: Sequence[tuple[int, str]],
                      held: Commit | None, generation: bytes | None) -> dict[str, Any]:
    r, src, eid = owner.r, owner.src, cfg.experiment_id
    conn = None if held is None else held.pipe.connection  # every read WATCHed (``hold``)
    k = experiment_keys(eid)
    pend_k, heldq_k = rk.pending_key(eid, src), rk.heldq_key(eid, src)
    shard_k = rk.shard_key(eid, src)
    uids = list(dict.fromkeys(map(_UNIT_ID, rows)))
    eids = list(dict.fromkeys(map(_EVENT_ID, rows)))
    # the units the cache holds are not read (if the token read with the
    # batch shows the experiment changed incarnation, they are, below)
    cached = owner.caches.get(eid)
    # (plain lookups: the write-through's ``put`` refreshes the LRU order)
    hits: dict[str, CachedUnit] = {}
    miss = uids
    if cached is not None:
        units_c = cached.units
        hits = {u: e for u in uids if (e := units_c.get(u)) is not None}
        miss = [u for u in uids if u not in hits] if len(hits) < len(uids) else []

    # the owner's copy of the pending entries: none of them read from Redis
    pc = None if cached is None else cached.pending
    pz = pend_k if pc is None else None
    st = ExperimentState(cfg, fold_limit, sharded=True)
    p = Reads(r, conn)
    if held is not None:
        held.queue_watch(p)
    p.add("HMGET", k.meta, "anchor", "started_at", f"clk:{src}", "retired_n", "retired_cap",
          f"max_ts:{src}", rk.seen_index_field(src), rk.pending_index_field(src))
    p.add("HGET", k.offsets, src)
    p.add("GET", rk.generation_key(eid))
    p.add("EXISTS", rk.lifecycle_key(eid))
    cached_shard = None if cached is None else cached.shard
    if cached_shard is None:
        p.add("HGETALL", shard_k)
    n_unit = _queue_unit_reads(p, k.units, k.held, pz, heldq_k, miss) if miss else 0
    # the due work at ``clk_end`` (the call's clock unless the experiment's
    # is later: read again below then), in this round trip, not one more
    n_due = _queue_due(p, pz, heldq_k, clk_end - st.L, clk_end - st.Hh, fold_limit)
    # the sightings: the owner's (complete) copy, else the batch's from Redis
    # (read with the due work below, once the bucket list is known); with a
    # cache and no copy yet, loaded whole when few enough to keep
    sight = None if cached is None else cached.sightings
    load = owner.cache_units > 0 and sight is None and not (
        cached is not None and cached.sightings_off)
    got = p.execute()
    if held is not None:
        try:
            got = held.watched(got)
        except (Fenced, LostCommits):
            owner.forget(eid)  # as a refused commit does: claim and read again
            raise
    (anchor_raw, started_raw, clk_raw, ret_n_raw, ret_cap_raw, max_raw, buckets_raw,
     pidx_raw), stored_raw = got[:2]
    token = (got[2], bool(got[3]))
    if generation is not UNCHECKED and as_bytes(token[0]) != generation:
        raise ExperimentChanged(eid, "deleted (or re-created) since the caller read its config")
    i = 4
    shard_raw: Any = None
    if cached_shard is None:
        shard_raw, i = got[4], 5
    entries = _unit_reads(miss, got[i:i + n_unit], cfg) if miss else {}
    due_got = got[-n_due:]
    cache = owner.cache_of(eid, token)
    if cache is not cached and (hits or cached_shard is not None or sight is not None
                                or pc is not None):
        # another incarnation: the cached units, shard and sightings are stale
        p = Reads(r, conn)
        if hits:
            _queue_unit_reads(p, k.units, k.held, pend_k, heldq_k, list(hits))
        p.add("HGETALL", shard_k)
        again = p.execute()
        if hits:
            entries.update(_unit_reads(list(hits), again[:4], cfg))
        shard_raw, cached_shard = again[-1], None
        sight, load = None, False
        pc = None  # (loaded again below: the due entries were not read)
    else:
        entries.update(hits)
    stored = None if stored_raw is None else int(stored_raw)
    todo, skipped = _unskipped(rows, stored)
    if token[1] and any(row[1] == "x" for row in todo):
        # the caller took it for running (its registry is read every few
        # seconds): an exposure would create a unit record again
        raise Concluded(eid, "concluded: its exposures are dead letters (after_end)")

    anchor0 = anchor_raw if anchor_raw is not None else started_raw
    st.anchor = None if anchor0 is None else int(anchor0)
    clk0 = None if clk_raw is None else int(clk_raw)
    if clk0 is not None:
        st.clk[src] = clk0
    clk = clk_end if clk0 is None or clk_end > clk0 else clk0
    legacy_tails: list[str] = []
    if cached_shard is not None:  # as the owner's last commit left it
        shard = st.shards[src] = cached_shard
    else:
        shard = st._shard(src)
        legacy_tails = _load_shard(st, shard, shard_raw)
    shard.untouch()
    shard.max_ts = None if max_raw is None else int(max_raw)
    max_ts0 = shard.max_ts

    # due work at this call's clock: pending entries (rule 5/6), hold expiry
    bound = 4 * owner.cache_units
    idx = pq.PendingIndex.parse(pidx_raw)
    if pc is not None and (idx is None or idx.text() != pc.text):
        pc = None  # not what this owner committed last: read them again
    want = cache is not None and not cache.pending_off
    # every pending entry read: to load the owner's copy, or to convert the
    # layout (an owner without the copy writes the sorted set)
    full_pend = pc is None and (want or idx is not None)
    p = Reads(r, conn)
    sb = SeenBuckets(eid, src, buckets_raw, clk0, st.DD)
    n_sight = sb.queue_reads(p, eids if sight is None else [], load)
    n_ent = _queue_entries(p, pend_k, eid, src, idx) if full_pend else 0
    if clk != clk_end:  # the experiment's clock is later than the call's
        _queue_due(p, None if full_pend else pz, heldq_k, clk - st.L, clk - st.Hh, fold_limit)
    sight_got = p.execute()  # (nothing sent when nothing is queued)
    if clk != clk_end:
        due_got = sight_got[n_sight + n_ent:]
    due_held = due_got[-1]
    everything: dict[str, int] | None = None
    if full_pend:
        everything, logged = _entries(sight_got[n_sight:n_sight + n_ent], idx)
        for uid, e in entries.items():  # the scores Redis holds
            e.pend = everything.get(uid)
        if want and len(everything) <= bound:
            pc = PendingCopy(everything, idx.w if idx is not None else _pending_width(st), idx,
                             logged)
            everything = None
        elif cache is not None:
            cache.pending_off = True  # too many to keep: the sorted set
    due_pend: Sequence[Any] = ()
    due_heap: list[tuple[int, bytes, str]] | None = None
    if pc is not None:
        due_heap = pc.take_due(clk - st.L, fold_limit + 1)
        if not full_pend:
            # a miss was read without its score (None): the copy's, where it
            # has one (a miss is mostly a new unit: none), in C; with
            # ``full_pend`` every entry got its score from the same entries
            pd = pc.d
            for uid in pd.keys() & miss:
                entries[uid].pend = pd[uid]
    elif everything is not None:
        due_pend = pq.due(everything.items(), clk - st.L, fold_limit + 1)
    else:
        due_pend = due_got[0]
    loaded_units: dict[str, bytes] = {}
    held_before: dict[str, bytes] = {}
    q: dict[str, int] = {}
    ents = list(map(entries.__getitem__, uids))  # the batch's, in its order
    units_st, source_st = st.units, st.unit_source
    for uid, e in zip(uids, ents, strict=True):
        rec = e.rec
        if rec is not None:
            loaded_units[uid] = rec
            units_st[uid] = e.unit  # type: ignore[assignment]
            source_st[uid] = src if e.pend is not None else ""
        if e.held:
            held_before[uid] = e.held
            st.held[uid] = _decode_held(e.held)
        if e.heldq is not None:
            q[uid] = e.heldq
    # the batch's sightings before the call (what the commit compares with)
    seen: dict[str, int]
    seen, full = sb.replies(sight_got[:n_sight], eids if sight is None else [])
    if full is None and load and sb.count <= bound:  # once per cache: every sighting
        full = sb.read_all(r)
    if full is not None and load and cache is not None and len(full) <= bound:
        sight = full  # kept from now on
    elif load and cache is not None:
        cache.sightings_off = True  # too many to keep: HMGET per batch
    if sight is not None:  # the rules update the owner's copy in place
        # (in no particular order: only looked up below; ``&`` walks ``eids``
        # in C, and the batch's events were rarely seen before)
        seen = {e: sight[e] for e in sight.keys() & eids}
        st._seen[src] = sight
        st._seen_prune_at = max(cache.sightings_prune_at if cache is not None else 0, 4096)
    else:
        st._seen[src] = dict(seen)
    # the due pending entries, and the rules' heap of them (built here from
    # the members as Redis sent them: no unit id decoded and encoded again)
    pend0: dict[str, int] = {}
    heap: list[tuple[int, bytes, str]] = []
    if due_heap is not None:  # the owner's copy's entries (each unit once)
        heap = due_heap
        pend0 = dict(zip(map(_HEAP_UID, heap), map(_HEAP_SCORE, heap), strict=True))
    for m, sc in due_pend:  # a sorted set's members: each once
        if isinstance(m, bytes):
            u, mb = m.decode(), m
        else:
            u, mb = m, m.encode("utf-8")
        pend0[u] = sc = int(sc)
        heap.append((sc, mb, u))
    for m, sc in due_held:
        q.setdefault(m.decode() if isinstance(m, bytes) else m, int(sc))
    more_units = [u for u in pend0 if u not in st.units and u not in loaded_units]
    # the due units the owner keeps (its cache entry knows their record and
    # pending score, the same as Redis's): neither read nor decoded again
    due_cached: dict[str, CachedUnit] = {}
    if cache is not None and more_units:
        for uid in more_units:
            e = cache.units.get(uid)
            if (e is not None and e.unit is not None and e.rec is not None
                    and e.pend == pend0[uid]):
                due_cached[uid] = e
                loaded_units[uid] = e.rec
                st.units[uid] = e.unit
                st.unit_source[uid] = src
        if due_cached:
            more_units = [u for u in more_units if u not in due_cached]
    more_held = [u for u in q if u not in held_before and u not in uids]
    ret_n = int(ret_n_raw or 0)
    ask = [u for u in uids if u not in loaded_units] if ret_n > 0 else []
    max_layer = MAX_LAYER if ret_cap_raw is None else int(ret_cap_raw)
    p = Reads(r, conn)
    if more_units:
        p.add("HMGET", k.units, *more_units)
    if more_held:
        p.add("HMGET", k.held, *more_held)
    layers = layer_of(ret_n - 1, max_layer) + 1 if ret_n > 0 else 0
    for u in ask:
        args = [x for lay in range(layers) for x in positions(u, lay)]
        p.add("BITFIELD_RO", k.retired, *[a for x in args for a in ("GET", "u1", x)])
    got = p.execute()
    i = 0
    if more_units:
        for uid, raw in zip(more_units, got[i], strict=True):
            if raw is not None:
                loaded_units[uid] = raw
                st.units[uid] = decode_unit(raw, cfg)
                st.unit_source[uid] = src
        i += 1
    if more_held:
        for uid, raw in zip(more_held, got[i], strict=True):
            if raw:
                held_before[uid] = raw
                st.held[uid] = _decode_held(raw)
        i += 1
    known: dict[str, bool] = {}
    for u in ask:
        bits = got[i]
        i += 1
        known[u] = any(all(bits[lay * K + j] for j in range(K)) for lay in range(layers))
    heapq.heapify(heap)
    st._pending[src] = heap
    st._held_q[src] = dict(q)
    heldq0 = dict(q)

    def probe(lay: int) -> bool:
        last = C0 * BITS * ((2 << lay) - 1) - 1
        try:
            r.execute_command("BITFIELD_RO", k.retired, "GET", "u1", last)
            return True
        except ResponseError:
            return False

    st.retired = _LoadedRetired(ret_n, max_layer, known, probe)

    # a replay (every row applied before) or dead letters alone do not settle:
    # their clk_end may be later than the original call's, and settling
    # belongs to the calls that bring events or to explicit settle calls
    more = False
    if (not rows and not dead) or todo:
        more = st.apply_rows(src, todo, clk_end)[1]  # the rows as they are

    # ---- the write set: what the rules changed
    w = WriteSet()
    # the units the rules changed (``UnitState.dirty``), not every unit the
    # call holds re-encoded to compare (encoding was ~9% of the client)
    recs = encode_units(st.units, cfg)
    if recs:  # one command for the batch's records (Redis's cost is per command)
        w.add("hset", k.units, mapping=recs)
    gone = [u for u in loaded_units if u not in st.units]
    if gone:
        w.add("hdel", k.units, *gone)
    # unit id -> score of the rules' heap after the call (as a dictcomp over
    # it would, at C speed); its tuples go to the owner's copy as they are
    heap1 = st._pending[src]
    pend1 = dict(zip(map(_HEAP_UID, heap1), map(_HEAP_SCORE, heap1), strict=True))
    held_recs = {}
    for uid, lst in st.held.items():
        raw = b"".join(_HELD.pack(mi + 1, ts, v) for mi, ts, v in lst)
        if held_before.get(uid) != raw:
            held_recs[uid] = raw
    if held_recs:
        w.add("hset", k.held, mapping=held_recs)
    dropped = [u for u in held_before if u not in st.held]
    if dropped:
        w.add("hdel", k.held, *dropped)
    q1 = st._held_q.get(src, {})
    _zset_changes(w, heldq_k, heldq0, q1)
    seen1 = st._seen.get(src, {})
    ret: _LoadedRetired = st.retired  # type: ignore[assignment]
    if ret.added:
        for j in range(0, len(ret.new_bits), 300):
            w.add("execute_command", "BITFIELD", k.retired,
                  *[a for x in ret.new_bits[j:j + 300] for a in ("SET", "u1", x, 1)])
        w.add("hincrby", k.meta, "retired_n", ret.added)
    if ret.cap_found is not None:
        w.add("hset", k.meta, "retired_cap", ret.cap_found)
    # the shard fields the rules changed, absolute (the tail counts among
    # them: one HSET instead of one HINCRBY per bucket moved)
    put_shard(w, eid, src, shard_mapping(st, shard, touched=True))
    for s_, row in enumerate(st.arrivals):
        for b, n in row.items():
            w.add("hincrby", k.arrivals, f"{s_}|{b}", n)
    for v, n in st.exposed.items():
        if n:
            w.add("hincrby", k.meta, f"exposed:{v}", n)
    for v, n in st.matured.items():
        if n:
            w.add("hincrby", k.meta, f"matured:{v}", n)
    for s_, n in enumerate(st.activity_n):
        if n:
            w.add("hincrby", k.meta, f"act_n:{s_}", n)
    for name, n in st.counters.items():
        if n:
            w.add("hincrby", k.meta, f"c:{name}", n)
    if shard.max_ts != max_ts0:
        w.add("hset", k.meta, f"max_ts:{src}", shard.max_ts)
    if st.anchor is not None and anchor0 is None:
        w.add("hsetnx", k.meta, "anchor", st.anchor)
    dl: dict[str, int] = {}
    dl_hi = None
    for off, f in dead:
        if stored is None or off > stored:
            dl[f] = dl.get(f, 0) + 1
            dl_hi = off if dl_hi is None or off > dl_hi else dl_hi
    for f, n in dl.items():
        w.add("hincrby", k.meta, f, n)
    # readers see a change (dirty_seq) when events or dead letters were
    # applied or settling did work; a clock that moved alone is no news
    dirty = bool(todo) or dl_hi is not None or len(w) > 0 or pend1 != pend0
    if legacy_tails:  # after ``dirty``: converting an older layout is no news
        _pack_legacy_tails(w, st, shard, shard_k, legacy_tails)
    # the pending entries (after ``dirty``: converting a layout is no news)
    if pc is not None:
        pc.write(w, eid, src, pend0, pend1, owner.seqs[eid],
                 heap1 if len(heap1) == len(pend1) else None)
    elif everything is not None and idx is not None:  # the buckets to the sorted set
        _to_zset(w, eid, src, idx, everything, pend0, pend1)
    else:
        _zset_changes(w, pend_k, pend0, pend1)
    clk1 = st.clk.get(src)
    if clk1 is not None and clk1 != clk0:
        w.add("hset", k.meta, f"clk:{src}", clk1)
    # only the batch's events add sightings (settling only forgets old ones);
    # buckets whose sightings can no longer mark a duplicate go (after
    # ``dirty``: forgetting them, or converting an older layout, is no news)
    # (packed while the owner keeps the full copy: one field a bucket)
    sb.write(w, _new_sightings(eids, seen1, seen),
             clk1 if clk1 is not None and clk1 != clk0 else None, packed=sight is not None)
    off_new = todo[-1][0] if todo else None
    if dl_hi is not None and (off_new is None or dl_hi > off_new):
        off_new = dl_hi
    seq = (owner.commit(eid, w, off_new, dirty, token[1], token[0], held)
           if dirty or len(w) else None)
    # committed: Redis holds them as they are now (the units the rules
    # changed are those ``encode_units`` encoded, ``recs``)
    units_now = st.units
    for uid in recs:
        units_now[uid].dirty = False
    shard.untouch()
    if cache is not None:  # write-through, after the commit succeeded
        # the entries updated in place (a miss's is new) and put (``UnitCache.put``:
        # the LRU's end, in the batch's order), the bound enforced after it.
        # This runs for every unit of every batch, so only what can have
        # changed is set: a record is the encoded one when the rules changed
        # the unit, else the one read (``e.rec`` already: a unit the call
        # read beyond the batch's is not kept, below); a pending score where
        # the unit is in the heap after the call or was due; the held
        # metrics and hold-queue score only when the call held or read some
        # (an entry holds them only if they were read: ``held_before``, ``q``).
        # Measured with the column-wise ``_unit_reads`` and the heap entries
        # reused for the pending copy: ~70.7k -> ~70.2k instr/event (callgrind)
        rec_of = recs.get
        for uid, e, unit in zip(uids, ents, map(st.units.get, uids), strict=True):
            e.unit = unit
            if unit is None:
                e.rec = None
            elif (rec := rec_of(uid)) is not None:
                e.rec = rec
        for uid in pend1.keys() & uids:
            entries[uid].pend = pend1[uid]
        for uid in pend0.keys() & uids:
            if uid not in pend1:
                entries[uid].pend = None
        held_now = st.held
        if held_now or held_before:
            for uid, e in zip(uids, ents, strict=True):
                if uid in held_now:
                    h = held_recs.get(uid)
                    e.held = held_before.get(uid) if h is None else h
                else:
                    e.held = None
        if q1 or heldq0:
            for uid, e in zip(uids, ents, strict=True):
                e.heldq = q1.get(uid)
        cached_units = cache.units
        cached_units.update(zip(uids, ents, strict=True))
        deque(map(cached_units.move_to_end, uids), maxlen=0)  # each, in C
        cache.trim()
        for uid, e in due_cached.items():  # folded, or retired (no record, not pending)
            unit = e.unit = st.units.get(uid)
            e.rec = None if unit is None else recs.get(uid, loaded_units.get(uid))
            e.pend = pend1.get(uid)
        # units the call read beyond the batch's (matured, holds expired): not
        # fully known here, so not kept
        for uid in (*more_units, *more_held):
            cache.units.pop(uid, None)
        cache.shard = shard  # what the commit wrote
        cache.pending = pc
        if pc is not None and len(pc.d) > bound:  # too many to keep: the sorted set
            cache.pending, cache.pending_off = None, True
        if sight is not None and not cache.sightings_off:
            # the owner's copy, maybe pruned by the rules (a new dict then)
            cache.sightings, cache.sightings_prune_at = seen1, st._seen_prune_at
            if len(seen1) > bound:
                cache.sightings, cache.sightings_off = None, True
    return {"applied": len(todo), "skipped": skipped,
            "offset": off_new if off_new is not None else stored,
            "max_ts": shard.max_ts, "more": int(more), "dirty_seq": seq,
            **{c: n for c, n in st.counters.items() if n}}


def _pending_width(st: ExperimentState) -> int:
    """The bucket width of a source's pending entries (chosen once, kept in
    its index): scores lie within about W + H of the clock (a close up to
    W ahead, a folded unit's close + H), so about four to six buckets live
    and the index stays short, while a bucket left empty goes whole."""
    return max((st.W + st.H) // 4, 1)


def _queue_entries(p: Reads, pend_k: str, eid: str, src: str,
                   idx: pq.PendingIndex | None) -> int:
    """Queue the read of every pending entry of ``src`` in its layout
    (``_entries`` takes the replies); returns how many replies."""
    if idx is None:
        p.add("ZRANGE", pend_k, 0, -1, "WITHSCORES")
        return 1
    for key in pq.bucket_keys(eid, src, idx):
        p.add("HGETALL", key)
    return len(idx.starts)


def _entries(got: Sequence[Any], idx: pq.PendingIndex | None
             ) -> tuple[dict[str, int], dict[int, int]]:
    """``_queue_entries``'s replies as unit id -> score, and each bucket's
    log records (bucket start -> records; none for the sorted set)."""
    out: dict[str, int] = {}
    if idx is None:
        for m, sc in got[0]:
            out[_text(m)] = int(sc)
        return out, {}
    return out, {a: pq.replay(h, out) for a, h in zip(idx.starts, got, strict=True)}


def _to_zset(w: WriteSet, eid: str, src: str, idx: pq.PendingIndex,
             everything: dict[str, int], before: dict[str, int], after: dict[str, int]
             ) -> None:
    """Queue the bucket layout's conversion to the sorted set (an owner
    without the copy): every entry after the call's changes, the buckets
    and the index gone."""
    now = {u: sc for u, sc in everything.items() if u not in before}
    now.update(after)
    items = list(now.items())
    for j in range(0, len(items), 10_000):
        w.add("zadd", rk.pending_key(eid, src), dict(items[j:j + 10_000]))
    keys = pq.bucket_keys(eid, src, idx)
    if keys:
        w.add("unlink", *keys)
    w.add("hdel", rk.meta_key(eid), rk.pending_index_field(src))


def _new_sightings(eids: list[str], now: dict[str, int], before: dict[str, int]
                   ) -> dict[str, int]:
    """The sightings of the batch's events ``eids`` the call made or moved
    (in ``now``, not as in ``before``), in ``eids``' order (the packed field's
    bytes follow it). The common batch (every event sighted, none seen
    before) is taken whole at C speed."""
    vals = list(map(now.get, eids))
    if not before and None not in vals:
        return dict(zip(eids, vals, strict=True))  # type: ignore[arg-type]  # (no None in vals)
    return {e: t for e, t in zip(eids, vals, strict=True) if t is not None and before.get(e) != t}


def _zset_changes(w: WriteSet, key: str, before: dict, after: dict) -> None:
    """ZADD the members of ``after`` whose score is new or moved and ZREM
    those gone since ``before`` (a sorted set the call read, then changed)."""
    add = {u: sc for u, sc in after.items() if before.get(u) != sc}
    if add:
        w.add("zadd", key, add)
    rem = [u for u in before if u not in after]
    if rem:
        w.add("zrem", key, *rem)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else x


class PendingCopy:
    """The owner's copy of every pending entry of its source partition
    (``streams.state.pending``: the bucket layout), so that no call reads
    the due entries or a unit's score from Redis, and each commit writes
    per bucket one packed field of the entries added and one of those gone
    (or, past ``pending.compact_at``, the bucket's live entries as one).

    ``d``: unit id -> score (the truth); ``heap``: (score, unit id bytes,
    unit id), the rules' order, with stale entries (skipped) where ``d``
    moved on; ``members``: bucket start -> its entries (what a compaction
    writes); ``logged``: bucket start -> the records its log in Redis holds;
    ``listed``: the buckets Redis holds; ``fresh``: Redis holds none of it
    yet (the older layout, the sorted set, is converted by this call's
    commit)."""

    def __init__(self, entries: dict[str, int], w: int, idx: pq.PendingIndex | None,
                 logged: dict[int, int]) -> None:
        self.d = entries
        self.w = w
        self.heap = [(sc, u.encode("utf-8"), u) for u, sc in entries.items()]
        heapq.heapify(self.heap)
        self.members: dict[int, dict[str, int]] = {}
        for u, sc in entries.items():
            self.members.setdefault(sc - sc % w, {})[u] = sc
        self.logged = logged
        self.fresh = idx is None
        self.listed: set[int] = set() if idx is None else set(idx.starts)
        self.text: str | None = None if idx is None else idx.text()

    def take_due(self, T: int, limit: int) -> list[tuple[int, bytes, str]]:
        """The first ``limit`` entries with score <= ``T`` in the rules'
        order (the sorted set's ``ZRANGE BYSCORE ... LIMIT``), taken off the
        heap as its entries (score, unit id bytes, unit id): the rules' heap
        is made of them as they are; ``write`` puts back what the call
        leaves pending."""
        heap, dget = self.heap, self.d.get
        out: list[tuple[int, bytes, str]] = []
        pop = heapq.heappop
        while heap and heap[0][0] <= T and len(out) < limit:
            t = pop(heap)
            if dget(t[2]) == t[0]:
                out.append(t)
        return out

    def write(self, w: WriteSet, eid: str, src: str, before: dict[str, int],
              after: dict[str, int], seq: int,
              items: list[tuple[int, bytes, str]] | None = None) -> None:
        """Apply the call's changes (``before``: the due entries it took;
        ``after``: the rules' pending heap after it) to the copy and queue
        them: per bucket a ``+<seq>`` field (entries added or moved there)
        and a ``-<seq>`` field (unit ids gone from it), or the bucket
        rewritten whole when its log would pass ``pending.compact_at``;
        buckets left empty UNLINKed; the index when it changed.

        ``items``: ``after`` as the rules' heap entries (score, unit id
        bytes, unit id), each unit once and in ``after``'s order, pushed
        onto the copy's heap as they are (no tuple built, no id encoded
        again: this runs for every exposure)."""
        d, members, wd, heap = self.d, self.members, self.w, self.heap
        rem: dict[int, list[str]] = {}
        add: dict[int, dict[str, int]] = {}
        for u in before:
            if u not in after and (old := d.pop(u, None)) is not None:
                a = old - old % wd
                rem.setdefault(a, []).append(u)
                del members[a][u]
        if items is None:
            items = [(sc, u.encode("utf-8"), u) for u, sc in after.items()]
        dget, push = d.get, heapq.heappush
        for t in items:
            sc, _, u = t
            old = dget(u)
            if old != sc:
                if old is not None:
                    a = old - old % wd
                    rem.setdefault(a, []).append(u)
                    del members[a][u]
                d[u] = sc
                a = sc - sc % wd
                # (not ``setdefault(a, {})``: that builds a dict per entry;
                # measured ~70.2k -> ~69.7k instr/event, callgrind)
                ma = add.get(a)
                if ma is None:
                    ma = add[a] = {}
                ma[u] = sc
                ma = members.get(a)
                if ma is None:
                    ma = members[a] = {}
                ma[u] = sc
            push(heap, t)
        if self.fresh:  # every entry, in the buckets it falls in
            add = {a: dict(m) for a, m in members.items() if m}
            rem = {}
            w.add("unlink", rk.pending_key(eid, src))
            self.fresh = False
        gone = [a for a, m in members.items() if not m]
        for a in gone:
            del members[a]
            self.logged.pop(a, None)
        self._queue_buckets(w, eid, src, seq, rem, add)
        drop = [rk.pending_bucket_key(eid, src, a) for a in gone if a in self.listed]
        if drop:
            w.add("unlink", *drop)
        self.listed = set(members)
        while heap and d.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        text = pq.PendingIndex(wd, len(d), heap[0][0] if heap else None,
                               sorted(members)).text()
        if text != self.text:
            w.add("hset", rk.meta_key(eid), rk.pending_index_field(src), text)
            self.text = text

    def _queue_buckets(self, w: WriteSet, eid: str, src: str, seq: int,
                       rem: dict[int, list[str]], add: dict[int, dict[str, int]]) -> None:
        """Queue each live touched bucket's fields of commit ``seq``; a
        bucket whose log would pass ``pending.compact_at`` is replaced by its
        live entries as the one field ``+<seq>`` (UNLINK, then HSET: in the
        same MULTI/EXEC, so a reader replays either the old log or the new
        one)."""
        members, logged = self.members, self.logged
        for a in sorted(rem.keys() | add.keys()):
            m = members.get(a)
            if m is None:
                continue  # left empty: UNLINKed
            key = rk.pending_bucket_key(eid, src, a)
            listed = a in self.listed
            n = logged.get(a, 0) + len(add.get(a, ())) + (len(rem.get(a, ())) if listed else 0)
            if n > pq.compact_at(len(m)):
                if listed:
                    w.add("unlink", key)
                w.add("hset", key, f"+{seq}", orjson.dumps(m))
                logged[a] = len(m)
                continue
            if a in rem and listed:
                w.add("hset", key, f"-{seq}", orjson.dumps(rem[a]))
            if a in add:
                w.add("hset", key, f"+{seq}", orjson.dumps(add[a]))
            logged[a] = n


#: the field every sighting bucket is created with (``keys.HASHTABLE_PAD``;
#: no event id contains ``#``, ``schemas.validate.ID_PATTERN``)
SEEN_PAD = rk.HASHTABLE_PAD


class SeenBuckets:
    """The dedupe sightings of one experiment and source partition in Redis,
    as one call of the owner reads and writes them (rule 1 of
    ``streams.state.semantics``: an event id sighted at a clock
    ``>= clk - DD`` is a duplicate).

    Why buckets, measured (docs/performance.md): one sorted set of every
    sighting cost Redis ~0.6 µs a ZADD member (a skiplist insert) and
    ~0.15 µs an event to prune (ZREMRANGEBYSCORE). Sightings live in hashes
    (``keys.seen_bucket_key``), one per clock bucket ``[start, start + w)``,
    ``w = max(DD, 1)``: a sighting that can still mark a duplicate lies in
    the current or the previous bucket, and pruning UNLINKs a whole bucket
    once its end is below ``clk - DD`` (no per-member removal; up to 2·DD of
    sightings are kept, the sorted set kept DD).

    A bucket holds sightings in two forms (readers take the largest clock
    of an id over both; sighting clocks of an id only grow):

    - packed: what an owner with the full copy of the sightings in memory
      writes (``packed=True`` in ``write``; the common case): the call's
      sightings of the bucket as ONE field ``#<k>`` (k = 1, 2, ...), its
      value ``orjson`` of event id -> clock. Why, measured: Redis's cost of
      a sighting as a field of its own was ~0.6 µs (an argument to parse,
      queue in MULTI and append to the AOF), packed ~0.1 µs. Nothing looks
      up a packed sighting by id: the copy is loaded whole (``read_all``).
    - per id: field event id -> clock, what an owner without the copy
      writes (``sightings_off``, or no cache): its lookups are HMGET of the
      batch's ids on at most two buckets. Such a call first converts the
      packed fields of the buckets it looks in to per-id fields (read with
      its lookups, written with its commit, in the same fenced
      MULTI/EXEC), so every packed field of a bucket is newer than its
      per-id fields.

    The buckets that exist are listed in the meta hash
    (``keys.seen_index_field``: ``start:end`` entries, read with the meta
    fields every call reads anyway; ``start:end:f:n`` when the bucket has
    f packed fields holding n sightings), so nothing scans for them, and a
    changed dedupe window (another ``w``) strands none: each bucket keeps
    the end it was created with (an end only grows).

    Older state (a ``keys.seen_key`` sorted set: the source has a clock but
    no list) is converted by the owner's next call: its live sightings are
    read with the batch, written to buckets, and the sorted set is UNLINKed
    in the same fenced MULTI/EXEC (``write``)."""

    def __init__(self, experiment_id: str, src: str, raw: Any, clk0: int | None,
                 DD: int) -> None:
        self.eid, self.src, self.DD, self.w = experiment_id, src, DD, max(DD, 1)
        text = "" if raw is None else _text(raw)
        self.listed = raw is not None
        #: bucket start -> end (the last clock it may hold)
        self.live: dict[int, int] = {}
        #: bucket start -> (packed fields, sightings in them), for those with any
        self.packed: dict[int, tuple[int, int]] = {}
        for x in text.split():
            a, b, *fn = map(int, x.split(":"))
            self.live[a] = b
            if fn and fn[0]:
                self.packed[a] = (fn[0], fn[1])
        #: older state: the sorted set, converted by this call's commit
        self.legacy = raw is None and clk0 is not None
        self.since = None if clk0 is None else clk0 - DD
        #: the buckets a sighting that still counts may be in
        self.starts = [a for a, b in sorted(self.live.items())
                       if self.since is None or b >= self.since]
        self.keys = [rk.seen_bucket_key(experiment_id, src, a) for a in self.starts]
        self.count = 0  # how many sightings they hold (``queue_reads`` with ``count``)
        self._counting = False
        self._old: dict[str, int] = {}
        #: bucket start -> its packed sightings, read by a call that looks up
        #: by id: converted to per-id fields by its ``write``
        self._unpacked: dict[int, dict[str, int]] = {}

    def queue_reads(self, p: Reads, eids: list[str], count: bool) -> int:
        """Queue the reads ``replies`` takes: the older layout's live
        sightings (all of them), else the buckets' sizes (``count``), their
        values of ``eids`` and (with ``eids``) their packed fields. Returns
        how many replies they make."""
        if self.legacy:
            p.add("ZRANGE", rk.seen_key(self.eid, self.src), self.since, "+inf", "BYSCORE",
                  "WITHSCORES")
            return 1
        self._counting = count
        n = 0
        for key in self.keys if count else ():
            p.add("HLEN", key)
            n += 1
        for key in self.keys if eids else ():
            p.add("HMGET", key, *eids)
            n += 1
        for a, key in zip(self.starts, self.keys, strict=True) if eids else ():
            if a in self.packed:
                p.add("HMGET", key, *_packed_fields(self.packed[a][0]))
                n += 1
        return n

    def replies(self, got: Sequence[Any], eids: list[str]
                ) -> tuple[dict[str, int], dict[str, int] | None]:
        """The sightings of ``eids`` (event id -> latest clock), and every
        live sighting when the reads had them all (the older layout's)."""
        if self.legacy:
            self._old = {_text(m): int(sc) for m, sc in got[0]}
            self.count = len(self._old)
            return {e: t for e in eids if (t := self._old.get(e)) is not None}, dict(self._old)
        i = len(self.keys) if self._counting else 0
        if self._counting:  # less ``SEEN_PAD`` and the packed fields, plus what they hold
            self.count = sum(max(int(x) - 1 - f, 0) + n for x, (f, n) in zip(
                got[:i], [self.packed.get(a, (0, 0)) for a in self.starts], strict=True))
        seen: dict[str, int] = {}
        if not eids:
            return seen, None
        for vals in got[i:i + len(self.keys)]:
            for e, v in zip(eids, vals, strict=True):
                if v is not None and int(v) > seen.get(e, -(1 << 62)):
                    seen[e] = int(v)
        j = i + len(self.keys)
        for a in self.starts:
            if a in self.packed:
                m = self._unpacked[a] = {}
                _unpack_into(m, got[j])
                j += 1
                for e in eids:
                    t = m.get(e)
                    if t is not None and t > seen.get(e, -(1 << 62)):
                        seen[e] = t
        return seen, None

    def read_all(self, r: Any) -> dict[str, int]:
        """Every sighting of the live buckets (event id -> latest clock), the
        packed ones unpacked: the owner's copy, loaded once per cache."""
        p = Reads(r)
        for key in self.keys:
            p.add("HGETALL", key)
        out: dict[str, int] = {}
        for h in p.execute():
            packed = []
            for m, v in h.items():
                e = _text(m)
                if e[0] == "#":  # ``SEEN_PAD``, or packed (no event id has ``#``)
                    if e != SEEN_PAD[0]:
                        packed.append(v)
                    continue
                t = int(v)
                if t > out.get(e, -(1 << 62)):
                    out[e] = t
            _unpack_into(out, packed)
        return out

    def _by_bucket(self, add: dict[str, int]) -> dict[int, dict[str, int]]:
        """``add`` grouped by bucket start; a call's sightings are mostly in
        one bucket (its clocks span less than DD): then ``add`` itself."""
        if not add:
            return {}
        lo, hi = min(add.values()), max(add.values())
        if lo - lo % self.w == hi - hi % self.w:
            return {lo - lo % self.w: add}
        by: dict[int, dict[str, int]] = {}
        for e, t in add.items():
            by.setdefault(t - t % self.w, {})[e] = t
        return by

    def write(self, w: WriteSet, sightings: dict[str, int], clk1: int | None,
              packed: bool = False) -> None:
        """Queue the call's new ``sightings`` (event id -> clock; with the
        older layout's, converted, under them), packed (``packed``: the
        owner keeps the full copy) or per id (then after the packed
        sightings this call read, converted), the buckets gone at clock
        ``clk1`` (None: the clock did not move) and the list when it changed."""
        add = {**self._old, **sightings} if self.legacy else sightings
        live, pk = dict(self.live), dict(self.packed)
        by = self._by_bucket(add)
        for a in by:
            if live.get(a, a - 1) < a + self.w - 1:
                live[a] = a + self.w - 1
        gone = [] if clk1 is None else [a for a, b in live.items() if b < clk1 - self.DD]
        for a in gone:
            del live[a]
            pk.pop(a, None)
            by.pop(a, None)
        conv = {} if packed else {a: m for a, m in self._unpacked.items() if a in live}
        for a in sorted(by.keys() | conv.keys()):
            key = rk.seen_bucket_key(self.eid, self.src, a)
            if a not in self.live:
                w.add("hset", key, *SEEN_PAD)  # created a hashtable
            m = by.get(a, {})
            if packed:
                self._write_packed(w, key, a, m, pk)
                continue
            if a in conv:  # once: the packed sightings as per-id fields, then the new
                w.add("hdel", key, *_packed_fields(pk.pop(a)[0]))
                m = {**conv[a], **m}
            items = list(m.items())  # a converted layout may be large
            for j in range(0, len(items), 10_000):
                w.add("hset", key, mapping=dict(items[j:j + 10_000]))
        drop = [rk.seen_bucket_key(self.eid, self.src, a) for a in gone if a in self.live]
        if self.legacy:
            drop.append(rk.seen_key(self.eid, self.src))
        if drop:
            w.add("unlink", *drop)
        if not self.listed or live != self.live or pk != self.packed:
            w.add("hset", rk.meta_key(self.eid), rk.seen_index_field(self.src),
                  " ".join(f"{a}:{b}:{pk[a][0]}:{pk[a][1]}" if a in pk else f"{a}:{b}"
                           for a, b in sorted(live.items())))

    @staticmethod
    def _write_packed(w: WriteSet, key: str, a: int, m: dict[str, int],
                      pk: dict[int, tuple[int, int]]) -> None:
        """Queue ``m`` as the next packed fields of bucket ``a`` (one, unless
        a converted layout is large) and count them in ``pk``."""
        f, n = pk.get(a, (0, 0))
        items = list(m.items()) if len(m) > 10_000 else None
        parts = [m] if items is None else [dict(items[j:j + 10_000])
                                           for j in range(0, len(items), 10_000)]
        for part in parts:
            f += 1
            w.add("hset", key, f"#{f}", orjson.dumps(part))
        pk[a] = (f, n + len(m))


def _packed_fields(f: int) -> list[str]:
    """The names of a bucket's ``f`` packed fields (``SeenBuckets``)."""
    return [f"#{k}" for k in range(1, f + 1)]


def _unpack_into(out: dict[str, int], values: Sequence[Any]) -> None:
    """Merge packed sighting values (``orjson`` of event id -> clock; None:
    absent) into ``out``, the largest clock of an id winning."""
    for v in values:
        if v is None:
            continue
        for e, t in orjson.loads(v).items():
            if t > out.get(e, -(1 << 62)):
                out[e] = t


def read_sightings(r: Any, experiment_id: str, src: str) -> dict[str, int]:
    """Every stored dedupe sighting of source ``src`` (event id -> latest
    clock; debugging and tests)."""
    raw = r.hget(rk.meta_key(experiment_id), rk.seen_index_field(src))
    return SeenBuckets(experiment_id, src, raw, None, 0).read_all(r)


def seen_keys(r: Any, experiment_id: str, sources: Sequence[str]) -> list[str]:
    """Every dedupe sightings key of ``sources`` (the buckets their meta
    lists, and the older layout's sorted set): what conclusion deletes."""
    raw = r.hmget(rk.meta_key(experiment_id), [rk.seen_index_field(s) for s in sources]) \
        if sources else []
    out = []
    for src, text in zip(sources, raw, strict=True):
        out.append(rk.seen_key(experiment_id, src))
        for x in ("" if text is None else _text(text)).split():
            out.append(rk.seen_bucket_key(experiment_id, src, int(x.split(":")[0])))
    return out


def _decode_held(raw: bytes) -> list[tuple[int, int, float]]:
    """A ``held`` hash value: ``<Hdd`` records (1-based metric index, ts, value)."""
    out = []
    for j in range(0, len(raw), _HELD.size):
        mi, ts, v = _HELD.unpack_from(raw, j)
        out.append((mi - 1, int(ts), v))
    return out


def _pack_legacy_tails(w: WriteSet, st: ExperimentState, shard: Shard, key: str,
                       legacy: list[str]) -> None:
    """Queue the deletion of a shard's tail fields of the older layout (a
    field per bucket, store.py note 10) and the packed fields of their
    (metric, variant)s that ``shard_mapping`` did not write this call (it
    wrote those the rules touched, whole)."""
    w.add("hdel", key, *legacy)
    done = {(m, vi) for m, vi, _ in shard.touched_tails}
    pairs = {(m, st.variants.index(var)) for _, m, var, _ in (f.split("|") for f in legacy)}
    rest = sorted(pairs - done)
    if rest:
        w.add("hset", key, mapping={f"t|{m}|{st.variants[vi]}": pack_tails(shard.tails[(m, vi)])
                                    for m, vi in rest})


def _load_shard(st: ExperimentState, shard: Shard, raw: dict) -> list[str]:
    """Fill a working shard from its Redis hash (``shard_mapping``'s inverse);
    returns the tail fields of the older layout (a field per bucket, store.py
    note 10) it read, which the next commit packs and deletes."""
    vindex = {v: i for i, v in enumerate(st.variants)}
    legacy = []
    for a, b in raw.items():
        f = a.decode() if isinstance(a, bytes) else a
        v = b.decode() if isinstance(b, bytes) else b
        if f.startswith("act_sum:"):
            shard.activity_sum[int(f[8:])] = float(v)
        elif f.startswith("t|"):  # tail counts (store.py note 10)
            for m, var, b_, n in tail_counts(f, v):
                shard.tails.setdefault((m, vindex[var]), {})[b_] = n
            if f.count("|") == 3:
                legacy.append(f)
        elif f.startswith("a|"):
            _, m, var, fs = f.split("|")
            xs = v.split(" ")
            shard.age_cells[(m, vindex[var], int(fs))] = [int(xs[0])] + [float(x) for x in xs[1:]]
        else:
            m, var, s_ = f.split("|")
            xs = v.split(" ")
            # the 8 values, then a metric kind's extra ones (issue 26)
            shard.cells[(m, vindex[var], int(s_))] = [int(xs[0]), float(xs[1]), float(xs[2]),
                                                      int(xs[3]), *map(float, xs[4:])]
    return legacy


def _check_rows(experiment_id: str, rows: Sequence[tuple]) -> None:
    """What a call relies on: every row is the experiment's (a metric without
    experiment_id, or released, may be routed to it) and numbers are finite
    (None stands for "no pre_activity").

    Checked over the batch's distinct (kind, experiment) pairs and the sum
    of its numbers (a NaN or an infinity makes the sum non-finite), so a
    valid batch costs two C-speed passes; only a batch that fails either
    is walked row by row, for the first offending row's message."""
    pairs = set(map(_KIND_EXP, rows))
    try:
        total = sum([row[7] for row in rows if row[7] is not None])
        finite = math.isfinite(total)
    except (OverflowError, TypeError):
        finite = False
    if finite and all(
            exp == experiment_id if kind == "x" else
            (exp == experiment_id or exp is None or kind == "h") for kind, exp in pairs):
        for pre in filter(None, map(_PRE, rows)):  # the rows with pre values
            if not all(math.isfinite(v) for v in pre.values()):
                raise ValueError("non-finite pre value")
        return
    for row in rows:
        kind, exp, num = row[1], row[3], row[7]
        if kind == "x":
            if exp != experiment_id:
                raise ValueError(f"exposure for {exp!r} in a batch for {experiment_id!r}")
        elif exp != experiment_id and exp is not None and kind != "h":
            raise ValueError(f"metric for {exp!r} in a batch for {experiment_id!r}")
        if num is not None and not math.isfinite(num):
            raise ValueError(f"non-finite number in an event: {num!r}")
        if row[8] and not all(math.isfinite(v) for v in row[8].values()):
            raise ValueError("non-finite pre value")
