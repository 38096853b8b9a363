"""Redis refusing writes (issue 14 item 5; issue 15 item 2): ingest waits, says
why, loses nothing, and resumes by itself.

A redis-server of the test's own refuses every write while an ingest worker
is applying a stream: ``maxmemory`` set below what it uses (``noeviction``,
as compose runs it: OOM), or demoted to a replica of a promoted replica of
its own (a failover: READONLY). Then, on the same worker:

* batches stop being applied (the counted events stand still) and nothing is
  acked past what was applied;
* ``/readyz`` answers 503 ``ingest stalled`` with the reason (``redis_oom``,
  ``redis_readonly``), and ``/metrics`` has ``liftstream_ingest_stalled{reason=…} 1``;
* the worker stays up; once writes are allowed again it resumes without a
  restart, ``/readyz`` is 200 again, and the final state equals the
  reference fold of the same events (counts exact, sums within 1e-9).
"""

from __future__ import annotations

import time

import pytest
import redis

from streams.dev.embedded import start_redis
from tests.support.scale_helpers import fed, pinned_case, pinned_producer, produce_pinned
from tests.support.streaming_harness import (
    Workers,
    assert_state_close,
    events_counted,
    make_stack,
    scrape,
    settle_all,
    start_web_worker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 2


def _stall_and_recover(kafka_bootstrap, tmp_path, tag: str, reason: str, refuse, allow) -> None:
    """Apply a third of a stream, make Redis refuse writes (``refuse(r, rdir)``),
    produce the rest, check the worker waits and says ``reason``, lift it
    (``allow(r)``) and check it resumed and the state is the reference fold."""
    rdir = tmp_path / "redis"
    rdir.mkdir()
    svc = start_redis(workdir=str(rdir))
    r = redis.Redis.from_url(svc.url)
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, svc.url, tmp_path, tag, partitions=PARTITIONS)
        st.create_topics()
        cfgs, pairs = pinned_case(2, 1500, 8, seed=3, partitions=PARTITIONS, tag=tag)
        ids = [c.experiment_id for c in cfgs]
        st.register(cfgs)
        w = start_web_worker(ws, st, "ingest")
        wait_until(lambda: w.get("/readyz") is not None, 90, "the worker ready", workers=[w])
        prod = pinned_producer(st.bootstrap)
        cut = len(pairs) // 3
        produce_pinned(prod, st.events_topic, pairs[:cut])
        wait_until(lambda: events_counted(r, ids) > 0, 60, "the first events applied",
                   workers=[w])

        refuse(r, tmp_path)
        produce_pinned(prod, st.events_topic, pairs[cut:])
        wait_until(lambda: w.request("/readyz")[0] == 503, 60, "/readyz says ingest stalled",
                   workers=[w])
        status, body = w.request("/readyz")
        assert reason.encode() in body, body
        metrics = w.get("/metrics").decode()
        assert scrape(metrics, "liftstream_ingest_stalled")[f'reason="{reason}"'] == 1.0
        stuck = events_counted(r, ids)
        time.sleep(3)
        assert events_counted(r, ids) == stuck < len(pairs)  # waiting, not skipping
        assert w.alive()

        allow(r)  # it resumes by itself
        wait_until(lambda: events_counted(r, ids) >= len(pairs), 90, "the rest applied",
                   workers=[w])
        wait_until(lambda: w.request("/readyz")[0] == 200, 30, "/readyz ready again",
                   workers=[w])
        metrics = w.get("/metrics").decode()
        assert scrape(metrics, "liftstream_ingest_stalled")[f'reason="{reason}"'] == 0.0
        assert w.stop() == 0, w.log_tail()
        red = fed(cfgs, pairs, st.events_topic)
        settle_all(r, red, cfgs, st.events_topic, range(PARTITIONS))
        assert events_counted(r, ids) == len(pairs)
        assert_state_close(r, cfgs, red)
    finally:
        ws.close()
        r.close()
        svc.stop()


def test_ingest_waits_out_redis_oom(kafka_bootstrap, tmp_path):
    def refuse(r, _tmp):
        # Redis full: maxmemory below what it uses, no eviction: every write is
        # refused (a limit just above it lets a write through now and then, as
        # used_memory moves with buffers)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) // 2)

    _stall_and_recover(kafka_bootstrap, tmp_path, "om", "redis_oom", refuse,
                       lambda r: r.config_set("maxmemory", 0))


def test_ingest_waits_out_a_failover_that_left_it_on_a_replica(kafka_bootstrap, tmp_path):
    """READONLY: the worker's server is demoted to a replica, as after a
    failover it was not told about. A replica B of it is synced and promoted,
    and the worker's server A follows B: A keeps the same data but refuses
    every write. The worker waits (``redis_readonly``); once A is promoted
    back it resumes, and nothing is lost or doubled."""
    other: dict = {}

    def refuse(r, tmp):
        bdir = tmp / "replica"
        bdir.mkdir()
        b = other["svc"] = start_redis(workdir=str(bdir))
        rb = other["r"] = redis.Redis.from_url(b.url)
        a_port = r.connection_pool.connection_kwargs["port"]
        # writes held while B catches up, so the demotion loses none of them
        r.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        rb.execute_command("REPLICAOF", "127.0.0.1", a_port)
        wait_until(lambda: rb.info("replication").get("master_link_status") == "up"
                   and rb.info("replication")["slave_repl_offset"]
                   >= r.info("replication")["master_repl_offset"], 30, "B in sync with A")
        rb.execute_command("REPLICAOF", "NO", "ONE")  # B promoted
        r.execute_command("REPLICAOF", "127.0.0.1", b.port)  # A follows it: read only
        wait_until(lambda: r.info("replication").get("master_link_status") == "up", 30,
                   "A a replica of B")
        r.execute_command("CLIENT", "UNPAUSE")

    def allow(r):
        r.execute_command("REPLICAOF", "NO", "ONE")  # A promoted back, same data

    try:
        _stall_and_recover(kafka_bootstrap, tmp_path, "ro", "redis_readonly", refuse, allow)
    finally:
        if "svc" in other:
            other["r"].close()
            other["svc"].stop()


def test_a_stalled_redis_fails_calls_instead_of_hanging_them(tmp_path):
    """A Redis that stops answering (DEBUG SLEEP: the server blocks, the socket
    stays open, as with a half-open connection) makes a call fail after the
    client's socket timeout with an error ingest retries, instead of hanging
    the batch for ever; once it answers again, calls go through."""
    import threading

    from streams.config.settings import Settings, redis_client
    from streams.state.store import TRANSIENT_REDIS

    svc = start_redis(workdir=str(tmp_path))
    try:
        r = redis_client(Settings(redis_url=svc.url, redis_socket_timeout=0.5))
        r.set("k", "v")
        other = redis.Redis.from_url(svc.url)
        t = threading.Thread(target=lambda: other.execute_command("DEBUG", "SLEEP", 3))
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(TRANSIENT_REDIS) as ei:
            r.get("k")
        assert isinstance(ei.value, redis.TimeoutError)
        assert time.monotonic() - t0 < 2.5  # the timeout, not the 3 s stall
        t.join()
        assert r.get("k") == b"v"
    finally:
        svc.stop()


def test_a_busy_redis_is_waited_out(tmp_path):
    """BUSY (another client's script past lua-time-limit) is retried like the
    other transient faults, with the reason reported, until the server
    answers again (here: the script is killed)."""
    import threading

    from streams.ingest.events_plane import PlaneStatus, retry_transient

    svc = start_redis(workdir=str(tmp_path))
    try:
        r = redis.Redis.from_url(svc.url)
        r.config_set("lua-time-limit", 100)
        r.set("k", "v")
        hog = redis.Redis.from_url(svc.url)
        t = threading.Thread(target=lambda: _swallow(
            lambda: hog.eval("local i = 0 while true do i = i + 1 end", 0)))
        t.start()
        time.sleep(0.5)  # the script is now past lua-time-limit: others get BUSY
        status, seen = PlaneStatus(), []

        def watch_and_kill() -> None:
            wait_until(lambda: status.stalled is not None, 10, "the BUSY retry")
            seen.append(status.stalled[0])
            redis.Redis.from_url(svc.url).script_kill()

        killer = threading.Thread(target=watch_and_kill)
        killer.start()
        assert retry_transient(r.get, "k", what="test", stopped=threading.Event(),
                               status=status) == b"v"
        killer.join()
        t.join()
        assert seen == ["redis_busy"] and status.stalled is None
    finally:
        svc.stop()


def _swallow(fn) -> None:
    try:
        fn()
    except redis.ResponseError:  # the killed script's caller gets an error
        pass
