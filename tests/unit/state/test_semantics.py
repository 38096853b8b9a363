"""Unit tests of the reference reducer (streams.state.semantics), one rule at a time,
against hand-computed expectations. The Redis/Lua side is held to the same
reducer by tests/integration/test_state_differential.py."""

from __future__ import annotations

import pytest

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.state.semantics import (
    COUNTERS,
    ExperimentState,
    Reducer,
    bucket_of,
    completed_buckets,
    config_plan,
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


def X(unit, variant="control", t=0, pre=1.0, eid=None, exp="e1", cov=None) -> Exposure:
    return Exposure(eid or _eid(), exp, unit, variant, T0 + t, pre, cov)


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


def test_stratum_of_nan_is_below_every_edge():
    # never reached by the rules (``_finite`` rejects it first): the loop's answer kept
    assert stratum_of(float("nan"), (0, 1, 4, 29)) == 0


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


def test_exposures_from_end_at_are_counted_not_applied():
    """A stopped experiment (config end_at): new units from end_at on are
    ``after_end`` (no state, not routed); units exposed before keep their
    metrics until their windows close; known units still count repeats."""
    from streams.state.semantics import Reducer

    st = ExperimentState(cfg(end_at=T0 + 5000))
    out = run(st, X("u1", t=0), X("u2", t=4999), X("u3", t=5000), X("u1", t=6000),
              M("u2", 2.0, t=7000), M("u3", 1.0, t=7000))
    assert out == ["exposures", "exposures", "after_end", "repeat_exposure",
                   "metric_applied", "held"]
    assert set(st.units) == {"u1", "u2"} and st.exposed == {"control": 2, "treatment": 0}
    assert st.units["u2"].totals[0] == 2.0
    # routing: an after_end exposure is not recorded, so a metric without
    # experiment_id for that unit reaches no experiment
    red = Reducer([cfg(end_at=T0 + 5000)])
    red.apply_batch("t|0", [X("v1", t=100), X("v2", t=6000), M("v1", 1.0, 200, exp=None),
                            M("v2", 1.0, 6100, exp=None)])
    c = red.snapshots()["e1"].counters
    assert (c["exposures"], c["after_end"], c["metric_applied"]) == (1, 1, 1)
    assert red.counters["unrouted"] == 1
    # the arrival model stops at the end: buckets after it (and the one it
    # cuts) hold no arrivals because of the stop, not for want of units
    assert completed_buckets(T0 + 20_000, T0, 2000) == 10
    assert completed_buckets(T0 + 20_000, T0, 2000, end_at=T0 + 5000) == 2
    assert completed_buckets(T0 + 3000, T0, 2000, end_at=T0 + 5000) == 1
    st = ExperimentState(cfg(end_at=T0 + 5000, started_at=T0))
    run(st, X("w1", t=0), M("w1", 1.0, t=30_000))
    assert st.snapshot().D == 2


# ---------------------------------------------------------------- 4. metric


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
    # control, stratum 0: units a (rev 4.5, clicks 2) and b (nothing: Y = 0);
    # no unit has pre-experiment values: the covariate sums stay 0
    none = (0, 0.0, 0.0, 0.0, 0.0)
    assert snap.cells["rev"][0][0] == (2, 4.5, 20.25, *none)
    assert snap.cells["clicks"][0][0] == (2, 2.0, 4.0, *none)
    # treatment, unknown-activity stratum 3
    assert snap.cells["rev"][1][3] == (1, -1.0, 1.0, *none)
    assert snap.cells["clicks"][1][3] == (1, 0.0, 0.0, *none)
    assert snap.cells["rev"][1][0] == (0, 0.0, 0.0, *none)
    # folded units stay pending until their correction horizon (rule 6)
    assert st.pending_units() == [(u, T0 + 10_000 + st.H) for u in ("a", "b", "c")]


def test_covariates_are_folded_with_their_units():
    """Rule 5 with pre-experiment values: x of a unit's creating exposure,
    per config metric (names outside the config ignored, a repeat exposure
    changes nothing); the cell is (n, Σy, Σy², nx, Σx, Σx², Σxy, Σy_x)."""
    st = ExperimentState(cfg())
    run(st, X("a", t=0, pre=0.5, cov={"rev": 2.0, "other": 5.0}),
        X("b", t=0, pre=0.2, cov={"rev": -1.0, "clicks": 3.0}),
        X("c", t=0, pre=0.3),
        X("a", t=10, pre=0.5, cov={"rev": 100.0, "clicks": 100.0}),  # repeat: ignored
        M("a", 3.0, 100), M("b", 1.0, 200), M("c", 4.0, 300), M("b", 2.0, 300, "clicks"))
    assert st.units["a"].pre == [2.0, None] and st.units["b"].pre == [-1.0, 3.0]
    assert st.units["c"].pre == [None, None]
    run(st, M("x", 0.0, 11000))
    cells = st.snapshot().cells
    # rev: a (x 2, y 3), b (x -1, y 1), c (no x, y 4)
    assert cells["rev"][0][0] == (3, 8.0, 26.0, 2, 1.0, 5.0, 5.0, 4.0)
    # clicks: only b has an x (3) and a y (2)
    assert cells["clicks"][0][0] == (3, 2.0, 4.0, 1, 3.0, 9.0, 6.0, 2.0)
    # a late metric of a folded unit with an x: Σxy += x·v, Σy_x += v
    run(st, M("a", 0.5, 9000))
    assert st.snapshot().cells["rev"][0][0] == (3, 8.5, 29.25, 2, 1.0, 5.0, 6.0, 4.5)
    run(st, M("c", 1.0, 9500))  # c has no x: the covariate sums stay
    assert st.snapshot().cells["rev"][0][0][3:] == (2, 1.0, 5.0, 6.0, 4.5)


def test_non_finite_pre_value_rejected():
    st = ExperimentState(cfg())
    with pytest.raises(ValueError, match="pre value"):
        st.apply(X("u", cov={"rev": float("inf")}))


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




def test_started_at_is_order_independent():
    """Without a configured start, started_at is the start of the earliest
    entry bucket (epoch grid), whichever partition is read first."""
    from schemas.records import ExperimentConfig, Exposure
    from streams.state.semantics import Reducer

    cfg = ExperimentConfig("e", bucket_seconds=10)
    a = Exposure("a", "e", "u1", "control", 1_700_000_012_345, 1.0)
    b = Exposure("b", "e", "u2", "control", 1_700_000_031_000, 1.0)
    snaps = []
    for order in ([("p|0", a), ("p|1", b)], [("p|1", b), ("p|0", a)]):
        red = Reducer([cfg])
        for src, ev in order:
            red.apply_batch(src, [ev])
        snaps.append(red.snapshots(completeness=1_700_000_100_000)["e"])
    assert snaps[0] == snaps[1]
    assert snaps[0].started_at == 1_700_000_010_000
    assert snaps[0].arrivals[1] == {0: 1, 2: 1}  # pre_activity 1: stratum [1, 2)


def test_dedupe_is_per_partition():
    """A re-send keeps its key and so its partition: counted once there; the
    same event_id on another partition is another event."""
    from schemas.records import ExperimentConfig, Metric
    from streams.state.semantics import Reducer

    red = Reducer([ExperimentConfig("e")])
    m = Metric("k", "u", "value", 1.0, 1_700_000_000_000, "e")
    red.apply_batch("p|0", [m, m])
    red.apply_batch("p|1", [m])
    assert red.states["e"].counters == {"held": 2, "duplicate": 1}


# ---------------------------------------------------------------- 6. retirement


def test_units_retire_after_their_correction_horizon():
    """Rule 6: a folded unit's record is dropped once close + H <= clk - L; its
    totals stay in the cells, its id in the retired-unit filter, and its later
    events count ``retired`` (not a new unit: a repeat exposure must not enter
    it twice)."""
    from streams.state.semantics import Reducer

    c = cfg(correction_seconds=20)  # W = 10 s, L = 1 s: final at close + 20 s
    red = Reducer([c])
    red.apply_all([X("a", "control", t=0), M("a", 2.0, 100, exp=None),
                   X("b", "treatment", t=5000)])
    st = red.states["e1"]
    red.apply_all([X("z", "control", t=30_000)])  # clk - L = 29 s < close + H = 30 s
    assert "a" in st.units  # 10 + 20 = 30 > 29: not yet
    red.apply_all([X("y", "control", t=31_000)])  # 30 <= 30: a retires; b (35) does not
    assert "a" not in st.units and "b" in st.units
    assert st.snapshot().retired_units == 1
    assert "a" in st.retired and "b" not in st.retired
    snap = st.snapshot()
    assert snap.cells["rev"][0][1][:3] == (1, 2.0, 4.0)  # its total stays in the cells
    # a returning unit is not a new one; its metrics are not applied either
    assert red.apply(X("a", "control", t=40_000)) == [("e1", "retired")]
    # a metric after it: outside its window for sure (ts > T - H >= close) ...
    assert red.apply(M("a", 1.0, 40_100)) == [("e1", "outside_window")]
    # ... one more than H behind the clock may have been in it: counted lost
    assert red.apply(M("a", 1.0, 9_000)) == [("e1", "late")]
    assert st.snapshot().exposed == {"control": 3, "treatment": 1}
    assert st.snapshot().counters["retired"] == 1


def test_retired_filter_layers_and_false_positives():
    """The filter's layers double, never forget a unit, and its false-positive
    rate (measured on ids never added) stays below the documented bound."""
    from streams.state import retired_filter as rf

    assert rf.layer_of(0) == 0 and rf.layer_of(rf.C0 - 1) == 0 and rf.layer_of(rf.C0) == 1
    assert rf.layer_of(3 * rf.C0 - 1) == 1 and rf.layer_of(3 * rf.C0) == 2
    assert rf.layer_span(1) == (rf.C0 * rf.BITS, 2 * rf.C0 * rf.BITS)
    f = rf.RetiredFilter()
    n = rf.C0 + 5000  # into the second layer
    for i in range(n):
        f.add(f"u{i}")
    assert all(f"u{i}" in f for i in range(0, n, 97))
    trials = 200_000
    fp = sum(f"new{i}" in f for i in range(trials)) / trials
    bound = f.false_positive_rate()
    assert 0 < bound < 1e-4
    assert fp <= bound + 4 * (bound / trials) ** 0.5 + 1e-5, (fp, bound)


def test_defect7_retired_filter_cap_fits_a_redis_string():
    """The last layer ends inside a 2**32-bit Redis string; from the cap on,
    units go into it and the false-positive bound follows its fill (issue
    24, defect 7; the Lua side: tests/integration/test_state_differential.py)."""
    from streams.state import retired_filter as rf

    start, span = rf.layer_span(rf.MAX_LAYER)
    assert start + span <= 2**32 < start + span + rf.layer_span(rf.MAX_LAYER + 1)[1]
    cap = rf.C0 * ((2 << rf.MAX_LAYER) - 1)  # units the layers hold
    assert rf.layer_of(cap - 1) == rf.MAX_LAYER == rf.layer_of(10 * cap)
    assert rf.layer_of(3 * rf.C0, max_layer=1) == 1
    at_cap, past = rf.false_positive_rate(cap), rf.false_positive_rate(2 * cap)
    assert at_cap < 2e-4 < past < 1


# ---------------------------------------------------------------- exposure age (issue 19)


def test_age_bin_edges_and_tracking():
    from streams.state.semantics import age_bin_of, age_edges_ms, age_tracking

    c = cfg(window_seconds=60, exposure_age_bins=(0, 10, 30, 60, 90))
    assert age_edges_ms(c) == (0, 10_000, 30_000, 60_000) and age_tracking(c)
    edges = age_edges_ms(c)
    assert [age_bin_of(a, edges) for a in (0, 9_999, 10_000, 29_999, 30_000, 59_999)] == \
        [0, 0, 1, 1, 2, 2]
    assert not age_tracking(cfg())  # W = 10 s: the default edges (1 d, 3 d) lie beyond
    assert not age_tracking(cfg(window_seconds=86_400 * 7, exposure_age_bins=(0,)))
    assert age_tracking(ExperimentConfig("e"))  # 7 days, bins 0, 1 d, 3 d
    st = ExperimentState(cfg())
    run(st, X("u"), M("u", 1.0, 5), M("x", 0.0, 20_000))
    assert st.units["u"].age == [] and st.snapshot().age_cells == {}


def test_age_cells_equal_the_sums_over_matured_units():
    """Rule 3 and 5 with exposure age: after random metrics (some arriving as
    corrections of folded units), each age cell equals the sums over its
    matured units of their per-bin totals recomputed from the applied events
    (n, Σy_b, Σy_b², Σy_0·y_{B-1}), and each unit's bins sum to its total
    (up to rounding); every other cell is the same as without age tracking."""
    import math
    import random

    from streams.state.semantics import age_bin_of, fine_edges, fine_parent

    c = cfg(window_seconds=60, exposure_age_bins=(0, 10, 30), correction_seconds=1000)
    off = cfg(window_seconds=60, exposure_age_bins=(0,), correction_seconds=1000)
    rnd = random.Random(5)
    st, st_off = ExperimentState(c), ExperimentState(off)
    edges = st.age_edges
    assert st.NB == 3 and fine_parent(c)[st.F] == st.S
    units = {}
    events = []
    for i in range(40):
        pre = rnd.choice([None, 0, 0.5, 1, 3.5, 12, 28])
        u = f"u{i}"
        units[u] = (i * 1000, rnd.choice(["control", "treatment"]), pre)
        events.append(X(u, units[u][1], t=i * 1000, pre=pre))
    for _ in range(400):
        u = f"u{rnd.randrange(40)}"
        age = rnd.randrange(0, 60_000)
        events.append(M(u, rnd.choice([1.0, 0.5, rnd.gauss(0, 10)]), units[u][0] + age,
                        metric=rnd.choice(["rev", "clicks"])))
    events.sort(key=lambda e: e.ts)
    # stragglers: some metrics arrive after their unit folded (corrections)
    late = [e for e in events if isinstance(e, Metric) and rnd.random() < 0.2]
    events = [e for e in events if e not in late] + late
    cats = [st.apply(e) for e in events]
    assert [st_off.apply(e) for e in events] == cats
    assert cats.count("corrected") > 10
    run(st, M("clock", 0.0, 200_000, eid="clock"))
    run(st_off, M("clock", 0.0, 200_000, eid="clock"))
    mi = {m: k for k, m in enumerate(st.metrics)}
    y = {u: [[0.0] * 3 for _ in st.metrics] for u in units}
    for e, cat in zip(events, cats, strict=True):
        if cat in ("metric_applied", "corrected"):
            ets = units[e.unit_id][0] + T0
            y[e.unit_id][mi[e.metric]][age_bin_of(e.ts - ets, edges)] += e.value
    want: dict = {}
    for u, (_, v, pre) in units.items():
        unit = st.units[u]
        assert unit.matured and unit.fine == stratum_of(pre, fine_edges(c))
        assert fine_parent(c)[unit.fine] == unit.stratum
        for k, m in enumerate(st.metrics):
            assert all(math.isclose(a, b, abs_tol=1e-9) for a, b in
                       zip(unit.age[k], y[u][k], strict=True))
            assert math.isclose(sum(unit.age[k]), unit.totals[k], abs_tol=1e-9)
            w = want.setdefault((m, v, unit.fine), [0] + [0.0] * 7)
            yk = y[u][k]
            w[0] += 1
            for b in range(3):
                w[1 + 2 * b] += yk[b]
                w[2 + 2 * b] += yk[b] ** 2
            w[7] += yk[0] * yk[2]
    snap, snap_off = st.snapshot(), st_off.snapshot()
    assert snap.cells == snap_off.cells and snap.counters == snap_off.counters
    assert snap_off.age_cells == {}
    for m in st.metrics:
        assert len(snap.age_cells[m]) == 2
        for vi, v in enumerate(st.variants):
            assert len(snap.age_cells[m][vi]) == st.F + 1
            for f, got in enumerate(snap.age_cells[m][vi]):
                exp = want.get((m, v, f), [0] + [0.0] * 7)
                assert got[0] == exp[0], (m, v, f)
                assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
                           for a, b in zip(got[1:], exp[1:], strict=True)), (m, v, f, got, exp)


def test_analyze_fold_gives_age_cells(tmp_path):
    """``liftstream analyze`` folds with the reducer: its snapshots carry the
    age cells of experiments that track exposure age, none for the others."""
    from collections import Counter

    from schemas.codec import dumps
    from schemas.validate import experiment_to_dict
    from streams.sampling.analyze import fold, read_experiments
    from streams.state.semantics import Reducer
    from tests.support.streaming_harness import event_dict

    on = cfg(window_seconds=60, exposure_age_bins=(0, 10, 30))
    off = cfg(experiment_id="e2", window_seconds=60)
    (tmp_path / "exps.jsonl").write_bytes(
        b"\n".join(dumps(experiment_to_dict(c)) for c in (on, off)))
    events = [X("a", t=0, pre=3), X("b", "treatment", t=500, pre=None), M("a", 2.0, 5_000),
              M("a", 1.0, 40_000), M("b", 4.0, 12_000), X("a", t=0, exp="e2"),
              M("a", 1.0, 100, exp="e2")]
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(dumps(event_dict(e)) for e in events))
    cfgs = read_experiments(tmp_path / "exps.jsonl")
    assert cfgs == [on, off]
    red = fold(cfgs, tmp_path / "events.jsonl", Counter(), as_of=T0 + 100_000)
    snaps = red.snapshots()
    assert snaps["e2"].age_cells == {}
    ages = snaps["e1"].age_cells["rev"]
    assert ages[0][3] == (1, 2.0, 4.0, 0.0, 0.0, 1.0, 1.0, 2.0)
    assert ages[1][-1] == (1, 0.0, 0.0, 4.0, 16.0, 0.0, 0.0, 0.0)
    ref = Reducer([on, off]).apply_all(events, batch=500)
    for s in list(ref.clocks):
        ref.advance(s, T0 + 100_000)
    assert ref.snapshots()["e1"].age_cells == snaps["e1"].age_cells


def test_start_without_config_is_the_earliest_bucket_with_one_clamped():
    """Issue 24 defect 6, the two start rules side by side. A configured
    start (the registry stamps one at registration) is fixed: an exposure
    11 days before it is applied to bucket 0, counted ``before_start``, and
    D does not move. Without one (``liftstream analyze`` on a hand-written
    config) the start is the earliest entry bucket on the epoch grid, so
    the same exposure moves it: the documented reason to analyze with the
    registered config."""
    day = 86_400_000
    start = T0 // day * day
    evs = [Exposure(f"x{i}", "e", f"u{i}", "control", start + i * 3_600_000)
           for i in range(48)]
    evs += [Exposure("early", "e", "skew", "control", start - 11 * day),
            Exposure("last", "e", "v", "control", start + 2 * day + 60_000)]
    base = dict(experiment_id="e", window_seconds=14 * 86_400, correction_seconds=86_400,
                lateness_seconds=0)
    fixed = Reducer([ExperimentConfig(**base, started_at=start)]).apply_all(evs).snapshots()["e"]
    assert (fixed.started_at, fixed.D) == (start, 2)
    assert fixed.counters["before_start"] == 1 and fixed.counters["exposures"] == 49
    loose = Reducer([ExperimentConfig(**base)]).apply_all(evs).snapshots()["e"]
    assert (loose.started_at, loose.D) == (start - 11 * day, 13)
    assert loose.counters["before_start"] == 0 and loose.counters["exposures"] == 50


def test_config_plan_is_reused_for_the_same_config_and_rebuilt_for_a_changed_one():
    """The owner builds a state per call (issue 25), so what a config alone
    determines is computed once (``config_plan``); a changed config of the
    same experiment must never run on the old plan, even one ``==`` calls
    equal (a cap of -0.0 vs 0.0, an int vs a float)."""
    a = cfg(experiment_id="plan-e")
    p = config_plan(a)
    assert config_plan(a) is p
    assert config_plan(cfg(experiment_id="plan-e")) is p  # equal value, new object
    wider = cfg(experiment_id="plan-e", window_seconds=20)
    assert config_plan(wider) is not p and config_plan(wider).W == 20_000
    st = ExperimentState(wider)
    assert st.W == 20_000 and st._metric_index == {"rev": 0, "clicks": 1}
    capped = cfg(experiment_id="plan-e", metrics=(MetricSpec("rev", cap_lower=0.0),))
    neg = cfg(experiment_id="plan-e", metrics=(MetricSpec("rev", cap_lower=-0.0),))
    assert capped == neg  # what a key by == would have confused
    lo = config_plan(capped).plans[0].lo
    assert str(lo) == "0.0" and str(config_plan(neg).plans[0].lo) == "-0.0"

