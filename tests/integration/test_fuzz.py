"""Bad input through the real pipeline (issue 4, "Bad input"; docs/architecture.md#contracts).

``test_fuzz_pipeline`` produces >= 10,000 random and mutated events (valid
exposures and metrics of simulated traffic, byte-level mutations of them,
wrong types, NaN/Infinity literals, huge numbers and payloads, ids with
``{ } |``, spaces and unicode, missing fields, non-objects, empty messages and
tombstones, unknown experiments and variants, timestamps far in the future,
random garbage) with confluent-kafka to a single-partition events topic, read
by one real ``role=ingest`` worker (with its web server, to scrape
``/metrics``) with one registered experiment, and checks:

* zero crashes: the worker is alive throughout and never restarted, and its
  log has no ``fatal``;
* every invalid input is on the dead-letter topic, exactly once, matched by
  its source partition/offset, with the reason code the validator gives
  (``unknown_experiment`` / ``unknown_variant`` for well-formed events of an
  unregistered experiment / a variant the config lacks), and nothing else is;
* every valid input is applied: Redis state equals the reference reducer
  (``streams.state.semantics.Reducer``) on the valid events in offset order;
* counters agree: dead letters on the topic == invalid inputs == the sum of
  ``liftstream_dead_letters_total`` on ``/metrics``, per reason too.

The generator is a seeded ``random.Random`` (reproducible; the seed is in the
failure message), not hypothesis: one fixed corpus of 10k+ messages through a
worker is the expensive part, and shrinking across a Kafka round trip would
not help. ``test_fuzz_parse_event_hypothesis`` is the fast, shrinking unit
fuzz of the validator (no exception but ``InvalidRecord`` for any bytes).

``test_fuzz_parse_event_atheris`` (slow, skipped unless ``atheris`` is
installed: ``pip install atheris``, a manylinux wheel for CPython 3.11; not in
the dev extra because it is 35 MB and only useful for long runs) runs
libFuzzer, coverage-guided over ``schemas.validate``, on ``parse_event`` in a
subprocess for a bounded number of runs, seeded with valid events: any
exception but ``InvalidRecord`` is a crash.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from base64 import b64decode
from collections import Counter

import pytest
import redis

from schemas.codec import loads
from schemas.records import Exposure
from schemas.validate import MAX_EVENT_BYTES, InvalidRecord, parse_event
from streams.dev.simulate import make_traffic
from streams.ingest.ingestor import ingest_offsets
from streams.state.semantics import Reducer
from streams.state.store import too_old
from tests.support.streaming_harness import (
    REPO,
    assert_state_close,
    consume_all,
    make_stack,
    producer,
    scrape,
    settle_all,
    start_web_worker,
    wait_until,
)

DAY_MS = 86_400_000
START = (int(time.time() * 1000) // DAY_MS - 30) * DAY_MS
SEED = 20_240_417
EID = "fz"


# ------------------------------------------------------------------ the generator

BAD_IDS = ["a{b", "a}b", "{e:x}", "a|b", "a b", " lead", "trail ", "é", "ünï", "😀", "a\nb",
           "a\x00b", "a*b", "a?b", "a[b]", "\"q\"", "", "x" * 129, "-lead", "a/b", "a:b",
           "\u202e", "tab\t", "a\\b"]
WRONG = [True, False, None, [], {}, [1, 2], {"a": 1}, "", "12", 1.5, 7, -1, 2**70]
REQUIRED = {"exposure": ["type", "event_id", "experiment_id", "unit_id", "variant", "ts"],
            "metric": ["type", "event_id", "unit_id", "metric", "value", "ts"]}


def _raw(d) -> bytes:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode("utf-8",
                                                                            "surrogatepass")


def _literal(d: dict, field: str, token: str) -> bytes:
    """``d`` as JSON with ``field``'s value replaced by a raw token (NaN, 1e999...)."""
    marker = "__LITERAL__"
    return _raw({**d, field: marker}).replace(f'"{marker}"'.encode(), token.encode())


def mutate(rng: random.Random, base: dict, now_ms: int) -> tuple[str, bytes | None]:
    """One mutated message from a valid event dict: (category, bytes)."""
    d = dict(base)
    kind = d["type"]
    cat = rng.choice(["bytes", "bytes", "bytes", "wrong_type", "non_finite", "huge_number",
                      "huge_payload", "bad_id", "missing", "non_object", "empty",
                      "unknown_experiment", "unknown_variant", "future", "garbage",
                      "no_experiment", "version", "extra_fields", "ts_float", "truncate"])
    if cat == "bytes":
        b = bytearray(_raw(d))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(b)) if b else 0
            if op < 0.4 and b:
                b[i] = rng.randrange(256)
            elif op < 0.6 and b:
                b[i] ^= 1 << rng.randrange(8)
            elif op < 0.8:
                b[i:i] = bytes([rng.choice(b'{}[]",:0123456789.eE-+ \\nulltruefalse\xff\xc3')])
            elif b:
                del b[i]
        return cat, bytes(b)
    if cat == "truncate":
        b = _raw(d)
        return cat, b[:rng.randrange(len(b))]
    if cat == "wrong_type":
        f = rng.choice([k for k in d if k != "type"] + ["type"])
        d[f] = rng.choice(WRONG)
        return cat, _raw(d)
    if cat == "non_finite":
        f = rng.choice(["value", "ts", "pre_activity"])
        tok = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
        return cat, _literal(d, f, tok)
    if cat == "huge_number":
        f = rng.choice(["ts", "value" if kind == "metric" else "pre_activity"])
        tok = rng.choice(["1e300", "-1e300", "1" + "0" * 400, "123456789012345678901234567890",
                          "1e13", "-5", "0"])
        return cat, _literal(d, f, tok)
    if cat == "huge_payload":
        n = rng.choice([MAX_EVENT_BYTES + 1, 70_000, 150_000, 300_000])
        d["pad"] = "x" * n
        return cat, _raw(d)
    if cat == "bad_id":
        f = rng.choice(["event_id", "unit_id"] + (["experiment_id", "variant"] if kind ==
                                                  "exposure" else ["metric", "experiment_id"]))
        d[f] = rng.choice(BAD_IDS)
        return cat, _raw(d)
    if cat == "missing":
        del d[rng.choice(REQUIRED[kind])]
        return cat, _raw(d)
    if cat == "non_object":
        return cat, rng.choice([b"[]", b"1", b'"s"', b"null", b"true", b"[" + _raw(d) + b"]",
                                b"3.5", b'"' + _raw(d).replace(b'"', b'\\"') + b'"'])
    if cat == "empty":
        return cat, rng.choice([b"", None, b" ", b"\n"])
    if cat == "unknown_experiment":
        d["experiment_id"] = rng.choice(["nope", "fz2", "FZ", "other.exp"])
        return cat, _raw(d)
    if cat == "unknown_variant":
        if kind == "exposure":
            d["variant"] = rng.choice(["ghost", "Control", "treatment2"])
        else:
            d["metric"] = rng.choice(["ghost_metric", "Value"])  # valid: unknown_metric
        return cat, _raw(d)
    if cat == "future":
        d["ts"] = now_ms + rng.choice([3 * DAY_MS, 365 * DAY_MS, 10**15])
        return cat, _raw(d)
    if cat == "garbage":
        return cat, bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    if cat == "no_experiment":
        d.pop("experiment_id", None)  # valid for metrics (routed), missing for exposures
        return cat, _raw(d)
    if cat == "version":
        d["schema_version"] = rng.choice([1, 2, 0, "1", None, 1.0])
        return cat, _raw(d)
    if cat == "extra_fields":
        d[rng.choice(["x", "é", "pad"])] = "y" * rng.randint(0, 20_000)
        return cat, _raw(d)
    # ts_float: integral floats are accepted, fractional ones are not
    d["ts"] = float(d["ts"]) + rng.choice([0.0, 0.5])
    return cat, _raw(d)


def corpus(valid: list[dict], n_bad: int, seed: int, now_ms: int):
    """Valid events in order with ``n_bad`` mutants interleaved at random places."""
    rng = random.Random(seed)
    slots = sorted(rng.randrange(len(valid) + 1) for _ in range(n_bad))
    out: list[tuple[str, bytes | None]] = []
    j = 0
    for i, ev in enumerate(valid):
        while j < len(slots) and slots[j] == i:
            out.append(mutate(rng, rng.choice(valid[max(0, i - 50):i + 1]), now_ms))
            j += 1
        out.append(("valid", _raw(ev)))
    while j < len(slots):
        out.append(mutate(rng, rng.choice(valid), now_ms))
        j += 1
    return out


#: ``classify``'s key of a message keyed by its own unit id
BY_UNIT = object()


def classify(raw: bytes | None, now_ms: int, cfg, key: bytes | None | object = BY_UNIT
             ) -> tuple[str | None, object | None]:
    """What ingest must do with ``raw`` keyed ``key``: (dead-letter code or
    None, parsed event or None).

    Mirrors docs/architecture.md#contracts: validation failure -> its code; a
    valid event whose Kafka key is not its unit_id -> ``key_mismatch`` (not
    applied, moves no clock); a well-formed event of
    an unregistered experiment -> ``unknown_experiment`` (not applied); an
    exposure with a variant the config lacks -> ``unknown_variant`` *and*
    applied (counted, moves the clock)."""
    try:
        if raw is None:
            raise InvalidRecord("not_json", "tombstone")
        ev = parse_event(raw, now_ms=now_ms)
    except InvalidRecord as e:
        return e.code, None
    if key is not BY_UNIT and key != ev.unit_id.encode():
        return "key_mismatch", None
    if ev.experiment_id is not None and ev.experiment_id != cfg.experiment_id:
        return "unknown_experiment", None
    if isinstance(ev, Exposure) and ev.variant not in cfg.variants:
        return "unknown_variant", ev
    return None, ev


# ------------------------------------------------------------------ fixtures

# ------------------------------------------------------------------ the pipeline fuzz

@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fuzz_pipeline(kafka_bootstrap, redis_url, tmp_path, workers):
    t_start = time.monotonic()
    st = make_stack(kafka_bootstrap, redis_url, tmp_path, "fuzz", partitions=1)
    st.create_topics()
    cfg, valid, _ = make_traffic(2600, 8, EID, seed=5, window_seconds=86_400, started_at=START)
    st.register([cfg])
    now_ms = int(time.time() * 1000)
    msgs = corpus(valid, n_bad=max(5600, 10_000 - len(valid)), seed=SEED, now_ms=now_ms)
    assert len(msgs) >= 10_000

    w = start_web_worker(workers, st, "ingest")

    # produce every message raw, in order; keys: a valid event's unit id (but
    # one in 20 keyed otherwise: key_mismatch), else a unit id, random bytes or none
    rng = random.Random(SEED + 1)
    keys: list[bytes | None] = []
    for _, raw in msgs:
        key = rng.choice([None, b"u1", bytes(rng.randrange(256) for _ in range(8))])
        try:
            uid = parse_event(raw, now_ms=now_ms).unit_id.encode() if raw is not None else None
        except InvalidRecord:
            uid = None
        keys.append(uid if uid is not None and rng.random() >= 0.05 else key)
    prod = producer(st.bootstrap, **{"message.max.bytes": 1_000_000})
    where: list[tuple[int, int] | None] = [None] * len(msgs)
    errors: list = []

    def cb(i):
        def done(err, m):
            if err is not None:
                errors.append(err)
            else:
                where[i] = (m.partition(), m.offset())
        return done

    for i, ((_, raw), key) in enumerate(zip(msgs, keys, strict=True)):
        while True:
            try:
                prod.produce(st.events_topic, key=key, value=raw, on_delivery=cb(i))
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    assert prod.flush(60) == 0 and not errors, errors[:3]
    assert {p for p, _ in where} == {0}
    offsets = [o for _, o in where]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    last = offsets[-1]

    # what ingest must do with each, in offset order
    expect_dl: dict[int, str] = {}
    applied = []
    cats = Counter()
    clk = None  # the partition clock: max ts of every valid event so far
    for (cat, raw), off, key in zip(msgs, offsets, keys, strict=True):
        code, ev = classify(raw, now_ms, cfg, key)
        if ev is not None or code == "unknown_experiment":
            ts = parse_event(raw, now_ms=now_ms).ts
            clk = ts if clk is None or ts > clk else clk
        if code is None and isinstance(ev, Exposure) and too_old(cfg, ev.ts, clk):
            code = "exposure_too_old"  # dead-lettered and counted too_old
        cats[(cat, code is None or code in ("unknown_variant", "exposure_too_old"))] += 1
        if code is not None:
            expect_dl[off] = code
        if ev is not None:
            applied.append(ev)
    # categories that can never be valid
    for cat in ("non_finite", "huge_payload", "non_object", "empty", "unknown_experiment",
                "future", "missing"):
        assert cats[(cat, True)] == 0, (cat, "classified valid", SEED)

    # all applied: the worker's ingest offset reached the last message
    r = redis.Redis.from_url(redis_url)
    wait_until(lambda: ingest_offsets(r, st.events_topic).get(0, -1) >= last, 120,
               "every message ingested", workers=[w],
               info=lambda: str(ingest_offsets(r, st.events_topic)))

    # (1) dead letters: exactly the invalid ones, by source offset, with the code
    dls = consume_all(st.bootstrap, st.deadletter_topic,
                      lambda ms: len(ms) >= len(expect_dl), 60)
    time.sleep(1.0)  # anything extra would have been published in the same batches
    dls = consume_all(st.bootstrap, st.deadletter_topic, lambda ms: len(ms) >= len(dls), 30)
    got: dict[int, str] = {}
    for m in dls:
        rec = loads(m.value())
        src = rec["source"]
        assert src["topic"] == st.events_topic and src["partition"] == 0, src
        assert src["offset"] not in got, f"offset {src['offset']} dead-lettered twice"
        assert rec["reason"]["code"] and rec["reason"]["message"], rec["reason"]
        got[src["offset"]] = rec["reason"]["code"]
        i = offsets.index(src["offset"])
        raw = msgs[i][1] or b""
        assert b64decode(rec["original_b64"]) == raw[:len(b64decode(rec["original_b64"]))]
        assert rec["original_size"] == len(raw)
    missing = sorted(set(expect_dl) - set(got))
    extra = sorted(set(got) - set(expect_dl))
    assert not missing, f"seed {SEED}: not dead-lettered: {missing[:10]}"
    assert not extra, f"seed {SEED}: dead-lettered but valid: {extra[:10]}"
    wrong = {o: (got[o], expect_dl[o]) for o in got if got[o] != expect_dl[o]}
    assert not wrong, f"seed {SEED}: wrong reason codes (got, want): {list(wrong.items())[:10]}"

    # (2) every valid one applied: Redis == reference reducer on them, in order
    reducer = Reducer([cfg]).apply_all(applied, f"{st.events_topic}|0")
    settle_all(r, reducer, [cfg], st.events_topic, [0])
    assert_state_close(r, [cfg], reducer)

    # (3) counters: topic == invalid inputs == /metrics, per reason
    by_reason = Counter(expect_dl.values())
    text = wait_until(lambda: (b := w.get("/metrics")) and b.decode(), 30, "/metrics",
                      workers=[w])
    dl_metric = {re.search(r'reason="([^"]*)"', k).group(1): v
                 for k, v in scrape(text, "liftstream_dead_letters_total").items()}
    assert sum(dl_metric.values()) == len(dls) == len(expect_dl)
    assert dl_metric == {k: float(v) for k, v in by_reason.items()}
    ev_metric = scrape(text, "liftstream_events_total")
    assert ev_metric.get('outcome="received"') == len(msgs)

    # (4) zero crashes
    assert w.alive() and w.starts == 1, w.log_tail()
    assert "fatal" not in w.log_tail(200_000).lower()
    r.close()

    print(f"\n[fuzz] seed {SEED}: {len(msgs)} messages, {len(msgs) - len(expect_dl)} valid, "
          f"{len(expect_dl)} invalid, {len(dls)} dead-lettered, {len(applied)} applied "
          f"({by_reason['unknown_variant']} of them also dead-lettered as unknown_variant); "
          f"reasons {dict(sorted(by_reason.items()))}; "
          f"{time.monotonic() - t_start:.1f}s")


# ------------------------------------------------------------------ unit fuzz (fast)

def test_fuzz_parse_event_hypothesis():
    """Any bytes (random, or JSON objects with hostile values) -> a record or
    an ``InvalidRecord`` with a known code; never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as hs

    from schemas.validate import CODES

    scalar = (hs.none() | hs.booleans() | hs.integers() | hs.floats(allow_nan=True)
              | hs.text(max_size=40))
    value = hs.recursive(scalar, lambda c: hs.lists(c, max_size=3)
                         | hs.dictionaries(hs.text(max_size=8), c, max_size=3), max_leaves=8)
    field = hs.sampled_from(["type", "event_id", "experiment_id", "unit_id", "variant", "ts",
                             "metric", "value", "pre_activity", "pre", "schema_version"])
    good = hs.fixed_dictionaries({
        "type": hs.sampled_from(["exposure", "metric"]), "event_id": hs.just("e1"),
        "experiment_id": hs.just("x"), "unit_id": hs.just("u1"), "variant": hs.just("a"),
        "metric": hs.just("m"), "value": hs.just(1.0), "ts": hs.just(START)})

    @hs.composite
    def objects(draw):
        d = draw(good)
        for f, v in draw(hs.dictionaries(field, value, max_size=3)).items():
            d[f] = v
        raw = json.dumps(d, allow_nan=True).encode("utf-8", "surrogatepass")
        return raw

    @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
    @given(hs.binary(max_size=200) | objects())
    def check(raw):
        try:
            parse_event(raw, now_ms=START + DAY_MS)
        except InvalidRecord as e:
            assert e.code in CODES, e.code

    check()


def test_classify_labels_sound():
    """The generator's never-valid categories are rejected by the validator
    (pure, fast: the same corpus as the pipeline test, no broker)."""
    now_ms = int(time.time() * 1000)
    cfg, valid, _ = make_traffic(300, 8, EID, seed=5, window_seconds=86_400, started_at=START)
    msgs = corpus(valid, 3000, SEED, now_ms)
    seen = Counter()
    for cat, raw in msgs:
        code, _ = classify(raw, now_ms, cfg)
        seen[cat, code] += 1
        if cat in ("non_finite", "huge_payload", "non_object", "empty", "future", "missing",
                   "unknown_experiment"):
            assert code is not None and code != "unknown_variant", (cat, raw[:200] if raw
                                                                    else raw)
    assert sum(v for (c, code), v in seen.items() if code is not None) > 2000


ATHERIS_HARNESS = r"""
import sys, atheris
with atheris.instrument_imports():
    from schemas.validate import CODES, InvalidRecord, parse_event

NOW = int(sys.argv.pop(1))

def one(data: bytes) -> None:
    try:
        parse_event(data, now_ms=NOW)
    except InvalidRecord as e:
        if e.code not in CODES:
            raise AssertionError(f"unknown code {e.code}")

atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzz_parse_event_atheris(tmp_path):
    """Coverage-guided fuzzing of ``parse_event`` with atheris/libFuzzer."""
    pytest.importorskip("atheris", reason="atheris not installed (pip install atheris)")
    cfg, valid, _ = make_traffic(50, 4, EID, seed=2, window_seconds=86_400, started_at=START)
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for i, ev in enumerate(valid[:40]):
        (seeds / f"seed{i}").write_bytes(_raw(ev))
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS)
    res = subprocess.run([sys.executable, str(harness), str(START + 40 * DAY_MS),
                          "-runs=1000000", "-max_len=4096", "-seed=1", "-timeout=10",
                          f"-artifact_prefix={tmp_path}/", str(seeds)],
                         cwd=REPO, capture_output=True, timeout=540)
    out = res.stderr.decode(errors="replace")
    assert res.returncode == 0, out[-4000:]
    assert "Done 1000000 runs" in out or "DONE" in out, out[-2000:]
