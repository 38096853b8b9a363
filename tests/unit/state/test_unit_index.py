"""The routing index's bucket layout (``streams.state.unit_index``, issue 25):
what a batch queues, without Redis."""

from __future__ import annotations

from streams.state.unit_index import (
    PAD,
    IndexView,
    add_lookups,
    add_writes,
    current_bucket,
    merge,
    pack,
    unpack,
)


class Queued:
    """A stand-in for ``wire.Reads``: the commands queued."""

    def __init__(self) -> None:
        self.cmds: list[tuple] = []

    def add(self, *args: object) -> Queued:
        self.cmds.append(args)
        return self


def _view(buckets: dict[str, int]) -> IndexView:
    return IndexView(buckets, (), False, True, True)


def test_a_lookup_reads_one_field_per_unit_and_bucket_whatever_the_experiments():
    """A metric without experiment_id is looked up in every live bucket: one
    field per unit each, not one per (unit, running experiment), which cost
    ~6 us/event of Redis CPU more than a key per unit at 50 experiments."""
    p = Queued()
    view = _view({f"1000:{i}": 0 for i in range(5)})
    eids = [f"e{i}" for i in range(50)]
    assert add_lookups(p, "t", 0, view, (), ["u1", "u2"], eids) == 5
    assert [len(c) - 2 for c in p.cmds] == [2] * 5  # HMGET key u1 u2
    replies = [[None, None]] * 4 + [[pack({"e7": "t|0|3", "x": "t|0|1"}).encode(), None]]
    assert merge(replies, ["u1", "u2"], eids, False) == {"u1": {"e7": "t|0|3"}, "u2": {}}


def test_writes_merge_into_the_current_field_and_keep_the_first_position():
    """The owner merges a batch's exposures into the unit's field of the
    current bucket: an experiment already there keeps its position, a replay
    writes nothing, a new bucket is created a hashtable (``PAD``)."""
    name, at = current_bucket(4_000, 10_000)
    p = Queued()
    add_writes(p, "t", 0, {("u", "a"): "t|0|9", ("u", "b"): "t|0|9"}, 4_000, 10_000,
               _view({name: at}), {"u": "a t|0|2"})
    hset = [c for c in p.cmds if c[0] == "HSET"]
    assert len(hset) == 1 and unpack(hset[0][3]) == {"a": "t|0|2", "b": "t|0|9"}
    p = Queued()
    add_writes(p, "t", 0, {("u", "a"): "t|0|9"}, 4_000, 10_000, _view({name: at}),
               {"u": "a t|0|2"})
    assert not [c for c in p.cmds if c[0] == "HSET"]  # a replay: nothing new
    p = Queued()
    add_writes(p, "t", 0, {("u", "a"): "t|0|9"}, 4_000, 10_000, _view({}), {})
    assert p.cmds[0][2:] == (*PAD, "u", "a t|0|9")
