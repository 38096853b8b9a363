"""``liftstream analyze``: offline estimates from JSONL experiments and events
(``streams.sampling.analyze``)."""

from __future__ import annotations

import argparse
import sys

NAME = "analyze"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``analyze``, under ``sub``."""
    a = sub.add_parser(NAME, help="offline estimates from JSONL experiments and events")
    a.add_argument("--experiments", required=True, help="JSONL file of experiment configs")
    a.add_argument("events", help="JSONL file of events (docs/architecture.md#contracts)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--chains", type=int, default=8)
    a.add_argument("--sweeps", type=int, default=1000, help="total sweeps; first half warm-up")
    a.add_argument("--as-of", type=_as_of, default=None, metavar="MS|now",
                   help="epoch ms the partitions are idle-advanced to at the end, as a "
                        "caught-up worker does, maturing the units whose window closed by "
                        "then (default: the file's own end, its largest event ts; 'now': "
                        "the wall clock, as a worker idle since the file ended)")
    return a


def _as_of(text: str) -> int | str:
    """``--as-of``: epoch ms, or ``now``."""
    from streams.sampling.analyze import AS_OF_NOW

    if text.strip().lower() == AS_OF_NOW:
        return AS_OF_NOW
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch ms or 'now', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Estimate records (JSON lines) on stdout, the counts (rejected lines by
    reason, the reducer's and each experiment's counters) on stderr."""
    from schemas.codec import dumps
    from streams.sampling.analyze import analyze

    recs, counts = analyze(args.experiments, args.events, seed=args.seed, chains=args.chains,
                           sweeps=args.sweeps, as_of=getattr(args, "as_of", None))
    out = sys.stdout.buffer
    for r in recs:
        out.write(dumps(r) + b"\n")
    out.flush()
    print(dumps(counts).decode(), file=sys.stderr)
    return 0
