"""Unit records (``streams.state.store``'s note 1): a unit's state as its ``units`` hash value
and back, about one record per event in the partition owner's commit (issue 25).

Apart from ``streams.state.store`` (Redis, I/O) so that ``streams.native`` can compile it
with mypyc: pure functions of their arguments, no Redis. ``store`` re-exports them.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from schemas.records import ExperimentConfig
from streams.state.semantics import UnitState, age_edges_ms, age_tracking, pack_dirty_units


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _int(x: Any) -> int:
    s = _s(x)
    try:
        return int(s)
    except ValueError:
        return int(float(s))


_UNIT_HEAD = struct.Struct("<BHHBdd")
_UNIT2_HEAD = struct.Struct("<BHHBddH")
_UNIT3_TAIL = struct.Struct("<HHBH")
#: the common records as one Struct each, by number of event metrics: version
#: 1 (head + totals) and 2 (head + M + totals + pre values)
_UNIT1: dict[int, struct.Struct] = {}
_UNIT2: dict[int, struct.Struct] = {}
#: [(config, its number of event metrics)] of the last ``_n_event_metrics``
#: call (one tuple, replaced whole: threads see one or the other):
#: ``ExperimentConfig.event_metrics`` is computed on every access
_LAST_M: list = [(None, 0)]


def _n_event_metrics(cfg: ExperimentConfig) -> int:
    """len(cfg.event_metrics), remembered for the last config asked about
    (the owner decodes a batch's units of one config in a row)."""
    last = _LAST_M[0]
    if last[0] is not cfg:
        last = _LAST_M[0] = (cfg, len(cfg.event_metrics))
    return last[1]


def decode_unit(packed: str | bytes, cfg: ExperimentConfig) -> UnitState:
    """Unpack a ``units`` hash value: binary (note 1:
    version 1 without pre-experiment values, version 2 with them) or the
    earlier text form."""
    M = _n_event_metrics(cfg)
    if isinstance(packed, bytes) and packed[:1] == b"\x03":
        _, v, s, m, b, ets = _UNIT_HEAD.unpack_from(packed)
        nt, np, nb, f = _UNIT3_TAIL.unpack_from(packed, len(packed) - _UNIT3_TAIL.size)
        vals = struct.unpack_from(f"<{nt + np + nt * nb}d", packed, _UNIT_HEAD.size)
        totals = list(vals[:nt]) + [0.0] * (M - nt)
        pre = [None if math.isnan(x) else x for x in vals[nt:nt + np]]
        pre += [None] * (M - len(pre))
        u = UnitState(cfg.variants[v], s, int(b), int(ets), totals[:M], m == 1, pre[:M])
        if age_tracking(cfg):
            NB = len(age_edges_ms(cfg)) - 1
            base = nt + np
            u.fine = f
            u.age = [[vals[base + k * nb + j] if k < nt and j < nb else 0.0
                      for j in range(NB)] for k in range(M)]
        return u
    if isinstance(packed, bytes) and packed[:1] == b"\x01":
        _, v, s, m, b, ets = _UNIT_HEAD.unpack_from(packed)
        nt = (len(packed) - _UNIT_HEAD.size) // 8
        totals = list(struct.unpack_from(f"<{nt}d", packed, _UNIT_HEAD.size))
        totals += [0.0] * (M - len(totals))
        return UnitState(cfg.variants[v], s, int(b), int(ets), totals[:M], m == 1,
                         [None] * M)
    if isinstance(packed, bytes) and packed[:1] == b"\x02":
        _, v, s, m, b, ets, nt = _UNIT2_HEAD.unpack_from(packed)
        vals = struct.unpack_from(f"<{2 * nt}d", packed, _UNIT2_HEAD.size)
        totals = list(vals[:nt]) + [0.0] * (M - nt)
        pre = [None if math.isnan(x) else x for x in vals[nt:]] + [None] * (M - nt)
        return UnitState(cfg.variants[v], s, int(b), int(ets), totals[:M], m == 1, pre[:M])
    f = _s(packed).split(" ")
    totals = [float(x) for x in f[5:]]
    totals += [0.0] * (M - len(totals))
    return UnitState(cfg.variants[_int(f[0])], _int(f[1]), _int(f[2]), _int(f[3]),
                     totals, _int(f[4]) == 1, [None] * M)


def encode_unit(u: UnitState, cfg: ExperimentConfig) -> bytes:
    """A unit as its ``units`` hash value, the inverse of ``decode_unit`` and
    byte for byte what ingest.lua wrote before issue 25 (note 1): version 3 for a unit with
    exposure-age bins (``u.age``), else version 2 if it has a pre value of
    any metric, else version 1; totals and pre values for every config
    metric (NaN: no pre value). The owner's commit (issue 25) writes these,
    so state written by either path reads the same. Totals and pre values
    per event metric (``cfg.event_metrics``, issue 26)."""
    M = len(u.totals)  # one per event metric (``UnitState``)
    head = (cfg.variants.index(u.variant), u.stratum, 1 if u.matured else 0,
            float(u.bucket), float(u.exposure_ts))
    has_pre = u.pre.count(None) != len(u.pre)
    if not u.age:  # the common records: one Struct.pack
        if not has_pre:
            st = _UNIT1.get(M)
            if st is None:
                st = _UNIT1[M] = struct.Struct(f"<BHHBdd{M}d")
            return st.pack(1, *head, *u.totals)
        st = _UNIT2.get(M)
        if st is None:
            st = _UNIT2[M] = struct.Struct(f"<BHHBddH{2 * M}d")
        return st.pack(2, *head, M, *u.totals,
                       *[math.nan if x is None else x for x in u.pre])
    pre = [math.nan if x is None else x for x in u.pre]
    nb = len(u.age[0])
    np = M if has_pre else 0
    vals = [*u.totals, *(pre if has_pre else ()), *(b for row in u.age for b in row)]
    return (_UNIT_HEAD.pack(3, *head) + struct.pack(f"<{len(vals)}d", *vals)
            + _UNIT3_TAIL.pack(M, np, nb, u.fine))


def encode_units(units: dict[str, UnitState], cfg: ExperimentConfig) -> dict[str, bytes]:
    """``encode_unit`` of each unit of ``units`` the rules changed
    (``UnitState.dirty``), by unit id, in ``units``' order: the partition
    owner's commit encodes about one record per event. Why not a
    comprehension over ``encode_unit``: the common record (version 1, no
    pre value, no exposure age) is packed by ``semantics.pack_dirty_units``
    with the variant's index and the record's ``Struct.pack`` looked up once a
    batch (measured: 0.70 -> 0.55 µs a unit; that loop lives in ``semantics``
    for its native attribute reads: see there); every other record, and a
    variant the config lacks (its ``ValueError``), goes through ``encode_unit``."""
    vix: dict[str, int] = {}
    for i, v in enumerate(cfg.variants):
        vix.setdefault(v, i)  # the first, as ``list.index``
    packs = {m: st.pack for m, st in _UNIT1.items()}
    return pack_dirty_units(units, vix, packs, lambda u: encode_unit(u, cfg))
