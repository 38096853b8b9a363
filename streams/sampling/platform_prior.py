"""Redis as the parameter server of the platform prior (issue 7, docs/architecture.md#the-model;
docs/method.md §7).

The math is ``kernels.platform``; this module stores, commits and runs the one
asynchronous step that both the streaming sampler (``PlatformPrior``) and the
benchmark (``streams.bench.platform``) use.

Keys, per metric and chain (``{p}`` = ``lr:{p:<metric>:<chain>}``; the pilot of
chain c is chain ``<c>p``; one hash tag, so each Lua call touches one slot):

* ``{p}:hyper`` hash — ``lam``, ``psi2``, ``hver`` (bumped by every platform
  update), ``n``, ``s1`` = Σφ, ``s2`` = Σφ², ``sver`` (bumped by every commit
  of experiment values). Keeping the sums next to the hyperparameters lets any
  worker do a platform update with one read, without touching the experiments.
* ``{p}:contrib`` hash — member (``<experiment>/<variant>``) → its current
  φ_e = θ_e / sd_e.
* ``{p}:history`` list — the last ``history`` ``lam,psi2,hver`` (newest first):
  the draws the shrunk estimate averages over, and the values "k updates ago"
  that the benchmark hands a worker as injected staleness.

Concurrency is optimistic, by Lua compare-and-set on the version numbers:

* commit of a chain's experiment values (after the MH correction against the
  chain's *current* hyperparameters, read with ``hver``): applied only if
  ``hver`` is unchanged, else the worker re-reads the current values,
  recomputes the acceptance of the same proposal and retries. A pilot's commit
  is uncorrected and unconditional. Each member replaces its own contribution
  and the sums atomically; a member seen for the first time joins (n + 1).
  Commits of different experiments do not conflict.
* platform update (a conjugate draw from ``n, s1, s2`` and the current λ, read
  with ``sver`` and ``hver``): applied only if neither changed, so it is an
  exact draw given the state it is written over; else retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kernels import platform as kp
from streams.state.keys import platform_keys, platform_prefix

_COMMIT = """
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'hver') ~= ARGV[1] then return -1 end
local n = tonumber(redis.call('HGET', KEYS[1], 'n'))
local s1 = tonumber(redis.call('HGET', KEYS[1], 's1'))
local s2 = tonumber(redis.call('HGET', KEYS[1], 's2'))
for i = 2, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  local new = tonumber(ARGV[i + 1])
  if old then
    old = tonumber(old)
    s1 = s1 + new - old
    s2 = s2 + new * new - old * old
  else
    n = n + 1
    s1 = s1 + new
    s2 = s2 + new * new
  end
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'n', n, 's1', string.format('%.17g', s1),
           's2', string.format('%.17g', s2))
return redis.call('HINCRBY', KEYS[1], 'sver', 1)
"""

_SET_HYPER = """
if redis.call('HGET', KEYS[1], 'hver') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'sver') ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], 'lam', ARGV[3], 'psi2', ARGV[4])
local v = redis.call('HINCRBY', KEYS[1], 'hver', 1)
redis.call('LPUSH', KEYS[2], ARGV[3] .. ',' .. ARGV[4] .. ',' .. v)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
return v
"""

_ENSURE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'lam', ARGV[1], 'psi2', ARGV[2], 'hver', 0, 'sver', 0,
           'n', 0, 's1', 0, 's2', 0)
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('LPUSH', KEYS[3], ARGV[1] .. ',' .. ARGV[2] .. ',0')
return 1
"""


#: ``lr:{p:<metric>:<chain>}`` (``streams.state.keys.platform_prefix``)
prefix = platform_prefix


def _f(x: float) -> str:
    return repr(float(x))


class ParameterServer:
    """The (λ, ψ², sums, contributions, history) of one metric and chain in Redis."""

    def __init__(self, r, metric: str, chain: int | str = 0, history: int = 64) -> None:
        self.r = r
        self.hyper, self.contrib, self.hist = platform_keys(metric, chain)
        self.history = history
        self._commit = r.register_script(_COMMIT)
        self._set = r.register_script(_SET_HYPER)
        self._ensure = r.register_script(_ENSURE)

    def ensure(self, lam: float, psi2: float) -> bool:
        """Create the chain at (λ, ψ²) with no members, unless it exists."""
        return bool(self._ensure(keys=[self.hyper, self.contrib, self.hist],
                                 args=[_f(lam), _f(psi2)]))

    def init(self, phi: dict[str, float], lam: float, psi2: float) -> None:
        """Reset the chain to (λ, ψ², φ) (benchmarks start from a known state)."""
        vals = np.array(list(phi.values()))
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.hyper, self.contrib, self.hist)
        pipe.hset(self.contrib, mapping={k: _f(v) for k, v in phi.items()})
        pipe.hset(self.hyper, mapping={"lam": _f(lam), "psi2": _f(psi2), "hver": 0,
                                       "sver": 0, "n": len(phi), "s1": _f(vals.sum()),
                                       "s2": _f((vals * vals).sum())})
        pipe.lpush(self.hist, f"{lam!r},{psi2!r},0")
        pipe.execute()

    def read_current(self, ids: list[str]) -> tuple[float, float, str, np.ndarray]:
        """(λ, ψ², hver, φ of ``ids``; NaN for members not yet joined), atomically."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(self.hyper, "lam", "psi2", "hver")
        if ids:
            pipe.hmget(self.contrib, ids)
        (lam, psi2, hver), *phi = pipe.execute()
        return float(lam), float(psi2), hver.decode(), np.array(
            [np.nan if x is None else float(x) for x in (phi[0] if phi else [])])

    def read_stale(self, k: int = 0) -> tuple[float, float]:
        """The hyperparameters of k platform updates ago (the oldest kept if fewer)."""
        raw = self.r.lindex(self.hist, k) or self.r.lindex(self.hist, -1)
        lam, psi2, _ = raw.decode().split(",")
        return float(lam), float(psi2)

    def read_history(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The kept (λ, ψ²) draws, newest first, and the member count n."""
        pipe = self.r.pipeline(transaction=True)
        pipe.lrange(self.hist, 0, -1)
        pipe.hget(self.hyper, "n")
        raw, n = pipe.execute()
        rows = np.array([[float(x) for x in b.decode().split(",")[:2]] for b in raw])
        return rows[:, 0], rows[:, 1], int(n or 0)

    def commit(self, hver: str | None, values: dict[str, float]) -> bool:
        """Replace (or add) these members' contributions; if ``hver`` is given,
        only while it is still current."""
        if not values:
            return True
        args: list[str] = ["" if hver is None else hver]
        for k, v in values.items():
            args += [k, _f(v)]
        return int(self._commit(keys=[self.hyper, self.contrib], args=args)) >= 0

    def platform_update(self, rng: np.random.Generator,
                        prior: kp.HyperPrior = kp.PRIOR, max_tries: int = 100) -> tuple[int, int]:
        """One conjugate draw of (λ, ψ²) from the current sums; returns (the
        number of version races lost before succeeding or −1 if it gave up,
        the new ``hver``)."""
        for attempt in range(max_tries):
            n, s1, s2, lam, hver, sver = self.r.hmget(self.hyper, "n", "s1", "s2", "lam",
                                                      "hver", "sver")
            lam_new, psi2_new = kp.platform_update(int(n), float(s1), float(s2), float(lam),
                                                   rng, prior)
            v = int(self._set(keys=[self.hyper, self.hist],
                              args=[hver, sver, _f(lam_new), _f(psi2_new), self.history]))
            if v >= 0:
                return attempt, v
        return -1, -1

    def snapshot(self, ids: list[str]) -> tuple[float, float, int, np.ndarray]:
        """(λ, ψ², hver, φ) read atomically: one draw of the joint chain."""
        lam, psi2, hver, phi = self.read_current(ids)
        return lam, psi2, int(hver), phi


@dataclass
class StepResult:
    """What one asynchronous step of one chain did."""

    proposed: int = 0
    accepted: int = 0
    commit_races: int = 0
    hyper_races: int = 0
    hver: int = -1


def async_step(chain: ParameterServer, pilot: ParameterServer | None, ids: list[str],
               z: np.ndarray, rng: np.random.Generator, *, stale_k: int = 0,
               pause: Callable[[], None] | None = None) -> StepResult:
    """One exact-asynchronous-Gibbs step of ``ids`` (standardised estimates
    ``z``) on one chain, then one platform update (``kernels.platform``).

    With a ``pilot``: the proposal is drawn under the pilot's hyperparameters
    of ``stale_k`` updates ago; the pilot commits its own, independently drawn
    values uncorrected (it is an uncorrected asynchronous chain) and updates;
    the chain corrects its proposal against its current values, read at commit
    time, follows it with a random-walk step under the same values, and
    retries both on a version race (same random numbers). ``pilot=None`` is the
    uncorrected sampler (iii): the chain's own stale values, always accepted.
    ``pause`` runs between the proposal and the commit (a worker's compute
    time, or injected delay)."""
    src = pilot if pilot is not None else chain
    lam_s, psi2_s = src.read_stale(stale_k)
    new = kp.draw_theta(z, lam_s, psi2_s, rng)
    log_u = np.log(rng.uniform(size=new.shape))
    eps, log_u_rw = rng.standard_normal(new.shape), np.log(rng.uniform(size=new.shape))
    if pilot is not None:  # the pilot's own value: fresh random numbers, never the chain's
        pilot.commit(None, dict(zip(ids, kp.draw_theta(z, lam_s, psi2_s, rng).tolist(),
                                    strict=True)))
        pilot.platform_update(rng)
    if pause is not None:
        pause()
    res = StepResult(proposed=len(ids))
    while True:
        if pilot is None:  # uncorrected: the proposal, always
            ok, hver, value = np.ones(new.shape, bool), None, new
        else:
            lam_c, psi2_c, hver, old = chain.read_current(ids)
            joined = np.isnan(old)  # a new member: its first value is a draw, not a move
            old = np.where(joined, new, old)
            log_a = kp.correction_log_ratio(new, old, z, (lam_s, psi2_s), (lam_c, psi2_c))
            ok = joined | (log_u < np.minimum(log_a, 0.0))
            value = kp.random_walk_step(np.where(ok, new, old), z, (lam_c, psi2_c), eps,
                                        log_u_rw)
        if chain.commit(hver, dict(zip(ids, value.tolist(), strict=True))):
            break
        res.commit_races += 1
    res.accepted = int(ok.sum())
    races, res.hver = chain.platform_update(rng)
    res.hyper_races = max(races, 0)
    return res


# --------------------------------------------------------------------------- streaming

@dataclass(frozen=True)
class PlatformConfig:
    chains: int = 4  # inference chains per metric (each with its pilot)
    history: int = 64  # (λ, ψ²) draws per chain kept for the shrunk estimate
    seed: int = 0


class PlatformPrior:
    """The platform prior inside the sampler service: after each tick, the
    records of experiments with ``prior: "platform"`` get one asynchronous
    step per chain (all of a metric's records together) and a ``platform``
    field with the shrunk effect and the prior's (λ, ψ²)."""

    def __init__(self, r, cfg: PlatformConfig = PlatformConfig()) -> None:
        self.r = r
        self.cfg = cfg
        self._servers: dict[tuple[str, int], tuple[ParameterServer, ParameterServer]] = {}
        self._rng = np.random.default_rng([cfg.seed, time.time_ns() % 2**32])
        #: the correction step's acceptance over the last ``apply`` (all its
        #: metrics and chains), None before one proposed anything
        self.acceptance: float | None = None

    def servers(self, metric: str, c: int) -> tuple[ParameterServer, ParameterServer]:
        key = (metric, c)
        if key not in self._servers:
            chain = ParameterServer(self.r, metric, c, self.cfg.history)
            pilot = ParameterServer(self.r, metric, f"{c}p", self.cfg.history)
            # over-dispersed, deterministic per chain: R-hat across chains means something
            g = np.random.default_rng([self.cfg.seed, c])
            lam0, psi20 = float(g.normal()), float(np.exp(g.normal()))
            chain.ensure(lam0, psi20)
            pilot.ensure(lam0, psi20)
            self._servers[key] = (chain, pilot)
        return self._servers[key]

    def apply(self, recs: list[dict], opted_in: Callable[[str], bool]) -> list[dict]:
        by_metric: dict[str, list[dict]] = {}
        proposed = accepted = 0
        for rec in recs:
            eff = rec["adjusted"]["effect"]
            if opted_in(rec["experiment_id"]) and eff["sd"] and eff["sd"] > 0:
                by_metric.setdefault(rec["metric"], []).append(rec)
        for metric, group in by_metric.items():
            ids = [f"{r['experiment_id']}/{r['variant']}" for r in group]
            ybar = np.array([r["adjusted"]["effect"]["mean"] for r in group])
            sd = np.array([r["adjusted"]["effect"]["sd"] for r in group])
            z = ybar / sd
            lam, psi2, steps, n = [], [], [], 0
            for c in range(self.cfg.chains):
                chain, pilot = self.servers(metric, c)
                steps.append(async_step(chain, pilot, ids, z, self._rng))
                lam_c, psi2_c, n = chain.read_history()
                lam.append(lam_c)
                psi2.append(psi2_c)
            lam_d, psi2_d = np.concatenate(lam), np.concatenate(psi2)
            shrunk = kp.shrunk_effects(ybar, sd, lam_d, psi2_d)
            acc = sum(s.accepted for s in steps) / max(1, sum(s.proposed for s in steps))
            proposed += sum(s.proposed for s in steps)
            accepted += sum(s.accepted for s in steps)
            for i, rec in enumerate(group):
                rec["platform"] = {
                    "effect": shrunk[i]["effect"], "p_positive": shrunk[i]["p_positive"],
                    "lambda": {"mean": float(lam_d.mean()), "sd": float(lam_d.std())},
                    "psi2": {"mean": float(psi2_d.mean()), "sd": float(psi2_d.std())},
                    "experiments": n, "chains": self.cfg.chains, "draws": int(lam_d.size),
                    "acceptance": acc,
                }
        if proposed:
            self.acceptance = accepted / proposed
        return recs
