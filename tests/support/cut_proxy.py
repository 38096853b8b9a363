"""A TCP proxy between a worker and a real redis-server that cuts the
connection in the middle of chosen MULTI/EXEC transactions (issue 25: kill
points of the owner's commit, "connection dropped during EXEC").

It forwards every byte both ways, unchanged. On the client's side it follows
the RESP command stream: a transaction is the bytes from ``MULTI`` to
``EXEC``; when one that contains ``match`` (e.g. an experiment's applied-offset
key, which only the owner's commits write) completes, and it is one of the
``cut_at`` (1-based count of such transactions over all connections), the
connection is cut in one of two ways:

* ``"exec_lost"``: the chunk that carries ``EXEC`` is never forwarded and
  both sockets are closed: Redis discards the queued commands (nothing
  applied), the client gets a dropped connection.
* ``"reply_lost"``: the chunk is forwarded, then the Redis side is
  half-closed (FIN after the data: Redis reads and runs the EXEC, then sees
  the end) and the client side closed at once: the transaction is applied
  but its reply never reaches the client. What Redis answered is kept in
  ``swallowed`` (the test checks that the EXEC ran).
* ``"watch_lost"``: not a transaction but a command sent while a key is
  WATCHed: the chunk carrying an ``HMGET`` that contains ``match`` (the
  commit's read of its fence, right after its WATCH) is never forwarded and
  both sockets are closed (redis-py reports that as a WatchError).

Threads, not asyncio: the proxy serves a worker subprocess while the test
thread blocks in ``wait_until``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"
HMGET = b"$5\r\nHMGET\r\n"
MODES = ("exec_lost", "reply_lost", "watch_lost")


class CutProxy:
    """Listens on 127.0.0.1 (an ephemeral port) and forwards to ``upstream_url``'s
    host and port; ``url`` is ``upstream_url`` with the proxy's address."""

    def __init__(self, upstream_url: str, mode: str, match: bytes, cut_at: Iterable[int]):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode, self.match, self.cut_at = mode, match, set(cut_at)
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.url = urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))
        self._lock = threading.Lock()
        #: transactions containing ``match`` seen so far (over all connections)
        self.matched = 0
        #: connections cut so far
        self.cuts = 0
        #: per "reply_lost" cut, what Redis answered (never forwarded)
        self.swallowed: list[bytes] = []
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    # ------------------------------------------------------------ plumbing

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._socks += [client, server]
            conn = _Conn(client, server)
            threading.Thread(target=self._client_to_server, args=(conn,), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(conn,), daemon=True).start()

    def _decide(self, txn: bytes) -> bool:
        """Is this completed transaction (or, "watch_lost", this command) one to
        cut? (counts the matching ones)"""
        if self.match not in txn:
            return False
        with self._lock:
            self.matched += 1
            if self.matched in self.cut_at:
                self.cuts += 1
                return True
        return False

    def _client_to_server(self, conn: _Conn) -> None:
        acc = b""  # the client's bytes from the last MULTI (or a short tail)
        try:
            while True:
                data = conn.client.recv(1 << 16)
                if not data:
                    break
                if self.mode == "watch_lost":
                    if HMGET in data and self._decide(data):
                        break
                    conn.server.sendall(data)
                    continue
                acc += data
                start = acc.rfind(MULTI)
                acc = acc[-len(MULTI):] if start < 0 else acc[start:]
                end = acc.find(EXEC)
                cut = False
                if start >= 0 and end >= 0:
                    txn, acc = acc[:end + len(EXEC)], acc[end + len(EXEC):]
                    cut = self._decide(txn)
                if not cut:
                    conn.server.sendall(data)
                elif self.mode == "exec_lost":
                    conn.close_both()
                    return
                else:
                    conn.swallow = True
                    conn.server.sendall(data)
                    _quiet(conn.server.shutdown, socket.SHUT_WR)  # FIN after the EXEC
                    _quiet(conn.client.shutdown, socket.SHUT_RDWR)
                    _quiet(conn.client.close)
                    return
        except OSError:
            pass
        conn.close_both()

    def _server_to_client(self, conn: _Conn) -> None:
        got = b""
        try:
            while True:
                data = conn.server.recv(1 << 16)
                if not data:
                    break
                if conn.swallow:
                    got += data
                else:
                    conn.client.sendall(data)
        except OSError:
            pass
        if conn.swallow:
            with self._lock:
                self.swallowed.append(got)
        conn.close_both()

    def close(self) -> None:
        self._closed.set()
        _quiet(self._listener.close)
        with self._lock:
            for s in self._socks:
                _quiet(s.close)


class _Conn:
    """One proxied connection: the client's socket, Redis's, and whether
    Redis's replies are swallowed now (a "reply_lost" cut)."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.swallow = False

    def close_both(self) -> None:
        for s in (self.client, self.server):
            _quiet(s.shutdown, socket.SHUT_RDWR)
            _quiet(s.close)


def _quiet(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass
