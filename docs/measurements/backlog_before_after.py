"""The issue-12 backlog, folded by the reference reducer of a checkout.

Three simulated experiments (14, 10, 7 days; ~213k events) keyed to 6
partitions, each partition read whole before the next (as aiokafka serves a
backlog), folded by ``streams.state.semantics.Reducer`` of the checkout given as the
first argument, then estimated with that checkout's sampler
(``streams.sampling.analyze.estimate``). Run it on the current tree and on an older
checkout (``git worktree add /tmp/old <rev>``) to compare:

    python docs/measurements/backlog_before_after.py .
    (cd /tmp/old && python /path/to/backlog_before_after.py /tmp/old)
"""

import sys
import time
import zlib

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")

from schemas.codec import dumps  # noqa: E402
from schemas.validate import parse_event  # noqa: E402
from streams.dev.simulate import make_traffic  # noqa: E402
from streams.sampling.analyze import estimate  # noqa: E402
from streams.state.semantics import Reducer  # noqa: E402

DAY = 86_400_000
START = (int(time.time() * 1000) // DAY - 40) * DAY
cfgs, evs, truths = [], [], {}
for eid, units, days, seed in (("bl14", 45_000, 14, 1), ("bl10", 38_000, 10, 2),
                               ("bl7", 38_000, 7, 3)):
    cfg, e, tr = make_traffic(units, days, eid, seed, 7 * 86_400, START)
    cfgs.append(cfg)
    evs += e
    truths[eid] = tr["effect"]
evs.sort(key=lambda e: e["ts"])
recs = [parse_event(dumps(e), now_ms=2**53 - 1) for e in evs]


def part(u: str) -> int:
    return zlib.crc32(u.encode()) % 6


red = Reducer(cfgs)
new = hasattr(red, "apply_batch")  # the order-independent reducer
for p in range(6):
    mine = [e for e in recs if part(e.unit_id) == p]
    src = f"liftstream.events|{p}"
    if new:
        for i in range(0, len(mine), 500):
            red.apply_batch(src, mine[i:i + 500])
    else:
        for e in mine:
            red.apply(e, src)
if new:
    for p in range(6):
        red.advance(f"liftstream.events|{p}", max(e.ts for e in recs))
snaps = red.snapshots()
out = estimate(list(snaps.values()), chains=8, sweeps=1000, seed=1)
print(f"{len(evs)} events; {'order-independent' if new else 'cross-partition clock'} reducer")
not_metrics = ("exposures", "repeat_exposure", "conflict", "unknown_variant", "too_old")
for s in snaps.values():
    c = s.counters
    n_m = sum(v for k, v in c.items() if k not in not_metrics)
    print(f"  {s.experiment_id}: late {c.get('late', 0)} "
          f"({c.get('late', 0) / max(n_m, 1):.1%} of metrics), corrected "
          f"{c.get('corrected', 0)}, matured {sum(s.matured.values())}")
for r in out:
    if r["variant"] == "treatment":
        a = r["adjusted"]["effect"]
        print(f"  {r['experiment_id']}: adjusted {a['mean']:+.3f} [{a['lo']:+.3f}, "
              f"{a['hi']:+.3f}], naive {r['naive']['effect']['mean']:+.3f}, truth "
              f"{truths[r['experiment_id']]:+.3f}, P(>0) {r['adjusted']['p_positive']:.3f}")
