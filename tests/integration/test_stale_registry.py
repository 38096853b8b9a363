"""A worker whose registry cache still holds a deleted experiment's config
(``Registry`` caches configs for ``ttl`` seconds; every other worker's cache
is stale after a delete until then), against a real redis-server.

The delete (``Registry.delete``: what ``liftstream experiments delete`` and a
tombstone on the experiments topic run) removes the experiment's keys and its
generation (``keys.generation_key``) but keeps its fences. A stale worker's
next batch must write nothing of the deleted experiment (no key under
``lr:{e:<id>}:`` but the fences as they were, no routing marker), surface its
events as dead letters ``unknown_experiment`` and record the batch's
position; and when the experiment was re-created under the same id in the
meantime, the new one must hold what a fresh worker would have written for
the batch, nothing of the stale worker's old config.
"""

from __future__ import annotations

import pytest
import redis

from schemas.codec import dumps
from schemas.records import ExperimentConfig, MetricSpec
from streams.ingest.ingestor import Ingestor, read_applied
from streams.state import keys as rk
from streams.state.partition_store import ExperimentChanged, forget_owner, read_sightings
from streams.state.registry import Registry
from streams.state.store import (
    apply_rows,
    claim_partition,
    clocked,
    event_row,
    read_pending,
)
from streams.state.unit_index import is_bucket

T0 = 1_700_000_000_000
TOPIC = "liftstream.events"
SRC = rk.source(TOPIC, 0)


@pytest.fixture()
def fresh(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    forget_owner(r, TOPIC, 0)
    yield r
    forget_owner(r, TOPIC, 0)
    r.close()


def _old() -> ExperimentConfig:
    return ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),),
                            window_seconds=10, bucket_seconds=2)


def _new() -> ExperimentConfig:
    """e1 re-created under the same id: another variant and metric, so what
    the old config's rules write differs from what the new one's do."""
    return ExperimentConfig(experiment_id="e1", variants=("control", "b"),
                            metrics=(MetricSpec("clicks"),), window_seconds=20,
                            bucket_seconds=2)


def _x(off: int, unit: str, variant: str, t: int) -> tuple[int, bytes]:
    return off, dumps({"type": "exposure", "event_id": f"x{off}", "experiment_id": "e1",
                       "unit_id": unit, "variant": variant, "ts": T0 + t})


def _m(off: int, unit: str, metric: str, t: int, eid: str | None = "e1") -> tuple[int, bytes]:
    ev = {"type": "metric", "event_id": f"m{off}", "unit_id": unit, "metric": metric,
          "value": 2.0, "ts": T0 + t}
    if eid is not None:
        ev["experiment_id"] = eid
    return off, dumps(ev)


def _first(ing: Ingestor, epoch: int) -> None:
    """The batch before the delete: units u0 and u1 exposed, a metric."""
    res = ing.process(TOPIC, 0, [_x(0, "u0", "control", 0), _x(1, "u1", "treatment", 10),
                                 _m(2, "u0", "rev", 20)], T0 + 60_000, epoch)
    assert res.counts["exposures"] == 2 and res.counts["metric_applied"] == 1, res.counts


#: the batch a stale worker applies after the delete: a new unit under a
#: variant only the old config has, its metric, a metric of a unit exposed
#: before the delete, and one without experiment_id (routed by the index)
STALE = [_x(3, "u2", "treatment", 1000), _m(4, "u2", "rev", 1010),
         _m(5, "u0", "rev", 1020), _x(6, "u3", "control", 1030),
         _m(7, "u3", "rev", 1040, eid=None)]


def _value(r: redis.Redis, k: bytes):
    t = r.type(k)
    if t == b"hash":
        return r.hgetall(k)
    if t == b"zset":
        return r.zrange(k, 0, -1, withscores=True)
    if t == b"set":
        return r.smembers(k)
    if t == b"list":
        return r.lrange(k, 0, -1)
    return r.get(k)


def _state(r: redis.Redis, fences: bool = True) -> dict:
    """Every key of e1 (without its generation, a random token; without the
    fences unless ``fences``: their commit sequences count commits of every
    incarnation; the dedupe sightings as what they hold: an owner with its
    copy of them packs them, one without writes them per id,
    ``SeenBuckets``; the pending entries as what they are) and e1's field of every
    unit's routing index."""
    fence = rk.experiment_key("e1", "fence:").encode()
    seen = rk.experiment_key("e1", "seen:").encode()
    # the pending buckets as what they hold too (their fields are named by
    # the commit sequence, ``streams.state.pending``)
    pend = (rk.pending_key("e1", SRC) + ":").encode()
    out = {k: _value(r, k) for k in r.scan_iter(match=rk.experiment_glob("e1"))
           if k != rk.generation_key("e1").encode() and not k.startswith(seen)
           and not k.startswith(pend) and (fences or not k.startswith(fence))}
    out["pending"] = read_pending(r, "e1", SRC)
    meta, field = out.get(rk.meta_key("e1").encode(), {}), rk.seen_index_field(SRC).encode()
    if field in meta:  # ``start:end`` of each bucket, without its packed fields' count
        meta[field] = b" ".join(b":".join(x.split(b":")[:2]) for x in meta[field].split())
    out["sightings"] = read_sightings(r, "e1", SRC)
    for k in r.scan_iter(match="lr:{x:*"):  # the routing index (issue 25)
        if is_bucket(k):
            for f, v in r.hscan_iter(k, match="*|e1"):  # bucket names hold wall time
                out.setdefault((b"index", f), v)
    return out


def test_a_stale_worker_writes_nothing_of_a_deleted_experiment(fresh, redis_url):
    reg = Registry(fresh, ttl=3600.0)  # this worker's cache stays stale throughout
    reg.put(_old(), now_ms=T0)
    ing = Ingestor(fresh, reg)
    epoch = claim_partition(fresh, TOPIC, 0)
    _first(ing, epoch)
    other = redis.Redis.from_url(redis_url)
    assert Registry(other).delete("e1") > 0  # another process: ``experiments delete``
    other.close()
    assert reg.get("e1") is not None, "the test needs a stale cache"
    before = _state(fresh)
    # only the fences are left
    assert {k for k in before if k not in ("sightings", "pending")} == {
        rk.fence_key("e1", SRC).encode()}, before
    assert before["sightings"] == {} and before["pending"] == []

    res = ing.process(TOPIC, 0, STALE, T0 + 60_000, epoch)

    assert _state(fresh) == before, "the stale worker wrote keys of the deleted experiment"
    assert [d["reason"]["code"] for d in res.dead_letters] == ["unknown_experiment"] * 4
    assert res.counts["dead_letter:unknown_experiment"] == 4, res.counts
    # the metric without experiment_id: routed by no index, held (not lost)
    assert res.counts["unrouted"] == 1, res.counts
    assert res.counts["exposures"] == 0 and res.counts["metric_applied"] == 0, res.counts
    assert read_applied(fresh, TOPIC, [0]) == {0: 7}, "the batch's position"
    assert reg.get("e1") is None, "the registry still holds the deleted experiment"


def _recreated_run(r: redis.Redis, redis_url: str) -> tuple[dict, list]:
    """The stale worker's batch after e1 was deleted and re-created (``_new``)."""
    reg = Registry(r, ttl=3600.0)
    reg.put(_old(), now_ms=T0)
    ing = Ingestor(r, reg)
    epoch = claim_partition(r, TOPIC, 0)
    _first(ing, epoch)
    other = redis.Redis.from_url(redis_url)
    Registry(other).delete("e1")
    Registry(other).put(_new(), now_ms=T0)
    other.close()
    assert reg.get("e1").variants == _old().variants, "the test needs a stale cache"
    res = ing.process(TOPIC, 0, STALE, T0 + 60_000, epoch)
    return _state(r, fences=False), sorted(d["reason"]["code"] for d in res.dead_letters)


def _fresh_run(r: redis.Redis) -> tuple[dict, list]:
    """The same batch on a clean Redis by a worker that reads the new config,
    after a first batch of another experiment (the same partition clock and
    offsets as the stale run's)."""
    r.flushall()
    forget_owner(r, TOPIC, 0)
    reg = Registry(r)
    reg.put(ExperimentConfig(experiment_id="e0", metrics=(MetricSpec("rev"),)), now_ms=T0)
    reg.put(_new(), now_ms=T0)
    ing = Ingestor(r, reg)
    epoch = claim_partition(r, TOPIC, 0)
    first = [(o, raw.replace(b'"e1"', b'"e0"')) for o, raw in
             [_x(0, "u0", "control", 0), _x(1, "u1", "treatment", 10),
              _m(2, "u0", "rev", 20)]]
    ing.process(TOPIC, 0, first, T0 + 60_000, epoch)
    res = ing.process(TOPIC, 0, STALE, T0 + 60_000, epoch)
    return _state(r, fences=False), sorted(d["reason"]["code"] for d in res.dead_letters)


def test_a_stale_worker_writes_nothing_of_the_old_config_into_a_recreated_experiment(
        fresh, redis_url):
    stale, stale_dead = _recreated_run(fresh, redis_url)
    clean, clean_dead = _fresh_run(fresh)
    assert stale_dead == clean_dead
    assert stale == clean, "the re-created experiment got the stale worker's old config"


def test_the_owner_refuses_a_config_of_another_generation(fresh, redis_url):
    """The guard of the window between the batch's first read and the
    owner's (a delete, or a delete and re-create, in between): the owner
    compares the generation it reads with the one its config was read with
    and writes nothing on a mismatch (``ExperimentChanged``)."""
    reg = Registry(fresh, ttl=3600.0)
    reg.put(_old(), now_ms=T0)
    gen = reg.generation("e1")
    assert gen is not None
    epoch = claim_partition(fresh, TOPIC, 0)
    rows, clk = clocked([event_row(0, _row_event("u0"))], None)
    apply_rows(fresh, reg.get("e1"), TOPIC, 0, rows, clk, epoch=epoch, generation=gen)
    Registry(fresh).delete("e1")
    before = _state(fresh)
    rows, clk = clocked([event_row(1, _row_event("u1"))], None)
    with pytest.raises(ExperimentChanged):
        apply_rows(fresh, reg.get("e1"), TOPIC, 0, rows, clk, epoch=epoch, generation=gen)
    assert _state(fresh) == before
    Registry(fresh).put(_new(), now_ms=T0)
    before = _state(fresh)
    with pytest.raises(ExperimentChanged):
        apply_rows(fresh, reg.get("e1"), TOPIC, 0, rows, clk, epoch=epoch, generation=gen)
    assert _state(fresh) == before


def _row_event(unit: str):
    from schemas.records import Exposure

    return Exposure(f"x-{unit}", "e1", unit, "control", T0, 1.0)


def test_a_delete_between_the_batch_check_and_the_owner_is_refused_and_retried(
        fresh, redis_url, monkeypatch):
    """The delete lands after the batch read the generations (its check found
    the cached config current) and before the owner's reads: the owner
    refuses (``ExperimentChanged``: nothing of the experiment's state
    written, the partition's position not moved), the ingestor reads its
    registry again, and the retry (the events plane retries a refused
    commit) dead-letters the events ``unknown_experiment`` and records the
    position. What this window leaves: the routing markers the refused batch
    set for the batch's exposures (``route_rows`` runs before the owner),
    which the tombstone's second sweep removes."""
    from streams.ingest import ingestor as ingest_mod

    reg = Registry(fresh, ttl=3600.0)
    reg.put(_old(), now_ms=T0)
    ing = Ingestor(fresh, reg)
    epoch = claim_partition(fresh, TOPIC, 0)
    _first(ing, epoch)
    real = ingest_mod.partition_start

    def then_deleted(*args, **kwargs):
        got = real(*args, **kwargs)
        other = redis.Redis.from_url(redis_url)
        Registry(other).delete("e1")
        other.close()
        return got

    monkeypatch.setattr(ingest_mod, "partition_start", then_deleted)
    with pytest.raises(ExperimentChanged):
        ing.process(TOPIC, 0, STALE, T0 + 60_000, epoch)
    monkeypatch.undo()
    assert reg.get("e1") is None, "the registry was not read again"
    state = _state(fresh)
    assert {k for k in state if isinstance(k, bytes) and k.startswith(b"lr:{e:")} == {
        rk.fence_key("e1", SRC).encode()}, state
    assert read_applied(fresh, TOPIC, [0]) == {0: 2}, "the position moved"
    res = ing.process(TOPIC, 0, STALE, T0 + 60_000, epoch)  # the retry
    assert [d["reason"]["code"] for d in res.dead_letters] == ["unknown_experiment"] * 4
    assert read_applied(fresh, TOPIC, [0]) == {0: 7}
    Registry(fresh).sweep("e1")  # the tombstone's second delete
    assert _state(fresh) == {rk.fence_key("e1", SRC).encode(): fresh.hgetall(
        rk.fence_key("e1", SRC)), "sightings": {}, "pending": []}


def test_a_stale_worker_settles_nothing_of_a_recreated_experiment(fresh, redis_url):
    """Settling (``Ingestor.settle_quiet``: maturing the experiments without
    events in a batch) with a config cached before a delete and re-create:
    the owner refuses it, the registry is read again, and the new
    experiment's state stays as its own worker wrote it."""
    reg = Registry(fresh, ttl=3600.0)
    reg.put(_old(), now_ms=T0)
    stale = Ingestor(fresh, reg)
    other = redis.Redis.from_url(redis_url)
    Registry(other).delete("e1")
    oreg = Registry(other)
    oreg.put(_new(), now_ms=T0)
    Ingestor(other, oreg).process(TOPIC, 0, [_x(0, "u0", "control", 0)], T0 + 60_000)
    other.close()
    assert len(read_pending(fresh, "e1", SRC)) == 1
    before = _state(fresh)
    assert stale.settle_quiet(TOPIC, 0, T0 + 3_600_000, T0 + 60_000) == set()
    assert _state(fresh) == before, "settled with the old config"
    assert reg.get("e1").variants == _new().variants, "the registry was not read again"
