"""The Prometheus text exposition is well-formed and counts what it is told."""

import re

from streams.metrics import Metrics

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
