"""``/healthz`` on a live worker (issue 15 item 2): it fails while the ingest
loop has not come round for ``liveness_seconds`` with work pending, and
recovers by itself, losing nothing.

A redis-server of the test's own is stalled with ``CLIENT PAUSE <ms> WRITE``
(every write, scripts included, waits; the connection stays open, no error:
the worker's call blocks as on a hung server) for longer than
``liveness_seconds`` (3 s) but shorter than the client's socket timeout
(15 s), while events wait on the topic. Then:

* ``/healthz`` answers 503 ``stuck`` naming the ingest loop during the stall,
  and no event is counted meanwhile;
* once the pause ends the worker applies the rest without a restart,
  ``/healthz`` is 200 again, and the state equals the reference fold of the
  same events (every event counted once, sums within 1e-9).
"""

from __future__ import annotations

import time

import pytest
import redis

from schemas.codec import loads
from streams.dev.embedded import start_redis
from tests.support.scale_helpers import fed, pinned_case, pinned_producer, produce_pinned
from tests.support.streaming_harness import (
    Workers,
    assert_state_close,
    events_counted,
    make_stack,
    settle_all,
    start_web_worker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 2
LIVENESS = 3.0
PAUSE_MS = 10_000


def test_healthz_fails_while_ingest_is_stuck_and_recovers(kafka_bootstrap, tmp_path):
    rdir = tmp_path / "redis"
    rdir.mkdir()
    svc = start_redis(workdir=str(rdir))
    r = redis.Redis.from_url(svc.url)
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, svc.url, tmp_path, "live", partitions=PARTITIONS,
                        liveness_seconds=LIVENESS)
        st.create_topics()
        cfgs, pairs = pinned_case(2, 800, 8, seed=5, partitions=PARTITIONS, tag="lv")
        ids = [c.experiment_id for c in cfgs]
        st.register(cfgs)
        w = start_web_worker(ws, st, "ingest")
        wait_until(lambda: w.get("/readyz") is not None, 90, "the worker ready", workers=[w])
        # at once: the loop's start-up (topic check, group join) is not "stuck"
        assert w.request("/healthz") == (200, b'{"status":"ok"}')
        prod = pinned_producer(st.bootstrap)
        cut = len(pairs) // 3
        produce_pinned(prod, st.events_topic, pairs[:cut])
        wait_until(lambda: events_counted(r, ids) >= cut, 60, "the first third applied",
                   workers=[w])
        assert w.request("/healthz")[0] == 200  # idle, caught up: the loop comes round

        # Redis stalls: writes (the ingest scripts) block without an error
        t_pause = time.monotonic()
        r.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        produce_pinned(prod, st.events_topic, pairs[cut:])  # work pending
        status, body = wait_until(
            lambda: (got := w.request("/healthz", timeout=2))[0] == 503 and got,
            PAUSE_MS / 1000 - 1, "/healthz failing during the stall", workers=[w])
        t_fail = time.monotonic() - t_pause
        rec = loads(body)
        assert rec["status"] == "stuck" and "ingest loop: no round" in rec["error"], rec
        assert events_counted(r, ids) == cut  # reads go through: nothing applied meanwhile
        assert time.monotonic() - t_pause < PAUSE_MS / 1000  # still inside the stall
        assert w.alive()

        # the stall ends: the rest applied, healthy again, no restart
        wait_until(lambda: events_counted(r, ids) >= len(pairs), 90, "the rest applied",
                   workers=[w])
        wait_until(lambda: w.request("/healthz")[0] == 200, 30, "/healthz 200 again",
                   workers=[w])
        t_back = time.monotonic() - t_pause
        assert w.starts == 1 and w.alive()
        assert w.stop() == 0, w.log_tail()
        red = fed(cfgs, pairs, st.events_topic)
        settle_all(r, red, cfgs, st.events_topic, range(PARTITIONS))
        assert events_counted(r, ids) == len(pairs)
        assert_state_close(r, cfgs, red)
        print(f"\n[liveness] {len(pairs)} events; stall {PAUSE_MS / 1000:.0f} s, "
              f"liveness {LIVENESS:.0f} s: /healthz 503 after {t_fail:.1f} s, "
              f"200 again {t_back:.1f} s after the stall began")
    finally:
        ws.close()
        r.close()
        svc.stop()
