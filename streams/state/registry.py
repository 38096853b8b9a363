"""The experiment registry, materialised in Redis.

The source of truth is the compacted topic ``liftstream.experiments`` (key =
experiment id). Whichever worker consumes it writes each config to
``lr:{e:<id>}:cfg`` and the id to the set ``lr:experiments``, so every worker,
whatever partitions it owns, reads configs from Redis (cached for a few
seconds, re-read on a miss).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from schemas.codec import dumps, loads
from schemas.records import ExperimentConfig
from schemas.validate import (
    InvalidRecord,
    experiment_to_dict,
    incompatible_change,
    parse_experiment,
)
from streams.state import unit_index
from streams.state.keys import (
    EXPERIMENTS_SET,
    cells_key,
    cfg_key,
    experiment_and_unit_glob,
    experiment_key,
    generation_key,
    lifecycle_key,
    units_key,
)
from streams.state.store import as_bytes, mget

log = logging.getLogger("liftstream.registry")


def delete_state(r: Any, experiment_id: str, batch: int = 1000) -> int:
    """UNLINK every key of the experiment (all share ``lr:{e:<id>}:``) but
    its fences: its config, generation, unit records, cells, chains,
    estimates, history, alerts; and remove its field from every unit's
    routing index (its entries in the fields of every partition's index
    buckets, ``streams.state.unit_index``; of state from before issue 25,
    its field of every ``lr:{u:<unit>}:x``), so an experiment registered later
    under the same id inherits no exposure markers (issue 24: with them, its
    units' metrics without experiment_id were routed to it before any
    exposure, held and counted lost). The fences (``keys.fence_key``: owner
    epoch and commit sequence per source) stay: a running owner's next
    commit is then no ``LostCommits`` (a false Redis regression and a seek
    back), and no zombie of an older epoch can claim a fence lowered to
    nothing; the owner sees the generation gone or changed instead and
    reads the new incarnation from scratch (``partition_store.Commit``).
    A rare operator action, so a SCAN of the keyspace is acceptable here
    (request paths never scan); ONE walk finds both kinds of key (SCAN
    visits every key whatever its MATCH: two patterns were two walks).
    Returns the number of experiment keys removed."""
    own = experiment_key(experiment_id, "").encode()
    fence = experiment_key(experiment_id, "fence:").encode()
    n = 0
    doomed: list = []
    index = r.pipeline(transaction=False)
    for k in r.scan_iter(match=experiment_and_unit_glob(), count=batch):
        kb = k if isinstance(k, bytes) else k.encode()
        if kb.startswith(own):
            if not kb.startswith(fence):
                doomed.append(k)
                if len(doomed) >= batch:
                    n += r.unlink(*doomed)
                    doomed = []
        elif _is_unit_index(kb):
            index.hdel(k, experiment_id)  # a hash left empty is gone with its last field
            if len(index) >= batch:
                index.execute()
        elif unit_index.is_bucket(kb):  # few keys (a handful per partition), many fields
            unit_index.drop_experiment(r, k, experiment_id, batch)
    if doomed:
        n += r.unlink(*doomed)
    if len(index):
        index.execute()
    return n


def _is_unit_index(key: bytes) -> bool:
    """Whether ``key`` is a unit's routing index (``keys.unit_index_key``)."""
    return key.startswith(b"lr:{u:") and key.endswith(b"}:x")


class Registry:
    """Configs from Redis, cached per process.

    A registered experiment's config (and whether it is concluded) is cached
    for ``ttl`` seconds; an id that is not registered for ``negative_ttl``
    seconds, in a cache of at most ``max_negative`` ids (the oldest forgotten
    first), so junk experiment ids on the events topic cost neither memory
    nor a Redis command each: ``get_many`` reads every id it has no fresh
    entry for with one MGET (issue 24 defect 8). A ``put`` or ``delete``
    through this object updates its cache at once; another process's is seen
    within the TTLs. Each config is cached with the experiment's generation
    (``keys.generation_key``, read in the same MGET): which incarnation of
    the id the config belongs to, so a caller that finds another generation
    in Redis knows its cached config is of a deleted (or deleted and
    re-created) experiment (``generation``; ``Ingestor.process``)."""

    def __init__(self, r: Any, ttl: float = 5.0, negative_ttl: float = 1.0,
                 max_negative: int = 4096):
        self.r = r
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_negative = max_negative
        #: registered ids: (read at, config, concluded, generation); bounded by
        #: the registry
        self._cache: dict[str, tuple[float, ExperimentConfig, bool, bytes | None]] = {}
        #: ids found unregistered: read at (insertion order = age)
        self._missing: OrderedDict[str, float] = OrderedDict()

    def put(self, cfg: ExperimentConfig, now_ms: int | None = None) -> ExperimentConfig:
        """Register ``cfg``; returns the config as stored. Without
        ``started_at`` it keeps the registered one, or, for a new experiment,
        gets the registration time (``now_ms``, default the wall clock) on
        the bucket grid (``with_start``), so D and the entry buckets never
        depend on the events' own timestamps (issue 24 defect 6). A change
        that an experiment with state cannot take
        (``schemas.validate.incompatible_change``; once concluded, also its
        end_at and status) raises ``InvalidRecord("incompatible_config")``;
        the running config stays."""
        eid = cfg.experiment_id
        old = self.get(eid, fresh=True)
        has_state, concluded = self._state_of(eid)
        cfg = with_start(cfg, old, has_state, now_ms)
        if old is not None and (has_state or concluded):
            why = incompatible_change(old, cfg, concluded=concluded)
            if why is not None:
                raise InvalidRecord("incompatible_config",
                                    f"experiment {eid!r}: {why}; the running "
                                    "config stays", None)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(cfg_key(eid), dumps(experiment_to_dict(cfg)))
        # a new experiment (or one from before generations): its generation
        pipe.set(generation_key(eid), uuid.uuid4().hex, nx=True)
        pipe.get(generation_key(eid))
        pipe.sadd(EXPERIMENTS_SET, eid)
        gen = pipe.execute()[2]
        self._remember(eid, cfg, concluded, gen)
        return cfg

    def _state_of(self, eid: str) -> tuple[bool, bool]:
        """(has units or cells, concluded): what limits a config change."""
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(units_key(eid), cells_key(eid))
        pipe.exists(lifecycle_key(eid))
        n_state, n_lc = pipe.execute()
        return bool(n_state), bool(n_lc)

    def delete(self, experiment_id: str) -> int:
        """A tombstone on the topic deletes the experiment: out of the
        registry (ingest dead-letters its events ``unknown_experiment``, the
        API answers 404) and every key of it removed (``delete_state``).
        Returns the number of keys removed. Workers that cached its config
        (for up to ``ttl`` more seconds) write none of its state: each batch
        checks the cached config's generation (``Ingestor.process``, the
        owner's ``apply_rows``); a delete during a batch may leave the
        batch's routing markers: call again (``sweep``) after ``ttl``."""
        self.r.srem(EXPERIMENTS_SET, experiment_id)
        self._cache.pop(experiment_id, None)
        return delete_state(self.r, experiment_id)

    def sweep(self, experiment_id: str) -> int | None:
        """A tombstone's second delete (after every worker's cache expired:
        what a worker with a stale config wrote after the first one goes),
        only while the id is still unregistered: an experiment registered
        again under it since is a new one, not the deleted one's leftovers.
        Returns the keys removed, None when it was registered again."""
        if self.get(experiment_id, fresh=True) is not None:
            return None
        return self.delete(experiment_id)

    def get(self, experiment_id: str, fresh: bool = False) -> ExperimentConfig | None:
        """The config of ``experiment_id``, or None if it is not registered;
        ``fresh``: read Redis whatever the cache holds."""
        return self._lookup((experiment_id,), fresh).get(experiment_id)

    def get_many(self, ids: Iterable[str], fresh: bool = False) -> dict[str, ExperimentConfig]:
        """The registered configs among ``ids`` (one MGET for those without a
        fresh cache entry, none when all have one; ``fresh``: for all)."""
        return self._lookup(ids, fresh)

    def generation(self, experiment_id: str) -> bytes | None:
        """The generation (``keys.generation_key``) the cached config of
        ``experiment_id`` was read with, no Redis command; None: none stored
        with it (registered before generations) or nothing cached."""
        hit = self._cache.get(experiment_id)
        return None if hit is None else hit[3]

    def concluded(self, experiment_id: str) -> bool:
        """Whether the experiment is concluded, as of its cached entry (read
        by ``get_many`` with its config): no Redis command."""
        hit = self._cache.get(experiment_id)
        return hit is not None and hit[2]

    def cache_size(self) -> int:
        """Entries held: registered ids plus at most ``max_negative`` others."""
        return len(self._cache) + len(self._missing)

    def _lookup(self, ids: Iterable[str], fresh: bool) -> dict[str, ExperimentConfig]:
        now = time.monotonic()
        out: dict[str, ExperimentConfig] = {}
        stale: list[str] = []
        for eid in ids:
            hit = self._cache.get(eid)
            if not fresh and hit is not None and now - hit[0] < self.ttl:
                out[eid] = hit[1]
                continue
            seen = self._missing.get(eid)
            if not fresh and hit is None and seen is not None and now - seen < self.negative_ttl:
                continue
            stale.append(eid)
        if not stale:
            return out
        n = len(stale)
        got = mget(self.r, [cfg_key(e) for e in stale] + [lifecycle_key(e) for e in stale]
                   + [generation_key(e) for e in stale])
        for eid, raw, lc, gen in zip(stale, got[:n], got[n:2 * n], got[2 * n:], strict=True):
            cfg = self._parse(eid, raw)
            if cfg is None:
                self._forget(eid, now)
            else:
                self._remember(eid, cfg, lc is not None, gen, now)
                out[eid] = cfg
        return out

    @staticmethod
    def _parse(eid: str, raw: bytes | None) -> ExperimentConfig | None:
        try:
            return parse_experiment(loads(raw)) if raw else None
        except (InvalidRecord, ValueError) as e:
            # a bad stored config must not stop ingest: treat it as unregistered
            log.warning("experiment %s: stored config is invalid (%s)", eid, e)
            return None

    def _remember(self, eid: str, cfg: ExperimentConfig, concluded: bool, gen: Any,
                  now: float | None = None) -> None:
        self._missing.pop(eid, None)
        self._cache[eid] = (time.monotonic() if now is None else now, cfg, concluded,
                            as_bytes(gen))

    def _forget(self, eid: str, now: float) -> None:
        """``eid`` is not registered: drop its config, remember the miss for
        ``negative_ttl``, evicting the oldest misses beyond ``max_negative``."""
        self._cache.pop(eid, None)
        self._missing.pop(eid, None)
        self._missing[eid] = now
        while len(self._missing) > self.max_negative:
            self._missing.popitem(last=False)

    def ids(self) -> list[str]:
        return sorted(x.decode() if isinstance(x, bytes) else x
                      for x in self.r.smembers(EXPERIMENTS_SET))


def with_start(cfg: ExperimentConfig, old: ExperimentConfig | None, has_state: bool,
               now_ms: int | None = None) -> ExperimentConfig:
    """``cfg`` with the start it is registered with: its own ``started_at``;
    else the registered config's (a republished config without one keeps
    it; state from before starts were stamped keeps none, its grid is the
    epoch's); else ``now_ms`` (the wall clock) floored to the bucket grid."""
    if cfg.started_at is not None:
        return cfg
    if old is not None and (old.started_at is not None or has_state):
        return dataclasses.replace(cfg, started_at=old.started_at)
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    B = int(cfg.bucket_seconds) * 1000
    return dataclasses.replace(cfg, started_at=now // B * B)


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
