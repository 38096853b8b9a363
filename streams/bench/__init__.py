"""Benchmarks (``liftstream bench ...``): measured as ratios, never asserted."""
