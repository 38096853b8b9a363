"""The streaming pipeline end to end: real ``liftstream worker`` processes on
the embedded broker (Tansu) and a real redis-server (issue 3, "Tests").

1. ``test_end_to_end``: simulated traffic produced with confluent-kafka reaches
   Redis exactly as the reference reducer folds it, and estimates on the topic
   and in Redis (same JSON) that match ``liftstream analyze`` on the same events
   within Monte Carlo error.
2. ``test_differential_through_kafka``: random event streams (duplicates,
   disorder, unknown units/variants/metrics/experiments, late and pre-exposure
   events, metrics without experiment_id, several experiments) through Kafka and
   an ingest worker equal the reducer's state exactly.
3. ``test_crash_and_replay``: kill -9 the ingest worker at random moments during
   a long ingest, restart it each time; the final state equals the reducer's.
   ``test_ingest_throughput`` is the same ingest without kills (events/s).
4. ``test_chain_continuity``: after kill -9 and restart the chains resume at
   their stored iteration and keep their draws; estimates keep coming.
5. ``test_latency``: produced event -> estimate reflecting it, p50/p99.

Each test has its own app id (consumer groups) and topics (``streaming_harness``),
and every worker it starts is killed at teardown, whatever the outcome. Run with
``-s`` to see the measurements.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import redis

from schemas.codec import loads
from streams.dev.simulate import make_traffic
from streams.sampling.chains import decode
from streams.state.keys import chain_key, estimate_key, history_key
from streams.state.semantics import Reducer
from streams.state.store import read_counters
from tests.support.scale_helpers import as_records
from tests.support.streaming_harness import (
    assert_state_close,
    bits,
    committed_offsets,
    consume_all,
    events_counted,
    produce,
    producer,
    settle_all,
    wait_until,
)
from tests.support.streaming_scenarios import (
    END_TO_END_CASES,
    START,
    differential_through_kafka,
    end_to_end,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

@pytest.fixture()
def r(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def chain_iterations(r, eid: str, metrics) -> dict[str, int]:
    out = {}
    for m in metrics:
        blob = r.get(chain_key(eid, m))
        if blob:
            out[m] = int(decode(blob)[0]["s.iteration"])
    return out


# --------------------------------------------------------------------------- 1


@pytest.mark.parametrize("rho,novelty", list(END_TO_END_CASES.values()),
                         ids=list(END_TO_END_CASES))
def test_end_to_end(new_stack, workers, r, tmp_path, rho, novelty):
    """Simulated traffic -> Kafka -> worker (role all) -> Redis and estimates
    (``tests.support.streaming_scenarios.end_to_end``)."""
    end_to_end(new_stack, workers, r, tmp_path, rho, novelty)


# --------------------------------------------------------------------------- 2


def test_differential_through_kafka(new_stack, workers, r):
    """Random streams through Kafka and an ingest worker == the reducer, exactly
    (``tests.support.streaming_scenarios.differential_through_kafka``)."""
    differential_through_kafka(new_stack, workers, r)


# --------------------------------------------------------------------------- 3

LONG_L = 10 * 86_400  # lateness: more than the traffic's 8 days minus its 1-day window
LONG_DD = 30 * 86_400  # dedupe horizon: covers every event


def replay_case(units_a: int, units_b: int, seed: int):
    """Two experiments whose expected final state does not depend on how the
    three events partitions interleave (see ``test_crash_and_replay``).

    Simulated traffic for experiments A and B over the same unit ids (``u<i>``),
    merged by time; 30% of the metrics lose their experiment_id (routed through
    the unit index, to every experiment the unit was exposed in before) and 2%
    of all events are re-sent a few positions later (same key, so same
    partition, after the original: a duplicate). Returns the configs, the
    events, and a clock past every window's lateness, to settle at the end.
    """

    rng = random.Random(seed)
    cfg_a, ev_a, _ = make_traffic(units_a, 8, "rA", seed, 86_400, START)
    cfg_b, ev_b, _ = make_traffic(units_b, 8, "rB", seed + 1, 86_400, START)
    cfgs = [replace(c, lateness_seconds=LONG_L, dedupe_seconds=LONG_DD) for c in (cfg_a, cfg_b)]
    merged = sorted(ev_a + ev_b, key=lambda e: e["ts"])
    events: list[dict] = []
    for e in merged:
        if e["type"] == "metric" and rng.random() < 0.3:
            e = {k: v for k, v in e.items() if k != "experiment_id"}
        events.append(e)
    for i in sorted(rng.sample(range(len(events)), len(events) // 50), reverse=True):
        events.insert(min(len(events), i + rng.randint(1, 50)), dict(events[i]))
    last = max(e["ts"] for e in events)
    return cfgs, events, last + (LONG_L + 2 * 86_400) * 1000


def finish_and_compare(st, w, r, cfgs, events, clock) -> Reducer:
    """Wait until every event is applied, stop the worker cleanly, settle
    every partition past every window (``clock``: the ts after the last
    window's lateness) in Redis and in the reducer, and compare the whole
    state with the reducer's."""
    from streams.state.store import read_pending, read_units

    ids = [c.experiment_id for c in cfgs]
    # the reducer gets each event from the partition it came from: a unit's
    # events share its key, so its partition, as the consumed records show
    recs = consume_all(st.bootstrap, st.events_topic, lambda out: len(out) >= len(events), 60)
    part_of = {m.key().decode(): m.partition() for m in recs}
    reducer = Reducer(cfgs)
    for e in as_records(events):
        reducer.apply_batch(f"{st.events_topic}|{part_of[e.unit_id]}", [e])
    routed = sum(sum(s.counters.values()) for s in reducer.snapshots().values())
    wait_until(lambda: events_counted(r, ids) >= routed, 120, "every event applied",
               workers=[w], info=lambda: f"{events_counted(r, ids)} of {routed}")
    # nothing matured yet, nothing late, whatever the interleaving
    assert events_counted(r, ids) == routed
    assert all(read_counters(r, e).get("late", 0) == 0 for e in ids)
    wait_until(w.ready, 60, "the last restart to finish starting", workers=[w])
    assert w.stop() == 0, w.log_tail()
    parts = sorted(set(part_of.values()))
    settle_all(r, reducer, cfgs, st.events_topic, parts, clock)
    assert_state_close(r, cfgs, reducer)
    for c in cfgs:
        want = reducer.states[c.experiment_id]
        assert bits(read_units(r, c)) == bits(want.units), c.experiment_id
        for p in parts:
            src = f"{st.events_topic}|{p}"
            # every unit folded; folded units wait, scored close + H, to retire
            pend = read_pending(r, c.experiment_id, src)
            assert pend == want.pending_units(src)
            assert all(want.units[u].matured for u, _ in pend), c.experiment_id
    snaps = reducer.snapshots()
    assert all(s.counters["duplicate"] > 0 and s.counters["metric_applied"] > 0
               and sum(s.matured.values()) == sum(s.exposed.values()) > 0
               for s in snaps.values()), {e: s.counters for e, s in snaps.items()}
    return reducer


def test_ingest_throughput(new_stack, workers, r):
    """Test 3 without kills: the whole backlog produced first, then one ingest
    worker on 3 partitions; events/s from its first applied event to its last
    (the group join and start-up before it are not counted). The final state
    is checked exactly as in the crash test."""
    st = new_stack("tput", partitions=3)
    cfgs, events, clock = replay_case(15_000, 3_000, seed=5)
    st.register(cfgs)
    produce(st.bootstrap, st.events_topic, events)
    ids = [c.experiment_id for c in cfgs]
    t0 = time.monotonic()
    w = workers.start(st, "ingest")
    n0 = wait_until(lambda: events_counted(r, ids), 60, "the first applied event",
                    interval=0.01, workers=[w])
    t1 = time.monotonic()
    total = sum(sum(s.counters.values())
                for s in Reducer(cfgs).apply_all(as_records(events), "p|0").snapshots().values())
    wait_until(lambda: events_counted(r, ids) >= total, 120, "all events", interval=0.01,
               workers=[w])
    t2 = time.monotonic()
    rate = (len(events) * (total - n0) / total) / (t2 - t1)
    print(f"\n[throughput] {len(events)} events on 3 partitions ({total} experiment "
          f"applications): first applied {t1 - t0:.1f}s after start, all {t2 - t0:.1f}s; "
          f"ingest {rate:.0f} events/s ({(total - n0) / (t2 - t1):.0f} applications/s)")
    finish_and_compare(st, w, r, cfgs, events, clock)


@pytest.mark.parametrize("n_kills,units", [
    pytest.param(8, (12_000, 1_500), id="8kills"),
    pytest.param(20, (30_000, 3_500), id="20kills",
                 marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
])
def test_crash_and_replay(new_stack, workers, r, n_kills, units):
    """kill -9 the ingest worker at random moments while events stream in,
    restart it each time; at the end Redis equals the reducer exactly.

    Events are produced by a background thread at a steady rate, so the worker
    always has a live stream (and after each restart a backlog) to ingest. Kill
    moments: mostly 0-1.5 s after the restarted worker applied its first event,
    sometimes 0.2-5.5 s after start (during start-up, registry bootstrap or
    the group join). The loop goes on until ``n_kills`` kills were done and the
    producer has finished. Every eighth stop is a clean SIGTERM instead (a
    graceful shutdown must not commit an unapplied batch either).

    The issue's run is ``20kills`` (~63k events): 2.5 minutes on Apache Kafka,
    3.5-4 on Tansu, whose restarts after a kill -9 often take a second group
    join (~10 s a cycle); so it is ``slow`` (``make test-slow``), and the
    default suite runs ``8kills`` on ~25k events.

    The expected state does not depend on how the 3 partitions interleave
    (docs/architecture.md#state: maturity, dedupe and holds go by each partition's own clock);
    the long lateness (10 days) additionally keeps every unit pending while
    the traffic is ingested, so the unit totals are bit-identical whatever the
    batch boundaries. At the end every partition is settled past every window
    in Redis and in the reducer (which gets each event's partition from the
    consumed records), and the whole state is compared (counts exactly, cell
    sums within 1e-9: the fold order across partitions may differ).
    """
    st = new_stack(f"crash{n_kills}", partitions=3)
    cfgs, events, clock = replay_case(*units, seed=n_kills)
    st.register(cfgs)
    ids = [c.experiment_id for c in cfgs]
    rng = random.Random(1000 + n_kills)
    # production lasts about as long as the kills take (a cycle is ~6 s: start,
    # group join ~3 s, some ingest), so nearly every kill hits a live stream
    duration = 6.0 * n_kills
    produced = [0]
    failure: list[BaseException] = []
    quit_feeding = threading.Event()

    def feed() -> None:
        try:
            p = producer(st.bootstrap)
            chunk = max(1, len(events) // int(duration * 4))
            t_start = time.monotonic()
            for k in range(0, len(events), chunk):
                if quit_feeding.is_set():
                    return
                produce(st.bootstrap, st.events_topic, events[k:k + chunk], prod=p)
                produced[0] = min(len(events), k + chunk)
                ahead = t_start + duration * produced[0] / len(events) - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    feeder = threading.Thread(target=feed, daemon=True)
    w = workers.start(st, "ingest")
    t0 = time.monotonic()
    feeder.start()
    try:
        kills, stops, early, late_kills = kill_loop(w, r, ids, feeder, failure, n_kills, rng)
    finally:
        quit_feeding.set()
        feeder.join(30)
    assert not failure, failure
    t_kills = time.monotonic() - t0
    assert kills >= n_kills and stops >= 1
    finish_and_compare(st, w, r, cfgs, events, clock)
    done = committed_offsets(st.bootstrap, f"{st.app_id}-events", st.events_topic)
    assert sum(done.values()) == len(events), done  # resumed and committed
    print(f"\n[crash] {len(events)} events, {kills} kill -9 + {stops} SIGTERM in "
          f"{t_kills:.0f}s ({early} during start-up, {late_kills} after production ended); "
          f"committed offsets {done}; total {time.monotonic() - t0:.0f}s")


def kill_loop(w, r, ids, feeder, failure, n_kills, rng) -> tuple[int, int, int, int]:
    """Stop the worker at random moments and restart it, until ``n_kills``
    kill -9 were done and the feeder has finished; every eighth stop is a
    clean SIGTERM. Returns (kills, clean stops, kills during start-up, kills
    after the feeder finished)."""
    kills = stops = early = late_kills = 0
    while kills < n_kills or feeder.is_alive():
        assert not failure, failure
        start = w.started_at
        before = events_counted(r, ids)
        if rng.random() < 0.2:
            time.sleep(max(0.0, start + rng.uniform(0.2, 5.5) - time.monotonic()))
            early += 1
        else:
            # the first event applied by this incarnation (or 30 s: nothing to do)
            wait_until(lambda b=before, s=start: events_counted(r, ids) > b or
                       time.monotonic() - s > 30, 40, "ingest to resume", interval=0.02,
                       workers=[w])
            time.sleep(rng.uniform(0.0, 1.5))
        if not feeder.is_alive():
            late_kills += 1
        w.check_alive()  # it died by itself: a bug, not one of our kills
        if (kills + stops) % 8 == 3:
            rc = w.stop()
            assert rc == 0, f"clean stop gave {rc}\n{w.log_tail()}"
            stops += 1
        else:
            w.kill9()
            kills += 1
        w.start()
    return kills, stops, early, late_kills


# --------------------------------------------------------------------------- 4


def test_chain_continuity(new_stack, workers, r):
    """kill -9 a role=all worker whose sampler has advanced its chains; the
    restarted worker continues them at the stored iteration, with their
    window of draws, and estimates keep coming.

    The first tick after the restart must store iteration = stored + sweeps
    (not sweeps: restarted chains; not more: a skipped or doubled tick), and
    its window must be the stored one shifted by the new sweeps. The
    published history's iterations only grow, across the crash.
    """
    st = new_stack("chains", partitions=1)
    cfg, evs, _ = make_traffic(4000, 8, "ch", seed=21, window_seconds=86_400, started_at=START)
    st.register([cfg])
    sweeps, window = st.settings["sweeps_per_tick"], st.settings["window_draws"]
    cut = int(len(evs) * 0.6)
    w = workers.start(st, "all")
    produce(st.bootstrap, st.events_topic, evs[:cut])

    def blob():
        raw = r.get(chain_key("ch", "value"))
        return None if raw is None else decode(raw)

    n = 300
    wait_until(lambda: (b := blob()) and int(b[0]["s.iteration"]) >= n, 120,
               f"chains at iteration >= {n}", workers=[w])
    time.sleep(random.Random(4).uniform(0, 1.0))  # a random moment, maybe mid-tick
    w.kill9()
    t_kill_ms = int(time.time() * 1000)
    arrays, meta = blob()
    it0 = int(arrays["s.iteration"])
    assert arrays["w.tau"].shape[1] == window and it0 % sweeps == 0
    est0 = loads(r.get(estimate_key("ch", "value", "treatment")))

    w.start()
    b1 = wait_until(lambda: (b := blob()) and int(b[0]["s.iteration"]) > it0 and b, 60,
                    "the first tick after the restart", interval=0.01, workers=[w])
    a1, _ = b1
    it1 = int(a1["s.iteration"])
    assert it1 == it0 + sweeps, (it0, it1)
    wkeys = [k for k in arrays if k.startswith("w.")]
    assert "w.tau" in wkeys and set(wkeys) == {k for k in a1 if k.startswith("w.")}
    for k in wkeys:  # the stored window, shifted by one tick's draws
        np.testing.assert_array_equal(a1[k][:, :window - sweeps], arrays[k][:, sweeps:])
    # chain parameters moved on from the stored ones (continued, not copied)
    assert any(not np.array_equal(a1[k], arrays[k]) for k in a1
               if k.startswith("s.") and k != "s.iteration")

    # more data: estimates keep coming, at the new watermark, iterations growing
    produce(st.bootstrap, st.events_topic, evs[cut:])
    final_wm = max(e["ts"] for e in evs) - cfg.lateness_seconds * 1000  # capped by max_ts
    rec = wait_until(lambda: (e := r.get(estimate_key("ch", "value", "treatment")))
                     and (e := loads(e))["watermark"]["event_time"] == final_wm
                     and e["diagnostics"]["iteration"] >= it1 + 2 * sweeps and e, 90,
                     "estimates on the new data", workers=[w])
    hist = [loads(x) for x in r.lrange(history_key("ch", "value", "treatment"), 0, -1)][::-1]
    its = [h["iteration"] for h in hist]
    assert its == sorted(set(its)), its  # strictly increasing: never reset, never repeated
    after = [h["iteration"] for h in hist if h["computed_at"] > t_kill_ms]
    assert after[0] == it0 + sweeps and after[-1] >= rec["diagnostics"]["iteration"] > it0
    assert est0["diagnostics"]["iteration"] <= it0
    print(f"\n[chains] killed at stored iteration {it0}; first tick after restart "
          f"{it1}; history {its[0]}..{its[-1]} ({len(its)} estimates, increasing)")
    assert w.stop() == 0, w.log_tail()


# --------------------------------------------------------------------------- 5


@pytest.mark.parametrize("rate", [500, pytest.param(2000, marks=pytest.mark.slow)])
def test_latency(kafka_bootstrap, redis_url, rate):
    """End-to-end latency: produce an event -> an estimate that reflects it.

    The measurement is ``liftstream bench latency`` (``streams.bench.ingest.
    run_latency``): ``rate`` events/s for 15 s, event time = wall-clock time,
    one experiment, ONE events partition, lateness 0, a worker of role all
    with the default sampler cadence (tick 1 s, 8 chains, 50 sweeps per tick).
    An estimate reflects event i when its watermark is >= ts_i; its time is
    when its Redis pub/sub notice reaches the subscriber. Every produced event
    must be reflected by some estimate.
    """
    from streams.bench.ingest import run_latency

    res = run_latency(rate, 15.0, kafka_bootstrap, redis_url)
    print(f"\n[latency] {res['events']} events at {rate} events/s for 15 s, 1 partition, "
          f"tick 1 s, 8 chains x 50 sweeps: event -> estimate p50 {res['p50_s'] * 1000:.0f} ms,"
          f" p99 {res['p99_s'] * 1000:.0f} ms, max {res['max_s'] * 1000:.0f} ms "
          f"({res['estimates']} estimates)")
    assert res["events"] > 0.8 * rate * 15
    assert res["measured"] == res["events"]
    assert res["min_s"] > 0
    assert res["p99_s"] < 10.0
