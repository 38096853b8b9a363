"""``liftstream admin reset-offsets``: operator commands on the state in Redis."""

from __future__ import annotations

import argparse

from streams.config.settings import add_arguments

NAME = "admin"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``admin`` and its actions, under ``sub``."""
    ad = sub.add_parser(NAME, help="operator commands on the state in Redis")
    asub = ad.add_subparsers(dest="action", required=True)
    ar = asub.add_parser("reset-offsets", help="forget every applied offset, clock and id "
                         "of an events topic (after it was deleted and created again); the "
                         "experiments' state stays. Stop the ingest workers first.")
    ar.add_argument("--topic", required=True)
    ar.add_argument("--yes", action="store_true", help="do it (else: say what would go)")
    add_arguments(ar)
    return ad


def run(args: argparse.Namespace) -> int:
    """``liftstream admin reset-offsets --topic T [--yes]``."""
    from streams.config.settings import from_args, redis_client
    from streams.state.keys import TOPIC_IDS
    from streams.state.registry import Registry
    from streams.state.store import reset_topic_offsets

    s = from_args(args)
    r = redis_client(s)
    if not args.yes:
        known = r.hget(TOPIC_IDS, args.topic)
        print(f"would forget every applied offset, partition clock and owner epoch of "
              f"{args.topic!r} (recorded topic id: {known.decode() if known else 'none'}) and "
              "each experiment's offsets of it; the experiments' state stays. "
              "Stop the ingest workers first; run again with --yes.")
        return 0
    n = reset_topic_offsets(r, args.topic, Registry(r).ids())
    print(f"reset {args.topic}: {n} fields removed")
    return 0
