"""Redis Cluster for real (issue 15, item 7): a 3-master cluster started from
the same redis-server binary (``tests/support/redis_cluster_support.py``), the worker
connected by ``redis+cluster://`` URL.

* ``test_cluster_url``: the URL forms ``streams.config.settings.redis_client`` takes.
* ``test_keys_spread``: ingest in-process on the cluster (``apply_source_batch``,
  the worker's path): every key of an experiment lies in one slot, the ingest
  positions (``lr:{ingest}:*``, one script) in one slot, the units' routing
  keys on every master; the state equals the reducer's.
* ``test_end_to_end_on_cluster``: ``tests/integration/test_streaming.py``'s
  main scenario (``test_end_to_end``, plain; its body is in
  ``tests/support/streaming_scenarios.py``) unchanged, with its worker and its
  Redis reads on the cluster: state equal to the reference fold, estimates
  matching ``liftstream analyze``. Then the key layout of the keys the worker wrote.
* ``test_differential_through_kafka_on_cluster``: the random-stream
  differential (``test_differential_through_kafka``'s scenario: holds,
  unit-level holds and their expiry, duplicates, late events) through Kafka
  and a worker on the cluster, bit for bit.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.config.settings import Settings, cluster_url_parts, is_cluster_url, redis_client
from streams.ingest.ingestor import Ingestor
from streams.sampling.advance import StoredChains, TickConfig
from streams.sampling.sampler import SamplerService
from streams.state.keys import (
    INGEST_OFFSETS,
    NOTICE_CHANNEL,
    PARTITION_CLOCKS,
    PARTITION_EPOCHS,
    estimate_key,
    experiment_key,
)
from streams.state.registry import Registry
from streams.state.semantics import Reducer
from streams.state.store import (
    _is_cluster,
    advance_partition,
    apply_source_batch,
    claim_partition,
    event_row,
    migrate_ingest_keys,
    read_snapshot,
)
from streams.state.unit_index import PAD, index_pttl, is_bucket, read_index, unpack
from tests.support.redis_cluster_support import (  # noqa: F401 - fixtures
    cluster_r,
    cluster_url,
    master_of,
    redis_cluster_service,
)
from tests.support.streaming_harness import bits
from tests.support.streaming_scenarios import (
    END_TO_END_CASES,
    differential_through_kafka,
    end_to_end,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DAY_MS = 86_400_000


@pytest.fixture()
def redis_url(cluster_url):  # noqa: F811 - the fixture
    """The harness's Redis is the cluster (overrides conftest's single server)."""
    return cluster_url


@pytest.fixture()
def r(cluster_r):  # noqa: F811 - the fixture
    """The scenarios' Redis reads go to the cluster."""
    return cluster_r


def test_cluster_url():
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("REDISS+CLUSTER://h:1")
    assert not is_cluster_url("redis://h:1/0")
    assert cluster_url_parts("redis+cluster://a:7000,b:7001, c") == (
        False, None, None, [("a", 7000), ("b", 7001), ("c", 6379)])
    assert cluster_url_parts("rediss+cluster://u:p%40w@a:7000,b:7001") == (
        True, "u", "p@w", [("a", 7000), ("b", 7001)])
    for bad in ("redis+cluster://a:7000/1", "redis+cluster://", "redis://a:1"):
        with pytest.raises(ValueError):
            cluster_url_parts(bad)
    s = Settings(redis_url="redis+cluster://u:secret@a:7000,b:7001")
    assert "secret" not in repr(s) and "secret" in s.secrets()


def slots_of(c, keys) -> set[int]:
    return {c.keyslot(k) for k in keys}


def assert_layout(c, eid: str, units) -> dict[str, int]:
    """An experiment's keys in one slot, ingest positions in one slot, each
    source partition's routing index (issue 25: ``lr:{x:<src>}:*``) in one
    slot holding an entry of every unit. Returns index entries per master."""
    keys = [k.decode() for k in c.scan_iter(match=experiment_key(eid, "*"))]
    assert {experiment_key(eid, k) for k in ("cfg", "shards", "meta", "offsets")} \
        <= set(keys), sorted(keys)
    assert slots_of(c, keys) == {c.keyslot(experiment_key(eid, "cfg"))}, sorted(keys)
    assert len(slots_of(c, [INGEST_OFFSETS, PARTITION_CLOCKS, PARTITION_EPOCHS])) == 1
    assert c.exists(INGEST_OFFSETS) and c.exists(PARTITION_CLOCKS)
    per_master: dict[str, int] = {}
    found: set[str] = set()
    for src in {k.decode().split("}")[0] for k in c.scan_iter(match="lr:{x:*")}:
        index = [k for k in c.scan_iter(match=src + "}:*")]
        assert len(slots_of(c, [k.decode() for k in index])) == 1, index
        for k in index:
            if is_bucket(k):
                fields = _entries(c, k)
                found |= {u for u, es in fields.items() if eid in es}
                m = master_of(c, k.decode())
                per_master[m] = per_master.get(m, 0) + sum(map(len, fields.values()))
    assert set(units) <= found, sorted(set(units) - found)
    return per_master


def index_units(c, eid: str) -> set[str]:
    """The units with an entry of ``eid`` in any partition's routing index."""
    out: set[str] = set()
    for k in c.scan_iter(match="lr:{x:*"):
        if is_bucket(k):
            out |= {u for u, es in _entries(c, k).items() if eid in es}
    return out


def _entries(c, bucket) -> dict[str, dict[str, str]]:
    """A routing index bucket's units -> experiment -> position (its pad
    field left out)."""
    return {f.decode(): unpack(v.decode()) for f, v in c.hgetall(bucket).items()
            if f.decode() != PAD[0]}


def test_keys_spread(cluster_r):  # noqa: F811 - the fixture
    """The worker's ingest path, in process, on the cluster."""
    c = cluster_r
    assert _is_cluster(c) and len(c.get_primaries()) == 3
    assert migrate_ingest_keys(c) == 0  # nothing to rename on a cluster
    t0 = (int(time.time() * 1000) // DAY_MS - 10) * DAY_MS
    cfg = ExperimentConfig(experiment_id="spread", variants=("control", "treatment"),
                           control="control", metrics=(MetricSpec("rev"),),
                           window_seconds=60, bucket_seconds=60, started_at=t0)
    rng = random.Random(5)
    units = [f"u{i}" for i in range(60)]
    evs = []
    for i, u in enumerate(units):
        if i % 10 == 9:  # a metric before its exposure, without experiment_id: held
            evs.append(Metric(f"pm{i}", u, "rev", 1.0, t0 + i * 1000))
        evs.append(Exposure(f"x{i}", "spread", u, rng.choice(cfg.variants), t0 + i * 1000 + 1,
                            float(rng.randint(0, 28))))
        evs.append(Metric(f"m{i}", u, "rev", rng.uniform(0, 5), t0 + i * 1000 + 2,
                          rng.choice([None, "spread"])))
    topic = "t.events"
    Registry(c).put(cfg)
    epoch = claim_partition(c, topic, 0)
    red = Reducer([cfg])
    known = {"spread": cfg}
    for start in range(0, len(evs), 25):  # batches of 25
        part = evs[start:start + 25]
        rows = [event_row(start + j, e) for j, e in enumerate(part)]
        apply_source_batch(c, known, topic, 0, rows, epoch=epoch)
        red.apply_batch(f"{topic}|0", part)
    end = t0 + 2 * DAY_MS  # every window closed: cells filled
    advance_partition(c, [cfg], topic, 0, end, epoch=epoch)
    red.advance(f"{topic}|0", end)
    got = read_snapshot(c, cfg)
    want = red.states["spread"].snapshot()
    assert bits(got) == bits(want)
    assert sum(got.exposed.values()) == len(units) == sum(got.matured.values())
    per_master = assert_layout(c, "spread", units)
    print(f"\n[cluster] routing index entries per master: {per_master}")


def test_conclusion_deletes_sighting_buckets_on_cluster(cluster_r):  # noqa: F811
    """Conclusion WATCHes meta to read the sighting buckets it deletes
    (``partition_store.SeenBuckets``): on the cluster's transaction too."""
    from streams.sampling.sampler import conclude

    c = cluster_r
    now = int(time.time() * 1000)
    cfg = ExperimentConfig(experiment_id="cseen", metrics=(MetricSpec("rev"),))
    Registry(c).put(cfg)
    epoch = claim_partition(c, "t.seen", 0)
    apply_source_batch(c, {"cseen": cfg}, "t.seen", 0,
                       [event_row(0, Exposure("x1", "cseen", "cu", "control", now)),
                        event_row(1, Metric("m1", "cu", "rev", 1.0, now + 1, "cseen"))],
                       epoch=epoch)

    def seen():
        return [k for k in c.scan_iter(match=experiment_key("cseen", "*")) if b":seen:" in k]

    assert seen()
    conclude(c, cfg)
    assert seen() == []


def test_routing_ttl_delete_and_sampler_writes_on_cluster(cluster_r):  # noqa: F811
    """Issue 24 on the cluster's code paths (the routing index's commands as
    a redis-py pipeline over the units' slots, scripts one call each): the
    routing index TTL is the worker's over every running experiment
    (``Ingestor.index_ttl``), so an exposure to the short experiment keeps
    the long one's; the sampler's
    guarded writes (and their notice) land in a registered experiment; a
    delete removes the experiment's keys and its routing-index fields, and a
    tick in flight across it writes nothing back."""
    c = cluster_r
    now = int(time.time() * 1000)
    long_ = ExperimentConfig(experiment_id="clong", window_seconds=60, correction_seconds=60,
                             lateness_seconds=0)
    short = ExperimentConfig(experiment_id="cshort", window_seconds=1, correction_seconds=0,
                             lateness_seconds=0)
    reg = Registry(c)
    for cfg in (long_, short):
        reg.put(cfg)
    ttl = Ingestor(c, reg).index_ttl({"cshort": short})  # the registry's, not the batch's
    apply_source_batch(c, {"clong": long_}, "t.ttl", 0,
                       [event_row(0, Exposure("x1", "clong", "cu", "control", now))],
                       index_ttl=ttl)
    apply_source_batch(c, {"cshort": short}, "t.ttl", 0,
                       [event_row(1, Exposure("x2", "cshort", "cu", "control", now + 1))],
                       index_ttl=ttl)
    assert index_pttl(c, "t.ttl", 0, "cu", "clong") > 200_000

    svc = SamplerService(c, reg, TickConfig())
    eff = {"mean": 0.1, "lo": 0.0, "hi": 0.2}
    rec = {"experiment_id": "clong", "metric": "value", "variant": "treatment",
           "computed_at": now, "watermark": {"event_time": now}, "adjusted": {"effect": eff},
           "naive": {"effect": eff}, "diagnostics": {"rhat": 1.0, "iteration": 50}}
    chains = {("clong", "value"): StoredChains({"iteration": np.array(50)}, None)}
    ps = c.pubsub()
    ps.subscribe(NOTICE_CHANNEL)
    svc.load(["clong"])
    assert svc.store(chains, [rec]) == [rec]
    assert c.get(estimate_key("clong", "value", "treatment"))
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        m = ps.get_message(timeout=0.5)
        got = m if m and m["type"] == "message" else None
    assert got is not None, "the estimate's notice"
    ps.close()

    chains = {("clong", "value"): StoredChains({"iteration": np.array(100)}, None)}
    reg.delete("clong")
    assert svc.store(chains, [dict(rec, diagnostics={"rhat": 1.0, "iteration": 100})]) == []
    assert not list(c.scan_iter(match=experiment_key("clong", "*")))
    assert read_index(c, "t.ttl", 0, ["cu"], ["clong", "cshort"])["cu"] == {
        "cshort": "t.ttl|0|1"}


def test_end_to_end_on_cluster(new_stack, workers, r, tmp_path):
    t0 = time.monotonic()
    end_to_end(new_stack, workers, r, tmp_path, *END_TO_END_CASES["plain"])
    elapsed = time.monotonic() - t0
    units = index_units(r, "e2e")
    assert units
    per_master = assert_layout(r, "e2e", units)
    print(f"[cluster] end to end on 3 masters: {elapsed:.1f}s; {len(units)} units' routing "
          f"index entries per master: {per_master}")


def test_differential_through_kafka_on_cluster(new_stack, workers, r):
    t0 = time.monotonic()
    differential_through_kafka(new_stack, workers, r)
    print(f"[cluster] differential through Kafka on 3 masters: {time.monotonic() - t0:.1f}s")


def test_redis_client_single_server_unchanged():
    c = redis_client(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert not _is_cluster(c)


def test_migrate_ingest_keys_single_server(redis_service):
    """A single server's pre-cluster ``lr:ingest:{offsets,clocks,epochs}``
    take their ``lr:{ingest}:`` names once; a new key already there is kept."""
    import redis

    c = redis.Redis.from_url(redis_service.url)
    try:
        c.flushall()
        c.hset("lr:ingest:offsets", "t|0", 41)
        c.hset("lr:ingest:epochs", "t|0", 3)
        c.hset("lr:ingest:clocks", "t|0", 1000)
        c.hset(PARTITION_CLOCKS, "t|0", 2000)  # written by a new worker: stays
        assert migrate_ingest_keys(c) == 2
        assert c.hget(INGEST_OFFSETS, "t|0") == b"41" and not c.exists("lr:ingest:offsets")
        assert claim_partition(c, "t", 0) == 4  # the epochs went on, not from 1
        assert c.hget(PARTITION_CLOCKS, "t|0") == b"2000" and c.exists("lr:ingest:clocks")
        assert migrate_ingest_keys(c) == 0
    finally:
        c.flushall()
        c.close()
