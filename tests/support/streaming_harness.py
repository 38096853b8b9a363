"""Helpers for the streaming integration tests (``tests/integration/``).

Runs real ``liftstream worker`` processes against the session's embedded
broker and redis-server (``tests/conftest.py``):

* ``Stack``: the names one test uses -- its own app id (so its own consumer
  groups), its own topics, a Faust datadir under the test's ``tmp_path`` --
  and the ``LIFTSTREAM_*`` environment a worker of that test gets. Two tests
  never share a consumer group or a topic, so they cannot see each other's
  records or rebalances.
* ``Worker``: one worker subprocess (``python -m streams.cli worker --role R
  --without-web``) in its own session / process group, logging to a file.
  ``kill9`` SIGKILLs the whole group (a crash: nothing flushed, no LeaveGroup);
  ``stop`` is a clean SIGTERM shutdown with a SIGKILL fallback.
* ``Workers``: every worker a test starts is registered there, and the
  ``workers`` fixture kills whatever is still running when the test ends,
  passes or fails; an ``atexit`` hook is the last resort (pytest interrupted).
* ``produce``: confluent-kafka producer, keyed by ``unit_id``, delivery checked,
  returns each event's (partition, offset).
* ``wait_until``: poll with a timeout; fails early, with the worker's log
  tail, when a worker that should be running has died.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.codec import dumps
from schemas.records import ExperimentConfig, Exposure, Metric
from streams.config.settings import Settings
from streams.dev.embedded import dies_with_parent, kill_group, stop_group
from streams.state.semantics import Reducer
from streams.state.store import advance_partition, read_counters, read_snapshot
from tests.support.paths import REPO

#: Settings every test worker gets unless overridden: small and quick.
BASE_SETTINGS: dict[str, Any] = {
    "chains": 4,
    "sweeps_per_tick": 50,
    "tick_seconds": 0.5,
    "window_draws": 200,
    "warmup": 100,
    "batch_size": 500,
    "batch_seconds": 0.1,
    "device": "cpu",
    "log_level": "info",
    "seed": 7,
}


# ---------------------------------------------------------------- names / env

@dataclass
class Stack:
    """One test's slice of the shared broker and Redis."""

    bootstrap: str
    redis_url: str
    app_id: str
    topic_prefix: str
    datadir: Path
    logdir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def topics(self) -> dict[str, str]:
        p = self.topic_prefix
        return {"topic_events": f"{p}.events", "topic_experiments": f"{p}.experiments",
                "topic_dirty": f"{p}.dirty", "topic_estimates": f"{p}.estimates",
                "topic_alerts": f"{p}.alerts", "topic_deadletter": f"{p}.dead-letter"}

    @property
    def events_topic(self) -> str:
        return self.topics["topic_events"]

    @property
    def estimates_topic(self) -> str:
        return self.topics["topic_estimates"]

    @property
    def deadletter_topic(self) -> str:
        return self.topics["topic_deadletter"]

    def config(self) -> Settings:
        return Settings.from_env({}, bootstrap_servers=self.bootstrap, redis_url=self.redis_url,
                                 app_id=self.app_id, **self.topics, **self.settings)

    def env(self, **extra: Any) -> dict[str, str]:
        """The worker's environment: inherited, minus any LIFTSTREAM_* of the
        caller's shell, plus this stack's settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTSTREAM_")
               or k == "LIFTSTREAM_TANSU"}
        vals = {"bootstrap_servers": self.bootstrap, "redis_url": self.redis_url,
                "app_id": self.app_id, **self.topics, **self.settings, **extra}
        for k, v in vals.items():
            env[f"LIFTSTREAM_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
        env["LIFTSTREAM_DATADIR"] = str(self.datadir)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: keep BLAS from fighting the loop
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        return env

    def create_topics(self) -> None:
        from streams.service.topics import ensure_topics
        from streams.service.worker import topic_specs

        ensure_topics(self.bootstrap, topic_specs(self.config()), strict=True)

    def register(self, cfgs: Iterable[ExperimentConfig]) -> None:
        """Publish configs to this stack's experiments topic and put them in
        the Redis registry (as ``liftstream experiments create`` does), so
        events produced right after are recognised."""
        from streams.config.settings import redis_client
        from streams.service.experiments import publish_experiment
        from streams.state.registry import Registry

        r = redis_client(self.config())  # a RedisCluster for redis+cluster://
        try:
            for cfg in cfgs:
                publish_experiment(self.bootstrap, self.topics["topic_experiments"], cfg)
                Registry(r).put(cfg)
        finally:
            r.close()


def make_stack(bootstrap: str, redis_url: str, tmp_path: Path, name: str,
               **settings: Any) -> Stack:
    """A ``Stack`` with unique app id and topic names (``name`` + random)."""
    uid = uuid.uuid4().hex[:8]
    datadir = tmp_path / "faust-data"
    logdir = tmp_path / "logs"
    datadir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    return Stack(bootstrap, redis_url, app_id=f"it-{name}-{uid}",
                 topic_prefix=f"it.{name}.{uid}", datadir=datadir, logdir=logdir,
                 settings={**BASE_SETTINGS, **settings})


# ---------------------------------------------------------------- workers

_LIVE: weakref.WeakSet[Worker] = weakref.WeakSet()


class Worker:
    """One ``liftstream worker`` subprocess, in its own process group."""

    cli_extra: tuple[str, ...] = ("--without-web",)  # a subclass serving HTTP drops it

    def __init__(self, stack: Stack, role: str, name: str | None = None, **env: Any):
        self.stack, self.role = stack, role
        self.env = stack.env(**env)
        self.log_path = stack.logdir / f"{name or role}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.started_at = 0.0

    def start(self) -> Worker:
        if self.alive():
            raise RuntimeError("worker already running")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.time():.3f} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker", "--role", self.role,
                 *self.cli_extra],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=dies_with_parent())
        self.started_at = time.monotonic()
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill9(self) -> None:
        """SIGKILL the worker's whole process group and reap it."""
        if self.proc is not None:
            kill_group(self.proc)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Clean shutdown (SIGTERM: Faust commits and leaves the group); SIGKILL
        after ``timeout``. Returns the exit code (None if it had to be killed)."""
        return None if self.proc is None else stop_group(self.proc, timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n:].decode("utf-8", "replace")

    def ready(self) -> bool:
        """Has the current run (since the last start) finished starting up
        (Faust's "Worker]: Ready")? A SIGTERM before that ends it with -15."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return False
        return b"Worker]: Ready" in data[data.rfind(b"===== start #"):]

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.role} worker exited with code {self.proc.returncode}"
                                 f"\n--- {self.log_path} ---\n{self.log_tail()}")


class Workers:
    """Every worker a test starts; ``close`` kills those still running."""

    def __init__(self) -> None:
        self.all: list[Worker] = []

    def start(self, stack: Stack, role: str, name: str | None = None, **env: Any) -> Worker:
        w = Worker(stack, role, name, **env)
        self.all.append(w)
        return w.start()

    def close(self) -> None:
        for w in self.all:
            w.kill9()


# ------------------------------------------------------------------ a worker with web

class WebWorker(Worker):
    """A harness ``Worker`` that serves the HTTP API on ``port`` (127.0.0.1)."""

    cli_extra = ()

    def __init__(self, stack, role: str, port: int, name: str | None = None, **env):
        super().__init__(stack, role, name, web_port=port, web_host="127.0.0.1", **env)
        self.port = port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 5.0) -> bytes | None:
        """The body of a 2xx answer; None for an error status or no answer."""
        status, body = self.request(path, timeout)
        return body if status is not None and 200 <= status < 300 else None

    def request(self, path: str, timeout: float = 5.0, headers: dict | None = None
                ) -> tuple[int | None, bytes | None]:
        """(HTTP status, body), or (None, None) when nothing answered."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url(path), headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, None


def start_web_worker(workers: Workers, stack, role: str, **env) -> WebWorker:
    from streams.dev.embedded import free_port

    w = WebWorker(stack, role, free_port(), **env)
    workers.all.append(w)  # killed at teardown like every harness worker
    return w.start()



_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)$')


def scrape(text: str, name: str) -> dict[str, float]:
    """``{label-string: value}`` of the samples of ``name`` in Prometheus text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m and m.group(1) == name:
            out[m.group(2)] = float(m.group(3))
    return out


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - only when pytest is interrupted
    for w in list(_LIVE):
        w.kill9()


# ---------------------------------------------------------------- waiting

def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
               workers: Sequence[Worker] = (), info: Callable[[], str] | None = None) -> Any:
    """Poll ``pred`` until it returns something truthy; return that.

    Fails (AssertionError) after ``timeout`` seconds, or at once when one of
    ``workers`` has exited, with ``info()`` and the workers' log tails.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        for w in workers:
            w.check_alive()
        if time.monotonic() > deadline:
            msg = [f"timed out after {timeout:.0f}s waiting for {what}"]
            if info is not None:
                msg.append(info())
            for w in workers:
                msg.append(f"--- {w.log_path} ---\n{w.log_tail()}")
            raise AssertionError("\n".join(msg))
        time.sleep(interval)


# ---------------------------------------------------------------- Kafka I/O

def event_dict(ev: Exposure | Metric | dict) -> dict:
    """The JSON object of an event; absent optional fields are left out."""
    if isinstance(ev, dict):
        return ev
    if isinstance(ev, Exposure):
        d = {"type": "exposure", "event_id": ev.event_id, "experiment_id": ev.experiment_id,
             "unit_id": ev.unit_id, "variant": ev.variant, "ts": ev.ts}
        if ev.pre_activity is not None:
            d["pre_activity"] = ev.pre_activity
        if ev.pre is not None:
            d["pre"] = ev.pre
        return d
    d = {"type": "metric", "event_id": ev.event_id, "unit_id": ev.unit_id,
         "metric": ev.metric, "value": ev.value, "ts": ev.ts}
    if ev.experiment_id is not None:
        d["experiment_id"] = ev.experiment_id
    return d


def producer(bootstrap: str, **extra: Any):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 10,
                     "enable.idempotence": False, **extra})


def produce(bootstrap: str, topic: str, events: Sequence[Exposure | Metric | dict],
            timeout: float = 60.0, prod=None) -> list[tuple[int, int]]:
    """Produce ``events`` (keyed by unit_id, in order) and wait for delivery.

    Returns (partition, offset) per event, in ``events`` order. Raises if
    any event was not delivered.
    """
    own = prod is None
    prod = prod or producer(bootstrap)
    where: list[tuple[int, int] | None] = [None] * len(events)
    errors: list = []

    def cb(i: int):
        def on_delivery(err, msg) -> None:
            if err is not None:
                errors.append(err)
            else:
                where[i] = (msg.partition(), msg.offset())
        return on_delivery

    for i, ev in enumerate(events):
        d = event_dict(ev)
        while True:
            try:
                prod.produce(topic, key=d["unit_id"].encode(), value=dumps(d), on_delivery=cb(i))
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    left = prod.flush(timeout)
    assert left == 0, f"{left} events not delivered to {topic}"
    assert not errors, errors[:3]
    assert all(w is not None for w in where)
    if own:
        del prod
    return where  # type: ignore[return-value]


def consume_all(bootstrap: str, topic: str, until: Callable[[list], bool],
                timeout: float = 30.0) -> list:
    """All records of ``topic`` from the beginning (every partition, no group)
    until ``until(records)`` holds; fails after ``timeout``."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-read-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list = []
        deadline = time.monotonic() + timeout
        while not until(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: condition not met after {timeout:.0f}s "
                                     f"({len(out)} records read)")
            for m in c.consume(1000, 0.2):
                assert m.error() is None, m.error()
                out.append(m)
        return out
    finally:
        c.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Offsets ``group`` has committed on each partition of ``topic`` (-1: none)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        got = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


# ---------------------------------------------------------------- Redis reads

def events_counted(r, experiment_ids: Iterable[str]) -> int:
    """Events counted over experiments (each event routed to an experiment
    increments exactly one of its counters)."""
    return sum(sum(read_counters(r, e).values()) for e in experiment_ids)


#: dataclass fields ``bits`` leaves out
_NOT_STATE = frozenset(("seq", "dirty"))


def bits(x: Any) -> Any:
    """Canonical form with floats as hex (equality = bit equality, -0.0 != 0.0);
    dataclasses as dicts without their ``seq`` and ``UnitState.dirty`` (the
    owner's bookkeeping of what to write, not state)."""
    if isinstance(x, float):
        return ("f", x.hex())
    if isinstance(x, dict):
        return {k: bits(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [bits(v) for v in x]
    if hasattr(x, "__dataclass_fields__") and not isinstance(x, ExperimentConfig):
        return {f: bits(getattr(x, f)) for f in x.__dataclass_fields__
                if f not in _NOT_STATE}
    return x


def reference(cfgs: Iterable[ExperimentConfig], events: Sequence, where: Sequence[tuple[int, int]],
              topic: str) -> Reducer:
    """The reducer fed as a worker is: each event from its partition (``where``,
    as ``produce`` returns it), in produced order, one event a call."""
    red = Reducer(list(cfgs))
    for (p, _), ev in zip(where, events, strict=True):
        red.apply_batch(f"{topic}|{p}", [ev])
    return red


def settle_all(r, red: Reducer, cfgs: Iterable[ExperimentConfig], topic: str,
               partitions: Iterable[int], clock: int | None = None) -> None:
    """Advance every partition to ``clock`` (None: each to the reducer's clock
    of it, i.e. only settle), in Redis as the worker's idle advance does
    (``streams.state.store.advance_partition``) and in the reducer, so that both
    have matured everything due by then: the worker settles experiments
    without events in a batch at wall-clock moments, the reducer does not."""
    cfgs = list(cfgs)
    for p in partitions:
        src = f"{topic}|{p}"
        c = red.clocks.get(src) if clock is None else clock
        if c is None:
            continue
        advance_partition(r, cfgs, topic, p, c)
        red.advance(src, c)


def close_diff(got: Any, want: Any, path: str = "") -> list[str]:
    """Where two values differ beyond float rounding: integers and strings
    exactly, floats within 1e-9 relative (batch boundaries change the order
    in which units are folded into a cell, so its sums' last bits)."""
    if isinstance(want, float) or isinstance(got, float):
        ok = isinstance(got, int | float) and isinstance(want, int | float) and math.isclose(
            got, want, rel_tol=1e-9, abs_tol=1e-9)
        return [] if ok else [f"{path}: {got!r} != {want!r}"]
    if hasattr(want, "__dataclass_fields__") and not isinstance(want, ExperimentConfig):
        return [d for f in want.__dataclass_fields__ if f not in ("seq", "dead_letters")
                for d in close_diff(getattr(got, f), getattr(want, f), f"{path}.{f}")]
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{path}: keys {sorted(got) if isinstance(got, dict) else got!r:.200} != "
                    f"{sorted(want)!r:.200}"]
        return [d for k in want for d in close_diff(got[k], want[k], f"{path}[{k!r}]")]
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            return [f"{path}: {got!r:.200} != {want!r:.200}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True))
                for d in close_diff(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: {got!r:.200} != {want!r:.200}"]


def assert_state_close(r, cfgs: Iterable[ExperimentConfig], red: Reducer) -> None:
    """Redis snapshots == the reducer's: counts exactly, sums within 1e-9
    relative, the watermark from the reducer's completeness clock."""
    c = red.completeness()
    for cfg in cfgs:
        got = read_snapshot(r, cfg, completeness=c)
        want = red.states[cfg.experiment_id].snapshot(c)
        diffs = close_diff(got, want)
        assert not diffs, f"{cfg.experiment_id}: Redis differs from the reducer:\n" + \
            "\n".join(diffs[:20])


def snapshot_diff(got: Any, want: Any) -> str:
    """Fields of two snapshots that differ (for assertion messages)."""
    g, w = bits(got), bits(want)
    diffs = [f"{k}: redis={g[k]!r:.300} reducer={w[k]!r:.300}" for k in w if g.get(k) != w[k]]
    return "\n".join(diffs)
