"""The unit -> experiments routing index and unit-level holds (issue 24), on a
real redis-server, against the reference ``Reducer`` (streams/state/semantics.py).

* defect 4: a unit's index entries only ever live longer: an exposure to a
  short experiment must not cut the TTL that a long one gave them, or the
  unit's later metrics without experiment_id become ``unrouted`` while the
  reducer routes them (the TTL is the worker's over every running
  experiment, ``Ingestor.index_ttl``; since issue 25 it names the partition's
  time bucket, ``streams.state.unit_index``, so a bucket's expiry never
  moves earlier);
* migration (issue 25): per-unit index keys written by an older version
  (``lr:{u:<unit>}:x``) still route, until they expired;
* ``unrouted_expired``: held metrics of never-exposed units that expire are
  counted, by a batch's expiry (the ingestor's counts, which feed
  ``liftstream_events_total``) and by an idle partition's advance (the clock
  service's counts), as the reducer counts them;
* a delete (issue 24, smaller items): a sampler tick in flight across the
  delete's sweeps writes nothing back, and a re-created experiment id does
  not inherit the deleted one's routing-index markers.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import redis

from schemas.codec import dumps
from schemas.records import ExperimentConfig, Exposure, Metric
from streams.dev.simulate import make_traffic
from streams.ingest.ingestor import Ingestor
from streams.sampling.advance import TickConfig, advance
from streams.sampling.sampler import SamplerService
from streams.state.clocks import ClockService
from streams.state.keys import (
    chain_key,
    estimate_key,
    experiment_glob,
    index_bucket_key,
    index_buckets_key,
    lifecycle_key,
    unit_hold_key,
    unit_index_key,
)
from streams.state.registry import Registry
from streams.state.semantics import Reducer
from streams.state.store import (
    advance_partition,
    apply_source_batch,
    event_row,
    read_counters,
    read_units,
    record_position,
)
from streams.state.unit_index import bucket_width, index_pttl, read_index, read_view

pytestmark = pytest.mark.integration

TOPIC = "liftstream.events"
DAY_MS = 86_400_000
START = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS
TICK = TickConfig(chains=2, sweeps=30, window=40, warmup=20, min_draws=5, seed=3)


@pytest.fixture()
def r(redis_url):
    """A client of an empty redis-server."""
    c = redis.Redis.from_url(redis_url)
    c.flushall()
    yield c
    c.close()


def _msgs(first: int, events: list) -> list[tuple[int, bytes]]:
    """Events as the ingestor gets them: (offset, JSON value)."""
    return [(first + i, dumps(_as_dict(ev))) for i, ev in enumerate(events)]


def _as_dict(ev) -> dict:
    if isinstance(ev, Exposure):
        return {"type": "exposure", "event_id": ev.event_id, "experiment_id": ev.experiment_id,
                "unit_id": ev.unit_id, "variant": ev.variant, "ts": ev.ts}
    d = {"type": "metric", "event_id": ev.event_id, "unit_id": ev.unit_id,
         "metric": ev.metric, "value": ev.value, "ts": ev.ts}
    if ev.experiment_id is not None:
        d["experiment_id"] = ev.experiment_id
    return d


LONG = ExperimentConfig(experiment_id="long", window_seconds=60, correction_seconds=60,
                        lateness_seconds=0)
SHORT = ExperimentConfig(experiment_id="short", window_seconds=1, correction_seconds=0,
                         lateness_seconds=0)


def test_defect4_routing_ttl_only_extends(r):
    """u is exposed to a 60 s experiment, then (another batch, which names
    only the short one) to a 1 s one: the index key must keep the long
    experiment's TTL (2 x (W + H + L) = 240 s), not drop to the short one's
    (2 s). After the short TTL has passed, u's metric without experiment_id
    still goes to the long experiment, as in the reducer."""
    reg = Registry(r)
    for c in (LONG, SHORT):
        reg.put(c)
    ing = Ingestor(r, reg)
    red = Reducer([LONG, SHORT])
    now = int(time.time() * 1000)
    t = now - 10_000
    batches = [[Exposure("x1", "long", "u", "control", t)],
               [Exposure("x2", "short", "u", "control", t + 10)]]
    off = 0
    for evs in batches:
        ing.process(TOPIC, 0, _msgs(off, evs), now)
        red.apply_batch(f"{TOPIC}|0", evs)
        off += len(evs)
    time.sleep(2.2)  # past the short experiment's TTL
    m = [Metric("m1", "u", "value", 5.0, t + 500)]
    res = ing.process(TOPIC, 0, _msgs(off, m), int(time.time() * 1000))
    red.apply_batch(f"{TOPIC}|0", m)
    assert red.counters["unrouted"] == 0
    assert res.counts["unrouted"] == 0, "the long experiment's unit lost its routing"
    assert read_units(r, LONG)["u"].totals == red.states["long"].units["u"].totals == [5.0]
    assert index_pttl(r, TOPIC, 0, "u", "long") > 200_000


def test_defect4_routing_ttl_extends_a_shorter_key(r):
    """The other direction still works: an exposure to the long experiment
    gives the unit an entry that lives past the short one's; each entry
    lives at least the TTL after its exposure and at most one bucket
    (a quarter of the TTL, at least 1 s) longer."""
    t = int(time.time() * 1000)
    apply_source_batch(r, {"short": SHORT}, TOPIC, 0,
                       [event_row(0, Exposure("x1", "short", "u", "control", t))])
    assert 0 < index_pttl(r, TOPIC, 0, "u", "short") <= 2_000 + bucket_width(2_000)
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(1, Exposure("x2", "long", "u", "control", t + 1))])
    assert 200_000 < index_pttl(r, TOPIC, 0, "u", "long") <= 240_000 + bucket_width(240_000)
    assert read_index(r, TOPIC, 0, ["u"], ["long", "short"])["u"] == {
        "short": f"{TOPIC}|0|0", "long": f"{TOPIC}|0|1"}


def test_index_ttl_covers_every_running_experiment(r):
    """The TTL every exposure gives its unit's index key (a plain PEXPIRE,
    no read) is the worker's over every experiment not concluded, whatever
    the batch names: a longer one registered since the ingestor last read
    the registry raises it with its first batch, and it stays raised; a
    concluded one stops counting once the registry reads it concluded."""
    reg = Registry(r, ttl=60)
    reg.put(SHORT)
    ing = Ingestor(r, reg)
    assert ing.index_ttl({"short": SHORT}) == 2_000  # 2 x (W + H + L) = 2 x 1 s
    reg.put(LONG)  # within the registry's ttl: the ingestor has not read it yet
    assert ing.index_ttl({"long": LONG}) == 240_000
    assert ing.index_ttl({"short": SHORT}) == 240_000, "a batch of the short one only"
    fresh = Ingestor(r, Registry(r, ttl=0))  # reads the registry every call
    assert fresh.index_ttl({"short": SHORT}) == 240_000
    r.set(lifecycle_key("long"), "concluded")
    assert fresh.index_ttl({"short": SHORT}) == 2_000


def test_routing_error_reply_keeps_the_connection_in_step(r):
    """An error reply among the routing's pipelined commands (read by the
    connection's hiredis reader straight off the socket): the batch raises
    Redis's error after every reply was read, the other commands took
    effect, and the pooled connection answers the next commands with their
    own replies, not the rest of the failed batch's."""
    t = int(time.time() * 1000)
    r.set(unit_hold_key("bad"), "not a hash")  # its HGETALL answers WRONGTYPE
    rows = [event_row(0, Exposure("x0", "long", "ok", "control", t)),
            event_row(1, Metric("m1", "bad", "value", 1.0, t)),
            event_row(2, Exposure("x2", "long", "ok2", "control", t))]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        apply_source_batch(r, {"long": LONG}, TOPIC, 0, rows)
    assert read_index(r, TOPIC, 0, ["ok", "ok2"], ["long"]) == {
        "ok": {"long": f"{TOPIC}|0|0"}, "ok2": {"long": f"{TOPIC}|0|2"}}
    assert 200_000 < index_pttl(r, TOPIC, 0, "ok", "long") <= 240_000 + bucket_width(240_000)
    assert r.get(unit_hold_key("bad")) == b"not a hash" and r.ping()


def _as_legacy(r, units: list[str]) -> None:
    """Turn the partition's routing index into the per-unit keys a version
    before issue 25 wrote (``lr:{u:<unit>}:x``, experiment -> position, the
    TTL its PEXPIRE gave), as a worker of this version finds them."""
    got = read_index(r, TOPIC, 0, units, ["long", "short"])
    for k in r.scan_iter(match="lr:{x:*"):
        r.delete(k)
    for u, idx in got.items():
        if idx:
            r.hset(unit_index_key(u), mapping=idx)
            r.pexpire(unit_index_key(u), 240_000)


def test_migration_routes_by_the_per_unit_keys_of_an_older_version(r):
    """State written by main before issue 25 (per-unit index keys, a
    partition clock): this version reads those keys as a fallback for one
    TTL after its first batch on the partition, so the unit's metric without
    experiment_id still routes to its experiment, and a later exposure does
    not displace the recorded first position. Once the fallback window
    closed the old keys are not read (the same metric would be held)."""
    t = int(time.time() * 1000)
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(0, Exposure("x0", "long", "u", "control", t))])
    _as_legacy(r, ["u"])
    assert r.exists(unit_index_key("u")) and not r.exists(index_buckets_key(TOPIC, 0))
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(1, Metric("m1", "u", "value", 5.0, t + 10))])
    assert read_units(r, LONG)["u"].totals == [5.0], "the old key did not route"
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(2, Exposure("x2", "long", "u", "control", t + 20))])
    assert read_view(r, TOPIC, 0, int(time.time() * 1000)).legacy
    assert read_index(r, TOPIC, 0, ["u"], ["long"])["u"] == {"long": f"{TOPIC}|0|0"}
    r.hset(index_buckets_key(TOPIC, 0), "legacy", 1)  # the window closed
    rejected: list = []
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(3, Metric("m3", "v", "value", 1.0, t + 30))], rejected=rejected)
    r.hset(unit_index_key("v"), "long", f"{TOPIC}|0|0")  # an old key read no more
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(4, Metric("m4", "v", "value", 1.0, t + 40))], rejected=rejected)
    assert [why for _, why in rejected] == ["unrouted", "unrouted"]


def test_a_fresh_partition_reads_no_per_unit_keys(r):
    """A partition without a clock (no older version wrote its state) never
    reads per-unit keys: its first batch closes the fallback window."""
    t = int(time.time() * 1000)
    apply_source_batch(r, {"long": LONG}, TOPIC, 0,
                       [event_row(0, Exposure("x0", "long", "u", "control", t))])
    assert not read_view(r, TOPIC, 0, t).legacy
    record_position(r, TOPIC, 1, 0, t)  # a partition an older version ran
    assert read_view(r, TOPIC, 1, t).legacy


def test_unrouted_expired_is_counted(r):
    """Held metrics of a unit never exposed expire after ``hold_seconds`` of
    event time: the batch that expires them counts them in the ingestor's
    counts (``liftstream_events_total{outcome="unrouted_expired"}``), an
    idle advance in the clock service's, both as the reducer counts them."""
    cfg = ExperimentConfig(experiment_id="e1", window_seconds=60, correction_seconds=60)
    reg = Registry(r)
    reg.put(cfg)
    ing = Ingestor(r, reg)
    red = Reducer([cfg])
    now = int(time.time() * 1000)
    t = now - 3 * DAY_MS
    evs = [[Metric("m1", "ghost", "value", 1.0, t), Metric("m2", "ghost", "value", 2.0, t + 1)],
           [Exposure("x1", "e1", "u", "control", t + DAY_MS + 1000)]]  # clock past the hold
    counts: Counter = Counter()
    off = 0
    for batch in evs:
        counts.update(ing.process(TOPIC, 0, _msgs(off, batch), now).counts)
        red.apply_batch(f"{TOPIC}|0", batch)
        off += len(batch)
    assert red.counters["unrouted_expired"] == 2
    assert counts["unrouted"] == 2
    assert counts["unrouted_expired"] == 2

    # an idle advance expires them too: partition 1, through the clock service
    m = [Metric("m3", "ghost2", "value", 1.0, t)]
    ing.process(TOPIC, 1, _msgs(0, m), now)
    red.apply_batch(f"{TOPIC}|1", m)
    seen: Counter = Counter()
    svc = ClockService(r, TOPIC, 0, lambda: [cfg], on_count=seen.update)
    high = {0: off, 1: 1}
    svc.tick(high, {0: None, 1: None}, now)  # the idle timer starts
    svc.tick(high, {0: None, 1: None}, now + 1)  # idle: the clock moves to the wall clock
    red.advance(f"{TOPIC}|1", now + 1)
    assert red.counters["unrouted_expired"] == 3
    assert seen["unrouted_expired"] == 1

    # the store's own call reports them the same way as a batch does
    m = [Metric("m4", "ghost3", "value", 1.0, t)]
    ing.process(TOPIC, 2, _msgs(0, m), now)
    rejected: list = []
    advance_partition(r, [cfg], TOPIC, 2, now, rejected=rejected)
    assert [why for _, why in rejected] == ["unrouted_expired"]


def test_defect_unrouted_losses_are_kept_per_partition(r):
    """Metrics without experiment_id that no exposure ever routed belong to
    no experiment (no data_quality can show them): Redis counts them per
    source partition (``ingest_losses``, shown in /readyz and /metrics by
    every worker, across restarts), each once: over the hold bound (with the
    batch's position: a replay adds none), expired by a batch's clock (with
    the deletes) or by an idle advance."""
    from streams.state.store import ingest_losses, record_position

    cfg = ExperimentConfig(experiment_id="e1", window_seconds=60, correction_seconds=60)
    reg = Registry(r)
    reg.put(cfg)
    ing = Ingestor(r, reg, hold_max=1)
    now = int(time.time() * 1000)
    t = now - 3 * DAY_MS
    over = _msgs(0, [Metric("m1", "ghost", "value", 1.0, t),
                     Metric("m2", "ghost", "value", 2.0, t + 1)])  # m2: over the bound
    assert ing.process(TOPIC, 0, over, now).counts["unrouted_expired"] == 1
    ing.process(TOPIC, 0, over, now)  # a replay
    assert ingest_losses(r, TOPIC)["unrouted_lost"] == {0: 1}
    late = _msgs(2, [Exposure("x1", "e1", "u", "control", t + DAY_MS + 1000)])
    assert ing.process(TOPIC, 0, late, now).counts["unrouted_expired"] == 1  # m1 expired
    ing.process(TOPIC, 0, late, now)
    m = _msgs(0, [Metric("m3", "ghost2", "value", 1.0, t)])
    ing.process(TOPIC, 1, m, now)
    advance_partition(r, [cfg], TOPIC, 1, now)
    assert ingest_losses(r, TOPIC) == {"retention_lost": {},
                                       "unrouted_lost": {0: 2, 1: 1}}
    # a batch retried before its position was recorded counts its drops once
    record_position(r, TOPIC, 2, 7, None, unrouted_lost=3)
    record_position(r, TOPIC, 2, 7, None, unrouted_lost=3)
    assert ingest_losses(r, TOPIC)["unrouted_lost"][2] == 3


# ---------------------------------------------------------------- delete


def _sampled(r, eid: str):
    """An experiment with traffic and a first estimate, and its sampler."""
    reg = Registry(r)
    cfg, evs, _ = make_traffic(600, 6, eid, 5, 86_400, START)
    reg.put(cfg)
    now = int(time.time() * 1000)
    ing = Ingestor(r, reg)
    ing.process("t", 0, [(i, dumps(e)) for i, e in enumerate(evs)], now)
    ing.settle_quiet("t", 0, now, now)
    s = SamplerService(r, Registry(r), TICK, xp=np)
    s.own(eid)
    assert s.tick(), "a first estimate"
    return reg, s


def test_a_tick_in_flight_across_a_delete_writes_nothing_back(r):
    """The sampler loaded the experiment (its tick is in flight) when it was
    deleted (both sweeps); the tick's chains, estimates and history must not
    recreate the experiment's keys, and it publishes nothing."""
    reg, s = _sampled(r, "gone")
    r.incr("lr:{e:gone}:dirty_seq")  # new data: due again
    snaps, stored = s.load(s.due())  # the tick is in flight ...
    reg.delete("gone")  # ... across the delete and its second sweep
    reg.delete("gone")
    assert not list(r.scan_iter(match=experiment_glob("gone")))
    recs, chains = advance(snaps, stored, TICK, int(time.time() * 1000))
    assert recs
    assert s.store(chains, recs) == []
    assert sorted(r.scan_iter(match=experiment_glob("gone"))) == []


def test_a_tick_in_flight_across_a_recreate_writes_nothing_back(r):
    """Deleted and re-created under the same id while the tick was in flight:
    the old experiment's chains and estimates must not land in the new one."""
    reg, s = _sampled(r, "again")
    r.incr("lr:{e:again}:dirty_seq")
    snaps, stored = s.load(s.due())
    cfg = reg.get("again", fresh=True)
    reg.delete("again")
    reg.put(cfg)  # the same id again, no state yet
    recs, chains = advance(snaps, stored, TICK, int(time.time() * 1000))
    assert s.store(chains, recs) == []
    assert r.get(chain_key("again", "value")) is None
    assert r.get(estimate_key("again", "value", "treatment")) is None


def test_a_recreated_experiment_ignores_the_deleted_ones_index(r):
    """u was exposed to e1, e1 was deleted and registered again (a new
    experiment under the old id): u's metric without experiment_id is no
    event of the new e1 (the reducer of the new config holds it unrouted),
    not a held metric that will count as lost in its data_quality."""
    cfg = ExperimentConfig(experiment_id="e1", window_seconds=60, correction_seconds=60)
    reg = Registry(r)
    reg.put(cfg)
    ing = Ingestor(r, reg)
    now = int(time.time() * 1000)
    t = now - 10_000
    ing.process(TOPIC, 0, _msgs(0, [Exposure("x1", "e1", "u", "control", t)]), now)
    reg.delete("e1")
    reg.put(cfg)
    m = [Metric("m1", "u", "value", 5.0, t + 1000)]
    res = ing.process(TOPIC, 0, _msgs(1, m), now)
    red = Reducer([cfg])
    red.apply_batch(f"{TOPIC}|0", m)
    assert red.counters["unrouted"] == 1
    assert res.counts["unrouted"] == 1
    assert sum(read_counters(r, "e1").values()) == 0


def test_a_delete_walks_the_keyspace_once(r):
    """``delete_state`` finds the experiment's keys and every unit's routing
    index in ONE walk of the keyspace (SCAN visits every key whatever its
    MATCH: one walk per pattern was two), and keeps the fences."""
    from streams.state.keys import fence_key
    from streams.state.registry import delete_state

    p = r.pipeline(transaction=False)
    for u in range(1500):
        p.hset(unit_index_key(f"u{u}"), mapping={"gone": "*", "kept": "*"})
        p.set(f"lr:{{e:gone}}:k{u}", 1)
        p.set(f"lr:{{e:kept}}:k{u}", 1)
    p.hset(fence_key("gone", "t|0"), mapping={"epoch": 2, "seq": 5})
    bucket = index_bucket_key("t", 0, 240_000, 0)
    p.hset(bucket, mapping={f"u{u}": "gone * kept *" for u in range(3)} | {"u3": "gone t|0|1"})
    p.execute()
    walk = -(-r.dbsize() // 100)  # SCAN calls of one walk at COUNT 100, about
    r.config_resetstat()
    assert delete_state(r, "gone", batch=100) == 1500
    calls = r.info("commandstats")["cmdstat_scan"]["calls"]
    assert calls <= walk + 2, f"{calls} SCAN calls: more than one walk of ~{walk}"
    assert r.hgetall(unit_index_key("u7")) == {b"kept": b"*"}
    assert r.hgetall(bucket) == {b"u0": b"kept *", b"u1": b"kept *", b"u2": b"kept *"}
    assert r.exists("lr:{e:kept}:k7") and not r.exists("lr:{e:gone}:k7")
    assert r.hgetall(fence_key("gone", "t|0")) == {b"epoch": b"2", b"seq": b"5"}


def test_defect_the_second_sweep_spares_a_recreated_experiment(r):
    """A tombstone deletes an experiment at once and again after every
    worker's config cache expired (``Registry.sweep``). Registered again
    under the same id in between, it is a new experiment: the second sweep
    must not delete it (its config, its generation, its state), as
    ``Registry.delete`` (what the sweep was) does."""
    cfg = ExperimentConfig(experiment_id="again", window_seconds=60, correction_seconds=60)
    reg = Registry(r)
    reg.put(cfg)
    reg.delete("again")  # the tombstone
    reg.put(cfg)  # re-created before the second sweep
    r.set("lr:{e:again}:dirty_seq", 3)  # its state
    assert reg.sweep("again") is None
    assert reg.get("again", fresh=True) is not None and "again" in reg.ids()
    assert r.exists("lr:{e:again}:gen") and r.get("lr:{e:again}:dirty_seq") == b"3"
    reg.delete("again")
    assert reg.sweep("again") == 0  # still gone: swept


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "redis-py"])
def test_defect_concurrent_index_writers_never_drop_an_entry(redis_url, packed):
    """A stale owner (lost the partition at a rebalance, still finishing a
    batch) and the new owner both merge the same unit's field of the current
    bucket: writer A reads it (the batch's first reads), writer B reads and
    writes experiment b, then A writes experiment a. The field is a
    read-modify-write, so A's HSET computed from its older read overwrote
    B's merge (b lost: the unit's later metrics without experiment_id no
    longer route to b). A's write is now refused (WATCH on the bucket) and
    merged again from a fresh read: both entries stay."""
    from streams.state.store import _index_round_trip, partition_start

    r = redis.Redis.from_url(redis_url, decode_responses=not packed)
    r.flushall()
    ttl = 60_000
    *_, view_a = partition_start(r, "t", 0, (), ["u"], ttl)
    *_, view_b = partition_start(r, "t", 0, (), ["u"], ttl)
    _index_round_trip(r, [], {("u", "b"): 7}, "t", 0, ttl, view_b, ["b"])
    _index_round_trip(r, [], {("u", "a"): 5}, "t", 0, ttl, view_a, ["a"])
    got = read_index(r, "t", 0, ["u"], ["a", "b"])
    assert got == {"u": {"a": "t|0|5", "b": "t|0|7"}}
    clients = r.execute_command("CLIENT", "LIST")
    clients = clients if isinstance(clients, str) else clients.decode()
    assert " watch=" not in clients or clients.count(" watch=0") == clients.count(" watch=")
    r.close()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "redis-py"])
def test_a_merge_overtaken_every_time_gives_up_with_a_clear_error(redis_url, packed,
                                                                   monkeypatch):
    """Another writer changes the bucket between every read and EXEC: the
    merge is tried ``MAX_ATTEMPTS`` times, then ``IndexContention``, and
    nothing of it was written."""
    from streams.state import unit_index
    from streams.state.store import _index_round_trip

    r = redis.Redis.from_url(redis_url, decode_responses=not packed)
    r.flushall()
    real, tries = unit_index.add_writes, []

    def overtaken(p, topic, partition, *args):
        name = real(p, topic, partition, *args)
        r.hset(unit_index._bucket_key(topic, partition, name), "other", "x t|0|1")
        tries.append(name)
        return name

    monkeypatch.setattr(unit_index, "add_writes", overtaken)
    with pytest.raises(unit_index.IndexContention):
        _index_round_trip(r, [], {("u", "a"): 5}, "t", 0, 60_000, None, ["a"])
    assert len(tries) == unit_index.MAX_ATTEMPTS
    assert r.hget(unit_index._bucket_key("t", 0, tries[0]), "u") is None
    r.close()


@pytest.mark.parametrize("when", ["after_scan", "after_read"])
@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "str"])
def test_defect_a_delete_never_drops_another_experiments_entry(redis_url, decode, when,
                                                                monkeypatch):
    """A delete of experiment a rewrites each index field that names a
    (``unit_index.drop_experiment``). An owner merging experiment b into the
    same unit's field between the delete's read and its write lost b: the
    delete wrote the field as it had read it, less a (here: deleted it, a
    being all it had read), and the unit's later metrics without
    experiment_id no longer routed to b. The delete now reads the fields
    again under WATCH of the bucket and rewrites them in MULTI/EXEC, read
    again if refused: b stays whether the merge lands after the scan or
    after that read."""
    from streams.state import unit_index

    r = redis.Redis.from_url(redis_url, decode_responses=decode)
    r.flushall()
    key = unit_index._bucket_key("t", 0, "60000:0")
    r.hset(key, mapping={"u": unit_index.pack({"a": "t|0|5"}),
                         "w": unit_index.pack({"a": "t|0|6", "c": "t|0|9"})})
    other = redis.Redis.from_url(redis_url)
    real_scan, real_unpack, scanned, merges = r.hscan_iter, unit_index.unpack, [], []

    def merge() -> None:  # an owner's merge of b into u's field
        merges.append(1)
        other.hset(key, "u", unit_index.pack({"a": "t|0|5", "b": "t|0|7"}))

    def scan(*args, **kw):
        yield from list(real_scan(*args, **kw))
        scanned.append(1)
        if when == "after_scan":
            merge()

    def unpack(value):
        if when == "after_read" and scanned and not merges:
            merge()
        return real_unpack(value)

    monkeypatch.setattr(r, "hscan_iter", scan)
    monkeypatch.setattr(unit_index, "unpack", unpack)
    unit_index.drop_experiment(r, key, "a")
    assert merges
    got = {unit_index._str(f): real_unpack(unit_index._str(v))
           for f, v in other.hgetall(key).items()}
    assert got == {"u": {"b": "t|0|7"}, "w": {"c": "t|0|9"}}
    other.close()
    r.close()
