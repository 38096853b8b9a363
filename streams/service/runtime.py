"""What every agent of the service needs: stopping the process without a
commit, retrying Redis, and the dirty topic's partitioner."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, NoReturn

from streams.state.store import transient

log = logging.getLogger("liftstream")


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Kafka default (murmur2) partitioner gives ``key``, as
    Faust's producer does; the sampler uses it to know which experiments its
    dirty-topic partitions make it own.

    :param key: the record key (an experiment id, encoded).
    :param partitions: the topic's partition count.
    :returns: the partition, ``0 <= p < partitions``.
    """
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def fatal(msg: str, exc: BaseException | None = None) -> NoReturn:
    """Stop the worker without committing anything not yet applied
    (``os._exit(70)`` after logging ``msg`` and ``exc`` at CRITICAL)."""
    log.critical("fatal: %s", msg, exc_info=exc)
    logging.shutdown()
    os._exit(70)


async def with_retry(fn: Callable[..., Any], *args: Any, what: str,
                     max_backoff: float = 5.0) -> Any:
    """Run blocking ``fn(*args)`` on a thread; retry transient Redis errors
    forever (backoff from 0.1 s doubling to ``max_backoff``), logging them
    under ``what``.

    :returns: what ``fn`` returns.
    :raises: any error of ``fn`` that is not a transient Redis error.
    """
    loop = asyncio.get_running_loop()
    delay = 0.1
    while True:
        try:
            return await loop.run_in_executor(None, fn, *args)
        except Exception as exc:  # noqa: BLE001 - only the transient ones are retried
            if (e := transient(exc)) is None:
                raise
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", what, e, delay)
            await asyncio.sleep(delay)
            delay = min(max_backoff, delay * 2)
