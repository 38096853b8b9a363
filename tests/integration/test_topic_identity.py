"""Topic identity (issue 15 item 4): Redis's applied offsets belong to one
events topic; if the topic is deleted and created again under the same name,
its new events (offsets from 0 again) would be skipped as already applied.

On a real broker: a worker applies 5 exposures and stops; the topic is
deleted and created again and 3 new exposures produced. The worker refuses
to start, saying why and what to run; ``liftstream admin reset-offsets``
forgets the old topic's positions; the worker then applies the 3 new
exposures (8 in all), the experiment's earlier state intact.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis
from confluent_kafka.admin import AdminClient

from schemas.records import ExperimentConfig, Exposure
from tests.support.streaming_harness import REPO, Workers, make_stack, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

T0 = int(time.time() * 1000) - 3_600_000


def exposures(tag: str, n: int) -> list[Exposure]:
    return [Exposure(f"{tag}{i}", "tid", f"{tag}u{i}", "control", T0 + i, 1.0) for i in range(n)]


def test_recreated_topic_is_refused_until_reset(kafka_bootstrap, redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    ws = Workers()
    try:
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "tid", partitions=1)
        st.create_topics()
        st.register([ExperimentConfig(experiment_id="tid", started_at=T0)])  # events from T0
        count = lambda: int(r.hget("lr:{e:tid}:meta", "c:exposures") or 0)  # noqa: E731
        w = ws.start(st, "ingest")
        produce(st.bootstrap, st.events_topic, exposures("a", 5))
        wait_until(lambda: count() == 5, 90, "the first exposures", workers=[w])
        assert w.stop() == 0, w.log_tail()

        admin = AdminClient({"bootstrap.servers": st.bootstrap})
        admin.delete_topics([st.events_topic])[st.events_topic].result(30)
        wait_until(lambda: st.events_topic not in admin.list_topics(timeout=10).topics, 60,
                   "the topic deleted", interval=0.5)
        wait_until(lambda: _recreated(st), 60, "the topic created again", interval=1.0)
        produce(st.bootstrap, st.events_topic, exposures("b", 3))

        w.start()
        wait_until(lambda: not w.alive(), 90, "the worker to refuse the topic")
        assert w.returncode != 0
        assert "reset-offsets" in w.log_tail(20_000)
        assert count() == 5

        out = subprocess.run([sys.executable, "-m", "streams.cli", "admin", "reset-offsets",
                              "--topic", st.events_topic, "--yes"], cwd=REPO, env=st.env(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        w.start()
        wait_until(lambda: count() == 8, 90, "the new exposures applied", workers=[w])
        assert w.alive()
    finally:
        ws.close()
        r.close()


def _recreated(st) -> bool:
    try:
        st.create_topics()
        return True
    except Exception:  # noqa: BLE001 - deletion still in progress on the broker
        return False
