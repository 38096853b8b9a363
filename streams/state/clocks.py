"""Partition clocks beyond the events themselves (docs/architecture.md#state): the completeness
watermark, and the idle advance of caught-up partitions.

* **Completeness** = min over every partition of the events topic of its
  clock, ignoring partitions with no backlog (the consumer's applied offset is
  at the high watermark): KIP-695's rule. A partition with a backlog and no
  clock yet (never read) makes it unknown. Published at
  ``streams.state.keys.completeness_key(topic)``; an estimate's ``watermark.event_time`` and
  the arrival block's D come from it (minus the experiment's lateness).
* **Idle advance**: a partition that is caught up and whose clock has not
  moved for ``idle_seconds`` of wall time advances its clock to the wall
  clock, so the last units of a finished experiment mature. For a backfill
  into a live topic this means: once the partition went idle, backfilled
  events are judged against the wall clock (their metrics correct matured
  cells within ``correction_seconds``, later ones are ``late``; exposures
  older than that are ``exposure_too_old``), so backfill with the worker
  behind, or with ``correction_seconds`` covering the backfill's age.

The pure rules are ``completeness`` and ``IdleTracker``; ``ClockService`` does
the I/O for the ingest worker (``streams.service.app``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.state.keys import INGEST_OFFSETS, PARTITION_CLOCKS, completeness_key
from streams.state.store import advance_partition, offsets_field

log = logging.getLogger("liftstream.clocks")


def completeness(clocks: dict[int, int | None], applied: dict[int, int],
                 high: dict[int, int]) -> int | None:
    """KIP-695's rule over the partitions in ``high`` (every partition of the
    topic): min of the clocks of those with a backlog (``applied + 1 <
    high``); None if such a partition has no clock. With no backlog anywhere,
    min over the partitions that have a clock (None if none has)."""
    backlog = [p for p, h in high.items() if applied.get(p, -1) + 1 < h]
    if backlog:
        vals = [clocks.get(p) for p in backlog]
        return None if any(v is None for v in vals) else min(vals)
    vals = [v for v in clocks.values() if v is not None]
    return min(vals) if vals else None


@dataclass
class IdleTracker:
    """Which caught-up partitions have had a still clock for ``idle_ms``."""

    idle_ms: int
    since: dict[int, tuple[int | None, int]] = field(default_factory=dict)  # p -> (clock, ms)

    def idle(self, p: int, clock: int | None, caught_up: bool, now_ms: int) -> bool:
        prev = self.since.get(p)
        if prev is None or prev[0] != clock or not caught_up:
            self.since[p] = (clock, now_ms)
            return False
        return now_ms - prev[1] >= self.idle_ms


class ClockService:
    """One tick (``tick``): read offsets, clocks and high watermarks, publish
    completeness, advance the idle partitions among ``owned``."""

    def __init__(self, r: Any, topic: str, idle_seconds: float, configs: Callable[[], Iterable],
                 hold_seconds: int = 86_400,
                 on_count: Callable[[Mapping[str, int]], None] | None = None):
        """``on_count``: gets the counts of an advance by outcome (held
        metrics of never-exposed units that expired: ``unrouted_expired``),
        the ones a batch's expiry reports in ``BatchResult.counts``; the
        worker adds them to ``liftstream_events_total``."""
        self.r, self.topic = r, topic
        self.idle = IdleTracker(int(idle_seconds * 1000))
        self.configs = configs
        self.hold_seconds = hold_seconds
        self.on_count = on_count

    def _read(self, field_map: str) -> dict[int, int]:
        out = {}
        for k, v in self.r.hgetall(field_map).items():
            t, _, p = (k.decode() if isinstance(k, bytes) else k).rpartition("|")
            if t == self.topic:
                out[int(p)] = int(v)
        return out

    def tick(self, high: dict[int, int], owned: Mapping[int, int | None], now_ms: int
             ) -> int | None:
        """``owned``: the partitions this worker owns -> its owner epoch
        (``streams.state.store.claim_partition``; None: not fenced)."""
        applied = self._read(INGEST_OFFSETS)
        clocks: dict[int, int | None] = dict(self._read(PARTITION_CLOCKS))
        for p in sorted(owned):
            caught_up = applied.get(p, -1) + 1 >= high.get(p, 0)
            if self.idle.idle(p, clocks.get(p), caught_up, now_ms) and clocks.get(p) is not None \
                    and clocks[p] < now_ms:
                rejected: list[tuple[int | None, str]] = []
                clocks[p] = advance_partition(self.r, list(self.configs()), self.topic, p,
                                              now_ms, self.hold_seconds, owned[p], rejected)
                self.idle.since[p] = (clocks[p], now_ms)
                if rejected and self.on_count is not None:
                    self.on_count(Counter(why for _, why in rejected))
        c = completeness({p: clocks.get(p) for p in high}, applied, high)
        if c is None:
            self.r.delete(completeness_key(self.topic))
        else:
            self.r.set(completeness_key(self.topic), c)
        return c


__all__ = ["ClockService", "IdleTracker", "completeness", "offsets_field"]
