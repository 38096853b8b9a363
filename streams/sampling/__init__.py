"""Sampler ticks: snapshots to batched problems, chains in Redis, estimate records."""
