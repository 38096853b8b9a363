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

from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import WatchError

from streams.state import keys as rk
from streams.state.semantics import ExperimentState, Shard
from streams.state.store import Fenced


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

    def prepare(self) -> None:
        """WATCH the fence, then check it: ``Fenced`` if another owner
        claimed, ``LostCommits`` if Redis is behind this owner's commits."""
        self.pipe.watch(self.fence)
        cur, seq = self.pipe.hmget(self.fence, "epoch", "seq")
        if _int_or_zero(cur) != self.epoch:
            self.pipe.reset()
            raise Fenced(f"{self.experiment_id} {self.src} is owned by epoch "
                         f"{_int_or_zero(cur)}, not {self.epoch}")
        if _int_or_zero(seq) != self.seq:
            self.pipe.reset()
            raise LostCommits(self.experiment_id, self.src, self.seq, _int_or_zero(seq))

    def execute(self, writes: WriteSet, offset: int | None) -> int:
        """Queue the writes, the applied offset (when the batch had one) and
        the sequence; EXEC. Returns the new sequence; ``Fenced`` when the EXEC
        was refused (the fence moved after ``prepare``): nothing was written."""
        p = self.pipe
        p.multi()
        for method, args, kwargs in writes.ops:
            getattr(p, method)(*args, **kwargs)
        if offset is not None:
            p.hset(rk.offsets_key(self.experiment_id), self.src, offset)
        p.hincrby(self.fence, "seq", 1)
        p.incr(rk.dirty_seq_key(self.experiment_id))
        try:
            p.execute()
        except WatchError:
            raise Fenced(f"{self.experiment_id} {self.src}: the fence moved during the "
                         "commit (a newer owner claimed)") from None
        finally:
            p.reset()
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
    ``max_ts``; floats as ``repr``, which round-trips a double): what the
    owner HSETs, as absolute values, for the cells its batch changed."""
    variants = state.variants
    out = {f"{m}|{variants[vi]}|{s}": " ".join(map(repr, c))
           for (m, vi, s), c in shard.cells.items()}
    out.update({f"a|{m}|{variants[vi]}|{f}": " ".join(map(repr, a))
                for (m, vi, f), a in shard.age_cells.items()})
    out.update({f"act_sum:{s}": repr(x) for s, x in shard.activity_sum.items()})
    if shard.max_ts is not None:
        out["max_ts"] = str(shard.max_ts)
    return out


def put_shard(writes: WriteSet, experiment_id: str, src: str, fields: dict[str, str]) -> WriteSet:
    """Queue the HSET of ``src``'s shard fields and its entry in the shard
    set (``keys.shards_key``: readers find the shards without scanning)."""
    if fields:
        writes.add("hset", rk.shard_key(experiment_id, src), mapping=fields)
        writes.add("sadd", rk.shards_key(experiment_id), src)
    return writes
