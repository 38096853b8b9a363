"""The ``registry`` agent (every role): the experiments topic into the
registry in Redis; a tombstone deletes every key of the experiment, once at
once and once more after every worker's config cache expired (unless it was
registered again in between: ``Registry.sweep``); a refused
config is dead-lettered."""

from __future__ import annotations

import asyncio
import logging
import time

import faust

from schemas.codec import dumps
from schemas.contracts import dead_letter_record
from schemas.validate import InvalidRecord, parse_experiment
from streams.service.context import AppContext
from streams.service.runtime import with_retry

log = logging.getLogger("liftstream")


def install_registry_agent(app: faust.App, ctx: AppContext) -> None:
    """Add the ``registry`` agent on ``ctx.topics.experiments`` to ``app``."""
    registry = ctx.registry

    @app.agent(ctx.topics.experiments, name="registry")
    async def registry_agent(stream):
        async for event in stream.events():
            key, raw = event.key, event.value
            try:
                if raw is None:  # deleted: every key of it goes, and again once
                    eid = key.decode()  # no worker can still hold its cached config
                    await with_retry(registry.delete, eid, what="registry")

                    async def sweep_again(eid=eid):
                        await asyncio.sleep(2 * registry.ttl + 1)
                        await with_retry(registry.sweep, eid, what="registry")

                    ctx.sweeps.add(asyncio.ensure_future(sweep_again()))
                    continue
                cfg = parse_experiment(raw)
                await with_retry(registry.put, cfg, what="registry")
            except InvalidRecord as err:  # bad, or a change its state cannot take
                m = event.message
                log.warning("experiment config at offset %s refused: %s", m.offset, err.message)
                rec = dead_letter_record(raw, err, m.topic, m.partition, m.offset,
                                         int(time.time() * 1000))
                await (await ctx.topics.deadletter.send(value=dumps(rec)))
