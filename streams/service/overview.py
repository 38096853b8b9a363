"""What the dashboard may honestly show: the experiments' overview and each
estimate's reading (issue 29).

``read_overview`` summarises every registered experiment for the landing page
(``GET /experiments``): status, event-time span, units exposed and matured,
when the first units mature, the primary metric's (the config's first metric)
latest estimate per treatment, the open alerts and the events dropped. It reads
only the known keys of each experiment (``streams.state.keys``), every
experiment in one pipeline (a second, small one for the pending sets of the
experiments still waiting for their first matured unit): no keyspace scan.

``reading`` says, for one estimate record, which of its numbers mean
something, and why the others do not:

* no matured unit in the control or the treatment: the effect, lift and
  P(>0) are the prior's, not the data's; none is shown ("waiting for data");
* ``adjustment: "unavailable"``: why (no completed entry bucket, D = 0; or
  every unit in one activity stratum);
* the lift (effect ÷ the control mean) only where the control mean's 95%
  interval (``baseline``) excludes 0; a ratio to a mean that may be 0 is
  noise.

``read_ingest_losses`` gives what ingest lost outside any experiment, per
events partition (``store.ingest_losses``), with ``INGEST_LOSS_KINDS`` saying
what each kind counts: ``GET /experiments`` and ``/readyz`` carry it, the
overview page and ``liftstream experiments list`` show it (no experiment's
data quality can hold these, so a count nobody sees would be silent loss).

The pages (``static/overview.html``, ``static/dashboard.html``) show what
these say; they never decide it themselves.
"""

from __future__ import annotations

from typing import Any

from schemas.codec import loads
from schemas.records import ExperimentConfig
from streams.sampling.sampler import lifecycle_of
from streams.state.data_quality import data_quality_of
from streams.state.keys import (
    alerts_key,
    estimate_key,
    experiment_keys,
    lifecycle_key,
    meta_key,
    offsets_key,
    pending_index_field,
    pending_key,
)
from streams.state.pending import PendingIndex
from streams.state.semantics import config_ms
from streams.state.store import ingest_losses, read_max_ts

#: What each kind of ``read_ingest_losses`` counts, one line each (the pages
#: and the CLI say it beside the counts).
INGEST_LOSS_KINDS = {
    "retention_lost": "events the topic's retention deleted before ingest applied them",
    "unrouted_lost": "metrics without experiment_id whose unit never got a known exposure "
                     "(dropped over the hold bound, or expired)",
}


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_ingest_losses(r: Any, topic: str) -> dict[str, dict[str, int]]:
    """``store.ingest_losses`` of the events ``topic``, every kind of
    ``INGEST_LOSS_KINDS`` present, partitions as (JSON) string keys in order."""
    got = ingest_losses(r, topic)
    return {k: {str(p): n for p, n in sorted(got.get(k, {}).items())} for k in INGEST_LOSS_KINDS}


def lift_note(part: dict | None, has_data: bool) -> str | None:
    """Why ``part``'s (``adjusted`` or ``naive``) lift is not shown, or None
    when it is: only where the control mean's interval excludes 0."""
    if not has_data:
        return "no matured units yet"
    base = (part or {}).get("baseline")
    if not base or base.get("lo") is None or base.get("hi") is None:
        return "the control mean's interval is unknown"
    if base["lo"] <= 0 <= base["hi"]:
        return (f"the control mean's 95% interval [{base['lo']:+.3g}, {base['hi']:+.3g}] "
                "includes 0: a ratio to it is not defined")
    lift = (part or {}).get("lift") or {}
    if lift.get("mean") is None:
        return "the lift is undefined"
    return None


def adjustment_note(rec: dict) -> str | None:
    """Why the adjusted estimate equals the naive one (``adjustment:
    "unavailable"``), or None when it is adjusted."""
    if rec.get("adjustment") != "unavailable":
        return None
    if not (rec.get("watermark") or {}).get("completed_buckets"):
        return ("no completed entry bucket yet (D = 0): the population's activity mix "
                "is not identified, so adjusted = naive")
    seen = [s for s in rec.get("strata") or [] if s.get("n_exposed")]
    if len(seen) < 2:
        return ("units in one activity stratum only (exposures without pre_activity?): "
                "nothing to reweight, so adjusted = naive")
    return "adjustment unavailable: adjusted = naive"


def reading(rec: dict) -> dict:
    """Which of an estimate record's numbers the dashboard shows.

    Returns ``has_data`` (a matured unit in both the control and the
    treatment), ``adjustment_note``, and ``lift_note`` per part
    (``adjusted``, ``naive``): None where the lift is shown, else why not."""
    units = rec.get("units") or {}
    matured = units.get("matured") or {}
    has_data = bool(matured.get(rec.get("control"), 0)) and bool(matured.get(rec.get("variant"), 0))
    return {"has_data": has_data,
            "adjustment_note": adjustment_note(rec) if has_data else None,
            "lift_note": {k: lift_note(rec.get(k), has_data) for k in ("adjusted", "naive")}}


def _primary(cfg: ExperimentConfig, raws: list) -> dict | None:
    """The first metric's latest estimate per treatment, reduced to what the
    overview shows, each with its ``reading``; None before the first."""
    metric = cfg.metric_names[0]
    out = []
    for variant, raw in zip(cfg.treatments, raws, strict=True):
        if raw is None:
            continue
        rec = loads(raw)
        rd = reading(rec)
        adj = rec["adjusted"]
        shown = rd["has_data"]
        out.append({
            "variant": variant,
            "has_data": shown,
            "effect": adj["effect"] if shown else None,
            "lift": adj["lift"] if shown and rd["lift_note"]["adjusted"] is None else None,
            "lift_note": rd["lift_note"]["adjusted"],
            "p_positive": adj["p_positive"] if shown else None,
            "adjustment": rec.get("adjustment"),
            "adjustment_note": rd["adjustment_note"],
            "final": bool(rec.get("final")),
            "watermark": (rec.get("watermark") or {}).get("event_time"),
            "computed_at": rec.get("computed_at"),
            "iteration": (rec.get("diagnostics") or {}).get("iteration"),
        })
    # the kind says how the page formats the effect (a conversion's in pp, issue 26)
    return {"metric": metric, "kind": cfg.metrics[0].kind, "variants": out} if out else None


def _started_at(cfg: ExperimentConfig, meta: dict[str, str], arrival_fields: list) -> int | None:
    """Event time the experiment started: the configured start, else the
    start of its first entry bucket (on the grid of ``meta``'s anchor)."""
    if cfg.started_at is not None:
        return int(cfg.started_at)
    buckets = [int(_s(f).split("|")[1]) for f in arrival_fields]
    if not buckets:
        return None
    _, B, _, _ = config_ms(cfg)
    anchor = int(float(meta.get("anchor", meta.get("started_at", 0)) or 0))
    return anchor + min(buckets) * B


def _summary(cfg: ExperimentConfig, meta_raw: dict, arrival_fields: list, concluded: Any,
             alert_state: Any, estimate_raws: list) -> dict:
    """One experiment's overview entry from its keys' values (``read_overview``)."""
    meta = {_s(k): _s(v) for k, v in meta_raw.items()}
    variants = cfg.variants
    exposed = {v: int(meta.get(f"exposed:{v}", 0)) for v in variants}
    matured = {v: int(meta.get(f"matured:{v}", 0)) for v in variants}
    counters = {k[2:]: int(v) for k, v in meta.items() if k.startswith("c:")}
    dead = {k[3:]: int(v) for k, v in meta.items() if k.startswith("dl:")}
    dq = data_quality_of(counters, dead)
    last = read_max_ts(meta)
    started = _started_at(cfg, meta, arrival_fields)
    active = (loads(alert_state).get("active") or {}) if alert_state else {}
    return {
        "experiment_id": cfg.experiment_id,
        "status": lifecycle_of(cfg, concluded),
        "started_at": started,
        "last_event_at": last,
        "age_seconds": (last - started) / 1000 if last is not None and started is not None
        else None,
        "units": {"exposed": sum(exposed.values()), "matured": sum(matured.values()),
                  "by_variant": {"exposed": exposed, "matured": matured}},
        "first_maturity_at": None,
        "primary": _primary(cfg, estimate_raws),
        "open_alerts": [{"kind": a.get("kind"), "metric": a.get("metric"),
                         "variant": a.get("variant"), "since": a.get("since")}
                        for _, a in sorted(active.items())],
        "data_quality": {"events": dq["events"], "dropped": dq["dropped"],
                         "dropped_share": dq["dropped_share"]},
    }


def _first_maturity(r: Any, cfgs: list[ExperimentConfig], sources: list[list]) -> list:
    """Per experiment, the event time its first unit matures (the earliest
    window close in its pending sets + L; a unit matures once its partition's
    clock minus L passes its close), in one pipeline; None without a pending unit."""
    pipe = r.pipeline(transaction=False)
    for cfg, srcs in zip(cfgs, sources, strict=True):
        for src in srcs:
            pipe.zrange(pending_key(cfg.experiment_id, _s(src)), 0, 0, withscores=True)
            # the bucket layout's smallest score (``streams.state.pending``)
            pipe.hget(meta_key(cfg.experiment_id), pending_index_field(_s(src)))
    res = iter(pipe.execute()) if any(sources) else iter(())
    out = []
    for cfg, srcs in zip(cfgs, sources, strict=True):
        closes = []
        for _src in srcs:
            closes += [int(score) for _, score in next(res)]
            idx = PendingIndex.parse(next(res))
            if idx is not None and idx.min is not None:
                closes.append(idx.min)
        _, _, L, _ = config_ms(cfg)
        out.append(min(closes) + L if closes else None)
    return out


def read_overview(r: Any, cfgs: list[ExperimentConfig]) -> list[dict]:
    """Every experiment's overview entry (module docstring), the most recently
    active first (newest event time; experiments without events last, by id).

    One pipelined round trip over the known keys of every experiment, and a
    second over the pending sets of those with units exposed but none matured.
    """
    pipe = r.pipeline(transaction=False)
    for cfg in cfgs:
        eid = cfg.experiment_id
        pipe.hgetall(meta_key(eid))
        pipe.hkeys(experiment_keys(eid).arrivals)
        pipe.get(lifecycle_key(eid))
        pipe.get(alerts_key(eid))
        pipe.hkeys(offsets_key(eid))
        for v in cfg.treatments:
            pipe.get(estimate_key(eid, cfg.metric_names[0], v))
    res = iter(pipe.execute()) if cfgs else iter(())
    out, sources, waiting = [], [], []
    for cfg in cfgs:
        meta, arrivals, concluded, alerts, srcs = (next(res) for _ in range(5))
        ests = [next(res) for _ in cfg.treatments]
        entry = _summary(cfg, meta, arrivals, concluded, alerts, ests)
        out.append(entry)
        if entry["units"]["exposed"] and not entry["units"]["matured"]:
            waiting.append((entry, cfg))
            sources.append(list(srcs))
    if waiting:
        for (entry, _), at in zip(waiting, _first_maturity(r, [c for _, c in waiting], sources),
                                  strict=True):
            entry["first_maturity_at"] = at
    out.sort(key=lambda e: (e["last_event_at"] is None, -(e["last_event_at"] or 0),
                            e["experiment_id"]))
    return out
