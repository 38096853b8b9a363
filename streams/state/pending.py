"""The pending units of a source partition as Redis keeps them (rules 5/6
of ``streams.state.semantics``; issue 25, Redis CPU per event).

Two layouts, one at a time per (experiment, source):

- the sorted set ``keys.pending_key`` (member unit id, score its pending
  clock): what an owner without the full copy in memory uses (the cache
  off or the copy over its bound, an unfenced caller), and what versions
  before this one wrote. The due read is ``ZRANGE BYSCORE``, a unit's
  score ``ZMSCORE``.
- a log in hashes (``keys.pending_bucket_key``), bucketed by score: what an
  owner that keeps every pending entry in memory writes
  (``partition_store.PendingCopy``; the common case). Why, measured
  (docs/performance.md): a sorted-set member cost Redis ~1.3 µs to add (a
  skiplist insert and a dict entry), and the owner that holds the copy
  never reads the set back: due entries and scores come from memory. Each
  commit writes, per bucket it touches, ONE field ``+<seq>`` (``orjson`` of
  unit id -> score: the entries added) and ONE field ``-<seq>`` (``orjson``
  of the unit ids whose entry in the bucket is gone); ``seq`` is the
  commit's sequence (``partition_store.Commit``), so replaying a bucket's
  fields in sequence order, a sequence's ``-`` before its ``+``, gives its
  entries. A bucket is UNLINKed once the owner knows it empty, and
  compacted (rewritten as the one field ``+<seq>`` of its live entries, in
  the same commit) once its log would hold more than ``COMPACT_FACTOR`` x
  its live entries + ``COMPACT_SLACK`` records: a bucket lives about
  (W + H) / 4 of event time, and an owner that commits every few hundred
  ms would otherwise leave thousands of fields to keep and replay.

The layout is the meta field ``keys.pending_index_field``: absent, the
sorted set; present, ``<w> <n> <min> <start> ...``: the bucket width
(chosen once, kept), how many entries there are, the smallest score (``-``:
none) and the buckets that exist. Readers (``store.read_pending``,
``store.due_to_settle``, the overview) read the index for the smallest
score and the count without touching the buckets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from streams.state import keys as rk

#: A bucket's log holds at most ``COMPACT_FACTOR`` x its live entries +
#: ``COMPACT_SLACK`` records (a ``+`` field's entries, a ``-`` field's unit
#: ids; so at most as many fields): the commit that would pass it rewrites
#: the bucket as one ``+`` field (``partition_store.PendingCopy.write``).
#: Why 4 and 64, measured (docs/performance.md): the bench traffic in
#: 20-event commits wrote 17.8 bytes of bucket fields per event with no
#: compaction (one bucket's log grew to 4,229 records), 21.9 with 4 / 64,
#: 30.7 with 2 / 16 (a factor f rewrites about 2N / (f - 1) records over a
#: bucket of N entries as it drains); a log of 4x its entries is still about
#: a sorted set's memory (a record ~25 bytes, a member ~70).
COMPACT_FACTOR = 4
COMPACT_SLACK = 64


@dataclass
class PendingIndex:
    """The meta field of the bucket layout (module docstring)."""

    w: int
    n: int
    min: int | None
    starts: list[int]

    @staticmethod
    def parse(raw: Any) -> PendingIndex | None:
        """The index from its meta value; None: the sorted-set layout."""
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        w, n, lo, *starts = text.split()
        return PendingIndex(int(w), int(n), None if lo == "-" else int(lo),
                            sorted(map(int, starts)))

    def text(self) -> str:
        lo = "-" if self.min is None else str(self.min)
        return " ".join([str(self.w), str(self.n), lo, *map(str, sorted(self.starts))])


def bucket_of(score: int, w: int) -> int:
    """The start of the bucket that holds ``score``."""
    return score - score % w


def bucket_keys(experiment_id: str, src: str, idx: PendingIndex | None) -> list[str]:
    """The bucket keys ``idx`` lists (none for the sorted-set layout)."""
    return [] if idx is None else [rk.pending_bucket_key(experiment_id, src, a)
                                   for a in idx.starts]


def replay(fields: dict, out: dict[str, int]) -> int:
    """Apply one bucket's log (its HGETALL: ``+<seq>``/``-<seq>`` fields) to
    ``out`` (unit id -> score): in sequence order, ``-`` before ``+``.
    Returns the log's records (entries and unit ids: what ``COMPACT_FACTOR``
    bounds), so that an owner loading the bucket knows when to compact it."""
    log = []
    for f, v in fields.items():
        name = f.decode() if isinstance(f, bytes) else f
        log.append((int(name[1:]), name[0] == "+", v))
    log.sort(key=lambda x: (x[0], x[1]))
    records = 0
    for _, add, v in log:
        xs = orjson.loads(v)
        records += len(xs)
        if add:
            out.update(xs)
        else:
            for u in xs:
                out.pop(u, None)
    return records


def compact_at(live: int) -> int:
    """The most records a bucket's log with ``live`` entries may hold (see
    ``COMPACT_FACTOR``)."""
    return COMPACT_FACTOR * live + COMPACT_SLACK


def read_entries(r: Any, experiment_id: str, src: str, idx: PendingIndex | None
                 ) -> dict[str, int]:
    """Every pending entry (unit id -> score) of ``src`` in either layout,
    in one round trip."""
    p = r.pipeline(transaction=False)
    if idx is None:
        p.zrange(rk.pending_key(experiment_id, src), 0, -1, withscores=True)
    for key in bucket_keys(experiment_id, src, idx):
        p.hgetall(key)
    got = p.execute()
    out: dict[str, int] = {}
    if idx is None:
        for m, sc in got[0]:
            out[m.decode() if isinstance(m, bytes) else m] = int(sc)
        return out
    for h in got:
        replay(h, out)
    return out


def in_order(entries: dict[str, int]) -> list[tuple[str, int]]:
    """(unit id, score) in the rules' order: score, then unit id bytes."""
    return [(u, s) for s, _, u in sorted((s, u.encode("utf-8"), u)
                                          for u, s in entries.items())]


def due(entries: Iterable[tuple[str, int]], T: int, limit: int
        ) -> list[tuple[str, int]]:
    """The first ``limit`` entries with score <= ``T`` in the rules' order
    (what ``ZRANGE BYSCORE -inf T LIMIT 0 limit`` answers)."""
    xs = sorted((s, u.encode("utf-8"), u) for u, s in entries if s <= T)
    return [(u, s) for s, _, u in xs[:limit]]


def pending_bucket_keys(r: Any, experiment_id: str, sources: Sequence[str]) -> list[str]:
    """Every pending bucket key of ``sources`` (what conclusion deletes with
    the sorted sets), from their indexes in meta."""
    if not sources:
        return []
    raw = r.hmget(rk.meta_key(experiment_id), [rk.pending_index_field(s) for s in sources])
    return [k for src, x in zip(sources, raw, strict=True)
            for k in bucket_keys(experiment_id, src, PendingIndex.parse(x))]
