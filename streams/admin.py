"""Small operator commands: ``experiments create|list``, ``estimates``, ``watch``."""

from __future__ import annotations

import sys

import redis

from schemas.codec import dumps, loads
from schemas.validate import InvalidRecord, experiment_to_dict, parse_experiment
from streams.registry import Registry
from streams.sampler import NOTICE_CHANNEL, estimate_key, read_estimates
from streams.settings import from_args


def publish_experiment(bootstrap: str, topic: str, cfg) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, key=cfg.experiment_id.encode(), value=dumps(experiment_to_dict(cfg)))
    if p.flush(30):
        raise RuntimeError(f"experiment config not delivered to {bootstrap}")


def experiments(args) -> int:
    s = from_args(args)
    if args.action == "create":
        raw = sys.stdin.buffer.read() if args.config == "-" else open(args.config, "rb").read()
        try:
            cfg = parse_experiment(raw)
        except InvalidRecord as e:
            print(f"invalid experiment config: {e.message}", file=sys.stderr)
            return 2
        from streams.topics import ensure_topics
        from streams.worker import topic_specs

        ensure_topics(s.bootstrap_servers, topic_specs(s))
        publish_experiment(s.bootstrap_servers, s.topic_experiments, cfg)
        # also straight into the registry, so traffic sent right after is recognised
        Registry(redis.Redis.from_url(s.redis_url)).put(cfg)
        print(dumps(experiment_to_dict(cfg)).decode())
        return 0
    reg = Registry(redis.Redis.from_url(s.redis_url))
    for eid in reg.ids():
        cfg = reg.get(eid)
        print(dumps(experiment_to_dict(cfg)).decode() if cfg else eid)
    return 0


def estimates(args) -> int:
    s = from_args(args)
    for rec in read_estimates(redis.Redis.from_url(s.redis_url), args.experiment):
        print(dumps(rec).decode())
    return 0


def watch(args) -> int:
    s = from_args(args)
    r = redis.Redis.from_url(s.redis_url)
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
