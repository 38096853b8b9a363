"""Contracts shared by every layer (docs/architecture.md#layout-and-layers, #contracts, #the-model);
imports only stdlib and orjson.

- ``schemas.records``: typed records (Exposure, Metric, ExperimentConfig, ...)
- ``schemas.validate``: bytes -> records, with stable error codes (``InvalidRecord``)
- ``schemas.codec``: the one JSON encoding (orjson) for topics and Redis
- ``schemas.contracts``: the JSON Schema files (``*.schema.json``) and dead-letter records
"""
