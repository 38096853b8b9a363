"""streams.alerts.rules: edge-triggered alert records from estimate records.

Each kind fires on a constructed estimate record and resolves when the
condition goes away; nothing is re-emitted while a condition stays; the
hysteresis band holds a firing alert; every emitted record validates against
``schemas/alert.schema.json``; ids are deterministic; the state survives a
JSON round trip (it lives in Redis between calls).
"""

from __future__ import annotations

import copy
import math

import jsonschema
import orjson
import pytest

from schemas.contracts import load_schema
from schemas.records import ExperimentConfig, MetricSpec
from streams.alerts.rules import (
    ALERT_KINDS,
    DEFAULT_THRESHOLDS,
    alert_id,
    evaluate,
    initial_state,
    thresholds,
    unknown_threshold_keys,
)
from streams.state.data_quality import data_quality_of
from streams.state.semantics import COUNTERS
from tests.support.alert_records import WM, quiet, record

ALERT_SCHEMA = jsonschema.Draft202012Validator(load_schema("alert"))


def config(**kw) -> ExperimentConfig:
    base = dict(
        experiment_id="exp-1",
        variants=("control", "treatment"),
        metrics=(MetricSpec("revenue", "increase", 0.5), MetricSpec("latency", "decrease")),
    )
    base.update(kw)
    return ExperimentConfig(**base)


class Monitor:
    """The caller's loop: state stored as JSON between calls, every alert validated."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.state: dict | None = None
        self.now = WM + 10_000
        self.log: list[dict] = []

    def __call__(self, *recs: dict, cfg: ExperimentConfig | None = None) -> list[dict]:
        self.now += 1000
        before = copy.deepcopy(self.state)
        alerts, state = evaluate(cfg or self.cfg, list(recs), self.state, self.now)
        assert self.state == before  # the previous state is not mutated
        self.state = orjson.loads(orjson.dumps(state))  # JSON-able, as in Redis
        for a in alerts:
            ALERT_SCHEMA.validate(a)
            assert orjson.loads(orjson.dumps(a)) == a
            assert a["created_at"] == self.now
            assert a["message"].endswith(".") and a["message"].count(". ") == 0
        self.log.extend(alerts)
        return alerts


def quality(dead_letters: dict | None = None, **counters: int) -> dict:
    """A record's ``data_quality`` from counters (``streams.state.semantics.COUNTERS``)."""
    return data_quality_of({k: counters.get(k, 0) for k in COUNTERS}, dead_letters)


def kinds(alerts: list[dict], state: str | None = None) -> set[str]:
    return {a["kind"] for a in alerts if state is None or a["state"] == state}


# --------------------------------------------------------------------------- all kinds


def test_every_kind_fires_and_resolves():
    cfg = config(allocation=(0.5, 0.5))
    mon = Monitor(cfg)
    lossy = quality(exposures=2000, metric_applied=7800, late=200)  # 2% dropped
    bad = record(mean=-1.0, sd=0.2, p_positive=0.001, naive_mean=0.5,
                 exposed={"control": 5600, "treatment": 4400}, rhat=1.005, ess=900, dq=lossy,
                 novelty=(0.08, 0.02), ready=True)
    stuck = record(metric="latency", rhat=1.3, ess=40, iteration=3000,
                   exposed={"control": 5600, "treatment": 4400}, dq=lossy)
    fired = mon(bad, stuck)
    assert kinds(fired, "firing") == set(ALERT_KINDS)
    assert all(a["state"] == "firing" for a in fired)
    assert not mon(bad, stuck)  # no repetition while firing
    assert not mon(bad, stuck)
    clean = quality(exposures=4000, metric_applied=15_800, late=200)  # no new drops
    good = record(mean=0.0, sd=0.2, p_positive=0.5,
                  exposed={"control": 50_000, "treatment": 50_000}, dq=clean,
                  novelty=(0.005, 0.02), ready=False)  # a decision resolves only on a reset
    calm = record(metric="latency", rhat=1.001, exposed={"control": 50_000, "treatment": 50_000},
                  dq=clean)
    resolved = mon(good, calm)
    assert kinds(resolved, "resolved") == set(ALERT_KINDS)
    assert all(a["state"] == "resolved" for a in resolved)
    assert mon.state["active"] == {}
    assert not mon(good, calm)
    # each firing has exactly one resolved with the same id
    ids_f = sorted(a["alert_id"] for a in fired)
    ids_r = sorted(a["alert_id"] for a in resolved)
    assert ids_f == ids_r and len(set(ids_f)) == len(ids_f)


def test_alert_ids_are_deterministic():
    assert alert_id("exp-1", "decision_ready", "revenue", "treatment") == \
        "exp-1|decision_ready|revenue|treatment"
    assert alert_id("exp-1", "sample_ratio_mismatch") == "exp-1|sample_ratio_mismatch||"
    cfg = config()
    recs = [record(mean=-1.0, sd=0.2, p_positive=0.001, ready=True)]
    a1, s1 = evaluate(cfg, recs, None, WM + 5)
    a2, s2 = evaluate(cfg, copy.deepcopy(recs), {}, WM + 5)
    assert a1 == a2 and s1 == s2
    assert {a["alert_id"] for a in a1} == {
        "exp-1|guardrail_breach|revenue|treatment",
        "exp-1|decision_ready|revenue|treatment",
    }
    assert [a["alert_id"] for a in a1] == sorted(a["alert_id"] for a in a1)


# --------------------------------------------------------------------------- guardrail


@pytest.mark.parametrize("g", [0.5, -0.5])
def test_guardrail_breach_increase_metric(g):
    mon = Monitor(config(metrics=(MetricSpec("revenue", "increase", g),)))
    # P(effect < -0.5) for N(-1, 0.2) = Phi(2.5) = 0.994
    a = mon(record(mean=-1.0, sd=0.2))
    assert [x["kind"] for x in a] == ["guardrail_breach"]
    ev = a[0]["evidence"]
    assert ev["p_breach"] == pytest.approx(0.99379, abs=1e-4)
    assert ev["threshold"] == -0.5 and a[0]["metric"] == "revenue"
    assert a[0]["variant"] == "treatment" and a[0]["watermark"] == {"event_time": WM}
    # in the hysteresis band (0.90 <= P <= 0.95): still firing, nothing emitted
    assert not mon(record(mean=-0.8, sd=0.2))  # Phi(1.5) = 0.933
    a = mon(record(mean=-0.3, sd=0.2))  # Phi(-1) = 0.16
    assert [(x["kind"], x["state"]) for x in a] == [("guardrail_breach", "resolved")]
    # the band does not fire from cold
    assert not mon(record(mean=-0.8, sd=0.2))


def test_guardrail_breach_decrease_metric_and_unguarded_metrics():
    cfg = config(metrics=(MetricSpec("latency", "decrease", 20.0), MetricSpec("clicks")))
    mon = Monitor(cfg)
    assert not mon(record("latency", mean=10.0, sd=5.0), record("clicks", mean=-50, sd=1))
    a = mon(record("latency", mean=40.0, sd=5.0))
    assert [(x["kind"], x["metric"]) for x in a] == [("guardrail_breach", "latency")]
    assert a[0]["evidence"]["threshold"] == 20.0
    # sd = 0: a point mass
    mon2 = Monitor(cfg)
    assert kinds(mon2(record("latency", mean=21.0, sd=0.0, lo=21.0, hi=21.0))) == \
        {"guardrail_breach"}


KINDS_MERGED = "kind" in getattr(MetricSpec, "__dataclass_fields__", {})
needs_kinds = pytest.mark.skipif(not KINDS_MERGED, reason="MetricSpec.kind (issue 26, the "
                                 "config branch kinds-state) not merged yet")


@needs_kinds
def test_guardrail_on_every_kind_in_its_units():
    """Issue 26: a guardrail on a conversion is in probability points (0.01 = 1
    pp of conversion rate), on a ratio in ratio units (R_t - R_c), on a capped
    sum in metric units of the capped effect; each fires and resolves on its
    published adjusted effect, and its message names the units."""
    metrics = (MetricSpec("checkout", "increase", 0.01, kind="conversion"),
               MetricSpec("rev_per_session", "increase", 0.05, kind="ratio",
                          numerator="revenue", denominator="sessions"),
               MetricSpec("latency_ratio", "decrease", 0.1, kind="ratio",
                          numerator="latency_ms", denominator="requests"),
               MetricSpec("revenue", "increase", 2.0, cap_upper=500.0))
    mon = Monitor(config(metrics=metrics))

    def rec(metric: str, kind: str, **kw) -> dict:
        r = record(metric, **kw)
        r["kind"] = kind
        return r

    # conversion: -3 pp ± 0.5 pp against a 1 pp guardrail: P(effect < -0.01) ~ 1
    a = mon(rec("checkout", "conversion", mean=-0.03, sd=0.005),
            rec("rev_per_session", "ratio", mean=-0.01, sd=0.01),  # P(< -0.05) ~ 0
            rec("latency_ratio", "ratio", mean=0.3, sd=0.05),  # P(> 0.1) ~ 1
            rec("revenue", "sum", mean=-1.0, sd=1.0))  # P(< -2) = 0.16
    by = {x["metric"]: x for x in a}
    assert set(by) == {"checkout", "latency_ratio"}
    assert all(x["kind"] == "guardrail_breach" for x in a)
    conv = by["checkout"]
    assert conv["evidence"]["threshold"] == -0.01
    assert conv["evidence"]["p_breach"] == pytest.approx(1.0, abs=1e-4)
    assert "below -1 pp (percentage points of conversion rate)" in conv["message"]
    assert "adjusted effect -3 pp" in conv["message"], conv["message"]
    ratio = by["latency_ratio"]
    assert ratio["evidence"]["threshold"] == 0.1
    assert "above 0.1 (difference of the ratio between arms)" in ratio["message"]
    # the ratio's breach needs P(R_t - R_c < -0.05) > 0.95; the capped sum's, P(< -2)
    a = mon(rec("checkout", "conversion", mean=-0.03, sd=0.005),
            rec("rev_per_session", "ratio", mean=-0.09, sd=0.02),
            rec("latency_ratio", "ratio", mean=0.3, sd=0.05),
            rec("revenue", "sum", mean=-3.0, sd=0.5))
    assert {(x["metric"], x["state"]) for x in a} == {("rev_per_session", "firing"),
                                                      ("revenue", "firing")}
    # the conversion recovers to -0.2 pp: resolved, in pp
    a = mon(rec("checkout", "conversion", mean=-0.002, sd=0.005),
            rec("rev_per_session", "ratio", mean=-0.09, sd=0.02),
            rec("latency_ratio", "ratio", mean=0.3, sd=0.05),
            rec("revenue", "sum", mean=-3.0, sd=0.5))
    assert [(x["metric"], x["state"]) for x in a] == [("checkout", "resolved")]
    assert "P(effect below -1 pp (percentage points" in a[0]["message"]


# --------------------------------------------------------------------------- decision ready


def test_decision_ready_follows_the_always_valid_decision():
    """issue 27: decision_ready is ``decision.ready``: no per-look threshold,
    so a posterior probability beyond 0.95 alone no longer fires it, and a
    decision once made does not flap as the estimate moves."""
    mon = Monitor(config(metrics=(MetricSpec("revenue"),)))
    assert not mon(record(p_positive=0.99))  # no decision object: nothing to say
    assert not mon(record(p_positive=0.99, ready=False))  # the old rule would have fired
    a = mon(record(mean=0.3, p_positive=0.999, ready=True))
    assert [(x["kind"], x["state"]) for x in a] == [("decision_ready", "firing")]
    msg, ev = a[0]["message"], a[0]["evidence"]
    assert "better" in msg and "confidence sequence" in msg and "alpha 0.05" in msg
    assert "[-0" in msg or "[0" in msg  # the sequence's bounds are stated
    assert ev["alpha"] == 0.05 and ev["cs_lo"] == pytest.approx(0.0) and ev["e_value"] == 25.0
    # the estimate drifts back towards 0: the decision stands, nothing new
    assert not mon(record(mean=0.01, p_positive=0.55, ready=True, direction="better"))
    a = mon(record(mean=0.01, p_positive=0.55, ready=False))
    assert [x["state"] for x in a] == ["resolved"] and "reset" in a[0]["message"]


def test_decision_ready_respects_metric_direction_in_message():
    mon = Monitor(config(metrics=(MetricSpec("latency", "decrease"),)))
    a = mon(record("latency", p_positive=0.99, ready=True, direction="worse"))
    assert "worse" in a[0]["message"]


# --------------------------------------------------------------------------- not converged


def test_not_converged_after_min_iteration_with_hysteresis():
    mon = Monitor(config(metrics=(MetricSpec("revenue"),)))
    assert not mon(record(rhat=1.2, iteration=1000))  # warm-up
    a = mon(record(rhat=1.2, iteration=2500))
    assert [(x["kind"], x["state"]) for x in a] == [("not_converged", "firing")]
    assert a[0]["evidence"]["iteration"] == 2500
    assert not mon(record(rhat=1.04, iteration=3000))  # band: 1.03 < 1.04 <= 1.05
    assert not mon(record(rhat=None, iteration=3100))  # undefined: no change
    a = mon(record(rhat=1.02, iteration=3200))
    assert [(x["kind"], x["state"]) for x in a] == [("not_converged", "resolved")]


# --------------------------------------------------------------------------- early-adopter bias


def test_early_adopter_bias_interval_criterion():
    mon = Monitor(config(metrics=(MetricSpec("revenue"),)))
    # adjusted 0.1 [-0.1, 0.3] (half-width 0.2); naive 0.5 lies 2 half-widths away
    a = mon(record(mean=0.1, sd=0.1, lo=-0.1, hi=0.3, naive_mean=0.5, p_positive=0.84))
    assert [(x["kind"], x["state"]) for x in a] == [("early_adopter_bias", "firing")]
    ev = a[0]["evidence"]
    assert ev["naive_mean"] == 0.5 and ev["interval_distance"] == pytest.approx(2.0)
    assert not mon(record(mean=0.1, sd=0.1, lo=-0.1, hi=0.3, naive_mean=0.29,
                          p_positive=0.84))  # 0.95 half-widths: in the band
    a = mon(record(mean=0.1, sd=0.1, lo=-0.1, hi=0.3, naive_mean=0.25, p_positive=0.84))
    assert [(x["kind"], x["state"]) for x in a] == [("early_adopter_bias", "resolved")]


def test_early_adopter_bias_sign_criterion_and_unavailable_adjustment():
    mon = Monitor(config(metrics=(MetricSpec("revenue"),)))
    # naive mean inside the adjusted interval but positive, where the adjusted
    # posterior has only 3% of its mass (ESS low so that decision_ready stays out)
    a = mon(record(mean=-0.2, sd=0.12, lo=-0.5, hi=0.05, naive_mean=0.04, p_positive=0.03,
                   ess=100))
    assert [(x["kind"], x["state"]) for x in a] == [("early_adopter_bias", "firing")]
    assert a[0]["evidence"]["adjusted_mass_on_naive_side"] == pytest.approx(0.03)
    assert not mon(record(mean=-0.2, sd=0.12, lo=-0.5, hi=0.05, naive_mean=0.04,
                          p_positive=0.07, ess=100))  # band: 0.05 <= 0.07 < 0.10
    # (naive 0.01: 0.84 half-widths, inside the interval band too)
    a = mon(record(mean=-0.2, sd=0.12, lo=-0.5, hi=0.05, naive_mean=0.01, p_positive=0.2,
                   ess=100))
    assert [x["state"] for x in a] == ["resolved"]
    # one stratum: adjusted is naive, never an alert
    mon2 = Monitor(config(metrics=(MetricSpec("revenue"),)))
    assert not mon2(record(mean=0.1, lo=-0.1, hi=0.3, naive_mean=0.9, adjustment="unavailable"))


# --------------------------------------------------------------------------- SRM


def test_srm_fires_keeps_running_max_and_resolves_on_floor():
    cfg = config(metrics=(MetricSpec("revenue"),), allocation=(0.5, 0.5))
    mon = Monitor(cfg)
    assert not mon(record(exposed={"control": 520, "treatment": 480}))
    assert mon.state["srm"]["log_bf_max"] <= math.log(1000)
    a = mon(record(exposed={"control": 5600, "treatment": 4400}))
    assert [(x["kind"], x["state"], x["metric"], x["variant"]) for x in a] == \
        [("sample_ratio_mismatch", "firing", None, None)]
    ev = a[0]["evidence"]
    assert ev["p_value"] < 1e-3 and ev["n"] == 10_000
    assert ev["share.control"] == 0.56 and ev["allocation.treatment"] == 0.5
    assert ev["max_rel_deviation"] == pytest.approx(0.12)
    lmax = mon.state["srm"]["log_bf_max"]
    assert lmax >= math.log(1000)
    # the bug is fixed: balanced traffic dilutes the deviation; the running max stays
    assert not mon(record(exposed={"control": 60_600, "treatment": 59_400}))  # 1.0% > 0.8%
    assert mon.state["srm"]["log_bf_max"] >= lmax
    a = mon(record(exposed={"control": 100_600, "treatment": 99_400}))  # 0.6% <= 0.8%
    assert [(x["kind"], x["state"]) for x in a] == [("sample_ratio_mismatch", "resolved")]
    assert a[0]["evidence"]["p_value"] < 1e-3  # still significant, no longer material


def test_srm_state_is_the_running_max():
    cfg = config(metrics=(MetricSpec("revenue"),))
    rec = record(exposed={"control": 105, "treatment": 95})  # 5% of an arm, n = 200
    # alone: nowhere near significant
    a, state = evaluate(cfg, [rec], None, WM)
    assert not a and state["srm"]["log_bf_max"] < 1.0
    # an earlier look had crossed 1/alpha: anytime-valid p stays small, so it alarms
    prior = {"version": 1, "active": {}, "srm": dict(state["srm"], log_bf_max=10.0)}
    a, state2 = evaluate(cfg, [rec], prior, WM)
    assert kinds(a) == {"sample_ratio_mismatch"}
    assert state2["srm"]["log_bf_max"] == 10.0
    # a changed allocation is a new null: the max restarts
    a, state3 = evaluate(config(metrics=(MetricSpec("revenue"),), allocation=(0.4, 0.6)),
                         [rec], prior, WM)
    assert state3["srm"]["log_bf_max"] != 10.0


def test_srm_unequal_allocation_and_three_arms():
    cfg = config(variants=("control", "a", "b"), allocation=(0.5, 0.25, 0.25),
                 metrics=(MetricSpec("revenue"),))
    exposed = {"control": 50_000, "a": 25_000, "b": 25_000}
    mon = Monitor(cfg)
    assert not mon(record(variant="a", exposed=exposed), record(variant="b", exposed=exposed))
    exposed = {"control": 50_000, "a": 25_000, "b": 22_000}  # arm b lost 12% of its units
    a = mon(record(variant="a", exposed=exposed), record(variant="b", exposed=exposed))
    assert kinds(a) == {"sample_ratio_mismatch"} and len(a) == 1


def test_srm_no_units_changes_nothing():
    mon = Monitor(config())
    assert not mon(record(exposed={"control": 0, "treatment": 0}))


# --------------------------------------------------------------------------- bookkeeping


def test_missing_records_keep_alerts_and_removed_config_resolves():
    cfg = config()
    mon = Monitor(cfg)
    a = mon(record(mean=-1.0, sd=0.2, p_positive=0.5))
    assert kinds(a) == {"guardrail_breach"}
    # a tick that only re-estimated another metric: no news, no change
    assert not mon(record("latency"))
    assert "exp-1|guardrail_breach|revenue|treatment" in mon.state["active"]
    # the guardrail is removed from the config
    cfg2 = config(metrics=(MetricSpec("revenue", "increase", None), MetricSpec("latency")))
    a = mon(record("latency"), cfg=cfg2)
    assert [(x["kind"], x["state"]) for x in a] == [("guardrail_breach", "resolved")]
    assert "no longer" in a[0]["message"] and a[0]["watermark"] == {"event_time": WM}


def test_other_experiments_ignored_and_latest_record_wins():
    cfg = config(metrics=(MetricSpec("revenue"),))
    old = record(p_positive=0.99, computed_at=WM + 1, ready=True)
    new = record(p_positive=0.5, computed_at=WM + 2, ready=False)
    other = record(p_positive=0.99, experiment_id="exp-2", ready=True)
    a, _ = evaluate(cfg, [new, old, other], None, WM)
    assert not a
    a, _ = evaluate(cfg, [old], initial_state(), WM)
    assert kinds(a) == {"decision_ready"}


def test_threshold_overrides_derived_resolve_levels_and_clamping():
    t = thresholds(None)
    assert t == DEFAULT_THRESHOLDS
    t = thresholds({"guardrail_prob": 0.8})
    assert t["guardrail_prob"] == 0.8 and t["guardrail_resolve_prob"] == pytest.approx(0.75)
    # an explicit resolve level on the firing side is clamped to the firing level
    t = thresholds({"guardrail_prob": 0.8, "guardrail_resolve_prob": 0.9,
                    "decision_rhat": 1.05, "decision_resolve_rhat": 1.0})
    assert t["guardrail_resolve_prob"] == 0.8 and t["decision_resolve_rhat"] == 1.05
    # out-of-domain values fall back to the defaults instead of breaking the sampler
    t = thresholds({"srm_alpha": 2.0, "decision_prob": 0.3, "bias_prob": float("nan")})
    assert t["srm_alpha"] == 0.001 and t["decision_prob"] == 0.95 and t["bias_prob"] == 0.05
    assert unknown_threshold_keys({"srm_alpha": 0.01, "typo_prob": 1.0}) == ["typo_prob"]


def test_config_overrides_change_behaviour():
    cfg = config(metrics=(MetricSpec("revenue"),), alert_thresholds={"srm_floor": 0.2})
    a, _ = evaluate(cfg, [record(exposed={"control": 5600, "treatment": 4400})], None, WM)
    assert not a  # 12% deviation is under a 20% floor


# --------------------------------------------------------------------------- data loss


class Traffic:
    """Cumulative counters of an experiment: each ``tick`` adds new events."""

    def __init__(self) -> None:
        self.c = {k: 0 for k in COUNTERS}
        self.dl: dict[str, int] = {}

    def tick(self, exposures: int = 1000, metrics: int = 4000, late: int = 0,
             expired: int = 0, dead: int = 0) -> dict:
        self.c["exposures"] += exposures
        self.c["metric_applied"] += metrics - late - expired - dead  # dead: rejected metrics
        self.c["late"] += late
        self.c["expired"] += expired
        if dead:
            self.dl["ts_in_future"] = self.dl.get("ts_in_future", 0) + dead
        return data_quality_of(self.c, self.dl)


def loss_config(**thresholds) -> ExperimentConfig:
    return config(metrics=(MetricSpec("revenue"),), alert_thresholds=thresholds)


def test_data_loss_fires_once_and_resolves_when_drops_stop():
    mon, tr = Monitor(loss_config()), Traffic()
    # 2% of the new metrics are dropped (80 of 4000 a tick; 1.6% of all new events)
    a = mon(quiet(dq=tr.tick(late=60, expired=10, dead=10)))
    assert [(x["kind"], x["state"], x["metric"], x["variant"]) for x in a] == \
        [("data_loss", "firing", None, None)]
    assert a[0]["alert_id"] == "exp-1|data_loss||"
    ev = a[0]["evidence"]
    assert ev["window_events"] == 5000 and ev["window_dropped"] == 80
    assert ev["window_share"] == pytest.approx(0.016) and ev["level"] == 0.005
    assert (ev["window_late"], ev["window_expired"], ev["window_dead_letters"]) == (60, 10, 10)
    assert "1.6%" in a[0]["message"] and "late 60" in a[0]["message"]
    for _ in range(4):  # edge-triggered: nothing while the drops go on
        assert not mon(quiet(dq=tr.tick(late=80)))
    assert "exp-1|data_loss||" in mon.state["active"]
    assert len(mon.state["data_loss"]["marks"]) <= 6
    a = mon(quiet(dq=tr.tick()))  # drops stop
    assert [(x["kind"], x["state"]) for x in a] == [("data_loss", "resolved")]
    assert a[0]["evidence"]["window_dropped"] == 0 and "stopped" in a[0]["message"]
    for _ in range(5):
        assert not mon(quiet(dq=tr.tick()))
    # the cumulative share is still above the limit: only the window resolved it
    assert tr.tick(0, 0)["dropped_share"] > 0.005
    assert mon.state["active"] == {}


def test_data_loss_small_drops_never_fire():
    mon, tr = Monitor(loss_config()), Traffic()
    for _ in range(20):  # 0.1% of the new metrics
        assert not mon(quiet(dq=tr.tick(late=4)))
    # small ticks: one drop per 1000 events, unevenly spread
    for i in range(40):
        assert not mon(quiet(dq=tr.tick(exposures=50, metrics=200, late=int(i % 4 == 3))))
    assert len(mon.state["data_loss"]["marks"]) <= 6


def test_data_loss_idle_experiment_does_not_flap():
    mon, tr = Monitor(loss_config()), Traffic()
    dq = tr.tick(late=100)
    assert kinds(mon(quiet(dq=dq))) == {"data_loss"}
    state = copy.deepcopy(mon.state)
    for _ in range(10):  # no new events: the same totals again and again
        assert not mon(quiet(dq=dq))
    assert mon.state["data_loss"] == state["data_loss"]
    # a trickle of clean events: nothing until a full window of them
    for _ in range(9):
        assert not mon(quiet(dq=tr.tick(exposures=20, metrics=80)))
    a = mon(quiet(dq=tr.tick(exposures=20, metrics=80)))  # 1000 clean events now
    assert [(x["kind"], x["state"]) for x in a] == [("data_loss", "resolved")]
    # from cold, an idle experiment with few events and some drops: no window, no alert
    mon2, tr2 = Monitor(loss_config()), Traffic()
    dq2 = tr2.tick(exposures=100, metrics=300, late=30)  # 7.5%, but 400 events
    for _ in range(10):
        assert not mon2(quiet(dq=dq2))
    # held metrics expiring on an idle experiment: dropped grows, events do not
    dq3 = {**dq2, "expired": 20, "dropped": 50, "dropped_share": 50 / 400}
    for _ in range(3):
        assert not mon2(quiet(dq=dq3))


def test_data_loss_thresholds_restart_and_old_records():
    tr = Traffic()
    dq = tr.tick(late=80)
    a, _ = evaluate(loss_config(data_loss_share=0.05), [quiet(dq=dq)], None, WM)
    assert not a  # 1.6% under a 5% limit
    a, _ = evaluate(loss_config(data_loss_min_events=10_000), [quiet(dq=dq)], None, WM)
    assert not a  # 5000 events are not a window yet
    a, state = evaluate(loss_config(), [quiet(dq=dq)], None, WM)
    assert kinds(a) == {"data_loss"}
    # hysteresis: 0.4% keeps it firing (resolve level 0.25%), 0.2% resolves it
    a, state = evaluate(loss_config(), [quiet(dq=tr.tick(late=20))], state, WM)
    assert not a
    a, state = evaluate(loss_config(), [quiet(dq=tr.tick(late=10))], state, WM)
    assert [x["state"] for x in a] == ["resolved"]
    # the experiment's state was rebuilt: totals went down, the marks restart
    fresh = Traffic()
    a, state = evaluate(loss_config(), [quiet(dq=fresh.tick(late=100))], state, WM)
    assert kinds(a) == {"data_loss"} and state["data_loss"]["marks"][0]["events"] == 0
    # records without data_quality (written before it) change nothing
    a, state2 = evaluate(loss_config(), [quiet()], state, WM)
    assert not a and state2["data_loss"] == state["data_loss"]
    assert "exp-1|data_loss||" in state2["active"]
    t = thresholds({"data_loss_share": 0.02})
    assert t["data_loss_resolve_share"] == 0.01 and t["data_loss_min_events"] == 1000
    assert thresholds({"data_loss_share": 1.5})["data_loss_share"] == 0.005


def test_data_loss_through_redis(redis_url):
    """The alerting layer keeps the marks in Redis between ticks (real redis-server)."""
    import redis

    from streams.alerts import store as alerting  # imports the Redis state layer: only here
    from streams.state.registry import Registry

    r = redis.Redis.from_url(redis_url)
    registry = Registry(r)
    cfg = loss_config()
    registry.put(cfg)
    tr, now, log = Traffic(), WM + 10_000, []

    def tick(**kw) -> list[dict]:
        nonlocal now
        now += 1000
        out = alerting.process(r, registry, [quiet(dq=tr.tick(**kw))], now)
        for a in out:
            ALERT_SCHEMA.validate(a)
        log.extend(out)
        return out

    assert [(a["kind"], a["state"]) for a in tick(late=80)] == [("data_loss", "firing")]
    assert not tick(late=80) and not tick(late=80)
    stored = orjson.loads(r.get(alerting.state_key("exp-1")))
    assert stored["data_loss"]["marks"][-1]["events"] == 15_000
    assert "exp-1|data_loss||" in stored["active"]
    assert [(a["kind"], a["state"]) for a in tick()] == [("data_loss", "resolved")]
    assert not tick() and not tick()
    # the API's log, newest first
    assert [(a["kind"], a["state"]) for a in alerting.recent(r, "exp-1")] == \
        [("data_loss", "resolved"), ("data_loss", "firing")]
    r.close()


def test_racing_samplers_fire_a_transition_once(redis_url, monkeypatch):
    """Two samplers evaluate the same records at once (a rebalance): the
    second one's state changed between its read and its write, so it
    evaluates again on the new state and fires nothing (WATCH)."""
    import redis

    from streams.alerts import store as alerting
    from streams.state.registry import Registry

    r = redis.Redis.from_url(redis_url)
    r.flushall()
    registry = Registry(r)
    registry.put(loss_config())
    rec = quiet(dq=Traffic().tick(late=80))
    real = alerting.evaluate
    other: list[dict] = []

    def evaluate_while_the_other_writes(cfg, recs, state, now):
        out = real(cfg, recs, state, now)
        if not other:  # the other sampler's whole transition lands in between
            monkeypatch.setattr(alerting, "evaluate", real)
            other.extend(alerting.process(r, registry, [rec], WM + 11_000))
            monkeypatch.setattr(alerting, "evaluate", evaluate_while_the_other_writes)
        return out

    monkeypatch.setattr(alerting, "evaluate", evaluate_while_the_other_writes)
    mine = alerting.process(r, registry, [rec], WM + 11_000)
    assert [(a["kind"], a["state"]) for a in other] == [("data_loss", "firing")]
    assert mine == []  # re-evaluated on the other's state: nothing new
    assert [(a["kind"], a["state"]) for a in alerting.recent(r, "exp-1")] == \
        [("data_loss", "firing")]
    r.close()


# --------------------------------------------------------------------------- novelty


def test_novelty_effect_needs_both_certainty_and_margin_and_has_hysteresis():
    mon = Monitor(config())
    # sure (p = 0.99997) but small (0.012 <= margin 0.02): nothing
    assert not [a for a in mon(record(novelty=(0.012, 0.003))) if a["kind"] == "novelty_effect"]
    # big but unsure (p = 0.977 < 0.99): nothing
    assert not [a for a in mon(record(novelty=(0.06, 0.03))) if a["kind"] == "novelty_effect"]
    a = [x for x in mon(record(novelty=(-0.05, 0.01))) if x["kind"] == "novelty_effect"]
    assert [x["state"] for x in a] == ["firing"] and "Primacy" in a[0]["message"]
    assert a[0]["evidence"]["contrast_mean"] == -0.05
    # inside the hysteresis band: p = 0.0228 > 0.01 but < 0.05, |m| 0.02 > 0.016: still firing
    assert not [x for x in mon(record(novelty=(-0.02, 0.01))) if x["kind"] == "novelty_effect"]
    a = [x for x in mon(record(novelty=(-0.01, 0.01))) if x["kind"] == "novelty_effect"]
    assert [x["state"] for x in a] == ["resolved"]
    # records without exposure-age bins never fire it
    assert not [x for x in mon(record()) if x["kind"] == "novelty_effect"]
