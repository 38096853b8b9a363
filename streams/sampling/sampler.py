"""Sampler service: owns experiments, advances their chains, publishes.

Ownership comes from Kafka: an experiment is owned by the worker that
consumes the partition of ``liftstream.dirty`` its id hashes to. Each tick:
load snapshots and stored chains of the owned experiments that need work
(new data since their last tick, or chains not yet converged / window not yet
full) → ``streams.sampling.advance`` (one batched kernel call) → store chains, the
read model and history in Redis and return the records for the estimates
topic. Chains are stored *with* the estimate, so a successor after a
rebalance or crash resumes at the stored iteration.

Redis read model: the chains (``lr:{e:<id>}:chain:<metric>``, ``chainver``),
the latest estimate and history per metric and variant, the ``estimates``
index and the ``lr:estimates`` notice channel; names from
``streams.state.keys``, schema in docs/redis-schema.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from redis.exceptions import WatchError

from schemas.codec import dumps, loads
from streams.sampling.advance import StoredChains, TickConfig, advance
from streams.sampling.chains import decode, encode
from streams.sampling.decisions import decide
from streams.sampling.platform_prior import PlatformPrior
from streams.sampling.problems import chain_names
from streams.state.keys import (
    NOTICE_CHANNEL,
    cfg_key,
    chain_key,
    chainver_key,
    decision_key,
    dirty_seq_key,
    estimate_key,
    estimates_index_key,
    generation_key,
    held_key,
    heldq_key,
    history_key,
    lifecycle_key,
    meta_key,
    offsets_key,
    pending_index_field,
    pending_key,
    retired_key,
    seen_index_field,
    units_key,
)
from streams.state.partition_store import seen_keys
from streams.state.pending import pending_bucket_keys
from streams.state.registry import Registry
from streams.state.semantics import config_ms, horizons_ms
from streams.state.store import _is_cluster, mget, read_completeness, read_snapshot

log = logging.getLogger("liftstream.sampler")
HISTORY_LEN = 2000


def history_point(rec: dict) -> dict:
    a, n = rec["adjusted"]["effect"], rec["naive"]["effect"]
    matured = (rec.get("units") or {}).get("matured") or {}
    return {"t": rec["watermark"]["event_time"], "computed_at": rec["computed_at"],
            "adjusted": [a["mean"], a["lo"], a["hi"]], "naive": [n["mean"], n["lo"], n["hi"]],
            "rhat": rec["diagnostics"]["rhat"], "iteration": rec["diagnostics"]["iteration"],
            # units matured in the smaller arm: 0 = the point is the prior's, not the data's
            "matured": min(matured.get(rec.get("control"), 0), matured.get(rec["variant"], 0)),
            **_decision_point(rec.get("decision"))}


def _decision_point(dec: dict | None) -> dict:
    """The decision's confidence sequence and readiness in a history point
    (none for records without a decision)."""
    if not dec:
        return {}
    return {"cs": [dec["cs"]["lo"], dec["cs"]["hi"]], "ready": bool(dec["ready"])}


#: Is the experiment the one the tick loaded? Its config exists (a delete
#: removes it) and its generation is the one read at load ('' = none: an
#: experiment registered before generations). KEYS[1] config, KEYS[2]
#: generation; ARGV[1] the generation loaded.
_SAME_EXPERIMENT = """
local function same_experiment()
  return redis.call('EXISTS', KEYS[1]) == 1 and (redis.call('GET', KEYS[2]) or '') == ARGV[1]
end
"""

#: Write a chain blob only if its iteration is beyond the stored one, and
#: only into the experiment the tick loaded. KEYS: config, generation, chain
#: key, the experiment's ``chainver`` hash (metric -> iteration); ARGV:
#: generation loaded, metric, iteration, blob. Returns 1 if written, 0 if
#: stale, -1 if the experiment was deleted (or re-created) since the load.
STORE_CHAIN = _SAME_EXPERIMENT + """
if not same_experiment() then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[4], ARGV[2]))
local it = tonumber(ARGV[3])
if cur ~= nil and it <= cur then return 0 end
redis.call('SET', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
return 1
"""

#: An estimate into the read model (latest, index, history, notice), only
#: into the experiment the tick loaded, atomically with that check. KEYS:
#: config, generation, estimate, estimates index, history; ARGV: generation
#: loaded, record, index member, history point, history length - 1, notice
#: channel, notice. Returns 1 if written, 0 if the experiment is gone.
PUBLISH_ESTIMATE = _SAME_EXPERIMENT + """
if not same_experiment() then return 0 end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('LPUSH', KEYS[5], ARGV[4])
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]))
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""


#: The decisions' running state (``streams.sampling.decisions``), only into
#: the experiment the tick loaded and only forward in data time: KEYS config,
#: generation, decision key; ARGV generation loaded, look step, state JSON.
#: Returns 1 if written, 0 if a state at this step or later is stored, -1 if
#: the experiment is gone.
STORE_DECISION = _SAME_EXPERIMENT + """
if not same_experiment() then return -1 end
local cur = redis.call('GET', KEYS[3])
if cur then
  local ok, st = pcall(cjson.decode, cur)
  if ok and type(st) == 'table' and type(st.step) == 'number'
      and st.step >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[3], ARGV[3])
return 1
"""


class SamplerService:
    def __init__(self, r: Any, registry: Registry, tick: TickConfig, xp=np,
                 rhat_done: float = 1.01, platform: PlatformPrior | None = None,
                 events_topic: str | None = None):
        self.r = r
        #: whose completeness clock (docs/architecture.md#state) the estimates reflect; None:
        #: each experiment's own lowest partition clock
        self.events_topic = events_topic
        self.platform = platform  # None: ``prior: "platform"`` configs get no shrinkage
        self.registry = registry
        self.tick_cfg = tick
        self.xp = xp
        self.rhat_done = rhat_done
        self.owned: set[str] = set()
        self.idle_at_seq: dict[str, int | None] = {}  # experiments with nothing to do
        self.bad_chains = 0  # unreadable chain blobs restarted (liftstream_bad_chains_total)
        self.stale_writes = 0  # chain writes refused: a newer iteration was stored
        #: MH acceptance of the last tick by block, averaged over its problems
        #: (liftstream_sampler_acceptance; see ``tick_acceptance``)
        self.acceptance: dict[str, float] = {}
        self.gone_writes = 0  # writes refused: the experiment was deleted since the load
        #: experiment -> its generation at the last load ('' = none): ``store``
        #: writes only into that experiment (``generation_key``)
        self._generations: dict[str, str] = {}
        self._store_chain = None
        self._publish_estimate = None
        self._store_decision = None

    def own(self, eid: str) -> None:
        self.owned.add(eid)
        self.idle_at_seq.pop(eid, None)  # a dirty notice: look again

    def disown_all(self) -> None:
        self.owned.clear()
        self.idle_at_seq.clear()

    def load(self, eids: list[str]):
        # the generations before the snapshots: a delete in between makes the
        # writes of this tick refused, never accepted into a newer experiment
        gens = mget(self.r, [generation_key(e) for e in eids]) if eids else []
        self._generations.update(
            (e, "" if g is None else g.decode() if isinstance(g, bytes) else g)
            for e, g in zip(eids, gens, strict=True))
        cfgs = self.registry.get_many(eids)
        c = None if self.events_topic is None else read_completeness(self.r, self.events_topic)
        snaps = [read_snapshot(self.r, cfgs[e], completeness=c) for e in eids if e in cfgs]
        keys = [(s.experiment_id, m) for s in snaps for m in chain_names(s.config)]
        stored: dict[tuple[str, str], StoredChains] = {}
        if keys:
            blobs = mget(self.r, [chain_key(e, m) for e, m in keys])
            for key, blob in zip(keys, blobs, strict=True):
                if blob:
                    try:
                        arrays, meta = decode(blob)
                    except Exception as e:  # noqa: BLE001 - one bad blob must not stop the rest
                        log.error("chain %s of %s unreadable (%s): restarting that chain",
                                  key[1], key[0], e)
                        self.bad_chains += 1
                        # its iteration restarts at 0: forget the stored one
                        self.r.hdel(chainver_key(key[0]), key[1])
                        continue
                    state = {k[2:]: v for k, v in arrays.items() if k.startswith("s.")}
                    window = {k[2:]: v for k, v in arrays.items() if k.startswith("w.")} or None
                    stored[key] = StoredChains(state, window, meta.get("seq"),
                                               meta.get("fresh_from"))
        return snaps, stored

    def decide(self, snaps, recs: list[dict]) -> dict[str, dict]:
        """Attach each record's ``decision`` (``streams.sampling.decisions``),
        continuing each experiment's stored decision state; returns the
        states of the experiments that took a look (for ``store``)."""
        if not snaps:
            return {}
        raw = mget(self.r, [decision_key(s.experiment_id) for s in snaps])
        out: dict[str, dict] = {}
        for snap, blob in zip(snaps, raw, strict=True):
            try:
                state = loads(blob) if blob else None
            except ValueError:
                log.error("decision state of %s unreadable: starting it again", snap.experiment_id)
                state = None
            _, new, looked = decide(snap, recs, state)
            if looked:
                out[snap.experiment_id] = new
        return out

    def store(self, chains: dict[tuple[str, str], StoredChains], recs: list[dict],
              decisions: dict[str, dict] | None = None) -> list[dict]:
        """Write the chains, each only if its iteration is beyond the stored
        one (``STORE_CHAIN``: a sampler that lost the experiment in a
        rebalance but is still inside a tick cannot write back an older or
        equal iteration), then the estimates of the chains written
        (``PUBLISH_ESTIMATE``). Both only into the experiment ``load`` read:
        a tick in flight across the experiment's delete (or a delete and
        re-create under its id) writes nothing back (issue 24). Returns the
        estimates written: the ones to publish."""
        written: set[tuple[str, str]] = set()
        if self._store_chain is None:
            self._store_chain = self.r.register_script(STORE_CHAIN)
            self._publish_estimate = self.r.register_script(PUBLISH_ESTIMATE)
        sc, pe = self._store_chain, self._publish_estimate
        gen = self._generations.get
        # redis-py refuses scripts in a cluster pipeline: there, one call each
        cluster = _is_cluster(self.r)
        pipe = self.r if cluster else self.r.pipeline(transaction=False)
        order = list(chains)
        done = []
        for eid, metric in order:
            st = chains[(eid, metric)]
            arrays = {f"s.{k}": v for k, v in st.state.items()}
            if st.window is not None:
                arrays.update({f"w.{k}": v for k, v in st.window.items()})
            done.append(sc(keys=[cfg_key(eid), generation_key(eid), chain_key(eid, metric),
                                 chainver_key(eid)],
                           args=[gen(eid, ""), metric, int(st.state["iteration"]),
                                 encode(arrays, {"seq": st.seq, "fresh_from": st.fresh_from})],
                           client=pipe))
        for key, ok in zip(order, done if cluster else pipe.execute(), strict=True):
            if ok == 1:
                written.add(key)
            elif ok == -1:
                self.gone_writes += 1
                log.info("chain %s of %s not written: the experiment was deleted since "
                         "this tick loaded it", key[1], key[0])
            else:
                self.stale_writes += 1
                log.warning("chain %s of %s not written: a newer iteration is stored "
                            "(another sampler owns it now)", key[1], key[0])
        recs = [rec for rec in recs if (rec["experiment_id"], rec["metric"]) in written]
        pipe = self.r if cluster else self.r.pipeline(transaction=False)
        done = []
        for rec in recs:
            e, m, v = rec["experiment_id"], rec["metric"], rec["variant"]
            notice = dumps({
                "experiment_id": e, "metric": m, "variant": v,
                "computed_at": rec["computed_at"], "watermark": rec["watermark"]["event_time"]})
            done.append(pe(keys=[cfg_key(e), generation_key(e), estimate_key(e, m, v),
                                 estimates_index_key(e), history_key(e, m, v)],
                           args=[gen(e, ""), dumps(rec), f"{m}:{v}", dumps(history_point(rec)),
                                 HISTORY_LEN - 1, NOTICE_CHANNEL, notice],
                           client=pipe))
        if not cluster and recs:
            done = pipe.execute()
        out = [rec for rec, ok in zip(recs, done, strict=True) if ok]
        self.gone_writes += len(recs) - len(out)
        self._store_decisions(decisions or {}, {e for e, _ in written})
        return out

    def _store_decisions(self, decisions: dict[str, dict], written: set[str]) -> None:
        """The decision states of the experiments whose chains were written
        (``STORE_DECISION``: forward in look steps only)."""
        if self._store_decision is None:
            self._store_decision = self.r.register_script(STORE_DECISION)
        for eid, state in sorted(decisions.items()):
            if eid not in written:
                continue
            self._store_decision(keys=[cfg_key(eid), generation_key(eid), decision_key(eid)],
                                 args=[self._generations.get(eid, ""), int(state["step"]),
                                       dumps(state)])

    def due(self) -> list[str]:
        """Owned experiments with work to do."""
        out = []
        if not self.owned:
            return out
        owned = sorted(self.owned)
        got = mget(self.r, [dirty_seq_key(e) for e in owned]
                   + [lifecycle_key(e) for e in owned])
        seqs, states = got[:len(owned)], got[len(owned):]
        for e, s, lc in zip(owned, seqs, states, strict=True):
            seq = None if s is None else int(s)
            if lc is not None:  # concluded: its final estimates stand
                continue
            if e in self.idle_at_seq and self.idle_at_seq[e] == seq:
                continue
            out.append(e)
        return out

    def conclude_due(self) -> list[dict]:
        """Conclude the owned stopped experiments that are done: every window
        closed and the correction horizon passed on every partition (the
        completeness clock minus L is past end_at + W + H), and their chains
        converged with a full window drawn on the final data (idle at the
        current dirty_seq). Returns their final records (``final: true``)."""
        idle = sorted(e for e in self.owned if e in self.idle_at_seq)
        if not idle or self.events_topic is None:
            return []
        c = read_completeness(self.r, self.events_topic)
        if c is None:
            return []
        seqs = dict(zip(idle, mget(self.r, [dirty_seq_key(e) for e in idle]),
                        strict=True))
        out: list[dict] = []
        for e, cfg in sorted(self.registry.get_many(idle).items()):
            seq = None if seqs[e] is None else int(seqs[e])
            if cfg.end_at is None or self.idle_at_seq.get(e) != seq:
                continue
            W, _, L, _ = config_ms(cfg)
            if c - L < cfg.end_at + W + horizons_ms(cfg)[0]:
                continue
            out += conclude(self.r, cfg)
            self.owned.discard(e)
            self.idle_at_seq.pop(e, None)
        return out

    def tick(self, now_ms: int | None = None) -> list[dict]:
        """One tick over the due experiments; returns the published records."""
        eids = self.due()
        if not eids:
            return []
        snaps, stored = self.load(eids)
        now_ms = now_ms or int(time.time() * 1000)
        recs, chains = advance(snaps, stored, self.tick_cfg, now_ms, xp=self.xp)
        self.acceptance = tick_acceptance(chains)
        if self.platform is not None:
            opted = {s.experiment_id for s in snaps if s.config.prior == "platform"}
            if opted:
                recs = self.platform.apply(recs, opted.__contains__)
                if self.platform.acceptance is not None:
                    self.acceptance["platform"] = self.platform.acceptance
        decisions = self.decide(snaps, recs)
        recs = self.store(chains, recs, decisions)
        self._mark_idle(snaps, chains, recs)
        return recs

    def _mark_idle(self, snaps, chains, recs) -> None:
        """Converged, and a full window drawn entirely on the current data: stop
        until the next dirty notice. (Full alone is not enough: right after new
        data the window still holds draws made on the old data, and stopping
        then would leave a stale mixture published at the new watermark.)"""
        worst: dict[str, float] = {}
        for rec in recs:
            rh = rec["diagnostics"]["rhat"]
            worst[rec["experiment_id"]] = max(worst.get(rec["experiment_id"], 0.0),
                                              rh if rh is not None else 9.9)
        for s in snaps:
            full = all(
                st.window is not None and st.window["tau"].shape[1] >= self.tick_cfg.window
                and st.window_is_fresh()
                for (e, _), st in chains.items() if e == s.experiment_id
            )
            if full and worst.get(s.experiment_id, 9.9) < self.rhat_done:
                self.idle_at_seq[s.experiment_id] = s.seq


def tick_acceptance(chains: dict[tuple[str, str], StoredChains]) -> dict[str, float]:
    """The tick's MH acceptance rate by block: each problem's rate (``StoredChains.
    acceptance``, over its chains, treatments and the tick's sweeps) averaged
    over the problems advanced. Empty when none was."""
    rates: dict[str, list[float]] = {}
    for st in chains.values():
        for block, rate in (st.acceptance or {}).items():
            rates.setdefault(block, []).append(rate)
    return {block: sum(v) / len(v) for block, v in rates.items()}


def conclude(r: Any, cfg) -> list[dict]:
    """Mark the experiment concluded: its latest estimates rewritten with
    ``final: true`` (returned, to publish), and its working state deleted in
    the same transaction: unit records, pending sets, dedupe sightings, held
    metrics and chains. Cells, arrivals, counters, estimates, history and the
    config stay. Events that still arrive for it are counted, not estimated."""
    eid = cfg.experiment_id
    recs = read_estimates(r, eid)
    for rec in recs:
        rec["final"] = True
    srcs = [x.decode() if isinstance(x, bytes) else x
            for x in r.hkeys(offsets_key(eid))]
    drop = [units_key(eid), held_key(eid), chainver_key(eid), retired_key(eid)]
    drop += [k(eid, src) for src in srcs for k in (pending_key, heldq_key)]
    drop += [chain_key(eid, m) for m in chain_names(cfg)]
    with r.pipeline(transaction=True) as pipe:  # one slot: {e:<id>}
        while True:
            # the sighting buckets are listed in meta (``SeenBuckets``): an
            # owner's commit that adds one before the EXEC retries the read
            pipe.watch(meta_key(eid))
            seen = seen_keys(pipe, eid, srcs)
            seen += pending_bucket_keys(pipe, eid, srcs)
            pipe.multi()
            for rec in recs:
                pipe.set(estimate_key(eid, rec["metric"], rec["variant"]), dumps(rec))
            pipe.set(lifecycle_key(eid), "concluded")
            pipe.unlink(*drop, *seen)
            if srcs:
                pipe.hdel(meta_key(eid), *[seen_index_field(s) for s in srcs],
                          *[pending_index_field(s) for s in srcs])
            try:
                pipe.execute()
                return recs
            except WatchError:
                continue


def read_lifecycle(r: Any, cfg) -> str:
    """``running``, ``stopped`` (config status or end_at) or ``concluded``."""
    return lifecycle_of(cfg, r.get(lifecycle_key(cfg.experiment_id)))


def lifecycle_of(cfg, marker: Any) -> str:
    """``read_lifecycle`` from the value of the lifecycle key already read
    (``marker``; None when absent), for readers that pipeline it."""
    if marker is not None:
        return "concluded"
    return "stopped" if cfg.status == "stopped" or cfg.end_at is not None else "running"


def estimate_names(r: Any, eid: str) -> list[tuple[str, str]]:
    """(metric, variant) of every estimate of an experiment, sorted: its
    index set, O(its estimates) whatever else Redis holds."""
    out = []
    for x in r.smembers(estimates_index_key(eid)):
        m, _, v = (x.decode() if isinstance(x, bytes) else x).partition(":")
        out.append((m, v))
    return sorted(out)


def read_estimates(r: Any, eid: str) -> list[dict]:
    """Every latest estimate of an experiment from the read model."""
    names = estimate_names(r, eid)
    if not names:
        return []
    return [loads(v) for v in r.mget([estimate_key(eid, m, v) for m, v in names]) if v]


def read_history(r: Any, eid: str, limit: int = 500,
                 series: list[tuple[str, str]] | None = None) -> dict[str, list[dict]]:
    """``"<metric>:<variant>"`` -> its last ``limit`` history points, oldest
    first, in one round trip: of ``series`` (``(metric, variant)`` pairs; the
    HTTP API reads the one its page shows), else of every series with an estimate."""
    names = estimate_names(r, eid) if series is None else series
    if not names:
        return {}
    pipe = r.pipeline(transaction=False)
    for m, v in names:
        pipe.lrange(history_key(eid, m, v), 0, limit - 1)
    return {f"{m}:{v}": [loads(x) for x in pts][::-1]
            for (m, v), pts in zip(names, pipe.execute(), strict=True)}
