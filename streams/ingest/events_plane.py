"""The events data plane: a confluent-kafka consumer feeding ``Ingestor``.

docs/architecture.md#data-flow: the events topic is not consumed through Faust. Faust's
per-message path (a delivery callback, an event object, a stream queue, an
ack per message) cost ~80-90 µs per event, seven times the ingest work
itself. Here one ``confluent_kafka.Consumer`` reads batches
(``consume(n, timeout)``: librdkafka's C fetcher, one Python object per
message) in a thread of its own, groups them by partition and hands each
partition's run to ``Ingestor.process``. The registry agent, dirty notices'
consumer, the sampler, alerts and web stay on Faust; this runs as a service of
the same Faust app (``EventsPlaneService``: started and stopped with it,
visible in ``/readyz`` and ``/metrics``).

Exactly once (docs/architecture.md#state) rests on Redis, not on Kafka's commits:

* **Where to start.** ``on_assign`` starts each new partition at the offset
  after the one Redis says was applied (``lr:{ingest}:offsets``), the
  documented "offsets stored outside Kafka" pattern. A Redis that lost its
  last writes (AOF ``everysec``) is refilled from Kafka this way, with no
  separate catch-up consumer; Kafka's committed offsets are only a hint (for
  lag tooling), stored after a batch is applied.
* **Fencing.** On assignment the worker claims the partition: an owner epoch
  one higher than any before (``streams.state.store.claim_partition``). Every state
  write of the partition carries it and an older one is refused (the commit
  WATCHes the experiment's fence, ``streams.state.partition_store``)
  (``streams.state.store.Fenced``), so a worker that lost the partition while
  frozen mid-batch (GC pause, SIGSTOP, a stalled Redis) cannot write it after
  the new owner started.
* **Retention gaps.** A partition whose applied offset is below its log start
  (retention deleted events never applied: a worker down longer than the
  topic's retention) is not silently reset to the earliest offset: the
  deleted offsets are counted in Redis (``lr:{ingest}:retention_lost``, shown
  as ``liftstream_ingest_retention_lost_total``), logged at ERROR, and the
  partition starts explicitly at the log start.
* **Redis regressions.** Before each batch the plane reads Redis's applied
  offset of the batch's partitions (one HMGET) and compares it with the last
  offset this worker applied; every second it also reads Redis's ``run_id`` and
  ``master_replid`` and, when either changed (a restart, a failover), checks
  every owned partition. A Redis behind the worker lost acknowledged writes
  (AOF ``everysec`` crash, async-replica failover, an older snapshot): the
  partition seeks back to Redis's offset + 1 and is applied again, counted in
  ``liftstream_ingest_redis_regressions_total`` and logged at WARNING.
* **Delivery before commit.** A batch's dead letters, dirty notices and
  auto-registered configs are produced and flushed before its offsets are
  stored; any error other than a transient Redis one stops the process
  (``on_fatal``) so nothing unapplied is committed.

Cooperative-sticky assignment: a rebalance moves only the partitions that
change owner; the others keep flowing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from schemas.codec import dumps
from schemas.validate import experiment_to_dict
from streams.ingest.ingestor import BatchResult, Ingestor, ingest_offsets, read_applied
from streams.state.keys import PARTITION_EPOCHS
from streams.state.partition_store import LostCommits
from streams.state.store import (
    Fenced,
    account_retention_gap,
    check_eviction_policy,
    check_partition_count,
    check_topic_id,
    claim_partition,
    migrate_ingest_keys,
    offsets_field,
    redis_identity,
    retention_lost,
    transient,
    transient_reason,
)

log = logging.getLogger("liftstream.events")

#: seconds between two reads of Redis's run_id / master_replid
IDENTITY_EVERY_S = 1.0

def retry_transient(fn: Callable, *args: Any, what: str, stopped: threading.Event,
                    status: PlaneStatus | None = None, max_backoff: float = 5.0,
                    read_only: bool = False) -> Any:
    """``fn(*args)``, retried with backoff while Redis cannot take it
    (``streams.state.store.TRANSIENT_REDIS``: away, loading, out of memory, read
    only), forever, until ``stopped`` (then the last error is raised). While
    it waits, ``status.stalled`` says why (/readyz, /metrics). A ``read_only``
    call that succeeds does not clear the stall: reads work on a replica or
    a server out of memory, so they say nothing about the writes that
    stalled (without this /readyz and /metrics flicker between the checks
    made before each batch and its refused commit)."""
    delay = 0.1
    while True:
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - only the transient ones are retried
            e = transient(exc)
            if e is None or stopped.is_set():
                raise
            if status is not None:
                status.stalled = (transient_reason(e), str(e))
                status.heartbeat = time.monotonic()  # waiting, not stuck
            log.warning("%s: redis cannot take it (%s); retrying in %.1fs", what, e, delay)
            stopped.wait(delay)
            delay = min(max_backoff, delay * 2)
        else:
            if status is not None and not read_only:
                status.stalled = None
            return out


@dataclass
class PlaneConfig:
    """What the plane needs beyond the Ingestor: the Kafka client config (one
    from ``streams.config.settings.kafka_config``), the group (its id and consumer
    settings such as the session timeout), topics, batching."""

    kafka: dict[str, Any]
    group_id: str
    group_config: dict[str, Any]
    topic_events: str
    topic_experiments: str
    topic_dirty: str
    topic_deadletter: str
    batch_size: int = 500
    batch_seconds: float = 0.2


@dataclass
class PartitionRun:
    """One partition's owner epoch and the next offset to apply."""

    epoch: int
    next_offset: int


@dataclass
class PlaneStatus:
    """What /readyz and /metrics show of the plane (read from other threads)."""

    running: bool = False
    error: str | None = None
    owned: dict[int, PartitionRun] = field(default_factory=dict)
    fenced_batches: int = 0
    #: (reason, message) while ingest waits for Redis (out of memory, read
    #: only, away): no batch is taken, nothing is acked or lost
    stalled: tuple[str, str] | None = None
    #: time.monotonic() of the loop's last round (a consume, a batch, a retry):
    #: /healthz fails when it is too old (the thread is stuck)
    heartbeat: float = field(default_factory=time.monotonic)
    #: times Redis was found behind what this worker had applied (lost writes)
    redis_regressions: int = 0
    #: partition -> offsets retention deleted before they were applied (Redis's count)
    retention_lost: dict[int, int] = field(default_factory=dict)


class EventsPlane:
    """The consumer thread (see the module docstring). ``state_lock`` is the
    lock every partition-clock writer holds (``streams.state.clocks.ClockService``
    runs its idle advance under it too)."""

    def __init__(self, conf: PlaneConfig, r: Any, ingestor: Ingestor, metrics: Any,
                 state_lock: threading.Lock, on_fatal: Callable[[str, BaseException], None]):
        self.conf, self.r, self.ingestor, self.metrics = conf, r, ingestor, metrics
        self.state_lock = state_lock
        self.on_fatal = on_fatal
        self.status = PlaneStatus()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._high: dict[int, int] = {}  # partition -> high watermark (fetch responses)
        #: called in the plane's thread after each batch (the clock service's
        #: tick: completeness follows the data without waiting for its timer)
        self.after_batch: Callable[[], None] | None = None
        #: the events topic's partition count, checked against Redis's at start
        self.partitions: int | None = None
        self._redis_id: tuple[str, ...] | None = None  # redis_identity at the last check
        self._redis_id_at = 0.0  # time.monotonic() of that check

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from confluent_kafka import Consumer, Producer

        k = self.conf.kafka
        self._consumer = Consumer({
            **k, **self.conf.group_config, "group.id": self.conf.group_id,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.commit": True, "auto.commit.interval.ms": 1000,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False})
        # murmur2 for keyed records: the partition of a dirty notice is what
        # the sampler (Faust, aiokafka's partitioner) computes for its id
        self._producer = Producer({**k, "partitioner": "murmur2_random",
                                   "enable.idempotence": True, "linger.ms": 5})
        # an evicting Redis deletes state: refuse it (raises EvictingRedis)
        retry_transient(check_eviction_policy, self.r, what="eviction policy",
                        stopped=self._stopped, status=self.status)
        self._redis_id = retry_transient(redis_identity, self.r, what="redis identity",
                                         stopped=self._stopped, status=self.status)
        self._redis_id_at = time.monotonic()
        retry_transient(migrate_ingest_keys, self.r, what="key names", stopped=self._stopped,
                        status=self.status)  # lr:ingest:* of before -> lr:{ingest}:*
        self._check_topic()  # before anything is read: raises TopicMismatch
        self._consumer.subscribe([self.conf.topic_events], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_lost)
        self.status.running = True
        # the loop starts now: the time spent constructing and checking the
        # topic above is not a stuck loop (/healthz read it so at start-up)
        self.status.heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="events-plane", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.status.running = False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_topic(self) -> None:
        """The events topic must be the one Redis's offsets belong to
        (``streams.state.store.check_topic_id``; a broker that reports no topic
        id skips that check), with the partition count Redis's state was built
        with (``check_partition_count``): both raise ``TopicMismatch``."""
        from confluent_kafka import KafkaException, TopicCollection
        from confluent_kafka.admin import AdminClient

        topic = self.conf.topic_events
        md = self._consumer.list_topics(topic, timeout=30).topics[topic]
        if md.error is not None:
            raise KafkaException(md.error)
        self.partitions = len(md.partitions)
        retry_transient(check_partition_count, self.r, topic, self.partitions,
                        what="partition count", stopped=self._stopped, status=self.status)
        admin = AdminClient(self.conf.kafka)
        try:
            desc = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout=30)
        except KafkaException as e:  # an old broker or a slow one: ingest still starts
            log.warning("events topic %s: no topic id (%s); not checked", topic, e)
            return
        tid = str(desc.topic_id) if desc.topic_id is not None else ""
        if tid.strip("A=") == "":  # the null id
            log.warning("events topic %s: the broker reports no topic id; not checked", topic)
            return
        retry_transient(check_topic_id, self.r, topic, tid, what="topic id",
                        stopped=self._stopped, status=self.status)

    def check_partitions(self, n: int) -> None:
        """The events topic has ``n`` partitions now: raise
        ``PartitionCountChanged`` unless Redis's state was built with (or an
        operator accepted) that many."""
        if n != self.partitions:
            check_partition_count(self.r, self.conf.topic_events, n)
            self.partitions = n  # accepted (``liftstream admin accept-partitions``)

    # ------------------------------------------------------------ rebalance

    def _on_assign(self, consumer: Any, partitions: list) -> None:
        """New partitions (cooperative: only the added ones): claim each and
        start it after the offset Redis applied. Runs in the plane's thread,
        between batches."""
        from confluent_kafka import TopicPartition

        topic = self.conf.topic_events
        mine = [tp for tp in partitions if tp.topic == topic]
        added = [tp.partition for tp in mine
                 if self.partitions is not None and tp.partition >= self.partitions]
        if added:  # the topic grew since start: stop (raised out of consume)
            n = len(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
            self.check_partitions(max(n, max(added) + 1))
        applied = retry_transient(ingest_offsets, self.r, topic, what="assign",
                                  stopped=self._stopped, status=self.status)
        for tp in mine:
            epoch = retry_transient(claim_partition, self.r, topic, tp.partition,
                                    what="assign", stopped=self._stopped, status=self.status)
            nxt = self._start_at(consumer, tp.partition, applied.get(tp.partition, -1), epoch)
            tp.offset = nxt
            self.status.owned[tp.partition] = PartitionRun(epoch, nxt)
        if mine:
            self._show_retention_lost()
        if mine:
            log.info("events partitions assigned: %s",
                     {tp.partition: (tp.offset, self.status.owned[tp.partition].epoch)
                      for tp in mine})
        consumer.incremental_assign(partitions)
        if mine:  # the commit hint catches up with Redis even before a batch arrives
            consumer.store_offsets(offsets=[TopicPartition(topic, tp.partition, tp.offset)
                                            for tp in mine])

    def _start_at(self, consumer: Any, p: int, applied: int, epoch: int) -> int:
        """Where partition ``p`` starts, Redis having applied up to ``applied``:
        the next offset, or the log start when retention deleted offsets that
        were never applied; those are counted (``account_retention_gap``) and
        logged at ERROR, never skipped silently by an ``earliest`` reset."""
        from confluent_kafka import TopicPartition

        topic = self.conf.topic_events
        lo, _hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30,
                                                 cached=False)
        if lo is None or applied + 1 >= lo:
            return applied + 1
        lost = retry_transient(account_retention_gap, self.r, topic, p, applied, lo, epoch,
                               what="retention gap", stopped=self._stopped, status=self.status)
        log.error("events partition %d: DATA LOSS: the log starts at offset %d but Redis has "
                  "applied only up to %d; retention deleted %d offsets that were never applied "
                  "(counted in liftstream_ingest_retention_lost_total). Starting at %d.",
                  p, lo, applied, lo - applied - 1, lo)
        if not lost:
            log.error("events partition %d: that gap was already counted", p)
        return lo

    def _show_retention_lost(self) -> None:
        """``liftstream_ingest_retention_lost_total{partition}``: the offsets
        counted lost so far, as Redis records them (they outlive a restart)."""
        lost = retry_transient(retention_lost, self.r, self.conf.topic_events,
                               what="retention gaps", stopped=self._stopped, status=self.status,
                               read_only=True)
        self.status.retention_lost = lost
        for p, n in lost.items():
            self.metrics.set("liftstream_ingest_retention_lost_total", n, partition=str(p))

    def _on_revoke(self, consumer: Any, partitions: list) -> None:
        for tp in partitions:
            if tp.topic == self.conf.topic_events:
                self.status.owned.pop(tp.partition, None)
                # the owner's fences, sequences and cached units go with it
                self.ingestor.forget(tp.topic, tp.partition)
        consumer.incremental_unassign(partitions)

    def _on_lost(self, consumer: Any, partitions: list) -> None:
        log.warning("events partitions lost: %s", sorted(tp.partition for tp in partitions))
        self._on_revoke(consumer, partitions)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        c = self._consumer
        try:
            while not self._stopped.is_set():
                msgs = c.consume(self.conf.batch_size, self.conf.batch_seconds)
                self.status.heartbeat = time.monotonic()
                if self.status.owned and (time.monotonic() - self._redis_id_at
                                          >= IDENTITY_EVERY_S):
                    self._check_redis_identity()
                if msgs:
                    self._batch(msgs)
                self._refresh_highwaters()
                if msgs and self.after_batch is not None:
                    self.after_batch()
        except BaseException as e:  # noqa: BLE001 - stop: nothing unapplied is committed
            self.status.error = f"{type(e).__name__}: {e}"
            if not self._stopped.is_set():
                self.on_fatal("events data plane failed", e)
        finally:
            self.status.running = False
            try:
                c.close()  # commits the stored offsets, leaves the group
            except Exception as e:  # noqa: BLE001
                log.warning("closing the events consumer: %s", e)

    def _batch(self, msgs: list) -> None:
        """Apply one consumed batch per partition, deliver its side records,
        then store its offsets (the commit hint)."""
        from confluent_kafka import KafkaException, TopicPartition

        groups: dict[int, list[tuple[int, bytes | None]]] = defaultdict(list)
        keys: dict[int, list[bytes | None]] = defaultdict(list)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("events consumer: %s", err)
                continue
            p = m.partition()
            groups[p].append((m.offset(), m.value()))
            keys[p].append(m.key())
        topic = self.conf.topic_events
        now_ms = int(time.time() * 1000)
        results: list[BatchResult] = []
        done: list = []
        behind = self._verify_applied([p for p in groups if p in self.status.owned])
        for p, lst in groups.items():
            run = self.status.owned.get(p)
            if run is None or p in behind:
                continue  # revoked or fenced since it was fetched; or sought back
            t0 = time.perf_counter()
            try:
                with self.state_lock:
                    res = retry_transient(self._apply, p, run, lst, now_ms, keys[p], [],
                                          what="ingest", stopped=self._stopped,
                                          status=self.status)
            except Fenced as e:
                # another worker owns the partition now: drop what we read;
                # librdkafka reports the loss at the next rebalance callback
                log.warning("events partition %d fenced (%s): batch dropped", p, e)
                self.status.owned.pop(p, None)
                self.ingestor.forget(topic, p)  # its cached units too
                self.status.fenced_batches += 1
                self.metrics.inc("liftstream_ingest_fenced_batches_total", 1)
                continue
            if res is None:
                continue  # Redis lost writes while the batch waited for it: sought back
            self.metrics.observe("liftstream_ingest_batch_seconds", time.perf_counter() - t0)
            results.append(res)
            run.next_offset = lst[-1][0] + 1
            done.append(TopicPartition(topic, p, run.next_offset))
        self._deliver(results)
        if done:
            self._consumer.store_offsets(offsets=done)

    def _apply(self, p: int, run: PartitionRun, lst: list[tuple[int, bytes | None]],
               now_ms: int, keys: list[bytes | None], tries: list[int]) -> BatchResult | None:
        """``Ingestor.process`` of one partition's messages. A retry (after a
        transient Redis error: Redis may have restarted and lost writes in
        between) first checks Redis's applied offset again and returns None
        when the partition had to seek back (``_verify_applied``)."""
        tries.append(1)
        if len(tries) > 1 and self._verify_applied([p]):
            return None
        try:
            return self.ingestor.process(self.conf.topic_events, p, lst, now_ms, run.epoch,
                                         keys)
        except (Fenced, WatchError) as e:
            if self._fenced(p, run):
                if isinstance(e, Fenced):
                    raise
                raise Fenced(str(e)) from e
            # nobody claimed the partition since: the connection dropped while
            # the commit WATCHed its fence (redis-py reports that as a
            # WatchError, which the commit reports as Fenced), before or during
            # the EXEC, so whether Redis applied it is unknown; or the
            # experiment was concluded under the commit (``Concluded``: nothing
            # written). Retried as a dropped connection: the owner reads the
            # fence and the state again and skips what Redis applied (issue 25,
            # kill point "connection dropped during EXEC")
            raise RedisConnectionError(f"events partition {p}: connection lost during a "
                                       f"commit ({e})") from e
        except LostCommits as e:
            # Redis holds fewer of this owner's commits than it made (issue 25:
            # a restart from an older snapshot, a lagging replica promoted):
            # read again from the offset Redis says was applied
            log.warning("events partition %d: %s", p, e)
            applied = read_applied(self.r, self.conf.topic_events, [p])[p]
            self._seek_back(p, run, min(applied, run.next_offset - 1))
            return None

    def _fenced(self, p: int, run: PartitionRun) -> bool:
        """Did a newer owner claim partition ``p``? (its epoch in Redis above
        this worker's: every new owner raises it before it raises any fence)"""
        cur = self.r.hget(PARTITION_EPOCHS, offsets_field(self.conf.topic_events, p))
        return cur is not None and int(cur) > run.epoch

    # ------------------------------------------------------------ redis regressions

    def _verify_applied(self, partitions: list[int]) -> set[int]:
        """Compare Redis's applied offset of ``partitions`` with the last one
        this worker applied; seek each partition whose Redis is behind back
        to Redis's offset + 1 (``_seek_back``). Returns those partitions (their
        messages in hand are dropped: they come again from Kafka)."""
        if not partitions:
            return set()
        applied = retry_transient(read_applied, self.r, self.conf.topic_events, partitions,
                                  what="applied offsets", stopped=self._stopped,
                                  status=self.status, read_only=True)
        behind = set()
        for p in partitions:
            run = self.status.owned.get(p)
            if run is not None and applied[p] < run.next_offset - 1:
                self._seek_back(p, run, applied[p])
                behind.add(p)
        return behind

    def _seek_back(self, p: int, run: PartitionRun, redis_applied: int) -> None:
        """Redis lost acknowledged writes of partition ``p``: read it again from
        Redis's offset + 1, count and log it."""
        from confluent_kafka import TopicPartition

        nxt = self._start_at(self._consumer, p, redis_applied, run.epoch)
        if nxt > redis_applied + 1:
            self._show_retention_lost()
        log.warning("events partition %d: redis lost acknowledged writes (it has applied up "
                    "to offset %d, this worker up to %d): seeking back to offset %d",
                    p, redis_applied, run.next_offset - 1, nxt)
        self.status.redis_regressions += 1
        self.metrics.inc("liftstream_ingest_redis_regressions_total", 1, partition=str(p))
        self._consumer.seek(TopicPartition(self.conf.topic_events, p, nxt))
        run.next_offset = nxt
        self.ingestor.forget(self.conf.topic_events, p)

    def _check_redis_identity(self) -> None:
        """Read Redis's run_id / master_replid; when they changed (a restart,
        a failover), verify every owned partition's applied offset at once,
        the idle ones included."""
        self._redis_id_at = time.monotonic()
        ident = retry_transient(redis_identity, self.r, what="redis identity",
                                stopped=self._stopped, status=self.status, read_only=True)
        if ident == self._redis_id:
            return
        log.warning("redis changed identity (run_id/master_replid %s -> %s): checking the "
                    "applied offsets of every owned partition", self._redis_id, ident)
        self._redis_id = ident
        self._verify_applied(sorted(self.status.owned))

    def _deliver(self, results: list[BatchResult]) -> None:
        """Produce the batch's configs, dead letters and one dirty notice per
        touched experiment; flush (they are delivered before the offsets are
        stored); count."""
        prod = self._producer
        touched: set[str] = set()
        counts: Counter = Counter()
        failed: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failed.append(err)

        n = 0
        for res in results:
            for cfg in res.new_experiments:
                prod.produce(self.conf.topic_experiments, key=cfg.experiment_id.encode(),
                             value=dumps(experiment_to_dict(cfg)), on_delivery=on_delivery)
                n += 1
            for dl in res.dead_letters:
                prod.produce(self.conf.topic_deadletter, value=dumps(dl),
                             on_delivery=on_delivery)
                n += 1
            touched |= res.touched
            counts.update(res.counts)
        for eid in sorted(touched):
            prod.produce(self.conf.topic_dirty, key=eid.encode(), value=eid.encode(),
                         on_delivery=on_delivery)
            n += 1
        if n:
            left = prod.flush(30.0)
            if left or failed:
                raise RuntimeError(f"could not deliver the batch's side records: {left} "
                                   f"undelivered, errors {failed[:3]}")
        for k, v in counts.items():
            if k.startswith("dead_letter:"):
                self.metrics.inc("liftstream_dead_letters_total", v, reason=k.split(":", 1)[1])
            else:
                self.metrics.inc("liftstream_events_total", v, outcome=k)

    # ------------------------------------------------------------ views

    def owned(self) -> dict[int, int]:
        """Owned partitions -> owner epoch."""
        return {p: run.epoch for p, run in list(self.status.owned.items())}

    def highwaters(self) -> dict[int, int]:
        """High watermarks of the owned partitions, as the last fetch
        responses gave them (refreshed by the plane's thread after every
        ``consume``: the consumer is not called from other threads)."""
        owned = self.status.owned
        return {p: hi for p, hi in list(self._high.items()) if p in owned}

    def _refresh_highwaters(self) -> None:
        from confluent_kafka import TopicPartition

        c, topic = self._consumer, self.conf.topic_events
        for p in list(self.status.owned):
            try:
                _lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), cached=True)
            except Exception:  # noqa: BLE001 - not fetched yet
                continue
            if hi is not None and hi >= 0:
                self._high[p] = int(hi)

    def lag(self) -> dict[int, int]:
        """Owned partition -> high watermark minus the next offset to apply."""
        high = self.highwaters()
        return {p: max(0, high[p] - run.next_offset)
                for p, run in list(self.status.owned.items()) if p in high}
