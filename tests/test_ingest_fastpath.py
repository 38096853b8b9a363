"""The ingest worker's fast path (streams.app): Faust's per-message delivery
run inline until it suspends, raw events without the serializer registry."""

from __future__ import annotations

import asyncio

import pytest

from streams import app as app_mod
from streams import faust_fastpath as fp
from streams.settings import Settings


async def _steps(log: list, fail: bool = False):
    log.append("start")
    await asyncio.sleep(0)          # bare yield (None)
    log.append("after sleep0")
    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, fut.set_result, 7)
    got = await fut                 # a future
    log.append(("future", got))
    if fail:
        raise ValueError("boom")
    return got * 6


def _drive(coro):
    """What the fast drain loop does: run by hand until the first suspension."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, asyncio.ensure_future(fp._resume(coro, first))


def test_resume_finishes_a_suspended_coroutine():
    async def main():
        log: list = []
        done, task = _drive(_steps(log))
        assert not done and log == ["start"]
        assert await task == 42
        assert log == ["start", "after sleep0", ("future", 7)]

        log2: list = []
        _, task = _drive(_steps(log2, fail=True))
        with pytest.raises(ValueError, match="boom"):
            await task

        async def quick():
            return 5

        assert _drive(quick()) == (True, 5)

    asyncio.run(main())


def test_resume_forwards_cancellation():
    async def main():
        cleaned = []

        async def slow():
            try:
                await asyncio.sleep(0)
                await asyncio.sleep(30)
            finally:
                cleaned.append(True)

        _, task = _drive(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    asyncio.run(main())


@pytest.mark.parametrize("fast", [True, False])
def test_create_app_wires_the_fast_path(fast, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTSTREAM_DATADIR", str(tmp_path))
    s = Settings(ingest_fast_path=fast)
    app = app_mod.create_app(s, "ingest")
    consumer_cls = app.transport.Consumer.__name__
    ev_topic = next(a.channel for a in app.agents.values() if a.name.endswith("ingest"))
    assert ev_topic.topics == (s.topic_events,)
    if fast:
        # another faust-streaming than 0.15.3 gets its own drain loop back (the copy
        # in streams/faust_fastpath.py is only used over the exact source it copies)
        known = fp._stock_drain_matches()
        assert (consumer_cls == "_FastDrainConsumer") == known, (consumer_cls, known)
        assert isinstance(ev_topic.schema, fp.RawEventSchema)
    else:
        assert consumer_cls != "_FastDrainConsumer"
        assert not isinstance(ev_topic.schema, fp.RawEventSchema)


def test_raw_schema_decodes_like_the_raw_serializer(tmp_path, monkeypatch):
    import faust
    from faust.types import TP, Message

    monkeypatch.setenv("LIFTSTREAM_DATADIR", str(tmp_path))
    app = app_mod.create_app(Settings(), "ingest")
    stock = faust.Schema(key_serializer="raw", value_serializer="raw").compile(app)
    fast = fp.RawEventSchema().compile(app)

    async def main():
        for key, value in [(b"k", b'{"a": 1}'), (None, b"x"), (b"k", None), (None, None)]:
            msg = Message(topic="t", partition=0, offset=3, timestamp=0.0, timestamp_type=0,
                          headers=[("h", b"v")], key=key, value=value, checksum=None,
                          tp=TP("t", 0))
            a, b = await stock(msg), await fast(msg)
            assert (a.key, a.value, a.message) == (b.key, b.value, b.message)
            assert b.key == key and b.value == value

    asyncio.run(main())
