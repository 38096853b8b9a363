"""``liftstream demo``: embedded broker + Redis + worker + traffic, with a
live table (``streams.dev.demo``)."""

from __future__ import annotations

import argparse

NAME = "demo"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``demo``, under ``sub``."""
    d = sub.add_parser(NAME, help="embedded broker + Redis + worker + traffic, live table")
    d.add_argument("--duration", type=float, default=None, help="seconds (default: until Ctrl-C)")
    d.add_argument("--no-traffic", action="store_true")
    d.add_argument("--speed", type=float, default=10.0, help="simulated days per minute")
    d.add_argument("--seed", type=int, default=0)
    return d


def run(args: argparse.Namespace) -> int:
    """Run the demo until ``--duration`` ends or Ctrl-C/SIGTERM."""
    from streams.dev.demo import run_demo

    return run_demo(duration=args.duration, no_traffic=args.no_traffic, speed=args.speed,
                    seed=args.seed)
