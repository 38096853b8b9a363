"""Worker configuration: flags over ``LIFTSTREAM_*`` environment variables over
safe defaults (12-factor). One dataclass, so every component reads the same
names; ``add_arguments`` exposes each field as ``--kebab-case`` flag.

Security (``docs/security.md``): Kafka SASL/TLS and Redis AUTH/TLS come from
settings and reach every client through exactly one helper per client kind:

* :func:`kafka_config` -- confluent-kafka (admin, producers, consumers);
* :func:`faust_broker_settings` -- Faust/aiokafka (``broker_credentials``,
  ``producer_max_request_size``, ``broker`` URL);
* :func:`redis_client` -- redis-py (``rediss://`` + CA file, password in the URL;
  ``redis+cluster://host:port,...`` for a Redis Cluster).

Secrets (``kafka_sasl_password``, the password of ``redis_url``) never appear
in ``repr(settings)`` (so not in logs or tracebacks that print settings).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SECRET_FIELDS = frozenset({"kafka_sasl_password", "redis_password", "api_token"})
REDACTED = "***"
#: Largest record any liftstream producer may send (librdkafka ``message.max.bytes``,
#: aiokafka ``max_request_size``); Kafka's own default. Events are limited far
#: lower by validation (``schemas.validate.MAX_EVENT_BYTES``); dead-letter records
#: carry at most ``DEAD_LETTER_MAX_ORIGINAL_BYTES`` of the original, base64-encoded.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@]*:)(?P<pw>[^@/]*)(?P<tail>@)", re.I)


#: librdkafka settings for consumers in a group on Tansu: JoinGroup is held for
#: half the session timeout, so 6 s (Apache Kafka's minimum) means a ~3 s
#: rebalance on Tansu and still works on a real cluster.
CONSUMER_GROUP_CONFIG: dict[str, Any] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}

#: Faust ``App`` settings needed against Tansu (see the module docstring):
#: short session timeout for quick rebalances, and at-least-once processing
#: because aiokafka cannot obtain a producer id from Tansu.
FAUST_BROKER_SETTINGS: dict[str, Any] = {
    "broker_session_timeout": 6.0,
    "broker_heartbeat_interval": 1.0,
    "processing_guarantee": "at_least_once",
}


def redact_url(url: str) -> str:
    """``url`` with the password part of its userinfo replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED + m["tail"], url)


def _bool(s: str) -> bool:
    return s.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    app_id: str = "liftstream"
    topic_events: str = "liftstream.events"
    topic_experiments: str = "liftstream.experiments"
    topic_dirty: str = "liftstream.dirty"
    topic_estimates: str = "liftstream.estimates"
    topic_alerts: str = "liftstream.alerts"
    topic_deadletter: str = "liftstream.dead-letter"
    partitions: int = 6
    replication: int = 1
    # min.insync.replicas of every topic liftstream creates (0: the broker's
    # default); with replication 3, 2 makes an acks=all write survive one node
    topic_min_insync: int = 0
    chains: int = 8
    platform_chains: int = 4  # per metric, for experiments with prior "platform"
    sweeps_per_tick: int = 50
    tick_seconds: float = 1.0
    window_draws: int = 200
    warmup: int = 100
    device: str = "auto"
    auto_register: bool = False
    # events per consume() of the ingest data plane (split by partition): larger
    # batches amortise each owner's call (its reads and one commit per experiment;
    # 500 -> 2000: +20% events per CPU-s, one bench run of the Lua path);
    # batch_seconds bounds the wait for a batch to fill
    batch_size: int = 2000
    batch_seconds: float = 0.2
    # event time (docs/architecture.md#state): a ts more than this ahead of the wall clock is
    # dead-lettered ts_in_future; a partition caught up and without events for
    # idle_seconds advances its clock to the wall clock; metrics without
    # experiment_id that precede every exposure of their unit are held per unit
    max_future_seconds: int = 300
    idle_seconds: float = 30.0
    hold_seconds: int = 86_400
    hold_max: int = 64
    # Redis client: a half-open connection fails a call after this long (then
    # it is retried) instead of hanging it; every ingest call is bounded
    # (FOLD_LIMIT), so well under it
    redis_socket_timeout: float = 15.0
    redis_connect_timeout: float = 5.0
    # /healthz fails when the ingest loop has not come round for this long
    # (stuck, not waiting on Redis: that is /readyz's "ingest stalled")
    liveness_seconds: float = 120.0
    # -- HTTP API exposure (docs/security.md "HTTP API", streams.service.web):
    # a web_host beyond loopback needs api_token (>= 16 bytes of visible ASCII,
    # no CHANGE-ME placeholder) or the worker refuses to start; when set, every
    # route but /healthz and /readyz needs "Authorization: Bearer <token>" (the
    # dashboard: its sign-in cookie), and ?token= is refused. web_allowed_hosts:
    # Host names answered besides localhost/127.0.0.1/[::1] (comma separated,
    # "*" any); empty: a loopback bind answers only those (DNS rebinding), an
    # exposed bind any
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    api_token: str = ""
    web_allowed_hosts: str = ""
    log_level: str = "warning"
    seed: int = 0
    # Faust's data directory (its per-app state); empty: a directory of the
    # system temp dir named after the app id and role
    datadir: str = ""
    # -- security (docs/security.md)
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_ssl_check_hostname: bool = True
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    redis_password: str = ""
    redis_tls_ca: str = ""
    redis_tls_certfile: str = ""
    redis_tls_keyfile: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.kafka_security_protocol = self.kafka_security_protocol.upper()
        self.kafka_sasl_mechanism = self.kafka_sasl_mechanism.upper()
        if self.kafka_security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"kafka_security_protocol must be one of {SECURITY_PROTOCOLS}, "
                             f"not {self.kafka_security_protocol!r}")
        if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"kafka_sasl_mechanism must be one of {SASL_MECHANISMS}, "
                             f"not {self.kafka_sasl_mechanism!r}")
        if self.topic_min_insync > max(1, self.replication):
            raise ValueError(f"topic_min_insync={self.topic_min_insync} exceeds replication="
                             f"{self.replication}: no acks=all write could ever succeed")
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_username:
            raise ValueError(f"kafka_security_protocol={self.kafka_security_protocol} needs "
                             "kafka_sasl_username (and kafka_sasl_password)")
        from schemas.contracts import DEAD_LETTER_MAX_ORIGINAL_BYTES

        floor = 4 * DEAD_LETTER_MAX_ORIGINAL_BYTES // 3 + 4096  # a dead letter must fit
        if self.max_message_bytes < floor:
            raise ValueError(f"max_message_bytes must be >= {floor} (a dead-letter record "
                             f"carries up to {DEAD_LETTER_MAX_ORIGINAL_BYTES} original bytes)")

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            if not f.repr:
                continue
            v = getattr(self, f.name)
            if f.name in SECRET_FIELDS and v:
                v = REDACTED
            elif f.name == "redis_url":
                v = redact_url(v)
            parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    __str__ = __repr__

    def secrets(self) -> list[str]:
        """The secret values set (for tests that check they are never logged)."""
        out = [getattr(self, n) for n in sorted(SECRET_FIELDS) if getattr(self, n)]
        m = _URL_PASSWORD.search(self.redis_url)
        if m and m["pw"]:
            out.append(m["pw"])
        return out

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        kw = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"LIFTSTREAM_{f.name.upper()}")
            if raw is not None:
                kw[f.name] = _convert(f.type, raw)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def topics(self) -> dict[str, dict]:
        """Every topic with its partitions and config (docs/architecture.md#data-flow)."""
        p, r = self.partitions, self.replication
        isr = {"min.insync.replicas": str(self.topic_min_insync)} \
            if self.topic_min_insync > 0 else {}
        compact = {"cleanup.policy": "compact", **isr}
        return {
            self.topic_events: {"partitions": p, "replication": r, "config": dict(isr)},
            self.topic_experiments: {"partitions": 1, "replication": r, "config": compact},
            self.topic_dirty: {"partitions": p, "replication": r, "config": dict(isr)},
            self.topic_estimates: {"partitions": p, "replication": r, "config": dict(compact)},
            self.topic_alerts: {"partitions": 1, "replication": r, "config": dict(isr)},
            self.topic_deadletter: {"partitions": 1, "replication": r, "config": dict(isr)},
        }


# ---------------------------------------------------------------- clients


def kafka_config(s: Settings | Mapping[str, Any] | str, **extra: Any) -> dict[str, Any]:
    """The confluent-kafka (librdkafka) config for ``s``, plus ``extra``.

    The one place settings become a Kafka client config: security protocol,
    SASL, TLS files and the message size limit. A ``Mapping`` (an already built
    config) is copied, a ``str`` is a bare bootstrap list (tests, PLAINTEXT),
    so helpers taking "bootstrap" accept all three.
    """
    if isinstance(s, str):
        return {"bootstrap.servers": s, **extra}
    if isinstance(s, Mapping):
        return {**s, **extra}
    conf: dict[str, Any] = {"bootstrap.servers": s.bootstrap_servers,
                            "security.protocol": s.kafka_security_protocol.lower(),
                            "message.max.bytes": s.max_message_bytes}
    if s.kafka_security_protocol.startswith("SASL"):
        conf.update({"sasl.mechanism": s.kafka_sasl_mechanism,
                     "sasl.username": s.kafka_sasl_username,
                     "sasl.password": s.kafka_sasl_password})
    if s.kafka_security_protocol.endswith("SSL"):
        if s.kafka_ssl_cafile:
            conf["ssl.ca.location"] = s.kafka_ssl_cafile
        if s.kafka_ssl_certfile:
            conf["ssl.certificate.location"] = s.kafka_ssl_certfile
        if s.kafka_ssl_keyfile:
            conf["ssl.key.location"] = s.kafka_ssl_keyfile
        conf["ssl.endpoint.identification.algorithm"] = (
            "https" if s.kafka_ssl_check_hostname else "none")
    conf.update(extra)
    return conf


def kafka_ssl_context(s: Settings):
    """An ``ssl.SSLContext`` for Faust/aiokafka (None without TLS): verifies
    the broker against ``kafka_ssl_cafile`` (else the system CAs), hostname
    checked unless turned off, client certificate when given."""
    if not s.kafka_security_protocol.endswith("SSL"):
        return None
    import ssl

    ctx = ssl.create_default_context(cafile=s.kafka_ssl_cafile or None)
    ctx.check_hostname = s.kafka_ssl_check_hostname
    if s.kafka_ssl_certfile:
        ctx.load_cert_chain(s.kafka_ssl_certfile, s.kafka_ssl_keyfile or None)
    return ctx


def faust_broker_settings(s: Settings) -> dict[str, Any]:
    """``faust.App`` keyword arguments for the broker: URL, credentials, the
    producer's request size limit (same number as librdkafka's, above)."""
    import faust

    proto = s.kafka_security_protocol
    ctx = kafka_ssl_context(s)
    if proto.startswith("SASL"):
        creds: Any = faust.SASLCredentials(username=s.kafka_sasl_username,
                                           password=s.kafka_sasl_password,
                                           ssl_context=ctx, mechanism=s.kafka_sasl_mechanism)
    elif proto == "SSL":
        creds = faust.SSLCredentials(ctx)
    else:
        creds = None
    hosts = [f"kafka://{h.strip()}" for h in s.bootstrap_servers.split(",") if h.strip()]
    return {"broker": hosts, "broker_credentials": creds,
            "producer_max_request_size": s.max_message_bytes}


#: URL schemes of a Redis Cluster (``rediss+cluster``: TLS to every node).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    """``redis+cluster://`` or ``rediss+cluster://``."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_url_parts(url: str) -> tuple[bool, str | None, str | None, list[tuple[str, int]]]:
    """``(tls, username, password, [(host, port), ...])`` of
    ``redis[s]+cluster://[user:password@]host:port[,host:port...]`` (seed
    nodes: the client discovers the rest; port 6379 when left out). A path or
    database number is refused: a cluster has only database 0."""
    from urllib.parse import unquote

    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES or not rest:
        raise ValueError(f"not a Redis Cluster URL: {redact_url(url)!r}")
    user = password = None
    if "@" in rest:
        info, _, rest = rest.rpartition("@")
        u, sep, pw = info.partition(":")
        user, password = unquote(u) or None, unquote(pw) if sep else None
    rest = rest.rstrip("/")
    if "/" in rest or "?" in rest:
        raise ValueError(f"{redact_url(url)!r}: a Redis Cluster URL takes no database, path "
                         "or options (cluster mode has database 0 only)")
    nodes = []
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            host, port = part, "6379"
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"{redact_url(url)!r}: no host:port")
    return scheme.lower().startswith("rediss"), user, password, nodes


def redis_client(s: Settings, **kw: Any):
    """A ``redis.Redis`` for ``s``: the URL (``redis://`` or ``rediss://``, may
    carry ``user:password@``), ``redis_password`` when set, TLS CA/client files.

    ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with
    TLS) gives a ``redis.cluster.RedisCluster`` seeded with those nodes, with
    the same password, timeouts and TLS files: every per-experiment key shares
    the slot of its ``{e:<id>}`` tag (``streams.state.store``)."""
    import redis

    cluster = is_cluster_url(s.redis_url)
    if cluster:
        tls, user, password, nodes = cluster_url_parts(s.redis_url)
        if user:
            kw.setdefault("username", user)
        if password:
            kw.setdefault("password", password)
    if s.redis_password:
        kw.setdefault("password", s.redis_password)
    kw.setdefault("socket_timeout", s.redis_socket_timeout or None)
    kw.setdefault("socket_connect_timeout", s.redis_connect_timeout or None)
    if s.redis_url.lower().startswith("rediss"):
        if cluster:
            kw.setdefault("ssl", True)
        if s.redis_tls_ca:
            kw.setdefault("ssl_ca_certs", s.redis_tls_ca)
        if s.redis_tls_certfile:
            kw.setdefault("ssl_certfile", s.redis_tls_certfile)
            kw.setdefault("ssl_keyfile", s.redis_tls_keyfile or None)
    if cluster:
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **kw)
    return redis.Redis.from_url(s.redis_url, **kw)


def _convert(tp, raw: str):
    t = tp if isinstance(tp, str) else tp.__name__
    if t == "int":
        return int(raw)
    if t == "float":
        return float(raw)
    if t == "bool":
        return _bool(raw)
    return raw


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting; unset flags fall back to env, then defaults."""
    for f in fields(Settings):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else f.type.__name__
        if t == "bool":
            p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction,
                           help=f"env LIFTSTREAM_{f.name.upper()} (default {f.default})")
        else:
            conv = {"int": int, "float": float}.get(t, str)
            p.add_argument(flag, default=None, type=conv,
                           help=f"env LIFTSTREAM_{f.name.upper()} (default {f.default})")


def env_default(name: str, default: Any = None) -> Any:
    """``LIFTSTREAM_<name>`` from the environment, else ``default``: the
    fallback of the command-line flags that are not settings (``worker
    --role``, ``simulate --bootstrap-servers/--topic``, ``bench --device``)."""
    return os.environ.get(f"LIFTSTREAM_{name}", default)


def from_args(args: argparse.Namespace, **more) -> Settings:
    names = {f.name for f in fields(Settings)}
    over = {k: v for k, v in vars(args).items() if k in names}
    over.update(more)
    return Settings.from_env(**over)
