"""Every Redis key and channel name of liftstream (``lr:*``), built here only.

The schema (type, contents, writer, TTL of each key) is documented in
docs/redis-schema.md; ``tests/unit/test_redis_schema_doc.py`` checks that the
document and this module name the same key patterns. Other modules never
format a key themselves: they call these builders, so a name changes in one
place. The names are a stored format (a running deployment's Redis holds
them): changing one is a migration, see ``LEGACY_INGEST_KEYS``.

Hash tags (the part in braces decides the Redis Cluster slot):

* ``{e:<experiment_id>}`` — every key of one experiment, so each owner's
  commit (``streams.state.partition_store``, one MULTI/EXEC) and the
  sampler's chain write touch one slot;
* ``{x:<src>}`` — the routing index of the units of source partition
  ``<src>`` (``streams.state.unit_index``: only that partition's owner
  writes it, a unit's events all lie in its partition);
* ``{u:<unit_id>}`` — a unit's held metrics, and its routing index before
  issue 25 (read as a fallback only, ``unit_index_key``) (plain commands,
  ``streams.state.store.route_rows``: on a Redis Cluster they lie in every
  slot);
* ``{ingest}`` — the ingest positions (and the unrouted losses) that
  ``record_position`` moves together;
* ``{p:<metric>:<chain>}`` — one platform-prior chain (its Lua scripts).

The Lua scripts build no key names: they get every key in ``KEYS``. *Field* names inside
the hashes (``clk:<src>``, ``max_ts:<src>``, ``act_sum:<stratum>``,
``<metric>|<variant>|<stratum>``, ...) are listed per key in
docs/redis-schema.md.

``<src>`` (``source``) is a source partition, ``"<topic>|<partition>"``; ids
and names never contain ``{``, ``}``, ``|``, whitespace or glob characters
(``schemas.validate``), so a key is unambiguous.
"""

from __future__ import annotations

from typing import NamedTuple

# ---------------------------------------------------------------- globals

#: set: ids of registered experiments (``streams.state.registry``)
EXPERIMENTS_SET = "lr:experiments"
#: pub/sub channel: a notice per new estimate (``streams.sampling.sampler``)
NOTICE_CHANNEL = "lr:estimates"

# ---------------------------------------------------------------- ingest positions

#: hash ``<src>`` -> the partition clock (ms)
PARTITION_CLOCKS = "lr:{ingest}:clocks"
#: hash ``<src>`` -> last offset fully applied (every experiment)
INGEST_OFFSETS = "lr:{ingest}:offsets"
#: hash ``<src>`` -> the partition's owner epoch (+1 per claim)
PARTITION_EPOCHS = "lr:{ingest}:epochs"
#: hash ``<src>`` -> offsets deleted by retention before ingest applied them
#: (data loss, counted when a partition is assigned below its log start)
RETENTION_LOST = "lr:{ingest}:retention_lost"
#: hash ``<src>`` -> metrics without experiment_id dropped on the partition
#: because no exposure of their unit routed them (``unrouted_expired``: no
#: experiment is known for them, so no experiment's data_quality has them)
UNROUTED_LOST = "lr:{ingest}:unrouted_lost"
#: hash topic -> the Kafka topic id the applied offsets belong to
TOPIC_IDS = "lr:ingest:topic_ids"
#: hash topic -> the events topic's partition count the state was built with
#: (a unit's state belongs to the partition its key picks: a change moves units)
TOPIC_PARTITIONS = "lr:ingest:topic_partitions"
#: (old name, new name) of the keys that took the ``{ingest}`` hash tag; the
#: old names are only read by ``streams.state.store.migrate_ingest_keys``
LEGACY_INGEST_KEYS = (("lr:ingest:offsets", INGEST_OFFSETS),
                      ("lr:ingest:clocks", PARTITION_CLOCKS),
                      ("lr:ingest:epochs", PARTITION_EPOCHS))


def source(topic: str, partition: int) -> str:
    """``<topic>|<partition>``: a source partition, as a key suffix and as the
    field name of the offset, clock and epoch hashes."""
    return f"{topic}|{int(partition)}"


def completeness_key(topic: str) -> str:
    """string ``lr:ingest:watermark:<topic>``: the completeness clock of
    events topic ``topic`` (min over its partitions with a backlog of their
    clock, KIP-695)."""
    return f"lr:ingest:watermark:{topic}"


def unit_hold_queue(topic: str, partition: int) -> str:
    """zset ``lr:ingest:held:<src>``: unit_id -> newest unit-level held ts,
    the expiry order of unit-level holds of that source partition."""
    return f"lr:ingest:held:{source(topic, partition)}"


# ---------------------------------------------------------------- units

#: a field ``#`` whose value is longer than Redis's
#: ``hash-max-ziplist-value`` (``-listpack-`` in Redis 7; default 64 bytes),
#: so a hash created with it is a hashtable. Why, measured: a sighting bucket
#: grows to thousands of sightings, and until ``hash-max-ziplist-entries``
#: (512) each HSET scans the ziplist: 1.25 µs of Redis a sighting, against
#: 0.23 µs as a hashtable (and 0.62 for the sorted set's ZADD and pruning)
HASHTABLE_PAD = ("#", "a hashtable from the start: this value is longer than "
                 "hash-max-ziplist-value".ljust(256, "."))



def unit_index_key(unit_id: str) -> str:
    """hash ``lr:{u:<unit_id>}:x``: which experiments the unit was exposed in,
    as versions before issue 25 wrote it (one key per unit). Never written
    now; read as a fallback until such keys expired (``streams.state.unit_index``,
    the ``legacy`` field of ``index_buckets_key``)."""
    return f"lr:{{u:{unit_id}}}:x"


def index_bucket_key(topic: str, partition: int, ttl: int, start: int) -> str:
    """hash ``lr:{x:<src>}:<ttl>:<start>``: ``<unit>|<experiment>`` -> the
    position of the unit's first exposure to it recorded in this time bucket
    (wall time from ``start`` ms) of the partition's routing index
    (``streams.state.unit_index``); it expires ``ttl`` ms after the bucket's
    end."""
    return f"lr:{{x:{source(topic, partition)}}}:{ttl}:{start}"


def index_buckets_key(topic: str, partition: int) -> str:
    """hash ``lr:{x:<src>}:buckets``: ``<ttl>:<start>`` -> when that bucket
    of ``index_bucket_key`` expires (ms), and ``legacy`` -> until when the
    per-unit keys of ``unit_index_key`` are still read."""
    return f"lr:{{x:{source(topic, partition)}}}:buckets"


def experiment_and_unit_glob() -> str:
    """SCAN pattern matching every key of every experiment, unit and routing
    index: a delete walks the keyspace once with it
    (``registry.delete_state``), for the experiment's keys and its entries
    in the routing index (``index_bucket_key``, and ``unit_index_key`` of
    state from before issue 25)."""
    return "lr:{[eux]:*"


def unit_hold_key(unit_id: str) -> str:
    """hash ``lr:{u:<unit_id>}:held``: metrics without experiment_id held for
    the unit until one of its exposures arrives."""
    return f"lr:{{u:{unit_id}}}:held"


# ---------------------------------------------------------------- experiments

def experiment_key(experiment_id: str, kind: str) -> str:
    """``lr:{e:<experiment_id>}:<kind>``: the one place the experiment tag is
    formatted. Prefer the named builders below; ``kind`` is one of
    ``EXPERIMENT_KINDS`` or a per-source / per-metric suffix they build."""
    return f"lr:{{e:{experiment_id}}}:{kind}"


def experiment_glob(experiment_id: str) -> str:
    """SCAN pattern matching every key of the experiment (names hold no glob
    characters)."""
    return experiment_key(experiment_id, "*")


class ExperimentKeys(NamedTuple):
    """The keys of one experiment that ingest reads and writes, in one hash
    slot. ``pending``, ``seen`` and ``heldq`` are prefixes: their keys are per
    source partition (``for_source``, ``pending_key`` ...)."""

    cfg: str
    units: str
    pending: str
    cells: str
    arrivals: str
    meta: str
    seen: str
    offsets: str
    dirty_seq: str
    held: str
    heldq: str
    retired: str

    def for_source(self, source: str) -> list[str]:
        """The keys ingest touches for source partition ``source``
        (``"<topic>|<partition>"``): pending units, dedupe sightings and the
        hold queue are per source partition, each on its own clock."""
        return [self.units, f"{self.pending}:{source}", self.cells, self.arrivals, self.meta,
                f"{self.seen}:{source}", self.offsets, self.dirty_seq, self.held,
                f"{self.heldq}:{source}", self.retired]


#: kinds of an experiment's keys keyed by the source partition: ``<kind>:<src>``
PER_SOURCE_KINDS = ("pending", "seen", "heldq")
#: kinds of an experiment's single keys (``lr:{e:<id>}:<kind>``)
EXPERIMENT_KINDS = tuple(k for k in ExperimentKeys._fields if k not in PER_SOURCE_KINDS) + (
    "chainver", "estimates", "lifecycle", "alerts", "alert-log", "truth", "gen", "decision",
    "shards", "tails")


def experiment_keys(experiment_id: str) -> ExperimentKeys:
    return ExperimentKeys(*(experiment_key(experiment_id, k) for k in ExperimentKeys._fields))


def cfg_key(experiment_id: str) -> str:
    """string: the experiment's config JSON (``streams.state.registry``)."""
    return experiment_key(experiment_id, "cfg")


def units_key(experiment_id: str) -> str:
    return experiment_key(experiment_id, "units")


def cells_key(experiment_id: str) -> str:
    return experiment_key(experiment_id, "cells")


def meta_key(experiment_id: str) -> str:
    return experiment_key(experiment_id, "meta")


def offsets_key(experiment_id: str) -> str:
    """hash ``<src>`` -> the last source offset applied to the experiment."""
    return experiment_key(experiment_id, "offsets")


def dirty_seq_key(experiment_id: str) -> str:
    return experiment_key(experiment_id, "dirty_seq")


def held_key(experiment_id: str) -> str:
    return experiment_key(experiment_id, "held")


def retired_key(experiment_id: str) -> str:
    return experiment_key(experiment_id, "retired")


def pending_key(experiment_id: str, src: str) -> str:
    """zset of the experiment's pending units of source partition ``src``
    (the layout of an owner without the full copy, and of older versions;
    ``streams.state.pending``)."""
    return experiment_key(experiment_id, f"pending:{src}")


def pending_bucket_key(experiment_id: str, src: str, start: int) -> str:
    """hash ``+<seq>``/``-<seq>`` -> packed entries: the log of source
    partition ``src``'s pending entries whose score falls in the bucket
    starting at ``start`` (ms; listed in meta ``pending_index_field``;
    ``streams.state.pending``)."""
    return experiment_key(experiment_id, f"pending:{src}:{start}")


def pending_index_field(src: str) -> str:
    """meta field: ``src``'s pending layout (absent: the ``pending_key``
    zset), ``<w> <n> <min> <start> ...`` (``streams.state.pending``)."""
    return f"pend:{src}"


def seen_key(experiment_id: str, src: str) -> str:
    """zset: dedupe sightings of source partition ``src`` as versions before
    the clock buckets kept them (``seen_bucket_key``); only read by the
    owner's one-time conversion, which deletes it."""
    return experiment_key(experiment_id, f"seen:{src}")


def seen_bucket_key(experiment_id: str, src: str, start: int) -> str:
    """hash event_id -> sighting clock: the dedupe sightings of source
    partition ``src`` whose clock falls in the bucket starting at ``start``
    (ms; the buckets that exist are listed in meta ``seen_index_field``)."""
    return experiment_key(experiment_id, f"seen:{src}:{start}")


def seen_index_field(src: str) -> str:
    """meta field: the live sighting buckets of ``src``, ``start:end`` pairs
    (``streams.state.partition_store.SeenBuckets``)."""
    return f"seen:{src}"


def heldq_key(experiment_id: str, src: str) -> str:
    """zset: hold expiry order of source partition ``src``."""
    return experiment_key(experiment_id, f"heldq:{src}")


def shard_key(experiment_id: str, src: str) -> str:
    """hash: source partition ``src``'s shard of the experiment's float
    aggregates (issue 25, DESIGN §3 "Where the rules run"): the cell and
    age-cell fields of ``cells``, ``act_sum:<stratum>`` and the tail
    sketch's counts ``t|<metric>|<variant>|<bucket>`` (integers), as absolute
    values written only by the partition's owner (its max event ts is meta
    ``max_ts:<src>``). Readers add the
    shards to the base (``cells`` and ``meta``, the state from before) in
    sorted source order, so the read model is bit-deterministic whatever the
    interleaving (``streams.state.store.read_snapshot``)."""
    return experiment_key(experiment_id, f"shard:{src}")


def shards_key(experiment_id: str) -> str:
    """set of the sources that have a ``shard_key`` (readers never scan)."""
    return experiment_key(experiment_id, "shards")


def tails_key(experiment_id: str) -> str:
    """hash ``<metric>|<variant>|<bucket>`` -> count (issue 26): the tail
    sketch of every sum metric, the folded units' uncapped window totals
    counted by ``kernels.tail.tail_bucket``, as the owners HINCRBY'd it
    before the counts moved into the sources' shards (``shard_key``'s
    ``t|`` fields, one HSET with the cells instead of one HINCRBY per
    bucket): read as the base the shards' counts add to, never written
    again; a field may read 0 (readers skip it)."""
    return experiment_key(experiment_id, "tails")


def fence_key(experiment_id: str, src: str) -> str:
    """hash ``epoch`` -> the owner epoch of source ``src`` allowed to commit
    to the experiment, ``seq`` -> its commits so far (issue 25): the key a
    commit WATCHes (``streams.state.partition_store``). A new owner raises
    ``epoch`` before it reads, so a zombie's EXEC is refused; ``seq``
    reveals a Redis that lost acknowledged commits."""
    return experiment_key(experiment_id, f"fence:{src}")


def chain_key(experiment_id: str, metric: str) -> str:
    """string: the chain blob of one metric (or ``<metric>#age<b>``)."""
    return experiment_key(experiment_id, f"chain:{metric}")


def chainver_key(experiment_id: str) -> str:
    """hash metric -> iteration of the stored chain (only goes forward)."""
    return experiment_key(experiment_id, "chainver")


def estimate_key(experiment_id: str, metric: str, variant: str) -> str:
    """string: the latest estimate JSON (as on the estimates topic)."""
    return experiment_key(experiment_id, f"estimate:{metric}:{variant}")


def history_key(experiment_id: str, metric: str, variant: str) -> str:
    """list: recent estimates, compact, newest first."""
    return experiment_key(experiment_id, f"history:{metric}:{variant}")


def estimates_index_key(experiment_id: str) -> str:
    """set of ``<metric>:<variant>`` with an estimate (and a history), so
    readers never scan the keyspace."""
    return experiment_key(experiment_id, "estimates")


def generation_key(experiment_id: str) -> str:
    """string: a token set when the experiment's config is first registered
    (``Registry.put``, SET NX) and deleted with it: the sampler writes back a
    tick's chains and estimates only while it is the one the tick loaded, so a
    tick in flight across a delete (or a delete and re-create under the same
    id) recreates nothing."""
    return experiment_key(experiment_id, "gen")


def decision_key(experiment_id: str) -> str:
    """string: the decisions' running state JSON (``streams.sampling.decisions``):
    the last look step, and per ``<metric>:<variant>`` the running
    intersection of its confidence sequence, e-values, looks and verdict."""
    return experiment_key(experiment_id, "decision")


def lifecycle_key(experiment_id: str) -> str:
    """string: ``concluded`` once the final estimates are out (absent while
    running or stopped: the config's status says which)."""
    return experiment_key(experiment_id, "lifecycle")


def alerts_key(experiment_id: str) -> str:
    """string: the experiment's alert state JSON (``streams.alerts.store``)."""
    return experiment_key(experiment_id, "alerts")


def alert_log_key(experiment_id: str) -> str:
    """list: alert transitions, newest first, capped."""
    return experiment_key(experiment_id, "alert-log")


def truth_key(experiment_id: str) -> str:
    """string: ground truth a simulator may publish for its experiment
    (dashboard only; ``liftstream demo``)."""
    return experiment_key(experiment_id, "truth")


# ---------------------------------------------------------------- platform prior

def platform_prefix(metric: str, chain: int | str = 0) -> str:
    """``lr:{p:<metric>:<chain>}``: the tag of one platform-prior chain (the
    pilot of chain c is chain ``<c>p``)."""
    return f"lr:{{p:{metric}:{chain}}}"


def platform_keys(metric: str, chain: int | str = 0) -> tuple[str, str, str]:
    """(hyper, contrib, history) of one platform-prior chain
    (``streams.sampling.platform_prior``)."""
    p = platform_prefix(metric, chain)
    return f"{p}:hyper", f"{p}:contrib", f"{p}:history"
