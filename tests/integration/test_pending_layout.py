"""The pending entries' two layouts (``streams.state.pending``, issue 25):
the owner that keeps the full copy writes the bucketed log, one without it
the sorted set; the rules see the same due entries in the same order
either way (``fold_limit`` and its ``more`` flag included), state of the
older layout (main's sorted set) is converted by the first commit that
touches it, and a conversion lands with its commit or not at all."""

from __future__ import annotations

import random

import pytest
import redis

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.state import keys as rk
from streams.state import partition_store as ps
from streams.state.semantics import Reducer
from streams.state.store import (
    apply_source_batch,
    claim_partition,
    due_to_settle,
    event_row,
    read_pending,
    read_units,
)
from tests.support.streaming_harness import bits

T0 = 1_700_000_000_000
TOPIC = "liftstream.events"
SRC = f"{TOPIC}|0"


@pytest.fixture()
def fresh(redis_url, monkeypatch):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    yield r
    ps.forget_owner(r, TOPIC, 0)
    r.close()


def _cfg() -> ExperimentConfig:
    # W 10 s, H 20 s: units fold and retire within the streams below
    return ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),), window_seconds=10,
                            bucket_seconds=2, lateness_seconds=1, correction_seconds=20)


def _stream(seed: int, n: int = 160) -> list:
    """Exposures of new units and metrics of them, time-sorted with jitter
    (late exposures whose window already closed among them)."""
    rnd = random.Random(seed)
    evs, t = [], 0
    for i in range(n):
        t += rnd.randint(0, 900)
        ts = T0 + max(0, t - rnd.choice([0, 0, 0, 12_000]))
        u = f"u{rnd.randint(0, n // 2)}"
        if rnd.random() < 0.5:
            evs.append(Exposure(f"x{i}", "e1", u, rnd.choice(["control", "treatment"]), ts, 1.0))
        else:
            evs.append(Metric(f"m{i}", u, "rev", float(rnd.randint(1, 5)), ts, "e1"))
    return evs


def _batches(evs: list, seed: int) -> list[list]:
    rnd, out, i = random.Random(seed), [], 0
    while i < len(evs):
        k = rnd.randint(1, 12)
        out.append(evs[i:i + k])
        i += k
    return out


class _Run:
    """One partition's batches through Redis (a fenced owner) and the reducer."""

    def __init__(self, r, fold_limit: int) -> None:
        self.r, self.cfg, self.fold_limit = r, _cfg(), fold_limit
        self.red = Reducer([self.cfg], fold_limit=fold_limit)
        self.off = 0
        self.epoch = claim_partition(r, TOPIC, 0)

    def batch(self, evs: list, epoch: int | None = -1, units: bool = True) -> None:
        rows = [event_row(self.off + i, ev) for i, ev in enumerate(evs)]
        self.off += len(evs)
        out, _ = apply_source_batch(self.r, {"e1": self.cfg}, TOPIC, 0, rows,
                                    fold_limit=self.fold_limit,
                                    epoch=self.epoch if epoch == -1 else epoch)
        self.red.apply_batch(SRC, evs)
        want = self.red.states["e1"]
        assert read_pending(self.r, "e1", SRC) == want.pending_units(SRC)
        if units:
            assert bits(read_units(self.r, self.cfg)) == bits(want.units)
        # the ``more`` flag: the reducer's settle left due entries too
        if "e1" in out:
            T = want.clk[SRC] - want.L
            left = [s for _, s in want.pending_units(SRC) if s <= T]
            assert bool(out["e1"]["more"]) == bool(left), (out, left)


def _layout(r) -> str:
    idx = r.hget(rk.meta_key("e1"), rk.pending_index_field(SRC))
    zset = r.exists(rk.pending_key("e1", SRC))
    assert not (idx is not None and zset), "both layouts at once"
    return "buckets" if idx is not None else "zset"


@pytest.mark.parametrize("cache_units", ["0", "100000"])
@pytest.mark.parametrize("fold_limit", [1, 3, 10_000])
@pytest.mark.parametrize("seed", range(3))
def test_both_layouts_fold_as_the_rules(fresh, monkeypatch, cache_units, fold_limit, seed):
    """Which units fold and retire at which clock, in which order, with
    ``fold_limit`` and ``more``: the pending entries and unit records read
    back equal the reducer's after every batch, whatever the layout."""
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", cache_units)
    run = _Run(fresh, fold_limit)
    for b in _batches(_stream(seed), seed):
        run.batch(b)
    assert _layout(fresh) == ("zset" if cache_units == "0" else "buckets")
    assert run.red.states["e1"].retired.n > 0, "the stream retires units"


def test_main_layout_converted_on_first_touch(fresh, monkeypatch):
    """State a version before this one wrote (the sorted set: an owner
    without the copy writes it the same way) is converted by a caching
    owner's first commit, the sorted set UNLINKed in the same MULTI/EXEC,
    and the owner continues as the rules do; a new owner (no copy) loads
    the buckets."""
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", "0")
    run = _Run(fresh, 3)
    batches = _batches(_stream(7), 7)
    for b in batches[:8]:
        run.batch(b)
    assert _layout(fresh) == "zset" and fresh.zcard(rk.pending_key("e1", SRC)) > 0
    ps.forget_owner(fresh, TOPIC, 0)
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", "100000")
    run.epoch = claim_partition(fresh, TOPIC, 0)  # this version's worker
    run.batch(batches[8])
    assert _layout(fresh) == "buckets"
    for b in batches[9:14]:
        run.batch(b)
    ps.forget_owner(fresh, TOPIC, 0)  # a new owner: loads the buckets
    run.epoch = claim_partition(fresh, TOPIC, 0)
    for b in batches[14:]:
        run.batch(b)
    assert _layout(fresh) == "buckets"


def test_owner_without_the_copy_converts_the_buckets(fresh, monkeypatch):
    """An owner that keeps no copy (cache off, or an unfenced call) on the
    bucket layout converts it to the sorted set in its commit, and the
    state goes on as the rules say."""
    run = _Run(fresh, 2)
    batches = _batches(_stream(3), 3)
    for b in batches[:10]:
        run.batch(b)
    assert _layout(fresh) == "buckets"
    ps.forget_owner(fresh, TOPIC, 0)  # (one writer at a time: DESIGN §3)
    run.batch(batches[10], epoch=None)  # unfenced: no cache
    assert _layout(fresh) == "zset"
    assert fresh.keys(rk.pending_key("e1", SRC) + ":*") == []
    run.epoch = claim_partition(fresh, TOPIC, 0)
    for b in batches[11:16]:
        run.batch(b)  # the caching owner converts back
    assert _layout(fresh) == "buckets"
    ps.forget_owner(fresh, TOPIC, 0)
    monkeypatch.setenv("LIFTSTREAM_OWNER_CACHE_UNITS", "0")
    run.epoch = claim_partition(fresh, TOPIC, 0)
    for b in batches[16:]:
        run.batch(b)
    assert _layout(fresh) == "zset"


def test_conversion_refused_with_its_commit(fresh):
    """The conversion is part of the owner's commit: a commit Redis refuses
    leaves the sorted set as it was (and the retry converts it)."""
    from redis.exceptions import ResponseError

    run = _Run(fresh, 10_000)
    batches = _batches(_stream(5), 5)
    for b in batches[:6]:
        run.batch(b, epoch=None)
    old = read_pending(fresh, "e1", SRC)
    assert old and _layout(fresh) == "zset"
    fresh.config_set("maxmemory", 1)  # noeviction: every write is refused
    try:
        rows = [event_row(run.off + i, ev) for i, ev in enumerate(batches[6])]
        with pytest.raises(ResponseError):
            apply_source_batch(fresh, {"e1": run.cfg}, TOPIC, 0, rows, epoch=run.epoch)
    finally:
        fresh.config_set("maxmemory", 0)
    assert _layout(fresh) == "zset" and read_pending(fresh, "e1", SRC) == old
    for b in batches[6:]:
        run.batch(b)
    assert _layout(fresh) == "buckets"


def test_readers_and_conclusion_find_the_buckets(fresh):
    """``due_to_settle`` and the overview's first maturity see the entries
    in the buckets (the index's smallest score), and conclusion deletes every
    bucket and the index."""
    from streams.sampling.sampler import conclude

    run = _Run(fresh, 10_000)
    run.batch([Exposure("x0", "e1", "u0", "control", T0, 1.0),
               Exposure("x1", "e1", "u1", "control", T0 + 4000, 1.0)])
    assert _layout(fresh) == "buckets"
    assert read_pending(fresh, "e1", SRC) == [("u0", T0 + 10_000), ("u1", T0 + 14_000)]
    L = 1000
    assert due_to_settle(fresh, [run.cfg], TOPIC, 0, T0 + 10_000 + L) == [run.cfg]
    assert due_to_settle(fresh, [run.cfg], TOPIC, 0, T0 + 9_999 + L) == []
    from streams.service.overview import _first_maturity

    assert _first_maturity(fresh, [run.cfg], [[SRC]]) == [T0 + 10_000 + L]
    assert fresh.keys(rk.pending_key("e1", SRC) + ":*")
    conclude(fresh, run.cfg)
    assert fresh.keys(rk.pending_key("e1", SRC) + "*") == []
    assert fresh.hget(rk.meta_key("e1"), rk.pending_index_field(SRC)) is None


def _bucket_logs(r) -> dict[str, tuple[int, int, int]]:
    """Each pending bucket's (fields, log records, live entries): a ``+``
    field's entries and a ``-`` field's unit ids are its records."""
    import orjson

    from streams.state import pending as pq

    idx = pq.PendingIndex.parse(r.hget(rk.meta_key("e1"), rk.pending_index_field(SRC)))
    out = {}
    for key in pq.bucket_keys("e1", SRC, idx):
        h = r.hgetall(key)
        live: dict[str, int] = {}
        pq.replay(h, live)
        out[key] = (len(h), sum(len(orjson.loads(v)) for v in h.values()), len(live))
    return out


def test_a_bucket_is_compacted(fresh):
    """Many commits into one bucket (one exposure a batch, every few ms: a
    worker that commits every few hundred ms for days) keep its log within
    ``pending.COMPACT_FACTOR`` x its live entries + ``COMPACT_SLACK``
    records (so fields too): the owner rewrites it as one ``+`` field in the
    commit that passes the bound. The rules' entries are read back after
    every batch (``_Run.batch``), and a new owner loads the same ones."""
    from streams.state import pending as pq

    run = _Run(fresh, 10_000)
    rnd = random.Random(11)
    evs = []
    for i in range(3000):  # 30 s of event time: W + H, every bucket fills and drains
        ts = T0 + 10 * i
        evs.append(Exposure(f"x{i}", "e1", f"u{i}", rnd.choice(["control", "treatment"]),
                            ts, 1.0))
        if i % 3 == 0:
            evs.append(Metric(f"m{i}", f"u{rnd.randint(0, i)}", "rev", 1.0, ts, "e1"))
    most = 0
    for j in range(0, len(evs), 4):
        if j == 2000:  # a new owner: loads the buckets (compacted ones among them)
            before = read_pending(fresh, "e1", SRC)
            ps.forget_owner(fresh, TOPIC, 0)
            run.epoch = claim_partition(fresh, TOPIC, 0)
            assert read_pending(fresh, "e1", SRC) == before
        run.batch(evs[j:j + 4], units=j % 200 == 0)
        for key, (fields, records, live) in _bucket_logs(fresh).items():
            most = max(most, fields)
            bound = pq.COMPACT_FACTOR * live + pq.COMPACT_SLACK
            assert records <= bound, (key, fields, records, live)
    assert _layout(fresh) == "buckets"
    assert bits(read_units(fresh, run.cfg)) == bits(run.red.states["e1"].units)
    assert most > pq.COMPACT_SLACK, "the stream writes more fields than the slack"
