"""``liftstream bench sampler|covariate|async|ingest|latency``: the
benchmarks of ``streams.bench`` (each module's ``*_main`` runs one)."""

from __future__ import annotations

import argparse

from streams.config.settings import env_default

NAME = "bench"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``bench`` and its benchmarks, under ``sub``."""
    b = sub.add_parser(NAME, help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("sampler", help="sweeps/s and ESS/s, liftstream vs NumPyro NUTS")
    bs.add_argument("--problems", type=int, default=100)
    bs.add_argument("--chains", type=int, default=8)
    bs.add_argument("--strata", type=int, default=7)
    bs.add_argument("--sweeps", type=int, default=400)
    bs.add_argument("--numpyro", choices=("auto", "yes", "no"), default="auto",
                    help="run the NumPyro baseline (auto: when installed and P ≤ 1000)")
    bs.add_argument("--device", default=env_default("DEVICE", "auto"))
    bs.add_argument("--rng", choices=("pcg", "philox"), default=None,
                    help="random numbers: default Philox on a GPU, PCG64 on the CPU")
    bs.add_argument("--chunk-problems", type=int, default=None,
                    help="problems per batch (default: all on the CPU, sized to GPU memory)")
    bs.add_argument("--kind", choices=("sum", "conversion", "capped", "ratio"), default="sum",
                    help="the metrics' kind (issue 26): --problems metrics of it; a capped "
                         "sum and a ratio take two problems each")
    bs.add_argument("--json", action="store_true")
    bc = bsub.add_parser("covariate", help="sweep cost with a CUPED covariate vs without")
    bc.add_argument("--problems", type=int, default=200)
    bc.add_argument("--chains", type=int, default=8)
    bc.add_argument("--sweeps", type=int, default=30)
    bc.add_argument("--repeats", type=int, default=3)
    bc.add_argument("--rho", type=float, default=0.7)
    bc.add_argument("--missing", type=float, default=0.1)
    bc.add_argument("--device", default=env_default("DEVICE", "auto"))
    bc.add_argument("--json", action="store_true")
    # platform prior, exact asynchronous Gibbs (streams.bench.platform)
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
    # ingest throughput and end-to-end latency (streams.bench.ingest)
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
    return b


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.bench``."""
    if args.bench == "sampler":
        from streams.bench.sampler import sampler_main

        return sampler_main(args)
    if args.bench == "covariate":
        from streams.bench.covariate import main as covariate_main

        return covariate_main(args)
    if args.bench == "async":
        from streams.bench.platform import bench_main

        return bench_main(args)
    if args.bench == "ingest":
        from streams.bench.ingest import ingest_main

        return ingest_main(args)
    if args.bench == "latency":
        from streams.bench.ingest import latency_main

        return latency_main(args)
    raise SystemExit(f"unknown benchmark {args.bench}")
