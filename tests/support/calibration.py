"""Shared by the simulation-based calibration tests (``tests/statistical/test_sbc.py``,
``tests/statistical/test_cuped.py``): the strata's activity and the rank
uniformity check."""

from __future__ import annotations

import numpy as np
from scipy import stats

#: The strata's activity in the simulated problems (``make_data``'s ``act``).
ACTIVITY = np.array([1.0, 4.0, 10.0, 25.0])


def assert_uniform(ranks, L, bins=10, alpha=1e-3):
    failures = {}
    for k, r in ranks.items():
        counts = np.bincount(np.minimum(r * bins // (L + 1), bins - 1), minlength=bins)
        p = stats.chisquare(counts).pvalue
        if p < alpha:
            failures[k] = (p, counts.tolist())
    assert not failures, failures
