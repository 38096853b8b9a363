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

Fences are per (experiment, source), not per experiment: several owners
(one per source partition) commit to one experiment, and one owner's claim
must not abort the others' transactions.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError, WatchError

from schemas.records import ExperimentConfig, Exposure, Metric
from streams.state import keys as rk
from streams.state.keys import experiment_keys
from streams.state.retired_filter import BITS, C0, MAX_LAYER, K, RetiredFilter, layer_of, positions
from streams.state.semantics import FOLD_LIMIT, ExperimentState, Item, Shard
from streams.state.store import Fenced, decode_unit, encode_unit


class LostCommits(Exception):
    """Redis holds fewer commits of (experiment, source) than the owner made:
    it lost acknowledged writes. The owner must drop its cache and seek back
    to Redis's applied offset (``streams.state.store.applied_offset``)."""

    def __init__(self, experiment_id: str, src: str, expected: int, found: int) -> None:
        super().__init__(f"{experiment_id} {src}: Redis holds commit {found}, "
                         f"the owner made {expected}")
        self.expected = expected
        self.found = found


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


class Commit:
    """One fenced commit, in its two steps: ``prepare`` (WATCH the fence, read
    epoch and sequence, check them) and ``execute`` (MULTI, the writes, the
    applied offset, the sequence, ``dirty_seq``, EXEC). ``commit`` runs both;
    the steps are separate so a test can stop a zombie between them."""

    def __init__(self, r: Any, experiment_id: str, src: str, epoch: int, seq: int) -> None:
        self.experiment_id = experiment_id
        self.src = src
        self.epoch = epoch
        self.seq = seq
        self.fence = rk.fence_key(experiment_id, src)
        self.pipe = r.pipeline(transaction=True)
        #: ``dirty_seq`` after the EXEC (``execute``)
        self.dirty_seq: int | None = None

    def prepare(self) -> None:
        """WATCH the fence, then check it: ``Fenced`` if a newer owner
        claimed, ``LostCommits`` if Redis is behind this owner's claim or
        commits (its fence below this owner's epoch: the claim itself lost)."""
        self.pipe.watch(self.fence)
        cur, seq = self.pipe.hmget(self.fence, "epoch", "seq")
        if _int_or_zero(cur) > self.epoch:
            self.pipe.reset()
            raise Fenced(f"{self.experiment_id} {self.src} is owned by epoch "
                         f"{_int_or_zero(cur)}, not {self.epoch}")
        if _int_or_zero(cur) < self.epoch or _int_or_zero(seq) != self.seq:
            self.pipe.reset()
            raise LostCommits(self.experiment_id, self.src, self.seq, _int_or_zero(seq))

    def execute(self, writes: WriteSet, offset: int | None, dirty: bool = True) -> int:
        """Queue the writes, the applied offset (when the batch had one), the
        sequence and, when ``dirty`` (the state changed), ``dirty_seq`` +1;
        EXEC. Returns the new sequence; ``Fenced`` when the EXEC
        was refused (the fence moved after ``prepare``): nothing was written."""
        p = self.pipe
        p.multi()
        for method, args, kwargs in writes.ops:
            getattr(p, method)(*args, **kwargs)
        if offset is not None:
            p.hset(rk.offsets_key(self.experiment_id), self.src, offset)
        p.hincrby(self.fence, "seq", 1)
        if dirty:
            p.incr(rk.dirty_seq_key(self.experiment_id))
        try:
            res = p.execute()
        except WatchError:
            raise Fenced(f"{self.experiment_id} {self.src}: the fence moved during the "
                         "commit (a newer owner claimed)") from None
        finally:
            p.reset()
        if dirty:
            self.dirty_seq = int(res[-1])
        return self.seq + 1


def commit(r: Any, experiment_id: str, src: str, epoch: int, seq: int, writes: WriteSet,
           offset: int | None) -> int:
    """One experiment's fenced commit of a batch of source ``src`` (module
    docstring); returns the owner's new commit sequence."""
    c = Commit(r, experiment_id, src, epoch, seq)
    c.prepare()
    return c.execute(writes, offset)


def shard_mapping(state: ExperimentState, shard: Shard) -> dict[str, str]:
    """A source's ``Shard`` as the fields of its ``keys.shard_key`` hash
    (store.py notes 3, 7, 9: cells ``<metric>|<variant>|<stratum>``, age
    cells ``a|<metric>|<variant>|<fine>``, ``act_sum:<stratum>`` and
    not ``max_ts``, which goes to meta ``max_ts:<src>`` (an integer the
    overview reads with the rest of meta); floats as ``repr``, which
    round-trips a double): what the
    owner HSETs, as absolute values, for the cells its batch changed."""
    variants = state.variants
    out = {f"{m}|{variants[vi]}|{s}": " ".join(map(repr, c))
           for (m, vi, s), c in shard.cells.items()}
    out.update({f"a|{m}|{variants[vi]}|{f}": " ".join(map(repr, a))
                for (m, vi, f), a in shard.age_cells.items()})
    out.update({f"act_sum:{s}": repr(x) for s, x in shard.activity_sum.items()})
    return out


def put_shard(writes: WriteSet, experiment_id: str, src: str, fields: dict[str, str]) -> WriteSet:
    """Queue the HSET of ``src``'s shard fields and its entry in the shard
    set (``keys.shards_key``: readers find the shards without scanning)."""
    if fields:
        writes.add("hset", rk.shard_key(experiment_id, src), mapping=fields)
        writes.add("sadd", rk.shards_key(experiment_id), src)
    return writes


def put_tails(writes: WriteSet, state: ExperimentState) -> WriteSet:
    """Queue the HINCRBYs of the tail sketch's counts the call moved (issue
    26, ``keys.tails_key``, store.py note 10): the working state starts
    with no counts, so what it holds after the call is the change; integer
    increments, so owners of several sources add up exactly in any order."""
    key = rk.tails_key(state.config.experiment_id)
    for (m, vi), counts in state.tails.items():
        for b, n in counts.items():
            if n:
                writes.add("hincrby", key, f"{m}|{state.variants[vi]}|{b}", n)
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


def _row_item(row: tuple) -> Item:
    """A clocked row (``store`` rows) as the reducer's item."""
    off, kind, eid, exp, uid, name, ts, num, pre, clk = row
    if kind == "x":
        return Exposure(eid, exp, uid, name, ts, num, pre), clk, False
    return Metric(eid, uid, name, num, ts, exp), clk, kind == "h"


def _unskipped(rows: Sequence[tuple], stored: int | None) -> tuple[list[tuple], int]:
    """The rows above the applied offset (as before issue 25: a released
    metric ``h`` goes with the exposure before it) and how many were skipped."""
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
        else:
            self.seqs.pop(experiment_id, None)

    def commit(self, experiment_id: str, writes: WriteSet, offset: int | None,
               dirty: bool = True) -> int | None:
        """The fenced commit (``commit``); returns ``dirty_seq`` after it
        (None when ``dirty`` is False: nothing a reader sees changed)."""
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
        c = Commit(self.r, experiment_id, self.src, self.epoch, self.seq_of(experiment_id))
        try:
            c.prepare()
            self.seqs[experiment_id] = c.execute(writes, offset, dirty)
        except (Fenced, LostCommits):
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
                     dead: Sequence[tuple[int, str]] = ()) -> dict[str, Any]:
    """``store.apply_rows`` in the partition's owner (issue 25): the rules of
    ``streams.state.semantics`` run here, on a working ``ExperimentState``
    seeded with what the call needs from Redis (the batch's unit records,
    holds and sightings, the due pending and hold-queue entries and their
    records, the retired filter's answer for units without a record, the
    source's shard); what they changed is committed in ONE fenced MULTI/EXEC
    with the applied offset (``commit``). Same arguments and result as
    ``apply_rows``; events at or below the applied offset are skipped."""
    r, src, eid = owner.r, owner.src, cfg.experiment_id
    _check_rows(eid, rows)
    owner.seq_of(eid)  # the fence first, then the reads
    k = experiment_keys(eid)
    pend_k, seen_k, heldq_k = rk.pending_key(eid, src), rk.seen_key(eid, src), \
        rk.heldq_key(eid, src)
    shard_k = rk.shard_key(eid, src)
    uids = list(dict.fromkeys(row[4] for row in rows))
    eids = list(dict.fromkeys(row[2] for row in rows))

    p = r.pipeline(transaction=False)
    p.hmget(k.meta, "anchor", "started_at", f"clk:{src}", "retired_n", "retired_cap",
            f"max_ts:{src}")
    p.hget(k.offsets, src)
    p.hgetall(shard_k)
    if uids:
        p.hmget(k.units, uids)
        p.zmscore(pend_k, uids)
        p.hmget(k.held, uids)
        p.zmscore(heldq_k, uids)
    if eids:
        p.zmscore(seen_k, eids)
    got = p.execute()
    (anchor_raw, started_raw, clk_raw, ret_n_raw, ret_cap_raw, max_raw), stored_raw, shard_raw = \
        got[:3]
    rest = got[3:]
    units_raw, pend_sc, held_raw, heldq_sc = (rest[:4] if uids else ([], [], [], []))
    seen_sc = rest[4] if uids and eids else (rest[0] if eids else [])
    stored = None if stored_raw is None else int(stored_raw)
    todo, skipped = _unskipped(rows, stored)

    st = ExperimentState(cfg, fold_limit, sharded=True)
    anchor0 = anchor_raw if anchor_raw is not None else started_raw
    st.anchor = None if anchor0 is None else int(anchor0)
    clk0 = None if clk_raw is None else int(clk_raw)
    if clk0 is not None:
        st.clk[src] = clk0
    clk = clk_end if clk0 is None or clk_end > clk0 else clk0
    shard = st._shard(src)
    _load_shard(st, shard, shard_raw)
    shard.max_ts = None if max_raw is None else int(max_raw)
    max_ts0 = shard.max_ts
    shard_before = shard_mapping(st, shard)

    loaded_units: dict[str, bytes] = {}
    for uid, raw, sc in zip(uids, units_raw, pend_sc, strict=True):
        if raw is not None:
            loaded_units[uid] = raw
            st.units[uid] = decode_unit(raw, cfg)
            st.unit_source[uid] = src if sc is not None else ""
    held_before: dict[str, bytes] = {}
    for uid, raw in zip(uids, held_raw, strict=True):
        if raw:
            held_before[uid] = raw
            st.held[uid] = _decode_held(raw)
    q: dict[str, int] = {}
    for uid, sc in zip(uids, heldq_sc, strict=True):
        if sc is not None:
            q[uid] = int(sc)
    seen: dict[str, int] = {e: int(sc) for e, sc in zip(eids, seen_sc, strict=True)
                            if sc is not None}
    st._seen[src] = dict(seen)

    # due work at this call's clock: pending entries (rule 5/6), hold expiry
    T, cut = clk - st.L, clk - st.Hh
    p = r.pipeline(transaction=False)
    p.zrange(pend_k, "-inf", T, byscore=True, offset=0, num=fold_limit + 1, withscores=True)
    p.zrange(heldq_k, "-inf", f"({cut}", byscore=True, offset=0, num=fold_limit + 1,
             withscores=True)
    due_pend, due_held = p.execute()
    pend0: dict[str, int] = {}
    for m, sc in due_pend:
        pend0[m.decode() if isinstance(m, bytes) else m] = int(sc)
    for m, sc in due_held:
        q.setdefault(m.decode() if isinstance(m, bytes) else m, int(sc))
    more_units = [u for u in pend0 if u not in st.units and u not in loaded_units]
    more_held = [u for u in q if u not in held_before and u not in uids]
    ret_n = int(ret_n_raw or 0)
    ask = [u for u in uids if u not in loaded_units] if ret_n > 0 else []
    max_layer = MAX_LAYER if ret_cap_raw is None else int(ret_cap_raw)
    p = r.pipeline(transaction=False)
    if more_units:
        p.hmget(k.units, more_units)
    if more_held:
        p.hmget(k.held, more_held)
    layers = layer_of(ret_n - 1, max_layer) + 1 if ret_n > 0 else 0
    for u in ask:
        args = [x for lay in range(layers) for x in positions(u, lay)]
        p.execute_command("BITFIELD_RO", k.retired, *[a for x in args for a in ("GET", "u1", x)])
    got = p.execute() if (more_units or more_held or ask) else []
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
    st._pending[src] = [(sc, u.encode("utf-8"), u) for u, sc in pend0.items()]
    heapq.heapify(st._pending[src])
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
        more = st.apply_call(src, [_row_item(row) for row in todo], clk_end)[1]

    # ---- the write set: what the rules changed
    w = WriteSet()
    recs = {}
    for uid, u in st.units.items():
        rec = encode_unit(u, cfg)
        if loaded_units.get(uid) != rec:
            recs[uid] = rec
    if recs:  # one command for the batch's records (Redis's cost is per command)
        w.add("hset", k.units, mapping=recs)
    gone = [u for u in loaded_units if u not in st.units]
    if gone:
        w.add("hdel", k.units, *gone)
    pend1 = {u: sc for sc, _, u in st._pending[src]}
    add = {u: sc for u, sc in pend1.items() if pend0.get(u) != sc}
    if add:
        w.add("zadd", pend_k, add)
    rem = [u for u in pend0 if u not in pend1]
    if rem:
        w.add("zrem", pend_k, *rem)
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
    qadd = {u: t for u, t in q1.items() if heldq0.get(u) != t}
    if qadd:
        w.add("zadd", heldq_k, qadd)
    qrem = [u for u in heldq0 if u not in q1]
    if qrem:
        w.add("zrem", heldq_k, *qrem)
    seen1 = st._seen.get(src, {})
    sadd = {e: t for e, t in seen1.items() if seen.get(e) != t}
    if sadd:
        w.add("zadd", seen_k, sadd)
    ret: _LoadedRetired = st.retired  # type: ignore[assignment]
    if ret.added:
        for j in range(0, len(ret.new_bits), 300):
            w.add("execute_command", "BITFIELD", k.retired,
                  *[a for x in ret.new_bits[j:j + 300] for a in ("SET", "u1", x, 1)])
        w.add("hincrby", k.meta, "retired_n", ret.added)
    if ret.cap_found is not None:
        w.add("hset", k.meta, "retired_cap", ret.cap_found)
    fields = shard_mapping(st, shard)
    changed = {f: v for f, v in fields.items() if shard_before.get(f) != v}
    if shard_before:
        if changed:
            w.add("hset", shard_k, mapping=changed)
    else:
        put_shard(w, eid, src, changed)
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
    put_tails(w, st)
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
    dirty = bool(todo) or dl_hi is not None or len(w) > 0
    clk1 = st.clk.get(src)
    if clk1 is not None and clk1 != clk0:
        w.add("hset", k.meta, f"clk:{src}", clk1)
        # a sighting counts while its clock >= clk - DD; older ones never again
        w.add("zremrangebyscore", seen_k, "-inf", f"({clk1 - st.DD}")
    off_new = todo[-1][0] if todo else None
    if dl_hi is not None and (off_new is None or dl_hi > off_new):
        off_new = dl_hi
    seq = owner.commit(eid, w, off_new, dirty) if dirty or len(w) else None
    return {"applied": len(todo), "skipped": skipped,
            "offset": off_new if off_new is not None else stored,
            "max_ts": shard.max_ts, "more": int(more), "dirty_seq": seq,
            **{c: n for c, n in st.counters.items() if n}}


def _decode_held(raw: bytes) -> list[tuple[int, int, float]]:
    """A ``held`` hash value: ``<Hdd`` records (1-based metric index, ts, value)."""
    out = []
    for j in range(0, len(raw), _HELD.size):
        mi, ts, v = _HELD.unpack_from(raw, j)
        out.append((mi - 1, int(ts), v))
    return out


def _load_shard(st: ExperimentState, shard: Shard, raw: dict) -> None:
    """Fill a working shard from its Redis hash (``shard_mapping``'s inverse)."""
    vindex = {v: i for i, v in enumerate(st.variants)}
    for a, b in raw.items():
        f = a.decode() if isinstance(a, bytes) else a
        v = b.decode() if isinstance(b, bytes) else b
        if f.startswith("act_sum:"):
            shard.activity_sum[int(f[8:])] = float(v)
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


def _check_rows(experiment_id: str, rows: Sequence[tuple]) -> None:
    """What a call relies on: every row is the experiment's (a metric without
    experiment_id, or released, may be routed to it) and numbers are finite
    (None stands for "no pre_activity")."""
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
