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

The agents and timers live in ``streams.service.agents`` (one module each:
``registry``, ``events_plane``, ``dirty``, ``sampler_timer``); what they share
is an ``AppContext`` (``streams.service.context``), ``app.context``.
"""

from __future__ import annotations

import os
import tempfile

import faust

from streams.config.settings import (
    FAUST_BROKER_SETTINGS,
    Settings,
    faust_broker_settings,
    redis_client,
)
from streams.service.agents.dirty import install_dirty_agent
from streams.service.agents.events_plane import install_events_plane
from streams.service.agents.registry import install_registry_agent
from streams.service.agents.sampler_timer import install_sampler_timer, make_sampler
from streams.service.context import ROLES, AppContext, ServiceTopics
from streams.service.metrics import Metrics
from streams.service.runtime import partition_for  # tests import it from here too
from streams.state.registry import Registry

__all__ = ["create_app", "partition_for"]


def create_app(settings: Settings, role: str = "all") -> faust.App:
    """The Faust app of one worker.

    :param settings: the worker's settings (broker and Redis with their
        credentials, topics, sampler, web server, ``datadir``).
    :param role: ``ingest``, ``sampler`` or ``all`` (both); the consumer group
        is ``<app_id>-<role>``.
    :returns: the app, not started (``app.main()`` runs it), with its
        ``AppContext`` as ``app.context``; it does not create topics
        (``streams.service.worker.run_worker`` does).
    :raises ValueError: an unknown role.
    """
    if role not in ROLES:
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
        datadir=settings.datadir or os.path.join(
            tempfile.gettempdir(), f"liftstream-{settings.app_id}-{role}"),
        **FAUST_BROKER_SETTINGS,
    )
    r = redis_client(settings, health_check_interval=10)
    # the events topic is not a Faust topic: streams.ingest.events_plane consumes it
    topics = {name: app.topic(name, value_serializer="raw", key_serializer="raw",
                              partitions=spec["partitions"])
              for name, spec in settings.topics().items() if name != settings.topic_events}
    ctx = AppContext(
        settings=settings, role=role, redis=r, registry=Registry(r), metrics=Metrics(),
        topics=ServiceTopics(experiments=topics[settings.topic_experiments],
                             dirty=topics[settings.topic_dirty],
                             estimates=topics[settings.topic_estimates],
                             alerts=topics[settings.topic_alerts],
                             deadletter=topics[settings.topic_deadletter]))
    app.context = ctx

    install_registry_agent(app, ctx)
    if role in ("ingest", "all"):
        install_events_plane(app, ctx)
    if role in ("sampler", "all"):
        ctx.sampler = make_sampler(ctx)
        install_dirty_agent(app, ctx)
        install_sampler_timer(app, ctx)

    from streams.service.web import register_pages

    register_pages(app, ctx)
    return app
