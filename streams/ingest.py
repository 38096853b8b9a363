"""Ingest: one micro-batch of raw messages from one source partition → Redis.

Synchronous and free of Kafka: the Faust agent (``streams.app``) hands each
batch here on a worker thread and acks only after ``process`` returned, so an
event is acked (and its offset committed) only once it is applied. Order:

1. validate every message (``schemas.validate``); failures become dead-letter
   records with reason and source position;
2. look up configs (Redis registry); unknown experiments are auto-registered
   when configured, else dead-lettered with ``unknown_experiment``; exposures
   with a variant the config lacks get a dead-letter record ``unknown_variant``
   (so operators see the mismatch) *and* go on to the experiment, where they
   count as ``unknown_variant`` and move its event-time clock and dedupe
   sightings exactly as in the reference semantics (``streams.semantics``), so
   the streaming state stays equal to ``liftstream analyze`` on the same events;
3. route (unit index) and apply per experiment with one Lua call each
   (``streams.state``): idempotent per source offset, so a replay of the
   batch after a crash applies nothing twice;
4. record the partition's ingest watermark (the last offset fully applied);
   when Redis is behind Kafka's committed offset (it lost its last writes), a
   worker that gets the partition assigned replays the gap first
   (``streams.catchup``), so Kafka's commit is only a hint.

Returns the dead-letter records to publish, the experiments touched (their
dirty notices) and counts. Publishing happens in the agent, before the ack.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from schemas.contracts import dead_letter_record
from schemas.records import ExperimentConfig
from schemas.validate import InvalidRecord, parse_event_row
from streams.registry import Registry
from streams.state import apply_rows, route_rows

INGEST_OFFSETS = "lr:ingest:offsets"  # hash "<topic>|<partition>" -> last fully applied offset

_NOT_COUNTED = frozenset(("offset", "max_ts", "watermark", "dirty_seq"))


@dataclass
class BatchResult:
    dead_letters: list[dict] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    new_experiments: list[ExperimentConfig] = field(default_factory=list)


class Ingestor:
    def __init__(self, r: Any, registry: Registry, auto_register: bool = False):
        self.r = r
        self.registry = registry
        self.auto_register = auto_register

    def process(self, topic: str, partition: int, messages: list[tuple[int, bytes | None]],
                now_ms: int) -> BatchResult:
        res = BatchResult()
        res.counts["received"] += len(messages)
        # Events travel as rows (see streams.state), not dataclasses: validation
        # is the same as parse_event's, reasons and messages included.
        rows: list[tuple] = []
        append = rows.append
        for off, raw in messages:
            try:
                if raw is None:
                    raise InvalidRecord("not_json", "tombstone (null value) on the events topic")
                append(parse_event_row(raw, off, now_ms=now_ms))
            except InvalidRecord as err:
                self._dead(res, raw, err, topic, partition, off, now_ms)

        ids = {row[3] for row in rows}
        ids.discard(None)
        known = self.registry.get_many(ids)
        if len(known) < len(ids) and self.auto_register:
            exposed = {row[3] for row in rows if row[1] == "x"}
            for eid in sorted(ids - known.keys()):
                if eid in exposed:
                    cfg = ExperimentConfig(experiment_id=eid)
                    self.registry.put(cfg)
                    known[eid] = cfg
                    res.new_experiments.append(cfg)

        accepted = rows
        unknown = ids - known.keys()
        if unknown or any(row[1] == "x" and row[5] not in known[row[3]].variants
                          for row in rows):
            raw_of = dict(messages)
            accepted = []
            for row in rows:
                eid = row[3]
                if eid in unknown:
                    err = InvalidRecord("unknown_experiment",
                                        f"experiment {eid!r} is not registered "
                                        "(create it on the experiments topic first)",
                                        "experiment_id")
                    self._dead(res, raw_of[row[0]], err, topic, partition, row[0], now_ms)
                    continue
                if row[1] == "x" and row[5] not in known[eid].variants:
                    cfg = known[eid]
                    err = InvalidRecord("unknown_variant",
                                        f"variant {row[5]!r} is not one of experiment "
                                        f"{cfg.experiment_id!r}'s {list(cfg.variants)}",
                                        "variant")
                    self._dead(res, raw_of[row[0]], err, topic, partition, row[0], now_ms)
                accepted.append(row)  # unknown variants still applied: counted, clock, dedupe

        # metrics without experiment_id may belong to any registered experiment
        if any(row[3] is None for row in accepted):
            known.update(self.registry.get_many(self.registry.ids()))
        rejected: list[tuple[int, str]] = []
        routed = route_rows(self.r, accepted, known, topic, partition, rejected)
        for _, why in rejected:
            res.counts[why] += 1
        for eid, idx in routed.items():
            part = accepted if len(idx) == len(accepted) else [accepted[i] for i in idx]
            out = apply_rows(self.r, known[eid], topic, partition, part)
            res.touched.add(eid)
            for k, v in out.items():
                if isinstance(v, int) and k not in _NOT_COUNTED:
                    res.counts[k] += v
        if messages:
            self.r.hset(INGEST_OFFSETS, f"{topic}|{partition}", max(o for o, _ in messages))
        return res

    @staticmethod
    def _dead(res: BatchResult, raw, err: InvalidRecord, topic, partition, off, now_ms) -> None:
        res.dead_letters.append(dead_letter_record(raw, err, topic, partition, off, now_ms))
        res.counts[f"dead_letter:{err.code}"] += 1


def ingest_offsets(r: Any, topic: str) -> dict[int, int]:
    """Last fully applied offset per partition of ``topic``, as Redis knows it."""
    out = {}
    for k, v in r.hgetall(INGEST_OFFSETS).items():
        t, _, p = (k.decode() if isinstance(k, bytes) else k).rpartition("|")
        if t == topic:
            out[int(p)] = int(v)
    return out
