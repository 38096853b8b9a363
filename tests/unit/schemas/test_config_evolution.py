"""Config evolution (issue 15 item 1): a running experiment's config may only
change in ways its stored state can take.

Unit records keep variant and metric *indices*, cells and arrivals are keyed
by stratum and entry bucket, outcomes by the window: so once units exist,
variants and metrics may only be appended and control, window, buckets and
strata are fixed. A config that breaks this is refused everywhere configs
are accepted (the registry, so the CLI, the registry agent and the
bootstrap), dead-lettered ``incompatible_config`` by the agent, and the
running config stays.
"""

from __future__ import annotations

import dataclasses
import time
from base64 import b64decode

import pytest
import redis

from schemas.codec import dumps, loads
from schemas.records import ExperimentConfig, Exposure, MetricSpec
from schemas.validate import InvalidRecord, incompatible_change
from streams.ingest.ingestor import Ingestor
from streams.service.experiments import publish_experiment
from streams.state.registry import Registry
from tests.support.streaming_harness import (
    Workers,
    consume_all,
    event_dict,
    make_stack,
    produce,
    wait_until,
)

T0 = int(time.time() * 1000) - 3_600_000
# started at T0 (the registry would stamp the registration time, after the
# events these tests send: issue 24 defect 6)
BASE = ExperimentConfig(experiment_id="ev1", variants=("control", "t1"),
                        metrics=(MetricSpec("rev"),), window_seconds=3600, started_at=T0)


@pytest.mark.parametrize("change, ok", [
    (dict(variants=("control", "t1", "t2")), True),           # appended
    (dict(metrics=(MetricSpec("rev"), MetricSpec("clicks"))), True),
    (dict(end_at=T0, status="stopped", alert_thresholds={"rhat_max": 1.1}), True),
    (dict(covariates="off"), True),  # the state records pre values either way
    (dict(variants=("t1", "control"), control="t1"), False),   # reordered
    (dict(variants=("control",)), False),                      # removed
    (dict(variants=("control", "t2")), False),                 # renamed
    (dict(metrics=(MetricSpec("clicks"), MetricSpec("rev"))), False),
    (dict(metrics=()), False),
    (dict(window_seconds=7200), False),
    (dict(bucket_seconds=3600), False),
    (dict(strata_edges=(0, 5, 29)), False),
    (dict(started_at=T0 + 3_600_000), False),  # the entry-bucket grid's origin
    # exposure-age bins (issue 19): the bins in effect are fixed (unit records
    # keep a total per bin); None is the default (0, 1 d, 3 d), edges at or
    # beyond the window (here 1 h) are dropped
    (dict(exposure_age_bins=(0, 600)), False),
    (dict(exposure_age_bins=(0,)), True),  # the default's edges lie beyond 1 h too
    (dict(exposure_age_bins=(0, 86_400, 259_200)), True),
    (dict(exposure_age_bins=(0, 3600, 7200)), True),
])
def test_incompatible_change(change, ok):
    assert (incompatible_change(BASE, dataclasses.replace(BASE, **change)) is None) == ok


KINDS = ExperimentConfig(
    experiment_id="ev1", variants=("control", "t1"), window_seconds=3600, started_at=T0,
    metrics=(MetricSpec("rev", cap_upper=100.0), MetricSpec("buy", kind="conversion"),
             MetricSpec("rps", kind="ratio", numerator="rev", denominator="sessions")))
_rev, _buy, _rps = KINDS.metrics


@pytest.mark.parametrize("metrics, fixed", [
    # issue 26: what defines a unit's outcome is fixed once units exist
    ((dataclasses.replace(_rev, kind="conversion", cap_upper=None), _buy, _rps), "kind"),
    ((dataclasses.replace(_rev, cap_upper=50.0), _buy, _rps), "cap_upper"),
    ((dataclasses.replace(_rev, cap_lower=0.0), _buy, _rps), "cap_lower"),
    ((dataclasses.replace(_rev, cap_upper=None), _buy, _rps), "cap_upper"),
    ((_rev, dataclasses.replace(_buy, threshold=1.0), _rps), "threshold"),
    ((_rev, _buy, dataclasses.replace(_rps, denominator="visits")), "denominator"),
    ((_rev, _buy, dataclasses.replace(_rps, numerator="buy")), "numerator"),
    ((_rev, _buy, dataclasses.replace(_rps, cap_upper=9.0)), "cap_upper"),
    ((_rev, _buy, dataclasses.replace(_rps, kind="sum", numerator=None, denominator=None)),
     "kind"),
])
def test_metric_kind_fields_are_fixed(metrics, fixed):
    why = incompatible_change(KINDS, dataclasses.replace(KINDS, metrics=metrics))
    assert why is not None and fixed in why and "incompatible" not in why, why


def test_metrics_of_any_kind_may_be_appended_and_guardrails_change():
    """Appending keeps the event metrics a prefix (unit records stay
    readable); direction and guardrail threshold may change."""
    more = (dataclasses.replace(_rev, direction="decrease", guardrail_threshold=3.0), _buy, _rps,
            MetricSpec("ipo", kind="ratio", numerator="items", denominator="buy",
                       cap_upper=20.0),
            MetricSpec("clicked", kind="conversion", threshold=2.0),
            MetricSpec("sessions", cap_lower=0.0))
    new = dataclasses.replace(KINDS, metrics=more)
    assert incompatible_change(KINDS, new) is None
    assert new.event_metrics[:len(KINDS.event_metrics)] == KINDS.event_metrics
    assert new.event_metrics == ("rev", "buy", "sessions", "items", "clicked")


@pytest.mark.parametrize("change", [dict(end_at=None, status="running"),
                                    dict(end_at=T0 + 3_600_000), dict(status="running")])
def test_concluded_end_and_status_are_fixed(change):
    """Issue 24 defect 5: once concluded, reopening is refused (and only then)."""
    stopped = dataclasses.replace(BASE, end_at=T0, status="stopped")
    new = dataclasses.replace(stopped, **change)
    assert incompatible_change(stopped, new) is None
    assert "concluded" in incompatible_change(stopped, new, concluded=True)


def test_registry_stamps_the_start_at_registration(redis_url):
    """Issue 24 defect 6: a config without started_at is stored with the
    registration time on the bucket grid; a republished one keeps it."""
    r = redis.Redis.from_url(redis_url)
    reg = Registry(r)
    bare = dataclasses.replace(BASE, experiment_id="st1", started_at=None)
    now = T0 + 12_345_678
    stored = reg.put(bare, now_ms=now)
    B = bare.bucket_seconds * 1000
    assert stored.started_at == now // B * B == Registry(r).get("st1", fresh=True).started_at
    assert reg.put(bare, now_ms=now + 10 * B).started_at == stored.started_at
    assert reg.put(dataclasses.replace(bare, started_at=T0), now_ms=now).started_at == T0


def test_exposure_age_bins_are_fixed():
    """With a week's window the default bins are in effect: tracking may not
    be switched off, nor the edges moved; spelling the default out may."""
    week = dataclasses.replace(BASE, window_seconds=7 * 86_400)
    assert incompatible_change(week, dataclasses.replace(
        week, exposure_age_bins=(0, 86_400, 259_200, 10**7))) is None
    for bins in ((0,), (0, 86_400), (0, 3600, 86_400, 259_200)):
        why = incompatible_change(week, dataclasses.replace(week, exposure_age_bins=bins))
        assert why is not None and "exposure_age_bins" in why, bins
    tracked = dataclasses.replace(week, exposure_age_bins=(0, 3600))
    why = incompatible_change(tracked, week)
    assert why == ("exposure_age_bins is fixed once the experiment has units: [0, 3600] -> "
                   "None (the default)")


@pytest.mark.integration
def test_registry_refuses_what_state_cannot_take(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    reg = Registry(r)
    reg.put(BASE)
    reg.put(dataclasses.replace(BASE, window_seconds=7200))  # no units yet: any change
    reg.put(BASE)
    Ingestor(r, reg).process("t", 0, [(0, dumps(event_dict(
        Exposure("x0", "ev1", "u0", "t1", T0, 1.0))))], T0 + 1000)
    with pytest.raises(InvalidRecord) as ei:
        reg.put(dataclasses.replace(BASE, variants=("t1", "control"), control="t1"))
    assert ei.value.code == "incompatible_config"
    assert reg.get("ev1", fresh=True) == BASE  # the running config stays
    grown = dataclasses.replace(BASE, variants=("control", "t1", "t2"))
    reg.put(grown)
    assert reg.get("ev1", fresh=True) == grown


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_agent_dead_letters_an_incompatible_config(kafka_bootstrap, redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "evo", partitions=1)
        st.create_topics()
        st.register([BASE])
        w = ws.start(st, "ingest")
        produce(st.bootstrap, st.events_topic,
                [Exposure(f"x{i}", "ev1", f"u{i}", "control", T0 + i, 1.0) for i in range(5)])
        wait_until(lambda: r.hget("lr:{e:ev1}:meta", "c:exposures") == b"5", 90,
                   "the exposures applied", workers=[w])
        bad = dataclasses.replace(BASE, window_seconds=60)
        publish_experiment(st.bootstrap, st.topics["topic_experiments"], bad)

        def ours(m) -> bool:
            rec = loads(m.value())
            return rec["reason"]["code"] == "incompatible_config" and \
                b"window_seconds" in rec["reason"]["message"].encode()

        dead = consume_all(st.bootstrap, st.deadletter_topic,
                           lambda ms: any(ours(m) for m in ms), 60)
        rec = loads(next(m.value() for m in dead if ours(m)))
        assert loads(b64decode(rec["original_b64"]))["window_seconds"] == 60
        assert Registry(r).get("ev1", fresh=True) == BASE
    finally:
        ws.close()
        r.close()
