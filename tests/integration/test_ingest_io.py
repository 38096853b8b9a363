"""Ingest I/O guarantees of issue 24 (defects 2 and 3, the events plane's part),
each on a real broker and a redis-server of the test's own:

* defect 3: a Redis that loses acknowledged writes while the worker runs
  (``DEBUG RELOAD NOSAVE`` reloads an older snapshot) is noticed before the
  next batch: the worker seeks back to Redis's applied offset + 1, counts it
  (``liftstream_ingest_redis_regressions_total``) and loses nothing;
* defect 3: a Redis that may evict keys (``maxmemory-policy`` other than
  ``noeviction``) is refused at start, naming the setting;
* defect 3: an applied offset below the partition's log start (retention
  deleted events never applied) is counted and logged, not silently skipped;
* defect 2: an event whose Kafka key is not its unit_id is dead-lettered
  ``key_mismatch``; a changed partition count of the events topic stops
  ingest until ``liftstream admin accept-partitions`` records it.
"""

from __future__ import annotations

import time

import orjson
import pytest
import redis

from schemas.records import ExperimentConfig, Exposure
from streams.dev.embedded import redis_server, start_redis
from streams.ingest.ingestor import ingest_offsets
from streams.state.keys import units_key
from tests.support.streaming_harness import (
    Workers,
    event_dict,
    make_stack,
    producer,
    scrape,
    start_web_worker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

T0 = int(time.time() * 1000) - 3_600_000
EXP = "rio"


def exposures(lo: int, hi: int, exp: str = EXP) -> list[dict]:
    return [event_dict(Exposure(f"e{i}", exp, f"u{i}", "control", T0 + i, 1.0))
            for i in range(lo, hi)]


def produce_keyed(bootstrap: str, topic: str, evs: list[dict], keys: list[bytes | None] | None
                  = None) -> None:
    """Produce ``evs`` to partition 0, keyed by unit id unless ``keys`` says
    otherwise; wait for delivery."""
    prod = producer(bootstrap)
    for i, e in enumerate(evs):
        key = e["unit_id"].encode() if keys is None else keys[i]
        prod.produce(topic, key=key, value=orjson.dumps(e), partition=0)
    assert prod.flush(30) == 0


@pytest.fixture()
def private_redis(tmp_path):
    """A redis-server of the test's own, without AOF (``DEBUG RELOAD`` then
    reloads the RDB file that the last ``SAVE`` wrote)."""
    rdir = tmp_path / "redis"
    rdir.mkdir()
    svc = start_redis(workdir=str(rdir), appendonly=False)
    r = redis.Redis.from_url(svc.url)
    try:
        yield svc, r
    finally:
        r.close()
        svc.stop()


def test_defect3_redis_regression_is_seeked_back(kafka_bootstrap, tmp_path, private_redis):
    svc, r = private_redis
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, svc.url, tmp_path, "rreg", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id=EXP)])
        topic = st.events_topic
        w = start_web_worker(ws, st, "ingest")
        applied = lambda: ingest_offsets(r, topic).get(0)  # noqa: E731

        produce_keyed(st.bootstrap, topic, exposures(0, 10))
        wait_until(lambda: applied() == 9, 90, "0-9 applied", workers=[w])
        r.save()
        produce_keyed(st.bootstrap, topic, exposures(10, 20))
        wait_until(lambda: applied() == 19, 60, "10-19 applied", workers=[w])
        r.execute_command("DEBUG", "RELOAD", "NOSAVE")  # Redis forgets 10-19
        assert applied() == 9 and r.hlen(units_key(EXP)) == 10
        produce_keyed(st.bootstrap, topic, exposures(20, 30))
        wait_until(lambda: applied() == 29, 60, "20-29 applied", workers=[w])
        wait_until(lambda: r.hlen(units_key(EXP)) == 30, 20,
                   "every exposure in Redis (the lost 10-19 re-applied)", workers=[w],
                   info=lambda: f"units: {r.hlen(units_key(EXP))}")
        metrics = w.get("/metrics").decode()
        got = scrape(metrics, "liftstream_ingest_redis_regressions_total")
        assert sum(got.values()) >= 1, metrics
        assert "redis lost" in w.log_tail(20_000)
        assert w.alive()
    finally:
        ws.close()


def test_defect3_redis_restart_is_noticed_while_idle(kafka_bootstrap, tmp_path, private_redis):
    """Redis restarts from an older snapshot while the partition is idle: the
    changed run_id makes the worker check its owned partitions at once, so the
    lost events are applied again without waiting for new ones."""
    import shutil

    svc, r = private_redis
    rdir = tmp_path / "redis"
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, svc.url, tmp_path, "rrst", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id=EXP)])
        topic = st.events_topic
        w = ws.start(st, "ingest")
        applied = lambda: ingest_offsets(r, topic).get(0)  # noqa: E731
        produce_keyed(st.bootstrap, topic, exposures(0, 10))
        wait_until(lambda: applied() == 9, 90, "0-9 applied", workers=[w])
        r.save()
        shutil.copy(rdir / "dump.rdb", tmp_path / "old.rdb")
        produce_keyed(st.bootstrap, topic, exposures(10, 20))
        wait_until(lambda: applied() == 19, 60, "10-19 applied", workers=[w])
        r.close()
        svc.kill()
        shutil.copy(tmp_path / "old.rdb", rdir / "dump.rdb")
        svc2 = start_redis(port=svc.port, workdir=str(rdir), appendonly=False)
        r2 = redis.Redis.from_url(svc2.url)
        try:
            wait_until(lambda: r2.hlen(units_key(EXP)) == 20, 30,
                       "the lost 10-19 applied again (no new events)", workers=[w],
                       info=lambda: f"units: {r2.hlen(units_key(EXP))}")
            assert "redis changed identity" in w.log_tail(20_000)
        finally:
            r2.close()
            svc2.stop()
    finally:
        ws.close()


def test_defect2_key_mismatch_dead_lettered(kafka_bootstrap, redis_url, tmp_path, workers):
    """An event whose Kafka key is not its unit_id (another id, or none) is
    dead-lettered ``key_mismatch``, counted per experiment, and not applied."""
    from schemas.codec import loads
    from streams.state.keys import meta_key
    from tests.support.streaming_harness import consume_all

    r = redis.Redis.from_url(redis_url)
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "kmm", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id=EXP)])
        w = workers.start(st, "ingest")
        produce_keyed(st.bootstrap, st.events_topic, exposures(0, 3),
                      keys=[b"u0", b"u0", None])
        wait_until(lambda: ingest_offsets(r, st.events_topic).get(0) == 2, 90,
                   "the three events read", workers=[w])
        assert r.hlen(units_key(EXP)) == 1
        dls = consume_all(st.bootstrap, st.deadletter_topic, lambda ms: len(ms) >= 2, 30)
        recs = sorted((loads(m.value()) for m in dls), key=lambda d: d["source"]["offset"])
        assert [(d["source"]["offset"], d["reason"]["code"]) for d in recs] == [
            (1, "key_mismatch"), (2, "key_mismatch")]
        assert int(r.hget(meta_key(EXP), "dl:key_mismatch")) == 2
    finally:
        r.close()


def _admin(st, *argv: str):
    import subprocess
    import sys

    from tests.support.streaming_harness import REPO

    return subprocess.run([sys.executable, "-m", "streams.cli", "admin", *argv,
                           "--topic", st.events_topic], cwd=REPO, env=st.env(),
                          capture_output=True, text=True, timeout=60)


def test_defect2_partition_count_change_refused_until_accepted(kafka_bootstrap, redis_url,
                                                              tmp_path, workers):
    """Redis's state was built with another partition count than the events
    topic has: the worker refuses to start, naming ``admin accept-partitions``;
    after it (dry run first), it starts and applies."""
    from streams.state.keys import TOPIC_PARTITIONS

    r = redis.Redis.from_url(redis_url)
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "pcnt", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id=EXP)])
        r.hset(TOPIC_PARTITIONS, st.events_topic, 2)  # built with 2; the topic has 1
        produce_keyed(st.bootstrap, st.events_topic, exposures(0, 3))
        w = workers.start(st, "ingest")
        wait_until(lambda: not w.alive(), 90, "the worker to refuse the partition count")
        assert w.returncode != 0
        assert "accept-partitions" in w.log_tail(20_000)
        assert r.hlen(units_key(EXP)) == 0

        dry = _admin(st, "accept-partitions")
        assert dry.returncode == 0 and "would record 1" in dry.stdout, dry
        assert r.hget(TOPIC_PARTITIONS, st.events_topic) == b"2"
        out = _admin(st, "accept-partitions", "--yes")
        assert out.returncode == 0, out.stderr
        assert r.hget(TOPIC_PARTITIONS, st.events_topic) == b"1"
        w.start()
        wait_until(lambda: r.hlen(units_key(EXP)) == 3, 90, "the events applied", workers=[w])
    finally:
        r.close()


def test_defect2_partitions_added_while_running_stop_ingest(kafka_bootstrap, redis_url,
                                                           tmp_path, workers):
    """Partitions added to the events topic while a worker runs: it stops,
    naming the way out; ``admin accept-partitions --yes`` and a restart
    resume ingest on every partition."""
    from confluent_kafka.admin import AdminClient, NewPartitions

    from streams.state.keys import TOPIC_PARTITIONS

    r = redis.Redis.from_url(redis_url)
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "padd", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id=EXP)])
        w = workers.start(st, "ingest")
        produce_keyed(st.bootstrap, st.events_topic, exposures(0, 2))
        wait_until(lambda: r.hlen(units_key(EXP)) == 2, 90, "the first events", workers=[w])
        assert r.hget(TOPIC_PARTITIONS, st.events_topic) == b"1"
        admin = AdminClient({"bootstrap.servers": st.bootstrap})
        try:
            admin.create_partitions([NewPartitions(st.events_topic, 2)])[
                st.events_topic].result(30)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"the broker cannot add partitions: {e}")
        wait_until(lambda: not w.alive(), 60, "the worker to stop on the new partition count")
        assert "accept-partitions" in w.log_tail(20_000)
        assert _admin(st, "accept-partitions", "--yes").returncode == 0
        assert r.hget(TOPIC_PARTITIONS, st.events_topic) == b"2"
        w.start()
        prod = producer(st.bootstrap)
        e = exposures(5, 6)[0]
        prod.produce(st.events_topic, key=e["unit_id"].encode(),
                     value=orjson.dumps(e), partition=1)
        assert prod.flush(30) == 0
        wait_until(lambda: r.hlen(units_key(EXP)) == 3, 90, "the new partition's event",
                   workers=[w])
    finally:
        r.close()


def test_defect3_evicting_redis_refused(kafka_bootstrap, tmp_path, workers):
    """A Redis whose maxmemory-policy evicts keys would delete state under
    memory pressure: ingest refuses to start, naming the setting; the
    embedded redis-server (``start_redis``) runs ``noeviction``."""
    from streams.state.store import EvictingRedis, check_eviction_policy

    (tmp_path / "r").mkdir()
    svc = start_redis(workdir=str(tmp_path / "r"), extra=["--maxmemory-policy", "allkeys-lru"])
    r = redis.Redis.from_url(svc.url)
    try:
        with pytest.raises(EvictingRedis, match="maxmemory-policy is allkeys-lru"):
            check_eviction_policy(r)
        st = make_stack(kafka_bootstrap, svc.url, tmp_path, "evict", partitions=1)
        st.create_topics()
        w = workers.start(st, "ingest")
        wait_until(lambda: not w.alive(), 90, "the worker to refuse an evicting Redis")
        assert w.returncode != 0
        assert "maxmemory-policy" in w.log_tail(20_000) and "noeviction" in w.log_tail(20_000)
        r.config_set("maxmemory-policy", "noeviction")
        check_eviction_policy(r)
    finally:
        r.close()
        svc.stop()
    (tmp_path / "d").mkdir()
    with redis_server(workdir=str(tmp_path / "d")) as default:  # as tests and the demo run it
        check_eviction_policy(redis.Redis.from_url(default.url))



def test_defect3_retention_gap_is_counted_once(redis_url):
    """The logic of a partition assigned below its log start, on a real
    redis-server: the deleted offsets are counted, the applied offset moves
    to the log start - 1 in the same step (a restart does not count them
    again), a stale owner is fenced."""
    from streams.state.store import (
        Fenced,
        account_retention_gap,
        claim_partition,
        record_position,
        retention_lost,
    )

    r = redis.Redis.from_url(redis_url)
    try:
        record_position(r, "t", 0, 9, None)
        assert account_retention_gap(r, "t", 0, 9, 20) == 10
        assert ingest_offsets(r, "t") == {0: 19}
        assert account_retention_gap(r, "t", 0, 9, 20) == 0  # already counted
        assert account_retention_gap(r, "t", 0, 19, 20) == 0  # no gap
        assert account_retention_gap(r, "t", 1, -1, 5) == 5  # never applied anything
        assert retention_lost(r, "t") == {0: 10, 1: 5}
        old = claim_partition(r, "t", 0)
        claim_partition(r, "t", 0)
        with pytest.raises(Fenced):
            account_retention_gap(r, "t", 0, 19, 30, epoch=old)
        assert retention_lost(r, "t") == {0: 10, 1: 5}
    finally:
        r.close()


def test_record_position_packed_after_a_script_flush_and_fenced(redis_url):
    """``record_position`` sends its script packed (EVALSHA): a Redis that
    lost its script cache (a restart, SCRIPT FLUSH) gets it with EVAL, and
    a stale owner's call is still refused (``Fenced``), changing nothing."""
    from streams.state.store import (
        Fenced,
        claim_partition,
        partition_clock,
        record_position,
    )

    r = redis.Redis.from_url(redis_url)
    try:
        record_position(r, "t-flush", 0, 9, 100)
        r.script_flush()
        record_position(r, "t-flush", 0, 10, 110)
        assert ingest_offsets(r, "t-flush") == {0: 10}
        assert partition_clock(r, "t-flush", 0) == 110
        old = claim_partition(r, "t-flush", 0)
        claim_partition(r, "t-flush", 0)
        with pytest.raises(Fenced):
            record_position(r, "t-flush", 0, 11, 120, epoch=old)
        assert ingest_offsets(r, "t-flush") == {0: 10}
    finally:
        r.close()


def test_defect3_retention_gap_on_a_broker(kafka_bootstrap, redis_url, tmp_path, workers):
    """Retention deleted offsets the worker never applied (``delete_records``
    while it was down): at assignment they are counted in /metrics and Redis
    and logged at ERROR; ingest goes on from the log start."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    r = redis.Redis.from_url(redis_url)
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "gap", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id=EXP)])
        w = start_web_worker(workers, st, "ingest")
        produce_keyed(st.bootstrap, st.events_topic, exposures(0, 10))
        wait_until(lambda: ingest_offsets(r, st.events_topic).get(0) == 9, 90, "0-9 applied",
                   workers=[w])
        assert w.stop() == 0, w.log_tail()
        produce_keyed(st.bootstrap, st.events_topic, exposures(10, 20))
        admin = AdminClient({"bootstrap.servers": st.bootstrap})
        try:
            next(iter(admin.delete_records(
                [TopicPartition(st.events_topic, 0, 15)]).values())).result(30)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"the broker cannot delete records: {e}")
        w.start()
        wait_until(lambda: ingest_offsets(r, st.events_topic).get(0) == 19, 90,
                   "15-19 applied", workers=[w])
        assert r.hlen(units_key(EXP)) == 15
        text = wait_until(lambda: (b := w.get("/metrics")) and b.decode(), 30, "/metrics")
        assert scrape(text, "liftstream_ingest_retention_lost_total") == {'partition="0"': 5.0}
        assert "DATA LOSS" in w.log_tail(20_000)
    finally:
        r.close()
