"""Small operator commands: ``experiments create|list|stop|delete``, ``admin reset-offsets``,
``estimates``, ``watch``."""

from __future__ import annotations

import sys

from schemas.codec import dumps, loads
from schemas.validate import InvalidRecord, experiment_to_dict, parse_experiment
from streams.config.settings import from_args, kafka_config, redis_client
from streams.sampling.sampler import NOTICE_CHANNEL, estimate_key, read_estimates
from streams.state.registry import Registry


def publish_experiment(bootstrap, topic: str, cfg) -> None:
    """``bootstrap``: a bootstrap string, or a client config (``kafka_config``)."""
    from confluent_kafka import Producer

    conf = kafka_config(bootstrap)
    p = Producer(conf)
    p.produce(topic, key=cfg.experiment_id.encode(), value=dumps(experiment_to_dict(cfg)))
    if p.flush(30):
        raise RuntimeError(f"experiment config not delivered to {conf['bootstrap.servers']}")


def experiments(args) -> int:
    s = from_args(args)
    if args.action == "create":
        raw = sys.stdin.buffer.read() if args.config == "-" else open(args.config, "rb").read()
        try:
            cfg = parse_experiment(raw)
        except InvalidRecord as e:
            print(f"invalid experiment config: {e.message}", file=sys.stderr)
            return 2
        from streams.service.topics import ensure_topics
        from streams.service.worker import topic_specs

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
    if args.action == "stop":
        return stop_experiment(s, args.experiment, args.at)
    if args.action == "delete":
        return delete_experiment(s, args.experiment)
    reg = Registry(redis_client(s))
    for eid in reg.ids():
        cfg = reg.get(eid)
        print(dumps(experiment_to_dict(cfg)).decode() if cfg else eid)
    return 0


def stop_experiment(s, experiment_id: str, at_ms: int | None = None) -> int:
    """Publish the experiment's config with status "stopped" and end_at (now
    unless given); also straight into the registry."""
    import dataclasses
    import time

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
    from confluent_kafka import Producer

    p = Producer(kafka_config(s))
    p.produce(s.topic_experiments, key=experiment_id.encode(), value=None)
    if p.flush(30):
        print("tombstone not delivered", file=sys.stderr)
        return 1
    n = Registry(redis_client(s)).delete(experiment_id)
    print(f"deleted {experiment_id}: {n} keys removed")
    return 0


def admin(args) -> int:
    """``liftstream admin reset-offsets --topic T [--yes]``."""
    from streams.state.keys import TOPIC_IDS
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


def estimates(args) -> int:
    s = from_args(args)
    for rec in read_estimates(redis_client(s), args.experiment):
        print(dumps(rec).decode())
    return 0


def watch(args) -> int:
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
