"""The worker's garbage-collector setting (``streams.service.worker.tune_gc``)."""

from __future__ import annotations

import gc

from streams.service.worker import GC_YOUNG, tune_gc


def test_tune_gc_raises_the_young_generation_only():
    """The young threshold goes up to GC_YOUNG (never down); the older
    generations keep theirs."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 11, 12)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG, 11, 12)
        gc.set_threshold(10 * GC_YOUNG, 11, 12)
        tune_gc()
        assert gc.get_threshold() == (10 * GC_YOUNG, 11, 12)
    finally:
        gc.set_threshold(*before)
