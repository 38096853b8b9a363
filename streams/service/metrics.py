"""Prometheus metrics of one worker process, in the text exposition format.

Kept in-process (each worker is scraped on its own ``/metrics``) and written
without a client library: a handful of counters, gauges and one histogram.
Names follow Prometheus conventions (``_total`` counters, base units).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Mapping

from streams.state.data_quality import outcomes

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HELP = {
    "liftstream_events_total": ("counter", "Events by outcome (received, applied categories, "
                                "dead_letter, late, duplicate, ...)."),
    "liftstream_dead_letters_total": ("counter", "Dead-lettered messages by reason code."),
    "liftstream_ingest_batch_seconds": ("histogram", "Wall time to apply one micro-batch."),
    "liftstream_sampler_sweeps_total": ("counter", "Gibbs sweeps run (each over all chains)."),
    "liftstream_sampler_acceptance": ("gauge", "Metropolis-Hastings acceptance rate of the "
                                      "last sampler tick by block (omega: the sweep's omega "
                                      "step, kernels.gibbs.SweepInfo; platform: the platform "
                                      "prior's correction step), averaged over its problems."),
    "liftstream_chain_iterations": ("gauge", "Chain iteration count per experiment and metric."),
    "liftstream_estimate_age_seconds": ("gauge", "Wall time since the latest estimate "
                                        "of an experiment/metric/variant was computed."),
    "liftstream_estimate_lag_seconds": ("gauge", "Event time between the newest event and the "
                                        "data the latest estimate reflects."),
    "liftstream_consumer_lag_messages": ("gauge", "High watermark minus next offset to "
                                         "process, per owned events partition."),
    "liftstream_ingest_partitions_owned": ("gauge", "Events partitions this worker owns "
                                           "(its events consumer's assignment)."),
    "liftstream_sampler_bad_chains_total": ("counter", "Stored chains that could not be "
                                            "read and were restarted."),
    "liftstream_sampler_stale_writes_total": ("counter", "Chain writes refused because a "
                                              "newer iteration was stored (a sampler that "
                                              "lost the experiment was still in a tick)."),
    "liftstream_ingest_stalled": ("gauge", "1 while ingest waits for Redis, by reason "
                                  "(redis_oom: maxmemory reached; redis_readonly: a "
                                  "replica; ...); batches wait, none is acked or lost."),
    "liftstream_ingest_fenced_batches_total": ("counter", "Batches dropped because a newer "
                                               "owner claimed their partition (zombie "
                                               "fencing)."),
    "liftstream_ingest_redis_regressions_total": ("counter", "Times Redis was found behind "
                                                  "what this worker had applied to an events "
                                                  "partition (it lost acknowledged writes); "
                                                  "the partition was read again from Redis's "
                                                  "offset."),
    "liftstream_ingest_retention_lost_total": ("counter", "Offsets of an events partition "
                                               "that retention deleted before ingest applied "
                                               "them (data loss; recorded in Redis, so the "
                                               "count outlives restarts)."),
    "liftstream_ingest_unrouted_lost_total": ("counter", "Metrics without experiment_id of "
                                              "an events partition dropped because no "
                                              "exposure of their unit routed them (in no "
                                              "experiment's data_quality; recorded in Redis "
                                              "by every worker, so the count outlives "
                                              "restarts)."),
    "liftstream_experiment_events": ("gauge", "Events of an experiment so far by outcome, from "
                                     "its latest estimate's data_quality (applied, corrected, "
                                     "held (now), expired, late, too_old, ..., dead_letter); "
                                     "the outcomes sum to its events."),
    "liftstream_experiment_before_start_events": (
        "gauge", "Exposures of an experiment so far before its started_at, applied to its "
        "first entry bucket (data_quality.before_start; part of the applied outcome: a "
        "clock-skew signal, not a loss)."),
    "liftstream_experiment_cross_partition_events": (
        "gauge", "Events of an experiment so far that reached a unit through a partition "
        "other than the one that created it (data_quality.cross_partition; 0 when every "
        "producer keys events by unit_id)."),
    "liftstream_experiment_dead_letters": ("gauge", "Dead letters attributed to an experiment "
                                           "so far, by reason code."),
    "liftstream_experiment_dropped_share": ("gauge", "Share of an experiment's events dropped "
                                            "(late, expired, too old, dead-lettered) so far."),
}


def _value(v: float) -> str:
    """Exact for whole numbers (``:g`` would round a count of 1234567 to 6 digits)."""
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f.is_integer() and abs(f) < 2**53:
        return str(int(f))
    return repr(f)


def _labels(lb: tuple[tuple[str, str], ...]) -> str:
    if not lb:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in lb)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(lb, esc, strict=True)) + "}"


class Metrics:
    """The metrics of one worker process: counters, gauges and histograms by
    name and labels, thread-safe (the ingest thread, the sampler thread and
    the web server write and read them); names are documented in ``HELP``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, dict[tuple, float]] = defaultdict(dict)
        self.hist: dict[str, dict] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add ``value`` to the counter ``name`` with ``labels``."""
        with self._lock:
            self.counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set the gauge ``name`` with ``labels`` to ``value``."""
        with self._lock:
            self.gauges[name][tuple(sorted(labels.items()))] = value

    def set_acceptance(self, rates: Mapping[str, float]) -> None:
        """Set ``liftstream_sampler_acceptance{block}`` from a tick's rates by block
        (``SamplerService.acceptance``); blocks absent from ``rates`` keep their value."""
        for block, rate in rates.items():
            self.set("liftstream_sampler_acceptance", float(rate), block=block)

    def set_data_quality(self, rec: dict) -> None:
        """Set an experiment's data-quality gauges from one of its estimate records
        (its ``data_quality``, docs/architecture.md#state):
        ``liftstream_experiment_events{outcome}``
        (``streams.state.data_quality.OUTCOMES``), ``liftstream_experiment_dead_letters{reason}``,
        ``liftstream_experiment_dropped_share``,
        ``liftstream_experiment_before_start_events`` (an outcome inside
        ``applied``) and ``liftstream_experiment_cross_partition_events`` (a
        note counted besides the outcomes). A record without one changes
        nothing."""
        dq = rec.get("data_quality")
        if not isinstance(dq, dict):
            return
        e = rec["experiment_id"]
        for outcome, n in outcomes(dq).items():
            self.set("liftstream_experiment_events", n, experiment=e, outcome=outcome)
        for reason, n in (dq.get("dead_letters") or {}).items():
            self.set("liftstream_experiment_dead_letters", n, experiment=e, reason=reason)
        self.set("liftstream_experiment_dropped_share", dq.get("dropped_share", 0.0),
                 experiment=e)
        self.set("liftstream_experiment_before_start_events",
                 dq.get("before_start", 0), experiment=e)
        self.set("liftstream_experiment_cross_partition_events",
                 dq.get("cross_partition", 0), experiment=e)

    def observe(self, name: str, seconds: float) -> None:
        """Count ``seconds`` in the histogram ``name`` (``LATENCY_BUCKETS``)."""
        with self._lock:
            h = self.hist.setdefault(name, {"buckets": [0] * len(LATENCY_BUCKETS),
                                            "sum": 0.0, "count": 0})
            for i, b in enumerate(LATENCY_BUCKETS):
                if seconds <= b:
                    h["buckets"][i] += 1
            h["sum"] += seconds
            h["count"] += 1

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format (0.0.4), by
        name, with ``# HELP`` and ``# TYPE`` lines (``untyped`` if not in ``HELP``).

        :returns: the text, ending in a newline.
        """
        out: list[str] = []
        with self._lock:
            names = set(self.counters) | set(self.gauges) | set(self.hist)
            for name in sorted(names):
                kind, text = HELP.get(name, ("untyped", name))
                out.append(f"# HELP {name} {text}")
                out.append(f"# TYPE {name} {kind}")
                for lb, v in sorted(self.counters.get(name, {}).items()):
                    out.append(f"{name}{_labels(lb)} {_value(v)}")
                for lb, v in sorted(self.gauges.get(name, {}).items()):
                    out.append(f"{name}{_labels(lb)} {_value(v)}")
                h = self.hist.get(name)
                if h:
                    for b, c in zip(LATENCY_BUCKETS, h["buckets"], strict=True):
                        out.append(f'{name}_bucket{{le="{b:g}"}} {c}')
                    out.append(f'{name}_bucket{{le="+Inf"}} {h["count"]}')
                    out.append(f"{name}_sum {h['sum']:g}")
                    out.append(f"{name}_count {h['count']}")
        return "\n".join(out) + "\n"
