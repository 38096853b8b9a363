"""The owner's fenced commit and the sharded read model (issue 25), against a
real redis-server.

* ``streams.state.partition_store.commit``: one MULTI/EXEC per experiment
  and batch carries the writes, the applied offset, the source's commit
  sequence and ``dirty_seq``; a zombie owner (stopped after its WATCH and
  fence check, resumed after a new owner claimed and committed) has its
  EXEC refused and nothing doubled; a Redis that lost commits is detected.
* ``streams.state.store.read_snapshot`` adds the sources' shards
  (``keys.shard_key``) to the base (``cells``/``meta``: the state the Lua
  path and older versions wrote) in sorted source order: the read model is
  the same whatever order the owners committed in, and an older state with
  only the base reads as before (its shared cells are the base shard).
"""

from __future__ import annotations

import random

import pytest
import redis

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.state import keys as rk
from streams.state.partition_store import (
    Commit,
    LostCommits,
    WriteSet,
    _unskipped,
    claim_fence,
    commit,
    put_shard,
    read_sightings,
    shard_mapping,
)
from streams.state.semantics import Reducer, UnitState
from streams.state.store import (
    Fenced,
    apply_batch,
    claim_partition,
    combine_text_cells,
    decode_unit,
    encode_unit,
    encode_units,
    read_pending,
    read_snapshot,
)
from streams.state.wire import send_raw
from tests.support.streaming_harness import bits

T0 = 1_700_000_000_000

SRC0, SRC1 = "liftstream.events|0", "liftstream.events|1"


@pytest.fixture()
def fresh(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    yield r
    r.close()


def _cfg() -> ExperimentConfig:
    return ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),),
                            window_seconds=10, bucket_seconds=2)


def _batch(n: int) -> WriteSet:
    """A stand-in for a batch's state changes: integer increments (which a
    doubled commit would show) and an absolute shard value."""
    w = WriteSet()
    w.add("hincrby", rk.meta_key("e1"), "c:exposures", n)
    w.add("hincrby", rk.meta_key("e1"), "exposed:control", n)
    return w


def test_commit_carries_offset_sequence_and_dirty_seq(fresh):
    epoch = claim_partition(fresh, "liftstream.events", 0)
    seq = claim_fence(fresh, "e1", SRC0, epoch)
    assert seq == 0
    seq = commit(fresh, "e1", SRC0, epoch, seq, _batch(3), offset=41)
    seq = commit(fresh, "e1", SRC0, epoch, seq, _batch(2), offset=42)
    assert seq == 2
    assert fresh.hget(rk.offsets_key("e1"), SRC0) == b"42"
    assert fresh.hget(rk.fence_key("e1", SRC0), "seq") == b"2"
    assert fresh.get(rk.dirty_seq_key("e1")) == b"2"
    assert fresh.hget(rk.meta_key("e1"), "c:exposures") == b"5"


def test_zombie_exec_refused_after_new_owner_claimed_and_committed(fresh, redis_url):
    """Owner A passes its WATCH and fence check, then stalls (SIGSTOP in the
    worker); B claims the partition and the experiment's fence and commits
    the same batch; A resumes: its EXEC is refused as a whole (Fenced),
    nothing is doubled, and A cannot claim back."""
    a = claim_partition(fresh, "liftstream.events", 0)
    seq_a = claim_fence(fresh, "e1", SRC0, a)
    seq_a = commit(fresh, "e1", SRC0, a, seq_a, _batch(1), offset=9)
    zombie = Commit(fresh, "e1", SRC0, a, seq_a)
    zombie.prepare()  # WATCH + check passed ... then stopped

    other = redis.Redis.from_url(redis_url)  # the new owner's own connection
    b = claim_partition(other, "liftstream.events", 0)
    seq_b = claim_fence(other, "e1", SRC0, b)
    assert seq_b == 1  # continues A's sequence
    commit(other, "e1", SRC0, b, seq_b, _batch(4), offset=10)

    with pytest.raises(Fenced):
        zombie.execute(_batch(4), offset=10)  # resumed: refused
    assert fresh.hget(rk.meta_key("e1"), "c:exposures") == b"5"  # 1 + 4, not 9
    assert fresh.hget(rk.offsets_key("e1"), SRC0) == b"10"
    with pytest.raises(Fenced):
        commit(fresh, "e1", SRC0, a, seq_a, _batch(4), offset=10)
    with pytest.raises(Fenced):
        claim_fence(fresh, "e1", SRC0, a)  # the fence never goes down
    other.close()


def test_one_sources_claim_does_not_fence_another_source(fresh):
    """Fences are per (experiment, source): a new owner of partition 1 does
    not abort partition 0's owner's commits to the same experiment."""
    a = claim_partition(fresh, "liftstream.events", 0)
    seq_a = claim_fence(fresh, "e1", SRC0, a)
    c = Commit(fresh, "e1", SRC0, a, seq_a)
    c.prepare()
    b = claim_partition(fresh, "liftstream.events", 1)
    commit(fresh, "e1", SRC1, b, claim_fence(fresh, "e1", SRC1, b), _batch(1), offset=1)
    assert c.execute(_batch(1), offset=1) == 1
    assert fresh.hget(rk.meta_key("e1"), "c:exposures") == b"2"


def test_lost_commits_are_detected(fresh):
    """A Redis that comes back behind the owner's commits (here: the fence's
    sequence rolled back, as a restart from an older snapshot does) refuses
    the next commit with LostCommits, writing nothing."""
    a = claim_partition(fresh, "liftstream.events", 0)
    seq = claim_fence(fresh, "e1", SRC0, a)
    seq = commit(fresh, "e1", SRC0, a, seq, _batch(1), offset=5)
    seq = commit(fresh, "e1", SRC0, a, seq, _batch(1), offset=6)
    fresh.hset(rk.fence_key("e1", SRC0), "seq", 1)  # the last commit lost
    fresh.hset(rk.offsets_key("e1"), SRC0, 5)
    with pytest.raises(LostCommits) as e:
        commit(fresh, "e1", SRC0, a, seq, _batch(1), offset=7)
    assert (e.value.expected, e.value.found) == (2, 1)
    assert fresh.hget(rk.offsets_key("e1"), SRC0) == b"5"
    assert fresh.hget(rk.meta_key("e1"), "c:exposures") == b"2"


def _shard_writes(src: str, fields: dict[str, str]) -> WriteSet:
    w = WriteSet()
    w.add("hset", rk.shard_key("e1", src), mapping=fields)
    w.add("sadd", rk.shards_key("e1"), src)
    return w


def test_shards_are_summed_after_the_base_in_source_order(fresh):
    """Older state (the Lua path's shared cells, act_sum, max_ts) is the base
    shard; each source's shard is added in sorted source order, whichever
    owner committed first: the same bits either way."""
    cfg = _cfg()
    rng = random.Random(7)
    vals = {s: [rng.uniform(-1e6, 1e6) for _ in range(5)] for s in (SRC0, SRC1, "b")}
    base = f"2 {vals['b'][0]!r} {vals['b'][1]!r}"  # a 3-number cell from before covariates

    def shard(s: str, n: int) -> dict[str, str]:
        v = vals[s]
        return {"rev|control|7": f"{n} {v[0]!r} {v[1]!r} 1 {v[2]!r} {v[3]!r} {v[4]!r} 0.5",
                "act_sum:7": repr(v[2])}

    snaps = []
    for order in ((SRC0, SRC1), (SRC1, SRC0)):
        fresh.flushall()
        fresh.hset(rk.cells_key("e1"), "rev|control|7", base)
        fresh.hset(rk.meta_key("e1"), mapping={"act_sum:7": repr(vals["b"][2]),
                                                "max_ts": "1500"})
        for i, s in enumerate(order):
            fresh.hset(rk.meta_key("e1"), f"max_ts:{s}", 1000 + i)
            e = claim_partition(fresh, "liftstream.events", int(s[-1]))
            commit(fresh, "e1", s, e, claim_fence(fresh, "e1", s, e),
                   _shard_writes(s, shard(s, 3 + (s == SRC1))), offset=i)
        snaps.append(read_snapshot(fresh, cfg))
    assert snaps[0] == snaps[1]
    got = snaps[0].cells["rev"][0][7]
    want = combine_text_cells(combine_text_cells(base, shard(SRC0, 3)["rev|control|7"]),
                              shard(SRC1, 4)["rev|control|7"])
    assert got == tuple(float(x) if i not in (0, 3) else int(x)
                        for i, x in enumerate(want.split(" ")))
    assert got[0] == 2 + 3 + 4 and got[3] == 2
    assert got[1] == (vals["b"][0] + vals[SRC0][0]) + vals[SRC1][0]
    assert snaps[0].activity_sum[7] == (vals["b"][2] + vals[SRC0][2]) + vals[SRC1][2]
    assert snaps[0].max_ts == 1500


def test_state_with_only_the_base_reads_as_before(fresh):
    """An older Redis state (no shard set) reads exactly as the base, bits
    included (nothing is added to a value that has no second shard)."""
    cfg = _cfg()
    fresh.hset(rk.cells_key("e1"), "rev|control|7", "1 -0.0 0.0")
    fresh.hset(rk.meta_key("e1"), mapping={"max_ts": "77", "act_sum:7": "-0.0"})
    snap = read_snapshot(fresh, cfg)
    assert snap.cells["rev"][0][7] == (1, -0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
    assert str(snap.cells["rev"][0][7][1]) == "-0.0"
    assert snap.max_ts == 77


# ---------------------------------------------------------------- sharded rules

def _keyed_streams(seed: int, n_parts: int) -> dict[int, list[list]]:
    """Per partition, its events cut into batches: units keyed to one
    partition (key = unit_id), exposures with and without pre_activity,
    in-window metrics, stragglers after maturation (corrections), re-sends
    (duplicates). Each partition's own order and cuts are fixed; only the
    interleaving of the partitions varies between the folds."""
    rng = random.Random(seed)
    out: dict[int, list[list]] = {}
    for p in range(n_parts):
        evs = []
        for i in range(rng.randint(1, 8)):
            u, t0 = f"u{p}_{i}", rng.randint(0, 20_000)
            evs.append((t0, Exposure(f"x{p}{i}", "e1", u, rng.choice(("control", "t")),
                                     T0 + t0, rng.choice((None, 0.0, 3.0, 9.5)))))
            for j in range(rng.randint(0, 5)):
                t = t0 + rng.randint(0, 9_999)
                m = Metric(f"m{p}{i}{j}", u, "rev", rng.uniform(-3, 7), T0 + t, "e1")
                evs.append((t, m))
                if rng.random() < 0.3:
                    evs.append((t + rng.randint(10_000, 25_000), m))  # straggler / re-send
        evs.sort(key=lambda x: x[0])
        flat = [e for _, e in evs]
        cuts, k = [], 0
        while k < len(flat):
            n = rng.randint(1, 4)
            cuts.append(flat[k:k + n])
            k += n
        out[p] = cuts
    return out


def _fold(streams: dict[int, list[list]], order: list[int], sharded: bool) -> Reducer:
    red = Reducer([_cfg_age()], sharded=sharded)
    pos = dict.fromkeys(streams, 0)
    for p in order:
        red.apply_batch(f"liftstream.events|{p}", streams[p][pos[p]])
        pos[p] += 1
    for p in streams:
        red.advance(f"liftstream.events|{p}", T0 + 200_000)
    return red


def _orders(streams: dict[int, list[list]], rng: random.Random) -> list[list[int]]:
    """Whole partitions first, reversed, and a random merge."""
    seq = [p for p in sorted(streams) for _ in streams[p]]
    merged = seq[:]
    rng.shuffle(merged)
    return [seq, [p for p in sorted(streams, reverse=True) for _ in streams[p]], merged]


def _cfg_age() -> ExperimentConfig:
    return ExperimentConfig(experiment_id="e1", variants=("control", "t"),
                            metrics=(MetricSpec("rev"),), window_seconds=10, bucket_seconds=2,
                            lateness_seconds=1, dedupe_seconds=5, correction_seconds=20,
                            hold_seconds=30, exposure_age_bins=(0, 3, 6))


@pytest.mark.parametrize("seed", range(12))
def test_sharded_fold_is_bit_identical_for_any_interleaving(seed):
    """With the float aggregates split by source and added in source order,
    every interleaving of the same partition batches gives the same
    snapshot bit for bit (counts and sums alike), not just up to rounding."""
    streams = _keyed_streams(seed, 1 + seed % 4)
    snaps = [bits(_fold(streams, o, True).snapshots()) for o in _orders(streams,
                                                                         random.Random(seed))]
    assert snaps[0] == snaps[1] == snaps[2]


@pytest.mark.parametrize("seed", range(4))
def test_unsharded_fold_is_unchanged(seed):
    """One partition: the sharded fold equals the unsharded one (the Lua
    path's layout) bit for bit: a single shard adds nothing."""
    streams = _keyed_streams(seed, 1)
    order = [0] * len(streams[0])
    assert bits(_fold(streams, order, True).snapshots()) == \
        bits(_fold(streams, order, False).snapshots())


@pytest.mark.parametrize("seed", range(6))
def test_redis_shards_read_back_equal_the_sharded_fold(fresh, seed):
    """The shards as the owners write them (``shard_mapping`` through a
    fenced commit), read back by ``read_snapshot``, give the reducer's
    float aggregates bit for bit: Redis adds them in the reducer's order."""
    streams = _keyed_streams(100 + seed, 1 + seed % 3)
    red = _fold(streams, _orders(streams, random.Random(seed))[2], True)
    st = red.states["e1"]
    for src in sorted(st.shards, reverse=True):  # commit order does not matter
        fresh.hset(rk.meta_key("e1"), f"max_ts:{src}", st.shards[src].max_ts)
        p = int(src.rsplit("|", 1)[1])
        e = claim_partition(fresh, "liftstream.events", p)
        commit(fresh, "e1", src, e, claim_fence(fresh, "e1", src, e),
               put_shard(WriteSet(), "e1", src, shard_mapping(st, st.shards[src])), offset=1)
    got, want = read_snapshot(fresh, _cfg_age()), st.snapshot()
    for f in ("cells", "age_cells", "activity_sum", "max_ts"):
        assert bits(getattr(got, f)) == bits(getattr(want, f)), f


# ---------------------------------------------------------------- record formats

#: unit records ingest.lua wrote (its last version, before issue 25 deleted it):
#: (config, unit, record hex); versions 1 and 2 (``plain``) and 3 (``age``, with
#: and without pre values), matured or not
LUA_RECORDS = (
    ("plain", "u0",  # version 1, matured 1
     "01000003000100008040fc54c94100a07357febc7842d9cef753e3a5124085eb"
     "51b81e052040"),
    ("plain", "u1",  # version 2, matured 1
     "02000007000100008041fc54c94100a01658febc784202000000000000000000"
     "04560e2db29d18400000000000000440000000000000f87f"),
    ("plain", "u3",  # version 1, matured 0
     "01010003000000000043fc54c9410050cb59febc78420e2db29defa71c40c3f5"
     "285c8fc20240"),
    ("plain", "u9",  # version 2, matured 1
     "02000007000100000040fc54c94100b0ee56febc78420200022b8716d98e2140"
     "6891ed7c3fb51a400000000000000440000000000000f87f"),
    ("age", "u0",  # version 3, matured 1
     "03000003000100008040fc54c94100a07357febc7842f2d24d62105829400000"
     "00000000000023dbf97e6a3c104060e5d022db39214001000000030400"),
    ("age", "u1",  # version 3, matured 1
     "03000007000100008041fc54c94100a01658febc784204560e2db29d18400000"
     "00000000044004560e2db29d1840000000000000000000000000000000000100"
     "0100031d00"),
    ("age", "u3",  # version 3, matured 0
     "03010003000000000043fc54c9410050cb59febc7842f853e3a59b04234079e9"
     "263108ac1e4054e3a59bc420e0bfc3f5285c8fc2024001000000030400"),
    ("age", "u5",  # version 3, matured 0
     "03010007000000008042fc54c94100604b59febc7842295c8fc2f528f23f0000"
     "000000000440295c8fc2f528f23f000000000000000000000000000000000100"
     "0100031d00"),
)


def _plain_cfg() -> ExperimentConfig:
    return ExperimentConfig(experiment_id="e1", variants=("control", "t"),
                            metrics=(MetricSpec("rev"), MetricSpec("clicks")), window_seconds=10,
                            bucket_seconds=2, lateness_seconds=1, correction_seconds=20)


@pytest.mark.parametrize("name,uid,hexrec", LUA_RECORDS)
def test_encode_unit_writes_the_lua_records_byte_for_byte(name, uid, hexrec):
    """``encode_unit(decode_unit(record))`` is the record ingest.lua wrote,
    for versions 1 (no pre), 2 (pre values) and 3 (exposure age), matured
    or not: the owner's commit keeps the binary formats (store.py note 1),
    so state from before issue 25 reads and is rewritten unchanged."""
    cfg = _cfg_age() if name == "age" else _plain_cfg()
    rec = bytes.fromhex(hexrec)
    assert encode_unit(decode_unit(rec, cfg), cfg) == rec, uid


def test_encode_units_is_encode_unit_of_the_dirty_units():
    """``encode_units`` (the owner's commit: the common record packed with
    the batch's lookups hoisted) writes ``encode_unit``'s bytes for every
    version, skips the units the rules did not change, and refuses a
    variant the config lacks as ``encode_unit`` does."""
    for name in ("plain", "age"):
        cfg = _cfg_age() if name == "age" else _plain_cfg()
        units, want = {}, {}
        for k, (n, uid, hexrec) in enumerate(LUA_RECORDS):
            if n != name:
                continue
            u = decode_unit(bytes.fromhex(hexrec), cfg)
            u.dirty = k % 3 != 2
            units[f"{uid}-{k}"] = u
            if u.dirty:
                want[f"{uid}-{k}"] = bytes.fromhex(hexrec)
        got = encode_units(units, cfg)
        assert got == want and list(got) == list(want)
    cfg = _plain_cfg()
    stray = UnitState("nope", 0, 0, T0, [1.0, 2.0], pre=[None, None], dirty=True)
    with pytest.raises(ValueError):
        encode_units({"u": stray}, cfg)


def _row(off: int, kind: str = "m") -> tuple:
    return (off, kind, f"e{off}", "e1", "u1", "rev", T0, 1.0, None)


@pytest.mark.parametrize("offs,stored,kept", [
    ([(1, "x"), (2, "m"), (3, "h"), (5, "m")], None, [1, 2, 3, 5]),
    ([(4, "x"), (5, "m")], 3, [4, 5]),
    # a released metric goes with the exposure before it
    ([(2, "x"), (3, "h"), (4, "m"), (5, "x")], 3, [4, 5]),
    ([(4, "x"), (4, "m"), (6, "m")], None, [4, 6]),  # an offset again: skipped
    ([(6, "x"), (5, "m"), (7, "m")], 4, [6, 7]),  # an offset back: skipped
    ([(6, "x"), (6, "h"), (7, "m")], 5, [6, 6, 7]),  # a held metric released with offset 6
    ([], 3, []),
])
def test_unskipped_rows(offs, stored, kept):
    """The rows above the applied offset (and above every earlier row's),
    a released metric with the exposure before it: the common batch (offsets
    rising above the applied one) and every other through the same answer."""
    rows = [_row(o, k) for o, k in offs]
    todo, skipped = _unskipped(rows, stored)
    assert [r[0] for r in todo] == kept and skipped == len(rows) - len(kept)


def test_send_raw_reads_every_reply_as_redis_py(fresh):
    """``send_raw`` (the owner's packed commands): many replies at once, of
    every shape, an error reply returned as its exception in its place."""
    conn = fresh.connection_pool.get_connection()
    try:
        cmds = [("HSET", "h", f"f{i}", i) for i in range(3000)]
        cmds += [("HGET", "h", "f7"), ("HGETALL", "nope"), ("INCR", "h"),
                 ("HMGET", "h", "f1", "zz"), ("PING",)]
        got = send_raw(conn, cmds)
        assert len(got) == len(cmds)
        assert got[:3000] == [1] * 3000
        assert got[3000] == b"7" and not got[3001]  # an empty hash (RESP2 or 3)
        assert isinstance(got[3002], redis.ResponseError)
        assert got[3003:] == [[b"1", None], b"PONG"]
        assert send_raw(conn, [("PING",)]) == [b"PONG"]  # the connection in step
    finally:
        fresh.connection_pool.release(conn)


def test_owner_writes_records_it_reads_back(fresh):
    """The owner's own records (every version) decode to the reducer's units."""
    for cfg in (_cfg_age(), _plain_cfg()):
        fresh.flushall()
        rng = random.Random(3)
        evs = []
        for i in range(30):
            pre = rng.choice((None, {"rev": 2.5}, {"clicks": -1.0, "nope": 3.0}, {"nope": 1.0}))
            t0 = rng.randint(0, 15_000)
            evs.append(Exposure(f"x{i}", "e1", f"u{i}", rng.choice(("control", "t")), T0 + t0,
                                rng.choice((None, 4.0)), pre))
            for j in range(rng.randint(0, 3)):
                evs.append(Metric(f"m{i}_{j}", f"u{i}", rng.choice(cfg.metric_names),
                                  rng.uniform(-2, 9), T0 + t0 + rng.randint(0, 9_000), "e1"))
        evs.sort(key=lambda e: e.ts)
        apply_batch(fresh, cfg, "liftstream.events", 0, list(enumerate(evs)))
        red = Reducer([cfg]).apply_all(evs, "liftstream.events|0", batch=len(evs))
        raw = fresh.hgetall(rk.units_key("e1"))
        assert any(decode_unit(r, cfg).matured for r in raw.values())
        assert bits({k.decode(): decode_unit(v, cfg) for k, v in raw.items()}) == \
            bits(red.states["e1"].units)


# ---------------------------------------------------------------- kill points

class _Killed(BaseException):
    """The process dies here (kill -9): nothing after this point runs."""


def _rows_of(evs) -> tuple[list, int]:
    from streams.state.store import clocked, event_row

    return clocked([event_row(i, e) for i, e in enumerate(evs)], None)


def test_kill_before_exec_or_after_exec_replays_to_the_clean_state(fresh, monkeypatch):
    """A worker killed before its EXEC wrote nothing (the transaction was only
    queued); one killed after its EXEC (before Kafka stored the offset) has
    its batch replayed by the next owner, which skips it: both end in the
    clean run's state, nothing lost or doubled."""
    from streams.state import partition_store as ps
    from streams.state.store import apply_rows

    cfg = _cfg_age()
    streams = _keyed_streams(5, 1)
    evs = [e for batch in streams[0] for e in batch]
    crows, clk = _rows_of(evs)

    def run(epoch):
        return apply_rows(fresh, cfg, "liftstream.events", 0, crows, clk, epoch=epoch)

    run(claim_partition(fresh, "liftstream.events", 0))
    clean = bits(read_snapshot(fresh, cfg))
    fresh.flushall()
    ps.forget_owner(fresh, "liftstream.events", 0)  # a new process

    real = ps.Commit.execute

    def killed(self, *a, **k):
        raise _Killed

    monkeypatch.setattr(ps.Commit, "execute", killed)
    with pytest.raises(_Killed):
        run(claim_partition(fresh, "liftstream.events", 0))
    assert not fresh.exists(rk.units_key("e1"), rk.meta_key("e1"), rk.offsets_key("e1"))
    monkeypatch.setattr(ps.Commit, "execute", real)
    out = run(claim_partition(fresh, "liftstream.events", 0))  # the next owner
    assert out["applied"] == len(crows)
    assert bits(read_snapshot(fresh, cfg)) == clean
    seq = fresh.get(rk.dirty_seq_key("e1"))
    out = run(claim_partition(fresh, "liftstream.events", 0))  # killed after EXEC: replayed
    assert out["applied"] == 0 and out["skipped"] == len(crows)
    assert bits(read_snapshot(fresh, cfg)) == clean
    assert fresh.get(rk.dirty_seq_key("e1")) == seq


def test_a_redis_that_lost_the_claim_is_lost_commits_not_fenced(fresh):
    """A fence below the owner's epoch means Redis lost the owner's claim
    (restarted from an older snapshot): LostCommits (seek back, claim
    again), not Fenced (which would give the partition up)."""
    a = claim_partition(fresh, "liftstream.events", 0)
    seq = claim_fence(fresh, "e1", SRC0, a)
    seq = commit(fresh, "e1", SRC0, a, seq, _batch(1), offset=1)
    fresh.delete(rk.fence_key("e1", SRC0))
    with pytest.raises(LostCommits):
        commit(fresh, "e1", SRC0, a, seq, _batch(1), offset=2)
    assert claim_fence(fresh, "e1", SRC0, a) == 0  # claimed again: continues


_ZOMBIE = """
import os, signal, sys
import redis
from streams.state.partition_store import Commit, WriteSet
from streams.state.store import Fenced
url, epoch, seq, meta = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
r = redis.Redis.from_url(url)
c = Commit(r, "e1", "liftstream.events|0", epoch, seq)
c.prepare()
print("watched", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
try:
    c.execute(WriteSet().add("hincrby", meta, "c:exposures", 4), offset=10)
except Fenced:
    sys.exit(3)
sys.exit(0)
"""


def test_zombie_process_stopped_after_watch_is_refused(fresh, redis_url):
    """A real process: the owner WATCHes and checks its fence, is SIGSTOPped,
    a new owner claims and commits the same batch, the old one is resumed
    (SIGCONT): its EXEC is refused (exit 3: Fenced) and nothing is doubled."""
    import os
    import signal
    import subprocess
    import sys

    a = claim_partition(fresh, "liftstream.events", 0)
    seq = commit(fresh, "e1", SRC0, a, claim_fence(fresh, "e1", SRC0, a), _batch(1), offset=9)
    proc = subprocess.Popen([sys.executable, "-c", _ZOMBIE, redis_url, str(a), str(seq),
                             rk.meta_key("e1")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "watched"
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        b = claim_partition(fresh, "liftstream.events", 0)
        commit(fresh, "e1", SRC0, b, claim_fence(fresh, "e1", SRC0, b), _batch(4), offset=10)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=30) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
    assert fresh.hget(rk.meta_key("e1"), "c:exposures") == b"5"  # 1 + 4: not doubled
    assert fresh.hget(rk.offsets_key("e1"), SRC0) == b"10"


# ---------------------------------------------------------------- the owner's unit cache


def _owned(r, rows: list, epoch: int) -> dict:
    from streams.state.store import apply_rows, clocked

    crows, clk = clocked(rows, None)
    return apply_rows(r, _cfg(), "liftstream.events", 0, crows, clk, epoch=epoch)


def _x_row(off: int, t: int) -> tuple:
    from streams.state.store import event_row

    return event_row(off, Exposure(f"x{off}", "e1", "u", "control", T0 + t, 1.0))


def _m_row(off: int, t: int, v: float) -> tuple:
    from streams.state.store import event_row

    return event_row(off, Metric(f"m{off}", "u", "rev", v, T0 + t, "e1"))


def test_owner_cache_dropped_when_redis_lost_its_commits(fresh):
    """Redis restarted from a snapshot taken before the owner's last commit:
    the owner's next commit finds fewer commits (LostCommits) and writes
    nothing; the same owner then applies again from Redis's offset. Its
    cached record (which held the lost metric) must be gone, or the metric
    counts twice."""
    from streams.state import partition_store as ps
    from streams.state.store import read_units

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0)], epoch)
    snap = {k: fresh.dump(k) for k in fresh.keys("*")}
    _owned(fresh, [_m_row(1, 1000, 2.0)], epoch)  # lost below
    assert ps._OWNERS[(id(fresh), "liftstream.events", 0)].caches["e1"].units["u"].unit
    fresh.flushall()
    for k, v in snap.items():
        fresh.restore(k, 0, v)
    with pytest.raises(LostCommits):
        _owned(fresh, [_m_row(2, 2000, 3.0)], epoch)
    assert read_units(fresh, _cfg())["u"].totals == [0.0]  # nothing written
    _owned(fresh, [_m_row(1, 1000, 2.0), _m_row(2, 2000, 3.0)], epoch)  # from offset 1
    assert read_units(fresh, _cfg())["u"].totals == [5.0]


def test_owner_cache_dropped_when_the_experiment_was_concluded(fresh):
    """Conclusion deletes the working state (unit records) from outside the
    owner, without touching its fence: the owner's cache must not write the
    record back (its incarnation token, the lifecycle key, changed)."""
    from streams.sampling.sampler import conclude
    from streams.state.store import read_units

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0)], epoch)
    conclude(fresh, _cfg())
    assert read_units(fresh, _cfg()) == {}
    _owned(fresh, [_m_row(1, 1000, 2.0)], epoch)
    assert "u" not in read_units(fresh, _cfg())


def test_owner_cache_of_a_zombie_is_not_reused_after_a_new_claim(fresh, redis_url):
    """Another owner (a second process: its own client) claimed the
    partition and changed the unit; the first owner's commit from its cache
    is refused (Fenced), and once it claims again it reads the unit anew:
    every metric counts once."""
    from streams.state.store import read_units

    other = redis.Redis.from_url(redis_url)
    try:
        a = claim_partition(fresh, "liftstream.events", 0)
        _owned(fresh, [_x_row(0, 0), _m_row(1, 1000, 2.0)], a)
        b = claim_partition(other, "liftstream.events", 0)
        _owned(other, [_m_row(2, 2000, 3.0)], b)
        with pytest.raises(Fenced):
            _owned(fresh, [_m_row(3, 3000, 4.0)], a)
        assert read_units(fresh, _cfg())["u"].totals == [5.0]
        _owned(fresh, [_m_row(3, 3000, 4.0)], claim_partition(fresh, "liftstream.events", 0))
        assert read_units(fresh, _cfg())["u"].totals == [9.0]
    finally:
        other.close()


def _w_row(off: int, t: int) -> tuple:
    """An exposure of a second unit, late enough to fold ``u`` (its window
    closes at 10 s, lateness 300 s)."""
    from streams.state.store import event_row

    return event_row(off, Exposure(f"w{off}", "e1", "w", "control", T0 + t, 1.0))


def _folded(r) -> tuple:
    """(n, Σy) of the control cells, summed over the strata, as readers see them."""
    from streams.state.store import read_snapshot

    cells = read_snapshot(r, _cfg()).cells["rev"][0]
    return sum(c[0] for c in cells), sum(c[1] for c in cells)


def test_owner_shard_cache_dropped_when_redis_lost_its_commits(fresh):
    """The owner keeps its shard between calls (only it writes it). Redis
    restarted from a snapshot taken before the commit that folded ``u``:
    after LostCommits the owner applies again from Redis's offset; its
    cached shard (which held the lost fold) must be gone, or ``u`` is
    folded twice."""
    from streams.state import partition_store as ps

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row(1, 1000, 2.0)], epoch)
    snap = {k: fresh.dump(k) for k in fresh.keys("*")}
    _owned(fresh, [_w_row(2, 400_000)], epoch)  # folds u: lost below
    assert ps._OWNERS[(id(fresh), "liftstream.events", 0)].caches["e1"].shard.cells
    assert _folded(fresh) == (1, 2.0)
    fresh.flushall()
    for k, v in snap.items():
        fresh.restore(k, 0, v)
    with pytest.raises(LostCommits):
        _owned(fresh, [_m_row(3, 400_500, 1.0)], epoch)
    _owned(fresh, [_w_row(2, 400_000), _m_row(3, 400_500, 1.0)], epoch)  # from offset 1
    assert _folded(fresh) == (1, 2.0)


def test_owner_shard_cache_dropped_when_a_commit_failed(fresh):
    """A commit Redis refused (out of memory: EXECABORT, nothing written)
    after the rules folded ``u`` into the cached shard in place: the owner
    drops its cache, and the retry of the batch folds ``u`` once."""
    from redis.exceptions import ResponseError

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row(1, 1000, 2.0)], epoch)
    fresh.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        with pytest.raises(ResponseError):
            _owned(fresh, [_w_row(2, 400_000)], epoch)
    finally:
        fresh.config_set("maxmemory", 0)
    assert _folded(fresh) == (0, 0.0)
    _owned(fresh, [_w_row(2, 400_000)], epoch)
    assert _folded(fresh) == (1, 2.0)


def _m_row_id(off: int, t: int, v: float, event_id: str) -> tuple:
    from streams.state.store import event_row

    return event_row(off, Metric(event_id, "u", "rev", v, T0 + t, "e1"))


def _owner(r):
    from streams.state import partition_store as ps

    return ps._OWNERS[(id(r), "liftstream.events", 0)]


def test_owner_sightings_cache_finds_duplicates(fresh):
    """The owner keeps every sighting of its source (loaded with its first
    call, then kept as it commits them): a duplicate event id in a later batch is found in
    the copy, without Redis, and counted once as a duplicate."""
    from streams.state.store import read_counters, read_units

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1")], epoch)
    _owned(fresh, [_m_row_id(2, 2000, 3.0, "m2")], epoch)
    assert set(_owner(fresh).caches["e1"].sightings) == {"x0", "m1", "m2"}
    _owned(fresh, [_m_row_id(3, 3000, 5.0, "m1"), _m_row_id(4, 3000, 7.0, "m3")], epoch)
    assert read_units(fresh, _cfg())["u"].totals == [12.0]
    assert read_counters(fresh, "e1")["duplicate"] == 1
    assert read_sightings(fresh, "e1", "liftstream.events|0") \
        == _owner(fresh).caches["e1"].sightings


def test_owner_sightings_cache_dropped_when_redis_lost_its_commits(fresh):
    """Redis restarted from a snapshot taken before the commit that saw
    ``m2``: after LostCommits the owner applies ``m2`` again from Redis's
    offset. Its cached sightings (which held ``m2``) must be gone, or the
    replay counts ``m2`` a duplicate and loses it."""
    from streams.state.store import read_counters, read_units

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1")], epoch)
    _owned(fresh, [_m_row_id(2, 1500, 1.0, "m0")], epoch)
    snap = {k: fresh.dump(k) for k in fresh.keys("*")}
    _owned(fresh, [_m_row_id(3, 2000, 3.0, "m2")], epoch)  # lost below
    assert "m2" in _owner(fresh).caches["e1"].sightings
    fresh.flushall()
    for k, v in snap.items():
        fresh.restore(k, 0, v)
    with pytest.raises(LostCommits):
        _owned(fresh, [_m_row_id(4, 3000, 4.0, "m4")], epoch)
    _owned(fresh, [_m_row_id(3, 2000, 3.0, "m2"), _m_row_id(4, 3000, 4.0, "m4")], epoch)
    assert read_units(fresh, _cfg())["u"].totals == [10.0]
    assert read_counters(fresh, "e1").get("duplicate", 0) == 0


def test_owner_sightings_cache_dropped_when_a_commit_failed(fresh):
    """A commit Redis refused (out of memory, nothing written) after the
    rules added ``m2`` to the cached sightings in place: the retry of the
    batch must apply ``m2``, not count it a duplicate of itself."""
    from redis.exceptions import ResponseError

    from streams.state.store import read_counters, read_units

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1")], epoch)
    _owned(fresh, [_m_row_id(2, 1500, 1.0, "m0")], epoch)
    fresh.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        with pytest.raises(ResponseError):
            _owned(fresh, [_m_row_id(3, 2000, 3.0, "m2")], epoch)
    finally:
        fresh.config_set("maxmemory", 0)
    _owned(fresh, [_m_row_id(3, 2000, 3.0, "m2")], epoch)
    assert read_units(fresh, _cfg())["u"].totals == [6.0]
    assert read_counters(fresh, "e1").get("duplicate", 0) == 0


def test_owner_sightings_beyond_the_bound_are_read_from_redis(fresh, monkeypatch):
    """More sightings than the owner keeps (4 per cached unit): it stops
    keeping them and reads the batch's from Redis again; duplicates are
    still found."""
    from streams.state.store import read_counters, read_units

    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", "1")  # at most 4 sightings
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0)] + [_m_row_id(i, 1000 + i, 1.0, f"m{i}") for i in range(1, 6)],
           epoch)
    _owned(fresh, [_m_row_id(6, 2000, 1.0, "m6")], epoch)  # ZCARD 6 > 4: not loaded
    c = _owner(fresh).caches["e1"]
    assert c.sightings is None and c.sightings_off
    _owned(fresh, [_m_row_id(7, 3000, 1.0, "m3")], epoch)
    assert read_units(fresh, _cfg())["u"].totals == [6.0]
    assert read_counters(fresh, "e1")["duplicate"] == 1


def _x_row_of(off: int, t: int, unit: str) -> tuple:
    from streams.state.store import event_row

    return event_row(off, Exposure(f"x{off}", "e1", unit, "control", T0 + t, 1.0))


def _frozen(r) -> dict:
    """What conclusion leaves of an experiment's counts: meta (counters,
    exposures, clocks), the source's shard (cells), arrivals, the applied
    offsets; compared after a commit that raced it."""
    return {k: r.hgetall(k) for k in (rk.meta_key("e1"), rk.shard_key("e1", SRC0),
                                     rk.experiment_keys("e1").arrivals, rk.offsets_key("e1"))}


def _race_before_exec(monkeypatch, when: str, race) -> None:
    """Run ``race()`` while an owner's call is in flight, after it read its
    state: on the redis-py path (``packs`` off: a Redis Cluster), before its
    commit WATCHes (``after_reads``) or between the WATCH and the EXEC
    (``after_watch``); on the packed path (``held``), where the WATCH rides
    on the call's first reads (``Commit.hold``), just before the EXEC (and
    ``prepare``, the redis-py path's WATCH, must not run)."""
    from streams.state import partition_store as ps

    if when == "held":
        real_exec = ps.Commit.execute

        def racing_exec(self, *a, **kw):
            race()
            return real_exec(self, *a, **kw)

        def no_prepare(self) -> None:
            raise AssertionError("the packed path WATCHes with its reads, not in prepare")

        monkeypatch.setattr(ps.Commit, "execute", racing_exec)
        monkeypatch.setattr(ps.Commit, "prepare", no_prepare)
        return
    real = ps.Commit.prepare

    def racing(self) -> None:
        if when == "after_watch":
            real(self)
        race()
        if when == "after_reads":
            real(self)

    monkeypatch.setattr(ps, "packs", lambda r: False)
    monkeypatch.setattr(ps.Commit, "prepare", racing)


@pytest.mark.parametrize("when", ["after_reads", "after_watch", "held"])
def test_defect_conclusion_during_a_commit_resurrects_no_working_state(fresh, redis_url,
                                                                       monkeypatch, when):
    """The sampler concludes the experiment (another client) while an owner's
    call is in flight: after the owner read the units and pending entries,
    either before its commit WATCHes (``after_reads``) or between the WATCH
    and the EXEC (``after_watch``, ``held``: ``_race_before_exec``). The
    commit must write nothing: no unit record or pending entry comes back
    into the concluded experiment, and
    its counts stay what conclusion froze. The retry reads the experiment
    concluded and refuses its exposures (the caller dead-letters them,
    ``after_end``), and writes no unit either."""
    from redis.exceptions import WatchError

    from streams.sampling.sampler import conclude
    from streams.state import partition_store as ps

    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0)], epoch)  # unit u: a record and a pending entry
    assert fresh.hexists(rk.units_key("e1"), "u") and len(read_pending(fresh, "e1", SRC0))
    sampler = redis.Redis.from_url(redis_url)
    frozen: dict = {}

    def race() -> None:
        if not frozen:
            conclude(sampler, _cfg())
            frozen.update(_frozen(sampler))

    _race_before_exec(monkeypatch, when, race)
    batch = [_x_row_of(1, 500, "v"), _m_row(2, 1000, 2.0)]
    refused = None
    try:
        _owned(fresh, batch, epoch)
    except (WatchError, Fenced) as e:
        refused = e
    monkeypatch.undo()
    assert frozen, "the conclusion ran"
    assert fresh.hgetall(rk.units_key("e1")) == {}, "a unit record came back"
    assert len(read_pending(fresh, "e1", SRC0)) == 0, "a pending entry came back"
    assert _frozen(fresh) == frozen, "counts moved after the conclusion"
    assert isinstance(refused, ps.Concluded), f"refused as {refused!r}, not Concluded"
    # the retry (same owner, same epoch): the experiment is concluded now
    with pytest.raises(ps.Concluded):
        _owned(fresh, batch, epoch)
    _owned(fresh, [_m_row(2, 1000, 2.0)], epoch)  # the exposure dead-lettered: as today
    assert fresh.hgetall(rk.units_key("e1")) == {}
    assert len(read_pending(fresh, "e1", SRC0)) == 0
    sampler.close()


# ---------------------------------------------------------------- delete vs the owner


def _registered(r):
    """e1 registered as the registry does it (config, generation)."""
    from streams.state.registry import Registry

    reg = Registry(r)
    reg.put(_cfg(), now_ms=T0)
    return reg


def _flushed(r) -> None:
    """An empty Redis with e1 registered, and no owner remembered of it."""
    from streams.state.partition_store import forget_owner

    r.flushall()
    forget_owner(r, "liftstream.events", 0)
    _registered(r)


def _counts(r) -> dict:
    """What a batch leaves of e1's counts: ``_frozen`` less the applied
    offsets, the sightings as what they hold (an owner with the copy packs
    them, one without writes them per id: ``SeenBuckets``)."""
    out = {k: v for k, v in _frozen(r).items() if k != rk.offsets_key("e1")}
    meta, field = out[rk.meta_key("e1")], rk.seen_index_field(SRC0).encode()
    if field in meta:
        meta[field] = b" ".join(b":".join(x.split(b":")[:2]) for x in meta[field].split())
    out["sightings"] = read_sightings(r, "e1", SRC0)
    return out


def test_defect_a_delete_is_no_lost_commits_for_the_running_owner(fresh):
    """The experiment is deleted (``Registry.delete``) while an owner of a
    source partition is running: the owner's next commit is no Redis that
    lost acknowledged writes (``LostCommits`` makes the events plane seek
    back and count a Redis regression): the delete keeps the fences, and
    the batch applies to the re-created experiment as to a new one."""
    reg = _registered(fresh)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row(1, 1000, 2.0)], epoch)
    reg.delete("e1")
    reg.put(_cfg(), now_ms=T0)
    _owned(fresh, [_x_row_of(2, 2000, "v")], epoch)
    after = _counts(fresh)
    assert set(fresh.hkeys(rk.units_key("e1"))) == {b"v"}
    _flushed(fresh)
    _owned(fresh, [_x_row_of(2, 2000, "v")], claim_partition(fresh, "liftstream.events", 0))
    assert after == _counts(fresh), "the re-created experiment is not clean"


def test_defect_a_delete_does_not_lower_the_fence(fresh):
    """The fence never goes down, a delete included: an owner of an older
    epoch (a zombie) cannot claim the experiment's fence after a delete and
    commit over the current owner's."""
    reg = _registered(fresh)
    a = claim_partition(fresh, "liftstream.events", 0)
    b = claim_partition(fresh, "liftstream.events", 0)
    commit(fresh, "e1", SRC0, b, claim_fence(fresh, "e1", SRC0, b), _batch(1), offset=3)
    reg.delete("e1")
    with pytest.raises(Fenced):
        claim_fence(fresh, "e1", SRC0, a)


@pytest.mark.parametrize("when", ["after_reads", "held"])
def test_defect_delete_and_recreate_during_a_commit_write_nothing_old(fresh, redis_url,
                                                                      monkeypatch, when):
    """Deleted and re-created under the same id (another client) after the
    owner read its state (and with its cached shard and units of the old
    incarnation) but before its commit: the commit writes nothing (the
    generation changed: ``ExperimentChanged``, not a fence and no lost
    commits), and the retry applies the batch to the new experiment alone."""
    from streams.state import partition_store as ps

    reg = _registered(fresh)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned(fresh, [_x_row(0, 0), _m_row(1, 1000, 2.0)], epoch)
    other = redis.Redis.from_url(redis_url)
    raced = []

    def race() -> None:
        if not raced:
            raced.append(1)
            oreg = type(reg)(other)
            oreg.delete("e1")
            oreg.put(_cfg(), now_ms=T0)

    _race_before_exec(monkeypatch, when, race)
    batch = [_x_row_of(2, 2000, "v")]
    with pytest.raises(ps.ExperimentChanged):
        _owned(fresh, batch, epoch)
    assert raced
    monkeypatch.undo()
    assert fresh.hgetall(rk.units_key("e1")) == {}, "written into the new experiment"
    _owned(fresh, batch, epoch)  # the retry
    after = _counts(fresh)
    assert set(fresh.hkeys(rk.units_key("e1"))) == {b"v"}
    other.close()
    _flushed(fresh)
    _owned(fresh, batch, claim_partition(fresh, "liftstream.events", 0))
    assert after == _counts(fresh), "the re-created experiment is not clean"


def test_ingestor_rereads_its_registry_when_the_owner_finds_the_experiment_concluded(
        fresh, redis_url):
    """The experiment is concluded (the sampler, another client) while the
    ingestor's registry still holds it running (its cache is fresh for
    ``ttl``): the owner refuses the batch's exposure (``Concluded``, nothing
    written) and the ingestor reads its registry again, so the retry (the
    events plane retries a refused commit) dead-letters the exposure
    ``after_end``, counted once; no unit record comes back, and the batch's
    position is recorded (nothing left behind, nothing lost)."""
    from schemas.codec import dumps
    from streams.ingest.ingestor import Ingestor, read_applied
    from streams.sampling.sampler import conclude
    from streams.state import partition_store as ps
    from streams.state.store import read_counters

    reg = _registered(fresh)
    reg.ttl = 3600.0  # the cache stays stale for the whole test
    ing = Ingestor(fresh, reg)
    epoch = claim_partition(fresh, "liftstream.events", 0)

    def msg(off: int, unit: str, t: int) -> tuple[int, bytes]:
        return off, dumps({"type": "exposure", "event_id": f"x{off}", "experiment_id": "e1",
                           "unit_id": unit, "variant": "control", "ts": T0 + t})

    res = ing.process("liftstream.events", 0, [msg(0, "u", 0)], T0 + 1000, epoch)
    assert res.counts["exposures"] == 1 and not reg.concluded("e1")
    sampler = redis.Redis.from_url(redis_url)
    conclude(sampler, _cfg())
    sampler.close()
    batch = [msg(1, "v", 500)]
    with pytest.raises(ps.Concluded):
        ing.process("liftstream.events", 0, batch, T0 + 1000, epoch)
    assert reg.concluded("e1"), "the registry was not read again"
    res = ing.process("liftstream.events", 0, batch, T0 + 1000, epoch)  # the retry
    assert [d["reason"]["code"] for d in res.dead_letters] == ["after_end"]
    assert res.counts["exposures"] == 0
    assert fresh.hgetall(rk.units_key("e1")) == {}, "a unit record came back"
    assert read_counters(fresh, "e1").get("after_end") == 1
    assert read_applied(fresh, "liftstream.events", [0]) == {0: 1}
    ing.process("liftstream.events", 0, batch, T0 + 1000, epoch)  # a replay counts none
    assert read_counters(fresh, "e1").get("after_end") == 1


# ---- dedupe sightings in clock buckets (SeenBuckets)

def _cfg_dd(dd: int = 5) -> ExperimentConfig:
    return ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),),
                            window_seconds=10, bucket_seconds=2, dedupe_seconds=dd)


def _owned_cfg(r, cfg: ExperimentConfig, rows: list, epoch: int) -> dict:
    from streams.state.store import apply_rows, clocked

    crows, clk = clocked(rows, None)
    return apply_rows(r, cfg, "liftstream.events", 0, crows, clk, epoch=epoch)


def _seen_keys_in_redis(r) -> set[str]:
    return {k.decode() for k in r.scan_iter(match=rk.experiment_key("e1", "seen*"))}


@pytest.mark.parametrize("cache_units", ["0", "100000"])
def test_sightings_buckets_pruned_whole_and_duplicates_found(fresh, monkeypatch, cache_units):
    """Sightings go to hashes per clock bucket of width DD (5 s here); a
    re-send within DD of partition time is a duplicate, one DD + later is
    not, and once the clock passed a bucket's end + DD the bucket is gone
    (listed no more in meta): at most the current and previous bucket are
    kept. With the owner cache off every lookup is HMGET of the buckets."""
    from streams.state import partition_store as ps
    from streams.state.store import read_counters

    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", cache_units)
    cfg, src = _cfg_dd(5), "liftstream.events|0"
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, cfg, [_x_row(0, 0), _m_row_id(1, 1000, 1.0, "a")], epoch)
    _owned_cfg(fresh, cfg, [_m_row_id(2, 4000, 1.0, "b")], epoch)
    ps.forget_owner(fresh, "liftstream.events", 0)  # a new owner: no copy
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, cfg, [_m_row_id(3, 5500, 1.0, "a")], epoch)  # 1 s + 5 s >= 5.5 s
    assert read_counters(fresh, "e1")["duplicate"] == 1
    _owned_cfg(fresh, cfg, [_m_row_id(4, 6500, 1.0, "a")], epoch)  # 1 s < 6.5 - 5
    assert read_counters(fresh, "e1")["duplicate"] == 1
    assert read_sightings(fresh, "e1", src)["a"] == T0 + 6500
    _owned_cfg(fresh, cfg, [_m_row_id(5, 9000, 1.0, "b")], epoch)  # 4 s >= 9 - 5
    assert read_counters(fresh, "e1")["duplicate"] == 2
    listed = fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src)).decode().split()
    assert len(listed) <= 2
    _owned_cfg(fresh, cfg, [_m_row_id(6, 30_000, 1.0, "c")], epoch)
    listed = fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src)).decode().split()
    start = (T0 + 30_000) // 5000 * 5000
    # (``start:end``, and ``:f:n`` where the bucket has packed sightings)
    assert [":".join(x.split(":")[:2]) for x in listed] == [f"{start}:{start + 4999}"]
    assert _seen_keys_in_redis(fresh) == {rk.seen_bucket_key("e1", src, start)}
    assert read_sightings(fresh, "e1", src) == {"c": T0 + 30_000}
    # a hashtable from the start (``SEEN_PAD``): a ziplist's HSET scans it
    assert fresh.object("encoding", rk.seen_bucket_key("e1", src, start)) == b"hashtable"


def _to_legacy_layout(r, src: str) -> dict[str, int]:
    """Rewrite the sightings as versions before the buckets kept them: one
    sorted set, no list in meta. Returns them."""
    sight = read_sightings(r, "e1", src)
    r.unlink(*_seen_keys_in_redis(r))
    r.hdel(rk.meta_key("e1"), rk.seen_index_field(src))
    r.zadd(rk.seen_key("e1", src), sight)
    return sight


@pytest.mark.parametrize("cache_units", ["0", "100000"])
def test_sightings_of_the_older_layout_are_converted_once(fresh, monkeypatch, cache_units):
    """Issue 25, existing state migrates: a worker of this version on state
    whose sightings are the older sorted set (``keys.seen_key``) converts it
    in its first commit (the live sightings to buckets, the sorted set
    UNLINKed, in the fenced MULTI/EXEC), and duplicates of what the older
    version sighted are still found, in that batch and later ones."""
    from streams.state import partition_store as ps
    from streams.state.store import read_counters, read_units

    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", cache_units)
    cfg, src = _cfg_dd(5), "liftstream.events|0"
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, cfg, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1"),
                            _m_row_id(2, 2000, 3.0, "m2")], epoch)
    old = _to_legacy_layout(fresh, src)
    assert set(old) == {"x0", "m1", "m2"} and fresh.exists(rk.seen_key("e1", src))
    ps.forget_owner(fresh, "liftstream.events", 0)  # the new version's worker
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, cfg, [_m_row_id(3, 3000, 5.0, "m1")], epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 1
    assert not fresh.exists(rk.seen_key("e1", src))
    assert read_sightings(fresh, "e1", src) == old
    _owned_cfg(fresh, cfg, [_m_row_id(4, 4000, 7.0, "m2"), _m_row_id(5, 4000, 1.0, "m5")],
               epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 2
    assert read_units(fresh, cfg)["u"].totals == [6.0]
    assert not fresh.exists(rk.seen_key("e1", src))


def test_sightings_conversion_refused_with_its_commit(fresh):
    """The conversion is part of the owner's commit: a commit Redis refuses
    leaves the older sorted set as it was (and the retry converts it)."""
    from redis.exceptions import ResponseError

    from streams.state import partition_store as ps
    from streams.state.store import read_counters

    cfg, src = _cfg_dd(5), "liftstream.events|0"
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, cfg, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1")], epoch)
    old = _to_legacy_layout(fresh, src)
    ps.forget_owner(fresh, "liftstream.events", 0)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    fresh.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        with pytest.raises(ResponseError):
            _owned_cfg(fresh, cfg, [_m_row_id(2, 2000, 5.0, "m1")], epoch)
    finally:
        fresh.config_set("maxmemory", 0)
    assert {m.decode(): int(s) for m, s in fresh.zrange(rk.seen_key("e1", src), 0, -1,
                                                        withscores=True)} == old
    assert fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src)) is None
    _owned_cfg(fresh, cfg, [_m_row_id(2, 2000, 5.0, "m1")], epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 1
    assert not fresh.exists(rk.seen_key("e1", src))


def _bucket_fields(r, src: str) -> dict[str, dict[str, bytes]]:
    """Every listed sighting bucket's fields (less ``SEEN_PAD``), by key."""
    from streams.state.partition_store import SEEN_PAD, seen_keys

    return {k: {f.decode(): v for f, v in r.hgetall(k).items() if f.decode() != SEEN_PAD[0]}
            for k in seen_keys(r, "e1", [src]) if r.exists(k)}


def _packed_state(r, src: str) -> dict[str, dict[str, bytes]]:
    """A sighting layout with packed fields: an owner that keeps the copy
    writes ``x0``, ``m1`` (one batch) and ``m2`` (another) packed."""
    cfg = _cfg_dd(5)
    epoch = claim_partition(r, "liftstream.events", 0)
    _owned_cfg(r, cfg, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1")], epoch)
    _owned_cfg(r, cfg, [_m_row_id(2, 2000, 3.0, "m2")], epoch)
    fields = _bucket_fields(r, src)
    assert [sorted(f) for f in fields.values()] == [["#1", "#2"]], "one packed field a batch"
    listed = r.hget(rk.meta_key("e1"), rk.seen_index_field(src)).decode()
    assert listed.endswith(":2:3"), listed  # 2 packed fields holding 3 sightings
    return fields


def test_cold_owner_reads_packed_sightings(fresh):
    """A new owner (no copy) that keeps the sightings loads the packed
    fields whole: duplicates of what the previous owner packed are found,
    and its own sightings are packed too (one more field)."""
    from streams.state import partition_store as ps
    from streams.state.store import read_counters, read_units

    src = "liftstream.events|0"
    _packed_state(fresh, src)
    assert read_sightings(fresh, "e1", src) == {"x0": T0, "m1": T0 + 1000, "m2": T0 + 2000}
    ps.forget_owner(fresh, "liftstream.events", 0)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(3, 3000, 5.0, "m1"), _m_row_id(4, 3000, 7.0, "m4")],
               epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 1
    assert read_units(fresh, _cfg_dd(5))["u"].totals == [12.0]
    assert set(_owner(fresh).caches["e1"].sightings) == {"x0", "m1", "m2", "m4"}
    assert [sorted(f) for f in _bucket_fields(fresh, src).values()] == [["#1", "#2", "#3"]]
    assert read_sightings(fresh, "e1", src) == _owner(fresh).caches["e1"].sightings


@pytest.mark.parametrize("cache_units", ["0", "1"])
def test_owner_without_copy_converts_packed_sightings(fresh, monkeypatch, cache_units):
    """An owner that looks sightings up by id (no cache, or more sightings
    than it keeps: ``sightings_off``) on buckets with packed fields still
    finds their duplicates, and its commit converts them to per-id fields
    once (the packed fields deleted, the list without their count); a later
    owner that keeps the copy reads both forms."""
    from streams.state import partition_store as ps
    from streams.state.store import read_counters, read_units

    src = "liftstream.events|0"
    _packed_state(fresh, src)
    ps.forget_owner(fresh, "liftstream.events", 0)
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", cache_units)  # "1": at most 4
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(3, 3000, 5.0, "m2"), _m_row_id(4, 3000, 1.0, "m4"),
                                   _m_row_id(5, 3000, 1.0, "m5")], epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 1
    if cache_units == "1":  # loaded (3 sightings), packed its own, then 5 > 4: dropped
        c = _owner(fresh).caches["e1"]
        assert c.sightings is None and c.sightings_off
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(6, 3500, 9.0, "m1")], epoch)  # looked up
    assert read_counters(fresh, "e1")["duplicate"] == 2
    assert [sorted(f) for f in _bucket_fields(fresh, src).values()] \
        == [["m1", "m2", "m4", "m5", "x0"]]
    assert len(fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src)).split(b":")) == 2
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", "100000")
    ps.forget_owner(fresh, "liftstream.events", 0)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(7, 3600, 9.0, "m6")], epoch)  # packed again
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(8, 3700, 9.0, "m5"), _m_row_id(9, 3700, 9.0, "m6")],
               epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 4
    assert read_units(fresh, _cfg_dd(5))["u"].totals == [16.0]
    ps.forget_owner(fresh, "liftstream.events", 0)  # both forms in one bucket, loaded
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(10, 3800, 9.0, "x0")], epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 5
    assert set(_owner(fresh).caches["e1"].sightings) == {"x0", "m1", "m2", "m4", "m5", "m6"}


def test_packed_sightings_conversion_refused_with_its_commit(fresh, monkeypatch):
    """The conversion of packed sightings is part of the owner's commit: a
    commit Redis refuses leaves the buckets and their list as they were
    (no per-id field written, no packed field deleted), and the retry
    converts them and finds the duplicate."""
    from redis.exceptions import ResponseError

    from streams.state import partition_store as ps
    from streams.state.store import read_counters

    src = "liftstream.events|0"
    before = _packed_state(fresh, src)
    listed = fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src))
    ps.forget_owner(fresh, "liftstream.events", 0)
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", "0")
    epoch = claim_partition(fresh, "liftstream.events", 0)
    fresh.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        with pytest.raises(ResponseError):
            _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(3, 3000, 5.0, "m1")], epoch)
    finally:
        fresh.config_set("maxmemory", 0)
    assert _bucket_fields(fresh, src) == before
    assert fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src)) == listed
    _owned_cfg(fresh, _cfg_dd(5), [_m_row_id(3, 3000, 5.0, "m1")], epoch)
    assert read_counters(fresh, "e1")["duplicate"] == 1
    assert [sorted(f) for f in _bucket_fields(fresh, src).values()] == [["m1", "m2", "x0"]]


def test_conclusion_deletes_every_sightings_bucket(fresh):
    """Conclusion deletes the working state: every bucket its meta lists
    (and an older layout's sorted set), and the list itself."""
    from streams.sampling.sampler import conclude

    cfg, src = _cfg_dd(5), "liftstream.events|0"
    epoch = claim_partition(fresh, "liftstream.events", 0)
    _owned_cfg(fresh, cfg, [_x_row(0, 0), _m_row_id(1, 1000, 2.0, "m1")], epoch)
    _owned_cfg(fresh, cfg, [_m_row_id(2, 6000, 2.0, "m2")], epoch)  # a second bucket
    assert len(_seen_keys_in_redis(fresh)) == 2
    fresh.zadd(rk.seen_key("e1", src), {"stale": 1})
    conclude(fresh, cfg)
    assert _seen_keys_in_redis(fresh) == set()
    assert fresh.hget(rk.meta_key("e1"), rk.seen_index_field(src)) is None


# ---------------------------------------------------------------- per-batch cost


def test_a_batch_of_one_experiment_costs_five_round_trips(fresh, monkeypatch):
    """Issue 25 (the per-batch fixed cost): a source batch of one experiment
    on a warm owner costs five round trips to Redis (main had ten, each tens
    of µs of redis-py): the partition clock with the hold-queue check
    (``partition_start``), the routing index, the owner's reads with its
    WATCH, fence read and due work (``Commit.hold``), the MULTI/EXEC, and
    ``record_position``. Counted as the sends on redis-py's connections."""
    from redis.connection import Connection

    from schemas.codec import dumps
    from streams.ingest.ingestor import Ingestor

    ing = Ingestor(fresh, _registered(fresh))
    epoch = claim_partition(fresh, "liftstream.events", 0)

    def batch(lo: int) -> list[tuple[int, bytes]]:
        x = [(o, dumps({"type": "exposure", "event_id": f"x{o}", "experiment_id": "e1",
                        "unit_id": f"u{o}", "variant": "control", "ts": T0 + o}))
             for o in range(lo, lo + 5)]
        m = [(o + 5, dumps({"type": "metric", "event_id": f"m{o}", "experiment_id": "e1",
                            "unit_id": f"u{o}", "metric": "rev", "value": 1.0,
                            "ts": T0 + o + 1})) for o in range(lo, lo + 5)]
        return x + m

    now = T0 + 3_600_000
    ing.process("liftstream.events", 0, batch(0), now, epoch)  # claims, fills the cache
    sends: list[bytes] = []
    real = Connection.send_packed_command

    def counting(self, command, check_health=True):
        sends.append(command)
        return real(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    res = ing.process("liftstream.events", 0, batch(10), now, epoch)
    monkeypatch.undo()
    assert res.counts["exposures"] == 5 and res.counts["metric_applied"] == 5, res.counts
    assert len(sends) == 5, [bytes(b"".join(c) if isinstance(c, list) else c)[:60]
                             for c in sends]


def test_a_metric_held_and_expired_in_one_batch_is_counted_without_holds_before(fresh):
    """``partition_start`` found no hold on the partition, so the batch asks
    Redis for no expired hold (``apply_source_batch``'s ``holds``), unless
    it held a metric itself: one held, and already past the hold horizon of
    the batch's clock, expires in the same batch (``unrouted_expired``) as
    when the queue was read, and leaves no hold behind."""
    from schemas.codec import dumps
    from streams.ingest.ingestor import Ingestor
    from streams.state.keys import unit_hold_queue

    ing = Ingestor(fresh, _registered(fresh), hold_seconds=1)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    batch = [(0, dumps({"type": "metric", "event_id": "m0", "unit_id": "w", "metric": "rev",
                        "value": 1.0, "ts": T0})),
             (1, dumps({"type": "exposure", "event_id": "x1", "experiment_id": "e1",
                        "unit_id": "u", "variant": "control", "ts": T0 + 5000}))]
    res = ing.process("liftstream.events", 0, batch, T0 + 3_600_000, epoch)
    assert res.counts["unrouted"] == 1 and res.counts["unrouted_expired"] == 1, res.counts
    assert not fresh.exists(unit_hold_queue("liftstream.events", 0))


@pytest.mark.parametrize("seed", range(4))
def test_owner_cache_is_what_redis_holds_after_every_call(fresh, seed):
    """The write-through (``_apply_rows_owned``) updates only the cache
    fields that can have changed: after every call, each cached unit's
    record, pending score, held metrics and hold-queue score, and the
    owner's pending copy, are exactly what Redis holds (exposures, metrics
    held before their exposure, folds and retirements mixed)."""
    from streams.state import partition_store as ps
    from streams.state.store import apply_rows, clocked, event_row

    rng = random.Random(seed)
    cfg = ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),),
                           window_seconds=10, bucket_seconds=2, hold_seconds=30)
    epoch = claim_partition(fresh, "liftstream.events", 0)
    k = rk.experiment_keys("e1")
    heldq_k = rk.heldq_key("e1", SRC0)
    off, t = 0, 0
    for _ in range(25):
        rows = []
        for _ in range(rng.randint(1, 12)):
            u = f"u{rng.randint(0, 15)}"
            t += rng.randint(0, 900)
            if rng.random() < 0.4:
                ev = Exposure(f"x{off}", "e1", u, "control", T0 + t, 1.0)
            else:
                ev = Metric(f"m{off}", u, "rev", float(rng.randint(1, 5)),
                            T0 + t - rng.randint(0, 3000), "e1")
            rows.append(event_row(off, ev))
            off += 1
        crows, clk = clocked(rows, None)
        apply_rows(fresh, cfg, "liftstream.events", 0, crows, clk, epoch=epoch)
        cache = ps._OWNERS[(id(fresh), "liftstream.events", 0)].caches["e1"]
        pend = dict(read_pending(fresh, "e1", SRC0))
        if cache.pending is not None:
            assert cache.pending.d == pend
        for uid, e in cache.units.items():
            rec = fresh.hget(k.units, uid)
            assert e.rec == rec, uid
            assert (e.unit is None) == (rec is None), uid
            if rec is not None:
                assert e.unit == decode_unit(rec, cfg), uid
            assert e.pend == pend.get(uid), uid
            assert e.held == (fresh.hget(k.held, uid) or None), uid
            hq = fresh.zscore(heldq_k, uid)
            assert e.heldq == (None if hq is None else int(hq)), uid
