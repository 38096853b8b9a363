"""The sampler role's timer: every ``tick_seconds`` the sampler takes the
experiments whose dirty-topic partition this worker owns, runs a tick on a
thread of its own (sweeps, estimates, alert rules, concluding due
experiments), and publishes the estimates and alerts."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import faust

from schemas.codec import dumps
from streams.alerts import store as alerting
from streams.sampling.advance import TickConfig
from streams.sampling.platform_prior import PlatformConfig, PlatformPrior
from streams.sampling.sampler import SamplerService
from streams.service.context import AppContext
from streams.service.runtime import partition_for, with_retry
from streams.state.store import transient

log = logging.getLogger("liftstream")


def make_sampler(ctx: AppContext) -> SamplerService:
    """The ``SamplerService`` of ``ctx.settings`` (chains, sweeps per tick,
    window, warm-up, seed, device, platform-prior chains)."""
    from kernels.backend import get_xp

    s = ctx.settings
    return SamplerService(ctx.redis, ctx.registry, TickConfig(
        chains=s.chains, sweeps=s.sweeps_per_tick,
        window=s.window_draws, warmup=s.warmup, seed=s.seed),
        xp=get_xp(s.device),
        platform=PlatformPrior(ctx.redis, PlatformConfig(chains=s.platform_chains, seed=s.seed)),
        events_topic=s.topic_events)


class SamplerLoop:
    """One round per timer tick; ``ctx.sampler_beat`` marks each (``/healthz``)."""

    def __init__(self, app: faust.App, ctx: AppContext) -> None:
        assert ctx.sampler is not None, "the sampler role builds ctx.sampler first"
        self.app = app
        self.ctx = ctx
        self.service = ctx.sampler
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sampler")

    def owned_partitions(self) -> set[int]:
        """The dirty-topic partitions assigned to this worker (none before the
        consumer started)."""
        try:
            return {tp.partition for tp in self.app.consumer.assignment()
                    if tp.topic == self.ctx.settings.topic_dirty}
        except Exception:  # noqa: BLE001 - consumer not started yet
            return set()

    def tick_and_alert(self) -> tuple[list[dict], list[dict]]:
        """(On the sampler thread.) A sampler tick, the alert rules over its
        estimates, and the concluded experiments' final records.

        :returns: ``(estimate records, alert records)``.
        """
        recs = self.service.tick()
        alerts = alerting.process(self.ctx.redis, self.ctx.registry, recs,
                                  int(time.time() * 1000))
        return recs + self.service.conclude_due(), alerts

    async def round(self) -> None:
        """Own exactly the experiments of the owned partitions, tick, publish.
        A tick Redis cannot take (or any other failure) is logged and the
        next round tries again."""
        ctx, service, s = self.ctx, self.service, self.ctx.settings
        parts = self.owned_partitions()
        if not parts:
            service.disown_all()
            return
        loop = asyncio.get_running_loop()
        ids = await with_retry(ctx.registry.ids, what="sampler")
        mine = {e for e in ids if partition_for(e.encode(), s.partitions) in parts}
        service.owned &= mine
        for e in mine - service.owned:
            service.own(e)
        try:
            recs, alerts = await loop.run_in_executor(self.pool, self.tick_and_alert)
        except Exception as e:  # noqa: BLE001
            if transient(e) is not None:
                log.warning("sampler tick: redis cannot take it (%s)", e)
                return
            log.exception("sampler tick failed: %s", e)
            return
        await self.publish(recs, alerts)

    async def publish(self, recs: list[dict], alerts: list[dict]) -> None:
        """Update the metrics and ``ctx.latest``; send each estimate record to
        the estimates topic (key ``experiment|metric|variant``) and each alert
        to the alerts topic (key its ``alert_id``)."""
        ctx, metrics, s = self.ctx, self.ctx.metrics, self.ctx.settings
        if recs:
            metrics.inc("liftstream_sampler_sweeps_total", s.sweeps_per_tick)
        metrics.set("liftstream_sampler_bad_chains_total", self.service.bad_chains)
        metrics.set("liftstream_sampler_stale_writes_total", self.service.stale_writes)
        metrics.set_acceptance(self.service.acceptance)  # MH acceptance of the last tick
        for rec in recs:
            ctx.latest[(rec["experiment_id"], rec["metric"], rec["variant"])] = rec
            metrics.set("liftstream_chain_iterations", rec["diagnostics"]["iteration"],
                        experiment=rec["experiment_id"], metric=rec["metric"])
            metrics.set_data_quality(rec)  # per-experiment data_quality gauges
            key = f"{rec['experiment_id']}|{rec['metric']}|{rec['variant']}".encode()
            await ctx.topics.estimates.send(key=key, value=dumps(rec))
        for alert in alerts:
            await ctx.topics.alerts.send(key=alert["alert_id"].encode(), value=dumps(alert))


def install_sampler_timer(app: faust.App, ctx: AppContext) -> SamplerLoop:
    """Add the ``sampler_tick`` timer (every ``settings.tick_seconds``) to
    ``app``; needs ``ctx.sampler``; starts ``ctx.sampler_beat``.

    :returns: the loop the timer runs.
    """
    sampler = SamplerLoop(app, ctx)
    ctx.sampler_beat = time.monotonic()

    @app.timer(ctx.settings.tick_seconds)
    async def sampler_tick():
        try:
            await sampler.round()
        finally:  # /healthz: the sampler loop came round
            ctx.sampler_beat = time.monotonic()

    return sampler
