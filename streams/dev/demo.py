"""``liftstream demo``: the whole system on one machine, nothing to install.

Starts the embedded broker (Tansu) and Redis on free loopback ports, creates
the topics, registers a demo experiment, runs a worker (role ``all``) and a
traffic simulator whose event clock runs at ``--speed`` simulated days per
minute: heavy users arrive first and the effect grows with activity, so the
naive estimate starts high and drifts down while the adjusted one sits near
the known population effect. Units carry a pre-experiment value of the
metric (``pre``; correlation 0.7 with the outcome's noise, missing for 10%
of them), which the model uses as a CUPED covariate: the intervals are
narrower than without it, by the ratio shown. A live table shows both.
A second experiment, ``demo-onboarding``, has a 7-day window and a novelty
effect (an extra lift of 0.15 on each unit's first day since exposure, the
visits model of ``streams.dev.synthetic``): its estimates carry the lift by days
since exposure and the novelty contrast (issue 19), and the dashboard plots
them.
Three more experiments show one metric of each kind (issue 26), each with
heavy users first and a lift that grows with activity: ``demo-conversion``
(``purchase``, a conversion at a 5% base rate: effects in percentage
points), ``demo-ratio`` (``revenue_per_session``: revenue over sessions,
their unit totals correlated 0.6; per-arm ratios) and ``demo-revenue``
(lognormal revenue, σ 2, 70% zeros, capped at 50 per unit window: the
capped estimate, the uncapped one beside it and the tail quantiles).
Ctrl-C or ``--duration`` stops everything; no process is left behind.

``--no-traffic`` starts the same stack without the simulator and prints one
JSON line with the addresses for external producers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import redis

from schemas.codec import dumps, loads
from schemas.records import ExperimentConfig
from streams.config.settings import Settings
from streams.dev.embedded import dies_with_parent, free_port, kafka_broker, redis_server, stop_group
from streams.dev.synthetic import Scenario, age_truth, events, population, truth
from streams.state.keys import estimate_key
from streams.state.registry import Registry

DAY_MS = 86_400_000
DEMO_EXPERIMENT = "demo-checkout"
#: the demo's pre-experiment covariate: within-cell correlation with the
#: outcome, and the share of units without one (new users)
DEMO_COVARIATE_RHO = 0.7
DEMO_COVARIATE_MISSING = 0.1
#: the novelty experiment: its extra first-day lift and its units
DEMO_NOVELTY_EXPERIMENT = "demo-onboarding"
DEMO_NOVELTY = 0.15
DEMO_NOVELTY_UNITS = 15_000
#: issue 26: the cap of the revenue experiment's unit window totals (about
#: the 99th percentile of a buyer's revenue at σ 2)
DEMO_REVENUE_CAP = 50.0
#: issue 26: one experiment per metric kind, (experiment id, units, the
#: simulator's options; ``streams.dev.simulate.KindOptions`` keyword arguments)
DEMO_KINDS: tuple[tuple[str, int, dict], ...] = (
    ("demo-conversion", 30_000, {"kind": "conversion", "base_rate": 0.05}),
    ("demo-ratio", 15_000, {"kind": "ratio", "ratio_corr": 0.6}),
    ("demo-revenue", 30_000, {"revenue_sigma": 2.0, "zero_share": 0.7,
                              "cap_upper": DEMO_REVENUE_CAP}),
)


class Traffic(threading.Thread):
    """Produces the simulated events in event-time order, paced on a
    compressed clock (``days_per_minute``)."""

    def __init__(self, bootstrap: str, topic: str, evs: list[dict], start_ms: int,
                 days_per_minute: float):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.evs = bootstrap, topic, evs
        self.start_ms, self.speed = start_ms, days_per_minute
        self.stop_flag = threading.Event()
        self.sent = 0
        self.sim_ms = start_ms

    def run(self) -> None:
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 50})
        t0 = time.monotonic()
        ms_per_s = self.speed * DAY_MS / 60.0
        i = 0
        while i < len(self.evs) and not self.stop_flag.is_set():
            self.sim_ms = self.start_ms + int((time.monotonic() - t0) * ms_per_s)
            while i < len(self.evs) and self.evs[i]["ts"] <= self.sim_ms:
                e = self.evs[i]
                try:
                    p.produce(self.topic, key=e["unit_id"].encode(), value=dumps(e))
                    i += 1
                except BufferError:
                    p.poll(0.05)
            self.sent = i
            p.poll(0)
            time.sleep(0.05)
        p.flush(10)


def _fmt(iv: dict | None) -> str:
    if not iv or iv.get("mean") is None:
        return "—".center(26)
    return f"{iv['mean']:+.3f} [{iv['lo']:+.3f}, {iv['hi']:+.3f}]"


def _covariate_line(vr: dict | None) -> str:
    """What the pre-experiment covariate (CUPED) bought, from the estimate's
    ``variance_reduction``."""
    if not vr:
        return "covariate: —"
    share = vr.get("share_with_covariate")
    head = "covariate: " + ("used" if vr.get("used") else "not used") + (
        f", {share:.0%} of matured units have a pre-experiment value" if share is not None
        else "")
    ratio = (vr.get("sd_ratio") or {}).get("adjusted")
    if vr.get("used") and ratio is not None:
        head += f"; adjusted interval ×{ratio:.2f} of its width without it"
    return head


def _novelty_line(rec: dict | None) -> str:
    """The novelty experiment's lift by days since exposure and its contrast."""
    if not rec or not rec.get("by_exposure_age"):
        return (f"{DEMO_NOVELTY_EXPERIMENT}: waiting (a 7-day window: units mature a week "
                "after exposure)")
    bins = " ".join(
        f"d{b['from_s'] // 86_400}-{b['to_s'] // 86_400} "
        + (f"{b['lift']['mean']:+.1%}" if b["lift"] and b["lift"]["mean"] is not None else "—")
        for b in rec["by_exposure_age"])
    c = (rec.get("novelty") or {}).get("contrast") or {}
    nov = "—" if c.get("mean") is None else \
        f"{c['mean']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}] (truth {DEMO_NOVELTY:+.3f})"
    return f"{DEMO_NOVELTY_EXPERIMENT}: lift by days since exposure {bins}; novelty {nov}"


def kind_experiments(start_ms: int, seed: int = 0, lateness_seconds: int = 3 * 3600,
                     days: float = 14.0) -> list[tuple[ExperimentConfig, list[dict], dict]]:
    """The metric-kind experiments of ``DEMO_KINDS`` (issue 26): config (a
    one-day window, the demo's lateness), events and truth of each, from
    ``liftstream simulate``'s generator."""
    import dataclasses

    from streams.dev.simulate import KindOptions, make_traffic

    out = []
    for i, (eid, units, opts) in enumerate(DEMO_KINDS):
        cfg, evs, tr = make_traffic(units, days, eid, seed + 1 + i, 86_400, start_ms,
                                    kinds=KindOptions(**opts))
        out.append((dataclasses.replace(cfg, lateness_seconds=lateness_seconds), evs, tr))
    return out


def _pp(iv: dict | None) -> str:
    """A conversion's effect interval in percentage points."""
    if not iv or iv.get("mean") is None:
        return "—"
    return f"{100 * iv['mean']:+.2f} pp [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}]"


def _plain(iv: dict | None) -> str:
    return _fmt(iv).strip()


def kind_line(eid: str, rec: dict | None, tr: dict) -> str:
    """One metric-kind experiment's line of the live table: its adjusted and
    naive effects in the kind's units against the truth; a ratio's per-arm
    ratios, a capped sum's uncapped effect and tail."""
    if rec is None:
        return f"{eid}: waiting (units mature one day after exposure)"
    kind = rec.get("kind") or "sum"
    if kind == "conversion":
        fmt, truth_text = _pp, f"{100 * tr['effect']:+.2f} pp"
    else:
        fmt, truth_text = _plain, f"{tr['effect']:+.3f}"
    line = (f"{eid} ({rec['metric']}, {kind}{', capped' if rec.get('cap') else ''}): adjusted "
            f"{fmt(rec['adjusted']['effect'])}, naive {fmt(rec['naive']['effect'])}, "
            f"truth {truth_text}")
    ratio = rec.get("ratio") or {}
    if ratio.get("adjusted"):
        line += "; ratio per arm " + ", ".join(
            f"{arm} {iv['mean']:.3f}" for arm, iv in ratio["adjusted"].items()
            if iv and iv.get("mean") is not None)
    unc = rec.get("uncapped")
    if unc and (unc.get("effect") or {}).get("mean") is not None:
        line += f"; uncapped {fmt(unc['effect'])}"
        if tr.get("uncapped"):
            line += f" (truth {tr['uncapped']['effect']:+.3f})"
    tail = (rec.get("tail") or {}).get("pooled")
    if tail and tail.get("max") is not None:
        line += (f"; unit totals p99.9 {tail['p999']:.3g}, max {tail['max']:.3g}, top 0.1% "
                 f"hold {tail['top_0_1pct_share_sum_y2']:.0%} of Σy²")
    return line


def render(rec: dict | None, tr: dict, sim_day: float, sent: int, tty: bool,
           http: str = "", novelty_rec: dict | None = None,
           kind_lines: list[str] | None = None) -> str:
    head = f"liftstream demo — experiment {DEMO_EXPERIMENT}, event time day {sim_day:5.2f}, " \
           f"{sent} events sent" + (f" — dashboard {http}" if http else "")
    if rec is None:
        body = "waiting for the first estimate (units mature one day after exposure)…"
    else:
        d = rec["diagnostics"]
        u = rec["units"]
        body = "\n".join([
            f"{'':10} {'effect (95% interval)':>28} {'lift':>8}",
            f"{'naive':10} {_fmt(rec['naive']['effect']):>28} "
            f"{rec['naive']['lift']['mean'] or 0:+8.2%}",
            f"{'adjusted':10} {_fmt(rec['adjusted']['effect']):>28} "
            f"{rec['adjusted']['lift']['mean'] or 0:+8.2%}",
            f"{'truth':10} {tr['effect']:+28.3f} {tr['lift']:+8.2%}",
            f"units exposed {sum(u['exposed'].values())}, matured {sum(u['matured'].values())}"
            f" | D={rec['watermark']['completed_buckets']} days | R-hat {d['rhat'] or 0:.3f}, "
            f"ESS {d['ess_bulk'] or 0:.0f}, iteration {d['iteration']}",
            _covariate_line(rec.get("variance_reduction")),
            _novelty_line(novelty_rec),
            *(kind_lines or []),
        ])
    text = head + "\n" + body
    return ("\x1b[H\x1b[J" + text) if tty else text


def run_demo(duration: float | None = None, no_traffic: bool = False, speed: float = 10.0,
             seed: int = 0) -> int:
    """Run the demo (module docstring) for ``duration`` seconds (None: until
    Ctrl-C or SIGTERM); ``no_traffic``: no simulator, the addresses printed
    as one JSON line; ``speed``: simulated days per minute; ``seed``: the
    traffic's. Returns the exit status."""
    stop = threading.Event()
    # Ctrl-C and SIGTERM alike: leave the loop, stop the traffic and the
    # worker, then the broker and Redis (children die with the demo anyway)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with kafka_broker() as kafka, redis_server() as rds:
        port = free_port()
        s = Settings.from_env(bootstrap_servers=kafka.url, redis_url=rds.url, web_port=port,
                              auto_register=True, chains=4, sweeps_per_tick=40,
                              tick_seconds=1.0, partitions=4)
        env = dict(os.environ, LIFTSTREAM_BOOTSTRAP_SERVERS=kafka.url,
                   LIFTSTREAM_REDIS_URL=rds.url, LIFTSTREAM_WEB_PORT=str(port),
                   LIFTSTREAM_AUTO_REGISTER="true", LIFTSTREAM_CHAINS="4",
                   LIFTSTREAM_SWEEPS_PER_TICK="40", LIFTSTREAM_PARTITIONS="4",
                   LIFTSTREAM_TICK_SECONDS="1.0")
        from streams.service.topics import ensure_topics
        from streams.service.worker import topic_specs

        ensure_topics(s.bootstrap_servers, topic_specs(s))
        start_ms = int(time.time() * 1000) - 15 * DAY_MS
        # lateness: the event clock runs ~14,000× real time, so the partitions'
        # few hundred ms of skew are hours of event time
        cfg = ExperimentConfig(experiment_id=DEMO_EXPERIMENT, window_seconds=86_400,
                               lateness_seconds=3 * 3600, started_at=start_ms)
        from streams.service.experiments import publish_experiment

        ncfg = ExperimentConfig(experiment_id=DEMO_NOVELTY_EXPERIMENT,
                                window_seconds=7 * 86_400, lateness_seconds=3 * 3600,
                                started_at=start_ms)
        for c in (cfg, ncfg):
            publish_experiment(kafka.url, s.topic_experiments, c)
            Registry(redis.Redis.from_url(rds.url)).put(c)
        logf = open(os.path.join(rds.workdir, "worker.log"), "wb")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--role", "all"],
                                  env=env, stdout=logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                  preexec_fn=dies_with_parent())
        traffic = None
        try:
            http = f"http://127.0.0.1:{port}"
            if no_traffic:
                print(dumps({"bootstrap_servers": kafka.url, "redis_url": rds.url,
                             "http": http}).decode(), flush=True)
                t_end = None if duration is None else time.monotonic() + duration
                while not stop.is_set() and (t_end is None or time.monotonic() < t_end):
                    if worker.poll() is not None:
                        raise SystemExit("worker exited; see its log")
                    time.sleep(0.5)
                return 0
            rng = np.random.default_rng(seed)
            pop = population(Scenario(n_units=40_000, covariate_rho=DEMO_COVARIATE_RHO,
                                      covariate_missing=DEMO_COVARIATE_MISSING), rng)
            evs = events(pop, DEMO_EXPERIMENT, start_ms, DAY_MS, 14.0, rng)
            tr = truth(pop)
            npop = population(Scenario(n_units=DEMO_NOVELTY_UNITS, novelty=DEMO_NOVELTY,
                                       effect_slope=-0.12), rng)
            evs = sorted(evs + events(npop, DEMO_NOVELTY_EXPERIMENT, start_ms, 7 * DAY_MS,
                                      14.0, rng), key=lambda e: e["ts"])
            ntr = {**truth(npop), "novelty": DEMO_NOVELTY,
                   "by_exposure_age": age_truth(npop, (0, 1, 3, 7))}
            from streams.state.keys import truth_key

            redis.Redis.from_url(rds.url).set(truth_key(DEMO_EXPERIMENT), dumps(tr))
            redis.Redis.from_url(rds.url).set(truth_key(DEMO_NOVELTY_EXPERIMENT), dumps(ntr))
            kinds = []  # (experiment, its metric, truth) of each metric kind's experiment
            for kcfg, kevs, ktr in kind_experiments(start_ms, seed):
                publish_experiment(kafka.url, s.topic_experiments, kcfg)
                Registry(redis.Redis.from_url(rds.url)).put(kcfg)
                redis.Redis.from_url(rds.url).set(truth_key(kcfg.experiment_id), dumps(ktr))
                kinds.append((kcfg.experiment_id, kcfg.metrics[0].name, ktr))
                evs += kevs
            evs.sort(key=lambda e: e["ts"])
            traffic = Traffic(kafka.url, s.topic_events, evs, start_ms, speed)
            traffic.start()
            r = redis.Redis.from_url(rds.url)
            tty = sys.stdout.isatty()
            t_end = None if duration is None else time.monotonic() + duration
            last = 0.0
            while not stop.is_set() and (t_end is None or time.monotonic() < t_end):
                if worker.poll() is not None:
                    raise SystemExit("worker exited unexpectedly")
                if time.monotonic() - last >= (1.0 if tty else 5.0):
                    last = time.monotonic()
                    raw = r.get(estimate_key(DEMO_EXPERIMENT, "value", "treatment"))
                    rec = loads(raw) if raw else None
                    nraw = r.get(estimate_key(DEMO_NOVELTY_EXPERIMENT, "value", "treatment"))
                    day = (traffic.sim_ms - start_ms) / DAY_MS
                    klines = []
                    for keid, kmetric, ktr in kinds:
                        kraw = r.get(estimate_key(keid, kmetric, "treatment"))
                        klines.append(kind_line(keid, loads(kraw) if kraw else None, ktr))
                    print(render(rec, tr, day, traffic.sent, tty, http,
                                 loads(nraw) if nraw else None, klines), flush=True)
                    if not tty:
                        print()
                time.sleep(0.1)
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            if traffic is not None:
                traffic.stop_flag.set()
                traffic.join(15)
            stop_group(worker)
            logf.close()
