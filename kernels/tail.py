"""A mergeable sketch of the matured units' window totals: how heavy the tail is.

Revenue-like totals are heavy-tailed: a few units can carry most of Σy², and
then the normal working likelihood's interval is driven by them (a cap is
needed). The cells keep, per variant, a count per log-spaced bucket of the
units' *uncapped* window totals (DDSketch, Masson et al. 2019): bucket b > 0
holds |t| / MIN_ABS in (γ^(b−2), γ^(b−1)], γ = (1 + a)/(1 − a), so every
value in it is within relative accuracy a of the bucket's representative
value; negative totals mirror it with b < 0; |t| < MIN_ABS is bucket 0.
Counts add, so the sketch is order-independent and mergeable (a correction
moves a unit from its old bucket to its new one), and it is bounded: about
log(t_max / MIN_ABS) / log γ ≈ 1,700 buckets per sign for totals up to 1e6
(a few hundred in use for any one metric's spread).

Pure Python over ``dict[int, int]``; no array module needed.
"""

from __future__ import annotations

import math

#: the sketch's relative accuracy a: each bucket value is within a·|t| of any t in it
RELATIVE_ACCURACY = 0.01
GAMMA = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
#: totals smaller than this in magnitude count as 0 (bucket 0)
MIN_ABS = 1e-9
#: the quantiles ``tail_summary`` reports: name -> q
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}
#: the share of Σy² ``tail_summary`` reports is that of the top TOP_SHARE of units (0.1%)
TOP_SHARE = 0.001


def tail_bucket(t: float) -> int:
    """The bucket of a window total: 0 for |t| < MIN_ABS, else
    sign(t) · (1 + ceil(log_γ(|t| / MIN_ABS))). Monotone in t."""
    a = abs(t)
    if not a >= MIN_ABS:  # also catches NaN (counted as 0 rather than crash the fold)
        return 0
    i = math.ceil(math.log(a / MIN_ABS) / _LOG_GAMMA - 1e-12)
    b = 1 + max(i, 0)
    return b if t > 0 else -b


def bucket_value(b: int) -> float:
    """The bucket's representative value: 2 γ^i / (γ + 1) · MIN_ABS with
    i = |b| − 1 (within RELATIVE_ACCURACY of every total in it), signed; 0 for b = 0."""
    if b == 0:
        return 0.0
    v = MIN_ABS * 2.0 * math.exp((abs(b) - 1) * _LOG_GAMMA) / (GAMMA + 1.0)
    return v if b > 0 else -v


def merge(*sketches: dict[int, int]) -> dict[int, int]:
    """The sketch of the union of the sketches' units (counts add; zero counts dropped)."""
    out: dict[int, int] = {}
    for sk in sketches:
        for b, c in sk.items():
            out[int(b)] = out.get(int(b), 0) + int(c)
    return {b: c for b, c in out.items() if c}


def quantile(counts: dict[int, int], q: float) -> float | None:
    """The q-quantile of the sketched totals (the lower quantile: the value of
    the unit at rank ⌊q (n − 1)⌋ in increasing order, to within the relative
    accuracy); None when the sketch is empty."""
    items = sorted((b, c) for b, c in counts.items() if c > 0)
    n = sum(c for _, c in items)
    if n == 0:
        return None
    rank = math.floor(q * (n - 1))
    seen = 0
    for b, c in items:
        seen += c
        if seen > rank:
            return bucket_value(b)
    return bucket_value(items[-1][0])


def top_share(counts: dict[int, int], sum_y2: float, share: float = TOP_SHARE) -> float | None:
    """The share of Σy² contributed by the ⌈share · n⌉ units with the largest
    |total| (their bucket values squared over the exact ``sum_y2``, capped at
    1); None when there are no units or Σy² is 0."""
    n = sum(c for c in counts.values() if c > 0)
    if n == 0 or not sum_y2 > 0:
        return None
    left = max(1, math.ceil(share * n))
    top = 0.0
    for b, c in sorted(((b, c) for b, c in counts.items() if c > 0),
                       key=lambda bc: -abs(bc[0])):
        take = min(c, left)
        top += take * bucket_value(b) ** 2
        left -= take
        if left == 0:
            break
    return min(top / sum_y2, 1.0)


def tail_summary(counts: dict[int, int], sum_y2: float) -> dict:
    """What a user reads to see whether a cap is needed: the quantiles p50,
    p90, p99, p99.9 and the max of the sketched totals, the share of Σy²
    (``sum_y2``, the units' exact sum of squared uncapped totals) carried by
    the top 0.1% of units, and the number of units ``n``. Quantiles are None
    for an empty sketch."""
    counts = {int(b): int(c) for b, c in counts.items() if int(c) > 0}
    n = sum(counts.values())
    out: dict = {k: quantile(counts, q) for k, q in QUANTILES.items()}
    out["max"] = bucket_value(max(counts)) if counts else None
    out["top_0_1pct_share_sum_y2"] = top_share(counts, sum_y2)
    out["n"] = n
    return out
