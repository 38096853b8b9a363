"""The ``dirty`` agent (sampler role): each experiment id on the dirty topic
(ingest applied events of it) is owned by this worker's sampler, since the
topic's partition that carried it is this worker's."""

from __future__ import annotations

import faust

from streams.service.context import AppContext


def install_dirty_agent(app: faust.App, ctx: AppContext) -> None:
    """Add the ``dirty`` agent on ``ctx.topics.dirty`` to ``app``; needs
    ``ctx.sampler``."""
    service = ctx.sampler
    assert service is not None, "the sampler role builds ctx.sampler first"

    @app.agent(ctx.topics.dirty, name="dirty")
    async def dirty_agent(stream):
        async for eid in stream:
            service.own(eid.decode())
