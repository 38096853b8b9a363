"""Helpers for the scale-out/failover and Redis-loss tests.

``pinned_case``: traffic for many experiments whose expected final Redis state
does not depend on how the events partitions interleave, with the experiments'
*normal* event-time settings (so units mature while the traffic flows and the
samplers publish changing estimates all along). Each experiment's events are
produced to ONE partition (``partition_for(experiment_id)``), in time order,
and every metric carries its experiment id: an experiment's state then depends
only on its own events in produced order, which Kafka preserves per partition,
whatever the interleaving across partitions and whichever worker applies them.
(tests/integration/test_streaming.py covers unit-keyed partitioning, where it needs a
lateness longer than the traffic to be order-free.) The reference reducer
folds the same events in produced order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from schemas.codec import dumps, loads
from streams.dev.simulate import make_traffic
from streams.service.app import partition_for

DAY_MS = 86_400_000
START = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS


def pinned_case(n_experiments: int, units: int, days: float, seed: int, partitions: int,
                tag: str = "x"):
    """Configs and (partition, event) pairs, merged by time over experiments."""
    cfgs, out = [], []
    for i in range(n_experiments):
        eid = f"{tag}{i:02d}"
        cfg, evs, _ = make_traffic(units, days, eid, seed + i, 86_400, START)
        cfgs.append(cfg)
        p = partition_for(eid.encode(), partitions)
        for e in evs:
            e = dict(e, unit_id=f"{eid}-{e['unit_id']}")
            out.append((p, e))
    out.sort(key=lambda pe: pe[1]["ts"])
    return cfgs, out


def produce_pinned(prod, topic: str, pairs: Sequence[tuple[int, dict]],
                   timeout: float = 60.0) -> None:
    """Produce (partition, event) pairs, keyed by unit id; wait for delivery."""
    errors: list = []

    def cb(err, _msg) -> None:
        if err is not None:
            errors.append(err)

    for p, e in pairs:
        while True:
            try:
                prod.produce(topic, key=e["unit_id"].encode(), value=dumps(e), partition=p,
                             on_delivery=cb)
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    left = prod.flush(timeout)
    assert left == 0 and not errors, (left, errors[:3])


def pinned_producer(bootstrap: str):
    from confluent_kafka import Producer

    # idempotent: a retried produce request must not duplicate events, as the
    # reducer gets each event once (acks=all, in order per partition)
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 10,
                     "enable.idempotence": True})


class Feeder(threading.Thread):
    """Produces ``pairs`` at a steady pace over ``duration`` seconds."""

    def __init__(self, bootstrap: str, topic: str, pairs: Sequence[tuple[int, dict]],
                 duration: float):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.pairs, self.duration = bootstrap, topic, pairs, duration
        self.produced = 0
        self.failure: list[BaseException] = []
        self.quit = threading.Event()

    def run(self) -> None:
        try:
            prod = pinned_producer(self.bootstrap)
            n = len(self.pairs)
            chunk = max(1, n // int(self.duration * 5))
            t0 = time.monotonic()
            for k in range(0, n, chunk):
                if self.quit.is_set():
                    return
                produce_pinned(prod, self.topic, self.pairs[k:k + chunk])
                self.produced = min(n, k + chunk)
                ahead = t0 + self.duration * self.produced / n - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure.append(e)


class NoticeLog(threading.Thread):
    """Records (monotonic time, experiment id) of every ``lr:estimates`` notice."""

    def __init__(self, redis_url: str, channel: str):
        super().__init__(daemon=True)
        import redis

        self.r = redis.Redis.from_url(redis_url)
        self.ps = self.r.pubsub(ignore_subscribe_messages=True)
        self.ps.subscribe(channel)
        self.times: dict[str, list[float]] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                m = self.ps.get_message(timeout=0.2)
            except Exception:  # noqa: BLE001 - redis restarted etc.
                time.sleep(0.2)
                continue
            if m and m.get("type") == "message":
                d = loads(m["data"])
                self.times.setdefault(d["experiment_id"], []).append(time.monotonic())

    def close(self) -> None:
        self.stop_flag.set()
        self.join(5)
        self.ps.close()
        self.r.close()

    def longest_gap(self, eid: str, since: float, until: float) -> float:
        """Longest interval without a notice for ``eid`` within [since, until]."""
        ts = [t for t in self.times.get(eid, []) if since <= t <= until]
        pts = [since, *ts, until]
        return max(b - a for a, b in zip(pts, pts[1:], strict=False))


def as_records(evs) -> list:
    from schemas.validate import parse_event

    return [parse_event(dumps(e), now_ms=2**53 - 1) for e in evs]


def fed(cfgs, pairs, topic: str = "t"):
    """The reference reducer fed (partition, event) pairs as the worker is:
    each event from its partition, in order."""
    from streams.state.semantics import Reducer

    red = Reducer(cfgs)
    for p, e in zip((p for p, _ in pairs), as_records([e for _, e in pairs]), strict=True):
        red.apply_batch(f"{topic}|{p}", [e])
    return red


def group_members(bootstrap: str, group: str) -> dict[str, set[tuple[str, int]]]:
    """member id -> assigned (topic, partition) of a consumer group (AdminClient)."""
    from confluent_kafka.admin import AdminClient

    a = AdminClient({"bootstrap.servers": bootstrap})
    desc = a.describe_consumer_groups([group])[group].result(timeout=10)
    out: dict[str, Any] = {}
    for m in desc.members:
        tps = m.assignment.topic_partitions if m.assignment else []
        out[m.member_id] = {(tp.topic, tp.partition) for tp in tps}
    return out
