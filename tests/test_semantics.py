"""Unit tests of the reference reducer (streams.semantics), one rule at a time,
against hand-computed expectations. The Redis/Lua side is held to the same
reducer by tests/test_state_differential.py."""

from __future__ import annotations

import pytest

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.semantics import (
    COUNTERS,
    ExperimentState,
    Reducer,
    bucket_of,
    completed_buckets,
    stratum_of,
)

T0 = 1_700_000_000_000  # a realistic epoch-ms origin: sums must stay exact there


def cfg(**kw) -> ExperimentConfig:
    """Small windows in whole seconds: W=10 s, B=2 s, L=1 s, DD=5 s."""
    base = dict(
        experiment_id="e1",
        variants=("control", "treatment"),
        metrics=(MetricSpec("rev"), MetricSpec("clicks")),
        strata_edges=(0, 1, 4, 29),
        window_seconds=10,
        bucket_seconds=2,
        lateness_seconds=1,
        dedupe_seconds=5,
    )
    base.update(kw)
    return ExperimentConfig(**base)


_n = 0


def _eid() -> str:
    global _n
    _n += 1
    return f"ev{_n}"


def X(unit, variant="control", t=0, pre=1.0, eid=None, exp="e1") -> Exposure:
    return Exposure(eid or _eid(), exp, unit, variant, T0 + t, pre)


def M(unit, value, t, metric="rev", eid=None, exp="e1") -> Metric:
    return Metric(eid or _eid(), unit, metric, value, T0 + t, exp)


def run(state: ExperimentState, *events) -> list[str]:
    return [state.apply(e) for e in events]


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "x, s",
    [(0, 0), (0.5, 0), (1, 1), (3.99, 1), (4, 2), (28, 2), (29, 2), (100, 2),
     (-1, 0), (None, 3)],
)
def test_stratum_edges(x, s):
    # edges (0,1,4,29): [0,1) [1,4) [4,29) and >= 29 -> last; None -> S = 3
    assert stratum_of(x, (0, 1, 4, 29)) == s


def test_stratum_without_activity_strata():
    assert stratum_of(5.0, (0,)) == 0
    assert stratum_of(None, ()) == 0


def test_bucket_floor_and_clamp():
    assert bucket_of(T0, T0, 2000) == 0
    assert bucket_of(T0 + 1999, T0, 2000) == 0
    assert bucket_of(T0 + 2000, T0, 2000) == 1
    assert bucket_of(T0 - 1, T0, 2000) == 0  # before started_at -> bucket 0
    assert completed_buckets(None, T0, 2000) == 0
    assert completed_buckets(T0 + 3999, T0, 2000) == 1
    assert completed_buckets(T0 - 5000, T0, 2000) == 0


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        ExperimentState(cfg(bucket_seconds=0))


# ---------------------------------------------------------------- 1. dedupe


def test_duplicate_within_horizon_counts_once_and_does_not_move_time():
    st = ExperimentState(cfg())
    e = X("u1", t=0, eid="dup")
    assert run(st, e, X("u2", t=3000), e) == ["exposures", "exposures", "duplicate"]
    assert st.exposed["control"] == 2
    # a duplicate with a later ts is still a duplicate and does not advance max_ts
    assert st.apply(X("u3", t=9000, eid="dup")) == "duplicate"
    assert st.max_ts == T0 + 3000
    assert st.counters["duplicate"] == 2


def test_dedupe_boundary_is_inclusive():
    # DD = 5 s: earlier sighting ts >= max_ts - 5000 -> duplicate
    st = ExperimentState(cfg())
    run(st, M("u", 1.0, 0, eid="a"), M("u", 1.0, 5000))
    assert st.apply(M("u", 1.0, 0, eid="a")) == "duplicate"  # 0 >= 5000 - 5000
    st = ExperimentState(cfg())
    run(st, M("u", 1.0, 0, eid="a"), M("u", 1.0, 5001))
    assert st.apply(M("u", 1.0, 0, eid="a")) == "unknown_unit"  # expired: processed again


def test_later_sighting_overwrites():
    st = ExperimentState(cfg())
    run(st, M("u", 1.0, 0, eid="a"), M("u", 1.0, 6000))
    # expired sighting: processed, and the sighting is now ts=7000
    assert st.apply(M("u", 1.0, 7000, eid="a")) == "unknown_unit"
    run(st, M("u", 1.0, 11000))
    assert st.apply(M("u", 1.0, 0, eid="a")) == "duplicate"  # 7000 >= 11000 - 5000


def test_dedupe_is_by_event_id_across_types():
    st = ExperimentState(cfg())
    assert run(st, X("u1", eid="same"), M("u1", 2.0, 10, eid="same")) == [
        "exposures", "duplicate"]


def test_pruning_does_not_change_outcomes():
    events = []
    for i in range(3000):
        events.append(M("u", 1.0, i * 1000, eid=f"id{i % 50}"))
        events.append(M("u", 1.0, i * 1000, eid=f"id{(i * 7) % 50}"))
    a = ExperimentState(cfg())
    b = ExperimentState(cfg())
    b._seen_prune_at = 10  # prune all the time
    assert [a.apply(e) for e in events] == [b.apply(e) for e in events]
    assert len(b._seen) < len(a._seen) or len(a._seen) <= 50


# ---------------------------------------------------------------- 2. time


def test_max_ts_and_watermark_never_go_back():
    st = ExperimentState(cfg())
    assert st.max_ts is None and st.watermark is None
    run(st, M("u", 1.0, 5000), M("u", 1.0, 1000))
    assert st.max_ts == T0 + 5000
    assert st.watermark == T0 + 4000  # L = 1 s


P0, P1 = "t|0", "t|1"


def test_per_partition_watermark_waits_for_a_slow_partition():
    """One partition far ahead (within I): the slow one holds the watermark
    back, so its metrics are applied, not late; beyond I they are late."""
    st = ExperimentState(cfg(partition_skew_seconds=60))  # I = 60 s, W = 10 s, L = 1 s
    assert st.apply(X("a", t=0), P0) == "exposures"
    assert st.apply(X("b", t=0), P1) == "exposures"
    # P0 runs 50 s ahead (a backfill); one clock would say 49 s and mature b
    assert st.apply(M("a", 1.0, 50_000, eid="far"), P0) == "outside_window"
    assert st.max_ts == T0 + 50_000 and st.max_ts_p == {P0: T0 + 50_000, P1: T0}
    assert st.watermark == T0 - 1000  # min(50 s, 0 s) - L
    assert not st.units["b"].matured
    assert st.apply(M("b", 2.5, 3000), P1) == "metric_applied"
    assert st.units["b"].totals[0] == 2.5
    # P1 catches up to 4 s: the watermark follows it
    assert st.apply(M("b", 0.5, 4000), P1) == "metric_applied"
    assert st.watermark == T0 + 3000
    # P0 runs beyond I: P1 no longer holds the clock back past max_ts - I
    assert st.apply(X("c", t=100_000), P0) == "exposures"
    assert st.watermark == T0 + 100_000 - 60_000 - 1000
    assert st.units["a"].matured and st.units["b"].matured
    assert st.apply(M("b", 7.0, 5000), P1) == "late"
    assert st.units["b"].totals[0] == 3.0


def test_per_partition_watermark_monotone_and_single_partition_rule():
    st = ExperimentState(cfg(partition_skew_seconds=60))
    run(st, M("u", 1.0, 5000))  # default source: one partition, max_ts - L
    assert st.watermark == T0 + 4000
    # a new partition first seen far behind cannot pull the watermark back
    st.apply(M("u", 1.0, 0, eid="behind"), P1)
    assert st.watermark == T0 + 4000
    # I = 0: one clock over all partitions, as before per-partition watermarks
    one = ExperimentState(cfg(partition_skew_seconds=0))
    one.apply(M("u", 1.0, 9000), P0)
    one.apply(M("u", 1.0, 0), P1)
    assert one.watermark == T0 + 8000
    # duplicates move no clock, not even their partition's
    d = ExperimentState(cfg())
    d.apply(M("u", 1.0, 100, eid="same"), P0)
    assert d.apply(M("u", 1.0, 200, eid="same"), P1) == "duplicate"
    assert d.max_ts_p == {P0: T0 + 100}


def test_reducer_apply_sourced():
    c = cfg(partition_skew_seconds=60)
    evs = [(P0, X("a", t=0)), (P1, X("b", t=0)), (P0, M("a", 1.0, 30_000)),
           (P1, M("b", 2.0, 1000))]
    red = Reducer([c]).apply_sourced(evs)
    assert red.states["e1"].counters["metric_applied"] == 1
    assert red.snapshots()["e1"].watermark == T0
    assert Reducer([c]).apply_all(e for _, e in evs).states["e1"].counters["late"] == 1


# ---------------------------------------------------------------- 3. exposure


def test_first_exposure_creates_state():
    st = ExperimentState(cfg())
    run(st, X("u1", "treatment", t=0, pre=2.5), X("u2", t=4500, pre=None), X("u3", t=5000, pre=7))
    u1, u2, u3 = st.units["u1"], st.units["u2"], st.units["u3"]
    assert (u1.variant, u1.stratum, u1.bucket, u1.exposure_ts) == ("treatment", 1, 0, T0)
    assert u1.totals == [0.0, 0.0] and not u1.matured
    assert (u2.stratum, u2.bucket) == (3, 2)  # unknown activity; floor(4500/2000) = 2
    assert (u3.stratum, u3.bucket) == (2, 2)
    assert st.started_at == T0
    snap = st.snapshot()
    assert snap.arrivals == ({}, {0: 1}, {2: 1}, {2: 1})
    assert snap.activity_sum == (0.0, 2.5, 7.0, 0.0)
    assert snap.activity_n == (0, 1, 1, 0)
    assert snap.exposed == {"control": 2, "treatment": 1}
    assert snap.counters["exposures"] == 3
    assert st.pending_units() == [("u1", T0 + 10000), ("u2", T0 + 14500), ("u3", T0 + 15000)]


def test_started_at_from_config_and_fixed():
    st = ExperimentState(cfg(started_at=T0 - 4000))
    assert st.snapshot().started_at == T0 - 4000
    run(st, X("u1", t=0))
    assert st.units["u1"].bucket == 2
    st = ExperimentState(cfg())
    run(st, M("u0", 1.0, -50_000), X("u1", t=3000), X("u2", t=0))
    assert st.started_at == T0 + 3000  # first exposure, not first event, not min ts
    assert st.units["u2"].bucket == 0  # before started_at -> clamped


def test_started_at_not_fixed_by_unknown_variant():
    st = ExperimentState(cfg())
    run(st, X("u1", "bogus", t=0), X("u2", t=2000))
    assert st.started_at == T0 + 2000


def test_repeat_conflict_unknown_variant():
    st = ExperimentState(cfg())
    out = run(st, X("u1", "control", t=0), X("u1", "control", t=10),
              X("u1", "treatment", t=20), X("u1", "bogus", t=30), X("u2", "bogus", t=40))
    assert out == ["exposures", "repeat_exposure", "conflict", "unknown_variant",
                   "unknown_variant"]
    assert st.units["u1"].variant == "control" and st.units["u1"].exposure_ts == T0
    assert "u2" not in st.units
    assert st.exposed == {"control": 1, "treatment": 0}
    assert st.snapshot().arrivals[1] == {0: 1}


# ---------------------------------------------------------------- 4. metric


def test_metric_categories_and_window_bounds():
    st = ExperimentState(cfg())
    run(st, X("u1", t=1000))
    out = run(
        st,
        M("nobody", 1.0, 1000),
        M("u1", 1.0, 1000, metric="bogus"),
        M("u1", 1.0, 999),  # before exposure
        M("u1", 0.25, 1000),  # at exposure: in
        M("u1", 0.5, 10999),  # last ms of [1000, 11000): in
        M("u1", 4.0, 11000),  # window end: out
        M("u1", 3.0, 5000, metric="clicks"),
    )
    assert out == ["unknown_unit", "unknown_metric", "pre_exposure", "metric_applied",
                   "metric_applied", "outside_window", "metric_applied"]
    assert st.units["u1"].totals == [0.75, 3.0]


def test_metric_after_maturation_is_late():
    st = ExperimentState(cfg())
    # exposure at 0 closes at 10000; watermark = max_ts - 1000
    run(st, X("u1", t=0), M("u1", 2.0, 9000))
    assert not st.units["u1"].matured  # watermark 8000
    run(st, M("other", 0.0, 11000))  # watermark 10000 >= close 10000
    assert st.units["u1"].matured
    assert st.apply(M("u1", 5.0, 9500)) == "late"
    assert st.units["u1"].totals == [2.0, 0.0]
    # outside the window takes precedence over late
    assert st.apply(M("u1", 5.0, 10000)) == "outside_window"


# ---------------------------------------------------------------- 5. maturation


def test_maturation_folds_cells_at_watermark():
    st = ExperimentState(cfg())
    run(st, X("a", "control", t=0, pre=0.5), X("b", "control", t=0, pre=0.2),
        X("c", "treatment", t=0, pre=None),
        M("a", 3.0, 100), M("a", 1.5, 200), M("a", 2.0, 300, metric="clicks"),
        M("c", -1.0, 100))
    run(st, M("x", 0.0, 10999))  # watermark 9999 < 10000: nothing yet
    assert st.snapshot().matured == {"control": 0, "treatment": 0}
    run(st, M("x", 0.0, 11000))  # watermark 10000
    snap = st.snapshot()
    assert snap.matured == {"control": 2, "treatment": 1}
    assert snap.exposed == {"control": 2, "treatment": 1}
    # control, stratum 0: units a (rev 4.5, clicks 2) and b (nothing: Y = 0)
    assert snap.cells["rev"][0][0] == (2, 4.5, 20.25)
    assert snap.cells["clicks"][0][0] == (2, 2.0, 4.0)
    # treatment, unknown-activity stratum 3
    assert snap.cells["rev"][1][3] == (1, -1.0, 1.0)
    assert snap.cells["clicks"][1][3] == (1, 0.0, 0.0)
    assert snap.cells["rev"][1][0] == (0, 0.0, 0.0)
    assert st.pending_units() == []


def test_maturation_order_is_close_ts_then_unit_bytes():
    # One cell; the float sum shows the fold order: (1e16 + -1e16) + 1 = 1,
    # while any order that adds 1 before both big values gives 0.
    one = (MetricSpec("rev"),)
    st = ExperimentState(cfg(metrics=one))
    # equal close_ts, created in order c, b, A: folded A, b, c (bytewise ids)
    run(st, X("c", t=0), X("b", t=0), X("A", t=0),
        M("c", 1.0, 5), M("A", 1e16, 5), M("b", -1e16, 5))
    run(st, M("x", 0.0, 20000))
    assert st.snapshot().cells["rev"][0][1][1] == 1.0
    # close_ts first: c closes earliest, so it is folded first
    st = ExperimentState(cfg(metrics=one))
    run(st, X("c", t=0), X("A", t=1), X("b", t=1),
        M("c", 1.0, 5), M("A", 1e16, 5), M("b", -1e16, 5))
    run(st, M("x", 0.0, 20000))
    assert st.snapshot().cells["rev"][0][1][1] == 0.0
    assert (1.0 + 1e16) + -1e16 == 0.0


def test_late_exposure_matures_at_once():
    st = ExperimentState(cfg())
    run(st, M("x", 0.0, 30000))  # watermark 29000
    assert st.apply(X("old", t=0)) == "exposures"  # window closed at 10000 already
    assert st.units["old"].matured
    assert st.snapshot().matured["control"] == 1
    assert st.apply(M("old", 1.0, 5000)) == "late"


def test_duplicate_never_matures():
    st = ExperimentState(cfg())
    run(st, X("u", t=0), M("x", 0.0, 9000, eid="m"))
    run(st, M("x", 0.0, 9000, eid="m"))  # duplicate: nothing, no maturation
    assert not st.units["u"].matured


def test_snapshot_shape_and_D():
    st = ExperimentState(cfg(started_at=T0))
    run(st, X("u1", t=0), M("x", 0.0, 7000))
    snap = st.snapshot()
    assert snap.variants == ("control", "treatment")
    assert snap.n_strata_total == 4
    assert snap.watermark == T0 + 6000
    assert snap.D == 3
    assert set(snap.counters) == set(COUNTERS)
    assert [len(rows) for rows in snap.cells["rev"]] == [4, 4]
    empty = ExperimentState(cfg()).snapshot()
    assert empty.started_at is None and empty.max_ts is None and empty.D == 0


def test_non_finite_value_rejected():
    st = ExperimentState(cfg())
    run(st, X("u", t=0))
    with pytest.raises(ValueError):
        st.apply(M("u", float("nan"), 10))


# ---------------------------------------------------------------- routing


def test_reducer_routing():
    c1, c2 = cfg(experiment_id="e1"), cfg(experiment_id="e2", variants=("a", "b"))
    red = Reducer([c2, c1])
    assert red.apply(Metric("m0", "u", "rev", 1.0, T0, None)) == []  # not exposed yet
    assert red.counters["unrouted"] == 1
    assert red.apply(X("u", "control", t=0, exp="e2")) == [("e2", "unknown_variant")]
    # an exposure with an unknown variant does not enter the index
    assert red.apply(Metric("m1", "u", "rev", 1.0, T0, None)) == []
    red.apply(X("u", "control", t=0, exp="e1"))
    red.apply(X("u", "a", t=0, exp="e2"))
    assert red.apply(Metric("m2", "u", "rev", 1.0, T0 + 5, None)) == [
        ("e1", "metric_applied"), ("e2", "metric_applied")]
    assert red.apply(M("u", 1.0, 6, exp="e2")) == [("e2", "metric_applied")]
    assert red.apply(M("u", 1.0, 6, exp="nope")) == []
    assert red.apply(X("u", "control", exp="nope")) == []
    assert red.counters == {"unknown_experiment": 2, "unrouted": 2}
    assert red.states["e1"].units["u"].totals == [1.0, 0.0]
    assert red.states["e2"].units["u"].totals == [2.0, 0.0]
    assert list(red.snapshots()) == ["e1", "e2"]


def test_routed_metric_for_unit_without_state_is_unknown_unit():
    # the unit's first exposure in e1 was a duplicate (its event id was seen),
    # so the index routes the metric to e1, where the unit has no state
    red = Reducer([cfg()])
    red.apply(M("v", 1.0, 0, eid="z"))
    red.apply(X("u", t=1, eid="z"))
    assert red.apply(Metric("m", "u", "rev", 1.0, T0 + 2, None)) == [("e1", "unknown_unit")]
