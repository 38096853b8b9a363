"""The experiment lifecycle on a real broker and redis-server (issue 14 item 1;
``running`` -> ``stopped`` -> ``concluded`` -> ``deleted``, through the CLI
a user runs.

Two experiments on a worker of role ``all``. The first half of the traffic
(event time before ``cut``) is applied; ``liftstream experiments stop A --at
cut``; the second half is produced. Then:

* A's new units from ``cut`` on are counted ``after_end`` and not applied;
  units exposed before keep their metrics; B is untouched: both states equal
  the reference fold of the same events under the stopped config (counts
  exact, sums within 1e-9);
* concluded: with the partitions idle and advanced past end_at + W + H,
  A's estimates are republished ``final: true`` and stop changing; its
  working state (unit records, pending sets, dedupe, chains) is deleted,
  its cells, counters, estimates and history stay;
* ``liftstream experiments delete A``: every key of A is gone (and stays gone
  once the workers' config caches expired), B keeps all of its keys, A is
  out of the registry and a new event of A is dead-lettered
  ``unknown_experiment``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from base64 import b64decode

import pytest
import redis

from schemas.codec import dumps, loads
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from schemas.validate import InvalidRecord
from streams.ingest.ingestor import Ingestor
from streams.sampling.sampler import conclude, read_estimates, read_history, read_lifecycle
from streams.state.keys import experiment_key, units_key
from streams.state.registry import Registry
from streams.state.store import read_counters
from tests.support.scale_helpers import fed, pinned_case, pinned_producer, produce_pinned
from tests.support.streaming_harness import (
    REPO,
    Workers,
    assert_state_close,
    consume_all,
    event_dict,
    events_counted,
    make_stack,
    settle_all,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 2


def keys_of(r, eid: str) -> int:
    """The experiment's keys but its fences (``fence:<src>``), which a delete
    keeps (a fence never goes down: ``registry.delete_state``)."""
    fence = experiment_key(eid, "fence:").encode()
    return sum(1 for k in r.scan_iter(match=experiment_key(eid, "*"), count=1000)
               if not k.startswith(fence))


def cli(st, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO,
                         env=st.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_stop_then_delete(kafka_bootstrap, redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "life", partitions=PARTITIONS)
        st.create_topics()
        cfgs, pairs = pinned_case(2, 1200, 8, seed=9, partitions=PARTITIONS, tag="lf")
        a, b = (c.experiment_id for c in cfgs)
        st.register(cfgs)
        cut = pairs[len(pairs) // 2][1]["ts"]
        first = [pe for pe in pairs if pe[1]["ts"] < cut]
        rest = [pe for pe in pairs if pe[1]["ts"] >= cut]
        w = ws.start(st, "all")
        prod = pinned_producer(st.bootstrap)
        produce_pinned(prod, st.events_topic, first)
        wait_until(lambda: events_counted(r, [a, b]) >= len(first), 120, "the first half",
                   workers=[w])
        running_keys = keys_of(r, a)

        # stop A at `cut`: the CLI publishes the config and puts it in the registry
        out = loads(cli(st, "experiments", "stop", a, "--at", str(cut)))
        assert (out["status"], out["end_at"]) == ("stopped", cut)
        time.sleep(Registry(r).ttl + 1)  # every worker's cached config is the stopped one
        produce_pinned(prod, st.events_topic, rest)
        wait_until(lambda: events_counted(r, [a, b]) >= len(pairs), 120, "the second half",
                   workers=[w])
        stopped = [dataclasses.replace(cfgs[0], status="stopped", end_at=cut), cfgs[1]]
        red = fed(stopped, pairs, st.events_topic)
        want = red.snapshots()
        assert read_counters(r, a)["after_end"] == want[a].counters["after_end"] > 0
        assert read_counters(r, b).get("after_end", 0) == 0
        assert w.stop() == 0, w.log_tail()
        settle_all(r, red, stopped, st.events_topic, range(PARTITIONS))
        assert_state_close(r, stopped, red)
        stopped_keys = keys_of(r, a)

        # concluded: caught up and idle, the partitions advance to the wall
        # clock, past end_at + W + H; once A's chains are done on the final
        # data its estimates are published final and its working state goes
        w = ws.start(st, "all", name="all-idle", idle_seconds=2)
        final = wait_until(lambda: (recs := read_estimates(r, a)) and all(
            rec.get("final") for rec in recs) and recs, 120, "A's final estimates",
            workers=[w])
        assert read_lifecycle(r, stopped[0]) == "concluded"
        assert read_lifecycle(r, cfgs[1]) == "running"
        gone = ["units", "held", "chain:value"] + [
            f"{k}:{st.events_topic}|{p}" for k in ("pending", "seen") for p in range(PARTITIONS)]
        assert not any(r.exists(experiment_key(a, k)) for k in gone)
        # the sighting buckets (seen:<src>:<start>) too
        assert not [k for k in r.scan_iter(match=experiment_key(a, "seen:*"))]
        for k in ("cfg", "shards", "arrivals", "meta", "estimates"):
            assert r.exists(experiment_key(a, k)), k
        assert read_history(r, a) and read_counters(r, a)["after_end"] > 0
        assert not any(rec.get("final") for rec in read_estimates(r, b))
        concluded_keys = keys_of(r, a)
        it = {rec["variant"]: rec["diagnostics"]["iteration"] for rec in final}
        time.sleep(3)  # no further ticks for A
        assert {rec["variant"]: rec["diagnostics"]["iteration"]
                for rec in read_estimates(r, a)} == it

        # delete A: its keys go, B's stay, its events are dead letters
        b_keys = keys_of(r, b)
        cli(st, "experiments", "delete", a)
        assert keys_of(r, a) == 0
        assert a not in Registry(r).ids() and Registry(r).get(a, fresh=True) is None
        late = dict(rest[-1][1], event_id="after-delete", ts=rest[-1][1]["ts"])
        produce_pinned(prod, st.events_topic, [(rest[-1][0], late)])
        def ours(m) -> bool:
            return b"after-delete" in b64decode(loads(m.value())["original_b64"])

        dead = consume_all(st.bootstrap, st.deadletter_topic,
                           lambda ms: any(ours(m) for m in ms), 60)
        rec = next(loads(m.value()) for m in dead if ours(m))
        assert rec["reason"]["code"] == "unknown_experiment", rec
        time.sleep(2 * Registry(r).ttl + 3)  # the workers' second sweep
        assert keys_of(r, a) == 0
        assert keys_of(r, b) == b_keys
        print(f"\n[lifecycle] keys of {a}: running {running_keys}, stopped {stopped_keys}, "
              f"concluded {concluded_keys}, deleted 0; "
              f"{want[a].counters['after_end']} exposures after the end")
    finally:
        ws.close()
        r.close()


# --- issue 24 defect 5: a concluded experiment stays concluded -------------------------

T0 = 1_700_000_000_000
HOUR = 3_600_000
STOPPED = ExperimentConfig(experiment_id="cl1", variants=("control", "t1"),
                           metrics=(MetricSpec("rev"),), window_seconds=3600,
                           lateness_seconds=0, correction_seconds=0, started_at=T0,
                           status="stopped", end_at=T0 + HOUR)


def _concluded(r) -> Registry:
    """STOPPED with five units and a metric each, its clock far past end_at +
    W + H, then concluded (``sampler.conclude``): units deleted, cells kept."""
    reg = Registry(r)
    reg.put(STOPPED)
    evs = [Exposure(f"x{i}", "cl1", f"u{i}", ("control", "t1")[i % 2], T0 + i, 1.0)
           for i in range(5)]
    evs += [Metric(f"m{i}", f"u{i}", "rev", 2.0, T0 + 10 + i, "cl1") for i in range(5)]
    evs.append(Exposure("late", "cl1", "u-new", "t1", T0 + 10 * HOUR, 1.0))  # after_end
    Ingestor(r, reg).process("t", 0, [(i, dumps(event_dict(e))) for i, e in enumerate(evs)],
                             T0 + 10 * HOUR)
    assert read_counters(r, "cl1")["exposures"] == 5
    conclude(r, STOPPED)
    assert read_lifecycle(r, STOPPED) == "concluded" and not r.exists(units_key("cl1"))
    return reg


@pytest.mark.timeout(60)
def test_defect5_reopening_a_concluded_experiment_is_refused(redis_url):
    """Clearing end_at (or setting status back to running) on a concluded
    experiment would re-fold its old units a second time: refused
    ``incompatible_config``, the stopped config stays."""
    r = redis.Redis.from_url(redis_url)
    reg = _concluded(r)
    for change in ({"end_at": None, "status": "running"}, {"end_at": T0 + 2 * HOUR},
                   {"status": "running"}):
        with pytest.raises(InvalidRecord) as ei:
            reg.put(dataclasses.replace(STOPPED, **change))
        assert ei.value.code == "incompatible_config", change
        assert Registry(r).get("cl1", fresh=True) == STOPPED
    reg.put(dataclasses.replace(STOPPED, alert_thresholds={"srm": 0.01}))  # others may change


@pytest.mark.timeout(60)
def test_defect5_exposure_to_concluded_experiment_is_dead_lettered(redis_url):
    """An exposure to a concluded experiment (an old unit back, or a new one)
    is dead-lettered ``after_end``, counted ``after_end`` exactly once (in the
    experiment's ingest call, under its offset skip: a retried ``process``
    counts none again), and creates no unit record."""
    r = redis.Redis.from_url(redis_url)
    _concluded(r)
    before = read_counters(r, "cl1")
    evs = [Exposure("again", "cl1", "u0", "control", T0 + 11 * HOUR, 1.0),
           Exposure("new", "cl1", "u-newer", "t1", T0 + 11 * HOUR, 1.0)]
    ing = Ingestor(r, Registry(r))
    for _ in range(2):  # the run, then its retry after a transient error
        res = ing.process("t", 0, [(100 + i, dumps(event_dict(e))) for i, e in enumerate(evs)],
                          T0 + 11 * HOUR)
        assert [d["reason"]["code"] for d in res.dead_letters] == ["after_end", "after_end"]
    after = read_counters(r, "cl1")
    assert after["after_end"] == before["after_end"] + 2
    assert after["exposures"] == before["exposures"]
    assert not r.exists(units_key("cl1"))
