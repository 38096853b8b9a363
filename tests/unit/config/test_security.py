"""Safe defaults (issue 4): Kafka SASL/TLS and Redis AUTH/TLS from settings,
secrets never logged, message size limits, web API on loopback by default.
See ``docs/security.md``."""

from __future__ import annotations

import time

import pytest

from streams.config.settings import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Settings,
    faust_broker_settings,
    kafka_config,
    redact_url,
)

SECRET = "s3cret-Pa55word"
API_TOKEN = "s3cret-api-t0ken-Pa55word"  # >= 16 bytes (streams.service.web.MIN_TOKEN_BYTES)


def test_defaults_are_safe():
    s = Settings.from_env({})
    assert s.web_host == "127.0.0.1"  # the HTTP API is not reachable from outside
    assert s.kafka_security_protocol == "PLAINTEXT" and not s.kafka_sasl_password
    assert s.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    conf = kafka_config(s)
    assert conf["message.max.bytes"] == DEFAULT_MAX_MESSAGE_BYTES
    assert not any(k.startswith(("sasl.", "ssl.")) for k in conf)


def test_web_binds_loopback_by_default():
    from streams.service.app import create_app

    app = create_app(Settings.from_env({}), role="ingest")
    assert app.conf.web_bind == "127.0.0.1" and app.conf.web_host == "127.0.0.1"


def test_env_reaches_kafka_and_faust_configs():
    env = {"LIFTSTREAM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
           "LIFTSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "LIFTSTREAM_KAFKA_SASL_USERNAME": "svc", "LIFTSTREAM_KAFKA_SASL_PASSWORD": SECRET,
           "LIFTSTREAM_BOOTSTRAP_SERVERS": "k1:9093,k2:9093",
           "LIFTSTREAM_MAX_MESSAGE_BYTES": "2000000"}
    s = Settings.from_env(env)
    conf = kafka_config(s, **{"group.id": "g"})
    assert conf["security.protocol"] == "sasl_ssl" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "svc" and conf["sasl.password"] == SECRET
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    assert conf["message.max.bytes"] == 2_000_000 and conf["group.id"] == "g"
    # librdkafka accepts it (unknown or ill-typed keys raise here)
    from confluent_kafka.admin import AdminClient

    AdminClient({k: v for k, v in conf.items() if k != "group.id"})

    import faust

    fb = faust_broker_settings(s)
    creds = fb["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "svc" and creds.password == SECRET
    assert str(creds.mechanism.value if hasattr(creds.mechanism, "value") else
               creds.mechanism) == "SCRAM-SHA-512"
    assert creds.ssl_context is not None and creds.ssl_context.check_hostname
    assert fb["producer_max_request_size"] == conf["message.max.bytes"]
    assert fb["broker"] == ["kafka://k1:9093", "kafka://k2:9093"]
    # plain SSL: an SSL credential; PLAINTEXT: none
    ssl_only = faust_broker_settings(Settings.from_env(
        {"LIFTSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL"}))
    assert isinstance(ssl_only["broker_credentials"], faust.SSLCredentials)
    assert faust_broker_settings(Settings.from_env({}))["broker_credentials"] is None


@pytest.mark.parametrize("bad", [{"kafka_security_protocol": "TLS"},
                                 {"kafka_sasl_mechanism": "GSSAPI"},
                                 {"kafka_security_protocol": "SASL_SSL"},  # no username
                                 {"max_message_bytes": 1000}])
def test_invalid_security_settings_rejected(bad):
    with pytest.raises(ValueError):
        Settings.from_env({}, **bad)


def test_repr_redacts_secrets():
    s = Settings.from_env({}, redis_url=f"rediss://app:{SECRET}@redis:6380/0",
                          kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc",
                          kafka_sasl_password=SECRET, redis_password=SECRET)
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        assert SECRET not in text, text
    assert "rediss://app:***@redis:6380/0" in repr(s) and "svc" in repr(s)
    assert set(s.secrets()) == {SECRET}
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_redis_client_tls_and_password():
    from streams.config.settings import redis_client

    s = Settings.from_env({}, redis_url="rediss://h:6380/0", redis_tls_ca="/etc/ca.pem",
                          redis_password=SECRET)
    kw = redis_client(s).connection_pool.connection_kwargs
    assert kw["ssl_ca_certs"] == "/etc/ca.pem" and kw["password"] == SECRET
    plain = redis_client(Settings.from_env({}, redis_url=f"redis://u:{SECRET}@h:1/0"))
    assert plain.connection_pool.connection_kwargs["password"] == SECRET


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_worker_log_has_no_secrets(kafka_bootstrap, redis_url, tmp_path):
    """A worker whose Redis URL carries a password (a Redis ACL user made for
    the test) and whose settings hold a Kafka SASL password, at debug level,
    ingesting events: its log has neither secret (but has its redacted settings)."""
    import redis

    from streams.dev.simulate import make_traffic
    from tests.support.streaming_harness import (
        Workers,
        events_counted,
        make_stack,
        produce,
        wait_until,
    )

    admin = redis.Redis.from_url(redis_url)
    user = "liftstream-secret-test"
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{SECRET}", "~*", "&*",
                          "+@all")
    ws = Workers()
    try:
        url = redis_url.replace("redis://", f"redis://{user}:{SECRET}@", 1)
        st = make_stack(kafka_bootstrap, redis_url, tmp_path, "secrets", partitions=1,
                        log_level="debug")
        st.redis_url = url
        st.settings["kafka_sasl_password"] = SECRET  # PLAINTEXT: set, unused, never shown
        st.create_topics()
        start = (int(time.time() * 1000) // 86_400_000 - 30) * 86_400_000
        cfg, evs, _ = make_traffic(100, 4, "sec", seed=1, window_seconds=86_400,
                                   started_at=start)
        st.register([cfg])
        w = ws.start(st, "ingest")
        produce(st.bootstrap, st.events_topic, evs)
        wait_until(lambda: events_counted(admin, ["sec"]) >= len(evs), 90, "events applied",
                   workers=[w])
        w.stop()
        log = w.log_path.read_text(errors="replace")
        assert "***" in log and "Settings(" in log, log[-2000:]
        assert SECRET not in log
    finally:
        ws.close()
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_api_token_guards_every_route_but_the_probes(kafka_bootstrap, redis_url, tmp_path):
    """With LIFTSTREAM_API_TOKEN set, a real worker's HTTP API answers 401
    without the token, 200 with it as a bearer token, 400 for ``?token=``
    (never in a URL: issue 24, defect 9); the probes and the static dashboard
    page answer without it; the token never reaches the log."""
    from streams.dev.embedded import free_port
    from tests.support.streaming_harness import WebWorker, Workers, make_stack, wait_until

    st = make_stack(kafka_bootstrap, redis_url, tmp_path, "tok", partitions=1)
    st.create_topics()
    ws = Workers()
    try:
        w = WebWorker(st, "sampler", free_port(), api_token=API_TOKEN)
        ws.all.append(w)
        w.start()
        wait_until(lambda: w.request("/healthz")[0] == 200, 90, "the web server", workers=[w])
        assert w.request("/readyz")[0] == 200
        assert w.request("/")[0] == 200  # the page is static: it signs in with a form
        for path in ("/metrics", "/experiments", "/experiments/x/estimates",
                     "/experiments/x/history?metric=m&variant=v", "/experiments/x/alerts"):
            sep = "&" if "?" in path else "?"
            assert w.request(path)[0] == 401, path
            assert w.request(path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
            assert w.request(f"{path}{sep}token={API_TOKEN}")[0] == 400, path
            assert w.request(path, headers={"Authorization": f"Bearer {API_TOKEN}"})[0] == 200
        assert API_TOKEN not in w.log_tail(200_000)
    finally:
        ws.close()
