"""``liftstream watch [EXPERIMENT]``: each new estimate as it is published."""

from __future__ import annotations

import argparse

from streams.config.settings import add_arguments

NAME = "watch"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``watch``, under ``sub``."""
    wt = sub.add_parser(NAME, help="print each new estimate as it is published")
    wt.add_argument("experiment", nargs="?", help="only this experiment")
    add_arguments(wt)
    return wt


def run(args: argparse.Namespace) -> int:
    """Follow the sampler's notices (Redis pub/sub) and print each new
    estimate record (of ``args.experiment`` only, when given) until Ctrl-C."""
    from schemas.codec import loads
    from streams.config.settings import from_args, redis_client
    from streams.state.keys import NOTICE_CHANNEL, estimate_key

    s = from_args(args)
    r = redis_client(s, socket_timeout=None)  # listen() waits for notices indefinitely
    ps = r.pubsub()
    ps.subscribe(NOTICE_CHANNEL)
    try:
        for msg in ps.listen():
            if msg["type"] != "message":
                continue
            n = loads(msg["data"])
            if args.experiment and n["experiment_id"] != args.experiment:
                continue
            raw = r.get(estimate_key(n["experiment_id"], n["metric"], n["variant"]))
            if raw:
                print(raw.decode(), flush=True)
    except KeyboardInterrupt:
        pass
    return 0
