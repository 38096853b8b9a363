"""docs/redis-schema.md documents exactly the keys ``streams.state.keys`` builds.

The key patterns of the module are derived by calling every public builder
with placeholder arguments (``<id>``, ``<unit>``, ``<src>``, ...) and reading
every ``lr:`` constant, so a builder added to keys.py without a row in the
document (or a row for a key no builder makes) fails here. No services needed.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from streams.state import keys

DOC = Path(__file__).resolve().parents[2] / "docs" / "redis-schema.md"

#: parameter name in keys.py -> the placeholder the document uses
PLACEHOLDERS = {
    "experiment_id": "<id>",
    "unit_id": "<unit>",
    "topic": "<topic>",
    "src": "<src>",
    "metric": "<metric>",
    "variant": "<variant>",
    "chain": "<chain>",
    "start": "<start>",
    "ttl": "<ttl>",
}
#: a partition number no real key would show; replaced by ``<src>`` with its topic
PARTITION = 987654321
#: builders that make no key of their own: the generic primitive (its kinds are
#: checked through ``EXPERIMENT_KINDS``), a SCAN pattern, a field/suffix, a prefix
NOT_KEYS = {"experiment_key", "experiment_glob", "experiment_and_unit_glob", "source",
            "platform_prefix", "seen_index_field", "pending_index_field"}


def _normalise(name: str) -> str:
    return name.replace(f"<topic>|{PARTITION}", "<src>")


def _built(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [x for v in value for x in _built(v)]


def patterns_of_keys_module() -> set[str]:
    out: set[str] = set()
    for name, obj in vars(keys).items():
        if name.startswith("_") or name in NOT_KEYS:
            continue
        if isinstance(obj, str) and obj.startswith("lr:"):
            out.add(obj)
        elif inspect.isfunction(obj) and obj.__module__ == keys.__name__:
            args = {p: (PARTITION if p == "partition" else PLACEHOLDERS[p])
                    for p in inspect.signature(obj).parameters}
            built = obj(**args)
            if isinstance(built, tuple) and hasattr(built, "for_source"):  # ExperimentKeys
                built = [getattr(built, k) for k in keys.EXPERIMENT_KINDS
                         if k in built._fields] + built.for_source("<src>")
            out.update(_normalise(k) for k in _built(built))
    out.update(keys.experiment_key("<id>", k) for k in keys.EXPERIMENT_KINDS)
    # the pre-cluster names are read only by the one-time migration, which the
    # document describes in prose rather than as rows
    out -= {old for old, _ in keys.LEGACY_INGEST_KEYS}
    return out


def patterns_of_doc() -> set[str]:
    rows = re.findall(r"^\|\s*`(lr:[^`]+)`\s*\|", DOC.read_text(), flags=re.M)
    assert len(rows) == len(set(rows)), "a key is documented twice"
    return set(rows)


def test_every_built_key_is_documented_and_vice_versa():
    built, documented = patterns_of_keys_module(), patterns_of_doc()
    assert built - documented == set(), "keys.py builds keys docs/redis-schema.md lacks"
    assert documented - built == set(), "docs/redis-schema.md documents keys keys.py never builds"


def test_legacy_names_are_mentioned():
    text = DOC.read_text()
    for old, new in keys.LEGACY_INGEST_KEYS:
        assert f"`{old}`" in text and f"`{new}`" in text


def test_placeholders_cover_every_builder_parameter():
    for name, obj in vars(keys).items():
        if inspect.isfunction(obj) and obj.__module__ == keys.__name__ and name not in NOT_KEYS:
            for p in inspect.signature(obj).parameters:
                assert p in PLACEHOLDERS or p == "partition", (name, p)


def test_hash_tags():
    """One slot per experiment, per unit, for the ingest positions."""
    for k in patterns_of_keys_module():
        if k.startswith("lr:{e:"):
            assert k.startswith("lr:{e:<id>}:")
        if k.startswith("lr:{ingest}"):
            assert k in {keys.INGEST_OFFSETS, keys.PARTITION_CLOCKS, keys.PARTITION_EPOCHS,
                         keys.RETENTION_LOST, keys.UNROUTED_LOST}


def test_named_scripts_exist():
    """Issue 25 deleted ``ingest.lua`` (the owner's fenced MULTI/EXEC writes
    the per-experiment state now) and ``route.lua`` (the routing index's
    plain commands): a writer the documents name as a script
    must still be one, so a row cannot keep crediting a deleted script."""
    lua = DOC.parent.parent / "streams" / "state" / "lua"
    for doc in (DOC, DOC.parent / "architecture.md"):
        for name in set(re.findall(r"([a-z_]+\.lua)\b", doc.read_text())):
            assert (lua / name).is_file(), f"{doc.name} names {name}, which does not exist"
