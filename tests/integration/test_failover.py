"""Scale-out and failover (issue 5): two ingest and two sampler workers on 12
partitions under continuous load; kill -9 one of each mid-stream.

* The survivors take over (the sampler group shrinks to one member, which then
  owns every dirty partition; the ingest survivor applies everything).
* The final Redis state equals the reference reducer exactly, for every
  experiment (nothing lost or double-counted across the at-least-once replay
  of the dead ingest worker's uncommitted batches).
* Chains of the moved experiments continue from their stored state: sampled
  every 0.25 s, every chain's iteration count never decreases, and the moved
  ones advance after the takeover.
* Estimates keep coming; the longest gap in ``lr:estimates`` notices of a
  moved experiment (kill -> first estimate of the survivor, mostly the group's
  session timeout plus a rebalance) is measured and printed.

Order-independence: ``tests/support/scale_helpers.pinned_case`` (each experiment's
events on one partition), so the experiments keep their normal event-time
settings and the samplers publish changing estimates all along.

The default suite runs 8 experiments; the issue's 50 is ``slow``.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from streams.sampling.chains import decode
from streams.service.app import partition_for
from streams.state.keys import NOTICE_CHANNEL, chain_key
from streams.state.semantics import Reducer
from tests.support.scale_helpers import Feeder, NoticeLog, as_records, group_members, pinned_case
from tests.support.streaming_harness import (
    Workers,
    assert_state_close,
    events_counted,
    make_stack,
    settle_all,
    wait_until,
)

pytestmark = [pytest.mark.integration]

PARTITIONS = 12


def iterations(r, eids) -> dict[str, int]:
    keys = [chain_key(e, "value") for e in eids]
    out = {}
    for e, blob in zip(eids, r.mget(keys), strict=True):
        if blob:
            out[e] = int(decode(blob)[0]["s.iteration"])
    return out


@pytest.mark.parametrize("n_exp,units,duration", [
    pytest.param(8, 150, 30.0, id="8exp", marks=pytest.mark.timeout(400)),
    pytest.param(50, 200, 60.0, id="50exp", marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
])
def test_failover(kafka_bootstrap, kafka_kind, redis_url, tmp_path, n_exp, units, duration):
    if kafka_kind == "tansu":
        # ownership is read from DescribeGroups member assignments; on Tansu the
        # wait for two assigned sampler members timed out (not investigated yet)
        pytest.skip("needs DescribeGroups member assignments (Apache Kafka)")
    t_start = time.monotonic()
    st = make_stack(kafka_bootstrap, redis_url, tmp_path, f"fo{n_exp}", partitions=PARTITIONS)
    st.create_topics()
    cfgs, pairs = pinned_case(n_exp, units, 8, seed=5, partitions=PARTITIONS, tag="fo")
    ids = [c.experiment_id for c in cfgs]
    st.register(cfgs)
    reducer = Reducer(cfgs)  # fed as the workers are: each event from its partition
    for p, e in zip((p for p, _ in pairs), as_records([e for _, e in pairs]), strict=True):
        reducer.apply_batch(f"{st.events_topic}|{p}", [e])
    want = reducer.snapshots()
    routed = sum(sum(s.counters.values()) for s in want.values())
    r = redis.Redis.from_url(redis_url)
    ws = Workers()
    notices = NoticeLog(redis_url, NOTICE_CHANNEL)
    notices.start()
    feeder = Feeder(st.bootstrap, st.events_topic, pairs, duration)
    seen_iters: dict[str, list[tuple[float, int]]] = {e: [] for e in ids}
    stop_poll = threading.Event()

    def poll_iters() -> None:
        pr = redis.Redis.from_url(redis_url)
        while not stop_poll.is_set():
            now = time.monotonic()
            for e, it in iterations(pr, ids).items():
                seen_iters[e].append((now, it))
            time.sleep(0.25)
        pr.close()

    poller = threading.Thread(target=poll_iters, daemon=True)
    try:
        ing = [ws.start(st, "ingest", f"ingest{i}") for i in range(2)]
        smp = [ws.start(st, "sampler", f"sampler{i}") for i in range(2)]
        everyone = ing + smp
        sgroup = f"{st.app_id}-sampler"

        def dirty_split():
            try:
                m = group_members(st.bootstrap, sgroup)
            except Exception:  # noqa: BLE001 - group not formed yet
                return None
            parts = {mid: {p for t, p in tps if t == st.topics["topic_dirty"]}
                     for mid, tps in m.items()}
            return parts if len(parts) == 2 and all(parts.values()) else None

        wait_until(dirty_split, 90, "both samplers assigned", interval=0.5, workers=everyone)
        poller.start()
        feeder.start()
        # mid-stream, once estimates flow for every experiment
        wait_until(lambda: all(notices.times.get(e) for e in ids) and
                   feeder.produced >= 0.4 * len(pairs), duration + 60,
                   "estimates for every experiment", interval=0.2, workers=everyone)
        before = dirty_split()
        assert before, "sampler group changed before the kill"
        it_at_kill = iterations(r, ids)
        t_kill = time.monotonic()
        ing[0].kill9()
        smp[0].kill9()

        def survivor_owns_all():
            try:
                m = group_members(st.bootstrap, sgroup)
            except Exception:  # noqa: BLE001
                return None
            if len(m) != 1:
                return None
            (mid, tps), = m.items()
            parts = {p for t, p in tps if t == st.topics["topic_dirty"]}
            return mid if len(parts) == PARTITIONS else None

        survivor = wait_until(survivor_owns_all, 60, "the surviving sampler owns all",
                              interval=0.5, workers=[ing[1], smp[1]])
        t_takeover = time.monotonic() - t_kill
        dead_parts = set().union(*(p for mid, p in before.items() if mid != survivor))
        moved = [e for e in ids if partition_for(e.encode(), PARTITIONS) in dead_parts]
        assert moved, (before, survivor)

        feeder.join(duration + 120)
        assert not feeder.failure, feeder.failure
        t_fed = time.monotonic()
        wait_until(lambda: events_counted(r, ids) >= routed, 120, "every event applied",
                   workers=[ing[1], smp[1]],
                   info=lambda: f"{events_counted(r, ids)} of {routed}")
        # estimates keep coming for the moved experiments after the takeover
        wait_until(lambda: all(any(t > t_kill + t_takeover for t in notices.times.get(e, []))
                               for e in moved), 60, "estimates of the moved experiments",
                   workers=[smp[1]])
        time.sleep(1.0)
        t_end = time.monotonic()
        stop_poll.set()
        poller.join(5)

        # the state: both settled on every partition's clock (the workers
        # settle quiet experiments at wall-clock moments), counts exact
        ing[1].check_alive()  # the surviving ingest worker ran to the end ...
        assert ing[1].stop() == 0, ing[1].log_tail()  # ... and stops cleanly: no batch
        #                                  in flight while the test settles
        settle_all(r, reducer, cfgs, st.events_topic, range(PARTITIONS))
        assert_state_close(r, cfgs, reducer)
        # chains only grow; the moved ones continued past their stored iteration
        for e, seq in seen_iters.items():
            its = [i for _, i in seq]
            assert its == sorted(its), (e, its)
        final = iterations(r, ids)
        for e in moved:
            assert final[e] > it_at_kill.get(e, 0), (e, it_at_kill.get(e), final[e])
        gaps = {e: notices.longest_gap(e, t_kill, min(t_fed, t_end)) for e in moved}
        stay = [e for e in ids if e not in moved]
        gaps_stay = {e: notices.longest_gap(e, t_kill, min(t_fed, t_end)) for e in stay}
        worst = max(gaps, key=gaps.get)
        print(f"\n[failover] {n_exp} experiments, {len(pairs)} events over {duration:.0f}s, "
              f"12 partitions, 2+2 workers, kill -9 of one of each at "
              f"{t_kill - t_start:.0f}s; sampler takeover (group of 1 owning all) "
              f"{t_takeover:.1f}s after the kill; {len(moved)} moved experiments; longest "
              f"estimate gap of a moved experiment {gaps[worst]:.1f}s ({worst}); of a "
              f"non-moved one {max(gaps_stay.values(), default=0):.1f}s; state exact; "
              f"iterations at kill->end (moved) "
              f"{ {e: (it_at_kill.get(e), final[e]) for e in moved[:4]} }; "
              f"total {time.monotonic() - t_start:.0f}s")
        smp[1].check_alive()
    finally:
        feeder.quit.set()
        stop_poll.set()
        ws.close()
        notices.close()
        r.close()
