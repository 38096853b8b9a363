"""Metric kinds in the reference reducer (issue 26): a conversion's 0/1
outcome, a ratio's numerator/denominator cells, a capped sum's winsorized
total with its uncapped sums, the tail sketch; folds and corrections
("contribution after minus before") against hand-computed values. The Redis
side is held to the same reducer by tests/integration/test_state_differential.py."""

from __future__ import annotations

import math

import pytest

from kernels.tail import GAMMA, RELATIVE_ACCURACY, bucket_value, tail_bucket
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.state.semantics import (
    RATIO_COV_SUMS,
    ExperimentState,
    age_cell_width,
    metric_plans,
    outcome,
)

T0 = 1_700_000_000_000


def cfg(*metrics: MetricSpec, **kw) -> ExperimentConfig:
    """W = 10 s, L = 1 s, H = 100 s: a unit exposed at 0 folds once the
    clock passes 11 s, and in-window metrics correct it after."""
    base = dict(experiment_id="e1", variants=("control", "treatment"), metrics=metrics,
                strata_edges=(0, 29), window_seconds=10, bucket_seconds=2,
                lateness_seconds=1, dedupe_seconds=5, correction_seconds=100)
    base.update(kw)
    return ExperimentConfig(**base)


_n = 0


def _eid() -> str:
    global _n
    _n += 1
    return f"ev{_n}"


def X(unit, t=0, variant="control", cov=None) -> Exposure:
    return Exposure(_eid(), "e1", unit, variant, T0 + t, 2.0, cov)


def M(unit, metric, value, t) -> Metric:
    return Metric(_eid(), unit, metric, value, T0 + t, "e1")


def fold(st: ExperimentState) -> None:
    """Move the clock past every window (a unit at 20 s: control's u folds)."""
    st.apply(X("later", t=20_000, variant="treatment"))


def cell(st: ExperimentState, m: str, vi: int = 0, s: int = 0) -> tuple:
    return st.snapshot().cells[m][vi][s]


def extra(st: ExperimentState, m: str, vi: int = 0, s: int = 0) -> tuple:
    return st.snapshot().extra_cells[m][vi][s]


def no_cov(*vals: float) -> tuple:
    """A ratio's extra values of units none of which has both pre values."""
    return (*vals, *(0.0,) * RATIO_COV_SUMS)


def test_event_metrics_and_plans():
    c = cfg(MetricSpec("rev", cap_upper=10.0), MetricSpec("buy", kind="conversion"),
            MetricSpec("rps", kind="ratio", numerator="rev", denominator="sessions"),
            MetricSpec("clicks"))
    assert c.event_metrics == ("rev", "buy", "sessions", "clicks")
    assert c.metric_names == ("rev", "buy", "rps", "clicks")
    assert [p.n_extra for p in metric_plans(c)] == [2, 0, 3 + RATIO_COV_SUMS, 0]
    assert [p.tails for p in metric_plans(c)] == [True, False, False, True]
    plain = cfg(MetricSpec("rev"), MetricSpec("clicks"))
    assert plain.event_metrics == plain.metric_names  # existing state reads as is


def test_conversion_flips_both_ways_by_corrections():
    """buy > 0: total 2 folds as y = 1; a correction of -3 (total -1) flips
    the cell to 0, one of +5 (total 4) back to 1; n stays 1; with x = 3 the
    covariate sums follow (Σxy = x·y, Σy_x = y); a correction that keeps y
    writes nothing."""
    st = ExperimentState(cfg(MetricSpec("buy", kind="conversion")))
    st.apply(X("u", cov={"buy": 3.0}))
    st.apply(M("u", "buy", 2.0, 5_000))
    fold(st)
    assert cell(st, "buy") == (1, 1.0, 1.0, 1, 3.0, 9.0, 3.0, 1.0)
    assert st.apply(M("u", "buy", -3.0, 6_000)) == "corrected"
    assert cell(st, "buy") == (1, 0.0, 0.0, 1, 3.0, 9.0, 0.0, 0.0)
    assert st.apply(M("u", "buy", 5.0, 7_000)) == "corrected"
    assert cell(st, "buy") == (1, 1.0, 1.0, 1, 3.0, 9.0, 3.0, 1.0)
    before = {k: list(v) for k, v in st.shards["-|0"].cells.items()}
    assert st.apply(M("u", "buy", 1.0, 8_000)) == "corrected"  # 4 -> 5: still 1
    assert {k: list(v) for k, v in st.shards["-|0"].cells.items()} == before
    assert "buy" not in st.snapshot().extra_cells and "buy" not in st.snapshot().tails


def test_conversion_threshold_and_units_without_events():
    """threshold 2: a total of exactly 2 is 0, 2.5 is 1; a unit without any
    event folds as 0 (n counts it)."""
    st = ExperimentState(cfg(MetricSpec("buy", kind="conversion", threshold=2.0)))
    st.apply(X("a"))
    st.apply(X("b"))
    st.apply(X("c"))
    st.apply(M("a", "buy", 2.0, 1_000))
    st.apply(M("b", "buy", 2.5, 1_000))
    fold(st)
    assert cell(st, "buy")[:3] == (3, 1.0, 1.0)


def test_capped_total_crosses_the_cap_and_comes_back():
    """cap [0, 10]: 4 folds as y = 4 (uncapped t = 4); +8 -> t 12, y 10;
    -7 -> t 5, y 5; -9 -> t -4, y 0: Σy, Σy² follow y, the extra (Σt, Σt²)
    the uncapped t; the tail sketch moves the unit to t's bucket each time."""
    st = ExperimentState(cfg(MetricSpec("rev", cap_lower=0.0, cap_upper=10.0)))
    st.apply(X("u"))
    st.apply(M("u", "rev", 4.0, 1_000))
    fold(st)
    assert (cell(st, "rev")[:3], extra(st, "rev")) == ((1, 4.0, 16.0), (4.0, 16.0))
    assert st.snapshot().tails["rev"] == [{tail_bucket(4.0): 1}, {}]  # "later": not folded
    for v, y, t in ((8.0, 10.0, 12.0), (-7.0, 5.0, 5.0), (-9.0, 0.0, -4.0)):
        assert st.apply(M("u", "rev", v, 2_000)) == "corrected"
        c, e = cell(st, "rev"), extra(st, "rev")
        assert c[0] == 1 and c[1] == pytest.approx(y) and c[2] == pytest.approx(y * y)
        assert e == pytest.approx((t, t * t))
        assert st.snapshot().tails["rev"][0] == {tail_bucket(t): 1}
    st.apply(M("u", "rev", 30.0, 3_000))  # t 26: y stays at the cap 10
    assert cell(st, "rev")[1] == pytest.approx(10.0)
    assert extra(st, "rev") == pytest.approx((26.0, 676.0))


def test_capped_total_inside_the_cap_writes_no_cell_change():
    """A correction of a total that stays above the upper cap changes y
    not at all, only the uncapped sums."""
    st = ExperimentState(cfg(MetricSpec("rev", cap_upper=10.0)))
    st.apply(X("u"))
    st.apply(M("u", "rev", 20.0, 1_000))
    fold(st)
    st.apply(M("u", "rev", 5.0, 2_000))
    assert cell(st, "rev")[:3] == (1, 10.0, 100.0)
    assert extra(st, "rev") == (25.0, 625.0)


def test_ratio_cells_follow_numerator_and_denominator():
    """rps = rev / sessions: units (M, D) = (6, 3) and (0, 2); cells
    (n, ΣM, ΣM²) with x = the numerator's pre value; extra (ΣD, ΣD², ΣMD);
    a late session (+1) of the first moves only the D sums; an event named
    like the ratio is unknown_metric."""
    st = ExperimentState(cfg(MetricSpec("rps", kind="ratio", numerator="rev",
                                        denominator="sessions")))
    st.apply(X("a", cov={"rev": 1.5, "rps": 9.0}))
    st.apply(X("b"))
    for ev in (M("a", "rev", 6.0, 1_000), M("a", "sessions", 3.0, 1_000),
               M("b", "sessions", 2.0, 1_000)):
        assert st.apply(ev) == "metric_applied"
    assert st.apply(M("a", "rps", 1.0, 1_000)) == "unknown_metric"
    fold(st)
    assert cell(st, "rps") == (2, 6.0, 36.0, 1, 1.5, 2.25, 9.0, 6.0)
    assert extra(st, "rps") == no_cov(5.0, 13.0, 18.0)
    assert st.apply(M("a", "sessions", 1.0, 2_000)) == "corrected"
    assert cell(st, "rps") == (2, 6.0, 36.0, 1, 1.5, 2.25, 9.0, 6.0)
    assert extra(st, "rps") == no_cov(6.0, 20.0, 24.0)
    assert st.units["a"].pre == [1.5, None]  # per event metric: rev, sessions
    assert "rps" not in st.snapshot().tails and st.snapshot().age_cells == {}


def test_ratio_with_capped_numerator():
    """cap upper 5 on the numerator: M = min(t, 5) in cells and ΣMD, the
    uncapped (Σt, Σt², ΣtD) appended; a numerator correction crossing the
    cap moves both."""
    st = ExperimentState(cfg(MetricSpec("rps", kind="ratio", numerator="rev",
                                        denominator="sessions", cap_upper=5.0)))
    st.apply(X("a"))
    st.apply(M("a", "rev", 6.0, 1_000))
    st.apply(M("a", "sessions", 2.0, 1_000))
    fold(st)
    assert cell(st, "rps")[:3] == (1, 5.0, 25.0)
    assert extra(st, "rps") == no_cov(2.0, 4.0, 10.0, 6.0, 36.0, 12.0)
    st.apply(M("a", "rev", -3.0, 2_000))  # t 3: under the cap
    assert cell(st, "rps")[:3] == (1, 3.0, 9.0)
    assert extra(st, "rps") == no_cov(2.0, 4.0, 6.0, 3.0, 9.0, 6.0)


def test_one_event_metric_feeds_several_kinds():
    """rev is a sum, the numerator of a ratio, and orders (a conversion)
    its denominator: one late rev event corrects the sum, the ratio and
    moves the tail; the conversion's cell only follows orders."""
    st = ExperimentState(cfg(MetricSpec("rev"), MetricSpec("orders", kind="conversion"),
                             MetricSpec("aov", kind="ratio", numerator="rev",
                                        denominator="orders")))
    assert st.event_metrics == ("rev", "orders")
    st.apply(X("u"))
    st.apply(M("u", "rev", 10.0, 1_000))
    st.apply(M("u", "orders", 1.0, 1_000))
    fold(st)
    st.apply(M("u", "rev", 5.0, 2_000))
    snap = st.snapshot()
    assert snap.cells["rev"][0][0][:3] == (1, 15.0, 225.0)
    assert snap.cells["orders"][0][0][:3] == (1, 1.0, 1.0)
    assert snap.cells["aov"][0][0][:3] == (1, 15.0, 225.0)
    z = no_cov(0.0, 0.0, 0.0)  # stratum 1: unknown activity
    assert snap.extra_cells == {"aov": [[no_cov(1.0, 1.0, 15.0), z], [z, z]]}
    assert snap.tails["rev"][0] == {tail_bucket(15.0): 1}
    st.apply(M("u", "orders", -1.0, 3_000))
    snap = st.snapshot()
    assert snap.cells["orders"][0][0][:3] == (1, 0.0, 0.0)
    assert snap.extra_cells["aov"][0][0] == no_cov(0.0, 0.0, 0.0)


def test_outcome_rules():
    c = cfg(MetricSpec("s", cap_lower=-1.0), MetricSpec("c", kind="conversion", threshold=-1.0),
            MetricSpec("r", kind="ratio", numerator="s", denominator="d", cap_upper=2.0))
    ps, pc, pr = metric_plans(c)
    assert outcome(ps, [-3.0, 0.0, 4.0]) == (-1.0, (-3.0, 9.0))
    assert outcome(pc, [0.0, -0.5, 0.0]) == (1.0, ())
    assert outcome(pc, [0.0, -1.0, 0.0]) == (0.0, ())
    assert outcome(pr, [3.0, 0.0, 4.0]) == (2.0, no_cov(4.0, 16.0, 8.0, 3.0, 9.0, 12.0))
    # both pre values (s: 1, d: 2): the covariate sums of y = 2 (capped), D = 4
    assert outcome(pr, [3.0, 0.0, 4.0], [1.0, None, 2.0]) == (2.0, (
        4.0, 16.0, 8.0, 3.0, 9.0, 12.0,
        1.0, 1.0, 2.0, 1.0, 4.0, 2.0, 2.0, 4.0, 4.0, 8.0, 2.0, 4.0))
    assert outcome(pr, [3.0, 0.0, 4.0], [1.0, None, None])[1] == no_cov(
        4.0, 16.0, 8.0, 3.0, 9.0, 12.0)


def test_ratio_covariate_sums_over_units_with_both_pre_values():
    """CUPED for a ratio: units a (M 6, D 3; x_M 2, x_D 1), b (M 0, D 2;
    x_M 1 only) and c (M 1, D 1; x_M 0.5, x_D 4): the covariate sums are
    a's and c's; a late session of a (D 3 -> 4) moves Σx_M·D by 2,
    Σx_D·D by 1 and ΣD by 1 (after minus before), n and the x sums stay."""
    st = ExperimentState(cfg(MetricSpec("rps", kind="ratio", numerator="rev",
                                        denominator="sessions")))
    st.apply(X("a", cov={"rev": 2.0, "sessions": 1.0}))
    st.apply(X("b", cov={"rev": 1.0}))
    st.apply(X("c", cov={"rev": 0.5, "sessions": 4.0}))
    for ev in (M("a", "rev", 6.0, 1_000), M("a", "sessions", 3.0, 1_000),
               M("b", "sessions", 2.0, 1_000), M("c", "rev", 1.0, 1_000),
               M("c", "sessions", 1.0, 1_000)):
        st.apply(ev)
    fold(st)
    # n, Σx_M, Σx_D, Σx_M², Σx_D², Σx_M·x_D, Σx_M·M, Σx_M·D, Σx_D·M, Σx_D·D, ΣM, ΣD
    cov = (2.0, 2.5, 5.0, 4.25, 17.0, 4.0, 12.5, 6.5, 10.0, 7.0, 7.0, 4.0)
    assert extra(st, "rps") == (6.0, 14.0, 19.0, *cov)
    assert cell(st, "rps")[3:] == (3, 3.5, 5.25, 12.5, 7.0)  # the numerator's own x
    assert st.apply(M("a", "sessions", 1.0, 2_000)) == "corrected"
    cov = (2.0, 2.5, 5.0, 4.25, 17.0, 4.0, 12.5, 8.5, 10.0, 8.0, 7.0, 5.0)
    assert extra(st, "rps") == (7.0, 21.0, 25.0, *cov)
    assert st.apply(M("a", "rev", -6.0, 2_000)) == "corrected"  # M 6 -> 0
    cov = (2.0, 2.5, 5.0, 4.25, 17.0, 4.0, 0.5, 8.5, 4.0, 8.0, 1.0, 5.0)
    assert extra(st, "rps") == (7.0, 21.0, 1.0, *cov)


def age_cfg(*metrics: MetricSpec) -> ExperimentConfig:
    """Exposure-age bins [0, 5 s) and [5 s, 10 s): two bins in the 10 s window."""
    return cfg(*metrics, exposure_age_bins=(0, 5))


def test_conversion_age_cells_threshold_each_bin_and_flip():
    """buy (threshold 1): unit u has bin totals (2, 0.5): y_b = (1, 0), so
    the age cell is (n 1, Σy_0 1, Σy_0² 1, Σy_1 0, Σy_1² 0, Σy_0·y_1 0);
    a correction of +1 in bin 1 (0.5 -> 1.5) flips y_1 and the cross term;
    one of -1.5 in bin 0 (2 -> 0.5) flips y_0 and the cross term back."""
    c = age_cfg(MetricSpec("buy", kind="conversion", threshold=1.0))
    st = ExperimentState(c)
    assert age_cell_width(metric_plans(c)[0], 2) == 5
    st.apply(X("u"))
    st.apply(M("u", "buy", 2.0, 1_000))
    st.apply(M("u", "buy", 0.5, 6_000))
    fold(st)
    a = st.snapshot().age_cells["buy"][0]
    f = st.units["u"].fine
    assert a[f] == (1, 1.0, 1.0, 0.0, 0.0, 0.0)
    assert st.apply(M("u", "buy", 1.0, 7_000)) == "corrected"
    assert st.snapshot().age_cells["buy"][0][f] == (1, 1.0, 1.0, 1.0, 1.0, 1.0)
    st.apply(M("u", "buy", -1.5, 2_000))
    assert st.snapshot().age_cells["buy"][0][f] == (1, 0.0, 0.0, 1.0, 1.0, 0.0)
    assert cell(st, "buy")[:3] == (1, 1.0, 1.0)  # the window total 2.0 > 1 still


def test_ratio_age_cells_keep_numerator_and_denominator_by_bin():
    """rps = rev / sessions with bins [0, 5 s), [5 s, 10 s): unit u has
    (M_0, D_0) = (4, 2), (M_1, D_1) = (1, 1): its age cell is (n 1, 4, 16,
    2, 4, 8, 1, 1, 1, 1, 1); a late session in bin 0 (D_0 2 -> 3) moves
    ΣD_0 by 1, ΣD_0² by 5 and ΣM_0·D_0 by 4."""
    c = age_cfg(MetricSpec("rps", kind="ratio", numerator="rev", denominator="sessions"))
    st = ExperimentState(c)
    assert age_cell_width(metric_plans(c)[0], 2) == 10
    st.apply(X("u"))
    for ev in (M("u", "rev", 4.0, 1_000), M("u", "sessions", 2.0, 1_000),
               M("u", "rev", 1.0, 6_000), M("u", "sessions", 1.0, 6_000)):
        st.apply(ev)
    fold(st)
    f = st.units["u"].fine
    assert st.snapshot().age_cells["rps"][0][f] == (1, 4.0, 16.0, 2.0, 4.0, 8.0,
                                                    1.0, 1.0, 1.0, 1.0, 1.0)
    st.apply(M("u", "sessions", 1.0, 3_000))
    assert st.snapshot().age_cells["rps"][0][f] == (1, 4.0, 16.0, 3.0, 9.0, 12.0,
                                                    1.0, 1.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("t", [1e-9, 2e-9, 0.37, 1.0, 7.5, 123.456, 1e6, 3.3e11])
def test_tail_buckets_within_relative_accuracy(t):
    for x in (t, -t):
        b = tail_bucket(x)
        assert (b > 0) == (x > 0) and b != 0
        assert math.isclose(bucket_value(b), x, rel_tol=RELATIVE_ACCURACY * 1.0001)
        assert tail_bucket(x * GAMMA * GAMMA) != b  # distinct buckets beyond gamma
    assert tail_bucket(0.0) == tail_bucket(-0.0) == tail_bucket(5e-10) == 0
    assert bucket_value(0) == 0.0
