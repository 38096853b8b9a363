"""Catch-up on partition assignment: refill a Redis that lost its last writes.

DESIGN §5: Kafka's committed offset is only a hint. Redis with AOF
``everysec`` can lose up to a second of writes in a crash while the ingest
group has already committed the offsets of those events; a restarted worker
would resume *after* them and they would be lost.

Faust cannot seek back on assignment (docs/embedded-broker.md, "Faust and
seeking on assignment": its recovery seeks every partition to the committed
offset after our handlers ran). So on assignment, *before* Faust resumes the
paused partitions, ``catch_up`` compares for every assigned events partition

* ``applied`` = the last offset Redis says was fully applied
  (``lr:ingest:offsets``, written by ``Ingestor.process`` after each batch), and
* ``committed`` = the ingest group's committed offset (the next one Faust will
  read),

and when ``applied + 1 < committed`` reads ``[applied + 1, committed)`` with its
own confluent-kafka consumer (explicit ``assign``, no group membership, no
commits) and applies it through the same ``Ingestor.process``. Overlaps are
harmless: the per-experiment, per-partition offset watermark in the Lua script
skips what Redis still has. After that Faust resumes at ``committed`` as usual.

Used by ``streams.app`` (ingest role, ``app.on_partitions_assigned`` signal,
whose async receivers Faust awaits while the partitions are still paused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from streams.ingest import BatchResult, Ingestor, ingest_offsets

log = logging.getLogger("liftstream.catchup")

OFFSET_INVALID = -1001  # librdkafka: no committed offset


@dataclass
class CatchUpReport:
    """What one catch-up did, per partition: the replayed range and counts."""

    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # p -> [start, end)
    messages: int = 0
    seconds: float = 0.0
    result: BatchResult = field(default_factory=BatchResult)


def plan(applied: dict[int, int], committed: dict[int, int],
         low: dict[int, int] | None = None) -> dict[int, tuple[int, int]]:
    """Ranges ``[start, end)`` to replay per partition: where Redis's applied
    offset is behind the committed one. ``low`` (log start offsets) clips a
    start that retention already deleted."""
    out = {}
    for p, end in committed.items():
        if end is None or end < 0:
            continue  # nothing committed: Faust starts at the earliest anyway
        start = applied.get(p, -1) + 1
        if low and p in low and low[p] > start:
            start = low[p]
        if start < end:
            out[p] = (start, end)
    return out


def committed_offsets(conf: dict[str, Any], group: str, topic: str,
                      partitions: Iterable[int], timeout: float = 10.0) -> dict[int, int]:
    """The group's committed offsets (the next offset to read; -1: none)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**conf, "group.id": group, "enable.auto.commit": False})
    try:
        got = c.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
        return {tp.partition: (tp.offset if tp.offset >= 0 else -1) for tp in got}
    finally:
        c.close()


def catch_up(r: Any, ingestor: Ingestor, conf: dict[str, Any], group: str, topic: str,
             partitions: Iterable[int], batch_size: int = 500, timeout: float = 60.0,
             now_ms: Callable[[], int] | None = None) -> CatchUpReport:
    """Replay what Redis lacks below the group's committed offsets (see the
    module docstring). Blocking; raises on Kafka errors or when the range
    cannot be read within ``timeout`` (the caller must then not resume)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    t0 = time.monotonic()
    rep = CatchUpReport()
    partitions = sorted(set(partitions))
    if not partitions:
        return rep
    committed = committed_offsets(conf, group, topic, partitions)
    applied = ingest_offsets(r, topic)
    todo = plan(applied, committed)
    if not todo:
        rep.seconds = time.monotonic() - t0
        return rep
    c = Consumer({**conf, "group.id": f"{group}-catchup-unused", "enable.auto.commit": False,
                  "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
                  "enable.partition.eof": False})
    try:
        low = {}
        for p in todo:
            lo, _hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            low[p] = lo
        todo = plan(applied, committed, low)
        rep.ranges = dict(todo)
        if not todo:
            return rep
        log.warning("redis is behind the committed offsets of %s: replaying %s", topic,
                    {p: f"[{a}, {b})" for p, a_b in todo.items() for a, b in [a_b]})
        c.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
        pending: dict[int, list[tuple[int, bytes | None]]] = {p: [] for p in todo}
        left = set(todo)
        deadline = time.monotonic() + timeout
        clock = now_ms or (lambda: int(time.time() * 1000))

        def flush(p: int) -> None:
            msgs = pending[p]
            if not msgs:
                return
            res = ingestor.process(topic, p, msgs, clock())
            rep.messages += len(msgs)
            rep.result.dead_letters.extend(res.dead_letters)
            rep.result.touched |= res.touched
            rep.result.counts.update(res.counts)
            rep.result.new_experiments.extend(res.new_experiments)
            pending[p] = []

        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"catch-up of {topic} {sorted(left)} not done after "
                                   f"{timeout:.0f}s")
            for m in c.consume(batch_size, 0.5):
                if m.error() is not None:
                    raise KafkaException(m.error())
                p, off = m.partition(), m.offset()
                if p in left and off < todo[p][1]:
                    pending[p].append((off, m.value()))
                    if len(pending[p]) >= batch_size:
                        flush(p)
            # done when the fetch position reached the end (robust to offset
            # gaps such as transaction markers)
            for tp in c.position([TopicPartition(topic, p) for p in sorted(left)]):
                if tp.offset >= todo[tp.partition][1]:
                    flush(tp.partition)
                    left.discard(tp.partition)
                    c.pause([TopicPartition(topic, tp.partition)])
        return rep
    finally:
        c.close()
        rep.seconds = time.monotonic() - t0
        if rep.ranges:
            log.warning("catch-up of %s: %d messages replayed in %.2fs (%s)", topic,
                        rep.messages, rep.seconds, dict(rep.result.counts))
