"""``liftstream bench ingest`` at tiny N against the session's broker and Redis."""

from __future__ import annotations

import pytest

from streams.bench_ingest import format_report, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_bench_ingest_small(kafka_bootstrap, redis_url):
    n = 600
    res = run(events=n, partitions=2, bootstrap=kafka_bootstrap, redis_url=redis_url,
              e2e=False, profile=True)
    assert res["events"] == n
    for phase in ("raw", "ingest"):
        assert res[phase]["events"] == n
        assert res[phase]["rate"] > 0 and res[phase]["rate_per_core"] > 0
    b = res["ingest"]
    assert b["applied"] == n, b  # every event applied to the experiment in Redis
    assert b["dead_letters"] == 0 and b["counts"]["received"] == n
    assert b["lua_calls"] >= 1
    assert res["ratio"] == pytest.approx(b["rate"] / res["raw"]["rate"])
    assert {p["part"] for p in res["profile"]["parts"]} >= {
        "validation (parse_event_row)", "apply (apply_rows: Lua call, argv, reply)"}
    assert "(b)/(a)" in format_report(res)
