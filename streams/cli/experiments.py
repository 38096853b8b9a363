"""``liftstream experiments create|list|stop|delete``."""

from __future__ import annotations

import argparse
import sys

from streams.config.settings import add_arguments

NAME = "experiments"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``experiments`` and its actions, under ``sub``."""
    x = sub.add_parser(NAME, help="create or list experiments")
    xsub = x.add_subparsers(dest="action", required=True)
    xc = xsub.add_parser("create", help="publish a config to the experiments topic")
    xc.add_argument("config", help="JSON file (or - for stdin) with one experiment config")
    add_arguments(xc)
    xl = xsub.add_parser("list", help="registered experiments (from Redis), one config a "
                         "line; then, on stderr, what ingest lost outside any experiment")
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
    return x


def run(args: argparse.Namespace) -> int:
    """Dispatch ``args.action``."""
    from streams.config.settings import from_args

    s = from_args(args)
    if args.action == "create":
        return create(s, args.config)
    if args.action == "stop":
        return stop_experiment(s, args.experiment, args.at)
    if args.action == "delete":
        return delete_experiment(s, args.experiment)
    return list_experiments(s)


def create(s, path: str) -> int:
    """Validate the config in ``path`` (``-``: stdin), create the topics if
    missing, put it into the registry (which refuses a change the
    experiment's state cannot take), then publish it."""
    from schemas.codec import dumps
    from schemas.validate import InvalidRecord, experiment_to_dict, parse_experiment
    from streams.config.settings import kafka_config, redis_client
    from streams.service.experiments import publish_experiment
    from streams.service.topics import ensure_topics
    from streams.service.worker import topic_specs
    from streams.state.registry import Registry

    raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    try:
        cfg = parse_experiment(raw)
    except InvalidRecord as e:
        print(f"invalid experiment config: {e.message}", file=sys.stderr)
        return 2
    ensure_topics(kafka_config(s), topic_specs(s))
    # into the registry first (so traffic sent right after is recognised):
    # it refuses a change the experiment's state cannot take
    try:
        Registry(redis_client(s)).put(cfg)
    except InvalidRecord as e:
        print(f"config refused: {e.message}", file=sys.stderr)
        return 2
    publish_experiment(kafka_config(s), s.topic_experiments, cfg)
    print(dumps(experiment_to_dict(cfg)).decode())
    return 0


def list_experiments(s) -> int:
    """One line per registered experiment: its config, or its id alone; then
    what ingest lost outside any experiment (``loss_lines``) on stderr, so
    stdout stays one JSON config a line."""
    from schemas.codec import dumps
    from schemas.validate import experiment_to_dict
    from streams.config.settings import redis_client
    from streams.service.overview import read_ingest_losses
    from streams.state.registry import Registry

    r = redis_client(s)
    reg = Registry(r)
    for eid in reg.ids():
        cfg = reg.get(eid)
        print(dumps(experiment_to_dict(cfg)).decode() if cfg else eid)
    lines = loss_lines(s.topic_events, read_ingest_losses(r, s.topic_events),
                       color=sys.stderr.isatty())
    print("\n".join(lines), file=sys.stderr)
    return 0


def loss_lines(topic: str, losses: dict[str, dict[str, int]], color: bool = False) -> list[str]:
    """What ingest lost of ``topic`` outside any experiment, as the overview
    page shows it: one line when nothing, else one per kind (``INGEST_LOSS_KINDS``),
    a non-zero one marked (``!``, red on a terminal) with its partitions' counts."""
    from streams.service.overview import INGEST_LOSS_KINDS

    lost = {k: {p: n for p, n in losses.get(k, {}).items() if n > 0} for k in INGEST_LOSS_KINDS}
    if not any(lost.values()):
        return [f"ingest losses of {topic}: none"]
    out = [f"ingest losses of {topic} (outside any experiment, per events partition):"]
    for kind, what in INGEST_LOSS_KINDS.items():
        if not lost[kind]:
            out.append(f"  {kind}: none ({what})")
            continue
        counts = ", ".join(f"partition {p}: {n}" for p, n in lost[kind].items())
        line = f"! {kind}: {counts} ({what})"
        out.append(f"\x1b[1;31m{line}\x1b[0m" if color else line)
    return out


def stop_experiment(s, experiment_id: str, at_ms: int | None = None) -> int:
    """Publish the experiment's config with status "stopped" and end_at (now
    unless given); also straight into the registry."""
    import dataclasses
    import time

    from schemas.codec import dumps
    from schemas.validate import experiment_to_dict
    from streams.config.settings import kafka_config, redis_client
    from streams.service.experiments import publish_experiment
    from streams.state.registry import Registry

    reg = Registry(redis_client(s))
    cfg = reg.get(experiment_id, fresh=True)
    if cfg is None:
        print(f"unknown experiment {experiment_id!r}", file=sys.stderr)
        return 2
    end = int(time.time() * 1000) if at_ms is None else int(at_ms)
    cfg = dataclasses.replace(cfg, status="stopped", end_at=end)
    publish_experiment(kafka_config(s), s.topic_experiments, cfg)
    reg.put(cfg)
    print(dumps(experiment_to_dict(cfg)).decode())
    return 0


def delete_experiment(s, experiment_id: str) -> int:
    """A tombstone on the experiments topic (workers delete the state when
    they read it, and once more after their config cache expired), and the
    state deleted here at once."""
    from streams.config.settings import redis_client
    from streams.service.experiments import publish_tombstone
    from streams.state.registry import Registry

    if not publish_tombstone(s, experiment_id):
        print("tombstone not delivered", file=sys.stderr)
        return 1
    n = Registry(redis_client(s)).delete(experiment_id)
    print(f"deleted {experiment_id}: {n} keys removed")
    return 0
