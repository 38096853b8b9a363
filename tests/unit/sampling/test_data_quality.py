"""``data_quality``: what happened to an experiment's events, in every estimate
record (``streams.sampling.problems.records``), against the JSON Schema, and on /metrics."""

from __future__ import annotations

import dataclasses
import re

import jsonschema
import orjson
import pytest

from schemas.codec import dumps
from schemas.contracts import load_schema
from schemas.records import ExperimentConfig, Exposure, Metric
from streams.sampling.problems import problems_of, records
from streams.service.metrics import Metrics
from streams.state.data_quality import OUTCOMES, data_quality, data_quality_of, outcomes
from streams.state.semantics import COUNTERS, Reducer

ESTIMATE = jsonschema.Draft202012Validator(load_schema("estimate"))
T0 = 1_767_225_600_000

# every counter a different number, so that a mix-up shows
COUNTS = {
    "exposures": 1000, "repeat_exposure": 10, "conflict": 2, "unknown_variant": 3,
    "too_old": 4, "unknown_metric": 5, "pre_exposure": 6, "outside_window": 7,
    "metric_applied": 3000, "corrected": 140, "held": 8, "expired": 9, "late": 12,
    "duplicate": 20, "after_end": 11, "retired": 13, "before_start": 15,
    "cross_partition": 17,
}


def test_data_quality_hand_computed():
    assert set(COUNTS) == set(COUNTERS)
    dq = data_quality_of(COUNTS, {"ts_in_future": 3, "not_json": 2})
    # 1000+15+10+2+3+4+5+6+7+3000+140+8+9+12+20+11+13 = 4265 counted, + 5 dead letters
    assert dq["events"] == 4270
    assert dq["applied"] == 4015 and dq["before_start"] == 15  # clamped, applied
    assert dq["dropped"] == 12 + 9 + 4 + 5 == 30
    assert dq["dropped_share"] == pytest.approx(30 / 4270)
    for k in ("corrected", "held", "expired", "late", "too_old", "outside_window",
              "pre_exposure", "duplicate", "conflict", "repeat_exposure", "after_end",
              "unknown_variant", "unknown_metric", "retired"):
        assert dq[k] == COUNTS[k], k
    assert dq["cross_partition"] == 17  # noted besides the outcome: not in events
    assert dq["dead_letters"] == {"not_json": 2, "ts_in_future": 3}
    assert list(dq["dead_letters"]) == ["not_json", "ts_in_future"]  # sorted: stable JSON
    # the outcomes partition the events
    out = outcomes(dq)
    assert list(out) == list(OUTCOMES) and sum(out.values()) == dq["events"]
    assert out["dead_letter"] == 5 and out["applied"] == 4015 and out["late"] == 12


def test_dead_letter_that_is_also_a_counter_counts_once():
    # ingest dead-letters a too_old exposure that the state also counted as too_old
    dq = data_quality_of(COUNTS, {"too_old": 4, "ts_in_future": 3})
    assert dq["events"] == 4265 + 3 and dq["dropped"] == 12 + 9 + 4 + 3
    assert dq["dead_letters"] == {"too_old": 4, "ts_in_future": 3}
    assert sum(outcomes(dq).values()) == dq["events"] and outcomes(dq)["dead_letter"] == 3


def test_no_events_and_missing_counters():
    dq = data_quality_of({k: 0 for k in COUNTERS}, None)
    assert dq["events"] == 0 and dq["dropped"] == 0 and dq["dropped_share"] == 0.0
    assert dq["dead_letters"] == {}
    # dead letters alone (every event of the experiment was rejected)
    dq = data_quality_of({}, {"ts_in_future": 4})
    assert dq["events"] == 4 and dq["dropped"] == 4 and dq["dropped_share"] == 1.0
    assert dq["late"] == 0 and dq["applied"] == 0


def snapshot():
    cfg = ExperimentConfig("e1", window_seconds=3600, lateness_seconds=0)
    evs: list = [Exposure(f"x{i}", "e1", f"u{i}", ("control", "treatment")[i % 2],
                          T0 + i * 1000, pre_activity=float(i % 28)) for i in range(20)]
    evs += [Metric(f"m{i}", f"u{i}", "value", float(i), T0 + i * 1000 + 10, "e1")
            for i in range(20)]
    evs.append(Exposure("last", "e1", "zz", "control", T0 + 3 * 86_400_000))
    snap = Reducer([cfg]).apply_all(evs).snapshots()["e1"]
    return dataclasses.replace(snap, counters=dict(COUNTS),
                               dead_letters={"ts_in_future": 3, "not_json": 2})


def fake_summary(prob) -> list[dict]:
    """A ``kernels.summary`` row per treatment, shaped as ``records`` reads it."""
    iv = {"mean": 0.1, "sd": 0.05, "lo": 0.0, "hi": 0.2}
    strata = [{"share_population": {"mean": 1 / len(prob.strata), "lo": 0.0, "hi": 1.0},
               "effect": {"mean": 0.1, "lo": 0.0, "hi": 0.2}} for _ in prob.strata]
    return [{"adjustment": "stratified",
             "adjusted": {"effect": iv, "lift": iv, "p_positive": 0.9, "expected_loss": 0.01},
             "naive": {"effect": iv, "lift": iv, "p_positive": 0.9},
             "strata": strata,
             "diagnostics": {"rhat": 1.001, "ess_bulk": 500.0, "ess_tail": 400.0,
                             "chains": 2, "draws": 100}}
            for _ in prob.order[1:]]


def test_every_record_carries_data_quality_and_validates():
    snap = snapshot()
    probs = problems_of(snap)
    recs = records([fake_summary(p) for p in probs], probs, {"e1": snap}, iteration=7,
                   computed_at=T0 + 4 * 86_400_000)
    assert recs
    want = data_quality(snap)
    assert want["events"] == 4270 and want["dropped"] == 30
    for rec in recs:
        assert rec["data_quality"] == want
        ESTIMATE.validate(orjson.loads(dumps(rec)))  # as published (JSON)
    # each record has its own copy
    recs[0]["data_quality"]["dead_letters"]["x"] = 1
    assert "x" not in want["dead_letters"]


def test_schema_rejects_a_broken_data_quality():
    snap = snapshot()
    probs = problems_of(snap)
    rec = records([fake_summary(p) for p in probs], probs, {"e1": snap}, iteration=7,
                  computed_at=T0)[0]
    ESTIMATE.validate(rec)
    for mutate in (lambda q: q.pop("dropped"), lambda q: q.update(late=-1),
                   lambda q: q.update(dropped_share=1.5), lambda q: q.update(events=1.5),
                   lambda q: q.update(dead_letters={"ts_in_future": "3"})):
        bad = orjson.loads(dumps(rec))
        mutate(bad["data_quality"])
        assert list(ESTIMATE.iter_errors(bad)), bad["data_quality"]
    # records written before data_quality existed still validate
    old = orjson.loads(dumps(rec))
    del old["data_quality"]
    ESTIMATE.validate(old)


LINE = re.compile(r'^[a-z_]+(\{([a-z_]+="(?:[^"\\]|\\.)*",?)+\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$')


def test_metrics_from_records():
    m = Metrics()
    dq = data_quality_of(COUNTS, {"ts_in_future": 3, "not_json": 2})
    m.set_data_quality({"experiment_id": "e1", "data_quality": dq})
    m.set_data_quality({"experiment_id": "e2"})  # an older record: nothing
    text = m.render()
    for line in text.splitlines():
        assert line.startswith("# ") or LINE.match(line), line
    assert 'liftstream_experiment_events{experiment="e1",outcome="late"} 12' in text
    assert 'liftstream_experiment_events{experiment="e1",outcome="applied"} 4015' in text
    assert 'liftstream_experiment_events{experiment="e1",outcome="dead_letter"} 5' in text
    assert 'liftstream_experiment_dead_letters{experiment="e1",reason="not_json"} 2' in text
    assert 'liftstream_experiment_cross_partition_events{experiment="e1"} 17' in text
    # part of applied, also shown alone
    assert 'liftstream_experiment_before_start_events{experiment="e1"} 15' in text
    share = re.search(r'liftstream_experiment_dropped_share\{experiment="e1"\} (\S+)', text)
    assert share and float(share.group(1)) == pytest.approx(30 / 4270)
    assert "# TYPE liftstream_experiment_events gauge" in text
    assert 'experiment="e2"' not in text
    total = sum(float(x) for x in re.findall(
        r'liftstream_experiment_events\{experiment="e1",outcome="[a-z_]+"\} (\S+)', text))
    assert total == dq["events"]
    # a count is exact however large (not rounded to 6 digits)
    m.set_data_quality({"experiment_id": "e1",
                        "data_quality": {**dq, "applied": 123_456_789}})
    assert 'outcome="applied"} 123456789' in m.render()
