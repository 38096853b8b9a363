"""Advance chains for a number of sweeps and collect the estimands' trace.

The one entry point the streaming sampler, ``liftstream analyze`` and the
benchmarks call, so all three run the same code.
"""

from __future__ import annotations

from kernels.data import ModelData
from kernels.estimands import Draws, estimands, stack
from kernels.gibbs import State, SweepInfo, sweep
from kernels.rng import Rng


def run(state: State, data: ModelData, rng: Rng, n_sweeps: int, thin: int = 1,
        progress=None) -> tuple[State, Draws, SweepInfo]:
    """``n_sweeps`` sweeps; keeps every ``thin``-th draw.

    Before each sweep the RNG is told every problem's iteration
    (``Rng.begin_sweep``): with the counter-based Philox generator a problem's
    draws in a sweep are then a function of its key and iteration alone, so
    they are the same whichever batch, tick or chunk the sweep runs in.

    Args: ``state``, ``data``, ``rng`` as for ``kernels.gibbs.sweep``;
    ``n_sweeps`` ≥ 1; ``thin``: keep the estimands of every thin-th sweep;
    ``progress``: called with 1 after each sweep, or None.
    Returns: (the last state, the kept draws [P, C, n_sweeps // thin, …], the
    sweeps' ``SweepInfo`` averaged over the run: per-chain acceptance rates).
    """
    kept: list[Draws] = []
    begin = getattr(rng, "begin_sweep", None)
    end = getattr(rng, "end_sweep", None)
    accepted = None
    for i in range(n_sweeps):
        if begin is not None:
            begin(state.iteration)
        state, info = sweep(state, data, rng)
        if end is not None:
            end()
        accepted = info.omega if accepted is None else accepted + info.omega
        if (i + 1) % thin == 0:
            kept.append(estimands(state, data))
        if progress is not None:
            progress(1)
    if accepted is None:
        raise ValueError("run: n_sweeps must be at least 1")
    return state, stack(kept), SweepInfo(omega=accepted / n_sweeps)
