"""Persisted chains: one blob per (experiment, metric) in Redis.

A blob holds the problem's chain state (``kernels.batching.unpad_state``:
parameters and iteration count), the bounded window of recent draws of the
estimands that summaries are computed from, and the ``dirty_seq`` of the data
the chains last saw. Encoding: a small JSON header (name → dtype, shape,
offset) followed by the raw little-endian arrays — compact, exact, no pickle.
"""

from __future__ import annotations

import numpy as np

from schemas.codec import dumps, loads

MAGIC = b"LSC1"


def encode(arrays: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    header: dict = {"meta": meta or {}, "arrays": {}}
    chunks, off = [], 0
    for name, a in arrays.items():
        a = np.asarray(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header["arrays"][name] = [a.dtype.str.lstrip("<>|="), list(a.shape), off, len(b)]
        chunks.append(b)
        off += len(b)
    h = dumps(header)
    return MAGIC + len(h).to_bytes(4, "little") + h + b"".join(chunks)


def decode(blob: bytes) -> tuple[dict[str, np.ndarray], dict]:
    if blob[:4] != MAGIC:
        raise ValueError("not a liftstream chain blob")
    hl = int.from_bytes(blob[4:8], "little")
    header = loads(blob[8 : 8 + hl])
    body = memoryview(blob)[8 + hl :]
    out = {}
    for name, (dt, shape, off, n) in header["arrays"].items():
        a = np.frombuffer(body[off : off + n], dtype=np.dtype("<" + dt))
        out[name] = a.reshape(shape).copy()
    return out, header["meta"]


def append_window(old: dict[str, np.ndarray] | None, new: dict[str, np.ndarray],
                  keep: int) -> dict[str, np.ndarray]:
    """Concatenate draw windows [C, T, …] along T and keep the last ``keep``."""
    if old is None or any(k not in old or old[k].shape[0] != new[k].shape[0] or
                          old[k].shape[2:] != new[k].shape[2:] for k in new):
        merged = new
    else:
        merged = {k: np.concatenate([old[k], new[k]], axis=1) for k in new}
    return {k: v[:, -keep:] for k, v in merged.items()}
