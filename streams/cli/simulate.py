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
    # metric kinds (issue 26): the experiment's one metric and the truth follow the kind
    s.add_argument("--kind", choices=("sum", "conversion", "ratio"), default="sum",
                   help="the metric: sum (default: a normal 'value'; lognormal revenue with "
                        "--revenue-sigma), conversion ('purchase': did the unit buy), ratio "
                        "('revenue' per 'sessions')")
    s.add_argument("--base-rate", type=float, default=None, metavar="P",
                   help="conversion: the control's conversion rate (0 < P < 1, e.g. 0.01; "
                        "default 0.05)")
    s.add_argument("--ratio-corr", type=float, default=None, metavar="R",
                   help="ratio: correlation of the unit's numerator and denominator totals "
                        "(0 < R <= 1; default 0.5)")
    s.add_argument("--revenue-sigma", type=float, default=None, metavar="S",
                   help="sum: lognormal 'revenue' with sigma S (up to 2 is heavy-tailed; "
                        "0 < S <= 3) and a point mass at 0")
    s.add_argument("--zero-share", type=float, default=None, metavar="Q",
                   help="revenue: share of units with no revenue (0 <= Q < 1; default 0.7)")
    s.add_argument("--cap-upper", type=float, default=None, metavar="X",
                   help="revenue: the config caps each unit's window total at X; the truth is "
                        "the capped population effect, the uncapped one under 'uncapped'")
    s.add_argument("--effect", type=float, default=None, metavar="E",
                   help="the population effect (a relative lift for conversion, ratio and "
                        "revenue; default the scenario's, 0.10)")
    return s


def run(args: argparse.Namespace) -> int:
    """Make the traffic; write the config, truth and events where asked, or
    produce the events to ``--topic``; a summary on stderr."""
    from schemas.codec import dumps
    from schemas.validate import experiment_to_dict
    from streams.dev.simulate import KindOptions, make_traffic, produce

    try:
        kinds = KindOptions(kind=args.kind, base_rate=args.base_rate,
                            ratio_corr=args.ratio_corr, revenue_sigma=args.revenue_sigma,
                            zero_share=args.zero_share, cap_upper=args.cap_upper,
                            effect=args.effect)
        cfg, evs, tr = make_traffic(args.units, args.days, args.experiment, args.seed,
                                    args.window_seconds, args.started_at,
                                    getattr(args, "covariate_rho", None),
                                    getattr(args, "covariate_missing", 0.0),
                                    getattr(args, "novelty", None),
                                    getattr(args, "effect_slope", None), kinds)
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
