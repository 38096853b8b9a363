"""The dashboard as a person sees it, in headless Chromium (issue 4, "HTTP API
and dashboard").

A real ``role=all`` worker with its web server on a free loopback port gets
simulated traffic in three event-time chunks (so the chart has a history over
event time) and a ground truth under ``truth_key``. Once estimates exist,
Debian's ``chromium --headless --dump-dom`` renders ``/`` (the page's
``setInterval`` refreshes run in virtual time) and the test checks the DOM:

* the chart is drawn: polylines ``data-series="adjusted"`` and ``"naive"``
  with several points each, their 95% bands, the dashed truth line;
* the numbers shown (adjusted/naive effect, intervals, truth) are the API's
  ``/experiments/{id}/estimates`` values formatted as the page does (3
  decimals with a sign). The estimate changes every sampler tick, so the page
  is matched to the API snapshot (fetched right before and right after the
  render) with the same iteration (shown in the page's diagnostics line);
  when neither matches, the render is retried.

Then ``--screenshot`` must give a non-trivial PNG (size, dimensions, colours).
Skipped when chromium is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from html.parser import HTMLParser

import pytest
import redis

from schemas.codec import dumps
from streams.service.web import truth_key
from tests.support.browser import chromium, run_chromium
from tests.support.streaming_harness import (
    make_stack,
    produce,
    start_web_worker,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY_MS = 86_400_000
START = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS
EID = "dash"


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class Dom(HTMLParser):
    """Text by element id, the ``<body>``'s attributes and every element with
    a ``data-series`` (the chart's lines, bands and truth line)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: dict[str, str] = {}
        self.series: dict[str, tuple[str, dict]] = {}
        self.body: dict = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if a.get("id"):
            self.text.setdefault(a["id"], "")
        if a.get("data-series"):
            self.series[a["data-series"]] = (tag, a)
        if tag not in VOID:
            self._open.append((tag, a.get("id")))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self._open:
            self._open.pop()

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, i in self._open:
            if i:
                self.text[i] += data


def f3(x: float | None) -> str:
    """The page's ``f3``: sign, 3 decimals (``Number.toFixed``)."""
    if x is None:
        return "—"
    return ("+" if x >= 0 else "") + f"{x:.3f}"


def f3_js_ok(shown: str, x: float) -> bool:
    """Equal up to how an exact decimal tie rounds (JS: up, Python: to even)."""
    if shown == f3(x):
        return True
    return abs(float(shown) - x) <= 0.0005 + 1e-12


def shown_numbers(dom: Dom) -> dict[str, str]:
    return {k: dom.text.get(k, "").strip() for k in
            ("adjusted-mean", "adjusted-interval", "naive-mean", "naive-interval", "truth",
             "diag", "platform-mean", "platform-interval")}


def test_dashboard_in_chromium(kafka_bootstrap, redis_url, tmp_path, workers):
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; "
                    ".ci/run does this)")
    from streams.dev.simulate import make_traffic

    st = make_stack(kafka_bootstrap, redis_url, tmp_path, "dash", partitions=1,
                    tick_seconds=1.0, chains=4)
    st.create_topics()
    cfg, evs, truth = make_traffic(2500, 8, EID, seed=3, window_seconds=86_400,
                                   started_at=START)
    cfg = dataclasses.replace(cfg, prior="platform")  # the page shows the shrunk row too
    st.register([cfg])
    r = redis.Redis.from_url(redis_url)
    r.set(truth_key(EID), dumps(truth))
    w = start_web_worker(workers, st, "all")

    def api(path: str):
        raw = w.get(path)
        return None if raw is None else json.loads(raw)

    def history_len() -> int:
        """The longest series' history (the API gives one series per request)."""
        recs = (api(f"/experiments/{EID}/estimates") or {"estimates": []})["estimates"]
        hists = [api(f"/experiments/{EID}/history?metric={r['metric']}&variant={r['variant']}")
                 for r in recs]
        return max((len(h["history"]) for h in hists if h), default=0)

    evs = sorted(evs, key=lambda e: e["ts"])
    chunks = [evs[: len(evs) // 3], evs[len(evs) // 3: 2 * len(evs) // 3],
              evs[2 * len(evs) // 3:]]
    for chunk in chunks:
        before = history_len()
        produce(st.bootstrap, st.events_topic, chunk)
        wait_until(lambda b=before: history_len() >= b + 2, 120,
                   "new estimates after a chunk", workers=[w], interval=0.3)
    wait_until(lambda: (api(f"/experiments/{EID}/estimates") or {}).get("estimates"), 60,
               "estimates from the API", workers=[w])

    url = w.url("/")
    for _attempt in range(3):
        before = api(f"/experiments/{EID}/estimates")["estimates"]
        res = run_chromium(url, "--virtual-time-budget=8000", "--dump-dom")
        after = api(f"/experiments/{EID}/estimates")["estimates"]
        assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
        html = res.stdout.decode()
        dom = Dom()
        dom.feed(html)
        assert dom.body.get("data-ready") == "1", (
            "the page never finished a refresh: status "
            f"{dom.text.get('status')!r}\n{html[:3000]}")
        shown = shown_numbers(dom)
        m = re.search(r"iteration (\d+)", shown["diag"])
        assert m, shown
        it = int(m.group(1))
        # the series the page shows: its series <select> defaults to the first
        series = [(e["metric"], e["variant"]) for e in before]
        matches = [rec for snap in (before, after) for rec in snap
                   if rec["diagnostics"]["iteration"] == it
                   and (rec["metric"], rec["variant"]) == series[0]]
        if matches:
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"page showed iteration {it}, API before/after had "
                    f"{[e['diagnostics']['iteration'] for e in before]} / "
                    f"{[e['diagnostics']['iteration'] for e in after]} (3 tries)")
    rec = matches[0]

    # the chart: both series as polylines with several points, bands, truth line
    series_el = dom.series
    for k in ("adjusted", "naive"):
        assert k in series_el and series_el[k][0] == "polyline", sorted(series_el)
        pts = series_el[k][1]["points"].split()
        assert len(pts) >= 3, (k, pts)
        xy = [tuple(map(float, p.split(","))) for p in pts]
        assert all(0 <= x <= 1000 and 0 <= y <= 320 for x, y in xy), (k, xy[:5])
        assert len({x for x, _ in xy}) >= 2, f"{k}: all points at one event time"
        assert series_el.get(k + "-band", ("",))[0] == "polygon"
    tag, tl = series_el.get("truth", (None, {}))
    assert tag == "line" and tl.get("stroke-dasharray"), series_el.keys()
    assert float(tl["y1"]) == float(tl["y2"]) and 0 <= float(tl["y1"]) <= 320

    # the numbers a person reads equal the API's
    a, n = rec["adjusted"]["effect"], rec["naive"]["effect"]
    assert f3_js_ok(shown["adjusted-mean"], a["mean"]), (shown, a)
    assert f3_js_ok(shown["naive-mean"], n["mean"]), (shown, n)
    for key, e in (("adjusted-interval", a), ("naive-interval", n)):
        lo, hi = shown[key].strip("[]").split(", ")
        assert f3_js_ok(lo, e["lo"]) and f3_js_ok(hi, e["hi"]), (key, shown[key], e)
    assert f3_js_ok(shown["truth"], truth["effect"]), (shown["truth"], truth)
    pl = rec["platform"]["effect"]  # opted in: every estimate carries the shrunk effect
    assert f3_js_ok(shown["platform-mean"], pl["mean"]), (shown, pl)
    lo, hi = shown["platform-interval"].strip("[]").split(", ")
    assert f3_js_ok(lo, pl["lo"]) and f3_js_ok(hi, pl["hi"]), (shown, pl)
    exps = api("/experiments")["experiments"]
    assert EID in exps

    # a screenshot: a real PNG with content
    shot = tmp_path / "dashboard.png"
    res = run_chromium(url, "--virtual-time-budget=8000", "--window-size=1400,1000",
                       f"--screenshot={shot}")
    assert res.returncode == 0 and shot.exists(), res.stderr.decode(errors="replace")[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1400, 1000), img.size
        colours = img.convert("RGB").resize((200, 140)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "screenshot is nearly uniform"
    assert w.alive() and w.starts == 1
    r.close()
    print(f"\n[dashboard] page showed iteration {it}: adjusted {shown['adjusted-mean']} "
          f"{shown['adjusted-interval']}, naive {shown['naive-mean']} "
          f"{shown['naive-interval']}, truth {shown['truth']}; "
          f"{len(series_el['adjusted'][1]['points'].split())} chart points; screenshot {shot} "
          f"({len(data)} bytes)")


def test_dashboard_plots_lift_by_exposure_age(kafka_bootstrap, redis_url, tmp_path, workers):
    """Novelty traffic (7-day window, three exposure-age bins): the page draws
    one interval per bin and states the novelty contrast the API gives (a
    function of the settled state alone, so it does not move between ticks)."""
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; "
                    ".ci/run does this)")
    from streams.dev.simulate import make_traffic

    st = make_stack(kafka_bootstrap, redis_url, tmp_path, "dnov", partitions=1,
                    tick_seconds=1.0, chains=4)
    st.create_topics()
    eid = "dnov"
    cfg, evs, truth = make_traffic(3000, 14, eid, seed=5, window_seconds=7 * 86_400,
                                   started_at=START, novelty=0.15, effect_slope=-0.12)
    st.register([cfg])
    redis.Redis.from_url(redis_url).set(truth_key(eid), dumps(truth))
    w = start_web_worker(workers, st, "all")
    produce(st.bootstrap, st.events_topic, sorted(evs, key=lambda e: e["ts"]))

    def est():
        raw = w.get(f"/experiments/{eid}/estimates")
        recs = json.loads(raw)["estimates"] if raw else []
        rec = recs[0] if recs else None
        ok = rec and rec["by_exposure_age"] and all(b["lift"] for b in rec["by_exposure_age"]) \
            and rec["novelty"]["contrast"]["mean"] is not None \
            and rec["units"]["matured"] == rec["units"]["exposed"]
        return rec if ok else None

    rec = wait_until(est, 120, "an estimate with every unit matured and every bin drawn",
                     workers=[w], interval=0.5)
    res = run_chromium(w.url("/"), "--virtual-time-budget=8000", "--dump-dom")
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    dom = Dom()
    dom.feed(res.stdout.decode())
    assert dom.body.get("data-ready") == "1", dom.text.get("status")
    for b in range(3):
        tag, a = dom.series.get(f"age-{b}", (None, {}))
        assert tag == "rect" and float(a["height"]) > 0, (b, dom.series.keys())
    c = est()["novelty"]["contrast"]  # the settled state's: equal to rec's
    assert c == rec["novelty"]["contrast"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    shown = dom.text.get("novelty", "")
    assert f"first-days minus later lift {pct(c['mean'])} [{pct(c['lo'])}, {pct(c['hi'])}]" \
        in shown, (shown, c)
    assert f"{c['strata_used']} of {rec['novelty']['strata']} activity values" in shown
