"""Which units an experiment has retired: a scalable Bloom filter (pure).

A unit's record is dropped once its correction horizon passed (docs/architecture.md#state,
rule 6 in ``streams.state.semantics``): its totals are in the cells and nothing can
change them any more. But its id must not be forgotten, or its next exposure
would enter it again as a new unit (heavy users most often: exactly the bias
liftstream removes). Keeping the ids exactly costs as much memory as the
records did; a Bloom filter costs ~3 bytes per retired unit.

Layout: one bitmap (Redis string ``lr:{e:<id>}:retired``; a ``set`` of bit
positions in the reference reducer) of layers that double: layer l holds
``C0 · 2^l`` units in ``C0 · 2^l · BITS`` bits, starting at bit
``C0 · BITS · (2^l − 1)``. The n-th retired unit (0-based, in retirement
order, which the order-independence rules fix per partition) goes into the
layer whose range holds n, so memory grows with the units retired, not with
a guess made up front. A unit is *retired* when all ``K`` of its bits are set
in some layer in use. Bits come from SHA-1 of the unit id (the Lua script that
applied the rules before issue 25 used ``redis.sha1hex``): h1, h2 = its first
two 32-bit words (h2 made odd),
position i = (h1 + i · h2) mod layer bits (Kirsch & Mitzenmacher 2006).

False positives: with 24 bits a unit and 16 hashes, (1 − e^{−16/24})^16 =
9.9·10⁻⁶ per full layer, so a new unit is taken for a retired one with
probability at most 9.9·10⁻⁶ × layers in use (7 layers at 8M retired units:
7·10⁻⁵). Such a unit's exposure is counted ``retired``, not applied: a
uniform random loss (the hash ignores variant and activity), surfaced as
``data_quality.retired_filter_fpr``. (Measured with 20 bits and 14 hashes:
201 of 1.27M new units lost at 1.14M retired, as that bound predicted.)
The cap: a Redis string holds 2³² bits (``proto-max-bulk-len``, 512 MB by
default), so 11 layers (``MAX_LAYER`` = 10), 134M retired units per
experiment. Beyond it, every further unit goes into the last layer, whose
false-positive rate then grows with its fill (``false_positive_rate`` says
by how much): the filter never stops ingest (issue 24, defect 7: a script
that set bits past the string's limit failed after it had deleted the unit
records, and the worker crash-looped). A server with a smaller
``proto-max-bulk-len`` caps it lower: the partition's owner finds the last layer
that fits before it uses a new one (a read that cannot fail) and records it
in meta ``retired_cap``; ``RetiredFilter(max_layer=...)`` is the same cap in
the reference reducer.
"""

from __future__ import annotations

import hashlib
import math

#: units in layer 0 (192 KiB of bits); layer l holds C0 · 2^l
C0 = 65_536
#: bits per unit and hashes per unit: 9.9e-6 false positives in a full layer
BITS = 24
K = 16
#: the last layer a 2**32-bit Redis string holds (layers 0..10 end at bit
#: C0 · BITS · (2^11 - 1) < 2^32; layer 11 would not fit)
MAX_LAYER = 10


def layer_of(n: int, max_layer: int = MAX_LAYER) -> int:
    """The layer of the n-th retired unit (0-based): the last one from the
    cap on."""
    lay = 0
    while lay < max_layer and n >= C0 * ((2 << lay) - 1):
        lay += 1
    return lay


def layer_span(lay: int) -> tuple[int, int]:
    """(first bit, number of bits) of layer ``lay``."""
    return C0 * BITS * ((1 << lay) - 1), C0 * BITS * (1 << lay)


def positions(unit_id: str, lay: int) -> list[int]:
    """The unit's K bit positions in layer ``lay``."""
    h = hashlib.sha1(unit_id.encode("utf-8")).hexdigest()
    h1, h2 = int(h[0:8], 16), int(h[8:16], 16) | 1
    start, m = layer_span(lay)
    return [start + (h1 + i * h2) % m for i in range(K)]


class RetiredFilter:
    """The reference filter: the same bits as the owner sets in Redis
    (``streams.state.partition_store``)."""

    def __init__(self, max_layer: int = MAX_LAYER) -> None:
        self.bits: set[int] = set()
        self.n = 0  # units retired
        self.max_layer = max_layer  # the last layer the store's bitmap holds

    def __contains__(self, unit_id: str) -> bool:
        if self.n == 0:
            return False
        return any(all(p in self.bits for p in positions(unit_id, lay))
                   for lay in range(layer_of(self.n - 1, self.max_layer) + 1))

    def add(self, unit_id: str) -> None:
        self.bits.update(positions(unit_id, layer_of(self.n, self.max_layer)))
        self.n += 1

    def false_positive_rate(self) -> float:
        """The chance that a unit never retired is taken for one, now."""
        return false_positive_rate(self.n, self.max_layer)


def false_positive_rate(n: int, max_layer: int = MAX_LAYER) -> float:
    """Upper bound on P(a new unit reads as retired) after n retirements: the
    sum over the layers in use of (1 − e^{−K·fill/bits})^K (the last layer
    takes every unit beyond the cap: its fill may pass its capacity)."""
    if n <= 0:
        return 0.0
    total = 0.0
    last = layer_of(n - 1, max_layer)
    for lay in range(last + 1):
        cap = C0 << lay
        filled = n - C0 * ((1 << lay) - 1)
        if lay < last:
            filled = min(cap, filled)
        total += (1.0 - math.exp(-K * filled / (cap * BITS))) ** K
    return total
