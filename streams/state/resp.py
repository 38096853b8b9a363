"""The owner's commands as RESP, byte for byte what ``hiredis.pack_command``
makes of each (``streams.state.wire.send_raw``'s packer).

Why a module of its own: it is compiled (``streams.native.MODULES``), and
compiled it packs an argument in a fraction of hiredis's instructions
(hiredis ``sprintf``s every argument's length: ~1.6k instructions an
argument under callgrind, ~14k of the owner's ~80k an event). As pure
Python it is slower than hiredis for short commands, so ``wire`` uses it
only compiled (``COMPILED``). Stdlib only, no project imports: its build
depends on this file alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

#: ``$<n>\r\n`` for the lengths that repeat (ids, keys, records)
_HEADS: Final[list[bytes]] = [b"$%d\r\n" % n for n in range(4096)]
#: ``*<n>\r\n`` for the commands' argument counts
_STARS: Final[list[bytes]] = [b"*%d\r\n" % n for n in range(4096)]
_CRLF: Final = b"\r\n"


def _head(n: int) -> bytes:
    """``$<n>\\r\\n``, cached below 4096."""
    return _HEADS[n] if n < 4096 else b"$%d\r\n" % n


def pack(cmds: Sequence[tuple], other: Callable[[tuple], bytes]) -> bytes:
    """``cmds`` packed into one buffer: ``str`` (UTF-8), ``bytes`` and
    ``int`` (decimal) arguments here; a command with an argument of any
    other type (a float, a bool) by ``other`` (``hiredis.pack_command``,
    which packs floats as it always did and refuses the rest)."""
    parts: list[bytes] = []
    for c in cmds:
        mark = len(parts)
        n = len(c)
        parts.append(_STARS[n] if n < 4096 else b"*%d\r\n" % n)
        for a in c:
            if isinstance(a, str):
                b = a.encode()
            elif isinstance(a, bytes):
                b = a
            elif type(a) is int:
                b = str(a).encode()
            else:
                del parts[mark:]
                parts.append(other(c))
                break
            parts.append(_head(len(b)))
            parts.append(b)
            parts.append(_CRLF)
    return b"".join(parts)


#: whether this module runs compiled (``streams.native``): its ``__file__``
#: is then the extension module
COMPILED: Final = not __file__.endswith(".py")
