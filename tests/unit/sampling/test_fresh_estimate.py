"""A tick's estimate is the posterior of the data it reports, from the first
one on: compared with a long offline run on the same snapshot.

The data are the dashboard test's "mature" experiment (2500 units over 8
days, a 1-day window). Two ways of reaching them: fixed from the first tick
(the first estimate must be converged: it comes after the warm-up), and
arriving over 8 ticks as ingest catches up (the chains continue across the
data changes; the records published once the data are complete must not mix
in draws made on the smaller data: before the fix the first of them was 1.7×
too wide and one posterior sd off)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from schemas.codec import dumps
from schemas.validate import parse_event
from streams.dev.simulate import make_traffic
from streams.sampling.advance import TickConfig, advance
from streams.sampling.analyze import estimate
from streams.state.semantics import DEFAULT_SOURCE, Reducer

DAY_MS = 86_400_000
START = 1_767_225_600_000  # 2026-01-01
NOW = START + 30 * DAY_MS  # every unit's window closed long before


@pytest.fixture(scope="module")
def arrivals():
    """The snapshots after each of 8 equal chunks of the events (``seq`` the
    chunk: the data's version, as Redis's ``dirty_seq`` is), the last with
    every unit matured, and the long-run posterior of the complete data."""
    cfg, evs, _ = make_traffic(2500, 8, "mature", seed=3, window_seconds=86_400,
                               started_at=START)
    parsed = [parse_event(dumps(e), now_ms=2**53 - 1) for e in sorted(evs, key=lambda e: e["ts"])]
    red = Reducer([cfg])
    snaps = []
    for seq, idx in enumerate(np.array_split(np.arange(len(parsed)), 8)):
        red.apply_batch(DEFAULT_SOURCE, [parsed[i] for i in idx])
        if seq == 7:
            for src in list(red.clocks):
                red.advance(src, NOW)
        snaps.append(dataclasses.replace(red.snapshots()["mature"], seq=seq))
    final = snaps[-1]
    assert sum(final.matured.values()) == sum(final.exposed.values()) > 1000
    ref = estimate([final], chains=8, sweeps=4000, seed=99)[0]["adjusted"]["effect"]
    return snaps, ref


def _error(rec: dict, ref: dict) -> tuple[float, float]:
    """(width / the reference's width, shift of the mean in reference sds)."""
    e = rec["adjusted"]["effect"]
    return (e["hi"] - e["lo"]) / (ref["hi"] - ref["lo"]), (e["mean"] - ref["mean"]) / ref["sd"]


def test_first_estimate_on_fixed_data_is_converged(arrivals):
    """Fresh chains on complete data: nothing before the warm-up ends, then
    the first record within MC error of the long run (measured over seeds
    0-5: width 0.92-1.04×, mean within 0.11 sd, with 8 chains)."""
    snaps, ref = arrivals
    stored: dict = {}
    published = []
    for tick in range(3):
        recs, stored = advance([snaps[-1]], stored, TickConfig(chains=8), computed_at=tick)
        published.append(recs)
    assert published[0] == [] and published[1] == []  # iterations 50, 100: the warm-up
    (rec,) = published[2]
    w, z = _error(rec, ref)
    assert abs(w - 1) < 0.15 and abs(z) < 0.25, (w, z)
    assert rec["diagnostics"]["draws"] == 8 * 50


def test_estimates_after_data_change_use_only_draws_on_that_data(arrivals):
    """Data arriving over 8 ticks, then 3 more ticks on the complete data:
    every record at the complete data is within MC error of its long run,
    the first one included, and summarises only the draws made on it."""
    snaps, ref = arrivals
    stored: dict = {}
    at_final = []
    for tick in range(11):
        snap = snaps[min(tick, 7)]
        recs, stored = advance([snap], stored, TickConfig(chains=8), computed_at=tick)
        if tick >= 7:
            at_final.append(recs[0])
    for tick, rec in enumerate(at_final, 7):
        w, z = _error(rec, ref)
        assert abs(w - 1) < 0.2 and abs(z) < 0.3, (tick, w, z)
    # draws on the complete data only: one tick's sweeps, then two, three, four
    assert [r["diagnostics"]["draws"] for r in at_final] == [8 * 50 * k for k in (1, 2, 3, 4)]
