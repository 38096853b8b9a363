"""Experiment state in Redis: the rules (``semantics``), the partition owner's fenced commit
(``partition_store``), keys, the registry."""
