"""Smoke test: the read/write commands a user runs around a worker, through
the command line on the session's broker and Redis.

``liftstream experiments create`` (a JSON file), ``experiments list``,
``watch EXPERIMENT`` (following the sampler's notices) and ``estimates
EXPERIMENT``, each asserted on what it prints. ``experiments stop/delete``
and ``admin reset-offsets`` have theirs in ``test_lifecycle.py`` and
``test_topic_identity.py``; the worker runs through the CLI in every
integration test (``tests.support.streaming_harness.Worker``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import redis

from schemas.codec import dumps, loads
from schemas.validate import experiment_to_dict
from streams.dev.simulate import make_traffic
from streams.sampling.sampler import read_estimates
from streams.state.keys import NOTICE_CHANNEL
from tests.support.streaming_harness import REPO, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY_MS = 86_400_000
EID = "cli-smoke"


def _cli(st, *args: str) -> str:
    """``liftstream <args>`` with the stack's settings; its stdout (rc 0 asserted)."""
    out = subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO,
                         env=st.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_experiments_create_list_watch_estimates(new_stack, workers, redis_url, tmp_path):
    st = new_stack("cli")
    start = (int(time.time() * 1000) // DAY_MS - 5) * DAY_MS
    cfg, evs, _ = make_traffic(1500, 3, EID, 2, 3600, start)
    path = tmp_path / "experiment.json"
    path.write_bytes(dumps(experiment_to_dict(cfg)))

    created = loads(_cli(st, "experiments", "create", str(path)))
    assert created == experiment_to_dict(cfg)
    listed = [loads(line) for line in _cli(st, "experiments", "list").splitlines()]
    assert listed == [created]

    r = redis.Redis.from_url(redis_url)
    watch = subprocess.Popen([sys.executable, "-m", "streams.cli", "watch", EID], cwd=REPO,
                             env=st.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: r.pubsub_numsub(NOTICE_CHANNEL)[0][1] > 0, 30, "watch subscribed")
        w = workers.start(st, "all")
        produce(st.bootstrap, st.events_topic, evs)
        wait_until(lambda: any(rec["units"]["matured"]["treatment"] > 0
                               for rec in read_estimates(r, EID)),
                   120, "an estimate of matured units", workers=[w])
        time.sleep(1.0)  # the watcher prints the notice's estimate
    finally:
        watch.send_signal(signal.SIGINT)  # it stops on Ctrl-C, exit status 0
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err.decode()[-2000:]
    watched = [loads(line) for line in out.splitlines()]
    assert watched and {rec["experiment_id"] for rec in watched} == {EID}

    latest = [loads(line) for line in _cli(st, "estimates", EID).splitlines()]
    assert latest and {(rec["experiment_id"], rec["variant"]) for rec in latest} == {
        (EID, "treatment")}
    assert all(rec["units"]["matured"]["treatment"] > 0 for rec in latest)
    r.close()


def test_experiments_list_shows_ingest_losses(new_stack, redis_url):
    """``experiments list`` (what an operator runs to see the platform) says
    what ingest lost outside any experiment, on stderr (stdout stays one JSON
    config a line): one quiet line while nothing was lost; else each kind with
    its partitions' counts, a lost kind marked, another topic's not shown."""
    from streams.state.keys import RETENTION_LOST, UNROUTED_LOST

    st = new_stack("cliloss", partitions=2)

    def listed() -> tuple[str, str]:
        out = subprocess.run([sys.executable, "-m", "streams.cli", "experiments", "list"],
                             cwd=REPO, env=st.env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout, out.stderr

    assert listed() == ("", f"ingest losses of {st.events_topic}: none\n")
    r = redis.Redis.from_url(redis_url)
    r.hset(UNROUTED_LOST, mapping={f"{st.events_topic}|0": 3, f"{st.events_topic}|1": 12,
                                   "another.topic|0": 9})
    r.hset(RETENTION_LOST, "another.topic|1", 7)
    r.close()
    stdout, stderr = listed()
    lines = stderr.splitlines()
    assert stdout == "" and len(lines) == 3, stderr
    assert lines[0].startswith(f"ingest losses of {st.events_topic} "), lines
    assert lines[1].startswith("  retention_lost: none ("), lines
    assert lines[2].startswith("! unrouted_lost: partition 0: 3, partition 1: 12 (metrics "
                               "without experiment_id"), lines
    assert "\x1b[" not in stderr  # no terminal: no colour codes
