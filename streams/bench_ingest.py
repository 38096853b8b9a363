"""``liftstream bench ingest``: liftstream's ingest against the raw Kafka client.

N simulated events (``streams.simulate.make_traffic``, one experiment) are
produced to a fresh topic first; then, over the same records:

(a) **raw**: a confluent-kafka consumer (partitions assigned, no group) reading
    every record and decoding it with orjson -- the floor any Python consumer
    pays;
(b) **ingest**: the same consumer, batches of ``batch_size`` records (the
    worker's default, ``streams.settings``) grouped by partition as the Faust
    agent does, each handed to ``streams.ingest.Ingestor.process``: validation,
    registry, routing, the Lua apply into Redis and the ingest watermark -- the
    real path, without Faust;
(c) **worker** (optional): a real ``liftstream worker --role ingest`` process
    consuming the topic end to end; the rate is taken from its ``/metrics``
    (``liftstream_events_total{outcome="received"}``) between the first and
    the last event applied, so start-up and the group join are not counted.

Each phase gets its own Redis database (same server), so no phase sees the
offsets another one applied (the Lua scripts skip what was applied).

Rates are given per wall second and per CPU second ("per core"): the client
process's CPU time (librdkafka threads included) plus, for (b) and (c), the
Redis server's (``INFO cpu``), since Redis shares the machine's cores. The
broker's CPU is left out of both (it serves the same fetches).

(b) is then run once more under cProfile (on a fourth database), and its time
split into validation, registry, routing, the Lua apply (client side vs Redis
server time from ``INFO commandstats``), dead letters and the Kafka consume.
"""

from __future__ import annotations

import cProfile
import json
import math
import os
import pstats
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from streams.settings import Settings, kafka_config

DAY_MS = 86_400_000
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- set-up


def stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM a worker's process group, SIGKILL it after 20 s, and reap it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()



def traffic(n: int, seed: int = 0, experiment: str | None = None):
    """``n`` simulated events of one experiment, in event-time order; event
    times a month in the past (workers reject the future)."""
    from streams.simulate import make_traffic

    experiment = experiment or f"bench-{uuid.uuid4().hex[:8]}"
    start = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS
    units = max(10, math.ceil(n / 1.7) + 10)
    while True:
        cfg, evs, _ = make_traffic(units, 8.0, experiment, seed, 86_400, start)
        if len(evs) >= n:
            break
        units = math.ceil(units * 1.3 * n / max(1, len(evs)))
    evs.sort(key=lambda e: e["ts"])
    return cfg, evs[:n]


def redis_db_url(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` of the same server."""
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, f"/{db}", u.query, u.fragment))


def redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def lua_usec(r) -> tuple[int, int]:
    """(calls, server µs) of EVALSHA + EVAL so far (``INFO commandstats``)."""
    st = r.info("commandstats")
    calls = usec = 0
    for k in ("cmdstat_evalsha", "cmdstat_eval"):
        if k in st:
            calls += int(st[k]["calls"])
            usec += int(st[k]["usec"])
    return calls, usec


def make_consumer(conf: dict, topic: str, partitions: int):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer(kafka_config(conf, **{"group.id": f"bench-{uuid.uuid4().hex}",
                                       "enable.auto.commit": False,
                                       "auto.offset.reset": "earliest"}))
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    return c


# ---------------------------------------------------------------- (a) and (b)


def run_raw(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
            timeout: float = 300.0) -> dict:
    c = make_consumer(conf, topic, partitions)
    got = 0
    try:
        t0 = c0 = None
        deadline = time.monotonic() + timeout
        while got < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw consume: {got}/{n} records after {timeout:.0f}s")
            msgs = c.consume(batch_size, 1.0)
            if msgs and t0 is None:  # the clock starts at the first fetched batch
                t0, c0 = time.perf_counter(), time.process_time()
            for m in msgs:
                if m.error() is not None:
                    continue
                orjson.loads(m.value())
                got += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        c.close()
    return {"events": got, "wall_s": wall, "cpu_s": cpu, "rate": got / wall,
            "rate_per_core": got / cpu}


def ingest_loop(conf: dict, topic: str, partitions: int, n: int, batch_size: int, r,
                timeout: float = 600.0, clock: dict | None = None) -> tuple[int, Any]:
    """Consume ``n`` records and apply them with ``Ingestor.process`` (the
    worker's batching: ``batch_size`` records, grouped by partition)."""
    from streams.ingest import BatchResult, Ingestor
    from streams.registry import Registry

    ing = Ingestor(r, Registry(r))
    c = make_consumer(conf, topic, partitions)
    got = 0
    total = BatchResult()
    try:
        deadline = time.monotonic() + timeout
        while got < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest: {got}/{n} records after {timeout:.0f}s")
            msgs = [m for m in c.consume(batch_size, 1.0) if m.error() is None]
            if not msgs:
                continue
            if clock is not None and "t0" not in clock:  # starts at the first fetched batch
                clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()
            groups: dict[int, list] = defaultdict(list)
            for m in msgs:
                groups[m.partition()].append((m.offset(), m.value()))
            now_ms = int(time.time() * 1000)
            for part, batch in groups.items():
                res = ing.process(topic, part, batch, now_ms)
                total.counts.update(res.counts)
                total.dead_letters.extend(res.dead_letters[:5])
            got += len(msgs)
    finally:
        c.close()
    return got, total


def events_counted(r, experiment_id: str) -> int:
    """Events applied to the experiment: each increments one ``c:*`` counter."""
    meta = r.hgetall(f"lr:{{e:{experiment_id}}}:meta")
    return sum(int(v) for k, v in meta.items()
               if (k.decode() if isinstance(k, bytes) else k).startswith("c:"))


def run_ingest(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
               redis_url: str, cfg) -> dict:
    import redis

    from streams.registry import Registry

    r = redis.Redis.from_url(redis_url)
    try:
        Registry(r).put(cfg)
        rc0, (lc0, lu0) = redis_cpu(r), lua_usec(r)
        clock: dict = {}
        got, total = ingest_loop(conf, topic, partitions, n, batch_size, r, clock=clock)
        wall = time.perf_counter() - clock["t0"]
        cpu = time.process_time() - clock["c0"]
        rcpu = redis_cpu(r) - rc0
        lc1, lu1 = lua_usec(r)
        applied = events_counted(r, cfg.experiment_id)
    finally:
        r.close()
    dead = sum(v for k, v in total.counts.items() if k.startswith("dead_letter:"))
    return {"events": got, "applied": applied, "dead_letters": dead,
            "counts": dict(total.counts), "wall_s": wall, "cpu_s": cpu, "redis_cpu_s": rcpu,
            "lua_calls": lc1 - lc0, "lua_server_s": (lu1 - lu0) / 1e6,
            "rate": got / wall, "rate_per_core": got / (cpu + rcpu)}


# ---------------------------------------------------------------- profile


#: (label, how to find the function in the profile: (file suffix, function name))
PROFILE_PARTS = [
    ("kafka consume (librdkafka poll)", ("~", "<method 'consume' of 'cimpl.Consumer' objects>")),
    ("validation (parse_event_row)", ("schemas/validate.py", "parse_event_row")),
    ("  of which: orjson.loads", ("~", "<orjson.loads>")),
    ("registry lookups (Registry.get_many)", ("streams/registry.py", "get_many")),
    ("routing (route_rows: unit index, one script call)", ("streams/state.py", "route_rows")),
    ("apply (apply_rows: Lua call, argv, reply)", ("streams/state.py", "apply_rows")),
    ("  of which: packing the events (_pack_rows)", ("streams/state.py", "_pack_rows")),
    ("dead-letter records", ("schemas/contracts.py", "dead_letter_record")),
    ("ingest watermark (HSET)", ("redis/commands/core.py", "hset")),
    ("all Redis socket reads (waiting on the server)",
     ("~", "<method 'recv' of '_socket.socket' objects>")),
    ("all Redis socket writes", ("~", "<method 'sendall' of '_socket.socket' objects>")),
]


def profile_ingest(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
                   redis_url: str, cfg, top: int = 15) -> dict:
    import redis

    from streams.registry import Registry

    r = redis.Redis.from_url(redis_url)
    prof = cProfile.Profile()
    try:
        Registry(r).put(cfg)
        _, lu0 = lua_usec(r)
        cs0 = r.info("commandstats")
        t0 = time.perf_counter()
        prof.enable()
        ingest_loop(conf, topic, partitions, n, batch_size, r)
        prof.disable()
        wall = time.perf_counter() - t0
        _, lu1 = lua_usec(r)
        cs1 = r.info("commandstats")
    finally:
        r.close()
    # the commands the scripts ran inside Redis (their own time, not the Lua around them)
    cmds = []
    for k, v in cs1.items():
        calls = int(v["calls"]) - int(cs0.get(k, {}).get("calls", 0))
        usec = int(v["usec"]) - int(cs0.get(k, {}).get("usec", 0))
        if calls > 0 and k not in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_info"):
            cmds.append({"command": k.removeprefix("cmdstat_").upper(), "calls": calls,
                         "seconds": usec / 1e6})
    cmds.sort(key=lambda c: -c["seconds"])
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    parts = []
    for label, (fsuffix, fname) in PROFILE_PARTS:
        ct = sum(v[3] for (f, _, name), v in st.stats.items()  # type: ignore[attr-defined]
                 if name == fname and f.endswith(fsuffix))
        parts.append({"part": label, "seconds": ct, "share": ct / total if total else 0.0})
    parts.append({"part": "Redis server time in Lua (INFO commandstats, wall)",
                  "seconds": (lu1 - lu0) / 1e6,
                  "share": (lu1 - lu0) / 1e6 / total if total else 0.0})
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    tott = [{"function": f"{os.path.relpath(f, REPO) if f.startswith('/') else f}:{ln}({name})",
             "tottime_s": v[2], "calls": v[1]} for (f, ln, name), v in rows]
    return {"profiled_s": total, "wall_s": wall, "parts": parts, "top_tottime": tott,
            "redis_commands": cmds}


# ---------------------------------------------------------------- (c) worker


def _received(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as f:
            text = f.read().decode()
    except OSError:
        return -1.0
    for line in text.splitlines():
        if line.startswith("liftstream_events_total") and 'outcome="received"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_worker(bootstrap: str, topic: str, partitions: int, n: int, batch_size: int,
               redis_url: str, cfg, timeout: float = 300.0) -> dict:
    """A real ``liftstream worker --role ingest`` on the topic; rate from its
    /metrics between the first and the last event received."""
    import psutil
    import redis

    from streams.admin import publish_experiment
    from streams.embedded import free_port
    from streams.registry import Registry
    from streams.topics import ensure_topics
    from streams.worker import topic_specs

    uid = uuid.uuid4().hex[:8]
    pre = f"bench.e2e.{uid}"
    port = free_port()
    vals = {"bootstrap_servers": bootstrap, "redis_url": redis_url, "app_id": f"bench-{uid}",
            "topic_events": topic, "topic_experiments": f"{pre}.experiments",
            "topic_dirty": f"{pre}.dirty", "topic_estimates": f"{pre}.estimates",
            "topic_alerts": f"{pre}.alerts", "topic_deadletter": f"{pre}.dead-letter",
            "partitions": partitions, "batch_size": batch_size, "device": "cpu",
            "web_port": port, "log_level": "warning"}
    settings = Settings.from_env({}, **vals)
    ensure_topics(bootstrap, topic_specs(settings))
    publish_experiment(bootstrap, settings.topic_experiments, cfg)
    r = redis.Redis.from_url(redis_url)
    Registry(r).put(cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTSTREAM_")
           or k == "LIFTSTREAM_TANSU"}
    env.update({f"LIFTSTREAM_{k.upper()}": str(v) for k, v in vals.items()})
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    workdir = tempfile.mkdtemp(prefix="liftstream-bench-")
    env["LIFTSTREAM_DATADIR"] = workdir
    log_path = os.path.join(workdir, "worker.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--role",
                                 "ingest"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ps = psutil.Process(proc.pid)
        t_start = time.monotonic()
        deadline = t_start + timeout
        first = None
        n0 = 0.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}: "
                                   + Path(log_path).read_text()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker: {max(n0, 0)}/{n} events after {timeout:.0f}s")
            got = _received(port)
            now = time.monotonic()
            if got > 0 and first is None:
                first, n0 = now, got
                ct = ps.cpu_times()
                c0, rc0 = ct.user + ct.system, redis_cpu(r)
            if got >= n:
                t_end = now
                ct = ps.cpu_times()
                cpu, rcpu = ct.user + ct.system - c0, redis_cpu(r) - rc0
                break
            time.sleep(0.02)
        applied = events_counted(r, cfg.experiment_id)
    finally:
        stop_worker(proc)
        r.close()
    span = max(t_end - first, 1e-9)
    counted = n - n0
    return {"events": n, "applied": applied, "startup_s": first - t_start,
            "first_batch_events": int(n0), "wall_s": span, "cpu_s": cpu, "redis_cpu_s": rcpu,
            "rate": counted / span,
            "rate_per_core": counted / (cpu + rcpu) if cpu + rcpu > 0 else float("nan")}


# ---------------------------------------------------------------- driver


def run(events: int = 100_000, partitions: int = 3, batch_size: int | None = None,
        bootstrap: str | None = None, redis_url: str | None = None, e2e: bool = True,
        profile: bool = True, seed: int = 0) -> dict:
    from streams.embedded import kafka_broker, redis_server
    from streams.simulate import produce
    from streams.topics import TopicSpec, ensure_topics

    batch_size = batch_size or Settings.batch_size
    with ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(kafka_broker()).url
        if redis_url is None:
            redis_url = stack.enter_context(redis_server(appendonly=True)).url
        s = Settings.from_env(bootstrap_servers=bootstrap, redis_url=redis_url)
        conf = kafka_config(s)
        cfg, evs = traffic(events, seed)
        topic = f"bench.ingest.{uuid.uuid4().hex[:8]}.events"
        ensure_topics(conf, [TopicSpec(topic, partitions, 1, {})], strict=True)
        t0 = time.perf_counter()
        produce(evs, conf, topic)
        produce_s = time.perf_counter() - t0
        n = len(evs)
        db = urlsplit(redis_url).path.strip("/") or "0"
        base = int(db) if db.isdigit() else 0
        out: dict[str, Any] = {
            "events": n, "partitions": partitions, "batch_size": batch_size,
            "cores": os.cpu_count(), "broker": bootstrap, "produce_s": produce_s,
            "experiment_id": cfg.experiment_id, "topic": topic}
        out["raw"] = run_raw(conf, topic, partitions, n, batch_size)
        out["ingest"] = run_ingest(conf, topic, partitions, n, batch_size,
                                   redis_db_url(redis_url, base), cfg)
        out["ratio"] = out["ingest"]["rate"] / out["raw"]["rate"]
        out["ratio_per_core"] = out["ingest"]["rate_per_core"] / out["raw"]["rate_per_core"]
        if e2e:
            try:
                out["worker"] = run_worker(bootstrap, topic, partitions, n, batch_size,
                                           redis_db_url(redis_url, base + 1), cfg)
                out["worker_ratio"] = out["worker"]["rate"] / out["raw"]["rate"]
                out["worker_ratio_per_core"] = (out["worker"]["rate_per_core"]
                                                / out["raw"]["rate_per_core"])
            except Exception as e:  # noqa: BLE001 - report, keep (a) and (b)
                out["worker"] = {"error": str(e)[-2000:]}
        if profile:
            out["profile"] = profile_ingest(conf, topic, partitions, n, batch_size,
                                            redis_db_url(redis_url, base + 2), cfg)
    return out


def format_report(res: dict) -> str:
    a, b = res["raw"], res["ingest"]
    lines = [f"bench ingest: {res['events']} events, {res['partitions']} partitions, batch "
             f"{res['batch_size']}, {res['cores']} cores (Redis and the broker share them); "
             f"broker {res['broker']}",
             f"{'':34}{'events/s':>12}{'wall s':>9}{'client cpu s':>14}{'redis cpu s':>13}"
             f"{'ev/cpu-s':>11}",
             f"{'(a) raw consume + orjson':34}{a['rate']:12.0f}{a['wall_s']:9.2f}"
             f"{a['cpu_s']:14.2f}{'-':>13}{a['rate_per_core']:11.0f}",
             f"{'(b) Ingestor.process -> Redis':34}{b['rate']:12.0f}{b['wall_s']:9.2f}"
             f"{b['cpu_s']:14.2f}{b['redis_cpu_s']:13.2f}{b['rate_per_core']:11.0f}"]
    w = res.get("worker")
    if w and "error" not in w:
        lines.append(f"{'(c) Faust worker end to end':34}{w['rate']:12.0f}{w['wall_s']:9.2f}"
                     f"{w['cpu_s']:14.2f}{w['redis_cpu_s']:13.2f}{w['rate_per_core']:11.0f}")
    lines.append(f"(b)/(a): {res['ratio']:.1%} wall, {res['ratio_per_core']:.1%} per core "
                 f"(goal: >= 25% per core); (b) applied {b['applied']}/{b['events']} events, "
                 f"{b['dead_letters']} dead letters, {b['lua_calls']} Lua calls "
                 f"({b['lua_server_s']:.2f} s in Redis)")
    if w and "error" not in w:
        lines.append(f"(c)/(a): {res['worker_ratio']:.1%} wall, "
                     f"{res['worker_ratio_per_core']:.1%} per core; worker start-up to first "
                     f"event {w['startup_s']:.1f} s (not counted); applied "
                     f"{w['applied']}/{w['events']}")
    elif w:
        lines.append(f"(c) worker: failed: {w['error'][-500:]}")
    p = res.get("profile")
    if p:
        lines.append(f"profile of (b) (cProfile, {p['profiled_s']:.2f} s profiled, "
                     f"{p['wall_s']:.2f} s wall; cumulative, parts overlap where indented "
                     "or 'all'):")
        for part in p["parts"]:
            lines.append(f"  {part['part']:52}{part['seconds']:8.2f} s {part['share']:6.1%}")
        if p.get("redis_commands"):
            lines.append("  Redis commands run by the scripts (server time): " + ", ".join(
                f"{c['command']} {c['seconds']:.3f} s/{c['calls']}"
                for c in p["redis_commands"][:6]))
        lines.append("  top functions by own time:")
        for t in p["top_tottime"][:10]:
            lines.append(f"    {t['tottime_s']:7.3f} s {t['calls']:>8}  {t['function']}")
    return "\n".join(lines)


def ingest_main(args) -> int:
    res = run(events=args.events, partitions=args.partitions, batch_size=args.batch_size,
              bootstrap=args.bootstrap_servers, redis_url=args.redis_url,
              e2e=not args.no_worker, profile=not args.no_profile, seed=args.seed)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(format_report(res))
    return 0


# ---------------------------------------------------------------- bench latency


def run_latency(rate: float = 200.0, seconds: float = 15.0, bootstrap: str | None = None,
                redis_url: str | None = None) -> dict:
    """p50/p99 from producing an event to an estimate reflecting it: one worker
    (role all, default sampler cadence), one events partition, event time = wall
    time, lateness 0; an estimate reflects event i when its watermark >= ts_i
    (as ``tests/test_streaming.py::test_latency``), timed at its pub/sub notice."""
    import threading

    import numpy as np
    import redis
    from confluent_kafka import Producer

    from schemas.codec import dumps, loads
    from schemas.records import ExperimentConfig
    from streams.admin import publish_experiment
    from streams.embedded import kafka_broker, redis_server
    from streams.registry import Registry
    from streams.sampler import NOTICE_CHANNEL
    from streams.topics import ensure_topics
    from streams.worker import topic_specs

    with ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(kafka_broker()).url
        if redis_url is None:
            redis_url = stack.enter_context(redis_server()).url
        uid = uuid.uuid4().hex[:8]
        pre = f"bench.lat.{uid}"
        vals = {"bootstrap_servers": bootstrap, "redis_url": redis_url, "app_id": f"lat-{uid}",
                "topic_events": f"{pre}.events", "topic_experiments": f"{pre}.experiments",
                "topic_dirty": f"{pre}.dirty", "topic_estimates": f"{pre}.estimates",
                "topic_alerts": f"{pre}.alerts", "topic_deadletter": f"{pre}.dead-letter",
                "partitions": 1, "device": "cpu", "log_level": "warning"}
        settings = Settings.from_env({}, **vals)
        ensure_topics(bootstrap, topic_specs(settings))
        now = int(time.time() * 1000)
        cfg = ExperimentConfig(experiment_id="lat", window_seconds=5, bucket_seconds=10,
                               lateness_seconds=0, started_at=now)
        publish_experiment(bootstrap, settings.topic_experiments, cfg)
        r = redis.Redis.from_url(redis_url)
        Registry(r).put(cfg)
        notices: list[tuple[float, int]] = []
        stop = threading.Event()
        ps = r.pubsub()
        ps.subscribe(NOTICE_CHANNEL)

        def listen() -> None:
            while not stop.is_set():
                m = ps.get_message(timeout=0.1)
                if m and m["type"] == "message":
                    n = loads(m["data"])
                    if n["experiment_id"] == "lat" and n["watermark"] is not None:
                        notices.append((time.time(), n["watermark"]))

        threading.Thread(target=listen, daemon=True).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTSTREAM_")
               or k == "LIFTSTREAM_TANSU"}
        env.update({f"LIFTSTREAM_{k.upper()}": str(v) for k, v in vals.items()})
        workdir = tempfile.mkdtemp(prefix="liftstream-lat-")
        env.update({"LIFTSTREAM_DATADIR": workdir, "OMP_NUM_THREADS": "1"})
        with open(os.path.join(workdir, "worker.log"), "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--role",
                                     "all", "--without-web"], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        p = Producer(kafka_config(settings, **{"linger.ms": 1}))
        rng = np.random.default_rng(0)
        sent: list[tuple[float, int]] = []
        last_ts = 0

        def send(ev: dict) -> None:
            nonlocal last_ts
            t = time.time()
            last_ts = ev["ts"] = max(last_ts, int(t * 1000))
            p.produce(settings.topic_events, key=ev["unit_id"].encode(), value=dumps(ev))
            p.poll(0)
            sent.append((t, ev["ts"]))

        def wait(pred, timeout: float, what: str) -> None:
            end = time.monotonic() + timeout
            while not pred():
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"bench latency: no {what}")
                time.sleep(0.05)

        try:
            send({"type": "exposure", "event_id": "w0", "experiment_id": "lat",
                  "unit_id": "w0", "variant": "control", "pre_activity": 3.0})
            p.flush(10)
            wait(lambda: notices, 90, "first estimate")
            sent.clear()
            t_start, i, units = time.time(), 0, []
            while time.time() - t_start < seconds:
                while i < int((time.time() - t_start) * rate):
                    if not units or rng.random() < 0.4:
                        units = (units + [f"u{i}"])[-2000:]
                        send({"type": "exposure", "event_id": f"x{i}", "experiment_id": "lat",
                              "unit_id": units[-1], "variant": ["control", "treatment"][i % 2],
                              "pre_activity": float(rng.integers(0, 29))})
                    else:
                        send({"type": "metric", "event_id": f"m{i}", "experiment_id": "lat",
                              "unit_id": units[int(rng.integers(len(units)))],
                              "metric": "value", "value": float(rng.normal(1.0, 1.0))})
                    i += 1
                time.sleep(0.002)
            p.flush(30)
            wait(lambda: max(wm for _, wm in notices) >= sent[-1][1], 60, "final estimate")
        finally:
            stop.set()
            stop_worker(proc)
            r.close()
        # each event's estimate: the first notice published after it was sent
        # whose (running max) watermark reaches its event time
        t_n = np.array([t for t, _ in notices])
        wm_n = np.maximum.accumulate(np.array([w for _, w in notices]))
        t_s = np.array([t for t, _ in sent])
        ts_s = np.array([ts for _, ts in sent])
        j = np.maximum(np.searchsorted(wm_n, ts_s, side="left"),
                       np.searchsorted(t_n, t_s, side="left"))
        ok = j < len(t_n)
        lat = t_n[j[ok]] - t_s[ok]
        return {"rate": rate, "seconds": seconds, "events": len(sent), "measured": int(ok.sum()),
                "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
                "max_s": float(lat.max()), "min_s": float(lat.min()),
                "estimates": len(notices)}


def latency_main(args) -> int:
    res = run_latency(args.rate, args.seconds, args.bootstrap_servers, args.redis_url)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"bench latency: {res['events']} events at {res['rate']:.0f}/s for "
              f"{res['seconds']:.0f} s, one partition, worker role all (tick 1 s): "
              f"produce -> estimate p50 {res['p50_s']:.2f} s, p99 {res['p99_s']:.2f} s, "
              f"max {res['max_s']:.2f} s ({res['estimates']} estimates)")
    return 0
