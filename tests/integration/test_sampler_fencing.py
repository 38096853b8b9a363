"""Sampler fencing and bad chain blobs (issue 15 item 3), on a real redis-server.

* A sampler that lost an experiment in a rebalance but is still inside a tick
  (it loaded the chains before the new owner's tick, writes after it) cannot
  write back: chain writes only go forward in iteration (``STORE_CHAIN``), so
  its write is refused, it publishes nothing, and the stored chain and
  estimate stay the new owner's.
* One unreadable chain blob restarts that chain (counted) and the tick goes
  on, for it and for the other experiments.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from schemas.codec import dumps, loads
from streams.dev.simulate import make_traffic
from streams.ingest.ingestor import Ingestor
from streams.sampling.advance import TickConfig, advance
from streams.sampling.sampler import SamplerService
from streams.state.keys import chain_key, estimate_key
from streams.state.registry import Registry

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
START = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS
TICK = TickConfig(chains=2, sweeps=30, window=40, warmup=20, min_draws=5, seed=3)


def _ingest(r, eids: list[str]) -> None:
    reg = Registry(r)
    ing = Ingestor(r, reg)
    for k, eid in enumerate(eids):
        cfg, evs, _ = make_traffic(600, 6, eid, 5 + k, 86_400, START)
        reg.put(cfg)
        ing.process(f"t{k}", 0, [(i, dumps(e)) for i, e in enumerate(evs)],
                    int(time.time() * 1000))
        ing.settle_quiet(f"t{k}", 0, int(time.time() * 1000), int(time.time() * 1000))


def _sampler(r) -> SamplerService:
    return SamplerService(r, Registry(r), TICK, xp=np)


def test_a_zombie_sampler_cannot_write_back(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    _ingest(r, ["fz1"])
    a, b = _sampler(r), _sampler(r)
    a.own("fz1")
    assert a.tick(), "a first estimate"
    zombie_snaps, zombie_stored = a.load(["fz1"])  # A is inside a tick ...
    b.own("fz1")  # ... when the rebalance gives the experiment to B
    recs_b = b.tick()
    it_b = recs_b[0]["diagnostics"]["iteration"]
    assert it_b == 2 * TICK.sweeps
    est_b = r.get(estimate_key("fz1", "value", "treatment"))
    chain_b = r.get(chain_key("fz1", "value"))
    # A finishes its tick: the same iteration as B's, from older chains
    recs_a, chains_a = advance(zombie_snaps, zombie_stored, TICK, int(time.time() * 1000))
    assert recs_a[0]["diagnostics"]["iteration"] == it_b
    assert a.store(chains_a, recs_a) == []  # refused: nothing to publish
    assert a.stale_writes == 1
    assert r.get(chain_key("fz1", "value")) == chain_b
    assert r.get(estimate_key("fz1", "value", "treatment")) == est_b
    assert b.tick()[0]["diagnostics"]["iteration"] == it_b + TICK.sweeps  # B goes on


def test_a_bad_chain_blob_restarts_only_that_chain(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    _ingest(r, ["bc1", "bc2"])
    s = _sampler(r)
    s.own("bc1")
    s.own("bc2")
    s.tick()
    s.tick()
    r.set(chain_key("bc1", "value"), b"\x00not a chain blob")
    r.incr("lr:{e:bc1}:dirty_seq")  # new data, so both are due again
    r.incr("lr:{e:bc2}:dirty_seq")
    recs = {rec["experiment_id"]: rec for rec in s.tick()}
    assert s.bad_chains == 1
    assert recs["bc1"]["diagnostics"]["iteration"] == TICK.sweeps  # restarted
    assert recs["bc2"]["diagnostics"]["iteration"] == 3 * TICK.sweeps  # went on
    assert loads(r.get(estimate_key("bc1", "value", "treatment")))["diagnostics"][
        "iteration"] == TICK.sweeps
