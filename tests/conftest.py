"""Shared fixtures: real services on loopback, started per test session."""

from __future__ import annotations

import pytest

from streams.embedded import redis_server


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
