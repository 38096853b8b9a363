"""Access to the JSON Schema contracts shipped in this package, and builders
for the records whose shape this package owns (dead letters).

The schema files are the cross-language contract (docs/architecture.md#contracts); Python code
validates with the hand-written checks in :mod:`schemas.validate` and uses the
files for documentation, tests and the HTTP API. They are read through
``importlib.resources`` so they work from a wheel or a zip, not only a checkout.
"""

from __future__ import annotations

import base64
import copy
import functools
from importlib import resources
from typing import Any

import orjson

from schemas.validate import SCHEMA_VERSION, InvalidRecord

__all__ = [
    "DEAD_LETTER_MAX_ORIGINAL_BYTES",
    "SCHEMA_NAMES",
    "dead_letter_record",
    "load_schema",
]

SCHEMA_NAMES: tuple[str, ...] = ("event", "experiment", "estimate", "alert", "deadletter")

DEAD_LETTER_MAX_ORIGINAL_BYTES = 64 * 1024
"""How much of a bad message is kept. Larger values are cut, so that a 1 MB
garbage message cannot make the dead-letter record itself exceed the broker's
message size limit (base64 adds a third) and stop the worker that writes it."""


@functools.cache
def _load(name: str) -> dict[str, Any]:
    text = resources.files("schemas").joinpath(f"{name}.schema.json").read_bytes()
    return orjson.loads(text)


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) named ``name``: one of :data:`SCHEMA_NAMES`,
    with or without the ``.schema.json`` suffix. Returns a fresh copy each time
    (files are parsed once), so callers may modify it."""
    base = name.removesuffix(".json").removesuffix(".schema")
    if base not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    return copy.deepcopy(_load(base))


def dead_letter_record(
    raw: bytes | bytearray | memoryview | None,
    err: InvalidRecord,
    topic: str,
    partition: int,
    offset: int,
    now_ms: int,
    *,
    key: bytes | None = None,
) -> dict[str, Any]:
    """The ``liftstream.dead-letter`` value for a rejected message
    (see ``deadletter.schema.json``); encode it with :func:`schemas.codec.dumps`.

    ``raw`` is kept base64-encoded (so any bytes survive a JSON round trip) and
    cut to :data:`DEAD_LETTER_MAX_ORIGINAL_BYTES`; ``None`` (a tombstone) is
    kept as an empty string. Use ``-1`` for an unknown partition/offset.
    """
    original = b"" if raw is None else bytes(raw)
    size = len(original)
    truncated = size > DEAD_LETTER_MAX_ORIGINAL_BYTES
    if truncated:
        original = original[:DEAD_LETTER_MAX_ORIGINAL_BYTES]
    return {
        "schema_version": SCHEMA_VERSION,
        "reason": err.as_dict(),
        "source": {"topic": topic, "partition": int(partition), "offset": int(offset)},
        "original_b64": base64.b64encode(original).decode("ascii"),
        "original_size": size,
        "original_truncated": truncated,
        "key_b64": None if key is None else base64.b64encode(key).decode("ascii"),
        "received_at": int(now_ms),
    }
