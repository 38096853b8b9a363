"""The Faust application: agents wiring Kafka to ingest, registry and sampler.

Roles (``liftstream worker --role``): ``ingest`` consumes events (through
``streams.ingest.events_plane``, a confluent-kafka consumer run as a service of this
app, not through Faust), ``sampler``
owns experiments through the partitions of the dirty topic and publishes
estimates, ``all`` does both in one process. Each role is its own consumer
group (``<app_id>-<role>``), so workers of different roles never share an
assignment; do not mix ``all`` workers with split-role workers of the same
app id.

Delivery: ingest finishes a batch (Redis applied, dead letters and dirty
notices delivered) before storing its offsets, retries Redis errors with
backoff forever, and on any other error exits the process at once
(``os._exit``) so nothing unapplied is committed; a restarted or newly
assigned worker starts each partition after the offset Redis applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faust
import mode

from schemas.codec import dumps
from schemas.contracts import dead_letter_record
from schemas.validate import InvalidRecord, parse_experiment
from streams.alerts import store as alerting
from streams.config.settings import (
    CONSUMER_GROUP_CONFIG,
    FAUST_BROKER_SETTINGS,
    Settings,
    faust_broker_settings,
    kafka_config,
    redis_client,
)
from streams.ingest.events_plane import EventsPlane, PlaneConfig
from streams.ingest.ingestor import Ingestor
from streams.sampling.advance import TickConfig
from streams.sampling.platform_prior import PlatformConfig, PlatformPrior
from streams.sampling.sampler import SamplerService
from streams.service.metrics import Metrics
from streams.state.registry import Registry
from streams.state.store import Fenced, TopicMismatch, transient

log = logging.getLogger("liftstream")



def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Kafka default (murmur2) partitioner gives ``key``, as
    Faust's producer does; the sampler uses it to know which experiments its
    dirty-topic partitions make it own."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def fatal(msg: str, exc: BaseException | None = None) -> None:
    """Stop the worker without committing anything not yet applied."""
    log.critical("fatal: %s", msg, exc_info=exc)
    logging.shutdown()
    os._exit(70)


async def with_retry(fn, *args, what: str, max_backoff: float = 5.0):
    """Run blocking ``fn`` on a thread; retry transient Redis errors forever."""
    loop = asyncio.get_running_loop()
    delay = 0.1
    while True:
        try:
            return await loop.run_in_executor(None, fn, *args)
        except Exception as exc:  # noqa: BLE001 - only the transient ones are retried
            if (e := transient(exc)) is None:
                raise
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(max_backoff, delay * 2)


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


def install_events_plane(app: faust.App, settings: Settings, r, registry: Registry,
                         metrics: Metrics) -> EventsPlane:
    """The ingest role: the events plane, and a 1 s timer that publishes the
    completeness watermark and advances idle owned partitions
    (``streams.state.clocks.ClockService``)."""
    from streams.state.clocks import ClockService

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
        r, ingestor, metrics, state_lock, fatal)
    app.liftstream["plane"] = plane
    app.service(EventsPlaneService(plane, loop=app.loop, beacon=app.beacon))
    clock_service = ClockService(
        r, settings.topic_events, settings.idle_seconds,
        lambda: registry.get_many(registry.ids()).values(), settings.hold_seconds)
    meta: dict = {}
    others: dict[int, int] = {}  # high watermarks of the partitions others own

    def fetch_others() -> None:
        """High watermarks of the events partitions this worker does not own
        (librdkafka's ListOffsets), and the partition list."""
        from confluent_kafka import Consumer
        from confluent_kafka import TopicPartition as CTP

        c = meta.get("c")
        if c is None:
            c = meta["c"] = Consumer(kafka_config(settings, **{
                "group.id": f"{settings.app_id}-events-clocks", "enable.auto.commit": False}))
        md = c.list_topics(settings.topic_events, timeout=5)
        owned = plane.owned()
        got = {p: int(c.get_watermark_offsets(CTP(settings.topic_events, p), timeout=5)[1])
               for p in md.topics[settings.topic_events].partitions if p not in owned}
        others.clear()
        others.update(got)
        meta["partitions"] = set(md.topics[settings.topic_events].partitions)

    def tick(fetch: bool) -> None:
        """ClockService's tick over every partition's high watermark: the
        plane's own (from fetch responses; right on every broker) for the
        partitions it owns, the last ListOffsets for the others (refreshed
        when ``fetch``: the 1 s timer; the plane ticks after every batch
        without it, so the completeness follows the data at once)."""
        if fetch:
            try:
                fetch_others()
            except Exception as e:  # noqa: BLE001 - metadata not available yet
                log.debug("event clocks: no metadata (%s)", e)
                return
        if "partitions" not in meta:
            return
        high = {p: h for p, h in others.items() if p in meta["partitions"]}
        high.update(plane.highwaters())
        if set(high) != meta["partitions"]:
            return  # a partition just moved: the next fetch sees it
        with state_lock:
            try:
                clock_service.tick(high, plane.owned(), int(time.time() * 1000))
            except Fenced as e:  # a newer owner took a partition; the plane hears soon
                log.info("event clocks: %s", e)

    def tick_after_batch() -> None:
        try:
            tick(fetch=False)
        except Exception as e:  # noqa: BLE001 - the timer tries again within a second
            if transient(e) is None:
                raise
            log.debug("event clocks after a batch: %s", e)

    plane.after_batch = tick_after_batch

    @app.timer(1.0)
    async def event_clocks():
        """Publish the completeness watermark; advance idle partitions."""
        await with_retry(tick, True, what="event clocks")

    return plane


def create_app(settings: Settings, role: str = "all") -> faust.App:
    if role not in ("ingest", "sampler", "all"):
        raise ValueError(f"role must be ingest|sampler|all, not {role!r}")
    app = faust.App(
        f"{settings.app_id}-{role}",
        **faust_broker_settings(settings),  # URL, SASL/TLS credentials, size limit
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        topic_allow_declare=False,  # ``streams.service.topics.ensure_topics`` creates them
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        datadir=os.environ.get("LIFTSTREAM_DATADIR") or os.path.join(
            tempfile.gettempdir(), f"liftstream-{settings.app_id}-{role}"),
        **FAUST_BROKER_SETTINGS,
    )
    r = redis_client(settings, health_check_interval=10)
    registry = Registry(r)
    # the events topic is not a Faust topic: streams.ingest.events_plane consumes it
    topics = {name: app.topic(name, value_serializer="raw", key_serializer="raw",
                              partitions=spec["partitions"])
              for name, spec in settings.topics().items() if name != settings.topic_events}
    t_experiments = topics[settings.topic_experiments]
    t_dirty = topics[settings.topic_dirty]
    t_estimates = topics[settings.topic_estimates]
    t_alerts = topics[settings.topic_alerts]
    t_dead = topics[settings.topic_deadletter]
    metrics = Metrics()
    app.liftstream = {"settings": settings, "redis": r, "registry": registry, "role": role,
                      "metrics": metrics, "plane": None, "latest": {}}

    @app.agent(t_experiments, name="registry")
    async def registry_agent(stream):
        async for event in stream.events():
            key, raw = event.key, event.value
            try:
                if raw is None:  # deleted: every key of it goes, and again once
                    eid = key.decode()  # no worker can still hold its cached config
                    await with_retry(registry.delete, eid, what="registry")

                    async def sweep_again(eid=eid):
                        await asyncio.sleep(2 * registry.ttl + 1)
                        await with_retry(registry.delete, eid, what="registry")

                    app.liftstream.setdefault("sweeps", set()).add(
                        asyncio.ensure_future(sweep_again()))
                    continue
                cfg = parse_experiment(raw)
                await with_retry(registry.put, cfg, what="registry")
            except InvalidRecord as err:  # bad, or a change its state cannot take
                m = event.message
                log.warning("experiment config at offset %s refused: %s", m.offset, err.message)
                rec = dead_letter_record(raw, err, m.topic, m.partition, m.offset,
                                         int(time.time() * 1000))
                await (await t_dead.send(value=dumps(rec)))

    if role in ("ingest", "all"):
        install_events_plane(app, settings, r, registry, metrics)

    if role in ("sampler", "all"):
        from kernels.backend import get_xp

        service = SamplerService(r, registry, TickConfig(
            chains=settings.chains, sweeps=settings.sweeps_per_tick,
            window=settings.window_draws, warmup=settings.warmup, seed=settings.seed),
            xp=get_xp(settings.device),
            platform=PlatformPrior(r, PlatformConfig(chains=settings.platform_chains,
                                                     seed=settings.seed)),
            events_topic=settings.topic_events)
        app.liftstream["sampler"] = service
        sampler_pool = ThreadPoolExecutor(1, thread_name_prefix="sampler")

        @app.agent(t_dirty, name="dirty")
        async def dirty_agent(stream):
            async for eid in stream:
                service.own(eid.decode())

        def owned_partitions() -> set[int]:
            try:
                return {tp.partition for tp in app.consumer.assignment()
                        if tp.topic == settings.topic_dirty}
            except Exception:  # noqa: BLE001 - consumer not started yet
                return set()

        app.liftstream["sampler_beat"] = time.monotonic()

        @app.timer(settings.tick_seconds)
        async def sampler_tick():
            try:
                await sampler_round()
            finally:  # /healthz: the sampler loop came round
                app.liftstream["sampler_beat"] = time.monotonic()

        async def sampler_round():
            parts = owned_partitions()
            if not parts:
                service.disown_all()
                return
            loop = asyncio.get_running_loop()
            ids = await with_retry(registry.ids, what="sampler")
            mine = {e for e in ids if partition_for(e.encode(), settings.partitions) in parts}
            service.owned &= mine
            for e in mine - service.owned:
                service.own(e)
            def tick_and_alert():
                recs = service.tick()
                alerts = alerting.process(r, registry, recs, int(time.time() * 1000))
                return recs + service.conclude_due(), alerts

            try:
                recs, alerts = await loop.run_in_executor(sampler_pool, tick_and_alert)
            except Exception as e:  # noqa: BLE001
                if transient(e) is not None:
                    log.warning("sampler tick: redis cannot take it (%s)", e)
                    return
                log.exception("sampler tick failed: %s", e)
                return
            if recs:
                metrics.inc("liftstream_sampler_sweeps_total", settings.sweeps_per_tick)
            metrics.set("liftstream_sampler_bad_chains_total", service.bad_chains)
            metrics.set("liftstream_sampler_stale_writes_total", service.stale_writes)
            for rec in recs:
                app.liftstream["latest"][(rec["experiment_id"], rec["metric"],
                                          rec["variant"])] = rec
                metrics.set("liftstream_chain_iterations", rec["diagnostics"]["iteration"],
                            experiment=rec["experiment_id"], metric=rec["metric"])
                metrics.set_data_quality(rec)  # per-experiment data_quality gauges
                key = f"{rec['experiment_id']}|{rec['metric']}|{rec['variant']}".encode()
                await t_estimates.send(key=key, value=dumps(rec))
            for alert in alerts:
                await t_alerts.send(key=alert["alert_id"].encode(), value=dumps(alert))

    from streams.service.web import register_pages

    register_pages(app, r, registry)
    return app
