"""Redis losing its last writes (issue 5; docs/architecture.md#state: "Kafka's committed offset
is only a hint").

Redis with AOF ``everysec`` can lose up to a second of writes in a crash while
the ingest group has already committed the offsets of those events. The test
simulates exactly that, with a redis-server of its own:

1. an ingest worker applies the first part of the traffic; ``SAVE`` writes an
   RDB snapshot of that state, which is copied aside;
2. the rest of the traffic is ingested and committed in Kafka;
3. the worker stops, Redis is killed (-9), its data directory is replaced by
   the old snapshot (no AOF: the later writes are gone) and it is restarted on
   the same port; Redis's applied offsets are now behind the committed ones;
4. the worker is restarted: on partition assignment the events plane
   (``streams.ingest.events_plane``) starts each partition after the offset Redis
   applied, not at Kafka's commit, so the gap is read again; the final state
   equals the reducer's exactly.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import redis

from streams.dev.embedded import start_redis
from streams.ingest.ingestor import ingest_offsets
from tests.support.scale_helpers import fed, pinned_case, pinned_producer, produce_pinned
from tests.support.streaming_harness import (
    Workers,
    assert_state_close,
    committed_offsets,
    events_counted,
    make_stack,
    settle_all,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 4


def routed(cfgs, pairs) -> int:
    return sum(sum(s.counters.values()) for s in fed(cfgs, pairs).snapshots().values())


def test_redis_loses_last_writes(kafka_bootstrap, tmp_path):
    t_start = time.monotonic()
    rdir = tmp_path / "redis"
    rdir.mkdir()
    svc = start_redis(workdir=str(rdir))
    ws = Workers()
    r = redis.Redis.from_url(svc.url)
    try:
        st = make_stack(kafka_bootstrap, svc.url, tmp_path, "rloss", partitions=PARTITIONS)
        st.create_topics()
        cfgs, pairs = pinned_case(4, 400, 8, seed=11, partitions=PARTITIONS, tag="rl")
        ids = [c.experiment_id for c in cfgs]
        st.register(cfgs)
        cut = int(len(pairs) * 0.4)
        first, rest = pairs[:cut], pairs[cut:]
        want_first, want_all = routed(cfgs, first), routed(cfgs, pairs)
        w = ws.start(st, "ingest")
        prod = pinned_producer(st.bootstrap)

        # 1. ingest the first part; snapshot Redis
        produce_pinned(prod, st.events_topic, first)
        wait_until(lambda: events_counted(r, ids) >= want_first, 90, "first part applied",
                   workers=[w])
        r.save()
        snap = tmp_path / "snapshot.rdb"
        shutil.copy(rdir / "dump.rdb", snap)
        snap_keys = r.dbsize()
        applied_at_snap = ingest_offsets(r, st.events_topic)

        # 2. the rest, applied and committed in Kafka
        produce_pinned(prod, st.events_topic, rest)
        wait_until(lambda: events_counted(r, ids) >= want_all, 90, "everything applied",
                   workers=[w])
        ends: dict[int, int] = {}
        for p, _ in pairs:
            ends[p] = ends.get(p, 0) + 1
        wait_until(lambda: all(committed_offsets(st.bootstrap, f"{st.app_id}-events",
                                                 st.events_topic).get(p) == end
                               for p, end in ends.items()),
                   30, "offsets committed", interval=0.5, workers=[w])
        assert w.stop() == 0, w.log_tail()
        assert_state(r, cfgs, pairs, st.events_topic)  # sanity: exact before the loss

        # 3. Redis crashes and comes back with only the older snapshot
        r.close()
        svc.kill()
        for name in os.listdir(rdir):
            if name != "redis.log":
                p = rdir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.copy(snap, rdir / "dump.rdb")
        # (with appendonly on and no AOF, Redis would start empty: load the RDB,
        # then turn the AOF back on, which rewrites it from the loaded data)
        svc = start_redis(port=svc.port, workdir=str(rdir), appendonly=False)
        r = redis.Redis.from_url(svc.url)
        assert r.dbsize() == snap_keys
        r.config_set("appendonly", "yes")
        assert ingest_offsets(r, st.events_topic) == applied_at_snap
        lost = want_all - events_counted(r, ids)
        assert lost > 0
        committed = committed_offsets(st.bootstrap, f"{st.app_id}-events", st.events_topic)
        assert all(committed[p] > applied_at_snap.get(p, -1) + 1 for p in ends), (
            committed, applied_at_snap)  # Redis is behind Kafka's commit everywhere

        # 4. restart the worker
        t_restart = time.monotonic()
        w.start()
        wait_until(lambda: events_counted(r, ids) >= want_all, 90,
                   "the lost events replayed", workers=[w])
        t_refill = time.monotonic() - t_restart
        assert w.stop() == 0, w.log_tail()
        assert_state(r, cfgs, pairs, st.events_topic)
        print(f"\n[redis-loss] {len(pairs)} events; {lost} counted events lost by the "
              f"restore (Redis applied {applied_at_snap}, Kafka committed {committed}); "
              f"refilled {t_refill:.1f}s after the worker restart; state exact; "
              f"total {time.monotonic() - t_start:.0f}s")
    finally:
        ws.close()
        r.close()
        svc.stop()


def assert_state(r, cfgs, pairs, topic: str) -> None:
    """Redis == the reducer fed the same way, both settled on every
    partition's clock (counts exact, sums within 1e-9)."""
    red = fed(cfgs, pairs, topic)
    settle_all(r, red, cfgs, topic, range(PARTITIONS))
    assert_state_close(r, cfgs, red)
