"""The typed state one Faust app of liftstream shares between its agents,
timers and HTTP routes (``create_app`` builds it; ``app.context`` holds it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faust.types import TopicT

    from streams.config.settings import Settings
    from streams.ingest.events_plane import EventsPlane
    from streams.sampling.sampler import SamplerService
    from streams.service.metrics import Metrics
    from streams.state.registry import Registry

#: The roles a worker runs (``liftstream worker --role``).
ROLES = ("ingest", "sampler", "all")


@dataclass(frozen=True)
class ServiceTopics:
    """The Faust topics the app sends to or consumes (the events topic is not
    one: ``streams.ingest.events_plane`` consumes it with confluent-kafka)."""

    experiments: TopicT
    dirty: TopicT
    estimates: TopicT
    alerts: TopicT
    deadletter: TopicT


@dataclass
class AppContext:
    """Everything the agents, timers and routes of one worker share.

    ``plane`` is set in the ingest role (``agents.events_plane``), ``sampler``
    and ``sampler_beat`` in the sampler role (``agents.sampler_timer``);
    ``latest`` is the newest estimate record published per (experiment,
    metric, variant), for ``/metrics``; ``sweeps`` the pending second deletes
    of deleted experiments (``agents.registry``).
    """

    settings: Settings
    role: str
    redis: Any  # redis.Redis or redis.cluster.RedisCluster (settings.redis_client)
    registry: Registry
    metrics: Metrics
    topics: ServiceTopics
    plane: EventsPlane | None = None
    sampler: SamplerService | None = None
    sampler_beat: float | None = None  # time.monotonic() of the sampler loop's last round
    latest: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    sweeps: set[asyncio.Future] = field(default_factory=set)

    def beats(self) -> dict[str, float]:
        """The last round (``time.monotonic()``) of each loop this worker runs
        and that is running: ``ingest`` (a live events plane), ``sampler``."""
        beats = {}
        if self.plane is not None and self.plane.alive:
            beats["ingest"] = self.plane.status.heartbeat
        if self.sampler_beat is not None:
            beats["sampler"] = self.sampler_beat
        return beats
