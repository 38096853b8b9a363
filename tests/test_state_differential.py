"""Differential test: Redis/Lua ingest (streams.state) == reference reducer
(streams.semantics), on random event streams, against a real redis-server.

Random streams over 2-3 experiments with windows, buckets, lateness and dedupe
horizons of a few seconds (so maturation, late metrics and dedupe expiry all
happen), with duplicates, disorder, unknown units/variants/metrics/experiments,
pre-exposure and outside-window metrics, metrics without experiment_id,
conflicts and missing pre_activity. The stream is cut into random batches
(increasing offsets on one partition) and fed through route_batch +
apply_batch, with simulated crashes (after routing only; after applying to some
experiments) followed by the full batch, and replays of earlier batches, which
must be no-ops. Snapshots must be equal with every float bit-identical; unit
states and the pending set too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.semantics import Reducer
from streams.state import (
    applied_offset,
    apply_batch,
    config_argv,
    experiment_keys,
    ingest_script,
    min_applied_offsets,
    read_pending,
    read_snapshot,
    read_units,
    route_batch,
)
from tests.streaming_harness import bits

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
TOPIC = "liftstream.events"
PART = 3
UNITS = ("u0", "u1", "u2", "u10", "Z", "z", "é", "u 1")


@st.composite
def configs(draw):
    out = []
    for i in range(draw(st.integers(2, 3))):
        out.append(ExperimentConfig(
            experiment_id=f"e{i}",
            variants=draw(st.sampled_from([("control", "treatment"), ("c", "t1", "t2")])),
            metrics=tuple(MetricSpec(m) for m in draw(
                st.sampled_from([("rev",), ("rev", "clicks")]))),
            strata_edges=draw(st.sampled_from([(0, 1, 4, 29), (0, 2.5), (0,)])),
            window_seconds=draw(st.integers(0, 5)),
            bucket_seconds=draw(st.integers(1, 3)),
            lateness_seconds=draw(st.integers(0, 2)),
            dedupe_seconds=draw(st.integers(0, 4)),
            started_at=draw(st.none() | st.integers(-3000, 3000).map(lambda d: T0 + d)),
        ))
    return out


values = (st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
          | st.sampled_from([0.1, 0.2, 1e-300, 1e15, -0.0, 3.0, 1 / 3]))
activities = st.none() | st.sampled_from([0, 0.5, 1, 2.5, 3.7, 4, 28, 29, 35]) | st.floats(0, 40)


@st.composite
def streams(draw, cfgs):
    exp_ids = [c.experiment_id for c in cfgs]
    all_variants = sorted({v for c in cfgs for v in c.variants} | {"zz"})
    n = draw(st.integers(1, 60))
    t = 0
    events = []
    exposures: list[Exposure] = []  # metrics mostly target exposed units, so they land
    for _ in range(n):
        if events and draw(st.integers(0, 9)) == 0:  # exact re-send
            events.append(draw(st.sampled_from(events)))
            continue
        if draw(st.integers(0, 5)) == 0:  # straggler: far behind, clock stays
            ts = T0 + t - draw(st.integers(0, 9000))
        else:
            t += draw(st.integers(-500, 2500))
            ts = T0 + t
        eid = f"k{draw(st.integers(0, 20))}"
        if draw(st.booleans()):
            x = Exposure(eid, draw(st.sampled_from(exp_ids + ["ghost"])),
                         draw(st.sampled_from(UNITS)), draw(st.sampled_from(all_variants)),
                         ts, draw(activities))
            exposures.append(x)
            events.append(x)
        else:
            exp = draw(st.sampled_from([None, None, None, "ghost", *exp_ids]))
            unit = draw(st.sampled_from(UNITS))
            if exposures and draw(st.integers(0, 2)) > 0:
                # anchored at an earlier exposure: inside or around its window,
                # often long after it closed (late) when the clock has moved on
                x = draw(st.sampled_from(exposures))
                unit, ts = x.unit_id, x.ts + draw(st.integers(-300, 6000))
                exp = draw(st.sampled_from([None, None, x.experiment_id, exp]))
            name = draw(st.sampled_from(["rev", "rev", "clicks", "bogus"]))
            events.append(Metric(eid, unit, name, draw(values), ts, exp))
    return events


def assert_redis_equals_reducer(r, cfgs, red: Reducer, rejected) -> None:
    """Redis (snapshot, unit records, pending set) equals the reference reducer
    bit for bit, and the routing rejections equal its counters."""
    reasons = [why for _, _, why in rejected]
    assert reasons.count("unrouted") == red.counters["unrouted"]
    assert reasons.count("unknown_experiment") == red.counters["unknown_experiment"]
    for c in cfgs:
        want = red.states[c.experiment_id]
        got = read_snapshot(r, c)
        assert bits(got) == bits(want.snapshot()), c.experiment_id
        assert got == want.snapshot()
        assert bits(read_units(r, c)) == bits(want.units)
        assert read_pending(r, c.experiment_id) == want.pending_units()


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_lua_equals_reducer(redis_url, data):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    cfgs = data.draw(configs(), label="configs")
    events = data.draw(streams(cfgs), label="events")
    known = {c.experiment_id: c for c in cfgs}

    # oracle
    red = Reducer(cfgs)
    red.apply_all(events)

    # offsets with gaps, then random batch cuts
    off = data.draw(st.integers(0, 1000))
    with_offsets = []
    for ev in events:
        with_offsets.append((off, ev))
        off += data.draw(st.integers(1, 3))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(events)), max_size=8))))
    bounds = [0, *[c for c in cuts if c < len(events)], len(events)]
    batches = [with_offsets[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    rejected: list = []
    for i, batch in enumerate(batches):
        crash = data.draw(st.sampled_from(["none", "none", "after_route", "partial"]))
        if crash == "after_route":
            route_batch(r, batch, known, TOPIC, PART)
        elif crash == "partial":
            routed = route_batch(r, batch, known, TOPIC, PART)
            for e, evs in routed.items():
                if data.draw(st.booleans()):
                    apply_batch(r, known[e], TOPIC, PART, evs)
        routed = route_batch(r, batch, known, TOPIC, PART, rejected=rejected)
        for e, evs in routed.items():
            res = apply_batch(r, known[e], TOPIC, PART, evs)
            assert res["offset"] == evs[-1][0]
        if data.draw(st.integers(0, 2)) == 0:  # replay an earlier batch: no-op
            j = data.draw(st.integers(0, i))
            seq_before = {e: r.get(f"lr:{{e:{e}}}:dirty_seq") for e in known}
            for e, evs in route_batch(r, batches[j], known, TOPIC, PART).items():
                res = apply_batch(r, known[e], TOPIC, PART, evs)
                assert res["applied"] == 0 and res["skipped"] == len(evs)
            assert seq_before == {e: r.get(f"lr:{{e:{e}}}:dirty_seq") for e in known}

    assert_redis_equals_reducer(r, cfgs, red, rejected)
    r.close()


# ---------------------------------------------------------------- targeted cases


def _cfg(eid="e1", **kw) -> ExperimentConfig:
    base = dict(experiment_id=eid, metrics=(MetricSpec("rev"),), window_seconds=10,
                bucket_seconds=2, lateness_seconds=1, dedupe_seconds=5)
    base.update(kw)
    return ExperimentConfig(**base)


def _both(r, cfgs, events, batch_size):
    """Feed ``events`` through Redis in batches and through the reducer."""
    known = {c.experiment_id: c for c in cfgs}
    batch = list(enumerate(events))
    for k in range(0, len(batch), batch_size):
        for e, part in route_batch(r, batch[k:k + batch_size], known, TOPIC, 0).items():
            apply_batch(r, known[e], TOPIC, 0, part)
    red = Reducer(cfgs).apply_all(events)
    for c in cfgs:
        assert bits(read_snapshot(r, c)) == bits(red.snapshots()[c.experiment_id])
        assert bits(read_units(r, c)) == bits(red.states[c.experiment_id].units)
        assert read_pending(r, c.experiment_id) == red.states[c.experiment_id].pending_units()
    return red


def _x(eid, unit, t, variant="control", exp="e1", pre=1.0):
    return Exposure(eid, exp, unit, variant, T0 + t, pre)


def _m(eid, unit, t, value=1.0, exp="e1"):
    return Metric(eid, unit, "rev", value, T0 + t, exp)


TRICKY = {
    # an exposure whose window closed before the watermark matures at once,
    # so its metric is late even though the watermark did not move
    "late_exposure": [_m("a", "w", 30_000), _x("b", "old", 0), _m("c", "old", 500)],
    # dedupe boundary (DD = 5 s): 0 >= 5000 - 5000 is a duplicate ...
    "dedupe_edge": [_m("a", "u", 0), _m("b", "u", 5000), _m("a", "u", 0)],
    # ... one ms later it has expired; the new sighting overwrites the old
    "dedupe_expiry_overwrite": [_m("a", "u", 0), _m("b", "u", 5001), _m("a", "u", 4000),
                                _m("c", "u", 9000), _m("a", "u", 1)],
    # fold order (close_ts, unit bytes) shows in the float sum
    "fold_order": [_x("1", "c", 0), _x("2", "b", 0), _x("3", "A", 0),
                   _m("4", "c", 5, 1.0), _m("5", "A", 5, 1e16), _m("6", "b", 5, -1e16),
                   _m("7", "z", 20_000)],
    "conflict_repeat": [_x("1", "u", 0), _x("2", "u", 10, "treatment"), _x("3", "u", 20),
                        _x("4", "u", 30, "nope"), _m("5", "u", 40, 2.5)],
}


@pytest.mark.parametrize("name", sorted(TRICKY))
@pytest.mark.parametrize("batch_size", [1, 2, 100])
def test_tricky_sequences(redis_url, name, batch_size):
    r = redis.Redis.from_url(redis_url)
    _both(r, [_cfg()], TRICKY[name], batch_size)


def test_crash_between_index_write_and_lua_does_not_reroute(redis_url):
    """A metric without experiment_id *before* the unit's exposure in the same
    batch goes nowhere; after a crash that left the index written but not the
    experiment, the replay must still route it nowhere (a plain set index
    would route it to e1 and count unknown_unit there)."""
    r = redis.Redis.from_url(redis_url)
    c = _cfg()
    batch = [(10, Metric("m", "u", "rev", 1.0, T0 + 50_000)),
             (11, Exposure("x", "e1", "u", "control", T0, 2.0))]
    route_batch(r, batch, {"e1": c}, TOPIC, 0)  # crash here
    routed = route_batch(r, batch, {"e1": c}, TOPIC, 0)
    assert routed == {"e1": [batch[1]]}
    apply_batch(r, c, TOPIC, 0, routed["e1"])
    want = Reducer([c]).apply_all(e for _, e in batch).snapshots()["e1"]
    assert read_snapshot(r, c) == want
    assert want.max_ts == T0  # the metric's ts did not move e1's clock


def test_partial_apply_then_replay_is_exactly_once(redis_url):
    r = redis.Redis.from_url(redis_url)
    c1, c2 = _cfg("e1"), _cfg("e2")
    known = {"e1": c1, "e2": c2}
    batch = [(0, Exposure("x1", "e1", "u", "control", T0)),
             (1, Exposure("x2", "e2", "u", "treatment", T0)),
             (2, Metric("m", "u", "rev", 0.1, T0 + 5))]
    routed = route_batch(r, batch, known, TOPIC, 0)
    assert routed == {"e1": [batch[0], batch[2]], "e2": [batch[1], batch[2]]}
    apply_batch(r, c1, TOPIC, 0, routed["e1"])  # crash before e2
    for e, evs in route_batch(r, batch, known, TOPIC, 0).items():
        apply_batch(r, known[e], TOPIC, 0, evs)
    red = Reducer([c1, c2]).apply_all(e for _, e in batch)
    for c in (c1, c2):
        assert read_snapshot(r, c) == red.snapshots()[c.experiment_id]
    assert read_units(r, c1)["u"].totals == [0.1]
    assert read_units(r, c2)["u"].totals == [0.1]


def test_offsets_api(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)  # str replies work too
    c1, c2 = _cfg("e1"), _cfg("e2")
    apply_batch(r, c1, TOPIC, 0, [(7, Exposure("a", "e1", "u", "control", T0))])
    apply_batch(r, c1, TOPIC, 1, [(30, Exposure("b", "e1", "v", "control", T0))])
    apply_batch(r, c2, TOPIC, 0, [(4, Exposure("c", "e2", "w", "control", T0))])
    apply_batch(r, c2, "other", 0, [(1, Exposure("d", "e2", "y", "control", T0))])
    assert applied_offset(r, "e1", TOPIC, 0) == 7
    assert applied_offset(r, "e1", TOPIC, 2) is None
    assert min_applied_offsets(r, ["e1", "e2", "e3"], TOPIC) == {0: 4, 1: 30}
    assert min_applied_offsets(r, [], TOPIC) == {}
    snap = read_snapshot(r, c1)
    assert snap.seq == 2 and snap.exposed == {"control": 2, "treatment": 0}


def test_apply_batch_rejects_foreign_and_non_finite(redis_url):
    r = redis.Redis.from_url(redis_url)
    c = _cfg()
    with pytest.raises(ValueError):
        apply_batch(r, c, TOPIC, 0, [(0, Exposure("a", "e2", "u", "control", T0))])
    with pytest.raises(ValueError):
        apply_batch(r, c, TOPIC, 0, [(0, Metric("a", "u", "rev", math.inf, T0))])
    assert apply_batch(r, c, TOPIC, 0, []) == {"applied": 0, "skipped": 0}
    assert r.dbsize() == 0


def test_script_rejects_malformed_event_blobs(redis_url):
    """The script checks what a caller other than ``apply_rows`` could get
    wrong: a name index beyond the config's lists, heads that are not whole,
    ids that do not add up to the heads' lengths. Nothing is written."""
    import struct

    r = redis.Redis.from_url(redis_url)
    c = _cfg()
    keys = experiment_keys(c.experiment_id).for_lua()
    argv = config_argv(c, TOPIC, 0)

    def head(no: int, la: int = 1, lu: int = 1) -> bytes:
        return struct.pack("<cHdddHH", b"x", no, 0, T0, math.nan, la, lu)

    for blobs, why in [((head(len(c.variants) + 1), b"au"), "name index"),
                       ((head(1)[:-1], b"au"), "event heads"),
                       ((head(1), b"a"), "event strings")]:
        with pytest.raises(redis.ResponseError, match=why):
            ingest_script(r)(keys=keys, args=argv + list(blobs), client=r)
    assert r.dbsize() == 0
    ingest_script(r)(keys=keys, args=argv + [head(1), b"au"], client=r)  # well formed
    assert read_snapshot(r, c).exposed["control"] == 1


def test_float_sums_bit_equal_on_long_stream(redis_url):
    """Many small, awkward values into one cell: Σy and Σy² must match to the
    bit (no %.14g, no long double anywhere on the Lua side)."""
    r = redis.Redis.from_url(redis_url)
    c = _cfg(window_seconds=1, lateness_seconds=0)
    evs = []
    for i in range(400):
        u = f"u{i}"
        evs.append(Exposure(f"x{i}", "e1", u, "control", T0 + i * 10, 3.3))
        evs.append(Metric(f"m{i}", u, "rev", 0.1 * (i % 7) + 1 / 3, T0 + i * 10 + 1))
        evs.append(Metric(f"n{i}", u, "rev", 1e-3 / (i + 1), T0 + i * 10 + 2))
    evs.append(Metric("end", "u0", "rev", 0.0, T0 + 10_000_000))
    batch = list(enumerate(evs))
    for k in range(0, len(batch), 97):
        for part in route_batch(r, batch[k:k + 97], {"e1": c}, TOPIC, 0).values():
            apply_batch(r, c, TOPIC, 0, part)
    want = Reducer([c]).apply_all(evs).snapshots()["e1"]
    got = read_snapshot(r, c)
    assert bits(got) == bits(want)
    assert got.matured["control"] == 400
    assert got.activity_sum[2] == want.activity_sum[2] and got.activity_n[2] == 400


def test_legacy_text_unit_records_still_read(redis_url):
    """Unit records written in the earlier text form ("v s b ets m t1 .. tM",
    %.17g) are read by the script and by read_units, and rewritten in binary
    form when next touched; the result equals the reducer."""
    r = redis.Redis.from_url(redis_url)
    c = _cfg(metrics=(MetricSpec("rev"), MetricSpec("clicks")), window_seconds=3)
    evs = [_x("1", "a", 0), _x("2", "b", 100, "treatment", pre=None),
           Metric("3", "a", "clicks", 0.1, T0 + 200, "e1"), _m("4", "b", 300, 1 / 3),
           _m("5", "a", 1000, 2.5), _x("6", "c", 1500), _m("7", "z", 10_000)]
    known = {"e1": c}
    batch = list(enumerate(evs))
    for e, part in route_batch(r, batch[:4], known, TOPIC, 0).items():
        apply_batch(r, known[e], TOPIC, 0, part)
    key = "lr:{e:e1}:units"
    for uid, us in read_units(r, c).items():
        text = " ".join([str(c.variants.index(us.variant)), str(us.stratum), str(us.bucket),
                         str(us.exposure_ts), "1" if us.matured else "0",
                         *(repr(t) for t in us.totals[:1])])  # one total: the other reads 0
        r.hset(key, uid, text)
    assert all(not v.startswith(b"\x01") for v in r.hvals(key))
    mid = Reducer([c]).apply_all(evs[:4]).states["e1"].units
    mid["a"].totals[1] = 0.0  # the text record above dropped the second total
    assert bits(read_units(r, c)) == bits(mid)
    for e, part in route_batch(r, batch[4:], known, TOPIC, 0).items():
        apply_batch(r, known[e], TOPIC, 0, part)
    want = Reducer([c]).apply_all([e for e in evs if e.event_id != "3"])
    # ("3", clicks 0.1 on a) was dropped with the second total; otherwise equal
    assert bits(read_snapshot(r, c).cells) == bits(want.snapshots()["e1"].cells)
    assert bits(read_units(r, c)) == bits(want.states["e1"].units)
    assert all(v.startswith(b"\x01") for v in r.hvals(key))  # all rewritten (all matured)


# ---------------------------------------------------------------- per-partition watermark


def test_slow_partition_metrics_not_late_within_skew(redis_url):
    """DESIGN §5 per-partition watermark: partition 0 runs 50 s ahead of
    partition 1 (a backfill, or a consumer reading partitions one after
    another). Within I (60 s) partition 1 holds the watermark back, so its
    metrics are applied, not late; once partition 0 is more than I ahead,
    they are late (the bound works). Redis equals the reducer throughout."""
    r = redis.Redis.from_url(redis_url)
    c = _cfg(partition_skew_seconds=60)  # W = 10 s, L = 1 s
    known = {"e1": c}
    red = Reducer([c])

    def feed(part, batch):
        for e, evs in route_batch(r, batch, known, TOPIC, part).items():
            apply_batch(r, known[e], TOPIC, part, evs)
        for _, ev in batch:
            red.apply(ev, f"{TOPIC}|{part}")
        got, want = read_snapshot(r, c), red.snapshots()["e1"]
        assert bits(got) == bits(want)
        assert bits(read_units(r, c)) == bits(red.states["e1"].units)
        assert read_pending(r, "e1") == red.states["e1"].pending_units()
        return got

    # units keyed to partitions: a on 0, b on 1; both partitions seen, then
    # partition 0 runs ahead (a watermark only waits for partitions it has seen)
    feed(0, [(0, _x("x1", "a", 0))])
    feed(1, [(0, _x("x3", "b", 0))])
    feed(0, [(1, _m("m1", "a", 2000, 1.0)), (2, _x("x2", "c", 50_000))])
    snap = feed(1, [(1, Metric("m2", "b", "rev", 2.5, T0 + 3000)),
                    (2, _m("m3", "b", 9000, 0.5))])
    assert snap.counters["late"] == 0 and snap.counters["metric_applied"] == 3
    assert snap.watermark == T0 + 9000 - 1000  # partition 1's clock, not 49 s
    assert r.hget("lr:{e:e1}:meta", f"mx:{TOPIC}|0") == str(T0 + 50_000).encode()
    assert r.hget("lr:{e:e1}:meta", "wm") == str(T0 + 8000).encode()
    # partition 0 runs beyond I: partition 1 can hold the clock at most I back
    snap = feed(0, [(3, _x("x4", "d", 100_000))])
    assert snap.watermark == T0 + 100_000 - 60_000 - 1000
    assert snap.matured["control"] == 2  # a and b (closed by 39 s), not c (60 s)
    snap = feed(1, [(3, _m("m4", "b", 9500, 7.0))])
    assert snap.counters["late"] == 1
    assert read_units(r, c)["b"].totals == [3.0]


def test_single_partition_state_without_wm_field_resumes(redis_url):
    """State written before per-partition watermarks (no ``wm``/``mx:`` in
    meta) reads and continues with watermark max_ts - L."""
    r = redis.Redis.from_url(redis_url)
    c = _cfg(partition_skew_seconds=60)
    evs = [_x("1", "a", 0), _m("2", "a", 20_000), _m("3", "a", 500)]
    apply_batch(r, c, TOPIC, 0, list(enumerate(evs[:2])))
    r.hdel("lr:{e:e1}:meta", "wm", f"mx:{TOPIC}|0")
    assert read_snapshot(r, c).watermark == T0 + 19_000
    apply_batch(r, c, TOPIC, 1, [(0, evs[2])])
    snap = read_snapshot(r, c)
    assert snap.watermark == T0 + 19_000 and snap.counters["late"] == 1


@st.composite
def partitioned_configs(draw):
    return [replace(c, partition_skew_seconds=draw(st.integers(0, 6)))
            for c in draw(configs())]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_lua_equals_reducer_over_partitions(redis_url, data):
    """The differential property under random interleavings of 1-3 source
    partitions: events keyed by unit (each unit on one partition, as Kafka
    does), partitions read in random batches in a random order (sometimes one
    partition far ahead of another), replays of earlier batches in between.
    The reducer is fed each event with the partition it came from."""
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    cfgs = data.draw(partitioned_configs(), label="configs")
    events = data.draw(streams(cfgs), label="events")
    known = {c.experiment_id: c for c in cfgs}
    n_parts = data.draw(st.integers(1, 3), label="partitions")
    part_of = {u: data.draw(st.integers(0, n_parts - 1)) for u in UNITS}
    queues: dict[int, list] = {p: [] for p in range(n_parts)}
    next_off = {p: data.draw(st.integers(0, 50)) for p in range(n_parts)}
    for ev in events:
        p = part_of[ev.unit_id]
        queues[p].append((next_off[p], ev))
        next_off[p] += data.draw(st.integers(1, 2))

    red = Reducer(cfgs)
    done: list[tuple[int, list]] = []
    rejected: list = []
    while any(queues.values()):
        p = data.draw(st.sampled_from([q for q in range(n_parts) if queues[q]]))
        k = data.draw(st.integers(1, 25))
        batch, queues[p] = queues[p][:k], queues[p][k:]
        results = {e: apply_batch(r, known[e], TOPIC, p, evs) for e, evs in
                   route_batch(r, batch, known, TOPIC, p, rejected=rejected).items()}
        for _, ev in batch:
            red.apply(ev, f"{TOPIC}|{p}")
        for e, res in results.items():
            assert res["watermark"] == red.states[e].watermark
        done.append((p, batch))
        if data.draw(st.integers(0, 3)) == 0:  # replay an earlier batch: no-op
            q, old = data.draw(st.sampled_from(done))
            for e, evs in route_batch(r, old, known, TOPIC, q).items():
                assert apply_batch(r, known[e], TOPIC, q, evs)["applied"] == 0

    assert_redis_equals_reducer(r, cfgs, red, rejected)
    r.close()
