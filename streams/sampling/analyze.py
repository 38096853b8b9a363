"""``liftstream analyze``: the offline backtest of a file of events.

Folds events with the reference semantics (``streams.state.semantics``, the same
rules the partition's owner runs live), then runs fresh chains on every
(experiment, metric) in one batched kernel call and prints one estimate
record per experiment × metric × treatment. Lines that fail validation are
counted by reason on stderr, as the streaming path dead-letters them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from kernels.backend import to_numpy
from kernels.batching import unpad_draws
from kernels.gibbs import init
from kernels.rng import Rng
from kernels.sampler import run
from schemas.records import Event, ExperimentConfig
from schemas.validate import InvalidRecord, parse_event, parse_experiment
from streams.sampling.advance import StoredChains, TickConfig, advance
from streams.sampling.decisions import decide, look_step
from streams.sampling.problems import build_batch, summarize_windows, window_of
from streams.state.semantics import DEFAULT_SOURCE, ExperimentSnapshot, Reducer


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
    windows = [window_of(p, unpad_draws(trace, i, len(p.order) - 1, len(p.strata)))
               for i, p in enumerate(problems)]
    return summarize_windows(problems, windows, to_numpy(data.adjustable), snaps,
                             [int(x) for x in to_numpy(state.iteration)],
                             computed_at=int(time.time() * 1000))


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


#: the chains at each look of ``fold_with_looks``: the live sampler's tick
#: (``TickConfig``) with this many sweeps a look
LOOK_SWEEPS = 50


def fold_with_looks(configs: list[ExperimentConfig], events: str | Path, rejected: Counter,
                    as_of: int | str | None = None, look_sweeps: int = LOOK_SWEEPS,
                    seed: int = 0, chains: int = 8) -> tuple[Reducer, dict[str, dict]]:
    """``fold``, and the decisions' looks on the way (issue 27): each time an
    experiment's own event takes its data time (``look_step`` of its
    snapshot) into a new look step, its chains continue from the previous
    look by ``look_sweeps`` sweeps on the snapshot then, exactly as a live
    worker's tick (``streams.sampling.advance``), and ``decide`` takes the
    look. Returns the reducer (clocks advanced as ``fold`` does) and each
    experiment's decision state after its last look: the same sequence of
    looks as a worker that kept up, so the same decision up to Monte Carlo
    error. Looks are cut at the events' own times: a file should be in
    event-time order, as a partition roughly is. The look at the end (as of
    ``as_of``) is the caller's, on its final estimate."""
    reducer = Reducer(configs)
    tick = TickConfig(chains=chains, sweeps=look_sweeps, window=4 * look_sweeps,
                      warmup=2 * look_sweeps, min_draws=look_sweeps // 2 or 1, seed=seed)
    stored: dict[tuple[str, str], StoredChains] = {}
    states: dict[str, dict] = {}
    last_step: dict[str, int | None] = {}
    checked: dict[str, int] = {}  # the event-time step each experiment was last checked at
    end: list[int] = []
    buf: list[Event] = []

    def look(eid: str) -> None:
        snap = reducer.states[eid].snapshot(reducer.completeness())
        step = look_step(snap)
        if step is None or (last_step.get(eid) is not None and step <= last_step[eid]):
            return
        last_step[eid] = step
        # the look step as the data's version (a live tick's is Redis's dirty_seq):
        # each look's estimate summarises the draws made on its own data
        recs, chains_now = advance([replace(snap, seq=step)], stored, tick,
                                   computed_at=int(snap.watermark or 0))
        stored.update(chains_now)
        _, states[eid], _ = decide(snap, recs, states.get(eid))

    for ev in read_events(events, rejected):
        if not end or ev.ts > end[0]:
            end[:] = [int(ev.ts)]
        buf.append(ev)
        eid = getattr(ev, "experiment_id", None)
        cfg = reducer.configs.get(eid) if eid else None
        if cfg is None or look_sweeps <= 0:
            if len(buf) >= 500:
                reducer.apply_batch(DEFAULT_SOURCE, buf)
                buf = []
            continue
        anchor = cfg.started_at or 0
        step = (int(ev.ts) - cfg.lateness_seconds * 1000 - anchor) // (cfg.look_seconds * 1000)
        if step > checked.get(eid, -1):
            checked[eid] = step
            reducer.apply_batch(DEFAULT_SOURCE, buf)
            buf = []
            look(eid)
    if buf:
        reducer.apply_batch(DEFAULT_SOURCE, buf)
    clock = _as_of_clock(as_of, end)
    if clock is not None:
        for src in list(reducer.clocks):
            reducer.advance(src, clock)
    return reducer, states


def _as_of_clock(as_of: int | str | None, end: list[int]) -> int | None:
    """The clock ``fold`` advances to (None: none)."""
    if as_of == AS_OF_NOW:
        return int(time.time() * 1000)
    if as_of is None:
        return end[0] if end else None
    if isinstance(as_of, int):
        return as_of
    raise ValueError(f"as_of must be epoch ms, None or {AS_OF_NOW!r}, got {as_of!r}")


def analyze(experiments: str | Path, events: str | Path, *, seed: int = 0, chains: int = 8,
            sweeps: int = 1000, as_of: int | str | None = None,
            look_sweeps: int = 0) -> tuple[list[dict], dict]:
    """Estimate records of every experiment in ``experiments`` from the events
    file, and the counts; ``as_of`` as in ``fold`` (default: the file's end).
    With ``look_sweeps`` > 0 the decisions' looks are recomputed on the way
    (``fold_with_looks``) and each record's ``decision`` continues them with
    the final estimate; with 0 the decision is that of one look, the final
    estimate alone."""
    configs = read_experiments(experiments)
    rejected: Counter = Counter()
    if look_sweeps > 0:
        reducer, states = fold_with_looks(configs, events, rejected, as_of, look_sweeps,
                                          seed=seed, chains=chains)
    else:
        reducer, states = fold(configs, events, rejected, as_of), {}
    snaps = list(reducer.snapshots().values())
    recs = estimate(snaps, chains=chains, sweeps=sweeps, seed=seed)
    for snap in snaps:
        decide(snap, recs, states.get(snap.experiment_id))
    counts = {"rejected": dict(rejected), "reducer": dict(reducer.counters),
              "experiments": {s.experiment_id: s.counters for s in snaps}}
    return recs, counts
