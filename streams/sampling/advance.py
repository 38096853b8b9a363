"""One sampler tick's computation, free of I/O: continue every problem's
chains on the latest snapshots and summarise each one's window of draws.

Chains are never restarted because data grew: a problem whose stored chains
match its current shape (chains, treatments, strata) continues from them, at
its stored iteration. Only a change of shape (a new variant or metric in the
config, the "unknown activity" stratum appearing, a new chain count) starts
fresh chains for that problem.

The window keeps the last ``window`` draws per chain after warm-up; the
estimate summarises only those made on the data it reports
(``StoredChains.fresh_window``). Right after new data that is one tick's
sweeps, and the window fills back up while the data stay the same. Draws
made on older, smaller data are never mixed in: they made the first record
after a large change up to 2.8× too wide and a posterior sd off (docs/method.md §4).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from kernels.backend import to_numpy
from kernels.batching import pad_into, stored_shape, unpad_draws, unpad_state
from kernels.gibbs import init
from kernels.philox import keys_for
from kernels.rng import Rng, default_rng_kind
from kernels.sampler import run
from streams.sampling.chains import append_window
from streams.sampling.problems import Problem, build_batch, summarize_windows, window_of
from streams.state.semantics import ExperimentSnapshot


@dataclass
class StoredChains:
    """A problem's persisted chains (see ``streams.sampling.chains`` for the encoding)."""

    state: dict[str, np.ndarray]
    window: dict[str, np.ndarray] | None
    seq: int | None = None  # dirty_seq of the data last sampled
    #: iteration at which the chains began sampling the data of ``seq``: draws
    #: after it are on that data, draws up to it on older data (None: unknown)
    fresh_from: int | None = None
    #: the MH acceptance rates of the sweeps just run, by block (``SweepInfo``;
    #: not persisted; None for chains loaded from Redis)
    acceptance: dict[str, float] | None = None

    def window_is_fresh(self) -> bool:
        """Every draw in the window was made on the data of ``seq``."""
        if self.window is None or self.fresh_from is None:
            return False
        return int(self.state["iteration"]) - self.fresh_from >= self.window["tau"].shape[1]

    def fresh_window(self) -> dict[str, np.ndarray] | None:
        """The window's draws made on the data of ``seq`` (its last
        iteration − ``fresh_from`` per chain), what an estimate of that data
        may summarise; the whole window when ``fresh_from`` is unknown."""
        if self.window is None or self.fresh_from is None:
            return self.window
        T = self.window["tau"].shape[1]
        n = min(T, max(0, int(self.state["iteration"]) - self.fresh_from))
        return {k: v[:, T - n:] for k, v in self.window.items()}


@dataclass
class TickConfig:
    chains: int = 8
    sweeps: int = 50  # per tick
    window: int = 200  # draws per chain kept for summaries
    warmup: int = 100  # iterations before draws enter the window
    #: per chain, before an estimate is published (capped at ``sweeps``: after
    #: each data change only one tick's draws are on the new data)
    min_draws: int = 20
    seed: int = 0


def advance(snaps: list[ExperimentSnapshot], stored: dict[tuple[str, str], StoredChains],
            cfg: TickConfig, computed_at: int, xp=np
            ) -> tuple[list[dict], dict[tuple[str, str], StoredChains]]:
    """Advance all problems of ``snaps`` by ``cfg.sweeps`` sweeps in one batch."""
    snaps = [s for s in snaps if s.started_at is not None]
    if not snaps:
        return [], {}
    data, problems = build_batch(snaps, xp=xp)
    its = [int(stored[p.key].state["iteration"]) if p.key in stored else 0 for p in problems]
    names = ["/".join(p.key) for p in problems]
    if default_rng_kind(xp) == "philox":  # GPU: each problem's draws keyed by its name
        rng = Rng(cfg.seed, xp=xp, kind="philox", keys=keys_for(cfg.seed, names))
    else:
        rng = Rng([cfg.seed, zlib.crc32("|".join(names).encode()), sum(its) % 2**32], xp=xp)
    state = init(data, rng, cfg.chains)
    shapes = [(len(p.order) - 1, len(p.strata)) for p in problems]
    for i, p in enumerate(problems):
        st = stored.get(p.key)
        if st is not None and stored_shape(st.state) == (cfg.chains, *shapes[i]):
            pad_into(state, i, st.state)
        else:
            its[i] = 0
    state, trace, info = run(state, data, rng, cfg.sweeps)
    acceptance = {b: to_numpy(a) for b, a in info.acceptance(data).items()}  # [P] each
    seq_of = {s.experiment_id: s.seq for s in snaps}

    out: dict[tuple[str, str], StoredChains] = {}
    for i, p in enumerate(problems):
        K, S = shapes[i]
        it_end = its[i] + cfg.sweeps
        fresh = window_of(p, unpad_draws(trace, i, K, S))
        first_kept = max(0, cfg.warmup - its[i])  # draws at iteration ≤ warmup are dropped
        fresh = {k: v[:, first_kept:] for k, v in fresh.items()}
        old = stored.get(p.key)
        old_window = old.window if old is not None and its[i] > 0 else None
        window = append_window(old_window, fresh, cfg.window) if fresh["tau"].shape[1] or \
            old_window is None else old_window
        new_state = unpad_state(state, i, K, S)
        assert int(new_state["iteration"]) == it_end
        seq = seq_of[p.experiment_id]
        same_data = (old is not None and its[i] > 0 and old.fresh_from is not None
                     and old.seq == seq)
        fresh_from = old.fresh_from if same_data else its[i]
        out[p.key] = StoredChains(new_state, window, seq, fresh_from,
                                  {b: float(a[i]) for b, a in acceptance.items()})

    recs = _summaries(problems, out, data, snaps, cfg, computed_at)
    return recs, out


def _summaries(problems: list[Problem], chains: dict[tuple[str, str], StoredChains], data,
               snaps: list[ExperimentSnapshot], cfg: TickConfig, computed_at: int) -> list[dict]:
    """Summarise each problem's draws on its current data (``fresh_window``;
    ``summarize_windows``: a ratio's problems recombined, windows of a shape
    batched), then the records of all at once (a problem's shadow may sit in
    another group)."""
    adjustable = np.asarray(data.adjustable.get() if hasattr(data.adjustable, "get")
                            else data.adjustable)
    its = [int(chains[p.key].state["iteration"]) for p in problems]
    windows = [chains[p.key].fresh_window() for p in problems]
    return summarize_windows(problems, windows, adjustable, snaps, its, computed_at,
                             min_draws=min(cfg.min_draws, cfg.sweeps))
