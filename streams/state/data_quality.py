"""What happened to an experiment's events: the estimate record's ``data_quality``.

docs/architecture.md#state: every count of what was not applied is per experiment in the
estimate record, the API, ``/metrics`` and an alert (``data_loss`` in
``streams.alerts.rules``). This module turns a snapshot's counters
(``streams.state.semantics.COUNTERS``: every event routed to the experiment
increments exactly one outcome; ``EVENT_NOTES`` are counted on top) and its
dead letters (by reason) into that object::

    events        every outcome counter + every dead letter
    applied       exposures + before_start + metric_applied
    before_start  exposures before the experiment's start, applied to its
                  first entry bucket (an outcome, part of ``applied``: a
                  clock-skew signal, not a loss)
    corrected ... retired   the counters of the same name
    retired_units, retired_filter_fpr   units whose records were dropped after
                  their correction horizon, and the chance that a new unit is
                  mistaken for one of them (``streams.state.retired_filter``)
    cross_partition  events that reached a unit through a partition other than
                  the one that created it (an ``EVENT_NOTES`` counter: not in
                  ``events``; nonzero means the events topic's key is not
                  unit_id for every producer, or its partition count changed)
    dead_letters  {reason: n}
    dropped       late + expired + too_old (``semantics.DROPPED``) + dead letters
    dropped_share dropped / events (0.0 without events)

``corrected`` (an in-window metric that arrived after its unit matured and
corrected the matured cell) is applied, not lost. ``held`` is a level (metrics
waiting for their unit's exposure now), not a running total. A dead letter
whose reason is also a counter name (e.g. ``too_old``, which ingest both counts
and dead-letters) is listed under ``dead_letters`` but counted once, by its
counter, in ``events`` and ``dropped``.
"""

from __future__ import annotations

from collections.abc import Mapping

from streams.state.retired_filter import false_positive_rate
from streams.state.semantics import COUNTERS, DROPPED, EVENT_NOTES, ExperimentSnapshot

#: Counters reported under their own name (``exposures`` and ``metric_applied``
#: are reported together as ``applied``).
REPORTED: tuple[str, ...] = (
    "corrected", "held", "expired", "late", "too_old", "outside_window", "pre_exposure",
    "duplicate", "conflict", "repeat_exposure", "after_end", "unknown_variant",
    "unknown_metric", "retired",
)

#: Counters of applied events (``applied``); ``before_start`` is also shown alone.
APPLIED: tuple[str, ...] = ("exposures", "before_start", "metric_applied")

#: The outcomes that partition ``events`` (what ``/metrics`` exposes per outcome):
#: ``applied``, the reported counters, and ``dead_letter``.
OUTCOMES: tuple[str, ...] = ("applied", *REPORTED, "dead_letter")


def data_quality_of(counters: Mapping[str, int], dead_letters: Mapping[str, int] | None
                    ) -> dict:
    """The ``data_quality`` object from raw counters and dead letters by reason."""
    c = {str(k): int(v) for k, v in counters.items()}
    dl = {str(k): int(v) for k, v in sorted((dead_letters or {}).items())}
    extra_dl = sum(n for reason, n in dl.items() if reason not in COUNTERS)
    events = sum(n for k, n in c.items() if k not in EVENT_NOTES) + extra_dl
    dropped = sum(c.get(k, 0) for k in DROPPED) + extra_dl
    out: dict = {"events": events,
                 "applied": sum(c.get(k, 0) for k in APPLIED),
                 "before_start": c.get("before_start", 0)}
    for k in REPORTED:
        out[k] = c.get(k, 0)
    for k in EVENT_NOTES:
        out[k] = c.get(k, 0)
    out["dead_letters"] = dl
    out["dropped"] = dropped
    out["dropped_share"] = dropped / events if events > 0 else 0.0
    return out


def data_quality(snap: ExperimentSnapshot) -> dict:
    """The ``data_quality`` object of an experiment snapshot (module docstring)."""
    out = data_quality_of(snap.counters, getattr(snap, "dead_letters", None))
    out["retired_units"] = snap.retired_units
    out["retired_filter_fpr"] = false_positive_rate(snap.retired_units)
    return out


def outcomes(dq: Mapping) -> dict[str, int]:
    """``events`` split by outcome (``OUTCOMES``): applied, each reported counter,
    and the dead letters not already counted by a counter. They sum to
    ``events`` when the counters are ``semantics.COUNTERS``."""
    out = {k: int(dq.get(k, 0) or 0) for k in OUTCOMES[:-1]}
    out["dead_letter"] = sum(int(n) for reason, n in (dq.get("dead_letters") or {}).items()
                             if reason not in COUNTERS)
    return out
