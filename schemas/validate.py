"""Validation of raw bytes into typed records, with stable reasons (docs/architecture.md#contracts).

Ingest runs :func:`parse_event_row` once per Kafka message. Its fast path is
msgspec: one ``Decoder`` into tagged Structs whose constraints are the
contract's (id patterns, ts range, value bounds), ~0.8 µs per event against
~4 µs for ``orjson.loads`` plus the hand-written checks. Only what msgspec
accepts *and* passes the remaining check (ts not in the future) takes it;
everything else goes through the hand-written reference validator
(:func:`parse_event`'s rules), which gives the stable reason codes and
messages. msgspec is stricter than the reference in places (``1.0`` for an
int, ``schema_version: 1.0``), never looser: those inputs take the reference
path and get its verdict (a differential test, ``tests/unit/schemas/test_schemas.py``,
checks both paths agree on valid and mutated events). No jsonschema on the
hot path (it is ~100x slower); the JSON Schema files in this package describe
the same rules for other languages and are checked against this module by a
differential test too.

Every rejection is an :class:`InvalidRecord` whose ``code`` is stable (counted
in metrics, written to the dead-letter topic) and whose ``message`` is for a
person reading the dead-letter record. Nothing else escapes for bytes input:
a malformed event must never stop a worker.

Identifier rule (why two classes):

* **opaque ids** -- ``event_id``, ``unit_id`` -- match ``[A-Za-z0-9._:@/+=-]{1,128}``.
  They come from producers (UUIDs, ``user:42``, e-mail-like ids, base64) and
  appear in Redis only inside a hash-tagged key or as the *last* key segment /
  a set member, so ``:``, ``/``, ``+``, ``=``, ``@`` are harmless there.
* **names** -- ``experiment_id``, ``variant``, ``metric`` -- match
  ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``. They are *inner* fields of composite
  keys: the Redis key ``lr:{e:<experiment_id>}:estimate:<metric>:<variant>``
  would be ambiguous if ``metric``/``variant`` could contain ``:``
  (``a:b``+``c`` vs ``a``+``b:c``); the Kafka key ``<experiment_id>|<metric>|<variant>``
  and the hash tag ``{e:<id>}`` need no ``|``, ``{``, ``}``; experiment ids
  are URL path segments of the HTTP API (no ``/``) and CLI arguments (no
  leading ``-``; no ``.``/``..``).

Neither class admits whitespace, control characters, quotes, ``{``, ``}``,
``|``, ``*``, ``?``, ``[``, ``]`` (Redis ``SCAN MATCH`` glob metacharacters) or
non-ASCII, so keys built from them never need escaping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NoReturn

import msgspec
import orjson

from schemas.records import (
    COVARIATES,
    DEFAULT_EXPOSURE_AGE_BINS,
    DEFAULT_STRATA_EDGES,
    METRIC_KINDS,
    PRIORS,
    ExperimentConfig,
    Exposure,
    Metric,
    MetricSpec,
)

__all__ = [
    "CODES",
    "DEFAULT_MAX_FUTURE_MS",
    "ID_PATTERN",
    "InvalidRecord",
    "MAX_ABS_VALUE",
    "MAX_EVENT_BYTES",
    "MAX_EXPERIMENT_BYTES",
    "MAX_ID_LENGTH",
    "MAX_TS_MS",
    "MIN_TS_MS",
    "NAME_PATTERN",
    "PRE_ACTIVITY_MAX",
    "PRE_MAX_ENTRIES",
    "SCHEMA_VERSION",
    "experiment_to_dict",
    "is_valid_id",
    "is_valid_name",
    "parse_event",
    "incompatible_change",
    "parse_event_row",
    "parse_event_row_reference",
    "parse_experiment",
]

SCHEMA_VERSION = 1
"""The only ``schema_version`` this code reads and writes. Absent means 1."""

MAX_EVENT_BYTES = 64 * 1024
"""Events are a few hundred bytes; anything near this is a producer bug or an attack."""

MAX_EXPERIMENT_BYTES = 256 * 1024
MAX_ID_LENGTH = 128
MIN_TS_MS = 946_684_800_000
"""2000-01-01T00:00:00Z. Earlier is a unit mistake (seconds instead of ms) or garbage."""

MAX_TS_MS = 2**53 - 1
"""Largest integer a JSON double (and JavaScript) represents exactly."""

DEFAULT_MAX_FUTURE_MS = 300_000
MAX_ABS_VALUE = 1e12
PRE_ACTIVITY_MAX = 28
PRE_MAX_ENTRIES = 64
"""At most this many entries in an exposure's ``pre`` (as many as a config has metrics)."""

ID_PATTERN = r"[A-Za-z0-9._:@/+=-]{1,128}"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID_RE = re.compile(ID_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)

#: ``bytes.translate`` table of ID_PATTERN's character class: ``b"a"`` for a
#: byte (an ASCII character) in the class, ``b" "`` for any other, so that
#: ``s.encode().translate(_ID_TABLE).isalpha()`` says whether ``s`` is non-empty
#: and all of its characters are in the class (a non-ASCII character encodes
#: to bytes >= 0x80, all ``b" "``). Built from the regex itself. On the ingest
#: hot path it replaces ``_ID_RE.fullmatch`` (~1.7k instructions per id, most
#: of it the matcher's setup; callgrind): ~0.9k for event_id and unit_id
#: together, their lengths checked by msgspec (``_FastId``).
_ID_TABLE = bytes(97 if _ID_RE.fullmatch(chr(i)) else 32 for i in range(256))

CODES: frozenset[str] = frozenset(
    {
        "not_json",  # undecodable: not UTF-8 JSON, empty, a tombstone
        "not_object",  # JSON, but not an object at the top level
        "unknown_type",  # "type" is a string other than exposure|metric
        "missing_field",  # a required field is absent
        "bad_type",  # a field has the wrong JSON type (bools are not numbers)
        "not_finite",  # NaN / Infinity (non-standard JSON, e.g. Python's json.dumps)
        "out_of_range",  # number outside its sane bounds
        "too_large",  # raw message larger than the limit
        "bad_id",  # id/name empty, too long, or outside its charset
        "ts_in_future",  # ts beyond now + max_future_ms (clock skew, ms/us mix-up)
        "unsupported_version",  # schema_version other than 1
        "bad_config",  # experiment config invalid (see InvalidRecord.field)
    }
)
"""Codes produced by this module. Other layers may add their own snake_case codes
for the dead-letter topic (e.g. ``unknown_experiment``); these never change meaning."""


class InvalidRecord(Exception):
    """A record that cannot be accepted, with a stable machine ``code``, a
    sentence for people (``message``) and, where one is to blame, the ``field``."""

    code: str
    message: str
    field: str | None

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message, field)  # args kept so it pickles
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        """The ``reason`` object of a dead-letter record."""
        d = {"code": self.code, "message": self.message}
        if self.field is not None:
            d["field"] = self.field
        return d


# --------------------------------------------------------------------------- helpers

_MISSING: Any = object()
_JSON_TYPE = {
    dict: "object",
    list: "array",
    tuple: "array",
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _jtype(v: Any) -> str:
    return _JSON_TYPE.get(type(v), type(v).__name__)


def _short(v: Any, limit: int = 60) -> str:
    """A bounded repr for messages: dead-letter reasons must stay small."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _fail(code: str, message: str, field: str | None = None) -> NoReturn:
    raise InvalidRecord(code, message, field)


def is_valid_id(s: object) -> bool:
    """Whether ``s`` may be used as an event_id / unit_id (see module docs):
    ``_ID_RE.fullmatch(s)``, without the regex (``_ID_TABLE``)."""
    return (type(s) is str and len(s) <= MAX_ID_LENGTH and s.isascii()
            and s.encode().translate(_ID_TABLE).isalpha())


def is_valid_name(s: object) -> bool:
    """Whether ``s`` may be used as an experiment_id / variant / metric name."""
    return type(s) is str and _NAME_RE.fullmatch(s) is not None


def _bad_ident(field: str, v: Any, *, name: bool) -> NoReturn:
    """Diagnose why ``v`` failed the id/name regex (error path only)."""
    if v is _MISSING:
        _fail("missing_field", f"required field '{field}' is missing", field)
    if type(v) is not str:
        _fail("bad_type", f"field '{field}' must be a string, got {_jtype(v)}", field)
    if not v:
        _fail("bad_id", f"field '{field}' is empty", field)
    if len(v) > MAX_ID_LENGTH:
        _fail("bad_id", f"field '{field}' is {len(v)} characters long (max {MAX_ID_LENGTH})", field)
    if name:
        rule = "letters, digits and . _ - (starting with a letter or digit)"
    else:
        rule = "letters, digits and . _ : @ / + = -"
    _fail("bad_id", f"field '{field}' = {_short(v)} has characters outside {rule}", field)


def _ts_error(field: str, v: Any) -> NoReturn:
    if v is _MISSING:
        _fail("missing_field", f"required field '{field}' is missing", field)
    if type(v) is float:
        if not math.isfinite(v):
            _fail("not_finite", f"field '{field}' is {v}", field)
        _fail("bad_type", f"field '{field}' must be an integer (epoch ms), got {v!r}", field)
    _fail("bad_type", f"field '{field}' must be an integer (epoch ms), got {_jtype(v)}", field)


def _ts_range(field: str, v: int) -> NoReturn:
    if MIN_TS_MS // 1000 <= v < MIN_TS_MS // 10:
        hint = " (it looks like seconds; epoch milliseconds are expected)"
    else:
        hint = ""
    _fail(
        "out_of_range",
        f"field '{field}' = {v} is outside [{MIN_TS_MS}, {MAX_TS_MS}] epoch ms{hint}",
        field,
    )


def _num_error(field: str, v: Any) -> NoReturn:
    if v is _MISSING:
        _fail("missing_field", f"required field '{field}' is missing", field)
    if type(v) is float and not math.isfinite(v):
        _fail("not_finite", f"field '{field}' is {v}", field)
    _fail("bad_type", f"field '{field}' must be a number, got {_jtype(v)}", field)


def _find_non_finite(obj: Any, path: str = "", depth: int = 0) -> str | None:
    """Path of the first NaN/Infinity in a stdlib-decoded value (error path only)."""
    if depth > 64:
        return None
    if type(obj) is float:
        return None if math.isfinite(obj) else (path or "$")
    if type(obj) is dict:
        for k, v in obj.items():
            p = _find_non_finite(v, f"{path}.{k}" if path else str(k), depth + 1)
            if p is not None:
                return p
    elif type(obj) is list:
        for i, v in enumerate(obj):
            p = _find_non_finite(v, f"{path}[{i}]", depth + 1)
            if p is not None:
                return p
    return None


def _not_json(raw: bytes | bytearray | memoryview, exc: Exception) -> NoReturn:
    """Turn a decode failure into the most useful reason.

    Producers written with Python's ``json.dumps`` emit ``NaN``/``Infinity`` and
    overflowing literals (``1e400``), which strict JSON (orjson) rejects. Saying
    ``not_finite`` with the field beats ``unexpected character``; the stdlib
    re-parse only happens on this error path.
    """
    detail = str(exc)
    b = bytes(raw)
    if b"NaN" in b or b"Infinity" in b or "infinity" in detail:
        try:
            obj = json.loads(b)
        except (ValueError, RecursionError):
            obj = _MISSING
        if obj is not _MISSING:
            where = _find_non_finite(obj)
            if where is not None:
                field = where.split(".", 1)[0].split("[", 1)[0] if where != "$" else None
                _fail(
                    "not_finite",
                    f"'{where}' is NaN, Infinity or overflows a double; "
                    "JSON numbers must be finite "
                    "(Python: json.dumps(..., allow_nan=False) catches this at the producer)",
                    field,
                )
    _fail("not_json", f"not valid JSON: {detail}")


def _decode_object(raw: Any, limit: int) -> dict[str, Any]:
    """Bytes -> dict, with size, JSON and top-level-type checks."""
    tr = type(raw)
    if tr is bytes or tr is bytearray:
        n = len(raw)
    elif tr is memoryview:
        n = raw.nbytes
    elif tr is str:
        try:
            raw = raw.encode()
        except UnicodeEncodeError:
            _fail("not_json", "not valid JSON: string is not encodable as UTF-8")
        n = len(raw)
    elif raw is None:
        _fail("not_json", "message has no value (a tombstone?)")
    else:
        raise TypeError(f"expected bytes, got {tr.__name__}")
    if n > limit:
        _fail("too_large", f"message is {n} bytes (max {limit})")
    if n == 0:
        _fail("not_json", "message is empty")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        _not_json(raw, e)
    if type(obj) is not dict:
        _fail("not_object", f"top-level JSON value must be an object, got {_jtype(obj)}")
    return obj


def _check_version(v: Any) -> None:
    if v is None or v is _MISSING:
        return
    if type(v) is bool or not isinstance(v, int | float):
        _fail(
            "bad_type",
            f"field 'schema_version' must be an integer, got {_jtype(v)}",
            "schema_version",
        )
    if v != SCHEMA_VERSION:
        _fail(
            "unsupported_version",
            f"schema_version {_short(v)} is not supported (this reader knows {SCHEMA_VERSION})",
            "schema_version",
        )


# --------------------------------------------------------------------------- events


def parse_event(
    raw: bytes | bytearray | memoryview | str,
    *,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> Exposure | Metric:
    """Validate one event's bytes (a Kafka value) into an Exposure or Metric.

    ``now_ms`` (default: the wall clock) bounds ``ts`` from above with
    ``max_future_ms`` of tolerance; pass it explicitly when replaying old data
    or in tests. Unknown extra fields are ignored (producers may add fields).
    Integral floats (``1.7e12``) are accepted where integers are required,
    as JSON Schema does. Raises :class:`InvalidRecord`, and only that, for any
    bytes; ``TypeError`` only for a non-bytes-like argument (a caller bug).
    """
    _, kind, event_id, experiment_id, unit_id, name, ts, num, pre = parse_event_row(
        raw, 0, now_ms=now_ms, max_future_ms=max_future_ms)
    if kind == "x":
        return Exposure(event_id, experiment_id, unit_id, name, ts, num, pre)
    return Metric(event_id, unit_id, name, num, ts, experiment_id)


# Names (experiment_id, variant, metric) that passed the regex: a handful of
# distinct strings repeated in every event, so a set lookup replaces the
# regex on the hot path. Bounded: cleared when it grows past the limit.
_NAMES_OK: set[str] = set()
_NAMES_OK_MAX = 4096


def _name_ok(v: str) -> bool:
    """Regex check of a str not in the cache; caches it when it passes."""
    if _NAME_RE.fullmatch(v) is None:
        return False
    if len(_NAMES_OK) >= _NAMES_OK_MAX:
        _NAMES_OK.clear()
    _NAMES_OK.add(v)
    return True


# ---- the msgspec fast path (see the module docstring)

_FastTs = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]
_FastValue = Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
_FastPre = Annotated[dict[str, _FastValue], msgspec.Meta(max_length=PRE_MAX_ENTRIES)]
#: an opaque id's length (in characters, as ``len``), checked in msgspec's C;
#: its characters are checked after the decode (``_ID_TABLE``)
_FastId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]


# gc=False: a decoded event lives for one call and holds only str, int,
# float and a dict of floats, so it can be in no reference cycle; the
# collector need not track (and, while it is alive, scan) it
class _FastExposure(msgspec.Struct, tag="exposure", tag_field="type", forbid_unknown_fields=True,
                    gc=False):
    event_id: _FastId  # ids' characters and names: checked after the decode (a msgspec
    experiment_id: str  # pattern runs Python's re on every string, ~0.5 µs each)
    unit_id: _FastId
    variant: str
    ts: _FastTs
    pre_activity: Annotated[float, msgspec.Meta(ge=0, le=PRE_ACTIVITY_MAX)] | None = None
    pre: _FastPre | None = None  # keys: checked after the decode, as names
    schema_version: Literal[1] | None = None  # SCHEMA_VERSION


class _FastMetric(msgspec.Struct, tag="metric", tag_field="type", forbid_unknown_fields=True,
                  gc=False):
    event_id: _FastId
    unit_id: _FastId
    metric: str
    value: _FastValue
    ts: _FastTs
    experiment_id: str | None = None
    schema_version: Literal[1] | None = None


#: Unknown fields are allowed by the contract but refused here: msgspec skips
#: an unknown field's value without the checks orjson makes (a number literal
#: that overflows a double, an int beyond 64 bits), so an event with extra
#: fields takes the reference path and gets its verdict.
_FAST_DECODE = msgspec.json.Decoder(_FastExposure | _FastMetric).decode
#: UnicodeEncodeError: ``str.encode`` of a lone surrogate, which msgspec never
#: decodes (it rejects ``"\\ud800"``: a test pins it); caught all the same, so
#: that no str can stop a worker
_FAST_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError,
                UnicodeEncodeError)


def parse_event_row(
    raw: bytes | bytearray | memoryview | str,
    offset: int,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> tuple:
    """:func:`parse_event` without the dataclass, for the ingest hot path:
    the same verdicts, reasons and messages, returning the row
    ``(offset, kind, event_id, experiment_id, unit_id, name, ts, num, pre)``
    with kind ``"x"`` (exposure: name = variant, num = pre_activity as a float
    or None, pre = ``{metric: float}`` or None, an empty object too) or
    ``"m"`` (metric: name = metric, num = value as a float, experiment_id
    possibly None, pre None); ts is an int. ``offset`` is passed through (the
    source position; see ``streams.state.store``'s rows).

    msgspec first; what it rejects (or a ts in the future) goes to
    :func:`parse_event_row_reference`, which raises the reason."""
    # ASCII only (ids and names are): non-ASCII text takes the reference path
    if type(raw) is bytes and len(raw) <= MAX_EVENT_BYTES and raw.isascii():
        try:
            ev = _FAST_DECODE(raw)
            # both ids' characters at once: each is 1..128 long (_FastId), so
            # this is _ID_RE.fullmatch of each (see _ID_TABLE)
            ids_ok = (ev.event_id + ev.unit_id).encode().translate(_ID_TABLE).isalpha()
        except _FAST_ERRORS:
            pass
        else:
            if now_ms is None:
                now_ms = int(time.time() * 1000)
            names = _NAMES_OK
            if ids_ok and ev.ts <= now_ms + max_future_ms:
                eid = ev.experiment_id
                if type(ev) is _FastExposure:
                    v = ev.variant
                    pre = ev.pre
                    if (eid in names or _name_ok(eid)) and (v in names or _name_ok(v)) and (
                            pre is None or all(k in names or _name_ok(k) for k in pre)):
                        return (offset, "x", ev.event_id, eid, ev.unit_id, v, ev.ts,
                                ev.pre_activity, pre or None)
                else:
                    m = ev.metric
                    if (eid is None or eid in names or _name_ok(eid)) and (
                            m in names or _name_ok(m)):
                        return (offset, "m", ev.event_id, eid, ev.unit_id, m, ev.ts,
                                ev.value, None)
    return parse_event_row_reference(raw, offset, now_ms=now_ms, max_future_ms=max_future_ms)


def parse_event_row_reference(
    raw: bytes | bytearray | memoryview | str,
    offset: int,
    *,
    now_ms: int | None = None,
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS,
) -> tuple:
    """The hand-written validator behind :func:`parse_event_row`: the same
    checks as :func:`parse_event`, reasons and messages, returning the row
    ``(offset, kind, event_id, experiment_id, unit_id, name, ts, num, pre)``
    (see :func:`parse_event_row`).
    """
    obj = _decode_object(raw, MAX_EVENT_BYTES)
    get = obj.get
    t = get("type", _MISSING)
    if t == "exposure":
        is_exposure = True
    elif t == "metric":
        is_exposure = False
    elif t is _MISSING:
        _fail("missing_field", "required field 'type' is missing", "type")
    elif type(t) is not str:
        _fail("bad_type", f"field 'type' must be a string, got {_jtype(t)}", "type")
    else:
        _fail("unknown_type", f"type {_short(t)} is not one of exposure, metric", "type")

    sv = get("schema_version", _MISSING)
    if sv is not _MISSING:
        _check_version(sv)

    idm = _ID_RE.fullmatch

    event_id = get("event_id", _MISSING)
    if type(event_id) is not str or idm(event_id) is None:
        _bad_ident("event_id", event_id, name=False)
    unit_id = get("unit_id", _MISSING)
    if type(unit_id) is not str or idm(unit_id) is None:
        _bad_ident("unit_id", unit_id, name=False)

    if is_exposure:
        experiment_id = get("experiment_id", _MISSING)
        if type(experiment_id) is not str or (
            experiment_id not in _NAMES_OK and not _name_ok(experiment_id)
        ):
            _bad_ident("experiment_id", experiment_id, name=True)
        name = get("variant", _MISSING)
        if type(name) is not str or (name not in _NAMES_OK and not _name_ok(name)):
            _bad_ident("variant", name, name=True)
    else:
        experiment_id = get("experiment_id")
        if experiment_id is not None and (
            type(experiment_id) is not str
            or (experiment_id not in _NAMES_OK and not _name_ok(experiment_id))
        ):
            _bad_ident("experiment_id", experiment_id, name=True)
        name = get("metric", _MISSING)
        if type(name) is not str or (name not in _NAMES_OK and not _name_ok(name)):
            _bad_ident("metric", name, name=True)

    ts = get("ts", _MISSING)
    if type(ts) is not int:
        if type(ts) is float and ts.is_integer():
            ts = int(ts)
        else:
            _ts_error("ts", ts)
    if ts < MIN_TS_MS or ts > MAX_TS_MS:
        _ts_range("ts", ts)
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    if ts > now_ms + max_future_ms:
        hint = " (it looks like microseconds)" if ts > 100 * now_ms > 0 else ""
        _fail(
            "ts_in_future",
            f"ts {ts} is {ts - now_ms} ms ahead of now ({now_ms}); "
            f"at most {max_future_ms} ms is tolerated{hint}",
            "ts",
        )

    if is_exposure:
        pa = get("pre_activity")
        if pa is not None:
            tp = type(pa)
            if tp is not int and tp is not float:
                _num_error("pre_activity", pa)
            if not 0 <= pa <= PRE_ACTIVITY_MAX:
                if tp is float and not math.isfinite(pa):
                    _num_error("pre_activity", pa)
                _fail(
                    "out_of_range",
                    f"field 'pre_activity' = {pa!r} is outside [0, {PRE_ACTIVITY_MAX}] "
                    "(active days in the 28 days before the experiment)",
                    "pre_activity",
                )
            pa = float(pa)
        pre = get("pre")
        if pre is not None:
            pre = _check_pre(pre)
        return (offset, "x", event_id, experiment_id, unit_id, name, ts, pa, pre)

    value = get("value", _MISSING)
    tv = type(value)
    if tv is not float and tv is not int:
        _num_error("value", value)
    if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
        if tv is float and not math.isfinite(value):
            _num_error("value", value)
        _fail(
            "out_of_range",
            f"field 'value' = {_short(value)} exceeds {MAX_ABS_VALUE:g} in absolute value",
            "value",
        )
    return (offset, "m", event_id, experiment_id, unit_id, name, ts, float(value), None)


def _check_pre(pre: Any) -> dict[str, float] | None:
    """An exposure's ``pre`` (CUPED covariates, issue 18): an object of at
    most ``PRE_MAX_ENTRIES`` metric names -> finite numbers within
    ``MAX_ABS_VALUE``, as floats; an empty object is None. The field to blame
    is ``pre`` (the dead-letter reason's message names the entry)."""
    if type(pre) is not dict:
        _fail("bad_type", "field 'pre' must be an object (metric name -> the unit's value "
              f"before the experiment), got {_jtype(pre)}", "pre")
    if len(pre) > PRE_MAX_ENTRIES:
        _fail("out_of_range", f"field 'pre' has {len(pre)} entries (max {PRE_MAX_ENTRIES})",
              "pre")
    out = {}
    for k, v in pre.items():
        if k not in _NAMES_OK and not _name_ok(k):
            if not k:
                why = "an empty key"
            elif len(k) > MAX_ID_LENGTH:
                why = f"a key {len(k)} characters long (max {MAX_ID_LENGTH})"
            else:
                why = (f"a key {_short(k)} with characters outside letters, digits and "
                       ". _ - (starting with a letter or digit)")
            _fail("bad_id", f"field 'pre' has {why}; its keys are metric names", "pre")
        tv = type(v)
        if tv is not float and tv is not int:
            _fail("bad_type", f"field 'pre.{k}' must be a number, got {_jtype(v)}", "pre")
        if not -MAX_ABS_VALUE <= v <= MAX_ABS_VALUE:
            if tv is float and not math.isfinite(v):
                _fail("not_finite", f"field 'pre.{k}' is {v}", "pre")
            _fail("out_of_range",
                  f"field 'pre.{k}' = {_short(v)} exceeds {MAX_ABS_VALUE:g} in absolute value",
                  "pre")
        out[k] = float(v)
    return out or None


# --------------------------------------------------------------------------- experiments

_MAX_VARIANTS = 64
_MAX_METRICS = 64
_MAX_STRATA = 64
_MAX_AGE_EDGES = 8  # exposure_age_bins (issue 19)
_MAX_DURATION_S = 366 * 86_400
_SHARE_TOL = 1e-6


def _cfg(message: str, field: str | None) -> NoReturn:
    _fail("bad_config", message, field)


def _is_number(v: Any) -> bool:
    # numbers.Real admits NumPy scalars handed in by Python callers; bool is excluded.
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _cfg_number(v: Any, field: str) -> float | int:
    if not _is_number(v):
        _cfg(f"'{field}' must be a number, got {_jtype(v)}", field)
    if isinstance(v, numbers.Integral):  # exact; math.isfinite would overflow on huge ints
        return int(v)
    if not math.isfinite(v):
        _cfg(f"'{field}' must be finite, got {v}", field)
    return float(v)


def _cfg_int(v: Any, field: str, lo: int, hi: int) -> int:
    x = _cfg_number(v, field)
    if isinstance(x, float):
        if not x.is_integer():
            _cfg(f"'{field}' must be an integer, got {x!r}", field)
        x = int(x)
    if not lo <= x <= hi:
        _cfg(f"'{field}' = {x} is outside [{lo}, {hi}]", field)
    return x


def _cfg_array(v: Any, field: str) -> list[Any] | tuple[Any, ...]:
    if type(v) is not list and type(v) is not tuple:
        _cfg(f"'{field}' must be an array, got {_jtype(v)}", field)
    return v


def _cfg_name(v: Any, field: str) -> str:
    if not is_valid_name(v):
        try:
            _bad_ident(field, v, name=True)
        except InvalidRecord as e:
            _cfg(e.message, field)
    return v


def _cfg_shares(v: Any, field: str, n: int, what: str, *, positive: bool) -> tuple[float, ...]:
    arr = _cfg_array(v, field)
    if len(arr) != n:
        _cfg(f"'{field}' has {len(arr)} entries; it needs one per {what} ({n})", field)
    out = tuple(float(_cfg_number(x, f"{field}[{i}]")) for i, x in enumerate(arr))
    for i, x in enumerate(out):
        if x < 0 or (positive and x == 0):
            bound = "positive" if positive else "non-negative"
            _cfg(f"'{field}[{i}]' = {x!r} must be {bound}", field)
    total = math.fsum(out)
    if abs(total - 1.0) > _SHARE_TOL:
        _cfg(f"'{field}' sums to {total!r}; it must sum to 1 (within {_SHARE_TOL:g})", field)
    return out


def _cfg_metric(v: Any, i: int) -> MetricSpec:
    field = f"metrics[{i}]"
    if type(v) is str:  # shorthand: a bare name
        return MetricSpec(_cfg_name(v, field))
    if not isinstance(v, Mapping):
        _cfg(f"'{field}' must be an object or a name, got {_jtype(v)}", field)
    if "name" not in v:
        _cfg(f"'{field}' has no 'name'", field)
    name = _cfg_name(v["name"], f"{field}.name")
    direction = v.get("direction")
    if direction is None:
        direction = "increase"
    elif direction not in ("increase", "decrease"):
        _cfg(
            f"'{field}.direction' = {_short(direction)} must be 'increase' or 'decrease'",
            f"{field}.direction",
        )
    thr = v.get("guardrail_threshold")
    if thr is not None:
        thr = float(_cfg_number(thr, f"{field}.guardrail_threshold"))
    return _cfg_metric_kind(v, field, MetricSpec(name, direction, thr))


def _cfg_metric_kind(v: Mapping[str, Any], field: str, spec: MetricSpec) -> MetricSpec:
    """A metric's kind and its fields (issue 26): ``kind`` one of
    ``METRIC_KINDS``; ``threshold`` on a conversion only; ``numerator`` and
    ``denominator`` (event metric names, different) required on a ratio and
    refused on the others; ``cap`` ``{"upper", "lower"}`` (numbers or null,
    lower <= upper) on a sum or a ratio's numerator, refused on a conversion."""
    kind = v.get("kind")
    if kind is None:
        kind = "sum"
    elif kind not in METRIC_KINDS:
        _cfg(f"'{field}.kind' = {_short(kind)} must be one of "
             f"{', '.join(map(repr, METRIC_KINDS))}", f"{field}.kind")
    kw: dict[str, Any] = {"kind": kind}
    thr = v.get("threshold")
    if thr is not None:
        thr = float(_cfg_number(thr, f"{field}.threshold"))
        if kind != "conversion" and thr != 0:
            _cfg(f"'{field}.threshold' applies to conversion metrics only (kind {kind!r})",
                 f"{field}.threshold")
        kw["threshold"] = thr
    for part in ("numerator", "denominator"):
        x = v.get(part)
        if kind == "ratio":
            if x is None:
                _cfg(f"'{field}' is a ratio: it needs '{part}' (an event metric name)",
                     f"{field}.{part}")
            kw[part] = _cfg_name(x, f"{field}.{part}")
        elif x is not None:
            _cfg(f"'{field}.{part}' applies to ratio metrics only (kind {kind!r})",
                 f"{field}.{part}")
    if kind == "ratio" and kw["numerator"] == kw["denominator"]:
        _cfg(f"'{field}': numerator and denominator are both {kw['numerator']!r}",
             f"{field}.denominator")
    cap = v.get("cap")
    if cap is None and (v.get("cap_lower") is not None or v.get("cap_upper") is not None):
        # the record's own field names (a MetricSpec encoded as it is)
        cap = {"lower": v.get("cap_lower"), "upper": v.get("cap_upper")}
    if cap is not None:
        if not isinstance(cap, Mapping):
            _cfg(f"'{field}.cap' must be an object {{\"upper\", \"lower\"}}, got "
                 f"{_jtype(cap)}", f"{field}.cap")
        if kind == "conversion":
            _cfg(f"'{field}.cap' applies to sum and ratio metrics (a conversion is 0/1)",
                 f"{field}.cap")
        lo, hi = cap.get("lower"), cap.get("upper")
        if lo is not None:
            kw["cap_lower"] = lo = float(_cfg_number(lo, f"{field}.cap.lower"))
        if hi is not None:
            kw["cap_upper"] = hi = float(_cfg_number(hi, f"{field}.cap.upper"))
        if lo is not None and hi is not None and lo > hi:
            _cfg(f"'{field}.cap': lower {lo!r} > upper {hi!r}", f"{field}.cap")
    return dataclasses.replace(spec, **kw)


def _cfg_metric_names(metrics: tuple[MetricSpec, ...]) -> None:
    """Across the metrics: names unique, and no ratio named like an event
    metric of the config (its cells and an event metric's would share a name)."""
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        _cfg(f"'metrics' has duplicate names: {dup}", "metrics")
    events = {e for m in metrics for e in m.event_names}
    for i, m in enumerate(metrics):
        if m.kind == "ratio" and m.name in events:
            _cfg(f"ratio metric {m.name!r} has the name of an event metric of the config "
                 "(a sum's or conversion's name, or a ratio's numerator or denominator)",
                 f"metrics[{i}].name")


def _cfg_edges(v: Any) -> tuple[float, ...]:
    field = "strata_edges"
    arr = _cfg_array(v, field)
    if not 2 <= len(arr) <= _MAX_STRATA + 1:
        _cfg(f"'{field}' needs 2..{_MAX_STRATA + 1} edges, got {len(arr)}", field)
    edges = tuple(_cfg_number(x, f"{field}[{i}]") for i, x in enumerate(arr))
    if edges[0] != 0:
        _cfg(f"'{field}' must start at 0 (pre_activity is 0..28), got {edges[0]!r}", field)
    for i in range(1, len(edges)):
        if not edges[i] > edges[i - 1]:
            _cfg(
                f"'{field}' must be strictly increasing; "
                f"edge {i} ({edges[i]!r}) <= edge {i - 1} ({edges[i - 1]!r})",
                field,
            )
    if not edges[-1] > PRE_ACTIVITY_MAX:
        _cfg(
            f"'{field}' must end above {PRE_ACTIVITY_MAX} so that pre_activity "
            f"{PRE_ACTIVITY_MAX} falls in the last stratum [lo, hi), got {edges[-1]!r}",
            field,
        )
    return edges


def _cfg_age_bins(v: Any) -> tuple[int, ...]:
    """``exposure_age_bins`` (issue 19): 1..8 distinct ascending integers >= 0
    (seconds since the unit's own exposure), the first 0."""
    field = "exposure_age_bins"
    arr = _cfg_array(v, field)
    if not 1 <= len(arr) <= _MAX_AGE_EDGES:
        _cfg(f"'{field}' needs 1..{_MAX_AGE_EDGES} edges (seconds since the unit's "
             f"exposure), got {len(arr)}", field)
    edges = tuple(_cfg_int(x, f"{field}[{i}]", 0, _MAX_DURATION_S) for i, x in enumerate(arr))
    if edges[0] != 0:
        _cfg(f"'{field}' must start at 0 (the unit's exposure), got {edges[0]}", field)
    if len(set(edges)) != len(edges):
        dup = sorted({x for x in edges if edges.count(x) > 1})
        _cfg(f"'{field}' has duplicate edges: {dup}", field)
    for i in range(1, len(edges)):
        if edges[i] < edges[i - 1]:
            _cfg(f"'{field}' must be ascending; edge {i} ({edges[i]}) < edge {i - 1} "
                 f"({edges[i - 1]})", field)
    return edges


def _age_edges_s(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The age-bin edges in effect (``streams.state.semantics.age_edges_ms``, in
    seconds): the configured ones (None: the default) inside the window."""
    bins = DEFAULT_EXPOSURE_AGE_BINS if cfg.exposure_age_bins is None else cfg.exposure_age_bins
    return tuple(sorted({int(e) for e in bins if 0 < int(e) < cfg.window_seconds}))


def parse_experiment(
    raw_or_dict: bytes | bytearray | memoryview | str | Mapping[str, Any] | ExperimentConfig,
) -> ExperimentConfig:
    """Validate an experiment config (topic ``liftstream.experiments``) into a record.

    Accepts the JSON bytes/str, an already-decoded mapping (arrays may be lists
    or tuples), or an :class:`ExperimentConfig` built in Python (to validate
    it). Absent or ``null`` optional fields take the record's defaults; unknown
    fields are ignored so that a newer writer does not break an older reader.
    Content errors raise ``InvalidRecord("bad_config", ..., field=...)``;
    undecodable input raises ``not_json`` / ``not_object`` / ``too_large``;
    a ``schema_version`` other than 1 raises ``unsupported_version``.
    """
    if isinstance(raw_or_dict, ExperimentConfig):
        d: Mapping[str, Any] = experiment_to_dict(raw_or_dict)
    elif isinstance(raw_or_dict, Mapping):
        d = raw_or_dict
    else:
        d = _decode_object(raw_or_dict, MAX_EXPERIMENT_BYTES)
    _check_version(d.get("schema_version"))

    def opt(key: str) -> Any:
        v = d.get(key)
        return _MISSING if v is None else v

    if d.get("experiment_id") is None:
        _cfg("required field 'experiment_id' is missing", "experiment_id")
    experiment_id = _cfg_name(d["experiment_id"], "experiment_id")

    kw: dict[str, Any] = {}
    if (v := opt("variants")) is not _MISSING:
        arr = _cfg_array(v, "variants")
        if not 2 <= len(arr) <= _MAX_VARIANTS:
            _cfg(f"'variants' needs 2..{_MAX_VARIANTS} entries, got {len(arr)}", "variants")
        variants = tuple(_cfg_name(x, f"variants[{i}]") for i, x in enumerate(arr))
        if len(set(variants)) != len(variants):
            dup = sorted({x for x in variants if variants.count(x) > 1})
            _cfg(f"'variants' has duplicates: {dup}", "variants")
        kw["variants"] = variants
    else:
        variants = ExperimentConfig.__dataclass_fields__["variants"].default
    if (v := opt("control")) is not _MISSING:
        kw["control"] = control = _cfg_name(v, "control")
    else:
        control = ExperimentConfig.__dataclass_fields__["control"].default
    if control not in variants:
        _cfg(f"control {control!r} is not among variants {list(variants)}", "control")

    if (v := opt("metrics")) is not _MISSING:
        arr = _cfg_array(v, "metrics")
        if not 1 <= len(arr) <= _MAX_METRICS:
            _cfg(f"'metrics' needs 1..{_MAX_METRICS} entries, got {len(arr)}", "metrics")
        metrics = tuple(_cfg_metric(x, i) for i, x in enumerate(arr))
        _cfg_metric_names(metrics)
        kw["metrics"] = metrics

    edges = _cfg_edges(v) if (v := opt("strata_edges")) is not _MISSING else DEFAULT_STRATA_EDGES
    if edges is not DEFAULT_STRATA_EDGES:
        kw["strata_edges"] = edges

    if (v := opt("bucket_seconds")) is not _MISSING:
        kw["bucket_seconds"] = _cfg_int(v, "bucket_seconds", 1, _MAX_DURATION_S)
    if (v := opt("window_seconds")) is not _MISSING:
        kw["window_seconds"] = _cfg_int(v, "window_seconds", 1, _MAX_DURATION_S)
    # 0 is meaningful for these two: no allowed lateness / no dedupe window.
    if (v := opt("lateness_seconds")) is not _MISSING:
        kw["lateness_seconds"] = _cfg_int(v, "lateness_seconds", 0, _MAX_DURATION_S)
    if (v := opt("dedupe_seconds")) is not _MISSING:
        kw["dedupe_seconds"] = _cfg_int(v, "dedupe_seconds", 0, _MAX_DURATION_S)
    if (v := opt("correction_seconds")) is not _MISSING:
        kw["correction_seconds"] = _cfg_int(v, "correction_seconds", 0, _MAX_DURATION_S)
    if (v := opt("hold_seconds")) is not _MISSING:
        kw["hold_seconds"] = _cfg_int(v, "hold_seconds", 0, _MAX_DURATION_S)
    if (v := opt("hold_max")) is not _MISSING:
        kw["hold_max"] = _cfg_int(v, "hold_max", 0, 4096)
    # partition_skew_seconds (the cross-partition watermark's skew bound) is
    # obsolete since maturity is per source partition: accepted, ignored.
    opt("partition_skew_seconds")
    if (v := opt("started_at")) is not _MISSING:
        kw["started_at"] = _cfg_int(v, "started_at", MIN_TS_MS, MAX_TS_MS)
    if (v := opt("end_at")) is not _MISSING and v is not None:
        kw["end_at"] = _cfg_int(v, "end_at", MIN_TS_MS, MAX_TS_MS)

    if (v := opt("target_shares")) is not _MISSING:
        kw["target_shares"] = _cfg_shares(
            v, "target_shares", len(edges) - 1, "stratum", positive=False
        )
    if (v := opt("allocation")) is not _MISSING:
        kw["allocation"] = _cfg_shares(v, "allocation", len(variants), "variant", positive=True)

    if (v := opt("alert_thresholds")) is not _MISSING:
        if not isinstance(v, Mapping):
            _cfg(f"'alert_thresholds' must be an object, got {_jtype(v)}", "alert_thresholds")
        thresholds: dict[str, float] = {}
        for k, x in v.items():
            key = _cfg_name(k, "alert_thresholds")
            thresholds[key] = float(_cfg_number(x, f"alert_thresholds.{key}"))
        kw["alert_thresholds"] = thresholds

    if (v := opt("status")) is not _MISSING:
        if v not in ("running", "stopped"):
            _cfg(f"'status' = {_short(v)} must be 'running' or 'stopped'", "status")
        kw["status"] = v
    if (v := opt("prior_sd_logit_p")) is not _MISSING:
        x = float(_cfg_number(v, "prior_sd_logit_p"))
        if not 0 < x <= 10:
            _cfg(f"'prior_sd_logit_p' = {x!r} must be in (0, 10]", "prior_sd_logit_p")
        kw["prior_sd_logit_p"] = x
    if (v := opt("prior")) is not _MISSING:
        if v not in PRIORS:
            _cfg(f"'prior' = {_short(v)} must be one of {', '.join(map(repr, PRIORS))}", "prior")
        kw["prior"] = v
    if (v := opt("covariates")) is not _MISSING:
        if v not in COVARIATES:
            _cfg(f"'covariates' = {_short(v)} must be one of "
                 f"{', '.join(map(repr, COVARIATES))}", "covariates")
        kw["covariates"] = v
    if (v := opt("exposure_age_bins")) is not _MISSING:
        kw["exposure_age_bins"] = _cfg_age_bins(v)
    kw.update(_cfg_decision(opt, kw.get("metrics") or ExperimentConfig.__dataclass_fields__[
        "metrics"].default))

    return ExperimentConfig(experiment_id, **kw)


def _cfg_decision(opt, metrics) -> dict[str, Any]:
    """The decision fields (issue 27): ``primary`` one of the metrics,
    ``mde`` / ``mde_relative`` positive and not both, ``decision_alpha`` in
    (0, 0.5], ``look_seconds`` 60 s .. a year."""
    kw: dict[str, Any] = {}
    if (v := opt("primary")) is not _MISSING:
        name = _cfg_name(v, "primary")
        if name not in [m.name for m in metrics]:
            _cfg(f"primary {name!r} is not among the metrics", "primary")
        kw["primary"] = name
    for key in ("mde", "mde_relative"):
        if (v := opt(key)) is not _MISSING:
            x = float(_cfg_number(v, key))
            if not x > 0:
                _cfg(f"'{key}' = {x!r} must be > 0", key)
            kw[key] = x
    if "mde" in kw and "mde_relative" in kw:
        _cfg("give 'mde' (metric units) or 'mde_relative' (lift), not both", "mde")
    if (v := opt("decision_alpha")) is not _MISSING:
        x = float(_cfg_number(v, "decision_alpha"))
        if not 0 < x <= 0.5:
            _cfg(f"'decision_alpha' = {x!r} must be in (0, 0.5]", "decision_alpha")
        kw["decision_alpha"] = x
    if (v := opt("look_seconds")) is not _MISSING:
        kw["look_seconds"] = _cfg_int(v, "look_seconds", 60, _MAX_DURATION_S)
    return kw


def incompatible_change(old: ExperimentConfig, new: ExperimentConfig,
                        concluded: bool = False) -> str | None:
    """Why ``new`` cannot replace ``old`` for an experiment that already has
    state, or None. Unit records store variant and metric *indices*, cells
    and arrivals are keyed by stratum and entry bucket, and a unit's outcome
    is defined by its window and its metric's kind: so variants and metrics
    may only be appended (same order; metrics of any kind), a metric's kind,
    threshold, numerator, denominator and cap are fixed (issue 26), and
    control, window, buckets, strata, the start (the entry-bucket grid's
    origin) and the exposure-age bins in effect (unit records keep totals
    per bin) are fixed once units exist. A concluded
    experiment (``concluded``) has deleted its unit records and final
    estimates are out: reopening it (another ``end_at`` or ``status``) would
    fold its returning units a second time, so those are fixed too.
    Everything else (thresholds, priors, covariates, ...; ``end_at`` and
    ``status`` until concluded) may change. Callers reject such a config with
    code ``incompatible_config``."""
    if new.variants[:len(old.variants)] != old.variants:
        return (f"variants may only be appended: {list(old.variants)} -> "
                f"{list(new.variants)}")
    if new.metric_names[:len(old.metric_names)] != old.metric_names:
        return (f"metrics may only be appended: {list(old.metric_names)} -> "
                f"{list(new.metric_names)}")
    for om, nm in zip(old.metrics, new.metrics, strict=False):
        for name in _METRIC_FIXED:
            a, b = getattr(om, name), getattr(nm, name)
            if a != b:
                return (f"metric {om.name!r}: {name} is fixed once the experiment has units "
                        f"(unit totals and cells hold its outcome): {a!r} -> {b!r}")
    for name in ("control", "window_seconds", "bucket_seconds", "strata_edges", "started_at"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            return f"{name} is fixed once the experiment has units: {a!r} -> {b!r}"
    if concluded:
        for name in ("end_at", "status"):
            a, b = getattr(old, name), getattr(new, name)
            if a != b:
                return (f"{name} is fixed once the experiment is concluded (reopening it "
                        f"would count its units twice): {a!r} -> {b!r}")
    if _age_edges_s(old) != _age_edges_s(new):
        return ("exposure_age_bins is fixed once the experiment has units: "
                f"{_bins_text(old.exposure_age_bins)} -> {_bins_text(new.exposure_age_bins)}")
    return None


#: what defines a metric's per-unit outcome (issue 26): fixed once units exist
_METRIC_FIXED = ("kind", "threshold", "numerator", "denominator", "cap_lower", "cap_upper")


def _bins_text(bins: tuple[int, ...] | None) -> str:
    return "None (the default)" if bins is None else repr(list(bins))


def experiment_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The JSON form of a config (``schema_version`` 1, every field explicit).

    ``parse_experiment(experiment_to_dict(cfg)) == cfg`` for every valid config;
    encode with :func:`schemas.codec.dumps`. Does not validate: pass the result
    to :func:`parse_experiment` for that.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "experiment_id": cfg.experiment_id,
        "variants": list(cfg.variants),
        "control": cfg.control,
        "metrics": [
            {
                "name": m.name,
                "direction": m.direction,
                "guardrail_threshold": m.guardrail_threshold,
                "kind": m.kind,
                "threshold": m.threshold,
                "numerator": m.numerator,
                "denominator": m.denominator,
                "cap": ({"upper": m.cap_upper, "lower": m.cap_lower} if m.capped else None),
            }
            for m in cfg.metrics
        ],
        "strata_edges": list(cfg.strata_edges),
        "bucket_seconds": cfg.bucket_seconds,
        "window_seconds": cfg.window_seconds,
        "lateness_seconds": cfg.lateness_seconds,
        "dedupe_seconds": cfg.dedupe_seconds,
        "correction_seconds": cfg.correction_seconds,
        "hold_seconds": cfg.hold_seconds,
        "hold_max": cfg.hold_max,
        "started_at": cfg.started_at,
        "end_at": cfg.end_at,
        "target_shares": None if cfg.target_shares is None else list(cfg.target_shares),
        "allocation": None if cfg.allocation is None else list(cfg.allocation),
        "alert_thresholds": dict(cfg.alert_thresholds),
        "status": cfg.status,
        "prior_sd_logit_p": cfg.prior_sd_logit_p,
        "prior": cfg.prior,
        "covariates": cfg.covariates,
        "exposure_age_bins": (None if cfg.exposure_age_bins is None
                              else list(cfg.exposure_age_bins)),
        "primary": cfg.primary,
        "mde": cfg.mde,
        "mde_relative": cfg.mde_relative,
        "decision_alpha": cfg.decision_alpha,
        "look_seconds": cfg.look_seconds,
    }
