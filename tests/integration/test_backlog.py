"""A worker started on a backlog (issue 12; docs/architecture.md#state, order independence).

Three simulated experiments (``liftstream simulate``'s generator, 14, 10 and 7
days of traffic, ~213k events), merged in time order and produced to a
6-partition events topic *before* any worker runs: what a first deploy onto an
existing topic, a restart after downtime or a replay looks like. The worker's
consumer then serves the partitions unevenly (one partition's backlog before
another's), which under a cross-partition clock dropped 6-38% of the metrics
as ``late`` and flipped an estimate's sign.

After catch-up, and after the idle advance of the caught-up partitions, the
streamed cells equal ``liftstream analyze``'s fold of the same file (counts
exactly, sums within 1e-9 relative), nothing is ``late`` or otherwise lost,
and each published adjusted interval covers the simulation's true population
effect. The second case kills the worker (-9) twice mid-catch-up.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import redis

from schemas.codec import dumps, loads
from schemas.validate import experiment_to_dict
from streams.dev.simulate import make_traffic
from streams.sampling.analyze import AS_OF_NOW, fold, read_experiments
from streams.sampling.chains import decode
from streams.state.keys import chain_key, estimate_key, experiment_key
from streams.state.store import read_counters, read_snapshot
from tests.support.streaming_harness import (
    close_diff,
    events_counted,
    make_stack,
    produce,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DAY_MS = 86_400_000
START = (int(time.time() * 1000) // DAY_MS - 40) * DAY_MS
PARTITIONS = 6
LOST = ("late", "expired", "too_old")
WINDOW = 200  # draws per chain in an estimate (the harness's window_draws)


def dirty_key(eid: str) -> str:
    return experiment_key(eid, "dirty_seq")


def backlog_file(tmp_path):
    """(configs, events, truths) written as analyze's input files."""
    cfgs, evs, truths = [], [], {}
    # bl10's exposures carry a pre-experiment value (CUPED): its covariate sums
    # must equal analyze's too, and its adjusted interval still cover the truth
    for eid, units, days, seed, rho in (("bl14", 45_000, 14, 1, None),
                                        ("bl10", 38_000, 10, 2, 0.6), ("bl7", 38_000, 7, 3, None)):
        cfg, e, tr = make_traffic(units, days, eid, seed, 7 * 86_400, START, rho, 0.2)
        cfgs.append(cfg)
        evs += e
        truths[eid] = tr
    evs.sort(key=lambda e: e["ts"])
    exp_path, ev_path = tmp_path / "experiments.jsonl", tmp_path / "events.jsonl"
    exp_path.write_bytes(b"".join(dumps(experiment_to_dict(c)) + b"\n" for c in cfgs))
    ev_path.write_bytes(b"".join(dumps(e) + b"\n" for e in evs))
    return cfgs, evs, truths, exp_path, ev_path


@pytest.mark.parametrize("kills", [0, 2], ids=["backlog", "backlog-2kills"])
def test_backlog_equals_analyze(kafka_bootstrap, redis_url, tmp_path, workers, kills):
    cfgs, evs, truths, exp_path, ev_path = backlog_file(tmp_path)
    assert len(evs) >= 200_000
    ids = [c.experiment_id for c in cfgs]
    st = make_stack(kafka_bootstrap, redis_url, tmp_path, f"bl{kills}", partitions=PARTITIONS)
    st.create_topics()
    st.register(cfgs)
    where = produce(st.bootstrap, st.events_topic, evs)
    assert len({p for p, _ in where}) == PARTITIONS
    r = redis.Redis.from_url(redis_url)

    w = workers.start(st, "all", idle_seconds=2)
    for k in range(kills):  # kill -9 mid-catch-up, restart
        frac = (k + 1) / (kills + 2)
        wait_until(lambda f=frac: events_counted(r, ids) >= f * len(evs), 240,
                   f"{frac:.0%} applied before kill {k + 1}", workers=[w])
        w.kill9()
        w.start()
    # every event counted once (each event routed to an experiment increments
    # exactly one counter; none is lost or counted twice across the kills)
    wait_until(lambda: events_counted(r, ids) >= len(evs), 300, "the backlog applied",
               workers=[w], info=lambda: f"{events_counted(r, ids)} of {len(evs)}")
    assert events_counted(r, ids) == len(evs)

    # the offline fold of the same file (liftstream analyze's), advanced to now
    red = fold(read_experiments(exp_path), ev_path, Counter(), as_of=AS_OF_NOW)
    want = red.snapshots()
    # the live worker matures the rest once its partitions are idle (2 s)
    wait_until(lambda: all(sum(read_snapshot(r, c).matured.values())
                           >= sum(want[c.experiment_id].matured.values()) for c in cfgs),
               60, "the idle advance", workers=[w])
    for c in cfgs:
        got = read_snapshot(r, c)
        diffs = close_diff(got.cells, want[c.experiment_id].cells, "cells")
        diffs += close_diff((got.arrivals, got.exposed, got.matured),
                            (want[c.experiment_id].arrivals, want[c.experiment_id].exposed,
                             want[c.experiment_id].matured), "units")
        assert not diffs, f"{c.experiment_id}: streamed != analyze\n" + "\n".join(diffs[:10])
        counters = read_counters(r, c.experiment_id)
        assert all(counters.get(k, 0) == 0 for k in LOST), (c.experiment_id, counters)
        assert counters.get("held", 0) == 0, counters
        # held is a gauge: it may have been non-zero mid-catch-up and stored as 0 now
        assert {k: v for k, v in counters.items() if v} == \
            {k: v for k, v in want[c.experiment_id].counters.items() if v}

    # the published adjusted estimates, made on the final data, cover the truth
    final_wm = {c.experiment_id: want[c.experiment_id].watermark for c in cfgs}

    def estimates():
        """Each experiment's estimate once its whole window of draws was made
        on the final data (the chain's ``fresh_from``, streams.sampling.advance)."""
        out = {}
        for e in ids:
            raw = r.get(estimate_key(e, "value", "treatment"))
            rec = raw and loads(raw)
            if not rec or rec["watermark"]["event_time"] != final_wm[e]:
                return None
            blob = r.get(chain_key(e, "value"))
            meta = decode(blob)[1] if blob else {}
            fresh_from = meta.get("fresh_from")
            if fresh_from is None or meta.get("seq") != int(r.get(dirty_key(e)) or 0) \
                    or rec["diagnostics"]["iteration"] - fresh_from < WINDOW:
                return None
            out[e] = rec
        return out

    recs = wait_until(estimates, 240, "estimates on the final data", workers=[w])
    lines = []
    for e, rec in recs.items():
        adj, naive, tr = rec["adjusted"]["effect"], rec["naive"]["effect"], truths[e]["effect"]
        lines.append(f"{e}: adjusted {adj['mean']:+.3f} [{adj['lo']:+.3f}, {adj['hi']:+.3f}], "
                     f"naive {naive['mean']:+.3f}, truth {tr:+.3f}, "
                     f"corrected {rec['data_quality']['corrected']}, "
                     f"dropped {rec['data_quality']['dropped']}")
        assert adj["lo"] <= tr <= adj["hi"], lines[-1]
        assert rec["data_quality"]["dropped"] == 0, rec["data_quality"]
    print(f"\n[backlog, {kills} kills] {len(evs)} events on {PARTITIONS} partitions:\n  "
          + "\n  ".join(lines))
    assert w.alive()
    r.close()
