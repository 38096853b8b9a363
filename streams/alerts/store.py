"""Alert state in Redis around the pure evaluator ``streams.alerts.rules``.

After a sampler tick, each experiment's new records are evaluated against the
alert state stored at ``lr:{e:<id>}:alerts`` (JSON); transitions (firing /
resolved) are returned for the alerts topic and appended to
``lr:{e:<id>}:alert-log`` (newest first, capped) for the API and dashboard.
State and log are written in one MULTI under a WATCH of the state (two
samplers racing evaluate in turn, never both from the same state), after
which the caller publishes; a
crash in between re-evaluates nothing (the state already moved), so an alert
may be lost on the topic but never duplicated — the log in Redis has it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from redis.exceptions import WatchError

from schemas.codec import dumps, loads
from streams.alerts.rules import evaluate
from streams.state.keys import alert_log_key, alerts_key
from streams.state.registry import Registry

ALERT_LOG_LEN = 500


def state_key(eid: str) -> str:
    return alerts_key(eid)


def log_key(eid: str) -> str:
    return alert_log_key(eid)


def process(r: Any, registry: Registry, records: list[dict], now_ms: int) -> list[dict]:
    """Evaluate alerts for every experiment in ``records``; returns transitions."""
    by_exp: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_exp[rec["experiment_id"]].append(rec)
    out: list[dict] = []
    for eid, recs in sorted(by_exp.items()):
        cfg = registry.get(eid)
        if cfg is None:
            continue
        out.extend(_transition(r, cfg, eid, recs, now_ms))
    return out


def _transition(r: Any, cfg, eid: str, recs: list[dict], now_ms: int) -> list[dict]:
    """Read the alert state, evaluate, write state and log: atomically
    (WATCH on the state; on a concurrent change, evaluate again on the new
    state), so two samplers never both fire the same transition."""
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(state_key(eid))
                raw = pipe.get(state_key(eid))
                alerts, state = evaluate(cfg, recs, loads(raw) if raw else None, now_ms)
                pipe.multi()
                pipe.set(state_key(eid), dumps(state))
                for a in alerts:
                    pipe.lpush(log_key(eid), dumps(a))
                if alerts:
                    pipe.ltrim(log_key(eid), 0, ALERT_LOG_LEN - 1)
                pipe.execute()
                return alerts
            except WatchError:
                continue


def recent(r: Any, eid: str, n: int = 100) -> list[dict]:
    return [loads(x) for x in r.lrange(log_key(eid), 0, n - 1)]
