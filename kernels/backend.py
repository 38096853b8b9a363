"""Array backend: NumPy on CPU, CuPy on a GPU, one code path.

Every kernel takes its array module from its inputs (``array_module``) so the
same function runs on either device. A leaf module: it imports nothing from
``kernels`` (the random draws are ``kernels.rng``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or cupy.ndarray


def cupy_or_none():
    """The cupy module if it imports and sees a CUDA device, else None.

    Returns: the ``cupy`` module or ``None``.
    """
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU"
        return None
    return None


def get_xp(device: str = "auto"):
    """numpy or cupy for ``--device auto|cpu|gpu``.

    Args: ``device``: ``"cpu"`` (numpy), ``"gpu"`` (cupy, else RuntimeError) or
    ``"auto"`` (cupy when it sees a device, else numpy).
    Returns: the array module. Raises ValueError on any other name.
    """
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
    """The module (numpy or cupy) that owns array ``x``.

    Args: ``x``: an array (or a scalar: numpy). Returns: ``numpy`` or ``cupy``.
    """
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def to_numpy(x: Array) -> np.ndarray:
    """``x`` as a host numpy array (copied from the device for a cupy array)."""
    return x.get() if hasattr(x, "get") else np.asarray(x)
