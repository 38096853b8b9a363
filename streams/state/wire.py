"""The owner's wire to Redis: commands packed by hiredis and sent at once.

Why a module of its own: the partition owner's reads and commit
(``streams.state.partition_store``) and the routing index's round trip
(``streams.state.store.route_rows``) send their commands the same way, and
neither module should reach into the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import CoreCommands
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streams.state import resp

# # Why: redis-py encodes every argument of a command in Python (about 2 µs an
# argument with its checks), and a batch's commit and reads carry several
# arguments per event (unit records, sightings, pending scores). On a plain
# ``redis.Redis`` with the hiredis parser the owner packs each command with
# ``hiredis.pack_command`` (C) and sends a call's commands at once on one
# connection; on anything else (Redis Cluster, other clients) the same
# commands go through redis-py's pipeline. The replies are normalised to one
# shape either way (``Reads``).

try:
    import hiredis
except ImportError:  # pragma: no cover - a fresh machine without hiredis
    hiredis = None
try:  # what redis-py's hiredis reader returns for "no whole reply buffered yet"
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _MORE
except ImportError:  # pragma: no cover - another redis-py: read_response then
    _MORE = None


def packs(r: Any) -> bool:
    """Whether the owner may pack commands itself for client ``r`` (a plain
    ``redis.Redis`` that does not decode replies, hiredis installed)."""
    return (hiredis is not None and type(r) is redis.Redis
            and not r.connection_pool.connection_kwargs.get("decode_responses"))


def pack(cmds: Sequence[tuple]) -> bytes:
    """``cmds`` as RESP in one buffer, each command byte for byte what
    ``hiredis.pack_command`` makes of it: by ``streams.state.resp`` when it
    runs compiled (half hiredis's instructions an argument, measured), by
    hiredis otherwise (``map``: no Python frame per command)."""
    if resp.COMPILED:
        return resp.pack(cmds, hiredis.pack_command)
    return b"".join(map(hiredis.pack_command, cmds))


def send_raw(conn: Any, cmds: Sequence[tuple]) -> list:
    """Send ``cmds`` on ``conn`` at once and read every reply (an error reply
    is returned as its exception, so the connection stays in step); any
    other failure disconnects it (a half-read connection is never reused)."""
    try:
        # one buffer, one sendall: a list would be one syscall per command
        # (redis-py sends its items one by one), and Redis reads as many times
        conn.send_packed_command([pack(cmds)], check_health=False)
        parser = conn._parser
        reader = getattr(parser, "_reader", None)
        if (_MORE is not None and isinstance(reader, hiredis.Reader)
                and getattr(parser, "_sock", None) is not None
                and isinstance(getattr(parser, "_buffer", None), bytearray)):
            return read_replies(parser._sock, parser._buffer, reader, len(cmds))
        out = []
        for _ in cmds:
            try:
                out.append(conn.read_response(disable_decoding=True))
            except ResponseError as e:
                out.append(e)
        return out
    except BaseException:
        conn.disconnect()
        raise


def read_replies(sock: Any, buf: bytearray, reader: Any, n: int) -> list:
    """``n`` replies parsed by the connection's hiredis reader straight off
    its socket. Why: redis-py's ``read_response`` spends ~0.6 µs of Python
    per reply around the C parser, this loop less than ~0.15 (20k HSETNX
    replies: the buffered replies are drained by ``iter`` in C), and
    the routing index reads two replies per exposure. Error replies come
    back as their exception (the reader builds them with redis-py's
    ``parse_error``, as ``read_response`` would before raising them); a
    timeout or a closed socket raise redis-py's errors, so callers retry
    them as before (``store.TRANSIENT_REDIS``)."""
    out: list = []
    gets = reader.gets
    while True:
        # every whole reply buffered, at C speed (``iter`` stops at the
        # reader's "not enough data" object; no reply equals it)
        out.extend(iter(gets, _MORE))
        if len(out) >= n:
            break
        try:
            k = sock.recv_into(buf)
        except TimeoutError as e:  # socket.timeout
            raise redis.TimeoutError("Timeout reading from socket") from e
        except OSError as e:
            raise RedisConnectionError(f"Error while reading from socket: {e.args}") from e
        if not k:
            raise RedisConnectionError("Connection closed by server.")
        reader.feed(buf, 0, k)
    return out


class Recorder(CoreCommands):
    """Turns redis-py command methods (``WriteSet`` entries) into the
    argument tuples they would send, without sending or encoding them."""

    def __init__(self) -> None:
        self.cmds: list[tuple] = []

    def execute_command(self, *args: Any, **options: Any) -> None:
        self.cmds.append(args)


def flat_pairs(x: Any) -> list[tuple[Any, Any]]:
    """A HGETALL or ZRANGE WITHSCORES reply as pairs, whether redis-py made
    it a dict / list of pairs or it is the flat RESP2 list."""
    if isinstance(x, dict):
        return list(x.items())
    if x and isinstance(x[0], (list, tuple)):
        return [tuple(v) for v in x]
    return list(zip(x[::2], x[1::2], strict=True))


class Reads:
    """A read pipeline of the owner's call (``packs``: packed by hiredis,
    else redis-py's): ``add`` raw commands, ``execute`` returns the replies
    (HGETALL as a dict, ZRANGE WITHSCORES as (member, score) pairs; scores
    as Redis sent them, which ``int`` reads); an error reply raises.
    ``conn``: a connection of ``r``'s pool the caller holds (packed path
    only; the owner's WATCHing one, ``partition_store.Commit.hold``): the
    commands go there, and it is not released."""

    def __init__(self, r: Any, conn: Any = None) -> None:
        self.r = r
        self.conn = conn
        self.cmds: list[tuple] = []

    def add(self, *args: Any) -> Reads:
        self.cmds.append(args)
        return self

    def __len__(self) -> int:
        return len(self.cmds)

    def execute(self) -> list:
        if not self.cmds:
            return []
        if self.conn is not None:
            got = send_raw(self.conn, self.cmds)
        elif packs(self.r):
            pool = self.r.connection_pool
            conn = pool.get_connection()
            try:
                got = send_raw(conn, self.cmds)
            finally:
                pool.release(conn)
        else:
            p = self.r.pipeline(transaction=False)
            for c in self.cmds:
                p.execute_command(*c)
            got = p.execute(raise_on_error=False)
        for g in got:
            if isinstance(g, Exception):
                raise g
        return [dict(flat_pairs(g)) if c[0] == "HGETALL"
                else flat_pairs(g) if c[0] == "ZRANGE" else g
                for c, g in zip(self.cmds, got, strict=True)]
