"""The owner's commit losing its connection in the middle of the EXEC (issue 25,
kill point "connection dropped during EXEC"; the other two kill points, before
the EXEC and after it before Kafka's offset store, are in
tests/integration/test_partition_store.py and the backlog test's kill -9).

A real ingest worker talks to a real redis-server through a TCP proxy
(``tests.support.cut_proxy``) that cuts the connection of three of its
commits (the transactions that write an experiment's applied offset):

* ``exec_lost``: the bytes carrying EXEC never reach Redis: nothing of the
  transaction is applied;
* ``reply_lost``: Redis runs the EXEC (the proxy saw its reply) but the
  reply never reaches the worker: the commit is applied, the worker does not
  know it.
* ``watch_lost``: the commit's read of its fence, right after its WATCH,
  never reaches Redis (the cut comes before the EXEC: nothing applied).

Either way the worker does not know the outcome. It must neither give the
partition up (nobody else owns it) nor apply the batch twice: the final
state equals the reference reducer's fold of the same events (counts exact,
sums within 1e-9), every event counted once, and the worker never restarted.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.support.cut_proxy import CutProxy
from tests.support.scale_helpers import fed, pinned_case, pinned_producer, produce_pinned
from tests.support.streaming_harness import (
    Workers,
    assert_state_close,
    events_counted,
    make_stack,
    settle_all,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 2
CUT_AT = (2, 5, 9)  # the 2nd, 5th and 9th commit that carries an applied offset


def routed(cfgs, pairs) -> int:
    return sum(sum(s.counters.values()) for s in fed(cfgs, pairs).snapshots().values())


#: what the cut transactions (or, watch_lost, commands) contain: an applied
#: offset (only the owner's commits write one), a fence key
MATCH = {"exec_lost": b"}:offsets", "reply_lost": b"}:offsets", "watch_lost": b":fence:"}


@pytest.mark.parametrize("mode", ["exec_lost", "reply_lost", "watch_lost"])
def test_connection_dropped_during_exec_replays_to_the_clean_state(kafka_bootstrap, redis_url,
                                                                    tmp_path, mode):
    t0 = time.monotonic()
    proxy = CutProxy(redis_url, mode, match=MATCH[mode], cut_at=CUT_AT)
    ws = Workers()
    r = redis.Redis.from_url(redis_url)  # the test's own view: straight to Redis
    try:
        st = make_stack(kafka_bootstrap, proxy.url, tmp_path, f"cut-{mode}",
                        partitions=PARTITIONS, batch_size=100)
        st.create_topics()
        cfgs, pairs = pinned_case(2, 300, 6, seed=23, partitions=PARTITIONS, tag="cx")
        ids = [c.experiment_id for c in cfgs]
        assert {p for p, _ in pairs} == set(range(PARTITIONS))
        st.register(cfgs)
        want = routed(cfgs, pairs)
        # a backlog before the worker starts: many batches, so many commits
        produce_pinned(pinned_producer(st.bootstrap), st.events_topic, pairs)
        w = ws.start(st, "ingest")
        wait_until(lambda: events_counted(r, ids) >= want, 120, "every event applied",
                   workers=[w], info=lambda: f"{events_counted(r, ids)} of {want}; "
                   f"{proxy.cuts} cuts; {proxy.matched} commits")
        time.sleep(1.0)
        assert events_counted(r, ids) == want  # nothing applied twice
        assert proxy.cuts == len(CUT_AT), (proxy.cuts, proxy.matched)
        if mode == "reply_lost":  # Redis ran each cut EXEC and answered it
            assert len(proxy.swallowed) == len(CUT_AT)
            assert all(b"QUEUED" in s and not s.endswith((b"*-1\r\n", b"_\r\n"))
                       for s in proxy.swallowed), proxy.swallowed
        w.check_alive()
        assert w.starts == 1
        assert w.stop() == 0, w.log_tail()
        red = fed(cfgs, pairs, st.events_topic)
        settle_all(r, red, cfgs, st.events_topic, range(PARTITIONS))
        assert_state_close(r, cfgs, red)
        print(f"\n[cut-{mode}] {len(pairs)} events, {proxy.matched} commits, "
              f"{proxy.cuts} cut; state exact; {time.monotonic() - t0:.0f}s")
    finally:
        ws.close()
        r.close()
        proxy.close()
