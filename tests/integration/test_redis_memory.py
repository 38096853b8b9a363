"""Redis memory per exposed unit (issue 5, sizing): ingest N units of one
experiment straight through ``Ingestor`` (no Kafka) and sum ``MEMORY USAGE``
of the experiment's keys (``lr:{e:<id>}:*``) and of the shared keys (unit
index, registry, ingest offsets), while the units are pending and after every
unit matured. Prints the numbers; asserts a generous bound so a regression
that doubles per-unit state is noticed."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import redis

from schemas.codec import dumps
from streams.dev.simulate import make_traffic
from streams.ingest.ingestor import Ingestor
from streams.state.registry import Registry
from tests.support.scale_helpers import START

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def usage(r, match: str | None = None, exclude: bytes | None = None) -> int:
    keys = [k for k in r.scan_iter(match=match, count=1000)
            if exclude is None or not k.startswith(exclude)]
    return sum(r.memory_usage(k, samples=0) or 0 for k in keys)


def test_memory_per_unit(redis_url):
    r = redis.Redis.from_url(redis_url)
    try:
        cfg, evs, _ = make_traffic(10_000, 8, "mem", 3, 86_400, START)
        cfg = replace(cfg, lateness_seconds=10 * 86_400)
        reg = Registry(r)
        reg.put(cfg)
        ing = Ingestor(r, reg)
        base = r.info("memory")["used_memory"]
        now = int(time.time() * 1000)
        for k in range(0, len(evs), 500):
            ing.process("t", 0, [(k + i, dumps(e)) for i, e in enumerate(evs[k:k + 500])], now)
        units = len({e["unit_id"] for e in evs if e["type"] == "exposure"})
        own = b"lr:{e:mem}"
        pending = (usage(r, "lr:{e:mem}:*"), usage(r, exclude=own),
                   r.info("memory")["used_memory"] - base)
        clock = {"type": "metric", "event_id": "clock", "unit_id": "clock", "metric": "value",
                 "value": 0.0, "experiment_id": "mem",
                 "ts": max(e["ts"] for e in evs) + 12 * 86_400_000}
        ing.process("t", 0, [(len(evs), dumps(clock))], now)
        matured = (usage(r, "lr:{e:mem}:*"), usage(r, exclude=own),
                   r.info("memory")["used_memory"] - base)
        for name, (exp, shared, used) in (("pending", pending), ("matured", matured)):
            print(f"\n[memory] {units} exposed units, {len(evs)} events, {name}: experiment "
                  f"keys {exp / units:.0f} B/unit, shared keys (unit index) "
                  f"{shared / units:.0f} B/unit, used_memory {used / units:.0f} B/unit")
        assert pending[0] / units < 600 and matured[0] / units < 400
    finally:
        r.close()
