"""The ``liftstream`` command line (docs/architecture.md#interfaces).

Subcommands import what they need lazily, so ``liftstream --help`` is fast and
a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import os
import sys


def _env(name: str, default):
    return os.environ.get(f"LIFTSTREAM_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="liftstream", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("analyze", help="offline estimates from JSONL experiments and events")
    a.add_argument("--experiments", required=True, help="JSONL file of experiment configs")
    a.add_argument("events", help="JSONL file of events (docs/architecture.md#contracts)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--chains", type=int, default=8)
    a.add_argument("--sweeps", type=int, default=1000, help="total sweeps; first half warm-up")
    a.add_argument("--as-of", type=int, default=None,
                   help="epoch ms the partitions are idle-advanced to at the end, as a "
                        "caught-up worker does (default: now)")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("sampler", help="sweeps/s and ESS/s, liftstream vs NumPyro NUTS")
    bs.add_argument("--problems", type=int, default=100)
    bs.add_argument("--chains", type=int, default=8)
    bs.add_argument("--strata", type=int, default=7)
    bs.add_argument("--sweeps", type=int, default=400)
    bs.add_argument("--numpyro", choices=("auto", "yes", "no"), default="auto",
                    help="run the NumPyro baseline (auto: when installed and P ≤ 1000)")
    bs.add_argument("--device", default=_env("DEVICE", "auto"))
    bs.add_argument("--rng", choices=("pcg", "philox"), default=None,
                    help="random numbers: default Philox on a GPU, PCG64 on the CPU")
    bs.add_argument("--chunk-problems", type=int, default=None,
                    help="problems per batch (default: all on the CPU, sized to GPU memory)")
    bs.add_argument("--json", action="store_true")
    bc = bsub.add_parser("covariate", help="sweep cost with a CUPED covariate vs without")
    bc.add_argument("--problems", type=int, default=200)
    bc.add_argument("--chains", type=int, default=8)
    bc.add_argument("--sweeps", type=int, default=30)
    bc.add_argument("--repeats", type=int, default=3)
    bc.add_argument("--rho", type=float, default=0.7)
    bc.add_argument("--missing", type=float, default=0.1)
    bc.add_argument("--device", default=_env("DEVICE", "auto"))
    bc.add_argument("--json", action="store_true")
    # --- bench async (platform prior, exact asynchronous Gibbs; streams.bench.platform) ---
    ba = bsub.add_parser("async", help="platform prior: sync vs exact/uncorrected async Gibbs")
    ba.add_argument("--experiments", type=int, default=200)
    ba.add_argument("--workers", type=int, default=4)
    ba.add_argument("--staleness", default="0,1,4,16", help="comma-separated levels k")
    ba.add_argument("--engine", choices=("sim", "redis"), default="sim",
                    help="in-process simulator (fast) or worker threads on a real redis-server")
    ba.add_argument("--sweeps", type=int, default=None)
    ba.add_argument("--seed", type=int, default=0)
    ba.add_argument("--redis-url", default=None, help="redis engine: default an embedded server")
    ba.add_argument("--json", action="store_true")
    # --- end bench async ---
    # --- bench ingest / bench latency (streams.bench.ingest) ---
    bi = bsub.add_parser("ingest", help="ingest vs a raw confluent-kafka + orjson consumer")
    bi.add_argument("--events", type=int, default=100_000)
    bi.add_argument("--partitions", type=int, default=3)
    bi.add_argument("--batch-size", type=int, default=None,
                    help="records per batch (default: the worker's, settings.batch_size)")
    bi.add_argument("--bootstrap-servers", default=None, help="default: an embedded broker")
    bi.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    bi.add_argument("--no-worker", action="store_true", help="skip (c), the Faust worker")
    bi.add_argument("--no-profile", action="store_true", help="skip the cProfile run of (b)")
    bi.add_argument("--seed", type=int, default=0)
    bi.add_argument("--json", action="store_true")
    bl = bsub.add_parser("latency", help="p50/p99 from an event's production to an estimate")
    bl.add_argument("--rate", type=float, default=200.0, help="events/s produced")
    bl.add_argument("--seconds", type=float, default=15.0)
    bl.add_argument("--bootstrap-servers", default=None, help="default: an embedded broker")
    bl.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    bl.add_argument("--json", action="store_true")
    # --- end bench ingest / bench latency ---

    s = sub.add_parser("simulate", help="synthetic experiment traffic with known truth")
    s.add_argument("--units", type=int, default=20_000)
    s.add_argument("--days", type=float, default=14.0)
    s.add_argument("--experiment", default="sim")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--window-seconds", type=int, default=86_400)
    s.add_argument("--started-at", type=int, default=1_767_225_600_000, help="epoch ms")
    s.add_argument("--out", help="write events JSONL here instead of producing to Kafka")
    s.add_argument("--experiments-out", help="write the experiment config JSONL here")
    s.add_argument("--truth", help="write the ground truth JSON here")
    s.add_argument("--bootstrap-servers", default=_env("BOOTSTRAP_SERVERS", None))
    s.add_argument("--topic", default=_env("TOPIC_EVENTS", "liftstream.events"))
    s.add_argument("--rate", type=float, default=0.0, help="events/s when producing (0 = max)")
    s.add_argument("--covariate-rho", type=float, default=None, metavar="R",
                   help="exposures carry a pre-experiment value of the metric ('pre', CUPED) "
                        "whose noise correlates R (-1..1) with the outcome's; default: none")
    s.add_argument("--covariate-missing", type=float, default=0.0, metavar="Q",
                   help="share of units without a pre-experiment value (0..1; default 0)")
    s.add_argument("--novelty", type=float, default=None, metavar="X",
                   help="the visits model (a metric event per visit) with an extra lift X on "
                        "each unit's first day since exposure (novelty X > 0, primacy X < 0, "
                        "0 none); needs --window-seconds of whole days >= 2; default: off")
    s.add_argument("--effect-slope", type=float, default=None, metavar="B",
                   help="how the effect changes per unit of log visit probability "
                        "(negative: heavy users respond worse; default the scenario's)")

    from streams.config.settings import add_arguments

    w = sub.add_parser("worker", help="run a stream-processing worker")
    w.add_argument("--role", choices=("ingest", "sampler", "all"),
                   default=_env("ROLE", "all"))
    w.add_argument("--without-web", action="store_true", help="no HTTP API in this worker")
    add_arguments(w)

    x = sub.add_parser("experiments", help="create or list experiments")
    xsub = x.add_subparsers(dest="action", required=True)
    xc = xsub.add_parser("create", help="publish a config to the experiments topic")
    xc.add_argument("config", help="JSON file (or - for stdin) with one experiment config")
    add_arguments(xc)
    xl = xsub.add_parser("list", help="registered experiments (from Redis)")
    add_arguments(xl)
    xs = xsub.add_parser("stop", help="stop an experiment: exposures from now (or --at) on "
                         "are counted after_end and not applied; exposed units keep "
                         "their metrics until their windows close")
    xs.add_argument("experiment")
    xs.add_argument("--at", type=int, default=None,
                    help="end time, epoch ms (default: now)")
    add_arguments(xs)
    xd = xsub.add_parser("delete", help="delete an experiment: a tombstone on the "
                         "experiments topic; every key of it is removed and its events "
                         "are dead-lettered unknown_experiment from then on")
    xd.add_argument("experiment")
    add_arguments(xd)

    ad = sub.add_parser("admin", help="operator commands on the state in Redis")
    asub = ad.add_subparsers(dest="action", required=True)
    ar = asub.add_parser("reset-offsets", help="forget every applied offset, clock and id "
                         "of an events topic (after it was deleted and created again); the "
                         "experiments' state stays. Stop the ingest workers first.")
    ar.add_argument("--topic", required=True)
    ar.add_argument("--yes", action="store_true", help="do it (else: say what would go)")
    add_arguments(ar)

    e = sub.add_parser("estimates", help="latest estimates of an experiment (from Redis)")
    e.add_argument("experiment")
    add_arguments(e)
    wt = sub.add_parser("watch", help="print each new estimate as it is published")
    wt.add_argument("experiment", nargs="?", help="only this experiment")
    add_arguments(wt)

    d = sub.add_parser("demo", help="embedded broker + Redis + worker + traffic, live table")
    d.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    d.add_argument("--no-traffic", action="store_true")
    d.add_argument("--speed", type=float, default=10.0, help="simulated days per minute")
    d.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        from streams.sampling.analyze import main as run

        return run(args)
    if args.command == "bench" and args.bench == "sampler":
        from streams.bench.sampler import sampler_main

        return sampler_main(args)
    if args.command == "bench" and args.bench == "covariate":
        from streams.bench.covariate import main as covariate_main

        return covariate_main(args)
    if args.command == "bench" and args.bench == "async":  # --- bench async ---
        from streams.bench.platform import bench_main as run_async_bench

        return run_async_bench(args)
    if args.command == "bench" and args.bench in ("ingest", "latency"):  # --- bench ingest ---
        from streams.bench import ingest as bench_ingest

        return getattr(bench_ingest, f"{args.bench}_main")(args)
    if args.command == "simulate":
        from streams.dev.simulate import main as run

        return run(args)
    if args.command == "worker":
        from streams.service.worker import main as run

        return run(args)
    if args.command in ("experiments", "estimates", "watch", "admin"):
        from streams.cli import admin

        return getattr(admin, args.command)(args)
    if args.command == "demo":
        from streams.dev.demo import main as run

        return run(args)
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
