"""The Faust application: agents wiring Kafka to ingest, registry and sampler.

Roles (``liftstream worker --role``): ``ingest`` consumes events, ``sampler``
owns experiments through the partitions of the dirty topic and publishes
estimates, ``all`` does both in one process. Each role is its own consumer
group (``<app_id>-<role>``), so workers of different roles never share an
assignment; do not mix ``all`` workers with split-role workers of the same
app id.

Delivery: Faust acks an event once the agent moved past it, and commits
acked offsets. Ingest therefore finishes a batch (Redis applied, dead letters
and dirty notices delivered) before taking the next one, retries Redis errors
with backoff forever, and on any other error exits the process at once
(``os._exit``) so nothing unapplied is committed; the restart replays from
the last commit and Redis's per-partition offsets skip what was applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import faust
import redis

from schemas.codec import dumps
from schemas.validate import InvalidRecord, experiment_to_dict, parse_experiment
from streams import alerting
from streams.advance import TickConfig
from streams.embedded import FAUST_BROKER_SETTINGS
from streams.faust_fastpath import RawEventSchema, fast_drain_transport
from streams.ingest import Ingestor
from streams.metrics import Metrics
from streams.platform_prior import PlatformConfig, PlatformPrior
from streams.registry import Registry
from streams.sampler import SamplerService
from streams.settings import Settings, faust_broker_settings, redis_client

log = logging.getLogger("liftstream")

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
             redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)


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
        except TRANSIENT as e:
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(max_backoff, delay * 2)


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
        topic_allow_declare=False,  # ``streams.topics.ensure_topics`` creates them
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        datadir=os.environ.get("LIFTSTREAM_DATADIR") or os.path.join(
            tempfile.gettempdir(), f"liftstream-{settings.app_id}-{role}"),
        **FAUST_BROKER_SETTINGS,
    )
    fast = settings.ingest_fast_path and role in ("ingest", "all")
    if fast and app._transport is None:  # before anything touches app.transport
        app.transport = fast_drain_transport(app)  # None: Faust's own, on first use
        if app._transport is None:
            log.info("ingest fast path: Faust's drain loop is not the one known; using it as is")
    r = redis_client(settings, health_check_interval=10)
    registry = Registry(r)
    topics = {name: app.topic(name, value_serializer="raw", key_serializer="raw",
                              partitions=spec["partitions"],
                              schema=(RawEventSchema() if fast and name == settings.topic_events
                                      else None))
              for name, spec in settings.topics().items()}
    t_events = topics[settings.topic_events]
    t_experiments = topics[settings.topic_experiments]
    t_dirty = topics[settings.topic_dirty]
    t_estimates = topics[settings.topic_estimates]
    t_dead = topics[settings.topic_deadletter]
    t_alerts = topics[settings.topic_alerts]
    metrics = Metrics()
    app.liftstream = {"settings": settings, "redis": r, "registry": registry, "role": role,
                      "metrics": metrics, "ingest_next": {}, "latest": {}}

    @app.agent(t_experiments, name="registry")
    async def registry_agent(stream):
        async for event in stream.events():
            key, raw = event.key, event.value
            try:
                if raw is None:
                    await with_retry(registry.delete, key.decode(), what="registry")
                    continue
                cfg = parse_experiment(raw)
            except InvalidRecord as err:
                log.warning("bad experiment config at offset %s: %s", event.message.offset,
                            err.message)
                continue
            await with_retry(registry.put, cfg, what="registry")

    if role in ("ingest", "all"):
        ingestor = Ingestor(r, registry, auto_register=settings.auto_register,
                            hold_seconds=settings.hold_seconds, hold_max=settings.hold_max,
                            max_future_ms=settings.max_future_seconds * 1000)
        state_lock = asyncio.Lock()  # batches and idle advances change clocks one at a time
        from streams.clocks import ClockService

        clock_service = ClockService(
            r, settings.topic_events, settings.idle_seconds,
            lambda: registry.get_many(registry.ids()).values(), settings.hold_seconds)

        def events_highwaters() -> tuple[dict[int, int], set[int]]:
            """High watermark of every events partition: Faust's (from fetch
            responses; right on every broker) for the assigned ones, else
            librdkafka's ListOffsets; and the assigned partitions."""
            from confluent_kafka import TopicPartition as CTP

            owned = {tp.partition for tp in app.consumer.assignment()
                     if tp.topic == settings.topic_events}
            out: dict[int, int] = {}
            c = app.liftstream.get("meta_consumer")
            if c is None:
                from confluent_kafka import Consumer

                from streams.settings import kafka_config
                c = app.liftstream["meta_consumer"] = Consumer(kafka_config(
                    settings, **{"group.id": f"{app.conf.id}-clocks",
                                 "enable.auto.commit": False}))
            md = c.list_topics(settings.topic_events, timeout=5)
            for p in md.topics[settings.topic_events].partitions:
                hw = None
                if p in owned:
                    for tp in app.consumer.assignment():
                        if tp.topic == settings.topic_events and tp.partition == p:
                            hw = app.consumer.highwater(tp)
                if hw is None:
                    _, hw = c.get_watermark_offsets(CTP(settings.topic_events, p), timeout=5)
                out[p] = int(hw)
            return out, owned

        @app.timer(1.0)
        async def event_clocks():
            """Publish the completeness watermark; advance idle partitions."""
            try:
                high, owned = await asyncio.get_running_loop().run_in_executor(
                    None, events_highwaters)
            except Exception as e:  # noqa: BLE001 - metadata not available yet
                log.debug("event clocks: no metadata (%s)", e)
                return
            async with state_lock:
                await with_retry(clock_service.tick, high, owned, int(time.time() * 1000),
                                 what="event clocks")

        @app.agent(t_events, name="ingest")
        async def ingest_agent(stream):
            async for batch in stream.take_events(settings.batch_size,
                                                  within=settings.batch_seconds):
                try:
                    await ingest_batch(batch)
                except Exception as e:  # noqa: BLE001 - anything else must not be acked
                    fatal("ingest batch failed", e)

        if os.environ.get("LIFTSTREAM_INGEST_CATCHUP", "1").lower() not in ("0", "false", "no"):
            from streams.catchup import catch_up
            from streams.settings import kafka_config

            async def catch_up_on_assign(sender, assigned, **_kw) -> None:
                """Redis behind Kafka's commit (lost writes): replay the gap
                before Faust resumes the paused partitions (streams.catchup)."""
                parts = sorted(tp.partition for tp in assigned
                               if tp.topic == settings.topic_events)
                if not parts:
                    return
                try:
                    rep = await with_retry(
                        catch_up, r, ingestor, kafka_config(settings), app.conf.id,
                        settings.topic_events, parts, settings.batch_size, what="catch-up")
                    waits = []
                    for cfg in rep.result.new_experiments:
                        waits.append(await t_experiments.send(
                            key=cfg.experiment_id.encode(),
                            value=dumps(experiment_to_dict(cfg))))
                    for eid in sorted(rep.result.touched):
                        waits.append(await t_dirty.send(key=eid.encode(), value=eid.encode()))
                    if waits:
                        await asyncio.gather(*waits)
                except Exception as e:  # noqa: BLE001 - resuming would skip lost events
                    fatal("catch-up on partition assignment failed", e)

            app.on_partitions_assigned.connect(catch_up_on_assign)
            app.liftstream["catch_up"] = catch_up_on_assign  # keep a strong reference

        async def ingest_batch(batch) -> None:
            """Apply one batch (per source partition, in offset order), then
            deliver its experiment configs, dead letters and dirty notices, all
            before returning: Faust acks the batch's events only after this."""
            groups: dict[tuple[str, int], list] = defaultdict(list)
            for ev in batch:
                m = ev.message
                groups[(m.topic, m.partition)].append((m.offset, m.value))
            now_ms = int(time.time() * 1000)
            results = []
            for (topic, part), msgs in groups.items():
                t0 = time.perf_counter()
                async with state_lock:
                    res = await with_retry(ingestor.process, topic, part, msgs, now_ms,
                                           what="ingest")
                metrics.observe("liftstream_ingest_batch_seconds", time.perf_counter() - t0)
                results.append(res)
            # one round of sends for the whole batch (not one per partition): the
            # experiments it touched get one dirty notice each
            waits = []
            touched: set[str] = set()
            counts: Counter = Counter()
            for res in results:
                for cfg in res.new_experiments:
                    waits.append(await t_experiments.send(
                        key=cfg.experiment_id.encode(), value=dumps(experiment_to_dict(cfg))))
                for dl in res.dead_letters:
                    waits.append(await t_dead.send(value=dumps(dl)))
                touched |= res.touched
                counts.update(res.counts)
            for eid in sorted(touched):
                waits.append(await t_dirty.send(key=eid.encode(), value=eid.encode()))
            if waits:
                await asyncio.gather(*waits)  # delivered before the batch is acked
            for k, v in counts.items():
                if k.startswith("dead_letter:"):
                    metrics.inc("liftstream_dead_letters_total", v, reason=k.split(":", 1)[1])
                else:
                    metrics.inc("liftstream_events_total", v, outcome=k)
            nxt = app.liftstream["ingest_next"]
            for key, msgs in groups.items():
                nxt[key] = msgs[-1][0] + 1

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

        @app.timer(settings.tick_seconds)
        async def sampler_tick():
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
                return recs, alerting.process(r, registry, recs, int(time.time() * 1000))

            try:
                recs, alerts = await loop.run_in_executor(sampler_pool, tick_and_alert)
            except TRANSIENT as e:
                log.warning("sampler tick: redis unavailable (%s)", e)
                return
            except Exception as e:  # noqa: BLE001
                log.exception("sampler tick failed: %s", e)
                return
            if recs:
                metrics.inc("liftstream_sampler_sweeps_total", settings.sweeps_per_tick)
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

    from streams.web import register_pages

    register_pages(app, r, registry)
    return app
