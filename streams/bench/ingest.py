"""``liftstream bench ingest``: liftstream's ingest against the raw Kafka client.

N simulated events (``streams.dev.simulate.make_traffic``, one experiment) are
produced to a fresh topic first; then, over the same records:

(a) **raw**: confluent-kafka consumers (partitions assigned, no group; one per
    partition, read in turn as a live worker sees them: ``PartitionReader``)
    reading every record and decoding it with orjson -- the floor any Python
    consumer pays; run ``RAW_REPEATS`` times, the pass of median CPU kept;
(b) **ingest**: the same reader, batches of ``batch_size`` records (the
    worker's default, ``streams.config.settings``) grouped by partition as the
    events plane (``streams.ingest.events_plane``) does, each handed to
    ``streams.ingest.ingestor.Ingestor.process``: validation, registry, routing, the
    owner's rules and fenced commit into Redis and the ingest watermark -- the real path, without
    the worker around it;
(c) **worker** (optional): a real ``liftstream worker --role ingest`` process
    consuming the topic end to end; the rate is taken from its ``/metrics``
    (``liftstream_events_total{outcome="received"}``) between the first and
    the last event applied, so start-up and the group join are not counted.

Each phase gets its own Redis database (same server), so no phase sees the
offsets another one applied (the owner's commit skips what was applied).

Rates are given per wall second and per CPU second ("per core"): the client
process's CPU time (librdkafka threads included) plus, for (b) and (c), the
Redis server's (``INFO cpu``), since Redis shares the machine's cores. The
broker's CPU is left out of both (it serves the same fetches).

Against the goal ((b) >= 20% of (a) per core, (c) >= 10%) the report sets the cost floor
of any ingest that keeps the state of docs/architecture.md#state in Redis, measured in the same
run (``cost_floor``): (a)'s consume + decode, validation beyond the decode,
and the Redis server's time in the state commands alone.

(b) is then run once more under cProfile (on a fourth database), and its time
split into validation, registry, routing, the Lua apply (client side vs Redis
server time from ``INFO commandstats``), dead letters and the Kafka consume.

``--kinds mixed`` (issue 26): the experiment has a ``value`` sum, a
``purchase`` conversion and a ``value_per_session`` ratio (``value`` over
``sessions``); the metric events are spread over the three event metrics
(every third one each). (b) runs with that config, and once more (on a fifth
database, same records) with the three event metrics as three sums
(``--kinds sum``'s config): the report gives the cost per event of each and
the kinds' extra. ``--kinds sum`` alone is that baseline by itself.
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

from streams import native
from streams.config.settings import Settings, kafka_config
from streams.dev.embedded import stop_group
from streams.state.store import read_counters

DAY_MS = 86_400_000
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- set-up


#: ``--kinds``: the bench experiment's metrics (issue 26). "none": today's one
#: ``value`` sum; "sum": three sums over the event metrics value, purchase,
#: sessions; "mixed": the same event metrics as a sum, a conversion and a ratio
BENCH_KINDS = ("none", "sum", "mixed")
KIND_EVENT_METRICS = ("value", "purchase", "sessions")


def kinds_metrics(kinds: str) -> tuple:
    """The experiment's metrics for ``--kinds`` (``BENCH_KINDS``)."""
    from schemas.records import MetricSpec

    if kinds == "none":
        return (MetricSpec("value"),)
    if kinds == "sum":
        return tuple(MetricSpec(m) for m in KIND_EVENT_METRICS)
    if kinds == "mixed":
        return (MetricSpec("value"), MetricSpec("purchase", kind="conversion"),
                MetricSpec("value_per_session", kind="ratio", numerator="value",
                           denominator="sessions"))
    raise ValueError(f"--kinds must be one of {', '.join(BENCH_KINDS)}, got {kinds!r}")


def with_kinds(cfg, evs: list[dict], kinds: str):
    """``cfg`` with ``kinds``' metrics, and ``evs`` with their metric events
    spread over its event metrics (the i-th metric event gets the (i mod 3)-th):
    the same records and event count whatever the kinds."""
    import dataclasses

    if kinds == "none":
        return cfg, evs
    cfg = dataclasses.replace(cfg, metrics=kinds_metrics(kinds))
    out, i = [], 0
    for e in evs:
        if e["type"] == "metric":
            e = dict(e, metric=KIND_EVENT_METRICS[i % len(KIND_EVENT_METRICS)])
            i += 1
        out.append(e)
    return cfg, out


def traffic(n: int, seed: int = 0, experiment: str | None = None, kinds: str = "none"):
    """``n`` simulated events of one experiment, in event-time order; event
    times a month in the past (workers reject the future); ``kinds``: its
    metrics (``with_kinds``)."""
    from streams.dev.simulate import make_traffic

    experiment = experiment or f"bench-{uuid.uuid4().hex[:8]}"
    start = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS
    units = max(10, math.ceil(n / 1.7) + 10)
    while True:
        cfg, evs, _ = make_traffic(units, 8.0, experiment, seed, 86_400, start)
        if len(evs) >= n:
            break
        units = math.ceil(units * 1.3 * n / max(1, len(evs)))
    evs.sort(key=lambda e: e["ts"])
    return with_kinds(cfg, evs[:n], kinds)


def redis_db_url(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` of the same server."""
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, f"/{db}", u.query, u.fragment))


def redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


def command_usec(r) -> dict[str, tuple[int, int]]:
    """(calls, server µs) per command so far (``INFO commandstats``); commands
    a script runs are counted under their own names as well as in the
    script's EVALSHA."""
    return {k: (int(v["calls"]), int(v["usec"])) for k, v in r.info("commandstats").items()}


def command_diff(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """Calls and µs per command between two ``command_usec`` snapshots."""
    out = {}
    for k, (calls, usec) in after.items():
        c0, u0 = before.get(k, (0, 0))
        if calls > c0:
            out[k] = (calls - c0, usec - u0)
    return out


def split_commands(cmds: dict[str, tuple[int, int]]) -> tuple[int, float, dict]:
    """A ``command_diff`` split into (script calls, script seconds, the other
    commands -- those the scripts ran, and the client's own -- without INFO)."""
    calls = sum(cmds.get(k, (0, 0))[0] for k in SCRIPT_COMMANDS)
    secs = sum(cmds.get(k, (0, 0))[1] for k in SCRIPT_COMMANDS) / 1e6
    rest = {k: v for k, v in cmds.items() if k not in SCRIPT_COMMANDS + ("cmdstat_info",)}
    return calls, secs, rest


class PartitionReader:
    """Reads a pre-produced topic the way a live worker sees it: partitions
    interleaved, about ``batch_size / partitions`` records from each in turn.

    One librdkafka consumer over all partitions would hand out one partition's
    backlog before the next (it drains its prefetch queue partition by
    partition: measured runs of ~10k records at 30k). Ingest would then see
    one partition's event-time clock run hours ahead of the others and count
    their metrics as ``late`` (43% of the bench's metrics), which skips their
    unit writes and flatters (b). So each partition gets its own consumer
    (assigned, no group), read in rotation; (a) reads the same way, and each
    run reports the share of metrics counted late.
    """

    def __init__(self, conf: dict, topic: str, partitions: int):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumers = []
        for p in range(partitions):
            c = Consumer(kafka_config(conf, **{"group.id": f"bench-{uuid.uuid4().hex}",
                                               "enable.auto.commit": False,
                                               "auto.offset.reset": "earliest"}))
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
            self.consumers.append(c)
        self._next = 0

    def consume(self, n: int, timeout: float) -> list:
        """Up to ``n`` records: ``n / partitions`` from each partition in
        turn, waiting at most ``timeout`` in all when none has any."""
        per = max(1, n // len(self.consumers))
        out: list = []
        deadline = time.monotonic() + timeout
        while not out:
            for _ in range(len(self.consumers)):
                c = self.consumers[self._next]
                self._next = (self._next + 1) % len(self.consumers)
                out += [m for m in c.consume(per, 0) if m.error() is None]
            if out or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        return out

    def close(self) -> None:
        for c in self.consumers:
            c.close()


# ---------------------------------------------------------------- (a) and (b)


#: passes of (a) per report: the median's is kept (``run_raw_median``)
RAW_REPEATS = 5


def run_raw(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
            timeout: float = 300.0) -> dict:
    c = PartitionReader(conf, topic, partitions)
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
    from streams.ingest.ingestor import BatchResult, Ingestor
    from streams.state.registry import Registry
    from streams.state.store import claim_partition

    ing = Ingestor(r, Registry(r))
    c = PartitionReader(conf, topic, partitions)
    # owner epochs as the worker claims them: the fenced commit, the unit cache
    epochs = {p: claim_partition(r, topic, p) for p in range(partitions)}
    got = 0
    total = BatchResult()
    try:
        deadline = time.monotonic() + timeout
        while got < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest: {got}/{n} records after {timeout:.0f}s")
            msgs = c.consume(batch_size, 1.0)
            if not msgs:
                continue
            if clock is not None and "t0" not in clock:  # starts at the first fetched batch
                clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()
            groups: dict[int, list] = defaultdict(list)
            for m in msgs:
                groups[m.partition()].append((m.offset(), m.value()))
            now_ms = int(time.time() * 1000)
            for part, batch in groups.items():
                res = ing.process(topic, part, batch, now_ms, epochs[part])
                total.counts.update(res.counts)
                total.dead_letters.extend(res.dead_letters[:5])
            got += len(msgs)
    finally:
        c.close()
    return got, total


def run_raw_median(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
                   repeats: int = RAW_REPEATS) -> dict:
    """(a) ``repeats`` times, the run of median CPU kept (all CPU times in
    ``cpu_s_runs``). One pass over 50k records is ~0.1 s of CPU, and how much
    librdkafka prefetched before the clock started swings it by ±30%; every
    ratio of the report divides by it, so one pass made the ratio as noisy."""
    runs = sorted((run_raw(conf, topic, partitions, n, batch_size) for _ in range(repeats)),
                  key=lambda r: r["cpu_s"])
    return {**runs[len(runs) // 2], "cpu_s_runs": [r["cpu_s"] for r in runs]}


def late_share(c: dict[str, int]) -> float:
    """Share of the metrics that reached their unit but came after it matured."""
    late = c.get("late", 0)
    return late / max(1, late + c.get("metric_applied", 0))


def run_ingest(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
               redis_url: str, cfg) -> dict:
    import redis

    from streams.state.registry import Registry

    r = redis.Redis.from_url(redis_url)
    try:
        Registry(r).put(cfg)
        rc0, cs0 = redis_cpu(r), command_usec(r)
        clock: dict = {}
        got, total = ingest_loop(conf, topic, partitions, n, batch_size, r, clock=clock)
        wall = time.perf_counter() - clock["t0"]
        cpu = time.process_time() - clock["c0"]
        rcpu = redis_cpu(r) - rc0
        lua_calls, lua_s, state_cmds = split_commands(command_diff(cs0, command_usec(r)))
        cnt = read_counters(r, cfg.experiment_id)
    finally:
        r.close()
    dead = sum(v for k, v in total.counts.items() if k.startswith("dead_letter:"))
    return {"events": got, "applied": sum(cnt.values()), "late_share": late_share(cnt),
            "dead_letters": dead,
            "counts": dict(total.counts), "counters": dict(cnt),
            "wall_s": wall, "cpu_s": cpu, "redis_cpu_s": rcpu,
            "lua_calls": lua_calls, "lua_server_s": lua_s,
            "command_server_s": sum(u for _, u in state_cmds.values()) / 1e6,
            "rate": got / wall, "rate_per_core": got / (cpu + rcpu)}


def cost_floor(values: list[bytes], raw: dict, ingest: dict) -> dict:
    """What any ingest that keeps the state of docs/architecture.md#state must spend per event,
    in µs of CPU, measured in this run: (a)'s consume + decode, the
    validation beyond the decode (``parse_event_row`` minus ``orjson.loads``,
    timed here over the same values), and the Redis server's time in the
    commands themselves (dedupe entry, unit record, routing index, pending
    set: ``INFO commandstats`` during (b), without the Lua around them).
    Against it, the budget the goal allows: 5x (a)'s cost per event."""
    from schemas.validate import parse_event_row

    now_ms = int(time.time() * 1000)

    def per_event(fn) -> float:
        best = math.inf
        for _ in range(2):
            c0 = time.process_time()
            fn()
            best = min(best, time.process_time() - c0)
        return best / len(values) * 1e6

    decode = per_event(lambda: [orjson.loads(v) for v in values])
    validate = per_event(lambda: [parse_event_row(v, 0, now_ms=now_ms) for v in values])
    raw_us = 1e6 / raw["rate_per_core"]
    parts = {"consume_decode_us": raw_us, "validation_us": max(0.0, validate - decode),
             "redis_commands_us": ingest["command_server_s"] / ingest["events"] * 1e6}
    return {**parts, "floor_us": sum(parts.values()), "budget_us": 5 * raw_us,
            "ingest_us": 1e6 / ingest["rate_per_core"],
            "ingest_client_us": ingest["cpu_s"] / ingest["events"] * 1e6,
            "ingest_redis_us": ingest["redis_cpu_s"] / ingest["events"] * 1e6}


# ---------------------------------------------------------------- profile


#: (label, how to find the function in the profile: (file suffix, function name), and any
#: other way it may appear: the compiled rules (``streams.native``) are a C method to cProfile)
PROFILE_PARTS: list[tuple] = [
    ("kafka consume (librdkafka poll)", ("~", "<method 'consume' of 'cimpl.Consumer' objects>")),
    ("validation (parse_event_row)", ("schemas/validate.py", "parse_event_row")),
    ("  of which: orjson.loads", ("~", "<orjson.loads>")),
    ("registry lookups (Registry.get_many)", ("streams/state/registry.py", "get_many")),
    ("routing (route_rows: unit index, one pipelined round trip)",
     ("streams/state/store.py", "route_rows")),
    ("apply (apply_rows_owned: reads, rules, commit)",
     ("streams/state/partition_store.py", "apply_rows_owned"),
     ("~", "<built-in method streams.state.partition_store.apply_rows_owned>")),
    ("  of which: the rules (ExperimentState.apply_rows)",
     ("streams/state/semantics.py", "apply_rows"),
     ("~", "<method 'apply_rows' of 'ExperimentState' objects>")),
    ("  of which: the commit (WATCH, checks, MULTI/EXEC)",
     ("streams/state/partition_store.py", "commit")),
    ("  of which: unit records (encode_units)",
     ("streams/state/unit_records.py", "encode_units")),
    ("all redis-py pipelines (Pipeline.execute)", ("redis/client.py", "execute")),
    ("dead-letter records", ("schemas/contracts.py", "dead_letter_record")),
    ("ingest watermark (HSET)", ("redis/commands/core.py", "hset")),
    ("all Redis socket reads (waiting on the server)",
     ("~", "<method 'recv' of '_socket.socket' objects>")),
    ("all Redis socket writes", ("~", "<method 'sendall' of '_socket.socket' objects>")),
]


#: the parts of ``PROFILE_PARTS`` called by the owner's apply (``apply_rows_owned``)
OWNER_PARTS = ("  of which: the rules", "  of which: the commit", "  of which: unit records")


def profile_ingest(conf: dict, topic: str, partitions: int, n: int, batch_size: int,
                   redis_url: str, cfg, top: int = 15) -> dict:
    import redis

    from streams.state.registry import Registry

    r = redis.Redis.from_url(redis_url)
    prof = cProfile.Profile()
    try:
        Registry(r).put(cfg)
        cs0 = command_usec(r)
        t0 = time.perf_counter()
        prof.enable()
        ingest_loop(conf, topic, partitions, n, batch_size, r)
        prof.disable()
        wall = time.perf_counter() - t0
        _, lua_s, state_cmds = split_commands(command_diff(cs0, command_usec(r)))
    finally:
        r.close()
    # the commands the scripts ran inside Redis (their own time, not the Lua around them)
    cmds = [{"command": k.removeprefix("cmdstat_").upper(), "calls": calls,
             "seconds": usec / 1e6} for k, (calls, usec) in state_cmds.items()]
    cmds.sort(key=lambda c: -c["seconds"])
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    parts: list[dict[str, Any]] = []
    # the owner's apply compiled (``streams.native``): what it calls runs as C calls
    # from C, which cProfile does not see, so its parts are not separable
    opaque = native.status().get("streams.state.partition_store", "").startswith("compiled")
    for label, *where in PROFILE_PARTS:
        if opaque and label.startswith(OWNER_PARTS):
            parts.append({"part": label, "seconds": None, "share": None,
                          "why": "inside the compiled owner (streams.native): not seen by "
                                 "cProfile"})
            continue
        ct = sum(v[3] for (f, _, name), v in st.stats.items()  # type: ignore[attr-defined]
                 if any(name == fname and f.endswith(fsuffix) for fsuffix, fname in where))
        parts.append({"part": label, "seconds": ct, "share": ct / total if total else 0.0})
    parts.append({"part": "Redis server time in scripts (per batch: positions; INFO commandstats)",
                  "seconds": lua_s, "share": lua_s / total if total else 0.0})
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


#: seconds between two reads of the worker's /metrics: the least (before its
#: first event and near its last, the end's precision) and the most
POLL_MIN_S = 0.02
POLL_MAX_S = 0.5


def poll_wait(got: float, n: int, n0: float, first: float | None, now: float) -> float:
    """Seconds until ``run_worker`` reads the worker's /metrics again.

    Why not every ``POLL_MIN_S``: each read costs the worker CPU that the
    measurement counts as ingest (an HTTP connection, the page, a Redis round
    trip for the loss counters), ~0.25 s of ~3 s for 100,000 events at 50
    reads a second (issue 25's worker profile), where Prometheus reads every
    15 s. So while far from ``n`` it waits half the time the rate so far
    says is left, at most ``POLL_MAX_S``: a few dozen reads in all, and the
    last ones ``POLL_MIN_S`` apart as before."""
    if first is None or got <= n0 or now <= first:
        return POLL_MIN_S
    left_s = (n - got) / ((got - n0) / (now - first))
    return min(POLL_MAX_S, max(POLL_MIN_S, left_s / 2))


def run_worker(bootstrap: str, topic: str, partitions: int, n: int, batch_size: int,
               redis_url: str, cfg, timeout: float = 300.0) -> dict:
    """A real ``liftstream worker --role ingest`` on the topic; rate from its
    /metrics between the first and the last event received."""
    import psutil
    import redis

    from streams.dev.embedded import free_port
    from streams.service.experiments import publish_experiment
    from streams.service.topics import ensure_topics
    from streams.service.worker import topic_specs
    from streams.state.registry import Registry

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
            time.sleep(poll_wait(got, n, n0, first, now))
        cnt = read_counters(r, cfg.experiment_id)
    finally:
        stop_group(proc)
        r.close()
    span = max(t_end - first, 1e-9)
    counted = n - n0
    return {"events": n, "applied": sum(cnt.values()), "late_share": late_share(cnt),
            "startup_s": first - t_start,
            "first_batch_events": int(n0), "wall_s": span, "cpu_s": cpu, "redis_cpu_s": rcpu,
            "rate": counted / span,
            "rate_per_core": counted / (cpu + rcpu) if cpu + rcpu > 0 else float("nan")}


# ---------------------------------------------------------------- driver


def run(events: int = 100_000, partitions: int = 3, batch_size: int | None = None,
        bootstrap: str | None = None, redis_url: str | None = None, e2e: bool = True,
        profile: bool = True, seed: int = 0, kinds: str = "none") -> dict:
    from streams.dev.embedded import kafka_broker, redis_server
    from streams.dev.simulate import dumps, produce
    from streams.service.topics import TopicSpec, ensure_topics

    batch_size = batch_size or Settings.batch_size
    with ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(kafka_broker()).url
        if redis_url is None:
            redis_url = stack.enter_context(redis_server(appendonly=True)).url
        s = Settings.from_env(bootstrap_servers=bootstrap, redis_url=redis_url)
        conf = kafka_config(s)
        cfg, evs = traffic(events, seed, kinds=kinds)
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
            "experiment_id": cfg.experiment_id, "topic": topic, "kinds": kinds,
            "metrics": [{"name": m.name, "kind": m.kind} for m in cfg.metrics],
            # compiled or pure-Python rules: this process's, and the worker's (same env, files)
            "native": native.status()}
        out["raw"] = run_raw_median(conf, topic, partitions, n, batch_size)
        out["ingest"] = run_ingest(conf, topic, partitions, n, batch_size,
                                   redis_db_url(redis_url, base), cfg)
        out["ratio"] = out["ingest"]["rate"] / out["raw"]["rate"]
        out["ratio_per_core"] = out["ingest"]["rate_per_core"] / out["raw"]["rate_per_core"]
        out["floor"] = cost_floor([dumps(e) for e in evs], out["raw"], out["ingest"])
        if kinds == "mixed":  # the same records with three sums: the kinds' extra cost
            import dataclasses

            sums = dataclasses.replace(cfg, metrics=kinds_metrics("sum"))
            out["ingest_sums"] = run_ingest(conf, topic, partitions, n, batch_size,
                                            redis_db_url(redis_url, base + 3), sums)
            out["kinds_cost"] = kinds_cost(out["ingest"], out["ingest_sums"])
        if e2e:
            try:
                out["worker"] = run_worker(bootstrap, topic, partitions, n, batch_size,
                                           redis_db_url(redis_url, base + 1), cfg)
                out["worker_ratio"] = out["worker"]["rate"] / out["raw"]["rate"]
                out["worker_ratio_per_core"] = (out["worker"]["rate_per_core"]
                                                / out["raw"]["rate_per_core"])
                out["targets"] = targets(out)
            except Exception as e:  # noqa: BLE001 - report, keep (a) and (b)
                out["worker"] = {"error": str(e)[-2000:]}
        if profile:
            out["profile"] = profile_ingest(conf, topic, partitions, n, batch_size,
                                            redis_db_url(redis_url, base + 2), cfg)
    return out


def _cpu_us(b: dict) -> tuple[float, float]:
    """(client, Redis) CPU µs per event of an ``run_ingest`` result."""
    n = max(1, b["events"])
    return 1e6 * b["cpu_s"] / n, 1e6 * b["redis_cpu_s"] / n


def kinds_cost(mixed: dict, sums: dict) -> dict:
    """CPU µs per event of (b) with a conversion and a ratio metric present
    against the same records folded as sums only (issue 26)."""
    mc, mr = _cpu_us(mixed)
    sc, sr = _cpu_us(sums)
    return {"mixed_client_us": mc, "mixed_redis_us": mr, "mixed_us": mc + mr,
            "sums_client_us": sc, "sums_redis_us": sr, "sums_us": sc + sr,
            "extra_share": (mc + mr) / max(1e-12, sc + sr) - 1.0}


#: issue 25's goals for the worker end to end: Redis CPU per event, and
#: events per CPU-second (client + Redis) as a share of the raw consumer's
TARGET_REDIS_US = 3.0
TARGET_CPU_RATIO = 0.12


def targets(res: dict) -> dict:
    """The worker's figures against issue 25's goals (same run)."""
    w = res["worker"]
    counted = max(1, w["events"] - w["first_batch_events"])
    redis_us = 1e6 * w["redis_cpu_s"] / counted
    ratio = res["worker_ratio_per_core"]
    return {"worker_redis_us_per_event": redis_us, "redis_us_goal": TARGET_REDIS_US,
            "redis_us_met": redis_us <= TARGET_REDIS_US,
            "worker_events_per_cpu_s_vs_raw": ratio, "cpu_ratio_goal": TARGET_CPU_RATIO,
            "cpu_ratio_met": ratio >= TARGET_CPU_RATIO}


def format_report(res: dict) -> str:
    a, b = res["raw"], res["ingest"]
    kinds = res.get("kinds", "none")
    lines = [f"bench ingest: {res['events']} events, {res['partitions']} partitions, batch "
             f"{res['batch_size']}, {res['cores']} cores (Redis and the broker share them); "
             f"broker {res['broker']}"
             + ("" if kinds == "none" else "; metrics " + ", ".join(
                 f"{m['name']} ({m['kind']})" for m in res["metrics"])),
             "rules: " + "; ".join(f"{m} {how}" for m, how in res.get("native", {}).items()),
             f"{'':34}{'events/s':>12}{'wall s':>9}{'client cpu s':>14}{'redis cpu s':>13}"
             f"{'ev/cpu-s':>11}",
             f"{'(a) raw consume + orjson':34}{a['rate']:12.0f}{a['wall_s']:9.2f}"
             f"{a['cpu_s']:14.2f}{'-':>13}{a['rate_per_core']:11.0f}",
             f"{'(b) Ingestor.process -> Redis':34}{b['rate']:12.0f}{b['wall_s']:9.2f}"
             f"{b['cpu_s']:14.2f}{b['redis_cpu_s']:13.2f}{b['rate_per_core']:11.0f}"]
    w = res.get("worker")
    if w and "error" not in w:
        lines.append(f"{'(c) worker end to end':34}{w['rate']:12.0f}{w['wall_s']:9.2f}"
                     f"{w['cpu_s']:14.2f}{w['redis_cpu_s']:13.2f}{w['rate_per_core']:11.0f}")
    lines.append(f"(b)/(a): {res['ratio']:.1%} wall, {res['ratio_per_core']:.1%} per core "
                 f"(goal: >= 20% per core); (b) applied {b['applied']}/{b['events']} events, "
                 f"{b['late_share']:.1%} of metrics late, "
                 f"{b['dead_letters']} dead letters, {b['lua_calls']} script calls "
                 f"({b['lua_server_s']:.2f} s in Redis)")
    f = res.get("floor")
    if f:
        lines.append(f"per event (CPU µs): (b) {f['ingest_us']:.1f} = client "
                     f"{f['ingest_client_us']:.1f} + Redis {f['ingest_redis_us']:.1f}; the goal "
                     f"allows {f['budget_us']:.1f}; the floor of any ingest keeping this state "
                     f"(no rules, no protocol) is {f['floor_us']:.1f} = consume+decode "
                     f"{f['consume_decode_us']:.1f} + validation {f['validation_us']:.1f} + "
                     f"Redis commands {f['redis_commands_us']:.1f}")
    k = res.get("kinds_cost")
    if k:
        lines.append(f"kinds (b): {k['mixed_us']:.1f} CPU µs per event (client "
                     f"{k['mixed_client_us']:.1f} + Redis {k['mixed_redis_us']:.1f}) with a "
                     f"conversion and a ratio against {k['sums_us']:.1f} (client "
                     f"{k['sums_client_us']:.1f} + Redis {k['sums_redis_us']:.1f}) with the "
                     f"same event metrics as sums: {k['extra_share']:+.1%}")
    if w and "error" not in w:
        lines.append(f"(c)/(a): {res['worker_ratio']:.1%} wall, "
                     f"{res['worker_ratio_per_core']:.1%} per core (goal: >= 10%), "
                     f"client {1e6 * w['cpu_s'] / w['events']:.1f} + Redis "
                     f"{1e6 * w['redis_cpu_s'] / w['events']:.1f} CPU µs per event; "
                     "worker start-up to first "
                     f"event {w['startup_s']:.1f} s (not counted); applied "
                     f"{w['applied']}/{w['events']} ({w['late_share']:.1%} of metrics late)")
        t = res.get("targets")
        if t:
            lines.append(f"issue 25 goals: worker Redis {t['worker_redis_us_per_event']:.2f} "
                         f"CPU µs per event (goal <= {t['redis_us_goal']}: "
                         f"{'met' if t['redis_us_met'] else 'NOT met'}); events per "
                         f"CPU-second {t['worker_events_per_cpu_s_vs_raw']:.1%} of raw's "
                         f"(goal >= {t['cpu_ratio_goal']:.0%}: "
                         f"{'met' if t['cpu_ratio_met'] else 'NOT met'})")
    elif w:
        lines.append(f"(c) worker: failed: {w['error'][-500:]}")
    p = res.get("profile")
    if p:
        lines.append(f"profile of (b) (cProfile, {p['profiled_s']:.2f} s profiled, "
                     f"{p['wall_s']:.2f} s wall; cumulative, parts overlap where indented "
                     "or 'all'):")
        for part in p["parts"]:
            if part["seconds"] is None:
                lines.append(f"  {part['part']:52}{'-':>8}   {part['why']}")
                continue
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
              e2e=not args.no_worker, profile=not args.no_profile, seed=args.seed,
              kinds=getattr(args, "kinds", "none"))
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
    (as ``tests/integration/test_streaming.py::test_latency``), timed at its pub/sub notice."""
    import threading

    import numpy as np
    import redis
    from confluent_kafka import Producer

    from schemas.codec import dumps, loads
    from schemas.records import ExperimentConfig
    from streams.dev.embedded import kafka_broker, redis_server
    from streams.service.experiments import publish_experiment
    from streams.service.topics import ensure_topics
    from streams.service.worker import topic_specs
    from streams.state.keys import NOTICE_CHANNEL
    from streams.state.registry import Registry

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
            stop_group(proc)
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
