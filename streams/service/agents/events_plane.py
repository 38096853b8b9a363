"""The ingest role: the events plane (``streams.ingest.events_plane``, a
confluent-kafka consumer run as a service of the Faust app) and the
``event_clocks`` timer, which every second publishes the completeness
watermark and advances idle owned partitions
(``streams.state.clocks.ClockService``)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping

import faust
import mode

from streams.config.settings import CONSUMER_GROUP_CONFIG, Settings, kafka_config
from streams.ingest.events_plane import EventsPlane, PlaneConfig
from streams.ingest.ingestor import Ingestor
from streams.service.context import AppContext
from streams.service.runtime import fatal, with_retry
from streams.state.clocks import ClockService
from streams.state.store import Fenced, TopicMismatch, transient

log = logging.getLogger("liftstream")


class EventsPlaneService(mode.Service):
    """``EventsPlane`` as a service of the Faust app: started with it (after
    the registry is up), stopped with it."""

    def __init__(self, plane: EventsPlane, **kw) -> None:
        super().__init__(**kw)
        self.plane = plane

    async def on_start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.plane.start)
        except TopicMismatch as e:  # a clear stop, not a crash loop of skipped events
            fatal(str(e))

    async def on_stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.plane.stop)


class EventClocks:
    """``ClockService``'s tick over every events partition's high watermark:
    the plane's own (from fetch responses; right on every broker) for the
    partitions it owns, the last ListOffsets for the others."""

    def __init__(self, settings: Settings, plane: EventsPlane, clocks: ClockService,
                 state_lock: threading.Lock) -> None:
        self.settings = settings
        self.plane = plane
        self.clocks = clocks
        self.state_lock = state_lock
        self._consumer = None  # for metadata and ListOffsets only, created on first use
        self._partitions: set[int] | None = None  # the topic's, from the last metadata
        self._others: dict[int, int] = {}  # high watermarks of the partitions others own

    def fetch_others(self) -> None:
        """High watermarks of the events partitions this worker does not own
        (librdkafka's ListOffsets), and the partition list."""
        from confluent_kafka import Consumer
        from confluent_kafka import TopicPartition as CTP

        s = self.settings
        c = self._consumer
        if c is None:
            c = self._consumer = Consumer(kafka_config(s, **{
                "group.id": f"{s.app_id}-events-clocks", "enable.auto.commit": False}))
        md = c.list_topics(s.topic_events, timeout=5)
        owned = self.plane.owned()
        got = {p: int(c.get_watermark_offsets(CTP(s.topic_events, p), timeout=5)[1])
               for p in md.topics[s.topic_events].partitions if p not in owned}
        self._others.clear()
        self._others.update(got)
        self._partitions = set(md.topics[s.topic_events].partitions)

    def tick(self, fetch: bool) -> None:
        """One tick; the others' watermarks are refreshed first when ``fetch``
        (the 1 s timer; the plane ticks after every batch without it, so the
        completeness follows the data at once)."""
        if fetch:
            try:
                self.fetch_others()
            except Exception as e:  # noqa: BLE001 - metadata not available yet
                log.debug("event clocks: no metadata (%s)", e)
                return
        if self._partitions is None:
            return
        high = {p: h for p, h in self._others.items() if p in self._partitions}
        high.update(self.plane.highwaters())
        if set(high) != self._partitions:
            return  # a partition just moved: the next fetch sees it
        with self.state_lock:
            try:
                self.clocks.tick(high, self.plane.owned(), int(time.time() * 1000))
            except Fenced as e:  # a newer owner took a partition; the plane hears soon
                log.info("event clocks: %s", e)

    def tick_after_batch(self) -> None:
        """The plane's ``after_batch``: a tick without fetching; a transient
        Redis error is left to the timer."""
        try:
            self.tick(fetch=False)
        except Exception as e:  # noqa: BLE001 - the timer tries again within a second
            if transient(e) is None:
                raise
            log.debug("event clocks after a batch: %s", e)


def install_events_plane(app: faust.App, ctx: AppContext) -> EventsPlane:
    """Add the events plane (as a service) and the ``event_clocks`` timer to
    ``app``; sets ``ctx.plane``.

    :returns: the plane.
    """
    settings, r, registry = ctx.settings, ctx.redis, ctx.registry
    ingestor = Ingestor(r, registry, auto_register=settings.auto_register,
                        hold_seconds=settings.hold_seconds, hold_max=settings.hold_max,
                        max_future_ms=settings.max_future_seconds * 1000)
    state_lock = threading.Lock()  # batches and idle advances move clocks one at a time
    plane = EventsPlane(
        PlaneConfig(kafka=kafka_config(settings), group_id=f"{settings.app_id}-events",
                    group_config=CONSUMER_GROUP_CONFIG,
                    topic_events=settings.topic_events,
                    topic_experiments=settings.topic_experiments,
                    topic_dirty=settings.topic_dirty, topic_deadletter=settings.topic_deadletter,
                    batch_size=settings.batch_size, batch_seconds=settings.batch_seconds),
        r, ingestor, ctx.metrics, state_lock, fatal)
    ctx.plane = plane
    app.service(EventsPlaneService(plane, loop=app.loop, beacon=app.beacon))
    def count_outcomes(counts: Mapping[str, int]) -> None:
        """An idle advance's counts (expired unit-level holds) into
        ``liftstream_events_total``, as a batch's are (``EventsPlane._deliver``)."""
        for outcome, n in counts.items():
            ctx.metrics.inc("liftstream_events_total", n, outcome=outcome)

    clocks = EventClocks(settings, plane, ClockService(
        r, settings.topic_events, settings.idle_seconds,
        lambda: registry.get_many(registry.ids()).values(), settings.hold_seconds,
        on_count=count_outcomes), state_lock)
    plane.after_batch = clocks.tick_after_batch

    @app.timer(1.0)
    async def event_clocks():
        """Publish the completeness watermark; advance idle partitions."""
        await with_retry(clocks.tick, True, what="event clocks")

    return plane
