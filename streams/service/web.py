"""HTTP API on Faust's web server (bound to loopback by default).

Read-only views of the Redis read model: experiments, their latest
estimates and history, health. Blocking Redis calls run on a thread.

Routes (``register_pages``):

* ``GET /`` -- the overview of every experiment (``static/overview.html``);
* ``GET /experiment?experiment=<id>`` -- one experiment's page
  (``static/dashboard.html``; without ``experiment``: the most recently active).
  Both pages are static and hold no data: they sign in through ``/login``
  when the API asks for the token (401);
* ``POST /login`` -- ``{"token": ...}`` (JSON only): sets the pages' session
  cookie (``HttpOnly; SameSite=Strict``, a value derived from the token,
  never the token); ``POST /logout`` clears it;
* ``GET /healthz`` -- liveness: 200 ``{"status": "ok"}``, or 503 ``stuck`` when
  a loop of this worker has not come round for ``settings.liveness_seconds``;
* ``GET /readyz`` -- readiness: 503 while Redis does not answer, the events
  consumer is not running or ingest is stalled; else 200 ``ready`` (with the
  owned ``events_partitions`` in the ingest role); every answer after Redis
  answered carries ``ingest_losses`` (``store.ingest_losses``: what ingest
  lost outside any experiment, per events partition: ``retention_lost``,
  ``unrouted_lost``): a loss in the past is no reason to take a worker out
  of service (it would stay out: the counts are permanent), but whoever
  looks at the worker's health sees it;
* ``GET /metrics`` -- Prometheus text format (``streams.service.metrics``);
* ``GET /experiments`` -- ``{"experiments": [id, ...], "overview": [...],
  "ingest_losses": ..., "ingest_loss_kinds": ...}``: the ids, each
  experiment's summary, most recently active first, and what ingest lost
  outside any experiment (as in ``/readyz``) with what each kind counts
  (``streams.service.overview``);
* ``GET /experiments/{id}`` -- the config, its ``lifecycle`` and ``truth``
  (a simulator's, else null), its ``overview`` entry and the ``readings``
  of its estimates (what the page may show); 404 unknown, 400 a bad id;
* ``GET /experiments/{id}/estimates``, ``/alerts`` -- the latest estimate
  records, the recent alerts;
* ``GET /experiments/{id}/history?metric=&variant=[&limit=]`` -- one series'
  last ``limit`` (at most ``MAX_HISTORY_POINTS``) points.

Exposure (docs/security.md "HTTP API"), checked in this order on every route
but the probes (``/healthz``, ``/readyz``, open to an orchestrator):

1. the Host header must be allowed (``allowed_hosts``: on a loopback bind only
   localhost, 127.0.0.1 and [::1], against DNS rebinding), else 403;
2. a ``token`` query parameter is refused (400): the token never goes in a URL
   (browser history, proxy logs);
3. with ``settings.api_token`` set, the data routes need ``Authorization:
   Bearer <token>`` or the pages' session cookie, else 401.

``check_exposure`` (run by ``streams.service.worker.run_worker`` before anything
else) refuses to serve on a non-loopback address without a strong token.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.codec import loads
from schemas.validate import experiment_to_dict, is_valid_name
from streams.alerts.store import recent as recent_alerts
from streams.config.settings import Settings
from streams.sampling.sampler import read_estimates, read_history, read_lifecycle
from streams.service.context import AppContext
from streams.service.overview import (
    INGEST_LOSS_KINDS,
    read_ingest_losses,
    read_overview,
    reading,
)
from streams.state.keys import truth_key

if TYPE_CHECKING:
    import faust

DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"
OVERVIEW = Path(__file__).with_name("static") / "overview.html"
#: the pages' one fetch helper and sign-in form handler (no data: served open)
SIGNIN_JS = Path(__file__).with_name("static") / "signin.js"

#: Shortest ``api_token`` accepted (bytes): 16 random bytes resist guessing.
MIN_TOKEN_BYTES = 16
#: Placeholders shipped in examples; a token containing one is refused.
PLACEHOLDER_TOKENS = ("change-me", "changeme")
#: Host names that always reach a loopback bind (never a rebinding target).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
#: The dashboard's session cookie (``POST /login``).
SESSION_COOKIE = "liftstream_session"
#: Most points one ``/history`` request returns (the dashboard asks for these).
MAX_HISTORY_POINTS = 500
_TOKEN_ENV = "LIFTSTREAM_API_TOKEN"


class UnsafeWebSettings(ValueError):
    """The HTTP API's settings would expose it: the worker must not start."""


def is_loopback(host: str) -> bool:
    """``host`` (a bind address or name) is reachable only from this machine.
    A name other than ``localhost`` counts as exposed: it may resolve to anything."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_problem(token: str) -> str | None:
    """Why ``token`` is too weak to guard the API, or None. Visible ASCII only:
    a Bearer header carries nothing else reliably."""
    if not token:
        return "is not set"
    if any(p in token.lower() for p in PLACEHOLDER_TOKENS):
        return "is a placeholder (CHANGE-ME)"
    if not all("!" <= c <= "~" for c in token):
        return "has characters other than visible ASCII (no spaces)"
    if len(token.encode()) < MIN_TOKEN_BYTES:
        return f"is shorter than {MIN_TOKEN_BYTES} bytes"
    return None


def check_exposure(settings: Settings) -> None:
    """Refuse settings that would expose the API: a token that is set must be
    strong wherever the API listens; a non-loopback ``web_host`` needs one.

    :raises UnsafeWebSettings: naming the setting and its variable (never the
        token's value).
    """
    token = settings.api_token
    exposed = not is_loopback(settings.web_host)
    if not token and not exposed:
        return
    problem = token_problem(token)
    if problem is None:
        return
    where = (f"the HTTP API would listen on {settings.web_host}:{settings.web_port}, "
             "beyond loopback, and" if exposed else "the HTTP API's")
    raise UnsafeWebSettings(
        f"refusing to start: {where} api_token ({_TOKEN_ENV}, --api-token) {problem}. "
        f"Set {_TOKEN_ENV} to a random string of at least {MIN_TOKEN_BYTES} bytes "
        "(e.g. `openssl rand -hex 32`), or keep LIFTSTREAM_WEB_HOST on 127.0.0.1, "
        "or run the worker --without-web (docs/security.md)")


def _host_name(value: str) -> str | None:
    """The host part of a Host header (``name[:port]``, ``[v6][:port]``),
    lower case without a trailing dot; None when it is malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
    else:
        name, sep, port = value.rpartition(":")
        if not sep:
            name = port
        elif not port.isdigit():
            return None
    name = name.rstrip(".").lower()
    return name or None


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The Host names the API answers (None: any). ``web_allowed_hosts``
    (comma separated, ``*`` for any) adds to the loopback names; left empty, a
    loopback bind answers only those (DNS rebinding) and an exposed bind, which
    has a token (``check_exposure``), any."""
    extra = {h.strip() for h in settings.web_allowed_hosts.split(",") if h.strip()}
    if "*" in extra or (not extra and not is_loopback(settings.web_host)):
        return None
    return LOOPBACK_HOSTS | {n for n in map(_host_name, extra) if n}


def host_allowed(value: str, allowed: frozenset[str] | None) -> bool:
    """The Host header ``value`` names one of ``allowed`` (any port)."""
    return allowed is None or _host_name(value) in allowed


def session_value(token: str) -> str:
    """The dashboard's cookie value: derived from the token (a leaked cookie
    does not give the token away; rotating the token ends every session)."""
    return hmac.new(token.encode(), b"liftstream dashboard session v1", hashlib.sha256).hexdigest()


def _ascii(value: str) -> bytes | None:
    """``value`` as bytes when it is ASCII (headers arrive decoded with
    surrogate escapes: anything else is no credential), else None."""
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        return None


def authorized(request, token: str) -> bool:
    """No token configured, or the request carries it: ``Authorization:
    Bearer <token>``, or the dashboard's session cookie. Compared in constant
    time; a header that is not ASCII is simply not the token."""
    if not token:
        return True
    scheme, _, got = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        raw = _ascii(got.strip())
        return raw is not None and hmac.compare_digest(raw, token.encode())
    cookie = _ascii(request.cookies.get(SESSION_COOKIE, ""))
    return bool(cookie) and hmac.compare_digest(cookie, session_value(token).encode())


def _refusal(request, token: str, hosts: frozenset[str] | None, guarded: bool
             ) -> tuple[int, str] | None:
    """(status, error) when the request must be refused (module docstring), else None."""
    if not host_allowed(request.headers.get("Host", ""), hosts):
        return 403, ("host not allowed: this API answers only the names in "
                     "LIFTSTREAM_WEB_ALLOWED_HOSTS (on loopback: localhost, 127.0.0.1, [::1])")
    if "token" in request.query:
        return 400, ("the API token goes in the Authorization header (Bearer), never in the "
                     "URL; the dashboard signs in with its form")
    if guarded and not authorized(request, token):
        return 401, "unauthorized"
    return None


def stuck_loops(now: float, beats: dict[str, float], limit: float) -> list[str]:
    """The worker's loops (ingest, sampler) whose last round (time.monotonic()
    in ``beats``) is more than ``limit`` seconds ago; none if ``limit`` is 0."""
    if not limit:
        return []
    return [f"{name} loop: no round for {now - t:.0f} s" for name, t in sorted(beats.items())
            if now - t > limit]


def register_pages(app: faust.App, ctx: AppContext) -> None:
    """Add the HTTP routes (module docstring) to ``app``; they read ``ctx``
    (settings, Redis, registry, metrics, the events plane, the loops' beats).

    :param app: the worker's Faust app (its web server serves them).
    :param ctx: the app's context (``create_app``).
    """
    r, registry = ctx.redis, ctx.registry
    # the API's Redis reads run on threads of their own, so a burst of
    # requests never queues behind (or ahead of) the workers' own Redis calls
    pool = ThreadPoolExecutor(4, thread_name_prefix="web")

    async def call(fn, *a):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *a)

    token = ctx.settings.api_token
    hosts = allowed_hosts(ctx.settings)

    def page(path: str, open_: bool = False, probe: bool = False, method: str = "get"):
        """``app.page`` behind the checks of the module docstring: the Host,
        no token in the query, then the token unless ``open_``; a ``probe``
        skips them all. ``method``: the HTTP method the handler serves."""
        def wrap(handler):
            if probe:
                return app.page(path)(handler)

            @functools.wraps(handler)
            async def checked(web, request, **kw):
                refused = _refusal(request, token, hosts, guarded=not open_)
                if refused is not None:
                    status, error = refused
                    headers = {"WWW-Authenticate": 'Bearer realm="liftstream"'} \
                        if status == 401 else None
                    return web.json({"error": error}, status=status, headers=headers)
                return await handler(web, request, **kw)

            if method == "get":
                return app.page(path)(checked)
            from faust.web import View

            return app.page(path)(type(handler.__name__, (View,), {
                method: checked, "__doc__": handler.__doc__, "__module__": __name__}))
        return wrap

    #: the pages are static, no data: they ask for the token (POST /login) when the API does
    page_headers = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store"}

    @page("/", open_=True)
    async def overview_page(web, request):
        return web.html(OVERVIEW.read_text(), headers=page_headers)

    @page("/experiment", open_=True)
    async def dashboard(web, request):
        return web.html(DASHBOARD.read_text(), headers=page_headers)

    @page("/signin.js", open_=True)
    async def signin_js(web, request):
        return web.bytes(SIGNIN_JS.read_bytes(), content_type="text/javascript",
                         headers=page_headers)

    @page("/login", open_=True, method="post")
    async def login(web, request):
        """Check ``{"token": ...}`` and set the dashboard's session cookie.
        JSON only: a cross-site HTML form cannot post it without a preflight."""
        if request.content_type != "application/json":
            return web.json({"error": "send {\"token\": ...} as application/json"},
                            status=415)
        try:
            body = loads(await request.read())
        except Exception:  # noqa: BLE001 - any unparsable body is the caller's error
            body = None
        given = body.get("token") if isinstance(body, dict) else None
        if not isinstance(given, str):
            return web.json({"error": "send {\"token\": ...}"}, status=400)
        if not token:
            return web.json({"status": "no token needed"})
        raw = _ascii(given)
        if raw is None or not hmac.compare_digest(raw, token.encode()):
            return web.json({"error": "unauthorized"}, status=401)
        cookie = f"{SESSION_COOKIE}={session_value(token)}; Path=/; HttpOnly; SameSite=Strict"
        return web.json({"status": "signed in"}, headers={"Set-Cookie": cookie})

    @page("/logout", open_=True, method="post")
    async def logout(web, request):
        """Clear the dashboard's session cookie."""
        cookie = f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        return web.json({"status": "signed out"}, headers={"Set-Cookie": cookie})

    @page("/healthz", probe=True)
    async def healthz(web, request):
        stuck = stuck_loops(time.monotonic(), ctx.beats(), ctx.settings.liveness_seconds)
        if stuck:  # a loop has not come round: restart me
            return web.json({"status": "stuck", "error": "; ".join(stuck)}, status=503)
        return web.json({"status": "ok"})

    @page("/metrics")
    async def metrics_page(web, request):
        m = ctx.metrics
        now = time.time()
        for part, n in (await losses())["unrouted_lost"].items():  # every worker's, from Redis
            m.set("liftstream_ingest_unrouted_lost_total", n, partition=part)
        for (e, met, v), rec in list(ctx.latest.items()):
            m.set("liftstream_estimate_age_seconds", now - rec["computed_at"] / 1000,
                  experiment=e, metric=met, variant=v)
        plane = ctx.plane
        if plane is not None:
            topic = ctx.settings.topic_events
            for part, lag in plane.lag().items():
                m.set("liftstream_consumer_lag_messages", lag, topic=topic, partition=str(part))
            m.set("liftstream_ingest_partitions_owned", len(plane.owned()))
            stalled = plane.status.stalled
            for reason in ("redis_oom", "redis_readonly", "redis_loading", "redis_busy",
                           "redis_unavailable"):
                m.set("liftstream_ingest_stalled", 1 if stalled and stalled[0] == reason else 0,
                      reason=reason)
        return web.text(m.render(), content_type="text/plain; version=0.0.4")

    async def losses() -> dict[str, dict[str, int]]:
        """``ingest_losses`` of the events topic, partitions as JSON keys."""
        return await call(read_ingest_losses, r, ctx.settings.topic_events)

    @page("/readyz", probe=True)
    async def readyz(web, request):
        try:
            await call(r.ping)
            lost = await losses()
        except Exception as e:  # noqa: BLE001
            return web.json({"status": "redis unavailable", "error": str(e)}, status=503)
        plane = ctx.plane
        if plane is not None:  # the ingest role: its events consumer must be running
            if not plane.alive:
                return web.json({"status": "events consumer not running",
                                 "error": plane.status.error, "ingest_losses": lost},
                                 status=503)
            stalled = plane.status.stalled
            if stalled is not None:  # e.g. Redis out of memory: batches wait, none is lost
                return web.json({"status": "ingest stalled", "reason": stalled[0],
                                 "error": stalled[1], "ingest_losses": lost}, status=503)
            # a worker beyond the partition count owns none and is still ready
            return web.json({"status": "ready", "events_partitions": sorted(plane.owned()),
                             "ingest_losses": lost})
        return web.json({"status": "ready", "ingest_losses": lost})

    @page("/experiments")
    async def experiments(web, request):
        ids = await call(registry.ids)
        cfgs = await call(registry.get_many, ids)
        return web.json({"experiments": ids,
                         "overview": await call(read_overview, r, list(cfgs.values())),
                         "ingest_losses": await losses(),
                         "ingest_loss_kinds": INGEST_LOSS_KINDS})

    @page("/experiments/{experiment_id}")
    async def experiment(web, request, experiment_id: str):
        if not is_valid_name(experiment_id):
            return web.json({"error": "bad experiment id"}, status=400)
        cfg = await call(registry.get, experiment_id)
        if cfg is None:
            return web.json({"error": "unknown experiment"}, status=404)
        out = experiment_to_dict(cfg)
        out["lifecycle"] = await call(read_lifecycle, r, cfg)
        truth = await call(r.get, truth_key(experiment_id))
        out["truth"] = loads(truth) if truth else None
        out["overview"] = (await call(read_overview, r, [cfg]))[0]
        out["readings"] = {f"{rec['metric']}:{rec['variant']}": reading(rec)
                           for rec in await call(read_estimates, r, experiment_id)}
        return web.json(out)

    @page("/experiments/{experiment_id}/alerts")
    async def alerts(web, request, experiment_id: str):
        if not is_valid_name(experiment_id):
            return web.json({"error": "bad experiment id"}, status=400)
        return web.json({"experiment_id": experiment_id,
                         "alerts": await call(recent_alerts, r, experiment_id)})

    @page("/experiments/{experiment_id}/estimates")
    async def estimates(web, request, experiment_id: str):
        if not is_valid_name(experiment_id):
            return web.json({"error": "bad experiment id"}, status=400)
        recs = await call(read_estimates, r, experiment_id)
        return web.json({"experiment_id": experiment_id, "estimates": recs})

    @page("/experiments/{experiment_id}/history")
    async def history(web, request, experiment_id: str):
        """One series (``metric``, ``variant``), its last ``limit`` points:
        the page polls every 2 s, so a request reads what it shows and no more."""
        metric, variant = request.query.get("metric", ""), request.query.get("variant", "")
        if not all(map(is_valid_name, (experiment_id, metric, variant))):
            return web.json({"error": "need a valid experiment id and the metric and variant "
                                      "query parameters"}, status=400)
        limit = request.query.get("limit", str(MAX_HISTORY_POINTS))
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_HISTORY_POINTS:
            return web.json({"error": f"limit: 1 to {MAX_HISTORY_POINTS}"}, status=400)
        points = await call(functools.partial(read_history, r, experiment_id, int(limit),
                                              series=[(metric, variant)]))
        return web.json({"experiment_id": experiment_id, "metric": metric, "variant": variant,
                         "history": points.get(f"{metric}:{variant}", [])})
