"""Zombie fencing (issue 13): a worker that lost a partition while frozen
mid-batch must not write that partition's state after the new owner started.

1. On Redis alone: owner A claims the partition (epoch 1) and applies a
   batch; B claims it (epoch 2) and applies the next; A's write with epoch 1
   is refused (``Fenced``) by the experiment's script and by the position
   record, and the state is byte-for-byte what it was before A tried.
2. Live: two ingest workers in one group on a backlog; one is frozen
   (SIGSTOP) mid-catch-up until the group gave its partitions to the other,
   which applies everything; then it is resumed (SIGCONT). Its in-flight
   write is refused (its log says ``fenced``), it stays up, and every event
   is counted exactly once.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from schemas.codec import dumps
from schemas.records import ExperimentConfig, Exposure, Metric
from streams.ingest.ingestor import Ingestor
from streams.state.keys import INGEST_OFFSETS, PARTITION_CLOCKS, experiment_key
from streams.state.registry import Registry
from streams.state.store import Fenced, claim_partition
from tests.support.scale_helpers import pinned_case, pinned_producer, produce_pinned
from tests.support.streaming_harness import (
    Workers,
    event_dict,
    events_counted,
    make_stack,
    wait_until,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
TOPIC = "t"


def _state(r, eid: str) -> dict:
    """Every key of the experiment and the ingest hashes, dumped."""
    out = {}
    for k in sorted(r.keys(experiment_key(eid, "*")) + [INGEST_OFFSETS.encode(),
                                                       PARTITION_CLOCKS.encode()]):
        out[k] = r.dump(k)
    return out


def test_stale_owner_write_is_refused(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    reg = Registry(r)
    reg.put(ExperimentConfig(experiment_id="f1"))
    ing = Ingestor(r, reg)
    evs = [Exposure(f"x{i}", "f1", f"u{i}", "control", T0 + i, 1.0) for i in range(4)]
    evs += [Metric(f"m{i}", "f1", f"u{i}", "value", T0 + 10 + i, 2.0) for i in range(4)]
    msgs = [(i, dumps(event_dict(e))) for i, e in enumerate(evs)]

    a = claim_partition(r, TOPIC, 0)
    ing.process(TOPIC, 0, msgs[:3], T0, epoch=a)
    b = claim_partition(r, TOPIC, 0)
    assert b > a
    ing.process(TOPIC, 0, msgs[3:6], T0, epoch=b)
    before = _state(r, "f1")
    with pytest.raises(Fenced):  # the zombie's batch, replayed or new
        ing.process(TOPIC, 0, msgs[3:], T0, epoch=a)
    assert _state(r, "f1") == before
    # the position record is fenced at once, even where B has not written yet
    c = claim_partition(r, TOPIC, 0)
    with pytest.raises(Fenced):
        ing.process(TOPIC, 0, [(6, b"not json")], T0, epoch=b)
    assert _state(r, "f1") == before
    ing.process(TOPIC, 0, msgs[6:], T0, epoch=c)  # the current owner goes on
    assert r.hget(INGEST_OFFSETS, f"{TOPIC}|0") == b"7"


@pytest.mark.timeout(400)
def test_frozen_worker_is_fenced_after_rebalance(kafka_bootstrap, redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    st = make_stack(kafka_bootstrap, redis_url, tmp_path, "fence", partitions=4)
    st.create_topics()
    cfgs, pairs = pinned_case(2, 6000, 8, seed=5, partitions=4, tag="fz")
    ids = [c.experiment_id for c in cfgs]
    st.register(cfgs)
    produce_pinned(pinned_producer(st.bootstrap), st.events_topic, pairs)
    want = len(pairs)  # every event of a registered experiment counts exactly once

    ws = Workers()
    try:
        a = ws.start(st, "ingest", name="a", log_level="info")
        b = ws.start(st, "ingest", name="b", log_level="info")
        wait_until(lambda: a.log_tail(200_000).count("events partitions assigned") >= 1
                   and b.log_tail(200_000).count("events partitions assigned") >= 1, 90,
                   "both workers own partitions", workers=[a, b])
        wait_until(lambda: events_counted(r, ids) >= want * 0.1, 120, "10% applied",
                   workers=[a, b])
        os.killpg(a.pid, signal.SIGSTOP)  # frozen, mid-batch with a backlog
        try:
            wait_until(lambda: events_counted(r, ids) >= want, 240,
                       "the other worker applied everything", workers=[b],
                       info=lambda: f"{events_counted(r, ids)} of {want}")
        finally:
            os.killpg(a.pid, signal.SIGCONT)
        wait_until(lambda: "fenced" in a.log_tail(200_000), 60, "the resumed write refused",
                   workers=[a, b], info=lambda: a.log_tail(3000))
        time.sleep(3)  # the resumed worker rejoins; nothing more to apply
        a.check_alive()
        b.check_alive()
        assert events_counted(r, ids) == want
    finally:
        ws.close()
