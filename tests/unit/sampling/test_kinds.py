"""Metric kinds (issue 26): conversion, ratio and capped sums through the
problems, the model and the records, against truth and the delta method.

Snapshots are built from per-unit totals (``tests.support.kinds``), so these
run without the event fold; ``analyze.estimate`` is the path the records take.
"""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest

from schemas.contracts import load_schema
from schemas.records import ExperimentConfig, MetricSpec
from streams.sampling.analyze import estimate
from streams.sampling.problems import chain_names, problems_of
from tests.support.kinds import T0, snapshot_from_units

ESTIMATE = jsonschema.Draft202012Validator(load_schema("estimate"))
Z = 1.959963984540054


def _one(recs: list[dict], metric: str) -> dict:
    (rec,) = [r for r in recs if r["metric"] == metric]
    ESTIMATE.validate(rec)
    return rec


def _delta_ratio(m: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    """ΣM/ΣD and its delta-method variance."""
    n = len(m)
    r = m.sum() / d.sum()
    dbar = d.mean()
    lin = m - r * d
    return r, lin.var(ddof=1) / (n * dbar * dbar)


def _ratio_data(n: int, rho: float, seed: int):
    """Sessions D (Poisson-ish, ≥ 0) and revenue M correlated with D at about ``rho``."""
    rng = np.random.default_rng(seed)
    variant = rng.integers(0, 2, n)
    z1, z2 = rng.standard_normal(n), rng.standard_normal(n)
    d = np.maximum(np.round(np.exp(0.8 + 0.5 * z1)), 0.0)
    m = np.maximum(2.0 * d + 3.0 * (rho * z1 + np.sqrt(1 - rho * rho) * z2) * np.sqrt(d + 1)
                   + 0.4 * variant * d, 0.0)
    return variant, m, d


def test_ratio_single_stratum_matches_delta_method():
    """One stratum, no adjustment: the ratio's effect interval is the delta
    method's within 10% of its width (centre and both ends)."""
    cfg = ExperimentConfig("r1", metrics=(MetricSpec("rps", kind="ratio", numerator="rev",
                                                     denominator="sess"),))
    variant, m, d = _ratio_data(6000, 0.8, seed=11)
    snap = snapshot_from_units(cfg, variant, np.full(len(m), 3), {"rev": m, "sess": d},
                               activity=np.full(len(m), 10.0))
    assert [p.key[1] for p in problems_of(snap)] == ["rps", "rps#den"]
    assert set(chain_names(cfg)) >= {"rps", "rps#den"}
    rec = _one(estimate([snap], chains=8, sweeps=1200, seed=3), "rps")
    assert rec["kind"] == "ratio" and rec["adjustment"] == "unavailable"
    rc, vc = _delta_ratio(m[variant == 0], d[variant == 0])
    rt, vt = _delta_ratio(m[variant == 1], d[variant == 1])
    eff, sd = rt - rc, np.sqrt(vc + vt)
    width = 2 * Z * sd
    got = rec["adjusted"]["effect"]
    assert abs(got["mean"] - eff) < 0.1 * width
    assert abs(got["lo"] - (eff - Z * sd)) < 0.1 * width
    assert abs(got["hi"] - (eff + Z * sd)) < 0.1 * width
    assert abs((got["hi"] - got["lo"]) - width) < 0.1 * width
    # naive equals adjusted without adjustment; per-arm ratios reported
    assert rec["naive"]["effect"]["mean"] == pytest.approx(got["mean"], rel=0.05, abs=1e-3)
    ratio = rec["ratio"]
    assert ratio["naive"]["control"] == pytest.approx(rc) and ratio["naive"]["treatment"] == \
        pytest.approx(rt)
    assert ratio["pooled"] == pytest.approx(m.sum() / d.sum())
    assert abs(ratio["adjusted"]["control"]["mean"] - rc) < 0.2 * np.sqrt(vc) * 2 * Z
    assert abs(rec["adjusted"]["lift"]["mean"] - (rt / rc - 1)) < 0.1 * width / rc
    assert rec["tail"] is None and rec["uncapped"] is None


def test_ratio_correlation_matters():
    """Numerator and denominator correlated: the interval is the delta
    method's (which has the covariance), far from the one that ignores it."""
    cfg = ExperimentConfig("r2", metrics=(MetricSpec("rps", kind="ratio", numerator="rev",
                                                     denominator="sess"),))
    variant, m, d = _ratio_data(4000, 0.8, seed=5)
    snap = snapshot_from_units(cfg, variant, np.full(len(m), 3), {"rev": m, "sess": d},
                               activity=np.full(len(m), 10.0))
    rec = _one(estimate([snap], chains=8, sweeps=800, seed=1), "rps")
    var_delta = sum(_delta_ratio(m[variant == k], d[variant == k])[1] for k in (0, 1))

    def no_cov(mk, dk):  # the delta method without the M–D covariance
        r = mk.sum() / dk.sum()
        return (mk.var(ddof=1) + r * r * dk.var(ddof=1)) / (len(mk) * dk.mean() ** 2)

    var_nocov = sum(no_cov(m[variant == k], d[variant == k]) for k in (0, 1))
    sd = rec["adjusted"]["effect"]["sd"]
    assert abs(sd / np.sqrt(var_delta) - 1) < 0.1
    assert sd < 0.8 * np.sqrt(var_nocov)


def _strata_units(n: int, seed: int, D: int = 5):
    """Units in 4 activity strata, heavier ones first (entry buckets drawn
    from a geometric law per stratum), the rest not yet arrived."""
    rng = np.random.default_rng(seed)
    act = np.array([1.5, 3.0, 6.0, 11.5])
    stratum = rng.integers(0, 4, n) + 1  # strata 1..4 of the default edges
    p = 1 - (1 - act[stratum - 1] / 28.0)
    entry = rng.geometric(p) - 1
    keep = entry < D
    return stratum[keep], entry[keep], act[stratum[keep] - 1], rng


def test_conversion_recovers_a_known_rate_difference():
    """Conversion rates differ by stratum, the treatment adds 1.5 points in
    every stratum: the adjusted effect (in rate units) covers 0.015."""
    stratum, entry, act, rng = _strata_units(60_000, seed=2)
    n = len(stratum)
    variant = rng.integers(0, 2, n)
    base = np.array([0.02, 0.04, 0.07, 0.10])[stratum - 1]
    buy = rng.random(n) < base + 0.015 * variant
    revenue = np.where(buy, rng.lognormal(3, 1, n), 0.0)
    cfg = ExperimentConfig("c1", metrics=(MetricSpec("purchase", kind="conversion"),))
    snap = snapshot_from_units(cfg, variant, stratum, {"purchase": revenue}, entry=entry, D=5,
                               activity=act)
    rec = _one(estimate([snap], chains=8, sweeps=800, seed=2), "purchase")
    assert rec["kind"] == "conversion" and rec["adjustment"] == "stratified"
    eff = rec["adjusted"]["effect"]
    assert eff["lo"] < 0.015 < eff["hi"]
    assert abs(eff["mean"] - 0.015) < 3 * eff["sd"]
    # the cells hold 0/1 outcomes: the naive effect is the difference in conversion rates
    naive = buy[variant == 1].mean() - buy[variant == 0].mean()
    assert rec["naive"]["effect"]["mean"] == pytest.approx(naive, abs=0.3 * eff["sd"])
    assert rec["tail"] is None and rec["ratio"] is None


def test_capped_and_uncapped_agree_with_numpy_on_lognormal():
    """σ = 2 revenue with 70% zeros, one stratum: the capped estimate is the
    capped means' difference, the ``uncapped`` block the raw means', each
    within its sd of numpy's and with numpy's standard error; capping
    narrows the interval; ``tail`` shows the heavy tail."""
    rng = np.random.default_rng(8)
    n = 20_000
    variant = rng.integers(0, 2, n)
    y = np.where(rng.random(n) < 0.3, rng.lognormal(1.0, 2.0, n), 0.0) * (1 + 0.1 * variant)
    cap = float(np.quantile(y, 0.999))
    cfg = ExperimentConfig("cap", metrics=(MetricSpec("rev", cap_upper=cap),))
    snap = snapshot_from_units(cfg, variant, np.full(n, 3), {"rev": y},
                               activity=np.full(n, 10.0))
    assert [p.key[1] for p in problems_of(snap)] == ["rev", "rev#uncapped"]
    rec = _one(estimate([snap], chains=8, sweeps=800, seed=4), "rev")
    assert rec["kind"] == "sum" and rec["cap"] == {"lower": None, "upper": cap}

    def diff_se(x):
        a, b = x[variant == 1], x[variant == 0]
        return a.mean() - b.mean(), np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))

    capped, se_c = diff_se(np.minimum(y, cap))
    raw, se_u = diff_se(y)
    got_c, got_u = rec["adjusted"]["effect"], rec["uncapped"]["effect"]
    assert abs(got_c["mean"] - capped) < 0.25 * se_c
    assert abs(got_u["mean"] - raw) < 0.25 * se_u
    assert got_c["sd"] == pytest.approx(se_c, rel=0.1)
    assert got_u["sd"] == pytest.approx(se_u, rel=0.15)
    assert got_c["hi"] - got_c["lo"] < got_u["hi"] - got_u["lo"]
    tail = rec["tail"]["pooled"]
    assert tail["n"] == n
    assert tail["p999"] == pytest.approx(np.quantile(y, 0.999, method="lower"), rel=0.011)
    top = np.sort(y)[-20:]
    assert tail["top_0_1pct_share_sum_y2"] == pytest.approx((top ** 2).sum() / (y ** 2).sum(),
                                                            rel=0.03)
    assert set(rec["tail"]["by_variant"]) == {"control", "treatment"}


def test_streaming_ticks_carry_every_kind_and_decide():
    """The sampler's path (``advance``: windows across ticks, through the
    chain blob codec) publishes every kind with its fields, agrees with the
    offline estimate, keeps ``mu0`` only for a ratio's problems and the R̂
    of each draw, and the decisions run on a ratio's effect."""
    from streams.sampling.advance import TickConfig, advance
    from streams.sampling.chains import decode, encode
    from streams.sampling.decisions import decide

    stratum, entry, act, rng = _strata_units(30_000, seed=6)
    n = len(stratum)
    variant = rng.integers(0, 2, n)
    sess = rng.poisson(1 + stratum, n).astype(float)
    rev = np.where(rng.random(n) < 0.3, rng.lognormal(1, 1.5, n), 0.0) * sess
    cfg = ExperimentConfig("all", metrics=(
        MetricSpec("rps", kind="ratio", numerator="rev", denominator="sess"),
        MetricSpec("rev", cap_upper=float(np.quantile(rev, 0.999))),
        MetricSpec("buy", kind="conversion"),
    ), primary="rps")
    units = {"rev": rev, "sess": sess, "buy": rev}
    half = n // 2

    def snap_of(k):
        return snapshot_from_units(cfg, variant[:k], stratum[:k], {m: v[:k] for m, v in
                                                                   units.items()},
                                   entry=entry[:k], D=5, activity=act[:k])

    tc = TickConfig(chains=4, sweeps=50, window=200, warmup=50, min_draws=20)
    stored: dict = {}
    recs, stored = advance([snap_of(half)], stored, tc, computed_at=T0)
    assert ("all", "rps#den") in stored and ("all", "rev#uncapped") in stored
    snap = snap_of(n)
    state = None
    for tick in range(5):
        for st in stored.values():  # persisted as the sampler does
            st.state, _ = decode(encode(st.state))
            if st.window is not None:
                st.window, _ = decode(encode(st.window))
        recs, stored = advance([snap], stored, tc, computed_at=T0 + tick)
        recs, state, _ = decide(snap, recs, state)
    assert "mu0" in stored[("all", "rps")].window and "rhat" in stored[("all", "rps")].window
    assert "mu0" not in stored[("all", "buy")].window
    assert "rhat" not in stored[("all", "rps#den")].window
    by = {r["metric"]: r for r in recs}
    assert set(by) == {"rps", "rev", "buy"}
    for r in recs:
        ESTIMATE.validate(r)
        assert r["decision"] is not None
    assert by["rps"]["kind"] == "ratio" and by["rps"]["ratio"]["adjusted"]["control"] is not None
    assert by["rev"]["uncapped"] is not None and by["rev"]["tail"]["pooled"]["n"] == n
    offline = {r["metric"]: r for r in estimate([snap], chains=4, sweeps=1000, seed=9)}
    for m in ("rps", "rev", "buy"):
        a, b = by[m]["adjusted"]["effect"], offline[m]["adjusted"]["effect"]
        assert abs(a["mean"] - b["mean"]) < 0.5 * b["sd"], m
        assert a["sd"] == pytest.approx(b["sd"], rel=0.3), m
