"""``liftstream admin``: operator commands on the state in Redis
(``reset-offsets``, ``accept-partitions``)."""

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
    ap = asub.add_parser("accept-partitions", help="record the events topic's current "
                         "partition count (after partitions were added: ingest refuses a "
                         "count other than the recorded one). Let the workers drain first; "
                         "restart them after.")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--yes", action="store_true", help="do it (else: say what would change)")
    add_arguments(ap)
    return ad


def run(args: argparse.Namespace) -> int:
    """``liftstream admin reset-offsets|accept-partitions --topic T [--yes]``."""
    from streams.config.settings import from_args, redis_client

    s = from_args(args)
    r = redis_client(s)
    if args.action == "accept-partitions":
        return _accept_partitions(s, r, args.topic, args.yes)
    return _reset_offsets(r, args.topic, args.yes)


def _reset_offsets(r, topic: str, yes: bool) -> int:
    """``admin reset-offsets``: forget a recreated topic's positions."""
    from streams.state.keys import TOPIC_IDS
    from streams.state.registry import Registry
    from streams.state.store import reset_topic_offsets

    if not yes:
        known = r.hget(TOPIC_IDS, topic)
        print(f"would forget every applied offset, partition clock and owner epoch of "
              f"{topic!r} (recorded topic id: {known.decode() if known else 'none'}) and "
              "each experiment's offsets of it; the experiments' state stays. "
              "Stop the ingest workers first; run again with --yes.")
        return 0
    n = reset_topic_offsets(r, topic, Registry(r).ids())
    print(f"reset {topic}: {n} fields removed")
    return 0


def _accept_partitions(s, r, topic: str, yes: bool) -> int:
    """``admin accept-partitions``: record the topic's partition count as
    Kafka reports it now (the recorded one is what ingest checks at start)."""
    from confluent_kafka import Consumer

    from streams.config.settings import kafka_config
    from streams.state.keys import TOPIC_PARTITIONS
    from streams.state.store import accept_partition_count

    c = Consumer(kafka_config(s, **{"group.id": f"{s.app_id}-admin"}))
    try:
        md = c.list_topics(topic, timeout=30).topics[topic]
    finally:
        c.close()
    if md.error is not None:
        print(f"events topic {topic!r}: {md.error}")
        return 1
    n = len(md.partitions)
    known = r.hget(TOPIC_PARTITIONS, topic)
    if not yes:
        print(f"would record {n} partitions for {topic!r} (recorded now: "
              f"{known.decode() if known else 'none'}). Units whose events then arrive on "
              "another partition than before are counted; run again with --yes.")
        return 0
    old = accept_partition_count(r, topic, n)
    print(f"{topic}: {n} partitions recorded (before: {old if old is not None else 'none'})")
    return 0
