"""Smoke tests: the ``liftstream bench …`` subcommands that need a broker and
Redis, end to end through the command line on the session's services, with
tiny event counts (the in-process ones: ``tests/unit/bench/test_bench_commands.py``).

Each asserts on what the command prints: every event applied, the worker's
row present (not its failure), latencies measured.
"""

from __future__ import annotations

import json
import math

import pytest

from streams.cli.main import main as cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_bench_ingest_command(capsys, kafka_bootstrap, redis_url):
    """(a) raw, (b) Ingestor and (c) a real worker over 300 events, then the report."""
    argv = ["bench", "ingest", "--events", "300", "--partitions", "2", "--no-profile",
            "--bootstrap-servers", kafka_bootstrap, "--redis-url", redis_url]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench ingest: 300 events, 2 partitions")
    assert "(a) raw consume + orjson" in out and "(b) Ingestor.process -> Redis" in out
    assert "(c) worker end to end" in out, out  # not "(c) worker: failed: …"
    assert "(b) applied 300/300 events" in out and "0 dead letters" in out
    assert "applied 300/300 (" in out  # the worker's line
    assert "profile of (b)" not in out


def test_bench_ingest_command_json(capsys, kafka_bootstrap, redis_url):
    argv = ["bench", "ingest", "--events", "200", "--partitions", "1", "--no-worker",
            "--no-profile", "--bootstrap-servers", kafka_bootstrap, "--redis-url", redis_url,
            "--json"]
    assert cli(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["events"] == 200 and res["partitions"] == 1
    assert res["ingest"]["applied"] == 200 and res["raw"]["events"] == 200
    assert "worker" not in res and "profile" not in res
    assert res["floor"]["floor_us"] > 0


def _kinds_merged() -> bool:
    from schemas.records import MetricSpec

    return "kind" in getattr(MetricSpec, "__dataclass_fields__", {})


@pytest.mark.skipif(not _kinds_merged(), reason="issue 26: runs once kinds-state "
                    "(MetricSpec.kind and its state) is merged")
def test_bench_ingest_kinds_command(capsys, kafka_bootstrap, redis_url):
    """``--kinds mixed`` (issue 26): a conversion and a ratio beside a sum,
    every event applied, and (b) once more with the same event metrics as
    sums, so the report gives the kinds' extra cost per event."""
    argv = ["bench", "ingest", "--events", "300", "--partitions", "2", "--no-worker",
            "--no-profile", "--kinds", "mixed", "--bootstrap-servers", kafka_bootstrap,
            "--redis-url", redis_url, "--json"]
    assert cli(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kinds"] == "mixed"
    assert [m["kind"] for m in res["metrics"]] == ["sum", "conversion", "ratio"]
    for part in ("ingest", "ingest_sums"):
        assert res[part]["applied"] == 300 and res[part]["dead_letters"] == 0, res[part]
        assert res[part]["counters"].get("unknown_metric", 0) == 0, res[part]["counters"]
    k = res["kinds_cost"]
    assert k["mixed_us"] > 0 and k["sums_us"] > 0 and math.isfinite(k["extra_share"])
    # and the text report says it
    argv = [a for a in argv if a != "--json"]
    argv[argv.index("--events") + 1] = "120"
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "metrics value (sum), purchase (conversion), value_per_session (ratio)" in out
    assert "with a conversion and a ratio against" in out, out


def test_bench_latency_command(capsys, kafka_bootstrap, redis_url):
    """A worker (role all) estimating while events arrive at 20/s for 2 s."""
    argv = ["bench", "latency", "--rate", "20", "--seconds", "2",
            "--bootstrap-servers", kafka_bootstrap, "--redis-url", redis_url, "--json"]
    assert cli(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["events"] >= 30 and res["measured"] == res["events"]
    assert 0.0 < res["min_s"] <= res["p50_s"] <= res["p99_s"] <= res["max_s"] < 60.0
    assert res["estimates"] >= 1


def test_bench_async_redis_engine(capsys, redis_url):
    """``--engine redis``: worker threads through ``async_step`` on a real redis-server."""
    argv = ["bench", "async", "--engine", "redis", "--redis-url", redis_url,
            "--experiments", "20", "--workers", "2", "--staleness", "0,2", "--sweeps", "20",
            "--json"]
    assert cli(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["engine"] == "redis" and res["sweeps"] == 20
    assert set(res["async_exact"]) == set(res["async_uncorrected"]) == {"0", "2"}
    assert "async_own" not in res  # the simulator's variant only
    assert all(0.0 < a <= 1.0 for a in res["acceptance"].values())
    assert "races" in res["async_exact"]["2"]
