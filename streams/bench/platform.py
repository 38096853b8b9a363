"""``liftstream bench async``: the platform prior's samplers against the truth.

On 200 synthetic experiments with known effects from a known prior
(``kernels.platform.synthetic``), the posterior of (λ, ψ²) and of a sample of
φ_e from

(i)   synchronous Gibbs over the joint model (``kernels.platform.sync_gibbs``);
(ii)  exact asynchronous Gibbs: 4 workers, injected staleness k, proposals under
      the pilot chain's stale values, MH correction (``proposal="pilot"``);
(ii′) the same correction with the chain's *own* stale values (the
      construction first specified; biased at high staleness — reported so the
      finding can be re-run);
(iii) asynchronous Gibbs without the correction;

each judged against the exact posterior of (λ, ψ²) by quadrature, with the
acceptance rate of the correction step at each staleness level, and the MSE
and coverage of the shrunk effects against the true ones.

``--engine sim`` runs the in-process simulator (4 chains, every level in
seconds); ``--engine redis`` runs ``n_workers`` threads against a real
redis-server through ``streams.sampling.platform_prior.async_step`` — the step the
streaming sampler uses — with one chain (and its pilot).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np

from kernels import platform as kp
from streams.sampling.platform_prior import ParameterServer, async_step


def run_async(redis_url: str, z: np.ndarray, *, n_sweeps: int = 400, n_workers: int = 4,
              batch: int = 50, staleness: int = 4, correct: bool = True, seed: int = 0,
              metric: str = "bench", chain: int = 0, sleep_s: float = 0.0) -> kp.Draws:
    """Asynchronous Gibbs over a real Redis with ``n_workers`` threads.

    Each worker owns E/n_workers experiments and loops over its batches with
    ``async_step`` (k ~ Uniform{0..staleness} updates of injected staleness on
    top of the real interleaving; ``sleep_s`` × uniform of "compute" between
    proposal and commit). ``correct``: exact (pilot proposals, MH correction);
    else uncorrected. A snapshot of the whole chain is recorded after every
    E/batch platform updates; the first half is dropped as warm-up.
    """
    import redis

    E = z.size
    ids = [str(e) for e in range(E)]
    r0 = redis.Redis.from_url(redis_url)
    hist = max(staleness + 1, 2)
    rng0 = np.random.default_rng(seed)
    lam0, psi20, phi0 = kp.initial_state(z, 2, rng0)
    for c, name in enumerate((chain, f"{chain}p")):
        ParameterServer(r0, metric, name, hist).init(
            {i: float(v) for i, v in zip(ids, phi0[c], strict=True)},
            float(lam0[c]), float(psi20[c]))
    snap_server = ParameterServer(r0, metric, chain, hist)
    owners = np.array_split(np.arange(E), n_workers)
    per_sweep = sum(-(-o.size // batch) for o in owners)
    total = n_sweeps * per_sweep
    counter = iter(range(total))
    lock = threading.Lock()
    totals = {"proposed": 0, "accepted": 0, "commit_races": 0, "hyper_races": 0}
    draws: list[tuple[int, float, float, np.ndarray]] = []

    def worker(w: int) -> None:
        r = redis.Redis.from_url(redis_url)
        me = ParameterServer(r, metric, chain, hist)
        pilot = ParameterServer(r, metric, f"{chain}p", hist) if correct else None
        rng = np.random.default_rng([seed, w + 1])
        mine = np.array_split(owners[w], max(1, -(-owners[w].size // batch)))
        j = 0
        while True:
            with lock:
                if next(counter, None) is None:
                    r.close()
                    return
            idx = mine[j % len(mine)]
            j += 1
            pause = (lambda: time.sleep(sleep_s * rng.uniform())) if sleep_s else None
            res = async_step(me, pilot, [ids[e] for e in idx], z[idx], rng,
                             stale_k=int(rng.integers(0, staleness + 1)), pause=pause)
            snap = (snap_server.snapshot(ids) if res.hver > 0 and res.hver % per_sweep == 0
                    else None)
            with lock:
                for k in totals:
                    totals[k] += getattr(res, k)
                if snap is not None:
                    draws.append((res.hver, snap[0], snap[1], snap[3]))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r0.close()
    draws.sort(key=lambda d: d[0])
    draws = draws[len(draws) // 2:]
    lam = np.array([d[1] for d in draws])[None]
    psi2 = np.array([d[2] for d in draws])[None]
    phi = np.array([d[3] for d in draws])[None]
    acc = totals["accepted"] / max(totals["proposed"], 1) if correct else 1.0
    return kp.Draws(lam, psi2, phi, acc, {"commit_races": totals["commit_races"],
                                          "hyper_races": totals["hyper_races"]})


def bench(n_experiments: int = 200, n_workers: int = 4, staleness: tuple[int, ...] = (0, 1, 4, 16),
          engine: str = "sim", n_sweeps: int | None = None, seed: int = 0,
          redis_url: str | None = None) -> dict[str, object]:
    """The (i)/(ii)/(iii) comparison of the issue as a JSON-able dict; each
    sampler's (λ, ψ²) means come with their MCSE and their distance to the
    exact posterior mean in MCSEs (``z``)."""
    data = kp.synthetic(n_experiments, seed=seed)
    z = data.z
    sample = np.arange(0, n_experiments, max(1, n_experiments // 5))
    sweeps = n_sweeps or (2000 if engine == "sim" else 400)
    exact = kp.exact_hyper_posterior(z)
    out: dict[str, object] = {"experiments": n_experiments, "workers": n_workers,
                              "engine": engine, "sweeps": sweeps,
                              "true": {"lambda": data.lam, "psi2": data.psi2}, "exact": exact}

    def summary(d: kp.Draws) -> dict[str, object]:
        res = kp.posterior_summary(d, sample) | {"shrinkage": kp.shrinkage_report(d, data)}
        for name in ("lambda", "psi2"):
            s = res[name]
            s["z"] = (s["mean"] - exact[name]["mean"]) / max(s["mcse"], 1e-12)
        return res | ({"races": d.extra} if d.extra else {})

    out["sync"] = summary(kp.sync_gibbs(z, max(sweeps, 2000), 4, seed=seed + 1))

    def one(k: int, kind: str) -> dict[str, object]:
        if engine == "sim":
            d = kp.async_gibbs(z, sweeps, 4, seed=seed + 10 + k, n_workers=n_workers,
                               staleness=k, correct=kind != "uncorrected",
                               proposal="own" if kind == "own" else "pilot")
        else:
            assert url is not None
            d = run_async(url, z, n_sweeps=sweeps, n_workers=n_workers, batch=10,
                          staleness=k, correct=kind == "exact", seed=seed + 10 + k)
        return summary(d)

    kinds = ("exact", "own", "uncorrected") if engine == "sim" else ("exact", "uncorrected")

    def levels() -> None:
        for kind in kinds:
            out[f"async_{kind}"] = {str(k): one(k, kind) for k in staleness}
        out["acceptance"] = {k: v["acceptance"]
                             for k, v in out["async_exact"].items()}  # type: ignore[union-attr]

    url = redis_url
    if engine == "redis" and url is None:
        from streams.dev.embedded import redis_server

        with redis_server() as svc:
            url = svc.url
            levels()
    else:
        levels()
    return out


def bench_main(args) -> int:
    """``liftstream bench async``."""
    levels = tuple(int(x) for x in str(args.staleness).split(",") if x.strip())
    res = bench(args.experiments, args.workers, levels, args.engine, args.sweeps, args.seed,
                args.redis_url)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    ex = res["exact"]
    print(f"exact               λ {ex['lambda']['mean']:.4f}±{ex['lambda']['sd']:.4f}  "
          f"ψ² {ex['psi2']['mean']:.4f}±{ex['psi2']['sd']:.4f}")
    rows = [("sync", "-", res["sync"])]
    for name in ("async_exact", "async_own", "async_uncorrected"):
        rows += [(name, k, v) for k, v in res.get(name, {}).items()]
    for name, k, v in rows:
        lam, psi2 = v["lambda"], v["psi2"]
        print(f"{name:18s} k={k:>2s} λ {lam['mean']:.4f} (z {lam['z']:+5.1f}) "
              f"ψ² {psi2['mean']:.4f}±{psi2['sd']:.4f} (z {psi2['z']:+5.1f}) "
              f"acc {v['acceptance']:.3f} mse shrunk/flat "
              f"{v['shrinkage']['mse_shrunk']:.2e}/{v['shrinkage']['mse_flat']:.2e}"
              f" cover {v['shrinkage']['coverage_shrunk']:.3f}")
    return 0
