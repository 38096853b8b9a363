"""Random draws for the sweeps, on the device of the arrays: ``Rng``.

One interface over numpy's PCG64, cupy's default generator and the
counter-based Philox stream of ``kernels.philox``, because numpy's and cupy's
generators differ in names and in what they offer.
"""

from __future__ import annotations

import numpy as np

from kernels.backend import Array
from kernels.philox import PhiloxStream

RNG_KINDS = ("pcg", "philox")


def default_rng_kind(xp) -> str:
    """Philox on a GPU (counter-based: no state, no launch order); PCG64 on the
    CPU, where numpy's compiled generators are several times faster than
    Philox in array code (``tests/unit/kernels/test_philox.py`` measures the ratio)."""
    return "pcg" if xp is np else "philox"


class Rng:
    """The random draws a sweep needs, on the device of ``xp``.

    Seeded from a ``numpy.random.SeedSequence`` so a batch's stream is a pure
    function of its seed material (experiment ids and iteration counts).

    ``kind="philox"`` (``kernels.philox``; the default on cupy): every draw is
    a pure function of (the problem's key, its sweep iteration, the draw site,
    the element's index), so a problem's draws do not depend on which other
    problems share its batch, on the batch's padding or on launch order, and
    numpy and cupy give the same random words. ``keys`` [P, 2] fixes each
    problem's key (``kernels.philox.keys_for(seed, ids)``); without it problem
    p gets ``keys_for(seed, range(P))[p]``, i.e. its index in the batch.
    ``kernels.sampler.run`` tells the stream each sweep's iterations
    (``begin_sweep``); draws outside a sweep (``init``) are counted per call.
    ``kind="pcg"`` (the default on numpy): numpy's PCG64, or cupy's default
    generator, one stream for the whole batch.
    """

    def __init__(self, seed: int | np.random.SeedSequence | list[int], xp=np,
                 kind: str | None = None, keys=None):
        self.xp = xp
        self.kind = kind or default_rng_kind(xp)
        if self.kind not in RNG_KINDS:
            raise ValueError(f"unknown RNG kind {kind!r} ({'|'.join(RNG_KINDS)})")
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        self._ph = None
        self._g = None
        if self.kind == "philox":
            self._ph = PhiloxStream(ss, xp, keys)
        elif keys is not None:
            raise ValueError("per-problem keys need kind='philox'")
        elif xp is np:
            self._g = np.random.Generator(np.random.PCG64(ss))
        else:  # cupy
            self._g = xp.random.default_rng(int(ss.generate_state(1, np.uint64)[0]))

    def begin_sweep(self, iteration: Array) -> None:
        """The next draws belong to sweep ``iteration`` [P] (Philox counters; a
        no-op for a stateful generator)."""
        if getattr(self, "_ph", None) is not None:
            self._ph.begin_sweep(iteration)

    def end_sweep(self) -> None:
        """The sweep's draws are done (Philox: later draws count per call again)."""
        if getattr(self, "_ph", None) is not None:
            self._ph.end_sweep()

    def normal(self, shape) -> Array:
        """Standard normal draws of ``shape``."""
        if self._ph is not None:
            return self._ph.normal(shape)
        return self._g.standard_normal(shape)

    def uniform(self, shape) -> Array:
        """Uniform draws in [0, 1) of ``shape``."""
        if self._ph is not None:
            return self._ph.uniform(shape)
        return self._g.random(shape)

    def gamma(self, shape_param: Array) -> Array:
        """Gamma(shape, scale=1), elementwise in ``shape_param``."""
        if self._ph is not None:
            return self._ph.gamma(shape_param)
        return self._g.standard_gamma(shape_param)

    def inv_gamma(self, a: Array, b: Array) -> Array:
        """InvGamma(a, b): density ∝ x^(-a-1) exp(-b/x)."""
        return b / self.gamma(a)

    def poisson(self, lam: Array) -> Array:
        """Poisson(λ) draws, elementwise in ``lam``."""
        if self._ph is not None:
            return self._ph.poisson(lam)
        return self._g.poisson(lam)
