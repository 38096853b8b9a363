"""Event time beyond the reducer (docs/architecture.md#state): the completeness watermark and the
idle advance (``streams.state.clocks``), bounded maturation, dead letters that move
no clock, and the ``data_loss`` alert on a real stream of late metrics."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
import redis

from schemas.codec import dumps
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.ingest.ingestor import Ingestor
from streams.state.clocks import ClockService, IdleTracker, completeness
from streams.state.data_quality import data_quality
from streams.state.registry import Registry
from streams.state.semantics import Reducer
from streams.state.store import (
    apply_source_batch,
    event_row,
    partition_clock,
    read_completeness,
    read_counters,
    read_snapshot,
    settle,
)
from tests.support.streaming_harness import assert_state_close, event_dict

T0 = 1_700_000_000_000
TOPIC = "ev"


# ---------------------------------------------------------------- pure rules


def test_completeness_ignores_partitions_without_backlog():
    clocks = {0: 100, 1: 50, 2: 70}
    # partition 1 is caught up (applied 9, high 10): ignored (KIP-695)
    assert completeness(clocks, {0: 3, 1: 9, 2: 4}, {0: 10, 1: 10, 2: 10}) == 70
    # all caught up: the lowest clock
    assert completeness(clocks, {0: 9, 1: 9, 2: 9}, {0: 10, 1: 10, 2: 10}) == 50
    # a partition with a backlog that was never read: unknown
    assert completeness({0: 100}, {0: 3}, {0: 10, 1: 5}) is None
    # a never-used, empty partition does not count
    assert completeness({0: 100}, {0: 9}, {0: 10, 1: 0}) == 100
    assert completeness({}, {}, {0: 0}) is None


def test_idle_tracker_needs_a_still_clock_while_caught_up():
    t = IdleTracker(idle_ms=1000)
    assert not t.idle(0, 5, True, 0)
    assert not t.idle(0, 5, True, 999)
    assert t.idle(0, 5, True, 1000)
    assert not t.idle(0, 6, True, 1500)  # the clock moved: start again
    assert not t.idle(0, 6, False, 3000)  # a backlog: start again
    assert not t.idle(0, 6, True, 3500)
    assert t.idle(0, 6, True, 4500)


# ---------------------------------------------------------------- with Redis


def cfg(**kw) -> ExperimentConfig:
    base = dict(experiment_id="e1", metrics=(MetricSpec("rev"),), window_seconds=10,
                bucket_seconds=5, lateness_seconds=1, correction_seconds=20, hold_seconds=30)
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.fixture()
def r(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.mark.integration
def test_clock_service_publishes_completeness_and_advances_idle_partitions(r):
    c = cfg()
    known = {"e1": c}
    apply_source_batch(r, known, TOPIC, 0, [event_row(0, Exposure("a", "e1", "u", "control",
                                                                  T0, 1.0))])
    apply_source_batch(r, known, TOPIC, 1, [event_row(0, Exposure("b", "e1", "v", "control",
                                                                  T0 + 5000, 1.0))])
    svc = ClockService(r, TOPIC, idle_seconds=2.0, configs=lambda: [c])
    high = {0: 1, 1: 1, 2: 0}  # both read to the end; partition 2 empty
    assert svc.tick(high, owned={0: None, 1: None}, now_ms=T0 + 60_000) == T0
    assert read_completeness(r, TOPIC) == T0
    assert read_snapshot(r, c).matured["control"] == 0
    svc.tick(high, {0: None, 1: None}, T0 + 61_000)
    assert read_snapshot(r, c).matured["control"] == 0  # idle 1 s of 2
    assert svc.tick(high, {0: None, 1: None}, T0 + 62_000) == T0 + 62_000  # idle: wall clock
    assert partition_clock(r, TOPIC, 0) == T0 + 62_000
    assert read_snapshot(r, c).matured["control"] == 2  # both windows closed by then
    # a backlog on partition 1 again: its clock bounds completeness
    assert svc.tick({0: 1, 1: 3, 2: 0}, {0: None, 1: None}, T0 + 63_000) == T0 + 62_000
    # the watermark of an estimate stops at the experiment's latest event
    assert read_snapshot(r, c, completeness=T0 + 62_000).watermark == T0 + 5000 - 1000


@pytest.mark.integration
def test_maturation_folds_in_bounded_calls(r):
    """30 units due at once, 7 a call: five calls, the same cells as the reducer."""
    c = cfg()
    evs = [Exposure(f"x{i}", "e1", f"u{i:02d}", "control", T0 + i, 1.0) for i in range(30)]
    red = Reducer([c], fold_limit=7)
    red.apply_batch(f"{TOPIC}|0", evs)
    apply_source_batch(r, {"e1": c}, TOPIC, 0, [event_row(i, e) for i, e in enumerate(evs)],
                       fold_limit=7)
    late = T0 + 60_000
    assert settle(r, c, TOPIC, 0, late, fold_limit=7)
    while red.states["e1"].settle(f"{TOPIC}|0", late):
        pass
    red.clocks[f"{TOPIC}|0"] = late
    assert read_snapshot(r, c).matured["control"] == 30
    assert_state_close(r, [c], red)


@pytest.mark.integration
def test_future_and_too_old_events_are_dead_letters_that_move_no_clock(r):
    c = cfg()
    reg = Registry(r)
    reg.put(c)
    ing = Ingestor(r, reg)
    now = T0 + 100_000
    first = [Exposure("a", "e1", "u", "control", now - 1000, 1.0)]
    res = ing.process(TOPIC, 0, [(0, dumps(event_dict(first[0])))], now)
    assert not res.dead_letters and partition_clock(r, TOPIC, 0) == now - 1000
    bad = [Exposure("f", "e1", "v", "control", now + 301_000, 1.0),  # > now + 5 min
           Exposure("o", "e1", "w", "control", now - 60_000, 1.0)]  # 40+10+20 <= 99-1 s
    res = ing.process(TOPIC, 0, [(i + 1, dumps(event_dict(e))) for i, e in enumerate(bad)], now)
    assert [(d["reason"]["code"], d["source"]["offset"]) for d in res.dead_letters] == \
        [("ts_in_future", 1), ("exposure_too_old", 2)]
    assert partition_clock(r, TOPIC, 0) == now - 1000  # neither moved the clock
    snap = read_snapshot(r, c)
    assert snap.counters["too_old"] == 1 and snap.exposed["control"] == 1
    assert snap.dead_letters == {"ts_in_future": 1}


@pytest.mark.integration
def test_defect5_retried_process_counts_each_dead_letter_once(r):
    """The events plane retries ``process`` whole after a transient Redis
    error; the experiment's dead-letter counts (``dl:<reason>``, its
    data_quality) must count each dead letter once (issue 24, defect 5): they
    are applied with the batch, under the same applied-offset skip. Also when
    no event of the batch reaches the experiment's state."""
    c = cfg()
    reg = Registry(r)
    reg.put(c)
    ing = Ingestor(r, reg)
    now = T0 + 100_000
    future = Exposure("f", "e1", "v", "control", now + 301_000, 1.0)  # > now + 5 min
    batch = [(0, dumps(event_dict(Exposure("a", "e1", "u", "control", now - 1000, 1.0)))),
             (1, dumps(event_dict(future)))]
    for _ in range(2):  # the run, then its retry
        res = ing.process(TOPIC, 0, batch, now)
        assert [d["reason"]["code"] for d in res.dead_letters] == ["ts_in_future"]
    assert read_snapshot(r, c).dead_letters == {"ts_in_future": 1}
    only_dead = [(2, dumps(event_dict(replace(future, event_id="g"))))]
    for _ in range(2):
        ing.process(TOPIC, 0, only_dead, now)
    assert read_snapshot(r, c).dead_letters == {"ts_in_future": 2}


@pytest.mark.integration
def test_too_old_exposures_dead_letters_agree_with_data_quality(r):
    """An exposure too old to store is dead-lettered ``exposure_too_old`` by
    ingest; the experiment must count it ``too_old`` too, whatever else it
    is (issue 24): a re-exposure of a known unit, a re-sent copy of it. The
    reducer agrees."""
    c = cfg(started_at=T0)  # W 10 s, H 20 s, L 1 s: too old once ts + 31 s <= the clock
    reg = Registry(r)
    reg.put(c)  # with its start (else the registration time: before_start)
    ing = Ingestor(r, reg)
    now = T0 + 200_000
    evs = [Exposure("a", "e1", "u", "control", T0 + 90_000, 1.0),
           Exposure("b", "e1", "w", "control", T0 + 100_000, 1.0),
           Exposure("o", "e1", "u", "control", T0 + 60_000, 1.0),  # u known, too old
           Exposure("p", "e1", "u", "treatment", T0 + 61_000, 1.0),  # u known, too old
           Exposure("o", "e1", "u", "control", T0 + 60_000, 1.0)]  # a re-send of "o"
    res = ing.process(TOPIC, 0, [(i, dumps(event_dict(e))) for i, e in enumerate(evs)], now)
    dead = [d["reason"]["code"] for d in res.dead_letters]
    assert dead == ["exposure_too_old"] * 3
    counters = read_snapshot(r, c).counters
    want = Reducer([c]).apply_all(evs, source=f"{TOPIC}|0", batch=len(evs))
    assert want.states["e1"].snapshot().counters == counters
    assert counters["too_old"] == 3, counters
    assert counters["repeat_exposure"] == counters["conflict"] == counters["duplicate"] == 0


@pytest.mark.integration
def test_too_old_is_judged_on_the_clock_of_registered_rows_only(r):
    """Dead letters of an unregistered experiment move no clock, whatever
    their place in the batch: each exposure is judged too old against the
    clock after it over the registered experiment's rows (``clocked_batch``),
    and the dead letters come in offset order."""
    c = cfg(started_at=T0)  # too old once ts + 31 s <= the clock
    reg = Registry(r)
    reg.put(c)
    ing = Ingestor(r, reg)
    evs = [Exposure("z1", "zz", "u1", "control", T0 + 500_000, 1.0),  # unregistered
           Exposure("a", "e1", "u", "control", T0 + 100_000, 1.0),
           Exposure("z2", "zz", "u2", "control", T0 + 500_000, 1.0),  # unregistered
           Exposure("o", "e1", "w", "control", T0 + 75_000, 1.0),  # 106 s > 100 s: kept
           Exposure("q", "e1", "x", "control", T0 + 140_000, 1.0),
           Exposure("s", "e1", "y", "control", T0 + 60_000, 1.0)]  # 91 s <= 140 s: too old
    msgs = [(i, dumps(event_dict(e))) for i, e in enumerate(evs)]
    res = ing.process(TOPIC, 0, msgs, T0 + 600_000)
    assert [(d["reason"]["code"], d["source"]["offset"]) for d in res.dead_letters] == [
        ("unknown_experiment", 0), ("unknown_experiment", 2), ("exposure_too_old", 5)]
    assert [base64.b64decode(d["original_b64"]) for d in res.dead_letters] == [
        msgs[0][1], msgs[2][1], msgs[5][1]]
    assert "partition clock 1700000140000 " in res.dead_letters[2]["reason"]["message"]
    assert read_snapshot(r, c).counters["too_old"] == 1
    assert partition_clock(r, TOPIC, 0) == T0 + 140_000


@pytest.mark.integration
def test_data_loss_alert_on_a_stream_with_late_metrics(r):
    """2% of the metrics arrive past the correction horizon: data_loss fires
    once; when they stop, it resolves (the alert judges a recent window)."""
    from streams.alerts import store as alerting
    from tests.support.alert_records import quiet

    c = cfg(experiment_id="exp-1", correction_seconds=2, window_seconds=5, lateness_seconds=0)
    reg = Registry(r)
    reg.put(c)
    known = {"exp-1": c}
    off, t = 0, T0

    def tick(late: bool) -> list[dict]:
        nonlocal off, t
        evs = []
        for i in range(250):
            uid = f"u{off + i}"
            evs.append(Exposure(f"x{off + i}", "exp-1", uid, "control", t, 1.0))
            for k in range(3):
                evs.append(Metric(f"m{off + i}.{k}", uid, "rev", 1.0, t + 1000 * k, "exp-1"))
        if late:  # 15 of 750 metrics (2%): in units' windows long past close + H
            evs += [Metric(f"l{off + i}", f"u{i}", "rev", 1.0, T0 + 100, "exp-1")
                    for i in range(15)]
        apply_source_batch(r, known, TOPIC, 0, [event_row(off + j, e) for j, e in
                                                 enumerate(evs)])
        off += len(evs)
        t += 60_000
        dq = data_quality(read_snapshot(r, c))
        return alerting.process(r, reg, [quiet(dq=dq)], t)

    assert not tick(False)
    fired = tick(True)
    assert [(a["kind"], a["state"]) for a in fired] == [("data_loss", "firing")]
    assert not tick(True) and not tick(True)  # edge-triggered
    resolved = []
    for _ in range(3):
        resolved += tick(False)
    assert [(a["kind"], a["state"]) for a in resolved] == [("data_loss", "resolved")]
    assert read_snapshot(r, c).counters["late"] == 45


@pytest.mark.integration
def test_quiet_settle_calls_only_experiments_with_work(r):
    """``Ingestor.settle_quiet`` settles (one commit) only for experiments
    with a due pending unit or an expired hold on the partition (one
    pipeline of two native commands each for the others), with the same
    result as settling every one of them."""
    reg = Registry(r)
    cfgs = [cfg(experiment_id=f"q{i:02d}") for i in range(40)]
    for c in cfgs:
        reg.put(c)
    ing = Ingestor(r, reg)
    # q00: a unit whose window closes at T0 + 10 s; q01: a held metric; the rest: nothing
    ing.process(TOPIC, 0, [(0, dumps(event_dict(Exposure("x", "q00", "u", "control", T0,
                                                         1.0)))),
                           (1, dumps(event_dict(Metric("m", "v", "rev", 1.0, T0 + 1, "q01"))))],
                T0 + 2000)
    before = {k: int(v["calls"]) for k, v in r.info("commandstats").items()}
    clk = T0 + 45_000  # past q00's close + L and q01's hold horizon
    changed = ing.settle_quiet(TOPIC, 0, clk, T0 + 10 * 60_000)
    calls = {k: int(v["calls"]) - before.get(k, 0) for k, v in r.info("commandstats").items()}
    assert changed == {"q00", "q01"}
    # one settle commit (MULTI/EXEC) each, none for the 38, and no script at all
    assert calls.get("cmdstat_exec", 0) == 2 and calls.get("cmdstat_evalsha", 0) == 0
    snap = read_snapshot(r, cfgs[0])
    assert snap.matured["control"] == 1
    assert read_counters(r, "q01")["expired"] == 1
