"""Publishing experiment configs to the experiments topic (``liftstream
experiments``, the demo, the benchmarks): the registry agent of every worker
reads them from there."""

from __future__ import annotations

from typing import Any

from schemas.codec import dumps
from schemas.records import ExperimentConfig
from schemas.validate import experiment_to_dict
from streams.config.settings import Settings, kafka_config


def publish_experiment(bootstrap: Settings | dict[str, Any] | str, topic: str,
                       cfg: ExperimentConfig) -> None:
    """Produce ``cfg`` to ``topic``, keyed by its experiment id, and wait for it.

    :param bootstrap: a bootstrap string, a client config (``kafka_config``)
        or settings.
    :param topic: the experiments topic.
    :param cfg: the config.
    :raises RuntimeError: not delivered within 30 s.
    """
    from confluent_kafka import Producer

    conf = kafka_config(bootstrap)
    p = Producer(conf)
    p.produce(topic, key=cfg.experiment_id.encode(), value=dumps(experiment_to_dict(cfg)))
    if p.flush(30):
        raise RuntimeError(f"experiment config not delivered to {conf['bootstrap.servers']}")


def publish_tombstone(s: Settings, experiment_id: str) -> bool:
    """Produce a tombstone (null value) for ``experiment_id`` to the
    experiments topic: workers delete the experiment's state when they read it.

    :returns: whether it was delivered within 30 s.
    """
    from confluent_kafka import Producer

    p = Producer(kafka_config(s))
    p.produce(s.topic_experiments, key=experiment_id.encode(), value=None)
    return not p.flush(30)
