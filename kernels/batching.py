"""Take one problem's chains out of a padded batch and put them back.

Chains are persisted per problem (experiment × metric) without padding, so a
problem can join a batch of any shape on the next tick: ``unpad`` slices a
problem's rows to its own K treatments and S strata, ``pad_into`` writes
stored rows into a freshly initialised padded state.

The unpad functions are called once per problem; the whole batch is copied to
the host once (on the first call for a state or trace, kept on that object)
and each problem is sliced from the host copy, rather than one device-to-host
copy per problem and array.
"""

from __future__ import annotations

import numpy as np

from kernels.backend import array_module, to_numpy
from kernels.estimands import Draws
from kernels.gibbs import State

# which trailing axes of each State array are (variants, strata)
_STATE_AXES = {
    "mu0": ("S",), "tau": ("K", "S"), "sigma2": ("K1", "S"), "theta": ("K",),
    "beta": ("K",), "omega2": ("K",), "logit_p": ("S",), "pop": ("S",), "gamma": ("S", "J"),
}
_DRAW_AXES = {
    "adj_effect": ("K",), "adj_lift": ("K",), "naive_effect": ("K",), "naive_lift": ("K",),
    "tau": ("K", "S"), "share": ("S",), "slope": (), "mu0": ("S",),
}


def _index(axes, K: int, S: int):
    size = {"K": K, "K1": K + 1, "S": S, "J": 2}
    return tuple(slice(0, size[a]) for a in axes)


def _host(obj, names) -> dict[str, np.ndarray]:
    """Host copies of ``obj``'s arrays ``names``, made once per object."""
    cache = obj.__dict__.get("_host_arrays")
    if cache is None:
        cache = {name: to_numpy(getattr(obj, name)) for name in names}
        obj.__dict__["_host_arrays"] = cache
    return cache


def unpad_state(state: State, p: int, K: int, S: int) -> dict[str, np.ndarray]:
    """Problem ``p``'s chains as host arrays [C, …] trimmed to K treatments, S strata."""
    host = _host(state, (*_STATE_AXES, "iteration"))
    out = {}
    for name, axes in _STATE_AXES.items():
        out[name] = np.ascontiguousarray(host[name][(p, slice(None)) + _index(axes, K, S)])
    out["iteration"] = np.asarray(int(host["iteration"][p]))
    return out


def pad_into(state: State, p: int, stored: dict[str, np.ndarray]) -> None:
    """Overwrite problem ``p``'s rows of ``state`` with stored chains (in place)."""
    xp = array_module(state.mu0)
    state.__dict__.pop("_host_arrays", None)  # the state changes: drop any host copy
    for name in _STATE_AXES:
        arr = stored.get(name)
        if arr is None:  # chains stored before the array existed keep its initial value
            continue
        target = getattr(state, name)
        idx = (p, slice(0, arr.shape[0])) + tuple(slice(0, n) for n in arr.shape[1:])
        target[idx] = xp.asarray(arr)
    state.iteration[p] = int(stored["iteration"])


def stored_shape(stored: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(chains, K, S) of stored chains (``unpad_state``'s dict of host arrays)."""
    C, K, S = stored["tau"].shape
    return C, K, S


def unpad_draws(trace: Draws, p: int, K: int, S: int) -> dict[str, np.ndarray]:
    """Problem ``p``'s trace [C, T, …] trimmed to its own K and S.

    Args: ``trace``: a batch's ``Draws`` [P, C, T, …]; ``p``: the problem's row;
    ``K``, ``S``: its real treatments and strata.
    Returns: the estimands by name as host arrays.
    """
    host = _host(trace, _DRAW_AXES)
    out = {}
    for name, axes in _DRAW_AXES.items():
        idx = (p, slice(None), slice(None)) + _index(axes, K, S)
        out[name] = np.ascontiguousarray(host[name][idx])
    return out


def stack_draws(per_problem: list[dict[str, np.ndarray]], xp=np) -> Draws:
    """A trace [P, C, T, …] from per-problem traces of equal C, T, K and S."""
    return Draws(**{name: xp.asarray(np.stack([_draw(d, name) for d in per_problem]))
                    for name in _DRAW_AXES})


def _draw(d: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A stored window's array; a window stored before ``slope`` existed, or
    without ``mu0`` (only a ratio's problems keep it), has none (0)."""
    if name in d:
        return d[name]
    if name == "slope":
        return np.zeros(d["adj_effect"].shape[:2])
    if name == "mu0":  # kept only where a metric kind needs it (a ratio's problems)
        return np.zeros(d["share"].shape)
    raise KeyError(name)
