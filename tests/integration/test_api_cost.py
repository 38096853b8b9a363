"""The API's Redis reads cost O(the experiment), not O(the keyspace) (issue
14 item 4): estimates and history are found through the experiment's index
set (``lr:{e:<id>}:estimates``), never by ``SCAN``.

On a real redis-server: an experiment's estimates and history are written
the way the sampler writes them, read back, then Redis is filled with 1M
unrelated keys (``DEBUG POPULATE``) and they are read again. The answers are
the same, and so is the exact list of commands (and their call counts) the
reads sent; none of them is ``SCAN`` or ``KEYS``.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis

from schemas.records import ExperimentConfig
from streams.sampling.advance import StoredChains, TickConfig
from streams.sampling.sampler import SamplerService, read_estimates, read_history
from streams.state.registry import Registry

pytestmark = pytest.mark.integration


def _rec(metric: str, variant: str, i: int) -> dict:
    eff = {"mean": 0.1 * i, "lo": 0.0, "hi": 0.2 * i}
    return {"experiment_id": "api", "metric": metric, "variant": variant,
            "computed_at": 1_700_000_000_000 + i, "watermark": {"event_time": 1_700_000_000 + i},
            "adjusted": {"effect": eff}, "naive": {"effect": eff},
            "diagnostics": {"rhat": 1.0, "iteration": 50 * i}}


def _calls(r) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in r.info("commandstats").items()}


def _reads(r) -> tuple[list, dict, dict[str, int]]:
    before = _calls(r)
    est, hist = read_estimates(r, "api"), read_history(r, "api")
    after = _calls(r)
    sent = {k: n - before.get(k, 0) for k, n in after.items()
            if n != before.get(k, 0) and k != "cmdstat_info"}
    return est, hist, sent


def test_reads_do_not_grow_with_unrelated_keys(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    reg = Registry(r)
    reg.put(ExperimentConfig(experiment_id="api"))  # the sampler writes only into it
    svc = SamplerService(r, reg, TickConfig())
    svc.load(["api"])  # ... as the tick loaded it (its generation)
    names = [("value", "treatment"), ("value", "treatment_b"), ("revenue", "treatment"),
             ("revenue", "treatment_b")]
    for i in range(1, 4):  # three ticks
        chains = {("api", m): StoredChains({"iteration": np.array(50 * i)}, None)
                  for m in {m for m, _ in names}}
        assert len(svc.store(chains, [_rec(m, v, i) for m, v in names])) == len(names)
    est, hist, sent = _reads(r)
    assert sorted((e["metric"], e["variant"]) for e in est) == sorted(names)
    assert all(e["diagnostics"]["iteration"] == 150 for e in est)
    assert sorted(hist) == sorted(f"{m}:{v}" for m, v in names)
    assert all([p["iteration"] for p in pts] == [50, 100, 150] for pts in hist.values())

    try:
        r.execute_command("DEBUG", "POPULATE", 1_000_000, "unrelated")
    except redis.ResponseError:  # Redis 7 ships with DEBUG off: write them
        pipe = r.pipeline(transaction=False)
        for k in range(0, 1_000_000, 10_000):
            pipe.mset({f"unrelated:{j}": "x" for j in range(k, k + 10_000)})
        pipe.execute()
    assert r.dbsize() > 1_000_000
    est2, hist2, sent2 = _reads(r)
    assert (est2, hist2) == (est, hist)
    assert sent2 == sent, (sent, sent2)  # the same commands, as many of each
    assert not {"cmdstat_scan", "cmdstat_keys"} & set(sent2), sent2
    r.flushall()
