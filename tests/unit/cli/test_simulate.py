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
