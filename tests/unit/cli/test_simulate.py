"""``liftstream simulate``: the covariate flags (issue 18, CUPED).

With ``--covariate-rho`` the exposures carry ``pre`` (the unit's value of the
metric before the experiment), missing for about ``--covariate-missing`` of
them; every event passes validation, and the reference reducer's covariate
cell sums equal the generator's own (``streams.dev.synthetic.cell_stats``).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import orjson
import pytest

from schemas.records import Exposure
from schemas.validate import parse_event, parse_experiment
from streams.cli.main import main as cli
from streams.dev.simulate import make_traffic
from streams.state.semantics import Reducer

T0 = 1_767_225_600_000


def _run(tmp_path, *flags):
    ev, ex = tmp_path / "events.jsonl", tmp_path / "exps.jsonl"
    assert cli(["simulate", "--units", "3000", "--days", "4", "--window-seconds", "3600",
                "--out", str(ev), "--experiments-out", str(ex), *flags]) == 0
    cfg = parse_experiment(ex.read_bytes())
    now = T0 + 30 * 86_400_000
    return cfg, [parse_event(line, now_ms=now) for line in ev.read_bytes().splitlines()]


def test_covariate_flags(tmp_path):
    cfg, evs = _run(tmp_path, "--covariate-rho", "0.8", "--covariate-missing", "0.25")
    assert cfg.covariates == "auto"
    xs = [e for e in evs if isinstance(e, Exposure)]
    with_pre = [e for e in xs if e.pre is not None]
    assert all(set(e.pre) == {"value"} for e in with_pre)
    assert 0.65 < len(with_pre) / len(xs) < 0.85  # 25% missing

    # folded by the reference reducer: every unit matured, one covariate per unit
    red = Reducer([cfg]).apply_all(evs, batch=500)
    red.advance("-|0", max(e.ts for e in evs) + 10 * 86_400_000)
    cells = red.snapshots()["sim"].cells["value"]
    nx = sum(c[3] for row in cells for c in row)
    assert nx == len(with_pre)
    x = np.array([e.pre["value"] for e in with_pre])
    assert math.isclose(sum(c[4] for row in cells for c in row), x.sum(), rel_tol=1e-9)
    # the outcome correlates with x within cells (ρ 0.8 on the noise)
    sxy = sum(c[6] - c[4] * c[7] / c[3] for row in cells for c in row if c[3])
    sxx = sum(c[5] - c[4] ** 2 / c[3] for row in cells for c in row if c[3])
    syy = sum(c[2] - c[1] ** 2 / c[0] for row in cells for c in row if c[0])
    assert sxy / math.sqrt(sxx * syy) > 0.5


def test_no_covariate_by_default(tmp_path):
    _, evs = _run(tmp_path)
    assert all(e.pre is None for e in evs if isinstance(e, Exposure))
    # the same draws as before the flags existed: the covariate is drawn last
    cfg, raw, _ = make_traffic(3000, 4, "sim", 0, 3600, T0)
    assert Counter(e["type"] for e in raw) == Counter(e.type for e in evs)
    assert all("pre" not in e for e in raw)


def test_bad_flags_exit(tmp_path):
    with pytest.raises(SystemExit, match="covariate_rho"):
        _run(tmp_path, "--covariate-rho", "1.5")
    with pytest.raises(SystemExit, match="covariate_missing"):
        _run(tmp_path, "--covariate-rho", "0.5", "--covariate-missing", "2")


def test_events_are_valid_json_lines(tmp_path):
    _run(tmp_path, "--covariate-rho", "0.5")
    for line in (tmp_path / "events.jsonl").read_bytes().splitlines()[:50]:
        d = orjson.loads(line)
        if d["type"] == "exposure":
            assert isinstance(d["pre"]["value"], float)


# --------------------------------------------------------------------------- kinds (issue 26)

def _kinds_merged() -> bool:
    """The config's kinds (kinds-state) and the synthetic kind models
    (kinds-valid) are both on this branch."""
    from schemas.records import MetricSpec
    from streams.dev import synthetic

    return ("kind" in getattr(MetricSpec, "__dataclass_fields__", {})
            and hasattr(synthetic, "kind_truth"))


needs_kinds = pytest.mark.skipif(not _kinds_merged(), reason="issue 26: runs once kinds-state "
                                 "(MetricSpec.kind) and kinds-valid (synthetic kinds) are merged")


def _unit_totals(evs) -> dict[str, dict[str, float]]:
    """metric -> unit -> the unit's total of its metric events."""
    out: dict[str, dict[str, float]] = {}
    for e in evs:
        if e.type == "metric":
            per = out.setdefault(e.metric, {})
            per[e.unit_id] = per.get(e.unit_id, 0.0) + e.value
    return out


def _fold(cfg, evs):
    """The reference reducer's snapshot with every unit matured."""
    red = Reducer([cfg]).apply_all(evs, batch=500)
    red.advance("-|0", max(e.ts for e in evs) + 10 * 86_400_000)
    return red.snapshots()[cfg.experiment_id]


def _sum_cells(cells) -> tuple[float, ...]:
    """A metric's cells summed over variants and strata."""
    return tuple(sum(c[i] for row in cells for c in row) for i in range(len(cells[0][0])))


@needs_kinds
def test_simulate_conversion_at_one_percent(tmp_path):
    """``--kind conversion --base-rate 0.01``: the config's metric is a
    conversion on the events' metric; only converting units send an event;
    folded, the conversion cells count the converted units among all matured."""
    cfg, evs = _run(tmp_path, "--kind", "conversion", "--base-rate", "0.01", "--units", "20000")
    (m,) = cfg.metrics
    assert (m.name, m.kind, m.threshold) == ("purchase", "conversion", 0.0)
    totals = _unit_totals(evs)
    assert set(totals) == {"purchase"} and all(v > 0 for v in totals["purchase"].values())
    exposed = {e.unit_id for e in evs if isinstance(e, Exposure)}
    assert 0.005 < len(totals["purchase"]) / len(exposed) < 0.03
    n, sy, syy = _sum_cells(_fold(cfg, evs).cells["purchase"])[:3]
    assert n == len(exposed) and sy == syy == len(totals["purchase"])


@needs_kinds
def test_simulate_ratio_correlated(tmp_path):
    """``--kind ratio --ratio-corr 0.8``: revenue per session, numerator and
    denominator events per unit, their totals correlated; the folded cells
    carry ΣM and the extra cells ΣD, ΣD², ΣMD of the same totals."""
    cfg, evs = _run(tmp_path, "--kind", "ratio", "--ratio-corr", "0.8", "--units", "6000",
                    "--window-seconds", "259200", "--days", "8")
    (m,) = cfg.metrics
    assert (m.kind, m.numerator, m.denominator) == ("ratio", "revenue", "sessions")
    assert cfg.event_metrics == ("revenue", "sessions")
    tot = _unit_totals(evs)
    units = sorted({e.unit_id for e in evs if isinstance(e, Exposure)})
    mm = np.array([tot["revenue"].get(u, 0.0) for u in units])
    dd = np.array([tot["sessions"].get(u, 0.0) for u in units])
    assert np.corrcoef(mm, dd)[0, 1] > 0.6
    assert len({e.event_id for e in evs}) == len(evs)  # numerator and denominator ids differ
    snap = _fold(cfg, evs)
    n, sm = _sum_cells(snap.cells[m.name])[:2]
    sd, sdd, smd = _sum_cells(snap.extra_cells[m.name])[:3]
    assert n == len(units)
    for got, want in ((sm, mm.sum()), (sd, dd.sum()), (sdd, (dd**2).sum()),
                      (smd, (mm * dd).sum())):
        assert math.isclose(got, want, rel_tol=1e-9), (got, want)


@needs_kinds
def test_simulate_capped_lognormal_revenue(tmp_path):
    """``--revenue-sigma 2 --zero-share 0.7 --cap-upper 20``: a capped revenue
    sum; about 30% of units buy; the truth is the capped effect with the
    uncapped one beside; folded, y is the capped total and the extra cells
    the uncapped ones."""
    truth_path = tmp_path / "truth.json"
    cfg, evs = _run(tmp_path, "--revenue-sigma", "2", "--zero-share", "0.7", "--cap-upper", "20",
                    "--units", "10000", "--truth", str(truth_path))
    (m,) = cfg.metrics
    assert (m.name, m.kind, m.cap_upper, m.cap_lower) == ("revenue", "sum", 20.0, None)
    tr = orjson.loads(truth_path.read_bytes())
    assert tr["kind"] == "sum" and set(tr["uncapped"]) >= {"effect", "lift"}
    t = np.array(list(_unit_totals(evs)["revenue"].values()))
    exposed = sum(isinstance(e, Exposure) for e in evs)
    assert 0.25 < len(t) / exposed < 0.35 and t.max() > 20.0
    snap = _fold(cfg, evs)
    sy = _sum_cells(snap.cells["revenue"])[1]
    st = _sum_cells(snap.extra_cells["revenue"])[0]
    assert math.isclose(sy, np.minimum(t, 20.0).sum(), rel_tol=1e-9)
    assert math.isclose(st, t.sum(), rel_tol=1e-9)


@pytest.mark.parametrize(("flags", "match"), [
    (("--base-rate", "0.01"), "--base-rate"),  # a sum has no rate
    (("--kind", "conversion", "--base-rate", "1.5"), "--base-rate"),
    (("--kind", "conversion", "--ratio-corr", "0.5"), "--ratio-corr"),
    (("--kind", "ratio", "--ratio-corr", "0"), "--ratio-corr"),
    (("--kind", "conversion", "--revenue-sigma", "1"), "--revenue-sigma"),
    (("--zero-share", "0.5"), "--zero-share"),
    (("--cap-upper", "10"), "--cap-upper"),  # only revenue (or a ratio) has a cap
    (("--revenue-sigma", "1", "--covariate-rho", "0.5"), "--covariate-rho"),
])
def test_bad_kind_flags_exit(tmp_path, flags, match):
    """Every kind flag refuses the kinds it does not belong to, by its name."""
    with pytest.raises(SystemExit, match=match):
        _run(tmp_path, *flags)
