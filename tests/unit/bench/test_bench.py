"""``liftstream bench sampler`` end to end at toy sizes (the NumPyro baseline through the
command line: tests/unit/bench/test_bench_commands.py).

Why: the benchmark's numbers are only meaningful if the JSON has every field
a reader (or a CI dashboard) looks for, and if the NumPyro baseline samples
the same posterior as the Gibbs sweep; both are checked here in seconds.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from streams.bench import sampler as bench
from streams.bench.numpyro import import_error

LIFTSTREAM_FIELDS = {
    "sweeps_per_s", "chain_sweeps_per_s", "ess_per_s_median", "ess_per_s_min",
    "ess_bulk_median", "ess_bulk_min", "sample_s", "warmup_s", "rhat_max",
}


def _args(**kw) -> argparse.Namespace:
    base = dict(problems=2, chains=2, strata=7, sweeps=60, numpyro="no", device="cpu",
                json=True)
    base.update(kw)
    return argparse.Namespace(**base)


def _run(capsys, **kw) -> tuple[int, dict]:
    rc = bench.sampler_main(_args(**kw))
    return rc, json.loads(capsys.readouterr().out)


def test_liftstream_only(capsys):
    rc, res = _run(capsys)
    assert rc == 0
    assert {"machine", "config", "liftstream", "numpyro", "ratio_ess_per_s",
            "ratio_sweeps_per_s"} <= res.keys()
    assert LIFTSTREAM_FIELDS <= res["liftstream"].keys()
    assert res["numpyro"] is None and res["numpyro_skipped"] == "--numpyro no"
    ls = res["liftstream"]
    assert ls["sweeps_per_s"] > 0 and 0 < ls["ess_bulk_min"] <= ls["ess_bulk_median"]


def test_auto_skips_large_problem_sets():
    go, why = bench._numpyro_plan("auto", bench.NUMPYRO_AUTO_MAX_PROBLEMS + 1)
    assert not go and why


def test_unavailable_baseline_or_device_exits_2(capsys, monkeypatch):
    import streams.bench.numpyro as bn
    from kernels.backend import cupy_or_none

    monkeypatch.setattr(bn, "import_error", lambda: "ModuleNotFoundError: numpyro")
    assert bench.sampler_main(_args(numpyro="yes", sweeps=10)) == 2
    assert "numpyro" in capsys.readouterr().err
    # auto falls back to liftstream only, saying why
    rc, res = _run(capsys, numpyro="auto", sweeps=10)
    assert rc == 0 and "not importable" in res["numpyro_skipped"]
    if cupy_or_none() is None:
        assert bench.sampler_main(_args(device="gpu", sweeps=10)) == 2


def test_human_table(capsys):
    assert bench.sampler_main(_args(json=False, sweeps=20)) == 0
    out = capsys.readouterr().out
    assert "sweeps (iterations)/s" in out and "NumPyro baseline skipped" in out


def test_synthetic_problems_are_valid_data():
    st = bench.synthetic_problems(12, 5, seed=3, units=4000)
    n, sy, syy = st["n"], st["sy"], st["syy"]
    assert n.shape == (12, 2, 5) and (n >= 0).all()
    # perturbed copies keep a non-negative within-cell sum of squares
    ssw = syy - sy**2 / np.maximum(n, 1)
    assert (ssw >= -1e-6 * np.maximum(syy, 1)).all()
    assert len(bench.strata_edges(5)) == 6 and bench.strata_edges(7) == bench.DEFAULT_EDGES


def test_arrival_density_port_matches_kernels():
    if import_error() is not None:
        pytest.skip(f"numpyro/jax not installed: {import_error()}")
    from kernels import arrival
    from streams.bench import numpyro as bn

    bn._jax()
    x = np.linspace(-8, 2, 41)
    for n, T, D in [(10.0, 30.0, 1.0), (3000.0, 5000.0, 7.0), (0.0, 0.0, 3.0), (5.0, 2.0, 0.0)]:
        ref = arrival.log_density(x, n, T, D, -2.0, 0.5)
        got = np.asarray(bn.arrival_log_density(x, n, T, D, -2.0, 0.5))
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-9)



def test_bench_ingest_kinds_spread_the_same_records():
    """``bench ingest --kinds`` (issue 26): the same events whatever the kinds,
    metric events spread over value, purchase and sessions; "mixed" is a sum,
    a conversion and a ratio over exactly the event metrics "sum" has."""
    from streams.bench.ingest import kinds_metrics, traffic

    cfg0, evs0 = traffic(600, seed=1, experiment="b")
    cfg, evs = traffic(600, seed=1, experiment="b", kinds="mixed")
    assert len(evs) == len(evs0) == 600
    assert [e["event_id"] for e in evs] == [e["event_id"] for e in evs0]
    assert {e["metric"] for e in evs if e["type"] == "metric"} == {"value", "purchase",
                                                                    "sessions"}
    assert [m.kind for m in cfg.metrics] == ["sum", "conversion", "ratio"]
    import dataclasses

    sums = dataclasses.replace(cfg, metrics=kinds_metrics("sum"))
    assert cfg.event_metrics == sums.event_metrics == ("value", "purchase", "sessions")
    assert traffic(600, seed=1, experiment="b", kinds="none")[0].metrics == cfg0.metrics


def test_bench_ingest_polls_the_worker_rarely_until_near_the_end():
    """``run_worker`` reads the worker's /metrics (CPU the measurement counts)
    at most a few dozen times per run, and ``POLL_MIN_S`` apart near the end
    and before the first event (the span's precision)."""
    from streams.bench.ingest import POLL_MAX_S, POLL_MIN_S, poll_wait

    assert poll_wait(0, 100_000, 0, None, 5.0) == POLL_MIN_S  # not started
    assert poll_wait(2000, 100_000, 2000, 5.0, 5.0) == POLL_MIN_S  # no rate yet
    assert poll_wait(2000, 100_000, 2000, 5.0, 5.02) == POLL_MIN_S  # no progress yet
    assert poll_wait(12_000, 100_000, 2000, 5.0, 5.5) == POLL_MAX_S  # 2.2 s left
    assert poll_wait(90_000, 100_000, 2000, 5.0, 9.4) == pytest.approx(0.25)  # 0.5 s left
    assert poll_wait(99_800, 100_000, 2000, 5.0, 9.89) == POLL_MIN_S  # 10 ms left
    # a simulated 4 s run at 25,000 events/s: the reads it makes
    t, got, reads = 5.0, 2000.0, 0
    while got < 100_000:
        reads += 1
        t += poll_wait(got, 100_000, 2000, 5.0, t)
        got = min(100_000, 2000 + 25_000 * (t - 5.0))
    assert reads < 40  # 200 at POLL_MIN_S


@pytest.mark.parametrize("kind", sorted(bench.KIND_PROBLEMS))
def test_kind_problems_are_valid_data_and_report_per_metric(kind, capsys):
    """``--kind`` (issue 26): the kind's problems are valid cells, P metrics
    take P × KIND_PROBLEMS[kind] problems, and the sweep time is reported per
    problem and per metric."""
    st = bench.kind_problems(bench.synthetic_problems(6, 5, seed=3, units=4000), kind)
    n, sy, syy = st["n"], st["sy"], st["syy"]
    assert n.shape[0] == 6 * bench.KIND_PROBLEMS[kind]
    assert ((syy - sy**2 / np.maximum(n, 1)) >= -1e-6 * np.maximum(syy, 1)).all()
    rc, res = _run(capsys, kind=kind, sweeps=20, problems=3)
    assert rc == 0 and res["config"]["kind"] == kind and res["config"]["metrics"] == 3
    assert res["config"]["problems"] == 3 * bench.KIND_PROBLEMS[kind]
    ps = res["per_sweep_ms"]
    assert ps["metric"] == pytest.approx(ps["problem"] * bench.KIND_PROBLEMS[kind])
    assert (res.get("ratio_recombine_ms") is not None) == (kind == "ratio")
