"""Issue 24, defect 9: the HTTP API is never reachable without its token, and
the token never travels in a URL.

One real ``role=sampler`` worker (its web server on a free loopback port, an
``api_token`` set) answers raw HTTP requests, so the tests control every byte
of the Host and Authorization headers:

* ``?token=`` is refused (400) on every route, even with the right token; the
  token is accepted only as ``Authorization: Bearer``;
* a non-UTF-8 ``Authorization`` header answers 401, not 500;
* on the loopback bind, a Host other than localhost / 127.0.0.1 / [::1] (DNS
  rebinding) answers 403, even with the token;
* the pages (the overview ``/``, ``/experiment``) sign in with ``POST /login``:
  an ``HttpOnly; SameSite=Strict`` cookie that is not the token itself opens
  the API to them (and each does so in headless Chromium, when installed);
* ``/history`` reads only the series asked for, at most ``limit`` points.

The refusal to start on an exposed bind without a strong token is in
``tests/unit/service/test_web_exposure.py``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket

import numpy as np
import pytest
import redis

from streams.sampling.advance import StoredChains, TickConfig
from streams.sampling.sampler import SamplerService
from streams.state.registry import Registry
from tests.support.browser import chromium, open_page
from tests.support.streaming_harness import WebWorker, make_stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOKEN = "tok-9f2c61d0a4b7e8335c1e"  # >= 16 bytes, visible ASCII
GUARDED = ("/metrics", "/experiments", "/experiments/x", "/experiments/x/estimates",
           "/experiments/x/history?metric=value&variant=treatment", "/experiments/x/alerts")
BEARER = [(b"Authorization", f"Bearer {TOKEN}".encode())]


@pytest.fixture(scope="module")
def web(kafka_service, redis_service, tmp_path_factory):
    """One worker with the token for the whole module (a start costs seconds)."""
    from streams.dev.embedded import free_port

    r = redis.Redis.from_url(redis_service.url)
    r.flushall()  # no experiment left by another module: the page says "no experiments yet"
    r.close()
    st = make_stack(kafka_service.url, redis_service.url, tmp_path_factory.mktemp("web"), "web",
                    partitions=1)
    st.create_topics()
    w = WebWorker(st, "sampler", free_port(), api_token=TOKEN)
    w.start()
    try:
        wait_until(lambda: w.request("/healthz")[0] == 200, 90, "the web server", workers=[w])
        yield w
    finally:
        w.kill9()
    assert TOKEN not in w.log_tail(1_000_000)


def raw(w: WebWorker, path: str, headers: list[tuple[bytes, bytes]] = (), *,
        method: bytes = b"GET", host: bytes | None = None, body: bytes = b""
        ) -> tuple[int, http.client.HTTPMessage, bytes]:
    """(status, headers, body) of one request written byte for byte."""
    host = f"127.0.0.1:{w.port}".encode() if host is None else host
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: " + host,
             b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    lines += [k + b": " + v for k, v in headers]
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, resp.headers, resp.read()


def test_defect9_token_only_in_the_authorization_header(web):
    assert raw(web, "/healthz")[0] == 200 and raw(web, "/readyz")[0] == 200  # the probes
    for path in GUARDED:
        sep = "&" if "?" in path else "?"
        assert raw(web, path)[0] == 401, path
        ok = raw(web, path, BEARER)[0]
        assert ok in (200, 404), (path, ok)  # /experiments/x: unknown, but authorized
        status, _, body = raw(web, f"{path}{sep}token={TOKEN}")
        assert status == 400, (path, status)  # even the right token: never in a URL
        assert b"Authorization" in body, body
        # and not with the header either: the URL is what leaks (history, proxy logs)
        assert raw(web, f"{path}{sep}token={TOKEN}", BEARER)[0] == 400, path
    for page in ("/", "/experiment"):  # the pages' old way in
        assert raw(web, f"{page}?token={TOKEN}")[0] == 400, page


def test_defect9_non_utf8_authorization_is_401(web):
    for value in (b"Bearer \xff\xfe" + TOKEN.encode(), b"Bearer \xc3(", b"\xff", b"Bearer "):
        status, headers, _ = raw(web, "/experiments", [(b"Authorization", value)])
        assert status == 401, (value, status)
        assert headers["WWW-Authenticate"].startswith("Bearer"), headers
    # a bad session cookie too
    assert raw(web, "/experiments", [(b"Cookie", b"liftstream_session=\xff\xfe")])[0] == 401


def test_defect9_host_allow_list_on_loopback(web):
    p = str(web.port).encode()
    for host in (b"127.0.0.1:" + p, b"localhost:" + p, b"LOCALHOST", b"[::1]:" + p,
                 b"localhost.:" + p):
        assert raw(web, "/experiments", BEARER, host=host)[0] == 200, host
    for host in (b"attacker.example:" + p, b"attacker.example", b"127.0.0.1.nip.io:" + p,
                 b"localhost.attacker.example", b"\xff\xfe:" + p, b""):
        status, _, body = raw(web, "/experiments", BEARER, host=host)
        assert status == 403, (host, status)
        assert b"host" in body.lower(), body
        for page in ("/", "/experiment"):  # the pages too
            assert raw(web, page, host=host)[0] == 403, (host, page)
    # the probes answer whatever the Host (an orchestrator's, on a pod IP)
    assert raw(web, "/healthz", host=b"10.1.2.3:" + p)[0] == 200


def test_defect9_dashboard_login_sets_an_httponly_strict_cookie(web):
    for path in ("/", "/experiment"):  # the pages hold no data: they load without a token
        status, _, page = raw(web, path)
        assert status == 200 and b'id="login"' in page, path
        assert re.search(rb'(get|set)\("token"', page) is None, path  # no token from/into a URL
    login = [(b"Content-Type", b"application/json")]
    for bad in (b'{"token": "wrong-wrong-wrong-wrong"}', b"{}", b"not json", b'{"token": 3}'):
        status, headers, _ = raw(web, "/login", login, method=b"POST", body=bad)
        assert status in (400, 401) and "Set-Cookie" not in headers, (bad, status)
    # a form post from another site (no JSON content type) cannot sign in
    form = [(b"Content-Type", b"application/x-www-form-urlencoded")]
    assert raw(web, "/login", form, method=b"POST", body=f"token={TOKEN}".encode())[0] == 415
    status, headers, _ = raw(web, "/login", login, method=b"POST",
                             body=json.dumps({"token": TOKEN}).encode())
    assert status == 200, status
    cookie = headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path"} <= attrs, cookie
    assert "samesite=strict" in cookie.lower().replace(" ", ""), cookie
    pair = cookie.split(";")[0]
    name, value = pair.split("=", 1)
    assert TOKEN not in value and len(value) >= 32, pair  # a derived value, not the token
    cookie_hdr = [(b"Cookie", pair.encode())]
    assert raw(web, "/experiments", cookie_hdr)[0] == 200
    assert raw(web, "/experiments", [(b"Cookie", f"{name}={value[:-1]}0".encode())])[0] == 401
    # signing out clears it
    status, headers, _ = raw(web, "/logout", cookie_hdr, method=b"POST")
    assert status == 200 and "max-age=0" in headers["Set-Cookie"].lower().replace(" ", "")


#: what each page shows once signed in: its experiment loaded (the overview's
#: row; the experiment page's estimate, read with the cookie through
#: /history?metric=&variant=)
SIGNED_IN = {"/": 'document.getElementById("ov-signin9") !== null',
             "/experiment?experiment=signin9":
                 'document.getElementById("experiment").value === "signin9" && '
                 'document.getElementById("waiting").textContent.includes("waiting for data")'}


@pytest.mark.parametrize("path", sorted(SIGNED_IN))
def test_defect9_pages_sign_in_in_chromium(web, path):
    """Each page (the overview, an experiment's) as a person uses it: it asks
    for the token on the API's 401, a wrong one is refused, the right one
    loads the page; the token is in no URL and the session cookie is out of
    the page scripts' reach (HttpOnly)."""
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; "
                    ".ci/run does this)")
    from schemas.records import ExperimentConfig

    web.stack.register([ExperimentConfig(experiment_id="signin9", started_at=1_700_000_000_000)])
    # the sampler's first estimate of it (prior draws: the pages say they wait for data)
    wait_until(lambda: json.loads(raw(web, "/experiments/signin9/estimates", BEARER)[2])
               ["estimates"], 60, "an estimate of signin9", workers=[web], interval=0.3)
    status = 'document.getElementById("status").textContent'
    form = 'document.getElementById("login")'

    async def drive(page):
        await page.wait_for(f'!{form}.hidden && {status}.includes("sign in")')
        for token, expect in (("wrong-token-wrong-token", "wrong token"), (TOKEN, None)):
            await page.evaluate(f'document.getElementById("token").value = {json.dumps(token)};'
                                f'{form}.requestSubmit(); true')
            if expect:
                await page.wait_for(f'!{form}.hidden && {status} === "{expect}"')
        await page.wait_for(f'{form}.hidden && document.body.dataset.ready === "1" && '
                            f'{status}.startsWith("updated") && ({SIGNED_IN[path]})')
        return await page.evaluate('({cookie: document.cookie, href: location.href, '
                                   'field: document.getElementById("token").value})')

    got = asyncio.run(open_page(web.url(path), drive))
    assert got == {"cookie": "", "href": web.url(path), "field": ""}, got


def _store_history(url: str, eid: str, names: list[tuple[str, str]], ticks: int) -> None:
    """Estimates and history of ``eid`` written the way the sampler writes them."""
    from schemas.records import ExperimentConfig, MetricSpec

    r = redis.Redis.from_url(url)
    reg = Registry(r)
    metrics = tuple(MetricSpec(m) for m in sorted({m for m, _ in names}))
    reg.put(ExperimentConfig(experiment_id=eid, metrics=metrics,
                             variants=("control", "treatment", "treatment_b")))
    svc = SamplerService(r, reg, TickConfig())
    svc.load([eid])  # the sampler writes only into a registered experiment it loaded
    for i in range(1, ticks + 1):
        chains = {(eid, m): StoredChains({"iteration": np.array(i)}, None)
                  for m in {m for m, _ in names}}
        recs = [{"experiment_id": eid, "metric": m, "variant": v, "computed_at": 1_700_000_000_000
                 + i, "watermark": {"event_time": 1_700_000_000 + i},
                 "adjusted": {"effect": {"mean": 0.1, "lo": 0.0, "hi": 0.2}},
                 "naive": {"effect": {"mean": 0.1, "lo": 0.0, "hi": 0.2}},
                 "diagnostics": {"rhat": 1.0, "iteration": i}} for m, v in names]
        assert len(svc.store(chains, recs)) == len(names)
    r.close()


def _lranges(url: str) -> int:
    r = redis.Redis.from_url(url)
    try:
        return int(r.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))
    finally:
        r.close()


def test_defect9_history_only_the_series_asked_for(web, redis_service):
    eid = "hist9"
    names = [("value", "treatment"), ("value", "treatment_b"), ("revenue", "treatment"),
             ("revenue", "treatment_b")]
    _store_history(redis_service.url, eid, names, ticks=12)
    base = f"/experiments/{eid}/history"
    before = _lranges(redis_service.url)
    status, _, body = raw(web, f"{base}?metric=revenue&variant=treatment_b&limit=5", BEARER)
    assert status == 200, body
    assert _lranges(redis_service.url) - before == 1  # one series read, not four
    out = json.loads(body)
    assert (out["experiment_id"], out["metric"], out["variant"]) == (
        eid, "revenue", "treatment_b")
    assert [p["iteration"] for p in out["history"]] == [8, 9, 10, 11, 12]  # last 5, oldest first
    status, _, body = raw(web, f"{base}?metric=value&variant=treatment", BEARER)
    assert status == 200 and len(json.loads(body)["history"]) == 12
    # every series, or an unbounded one, is no longer on offer
    for query in ("", "?metric=value", "?variant=treatment", "?metric=value&variant=treatment"
                  "&limit=100000", "?metric=value&variant=treatment&limit=0",
                  "?metric=value&variant=treatment&limit=x", "?metric=..&variant=treatment"):
        status, _, body = raw(web, base + query, BEARER)
        assert status == 400, (query, status, body[:200])


def test_defect_readyz_shows_what_ingest_lost(web):
    """Offsets that retention deleted before ingest applied them and metrics
    without experiment_id that no exposure routed are data loss outside any
    experiment: /readyz (open to the orchestrator and to whoever checks a
    worker) shows them per events partition, and stays 200 (the loss is past
    and permanent: taking the worker out would not undo it); /experiments
    (the overview page's data) carries them as well."""
    from streams.state.keys import RETENTION_LOST, UNROUTED_LOST

    r = redis.Redis.from_url(web.stack.redis_url)
    topic = web.stack.events_topic
    try:
        r.hset(RETENTION_LOST, f"{topic}|0", 5)
        r.hset(UNROUTED_LOST, f"{topic}|0", 2)
        r.hset(RETENTION_LOST, "another.topic|0", 7)  # not this worker's events topic
        status, _, body = raw(web, "/readyz")
        assert status == 200, body
        assert json.loads(body)["ingest_losses"] == {"retention_lost": {"0": 5},
                                                      "unrouted_lost": {"0": 2}}, body
        text = raw(web, "/metrics", BEARER)[2].decode()
        assert 'liftstream_ingest_unrouted_lost_total{partition="0"} 2' in text
        # the overview page's data carries them too, with what each kind counts
        status, _, body = raw(web, "/experiments", BEARER)
        out = json.loads(body)
        assert status == 200 and out["ingest_losses"] == {"retention_lost": {"0": 5},
                                                          "unrouted_lost": {"0": 2}}, body
        assert sorted(out["ingest_loss_kinds"]) == ["retention_lost", "unrouted_lost"], body
    finally:
        r.delete(RETENTION_LOST, UNROUTED_LOST)
        r.close()
