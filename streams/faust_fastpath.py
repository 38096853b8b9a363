"""Ingest fast path for the Faust worker (``LIFTSTREAM_INGEST_FAST_PATH``, default on).

Profiling a ``--role ingest`` worker (py-spy, GIL samples) put ~85% of its
CPU in Faust's per-message glue, not in aiokafka or in our code. The largest
single cost was the consumer's drain loop running every message's delivery
callback through ``Service.wait_first``: four tasks (the callback, waits on
suspend_flow, stopped and crashed), an ``asyncio.wait`` and three cancels per
message, ~22% of samples plus most of the event-loop overhead around them.
Nearly always the callback (find the channels, decode, ``put_nowait`` on the
stream's queue) finishes without ever suspending, so none of that is needed:
``_FastDrainConsumer`` runs it inline and only when it does suspend (a full
stream buffer, flow control paused for a rebalance, a full producer buffer)
hands the rest of it to a task awaited through ``wait_first`` exactly as
Faust does. The second is ``RawEventSchema``: the events topic's key and
value are raw bytes, so decoding through the serializer registry (codec
lookup, ``want_bytes``) is skipped and the event is built directly.
"""

from __future__ import annotations

import asyncio

import faust


class _Resume:
    """Awaitable that finishes coroutine ``coro``, already run by hand up to its
    first suspension (``first``: what it yielded, a future or None), inside
    whatever task awaits this: what ``coro`` yields goes to the task, what the
    task sends or throws goes back to ``coro`` (generator delegation, as
    ``await`` does, minus the first ``send`` that already happened)."""

    __slots__ = ("coro", "first")

    def __init__(self, coro, first) -> None:
        self.coro, self.first = coro, first

    def __await__(self):
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - forwarded, cancellation included
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro, first):
    return await _Resume(coro, first)


#: sha256 of the source of ``faust.transport.consumer.Consumer._drain_messages``
#: that ``_FastDrainConsumer._drain_messages`` copies (faust-streaming 0.15.3).
#: Any other source (another Faust version) gets Faust's own loop back.
_DRAIN_SOURCE_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


def _stock_drain_matches() -> bool:
    import hashlib
    import inspect

    from faust.transport.consumer import Consumer as BaseConsumer

    try:
        src = inspect.getsource(BaseConsumer._drain_messages)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(src.encode()).hexdigest() == _DRAIN_SOURCE_SHA256


def fast_drain_transport(app: faust.App):
    """The aiokafka transport with ``_FastDrainConsumer``, or None when the
    broker URL is not ``kafka://``/``aiokafka://`` or Faust's drain loop is not
    the one this copies."""
    from faust.transport.consumer import CONSUMER_FETCHING
    from faust.transport.drivers import aiokafka as drv

    url = app.conf.broker_consumer[0]
    if url.scheme not in ("kafka", "aiokafka") or not _stock_drain_matches():
        return None

    class _FastDrainConsumer(drv.Consumer):
        async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - timing
            # Faust's loop (faust/transport/consumer.py, 0.15.3) with one change:
            # the callback runs inline until it first suspends (see above).
            callback = self.callback
            getmany = self.getmany
            consumer_should_stop = self._stopped.is_set
            fetcher_should_stop = fetcher._stopped.is_set
            suspended = self.suspend_flow.is_set

            get_read_offset = self._read_offset.__getitem__
            set_read_offset = self._read_offset.__setitem__
            flag_consumer_fetching = CONSUMER_FETCHING
            set_flag = self.diag.set_flag
            unset_flag = self.diag.unset_flag
            commit_every = self._commit_every
            acks_enabled_for = self.app.topics.acks_enabled_for

            yield_every = 100
            num_since_yield = 0
            sleep = asyncio.sleep
            ensure_future = asyncio.ensure_future

            try:
                while not (consumer_should_stop() or fetcher_should_stop()):
                    set_flag(flag_consumer_fetching)
                    ait = getmany(timeout=1.0)
                    await self.sleep(0)
                    if not self.should_stop:
                        async for tp, message in ait:
                            num_since_yield += 1
                            if num_since_yield > yield_every:
                                await sleep(0)
                                num_since_yield = 0

                            offset = message.offset
                            r_offset = get_read_offset(tp)
                            if r_offset is None or offset >= r_offset:
                                gap = offset - (r_offset or 0)
                                if gap > 1 and r_offset:
                                    if acks_enabled_for(message.topic):
                                        await self._add_gap(tp, r_offset + 1, offset)
                                if commit_every is not None:
                                    if self._n_acked >= commit_every:
                                        self._n_acked = 0
                                        await self.commit()
                                if suspended():
                                    await self.wait_first(callback(message),
                                                          self.suspend_flow.wait())
                                else:
                                    coro = callback(message)
                                    try:
                                        first = coro.send(None)
                                    except StopIteration:
                                        pass  # delivered without suspending
                                    else:
                                        await self.wait_first(
                                            ensure_future(_resume(coro, first)),
                                            self.suspend_flow.wait())
                                set_read_offset(tp, offset)
                            else:
                                self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                             offset, message.key, message.value)
                        unset_flag(flag_consumer_fetching)

            except self.consumer_stopped_errors:
                if self.transport.app.should_stop:
                    self.log.info("Broker stopped consumer, shutting down...")
                    return
                raise
            except asyncio.CancelledError:
                if self.transport.app.should_stop:
                    self.log.info("Consumer shutting down for user cancel.")
                    return
                raise
            except Exception as exc:
                self.log.exception("Drain messages raised: %r", exc)
                raise
            finally:
                unset_flag(flag_consumer_fetching)

    class _FastDrainTransport(drv.Transport):
        Consumer = _FastDrainConsumer

    return _FastDrainTransport(app.conf.broker_consumer, app)


class RawEventSchema(faust.Schema):
    """Key and value passed through as the bytes Kafka delivered (what the
    ``raw`` serializer gives, without the serializer registry per message)."""

    def compile(self, app, *, on_key_decode_error=None, on_value_decode_error=None,
                default_propagate: bool = False):
        event_cls = app.conf.Event  # what app.create_event builds, looked up once

        async def decode(message, *, propagate: bool = default_propagate):
            return event_cls(app, message.key, message.value, message.headers, message)

        return decode
