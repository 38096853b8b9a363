"""``liftstream simulate``: synthetic experiment traffic with known truth
(``streams.dev.simulate``), to a file or produced to Kafka."""

from __future__ import annotations

import argparse
import sys

from streams.config.settings import env_default

NAME = "simulate"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``simulate``, under ``sub``."""
    s = sub.add_parser(NAME, help="synthetic experiment traffic with known truth")
    s.add_argument("--units", type=int, default=20_000)
    s.add_argument("--days", type=float, default=14.0)
    s.add_argument("--experiment", default="sim")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--window-seconds", type=int, default=86_400)
    s.add_argument("--started-at", type=int, default=1_767_225_600_000, help="epoch ms")
    s.add_argument("--out", help="write events JSONL here instead of producing to Kafka")
    s.add_argument("--experiments-out", help="write the experiment config JSONL here")
    s.add_argument("--truth", help="write the ground truth JSON here")
    s.add_argument("--bootstrap-servers", default=env_default("BOOTSTRAP_SERVERS", None))
    s.add_argument("--topic", default=env_default("TOPIC_EVENTS", "liftstream.events"))
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
    return s


def run(args: argparse.Namespace) -> int:
    """Make the traffic; write the config, truth and events where asked, or
    produce the events to ``--topic``; a summary on stderr."""
    from schemas.codec import dumps
    from schemas.validate import experiment_to_dict
    from streams.dev.simulate import make_traffic, produce

    try:
        cfg, evs, tr = make_traffic(args.units, args.days, args.experiment, args.seed,
                                    args.window_seconds, args.started_at,
                                    getattr(args, "covariate_rho", None),
                                    getattr(args, "covariate_missing", 0.0),
                                    getattr(args, "novelty", None),
                                    getattr(args, "effect_slope", None))
    except ValueError as e:
        raise SystemExit(f"liftstream simulate: {e}") from None
    if args.experiments_out:
        with open(args.experiments_out, "wb") as f:
            f.write(dumps(experiment_to_dict(cfg)) + b"\n")
    if args.truth:
        with open(args.truth, "wb") as f:
            f.write(dumps(tr) + b"\n")
    if args.out:
        with open(args.out, "wb") as f:
            for e in evs:
                f.write(dumps(e) + b"\n")
    elif args.bootstrap_servers:
        from streams.config.settings import Settings, kafka_config

        # security settings (SASL/TLS) from LIFTSTREAM_* like every client
        produce(evs, kafka_config(Settings.from_env(bootstrap_servers=args.bootstrap_servers)),
                args.topic, args.rate)
    else:
        raise SystemExit("give --out FILE or --bootstrap-servers HOST:PORT")
    print(dumps({"events": len(evs), "truth": tr}).decode(), file=sys.stderr)
    return 0
