"""``liftstream analyze``: the offline backtest of a file of events.

Folds events with the reference semantics (``streams.state.semantics``, the same
rules the streaming Lua script implements), then runs fresh chains on every
(experiment, metric) in one batched kernel call and prints one estimate
record per experiment × metric × treatment. Lines that fail validation are
counted by reason on stderr, as the streaming path dead-letters them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kernels.gibbs import init
from kernels.rng import Rng
from kernels.sampler import run
from kernels.summary import summarize
from schemas.records import Event, ExperimentConfig
from schemas.validate import InvalidRecord, parse_event, parse_experiment
from streams.sampling.problems import build_batch, records
from streams.state.semantics import ExperimentSnapshot, Reducer


def read_experiments(path: str | Path) -> list[ExperimentConfig]:
    out = []
    for i, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                out.append(parse_experiment(line))
            except InvalidRecord as e:
                raise SystemExit(f"{path}:{i}: bad experiment config: {e.message}") from e
    return out


def read_events(path: str | Path, rejected: Counter) -> Iterator[Event]:
    """Valid events of a JSONL file, in file order; rejects counted by code."""
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield parse_event(line, now_ms=2**53 - 1)  # a backtest has no "future"
            except InvalidRecord as e:
                rejected[e.code] += 1


def estimate(snaps: list[ExperimentSnapshot], chains: int = 8, sweeps: int = 1000,
             seed: int = 0, xp=np, progress=None) -> list[dict]:
    """Fresh chains on every problem of ``snaps`` in one batch; the first half of
    the sweeps is warm-up, the second half is summarised."""
    snaps = [s for s in snaps if s.started_at is not None]
    if not snaps:
        return []
    data, problems = build_batch(snaps, xp=xp)
    rng = Rng([seed, len(problems)], xp=xp)
    state = init(data, rng, chains)
    warm = sweeps // 2
    state, _, _ = run(state, data, rng, warm, thin=max(warm, 1), progress=progress)
    state, trace, _ = run(state, data, rng, sweeps - warm, progress=progress)
    summary = summarize(trace, data, direction=[p.direction for p in problems])
    return records(summary, problems, {s.experiment_id: s for s in snaps},
                   iteration=state.iteration, computed_at=int(time.time() * 1000))


#: ``as_of`` that advances to the wall clock, as a worker idle until now does
AS_OF_NOW = "now"


def fold(configs: list[ExperimentConfig], events: str | Path, rejected: Counter,
         as_of: int | str | None = None) -> Reducer:
    """The reference fold of a file: its events in file order as one source
    partition (a live worker's partitions are subsequences of it, and the
    state does not depend on how they interleave), then the idle advance a
    caught-up worker makes: every clock moves to ``as_of`` if later, so the
    units whose window closed by then mature.

    ``as_of``: epoch ms; ``None`` (the default) the file's own end, its
    largest event ``ts``, so a file that ends in the past is read as it stood
    then (units whose windows run past its last event stay unmatured, as a
    worker would have them); ``"now"`` (``AS_OF_NOW``) the wall clock, what
    a worker idle since the file ended would have matured by today.
    """
    end: list[int] = []

    def tracked(evs: Iterator[Event]) -> Iterator[Event]:
        for ev in evs:
            if not end or ev.ts > end[0]:
                end[:] = [int(ev.ts)]
            yield ev

    reducer = Reducer(configs).apply_all(tracked(read_events(events, rejected)), batch=500)
    if as_of == AS_OF_NOW:
        clock = int(time.time() * 1000)
    elif as_of is None:
        if not end:
            return reducer  # no event: nothing to advance
        clock = end[0]
    elif isinstance(as_of, int):
        clock = as_of
    else:
        raise ValueError(f"as_of must be epoch ms, None or {AS_OF_NOW!r}, got {as_of!r}")
    for src in list(reducer.clocks):
        reducer.advance(src, clock)
    return reducer


def analyze(experiments: str | Path, events: str | Path, *, seed: int = 0, chains: int = 8,
            sweeps: int = 1000, as_of: int | str | None = None) -> tuple[list[dict], dict]:
    """Estimate records of every experiment in ``experiments`` from the events
    file, and the counts; ``as_of`` as in ``fold`` (default: the file's end)."""
    configs = read_experiments(experiments)
    rejected: Counter = Counter()
    reducer = fold(configs, events, rejected, as_of)
    snaps = list(reducer.snapshots().values())
    recs = estimate(snaps, chains=chains, sweeps=sweeps, seed=seed)
    counts = {"rejected": dict(rejected), "reducer": dict(reducer.counters),
              "experiments": {s.experiment_id: s.counters for s in snaps}}
    return recs, counts
