"""Log-spaced buckets of a mergeable, order-independent tail sketch (issue 26).

The state counts the folded units' window totals per bucket (integer counts,
``streams.state.semantics``: ``ExperimentSnapshot.tails``), so the counts do
not depend on the order units fold in, and sources add up exactly. The
buckets are DDSketch's: a bucket's values lie within ``RELATIVE_ACCURACY`` of
its representative value. Pure math, no I/O.

(The STATE helper of issue 26 made this file with the bucket functions
only, per the contract; ``tail_summary`` is the model's.)
"""

from __future__ import annotations

import math

#: DDSketch-style relative accuracy a: gamma = (1 + a) / (1 - a)
RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
#: totals below this in absolute value fall in bucket 0 (zero)
MIN_ABS = 1e-9


def tail_bucket(t: float) -> int:
    """The bucket of total ``t``: 0 for ``|t| < MIN_ABS``, else
    ``sign(t) * (1 + ceil(log_gamma(|t| / MIN_ABS)))``; deterministic in
    ``t`` alone (so a unit's bucket never depends on when it folded)."""
    a = abs(t)
    if a < MIN_ABS:
        return 0
    k = 1 + math.ceil(math.log(a / MIN_ABS) / _LOG_GAMMA)
    return k if t > 0 else -k


def bucket_value(b: int) -> float:
    """The representative value of bucket ``b`` (``tail_bucket``'s inverse
    within ``RELATIVE_ACCURACY``): ``MIN_ABS * 2 gamma^k / (gamma + 1)`` with
    k = |b| - 1, signed as b; 0.0 for bucket 0."""
    if b == 0:
        return 0.0
    k = abs(b) - 1
    v = MIN_ABS * 2.0 * math.exp(k * _LOG_GAMMA) / (GAMMA + 1.0)
    return v if b > 0 else -v
