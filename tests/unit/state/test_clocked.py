"""``store.clocked``'s C-speed rewrite against the loop it replaced (issue
25): same rows, same clocks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.state.store import clocked


def _clocked_loop(rows, clk):
    """``store.clocked`` before issue 25."""
    out = []
    for row in rows:
        ts = row[6]
        if clk is None or ts > clk:
            clk = ts
        out.append((*row, clk))
    return out, clk


_row = st.builds(lambda off, kind, ts: (off, kind, f"ev{off}", "e1", f"u{off % 7}", "v", ts,
                                        1.0, None),
                 st.integers(0, 10**6), st.sampled_from("xm"), st.integers(-5, 2**42))


@given(st.lists(_row, max_size=40), st.none() | st.integers(-5, 2**42))
def test_clocked_is_the_loop(rows, clk):
    got = clocked(rows, clk)
    assert got == _clocked_loop(rows, clk)
    assert all(type(r) is tuple for r in got[0])


def test_clocked_keeps_the_clock_on_a_tie():
    assert clocked([(0, "m", "a", "e", "u", "m", 5, 1.0, None)], 5)[0][0][9] == 5
    assert clocked([], None) == ([], None) and clocked([], 3) == ([], 3)

