"""``liftstream analyze``: the offline backtest end to end on a JSONL file."""

import subprocess
import sys
import time

import jsonschema
import numpy as np
import pytest

from schemas.codec import dumps, loads
from schemas.contracts import load_schema
from schemas.validate import parse_experiment
from streams.dev.simulate import make_traffic
from streams.sampling.analyze import analyze


def write_files(tmp_path, units=60_000, days=9, seed=4):
    cfg, evs, truth = make_traffic(units, days, "bt", seed, 86_400, 1_767_225_600_000)
    from schemas.validate import experiment_to_dict

    exps = tmp_path / "exps.jsonl"
    exps.write_bytes(dumps(experiment_to_dict(cfg)) + b"\n")
    events = tmp_path / "events.jsonl"
    with open(events, "wb") as f:
        for e in evs:
            f.write(dumps(e) + b"\n")
        f.write(b"not json\n")
        f.write(b'{"type":"metric","event_id":"x","unit_id":"u1","metric":"value",'
                b'"value":NaN,"ts":1767225600000}\n')
    return exps, events, truth, len(evs)


def test_analyze_recovers_the_population_effect(tmp_path):
    exps, events, truth, n = write_files(tmp_path)
    t0 = time.perf_counter()
    recs, counts = analyze(exps, events, seed=1, chains=4, sweeps=800)
    print(f"\nanalyze: {n} events in {time.perf_counter() - t0:.1f}s")
    (rec,) = recs
    schema = load_schema("estimate")
    jsonschema.validate(loads(dumps(rec)), schema)
    adj, naive = rec["adjusted"]["effect"], rec["naive"]["effect"]
    assert adj["lo"] < truth["effect"] < adj["hi"]
    # heavy users arrive first and gain more: the naive estimate is biased up
    assert naive["mean"] - truth["effect"] > 2 * abs(adj["mean"] - truth["effect"])
    assert counts["rejected"] == {"not_json": 1, "not_finite": 1}
    shares = np.array([s["share_population"]["mean"] for s in rec["strata"]])
    np.testing.assert_allclose(shares, truth["population_shares"], atol=0.06)
    assert rec["diagnostics"]["rhat"] < 1.02


def test_analyze_cli_prints_one_record_per_line(tmp_path):
    exps, events, _, _ = write_files(tmp_path, units=5_000, days=5)
    out = subprocess.run([sys.executable, "-m", "streams.cli", "analyze", "--experiments",
                          str(exps), str(events), "--sweeps", "200", "--chains", "2"],
                         capture_output=True, check=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    assert loads(lines[0])["experiment_id"] == "bt"
    assert loads(out.stderr.splitlines()[-1])["rejected"]["not_json"] == 1


def _matured_by(events_path, window_ms: int, lateness_ms: int, clock: int) -> int:
    """Units whose window closed by ``clock`` (close = first exposure ts + W
    <= clock - L, streams.state.semantics rule 5): the ones a worker caught
    up to ``clock`` has matured."""
    first: dict[str, int] = {}
    for line in events_path.read_bytes().splitlines():
        try:
            e = loads(line)
        except ValueError:
            continue
        if e.get("type") == "exposure":
            first[e["unit_id"]] = min(first.get(e["unit_id"], e["ts"]), e["ts"])
    return sum(t + window_ms <= clock - lateness_ms for t in first.values())


def test_analyze_as_of_defaults_to_the_files_end(tmp_path):
    """A file that ends in the past: by default the partitions are advanced to
    the file's own last event, so the units whose windows run past it are not
    matured (as a worker that consumed the file the moment it ended); ``--as-of
    now`` advances to the wall clock (a worker idling until today) and matures
    them all."""
    exps, events, _, _ = write_files(tmp_path, units=3_000, days=4)
    cfg = parse_experiment(exps.read_bytes())
    end = max(loads(line)["ts"] for line in events.read_bytes().splitlines()
              if line.startswith(b"{") and b"NaN" not in line)
    want = _matured_by(events, cfg.window_seconds * 1000, cfg.lateness_seconds * 1000, end)

    def matured(*flags: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-m", "streams.cli", "analyze", "--experiments",
                              str(exps), str(events), "--sweeps", "40", "--chains", "2",
                              *flags], capture_output=True, check=True, timeout=120)
        (rec,) = (loads(line) for line in out.stdout.splitlines())
        units = rec["units"]
        return sum(units["matured"].values()), sum(units["exposed"].values())

    by_default, exposed = matured()
    assert 0 < want < exposed  # the file's last units' windows run past its end
    assert by_default == want
    assert matured("--as-of", str(end)) == (want, exposed)
    assert matured("--as-of", "now") == (exposed, exposed)


def test_analyze_as_of_takes_epoch_ms_or_now(capsys):
    from streams.cli.main import build_parser

    def as_of(value: str):
        return build_parser().parse_args(
            ["analyze", "--experiments", "e.jsonl", "ev.jsonl", "--as-of", value]).as_of

    assert as_of("1767225600000") == 1_767_225_600_000 and as_of("now") == "now"
    with pytest.raises(SystemExit):
        as_of("yesterday")
    assert "expected epoch ms or 'now'" in capsys.readouterr().err
