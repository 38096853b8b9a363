"""Contracts: event/experiment validation, codec, JSON Schema files
(docs/architecture.md#contracts).

The JSON Schema files and the hand-written validator describe the same rules;
the differential tests below keep them from drifting apart.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import pickle
import re
import time
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.contracts import (
    DEAD_LETTER_MAX_ORIGINAL_BYTES,
    SCHEMA_NAMES,
    dead_letter_record,
    load_schema,
)
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from schemas.validate import (
    _ID_TABLE,  # the fast path's id check
    CODES,
    ID_PATTERN,
    MAX_EVENT_BYTES,
    MAX_ID_LENGTH,
    MAX_TS_MS,
    MIN_TS_MS,
    NAME_PATTERN,
    InvalidRecord,
    experiment_to_dict,
    is_valid_id,
    is_valid_name,
    parse_event,
    parse_event_row,
    parse_event_row_reference,
    parse_experiment,
)

NOW = 1_750_000_000_000  # 2025-06-15, fixed so tests do not depend on the clock
TS = NOW - 3_600_000

EXPOSURE: dict[str, Any] = {
    "type": "exposure",
    "event_id": "ev-1",
    "experiment_id": "exp-checkout",
    "unit_id": "user:42",
    "variant": "treatment",
    "ts": TS,
    "pre_activity": 12,
}
METRIC: dict[str, Any] = {
    "type": "metric",
    "event_id": "ev-2",
    "unit_id": "user:42",
    "metric": "revenue",
    "value": 12.5,
    "ts": TS,
    "experiment_id": "exp-checkout",
}


def enc(d: dict[str, Any]) -> bytes:
    return orjson.dumps(d)


def with_(base: dict[str, Any], **kw: Any) -> bytes:
    return enc({**base, **kw})


def without(base: dict[str, Any], key: str) -> bytes:
    return enc({k: v for k, v in base.items() if k != key})


def parse(raw: bytes) -> Exposure | Metric:
    return parse_event(raw, now_ms=NOW)


# --------------------------------------------------------------------------- good events


def test_exposure_parses_to_record() -> None:
    assert parse(enc(EXPOSURE)) == Exposure(
        "ev-1", "exp-checkout", "user:42", "treatment", TS, 12.0
    )


def test_metric_parses_to_record() -> None:
    r = parse(enc(METRIC))
    assert r == Metric("ev-2", "user:42", "revenue", 12.5, TS, "exp-checkout")
    assert type(r.value) is float


@pytest.mark.parametrize(
    "raw, expected",
    [
        (without(EXPOSURE, "pre_activity"), {"pre_activity": None}),
        (with_(EXPOSURE, pre_activity=None), {"pre_activity": None}),
        (with_(EXPOSURE, pre_activity=0), {"pre_activity": 0.0}),
        (with_(EXPOSURE, pre_activity=28), {"pre_activity": 28.0}),
        (with_(EXPOSURE, pre_activity=3.5), {"pre_activity": 3.5}),
        (with_(EXPOSURE, ts=float(TS)), {"ts": TS}),  # integral float, as JSON Schema
        (with_(EXPOSURE, extra={"nested": [1, None]}, source="web"), {}),  # extras ignored
        (with_(EXPOSURE, schema_version=1), {}),
        (with_(EXPOSURE, schema_version=None), {}),
        (with_(EXPOSURE, ts=NOW + 300_000), {"ts": NOW + 300_000}),  # at the limit (5 min)
        (with_(EXPOSURE, unit_id="a.b_c:d@e/f+g=h-i"), {"unit_id": "a.b_c:d@e/f+g=h-i"}),
        (with_(EXPOSURE, unit_id="x" * 128), {"unit_id": "x" * 128}),
        (with_(EXPOSURE, experiment_id="0exp_A.1-b"), {"experiment_id": "0exp_A.1-b"}),
        (enc(EXPOSURE), {"pre": None}),
        (with_(EXPOSURE, pre=None), {"pre": None}),
        (with_(EXPOSURE, pre={}), {"pre": None}),  # no entries: none
        (with_(EXPOSURE, pre={"revenue": 3, "clicks.7d": -1.5, "0x": 1e12, "n": -0.0}),
         {"pre": {"revenue": 3.0, "clicks.7d": -1.5, "0x": 1e12, "n": -0.0}}),
        (with_(EXPOSURE, pre={f"m{i}": i for i in range(64)}),  # at the limit
         {"pre": {f"m{i}": float(i) for i in range(64)}}),
    ],
)
def test_exposure_variants_accepted(raw: bytes, expected: dict[str, Any]) -> None:
    r = parse(raw)
    assert isinstance(r, Exposure)
    for k, v in expected.items():
        assert getattr(r, k) == v and type(getattr(r, k)) is type(v)
    if r.pre is not None:  # pre values are floats, whatever the JSON number
        assert all(type(x) is float for x in r.pre.values())


@pytest.mark.parametrize(
    "raw, expected",
    [
        (without(METRIC, "experiment_id"), {"experiment_id": None}),
        (with_(METRIC, experiment_id=None), {"experiment_id": None}),
        (with_(METRIC, value=3), {"value": 3.0}),
        (with_(METRIC, value=-1e12), {"value": -1e12}),
        (with_(METRIC, value=1e12), {"value": 1e12}),
        (with_(METRIC, value=0), {"value": 0.0}),
        (with_(METRIC, variant=5, pre_activity="x"), {}),  # exposure fields are extras here
    ],
)
def test_metric_variants_accepted(raw: bytes, expected: dict[str, Any]) -> None:
    r = parse(raw)
    assert isinstance(r, Metric)
    for k, v in expected.items():
        assert getattr(r, k) == v and type(getattr(r, k)) is type(v)


def test_bytes_like_inputs_accepted() -> None:
    raw = enc(EXPOSURE)
    expected = parse(raw)
    assert parse_event(bytearray(raw), now_ms=NOW) == expected
    assert parse_event(memoryview(raw), now_ms=NOW) == expected
    assert parse_event(raw.decode(), now_ms=NOW) == expected


def test_default_clock_is_wall_clock() -> None:
    now = int(time.time() * 1000)
    assert parse_event(with_(EXPOSURE, ts=now)).ts == now
    with pytest.raises(InvalidRecord) as ei:
        parse_event(with_(EXPOSURE, ts=now + 3 * 86_400_000))
    assert ei.value.code == "ts_in_future"
    assert parse_event(with_(EXPOSURE, ts=now + 3 * 86_400_000), max_future_ms=4 * 86_400_000)


def test_records_round_trip_through_codec() -> None:
    for r in (parse(enc(EXPOSURE)), parse(without(METRIC, "experiment_id"))):
        assert parse(codec.dumps(r)) == r


# --------------------------------------------------------------------------- bad events

_NAN_RAW = enc(METRIC).replace(b'"value":12.5', b'"value":NaN')
_INF_RAW = enc(METRIC).replace(b'"value":12.5', b'"value":1e400')
assert _NAN_RAW != enc(METRIC) and _INF_RAW != enc(METRIC)

# (case id, raw bytes, expected code, expected field)
BAD_EVENTS: list[tuple[str, bytes, str, str | None]] = [
    ("garbage", b"not json", "not_json", None),
    ("truncated", enc(EXPOSURE)[:-1], "not_json", None),
    ("empty", b"", "not_json", None),
    ("invalid utf-8", b'{"type":"metric","unit_id":"\xff"}', "not_json", None),
    ("lone surrogate", b'{"unit_id":"\\ud800"}', "not_json", None),
    ("array", b"[1, 2]", "not_object", None),
    ("string", b'"exposure"', "not_object", None),
    ("null", b"null", "not_object", None),
    ("unknown type", with_(EXPOSURE, type="click"), "unknown_type", "type"),
    ("type case", with_(EXPOSURE, type="Exposure"), "unknown_type", "type"),
    ("type missing", without(EXPOSURE, "type"), "missing_field", "type"),
    ("event_id missing", without(EXPOSURE, "event_id"), "missing_field", "event_id"),
    ("unit_id missing", without(METRIC, "unit_id"), "missing_field", "unit_id"),
    ("variant missing", without(EXPOSURE, "variant"), "missing_field", "variant"),
    ("experiment_id missing", without(EXPOSURE, "experiment_id"), "missing_field",
     "experiment_id"),
    ("metric missing", without(METRIC, "metric"), "missing_field", "metric"),
    ("value missing", without(METRIC, "value"), "missing_field", "value"),
    ("ts missing", without(METRIC, "ts"), "missing_field", "ts"),
    ("type not string", with_(EXPOSURE, type=1), "bad_type", "type"),
    ("unit_id int", with_(EXPOSURE, unit_id=42), "bad_type", "unit_id"),
    ("variant null", with_(EXPOSURE, variant=None), "bad_type", "variant"),
    ("experiment_id list", with_(METRIC, experiment_id=["e"]), "bad_type", "experiment_id"),
    ("ts string", with_(EXPOSURE, ts=str(TS)), "bad_type", "ts"),
    ("ts fractional", with_(EXPOSURE, ts=TS + 0.5), "bad_type", "ts"),
    ("ts bool", with_(EXPOSURE, ts=True), "bad_type", "ts"),
    ("value string", with_(METRIC, value="1.5"), "bad_type", "value"),
    ("value bool", with_(METRIC, value=True), "bad_type", "value"),
    ("value null", with_(METRIC, value=None), "bad_type", "value"),
    ("pre_activity bool", with_(EXPOSURE, pre_activity=False), "bad_type", "pre_activity"),
    ("pre_activity string", with_(EXPOSURE, pre_activity="3"), "bad_type", "pre_activity"),
    ("schema_version string", with_(EXPOSURE, schema_version="1"), "bad_type",
     "schema_version"),
    ("value NaN literal", _NAN_RAW, "not_finite", "value"),
    ("value overflows to inf", _INF_RAW, "not_finite", "value"),
    ("value too big", with_(METRIC, value=1e12 + 1), "out_of_range", "value"),
    ("value too negative", with_(METRIC, value=-2 * 10**12), "out_of_range", "value"),
    ("pre_activity > 28", with_(EXPOSURE, pre_activity=28.5), "out_of_range", "pre_activity"),
    ("pre_activity < 0", with_(EXPOSURE, pre_activity=-1), "out_of_range", "pre_activity"),
    ("ts in seconds", with_(EXPOSURE, ts=NOW // 1000), "out_of_range", "ts"),
    ("ts before 2000", with_(EXPOSURE, ts=MIN_TS_MS - 1), "out_of_range", "ts"),
    ("ts negative", with_(EXPOSURE, ts=-1), "out_of_range", "ts"),
    ("ts beyond 2^53", with_(EXPOSURE, ts=MAX_TS_MS + 1), "out_of_range", "ts"),
    ("too large", with_(EXPOSURE, pad="x" * MAX_EVENT_BYTES), "too_large", None),
    ("id with space", with_(EXPOSURE, unit_id="user 42"), "bad_id", "unit_id"),
    ("id with brace", with_(EXPOSURE, unit_id="{e:x}"), "bad_id", "unit_id"),
    ("id with pipe", with_(EXPOSURE, event_id="a|b"), "bad_id", "event_id"),
    ("id with newline", with_(EXPOSURE, event_id="ab\n"), "bad_id", "event_id"),
    ("id with NUL", with_(EXPOSURE, event_id="a\x00"), "bad_id", "event_id"),
    ("id with tab", with_(EXPOSURE, unit_id="a\tb"), "bad_id", "unit_id"),
    ("id non-ascii", with_(EXPOSURE, unit_id="usér"), "bad_id", "unit_id"),
    ("id glob", with_(EXPOSURE, unit_id="user*"), "bad_id", "unit_id"),
    ("id empty", with_(EXPOSURE, event_id=""), "bad_id", "event_id"),
    ("id 129 chars", with_(EXPOSURE, event_id="e" * 129), "bad_id", "event_id"),
    ("variant with colon", with_(EXPOSURE, variant="t:1"), "bad_id", "variant"),
    ("metric with colon", with_(METRIC, metric="rev:usd"), "bad_id", "metric"),
    ("experiment with slash", with_(EXPOSURE, experiment_id="team/exp"), "bad_id",
     "experiment_id"),
    ("experiment leading dash", with_(EXPOSURE, experiment_id="-x"), "bad_id",
     "experiment_id"),
    ("experiment dot-dot", with_(METRIC, experiment_id=".."), "bad_id", "experiment_id"),
    ("experiment with brace", with_(EXPOSURE, experiment_id="a}b"), "bad_id",
     "experiment_id"),
    ("ts two days ahead", with_(EXPOSURE, ts=NOW + 2 * 86_400_000), "ts_in_future", "ts"),
    ("ts in microseconds", with_(EXPOSURE, ts=NOW * 1000), "ts_in_future", "ts"),
    ("schema_version 2", with_(METRIC, schema_version=2), "unsupported_version",
     "schema_version"),
    # pre: the exposure's pre-experiment values (CUPED), metric name -> number
    ("pre array", with_(EXPOSURE, pre=[1.0]), "bad_type", "pre"),
    ("pre string", with_(EXPOSURE, pre="revenue=1"), "bad_type", "pre"),
    ("pre number", with_(EXPOSURE, pre=3), "bad_type", "pre"),
    ("pre value string", with_(EXPOSURE, pre={"revenue": "1.5"}), "bad_type", "pre"),
    ("pre value bool", with_(EXPOSURE, pre={"revenue": True}), "bad_type", "pre"),
    ("pre value null", with_(EXPOSURE, pre={"revenue": None}), "bad_type", "pre"),
    ("pre value object", with_(EXPOSURE, pre={"revenue": {"v": 1}}), "bad_type", "pre"),
    ("pre value NaN literal", enc({**EXPOSURE, "pre": {"revenue": 1}}).replace(
        b'"revenue":1', b'"revenue":NaN'), "not_finite", "pre"),
    ("pre value overflows to inf", enc({**EXPOSURE, "pre": {"revenue": 1}}).replace(
        b'"revenue":1', b'"revenue":-1e999'), "not_finite", "pre"),
    ("pre value too big", with_(EXPOSURE, pre={"revenue": 1e12 + 1}), "out_of_range", "pre"),
    ("pre too many keys", with_(EXPOSURE, pre={f"m{i}": 1 for i in range(65)}),
     "out_of_range", "pre"),
    ("pre key with colon", with_(EXPOSURE, pre={"rev:usd": 1}), "bad_id", "pre"),
    ("pre key empty", with_(EXPOSURE, pre={"": 1}), "bad_id", "pre"),
    ("pre key leading dot", with_(EXPOSURE, pre={"ok": 1, ".x": 2}), "bad_id", "pre"),
    ("pre key 129 chars", with_(EXPOSURE, pre={"k" * 129: 1}), "bad_id", "pre"),
]


@pytest.mark.parametrize("raw, code, field", [c[1:] for c in BAD_EVENTS],
                         ids=[c[0] for c in BAD_EVENTS])
def test_bad_event_reason(raw: bytes, code: str, field: str | None) -> None:
    with pytest.raises(InvalidRecord) as ei:
        parse(raw)
    err = ei.value
    assert (err.code, err.field) == (code, field), err.message
    assert err.code in CODES
    assert err.message and len(err.message) < 400
    assert str(err).startswith(code + ": ")


def test_every_event_code_has_a_case() -> None:
    assert {c[2] for c in BAD_EVENTS} == CODES - {"bad_config"}


def test_pre_messages_name_the_entry() -> None:
    """A bad ``pre`` is dead-lettered with field ``pre`` and a message that
    says which entry is wrong, for both validators."""
    for raw, words in [(with_(EXPOSURE, pre={"revenue": "1"}), ["pre.revenue", "number"]),
                       (with_(EXPOSURE, pre={"a b": 1}), ["'a b'", "metric names"]),
                       (with_(EXPOSURE, pre={f"m{i}": 1 for i in range(65)}),
                        ["65 entries", "max 64"]),
                       (with_(EXPOSURE, pre={"revenue": -2e12}), ["pre.revenue", "1e+12"])]:
        for fn in (parse_event_row, parse_event_row_reference):
            with pytest.raises(InvalidRecord) as ei:
                fn(raw, 0, now_ms=NOW)
            assert ei.value.field == "pre" and all(w in ei.value.message for w in words), \
                ei.value.message


def test_pre_is_ignored_on_metrics() -> None:
    """``pre`` belongs to exposures; on a metric it is an unknown field."""
    r = parse(with_(METRIC, pre={"revenue": "not even a number"}))
    assert isinstance(r, Metric)
    assert parse_event_row(with_(METRIC, pre={"a": 1}), 0, now_ms=NOW)[8] is None


def test_hints_for_unit_mistakes() -> None:
    with pytest.raises(InvalidRecord, match="seconds"):
        parse(with_(EXPOSURE, ts=NOW // 1000))
    with pytest.raises(InvalidRecord, match="microseconds"):
        parse(with_(EXPOSURE, ts=NOW * 1000))
    with pytest.raises(InvalidRecord, match="allow_nan"):
        parse(_NAN_RAW)


def test_tombstone_and_wrong_argument_type() -> None:
    with pytest.raises(InvalidRecord) as ei:
        parse_event(None)  # type: ignore[arg-type]
    assert ei.value.code == "not_json"
    with pytest.raises(TypeError):
        parse_event(42)  # type: ignore[arg-type]


def test_invalid_record_pickles_and_dicts() -> None:
    err = InvalidRecord("bad_id", "field 'unit_id' is empty", "unit_id")
    back = pickle.loads(pickle.dumps(err))
    assert (back.code, back.message, back.field) == (err.code, err.message, err.field)
    assert err.as_dict() == {"code": "bad_id", "message": err.message, "field": "unit_id"}
    assert InvalidRecord("not_json", "x").as_dict() == {"code": "not_json", "message": "x"}


def test_long_bad_values_are_not_echoed_in_full() -> None:
    with pytest.raises(InvalidRecord) as ei:
        parse(with_(EXPOSURE, unit_id="é" * 100))
    assert len(ei.value.message) < 200


def test_id_and_name_rules() -> None:
    for ok in ["a", "A9", "user:42", "a@b.c", "x/y+z=", "-", "." * 3]:
        assert is_valid_id(ok), ok
    for bad in ["", "a b", "{a}", "a|b", "a\n", "\x7f", "ü", "a*", "a?", "[a]", 1, None]:
        assert not is_valid_id(bad), bad
    for ok in ["control", "v2", "rev.usd", "exp_1-b", "9"]:
        assert is_valid_name(ok), ok
    for bad in ["", "a:b", "a/b", "-a", ".", "..", "_a", "a b", "a@b", "n" * 129]:
        assert not is_valid_name(bad), bad


# --------------------------------------------------------------------------- fuzzing

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
_json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _json_scalar,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(_text, c, max_size=4),
    max_leaves=12,
)


def _only_invalid_record(raw: bytes) -> None:
    try:
        r = parse_event(raw, now_ms=NOW)
    except InvalidRecord as e:
        assert e.code in CODES
    else:
        assert isinstance(r, Exposure | Metric)


@_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_invalid_record(raw: bytes) -> None:
    _only_invalid_record(raw)


@_SETTINGS
@given(_json)
def test_random_json_only_raises_invalid_record(value: Any) -> None:
    _only_invalid_record(orjson.dumps(value))


@_SETTINGS
@given(st.dictionaries(st.sampled_from(sorted({*EXPOSURE, *METRIC, "schema_version"})),
                       _json, max_size=8))
def test_random_event_shaped_json_only_raises_invalid_record(d: dict[str, Any]) -> None:
    _only_invalid_record(orjson.dumps({**EXPOSURE, **d}))
    _only_invalid_record(orjson.dumps({**METRIC, **d}))


def test_pathological_inputs() -> None:
    for raw in [b"[" * 100_000, b'{"a":' * 5000, b"NaN" * 100, b"\x00", b"\xef\xbb\xbf{}",
                b'{"type":"metric","value":-Infinity}', b"1e400"]:
        _only_invalid_record(raw)


# --------------------------------------------------------------------------- experiments

FULL_CONFIG: dict[str, Any] = {
    "schema_version": 1,
    "experiment_id": "exp-checkout",
    "variants": ["control", "treatment_a", "treatment_b"],
    "control": "control",
    "metrics": [
        {"name": "revenue", "direction": "increase", "guardrail_threshold": None,
         "kind": "sum", "threshold": 0.0, "numerator": None, "denominator": None,
         "cap": {"upper": 500.0, "lower": 0.0}},
        {"name": "latency_ms", "direction": "decrease", "guardrail_threshold": 25.0,
         "kind": "sum", "threshold": 0.0, "numerator": None, "denominator": None, "cap": None},
        {"name": "purchases", "direction": "increase", "guardrail_threshold": None,
         "kind": "conversion", "threshold": 0.5, "numerator": None, "denominator": None,
         "cap": None},
        {"name": "revenue_per_session", "direction": "increase", "guardrail_threshold": None,
         "kind": "ratio", "threshold": 0.0, "numerator": "revenue", "denominator": "sessions",
         "cap": {"upper": 1000.0, "lower": None}},
    ],
    "strata_edges": [0, 1, 8, 29],
    "bucket_seconds": 3600,
    "window_seconds": 86_400,
    "lateness_seconds": 0,
    "dedupe_seconds": 86_400,
    "correction_seconds": 7200,
    "hold_seconds": 600,
    "hold_max": 8,
    "partition_skew_seconds": 7200,  # obsolete: accepted, ignored
    "started_at": NOW - 86_400_000,
    "end_at": NOW + 86_400_000,
    "target_shares": [0.5, 0.3, 0.2],
    "allocation": [0.5, 0.25, 0.25],
    "alert_thresholds": {"srm_p_value": 0.001, "rhat_max": 1.05},
    "status": "running",
    "prior_sd_logit_p": 0.5,
    "prior": "platform",
    "covariates": "off",
    "exposure_age_bins": [0, 3600, 21600],
    "primary": "latency_ms",
    "mde": None,
    "mde_relative": 0.02,
    "decision_alpha": 0.1,
    "look_seconds": 1800,
}


def test_minimal_config_takes_defaults() -> None:
    assert parse_experiment({"experiment_id": "e1"}) == ExperimentConfig("e1")
    assert parse_experiment(b'{"experiment_id":"e1","variants":null}') == ExperimentConfig("e1")
    assert ExperimentConfig("e1").covariates == "auto"
    assert parse_experiment({"experiment_id": "e1", "covariates": None}).covariates == "auto"
    assert parse_experiment({"experiment_id": "e1", "covariates": "off"}).covariates == "off"
    assert ExperimentConfig("e1").exposure_age_bins is None
    assert parse_experiment({"experiment_id": "e1", "exposure_age_bins": None}) == \
        ExperimentConfig("e1")
    assert parse_experiment({"experiment_id": "e1", "exposure_age_bins": [0]}) \
        .exposure_age_bins == (0,)
    assert parse_experiment({"experiment_id": "e1", "exposure_age_bins": [0, 60.0, 86_400]}) \
        .exposure_age_bins == (0, 60, 86_400)


def test_full_config_parses() -> None:
    cfg = parse_experiment(enc(FULL_CONFIG))
    assert cfg.variants == ("control", "treatment_a", "treatment_b")
    assert cfg.metrics[1] == MetricSpec("latency_ms", "decrease", 25.0)
    assert cfg.n_strata == 3 and cfg.target_shares == (0.5, 0.3, 0.2)
    assert cfg.lateness_seconds == 0 and cfg.alert_thresholds["rhat_max"] == 1.05
    assert (cfg.correction_seconds, cfg.hold_seconds, cfg.hold_max) == (7200, 600, 8)
    obsolete = {"partition_skew_seconds"}  # accepted on input, not written back
    assert experiment_to_dict(cfg) == {k: v for k, v in FULL_CONFIG.items() if k not in obsolete}


def test_decision_fields_issue27() -> None:
    """primary must name a metric; mde or mde_relative (positive, not both);
    decision_alpha in (0, 0.5]; look_seconds >= 60."""
    cfg = parse_experiment({"experiment_id": "e"})
    assert (cfg.primary_metric, cfg.mde, cfg.decision_alpha, cfg.look_seconds) == \
        ("value", None, 0.05, 3600)
    for bad in ({"primary": "nope"}, {"mde": 0}, {"mde_relative": -0.1},
                {"mde": 0.1, "mde_relative": 0.02}, {"decision_alpha": 0.7},
                {"look_seconds": 10}):
        with pytest.raises(InvalidRecord):
            parse_experiment({"experiment_id": "e", **bad})


def test_event_time_bounds_default_and_zero() -> None:
    cfg = parse_experiment({"experiment_id": "e"})
    assert (cfg.correction_seconds, cfg.hold_seconds, cfg.hold_max) == (7 * 86_400, 86_400, 64)
    cfg = parse_experiment({"experiment_id": "e", "correction_seconds": None, "hold_max": None})
    assert (cfg.correction_seconds, cfg.hold_max) == (7 * 86_400, 64)
    cfg = parse_experiment({"experiment_id": "e", "correction_seconds": 0, "hold_seconds": 0,
                            "hold_max": 0, "partition_skew_seconds": 0})
    assert (cfg.correction_seconds, cfg.hold_seconds, cfg.hold_max) == (0, 0, 0)
    assert parse_experiment(experiment_to_dict(cfg)) == cfg


def test_metric_shorthand_and_config_object() -> None:
    cfg = parse_experiment({"experiment_id": "e", "metrics": ["clicks", {"name": "rev"}]})
    assert cfg.metrics == (MetricSpec("clicks"), MetricSpec("rev"))
    assert parse_experiment(cfg) == cfg
    with pytest.raises(InvalidRecord) as ei:
        parse_experiment(dataclasses.replace(cfg, control="nope"))
    assert ei.value.code == "bad_config"


_names = st.from_regex(NAME_PATTERN, fullmatch=True)


_bounds = st.none() | st.floats(-1e6, 1e6, allow_nan=False)


@st.composite
def metric_kinds(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A metric's kind fields (issue 26): sum (maybe capped, one side or
    both), conversion (a threshold), ratio (numerator, denominator, maybe a
    capped numerator)."""
    kind = draw(st.sampled_from(["sum", "conversion", "ratio"]))
    kw: dict[str, Any] = {"kind": kind}
    if kind == "conversion":
        kw["threshold"] = draw(st.floats(-1e3, 1e3, allow_nan=False))
        return kw
    if kind == "ratio":
        num, den = draw(st.lists(_names, min_size=2, max_size=2, unique=True))
        kw.update(numerator=num, denominator=den)
    lo, hi = draw(_bounds), draw(_bounds)
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    kw.update(cap_lower=lo, cap_upper=hi)
    return kw


@st.composite
def configs(draw: st.DrawFn) -> ExperimentConfig:
    variants = tuple(draw(st.lists(_names, min_size=2, max_size=5, unique=True)))
    metric_names = draw(st.lists(_names, min_size=1, max_size=4, unique=True))
    metrics = tuple(
        MetricSpec(
            n,
            draw(st.sampled_from(["increase", "decrease"])),
            draw(st.none() | st.floats(-1e6, 1e6, allow_nan=False)),
            **draw(metric_kinds(n)),
        )
        for n in metric_names
    )
    events = {e for m in metrics for e in m.event_names}
    assume(not any(m.kind == "ratio" and m.name in events for m in metrics))
    inner = sorted(draw(st.sets(st.floats(0.01, 28.0, allow_nan=False), max_size=8)))
    edges = (0, *inner, draw(st.sampled_from([29, 28.5, 100.0])))
    n_strata = len(edges) - 1

    def shares(n: int, positive: bool) -> tuple[float, ...] | None:
        w = draw(st.none() | st.lists(st.integers(1 if positive else 0, 100), min_size=n,
                                      max_size=n))
        if w is None or sum(w) == 0:
            return None
        return tuple(x / sum(w) for x in w)

    return ExperimentConfig(
        experiment_id=draw(_names),
        variants=variants,
        control=draw(st.sampled_from(variants)),
        metrics=metrics,
        strata_edges=edges,
        bucket_seconds=draw(st.integers(1, 31_622_400)),
        window_seconds=draw(st.integers(1, 31_622_400)),
        lateness_seconds=draw(st.integers(0, 3600)),
        dedupe_seconds=draw(st.integers(0, 86_400 * 7)),
        correction_seconds=draw(st.integers(0, 86_400 * 7)),
        hold_seconds=draw(st.integers(0, 86_400)),
        hold_max=draw(st.integers(0, 4096)),
        started_at=draw(st.none() | st.integers(MIN_TS_MS, MAX_TS_MS)),
        target_shares=shares(n_strata, False),
        prior=draw(st.sampled_from(["flat", "platform"])),
        covariates=draw(st.sampled_from(["auto", "off"])),
        exposure_age_bins=draw(st.none() | st.lists(
            st.integers(1, 31_622_400), max_size=7, unique=True).map(
                lambda xs: (0, *sorted(xs)))),
        allocation=shares(len(variants), True),
        alert_thresholds=draw(st.dictionaries(_names, st.floats(-1e9, 1e9), max_size=3)),
        status=draw(st.sampled_from(["running", "stopped"])),
        prior_sd_logit_p=draw(st.floats(0.01, 10.0)),
    )


@_SETTINGS
@given(configs())
def test_experiment_round_trip(cfg: ExperimentConfig) -> None:
    d = experiment_to_dict(cfg)
    assert parse_experiment(d) == cfg
    assert parse_experiment(codec.dumps(d)) == cfg
    # the dataclass encoded directly (no schema_version) is a valid config too
    assert parse_experiment(codec.dumps(cfg)) == cfg


def cfg_with(**kw: Any) -> dict[str, Any]:
    d = {**FULL_CONFIG, **kw}
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()

# (case id, input, expected field, JSON Schema can tell)
BAD_CONFIGS: list[tuple[str, Any, str | None, bool]] = [
    ("no id", cfg_with(experiment_id=_DROP), "experiment_id", True),
    ("bad id", cfg_with(experiment_id="a b"), "experiment_id", True),
    ("id not string", cfg_with(experiment_id=7), "experiment_id", True),
    ("one variant", cfg_with(variants=["control"], allocation=None), "variants", True),
    ("duplicate variants", cfg_with(variants=["control", "t", "t"]), "variants", True),
    ("variant name", cfg_with(variants=["control", "t:1", "t2"]), "variants[1]", True),
    ("variants not array", cfg_with(variants="control,t"), "variants", True),
    ("control not a variant", cfg_with(control="baseline"), "control", False),
    ("default control absent", {"experiment_id": "e", "variants": ["a", "b"]}, "control",
     False),
    ("no metrics", cfg_with(metrics=[]), "metrics", True),
    ("duplicate metrics", cfg_with(metrics=["a", {"name": "a"}]), "metrics", False),
    ("metric without name", cfg_with(metrics=[{"direction": "increase"}]), "metrics[0]", True),
    ("metric direction", cfg_with(metrics=[{"name": "a", "direction": "up"}]),
     "metrics[0].direction", True),
    ("metric threshold type", cfg_with(metrics=[{"name": "a", "guardrail_threshold": "1"}]),
     "metrics[0].guardrail_threshold", True),
    ("metric not object", cfg_with(metrics=[3]), "metrics[0]", True),
    # metric kinds (issue 26)
    ("metric kind", cfg_with(metrics=[{"name": "a", "kind": "mean"}]), "metrics[0].kind", True),
    ("ratio without denominator", cfg_with(metrics=[{"name": "r", "kind": "ratio",
                                                     "numerator": "a"}]),
     "metrics[0].denominator", True),
    ("ratio without numerator", cfg_with(metrics=[{"name": "r", "kind": "ratio",
                                                   "denominator": "a"}]),
     "metrics[0].numerator", True),
    ("numerator on a sum", cfg_with(metrics=[{"name": "a", "numerator": "b"}]),
     "metrics[0].numerator", True),
    ("denominator on a conversion", cfg_with(metrics=[{"name": "a", "kind": "conversion",
                                                       "denominator": "b"}]),
     "metrics[0].denominator", True),
    ("threshold on a sum", cfg_with(metrics=[{"name": "a", "threshold": 1}]),
     "metrics[0].threshold", True),
    ("cap on a conversion", cfg_with(metrics=[{"name": "a", "kind": "conversion",
                                               "cap": {"upper": 1}}]), "metrics[0].cap", True),
    ("cap not object", cfg_with(metrics=[{"name": "a", "cap": 5}]), "metrics[0].cap", True),
    ("cap bound string", cfg_with(metrics=[{"name": "a", "cap": {"upper": "5"}}]),
     "metrics[0].cap.upper", True),
    ("cap lower above upper", cfg_with(metrics=[{"name": "a", "cap": {"upper": 1, "lower": 2}}]),
     "metrics[0].cap", False),
    ("numerator is denominator", cfg_with(metrics=[{"name": "r", "kind": "ratio",
                                                    "numerator": "a", "denominator": "a"}]),
     "metrics[0].denominator", False),
    ("ratio named like an event metric",
     cfg_with(metrics=["sessions", {"name": "r", "kind": "ratio", "numerator": "rev",
                                    "denominator": "sessions"},
                       {"name": "rev", "kind": "ratio", "numerator": "a", "denominator": "b"}]),
     "metrics[2].name", False),
    ("ratio named like its own numerator",
     cfg_with(metrics=[{"name": "r", "kind": "ratio", "numerator": "r", "denominator": "b"}]),
     "metrics[0].name", False),
    ("edges not from 0", cfg_with(strata_edges=[1, 8, 29]), "strata_edges", True),
    ("edges not increasing", cfg_with(strata_edges=[0, 8, 8, 29]), "strata_edges", False),
    ("edges decreasing", cfg_with(strata_edges=[0, 8, 4, 29]), "strata_edges", False),
    ("edges exclude 28", cfg_with(strata_edges=[0, 8, 28], target_shares=None),
     "strata_edges", False),
    ("single edge", cfg_with(strata_edges=[0], target_shares=None), "strata_edges", True),
    ("edge bool", cfg_with(strata_edges=[0, True, 29], target_shares=None),
     "strata_edges[1]", True),
    ("edge NaN", cfg_with(strata_edges=[0, float("nan"), 29], target_shares=None),
     "strata_edges[1]", None),
    ("bucket zero", cfg_with(bucket_seconds=0), "bucket_seconds", True),
    ("bucket fractional", cfg_with(bucket_seconds=1.5), "bucket_seconds", True),
    ("bucket string", cfg_with(bucket_seconds="3600"), "bucket_seconds", True),
    ("window negative", cfg_with(window_seconds=-5), "window_seconds", True),
    ("window absurd", cfg_with(window_seconds=10**9), "window_seconds", True),
    ("lateness negative", cfg_with(lateness_seconds=-1), "lateness_seconds", True),
    ("dedupe bool", cfg_with(dedupe_seconds=True), "dedupe_seconds", True),
    ("correction negative", cfg_with(correction_seconds=-1), "correction_seconds", True),
    ("correction fractional", cfg_with(correction_seconds=0.5), "correction_seconds", True),
    ("correction absurd", cfg_with(correction_seconds=10**9), "correction_seconds", True),
    ("hold absurd", cfg_with(hold_seconds=10**9), "hold_seconds", True),
    ("hold_max absurd", cfg_with(hold_max=10**6), "hold_max", True),
    ("started_at seconds", cfg_with(started_at=NOW // 1000), "started_at", True),
    ("shares wrong length", cfg_with(target_shares=[0.5, 0.5]), "target_shares", False),
    ("shares negative", cfg_with(target_shares=[1.2, -0.2, 0.0]), "target_shares", True),
    ("shares sum", cfg_with(target_shares=[0.5, 0.3, 0.1]), "target_shares", False),
    ("shares inf", cfg_with(target_shares=[math.inf, 0, 0]), "target_shares[0]", None),
    ("allocation zero", cfg_with(allocation=[1.0, 0.0, 0.0]), "allocation", True),
    ("allocation length", cfg_with(allocation=[0.5, 0.5]), "allocation", False),
    ("allocation sum", cfg_with(allocation=[0.5, 0.5, 0.5]), "allocation", False),
    ("thresholds not object", cfg_with(alert_thresholds=[1]), "alert_thresholds", True),
    ("threshold not number", cfg_with(alert_thresholds={"x": "1"}), "alert_thresholds.x",
     True),
    ("threshold key", cfg_with(alert_thresholds={"a b": 1}), "alert_thresholds", True),
    ("status", cfg_with(status="paused"), "status", True),
    ("prior sd zero", cfg_with(prior_sd_logit_p=0), "prior_sd_logit_p", True),
    ("prior sd huge", cfg_with(prior_sd_logit_p=100), "prior_sd_logit_p", True),
    ("prior unknown", cfg_with(prior="hierarchical"), "prior", True),
    ("covariates unknown", cfg_with(covariates="on"), "covariates", True),
    ("covariates bool", cfg_with(covariates=True), "covariates", True),
    ("age bins not array", cfg_with(exposure_age_bins=86_400), "exposure_age_bins", True),
    ("age bins empty", cfg_with(exposure_age_bins=[]), "exposure_age_bins", True),
    ("age bins too many", cfg_with(exposure_age_bins=list(range(0, 90, 10))),
     "exposure_age_bins", True),
    ("age bins not from 0", cfg_with(exposure_age_bins=[60, 3600]), "exposure_age_bins", True),
    ("age bins duplicate", cfg_with(exposure_age_bins=[0, 60, 60]), "exposure_age_bins", True),
    ("age bins descending", cfg_with(exposure_age_bins=[0, 3600, 60]), "exposure_age_bins",
     False),
    ("age bin negative", cfg_with(exposure_age_bins=[0, -60]), "exposure_age_bins[1]", True),
    ("age bin fractional", cfg_with(exposure_age_bins=[0, 1.5]), "exposure_age_bins[1]", True),
    ("age bin string", cfg_with(exposure_age_bins=[0, "60"]), "exposure_age_bins[1]", True),
    ("age bin bool", cfg_with(exposure_age_bins=[0, True]), "exposure_age_bins[1]", True),
    ("age bin absurd", cfg_with(exposure_age_bins=[0, 10**9]), "exposure_age_bins[1]", True),
]


@pytest.mark.parametrize("cfg, field, _schema", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_reason(cfg: dict[str, Any], field: str, _schema: bool | None) -> None:
    with pytest.raises(InvalidRecord) as ei:
        parse_experiment(cfg)
    assert (ei.value.code, ei.value.field) == ("bad_config", field), ei.value.message


def test_config_decoding_errors() -> None:
    for raw, code in [
        (b"{", "not_json"),
        (b"[]", "not_object"),
        (b'{"experiment_id":"e","pad":"' + b"x" * 300_000 + b'"}', "too_large"),
        (enc({"experiment_id": "e", "schema_version": 2}), "unsupported_version"),
        (b'{"experiment_id":"e","prior_sd_logit_p":NaN}', "not_finite"),
    ]:
        with pytest.raises(InvalidRecord) as ei:
            parse_experiment(raw)
        assert ei.value.code == code


def test_unknown_config_fields_ignored() -> None:
    assert parse_experiment(cfg_with(owner="team-growth")) == parse_experiment(FULL_CONFIG)


@_SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(FULL_CONFIG)), _json, max_size=6))
def test_random_configs_only_raise_invalid_record(d: dict[str, Any]) -> None:
    for raw in (orjson.dumps({**FULL_CONFIG, **d}), orjson.dumps(d)):
        try:
            parse_experiment(raw)
        except InvalidRecord:
            pass


# --------------------------------------------------------------------------- codec


def test_codec_types() -> None:
    np = pytest.importorskip("numpy")
    obj = {
        "rec": MetricSpec("m"),
        "tup": (1, 2),
        "set": {3, 1, 2},
        "np_float": np.float64(1.5),
        "np_int": np.int64(7),
        "arr": np.arange(3, dtype=np.float32),
        "arr_obj": np.array([1, "a"], dtype=object),
        "nan": math.nan,
    }
    assert codec.loads(codec.dumps(obj)) == {
        "rec": {"name": "m", "direction": "increase", "guardrail_threshold": None,
                "kind": "sum", "threshold": 0.0, "numerator": None, "denominator": None,
                "cap_lower": None, "cap_upper": None},
        "tup": [1, 2],
        "set": [1, 2, 3],
        "np_float": 1.5,
        "np_int": 7,
        "arr": [0.0, 1.0, 2.0],
        "arr_obj": [1, "a"],
        "nan": None,
    }


def test_codec_sort_keys_and_errors() -> None:
    assert codec.dumps({"b": 1, "a": 2}, sort_keys=True) == b'{"a":2,"b":1}'
    with pytest.raises(codec.EncodeError):
        codec.dumps(object())
    with pytest.raises(codec.DecodeError):
        codec.loads(b"NaN")
    with pytest.raises(ValueError):
        codec.loads(b"{")


# --------------------------------------------------------------------------- JSON Schema files

try:  # test-only dependency (the dev extra); schemas itself never imports it
    import jsonschema
except ImportError:  # pragma: no cover
    jsonschema = None

needs_jsonschema = pytest.mark.skipif(jsonschema is None, reason="jsonschema not installed")


@functools.cache
def validator(name: str) -> Any:
    return jsonschema.Draft202012Validator(load_schema(name))


@needs_jsonschema
@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_files_are_valid_2020_12(name: str) -> None:
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "schema_version" in schema["properties"]
    assert "ersion" in schema["description"]  # says how versions work
    assert load_schema(f"{name}.schema.json") == schema
    with pytest.raises(KeyError):
        load_schema("nope")


@needs_jsonschema
def test_schema_patterns_match_python() -> None:
    event = load_schema("event")["$defs"]
    assert event["id"]["pattern"].startswith("^" + ID_PATTERN.split("{")[0])
    assert event["name"]["pattern"].startswith("^" + NAME_PATTERN.split("{")[0])
    for name in ("experiment", "estimate", "alert"):
        assert load_schema(name)["$defs"]["name"] == {
            **event["name"], "$comment": load_schema(name)["$defs"]["name"]["$comment"]
        }


# Shape-level codes: what the JSON Schema must also reject. Not shape: too_large
# (bytes), not_json (never reaches a schema), ts_in_future (depends on the clock).
_SHAPE_CODES = CODES - {"too_large", "not_json", "ts_in_future", "bad_config"}

_ids = (
    st.from_regex(ID_PATTERN, fullmatch=True)
    | _text
    | st.sampled_from(["", "a b", "x\n", "{e}", "a|b", "a:b", "-x", ".", "é", "a" * 128,
                       "a" * 129, "ok", "user:1", "v/1", "A"])
)
_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_ts = (
    st.sampled_from([MIN_TS_MS - 1, MIN_TS_MS, MAX_TS_MS, MAX_TS_MS + 1, TS, NOW // 1000])
    | st.integers(MIN_TS_MS - 10, MIN_TS_MS + 10)
    | st.integers(MAX_TS_MS - 10, MAX_TS_MS + 10)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([float(TS), TS + 0.5, 1e300])
    | _ints
)
_numbers = (
    st.floats(allow_nan=False, allow_infinity=False)
    | _ints
    | st.sampled_from([1e12, -1e12, 10**12 + 1, 1e12 * (1 + 1e-15), 0, -0.0, 28, 28.000001,
                       -1e-300])
    | st.floats(-2.0, 30.0)
)
_any = _ids | _numbers | _ts | _json


_pres = (
    st.dictionaries(st.sampled_from(["revenue", "clicks", "0", "a.b-c_d"]) | _ids,
                    _numbers | st.sampled_from([True, None, "1", [1]]), max_size=4)
    | st.dictionaries(st.from_regex(NAME_PATTERN, fullmatch=True), st.just(1.0),
                      min_size=62, max_size=66)
    | st.sampled_from([{}, None, [], "x", 1])
)


@st.composite
def near_events(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-valid events with a few fields replaced, dropped, or retyped."""
    base = dict(draw(st.sampled_from([EXPOSURE, METRIC])))
    base["type"] = draw(st.sampled_from([base["type"]] * 6 + ["exposure", "metric", "x", 1]))
    per_field = {
        "event_id": _ids, "unit_id": _ids, "experiment_id": _ids, "variant": _ids,
        "metric": _ids, "ts": _ts, "value": _numbers, "pre_activity": _numbers,
        "schema_version": st.sampled_from([1, 1.0, 2, None, "1", True, 0]), "extra": _json,
        "pre": _pres,
    }
    for key in draw(st.lists(st.sampled_from(sorted(per_field) + ["type"]), max_size=3)):
        if draw(st.booleans()) and key != "extra":
            base.pop(key, None)
        else:
            base[key] = draw(per_field.get(key, _any) | st.none() | _any)
    return base


@needs_jsonschema
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_events())
def test_validator_agrees_with_event_schema(d: dict[str, Any]) -> None:
    raw = orjson.dumps(d)
    instance = orjson.loads(raw)  # exactly what the validator sees
    try:
        # now far ahead so that the clock-dependent check never fires
        parse_event(raw, now_ms=MAX_TS_MS)
        accepted, code = True, None
    except InvalidRecord as e:
        accepted, code = False, e.code
        assert code in _SHAPE_CODES, e
    errors = list(validator("event").iter_errors(instance))
    assert accepted == (not errors), (code, [e.message for e in errors])


@pytest.mark.parametrize("raw, code, field", [c[1:] for c in BAD_EVENTS],
                         ids=[c[0] for c in BAD_EVENTS])
@needs_jsonschema
def test_bad_event_table_against_schema(raw: bytes, code: str, field: str | None) -> None:
    if code not in _SHAPE_CODES or code == "not_finite":
        return
    assert list(validator("event").iter_errors(orjson.loads(raw)))


@needs_jsonschema
def test_good_events_validate_against_schema() -> None:
    for d in (EXPOSURE, METRIC, {**METRIC, "experiment_id": None}, {**EXPOSURE, "x": [1]}):
        validator("event").validate(d)
        parse(enc(d))


@needs_jsonschema
def test_configs_against_experiment_schema() -> None:
    v = validator("experiment")
    v.validate(FULL_CONFIG)
    v.validate(experiment_to_dict(ExperimentConfig("e")))
    v.validate({"experiment_id": "e", "metrics": ["a", {"name": "b"}]})
    for case, cfg, _field, schema_tells in BAD_CONFIGS:
        if schema_tells is None:  # NaN/inf: not JSON at all
            continue
        errors = list(v.iter_errors(orjson.loads(orjson.dumps(cfg))))
        assert bool(errors) == schema_tells, case


@needs_jsonschema
@_SETTINGS
@given(configs())
def test_generated_configs_validate_against_schema(cfg: ExperimentConfig) -> None:
    validator("experiment").validate(orjson.loads(codec.dumps(experiment_to_dict(cfg))))


def sample_estimate() -> dict[str, Any]:
    """An estimate record written by hand (docs/architecture.md#contracts; two strata, one
    treatment)."""

    def iv(mean: float, sd: float) -> dict[str, float]:
        return {"mean": mean, "sd": sd, "lo": mean - 1.96 * sd, "hi": mean + 1.96 * sd}

    return {
        "schema_version": 1,
        "experiment_id": "exp-checkout",
        "metric": "revenue",
        "variant": "treatment",
        "control": "control",
        "adjustment": "stratified",
        "adjusted": {"effect": iv(0.8, 0.3), "lift": iv(0.04, 0.015), "p_positive": 0.996,
                     "expected_loss": 0.0004},
        "naive": {"effect": iv(1.4, 0.25), "lift": iv(0.07, 0.012), "p_positive": 0.9999},
        "strata": [
            {"stratum": 0, "activity": [0, 8], "n_exposed": 1200, "n_matured": 900,
             "share_observed": 0.3, "share_population": {"mean": 0.62, "lo": 0.55, "hi": 0.7},
             "effect": {"mean": 0.3, "lo": -0.4, "hi": 1.0}},
            {"stratum": 1, "activity": [8, 29], "n_exposed": 2800, "n_matured": 2100,
             "share_observed": 0.7, "share_population": {"mean": 0.38, "lo": 0.3, "hi": 0.45},
             "effect": {"mean": 1.6, "lo": 1.1, "hi": 2.1}},
        ],
        "units": {"exposed": {"control": 2010, "treatment": 1990},
                  "matured": {"control": 1502, "treatment": 1498}},
        "diagnostics": {"rhat": 1.003, "ess_bulk": 3150.0, "ess_tail": 2800.5, "chains": 8,
                        "draws": 4000, "iteration": 12500},
        "watermark": {"event_time": NOW - 300_000},
        "computed_at": NOW,
    }


@needs_jsonschema
def test_sample_estimate_validates() -> None:
    v = validator("estimate")
    est = sample_estimate()
    v.validate(est)
    v.validate(orjson.loads(codec.dumps(est)))
    # fields may be added
    v.validate({**est, "new_field": {"x": 1}, "adjusted": {**est["adjusted"], "p_rope": 0.2}})
    # undefined statistics are null (what orjson writes for NaN)
    undefined = orjson.loads(codec.dumps({**est, "diagnostics": {**est["diagnostics"],
                                                                "rhat": math.nan}}))
    v.validate(undefined)
    one = {**est, "adjustment": "unavailable", "strata": est["strata"][:1]}
    v.validate(one)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("computed_at"),
        lambda e: e.update(schema_version=2),
        lambda e: e.update(adjustment="none"),
        lambda e: e["adjusted"]["effect"].pop("sd"),
        lambda e: e["adjusted"].update(p_positive=1.5),
        lambda e: e["strata"][0].update(activity=[0]),
        lambda e: e["units"]["exposed"].update(control=-1),
        lambda e: e["diagnostics"].update(chains=0),
        lambda e: e.update(variant="t:1"),
        lambda e: e["watermark"].update(event_time="now"),
    ],
)
@needs_jsonschema
def test_broken_estimates_fail(mutate: Any) -> None:
    est = sample_estimate()
    mutate(est)
    assert list(validator("estimate").iter_errors(est))


@needs_jsonschema
def test_alert_schema() -> None:
    v = validator("alert")
    alert = {
        "schema_version": 1,
        "alert_id": "exp-checkout|latency_ms|treatment|guardrail_breach",
        "experiment_id": "exp-checkout",
        "metric": "latency_ms",
        "variant": "treatment",
        "kind": "guardrail_breach",
        "state": "firing",
        "evidence": {"effect_mean": 31.0, "threshold": 25.0, "p_beyond": 0.97},
        "message": "latency_ms is 31 ms worse in treatment (guardrail 25 ms).",
        "watermark": {"event_time": NOW},
        "created_at": NOW,
    }
    v.validate(alert)
    srm = {**alert, "kind": "sample_ratio_mismatch", "metric": None, "state": "resolved"}
    del srm["variant"]
    v.validate(srm)
    for bad in [{**alert, "kind": "other"}, {**alert, "state": "on"},
                {**alert, "evidence": {"x": "1"}}, {**alert, "schema_version": 2}]:
        assert list(v.iter_errors(bad))


@needs_jsonschema
def test_dead_letter_record() -> None:
    raw = b'{"type":"metric","value":NaN}\xff'
    with pytest.raises(InvalidRecord) as ei:
        parse(raw)
    rec = dead_letter_record(raw, ei.value, "liftstream.events", 3, 1234, NOW, key=b"u1")
    validator("deadletter").validate(orjson.loads(codec.dumps(rec)))
    assert base64.b64decode(rec["original_b64"]) == raw
    assert rec["reason"]["code"] == ei.value.code
    assert rec["source"] == {"topic": "liftstream.events", "partition": 3, "offset": 1234}
    assert not rec["original_truncated"] and rec["original_size"] == len(raw)

    big = b"x" * (DEAD_LETTER_MAX_ORIGINAL_BYTES * 4)
    with pytest.raises(InvalidRecord) as ei:
        parse(big)
    rec = dead_letter_record(big, ei.value, "t", -1, -1, NOW)
    validator("deadletter").validate(rec)
    assert rec["original_truncated"] and rec["original_size"] == len(big)
    assert len(base64.b64decode(rec["original_b64"])) == DEAD_LETTER_MAX_ORIGINAL_BYTES

    tomb = dead_letter_record(None, InvalidRecord("not_json", "no value"), "t", 0, 0, NOW)
    validator("deadletter").validate(tomb)
    assert tomb["original_b64"] == "" and tomb["key_b64"] is None


# --------------------------------------------------------------------------- throughput


@pytest.mark.slow
def test_parse_event_throughput() -> None:
    """100k mixed events (70% metric, 30% exposure, 5% invalid); prints events/s."""
    evs = []
    for i in range(100_000):
        if i % 20 == 0:
            evs.append(with_(EXPOSURE, unit_id="bad id"))
        elif i % 10 < 3:
            evs.append(with_(EXPOSURE, event_id=f"ev-{i}", unit_id=f"user:{i % 7919}"))
        else:
            evs.append(with_(METRIC, event_id=f"ev-{i}", value=i * 0.01))
    t0 = time.perf_counter()
    bad = 0
    for raw in evs:
        try:
            parse_event(raw, now_ms=NOW)
        except InvalidRecord:
            bad += 1
    rate = len(evs) / (time.perf_counter() - t0)
    print(f"parse_event: {rate:,.0f} events/s")
    assert bad == 5000
    assert rate > 20_000


# ---------------------------------------------------------------- the msgspec fast path


def _row_or_reason(fn, raw: bytes, now_ms: int) -> tuple:
    try:
        return ("row", fn(raw, 7, now_ms=now_ms))
    except InvalidRecord as e:
        return ("reason", e.code, e.field, e.message)


def _same_verdict(raw: bytes, now_ms: int = NOW) -> None:
    """parse_event_row (msgspec first) == the reference validator: the same
    row, or the same reason, field and message."""
    fast = _row_or_reason(parse_event_row, raw, now_ms)
    ref = _row_or_reason(parse_event_row_reference, raw, now_ms)
    assert fast == ref, raw
    if fast[0] == "row":  # numbers of the same type too (a float is never an int)
        assert [type(x) for x in fast[1]] == [type(x) for x in ref[1]], raw


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_events(), st.sampled_from([NOW, MAX_TS_MS]))
def test_fast_path_agrees_with_reference(d: dict[str, Any], now_ms: int) -> None:
    _same_verdict(orjson.dumps(d), now_ms)


def test_fast_path_agrees_on_edge_cases() -> None:
    raws = [c[1] for c in BAD_EVENTS] + [enc(EXPOSURE), enc(METRIC),
                                         enc({**METRIC, "experiment_id": None}),
                                         without(METRIC, "experiment_id"),
                                         without(EXPOSURE, "pre_activity"),
                                         with_(EXPOSURE, pre_activity=None),
                                         with_(EXPOSURE, pre_activity=28),
                                         with_(METRIC, value=3), with_(METRIC, value=-0.0),
                                         with_(EXPOSURE, ts=float(TS)),
                                         with_(EXPOSURE, schema_version=1.0),
                                         with_(EXPOSURE, schema_version=None),
                                         with_(EXPOSURE, ts=NOW + 300_000),
                                         with_(EXPOSURE, ts=NOW + 300_001),
                                         with_(METRIC, value=1e30),
                                         with_(EXPOSURE, extra={"deep": [1, {"x": None}]}),
                                         with_(EXPOSURE, pre={}),
                                         with_(EXPOSURE, pre=None),
                                         with_(EXPOSURE, pre={"r": 1, "s": -0.0, "t": 1e12}),
                                         with_(EXPOSURE, pre={"r": 1e30}),
                                         with_(EXPOSURE, pre={"r": 2**64 - 1}),
                                         with_(EXPOSURE, pre={"é": 1}),
                                         with_(EXPOSURE, pre={f"m{i}": 1 for i in range(64)}),
                                         with_(EXPOSURE, pre={f"m{i}": 1 for i in range(65)})]
    raws += [b'{"type":"metric","type":"exposure","event_id":"e","unit_id":"u",'
             b'"metric":"m","value":1,"ts":%d}' % TS,
             b'{"type":"metric","event_id":"e","event_id":"f","unit_id":"u",'
             b'"metric":"m","value":1,"ts":%d}' % TS,
             b'{"type":"metric","event_id":"e","unit_id":"u","metric":"m","value":1,'
             b'"ts":%d,"x":"\\ud800"}' % TS,  # a lone surrogate in an ignored field
             b'{"type":"metric","event_id":"e","unit_id":"u","metric":"m","value":1,'
             b'"ts":%d,"x":"\xff"}' % TS,  # invalid UTF-8 in an ignored field
             b' {"type":"metric","event_id":"e","unit_id":"u","metric":"m","value":1e0,'
             b'"ts":%d} ' % TS,
             b'{"type":"metric","event_id":"e","unit_id":"u","metric":"m","value":1,'
             b'"ts":%d}x' % TS,
             b'{"type":"metric","event_id":"e","unit_id":"u","metric":"m",'
             b'"value":1000000000000000000000000000000,"ts":%d}' % TS,
             b'{"type":"metric","event_id":"e","unit_id":"u","metric":"m","value":1,'
             b'"ts":%d000000000000000000000}' % TS]
    for raw in raws:
        _same_verdict(raw)


_LITERALS = [b"1e999", b"-1e400", b"1e308", b"1E+309", b"9" * 19, b"9" * 20, b"1" + b"0" * 400,
             b"NaN", b"Infinity", b"-0", b"0.0e0", b"1.5e-400", b"[1,1e999]", b'{"a":1e999}',
             b'"\\u0000"', b'"\\ud800"', b'"a\tb"', b"true", b"null", b"01", b"1.",
             b'"' + b"\\" + b'"', b"[" * 50 + b"]" * 50, b"{}", b'"x"']


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([EXPOSURE, METRIC]), st.sampled_from(_LITERALS),
       st.sampled_from(["extra", "value", "ts", "pre_activity", "schema_version", "unit_id"]))
def test_fast_path_agrees_on_raw_literals(base: dict[str, Any], lit: bytes, field: str) -> None:
    """Number and string literals spliced in as the JSON text itself (what
    orjson.dumps cannot write), in known and unknown fields."""
    d = {k: v for k, v in base.items() if k != field}
    raw = enc(d)[:-1] + b',"' + field.encode() + b'":' + lit + b"}"
    _same_verdict(raw)
    # and as a value (or a key) inside an exposure's pre
    raw = enc(EXPOSURE)[:-1] + b',"pre":{"' + field.encode() + b'":' + lit + b"}}"
    _same_verdict(raw)
    if lit.startswith(b'"'):
        _same_verdict(enc(EXPOSURE)[:-1] + b',"pre":{' + lit + b":1}}")


# ---------------------------------------------------------------- opaque ids without the regex

_ID_FULLMATCH = functools.partial(re.fullmatch, ID_PATTERN)
# every ASCII character, the edges of the length rule, line ends (``$``-like
# pitfalls), non-ASCII letters and digits that str.isalnum would take
_ID_EDGES = ([chr(i) for i in range(128)] + [f"a{chr(i)}b" for i in range(128)]
             + ["", "a" * 127, "a" * 128, "a" * 129, "-" * 128, "=" * 129, "a\n", "\na",
                "a\r\n", "é", "aé", "٣", "ａ", "ß", "\x80", "\xff", "\u0100", "😀", "a\x00"])
_id_text = (st.text(st.characters(exclude_categories=()), max_size=140)
            | st.text(st.sampled_from(ID_PATTERN + "\n \x00é٣"), max_size=140)
            | st.from_regex(ID_PATTERN, fullmatch=True)
            | st.sampled_from(_ID_EDGES))


@settings(max_examples=3000, deadline=None)
@given(_id_text)
def test_is_valid_id_is_the_regex(s: str) -> None:
    """is_valid_id (a translate table, no regex) accepts exactly what
    ``re.fullmatch(ID_PATTERN, s)`` does, for any text: lone surrogates too."""
    assert is_valid_id(s) == (_ID_FULLMATCH(s) is not None), repr(s)


def test_is_valid_id_edges() -> None:
    for s in _ID_EDGES:
        assert is_valid_id(s) == (_ID_FULLMATCH(s) is not None), repr(s)
    assert not is_valid_id(None) and not is_valid_id(b"a") and not is_valid_id(1)


@settings(max_examples=3000, deadline=None)
@given(_id_text.filter(lambda s: 1 <= len(s) <= MAX_ID_LENGTH),
       _id_text.filter(lambda s: 1 <= len(s) <= MAX_ID_LENGTH))
def test_fast_path_id_pair_check_is_the_regex(a: str, b: str) -> None:
    """parse_event_row's check of event_id and unit_id together (each 1..128
    long, msgspec's _FastId) == the regex on each."""
    assume(not any("\ud800" <= c <= "\udfff" for c in a + b))  # msgspec never decodes those
    fast = (a + b).encode().translate(_ID_TABLE).isalpha()
    assert fast == (_ID_FULLMATCH(a) is not None and _ID_FULLMATCH(b) is not None), (a, b)


def test_msgspec_never_decodes_a_lone_surrogate() -> None:
    """What lets the fast path encode ids without a surrogate check (it
    catches UnicodeEncodeError all the same)."""
    for lit in (b'"\\ud800"', b'"\\udc00"', b'"a\\ud800b"', b'"\\udc00\\ud800"'):
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(lit, type=str)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([EXPOSURE, METRIC]), _id_text, _id_text)
def test_fast_path_agrees_on_any_ids(base: dict[str, Any], event_id: str, unit_id: str) -> None:
    """Arbitrary event_id/unit_id text, \\u-escaped (json.dumps' ASCII
    output: the fast path's input), and as orjson writes it (UTF-8)."""
    d = {**base, "event_id": event_id, "unit_id": unit_id}
    _same_verdict(json.dumps(d).encode())
    try:
        raw = orjson.dumps(d)
    except orjson.JSONEncodeError:  # a lone surrogate
        return
    _same_verdict(raw)
    verdict = _row_or_reason(parse_event_row, json.dumps(d).encode(), NOW)
    assert (verdict[0] == "row") == (is_valid_id(event_id) and is_valid_id(unit_id))
