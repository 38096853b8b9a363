"""``liftstream worker``: run a stream-processing worker of one role
(``streams.service.worker.run_worker``)."""

from __future__ import annotations

import argparse

from streams.config.settings import add_arguments, env_default

NAME = "worker"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``worker``, under ``sub``: ``--role``, ``--without-web`` and every setting."""
    w = sub.add_parser(NAME, help="run a stream-processing worker")
    w.add_argument("--role", choices=("ingest", "sampler", "all"),
                   default=env_default("ROLE", "all"))
    w.add_argument("--without-web", action="store_true", help="no HTTP API in this worker")
    add_arguments(w)
    return w


def run(args: argparse.Namespace) -> int:
    """Run the worker until it is stopped."""
    from streams.config.settings import from_args
    from streams.service.worker import run_worker

    run_worker(from_args(args), args.role, web=not args.without_web)
    return 0
