"""``partition_store._unit_reads`` (built column-wise since issue 25) against
the per-unit loop it replaced, on a table of reply shapes: the common miss
(every reply None), records, pending and hold-queue scores, held metrics
(an empty value meaning none), with and without the pending replies."""
from __future__ import annotations

import pytest

from schemas.records import ExperimentConfig, MetricSpec
from streams.state.partition_store import _unit_reads
from streams.state.semantics import UnitState
from streams.state.store import decode_unit, encode_unit

CFG = ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),),
                       window_seconds=10, bucket_seconds=2)


def _old(uids, got, cfg):
    out = {}
    if len(got) == 3:
        got = [got[0], [None] * len(uids), got[1], got[2]]
    for uid, raw, pend, held, hq in zip(uids, *got, strict=True):
        out[uid] = (None if raw is None else decode_unit(raw, cfg), raw,
                    None if pend is None else int(pend), held or None,
                    None if hq is None else int(hq))
    return out


REC = encode_unit(UnitState("control", 0, 1, 1_700_000_000_000, [2.5], False, [None], 0,
                            None, False), CFG)
CASES = [
    (["a", "b"], [[None, None], [None, None], [None, None]]),
    (["a", "b"], [[None, None], [None, None], [None, None], [None, None]]),
    (["a", "b", "c"], [[REC, None, REC], [None, b"12", None], [b"", b"\x01" * 14, None],
                       [b"7", None, None]]),
    (["a", "b"], [[None, REC], [b"", None], [None, b"3"]]),
    ([], [[], [], []]),
]


@pytest.mark.parametrize(("uids", "got"), CASES)
def test_unit_reads_as_the_per_unit_loop(uids, got):
    new = _unit_reads(uids, got, CFG)
    assert list(new) == uids
    old = _old(uids, got, CFG)
    for uid, e in new.items():
        assert (e.unit, e.rec, e.pend, e.held, e.heldq) == old[uid]


def test_unit_reads_refuses_a_short_reply():
    with pytest.raises(ValueError):
        _unit_reads(["a", "b"], [[None], [None, None], [None, None]], CFG)
