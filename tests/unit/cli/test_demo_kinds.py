"""``liftstream demo``'s metric-kind experiments (issue 26): one metric of
each kind (a conversion, a ratio, a capped revenue sum), built by the
simulator's generator, and their lines in the live table in each kind's
units (a conversion's in percentage points, a ratio's per-arm ratios, the
capped sum's uncapped effect and tail). The demo end to end with a worker:
``tests/integration/test_demo_lifetime.py`` (``--no-traffic``) and by hand."""

from __future__ import annotations

import pytest

from schemas.records import MetricSpec
from streams.dev import synthetic
from streams.dev.demo import DEMO_KINDS, DEMO_REVENUE_CAP, kind_experiments, kind_line

pytestmark = pytest.mark.skipif(
    "kind" not in getattr(MetricSpec, "__dataclass_fields__", {})
    or not hasattr(synthetic, "kind_truth"),
    reason="issue 26: runs once kinds-state (MetricSpec.kind) and kinds-valid (synthetic "
           "kinds) are merged")

START = 1_767_225_600_000


def _iv(mean: float, half: float) -> dict:
    return {"mean": mean, "sd": half / 1.96, "lo": mean - half, "hi": mean + half}


def test_demo_has_one_metric_of_each_kind():
    exps = kind_experiments(START, seed=0, days=2.0)
    assert [e[0].experiment_id for e in exps] == [d[0] for d in DEMO_KINDS]
    specs = [cfg.metrics for cfg, _, _ in exps]
    assert all(len(m) == 1 for m in specs)
    conv, ratio, rev = (m[0] for m in specs)
    assert conv.kind == "conversion"
    assert (ratio.kind, ratio.numerator, ratio.denominator) == ("ratio", "revenue", "sessions")
    assert (rev.kind, rev.cap_upper) == ("sum", DEMO_REVENUE_CAP)
    for cfg, evs, tr in exps:
        assert cfg.lateness_seconds == 3 * 3600 and cfg.window_seconds == 86_400
        assert evs and [e["ts"] for e in evs] == sorted(e["ts"] for e in evs)
        assert {e["experiment_id"] for e in evs} == {cfg.experiment_id}
        assert tr["metric"] == cfg.metrics[0].name
    assert "uncapped" in exps[2][2] and "ratios" in exps[1][2]


def test_kind_lines_in_each_kinds_units():
    assert "waiting" in kind_line("demo-conversion", None, {"effect": 0.004})
    conv = {"metric": "purchase", "kind": "conversion", "cap": None,
            "adjusted": {"effect": _iv(0.0052, 0.002)}, "naive": {"effect": _iv(0.009, 0.002)}}
    line = kind_line("demo-conversion", conv, {"effect": 0.0048})
    assert "adjusted +0.52 pp [+0.32, +0.72]" in line and "truth +0.48 pp" in line, line
    ratio = {"metric": "revenue_per_session", "kind": "ratio", "cap": None,
             "adjusted": {"effect": _iv(0.1, 0.03)}, "naive": {"effect": _iv(0.15, 0.03)},
             "ratio": {"pooled": 1.05, "adjusted": {"control": _iv(1.0, 0.02),
                                                    "treatment": _iv(1.1, 0.02)},
                       "naive": {"control": 1.01, "treatment": 1.16}}}
    line = kind_line("demo-ratio", ratio, {"effect": 0.1})
    assert "ratio per arm control 1.000, treatment 1.100" in line, line
    rev = {"metric": "revenue", "kind": "sum", "cap": {"lower": None, "upper": 50.0},
           "adjusted": {"effect": _iv(0.08, 0.05)}, "naive": {"effect": _iv(0.12, 0.05)},
           "uncapped": {"effect": _iv(0.15, 0.2), "lift": _iv(0.15, 0.2), "p_positive": 0.9},
           "tail": {"pooled": {"p50": 0.0, "p90": 3.0, "p99": 40.0, "p999": 210.0,
                               "max": 900.0, "top_0_1pct_share_sum_y2": 0.4, "n": 9000},
                    "by_variant": {}}}
    line = kind_line("demo-revenue", rev, {"effect": 0.084, "uncapped": {"effect": 0.156}})
    assert "(revenue, sum, capped)" in line
    assert "uncapped +0.150 [-0.050, +0.350] (truth +0.156)" in line, line
    assert "p99.9 210, max 900, top 0.1% hold 40% of Σy²" in line, line
