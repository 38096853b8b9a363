"""Array backend: NumPy on CPU, CuPy on a GPU, one code path.

Every kernel takes its array module from its inputs (``array_module``) so the
same function runs on either device. ``Rng`` wraps the few distributions the
sweeps need behind one interface, because numpy's and cupy's generators differ
in names and in what they offer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or cupy.ndarray


def cupy_or_none():
    """The cupy module if it imports and sees a CUDA device, else None."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return None
    return None


def get_xp(device: str = "auto"):
    """numpy or cupy for ``--device auto|cpu|gpu``."""
    if device == "cpu":
        return np
    cp = cupy_or_none()
    if device == "gpu":
        if cp is None:
            raise RuntimeError("--device gpu: CuPy is not installed or sees no CUDA device")
        return cp
    if device != "auto":
        raise ValueError(f"unknown device {device!r} (auto|cpu|gpu)")
    return cp if cp is not None else np


def array_module(x: Array):
    """The module (numpy or cupy) that owns array ``x``."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(x: Array) -> np.ndarray:
    return x.get() if hasattr(x, "get") else np.asarray(x)


class Rng:
    """The random draws a sweep needs, on the device of ``xp``.

    Seeded from a ``numpy.random.SeedSequence`` so a batch's stream is a pure
    function of its seed material (experiment ids and iteration counts).
    """

    def __init__(self, seed: int | np.random.SeedSequence | list[int], xp=np):
        self.xp = xp
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        if xp is np:
            self._g = np.random.Generator(np.random.PCG64(ss))
        else:  # cupy
            self._g = xp.random.default_rng(int(ss.generate_state(1, np.uint64)[0]))

    def normal(self, shape) -> Array:
        return self._g.standard_normal(shape)

    def uniform(self, shape) -> Array:
        return self._g.random(shape)

    def gamma(self, shape_param: Array) -> Array:
        """Gamma(shape, scale=1), elementwise in ``shape_param``."""
        return self._g.standard_gamma(shape_param)

    def inv_gamma(self, a: Array, b: Array) -> Array:
        """InvGamma(a, b): density ∝ x^(-a-1) exp(-b/x)."""
        return b / self.gamma(a)

    def poisson(self, lam: Array) -> Array:
        return self._g.poisson(lam)
