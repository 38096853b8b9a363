"""Decisions looked at every hour of data time (issue 27; docs/method.md §8).

Replicates are problems of one batched kernel call; at every hourly look of a
14-day experiment the chains continue on the snapshot of the units matured by
then, as the live sampler's do (``tests.support.sequential``). The decision
is the always-valid one (``kernels.decision``, the rules of
``streams.sampling.decisions``); "before" is the rule it replaced (P(>0)
beyond 0.95 with R-hat < 1.01 at any look). ``python -m
tests.statistical.test_sequential [reps]`` prints every table of
docs/method.md §8.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.support.sequential import Setting, simulate, with_

ALPHA = 0.05
AA = Setting(reps=100, seed=1, mde=0.05)
#: the simulator's realistic effect: +0.10 on the population, heavier users gain more
POWER = Setting(reps=100, seed=3, n_units=40_000, effect=0.10, effect_slope=0.12, mde=0.10)
#: one effect for everyone, so readiness is uncertain for days: the forecast's check
#: the metric kinds (issue 26) through the published path, the config's default mixing
#: scale (``mde`` unset: the prior's, from ``problems.effect_cells``); the replicate
#: counts keep each test under a minute on an idle machine
KINDS_AA = {
    "conversion": Setting(reps=30, seed=5, kind="conversion", base_rate=0.05),
    "ratio": Setting(reps=20, seed=6, kind="ratio", ratio_corr=0.5),
}
FORECAST = Setting(reps=100, seed=4, n_units=40_000, effect=0.10, effect_slope=0.0, mde=0.10,
                   forecast_at=2 * 24)


#: the slow runs take 7–25 min each on a busy 2-core machine: past the suite's 900 s
SLOW_TIMEOUT_S = 3600


def mc_bound(p: float, n: int, z: float = 2.33) -> float:
    """p plus z binomial sds at n replicates (one-sided ~1%)."""
    return p + z * np.sqrt(p * (1 - p) / n)


def test_aa_every_hour_100_replicates():
    """No effect anywhere, heavy users first, 336 looks: the share that ever
    decides stays within α + MC error, where today's rule decides in about
    half (a return to per-look thresholds fails the bound by far)."""
    r = simulate(AA)
    ever, before = r.any_ready().mean(), r.any_before().mean()
    print(f"\nA/A {AA.reps} replicates x {AA.days * AA.looks_per_day} looks: ever decided "
          f"{ever:.3f}, today's rule {before:.3f} ({r.seconds:.0f} s)")
    assert ever <= mc_bound(ALPHA, AA.reps)
    assert before > 0.25


@pytest.mark.parametrize("kind", sorted(KINDS_AA))
def test_aa_every_hour_metric_kinds(kind):
    """A conversion (5%) and a ratio (corr(M, D) 0.5; the treatment moves
    the denominator by 2% and the numerator with it, so the ratio's effect is
    0) with no effect, 336 hourly looks, each through the sampler's tick and
    ``decide``: the share of lives that ever decide stays within α + MC error
    (docs/method.md §8, "Metric kinds")."""
    st = KINDS_AA[kind]
    r = simulate(st)
    ever = r.any_ready().mean()
    print(f"\nA/A {kind} {st.reps} replicates: ever decided {ever:.3f}, "
          f"today's rule {r.any_before().mean():.3f} ({r.seconds:.0f} s)")
    assert np.abs(r.truth).max() < 1e-12  # a true null of the kind's estimand
    assert np.isfinite(r.sd[-1]).all()  # every replicate was looked at to the end
    assert ever <= mc_bound(ALPHA, st.reps)


def _fixed_horizon(r) -> tuple[int | None, float]:
    """The fixed-horizon test at the same α: the first look at which a single
    two-sided z-test at α has 80% power for the true effect (the mean sd over
    replicates at that look), and the share of replicates it rejects there."""
    truth = abs(float(r.truth[:, 0, 0].mean()))
    sds = r.sd[:, :, 0, 0]  # [L, R]; NaN before a replicate's first eligible look
    seen = np.isfinite(sds).sum(axis=1)
    sd = np.where(seen > 0, np.nansum(sds, axis=1) / np.maximum(seen, 1), np.nan)
    z = 1.959964 + 0.841621
    idx = np.flatnonzero(truth / sd >= z)
    if not idx.size:
        return None, float("nan")
    h = int(idx[0])
    rej = np.abs(r.mean[h, :, 0, 0] / r.sd[h, :, 0, 0]) > 1.959964
    return h + 1, float(rej.mean())


def power_table(st: Setting) -> dict:
    r = simulate(st)
    lpd = st.looks_per_day
    at = r.ready_at[:, 0, 0]
    right = (at > 0) & (r.direction[:, 0, 0] == np.sign(r.truth[:, 0, 0]))
    days = np.where(right, at / lpd, np.inf)
    fh, fh_power = _fixed_horizon(r)
    out = {"ready": float(right.mean()), "wrong_sign": float(((at > 0) & ~right).mean()),
           "median_days": float(np.median(days)), "fixed_days": None if fh is None else fh / lpd,
           "fixed_power": fh_power, "seconds": r.seconds}
    if r.forecast is not None:
        fc = r.forecast
        D = fc["D"]
        rows = []
        for j in (1, 2, 5, st.days - D):
            if j <= fc["p_ready"].shape[1]:
                by = (D + j) * lpd
                rows.append({"by_day": D + j, "forecast": float(fc["p_ready"][:, j - 1].mean()),
                             "realised": float(((at > 0) & (at <= by)).mean())})
        out["forecast"] = {"from_day": fc["look"] / lpd, "rows": rows}
    return out


def test_power_and_forecast_against_realised():
    """Realistic effect (+0.10, heavier users gain more), 40,000 units: the
    decision comes, with the right sign. One effect for everyone: the
    forecast made at day 2 of P(ready by day b) is within 0.15 of the share
    of replicates that were."""
    t = power_table(POWER)
    print(f"\npower: {t}")
    assert t["ready"] >= 0.6 and t["wrong_sign"] == 0.0
    t = power_table(FORECAST)
    print(f"forecast: {t}")
    for row in t["forecast"]["rows"]:
        assert abs(row["forecast"] - row["realised"]) <= 0.15, row


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
@pytest.mark.parametrize("name,st", [
    ("A/A, mixing sd = pooled outcome sd", with_(AA, reps=1000, seed=11, mde=None)),
    ("A/A, mde 0.05", with_(AA, reps=1000, seed=12)),
    ("A/A, mixture-of-geometrics arrivals", with_(AA, reps=1000, seed=13, arrivals="mixture")),
    ("A/A, a 1-day outcome window", with_(AA, reps=1000, seed=14, window_days=1.0)),
])
def test_aa_1000_replicates(name, st):
    r = simulate(st)
    ever = r.any_ready().mean()
    print(f"\n{name}: ever decided {ever:.4f}, today's rule {r.any_before().mean():.3f} "
          f"({r.seconds:.0f} s)")
    assert ever <= mc_bound(ALPHA, st.reps)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
@pytest.mark.parametrize("kind", sorted(KINDS_AA))
def test_aa_metric_kinds_300_replicates(kind):
    """The kinds' A/A at 300 replicates (the published path costs 1.7–2.4 s
    a replicate, niced on a busy 2-core machine; docs/method.md §8)."""
    st = with_(KINDS_AA[kind], reps=300, seed={"conversion": 21, "ratio": 22}[kind])
    r = simulate(st)
    ever = r.any_ready().mean()
    print(f"\nA/A {kind}: ever decided {ever:.4f}, today's rule {r.any_before().mean():.3f} "
          f"({r.seconds:.0f} s)")
    assert ever <= mc_bound(ALPHA, st.reps)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_decaying_novelty_is_reported_not_bounded():
    """A novelty (+0.10 on units exposed at t, decaying as exp(−t/2 days)):
    the long-run effect is 0 but the early units' is not, so decisions for
    'better' are correct about the units seen and wrong about the ship-to
    effect. That rate is reported (docs/method.md §8), not bounded by α. The
    effect is never negative, so a 'worse' decision is false under either
    reading: its share stays within α/2 (one side of the two-sided
    sequence) + MC error."""
    st = with_(AA, reps=1000, seed=15, novelty=0.10)
    r = simulate(st)
    ever = r.any_ready().mean()
    worse = (r.direction < 0).reshape(st.reps, -1).any(-1).mean()
    print(f"\ndecaying novelty: ever decided {ever:.4f} (worse {worse:.4f}), "
          f"today's rule {r.any_before().mean():.3f} ({r.seconds:.0f} s)")
    assert worse <= mc_bound(ALPHA / 2, st.reps)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_four_arms_five_metrics_all_null():
    """4 arms x 5 metrics, all null: the share of experiments with any false
    decision (primary at α/3 per arm, the rest by gated e-BH) within α + MC
    error. 300 replicates, not 1000: each is 20 problems of 4 variants
    (~2.7 s of one core per replicate); the bound is 0.079 instead of 0.066."""
    st = with_(AA, reps=300, seed=16, variants=4, metrics=5, mde=None)
    r = simulate(st)
    ever = r.any_ready().mean()
    print(f"\n4 arms x 5 metrics: any false decision {ever:.4f}, "
          f"today's rule {r.any_before().mean():.3f} ({r.seconds:.0f} s)")
    assert ever <= mc_bound(ALPHA, st.reps)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_power_1000_replicates():
    """The simulator's realistic effect: decided in ≥ 65%, never the wrong sign
    (the two-sided sequence's wrong-sign rate is ≤ α/2 even at effect 0)."""
    t = power_table(with_(POWER, reps=1000, seed=17))
    print(f"\npower: {t}")
    assert t["ready"] >= 0.65
    assert t["wrong_sign"] <= mc_bound(ALPHA / 2, 1000)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_forecast_1000_replicates():
    """The day-2 forecast of P(ready by day b), averaged over replicates,
    against the share that were (MC error of the realised share ≈ 0.016).
    Measured: the forecast is LOW by 0.07–0.15 (its projected sd is ~8–10%
    above the realised one, and it ignores the running intersection;
    docs/method.md §8), so the check is one-sided-tight: never above the
    realised share by more than 0.05, never below it by more than 0.20."""
    t = power_table(with_(FORECAST, reps=1000, seed=18))
    print(f"forecast: {t}")
    for row in t["forecast"]["rows"]:
        assert -0.05 <= row["realised"] - row["forecast"] <= 0.20, row


def main(reps: int) -> None:
    for name, st in [("A/A mixing sd = pooled sd", with_(AA, mde=None)), ("A/A mde 0.05", AA),
                     ("A/A mixture arrivals", with_(AA, arrivals="mixture")),
                     ("A/A decaying novelty", with_(AA, novelty=0.10)),
                     ("4 arms x 5 metrics", with_(AA, variants=4, metrics=5, mde=None)),
                     *((f"A/A {k}", st) for k, st in sorted(KINDS_AA.items()))]:
        r = simulate(with_(st, reps=reps))
        print(f"{name}: ever {r.any_ready().mean():.4f} before {r.any_before().mean():.3f} "
              f"({r.seconds:.0f} s)", flush=True)
    print("power", power_table(with_(POWER, reps=reps)), flush=True)
    print("power, one effect", power_table(with_(FORECAST, reps=reps)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
