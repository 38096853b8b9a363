"""Chains continue across ticks (iteration counts only grow, never restart
because data grew), and a tick's estimate agrees with a long offline run."""

import numpy as np

from schemas.codec import dumps
from schemas.validate import parse_event
from streams.dev.simulate import make_traffic
from streams.sampling.advance import TickConfig, advance
from streams.sampling.analyze import estimate
from streams.sampling.chains import decode, encode
from streams.state.semantics import Reducer


def snapshots_after(cfg, evs, n):
    red = Reducer([cfg]).apply_all(parse_event(dumps(e), now_ms=2**53 - 1) for e in evs[:n])
    return list(red.snapshots().values())


def test_chains_continue_and_agree_with_offline():
    cfg, evs, truth = make_traffic(20_000, 8, "exp1", 3, 86_400, 1_767_225_600_000)
    tc = TickConfig(chains=4, sweeps=60, window=300, warmup=60, min_draws=20)
    stored = {}
    half = len(evs) // 2
    recs, stored = advance(snapshots_after(cfg, evs, half), stored, tc, computed_at=1)
    assert recs == []  # still in warm-up: nothing published
    assert int(stored[("exp1", "value")].state["iteration"]) == 60
    snaps = snapshots_after(cfg, evs, len(evs))
    for tick in range(6):
        # persist through the blob codec, as the sampler does via Redis
        blob = encode(stored[("exp1", "value")].state)
        state, _ = decode(blob)
        stored[("exp1", "value")].state = state
        recs, stored = advance(snaps, stored, tc, computed_at=2 + tick)
        assert int(stored[("exp1", "value")].state["iteration"]) == 60 * (tick + 2)
    (rec,) = recs
    assert rec["diagnostics"]["iteration"] == 420
    assert rec["diagnostics"]["draws"] == 4 * 300
    offline = estimate(snaps, chains=4, sweeps=2000, seed=9)[0]
    a, b = rec["adjusted"]["effect"], offline["adjusted"]["effect"]
    assert abs(a["mean"] - b["mean"]) < 0.5 * b["sd"]
    assert np.isclose(a["sd"], b["sd"], rtol=0.3)
