"""Fixtures of the integration tests (the session's broker and redis-server
fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from tests.support.streaming_harness import Workers, make_stack


@pytest.fixture()
def workers():
    ws = Workers()
    yield ws
    ws.close()


@pytest.fixture()
def new_stack(kafka_bootstrap, redis_url, tmp_path):
    def make(name: str, **settings):
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, name, **settings)
        st.create_topics()
        return st
    return make
