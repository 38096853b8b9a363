"""Smoke tests: every in-process ``liftstream bench …`` subcommand end to end,
through the command line's own parser, on a tiny configuration.

Why: a benchmark is run rarely and by hand, so a crash in one (``bench
sampler`` raised ``AttributeError: … no attribute 'gamma'`` in the NumPyro
baseline once the covariate block gave the chains a slope) goes unseen until
someone needs the numbers. Each test asserts on what the command prints, not
only on its exit status. ``bench ingest`` and ``bench latency`` need a broker
and Redis: ``tests/integration/test_bench_commands.py``.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from streams.bench import sampler as bench_sampler
from streams.cli.main import main as cli

TINY_SAMPLER = ["bench", "sampler", "--problems", "2", "--chains", "2", "--strata", "7",
                "--device", "cpu"]


def _json(capsys, argv: list[str]) -> dict:
    """Run ``liftstream <argv> --json``; its stdout parsed (exit status 0 asserted)."""
    assert cli([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_sampler_without_numpyro_says_so(capsys, monkeypatch):
    """Without the ``bench`` extra the baseline is skipped, and the table says
    why and how to install it, instead of the command crashing."""
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` raises ImportError
    monkeypatch.setitem(sys.modules, "numpyro", None)
    assert cli([*TINY_SAMPLER, "--sweeps", "20"]) == 0
    out = capsys.readouterr().out
    assert "liftstream bench sampler: P=2 problems (2 sum metrics), C=2 chains, S=7 strata" in out
    assert "NumPyro baseline skipped: numpyro/jax not importable" in out
    assert "pip install 'liftstream[bench]'" in out
    # the liftstream column has numbers, the NumPyro one none
    row = next(line for line in out.splitlines() if line.startswith("sweeps (iterations)/s"))
    lift, nuts = row.split()[-3:-1]
    assert float(lift.replace(",", "")) > 0 and nuts == "-"


def test_bench_sampler_with_numpyro(capsys):
    """The baseline end to end (~20 s, nearly all of it XLA compiling NUTS on
    2 CPU cores): same posterior as the Gibbs sweep, every figure present."""
    pytest.importorskip("numpyro")
    pytest.importorskip("jax")
    res = _json(capsys, [*TINY_SAMPLER, "--sweeps", "100", "--numpyro", "yes"])
    assert res["numpyro_skipped"] is None
    nu = res["numpyro"]
    assert {"iterations_per_s", "ess_per_s_median", "ess_per_s_min", "sample_s", "warmup_s",
            "init_s", "compile_s", "target_accept", "parametrisation", "warmup_iterations",
            "samples", "divergences", "mean_leapfrog_steps"} <= nu.keys()
    assert nu["dtype"] == "float64" and nu["samples"] == 100
    for k in ("ratio_ess_per_s", "ratio_ess_per_s_min", "ratio_sweeps_per_s"):
        assert res[k] is not None and res[k] > 0
    assert res["agreement"]["agree"], res["agreement"]
    table = bench_sampler.format_table(res)
    assert "NumPyro: NUTS noncentred" in table and ": OK" in table


def test_bench_covariate(capsys):
    res = _json(capsys, ["bench", "covariate", "--problems", "2", "--chains", "2",
                         "--sweeps", "2", "--repeats", "1", "--device", "cpu"])
    assert (res["problems"], res["chains"], res["variants"], res["strata"]) == (2, 2, 2, 7)
    ms = res["ms_per_sweep"]
    assert ms["without"] > 0 and ms["with"] > 0
    assert res["ratio_with"] == pytest.approx(ms["with"] / ms["without"])
    assert res["ratio_with_and_shadow"] == pytest.approx(1.0 + res["ratio_with"])
    assert cli(["bench", "covariate", "--problems", "2", "--chains", "2", "--sweeps", "2",
                "--repeats", "1", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("2 problems × 2 chains × 2 variants × 7 strata (cpu):")
    assert "ms/sweep without a covariate" in line


ASYNC_TINY = ["bench", "async", "--experiments", "20", "--workers", "2", "--staleness",
              "0,2", "--sweeps", "40"]


def test_bench_async_sim(capsys):
    res = _json(capsys, ASYNC_TINY)
    assert (res["experiments"], res["workers"], res["engine"], res["sweeps"]) == (
        20, 2, "sim", 40)
    for kind in ("exact", "own", "uncorrected"):
        assert set(res[f"async_{kind}"]) == {"0", "2"}
    assert set(res["acceptance"]) == {"0", "2"}
    assert all(0.0 < a <= 1.0 for a in res["acceptance"].values())
    for summary in (res["sync"], res["async_exact"]["2"]):
        for name in ("lambda", "psi2"):
            assert math.isfinite(summary[name]["mean"]) and math.isfinite(summary[name]["z"])
    assert cli(ASYNC_TINY) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("exact ") and out[1].startswith("sync ")
    assert sum(line.startswith("async_") for line in out) == 3 * 2
