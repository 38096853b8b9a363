"""The owner's RESP packer (``streams.state.resp``, ``streams.state.wire.pack``): byte for byte
what ``hiredis.pack_command`` makes of every command, compiled (when the build is there) and as
its pure-Python source, so the bytes Redis receives change in nothing but their buffers."""

from __future__ import annotations

import os

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.native as native
import streams.state.resp as resp
from streams.state import wire

IMPLEMENTATIONS = {"imported": resp, "pure": native.pure_module("streams.state.resp")}

#: what the owner sends (ids, keys, records, scores, offsets), lengths around the cached
#: headers' ends (4096 bytes, 64 arguments), non-ASCII text, and floats (packed by hiredis)
ARG = st.one_of(
    st.text(max_size=12), st.text(alphabet="ab", min_size=4090, max_size=4100),
    st.binary(max_size=50), st.binary(min_size=4094, max_size=4098),
    st.integers(), st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
    st.floats(allow_nan=False))
CMD = st.tuples(st.sampled_from(["HSET", "ZADD", "HMGET"]),
                st.lists(ARG, max_size=70)).map(lambda c: (c[0], *c[1]))


def hiredis_packed(cmds: list[tuple]) -> bytes:
    return b"".join(map(hiredis.pack_command, cmds))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(cmds=st.lists(CMD, min_size=1, max_size=6))
def test_packs_every_command_as_hiredis(impl, cmds):
    assert IMPLEMENTATIONS[impl].pack(cmds, hiredis.pack_command) == hiredis_packed(cmds)
    assert wire.pack(cmds) == hiredis_packed(cmds)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_refuses_what_hiredis_refuses(impl):
    """A bool (or any type hiredis does not pack) raises as hiredis does, before anything is
    sent."""
    for bad in (True, None, [1]):
        with pytest.raises(TypeError):
            hiredis.pack_command(("SET", "k", bad))
        with pytest.raises(TypeError):
            IMPLEMENTATIONS[impl].pack([("GET", "a"), ("SET", "k", bad)], hiredis.pack_command)


def test_status_says_which_implementation_runs():
    """``resp.COMPILED`` is what the loader chose (``wire.pack`` uses the module only then);
    where CI requires the compiled build (``LIFTSTREAM_REQUIRE_NATIVE``), it is the one."""
    if os.environ.get("LIFTSTREAM_REQUIRE_NATIVE", "") not in ("", "0"):
        assert resp.COMPILED, native.status()
    want = "compiled (mypyc" if resp.COMPILED else "pure Python"
    assert native.status()[resp.__name__].startswith(want)
    assert not IMPLEMENTATIONS["pure"].COMPILED
