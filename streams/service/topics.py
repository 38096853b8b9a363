"""Create Kafka topics before any client touches them.

Why this exists instead of relying on auto-creation or on Faust declaring its
topics:

* Tansu (the embedded broker) auto-creates an unknown topic with 4 partitions
  on the first Metadata request that allows it (every producer, aiokafka), and
  has no CreatePartitions to fix that afterwards. Partition counts decide how
  far ingest and the sampler scale out, so they must be set on purpose, first.
* Tansu's CreateTopics validates nothing: illegal names, replication factor
  above the broker count and ``validate_only`` (which creates the topic) all
  "succeed". Names are checked here, existing topics are looked up with
  Metadata rather than probed with ``validate_only``.
* Topic configs such as ``cleanup.policy=compact`` are stored by Tansu (and
  shown by DescribeConfigs) but its memory engine never compacts; Apache Kafka
  does. They are passed as given; nothing here depends on them taking effect.

``ensure_topics`` is idempotent and safe to race: a topic that appears between
the lookup and the create (TOPIC_ALREADY_EXISTS) counts as existing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

_LEGAL_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class TopicSpec:
    """What a topic should look like: partitions, replication factor, configs."""

    name: str
    partitions: int = 1
    replication: int = 1
    config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _LEGAL_NAME.match(self.name) or self.name in (".", ".."):
            raise ValueError(f"illegal Kafka topic name {self.name!r} "
                             "(1-249 of [A-Za-z0-9._-], not '.' or '..')")
        if self.partitions < 1:
            raise ValueError(f"{self.name}: partitions must be >= 1, got {self.partitions}")
        if self.replication < 1:
            raise ValueError(f"{self.name}: replication must be >= 1, got {self.replication}")


class TopicMismatch(RuntimeError):
    """An existing topic has a different partition count than its spec."""


def ensure_topics(bootstrap: str | Mapping, specs: Iterable[TopicSpec], timeout: float = 10.0,
                  strict: bool = False) -> dict[str, str]:
    """Create the topics in ``specs`` that do not exist yet.

    Returns ``{name: "created" | "exists"}``. An existing topic is left alone
    (configs are not altered); if its partition count differs from the spec,
    that is logged, or raised as ``TopicMismatch`` with ``strict=True`` (a
    wrong count usually means something auto-created it first).
    ``bootstrap``: a bootstrap string or a client config
    (``streams.config.settings.kafka_config``, for SASL/TLS).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate topic names in {names}")
    from streams.config.settings import kafka_config

    admin = AdminClient(kafka_config(bootstrap))
    existing = admin.list_topics(timeout=timeout).topics
    result: dict[str, str] = {}
    todo: list[TopicSpec] = []
    for spec in specs:
        meta = existing.get(spec.name)
        if meta is not None and meta.error is None:
            result[spec.name] = "exists"
            _check_partitions(spec, len(meta.partitions), strict)
        else:
            todo.append(spec)
    if todo:
        futures = admin.create_topics(
            [NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication,
                      config={k: str(v) for k, v in s.config.items()}) for s in todo],
            operation_timeout=timeout, request_timeout=timeout)
        for spec in todo:
            try:
                futures[spec.name].result(timeout)
                result[spec.name] = "created"
                log.info("created topic %s (%d partitions)", spec.name, spec.partitions)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    result[spec.name] = "exists"
                else:
                    raise
        topics = _await_metadata(admin, todo, timeout)
        for spec in todo:
            if result[spec.name] == "exists":  # lost a race to another creator
                _check_partitions(spec, len(topics[spec.name].partitions), strict)
    return result


def _check_partitions(spec: TopicSpec, actual: int, strict: bool) -> None:
    if actual == spec.partitions:
        return
    msg = (f"topic {spec.name} has {actual} partitions, spec says {spec.partitions} "
           "(created by someone else first? Tansu auto-creates with 4)")
    if strict:
        raise TopicMismatch(msg)
    log.warning(msg)


def _await_metadata(admin: AdminClient, specs: list[TopicSpec], timeout: float) -> dict:
    """Wait until Metadata lists every new topic with all its partitions, so
    that a producer started right after us does not race the creation (and, on
    Tansu, auto-create it with the wrong partition count)."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        missing = [s.name for s in specs
                   if s.name not in topics or topics[s.name].error is not None
                   or not topics[s.name].partitions]
        if not missing:
            return topics
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not visible in metadata after {timeout:.0f}s: {missing}")
        time.sleep(0.05)
