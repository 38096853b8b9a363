"""The one JSON encoding used on every topic and in Redis (docs/architecture.md#contracts: "Values
are JSON (orjson)").

Every layer goes through these two functions so that the bytes a record is
written as never depend on which module wrote it: the estimate in Kafka and the
estimate in Redis are meant to be byte-for-byte the same JSON.

What ``dumps`` accepts, beyond orjson's native types (dict, list, tuple, str,
int, float, bool, None, dataclass instances, enums, datetimes, UUIDs):

- NumPy values and arrays (``OPT_SERIALIZE_NUMPY``: orjson recognises them
  itself, so this module never imports NumPy), and any other array-like with a
  ``tolist()`` method (CuPy arrays, NumPy arrays of dtypes orjson skips);
- subclasses of ``float`` (orjson only takes exact ``float``), sets and
  frozensets (as lists, sorted when their items sort).

Non-finite floats (NaN, ±inf) are written as ``null``: JSON has no spelling for
them. Consumers of estimates therefore already see ``null`` where a statistic is
undefined (e.g. R-hat with too few draws); the JSON Schemas allow it there.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DecodeError", "EncodeError", "dumps", "loads"]

DecodeError = orjson.JSONDecodeError
"""Raised by :func:`loads`; a subclass of ``ValueError`` (and ``json.JSONDecodeError``)."""

EncodeError = orjson.JSONEncodeError
"""Raised by :func:`dumps`; a subclass of ``TypeError``."""

_OPTS = orjson.OPT_SERIALIZE_NUMPY
_OPTS_SORTED = _OPTS | orjson.OPT_SORT_KEYS


def _default(obj: Any) -> Any:
    """Fallback for types orjson does not serialise natively.

    Duck-typed (``tolist``) rather than ``isinstance`` checks, so that
    ``schemas`` stays free of NumPy/CuPy imports (docs/architecture.md#layout-and-layers).
    """
    if isinstance(obj, float):  # float subclasses, e.g. numpy.float64 without the option path
        return float(obj)
    if isinstance(obj, set | frozenset):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON bytes.

    ``sort_keys=True`` gives a canonical form (useful for hashing or comparing
    records); it is off by default because it costs time on the hot path.
    Raises :data:`EncodeError` (a ``TypeError``) for unserialisable values.
    """
    return orjson.dumps(obj, default=_default, option=_OPTS_SORTED if sort_keys else _OPTS)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON. Strict: rejects NaN/Infinity literals, invalid UTF-8 and lone
    surrogates, raising :data:`DecodeError` (a ``ValueError``).

    For event bytes from Kafka use :func:`schemas.validate.parse_event`, which
    wraps this with size limits and turns every failure into ``InvalidRecord``.
    """
    return orjson.loads(data)
