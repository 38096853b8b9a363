"""The streaming scenarios that run on more than one Redis: their fixtures and
bodies, called by ``tests/integration/test_streaming.py`` (single redis-server)
and ``tests/integration/test_redis_cluster.py`` (3-master Redis Cluster).

Their fixtures (``workers``, ``new_stack``) are in ``tests/integration/conftest.py``;
``new_stack`` takes the requesting module's ``redis_url`` fixture, so a module
that overrides ``redis_url`` runs the scenarios on its Redis.

* ``end_to_end`` (the cases in ``END_TO_END_CASES``) and
  ``differential_through_kafka``: the scenarios, with their assertions.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from schemas.codec import dumps, loads
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from schemas.validate import experiment_to_dict, parse_experiment
from streams.dev.simulate import make_traffic
from streams.ingest.ingestor import ingest_offsets
from streams.state.keys import estimate_key
from streams.state.store import read_counters
from tests.support.scale_helpers import as_records
from tests.support.streaming_harness import (
    assert_state_close,
    consume_all,
    events_counted,
    produce,
    reference,
    settle_all,
    wait_until,
)

DAY_MS = 86_400_000
#: Event times well in the past (workers reject ts > now + 1 day), day-aligned.
START = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS

#: ``end_to_end``'s cases, id -> (rho, novelty).
END_TO_END_CASES = {"plain": (None, None), "covariate": (0.8, None), "novelty": (None, 0.1)}


# --------------------------------------------------------------------------- 1


def end_to_end(new_stack, workers, r, tmp_path, rho, novelty):
    """Simulated traffic -> Kafka -> worker (role all) -> Redis and estimates.

    ``covariate``: the exposures carry ``pre`` (ρ = 0.8, 10% without): the
    live estimate's CUPED adjustment (its slope and what it bought, measured
    against the shadow chains) matches analyze's on the same events.
    ``novelty``: the visits model with a 7-day window (three exposure-age
    bins) and an extra lift of 0.1 on the first day: the live
    ``by_exposure_age`` and ``novelty`` match analyze's.

    One events partition, so the order the worker applies events in is the
    produced order and the reducer's snapshot must equal Redis's exactly (with
    several partitions, which metrics arrive after their unit matured depends
    on how the partitions interleave; test 3 covers that case).

    Monte Carlo comparison with ``liftstream analyze`` (8 chains x 1000 kept
    draws of fresh chains): both estimate the same posterior (same snapshot,
    same model), so the means differ only by the Monte Carlo error of each,
    sd/sqrt(ESS). The bound is 5 such standard errors of the difference, using
    the streaming estimate's bulk ESS for both estimands of both runs
    (conservative: analyze has ~10x more draws), capped at 0.5 posterior sd.
    The sds must agree within 30% (their Monte Carlo relative error is
    ~1/sqrt(2 ESS), a few percent).
    """
    from jsonschema import Draft202012Validator

    from schemas.contracts import load_schema
    from streams.sampling.analyze import AS_OF_NOW, analyze

    st = new_stack("e2e", partitions=1)
    cfg, evs, truth = make_traffic(8000, 8, "e2e", seed=11,
                                   window_seconds=86_400 if novelty is None else 7 * 86_400,
                                   started_at=START, covariate_rho=rho,
                                   covariate_missing=0.1 if rho else 0.0, novelty=novelty,
                                   effect_slope=None if novelty is None else -0.12)
    cfg = replace(cfg, prior="platform")  # opted in: estimates also carry the shrunk effect
    st.register([cfg])
    w = workers.start(st, "all")
    t0 = time.monotonic()
    where = produce(st.bootstrap, st.events_topic, evs)
    t_produced = time.monotonic()

    # all events applied: each event increments exactly one counter
    wait_until(lambda: events_counted(r, ["e2e"]) >= len(evs), 120, "all events applied",
               workers=[w], info=lambda: str(read_counters(r, "e2e")))
    t_applied = time.monotonic()
    assert events_counted(r, ["e2e"]) == len(evs)

    # (b) Redis state == reference reducer on the same events, once both are
    # advanced to the wall clock as the caught-up worker's idle advance does
    reducer = reference([cfg], as_records(evs), where, st.events_topic)
    settle_all(r, reducer, [cfg], st.events_topic, [0], int(time.time() * 1000))
    want = reducer.snapshots()["e2e"]
    assert_state_close(r, [cfg], reducer)
    assert sum(want.matured.values()) == sum(want.exposed.values())  # all windows closed
    final_wm = want.watermark
    assert want.matured["treatment"] > 1000 and want.D == 7

    # an estimate of the final data from a window of draws made entirely on it:
    # the first estimate seen of the final data has iteration i0, the tick
    # that made it began at i0 - sweeps, so i0 - sweeps + window suffices
    def est():
        raw = r.get(estimate_key("e2e", "value", "treatment"))
        return None if raw is None else (raw, loads(raw))

    sweeps, window = st.settings["sweeps_per_tick"], st.settings["window_draws"]
    _, first = wait_until(lambda: (e := est()) and e[1]["watermark"]["event_time"] == final_wm
                          and e[1]["units"]["matured"] == want.matured and e, 120,
                          "an estimate of the final data", workers=[w],
                          info=lambda: str(est() and est()[1]["units"]))
    need = first["diagnostics"]["iteration"] - sweeps + window
    raw, rec = wait_until(lambda: (e := est()) and e[1]["diagnostics"]["iteration"] >= need
                          and e, 120, f"an estimate at iteration >= {need}", workers=[w],
                          info=lambda: str(est() and est()[1]["diagnostics"]))
    t_estimate = time.monotonic()
    assert rec["watermark"]["event_time"] == final_wm
    assert rec["units"]["matured"] == want.matured and rec["units"]["exposed"] == want.exposed
    Draft202012Validator(load_schema("estimate")).validate(rec)
    plat = rec["platform"]  # the only member of its metric's platform prior
    assert plat["experiments"] == 1 and plat["chains"] == 4, plat
    assert plat["effect"]["lo"] < plat["effect"]["mean"] < plat["effect"]["hi"]

    # (a) the same JSON on the estimates topic
    key = b"e2e|value|treatment"
    msgs = consume_all(st.bootstrap, st.estimates_topic,
                       lambda ms: any(m.key() == key and m.value() == raw for m in ms), 30)
    assert all(m.key().startswith(b"e2e|") for m in msgs)
    assert loads(next(m.value() for m in msgs if m.value() == raw)) == rec

    # (c) against liftstream analyze on the same events
    exp_path, ev_path = tmp_path / "experiments.jsonl", tmp_path / "events.jsonl"
    exp_path.write_bytes(dumps(experiment_to_dict(cfg)) + b"\n")
    ev_path.write_bytes(b"".join(dumps(e) + b"\n" for e in evs))
    # advanced to the wall clock, as the worker idle since the events ended
    offline, counts = analyze(exp_path, ev_path, seed=3, chains=8, sweeps=2000,
                              as_of=AS_OF_NOW)
    assert counts["experiments"]["e2e"] == want.counters
    (off,) = [x for x in offline if x["metric"] == "value" and x["variant"] == "treatment"]
    assert off["watermark"] == rec["watermark"] and off["units"] == rec["units"]
    ess = rec["diagnostics"]["ess_bulk"]
    assert rec["diagnostics"]["rhat"] < 1.05 and ess > 100, rec["diagnostics"]
    print(f"\n[e2e] {len(evs)} events: produced in {t_produced - t0:.1f}s, all applied "
          f"{t_applied - t0:.1f}s, fresh final estimate {t_estimate - t0:.1f}s after the "
          f"worker started; iteration {rec['diagnostics']['iteration']}, "
          f"R-hat {rec['diagnostics']['rhat']:.3f}, ESS {ess:.0f}; truth {truth['effect']:+.4f}")
    for part in ("adjusted", "naive"):
        s, o = rec[part]["effect"], off[part]["effect"]
        mc = 5 * s["sd"] * np.sqrt(2 / ess)
        tol = min(mc, 0.5 * s["sd"])
        print(f"[e2e] {part:8}: stream {s['mean']:+.4f} sd {s['sd']:.4f} | analyze "
              f"{o['mean']:+.4f} sd {o['sd']:.4f} | |diff| {abs(s['mean'] - o['mean']):.4f} "
              f"<= {tol:.4f}")
        assert abs(s["mean"] - o["mean"]) <= tol, (part, s, o)
        assert abs(s["sd"] / o["sd"] - 1) < 0.3, (part, s, o)
    vr, vo = rec["variance_reduction"], off["variance_reduction"]
    assert vr["used"] is vo["used"] is (rho is not None), (vr, vo)
    assert vr["share_with_covariate"] == vo["share_with_covariate"]
    if rho is not None:
        print(f"[e2e] covariate: slope stream {vr['slope']['mean']:.3f} analyze "
              f"{vo['slope']['mean']:.3f}; sd ratio stream {vr['sd_ratio']} analyze "
              f"{vo['sd_ratio']}")
        assert abs(vr["slope"]["mean"] - vo["slope"]["mean"]) <= 4 * vo["slope"]["sd"]
        for part in ("adjusted", "naive"):
            assert abs(vr["sd_ratio"][part] / vo["sd_ratio"][part] - 1) < 0.3, (vr, vo)
        assert vr["sd_ratio"]["naive"] < 0.8, vr  # √(1 − 0.9·0.64) = 0.65
    if novelty is None:
        assert rec["by_exposure_age"] is None and rec["novelty"] is None
    else:
        bs, bo = rec["by_exposure_age"], off["by_exposure_age"]
        assert [(b["from_s"], b["to_s"]) for b in bs] == [(0, 86_400), (86_400, 259_200),
                                                          (259_200, 604_800)]
        assert [(b["from_s"], b["to_s"]) for b in bo] == [(b["from_s"], b["to_s"]) for b in bs]
        for b, o in zip(bs, bo, strict=True):
            print(f"[e2e] age {b['from_s']}-{b['to_s']}s: lift stream {b['lift']['mean']:+.4f} "
                  f"analyze {o['lift']['mean']:+.4f} (sd {o['lift']['sd']:.4f})")
            assert abs(b["lift"]["mean"] - o["lift"]["mean"]) <= 0.5 * o["lift"]["sd"], (b, o)
        ns, no = rec["novelty"], off["novelty"]
        print(f"[e2e] novelty: contrast {ns['contrast']}, difference {ns['difference']}")
        # the contrast is a function of the state's age cells alone: equal
        for k in ("mean", "sd"):
            assert ns["contrast"][k] == pytest.approx(no["contrast"][k], rel=1e-9)
        assert ns["contrast"]["strata_used"] == no["contrast"]["strata_used"] > 10
        assert ns["contrast"]["lo"] < novelty < ns["contrast"]["hi"], ns
        assert abs(ns["difference"]["mean"] - no["difference"]["mean"]) <= \
            0.5 * no["difference"]["sd"], (ns, no)
    assert w.alive()
    assert w.stop() == 0, w.log_tail()


# --------------------------------------------------------------------------- 2

T0 = START + 5 * DAY_MS
UNITS = ("u0", "u1", "u2", "u10", "Z", "z", "u.1", "a:b")


def random_case(rng: random.Random, tag: str):
    """Configs and an event stream in the spirit of test_state_differential,
    restricted to what validation accepts (the worker dead-letters the rest).
    Experiment, unit and event ids carry ``tag``, so cases never interact.
    Exposures sometimes carry pre-experiment values (``pre``, CUPED), drawn
    from a generator of their own so the rest of the stream is as before."""
    prng = random.Random(f"{tag}pre")
    cfgs = []
    for i in range(rng.randint(2, 3)):
        variants = rng.choice([("control", "treatment"), ("c", "t1", "t2")])
        cfgs.append(ExperimentConfig(
            experiment_id=f"{tag}e{i}",
            variants=variants,
            control=variants[0],
            metrics=tuple(MetricSpec(m) for m in rng.choice([("rev",), ("rev", "clicks")])),
            strata_edges=rng.choice([(0, 1, 4, 29), (0, 2.5, 29), (0, 29)]),
            window_seconds=rng.randint(1, 5),
            bucket_seconds=rng.randint(1, 3),
            lateness_seconds=rng.randint(0, 2),
            dedupe_seconds=rng.randint(0, 4),
            # always a start: the registry would stamp a config without one
            # with the wall clock, after this replayed history (issue 24
            # defect 6); T0 - 10 s is before nearly all of it (the same draws)
            started_at=rng.choice([T0 - 10_000, T0 + rng.randint(-3000, 3000)]),
        ))
    cfgs = [parse_experiment(experiment_to_dict(c)) for c in cfgs]  # valid, as registered
    exp_ids = [c.experiment_id for c in cfgs]
    variants = sorted({v for c in cfgs for v in c.variants} | {"zz"})
    units = [f"{tag}{u}" for u in UNITS]
    t = 0
    events: list = []
    exposures: list[Exposure] = []
    for _ in range(rng.randint(20, 200)):
        if events and rng.random() < 0.1:  # exact re-send
            events.append(rng.choice(events))
            continue
        if rng.random() < 0.17:  # straggler: far behind, the clock stays
            ts = T0 + t - rng.randint(0, 9000)
        else:
            t += rng.randint(-500, 1000)
            ts = T0 + t
        eid = f"{tag}k{rng.randint(0, 30)}"
        if rng.random() < 0.45:
            exp = rng.choice(exp_ids + [f"{tag}ghost"])
            own = next((c.variants for c in cfgs if c.experiment_id == exp), variants)
            pre_v = [prng.uniform(-1e6, 1e6), prng.choice([-0.0, 1e-300, 1 / 3, 1e9])]
            x = Exposure(eid, exp, rng.choice(units),
                         rng.choice(own if rng.random() < 0.8 else variants), ts,
                         rng.choice([None, 0.0, 0.5, 1.0, 2.5, 3.7, 4.0, 28.0,
                                     rng.uniform(0, 28)]),
                         prng.choice([None, None, {"rev": pre_v[0]},
                                      {"rev": pre_v[1], "clicks": pre_v[0]},
                                      {"clicks": pre_v[1], "bogus": pre_v[0]}]))
            exposures.append(x)
            events.append(x)
        else:
            exp = rng.choice([None, None, None, f"{tag}ghost", *exp_ids])
            unit = rng.choice(units)
            if exposures and rng.random() < 0.7:
                # anchored at an earlier exposure: inside or around its window,
                # often after it closed (late) or before it (pre-exposure)
                x = rng.choice(exposures)
                w_ms = next((c.window_seconds for c in cfgs
                             if c.experiment_id == x.experiment_id), 3) * 1000
                unit, ts = x.unit_id, x.ts + rng.randint(-300, w_ms + 500)
                exp = rng.choice([None, None, x.experiment_id, exp])
            value = rng.choice([0.1, 0.2, 1e-300, 1e9, -0.0, 3.0, 1 / 3,
                                rng.uniform(-1e6, 1e6)])
            events.append(Metric(eid, unit, rng.choice(["rev", "rev", "rev", "clicks", "bogus"]),
                                 value, ts, exp))
    return cfgs, events


def differential_through_kafka(new_stack, workers, r):
    """Random streams through Kafka and an ingest worker == the reducer, exactly.

    One ingest worker serves all cases (a worker start costs ~6 s). Each case
    has its own experiments, units and event ids (a tag prefix), is registered,
    then produced to the SINGLE-partition events topic (so the applied order
    is the produced order); it is done when the worker's ingest watermark
    (``lr:{ingest}:offsets``) reaches the case's last offset. Faust cuts the
    stream into micro-batches at arbitrary points, and cases follow each other
    back to back, so batches also straddle cases. A fixed-seed generator
    rather than hypothesis: each case costs a broker round trip and a batch
    timeout, and shrinking through a live worker would be slow and flaky.
    Values are bit-compared (floats as hex).
    """
    st = new_stack("diff", partitions=1, batch_size=37, batch_seconds=0.05)
    w = workers.start(st, "ingest")
    rng = random.Random(20240603)
    n_cases = 50
    prod_events = 0
    dead = Counter()
    cases = []
    all_cfgs, all_events, all_where = [], [], []
    for i in range(n_cases):
        cfgs, events = random_case(rng, f"c{i}")
        st.register(cfgs)
        where = produce(st.bootstrap, st.events_topic, events)
        assert {p for p, _ in where} == {0}
        cases.append((cfgs, events, where[-1][1]))
        all_cfgs += cfgs
        all_events += events
        all_where += where
        prod_events += len(events)
    last = cases[-1][2]
    wait_until(lambda: ingest_offsets(r, st.events_topic).get(0, -1) >= last, 120,
               "the worker to apply every case", workers=[w],
               info=lambda: str(ingest_offsets(r, st.events_topic)))
    # the cases share the partition, so its clock: one reducer over all, fed as
    # the worker was; then both settled at the end of the event time
    reducer = reference(all_cfgs, all_events, all_where, st.events_topic)
    settle_all(r, reducer, all_cfgs, st.events_topic, [0], reducer.clocks[f"{st.events_topic}|0"])
    assert_state_close(r, all_cfgs, reducer)
    cats = Counter()
    matured = 0
    for s in reducer.snapshots().values():
        cats.update({k: v for k, v in s.counters.items() if v})
        matured += sum(s.matured.values())
    dead.update(reducer.counters)
    assert matured > 100
    # the streams did exercise what they are meant to
    for c in ("duplicate", "corrected", "held", "pre_exposure", "conflict", "unknown_variant",
              "unknown_metric", "outside_window", "metric_applied", "repeat_exposure"):
        assert cats[c] > 0, (c, cats)
    assert dead["unknown_experiment"] > 0 and dead["unrouted"] > 0
    print(f"\n[diff] {n_cases} cases, {prod_events} events; categories {dict(cats)}, "
          f"not routed {dict(dead)}")
    assert w.stop() == 0, w.log_tail()
