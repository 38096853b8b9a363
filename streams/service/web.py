"""HTTP API on Faust's web server (bound to loopback by default).

Read-only views of the Redis read model: experiments, their latest
estimates and history, health. Blocking Redis calls run on a thread.

Routes (``register_pages``; every one but ``/healthz`` and ``/readyz`` needs
``settings.api_token`` when it is set, see ``authorized``):

* ``GET /`` -- the overview of every experiment (``static/overview.html``);
* ``GET /experiment?experiment=<id>`` -- one experiment's page
  (``static/dashboard.html``; without ``experiment``: the most recently active);
* ``GET /healthz`` -- liveness: 200 ``{"status": "ok"}``, or 503 ``stuck`` when
  a loop of this worker has not come round for ``settings.liveness_seconds``;
* ``GET /readyz`` -- readiness: 503 while Redis does not answer, the events
  consumer is not running or ingest is stalled; else 200 ``ready`` (with the
  owned ``events_partitions`` in the ingest role);
* ``GET /metrics`` -- Prometheus text format (``streams.service.metrics``);
* ``GET /experiments`` -- ``{"experiments": [id, ...], "overview": [...]}``:
  the ids, and each experiment's summary, most recently active first
  (``streams.service.overview``);
* ``GET /experiments/{id}`` -- the config, its ``lifecycle`` and ``truth``
  (a simulator's, else null), its ``overview`` entry and the ``readings``
  of its estimates (what the page may show); 404 unknown, 400 a bad id;
* ``GET /experiments/{id}/estimates``, ``/history``, ``/alerts`` -- the latest
  estimate records, their history, the recent alerts.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.codec import loads
from schemas.validate import experiment_to_dict, is_valid_name
from streams.alerts.store import recent as recent_alerts
from streams.sampling.sampler import read_estimates, read_history, read_lifecycle
from streams.service.context import AppContext
from streams.service.overview import read_overview, reading
from streams.state.keys import truth_key

if TYPE_CHECKING:
    import faust

DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"
OVERVIEW = Path(__file__).with_name("static") / "overview.html"


def authorized(request, token: str) -> bool:
    """No token configured, or the request carries it: ``Authorization:
    Bearer <token>``, or ``?token=<token>`` (the dashboard passes its own
    query's token on to the API). Compared in constant time."""
    if not token:
        return True
    got = ""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        got = auth[len("Bearer "):].strip()
    else:
        got = request.query.get("token", "")
    return hmac.compare_digest(got.encode(), token.encode())


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

    def page(path: str, open_: bool = False):
        """``app.page``, behind the API token unless ``open_`` (health)."""
        def wrap(handler):
            if open_:
                return app.page(path)(handler)

            @functools.wraps(handler)
            async def guarded(web, request, **kw):
                if not authorized(request, token):
                    return web.json({"error": "unauthorized"}, status=401)
                return await handler(web, request, **kw)

            return app.page(path)(guarded)
        return wrap

    @page("/")
    async def overview_page(web, request):
        return web.html(OVERVIEW.read_text())

    @page("/experiment")
    async def dashboard(web, request):
        return web.html(DASHBOARD.read_text())

    @page("/healthz", open_=True)
    async def healthz(web, request):
        stuck = stuck_loops(time.monotonic(), ctx.beats(), ctx.settings.liveness_seconds)
        if stuck:  # a loop has not come round: restart me
            return web.json({"status": "stuck", "error": "; ".join(stuck)}, status=503)
        return web.json({"status": "ok"})

    @page("/metrics")
    async def metrics_page(web, request):
        m = ctx.metrics
        now = time.time()
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

    @page("/readyz", open_=True)
    async def readyz(web, request):
        try:
            await call(r.ping)
        except Exception as e:  # noqa: BLE001
            return web.json({"status": "redis unavailable", "error": str(e)}, status=503)
        plane = ctx.plane
        if plane is not None:  # the ingest role: its events consumer must be running
            if not plane.alive:
                return web.json({"status": "events consumer not running",
                                 "error": plane.status.error}, status=503)
            stalled = plane.status.stalled
            if stalled is not None:  # e.g. Redis out of memory: batches wait, none is lost
                return web.json({"status": "ingest stalled", "reason": stalled[0],
                                 "error": stalled[1]}, status=503)
            # a worker beyond the partition count owns none and is still ready
            return web.json({"status": "ready", "events_partitions": sorted(plane.owned())})
        return web.json({"status": "ready"})

    @page("/experiments")
    async def experiments(web, request):
        ids = await call(registry.ids)
        cfgs = await call(registry.get_many, ids)
        return web.json({"experiments": ids,
                         "overview": await call(read_overview, r, list(cfgs.values()))})

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
        if not is_valid_name(experiment_id):
            return web.json({"error": "bad experiment id"}, status=400)

        return web.json({"experiment_id": experiment_id,
                         "history": await call(read_history, r, experiment_id)})
