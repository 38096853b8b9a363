"""``liftstream estimates EXPERIMENT``: its latest estimates, from Redis."""

from __future__ import annotations

import argparse

from streams.config.settings import add_arguments

NAME = "estimates"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``estimates``, under ``sub``."""
    e = sub.add_parser(NAME, help="latest estimates of an experiment (from Redis)")
    e.add_argument("experiment")
    add_arguments(e)
    return e


def run(args: argparse.Namespace) -> int:
    """One estimate record (JSON) a line."""
    from schemas.codec import dumps
    from streams.config.settings import from_args, redis_client
    from streams.sampling.sampler import read_estimates

    s = from_args(args)
    for rec in read_estimates(redis_client(s), args.experiment):
        print(dumps(rec).decode())
    return 0
