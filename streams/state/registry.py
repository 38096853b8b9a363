"""The experiment registry, materialised in Redis.

The source of truth is the compacted topic ``liftstream.experiments`` (key =
experiment id). Whichever worker consumes it writes each config to
``lr:{e:<id>}:cfg`` and the id to the set ``lr:experiments``, so every worker,
whatever partitions it owns, reads configs from Redis (cached for a few
seconds, re-read on a miss).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from schemas.codec import dumps, loads
from schemas.records import ExperimentConfig
from schemas.validate import (
    InvalidRecord,
    experiment_to_dict,
    incompatible_change,
    parse_experiment,
)
from streams.state.keys import (
    EXPERIMENTS_SET,
    cells_key,
    cfg_key,
    experiment_glob,
    generation_key,
    unit_index_glob,
    units_key,
)

log = logging.getLogger("liftstream.registry")


def delete_state(r: Any, experiment_id: str, batch: int = 1000) -> int:
    """UNLINK every key of the experiment (all share ``lr:{e:<id>}:``): its
    config, generation, unit records, cells, chains, estimates, history,
    alerts; and remove its field from every unit's routing index
    (``lr:{u:<unit>}:x``), so an experiment registered later under the same
    id inherits no exposure markers (issue 24: with them, its units' metrics
    without experiment_id were routed to it before any exposure, held and
    counted lost). A rare operator action, so a SCAN of the keyspace is
    acceptable here (request paths never scan). Returns the number of
    experiment keys removed."""
    n = 0
    buf: list = []
    for k in r.scan_iter(match=experiment_glob(experiment_id), count=batch):
        buf.append(k)
        if len(buf) >= batch:
            n += r.unlink(*buf)
            buf = []
    if buf:
        n += r.unlink(*buf)
    _forget_in_index(r, experiment_id, batch)
    return n


def _forget_in_index(r: Any, experiment_id: str, batch: int) -> None:
    """HDEL the experiment from every unit's routing index, ``batch`` keys a
    round trip (a hash left empty is gone with its last field)."""
    pipe = r.pipeline(transaction=False)
    for k in r.scan_iter(match=unit_index_glob(), count=batch):
        pipe.hdel(k, experiment_id)
        if len(pipe) >= batch:
            pipe.execute()
    if len(pipe):
        pipe.execute()


class Registry:
    def __init__(self, r: Any, ttl: float = 5.0):
        self.r = r
        self.ttl = ttl
        self._cache: dict[str, tuple[float, ExperimentConfig | None]] = {}

    def put(self, cfg: ExperimentConfig) -> None:
        """Register ``cfg``. A change that an experiment with state cannot
        take (``schemas.validate.incompatible_change``) raises
        ``InvalidRecord("incompatible_config")``; the running config stays."""
        old = self.get(cfg.experiment_id, fresh=True)
        if old is not None and self.r.exists(units_key(cfg.experiment_id),
                                              cells_key(cfg.experiment_id)):
            why = incompatible_change(old, cfg)
            if why is not None:
                raise InvalidRecord("incompatible_config",
                                    f"experiment {cfg.experiment_id!r}: {why}; the running "
                                    "config stays", None)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(cfg_key(cfg.experiment_id), dumps(experiment_to_dict(cfg)))
        # a new experiment (or one from before generations): its generation
        pipe.set(generation_key(cfg.experiment_id), uuid.uuid4().hex, nx=True)
        pipe.sadd(EXPERIMENTS_SET, cfg.experiment_id)
        pipe.execute()
        self._cache[cfg.experiment_id] = (time.monotonic(), cfg)

    def delete(self, experiment_id: str) -> int:
        """A tombstone on the topic deletes the experiment: out of the
        registry (ingest dead-letters its events ``unknown_experiment``, the
        API answers 404) and every key of it removed (``delete_state``).
        Returns the number of keys removed. Workers that cached its config
        may write for up to ``ttl`` more seconds: call again after that."""
        self.r.srem(EXPERIMENTS_SET, experiment_id)
        self._cache.pop(experiment_id, None)
        return delete_state(self.r, experiment_id)

    def get(self, experiment_id: str, fresh: bool = False) -> ExperimentConfig | None:
        hit = self._cache.get(experiment_id)
        if hit is not None and not fresh and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        raw = self.r.get(cfg_key(experiment_id))
        try:
            cfg = parse_experiment(loads(raw)) if raw else None
        except (InvalidRecord, ValueError) as e:
            # a bad stored config must not stop ingest: treat it as unregistered
            log.warning("experiment %s: stored config is invalid (%s)", experiment_id, e)
            cfg = None
        self._cache[experiment_id] = (time.monotonic(), cfg)
        return cfg

    def get_many(self, ids) -> dict[str, ExperimentConfig]:
        out = {}
        for e in ids:
            cfg = self.get(e)
            if cfg is None:
                cfg = self.get(e, fresh=True)
            if cfg is not None:
                out[e] = cfg
        return out

    def ids(self) -> list[str]:
        return sorted(x.decode() if isinstance(x, bytes) else x
                      for x in self.r.smembers(EXPERIMENTS_SET))


def bootstrap_from_topic(bootstrap, topic: str, registry: Registry,
                         timeout: float = 30.0) -> int:
    """Read the whole (compacted) experiments topic into the Redis registry.

    Run before a worker starts its agents, so ingest never sees an event of an
    experiment whose config is on the topic but not yet in Redis. Stops at the
    partitions' high watermarks as reported with fetched messages (Tansu's
    ListOffsets(latest) is unreliable, see ``streams.dev.embedded``). ``bootstrap``:
    a bootstrap string or a client config (``streams.config.settings.kafka_config``).
    """
    from confluent_kafka import Consumer, TopicPartition

    from streams.config.settings import kafka_config

    c = Consumer(kafka_config(bootstrap, **{"group.id": "liftstream-registry-bootstrap",
                                            "enable.auto.commit": False,
                                            "auto.offset.reset": "earliest"}))
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions) if topic in md.topics else []
        if not parts:
            return 0
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        latest: dict[bytes, bytes | None] = {}
        deadline = time.monotonic() + timeout

        def caught_up(p: int) -> bool:
            pos = c.position([TopicPartition(topic, p)])[0].offset
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), cached=True)
            return high <= 0 or pos >= high

        while True:
            if time.monotonic() > deadline:  # a partial registry would drop real events
                raise TimeoutError(f"registry bootstrap: {topic} not read to its end in "
                                   f"{timeout:.0f} s; not starting on a partial registry")
            msg = c.poll(0.3)
            if msg is None:
                if all(caught_up(p) for p in parts):
                    break
                continue
            if not msg.error():
                latest[msg.key()] = msg.value()
        for key, raw in latest.items():
            if raw is None:
                registry.delete(key.decode())
            else:
                try:
                    registry.put(parse_experiment(raw))
                except InvalidRecord as e:  # bad or incompatible: skipped, as by the agent
                    log.warning("registry bootstrap: %s", e.message)
        return len(latest)
    finally:
        c.close()
