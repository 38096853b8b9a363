"""Shared fixtures: real services on loopback, started per test session."""

from __future__ import annotations

import pytest

from streams.embedded import kafka_broker, redis_server


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


@pytest.fixture(scope="session")
def kafka_service():
    """One embedded Tansu broker (in-memory) for the whole test session.

    Started once because consumer-group tests are slow enough already; tests
    isolate themselves with unique topic and group names instead of a flush.
    """
    with kafka_broker() as svc:
        yield svc


@pytest.fixture()
def kafka_bootstrap(kafka_service) -> str:
    """Bootstrap servers string of the session broker, checked to be alive
    (an earlier test may have killed it; fail here rather than time out)."""
    if kafka_service.process.poll() is not None:
        pytest.fail(f"the session Tansu broker exited with code "
                    f"{kafka_service.process.returncode}")
    return kafka_service.url
