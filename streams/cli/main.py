"""The ``liftstream`` command line (docs/architecture.md#interfaces).

One module per command in ``streams.cli`` (its parser, ``add_parser``, next
to its ``run``); this one only assembles them and dispatches. Commands import
what they need lazily, so ``liftstream --help`` is fast and a missing
optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import sys

from streams.cli import (
    admin,
    analyze,
    bench,
    demo,
    estimates,
    experiments,
    simulate,
    watch,
    worker,
)

#: The commands, in the order ``liftstream --help`` lists them.
COMMANDS = (analyze, bench, simulate, worker, experiments, admin, estimates, watch, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``liftstream`` parser: one subparser per command module."""
    p = argparse.ArgumentParser(prog="liftstream", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command.

    :returns: the command's exit status.
    """
    args = build_parser().parse_args(argv)
    for cmd in COMMANDS:
        if cmd.NAME == args.command:
            return cmd.run(args)
    raise SystemExit(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
