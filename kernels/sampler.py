"""Advance chains for a number of sweeps and collect the estimands' trace.

The one entry point the streaming sampler, ``liftstream analyze`` and the
benchmarks call, so all three run the same code.
"""

from __future__ import annotations

from kernels.backend import Rng
from kernels.data import ModelData
from kernels.estimands import Draws, estimands, stack
from kernels.gibbs import State, sweep


def run(state: State, data: ModelData, rng: Rng, n_sweeps: int, thin: int = 1,
        progress=None) -> tuple[State, Draws]:
    """``n_sweeps`` sweeps; keeps every ``thin``-th draw. Returns (state, trace).

    Before each sweep the RNG is told every problem's iteration
    (``Rng.begin_sweep``): with the counter-based Philox generator a problem's
    draws in a sweep are then a function of its key and iteration alone, so
    they are the same whichever batch, tick or chunk the sweep runs in."""
    kept: list[Draws] = []
    begin = getattr(rng, "begin_sweep", None)
    end = getattr(rng, "end_sweep", None)
    for i in range(n_sweeps):
        if begin is not None:
            begin(state.iteration)
        state = sweep(state, data, rng)
        if end is not None:
            end()
        if (i + 1) % thin == 0:
            kept.append(estimands(state, data))
        if progress is not None:
            progress(1)
    return state, stack(kept)
