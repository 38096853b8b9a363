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

import pytest
import redis

from schemas.records import ExperimentConfig, Exposure
from streams.dev.embedded import start_redis
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
        prod.produce(topic, key=key, value=__import__("orjson").dumps(e), partition=0)
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
