"""A real Redis Cluster for the tests (issue 15, item 7): 3 masters, no
replicas, started once per session from the same redis-server binary as the
single server (``streams.dev.embedded.redis_cluster``), every node a child that
dies with the test process.

A module uses it by importing the fixtures it needs::

    from tests.support.redis_cluster_support import cluster_r, redis_cluster_service  # noqa: F401

``cluster_url`` is the ``redis+cluster://`` URL (every master flushed first);
``cluster_r`` a ``redis.cluster.RedisCluster`` on it (``streams.config.settings.redis_client``).
"""

from __future__ import annotations

import pytest

from streams.config.settings import Settings, redis_client
from streams.dev.embedded import redis_cluster


@pytest.fixture(scope="session")
def redis_cluster_service():
    with redis_cluster(masters=3) as svc:
        yield svc


def cluster_client(url: str):
    """A ``RedisCluster`` for ``url``, built as the worker builds it."""
    return redis_client(Settings(redis_url=url))


@pytest.fixture()
def cluster_url(redis_cluster_service) -> str:
    """The session's cluster, every master flushed (FLUSHALL goes to all
    primaries on a RedisCluster client), its scripts cache too."""
    c = cluster_client(redis_cluster_service.url)
    try:
        c.flushall()
        c.script_flush()
    finally:
        c.close()
    return redis_cluster_service.url


@pytest.fixture()
def cluster_r(cluster_url):
    c = cluster_client(cluster_url)
    yield c
    c.close()


def master_of(c, key: str) -> str:
    """``host:port`` of the master serving ``key``'s slot."""
    node = c.get_node_from_key(key)
    return f"{node.host}:{node.port}"
