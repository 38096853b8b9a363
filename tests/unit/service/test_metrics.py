"""The Prometheus text exposition is well-formed and counts what it is told."""

import re

from streams.service.metrics import Metrics

LINE = re.compile(r'^[a-z_]+(\{([a-z_]+="(?:[^"\\]|\\.)*",?)+\})? -?[0-9.e+]+$')


def test_render_is_valid_exposition():
    m = Metrics()
    m.inc("liftstream_events_total", 3, outcome="received")
    m.inc("liftstream_events_total", 2, outcome="received")
    m.inc("liftstream_dead_letters_total", reason='bad"id')
    m.set("liftstream_chain_iterations", 400, experiment="e1", metric="orders")
    for s in (0.003, 0.02, 0.7, 30.0):
        m.observe("liftstream_ingest_batch_seconds", s)
    text = m.render()
    for line in text.splitlines():
        assert line.startswith("# ") or LINE.match(line), line
    assert 'liftstream_events_total{outcome="received"} 5' in text
    assert 'reason="bad\\"id"' in text
    assert 'liftstream_ingest_batch_seconds_bucket{le="0.005"} 1' in text
    assert 'liftstream_ingest_batch_seconds_bucket{le="1"} 3' in text
    assert 'liftstream_ingest_batch_seconds_bucket{le="+Inf"} 4' in text
    assert "liftstream_ingest_batch_seconds_count 4" in text


def test_stuck_loops_are_named_after_the_limit():
    from streams.service.web import stuck_loops

    beats = {"ingest": 1000.0, "sampler": 1090.0}
    assert stuck_loops(1100.0, beats, 120) == []
    assert stuck_loops(1150.0, beats, 120) == ["ingest loop: no round for 150 s"]
    assert stuck_loops(1300.0, beats, 120) == ["ingest loop: no round for 300 s",
                                               "sampler loop: no round for 210 s"]
    assert stuck_loops(1e9, beats, 0) == []  # 0: the check is off
