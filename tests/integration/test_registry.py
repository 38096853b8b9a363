"""The registry under junk experiment ids (issue 24 defect 8), on a real
redis-server: Redis's own command statistics count the round trips."""

from __future__ import annotations

import random
import string
import time

import pytest
import redis

from schemas.codec import dumps
from schemas.records import ExperimentConfig, Exposure, MetricSpec
from streams.ingest.ingestor import Ingestor
from streams.state.registry import Registry
from tests.support.streaming_harness import event_dict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NOW = int(time.time() * 1000)
REAL = ExperimentConfig(experiment_id="real", variants=("control", "t1"),
                        metrics=(MetricSpec("rev"),), started_at=NOW - 3_600_000)


def command_calls(r) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (INFO commandstats)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in r.info("commandstats").items()}


def test_defect8_junk_experiment_ids_bounded_cache_and_round_trips(redis_url):
    """5,000 random experiment ids in 10 batches (with one real exposure
    each): the registry's cache stays bounded and the Redis commands per
    batch do not grow with the number of ids (they were ~3 per id)."""
    r = redis.Redis.from_url(redis_url)
    reg = Registry(r)
    reg.put(REAL)
    ing = Ingestor(r, reg)
    rnd = random.Random(8)
    batches, per_batch = 10, 500
    r.config_resetstat()
    off = 0
    for b in range(batches):
        msgs = []
        for i in range(per_batch):
            junk = "".join(rnd.choices(string.ascii_lowercase + string.digits, k=12))
            msgs.append((off, dumps(event_dict(Exposure(f"j{off}", junk, f"u{off}", "control",
                                                        NOW + i)))))
            off += 1
        msgs.append((off, dumps(event_dict(Exposure(f"r{b}", "real", f"ru{b}", "t1", NOW)))))
        off += 1
        res = ing.process("ev", 0, msgs, NOW + 1000)
        assert res.counts["dead_letter:unknown_experiment"] == per_batch
    calls = command_calls(r)
    calls.pop("info", None)
    total = sum(calls.values())
    lookups = calls.get("get", 0) + calls.get("mget", 0)
    # a few per batch, none per junk id: among them the real experiment's
    # generation, read with the batch's first reads (``partition_start``: is
    # the cached config still of the registered incarnation?) and by its owner
    assert lookups <= 3 * batches, calls
    assert total <= 60 * batches, calls
    assert reg.cache_size() <= reg.max_negative + 1
    assert int(r.hget("lr:{e:real}:meta", "c:exposures")) == batches
    print(f"\n[registry] {batches * per_batch} junk ids: {total} Redis commands "
          f"({lookups} GET/MGET), cache {reg.cache_size()} entries")
