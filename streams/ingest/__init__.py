"""The events data plane: validate, route and apply micro-batches exactly once."""
