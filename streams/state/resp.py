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
from typing import Final, cast

#: ``\r\n$<n>\r\n``: an argument's header, with the CRLF that ends the
#: argument before it (two pieces an argument to join, not three)
_HEADS: Final[list[bytes]] = [b"\r\n$%d\r\n" % n for n in range(4096)]
#: ``*<n>``, a command's first piece (its CRLF comes with its first argument)
_STARS: Final[list[bytes]] = [b"*%d" % n for n in range(64)]
#: ... after another command's last argument
_NEXT_STARS: Final[list[bytes]] = [b"\r\n*%d" % n for n in range(64)]
_CRLF: Final = b"\r\n"


def _star(n: int, after: bool) -> bytes:
    """A command's ``*<n>``, after a command whose last argument it ends."""
    if n < 64:
        return _NEXT_STARS[n] if after else _STARS[n]
    return b"\r\n*%d" % n if after else b"*%d" % n


def pack(cmds: Sequence[tuple], other: Callable[[tuple], bytes]) -> bytes:
    """``cmds`` packed into one buffer: ``str`` (UTF-8), ``bytes`` and
    ``int`` (decimal) arguments here; a command with an argument of any
    other type (a float, a bool) by ``other`` (``hiredis.pack_command``,
    which packs floats as it always did and refuses the rest)."""
    parts: list[bytes] = []
    owed = False  # whether the last piece is an argument, its CRLF not yet there
    for c in cmds:
        mark = len(parts)
        parts.append(_star(len(c), owed))
        for a in c:
            if isinstance(a, str):
                b = a.encode()
            elif isinstance(a, bytes):
                b = a
            elif type(a) is int:  # not a bool (hiredis refuses those)
                b = b"%d" % cast(int, a)
            else:
                del parts[mark:]
                if owed:
                    parts.append(_CRLF)
                parts.append(other(c))
                break
            n = len(b)
            parts.append(_HEADS[n] if n < 4096 else b"\r\n$%d\r\n" % n)
            parts.append(b)
        else:
            owed = True
            continue
        owed = False
    if owed:
        parts.append(_CRLF)
    return b"".join(parts)


#: whether this module runs compiled (``streams.native``): its ``__file__``
#: is then the extension module
COMPILED: Final = not __file__.endswith(".py")
