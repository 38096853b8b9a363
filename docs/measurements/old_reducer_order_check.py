"""Does a checkout's reference reducer (the API before issue 12: ``apply(ev,
source)``) give the time-sorted fold's cells when partitions are read whole,
one after another? Run from that checkout:

    (cd /tmp/old && python /path/to/old_reducer_order_check.py /tmp/old)

On 32ccf25: 225 and 247 of 300 examples differed in two runs (metrics
counted ``late``).
"""

import sys

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec  # noqa: E402
from streams.state.semantics import Reducer  # noqa: E402

T0 = 1_700_000_000_000
fails = []


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def prop(data):
    cfg = ExperimentConfig("e0", metrics=(MetricSpec("rev"),),
                           window_seconds=data.draw(st.integers(1, 5)), bucket_seconds=2,
                           lateness_seconds=data.draw(st.integers(0, 2)), dedupe_seconds=1000)
    n_parts = data.draw(st.integers(2, 6))
    units = [f"u{i}" for i in range(data.draw(st.integers(2, 12)))]
    part = {u: data.draw(st.integers(0, n_parts - 1)) for u in units}
    hist, t, ex = [], 0, []
    for k in range(data.draw(st.integers(5, 70))):
        t += data.draw(st.integers(0, 1500))
        if not ex or data.draw(st.integers(0, 2)) == 0:
            x = Exposure(f"x{k}", "e0", data.draw(st.sampled_from(units)), "control", T0 + t, 1.0)
            ex.append(x)
            hist.append(x)
        else:
            x = data.draw(st.sampled_from(ex))
            hist.append(Metric(f"m{k}", x.unit_id, "rev", 1.0, T0 + t, "e0"))
    want = Reducer([cfg])
    for ev in hist:
        want.apply(ev, f"p|{part[ev.unit_id]}")
    got = Reducer([cfg])
    for p in range(n_parts):  # whole partitions, one after another
        for ev in hist:
            if part[ev.unit_id] == p:
                got.apply(ev, f"p|{p}")
    a, b = got.snapshots()["e0"], want.snapshots()["e0"]
    if (a.cells, a.matured, a.arrivals) != (b.cells, b.matured, b.arrivals):
        fails.append((a.counters, b.counters))


prop()
print(f"{len(fails)} of 300 examples differ from the time-sorted fold")
