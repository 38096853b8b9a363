"""Redis as the parameter server of the platform prior (DESIGN §6, phase 2).

The math is ``kernels.platform``; this module only stores and commits.

Keys, per metric and chain (``{p}`` = ``liftstream:platform:<metric>:<chain>``):

* ``{p}:hyper`` hash — ``lam``, ``psi2``, ``hver`` (bumped by every platform
  update), ``n``, ``s1`` = Σφ, ``s2`` = Σφ², ``sver`` (bumped by every commit
  of experiment values). Keeping the sums next to the hyperparameters lets any
  worker do a platform update with one read, without touching the experiments.
* ``{p}:contrib`` hash — experiment id → its current φ_e = θ_e / sd_e.
* ``{p}:history`` list — the last few ``lam,psi2,hver`` (newest first), so the
  simulation can hand a worker the values of k updates ago (injected staleness).

Concurrency is optimistic, by Lua compare-and-set on the version numbers:

* commit of experiment values (after the MH correction against the *current*
  hyperparameters, read with ``hver``): applied only if ``hver`` is unchanged,
  else the worker re-reads the current values, recomputes the acceptance of the
  same proposal and retries. Each experiment replaces its own contribution and
  the sums atomically. Commits of different experiments do not conflict.
* platform update (a conjugate draw from ``n, s1, s2`` and the current λ, read
  with ``sver`` and ``hver``): applied only if neither changed, so it is an
  exact draw given the state it is written over; else retried.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kernels import platform as kp

_COMMIT = """
if redis.call('HGET', KEYS[1], 'hver') ~= ARGV[1] then return -1 end
local s1 = tonumber(redis.call('HGET', KEYS[1], 's1'))
local s2 = tonumber(redis.call('HGET', KEYS[1], 's2'))
for i = 2, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[2], ARGV[i]))
  local new = tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  s1 = s1 + new - old
  s2 = s2 + new * new - old * old
end
redis.call('HSET', KEYS[1], 's1', string.format('%.17g', s1), 's2', string.format('%.17g', s2))
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


def prefix(metric: str, chain: int = 0) -> str:
    return f"liftstream:platform:{metric}:{chain}"


class ParameterServer:
    """The (λ, ψ², sums, contributions) of one metric and chain in Redis."""

    def __init__(self, r, metric: str, chain: int = 0, history: int = 32) -> None:
        p = prefix(metric, chain)
        self.r = r
        self.hyper, self.contrib, self.hist = f"{p}:hyper", f"{p}:contrib", f"{p}:history"
        self.history = history
        self._commit = r.register_script(_COMMIT)
        self._set = r.register_script(_SET_HYPER)

    def init(self, phi: dict[str, float], lam: float, psi2: float) -> None:
        vals = np.array(list(phi.values()))
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.hyper, self.contrib, self.hist)
        pipe.hset(self.contrib, mapping={k: repr(float(v)) for k, v in phi.items()})
        pipe.hset(self.hyper, mapping={"lam": repr(lam), "psi2": repr(psi2), "hver": 0,
                                       "sver": 0, "n": len(phi), "s1": repr(float(vals.sum())),
                                       "s2": repr(float((vals * vals).sum()))})
        pipe.lpush(self.hist, f"{lam!r},{psi2!r},0")
        pipe.execute()

    def read_current(self, ids: list[str]) -> tuple[float, float, str, np.ndarray]:
        """(λ, ψ², hver, φ of ``ids``), read atomically."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(self.hyper, "lam", "psi2", "hver")
        pipe.hmget(self.contrib, ids)
        (lam, psi2, hver), phi = pipe.execute()
        return float(lam), float(psi2), hver.decode(), np.array([float(x) for x in phi])

    def read_stale(self, k: int) -> tuple[float, float]:
        """The hyperparameters of k platform updates ago (the oldest kept if fewer)."""
        raw = self.r.lindex(self.hist, k) or self.r.lindex(self.hist, -1)
        lam, psi2, _ = raw.decode().split(",")
        return float(lam), float(psi2)

    def commit(self, hver: str, values: dict[str, float]) -> bool:
        """Replace these experiments' contributions if ``hver`` is still current."""
        args: list[str] = [hver]
        for k, v in values.items():
            args += [k, repr(float(v))]
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
                              args=[hver, sver, repr(float(lam_new)), repr(float(psi2_new)),
                                    self.history]))
            if v >= 0:
                return attempt, v
        return -1, -1

    def snapshot(self, ids: list[str]) -> tuple[float, float, int, np.ndarray]:
        """(λ, ψ², hver, φ) read atomically: one draw of the joint chain."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(self.hyper, "lam", "psi2", "hver")
        pipe.hmget(self.contrib, ids)
        (lam, psi2, hver), phi = pipe.execute()
        return float(lam), float(psi2), int(hver), np.array([float(x) for x in phi])


@dataclass
class RunStats:
    proposed: int = 0
    accepted: int = 0
    commit_races: int = 0
    hyper_races: int = 0
    draws: list[tuple[int, float, float, np.ndarray]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_async(redis_url: str, z: np.ndarray, *, n_sweeps: int = 400, n_workers: int = 4,
              batch: int = 50, staleness: int = 4, correct: bool = True, seed: int = 0,
              metric: str = "bench", chain: int = 0, sleep_s: float = 0.0) -> kp.Draws:
    """Asynchronous Gibbs over a real Redis with ``n_workers`` threads.

    Each worker owns E/n_workers experiments and loops over its batches: reads
    the hyperparameters of k updates ago (k ~ Uniform{0..staleness}: injected
    staleness on top of the real interleaving), draws the batch under them,
    optionally sleeps (``sleep_s`` × uniform), then reads the current values
    and commits with the MH correction (or, uncorrected, accepts all), then
    does one platform update. A snapshot of the whole chain is recorded after
    every E/batch platform updates; the first half is dropped as warm-up.
    """
    import redis

    E = z.size
    ids = [str(e) for e in range(E)]
    r0 = redis.Redis.from_url(redis_url)
    server = ParameterServer(r0, metric, chain, history=max(staleness + 1, 2))
    rng0 = np.random.default_rng(seed)
    lam0, psi20, phi0 = kp._init(z, 1, rng0)
    server.init({i: float(v) for i, v in zip(ids, phi0[0], strict=True)}, float(lam0[0]),
                float(psi20[0]))
    owners = np.array_split(np.arange(E), n_workers)
    per_sweep = sum(-(-o.size // batch) for o in owners)
    total_updates = n_sweeps * per_sweep
    stats = RunStats()
    counter = iter(range(total_updates))
    counter_lock = threading.Lock()

    def worker(w: int) -> None:
        r = redis.Redis.from_url(redis_url)
        ps = ParameterServer(r, metric, chain, history=server.history)
        rng = np.random.default_rng([seed, w + 1])
        mine = np.array_split(owners[w], max(1, -(-owners[w].size // batch)))
        j = 0
        while True:
            with counter_lock:
                if next(counter, None) is None:
                    r.close()
                    return
            idx = mine[j % len(mine)]
            j += 1
            keys = [ids[e] for e in idx]
            lam_s, psi2_s = ps.read_stale(int(rng.integers(0, staleness + 1)))
            zb = z[idx]
            new = kp.draw_theta(zb, lam_s, psi2_s, rng)
            log_u = np.log(rng.uniform(size=new.shape))
            if sleep_s:
                time.sleep(sleep_s * rng.uniform())
            races = 0
            while True:
                lam_c, psi2_c, hver, old = ps.read_current(keys)
                if correct:
                    la = kp.correction_log_ratio(new, old, zb, (lam_s, psi2_s), (lam_c, psi2_c))
                    ok = log_u < np.minimum(la, 0.0)
                else:
                    ok = np.ones(new.shape, bool)
                if ps.commit(hver, {k: v for k, v, a in zip(keys, new, ok, strict=True) if a}):
                    break
                races += 1
            hr, hv = ps.platform_update(rng)
            snap = ps.snapshot(ids) if hv > 0 and hv % per_sweep == 0 else None
            with stats.lock:
                stats.proposed += ok.size
                stats.accepted += int(ok.sum())
                stats.commit_races += races
                stats.hyper_races += max(hr, 0)
                if snap is not None:
                    stats.draws.append((hv, snap[0], snap[1], snap[3]))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r0.close()
    draws = sorted(stats.draws, key=lambda d: d[0])
    draws = draws[len(draws) // 2:]
    lam = np.array([d[1] for d in draws])[None]
    psi2 = np.array([d[2] for d in draws])[None]
    phi = np.array([d[3] for d in draws])[None]
    acc = stats.accepted / max(stats.proposed, 1) if correct else 1.0
    return kp.Draws(lam, psi2, phi, acc, {"commit_races": stats.commit_races,
                                          "hyper_races": stats.hyper_races})


# --------------------------------------------------------------------------- bench

def bench(n_experiments: int = 200, n_workers: int = 4, staleness: tuple[int, ...] = (0, 1, 4, 16),
          engine: str = "sim", n_sweeps: int | None = None, seed: int = 0,
          redis_url: str | None = None) -> dict[str, object]:
    """The (i)/(ii)/(iii) comparison of the issue as a JSON-able dict.

    ``engine="sim"``: the in-process simulator (``kernels.platform.async_gibbs``,
    4 chains, fast enough for every staleness level); ``"redis"``: 4 worker
    threads against a real redis-server (``redis_url``, or an embedded one), one
    chain. The exact posterior of (λ, ψ²) by 2-d quadrature is included as the
    ground truth all three are judged against.
    """
    data = kp.synthetic(n_experiments, seed=seed)
    z = data.z
    sample = np.arange(0, n_experiments, max(1, n_experiments // 5))
    sweeps = n_sweeps or (2000 if engine == "sim" else 400)
    out: dict[str, object] = {"experiments": n_experiments, "workers": n_workers,
                              "engine": engine, "sweeps": sweeps,
                              "true": {"lambda": data.lam, "psi2": data.psi2},
                              "exact": kp.exact_hyper_posterior(z)}
    sync = kp.sync_gibbs(z, max(sweeps, 2000), 4, seed=seed + 1)
    out["sync"] = kp.posterior_summary(sync, sample) | {
        "shrinkage": kp.shrinkage_report(sync, data)}

    def one(k: int, correct: bool) -> dict[str, object]:
        if engine == "sim":
            d = kp.async_gibbs(z, sweeps, 4, seed=seed + 10 + k, n_workers=n_workers,
                               staleness=k, correct=correct)
        else:
            assert url is not None
            d = run_async(url, z, n_sweeps=sweeps, n_workers=n_workers, batch=10,
                          staleness=k, correct=correct, seed=seed + 10 + k)
        res = kp.posterior_summary(d, sample) | {"shrinkage": kp.shrinkage_report(d, data)}
        return res | ({"races": d.extra} if d.extra else {})

    def levels() -> None:
        out["async_exact"] = {str(k): one(k, True) for k in staleness}
        out["async_uncorrected"] = {str(k): one(k, False) for k in staleness}
        out["acceptance"] = {k: v["acceptance"] for k, v in out["async_exact"].items()}  # type: ignore[union-attr]

    url = redis_url
    if engine == "redis" and url is None:
        from streams.embedded import redis_server

        with redis_server() as svc:
            url = svc.url
            levels()
    else:
        levels()
    return out


def bench_main(args) -> int:
    """``liftstream bench async``."""
    import json

    levels = tuple(int(x) for x in str(args.staleness).split(",") if x.strip())
    res = bench(args.experiments, args.workers, levels, args.engine, args.sweeps, args.seed,
                args.redis_url)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    ex = res["exact"]
    print(f"exact    λ {ex['lambda']['mean']:.4f}±{ex['lambda']['sd']:.4f}  "
          f"ψ² {ex['psi2']['mean']:.4f}±{ex['psi2']['sd']:.4f}")
    rows = [("sync", "-", res["sync"])]
    for name in ("async_exact", "async_uncorrected"):
        rows += [(name, k, v) for k, v in res[name].items()]
    for name, k, v in rows:
        print(f"{name:18s} k={k:>2s} λ {v['lambda']['mean']:.4f}±{v['lambda']['sd']:.4f} "
              f"ψ² {v['psi2']['mean']:.4f}±{v['psi2']['sd']:.4f} acc {v['acceptance']:.3f} "
              f"mse shrunk/flat {v['shrinkage']['mse_shrunk']:.2e}/{v['shrinkage']['mse_flat']:.2e}"
              f" cover {v['shrinkage']['coverage_shrunk']:.3f}")
    return 0
