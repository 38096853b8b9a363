"""kernels.tail: the log-bucket sketch of window totals against numpy on lognormal samples."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.tail import (
    MIN_ABS,
    RELATIVE_ACCURACY,
    bucket_value,
    merge,
    tail_bucket,
    tail_summary,
)

A = RELATIVE_ACCURACY


def sketch(values) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in values:
        b = tail_bucket(float(t))
        out[b] = out.get(b, 0) + 1
    return out


@pytest.mark.parametrize("t", [1e-9, 2.5e-7, 0.37, 1.0, 3.0, 99.99, 1e6, 7.3e11])
def test_bucket_value_within_relative_accuracy(t):
    for s in (1, -1):
        b = tail_bucket(s * t)
        assert (b > 0) == (s > 0)
        assert abs(bucket_value(b) - s * t) <= A * t * (1 + 1e-9)


def test_small_and_zero_totals_are_bucket_zero():
    assert tail_bucket(0.0) == 0 and tail_bucket(MIN_ABS / 2) == 0 and tail_bucket(-1e-12) == 0
    assert bucket_value(0) == 0.0


def test_buckets_are_monotone():
    xs = np.sort(np.concatenate([-np.logspace(-8, 6, 500), [0.0], np.logspace(-8, 6, 500)]))
    bs = [tail_bucket(float(x)) for x in xs]
    assert bs == sorted(bs)
    vals = [bucket_value(b) for b in sorted(set(bs))]
    assert vals == sorted(vals)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_quantiles_match_numpy_on_lognormal(sigma):
    rng = np.random.default_rng(7)
    y = rng.lognormal(mean=1.0, sigma=sigma, size=200_000)
    y[rng.random(y.size) < 0.7] = 0.0  # a point mass at 0, as revenue has
    out = tail_summary(sketch(y), float((y * y).sum()))
    assert out["n"] == y.size
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        truth = np.quantile(y, q, method="lower")
        assert abs(out[name] - truth) <= A * truth + 1e-12, (name, out[name], truth)
    assert abs(out["max"] - y.max()) <= A * y.max()
    k = int(np.ceil(0.001 * y.size))
    top = np.sort(y)[-k:]
    share = (top * top).sum() / (y * y).sum()
    # bucket values are within a of each total, so their squares within ~2a
    assert abs(out["top_0_1pct_share_sum_y2"] - share) <= 2.1 * A * share
    if sigma == 2.0:
        assert out["top_0_1pct_share_sum_y2"] > 0.2  # the heavy tail shows


def test_merge_is_order_independent_and_equals_the_union():
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(0, 1.5, 1000), -rng.lognormal(0, 1, 500)
    assert merge(sketch(a), sketch(b)) == sketch(np.concatenate([b, a]))
    assert merge(sketch(a), {tail_bucket(1.0): -1}, {tail_bucket(1.0): 1}) == sketch(a)


def test_empty_sketch():
    out = tail_summary({}, 0.0)
    assert out == {"p50": None, "p90": None, "p99": None, "p999": None, "max": None,
                   "top_0_1pct_share_sum_y2": None, "n": 0}


def test_normal_tail_has_small_top_share():
    rng = np.random.default_rng(1)
    y = np.abs(rng.normal(10, 1, 50_000))
    out = tail_summary(sketch(y), float((y * y).sum()))
    assert out["top_0_1pct_share_sum_y2"] < 0.002
