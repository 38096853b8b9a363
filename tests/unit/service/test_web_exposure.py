"""Issue 24, defect 9: a worker refuses to serve its HTTP API on a
non-loopback address without a strong token, and names the setting to fix.

The real ``liftstream worker`` command is run with a Kafka address nothing
listens on: the refusal must come first (before any broker or Redis is
contacted), with an exit status and a message naming ``LIFTSTREAM_API_TOKEN``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streams.config.settings import Settings
from tests.support.paths import REPO


def _worker(*flags: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIFTSTREAM_")}
    clean.update({f"LIFTSTREAM_{k.upper()}": v for k, v in env.items()})
    clean.update(LIFTSTREAM_BOOTSTRAP_SERVERS="127.0.0.1:9", LIFTSTREAM_REDIS_URL=
                 "redis://127.0.0.1:9/0", LIFTSTREAM_REDIS_CONNECT_TIMEOUT="1")
    return subprocess.run([sys.executable, "-m", "streams.cli", "worker", "--role", "sampler",
                           *flags], cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("token", ["", "CHANGE-ME", "change-me-change-me-please", "0123456789abcde",
                                   "a token with spaces in it", "tökén-tökén-tökén-tökén"])
def test_defect9_exposed_bind_without_a_strong_token_refuses_to_start(token):
    try:
        out = _worker("--web-host", "0.0.0.0", api_token=token)
    except subprocess.TimeoutExpired:
        pytest.fail(f"token {token!r}: the worker started on 0.0.0.0 instead of refusing")
    assert out.returncode != 0
    err = out.stderr
    assert "LIFTSTREAM_API_TOKEN" in err and "api_token" in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]  # a clear message, not a crash
    if token and token != "CHANGE-ME":  # the placeholder is named as such
        assert token not in err, "the refused token is echoed"


def test_defect9_weak_token_refused_on_loopback_too():
    """A token that is set must be strong wherever the API listens."""
    out = _worker(api_token="CHANGE-ME")
    assert out.returncode != 0 and "LIFTSTREAM_API_TOKEN" in out.stderr, out.stderr[-2000:]


def test_defect9_exposure_rules():
    from streams.service.web import UnsafeWebSettings, check_exposure

    strong = "x" * 16
    ok = [Settings(), Settings(api_token=strong), Settings(web_host="0.0.0.0", api_token=strong),
          Settings(web_host="::1"), Settings(web_host="localhost"), Settings(web_host="127.0.0.2"),
          Settings(web_host="10.0.0.5", api_token=strong * 4)]
    for s in ok:
        check_exposure(s)
    bad = [Settings(web_host="0.0.0.0"), Settings(web_host="::"), Settings(web_host="10.0.0.5"),
           Settings(web_host="liftstream.internal"),
           Settings(web_host="0.0.0.0", api_token="x" * 15),
           Settings(web_host="0.0.0.0", api_token="CHANGE-ME" * 2),
           Settings(api_token="short")]
    for s in bad:
        with pytest.raises(UnsafeWebSettings, match="LIFTSTREAM_API_TOKEN"):
            check_exposure(s)


def test_defect9_allowed_hosts():
    from streams.service.web import allowed_hosts, host_allowed

    loop = allowed_hosts(Settings())
    assert loop is not None and {"localhost", "127.0.0.1", "::1"} <= loop
    for host in ("127.0.0.1:6066", "LocalHost", "[::1]:6066", "[::1]", "localhost.:80"):
        assert host_allowed(host, loop), host
    for host in ("evil.example", "evil.example:6066", "127.0.0.1.nip.io", "", "[::1",
                 "localhost:notaport", "::1"):
        assert not host_allowed(host, loop), host
    assert allowed_hosts(Settings(web_host="0.0.0.0", api_token="x" * 16)) is None  # any
    extra = allowed_hosts(Settings(web_allowed_hosts="dash.example.com, [fd00::1]"))
    assert host_allowed("dash.example.com:443", extra) and host_allowed("[fd00::1]:1", extra)
    assert host_allowed("localhost", extra) and not host_allowed("evil.example", extra)
    assert allowed_hosts(Settings(web_allowed_hosts="*")) is None
