"""Ingest: one micro-batch of raw messages from one source partition → Redis.

Synchronous and free of Kafka: the Faust agent (``streams.service.app``) hands each
batch here on a worker thread and acks only after ``process`` returned, so an
event is acked (and its offset committed) only once it is applied. Order:

1. validate every message (``schemas.validate``); failures become dead-letter
   records with reason and source position;
2. look up configs (Redis registry, cached: read again for an experiment
   whose generation, read with the batch's first reads, is not the cached
   config's: deleted, or deleted and re-created); unknown experiments are auto-registered
   when configured, else dead-lettered with ``unknown_experiment``; exposures
   with a variant the config lacks get a dead-letter record ``unknown_variant``
   (so operators see the mismatch) *and* go on to the experiment, where they
   count as ``unknown_variant`` and move its event-time clock and dedupe
   sightings exactly as in the reference semantics (``streams.state.semantics``), so
   the streaming state stays equal to ``liftstream analyze`` on the same events;
3. route (unit index) and apply per experiment: the rules run here, one
   fenced MULTI/EXEC commit each (``streams.state.partition_store``)
   (``streams.state.store``): idempotent per source offset, so a replay of the
   batch after a crash applies nothing twice;
4. record the partition's ingest watermark (the last offset fully applied);
   a worker that gets the partition assigned starts after it
   (``streams.ingest.events_plane``), so Kafka's commit is only a hint and a Redis
   that lost its last writes is refilled from Kafka.

Returns the dead-letter records to publish, the experiments touched (their
dirty notices) and counts. Publishing happens in the agent, before the ack.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from schemas.contracts import dead_letter_record
from schemas.records import ExperimentConfig
from schemas.validate import DEFAULT_MAX_FUTURE_MS, ID_PATTERN, InvalidRecord, parse_event_row
from streams.state.keys import INGEST_OFFSETS
from streams.state.partition_store import ExperimentChanged, forget_owner
from streams.state.registry import Registry
from streams.state.store import (
    apply_source_batch,
    clocked_batch,
    due_to_settle,
    index_ttl_ms,
    offsets_field,
    partition_start,
    record_position,
    settle,
    too_old_margin,
)

log = logging.getLogger("liftstream.ingest")

_ID = re.compile(ID_PATTERN)

#: call result fields that are no event counts: positions, and ``held``, a net
#: change that can be negative (per-experiment gauges show it: streams.service.metrics)
_NOT_COUNTED = frozenset(("offset", "max_ts", "more", "dirty_seq", "held"))


@dataclass
class BatchResult:
    dead_letters: list[dict] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    new_experiments: list[ExperimentConfig] = field(default_factory=list)


class Ingestor:
    """Applies micro-batches of one source partition (see the module docstring).

    ``hold_seconds``/``hold_max`` bound the unit-level holds of metrics without
    experiment_id; ``settle_every_ms`` how often (wall time, per partition)
    the experiments without events in a batch are matured on its clock."""

    def __init__(self, r: Any, registry: Registry, auto_register: bool = False,
                 hold_seconds: int = 86_400, hold_max: int = 64,
                 settle_every_ms: int = 1000, max_future_ms: int = DEFAULT_MAX_FUTURE_MS):
        self.max_future_ms = max_future_ms
        self.r = r
        self.registry = registry
        self.auto_register = auto_register
        self.hold_seconds = hold_seconds
        self.hold_max = hold_max
        self.settle_every_ms = settle_every_ms
        self._settled: dict[str, tuple[int, int]] = {}  # source -> (wall ms, clock)
        self._index_ttl: tuple[float, int] | None = None  # (read at, ms): ``index_ttl``

    def process(self, topic: str, partition: int, messages: list[tuple[int, bytes | None]],
                now_ms: int, epoch: int | None = None,
                keys: Sequence[bytes | None] | None = None) -> BatchResult:
        """Apply ``messages`` (offset, value) of one source partition, in offset
        order. ``epoch``: the caller's owner epoch of the partition; every
        state write carries it and raises ``streams.state.store.Fenced`` once a
        newer owner claimed the partition (nothing of this batch after that
        write is applied). ``keys``: the messages' Kafka keys, in the same
        order; an event whose key is not its unit_id is dead-lettered
        ``key_mismatch`` (a unit's state belongs to one partition: the one its
        key picks). None: not checked (callers without Kafka)."""
        res = BatchResult()
        res.counts["received"] += len(messages)
        #: (experiment_id, offset, meta field) of dead letters that name an experiment
        attributed: list[tuple[str, int, str]] = []
        # Events travel as rows (see streams.state.store), not dataclasses: validation
        # is the same as parse_event's, reasons and messages included.
        rows: list[tuple] = []
        append, max_future_ms, parse = rows.append, self.max_future_ms, parse_event_row
        # zip, and parse_event_row's arguments by position: ~0.3k instructions
        # per event less than enumerate, keys[i] and keywords (callgrind)
        check = keys is not None
        for (off, raw), key in zip(messages, keys if check else [None] * len(messages),
                                   strict=True):
            try:
                if raw is None:
                    raise InvalidRecord("not_json", "tombstone (null value) on the events topic")
                row = parse(raw, off, now_ms, max_future_ms)
                if check and key != row[4].encode():
                    raise _key_mismatch(key, row[4])
                append(row)
            except InvalidRecord as bad:
                self._dead(res, raw, bad, topic, partition, off, now_ms, attributed, key=key)

        ids = set(map(itemgetter(3), rows))
        ids.discard(None)
        known = self.registry.get_many(ids)
        exposed_units = list(dict.fromkeys(row[4] for row in rows if row[1] == "x"))
        clk_start, holds, gens, index_view = partition_start(
            self.r, topic, partition, known, exposed_units,
            self.index_ttl(known) if exposed_units else None)
        try:
            known = self._current(known, gens)
            if len(known) < len(ids) and self.auto_register:
                exposed = {row[3] for row in rows if row[1] == "x"}
                for eid in sorted(ids - known.keys()):
                    if eid in exposed:
                        cfg = self.registry.put(ExperimentConfig(experiment_id=eid), now_ms)
                        known[eid] = cfg
                        res.new_experiments.append(cfg)

            raw_of: dict[int, bytes | None] = {}

            def raw_at(off: int) -> bytes | None:
                """A message's value by offset (the dict only once a dead letter needs it)."""
                if not raw_of:
                    raw_of.update(messages)
                return raw_of[off]

            unknown = ids - known.keys()
            # the partition clock after each event (dead letters move none): crows
            # are ``rows`` without those of unknown experiments, in order, each
            # with the clock after it at index 9
            crows, clk0 = clocked_batch(self.r, known, topic, partition, rows, clock=clk_start)
            margins = {eid: too_old_margin(cfg) for eid, cfg in known.items()}
            concluded = {eid for eid in known if self.registry.concluded(eid)}
            ended: set[int] = set()  # offsets of exposures to concluded experiments

            def exposure(row: tuple, clk: int) -> bool:
                """Dead-letter an exposure the rules refuse (clock ``clk`` after
                it); False: it is not applied (a concluded experiment's)."""
                eid = row[3]
                cfg = known[eid]
                if eid in concluded:
                    err = InvalidRecord(
                        "after_end", f"experiment {eid!r} is concluded: its final estimates "
                        "are out and its units are no longer kept", "experiment_id")
                    self._dead(res, raw_at(row[0]), err, topic, partition, row[0], now_ms,
                               attributed)  # counted c:after_end in its commit
                    ended.add(row[0])  # not applied: it would create a unit record again
                    return False
                if row[5] not in cfg.variants:
                    err = InvalidRecord("unknown_variant",
                                        f"variant {row[5]!r} is not one of experiment "
                                        f"{cfg.experiment_id!r}'s {list(cfg.variants)}",
                                        "variant")
                    self._dead(res, raw_at(row[0]), err, topic, partition, row[0], now_ms)
                elif row[6] + margins[eid] <= clk:  # too_old (streams.state.store)
                    err = InvalidRecord(
                        "exposure_too_old",
                        f"exposure at ts {row[6]}: its window closed more than "
                        f"correction_seconds ({cfg.correction_seconds}) before the "
                        f"partition clock {clk} minus lateness", "ts")
                    self._dead(res, raw_at(row[0]), err, topic, partition, row[0], now_ms)
                # unknown variants and too-old exposures still go to the experiment,
                # which counts them (exactly once) as in streams.state.semantics; it
                # decides too_old by the same test before any other rule (dedupe
                # included), so the dead letter and data_quality's too_old agree
                return True

            accepted: list[tuple]
            if unknown:
                accepted = []
                j = 0  # rows[i]'s clocked row is crows[j] (rows of unknown experiments have none)
                for row in rows:
                    eid = row[3]
                    if eid in unknown:
                        err = InvalidRecord("unknown_experiment",
                                            f"experiment {eid!r} is not registered "
                                            "(create it on the experiments topic first)",
                                            "experiment_id")
                        self._dead(res, raw_at(row[0]), err, topic, partition, row[0], now_ms)
                        continue
                    clk = crows[j][9]
                    j += 1
                    if row[1] != "x" or exposure(row, clk):
                        accepted.append(row)
            else:
                # Why a path of its own: every row is clocked (crows[i] is rows[i]
                # with its clock), so only exposures are looked at, and the rows
                # are kept as they are unless a concluded experiment's ended
                # (no row copied; with ``store.clocked``'s and
                # ``route_rows``' own: 71.0k -> 68.0k instr/event, bench batches)
                for crow in crows:
                    if crow[1] == "x":
                        exposure(crow, crow[9])
                accepted = [row for row in rows if row[0] not in ended] if ended else rows

            # metrics without experiment_id may belong to any registered experiment
            if any(row[3] is None for row in accepted):
                known.update(self.registry.get_many(self.registry.ids()))
            dead = self._dead_by_experiment(attributed, known)
            if ended:  # they moved the clock (events of a registered experiment), nothing else
                crows = [crow for crow in crows if crow[0] not in ended]
            rejected: list[tuple[int | None, str]] = []
            try:
                out, clk = apply_source_batch(self.r, known, topic, partition, accepted,
                                              self.hold_seconds, self.hold_max, rejected,
                                              clocked_rows=(crows, clk0),  # accepted = crows' rows
                                              epoch=epoch, dead=dead,
                                              index_ttl=self.index_ttl(known), holds=holds,
                                              index_view=index_view, generations={
                                                  e: self.registry.generation(e) for e in known})
            except ExperimentChanged as e:
                # concluded (or deleted, re-created) since the registry read it:
                # read it again, so the caller's retry dead-letters its exposures
                # (after_end, unknown_experiment) or applies them to the new
                # experiment; the owner wrote nothing of this experiment
                self.registry.get(e.experiment_id, fresh=True)
                raise
        finally:
            # the routing index's WATCH of its bucket, when no merge ended it
            # (``unit_index.Watch``: held since ``partition_start``)
            if index_view.watch is not None:
                index_view.watch.release()
        for _, why in rejected:
            res.counts[why] += 1
        for eid, delta in out.items():
            res.touched.add(eid)
            for k, v in delta.items():
                if isinstance(v, int) and k not in _NOT_COUNTED:
                    res.counts[k] += v
        if messages and len(accepted) < len(messages):
            # dead letters are read too: the offset covers them
            record_position(self.r, topic, partition, max(o for o, _ in messages), None, epoch)
        if clk is not None:
            res.touched |= self.settle_quiet(topic, partition, clk, now_ms, skip=out.keys(),
                                             epoch=epoch)
        return res

    def _current(self, known: dict[str, ExperimentConfig], gens: dict[str, bytes | None]
                 ) -> dict[str, ExperimentConfig]:
        """``known`` as the registry says now: the configs whose cached
        generation is not the one the batch read (``partition_start``; the
        registry caches configs for ``ttl`` seconds, so a delete or a delete
        and re-create by another process is not seen before) read again.
        Why before routing and applying: a config of a deleted experiment
        would route its exposures (routing markers) and have the owner write
        a new state for it (its events are dead letters
        ``unknown_experiment`` instead), a re-created one's old config would
        run its rules on the new experiment. A change after this read is the
        owner's to catch (``apply_rows``'s ``generation``)."""
        changed = [e for e, g in gens.items() if g != self.registry.generation(e)]
        if not changed:
            return known
        log.info("experiments changed since the registry read them: %s", changed)
        now = self.registry.get_many(changed, fresh=True)
        return {e: now[e] if e in changed else c for e, c in known.items()
                if e not in changed or e in now}

    def index_ttl(self, known: dict[str, ExperimentConfig]) -> int:
        """The routing index's TTL (``store.index_ttl_ms``) over every
        experiment not concluded: the registry's, read again every
        ``registry.ttl`` seconds, and the batch's ``known`` (one registered
        since raises it until then).

        Why all of them and not the batch's: every exposure then goes into
        a bucket of the same TTL while they are unchanged
        (``streams.state.unit_index``), so a unit's entry of a longer
        experiment lives as long whatever batch renews it (issue 24 defect
        4), with no read of a TTL first (route.lua's reason to exist). It shrinks
        only when the longest one concludes or is deleted: a concluded
        experiment's windows and correction horizons have all passed
        (``SamplerService.conclude_due``), so no estimate needs its units'
        routing any more, and a delete removes its fields from the index."""
        now = time.monotonic()
        if self._index_ttl is None or now - self._index_ttl[0] >= self.registry.ttl:
            every = self.registry.get_many(self.registry.ids())
            self._index_ttl = (now, index_ttl_ms(self._running(every)))
        ttl = max(self._index_ttl[1], index_ttl_ms(self._running(known)))
        self._index_ttl = (self._index_ttl[0], ttl)
        return ttl

    def _running(self, cfgs: dict[str, ExperimentConfig]) -> list[ExperimentConfig]:
        """The configs of ``cfgs`` not concluded (as the registry last read them)."""
        return [c for e, c in cfgs.items() if not self.registry.concluded(e)]

    def settle_quiet(self, topic: str, partition: int, clk: int, now_ms: int,
                     skip: Iterable[str] = (), epoch: int | None = None) -> set[str]:
        """Mature the experiments that had no events in this source's batch on
        its clock (a quiet experiment on a busy partition), at most every
        ``settle_every_ms`` of wall time per partition and only when the clock
        moved. Returns the experiments whose state changed."""
        f = offsets_field(topic, partition)
        last = self._settled.get(f)
        if last is not None and (now_ms - last[0] < self.settle_every_ms or clk <= last[1]):
            return set()
        self._settled[f] = (now_ms, clk)
        skip = set(skip)
        cfgs = [cfg for eid, cfg in sorted(self.registry.get_many(self.registry.ids()).items())
                if eid not in skip]
        changed = set()
        for cfg in due_to_settle(self.r, cfgs, topic, partition, clk):
            eid = cfg.experiment_id
            try:
                if settle(self.r, cfg, topic, partition, clk, epoch=epoch,
                          generation=self.registry.generation(eid)):
                    changed.add(eid)
            except ExperimentChanged:  # deleted or re-created: the next settle, as it is now
                self.registry.get(eid, fresh=True)
        return changed

    def forget(self, topic: str, partition: int) -> None:
        """Forget what this worker remembers of a partition's applied state
        (when Redis turned out to have lost it: the batches are applied again)."""
        self._settled.pop(offsets_field(topic, partition), None)
        forget_owner(self.r, topic, partition)

    def _dead(self, res: BatchResult, raw, err: InvalidRecord, topic, partition, off,
              now_ms, attributed: list[tuple[str, int, str]] | None = None,
              key: bytes | None = None) -> None:
        """A dead-letter record, counted; ``attributed`` gets (experiment_id,
        offset, meta field) when the event names an experiment and the reason
        is no experiment counter (``_COUNTED_BY_EXPERIMENT``): ``c:<reason>``
        for ``_COUNTED_HERE``, else ``dl:<reason>``. ``key``: the message's
        Kafka key, kept in the record (``key_b64``) for ``key_mismatch``."""
        res.dead_letters.append(dead_letter_record(raw, err, topic, partition, off, now_ms,
                                                   key=key))
        res.counts[f"dead_letter:{err.code}"] += 1
        if attributed is None or err.code in _COUNTED_BY_EXPERIMENT:
            return
        eid = _experiment_of(raw)
        if eid is not None:
            field_ = f"c:{err.code}" if err.code in _COUNTED_HERE else f"dl:{err.code}"
            attributed.append((eid, off, field_))

    def _dead_by_experiment(self, attributed: list[tuple[str, int, str]],
                            known: dict[str, ExperimentConfig]
                            ) -> dict[str, list[tuple[int, str]]]:
        """The dead letters of registered experiments, per experiment, as
        (offset, meta field) for data_quality: counted in the experiment's own
        ingest call, under its applied-offset skip, so a retried ``process``
        counts none twice (issue 24). The ids not in ``known`` are looked up
        with one ``Registry.get_many`` for the batch (one MGET at most, none
        for cached ids: defect 8); adds the configs found to ``known``."""
        if not attributed:
            return {}
        missing = {eid for eid, _, _ in attributed} - known.keys()
        if missing:
            known.update(self.registry.get_many(missing))
        dead: dict[str, list[tuple[int, str]]] = {}
        for eid, off, field_ in attributed:
            if eid in known:
                dead.setdefault(eid, []).append((off, field_))
        return dead


def _key_mismatch(key: bytes | None, unit_id: str) -> InvalidRecord:
    """The dead-letter reason of an event whose Kafka key is not its unit_id."""
    shown = "none" if key is None else repr(key[:80])
    return InvalidRecord("key_mismatch",
                         f"the message key ({shown}) is not the event's unit_id {unit_id!r}: "
                         "events must be keyed by unit_id, so that all of a unit's events "
                         "are on one partition", "unit_id")


#: dead-letter reasons whose events also reach the experiment's counters
_COUNTED_BY_EXPERIMENT = frozenset(("unknown_variant", "exposure_too_old"))

#: dead-letter reasons of events that reach no experiment state but are
#: counted under the experiment's counter of the same name (so data_quality
#: counts them once), in the experiment's commit like the others:
#: exposures to a concluded experiment
_COUNTED_HERE = frozenset(("after_end",))


def _experiment_of(raw: bytes | None) -> str | None:
    """The experiment_id of an invalid event, if it has a plausible one."""
    if not raw:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    eid = obj.get("experiment_id") if isinstance(obj, dict) else None
    if isinstance(eid, str) and _ID.fullmatch(eid):
        return eid
    return None


def ingest_offsets(r: Any, topic: str) -> dict[int, int]:
    """Last fully applied offset per partition of ``topic``, as Redis knows it."""
    out = {}
    for k, v in r.hgetall(INGEST_OFFSETS).items():
        t, _, p = (k.decode() if isinstance(k, bytes) else k).rpartition("|")
        if t == topic:
            out[int(p)] = int(v)
    return out


def read_applied(r: Any, topic: str, partitions: Sequence[int]) -> dict[int, int]:
    """Last fully applied offset of each of ``partitions`` (-1: none), as
    Redis knows it: one HMGET, cheap enough to run before every batch."""
    if not partitions:
        return {}
    vals = r.hmget(INGEST_OFFSETS, [offsets_field(topic, p) for p in partitions])
    return {p: -1 if v is None else int(v) for p, v in zip(partitions, vals, strict=True)}
