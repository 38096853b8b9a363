"""Experiment state in Redis: the reference semantics, the Lua scripts, keys, the registry."""
